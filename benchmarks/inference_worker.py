"""One side of ``benchmarks/inference.py`` in a process of its own, started with that side's environment.

Why processes: OpenMP reads ``OMP_WAIT_POLICY`` and its thread settings once, when torch starts its
runtime, so a process that has imported torch cannot switch them. domainflow's entry points set
``OMP_WAIT_POLICY=PASSIVE`` (:func:`domainflow.settings.configure_environment`), while a user of the
transformers pipeline runs it at the libraries' defaults; measured in one process, one of the two
would run under the other's settings. Here each side loads its model once in a persistent child, and
the parent still alternates timed rounds between the children, so that a noisy machine slows all
sides alike. Only one child works at a time; the others wait on a blocking read.

Protocol: the parent (:class:`SideProcess`) starts ``python benchmarks/inference_worker.py`` and
speaks JSON lines, one request on the child's stdin, one reply on its stdout. The child first points
its stdout at stderr, so that whatever libraries print cannot corrupt the replies. Requests (``op``):

* ``load`` (side, model_dir, threads, texts) → the side's environment as it runs (read after its
  libraries and model are loaded), GEMM runtime, encoder sizes and the token count of every text;
* ``warmup`` (singles) → nothing; ``batch`` → seconds and predictions for all texts at batch 32;
  ``singles`` (indices) → seconds of each one-text request;
* ``peak`` (seconds) → this process's GEMM peak in the side's runtime (:mod:`benchmarks.gemm_peak`);
* ``reference`` (pipeline side) → domainflow's own fp32 predictions, to check the pipeline against;
* ``quit``.

A request that fails is answered ``{"error": traceback}``, which the parent raises with the side's name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_BATCH = 32
SIDES = ("pipeline", "champion")
SETTINGS = ("project", "defaults")
# Variables that tune the thread runtimes (OpenMP as torch ships it, Intel's, MKL, OpenBLAS, HF tokenizers).
# Under "defaults" none of them reaches the child, whoever set them.
RUNTIME_VARIABLES = (
    "OMP_WAIT_POLICY",
    "OMP_NUM_THREADS",
    "OMP_DYNAMIC",
    "OMP_PROC_BIND",
    "OMP_PLACES",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "KMP_AFFINITY",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
)


class WorkerError(RuntimeError):
    """A side's process failed or answered an error."""


