"""A timm-style registry: networks are built by name from builder functions."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .spec import ModelSpec

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_SPECS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder under ``spec.arch`` with its default spec."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if spec.arch in _BUILDERS:
            raise ValueError(f"model {spec.arch!r} registered twice")
        _BUILDERS[spec.arch] = fn
        _SPECS[spec.arch] = spec
        return fn

    return wrap


def list_models(task: str | None = None) -> list[str]:
    """Names of the registered networks, optionally only those for ``task``."""
    return sorted(n for n, s in _SPECS.items() if task is None or s.task == task)


def default_spec(name: str) -> ModelSpec:
    """A copy of the default spec of network ``name``."""
    if name not in _SPECS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return ModelSpec.from_dict(_SPECS[name].to_dict())


def create_model(name: str, spec: ModelSpec | None = None, **kwargs) -> nn.Module:
    """Build network ``name``; its spec is attached as ``model.spec``."""
    spec = spec or default_spec(name)
    model = _BUILDERS[name](spec=spec, **kwargs) if name in _BUILDERS else None
    if model is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    model.spec = spec
    return model
