"""This CPU's peak GEMM throughput in the runtimes the benchmarked models use, and a model's GEMM work per
text: together they say how far a measured texts/s is from what the machine allows.

Usage (from the repository root)::

    python benchmarks/gemm_peak.py                              # ORT int8 and torch fp32, torch's default threads
    python benchmarks/gemm_peak.py --threads 1 --runtime onnxruntime_int8 torch_dynamic_int8

Runtimes (each the kernel a model's Linear layers run in, so that a model's share of the peak is a
share of something it could reach):

* ``onnxruntime_int8`` — a one-node ONNX graph built with ``onnx.helper``: ``MatMulInteger`` of uint8
  activations (a dynamic zero point, as ``DynamicQuantizeLinear`` gives) and int8 weights with one zero
  point per output column, which is exactly the node ONNX Runtime's dynamic quantization puts behind
  each Linear layer of an ``onnx_int8`` champion. The session has the champion's options
  (:class:`domainflow.onnxrt.OnnxClassifier`: intra-op threads, no spinning). The quantize and
  rescale steps around the node are not timed: this is the kernel's ceiling.
* ``torch_fp32`` — ``torch.nn.functional.linear`` in fp32, what ``nn.Linear`` runs in the fp32 model
  behind the transformers pipeline. It runs under the OpenMP settings of the process it is called in.
* ``torch_dynamic_int8`` — torch's dynamically quantized Linear (fbgemm) as ``dynamic_int8`` candidates
  run it: fp32 in and out, the per-call activation quantization included (torch exposes no int8-in
  path through the same kernels).

Shapes are the model's Linear layers: M tokens × K → N for 384→384 (Q, K, V, O), 384→1536 and 1536→384
(feed-forward), at M = 16 (about one text), 128 and 512 (a batch of 32 texts of ~16 tokens). A GEMM
counts 2·M·K·N operations (a multiply and an add per term), as :func:`encoder_flops` counts a model.
Each shape's time is the best of several repeats (noise only ever slows a kernel down), and the peak
is the best shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUNTIMES = ("onnxruntime_int8", "torch_fp32", "torch_dynamic_int8")
MODEL_WIDTHS = ((384, 384), (384, 1536), (1536, 384))  # (K, N) of MiniLM's Linear layers
TOKEN_COUNTS = (16, 128, 512)
REPEATS = 5


@dataclass(frozen=True)
class EncoderShape:
    """The sizes of a BERT-style encoder that its GEMM work depends on."""

    layers: int
    hidden: int
    intermediate: int

    @classmethod
    def from_config(cls, config: Any) -> EncoderShape:
        """From a transformers config (``num_hidden_layers``, ``hidden_size``, ``intermediate_size``)."""
        return cls(int(config.num_hidden_layers), int(config.hidden_size), int(config.intermediate_size))


def encoder_flops(shape: EncoderShape, tokens: int) -> int:
    """GEMM operations (multiply and add each counted) of one encoder forward over one text of ``tokens`` tokens.

    Counted, per layer: the Q, K, V and output projections (4 · 2·T·d²), the feed-forward block
    (2 · 2·T·d·f) and attention's two matmuls, Q·Kᵀ and softmax·V (2 · 2·T²·d, all heads together).
    Not counted: embeddings (a table look-up), layer norms, softmax, GELU, bias adds, mean pooling and
    the classifier head (one d×labels product, under 0.2% of a MiniLM layer) — none of them runs in a
    GEMM kernel, so none belongs in a comparison with a GEMM peak. Padding is not counted either: it
    is work the model wastes, not work the text needs.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    d, f = shape.hidden, shape.intermediate
    projections = 4 * 2 * tokens * d * d
    feed_forward = 2 * 2 * tokens * d * f
    attention = 2 * 2 * tokens * tokens * d
    return shape.layers * (projections + feed_forward + attention)


def mean_flops_per_text(shape: EncoderShape, token_counts: Sequence[int]) -> float:
    """Mean of :func:`encoder_flops` over texts of these token counts.

    The mean of per-text counts rather than the count at the mean length: the linear terms are the
    same either way, and attention's T² term is then right for a mix of lengths.
    """
    if not token_counts:
        raise ValueError("no token counts: cannot average the work of zero texts")
    return sum(encoder_flops(shape, t) for t in token_counts) / len(token_counts)


@dataclass(frozen=True)
class GemmTiming:
    """One shape's best time in one runtime."""

    m: int
    k: int
    n: int
    seconds: float

    @property
    def gops(self) -> float:
        return 2 * self.m * self.k * self.n / self.seconds / 1e9


@dataclass(frozen=True)
class GemmPeak:
    """A runtime's fastest GEMM throughput over the model's shapes, at a thread count."""

    runtime: str
    threads: int
    gops: float
    best_shape: tuple[int, int, int]
    timings: tuple[GemmTiming, ...]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["timings"] = [{**asdict(t), "gops": t.gops} for t in self.timings]
        return out


def model_shapes(
    token_counts: Sequence[int] = TOKEN_COUNTS, widths: Sequence[tuple[int, int]] = MODEL_WIDTHS
) -> list[tuple[int, int, int]]:
    """(M, K, N) for every token count and Linear width."""
    return [(m, k, n) for m in token_counts for k, n in widths]


