"""circuit-tracer's layout for transcoder sets and cross-layer transcoders (CLTs), both ways.

A folder holds `config.yaml` and safetensors files:

    config.yaml   model_kind: transcoder_set | cross_layer_transcoder; model_name; feature_input_hook and
                  feature_output_hook (TransformerLens hook suffixes: the full name is blocks.{layer}.<suffix>);
                  for TopK sets activation: topk and k. Older files have no model_kind (a set) and list their
                  files: transcoders: [{id, layer, filepath}, ...]; newer ones may list paths (index = layer).
    transcoder set: layer_{i}.safetensors for i = 0..L-1: W_enc (m, d) (a row per latent), b_enc (m),
                  W_dec (m, d), b_dec (d), JumpReLU's activation_function.threshold (m) and an optional
                  W_skip (d, d) (skip = x @ W_skip.T)
    CLT:          W_enc_{i}.safetensors: W_enc_{i} (m, d), b_enc_{i}, b_dec_{i} (the decoder bias of output
                  layer i), JumpReLU's threshold_{i}; W_dec_{i}.safetensors: W_dec_{i} (m, L-i, d), slot j
                  writing to layer i+j. No skip connection.

Latents are ReLU (no threshold), JumpReLU `pre * (pre > threshold)` (saelab reads ReLU as JumpReLU at threshold
0) or, for sets, TopK. circuit-tracer's TopK keeps the k largest pre-activations as they are, saelab's (as
sparsify's and SAELens's) applies a ReLU to them: the two agree on every token with at least k positive
pre-activations. Its readers take layer i of the file to be layer i of the model, with every layer 0..L-1 present
and one width d for inputs and outputs; `save_circuit_tracer` refuses (one line) what they would misread.

saelab names hook points as TransformerLens does (`saelab.models.hook_points`), so translation is the table
below; names outside it are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from saelab.core.errors import ConfigError, FileFormatError
from saelab.core.files import atomic_directory, read_safetensors, replacing_directory
from saelab.saes.base import SAE
from saelab.saes.clt import CrossLayerTranscoder
from saelab.saes.clt_layers import layer_template
from saelab.saes.registry import create_sae

CONFIG_FILE = "config.yaml"
SET_KIND, CLT_KIND = "transcoder_set", "cross_layer_transcoder"
INPUT_HOOKS = {
    "hook_resid_mid": "blocks.{layer}.hook_resid_mid",
    "hook_mlp_in": "blocks.{layer}.hook_mlp_in",
    "ln2.hook_normalized": "blocks.{layer}.ln2.hook_normalized",
    "mlp.hook_in": "blocks.{layer}.mlp.hook_in",
}
OUTPUT_HOOKS = {
    "hook_mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp.hook_out": "model.layers.{layer}.mlp",  # the MLP module's own output (before any post-MLP norm)
}
"""circuit-tracer's hook suffixes (TransformerLens names; `mlp.hook_in/out` are its MLP wrapper's) -> saelab's
names. circuit-tracer's models replace MLPs: inputs are read before the MLP, outputs are what it writes."""
ALSO_SAELAB = {"model.layers.{layer}.mlp:input": "mlp.hook_in", "model.layers.{layer}.mlp:output": "mlp.hook_out"}
"""Other saelab spellings of the same places."""
SET_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
SET_OPTIONAL = ("activation_function.threshold", "W_skip", "k")  # k: written by circuit-tracer's TopK saver
_NUMBERED = re.compile(r"(?:layer|W_enc)_(\d+)\.safetensors")


# ----- hook names ------------------------------------------------------------------------------------------------
def tl_suffix(hook: str | None, layer: int, output: bool) -> str:
    """circuit-tracer's name (a TransformerLens suffix) for a saelab hook name or template, or one ConfigError line
    listing the names it has."""
    table = OUTPUT_HOOKS if output else INPUT_HOOKS
    side = "output" if output else "input"
    valid = ", ".join(table.values())
    if hook is None:
        raise ConfigError(f"circuit-tracer needs the {side} hook (hook_name{'_out' if output else ''}), e.g. {valid}")
    template = layer_template(hook, layer)
    found = {saelab: suffix for suffix, saelab in table.items()}
    found.update({saelab: suffix for saelab, suffix in ALSO_SAELAB.items() if suffix in table})
    if template not in found:
        raise ConfigError(
            f"circuit-tracer has no name for the {side} hook '{hook}': its transcoders {'write' if output else 'read'} "
            f"{valid} (saelab names)"
        )
    return found[template]


