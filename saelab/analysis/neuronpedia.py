"""Export of `FeatureStats` in Neuronpedia's upload format (the batch files SAEDashboard's neuronpedia runner
writes), so that a user can publish the features there.

    out/batch-0.json ... one file per `features_per_batch` latents:
        {"model_id", "layer", "sae_set", "features": [{"feature_index", "pos_str", "pos_values", "neg_str",
         "neg_values", "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
         "logits_hist_data_bar_values", "logits_hist_data_bar_heights", "n_prompts_total", "n_tokens_in_prompt",
         "dataset", "activations": [{"bin_min", "bin_max", "bin_contains", "tokens", "values"}], ...}]}
    out/run_settings.json   what produced them
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saelab.analysis.dashboard import TokenText
from saelab.analysis.statistics import FeatureStats
from saelab.io.atomic import atomic_directory

EMPTY_FIELDS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                "decoder_weights_dist")


def _rounded(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def neuronpedia_feature(stats: FeatureStats, latent: int, text: TokenText) -> dict[str, Any]:
    """One latent as a Neuronpedia feature record."""
    heights = stats.histogram[latent].tolist()
    width = float(stats.bin_widths[latent])
    feature: dict[str, Any] = {"feature_index": latent, **{name: [] for name in EMPTY_FIELDS}}
    feature.update({
        "frac_nonzero": float(stats.density[latent]),
        "freq_hist_data_bar_values": _rounded((i + 0.5) * width for i in range(len(heights))),
        "freq_hist_data_bar_heights": heights,
        "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
        "logits_hist_data_bar_values": [], "logits_hist_data_bar_heights": [],
        "n_prompts_total": int(stats.info.get("n_contexts", 0)),
        "n_tokens_in_prompt": int(stats.info.get("context_size", 0)),
        "dataset": str(stats.info.get("dataset", "")),
    })
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
    activations = []
    top = float(stats.top_values[latent, 0])
    for place in range(stats.top_values.shape[1]):
        if stats.top_values[latent, place] <= 0:
            break
        ids = stats.top_tokens[latent, place]
        valid = ids >= 0
        activations.append({"bin_min": -1, "bin_max": round(top, 3), "bin_contains": -1,
                            "tokens": [text(int(i)) for i in ids[valid]],
                            "values": _rounded(stats.top_acts[latent, place][valid])})
    feature["activations"] = activations
    return feature


def export_neuronpedia(stats: FeatureStats, tokenizer, out_dir: str | Path, model_id: str, sae_set: str,
                       layer: int | None = None, features_per_batch: int = 128) -> Path:
    """Write Neuronpedia batch files for every latent into `out_dir` (which must not exist or be empty)."""
    text = TokenText(tokenizer)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        for batch, start in enumerate(range(0, stats.d_sae, features_per_batch)):
            features = [neuronpedia_feature(stats, latent, text)
                        for latent in range(start, min(start + features_per_batch, stats.d_sae))]
            payload = {"model_id": model_id, "layer": 0 if layer is None else layer, "sae_set": sae_set,
                       "features": features}
            (staging / f"batch-{batch}.json").write_text(json.dumps(payload, ensure_ascii=False))
        settings = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "n_features": stats.d_sae,
                    "features_per_batch": features_per_batch, "n_tokens": stats.n_tokens, **stats.info}
        (staging / "run_settings.json").write_text(json.dumps(settings, indent=2))
    return out_dir