def best_seconds_per_call(call: Callable[[], object], seconds: float, repeats: int = REPEATS) -> float:
    """The fastest mean time per call over ``repeats`` runs of about ``seconds / repeats`` each.

    The first call is a warm-up (weight packing, allocations); the number of calls per run is
    doubled until one run lasts its share of ``seconds``.
    """
    if seconds <= 0 or repeats < 1:
        raise ValueError(f"need seconds > 0 and repeats >= 1, got {seconds} and {repeats}")
    call()
    calls, share = 1, seconds / repeats
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            call()
        elapsed = time.perf_counter() - started
        if elapsed >= share or calls >= 1 << 20:
            break
        calls *= 2
    best = elapsed / calls
    for _ in range(repeats - 1):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def matmul_integer_model(k: int, n: int, seed: int = 0) -> tuple[bytes, Any]:
    """A serialized ONNX model ``Y = MatMulInteger(A, W, a_zero_point, w_zero_point)`` and its int8 weights.

    ``A`` (uint8, [M, K]) and its zero point are inputs, as ``DynamicQuantizeLinear`` hands them over;
    ``W`` (int8, [K, N]) and its per-column zero points (zeros: symmetric per-channel quantization)
    are initializers, which ONNX Runtime pre-packs as it does the champion's weights.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(seed).integers(-127, 128, size=(k, n), dtype=np.int8)
    node = helper.make_node("MatMulInteger", ["A", "W", "a_zero_point", "w_zero_point"], ["Y"])
    graph = helper.make_graph(
        [node],
        "gemm_peak_int8",
        inputs=[
            helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", k]),
            helper.make_tensor_value_info("a_zero_point", TensorProto.UINT8, []),
        ],
        outputs=[helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", n])],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.zeros(n, dtype=np.int8), "w_zero_point"),
        ],
    )
    # IR 8 / opset 13: old enough for any ONNX Runtime this project supports (the champion's graph is IR 10).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString(), weights


def onnxruntime_session(model: bytes, threads: int) -> Any:
    """An ORT CPU session with the options :class:`domainflow.onnxrt.OnnxClassifier` gives the champion."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _onnxruntime_int8_call(m: int, k: int, n: int, threads: int) -> Callable[[], object]:
    import numpy as np

    session = onnxruntime_session(matmul_integer_model(k, n)[0], threads)
    feeds = {
        "A": np.random.default_rng(1).integers(0, 256, size=(m, k), dtype=np.uint8),
        "a_zero_point": np.array(128, dtype=np.uint8),
    }
    return lambda: session.run(None, feeds)


def _torch_fp32_call(m: int, k: int, n: int, threads: int) -> Callable[[], object]:
    import torch

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)

    def call() -> object:
        with torch.inference_mode():
            return torch.nn.functional.linear(x, weight)

    return call


def _torch_dynamic_int8_call(m: int, k: int, n: int, threads: int) -> Callable[[], object]:
    import torch

    from domainflow.compression import quantize_dynamic_int8

    linear = quantize_dynamic_int8(torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))).eval()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(0))

    def call() -> object:
        with torch.inference_mode():
            return linear(x)

    return call


_CALLS: dict[str, Callable[[int, int, int, int], Callable[[], object]]] = {
    "onnxruntime_int8": _onnxruntime_int8_call,
    "torch_fp32": _torch_fp32_call,
    "torch_dynamic_int8": _torch_dynamic_int8_call,
}


def measure_peak(
    runtime: str,
    threads: int | None = None,
    seconds_per_shape: float = 0.2,
    shapes: Sequence[tuple[int, int, int]] | None = None,
) -> GemmPeak:
    """Time every shape in ``runtime`` and return the fastest throughput.

    ``threads`` sets torch's threads (``torch.set_num_threads``) and ORT's intra-op threads; the
    default is torch's current count, which is also what the champion's ORT session takes.
    """
    if runtime not in _CALLS:
        raise ValueError(f"unknown GEMM runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    timings = tuple(
        GemmTiming(m, k, n, best_seconds_per_call(_CALLS[runtime](m, k, n, used), seconds_per_shape))
        for m, k, n in (shapes or model_shapes())
    )
    best = max(timings, key=lambda t: t.gops)
    return GemmPeak(runtime, used, best.gops, (best.m, best.k, best.n), timings)


def print_peak(peak: GemmPeak) -> None:
    print(f"{peak.runtime}, {peak.threads} threads:")
    for t in peak.timings:
        print(f"  [{t.m:4d} x {t.k:4d}] x [{t.k:4d} x {t.n:4d}]  {1e6 * t.seconds:9.1f} us  {t.gops:8.1f} G ops/s")
    m, k, n = peak.best_shape
    print(f"  peak {peak.gops:.1f} G ops/s (at {m} x {k} x {n})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=["onnxruntime_int8", "torch_fp32"])
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's, one per core)")
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent on each shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKEN_COUNTS), help="values of M")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or min(args.tokens) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("need --seconds > 0, --tokens >= 1 and --threads >= 1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # domainflow, for torch_dynamic_int8
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (library default)')}")
    peaks = [measure_peak(r, args.threads, args.seconds, model_shapes(args.tokens)) for r in args.runtime]
    for peak in peaks:
        print_peak(peak)
    if args.json:
        args.json.write_text(json.dumps([p.as_dict() for p in peaks], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
