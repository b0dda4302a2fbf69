"""What deeper layers have learned: for a few channels of deeper convolutions, the validation patches
that excite each most (the picture Zeiler and Fergus drew, 2014; the first layer's filters are
explain.kernel_arrays).

A patch is the part of the image that can move the chosen activation: found by back-propagating from
that one activation to the input and keeping the box where the gradient is not zero. That is exact for
any architecture (padding, strides, shortcuts), with no receptive-field arithmetic per layer type.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifarlab.explain import CONV_TYPES, Explainer
from cifarlab.explain_draw import draw_top_patches
from cifarlab.rundir import save_figure

PATCHES = 9  # per channel
CHANNELS = 4  # sampled per layer
PATCH_SIDE = 32  # pixels each patch is drawn at


def deeper_convs(explainer: Explainer) -> list[str]:
    """Two deeper convolutions: the second one (small receptive field) and the middle one of the network."""
    convs = [n for n, m in explainer.layers.items() if isinstance(m, CONV_TYPES)]
    return list(dict.fromkeys(convs[1:2] + convs[len(convs) // 2:len(convs) // 2 + 1]))


def _layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = []
    hook = layer.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        model(x)
    finally:
        hook.remove()
    return captured[0]


def _boxes(explainer: Explainer, layer: nn.Module, x: torch.Tensor, channel: int, where: torch.Tensor) -> list:
    """The input box each chosen activation (image n, channel, flat position) depends on."""
    x = x.clone().requires_grad_(True)
    output = _layer_output(explainer.model, layer, x)
    flat = output[:, channel].flatten(1)
    flat[torch.arange(len(x)), where].sum().backward()
    boxes = []
    for grad in x.grad.abs().sum(1):  # batch elements are independent in eval mode: one backward for all
        ys, xs = torch.nonzero(grad, as_tuple=True)
        boxes.append((0, grad.shape[0], 0, grad.shape[1]) if len(ys) == 0 else
                     (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1))
    return boxes


def top_patches(explainer: Explainer, images: torch.Tensor, layers: list[str] | None = None,
                channels: int = CHANNELS, patches: int = PATCHES) -> dict[str, np.ndarray]:
    """For each layer, `channels` channels (the most active on average over `images`, uint8 [N,3,H,W]) and
    for each the `patches` image patches that excite it most (one patch per image), as uint8 arrays."""
    layers = layers if layers is not None else deeper_convs(explainer)
    x = explainer.normalise(images)
    arrays: dict[str, np.ndarray] = {"layers": np.array(layers)}
    for name in layers:
        layer = explainer.layers[name]
        with torch.no_grad():
            output = torch.cat([_layer_output(explainer.model, layer, batch) for batch in x.split(500)]).float()
        peak, position = output.flatten(2).max(dim=2)  # [N, C]: each image's strongest response per channel
        chosen = peak.mean(0).argsort(descending=True)[:channels]
        rows = []
        for channel in chosen.tolist():
            best = peak[:, channel].argsort(descending=True)[:patches]
            boxes = _boxes(explainer, layer, x[best], channel, position[best, channel])
            rows.append(np.stack([_crop(images[i], box) for i, box in zip(best.tolist(), boxes)]))
        arrays[f"channels:{name}"] = chosen.numpy()
        arrays[f"patches:{name}"] = np.stack(rows)
    return arrays


def _crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box of a uint8 [3,H,W] image scaled to PATCH_SIDE square, HxWx3 uint8."""
    y0, y1, x0, x1 = box
    patch = image[:, y0:y1, x0:x1][None].float()
    patch = nn.functional.interpolate(patch, size=(PATCH_SIDE, PATCH_SIDE), mode="nearest")
    return patch[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def save_top_patches(explainer: Explainer, images: torch.Tensor, out: Path) -> str:
    """top_patches.npz and top_patches.png (drawn from the file) in `out`; returns the picture's path."""
    np.savez(out / "top_patches.npz", **top_patches(explainer, images))
    with np.load(out / "top_patches.npz") as saved:
        save_figure(draw_top_patches(dict(saved)), out / "top_patches.png")
    return str(out / "top_patches.png")
