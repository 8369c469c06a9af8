"""Run the ``domainflow`` CLI with one function rigged to kill its own process, for fault-injection tests.

    python -m tests.faults.killer --kill-in MODULE:QUALNAME [--skip N | --after N] [--when-arg-matches REGEX] -- ARGS
    python -m tests.faults.killer --race-in MODULE:QUALNAME --race-command CMD [--skip N] [--when-arg-matches REGEX] \
        -- ARGS

The product code has no test hooks: this launcher wraps the named function (a module function such
as ``domainflow.registry:_copy_file`` or a method such as ``transformers.trainer:Trainer._save_checkpoint``)
in this process, then runs ``flows.cli`` exactly as the ``domainflow`` command does, with the
arguments after ``--``. The wrapper counts only the calls that match ``--when-arg-matches`` (a regular
expression searched in every ``str`` or path argument; all calls when not given) and then:

``--kill-in``
    SIGKILLs its own process as the first matching call begins (nothing of that call runs); with
    ``--skip N``, as the (N+1)-th begins (N calls ran whole); with ``--after N``, as the N-th returns
    (it ran whole, its caller did not go on). Killing a function that is called partway through a
    larger write (the optimizer save inside the Trainer's checkpoint save, one file of a folder copy)
    leaves that write half done.
``--race-in``
    Before the first matching call (the (N+1)-th with ``--skip N``), runs ``--race-command`` as a
    separate process, waits for it, then calls the original: another process changes shared state at
    that exact moment (once: later calls run as they are). The command is split like a shell line (no
    shell runs it) and gets the call's arguments as JSON in ``KILLER_CALL_ARGS``
    (``{"args": [...], "kwargs": {...}}``, each as ``str``).

Every action is announced on stderr, flushed, before it happens (``killer: SIGKILL ...``,
``killer: race ...``, ``killer: race exited N``): a test reads it to know the fault fired where it
meant, not somewhere else. SIGKILL is ``os.kill(os.getpid(), SIGKILL)``: no exception, no ``finally``,
no atexit, exactly as ``kill -9`` from outside; threads and children are not told. Children the
process started (Prefect's temporary API server, which stops itself once its parent is gone) outlive
it for a moment, as after a real ``kill -9``: start this launcher in its own session and kill the
group afterwards.

The target is patched after ``flows.cli`` is imported (it configures Hugging Face and Prefect before
they read their settings) and before the CLI runs. Code that did ``from module import function`` before
that keeps the unpatched function: name the module attribute that is looked up at call time (module
globals, class attributes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

PREFIX = "killer:"


def announce(text: str) -> None:
    """One line on stderr, flushed together with stdout, so it is seen even if the process dies next."""
    sys.stdout.flush()
    sys.stderr.write(f"{PREFIX} {text}\n")
    sys.stderr.flush()


def die(where: str) -> None:
    announce(f"SIGKILL {where}")
    os.kill(os.getpid(), signal.SIGKILL)


def _text_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    return [str(value) for value in (*args, *kwargs.values()) if isinstance(value, (str, os.PathLike))]


def _resolve(target: str) -> tuple[Any, str, Any]:
    """``MODULE:QUALNAME`` -> (the object holding the attribute, its name, the attribute as stored there)."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise SystemExit(f"{PREFIX} target must be MODULE:QUALNAME, got {target!r}")
    owner: Any = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    stored = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if stored is None:
        raise SystemExit(f"{PREFIX} {target}: {owner!r} has no attribute {name!r}")
    return owner, name, stored


def install(target: str, *, skip: int, after: int | None, pattern: str | None, race_command: str | None) -> None:
    """Replace ``target`` with a wrapper that kills this process (or runs the race) at the chosen call."""
    owner, name, stored = _resolve(target)
    kind = type(stored) if isinstance(stored, (staticmethod, classmethod)) else None
    original: Callable[..., Any] = stored.__func__ if kind is not None else stored
    matcher = re.compile(pattern) if pattern else None
    seen = 0

    def race(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert race_command is not None
        call = {"args": [str(a) for a in args], "kwargs": {k: str(v) for k, v in kwargs.items()}}
        announce(f"race before call {seen} of {target}: {race_command}")
        done = subprocess.run(
            shlex.split(race_command), env={**os.environ, "KILLER_CALL_ARGS": json.dumps(call)}, check=False
        )
        announce(f"race exited {done.returncode}")

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        texts = _text_arguments(args, kwargs)
        if matcher is not None and not any(matcher.search(text) for text in texts):
            return original(*args, **kwargs)
        seen += 1
        if race_command is not None:
            if seen == skip + 1:
                race(args, kwargs)
            return original(*args, **kwargs)
        if after is None and seen == skip + 1:
            die(f"at the start of call {seen} of {target}: {texts}")
        result = original(*args, **kwargs)
        if seen == after:
            die(f"after call {seen} of {target} returned: {texts}")
        return result

    wrapper.__name__ = getattr(original, "__name__", name)
    wrapper.__qualname__ = getattr(original, "__qualname__", name)
    wrapper.__doc__ = getattr(original, "__doc__", None)
    setattr(owner, name, kind(wrapper) if kind is not None else wrapper)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m tests.faults.killer", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--kill-in", metavar="MODULE:QUALNAME", help="SIGKILL this process at a call of this function")
    where.add_argument("--race-in", metavar="MODULE:QUALNAME", help="run --race-command before a call of this")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--skip", type=int, default=0, metavar="N", help="let N matching calls run first")
    when.add_argument("--after", type=int, default=None, metavar="N", help="kill as the N-th matching call returns")
    parser.add_argument("--when-arg-matches", metavar="REGEX", help="count only calls with a matching str/path arg")
    parser.add_argument("--race-command", metavar="CMD", help="the separate process --race-in runs (shell words)")
    options = parser.parse_args(argv[:split])
    if split == len(argv):
        parser.error("put the domainflow arguments after --")
    if options.skip < 0 or (options.after is not None and options.after < 1):
        parser.error("--skip takes N >= 0, --after N >= 1")
    if bool(options.race_in) != bool(options.race_command):
        parser.error("--race-in and --race-command go together")
    if options.race_in and options.after is not None:
        parser.error("--race-in runs its command before a call: use --skip, not --after")
    return options, argv[split + 1 :]


def main(argv: list[str] | None = None) -> None:
    options, cli_args = parse(sys.argv[1:] if argv is None else argv)
    import flows.cli  # first: it configures Hugging Face and Prefect before anything imports them

    target = options.kill_in or options.race_in
    install(
        target,
        skip=options.skip,
        after=options.after,
        pattern=options.when_arg_matches,
        race_command=options.race_command,
    )
    announce(
        f"armed {'kill' if options.kill_in else 'race'} in {target} (skip={options.skip}, after={options.after}, "
        f"when-arg-matches={options.when_arg_matches!r})"
    )
    sys.argv = ["domainflow", *cli_args]
    flows.cli.main()


if __name__ == "__main__":
    main()
