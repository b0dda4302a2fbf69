"""The pictures of `cifarlab explain`, drawn from its arrays (the .npz it writes): feature-map grids,
attribution overlays, first-layer kernels and the validation patches that excite a channel most.

The tiles are pasted into one mosaic per picture and drawn as a single image (one axes), as
plots.draw_worst_mistakes does: a figure of 60 small axes takes seconds to lay out. The mosaic makers
return plain uint8 arrays, so the page of `cifarlab serve` shows the same pictures without matplotlib.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarlab.plots import _figure
from cifarlab.rundir import save_figure

TILE = 32  # pixels a feature map is scaled to in the grids
LABEL = 14  # pixels above each row of tiles for its label


def scale_tiles(maps: np.ndarray, tile: int = TILE) -> np.ndarray:
    """Feature maps [k, h, w] -> uint8 [k, tile, tile] grey, one scale for the whole layer (nearest
    neighbour: each activation stays a visible square)."""
    low, high = float(maps.min()), float(maps.max())
    grey = (maps - low) / (high - low) if high > low else np.zeros_like(maps)
    rows = np.minimum(np.arange(tile) * maps.shape[1] // tile, maps.shape[1] - 1)
    cols = np.minimum(np.arange(tile) * maps.shape[2] // tile, maps.shape[2] - 1)
    return (255 * grey[:, rows][:, :, cols]).astype(np.uint8)


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 HxWx3: the image under `heat` (HxW, any scale) coloured by the jet colour map."""
    from matplotlib import colormaps

    high = float(heat.max())
    norm = heat / high if high > 0 else np.zeros_like(heat)
    colour = colormaps["jet"](norm)[..., :3]
    blend = (1 - alpha) * image / 255 + alpha * colour
    return (255 * blend.clip(0, 1)).astype(np.uint8)


