"""The SAELens layout (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`: saelab's own format too,
written by `saelab.saes.files.save_sae`): reading it, including the keys of every SAELens version, and writing
what SAELens itself loads. A transcoder set, which SAELens has no class for, is written as one SAELens transcoder
folder per layer (`layer_{l}/`, l the model layer) and read back from such folders."""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from saelab.core.config import ConfigError
from saelab.core.files import FileFormatError, atomic_directory, read_json, read_safetensors, replacing_directory
from saelab.io.saelens_compat import fold_decoder_norms, from_saelens, saelens_weights, to_saelens
from saelab.saes.base import SAE
from saelab.saes.clt import CrossLayerTranscoder, TranscoderSet
from saelab.saes.clt_layers import layer_transcoder, transcoder_set_from_layers
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


LAYER_FOLDER = re.compile(r"layer_(\d+)")


def save_saelens_layers(tset: SAE, folder: str | Path) -> Path:
    """Write a transcoder set as one folder per layer, `layer_{l}/` for each model layer l, each an SAELens
    transcoder (`jumprelu_transcoder`, `jumprelu_skip_transcoder`; a TopK layer as SAELens's TopK SAE with
    `hook_name_out`, which needs equal input and output widths and no skip connection: SAELens 6 has no TopK
    transcoder) that `sae_lens.SAE.load_from_disk` loads with the same latents and outputs. The folder is written
    whole or not at all (a new or empty one, or an earlier export, replaced); ConfigError, with nothing written,
    for what SAELens cannot hold."""
    if not isinstance(tset, TranscoderSet):
        what = (
            "a cross-layer transcoder" if isinstance(tset, CrossLayerTranscoder) else f"a {tset.cfg.architecture} SAE"
        )
        raise ConfigError(
            f"one SAELens transcoder per layer holds a transcoder set, not {what} (SAELens has no cross-layer "
            "transcoder class; circuit-tracer's layout holds those: saelab.io.save_circuit_tracer)"
        )
    cfg = tset.cfg
    if cfg.activation == "topk" and (cfg.skip_connection or tset.d_layer != tset.d_layer_out):
        this = "has a skip connection" if cfg.skip_connection else f"maps {tset.d_layer} -> {tset.d_layer_out}"
        raise ConfigError(
            "SAELens 6 has no TopK transcoder class: a TopK set's layers go to SAELens as TopK SAEs, which read and "
            f"write one width without a skip connection, and this set {this} (circuit-tracer's layout holds it)"
        )
    layers = {layer: to_saelens(layer_transcoder(tset, i)) for i, layer in enumerate(cfg.layers)}
    folder = Path(folder)
    with replacing_directory(folder) if is_saelens_layers_folder(folder) else atomic_directory(folder) as staging:
        for layer, sae in layers.items():
            save_sae(sae, staging / f"layer_{layer}")
    return folder


def is_saelens_layers_folder(path: Path) -> bool:
    """Whether a folder holds SAE folders named layer_{l} (and no SAE of its own)."""
    if not path.is_dir() or (path / CFG_FILE).exists():
        return False
    return any(LAYER_FOLDER.fullmatch(p.name) and (p / CFG_FILE).is_file() for p in path.iterdir())


def load_saelens_layers(folder: str | Path, device: str = "cpu") -> TranscoderSet:
    """The transcoder set of a folder of per-layer SAELens (or saelab) transcoders `layer_{l}/` (what
    `save_saelens_layers` writes), on `device`: layer l's transcoder becomes the set's layer l. Standard (ReLU),
    JumpReLU and TopK transcoders of one shape; their hook names must agree but for the layer."""
    folder = Path(folder)
    found = sorted(
        (int(match.group(1)), p)
        for p in (folder.iterdir() if folder.is_dir() else ())
        if (match := LAYER_FOLDER.fullmatch(p.name)) and p.is_dir()
    )
    if not found:
        raise FileFormatError(f"{folder}: no layer_{{l}} folders of per-layer transcoders")
    saes = [load_sae(path, device=device) for _, path in found]
    try:
        return transcoder_set_from_layers(saes, [layer for layer, _ in found])
    except ConfigError as e:
        raise FileFormatError(f"{folder}: {e}") from None
