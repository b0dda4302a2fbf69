"""Every registered model: output shape, a backward pass, finite values; the registry's errors."""
import pytest
import torch

from cifarlab import CifarlabError, create_model, model_names


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_backward(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (4, num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


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