def side_environment(setting: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a side's process starts with.

    ``project``: as domainflow's entry points run (``domainflow serve`` included), i.e. ``base``
    (default: this process's environment) with :func:`~domainflow.settings.configure_environment`
    applied. ``defaults``: the same without any of :data:`RUNTIME_VARIABLES`, so torch, OpenMP and
    tokenizers run as they come. Both keep the offline-hub and cache settings, which decide where
    files come from, not how fast anything runs.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown environment setting {setting!r}; known: {', '.join(SETTINGS)}")
    if base is None:
        from domainflow.settings import configure_environment

        configure_environment()  # idempotent (setdefault): what every domainflow entry point does first
        base = os.environ
    env = dict(base)
    if setting == "defaults":
        for variable in RUNTIME_VARIABLES:
            env.pop(variable, None)
    return env


class SideProcess:
    """The parent's handle on one side's process: start it, send requests, read replies, stop it."""

    def __init__(self, name: str, setting: str, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.setting = setting
        environment = dict(env) if env is not None else side_environment(setting)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environment,
            text=True,
            encoding="utf-8",
        )

    def send(self, op: str, **fields: Any) -> None:
        stdin = self.process.stdin
        assert stdin is not None  # noqa: S101 - Popen(stdin=PIPE)
        try:
            stdin.write(json.dumps({"op": op, **fields}) + "\n")
            stdin.flush()
        except BrokenPipeError as exc:
            raise WorkerError(self._exited(op)) from exc

    def receive(self, op: str) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None  # noqa: S101 - Popen(stdout=PIPE)
        line = stdout.readline()
        if not line:
            raise WorkerError(self._exited(op))
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.name}: {op!r} failed in its process:\n{reply['error']}")
        return reply

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.receive(op)

    def _exited(self, op: str) -> str:
        code = self.process.wait()
        return f"{self.name}: its process exited with code {code} during {op!r} (its messages are above)"

    def close(self) -> None:
        """Ask the process to quit; kill it if it does not within a minute (it may be stuck in a library)."""
        if self.process.poll() is None:
            try:
                self.request("quit")
                self.process.wait(timeout=60)
            except (WorkerError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> SideProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- the child


class Side:
    """A loaded model and the texts it is timed on; subclasses say how it classifies."""

    runtime = "torch_fp32"

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def classify(self, texts: list[str]) -> list[int]:
        raise NotImplementedError

    def classify_one(self, text: str) -> object:
        raise NotImplementedError

    def description(self) -> dict[str, Any]:
        raise NotImplementedError

    def warmup(self, singles: int) -> dict[str, Any]:
        """Allocators, kernels and tokenizer caches, before anything is timed."""
        self.classify(self.texts[:THROUGHPUT_BATCH])
        for text in self.texts[:singles]:
            self.classify_one(text)
        return {}

    def batch(self) -> dict[str, Any]:
        started = time.perf_counter()
        predictions = self.classify(self.texts)
        return {"seconds": time.perf_counter() - started, "predictions": predictions}

    def singles(self, indices: list[int]) -> dict[str, Any]:
        seconds = []
        for index in indices:
            started = time.perf_counter()
            self.classify_one(self.texts[index])
            seconds.append(time.perf_counter() - started)
        return {"seconds": seconds}

    def peak(self, seconds: float) -> dict[str, Any]:
        from benchmarks.gemm_peak import measure_peak

        return measure_peak(self.runtime, None, seconds).as_dict()

    def reference(self) -> dict[str, Any]:
        raise ValueError(f"{type(self).__name__} has no reference predictions (only the pipeline side does)")


class PipelineSide(Side):
    """The fp32 model behind ``transformers.pipeline("text-classification")``, called as its users call it."""

    def __init__(self, texts: list[str], model_dir: Path) -> None:
        from domainflow.hf_pipeline import text_classification_pipeline
        from domainflow.modeling import read_metadata

        super().__init__(texts)
        self.model_dir = model_dir
        self.pipe = text_classification_pipeline(model_dir)
        self.label2id = self.pipe.model.config.label2id
        self.max_length = int(read_metadata(model_dir)["max_length"])
        self.tokenizer_kwargs = {"truncation": True, "max_length": self.max_length}

    def classify(self, texts: list[str]) -> list[int]:
        outputs = self.pipe(texts, batch_size=THROUGHPUT_BATCH, **self.tokenizer_kwargs)
        return [self.label2id[out["label"]] for out in outputs]

    def classify_one(self, text: str) -> object:
        return self.pipe(text, **self.tokenizer_kwargs)

    def description(self) -> dict[str, Any]:
        ids = self.pipe.tokenizer(self.texts, **self.tokenizer_kwargs)["input_ids"]
        return _description(self.model_dir, self.runtime, [len(i) for i in ids], {})

    def reference(self) -> dict[str, Any]:
        """domainflow's own fp32 inference (length-sorted batches), loaded only now: it is never timed."""
        from domainflow.modeling import load_classifier, predict_proba

        ours = load_classifier(self.model_dir)
        return {"predictions": predict_proba(ours, self.texts, batch_size=THROUGHPUT_BATCH).argmax(dim=1).tolist()}


class ChampionSide(Side):
    """A registry model as serving loads it: ``load_classifier`` + ``predict_proba``."""

    def __init__(self, texts: list[str], model_dir: Path) -> None:
        from domainflow.modeling import load_classifier
        from domainflow.onnxrt import OnnxClassifier

        super().__init__(texts)
        self.model_dir = model_dir
        self.loaded = load_classifier(model_dir)
        compression = self.loaded.metadata.get("compression")
        if isinstance(self.loaded.model, OnnxClassifier):
            self.runtime = "onnxruntime_int8"
        elif compression == "dynamic_int8":
            self.runtime = "torch_dynamic_int8"

    def classify(self, texts: list[str]) -> list[int]:
        from domainflow.modeling import predict_proba

        return predict_proba(self.loaded, texts, batch_size=THROUGHPUT_BATCH).argmax(dim=1).tolist()

    def classify_one(self, text: str) -> object:
        from domainflow.modeling import predict_proba

        return predict_proba(self.loaded, [text], batch_size=1)

    def description(self) -> dict[str, Any]:
        from domainflow.modeling import encode_texts
        from domainflow.onnxrt import OnnxClassifier

        model = self.loaded.model
        extra: dict[str, Any] = {}
        if isinstance(model, OnnxClassifier):
            options = model.session.get_session_options()
            extra["onnxruntime_intra_op_threads"] = options.intra_op_num_threads
            extra["onnxruntime_spinning"] = options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        counts = [len(ids) for ids in encode_texts(self.loaded.tokenizer, self.texts, self.loaded.max_length)]
        return _description(self.model_dir, self.runtime, counts, extra)


def _description(model_dir: Path, runtime: str, token_counts: list[int], extra: dict[str, Any]) -> dict[str, Any]:
    """What the parent prints and counts with: the environment this process runs under, and the model's sizes."""
    import torch

    from benchmarks.gemm_peak import EncoderShape
    from domainflow.hf_export import encoder_config_of
    from domainflow.modeling import read_metadata

    metadata = read_metadata(model_dir)
    environment: dict[str, Any] = {variable: os.environ.get(variable) for variable in RUNTIME_VARIABLES}
    environment.update(
        pid=os.getpid(),
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        **extra,
    )
    return {
        "environment": environment,
        "runtime": runtime,
        "candidate": metadata.get("candidate"),
        "compression": metadata.get("compression"),
        "encoder": asdict(EncoderShape.from_config(encoder_config_of(model_dir))),
        "token_counts": token_counts,
    }


def load_side(side: str, model_dir: str, threads: int | None, texts: list[str]) -> Side:
    """Set the thread count first (an ONNX Runtime session takes torch's at load), then load the model."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; known: {', '.join(SIDES)}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    loader = PipelineSide if side == "pipeline" else ChampionSide
    return loader(texts, Path(model_dir))


def serve(requests: IO[str], replies: IO[str]) -> None:
    """Answer requests until ``quit`` or the end of input (the parent is gone)."""
    side: Side | None = None
    for line in requests:
        request = json.loads(line)
        op = request.pop("op", None)
        try:
            if op == "quit":
                reply: dict[str, Any] = {}
            elif op == "load":
                side = load_side(**request)
                reply = side.description()
            elif side is None:
                raise ValueError(f"{op!r} before 'load'")
            else:
                handlers: dict[str, Callable[..., dict[str, Any]]] = {
                    "warmup": side.warmup,
                    "batch": side.batch,
                    "singles": side.singles,
                    "peak": side.peak,
                    "reference": side.reference,
                }
                if op not in handlers:
                    raise ValueError(f"unknown request {op!r}; known: load, quit, {', '.join(handlers)}")
                reply = handlers[op](**request)
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
        if op == "quit":
            return


def main() -> int:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # C and Python prints alike go to stderr from here on
    sys.path.insert(0, str(ROOT))  # the checkout this script belongs to
    serve(sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