def saelab_hook(suffix: Any, output: bool, file: Path) -> str:
    """saelab's hook template for circuit-tracer's name, or one FileFormatError line."""
    table = OUTPUT_HOOKS if output else INPUT_HOOKS
    if suffix not in table:
        key = "feature_output_hook" if output else "feature_input_hook"
        raise FileFormatError(f"{file}: {key} '{suffix}' is not one saelab can place; known: {', '.join(table)}")
    return table[suffix]


# ----- writing ---------------------------------------------------------------------------------------------------
def save_circuit_tracer(clt: SAE, folder: str | Path, model_name: str | None = None) -> Path:
    """Write a transcoder set (`model_kind: transcoder_set`, one `layer_{i}.safetensors` per layer) or a
    cross-layer transcoder (`cross_layer_transcoder`, `W_enc_{i}`/`W_dec_{i}` files) in circuit-tracer's layout,
    with the `config.yaml` its loaders read. `model_name` replaces the SAE's own in config.yaml.

    The folder is written whole or not at all: a new or empty folder, or one holding an earlier export (it is
    replaced). Raises ConfigError, with nothing written, for what circuit-tracer would misread: SAEs that are not
    sets or CLTs, sets that do not start at model layer 0 or skip a layer, input and output widths that differ,
    hook names it has no name for, TopK or skip connections in a CLT, and normalised inputs."""
    config, files = circuit_tracer_files(clt, model_name)
    folder = Path(folder)
    with replacing_directory(folder) if is_circuit_tracer_folder(folder) else atomic_directory(folder) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return folder