def layer_rows(arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(label 'name (Kind) CxHxW', uint8 tiles [k, TILE, TILE]) for every recorded layer, in forward order."""
    rows = []
    for name, kind in zip(arrays["layers"].tolist(), arrays["kinds"].tolist()):
        shape = "x".join(str(v) for v in arrays[f"shape:{name}"].tolist())
        rows.append((f"{name} ({kind}) {shape}", scale_tiles(arrays[f"maps:{name}"])))
    return rows


def _mosaic(rows: list[np.ndarray], columns: int, side: int, pad: int = 3) -> np.ndarray:
    """Rows of tiles [k, side, side(, 3)] on white, LABEL pixels above each row."""
    cell = side + pad
    mosaic = np.full((len(rows) * (side + LABEL + pad), columns * cell, 3), 255, dtype=np.uint8)
    for r, tiles in enumerate(rows):
        y = r * (side + LABEL + pad) + LABEL
        for c, tile in enumerate(tiles[:columns]):
            mosaic[y:y + side, c * cell:c * cell + side] = tile[..., None] if tile.ndim == 2 else tile
    return mosaic


def _mosaic_figure(mosaic: np.ndarray, labels: list[str], side: int, title: str, inches_per_pixel: float = 0.025):
    height, width = mosaic.shape[:2]
    figure = _figure(width * inches_per_pixel, height * inches_per_pixel + 0.5, layout=None)
    ax = figure.add_axes((0, 0, 1, 1 - 0.5 / (height * inches_per_pixel + 0.5)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for r, label in enumerate(labels):
        ax.text(0, r * (side + LABEL + 3) + LABEL - 2, label, fontsize=8, va="bottom")
    figure.suptitle(title, fontsize=10)
    return figure


def draw_feature_maps(arrays: dict[str, np.ndarray]):
    """One row per conv and pooling layer: its most active channels, labelled with the layer's name and shape."""
    rows = layer_rows(arrays)
    columns = max(max(len(t) for _, t in rows), 12)  # room for the longest label
    return _mosaic_figure(_mosaic([t for _, t in rows], columns, TILE), [label for label, _ in rows], TILE,
                          f"Feature maps: the {rows[0][1].shape[0]} most active channels after each layer "
                          "(bright = strong response)")


METHOD_TITLES = {"gradcam": "Grad-CAM", "ig": "Integrated Gradients", "occlusion": "Occlusion"}


def draw_attributions(arrays: dict[str, np.ndarray]):
    """The image and each attribution map over it, for the predicted class."""
    methods = arrays["methods"].tolist()
    target = int(arrays["target"])
    label, probability = str(arrays["classes"][target]), float(arrays["probabilities"][target])
    figure = _figure(2.4 * (1 + len(methods)), 2.9)
    axes = np.atleast_1d(figure.subplots(1, 1 + len(methods)))
    axes[0].imshow(arrays["image"], interpolation="nearest")
    axes[0].set_title(f"{label} ({100 * probability:.1f}%)", fontsize=9)
    for ax, method in zip(axes[1:], methods):
        ax.imshow(heat_overlay(arrays["image"], arrays[f"attr:{method}"]), interpolation="nearest")
        where = f"\non {arrays['gradcam_layer']}" if method == "gradcam" else ""
        ax.set_title(f"{METHOD_TITLES[method]}{where}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    return figure


def draw_explanation(arrays: dict[str, np.ndarray], stem: Path) -> dict[str, str]:
    """Write stem_feature_maps.png and (when there are maps) stem_attribution.png; return their paths."""
    files = {"feature_maps": Path(f"{stem}_feature_maps.png")}
    save_figure(draw_feature_maps(arrays), files["feature_maps"])
    if arrays["methods"].size:
        files["attribution"] = Path(f"{stem}_attribution.png")
        save_figure(draw_attributions(arrays), files["attribution"])
    return {kind: str(path) for kind, path in files.items()}


def kernel_tiles(weights: np.ndarray, tile: int = 24) -> np.ndarray:
    """First-layer filters [k, 3, h, w] -> uint8 RGB tiles [k, tile, tile, 3]: each filter scaled so 0 is
    mid-grey and its largest weight (either sign) reaches the end of the range."""
    peak = np.abs(weights).reshape(len(weights), -1).max(axis=1).clip(1e-12)[:, None, None, None]
    rgb = (0.5 + weights / (2 * peak)).transpose(0, 2, 3, 1)
    rows = np.arange(tile) * weights.shape[2] // tile
    cols = np.arange(tile) * weights.shape[3] // tile
    return (255 * rgb[:, rows][:, :, cols]).astype(np.uint8)


def draw_kernels(arrays: dict[str, np.ndarray], columns: int = 16):
    """The first convolution's filters as RGB tiles, with a caption saying whether they were learned."""
    tiles = kernel_tiles(arrays["weights"])
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    name, k = str(arrays["layer"]), arrays["weights"].shape[-1]
    how = ("fitted to the training images before training (whitening), not learned" if not bool(arrays["learned"])
           else "learned")
    figure = _mosaic_figure(_mosaic(rows, columns, tiles.shape[1]), [""] * len(rows), tiles.shape[1],
                            f"First layer {name}: {len(tiles)} filters of {k}x{k} pixels, {how}\n"
                            "(grey = 0; colour = the colour a filter responds to)", 0.03)
    return figure


def draw_top_patches(arrays: dict[str, np.ndarray]):
    """For each sampled channel of each layer, the validation patches that excite it most (one row each)."""
    rows, labels = [], []
    for name in arrays["layers"].tolist():
        for channel, patches in zip(arrays[f"channels:{name}"].tolist(), arrays[f"patches:{name}"]):
            rows.append(patches)
            labels.append(f"{name} channel {channel}")
    side = rows[0].shape[1]
    return _mosaic_figure(_mosaic(rows, max(len(rows[0]), 9), side), labels, side,
                          "Validation patches that excite a channel most (its receptive field, strongest first)",
                          0.03)


def draw_mistake_maps(images: np.ndarray, heats: np.ndarray, titles: list[str], columns: int = 8):
    """Images (uint8 [n,H,W,3]) with their Grad-CAM maps ([n,H,W]) over them in the row below, titled."""
    side = images.shape[1]
    rows = []
    for start in range(0, len(images), columns):
        chunk = slice(start, start + columns)
        rows += [images[chunk], np.stack([heat_overlay(i, h) for i, h in zip(images[chunk], heats[chunk])])]
    labels = []
    for start in range(0, len(titles), columns):
        labels += ["   ".join(titles[start:start + columns]), "Grad-CAM of the predicted class"]
    return _mosaic_figure(_mosaic(rows, columns, side), labels, side,
                          "Where the model looked when it was most confidently wrong", 0.045)
