"""Compression methods for a ``TextClassifier``: what each one changes, and how it is stored.

* **int8 dynamic quantization in torch** (``dynamic_int8``): int8 weights, activations
  quantized on the fly, for every ``nn.Linear`` (fbgemm kernels on x86). A quantized torch
  model cannot be saved without pickling, so the candidate stores its parent's fp32
  safetensors plus this recipe name in ``domainflow.json``; loading re-quantizes.
  Quantization is deterministic, so the reloaded model predicts exactly what was evaluated.
* **int8 dynamic quantization in ONNX Runtime** (``onnx_int8``): the model exported to ONNX
  and quantized by ONNX Runtime; the candidate stores the int8 graph (``model.int8.onnx``, a
  protobuf, not a pickle) and is served by an ORT session (:mod:`domainflow.onnxrt`).
* **unstructured magnitude pruning**: zeroes the smallest weights across all encoder
  Linear layers. Dense kernels still multiply the zeros, so it saves no time and (stored
  dense) no space; it is kept as a candidate because users ask for it, and the report
  says so plainly.
* **structured FFN pruning**: removes whole intermediate neurons of every feed-forward
  block (the largest matrices of a short-text BERT), shrinking ``intermediate_size``:
  fewer multiply-adds, a smaller file, and a normal safetensors model afterwards.
* **layer dropping** for distillation students: keep a subset of the teacher's layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from domainflow.modeling import TextClassifier, encoder_layers, replace_encoder_layers

TORCH_RECIPES = ("dynamic_int8",)  # re-applied to the stored fp32 safetensors at load time
ONNX_RECIPES = ("onnx_int8",)  # stored as an ONNX graph, run by ONNX Runtime
RECIPES = TORCH_RECIPES + ONNX_RECIPES

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def quantize_dynamic_int8(model: ModuleT) -> ModuleT:
    """int8 dynamic quantization of every ``nn.Linear`` (a copy of the model, of the same class)."""
    with warnings.catch_warnings():
        # torch 2.13 points to torchao, whose int8 path measured ~20x slower on this CPU.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def apply_recipe(model: ModuleT, recipe: str) -> ModuleT:
    """Re-apply a load-time torch recipe (the only kind of compression that is not stored as weights)."""
    if recipe == "dynamic_int8":
        return quantize_dynamic_int8(model)
    raise ValueError(f"unknown load-time compression recipe {recipe!r}; known: {', '.join(TORCH_RECIPES)}")


def encoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The encoder's Linear layers (the classification head is left alone: it is tiny and decisive)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("encoder.")
    ]


@torch.no_grad()
def prune_unstructured(model: nn.Module, sparsity: float) -> float:
    """Zero the ``sparsity`` fraction of encoder Linear weights with the smallest magnitude (global threshold).

    Returns the measured fraction of zeros. The pruning masks are folded into the weights,
    so the model stays an ordinary dense model.
    """
    from torch.nn.utils import prune

    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    parameters = [(module, "weight") for _, module in encoder_linears(model)]
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in parameters:
        prune.remove(module, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in parameters)
    total = sum(m.weight.numel() for m, _ in parameters)
    return zeros / total


@torch.no_grad()
def prune_ffn_neurons(model: TextClassifier, keep_ratio: float) -> int:
    """Keep the most important ``keep_ratio`` of every layer's feed-forward neurons; return the new width.

    A neuron's importance is the product of the norms of its input row (in
    ``intermediate.dense``) and its output column (in ``output.dense``): a neuron that
    reads little or writes little changes the layer's output little. Every layer keeps
    the same number of neurons so that ``config.intermediate_size`` still describes it.
    """
    if not 0.0 < keep_ratio < 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1), got {keep_ratio}")
    layers = encoder_layers(model.encoder)
    width = _dense(layers[0], "intermediate").out_features
    keep = max(1, int(round(width * keep_ratio)))
    for layer in layers:
        up, down = _dense(layer, "intermediate"), _dense(layer, "output")
        importance = up.weight.norm(dim=1) * down.weight.norm(dim=0)
        kept = importance.topk(keep).indices.sort().values
        layer.get_submodule("intermediate").dense = _slice_linear(up, rows=kept)
        layer.get_submodule("output").dense = _slice_linear(down, cols=kept)
    model.encoder.config.intermediate_size = keep
    return keep


def _dense(layer: nn.Module, part: str) -> nn.Linear:
    """A BERT layer's ``intermediate.dense`` (hidden -> FFN) or ``output.dense`` (FFN -> hidden)."""
    linear = layer.get_submodule(f"{part}.dense")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{part}.dense of {type(layer).__name__} is a {type(linear).__name__}, not a Linear")
    return linear


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias[rows] if (linear.bias is not None and rows is not None) else linear.bias
    sliced = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    sliced.weight.copy_(weight)
    if bias is not None:
        sliced.bias.copy_(bias)
    return sliced


def keep_layers(model: TextClassifier, layer_indices: Sequence[int]) -> None:
    """Keep only the given encoder layers, in order (a distillation student initialised from its teacher)."""
    layers = encoder_layers(model.encoder)
    if not layer_indices or any(not 0 <= i < len(layers) for i in layer_indices):
        raise ValueError(f"layer indices must be in 0..{len(layers) - 1}, got {list(layer_indices)}")
    replace_encoder_layers(model.encoder, [layers[i] for i in layer_indices])


def alternate_layers(num_layers: int, student_layers: int) -> list[int]:
    """Evenly spread teacher layers for a student, always ending with the last one (e.g. 6→3: 1, 3, 5)."""
    if not 1 <= student_layers <= num_layers:
        raise ValueError(f"a student needs 1..{num_layers} layers, got {student_layers}")
    step = num_layers / student_layers
    return [int(round(step * (i + 1))) - 1 for i in range(student_layers)]
