"""`load_sae(path)`: any SAE saelab can read, from a local folder (its format recognised from the files in it), a
Hugging Face repo folder or a named release; placed where the caller asks (CPU by default), never on the
device its files were written from."""

from __future__ import annotations

import os
from pathlib import Path

from saelab.core.config import ConfigError, check_device, closest
from saelab.core.files import FileFormatError
from saelab.io import saelens_format
from saelab.io.circuit_tracer import is_circuit_tracer_folder, load_circuit_tracer
from saelab.io.dictionary_learning import is_dictionary_learning_folder, load_dictionary_learning
from saelab.io.e2e_sae import is_e2e_sae_folder, load_e2e_sae
from saelab.io.gemma_scope import PARAMS_FILE, load_gemma_scope
from saelab.io.hub import download_sae_folder
from saelab.io.locations import locate
from saelab.io.pretrained import pretrained_releases, resolve_release
from saelab.io.sparsify_format import SPARSIFY_WEIGHTS, is_sparsify_folder, load_sparsify
from saelab.saes.base import SAE


def load_sae(
    path: str | Path,
    device: str = "cpu",
    dtype: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    sae_id: str | None = None,
    model_name: str | None = None,
    hook_name: str | None = None,
    hook_layer: int | None = None,
) -> SAE:
    """Load an SAE onto `device` (default CPU, whatever device its files name).

    `path` is a local folder: saelab/SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json +
    sae.safetensors), dictionary_learning (ae.pt + config.json), Gemma Scope (params.npz), an e2e_sae run
    (samples_N.pt + final_config.yaml; `sae_id` names the hook position when it holds several), circuit-tracer's
    transcoder sets and cross-layer transcoders (config.yaml + safetensors files) or a folder of per-layer
    transcoders `layer_{l}/` (a transcoder set); unknown layouts fail with the list of known ones. `path` may
    also be a Hugging Face repo id `owner/name` (`subfolder` picks the SAE inside it; downloaded through the hub
    cache, `revision` a branch, tag or commit) or a release name from saelab/pretrained.yaml with its `sae_id`.
    A missing path that looks local is 'no such folder'.

    The model, hook and layer come from the files (or their path) where they say them; `model_name`,
    `hook_name` and `hook_layer` replace what was found (a hook name alone also sets the layer it names). A
    release's model_name (the Hugging Face model saelab opens) replaces its files' one."""
    import torch

    device = check_device(device)
    if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"unknown dtype '{dtype}'")
    folder, release_model = sae_folder(path, subfolder, revision, sae_id)
    sae = _read(folder, device, sae_id)  # a release's sae_id names its folder, which is no e2e_sae run
    if dtype is not None:
        sae.cfg.dtype = dtype
        sae.to(getattr(torch, dtype))
    # Inference mode: a BatchTopK-family SAE in training mode would select latents per batch, not by threshold.
    return locate(sae, model_name or release_model, hook_name, hook_layer).eval()


def sae_folder(
    path: str | Path, subfolder: str | None = None, revision: str | None = None, sae_id: str | None = None
) -> tuple[Path, str | None]:
    """The local folder (or file) an SAE source names, downloading a hub folder into the hub cache when needed,
    and the model_name of a named release (None otherwise)."""
    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        return _existing(local / subfolder if subfolder else local), None
    if looks_local(text):
        raise FileFormatError(f"no such folder: {text}")
    releases = pretrained_releases()
    if "/" not in text:
        if text in releases or sae_id is not None:
            repo_id, folder, model_name = resolve_release(text, sae_id)
            return _download(repo_id, folder, revision), model_name
        hint = closest(text, releases)
        raise FileFormatError(f"no such folder: {text}" + (f" (did you mean the release '{hint}'?)" if hint else ""))
    return _download(text, subfolder, revision), None


def looks_local(text: str) -> bool:
    """Whether a path that does not exist was meant as a local one rather than a hub repo id `owner/name`:
    it starts with . / ~, has more than one separator or a backslash, or its first part exists here."""
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or os.sep != "/" and os.sep in text:
        return True
    return Path(text.split("/")[0]).exists()


def _existing(folder: Path) -> Path:
    if not folder.exists():
        raise FileFormatError(f"no such folder: {folder}")
    return folder


def _download(repo_id: str, subfolder: str | None, revision: str | None) -> Path:
    return download_sae_folder(repo_id, subfolder, revision)


def _read(path: Path, device: str, position: str | None) -> SAE:
    """The SAE in a local folder (or a Gemma Scope params.npz file), by the files it holds."""
    if path.is_file() and path.name.endswith(".npz"):
        return load_gemma_scope(path, device)
    if path.is_dir() and not (path / saelens_format.WEIGHTS_FILE).exists():
        if is_sparsify_folder(path):
            return load_sparsify(path, device)
        if (path / PARAMS_FILE).exists():
            return load_gemma_scope(path, device)
        if is_e2e_sae_folder(path):
            return load_e2e_sae(path, position, device)
        if is_dictionary_learning_folder(path):
            return load_dictionary_learning(path, device)
        if is_circuit_tracer_folder(path):
            return load_circuit_tracer(path, device)
        if saelens_format.is_saelens_layers_folder(path):
            return saelens_format.load_saelens_layers(path, device)
        if not (path / saelens_format.CFG_FILE).exists():
            raise FileFormatError(
                f"{path}: no SAE found; expected {saelens_format.CFG_FILE} + {saelens_format.WEIGHTS_FILE} (saelab, "
                f"SAELens), {saelens_format.CFG_FILE} + {SPARSIFY_WEIGHTS} (sparsify), ae.pt + config.json "
                f"(dictionary_learning), {PARAMS_FILE} (Gemma Scope), samples_N.pt (e2e_sae), config.yaml + "
                "layer_{i}/W_enc_{i}.safetensors (circuit-tracer) or layer_{l}/ folders of per-layer transcoders"
            )
    return saelens_format.load_sae(path, device=device)
