"""The SAELens layout (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`: saelab's own format too,
written by `saelab.saes.files.save_sae`): reading it, including the keys of every SAELens version, and writing
what SAELens itself loads."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from saelab.core.config import ConfigError
from saelab.core.files import FileFormatError, read_json, read_safetensors
from saelab.io.saelens_compat import fold_decoder_norms, from_saelens, saelens_weights, to_saelens
from saelab.saes.base import SAE
from saelab.saes.files import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, save_sae
from saelab.saes.registry import make_config, sae_from_config


def save_saelens(sae: SAE, path: str | Path, sparsity: Tensor | None = None) -> Path:
    """Write an SAE directory that SAELens 6 loads (`sae_lens.SAE.load_from_disk`) and that computes the same
    latents and outputs: the SAE itself, or its SAELens equivalent (see `saelens_compat.to_saelens`, which raises
    ValueError for an SAE SAELens has no equivalent of; nothing is written then)."""
    return save_sae(to_saelens(sae), path, sparsity)


def load_sae(path: str | Path, device: str = "cpu", dtype: str | None = None) -> SAE:
    """Load an SAE directory written by `save_sae` (any architecture), exactly as it was saved, onto `device`:
    the device recorded in its cfg.json (where it was trained) is not used."""
    path = Path(path)
    if not path.is_dir():
        raise FileFormatError(f"{path}: not a directory containing {CFG_FILE} and {WEIGHTS_FILE}")

    try:
        options = from_saelens(read_json(path / CFG_FILE))
    except ConfigError as e:
        raise FileFormatError(f"{path / CFG_FILE}: {e}") from None
    options["device"] = device
    if dtype is not None:
        options["dtype"] = dtype
    try:
        cfg = make_config(options)
    except ConfigError as e:
        raise FileFormatError(f"{path / CFG_FILE}: {e}") from None
    sae = sae_from_config(cfg)
    weights = saelens_weights(read_safetensors(path / WEIGHTS_FILE))
    check_weights(sae, weights, path / WEIGHTS_FILE)
    sae.load_saved_weights({name: t.to(device=sae.device) for name, t in weights.items()})
    fold_decoder_norms(sae)
    return sae


def check_weights(sae: SAE, weights: dict[str, Tensor], file: Path) -> None:
    """Raise FileFormatError unless `weights` has exactly the SAE's tensors with the SAE's shapes."""
    expected = {name: tuple(t.shape) for name, t in sae.weights_for_saving().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise FileFormatError(
            f"{file}: tensors do not match a {sae.cfg.architecture} SAE: missing {missing}, unexpected {unexpected}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise FileFormatError(
                f"{file}: '{name}' has shape {tuple(weights[name].shape)} but cfg.json implies {shape}"
            )


def load_sparsity(path: str | Path) -> Tensor | None:
    """The saved log10 feature density of an SAE directory, or None when it has none."""
    file = Path(path) / SPARSITY_FILE
    return read_safetensors(file)["sparsity"] if file.exists() else None
