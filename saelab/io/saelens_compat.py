"""saelab's SAEs and SAELens's cfg.json files, both ways.

Reading: saelab's own files use saelab's keys and load strictly (a typo is an error). A cfg.json written by
SAELens (1.x to 6.x) carries dataset, training and tooling fields saelab does not model: old names are renamed
(`hook_point` -> `hook_name`), `"torch.float32"` dtypes lose their prefix, `d_sae` comes from
`expansion_factor` where it is null, TopK's k comes out of `activation_fn_kwargs`, and every other field
(learning rate, L1 coefficient, dataset, the device it was trained on, ...) is kept in `metadata`. SAELens 6 TopK
SAEs with `rescale_acts_by_decoder_norm` select and scale latents by decoder row norms: `fold_decoder_norms` turns
that into plain weights with the same latents and outputs; old files' per-latent `scaling_factor` is folded into
the decoder the same way (`saelens_weights`).

Writing: `to_saelens(sae)` is the SAE in a form SAELens 6 loads (`sae_lens.SAE.load_from_disk`) and that
computes the same latents and outputs, or a ConfigError saying why there is none.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from saelab.core.config import ConfigError
from saelab.saes.base import SAE
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.clt import CrossLayerTranscoder
from saelab.saes.config import SAEConfig
from saelab.saes.files import TRANSCODERS
from saelab.saes.gated import GatedSAE
from saelab.saes.registry import make_config, sae_from_config

RENAMES = {
    "hook_point": "hook_name",
    "hook_point_layer": "hook_layer",
    "hook_point_head_index": "hook_head_index",
    "activation_fn": "activation_fn_str",
}
SAELENS_ONLY = {
    "hook_head_index",
    "activation_fn_str",
    "activation_fn_kwargs",
    "finetuning_scaling_factor",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "dataset_trust_remote_code",
    "sae_lens_training_version",
    "sae_lens_version",
    "neuronpedia_id",
    "model_from_pretrained_kwargs",
    "seqpos_slice",
    "model_class_name",
    "reshape_activations",
    "exclude_special_tokens",
    "rescale_acts_by_decoder_norm",
    "expansion_factor",
}
"""Keys only SAELens writes: a cfg.json holding any of them (or an old name in RENAMES) is SAELens's."""
SAELAB_ONLY = {"b_dec_init", "decoder_init_norm", "normalize_decoder"}
"""Fields every cfg.json saelab writes has and SAELens never writes: such a file is saelab's, whatever its
metadata records (a trained SAE's metadata holds SAELens's names for the data settings, context_size...)."""
INFERENCE_KEYS = {
    "architecture",
    "d_in",
    "d_sae",
    "d_out",
    "k",
    "apply_b_dec_to_input",
    "normalize_activations",
    "dtype",
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_name_out",
    "metadata",
    "transcoder",
    "skip_connection",
}
"""What saelab takes from a SAELens cfg.json; its other fields (training, dataset, device) go into metadata."""
NORMALIZATION = {
    None: "none",
    False: "none",
    "none": "none",
    True: "expected_average_only_in",
    "expected_average_only_in": "expected_average_only_in",
    "layer_norm": "layer_norm",
}
SAELENS_DTYPES = ("float32", "float64", "float16", "bfloat16")
SCALING_TENSORS = ("scaling_factor", "finetuning_scaling_factor")
"""Per-latent factors old SAELens versions multiplied latents by before decoding (all ones unless fine-tuned)."""


def _nested_metadata(options: dict[str, Any]) -> dict[str, Any]:
    """The cfg.json's `metadata` mapping (SAELens 6 keeps model and hook there), or an empty one."""
    nested = options.get("metadata")
    return nested if isinstance(nested, dict) else {}


