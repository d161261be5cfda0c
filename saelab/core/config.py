"""Typed configs from plain dicts, validated by pydantic, with errors that name the closest valid key.

Configs are ordinary dataclasses (`dataclasses.replace`, `asdict` and attribute assignment work as usual). A
field is documented by a string literal on the line after it, as in sparsify; pydantic reads those strings
(`use_attribute_docstrings`), so the same text serves `--help`, the docs and the code. `from_dict` validates a
dict (YAML, JSON, keyword arguments) against a config class strictly: no unknown keys, an int where an int is
declared (not "3"), a number for a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from saelab.core.errors import ConfigError

T = TypeVar("T")

PYDANTIC = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
"""Set as `__pydantic_config__` on every config dataclass."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
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


def closest_key(key: str, valid: Iterable[str]) -> str | None:
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


def unknown_key_error(key: str, valid: Iterable[str], where: str) -> ConfigError:
    valid = sorted(valid)
    hint = closest_key(key, valid)
    suggestion = f" Did you mean '{hint}'?" if hint else ""
    return ConfigError(f"unknown key '{key}' in {where}.{suggestion} Valid keys: {', '.join(valid)}")


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of config dataclass `cls` (and of its config bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            properties = _adapter(klass).json_schema(mode="serialization").get("properties", {})
            docs.update(
                {name: " ".join(p["description"].split()) for name, p in properties.items() if "description" in p}
            )
    return docs


def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
    """Build config dataclass `cls` from `data`; a ConfigError for an unknown or missing key or a wrong value."""
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    try:
        text = json.dumps(data)  # JSON mode: strict types, yet nested configs may be given as dicts
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{where}: only plain values (numbers, strings, lists, mappings) are accepted ({e})"
        ) from None
    try:
        adapter = _adapter(cls)  # type: ignore[arg-type]  # a class is Hashable (python/mypy#11470)
        return adapter.validate_json(text, strict=True)
    except ValidationError as e:
        raise _config_error(cls, _first_error(e.errors()), where) from None


def _first_error(errors: list[Any]) -> Any:
    """The first error; for a value matching no member of a union (`bool | Literal['auto']`), one error that
    names what each member would accept."""
    first, field = errors[0], errors[0]["loc"][:-1]
    accepted = [text for e in errors if e["loc"][:-1] == field and (text := _expected_of(e))]
    if len(accepted) < 2 or first["type"] == "unexpected_keyword_argument":
        return first
    expected = " or ".join(dict.fromkeys(accepted))
    return {**first, "type": "literal_error", "ctx": {"expected": expected}}


def _expected_of(error: Any) -> str | None:
    """What a pydantic error says the value must be ('true or false', "'auto'", ...), when it says."""
    if error["type"] == "literal_error":
        return str(error["ctx"]["expected"])
    return _EXPECTED.get(error["type"].split("_")[0])


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "tuple": "a list",
}


def _config_error(cls: type, error: Any, where: str) -> ConfigError:
    """A pydantic error as saelab says it: the dotted key, what it must be, the closest valid key."""
    raised = error.get("ctx", {}).get("error")
    if isinstance(raised, ConfigError):
        return raised  # a check of the config's own __post_init__, which says where
    path, owner, rest = [], cls, list(error["loc"])
    while rest and dataclasses.is_dataclass(owner) and rest[0] in {f.name for f in dataclasses.fields(owner)}:
        name = rest.pop(0)
        path.append(str(name))
        owner = typing.get_type_hints(owner)[name]
    path += [f"[{part}]" if isinstance(part, int) else str(part) for part in rest if not _is_union_tag(part, owner)]
    key = ".".join([where, *path]).replace(".[", "[")
    kind = error["type"]
    if kind == "unexpected_keyword_argument":
        fields = [f.name for f in dataclasses.fields(owner) if f.init]
        return unknown_key_error(str(error["loc"][-1]), fields, ".".join([where, *path[:-1]]))
    if isinstance(raised, Exception):
        return ConfigError(f"{key}: {raised}")
    if kind == "missing":
        return ConfigError(f"{key.rpartition('.')[0] or where}: missing key '{path[-1]}'")
    expected = _expected_of(error)
    if expected:
        return ConfigError(f"{key} must be {expected}, got {error['input']!r}")
    return ConfigError(f"{key}: {error['msg']}, got {error['input']!r}")


def _is_union_tag(part: Any, owner: Any) -> bool:
    """Whether a location part names a member of a union type (pydantic's `k.int`), not a key or index."""
    return isinstance(part, str) and part in {getattr(t, "__name__", str(t)) for t in typing.get_args(owner)}


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