def circuit_tracer_files(clt: SAE, model_name: str | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """config.yaml's content and each safetensors file's bytes, or a ConfigError saying why there are none."""
    if not isinstance(clt, CrossLayerTranscoder):
        raise ConfigError(
            f"circuit-tracer's layout holds transcoder sets and cross-layer transcoders, not a {clt.cfg.architecture} "
            "SAE (per-layer transcoders join into a set: saelab.saes.clt_layers.transcoder_set_from_layers)"
        )
    cfg, L = clt.cfg, clt.n_layers
    kind = "cross-layer transcoder" if cfg.cross_layer else "transcoder set"
    if cfg.layers != list(range(L)):
        raise ConfigError(
            f"circuit-tracer reads layer i of its files as model layer i, for every layer from 0 on; this {kind} "
            f"covers layers {cfg.layers}"
        )
    if cfg.normalize_activations != "none":
        raise ConfigError(
            f"circuit-tracer reads raw activations: fold normalize_activations "
            f"'{cfg.normalize_activations}' into the weights first"
        )
    if clt.d_layer != clt.d_layer_out:
        raise ConfigError(
            f"circuit-tracer's transcoders read and write one width; this {kind} maps {clt.d_layer} -> "
            f"{clt.d_layer_out} per layer"
        )
    config: dict[str, Any] = {
        "model_kind": CLT_KIND if cfg.cross_layer else SET_KIND,
        "model_name": model_name or cfg.model_name,
        "feature_input_hook": tl_suffix(cfg.hook_name, cfg.layers[0], output=False),
        "feature_output_hook": tl_suffix(cfg.hook_name_out, cfg.layers[0], output=True),
    }
    if config["model_name"] is None:
        del config["model_name"]
    weights = {name: t.detach().cpu().contiguous() for name, t in clt.weights_for_saving().items()}
    m, d = clt.m, clt.d_layer_out
    files: dict[str, dict[str, Tensor]] = {}
    if cfg.cross_layer:
        if cfg.activation == "topk":
            raise ConfigError(
                "circuit-tracer's cross-layer transcoders are ReLU or JumpReLU, not TopK (TopK is "
                "for its transcoder sets only)"
            )
        if cfg.skip_connection:
            raise ConfigError("circuit-tracer's cross-layer transcoder files have no skip connection (W_skip)")
        for i in range(L):
            enc = {
                f"W_enc_{i}": weights["W_enc"][i].T,
                f"b_enc_{i}": weights["b_enc"][i * m : (i + 1) * m],
                f"b_dec_{i}": weights["b_dec"][i * d : (i + 1) * d],
            }
            if cfg.activation == "jumprelu":
                enc[f"threshold_{i}"] = weights["threshold"][i * m : (i + 1) * m]
            files[f"W_enc_{i}.safetensors"] = enc
            files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": weights[f"W_dec_{i}"]}
    else:
        if cfg.activation == "topk":  # k in config.yaml only: a `k` tensor would fail its loader's strict state dict
            config.update(activation="topk", k=cfg.k)
        for i in range(L):
            layer = {
                "W_enc": weights["W_enc"][i].T,
                "b_enc": weights["b_enc"][i * m : (i + 1) * m],
                "W_dec": weights[f"W_dec_{i}"][:, 0],
                "b_dec": weights["b_dec"][i * d : (i + 1) * d],
            }
            if cfg.activation == "jumprelu":
                layer["activation_function.threshold"] = weights["threshold"][i * m : (i + 1) * m]
            if cfg.skip_connection:
                layer["W_skip"] = weights["W_skip"][i]
            files[f"layer_{i}.safetensors"] = layer
    as_bytes = {
        name: safetensors_bytes({k: t.contiguous() for k, t in tensors.items()}) for name, tensors in files.items()
    }
    return config, as_bytes


# ----- reading ---------------------------------------------------------------------------------------------------
def is_circuit_tracer_folder(path: Path) -> bool:
    """Whether a folder holds circuit-tracer's layout: config.yaml beside layer_{i} or W_enc_{i} files, or a
    config.yaml naming its hooks (a list of files elsewhere)."""
    if not (path / CONFIG_FILE).is_file():
        return False
    if any(path.glob("layer_*.safetensors")) or any(path.glob("W_enc_*.safetensors")):
        return True
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False
    return isinstance(config, dict) and "feature_input_hook" in config


def read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_FILE
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(f"{file}: file not found") from None
    except UnicodeDecodeError:
        raise FileFormatError(f"{file}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise FileFormatError(f"{file}: invalid YAML (truncated or corrupt?): {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise FileFormatError(f"{file}: expected a YAML mapping, got {type(config).__name__}")
    for key in ("feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise FileFormatError(f"{file}: no '{key}' (circuit-tracer's config names the hooks it reads and writes)")
    return config


def load_circuit_tracer(folder: str | Path, device: str = "cpu", dtype: str | None = None) -> CrossLayerTranscoder:
    """A saelab transcoder set ('transcoder_set') or cross-layer transcoder ('clt') from a folder in
    circuit-tracer's layout (see the module docstring; also the May-2025 config that lists its files), computing
    what circuit-tracer computes, on `device`, in `dtype` (default: the files'). Missing or corrupt files, shapes
    that disagree and hooks saelab cannot place raise FileFormatError naming the file."""
    folder = Path(folder)
    config = read_config(folder)
    file = folder / CONFIG_FILE
    kind = config.get("model_kind", SET_KIND)  # the May-2025 configs have no model_kind: they hold sets
    if kind not in (SET_KIND, CLT_KIND):
        raise FileFormatError(f"{file}: model_kind '{kind}' is neither {SET_KIND} nor {CLT_KIND}")
    hooks = {
        "hook_name": saelab_hook(config["feature_input_hook"], False, file),
        "hook_name_out": saelab_hook(config["feature_output_hook"], True, file),
    }
    read = _read_clt if kind == CLT_KIND else _read_set
    weights, activation, options = read(folder, config)
    L, m = len(weights["W_enc"]), weights["W_enc"].shape[-1]
    d, d_out = weights["W_enc"].shape[1], weights["b_dec"].shape[0] // L
    dtype = dtype or str(weights["W_enc"].dtype).removeprefix("torch.")
    sae = create_sae(
        "clt" if kind == CLT_KIND else "transcoder_set",
        d_in=L * d,
        d_sae=L * m,
        d_out=L * d_out,
        layers=list(range(L)),
        activation=activation,
        dtype=dtype,
        device=device,
        model_name=config.get("model_name"),
        metadata={"source_format": "circuit-tracer", "circuit_tracer_config": config},
        **hooks,
        **options,
    )
    sae.load_saved_weights({name: t.to(device=device, dtype=sae.dtype) for name, t in weights.items()})
    return sae.eval()  # type: ignore[return-value]


def _numbered_files(folder: Path, prefix: str) -> list[Path]:
    """`{prefix}_0.safetensors` ... `{prefix}_{L-1}.safetensors`, or a FileFormatError naming the first missing."""
    numbers = sorted(
        int(match.group(1)) for p in folder.glob(f"{prefix}_*.safetensors") if (match := _NUMBERED.fullmatch(p.name))
    )
    if not numbers:
        raise FileFormatError(f"{folder}: no {prefix}_0.safetensors (circuit-tracer's layout has one file per layer)")
    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
    if missing:
        raise FileFormatError(
            f"{folder}: {prefix}_{missing[0]}.safetensors is missing (circuit-tracer needs every layer from 0 to "
            f"{numbers[-1]})"
        )
    return [folder / f"{prefix}_{i}.safetensors" for i in numbers]


def _listed_files(folder: Path, listed: Any) -> list[Path]:
    """The files a config's `transcoders:` list names, in layer order (strings: index = layer; the May-2025
    mappings: their `layer` and `filepath`)."""
    file = folder / CONFIG_FILE
    if not isinstance(listed, list) or not listed:
        raise FileFormatError(f"{file}: 'transcoders' must be a list of files, one per layer")
    paths: dict[int, str] = {}
    for index, entry in enumerate(listed):
        if isinstance(entry, dict) and "filepath" in entry:
            layer, path = entry.get("layer", index), entry["filepath"]
        elif isinstance(entry, str):
            layer, path = index, entry
        else:
            raise FileFormatError(f"{file}: transcoders[{index}] is neither a path nor a {{layer, filepath}} mapping")
        if path.startswith("hf://"):
            raise FileFormatError(
                f"{file}: layer {layer}'s file is on the Hugging Face hub ({path}); saelab reads the files of a "
                "local folder: download them beside config.yaml first"
            )
        if not path.endswith(".safetensors"):
            raise FileFormatError(
                f"{file}: layer {layer}'s file {path} is not circuit-tracer's safetensors layout (Gemma Scope's "
                "params.npz: load each with saelab.load_sae and join them with clt_layers.transcoder_set_from_layers)"
            )
        paths[int(layer)] = path
    if sorted(paths) != list(range(len(paths))):
        raise FileFormatError(f"{file}: the listed layers {sorted(paths)} are not 0..{len(paths) - 1}, one file each")
    return [folder / paths[i] for i in range(len(paths))]  # relative paths are the folder's; absolute ones stay


def _check(file: Path, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], optional: tuple[str, ...]):
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes) - set(optional))
    if missing or unexpected:
        raise FileFormatError(
            f"{file}: not circuit-tracer's layout: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise FileFormatError(f"{file}: '{name}' has shape {tuple(tensors[name].shape)}, expected {shape}")


def _activation(config: dict[str, Any], thresholds: bool, file: Path) -> tuple[str, dict[str, Any]]:
    """saelab's activation (and k) for a config's `activation` and whether the files hold thresholds."""
    activation = config.get("activation")
    if activation == "topk":
        if thresholds:
            raise FileFormatError(f"{file}: activation topk, but the files hold JumpReLU thresholds")
        if not isinstance(config.get("k"), int) or isinstance(config.get("k"), bool):
            raise FileFormatError(f"{file}: activation topk needs an integer k, got {config.get('k')!r}")
        return "topk", {"k": config["k"]}
    if activation not in (None, "relu", "jumprelu", "jump_relu"):
        raise FileFormatError(f"{file}: activation '{activation}' is not one of relu, topk (JumpReLU: thresholds)")
    if activation == "relu" and thresholds:
        raise FileFormatError(f"{file}: activation relu, but the files hold JumpReLU thresholds")
    return "jumprelu", {}  # ReLU is JumpReLU at threshold 0


def _read_set(folder: Path, config: dict[str, Any]) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    listed = config.get("transcoders")
    files = _listed_files(folder, listed) if listed is not None else _numbered_files(folder, "layer")
    layers = [read_safetensors(file) for file in files]
    first = layers[0]
    missing = [name for name in SET_TENSORS if name not in first]
    if missing or first["W_enc"].dim() != 2:
        raise FileFormatError(f"{files[0]}: not circuit-tracer's layout: missing {missing or 'a 2-D W_enc'}")
    m, d_out, d = first["b_enc"].shape[0], first["b_dec"].shape[0], first["W_enc"].shape[-1]
    skip = "W_skip" in first
    thresholds = "activation_function.threshold" in first
    if config.get("activation") == "topk" and "k" not in config and "k" in first:  # circuit-tracer's own saver
        config = {**config, "k": int(first["k"])}
    activation, options = _activation(config, thresholds, folder / CONFIG_FILE)
    if activation == "topk" and not 1 <= options["k"] <= m:
        raise FileFormatError(f"{folder / CONFIG_FILE}: k {options['k']} is not between 1 and the {m} latents")
    shapes = {"W_enc": (m, d), "b_enc": (m,), "W_dec": (m, d_out), "b_dec": (d_out,)}
    if skip:
        shapes["W_skip"] = (d_out, d)
    for file, tensors in zip(files, layers, strict=True):
        _check(file, tensors, shapes, SET_OPTIONAL)
        if ("W_skip" in tensors) != skip or ("activation_function.threshold" in tensors) != thresholds:
            raise FileFormatError(f"{file}: its skip connection or thresholds differ from {files[0].name}'s")
        if thresholds and tensors["activation_function.threshold"].shape not in ((), (1,), (m,)):
            shape = tuple(tensors["activation_function.threshold"].shape)
            raise FileFormatError(f"{file}: 'activation_function.threshold' has shape {shape}, expected ({m},)")
    weights = {
        "W_enc": torch.stack([t["W_enc"].T for t in layers]),
        "b_enc": torch.cat([t["b_enc"] for t in layers]),
        "b_dec": torch.cat([t["b_dec"] for t in layers]),
    }
    for i, tensors in enumerate(layers):
        weights[f"W_dec_{i}"] = tensors["W_dec"].unsqueeze(1)
    if skip:
        weights["W_skip"] = torch.stack([t["W_skip"] for t in layers])
    if activation == "jumprelu":
        weights["threshold"] = torch.cat(
            [t.get("activation_function.threshold", torch.zeros(())).to(t["b_enc"]).expand(m) for t in layers]
        )
    return weights, activation, {**options, "skip_connection": skip}


def _read_clt(folder: Path, config: dict[str, Any]) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    file = folder / CONFIG_FILE
    if config.get("transcoders") is not None:
        raise FileFormatError(
            f"{file}: a cross-layer transcoder listing its files (Gemma Scope 2's layout) is not "
            "read by saelab; circuit-tracer's own is W_enc_{i}/W_dec_{i}.safetensors in the folder"
        )
    enc_files = _numbered_files(folder, "W_enc")
    L = len(enc_files)
    encoders = [read_safetensors(f) for f in enc_files]
    if "W_enc_0" not in encoders[0] or encoders[0]["W_enc_0"].dim() != 2 or "b_dec_0" not in encoders[0]:
        raise FileFormatError(f"{enc_files[0]}: not circuit-tracer's layout (no W_enc_0 (latents, d) or b_dec_0)")
    (m, d), d_out = encoders[0]["W_enc_0"].shape, encoders[0]["b_dec_0"].shape[0]
    thresholds = "threshold_0" in encoders[0]
    activation, options = _activation(config, thresholds, file)
    if activation == "topk":
        raise FileFormatError(f"{file}: circuit-tracer's cross-layer transcoders are ReLU or JumpReLU, not TopK")
    weights: dict[str, Tensor] = {}
    for i, (enc_file, tensors) in enumerate(zip(enc_files, encoders, strict=True)):
        shapes = {f"W_enc_{i}": (m, d), f"b_enc_{i}": (m,), f"b_dec_{i}": (d_out,)}
        if thresholds:
            shapes[f"threshold_{i}"] = (m,)
        _check(enc_file, tensors, shapes, ())
        dec_file = folder / f"W_dec_{i}.safetensors"
        decoder = read_safetensors(dec_file)
        _check(dec_file, decoder, {f"W_dec_{i}": (m, L - i, d_out)}, ())
        weights[f"W_dec_{i}"] = decoder[f"W_dec_{i}"]
    weights["W_enc"] = torch.stack([t[f"W_enc_{i}"].T for i, t in enumerate(encoders)])
    weights["b_enc"] = torch.cat([t[f"b_enc_{i}"] for i, t in enumerate(encoders)])
    weights["b_dec"] = torch.cat([t[f"b_dec_{i}"] for i, t in enumerate(encoders)])
    if thresholds:
        weights["threshold"] = torch.cat([t[f"threshold_{i}"] for i, t in enumerate(encoders)])
    else:
        weights["threshold"] = torch.zeros_like(weights["b_enc"])
    return weights, activation, options