def is_saelens_config(options: dict[str, Any]) -> bool:
    """Whether a cfg.json was written by SAELens (not by saelab, even after saelab loaded a SAELens file)."""
    nested = _nested_metadata(options)
    if nested.get("source_format") == "saelens" or SAELAB_ONLY <= set(options):  # saelab wrote it
        return False
    return bool((SAELENS_ONLY | set(RENAMES)) & (set(options) | set(nested)))


def from_saelens(options: dict[str, Any]) -> dict[str, Any]:
    """saelab SAE options from a SAELens cfg.json (unchanged when it is one of saelab's own)."""
    if options.get("architecture") in TRANSCODERS:  # the names saelab writes transcoders under too
        options = dict(options)
        options["architecture"], options["skip_connection"] = TRANSCODERS[options["architecture"]]
        options["transcoder"] = True
    if not is_saelens_config(options):
        return options
    options = {RENAMES.get(key, key): value for key, value in options.items()}
    nested = _nested_metadata(options)
    for key in ("model_name", "hook_name", "hook_layer", "hook_name_out"):  # SAELens 6 keeps these in metadata
        if options.get(key) is None and nested.get(key) is not None:
            options[key] = nested[key]
    architecture = options.get("architecture") or "standard"
    activation = options.get("activation_fn_str")
    if activation not in (None, "relu", "topk"):
        raise ConfigError(f"SAELens activation_fn '{activation}' is not supported (saelab computes relu and topk)")
    if activation == "topk" or architecture == "topk":
        architecture = "topk"
        kwargs = options.get("activation_fn_kwargs") or {}
        options.setdefault("k", kwargs.get("k", nested.get("k")))
    options["architecture"] = architecture
    d_in, expansion = options.get("d_in"), options.get("expansion_factor")
    if options.get("d_sae") is None and isinstance(d_in, int) and isinstance(expansion, int):  # SAELens <= 2
        options["d_sae"] = d_in * expansion
    if isinstance(options.get("dtype"), str):  # SAELens <= 2 wrote str(torch.float32)
        options["dtype"] = options["dtype"].removeprefix("torch.")
    if "normalize_activations" in options:
        value = options["normalize_activations"]
        if value not in NORMALIZATION:
            raise ConfigError(f"SAELens normalize_activations '{value}' is not supported")
        options["normalize_activations"] = NORMALIZATION[value]
    if options.get("reshape_activations") not in (None, "none", "hook_z"):  # saelab's hook_z is already flat
        raise ConfigError(f"SAELens reshape_activations '{options['reshape_activations']}' is not supported")
    metadata = {**nested, **{key: value for key, value in options.items() if key not in INFERENCE_KEYS}}
    options = {key: value for key, value in options.items() if key in INFERENCE_KEYS}
    options["metadata"] = {**metadata, "source_format": "saelens"}
    return options


@torch.no_grad()
def saelens_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """A SAELens weights file's tensors as saelab's: old files' per-latent scaling factor (latents are multiplied
    by it before decoding; all ones unless fine-tuned) folded into the decoder rows, which computes the same."""
    for name in SCALING_TENSORS:
        if name in weights and "W_dec" in weights:
            weights = dict(weights)
            scale = weights.pop(name)
            weights["W_dec"] = weights["W_dec"] * scale.to(weights["W_dec"]).unsqueeze(1)
    return weights


@torch.no_grad()
def fold_decoder_norms(sae: SAE) -> None:
    """For a SAELens TopK SAE saved with rescale_acts_by_decoder_norm: SAELens multiplies pre-activations by
    each decoder row's norm and divides latents by it before decoding. Scaling encoder columns up and decoder
    rows down by those norms gives the same latents and outputs with ordinary weights."""
    if not sae.cfg.metadata.get("rescale_acts_by_decoder_norm"):
        return
    norms = sae.W_dec.norm(dim=1)
    sae.W_enc.mul_(norms)
    sae.b_enc.mul_(norms)
    sae.W_dec.div_(norms.unsqueeze(1))
    sae.cfg.metadata["rescale_acts_by_decoder_norm"] = False  # folded: the weights are plain now


