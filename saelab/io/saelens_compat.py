"""cfg.json keys written by SAELens (3.x to 6.x) mapped onto saelab's SAE config.

saelab's own files use saelab's keys and load strictly (a typo is an error). A cfg.json written by SAELens
carries dataset and tooling fields saelab does not model: those move into `metadata`, old names are renamed,
and TopK's k comes out of `activation_fn_kwargs` where older versions kept it.
"""

from __future__ import annotations

from typing import Any

from saelab.config import ConfigError

RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer", "hook_point_head_index": "hook_head_index",
           "activation_fn": "activation_fn_str"}
SAELENS_ONLY = {
    "hook_head_index", "activation_fn_str", "activation_fn_kwargs", "finetuning_scaling_factor", "context_size",
    "prepend_bos", "dataset_path", "dataset_trust_remote_code", "sae_lens_training_version", "sae_lens_version",
    "neuronpedia_id", "model_from_pretrained_kwargs", "seqpos_slice", "model_class_name", "reshape_activations",
    "exclude_special_tokens",
}
NORMALIZATION = {None: "none", False: "none", "none": "none", True: "expected_average_only_in",
                 "expected_average_only_in": "expected_average_only_in", "layer_norm": "layer_norm"}


def from_saelens(options: dict[str, Any]) -> dict[str, Any]:
    """saelab SAE options from a SAELens cfg.json (unchanged when it is one of saelab's own)."""
    options = {RENAMES.get(key, key): value for key, value in options.items()}
    nested = options.get("metadata") if isinstance(options.get("metadata"), dict) else {}
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
    metadata = {**nested, **{key: options.pop(key) for key in SAELENS_ONLY if key in options}}
    options["metadata"] = {**metadata, "source_format": "saelens"}
    return options
