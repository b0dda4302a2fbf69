"""`cifarlab models`: every registered model with its size and cost.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one forward pass of one 32x32
image; it counts a multiply-add as 2 FLOPs and counts only matrix multiplies and convolutions
(the ops that dominate), so norms, activations and pooling are left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from cifarlab.models.registry import create_model, model_description, model_names


@dataclass(frozen=True)
class ModelEntry:
    name: str
    params: int  # trainable and frozen together: what the state dict holds, buffers excluded
    mflops: float  # forward MFLOPs per 32x32 image (multiply-add = 2)
    description: str


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, image_size: int = 32) -> int:
    """FLOPs of one forward pass on one image (eval mode, no gradients)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops()


def model_entry(name: str, num_classes: int = 10) -> ModelEntry:
    model = create_model(name, num_classes=num_classes)
    return ModelEntry(name, count_params(model), forward_flops(model) / 1e6, model_description(name))


def format_table(entries: list[ModelEntry]) -> str:
    width = max(len(e.name) for e in entries)
    lines = [f"{'model':<{width}}  {'params':>8}  {'MFLOPs':>8}  description",
             *(f"{e.name:<{width}}  {e.params / 1e6:>7.2f}M  {e.mflops:>8.1f}  {e.description}" for e in entries),
             "MFLOPs: forward pass, one 32x32 image, 10 classes; a multiply-add counts as 2 FLOPs "
             "(convolutions and matmuls only)."]
    return "\n".join(lines)


def list_models() -> list[ModelEntry]:
    return [model_entry(name) for name in model_names()]
