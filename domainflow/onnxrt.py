"""ONNX export of a ``TextClassifier`` and ONNX Runtime inference behind the same call signature.

Why ONNX Runtime at all: on this project's CPUs, ORT's int8 kernels run a MiniLM about as
fast as torch's dynamic int8 at batch 32 and about twice as fast at batch 1 (torch pays a
Python dispatch cost per layer call that dominates a 15-token request), and ORT degrades far
less than torch's OpenMP pool when other processes compete for the cores. The README and
``benchmarks/inference.py`` give the measured numbers.

Why a graph file is acceptable when pickles are not: an ``.onnx`` file is a protobuf of
operators and tensors, it cannot execute Python on load. The candidate directory stores
``model.int8.onnx`` instead of safetensors, plus the usual config, tokenizer and
``domainflow.json``.

The graph takes ``input_ids`` and ``attention_mask`` (int64, batch × sequence, both
dynamic) and returns ``logits`` — the same contract as ``TextClassifier.forward`` without
``token_type_ids`` (single-sentence BERT inputs are all zeros, which is the default) — and
``embeddings``, the mean-pooled sentence vectors the logits are computed from: a domain's
retrieval fallback searches known questions with the deployed model's own embeddings, so an
int8 champion must provide them too (asking ORT for the logits alone costs nothing extra).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from domainflow import process_locks

if TYPE_CHECKING:
    from domainflow.modeling import TextClassifier  # modeling imports this module

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
EMBEDDINGS_NAME = "embeddings"
INT8_FILE = "model.int8.onnx"
_COUNTED_TYPES = {1, 2, 3, 10}  # ONNX FLOAT, UINT8, INT8, FLOAT16: weights (int64 initializers are shapes and ids)


def require_onnx() -> None:
    """Fail with the install command when the optional ONNX packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"the onnx_int8 compression method needs the optional ONNX packages ({exc.name} is missing): "
            "pip install -e '.[onnx]' (scripts/setup.sh installs them)"
        ) from exc


class _LogitsAndEmbeddings(nn.Module):
    """``TextClassifier`` with positional inputs and tensor outputs, which is what the exporter traces.

    The head is applied to the pooled embedding directly: at inference ``TextClassifier``'s
    dropout is the identity, so this is the same function as its ``forward``."""

    def __init__(self, classifier: TextClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.classifier.embed(input_ids, attention_mask)
        return self.classifier.classifier(embeddings), embeddings


def export_onnx(model: TextClassifier, tokenizer: Any, path: str | Path) -> Path:
    """Export an fp32 ``TextClassifier`` to ONNX with dynamic batch and sequence axes.

    Uses the torch.export-based exporter (the default since torch 2.9; the TorchScript one is
    deprecated). The example batch has two texts of different lengths so that neither axis is
    specialised to 1 and padding is part of the traced computation.
    """
    require_onnx()
    path = Path(path)
    model = model.eval()
    example = tokenizer(
        ["a short example", "a somewhat longer example sentence to trace"], padding=True, return_tensors="pt"
    )
    args = (example["input_ids"], example["attention_mask"])
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" lines: irrelevant to a text model
    try:
        # torch.export flips process-wide state that a training step in another thread would trip over
        # (see domainflow.process_locks).
        with process_locks.TORCH_GLOBALS, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _LogitsAndEmbeddings(model),
                args,
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME, EMBEDDINGS_NAME],
                dynamic_shapes=dynamic,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    return path


def quantize_onnx_int8(fp32_path: str | Path, int8_path: str | Path) -> Path:
    """ONNX Runtime dynamic int8 quantization: int8 weights (one scale per output channel),
    activations quantized per batch at run time.

    Per-channel scales instead of ORT's per-tensor default: on the fine-tuned Banking77 MiniLM
    they kept 99.0% of fp32's answers instead of 97.7% (accuracy -0.22 instead of -0.55
    points) at the same batch-32 speed. ORT quantizes the Linear layers' MatMul/Gemm nodes and
    the embedding tables' Gather (which is why the file is ~4x smaller than fp32);
    LayerNorm, softmax and GELU stay fp32.
    """
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    hint = _DropLogRecord("pre-processing before quantization")
    root.addFilter(hint)
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.removeFilter(hint)
    return Path(int8_path)


class _DropLogRecord(logging.Filter):
    """Drops one known log line. ORT's quantizer always suggests its pre-processing (shape inference
    and graph fusions before quantizing); with fused attention the int8 MiniLM measured no faster here,
    so the suggestion is noise in every pipeline run."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def export_onnx_int8(model: TextClassifier, tokenizer: Any, int8_path: str | Path) -> Path:
    """Export to fp32 ONNX in a scratch folder, then write the int8 graph to ``int8_path``."""
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as scratch:
        fp32_path = export_onnx(model, tokenizer, Path(scratch) / "model.fp32.onnx")
        return quantize_onnx_int8(fp32_path, int8_path)


class OnnxClassifier:
    """An ONNX Runtime session that answers like ``TextClassifier``: ``model(input_ids=…, attention_mask=…)["logits"]``.

    Threads: ``intra_op_num_threads`` follows ``torch.get_num_threads()`` at load time, so the
    one knob users already have (``torch.set_num_threads``, ``domainflow serve --torch-threads``)
    sets both runtimes. Spinning is off: ORT's workers otherwise busy-wait between operators,
    which on a shared machine burns the cores the caller's tokenizer and other processes need
    (measured: 2 threads on a loaded 2-core machine ran ~1.4x faster without spinning).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        require_onnx()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX graph {self.path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise ValueError(f"{self.path}: expected graph inputs {INPUT_NAMES}, found {names}")
        self.threads = options.intra_op_num_threads
        outputs = {o.name: o for o in self.session.get_outputs()}
        self._embedding_size: int | None = outputs[EMBEDDINGS_NAME].shape[-1] if EMBEDDINGS_NAME in outputs else None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        feeds = {"input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask)}
        (logits,) = self.session.run([OUTPUT_NAME], feeds)
        return {"logits": torch.from_numpy(logits)}

    @property
    def embedding_size(self) -> int:
        """Width of the graph's sentence embeddings; a graph exported without them cannot embed."""
        if self._embedding_size is None:
            raise ValueError(
                f"{self.path} has no '{EMBEDDINGS_NAME}' output (exported by an older domainflow); rerun the pipeline "
                "to re-export it"
            )
        return int(self._embedding_size)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        """Mean-pooled sentence embeddings, like ``TextClassifier.embed`` (callers check ``embedding_size`` first)."""
        feeds = {"input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask)}
        (embeddings,) = self.session.run([EMBEDDINGS_NAME], feeds)
        return torch.from_numpy(embeddings)

    def initializer_stats(self) -> tuple[int, int]:
        """(weights, bytes) of the graph's stored tensors. Weights count the float and int8 tensors a
        torch model would hold as parameters: not int64 constants (shapes, position ids) and not
        ORT's quantization parameters (``*_scale`` / ``*_zero_point``, one per tensor or per
        channel), so an int8 graph counts as many weights as its fp32 parent. Bytes count everything."""
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(self.path), load_external_data=False).graph
        weights = nbytes = 0
        for tensor in graph.initializer:
            array = numpy_helper.to_array(tensor)
            nbytes += array.nbytes
            quantization_parameter = tensor.name.endswith(("_scale", "_zero_point"))
            if tensor.data_type in _COUNTED_TYPES and array.ndim >= 1 and not quantization_parameter:
                weights += array.size
        return weights, nbytes


def _int64(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    array = tensor.numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    return array if array.dtype == np.int64 else array.astype(np.int64)
