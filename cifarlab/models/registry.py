"""A name -> builder registry, as timm does it: one decorator, one lookup, no if/elif dispatch."""
from __future__ import annotations

from typing import Callable

from torch import nn

from cifarlab.errors import CifarlabError, unknown_name

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_SIZED: set[str] = set()  # builders whose head is sized for the input: the only ones given image_size


def register_model(builder: Callable[..., nn.Module] | None = None, *, sized: bool = False):
    """Register `builder` under its function name; it takes keyword arguments, num_classes among them,
    and image_size where `sized` (`@register_model(sized=True)`). The others pool globally before their
    head, so any size goes through them and image_size is not theirs to take."""
    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[builder.__name__] = builder
        if sized:
            _SIZED.add(builder.__name__)
        return builder
    return add(builder) if builder is not None else add


def sized_for_input(name: str) -> bool:
    """Whether the model's head is sized for one image size (registered with sized=True)."""
    return name in _SIZED


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def model_description(name: str) -> str:
    """The first line of the builder's docstring (what `cifarlab models` shows)."""
    if name not in _BUILDERS:
        raise unknown_name("model", name, model_names())
    return (_BUILDERS[name].__doc__ or "").strip().split("\n")[0]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name (10 classes unless num_classes says otherwise)."""
    if name not in _BUILDERS:
        raise unknown_name("model", name, model_names())
    if name not in _SIZED:
        kwargs.pop("image_size", None)
    try:
        return _BUILDERS[name](**kwargs)
    except (TypeError, ValueError) as error:
        raise CifarlabError(f"model '{name}': bad arguments {kwargs} ({error})") from None
