"""Models, each family in its own file; importing this package registers them all."""
from cifarlab.models import (  # noqa: F401  (registers their models)
    fast_net, preact_resnet, resnet_cifar, simple_cnn, wide_resnet,
)
from cifarlab.models.registry import create_model, model_names, register_model, sized_for_input
from cifarlab.models.simple_cnn import CIFAR10CNN

__all__ = ["CIFAR10CNN", "create_model", "model_names", "register_model", "sized_for_input"]
