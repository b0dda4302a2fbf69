"""What the network sees (`cifarlab explain`): the top-5 classes of an image, the feature maps after
every convolution and pooling layer, and where the model looks (Grad-CAM, Integrated Gradients, occlusion).

Layers are found by type (convolutions and pooling modules) in the order the forward pass runs them,
recorded by forward hooks, so every registered model works without a list of its layer names. The
attribution methods are Captum's (PyTorch's own library), an optional extra: `pip install "cifarlab[explain]"`.

Everything is computed in float32 (gradients in bf16 are too coarse for a map); images go through the
decoder and normalisation that `predict` and `eval` use. The numbers are written to an .npz first and the
pictures are drawn from that file, as the run folder keeps numbers and `report` draws them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifarlab.data import ImageSet, TensorLoader
from cifarlab.errors import CifarlabError, unknown_name
from cifarlab.predict import read_images
from cifarlab.rundir import ModelInfo, load_model, save_figure

CONV_TYPES = (nn.Conv2d,)
POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
METHODS = ("gradcam", "ig", "occlusion")
DEFAULT_METHODS = ("gradcam", "ig")  # the layer-level map and one pixel-level one
TOP_K = 5
CHANNELS_SHOWN = 8  # most active channels of each layer kept and drawn
# Integrated Gradients' path steps (captum's default Gauss-Legendre rule): 16 pass the deletion test and keep
# `explain` under 1 s for the seed CNN
IG_STEPS = 16
INSTALL_HINT = 'pip install "cifarlab[explain]"'


def captum_attr():
    """captum.attr, or one line saying how to install it."""
    try:
        import captum.attr
    except ImportError:
        raise CifarlabError(f"attribution maps need the captum package: {INSTALL_HINT}") from None
    return captum.attr


@dataclass
class Explainer:
    """A loaded model and its conv/pooling layers in forward order (name -> module)."""

    model: nn.Module
    info: ModelInfo
    layers: dict[str, nn.Module] = field(default_factory=dict)
    spatial: dict[str, int] = field(default_factory=dict)  # layer -> output height (1: no map left)

    @property
    def last_conv(self) -> str:
        return [name for name, m in self.layers.items() if isinstance(m, CONV_TYPES)][-1]

    @property
    def default_layer(self) -> str:
        """Grad-CAM's layer: the last convolution's maps, taken after the pooling that follows it where
        there is one and it leaves a map (the seed CNN's last max-pool). Its output is past the ReLU, as
        Grad-CAM's authors take it; the raw conv output, before it, ranked pixels worse on the deletion test."""
        names = list(self.layers)
        after = [n for n in names[names.index(self.last_conv):] if self.spatial.get(n, 2) > 1]
        return after[-1] if after else self.last_conv

    def layer(self, name: str | None) -> str:
        """`name` if the model has such a conv or pooling layer (None: `default_layer`), else one clear line."""
        if name is None:
            return self.default_layer
        if name not in self.layers:
            raise unknown_name("layer", name, list(self.layers))
        return name

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> the float input the model trained on (the loader's own normalisation)."""
        dummy = ImageSet(images, torch.zeros(len(images), dtype=torch.int64), self.info.classes)
        loader = TensorLoader(dummy, max(1, len(images)), torch.device("cpu"), (self.info.mean, self.info.std))
        return torch.cat([batch for batch, _ in loader])


def open_explainer(model_path: Path) -> Explainer:
    """Load a run folder's (or model.pt's) model and find its layers."""
    model, info = load_model(model_path, torch.device("cpu"))
    return make_explainer(model, info, str(model_path))


def make_explainer(model: nn.Module, info: ModelInfo, where: str = "the model") -> Explainer:
    """An Explainer of a model in memory (the notebook's), moved to the CPU in float32 (in place)."""
    model = model.cpu().float().to(memory_format=torch.contiguous_format).eval()
    order = forward_order(model, info.image_size)
    layers = {name: module for name, module, _ in order}
    if not any(isinstance(m, CONV_TYPES) for m in layers.values()):
        raise CifarlabError(f"{where}: model '{info.name}' has no convolution layer to explain")
    return Explainer(model, info, layers, {name: height for name, _, height in order})


def forward_order(model: nn.Module, size: int) -> list[tuple[str, nn.Module, int]]:
    """(name, module, output height) of the conv and pooling modules in the order one forward pass calls
    them (not the order they are declared in: a block may declare its shortcut first)."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, CONV_TYPES + POOL_TYPES)}
    called: dict[nn.Module, int] = {}

    def record(module: nn.Module, inputs, output: torch.Tensor) -> None:  # returns None: the output stays as it is
        called.setdefault(module, output.shape[-2])
    hooks = [m.register_forward_hook(record) for m in names]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return [(names[m], m, height) for m, height in called.items()]


def record_activations(explainer: Explainer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Probabilities [N, classes] and every layer's output, from one forward pass without gradients."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, o.detach()))
             for name, m in explainer.layers.items()]
    try:
        with torch.no_grad():
            # softmax of logits, and of log-softmax outputs (the seed CNN's) alike
            probabilities = explainer.model(x).float().softmax(dim=1)
    finally:
        for hook in hooks:
            hook.remove()
    return probabilities, outputs


def attribute(explainer: Explainer, x: torch.Tensor, target: int, method: str, layer: str | None = None) -> np.ndarray:
    """One attribution map [H, W] for class `target` of the single image `x` [1,3,H,W].

    gradcam: Grad-CAM on `layer` (ReLU of the gradient-weighted channels), upsampled bilinearly to the
    image; ig: Integrated Gradients from the mean image (0 after normalisation), |sum over colours|;
    occlusion: the drop in the class's output when a 4x4 grey square covers each place (stride 2).
    """
    attr = captum_attr()
    model = explainer.model
    if method == "gradcam":
        cam = attr.LayerGradCam(model, explainer.layers[explainer.layer(layer)])
        heat = cam.attribute(x, target=target, relu_attributions=True)
        heat = attr.LayerAttribution.interpolate(heat, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return heat[0, 0].detach().numpy()
    if method == "ig":
        maps = attr.IntegratedGradients(model).attribute(x, torch.zeros_like(x), target=target, n_steps=IG_STEPS,
                                                         internal_batch_size=IG_STEPS)
        return maps[0].sum(0).abs().detach().numpy()
    if method == "occlusion":
        with torch.no_grad():
            maps = attr.Occlusion(model).attribute(x, sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2),
                                                   target=target, baselines=0.0, perturbations_per_eval=64)
        return maps[0].mean(0).numpy()
    raise unknown_name("attribution method", method, list(METHODS))


def explain_tensor(explainer: Explainer, image: torch.Tensor, methods: tuple[str, ...] = DEFAULT_METHODS,
                   layer: str | None = None, channels: int = CHANNELS_SHOWN) -> dict[str, np.ndarray]:
    """Every number the pictures of one uint8 image [3,H,W] are drawn from, as arrays for an .npz."""
    layer = explainer.layer(layer)
    x = explainer.normalise(image[None])
    probabilities, outputs = record_activations(explainer, x)
    target = int(probabilities[0].argmax())
    arrays: dict[str, np.ndarray] = {
        "image": image.permute(1, 2, 0).numpy(), "probabilities": probabilities[0].numpy(),
        "classes": np.array(explainer.info.classes), "layers": np.array(list(outputs)),
        "kinds": np.array([type(explainer.layers[n]).__name__ for n in outputs]),
        "target": np.array(target), "gradcam_layer": np.array(layer), "methods": np.array(list(methods))}
    for name, output in outputs.items():
        maps = output[0].float()
        top = maps.mean(dim=(1, 2)).argsort(descending=True)[:channels]  # most active: highest mean response
        arrays[f"shape:{name}"] = np.array(maps.shape)
        arrays[f"channels:{name}"] = top.numpy()
        arrays[f"maps:{name}"] = maps[top].numpy()
    for method in methods:
        arrays[f"attr:{method}"] = attribute(explainer, x, target, method, layer)
    return arrays


def kernel_arrays(explainer: Explainer) -> dict[str, np.ndarray]:
    """The first convolution's weights [k, 3, h, w] and whether training changed them."""
    name, conv = next((n, m) for n, m in explainer.layers.items() if isinstance(m, CONV_TYPES))
    # fast_net's whitening stem is frozen (requires_grad False): fitted to the data, not learned
    return {"layer": np.array(name), "weights": conv.weight.detach().float().numpy(),
            "learned": np.array(bool(conv.weight.requires_grad))}


def save_kernels(explainer: Explainer, out: Path) -> str:
    """kernels.npz and kernels.png (drawn from the file) in `out`; returns the picture's path."""
    from cifarlab.explain_draw import draw_kernels

    np.savez(out / "kernels.npz", **kernel_arrays(explainer))
    with np.load(out / "kernels.npz") as saved:
        save_figure(draw_kernels(dict(saved)), out / "kernels.png")
    return str(out / "kernels.png")


def topk(arrays: dict[str, np.ndarray], k: int = TOP_K) -> list[dict]:
    """[{label, probability}] of the k most probable classes, from the arrays."""
    probabilities, classes = arrays["probabilities"], arrays["classes"]
    order = np.argsort(-probabilities)[:k]
    return [{"label": str(classes[i]), "probability": float(probabilities[i])} for i in order]


def deletion_curve(explainer: Explainer, image: torch.Tensor, heat: np.ndarray, target: int, steps: int = 16,
                   most_first: bool = True) -> np.ndarray:
    """The probability of `target` as the pixels are replaced by the mean image, most-attributed first (or
    least first): the field's deletion test of a saliency map. A faithful map makes the first curve fall faster."""
    x = explainer.normalise(image[None])[0]
    order = np.argsort(-heat.ravel() if most_first else heat.ravel(), kind="stable")
    counts = np.linspace(0, order.size, steps + 1).astype(int)
    batch = x.repeat(len(counts), 1, 1, 1)
    for row, count in enumerate(counts):
        mask = torch.zeros(order.size, dtype=torch.bool)
        mask[torch.from_numpy(order[:count].copy())] = True
        batch[row][:, mask.view(heat.shape)] = 0.0  # 0 after normalisation: the mean colour
    with torch.no_grad():
        return explainer.model(batch).float().softmax(dim=1)[:, target].numpy()


def explain_files(model_path: Path, paths: list[Path], out: Path, methods: tuple[str, ...] = DEFAULT_METHODS,
                  layer: str | None = None) -> list[dict]:
    """`cifarlab explain`: for each image, its .npz of numbers and the pictures drawn from it, under `out`.

    Also writes kernels.npz/kernels.png (the first convolution's filters) once. Returns one dict per image:
    path, label, probability, topk and the files written."""
    from cifarlab.explain_draw import draw_explanation

    if not paths:
        raise CifarlabError("explain: give one or more image files")
    for method in methods:
        if method not in METHODS:
            raise unknown_name("attribution method", method, list(METHODS))
    if methods:
        captum_attr()  # before any work: a missing package is one line, not a half-written folder
    explainer = open_explainer(model_path)
    explainer.layer(layer)  # an unknown layer name fails before any image is read
    images = read_images(paths, explainer.info.image_size)
    out.mkdir(parents=True, exist_ok=True)
    files = {"kernels": save_kernels(explainer, out)}
    results = []
    for n, (path, image) in enumerate(zip(paths, images)):
        stem = f"{n:02d}-{path.stem}"
        npz = out / f"{stem}.npz"
        np.savez(npz, **explain_tensor(explainer, image, methods, layer))
        with np.load(npz) as saved:  # drawn from the file, so the pictures show exactly its numbers
            arrays = dict(saved)
            pictures = draw_explanation(arrays, out / stem)
        top = topk(arrays)
        results.append({"path": str(path), "label": top[0]["label"], "probability": top[0]["probability"],
                        "topk": top, "gradcam_layer": str(arrays["gradcam_layer"]),
                        "files": {"npz": str(npz), **pictures, **files}})
    return results


def format_explanations(results: list[dict]) -> str:
    """Per image: the top-5, then the files written."""
    lines = []
    for r in results:
        lines.append(f"{r['path']}  " + "  ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in r["topk"]))
        lines += [f"  {kind}: {path}" for kind, path in r["files"].items()]
    return "\n".join(lines)
