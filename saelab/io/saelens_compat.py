"""cfg.json keys written by SAELens (3.x to 6.x) mapped onto saelab's SAE config.

saelab's own files use saelab's keys and load strictly (a typo is an error). A cfg.json written by SAELens
carries dataset and tooling fields saelab does not model: those move into `metadata`, old names are renamed,
and TopK's k comes out of `activation_fn_kwargs` where older versions kept it. SAELens 6 TopK SAEs with
`rescale_acts_by_decoder_norm` select and scale latents by decoder row norms: `fold_decoder_norms` turns that
into plain weights with the same latents and outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from saelab.config import ConfigError

if TYPE_CHECKING:
    from saelab.saes.base import SAE

RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer", "hook_point_head_index": "hook_head_index",
           "activation_fn": "activation_fn_str"}
SAELENS_ONLY = {
    "hook_head_index", "activation_fn_str", "activation_fn_kwargs", "finetuning_scaling_factor", "context_size",
    "prepend_bos", "dataset_path", "dataset_trust_remote_code", "sae_lens_training_version", "sae_lens_version",
    "neuronpedia_id", "model_from_pretrained_kwargs", "seqpos_slice", "model_class_name", "reshape_activations",
    "exclude_special_tokens", "rescale_acts_by_decoder_norm",
}
TRANSCODERS = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
               "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
"""SAELens's transcoder architecture names: (saelab architecture, skip connection)."""
NORMALIZATION = {None: "none", False: "none", "none": "none", True: "expected_average_only_in",
                 "expected_average_only_in": "expected_average_only_in", "layer_norm": "layer_norm"}


def from_saelens(options: dict[str, Any]) -> dict[str, Any]:
    """saelab SAE options from a SAELens cfg.json (unchanged when it is one of saelab's own)."""
    options = {RENAMES.get(key, key): value for key, value in options.items()}
    nested = options.get("metadata") if isinstance(options.get("metadata"), dict) else {}
    if options.get("architecture") in TRANSCODERS:
        options["architecture"], options["skip_connection"] = TRANSCODERS[options["architecture"]]
        options["transcoder"] = True
        if options.get("hook_name_out") is None and nested.get("hook_name_out") is not None:
            options["hook_name_out"] = nested["hook_name_out"]
    if not (SAELENS_ONLY & (set(options) | set(nested))):
        return options
    if options.pop("finetuning_scaling_factor", False):
        raise ConfigError("SAELens finetuning_scaling_factor is not supported")
    kwargs = options.get("activation_fn_kwargs") or {}
    if options.get("activation_fn_str") == "topk" or options.get("architecture") == "topk":
        options["architecture"] = "topk"
        options.setdefault("k", kwargs.get("k", nested.get("k")))
    for key in ("model_name", "hook_name", "hook_layer"):  # SAELens 6 keeps these in metadata
        if options.get(key) is None and key in nested:
            options[key] = nested[key]
    if "normalize_activations" in options:
        value = options["normalize_activations"]
        if value not in NORMALIZATION:
            raise ConfigError(f"SAELens normalize_activations '{value}' is not supported")
        options["normalize_activations"] = NORMALIZATION[value]
    if options.get("reshape_activations") not in (None, "none", "hook_z"):  # saelab's hook_z is already flat
        raise ConfigError(f"SAELens reshape_activations '{options['reshape_activations']}' is not supported")
    metadata = {**nested, **{key: options.pop(key) for key in SAELENS_ONLY if key in options}}
    options["metadata"] = {**metadata, "source_format": "saelens"}
    return options


def saelens_architecture(architecture: str, transcoder: bool, skip_connection: bool) -> str:
    """The architecture name SAELens gives an SAE: its transcoder names for standard and JumpReLU transcoders."""
    for name, value in TRANSCODERS.items():
        if transcoder and value == (architecture, skip_connection):
            return name
    return architecture


@torch.no_grad()
def fold_decoder_norms(sae: "SAE") -> None:
    """For a SAELens TopK SAE saved with rescale_acts_by_decoder_norm: SAELens multiplies pre-activations by
    each decoder row's norm and divides latents by it before decoding. Scaling encoder columns up and decoder
    rows down by those norms gives the same latents and outputs with ordinary weights."""
    if not sae.cfg.metadata.get("rescale_acts_by_decoder_norm"):
        return
    norms = sae.W_dec.norm(dim=1)
    sae.W_enc *= norms
    sae.b_enc *= norms
    sae.W_dec /= norms.unsqueeze(1)
    sae.cfg.metadata["rescale_acts_by_decoder_norm"] = False  # folded: the weights are plain now
