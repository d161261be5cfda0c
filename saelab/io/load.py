"""`load_sae(path)`: any SAE folder saelab can read, its format recognised from the files in it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from saelab.io import saelens_format
from saelab.io.dictionary_learning import is_dictionary_learning_folder, load_dictionary_learning
from saelab.io.e2e_sae import is_e2e_sae_folder, load_e2e_sae
from saelab.io.gemma_scope import PARAMS_FILE, load_gemma_scope
from saelab.io.pretrained import pretrained_releases, resolve_release
from saelab.io.saelens_format import FileFormatError
from saelab.io.sparsify_format import SPARSIFY_WEIGHTS, is_sparsify_folder, load_sparsify

if TYPE_CHECKING:
    from saelab.saes.base import SAE


def load_sae(
    path: str | Path, device: str | None = None, dtype: str | None = None, subfolder: str | None = None,
    revision: str | None = None, sae_id: str | None = None,
) -> "SAE":
    """Load an SAE folder: saelab/SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json +
    sae.safetensors), dictionary_learning (ae.pt + config.json), Gemma Scope (params.npz) or an e2e_sae run
    (samples_N.pt + final_config.yaml; `sae_id` names the hook position when it holds several). Unknown layouts
    fail with the list of known ones. A path that does not exist locally but looks like `owner/name` is a
    Hugging Face repo id: `subfolder` picks the SAE inside it (downloaded through the hub cache). A release
    name from saelab/pretrained.yaml with an `sae_id` resolves to its repo and folder."""
    path = Path(path)
    if not path.exists() and (sae_id is not None or str(path) in pretrained_releases()):
        repo_id, subfolder = resolve_release(str(path), sae_id)
        path = Path(repo_id)
    if not path.exists() and str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        from saelab.io.hub import download_sae_folder

        path = download_sae_folder(str(path), subfolder, revision)
    elif subfolder:
        path = path / subfolder
    if path.is_dir() and not (path / saelens_format.WEIGHTS_FILE).exists():
        if is_sparsify_folder(path):
            return _cast(load_sparsify(path, device), dtype)
        if (path / PARAMS_FILE).exists():
            return _cast(load_gemma_scope(path, device), dtype)
        if is_e2e_sae_folder(path):
            return _cast(load_e2e_sae(path, sae_id, device), dtype)
        if is_dictionary_learning_folder(path):
            return _cast(load_dictionary_learning(path, device), dtype)
        if not (path / saelens_format.CFG_FILE).exists():
            raise FileFormatError(
                f"{path}: no SAE found; expected {saelens_format.CFG_FILE} + {saelens_format.WEIGHTS_FILE} (saelab, "
                f"SAELens), {saelens_format.CFG_FILE} + {SPARSIFY_WEIGHTS} (sparsify), ae.pt + config.json "
                f"(dictionary_learning), {PARAMS_FILE} (Gemma Scope) or samples_N.pt (e2e_sae)"
            )
    return saelens_format.load_sae(path, device=device, dtype=dtype)


def _cast(sae: "SAE", dtype: str | None) -> "SAE":
    if dtype is None:
        return sae
    import torch

    sae.cfg.dtype = dtype
    return sae.to(getattr(torch, dtype))
