"""`cifarlab explain`: layers found for every registered model, the arrays the pictures are drawn from, the
errors a user can cause, and the saliency sanity checks on a model trained for seconds on real images."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cifarlab.cli import main
from cifarlab.explain import (CHANNELS_SHOWN, POOL_TYPES, attribute, deletion_curve, explain_tensor, kernel_arrays,
                              open_explainer)
from cifarlab.kernels import top_patches
from cifarlab.models import create_model, model_names
from cifarlab.predict import read_images
from cifarlab.rundir import ModelInfo, save_model

CLASSES = ["ant", "bee", "cow", "dog"]


def _save(tmp_path: Path, name: str, args: dict | None = None) -> Path:
    torch.manual_seed(0)
    args = {"num_classes": len(CLASSES), **(args or {})}
    model = create_model(name, **args)
    save_model(tmp_path / "run" / "model.pt", model, ModelInfo(name, args, CLASSES, [0.5] * 3, [0.25] * 3, 32, {}))
    return tmp_path / "run"


def _image(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, 32, 32), dtype=np.uint8))


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_has_its_convs_and_pools_found_in_forward_order(name: str, tmp_path: Path) -> None:
    explainer = open_explainer(_save(tmp_path, name))
    model = explainer.model
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    found = list(explainer.layers.values())
    assert [m for m in found if isinstance(m, nn.Conv2d)] and set(convs) <= set(found)  # every conv, none missed
    called = []
    hooks = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in found]
    model(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert list(dict.fromkeys(called)) == found
    last_conv = [n for n, m in explainer.layers.items() if isinstance(m, nn.Conv2d)][-1]
    assert explainer.last_conv == last_conv
    tail = found[list(explainer.layers).index(last_conv):]  # Grad-CAM: the last conv or a pooling after it
    assert explainer.layers[explainer.default_layer] in tail and all(isinstance(m, POOL_TYPES) for m in tail[1:])

    arrays = explain_tensor(explainer, _image(), methods=("gradcam",))
    x = explainer.normalise(_image()[None])
    with torch.no_grad():
        expected = model(x).softmax(dim=1)[0].numpy()
    np.testing.assert_allclose(arrays["probabilities"], expected, rtol=1e-5, atol=1e-6)
    assert int(arrays["target"]) == int(expected.argmax()) and str(arrays["gradcam_layer"]) == explainer.default_layer
    assert arrays["layers"].tolist() == list(explainer.layers)
    for layer in arrays["layers"].tolist():
        shape = arrays[f"shape:{layer}"]
        maps, channels = arrays[f"maps:{layer}"], arrays[f"channels:{layer}"]
        assert maps.shape == (min(CHANNELS_SHOWN, shape[0]), shape[1], shape[2])
        means = maps.mean(axis=(1, 2))
        assert (np.diff(means) <= 1e-6).all() and len(set(channels.tolist())) == len(channels)  # most active first
    heat = arrays["attr:gradcam"]
    assert heat.shape == (32, 32) and heat.min() >= 0


def test_feature_maps_are_the_layer_outputs(tmp_path: Path) -> None:
    """The seed CNN's first conv map, recomputed by hand from its weights, is what the npz holds."""
    explainer = open_explainer(_save(tmp_path, "cifar10_cnn", {"channels": [8, 8, 16, 16], "hidden": 32}))
    arrays = explain_tensor(explainer, _image(3), methods=())
    conv = explainer.model.feature_extractor[0]
    with torch.no_grad():
        out = conv(explainer.normalise(_image(3)[None]))[0]
    channels = arrays["channels:feature_extractor.0"]
    np.testing.assert_allclose(arrays["maps:feature_extractor.0"], out[channels].numpy(), atol=1e-5)
    assert channels[0] == int(out.mean(dim=(1, 2)).argmax())
    assert arrays["layers"].tolist() == [f"feature_extractor.{i}" for i in (0, 2, 4, 5, 7, 8, 10)]
    assert arrays["kinds"].tolist() == ["Conv2d", "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d"]