# ----- writing for SAELens -------------------------------------------------------------------------------------
def to_saelens(sae: SAE) -> SAE:
    """`sae` in a form SAELens 6 loads and that computes the same latents and outputs: the SAE itself where
    SAELens has its class (standard, gated, jumprelu, topk; standard and JumpReLU transcoders, with or without
    skip; TopK transcoders whose output is as wide as their input, as a TopK SAE with `hook_name_out`); BatchTopK
    and Matryoshka as the JumpReLU they are at inference; gated transcoders as the JumpReLU transcoder they
    equal. Raises ConfigError, saying why, for the SAEs SAELens has no equivalent of."""
    cfg = sae.cfg
    why = f"a {cfg.architecture} {'transcoder' if cfg.transcoder else 'SAE'} cannot be written for SAELens"
    if cfg.normalize_activations == "layer_norm":
        raise ConfigError(
            f"{why}: with normalize_activations 'layer_norm' SAELens would compute other outputs (it "
            "divides by the unbiased standard deviation + 1e-5, saelab by sqrt(variance + 1e-5))"
        )
    if isinstance(sae, CrossLayerTranscoder):
        per_layer = "" if sae.cfg.cross_layer else " (a set goes as one transcoder folder per layer: --to saelens)"
        raise ConfigError(
            f"{why}: SAELens has no class for dictionaries over several layers{per_layer}; circuit-tracer's layout "
            "holds them (saelab convert --to circuit-tracer)"
        )
    if cfg.dtype not in SAELENS_DTYPES:
        raise ConfigError(f"{why} in dtype {cfg.dtype}: SAELens reads {', '.join(SAELENS_DTYPES)}")
    if isinstance(sae, BatchTopKSAE):  # BatchTopK, Matryoshka: a JumpReLU at inference
        return _converted(sae.to_jumprelu(), cfg.architecture)
    if isinstance(sae, GatedSAE) and cfg.transcoder:
        return _converted(gated_to_jumprelu(sae), "gated")
    if cfg.architecture == "topk" and cfg.transcoder and (cfg.skip_connection or cfg.d_out != cfg.d_in):
        sparsify = "; sparsify reads it: saelab convert --to sparsify" if cfg.d_out == cfg.d_in else ""
        raise ConfigError(
            f"{why}: SAELens 6 has no TopK transcoder class, and its TopK SAE class reads and writes one width "
            f"without a skip connection (this one maps {cfg.d_in} -> {cfg.d_out}"
            f"{', with W_skip' if cfg.skip_connection else ''}){sparsify}"
        )
    return sae


def _converted(sae: SAE, architecture: str) -> SAE:
    sae.cfg.metadata["converted_from"] = architecture  # a new SAE's own metadata (kept a Metadata: attributes work)
    return sae


@torch.no_grad()
def gated_to_jumprelu(sae: GatedSAE) -> SAE:
    """The JumpReLU SAE equal to a gated one. Gated latents are [x.w + b_gate > 0] * relu(x.w e^r + b_mag); with
    h = x.(w e^r) + b_mag the gate condition is h > b_mag - e^r b_gate (e^r > 0), so the JumpReLU with encoder
    W_enc e^r, bias b_mag and that threshold (a threshold <= 0 acts as 0 after the ReLU) computes the same."""
    shared = {f.name for f in fields(SAEConfig)}
    options = {key: value for key, value in vars(sae.cfg).items() if key in shared}
    jump = sae_from_config(make_config({**options, "architecture": "jumprelu"}))
    scale = sae.r_mag.exp()
    weights = {name: t for name, t in sae.weights_for_saving().items() if name not in ("b_gate", "r_mag", "b_mag")}
    weights["W_enc"] = sae.W_enc * scale
    weights["b_enc"] = sae.b_mag.clone()
    weights["threshold"] = (sae.b_mag - scale * sae.b_gate).clamp_min(0)
    jump.load_saved_weights(weights)
    return jump.eval()
