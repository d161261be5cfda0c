"""Nested training state (optimiser, RNG, counters) to disk without pickle: tensors in safetensors,
everything else in JSON with type tags for what JSON cannot express (int keys, tuples, arrays)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from saelab.core.files import FileFormatError, atomic_write_bytes, atomic_write_text, read_json, read_safetensors


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {
            "__items__": [
                [_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at {path} in training state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.array(value["__ndarray__"], dtype=value["dtype"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(state: dict[str, Any], directory: str | Path, name: str = "state") -> None:
    """Write `state` as `<name>.safetensors` + `<name>.json` in `directory`, each atomically."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "s")
    atomic_write_bytes(directory / f"{name}.safetensors", safetensors_bytes(tensors))
    atomic_write_text(directory / f"{name}.json", json.dumps(skeleton))


def load_state(directory: str | Path, name: str = "state") -> dict[str, Any]:
    """Inverse of `save_state`; FileFormatError for a missing, truncated or corrupt part."""
    directory = Path(directory)
    tensors = read_safetensors(directory / f"{name}.safetensors")
    skeleton = read_json(directory / f"{name}.json")
    try:
        return _decode(skeleton, tensors)
    except KeyError as e:
        raise FileFormatError(f"{directory}: state refers to a tensor that is not stored: {e}") from None
