"""dictionary_learning's layout: `ae.pt` (a torch state dict) + `config.json` (`trainer.dict_class`, ...).

`ae.pt` is read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers: a pickle that would run code fails with FileFormatError. Each dictionary class maps onto a saelab
architecture with the same reconstruction (dictionary_learning rescales some latents by decoder norms and
undoes it in decode; saelab keeps the unscaled latents).

`config.json`'s trainer section says where the dictionary belongs: `lm_name` (a Hugging Face model), `layer`,
and `submodule_name`, free-form but by convention `<site>_layer_<N>` (`resid_post_layer_3`, `mlp_out_layer_3`).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.core.files import FileFormatError, read_json
from saelab.io.locations import SITES, site_hook
from saelab.saes.base import SAE
from saelab.saes.registry import create_sae

WEIGHTS = "ae.pt"
CONFIG = "config.json"


def _standard(w: dict[str, Tensor]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    return (
        "standard",
        {"apply_b_dec_to_input": True},
        {
            "W_enc": w["encoder.weight"].T,
            "b_enc": w["encoder.bias"],
            "W_dec": w["decoder.weight"].T,
            "b_dec": w["bias"],
        },
    )


def _gated(w: dict[str, Tensor]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    return (
        "gated",
        {"apply_b_dec_to_input": True},
        {
            "W_enc": w["encoder.weight"].T,
            "b_gate": w["gate_bias"],
            "r_mag": w["r_mag"],
            "b_mag": w["mag_bias"],
            "W_dec": w["decoder.weight"].T,
            "b_dec": w["decoder_bias"],
        },
    )


def _jumprelu(w: dict[str, Tensor]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    return (
        "jumprelu",
        {"apply_b_dec_to_input": False},
        {name: w[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
    )


def _topk(w: dict[str, Tensor]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    return (
        "topk",
        {"apply_b_dec_to_input": True, "k": int(w["k"])},
        {
            "W_enc": w["encoder.weight"].T,
            "b_enc": w["encoder.bias"],
            "W_dec": w["decoder.weight"].T,
            "b_dec": w["b_dec"],
        },
    )


def _batchtopk(w: dict[str, Tensor]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    _, options, state = _topk(w)
    return "batchtopk", options, {**state, "topk_threshold": w["threshold"].reshape(())}


CONVERTERS = {
    "AutoEncoder": _standard,
    "GatedAutoEncoder": _gated,
    "JumpReluAutoEncoder": _jumprelu,
    "AutoEncoderTopK": _topk,
    "BatchTopKSAE": _batchtopk,
}


def is_dictionary_learning_folder(path: Path) -> bool:
    return (path / WEIGHTS).is_file()


def dictionary_learning_location(trainer: dict[str, Any]) -> dict[str, Any]:
    """model_name, hook_name and hook_layer of a trainer config (keys it does not tell are left out)."""
    found: dict[str, Any] = {}
    if isinstance(trainer.get("lm_name"), str):
        found["model_name"] = trainer["lm_name"]
    if isinstance(trainer.get("layer"), int) and not isinstance(trainer["layer"], bool):
        found["hook_layer"] = trainer["layer"]
    match = re.fullmatch(r"(\w+?)_layer_(\d+)", str(trainer.get("submodule_name")))
    if match and match.group(1) in SITES:
        found["hook_layer"] = int(match.group(2))
        found["hook_name"] = site_hook(found["hook_layer"], match.group(1))
    return found


def load_dictionary_learning(path: str | Path, device: str = "cpu") -> SAE:
    """A saelab SAE from a dictionary_learning folder (ae.pt + config.json), on `device`, with the model, hook
    and layer its trainer config tells."""
    path = Path(path)
    try:
        weights = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise FileFormatError(
            f"{path / WEIGHTS}: refused or unreadable (only plain tensors are loaded): {str(e).splitlines()[0]}"
        ) from None
    trainer = read_json(path / CONFIG).get("trainer", {}) if (path / CONFIG).exists() else {}
    if not isinstance(trainer, dict):
        raise FileFormatError(f"{path / CONFIG}: 'trainer' must be an object, got {type(trainer).__name__}")
    dict_class = trainer.get("dict_class")
    if dict_class not in CONVERTERS:
        raise FileFormatError(f"{path / CONFIG}: dict_class {dict_class!r} is not one of {', '.join(CONVERTERS)}")
    try:
        architecture, options, state = CONVERTERS[dict_class](weights)
    except KeyError as e:
        raise FileFormatError(f"{path / WEIGHTS}: no tensor {e} for a {dict_class}") from None
    d_in, d_sae = state["W_enc"].shape
    metadata = {
        "source_format": "dictionary_learning",
        "dict_class": dict_class,
        "layer": trainer.get("layer"),
        "submodule_name": trainer.get("submodule_name"),
    }
    sae = create_sae(
        architecture,
        d_in=d_in,
        d_sae=d_sae,
        device=device,
        metadata=metadata,
        **dictionary_learning_location(trainer),
        **options,
    )
    expected = {name: tuple(t.shape) for name, t in sae.weights_for_saving().items()}
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise FileFormatError(
                f"{path / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
            )
    sae.load_saved_weights({name: t.float().contiguous().to(sae.device) for name, t in state.items()})
    return sae