def test_kernels_say_whether_training_learned_them(tmp_path: Path) -> None:
    fast = open_explainer(_save(tmp_path / "a", "fast_net", {"widths": [8, 16, 16]}))
    kernels = kernel_arrays(fast)
    assert str(kernels["layer"]) == "whiten" and kernels["weights"].shape == (24, 3, 2, 2) and not kernels["learned"]
    seed = kernel_arrays(open_explainer(_save(tmp_path / "b", "cifar10_cnn")))
    assert seed["weights"].shape == (32, 3, 3, 3) and bool(seed["learned"])


def test_explain_command_writes_numbers_and_pictures(tmp_path: Path, capsys) -> None:
    run = _save(tmp_path, "cifar10_cnn", {"channels": [8, 8, 16, 16], "hidden": 32})
    Image.fromarray(_image(1).permute(1, 2, 0).numpy()).resize((50, 40)).save(tmp_path / "a.png")
    assert main(["explain", str(run), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--json",
                 "--method", "gradcam", "--method", "occlusion", "--layer", "feature_extractor.2"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert len(result["topk"]) == 4 and result["gradcam_layer"] == "feature_extractor.2"
    assert sorted(Path(p).name for p in result["files"].values()) == [
        "00-a.npz", "00-a_attribution.png", "00-a_feature_maps.png", "kernels.png"]
    with np.load(result["files"]["npz"]) as saved:
        assert saved["methods"].tolist() == ["gradcam", "occlusion"]
        probabilities = saved["probabilities"]
        assert saved["image"].tolist() == read_images([tmp_path / "a.png"], 32)[0].permute(1, 2, 0).tolist()
    assert [t["probability"] for t in result["topk"]] == sorted(probabilities.tolist(), reverse=True)
    for png in ("00-a_attribution.png", "00-a_feature_maps.png", "kernels.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["{missing}", "{image}"], "no such run folder"),
    (["{run}", "{text}"], "not a readable image"),
    (["{run}", "{image}", "--layer", "feature_extractor.99"], "unknown layer 'feature_extractor.99'"),
])
def test_user_errors_are_one_line_and_status_2(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    run = _save(tmp_path, "cifar10_cnn", {"channels": [8, 8, 16, 16], "hidden": 32})
    Image.fromarray(_image(1).permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    paths = {"missing": tmp_path / "nope", "image": tmp_path / "a.png", "run": run, "text": tmp_path / "notes.txt"}
    assert main(["explain", *[a.format(**paths) for a in args], "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_without_captum_the_line_says_how_to_install_it(tmp_path: Path, monkeypatch, capsys) -> None:
    run = _save(tmp_path, "cifar10_cnn", {"channels": [8, 8, 16, 16], "hidden": 32})
    Image.fromarray(_image(1).permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    assert main(["explain", str(run), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]) == 2
    assert 'pip install "cifarlab[explain]"' in capsys.readouterr().err and not (tmp_path / "out").exists()


# --- sanity checks of the maps on a model trained for seconds on real images -----------------------------

@pytest.fixture(scope="module")
def trained(shared_images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """The seed CNN after 3 epochs on 1,800 real images (about 35-40% accurate), and 40 held-out images."""
    root = tmp_path_factory.mktemp("explain")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFARLAB_CACHE", str(root / "cache"))
        # precision and layout fixed: left to the tuner they follow how busy the machine is, and so would the model
        assert main(["train", "--data", str(shared_images), "--epochs", "3", "--batch-size", "64", "--lr", "2e-3",
                     "--val-split", "200", "--seed", "0", "--precision", "fp32", "--no-channels-last",
                     "--out", str(root / "run")]) == 0
    files = sorted(shared_images.rglob("*.jpg"))[::50]  # 4 of every class, spread through the folders
    return root / "run", read_images(files, 32)


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(m.ravel())) for m in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


@pytest.mark.parametrize("method", ["gradcam", "ig"])
def test_maps_depend_on_the_trained_weights(trained, method: str) -> None:
    """Adebayo et al. (2018): re-initialising every weight must change the map (a map that stays is an
    edge detector, not an explanation). Grad-CAM's 4x4 map, smoothly upsampled, keeps some rank
    correlation with any other smooth map; a weight-blind one would keep nearly 1."""
    run, images = trained
    explainer, randomised = open_explainer(run), open_explainer(run)
    torch.manual_seed(1)
    for module in randomised.model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    correlations = []
    for image in images[:16]:
        arrays = explain_tensor(explainer, image, methods=(method,))
        other = attribute(randomised, explainer.normalise(image[None]), int(arrays["target"]), method)
        correlations.append(_rank_correlation(arrays[f"attr:{method}"], other))
    assert np.median(correlations) < 0.6, correlations


def test_maps_depend_on_the_image(trained) -> None:
    run, images = trained
    explainer = open_explainer(run)
    maps = [explain_tensor(explainer, image, methods=("gradcam", "ig")) for image in images[:8]]
    for method in ("gradcam", "ig"):
        pairs = [_rank_correlation(maps[i][f"attr:{method}"], maps[i + 1][f"attr:{method}"]) for i in range(0, 8, 2)]
        assert np.median(pairs) < 0.6, (method, pairs)


@pytest.mark.parametrize("method", ["gradcam", "ig", "occlusion"])
def test_deleting_the_most_attributed_pixels_first_hurts_most(trained, method: str) -> None:
    """The deletion curves (Petsiuk et al., 2018): the predicted class's probability falls faster when the
    pixels the map ranks highest go first than when the lowest go first; the area under it is smaller."""
    run, images = trained
    explainer = open_explainer(run)
    assert explainer.default_layer == "feature_extractor.10"  # the last conv's maps after ReLU and pooling
    most, least, shuffled = [], [], []
    for image in images if method != "occlusion" else images[::2]:  # occlusion: 225 forward passes an image
        arrays = explain_tensor(explainer, image, methods=(method,))
        heat, target = arrays[f"attr:{method}"], int(arrays["target"])
        most.append(deletion_curve(explainer, image, heat, target, most_first=True).mean())
        least.append(deletion_curve(explainer, image, heat, target, most_first=False).mean())
        noise = np.random.default_rng(len(most)).random(heat.shape)  # a map that knows nothing
        shuffled.append(deletion_curve(explainer, image, noise, target).mean())
    most, least, shuffled = np.array(most), np.array(least), np.array(shuffled)
    assert most.mean() < 0.85 * least.mean() and most.mean() < 0.92 * shuffled.mean(), (most, least, shuffled)
    assert (most < least).mean() >= 0.6


def test_top_patches_are_crops_of_the_most_excited_images(trained) -> None:
    run, images = trained
    explainer = open_explainer(run)
    arrays = top_patches(explainer, images, layers=["feature_extractor.2"], channels=2, patches=3)
    assert arrays["patches:feature_extractor.2"].shape == (2, 3, 32, 32, 3)
    # the second conv of 3x3 convs sees 5x5 pixels: a patch is that box, scaled up 32/5 (nearest)
    layer = explainer.layers["feature_extractor.2"]
    channel = int(arrays["channels:feature_extractor.2"][0])
    captured = []
    hook = layer.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        explainer.model(explainer.normalise(images))
    hook.remove()
    peak = captured[0][:, channel].flatten(1).max(dim=1).values
    best = int(peak.argmax())
    where = int(captured[0][best, channel].flatten().argmax())
    y, x = divmod(where, 32)
    crop = images[best][:, max(0, y - 2):y + 3, max(0, x - 2):x + 3].permute(1, 2, 0).numpy()
    patch = arrays["patches:feature_extractor.2"][0, 0]
    assert patch[0, 0].tolist() == crop[0, 0].tolist() and patch[-1, -1].tolist() == crop[-1, -1].tolist()
