"""The CLI's rich console, wide enough for the candidate table when output goes to a file.

Rich falls back to 80 columns when stdout is not a terminal, which squeezes the candidate
table of a logged run (``domainflow run ... > run.log``) into truncated cells. A terminal keeps
its own width; ``COLUMNS`` still wins when set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console

LOG_WIDTH = 160


#: Exit codes every command shares.
EXIT_USAGE = 2  # a wrong argument, an unknown domain, a bad domain file
EXIT_BAD_DATA = 3  # the data failed validation: nothing was trained
EXIT_NOT_PROMOTED = 4  # ran, nothing promoted (only with --require-promotion)
EXIT_REGISTRY = 5  # the registry refused the change (another run promoted meanwhile) or is damaged


def make_console(*, stderr: bool = False) -> Console:
    """A console that is the terminal's width, or ``LOG_WIDTH`` columns when writing to a file or pipe."""
    stream = sys.stderr if stderr else sys.stdout
    if os.environ.get("COLUMNS") or stream.isatty():
        return Console(stderr=stderr)
    return Console(width=LOG_WIDTH, stderr=stderr)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """An error on stderr and the command's exit code."""
    import typer

    make_console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code=code)


def domain_name(name_or_file: str) -> str:
    """The name of the domain a command was given (a name, or a domain file, then known by name in this
    process), or a clear error listing the known ones."""
    from domainflow.catalog import UnknownDomainError, get_domain, register
    from domainflow.domain_files import DomainFileError, looks_like_domain_file

    try:
        spec = get_domain(name_or_file)
    except (UnknownDomainError, DomainFileError) as exc:
        fail(str(exc))
    if looks_like_domain_file(name_or_file):
        register(spec, origin=f"file {Path(name_or_file).expanduser().resolve()}")  # deeper layers look it up by name
    return spec.name
