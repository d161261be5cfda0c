"""Architectures by name: `@register("topk")` adds one, `create_sae("topk", ...)` builds one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from saelab.core.config import ConfigError, from_dict, unknown_key_error
from saelab.saes.base import SAE
from saelab.saes.config import SAEConfig

_ARCHITECTURES: dict[str, type[SAE]] = {}
S = TypeVar("S", bound=type[SAE])


def register(name: str) -> Callable[[S], S]:
    """Class decorator adding an architecture under `name`; a name already taken is an error, not a silent swap."""

    def add(cls: S) -> S:
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not cls:
            raise ValueError(f"architecture '{name}' is already registered (by {_ARCHITECTURES[name].__qualname__})")
        cls.architecture = name
        _ARCHITECTURES[name] = cls
        return cls

    return add


def available_architectures(layered: bool | None = None) -> list[str]:
    """Names accepted by `create_sae`; `layered` True/False: only those over several layers / over one hook."""
    return sorted(name for name, cls in _ARCHITECTURES.items() if layered is None or cls.layered == layered)


def architecture_class(name: str) -> type[SAE]:
    """The SAE class registered as `name`; a ConfigError naming the closest one otherwise."""
    if not isinstance(name, str):
        raise ConfigError(f"architecture must be one of {', '.join(sorted(_ARCHITECTURES))}, got {name!r}")
    if name not in _ARCHITECTURES:
        raise unknown_key_error(name, _ARCHITECTURES, "architectures")
    return _ARCHITECTURES[name]


def make_config(options: dict[str, Any]) -> SAEConfig:
    """Validated config of the right architecture class from a plain dict (YAML, cfg.json, kwargs)."""
    options = dict(options)
    name = options.setdefault("architecture", "standard")
    cls = architecture_class(name)
    return from_dict(cls.config_class, options, where=f"SAE config ({name})")


def sae_from_config(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE of the config's architecture."""
    return architecture_class(cfg.architecture)(cfg)


def create_sae(architecture: str, d_in: int, d_sae: int, **options: Any) -> SAE:
    """A freshly initialised SAE, e.g. `create_sae("topk", d_in=576, d_sae=4608, k=32)`."""
    return sae_from_config(make_config({"architecture": architecture, "d_in": d_in, "d_sae": d_sae, **options}))
