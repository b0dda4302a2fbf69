"""Every registered model: output shape, a backward pass and an optimizer step, finite values, its size; the
registry's errors."""
import json

import pytest
import torch

from cifarlab import CifarlabError, create_model, model_names
from cifarlab.config import RECIPES
from cifarlab.models.catalog import count_params, forward_flops
from cifarlab.optim import build_optimizer, param_groups

# Parameter counts with 10 classes, to 2 significant figures: He et al. (2015) table 6 for the CIFAR
# ResNets, Zagoruyko & Komodakis (2016) for the WRNs, the usual 11.2M for the 32x32 PreAct ResNet-18.
PAPER_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6, "resnet110": 1.7e6,
                "plain20": 0.27e6, "plain32": 0.46e6, "plain44": 0.66e6, "plain56": 0.85e6,
                "preact_resnet18": 11e6, "wrn16_8": 11e6, "wrn28_10": 36e6}
# The other two counted layer by layer (3x3 convolutions with bias: 9 * in * out + out).
EXACT_PARAMS = {
    # conv 3-32, 32-32, 32-64, 64-128; linear 128*4*4-256, 256-10
    "cifar10_cnn": (9 * 3 * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128)
                   + (2048 * 256 + 256) + (256 * 10 + 10),
    # whitening 2x2 conv 3-24 with bias; blocks 24-64, 64-256, 256-256 of two bias-free convs and two
    # BatchNorms (scale and shift); bias-free head 256-10
    "fast_net": (24 * 3 * 4 + 24) + sum(9 * cin * cout + 9 * cout * cout + 4 * cout
                                        for cin, cout in ((24, 64), (64, 256), (256, 256))) + 256 * 10,
}


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_backward(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)  # 2: wrn28_10 stays quick
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", model_names())
def test_every_model_builds_for_another_image_size_and_classifies_it(name: str) -> None:
    """--image-size 40 (a folder of larger images): the models that pool globally ignore the size, the
    notebook's CNN sizes its classifier for it; each gives one row of logits per 40-px image."""
    model = create_model(name, num_classes=10, image_size=40).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 40, 40)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_its_network_and_trains_it_one_step(name: str) -> None:
    """The recipe's own model arguments (fast95/fast96's wider blocks, fast96's third conv with its residual)."""
    config = RECIPES[name]
    torch.manual_seed(0)
    model = create_model(config.model, **config.builder_args(10))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained)
    groups = param_groups(model, config.lr, config.weight_decay, config.bias_lr_scale, filter_lr=config.filter_lr,
                          bias_decay=config.bias_decay)
    optimizer = build_optimizer(config.optimizer, groups, config.momentum)  # the recipe's, as build_run makes it
    before = [p.detach().clone() for p in trained]
    optimizer.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(trained, before))


def test_a_three_conv_block_adds_its_input_to_its_output() -> None:
    from cifarlab.models.fast_net import ConvBlock

    block = ConvBlock(4, 4, convs=3).eval()
    for norm in (block.norm2, block.norm3):
        norm.bias.data.fill_(-100.0)  # the second and third convs' path contributes ~0 after GELU
    x = torch.randn(1, 4, 8, 8)
    pooled = block.activation(block.norm1(block.pool(block.conv1(x))))
    assert torch.allclose(block(x), pooled, atol=1e-5)


@pytest.mark.parametrize("name", model_names())
def test_parameter_count(name: str) -> None:
    count = count_params(create_model(name))
    if name in EXACT_PARAMS:
        assert count == EXACT_PARAMS[name]
    else:
        assert float(f"{count:.2g}") == PAPER_PARAMS[name], f"{name}: {count} parameters"


def test_flops_count_a_multiply_add_as_two() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 32 * 32, 10, bias=False))
    assert forward_flops(model) == 2 * (32 * 32 * 8 * 27 + 8 * 32 * 32 * 10)


def test_models_command_lists_every_model(capsys) -> None:
    from cifarlab.cli import main

    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    assert all(f"\n{name} " in printed for name in model_names())
    assert "resnet56            0.85M" in printed and "multiply-add counts as 2" in printed


def test_notebook_cnn_shape_rules() -> None:
    model = create_model("cifar10_cnn", channels=(8, 16, 24, 32), hidden=64)
    convs = [m for m in model.feature_extractor if isinstance(m, torch.nn.Conv2d)]
    pools = [i for i, m in enumerate(model.feature_extractor) if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [8, 16, 24, 32]
    assert len(pools) == 3  # after conv 2, 3 and 4
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(2), atol=1e-5)  # ends in log-softmax


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(CifarlabError, match="did you mean cifar10_cnn"):
        create_model("cifar10cnn")


def test_bad_model_arguments_are_a_clean_error() -> None:
    with pytest.raises(CifarlabError, match="bad arguments"):
        create_model("cifar10_cnn", depth=3)
    with pytest.raises(CifarlabError, match="activation must be one of gelu, relu"):
        create_model("fast_net", activation="swish")


def test_fast_net_activation_is_used_after_the_stem_and_in_every_block() -> None:
    model = create_model("fast_net", widths=[8, 8, 8], activation="relu")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "ReLU" in kinds and "GELU" not in kinds
    stem = model.activation(model.whiten(torch.randn(2, 3, 32, 32)))
    assert (stem >= 0).all()  # ReLU, where GELU would leave small negatives


