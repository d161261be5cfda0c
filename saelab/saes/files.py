"""An SAE's own folder, the layout saelab and SAELens share: `cfg.json`, `sae_weights.safetensors` and, when
known, `sparsity.safetensors` (log10 firing density per latent). Reading, including files SAELens and older
saelab versions wrote, is `saelab.load_sae` (saelab/io/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from saelab.core.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from saelab.saes.base import SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"

TRANSCODERS = {
    "transcoder": ("standard", False),
    "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
"""SAELens's transcoder architecture names: (saelab architecture, skip connection). saelab writes transcoders
under them, so that SAELens reads them."""


def saelens_architecture(architecture: str, transcoder: bool, skip_connection: bool) -> str:
    """The architecture name SAELens gives an SAE: its transcoder names for standard and JumpReLU transcoders."""
    for name, value in TRANSCODERS.items():
        if transcoder and value == (architecture, skip_connection):
            return name
    return architecture


LOCATION_KEYS = ("model_name", "hook_name", "hook_layer", "hook_name_out")


def save_sae(sae: SAE, path: str | Path, sparsity: Tensor | None = None) -> Path:
    """Write an SAE directory as it is (saelab reloads it exactly; SAELens reads it too unless
    `saelab.io.saelens_compat.to_saelens` would convert it). `sparsity` is each latent's log10 firing density."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_FILE, safetensors_bytes(sae.weights_for_saving()))
    if sparsity is not None:
        atomic_write_bytes(path / SPARSITY_FILE, safetensors_bytes({"sparsity": sparsity.detach().float().cpu()}))
    # Where the SAE reads is left out when unknown (a synthetic run's SAE): SAELens reads a null hook_name as a string
    cfg = {k: v for k, v in sae.cfg.to_dict().items() if v is not None or k not in LOCATION_KEYS}
    cfg["architecture"] = saelens_architecture(sae.cfg.architecture, sae.cfg.transcoder, sae.cfg.skip_connection)
    # The config goes last: a directory with a cfg.json has its weights.
    atomic_write_text(path / CFG_FILE, json.dumps(cfg, indent=2))
    return path
