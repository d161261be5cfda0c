"""Export of `FeatureStats` in Neuronpedia's upload format (the batch files SAEDashboard's neuronpedia runner
writes and Neuronpedia's converter, convert-saedashboard-to-neuronpedia-export, imports), so that a user can
publish the features there.

    out/batch-0.json ... one file per `features_per_batch` latents:
        {"model_id", "layer", "sae_set", "sae_id_suffix", "features": [{"feature_index", "pos_str", "pos_values",
         "neg_str", "neg_values", "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
         "logits_hist_data_bar_values", "logits_hist_data_bar_heights", "n_prompts_total", "n_tokens_in_prompt",
         "dataset", "activations": [{"bin_min", "bin_max", "bin_contains", "tokens", "values",
         "qualifying_token_index"}], ...}]}
    out/run_settings.json   what produced them

A feature's `activations` are its top contexts (bin_min = bin_contains = -1, bin_max = the largest activation,
as SAEDashboard marks them), then, from the highest interval of its activation range down, the tokens sampled
in each interval: bin_min / bin_max bound the interval and bin_contains is the fraction of all tokens whose
activation fell in it. Each shows the window of tokens around the token that qualified it
(`qualifying_token_index`); `n_tokens_in_prompt` is that window's length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from saelab.analysis.dashboard import TokenText
from saelab.analysis.statistics import FeatureStats
from saelab.core.errors import ConfigError
from saelab.core.files import atomic_directory

EMPTY_FIELDS = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "decoder_weights_dist",
)


def _rounded(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def _activation(
    tokens: Tensor, acts: Tensor, window_left: int, text: TokenText, bin_min: float, bin_max: float, bin_contains: float
) -> dict[str, Any]:
    """One shown context: the window's real tokens (padding beyond the context dropped), and where in them the
    token that qualified it sits."""
    valid = tokens >= 0
    return {
        "bin_min": bin_min,
        "bin_max": bin_max,
        "bin_contains": bin_contains,
        "tokens": [text(int(i)) for i in tokens[valid]],
        "values": _rounded(acts[valid]),
        "qualifying_token_index": int(valid[:window_left].sum()),
    }


def _activations(stats: FeatureStats, latent: int, text: TokenText) -> list[dict[str, Any]]:
    """Top contexts, then the samples of each activation interval from the highest down."""
    top = round(float(stats.top_values[latent, 0]), 3)
    records = [
        _activation(
            stats.top_tokens[latent, place], stats.top_acts[latent, place], stats.window_left, text, -1, top, -1
        )
        for place in range(stats.top_values.shape[1])
        if stats.top_values[latent, place] > 0
    ]
    if stats.interval_tokens is None or stats.interval_acts is None:  # saved before intervals were sampled
        return records
    width, counts = float(stats.interval_width[latent]), stats.interval_counts[latent].tolist()
    highest = float(stats.max_activations[latent])
    for interval in reversed(range(stats.interval_tokens.shape[1])):
        low, high = round(interval * width, 3), round(min((interval + 1) * width, highest), 3)
        contains = counts[interval] / max(stats.n_tokens, 1)
        for sample in range(stats.interval_tokens.shape[2]):
            tokens = stats.interval_tokens[latent, interval, sample]
            if tokens[stats.window_left] < 0:  # fewer tokens fell in this interval than there are samples
                break
            records.append(
                _activation(
                    tokens, stats.interval_acts[latent, interval, sample], stats.window_left, text, low, high, contains
                )
            )
    return records


def neuronpedia_feature(stats: FeatureStats, latent: int, text: TokenText) -> dict[str, Any]:
    """One latent as a Neuronpedia feature record."""
    heights = stats.histogram[latent].tolist()
    width = float(stats.bin_widths[latent])
    feature: dict[str, Any] = {"feature_index": latent, **{name: [] for name in EMPTY_FIELDS}}
    feature.update(
        {
            "frac_nonzero": float(stats.density[latent]),
            "freq_hist_data_bar_values": _rounded((i + 0.5) * width for i in range(len(heights))),
            "freq_hist_data_bar_heights": heights,
            "pos_str": [],
            "pos_values": [],
            "neg_str": [],
            "neg_values": [],
            "logits_hist_data_bar_values": [],
            "logits_hist_data_bar_heights": [],
            "n_prompts_total": int(stats.info.get("n_contexts", 0)),
            "n_tokens_in_prompt": int(stats.top_tokens.shape[-1]),  # the window shown, not the context read
            "dataset": str(stats.info.get("dataset", "")),
        }
    )
    if stats.logits:
        feature["pos_str"] = [text(int(i)) for i in stats.logits["top_ids"][latent]]
        feature["pos_values"] = _rounded(stats.logits["top_values"][latent])
        feature["neg_str"] = [text(int(i)) for i in stats.logits["bottom_ids"][latent]]
        feature["neg_values"] = _rounded(stats.logits["bottom_values"][latent])
        low, high = stats.logits["histogram_range"][latent].tolist()
        counts = stats.logits["histogram"][latent].tolist()
        step = (high - low) / len(counts)
        feature["logits_hist_data_bar_values"] = _rounded(low + (i + 0.5) * step for i in range(len(counts)))
        feature["logits_hist_data_bar_heights"] = counts
    feature["activations"] = _activations(stats, latent, text)
    return feature


def export_neuronpedia(
    stats: FeatureStats,
    tokenizer,
    out_dir: str | Path,
    model_id: str,
    sae_set: str,
    layer: int | None = None,
    features_per_batch: int = 128,
    sae_id_suffix: str = "",
) -> Path:
    """Write Neuronpedia batch files for every latent into `out_dir` (which must not exist or be empty).

    `layer` is the model layer of the SAE's hook (Neuronpedia files the features under it); None takes
    `stats.info["hook_layer"]`, and when neither is known this raises rather than guess."""
    if layer is None:
        layer = stats.info.get("hook_layer")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ConfigError(
            f"Neuronpedia files features under their model layer, and the layer of this SAE's hook "
            f"({stats.info.get('hook_name', 'unknown hook')}) is not known (got {layer!r}): pass layer=N "
            "(or set hook_layer in the SAE's cfg.json)"
        )
    text = TokenText(tokenizer)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        for batch, start in enumerate(range(0, stats.d_sae, features_per_batch)):
            features = [
                neuronpedia_feature(stats, latent, text)
                for latent in range(start, min(start + features_per_batch, stats.d_sae))
            ]
            payload = {
                "model_id": model_id,
                "layer": layer,
                "sae_set": sae_set,
                "sae_id_suffix": sae_id_suffix,
                "features": features,
            }
            (staging / f"batch-{batch}.json").write_text(json.dumps(payload, ensure_ascii=False))
        settings = {
            "model_id": model_id,
            "layer": layer,
            "sae_set": sae_set,
            "n_features": stats.d_sae,
            "features_per_batch": features_per_batch,
            "n_tokens": stats.n_tokens,
            **stats.info,
        }
        (staging / "run_settings.json").write_text(json.dumps(settings, indent=2))
    return out_dir
