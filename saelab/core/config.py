"""Typed configs from plain dicts: validation, closest-name suggestions, field docs.

Configs are ordinary dataclasses. A field is documented by a string literal on the line after it (as in
sparsify); `field_docs` reads those strings so the same text serves `--help`, the README and the code.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used, with a message meant for the user."""


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate most like `name`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


SYNONYMS = {
    # SAELens
    "learning_rate": "lr",
    "lr_warm_up_steps": "lr_warmup_steps",
    "l1_warm_up_steps": "sparsity_warmup_steps",
    "training_tokens": "total_tokens",
    "train_batch_size_tokens": "batch_size",
    "hook_point": "hook_name",
    "dataset_path": "dataset",
    # sparsify
    "num_latents": "d_sae",
    "auxk_alpha": "aux_coefficient",
    # dictionary_learning
    "dict_size": "d_sae",
    "activation_dim": "d_in",
}
"""Option names of SAELens, sparsify and dictionary_learning whose saelab name is not close in spelling
(difflib finds `lr_decay_steps` for `learning_rate`): the key a user coming from those libraries means."""


def closest_key(key: str, valid: typing.Iterable[str]) -> str | None:
    """The valid config key or dotted flag a mistyped or foreign `key` most likely means: its saelab name from
    SYNONYMS in the same section (`train.learning_rate` -> `train.lr`), else that name or the key's own name in
    another section (SAELens keeps l1_coefficient, expansion_factor, d_sae, k, ... in one flat config:
    `train.k` -> `sae.k`), else the closest spelling."""
    valid = list(valid)
    section, _, name = key.rpartition(".")
    prefix = f"{section}." if section else ""
    meant = SYNONYMS.get(name)
    if meant and prefix + meant in valid:
        return prefix + meant
    for wanted in filter(None, (meant, name)):
        elsewhere = [v for v in valid if v == wanted or v.endswith(f".{wanted}")]
        if elsewhere:
            return elsewhere[0]
    return closest(key, valid)


def unknown_key_error(key: str, valid: typing.Iterable[str], where: str) -> ConfigError:
    valid = sorted(valid)
    hint = closest_key(key, valid)
    suggestion = f" Did you mean '{hint}'?" if hint else ""
    return ConfigError(f"unknown key '{key}' in {where}.{suggestion} Valid keys: {', '.join(valid)}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields, for this class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, following in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against a type annotation; returns it, with ints widened to floats where asked."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(value, option, where)
            except ConfigError:
                pass
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{where} must be {names}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type, *_) = typing.get_args(tp) or (Any,)
        return origin(check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(key, fields, where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            values[key] = from_dict(tp, value, f"{where}.{key}")  # type: ignore[arg-type]
        else:
            values[key] = check_type(value, tp, f"{where}.{key}")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key '{missing[0]}'")
    try:
        return cls(**values)
    except TypeError as e:  # a value the type checks let through but __post_init__ cannot use
        raise ConfigError(f"{where}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-ready dict of a (nested) dataclass config."""
    return dataclasses.asdict(config)


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, nested mappings merged key by key (base is modified)."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def check_device(device: str) -> str:
    """`device` when this machine has it, else a ConfigError saying so (rather than torch's error at the first
    tensor placed there)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps, ...") from None
    if parsed.type in ("cpu", "meta"):
        return device
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", lambda: False)()
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if not available or (parsed.index or 0) >= count:
        raise ConfigError(f"device {device!r} is not available on this machine (torch {torch.__version__})")
    return device
