"""Compression recipes, re-applied at load time so that no model is ever stored as a pickle.

A dynamically quantized torch model cannot be written with ``save_pretrained`` (its
packed int8 weights are not tensors), so a compressed candidate stores its fp32
parent's safetensors plus a recipe name in ``domainflow.json``; loading re-quantizes.
Quantization is deterministic, so the reloaded model predicts exactly what was evaluated.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

RECIPES = ("dynamic_int8",)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """int8 weights, activations quantized on the fly, for every ``nn.Linear`` (fbgemm kernels on x86)."""
    with warnings.catch_warnings():
        # torch 2.13 points to torchao, whose int8 path measured ~20x slower on this CPU.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def apply_recipe(model: nn.Module, recipe: str) -> nn.Module:
    if recipe == "dynamic_int8":
        return quantize_dynamic_int8(model)
    raise ValueError(f"unknown compression recipe {recipe!r}; known: {', '.join(RECIPES)}")