def test_the_whitening_sample_spans_the_classes_of_a_class_ordered_source() -> None:
    """An image folder is read class by class: the first 5,000 images would all be one class."""
    from cifarlab.build import WHITENING_IMAGES, data_dependent_init
    from cifarlab.data import DataBundle, ImageSet

    labels = torch.arange(2).repeat_interleave(WHITENING_IMAGES)  # 5,000 black images, then 5,000 white
    images = (labels * 255).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    bundle = DataBundle(ImageSet(images, labels, ["black", "white"]), None, None, "ordered")
    seen = []

    class Recorder(torch.nn.Module):
        def init_from_data(self, batch: torch.Tensor) -> None:
            seen.append(batch)

    data_dependent_init(Recorder(), bundle, torch.device("cpu"), ([0.5] * 3, [0.5] * 3), seed=0)
    sample = seen[0][:, 0, 0, 0]
    assert len(sample) == WHITENING_IMAGES and 0.4 < (sample > 0).float().mean() < 0.6  # both classes, about evenly


def test_fast_net_compiled_in_bf16_has_finite_gradients() -> None:
    """torch.compile recomputes a bf16 global max at another precision: with torch.amax's tie-splitting
    backward no element matched and every gradient below the head was NaN (fast75 --compile diverged
    at its second step). Max-pooling's backward follows the recorded index."""
    torch.manual_seed(0)
    model = create_model("fast_net", widths=[8, 16, 16], whiten_stride=2)
    x = torch.randn(16, 3, 32, 32)
    model.init_from_data(x)
    with torch.autocast("cpu", torch.bfloat16):
        loss = torch.compile(model)(x).float().logsumexp(dim=1).sum()
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


def test_the_whitening_bias_trains_its_first_epochs_then_stays(tmp_path, image_folder_writer, monkeypatch) -> None:
    """--whiten-bias-epochs 1: the fast net's whitening bias moves in epoch 1 and not after (airbench)."""
    import cifarlab.trainer as trainer_module
    from cifarlab.cli import main

    image_folder_writer(tmp_path / "images", {name: 24 for name in ("cat", "dog")})
    real_step, biases = trainer_module.train_step, []

    def recording_step(step, *args, **kwargs):
        result = real_step(step, *args, **kwargs)
        biases.append(step.model.whiten.bias.detach().clone())
        return result

    monkeypatch.setattr(trainer_module, "train_step", recording_step)
    args = ["train", "--data", str(tmp_path / "images"), "--recipe", "fast75", "--batch-size", "8",
            "--val-split", "8", "--epochs", "3", "--device", "cpu", "--precision", "fp32", "--channels-last",
            "--whiten-bias-epochs", "1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    per_epoch = len(biases) // 3
    first, later = biases[:per_epoch], biases[per_epoch - 1:]
    assert not torch.equal(first[0], first[-1])
    assert all(torch.equal(bias, later[0]) for bias in later)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    built = create_model("fast_net", **RECIPES["fast75"].builder_args(2))
    assert summary["parameters"] == sum(p.numel() for p in built.parameters() if p.requires_grad)  # bias counted
    assert main(args[:-2] + ["--model", "cifar10_cnn", "--out", str(tmp_path / "other")]) == 2  # no stem: an error


@pytest.mark.parametrize("stride", [1, 2])
def test_the_whitening_stem_decorrelates_the_patches_it_was_fitted_on(stride: int) -> None:
    """After init_from_data, the stem's first half (the eigenbasis; the second half is its negation)
    maps the 2x2 patches it sees (every one at stride 1, every other at stride 2) of strongly correlated
    images to unit, uncorrelated features."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(400, 1, 32, 32, generator=generator)
    images = base + 0.3 * torch.randn(400, 3, 32, 32, generator=generator)  # channels highly correlated
    images = images + torch.nn.functional.avg_pool2d(images, 3, 1, 1)  # and neighbouring pixels too
    model = create_model("fast_net", widths=[8, 8, 8], whiten_stride=stride)
    model.init_from_data(images)
    with torch.no_grad():
        features = torch.nn.functional.conv2d(images, model.whiten.weight[:12], stride=stride)
    features = features.permute(0, 2, 3, 1).reshape(-1, 12)
    features = features - features.mean(dim=0)
    covariance = features.T @ features / len(features)
    assert torch.allclose(covariance, torch.eye(12), atol=0.02)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_a_plain_net_is_its_resnet_without_the_identity_path(depth: int) -> None:
    """Same parameters, same initial weights (option A shortcuts have none); with every block's second
    BatchNorm zeroed, a ResNet's blocks pass their input on, a plain net's pass zeros: its output is
    the classifier's bias whatever the image."""
    torch.manual_seed(0)
    resnet = create_model(f"resnet{depth}")
    torch.manual_seed(0)
    plain = create_model(f"plain{depth}")
    assert count_params(plain) == count_params(resnet)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), resnet.state_dict().values()))
    x = torch.randn(4, 3, 32, 32)
    for model in (plain, resnet):
        for name, module in model.named_modules():
            if name.endswith(".bn2"):
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
        model.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), plain.fc.bias.expand(4, -1))
        out = resnet(x)
    assert (out - resnet.fc.bias).abs().amax() > 1e-3 and not torch.allclose(out[0], out[1])
