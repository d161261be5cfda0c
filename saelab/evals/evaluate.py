"""`evaluate(sae, model, data)`: every metric of an SAE on held-out contexts, as `saelab eval` prints them.

Held-out contexts: a run reserves the first `heldout_contexts` contexts of its dataset for evaluation (it
trains on the rest) and records that in the SAE's metadata, so `evaluate` reads exactly those by default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saelab.core.files import atomic_write_bytes, atomic_write_text
from saelab.data.config import DataConfig
from saelab.data.tokens import ContextBatches, excluded_token_ids
from saelab.evals import metrics as M
from saelab.evals.spliced import SplicedEvaluation
from saelab.saes.base import SAE
from saelab.splice import hooks_of, model_for

EVAL_FILE = "eval.json"


def data_config_of(sae: SAE, **overrides: Any) -> DataConfig:
    """The data settings an SAE was trained with (from its metadata), with overrides."""
    known = {k: v for k, v in sae.cfg.metadata.items() if k in DataConfig.__dataclass_fields__ and k != "cache"}
    return DataConfig(**{**known, **overrides})


def heldout_contexts(model, data: DataConfig, n_contexts: int, batch_contexts: int = 8) -> list[Tensor]:
    """The first `n_contexts` contexts of the dataset (the ones a run holds out), in batches."""
    config = dataclasses.replace(data, contexts_per_batch=min(batch_contexts, n_contexts))
    batches = ContextBatches(config, model.tokenizer, loop=False)
    return list(islice(batches, max(1, n_contexts // config.contexts_per_batch)))


class ActivationBatch(NamedTuple):
    """One batch of contexts at an SAE's hooks, special tokens left out."""

    tokens: Tensor
    """(contexts, context_size) token ids."""
    keep: Tensor
    """(contexts, context_size) bool: the positions kept (not an excluded token); rows below are these, in order."""
    inputs: Tensor
    """(kept, d_in) activations at the hook the SAE reads, on its device and in its dtype."""
    targets: Tensor
    """(kept, d_out) activations at the hook it reconstructs (the inputs again, for an SAE that is not a
    transcoder)."""


@torch.no_grad()
def activation_batches(
    sae: SAE, model, token_batches: Iterable[Tensor], excluded: Sequence[int]
) -> Iterator[ActivationBatch]:
    """Each batch of contexts run through `model` as far as `sae`'s hooks need, positions holding an `excluded`
    token id dropped (what `evaluate` and the geometry eval read)."""
    hook_in, hook_out = hooks_of(sae)
    excluded_ids = torch.tensor(list(excluded), dtype=torch.long)
    for tokens in token_batches:
        acts = model.run_with_cache(tokens, list(dict.fromkeys([hook_in, hook_out])))
        keep = ~torch.isin(tokens, excluded_ids)
        x = acts[hook_in][keep].to(sae.device, sae.dtype)
        yield ActivationBatch(tokens, keep, x, acts[hook_out][keep].to(sae.device, sae.dtype))


@torch.no_grad()
def evaluate(
    sae: SAE,
    model=None,
    data: DataConfig | None = None,
    n_contexts: int = 32,
    batch_contexts: int = 8,
    exclude_special_tokens: bool | None = None,
    error_term: bool = True,
    spliced: bool = True,
) -> dict[str, Any]:
    """Reconstruction, sparsity, geometry and (with `spliced`) downstream metrics of `sae` on `n_contexts`
    held-out contexts. `model` defaults to the SAE's model_name, `data` to the data it was trained on."""

    sae = sae.eval()
    model = model_for(sae, model)
    data = data or data_config_of(sae)
    exclude = data.exclude_special_tokens if exclude_special_tokens is None else exclude_special_tokens
    excluded = excluded_token_ids(model.tokenizer, exclude)
    hook_in = hooks_of(sae)[0]
    downstream = SplicedEvaluation(model, sae, excluded, error_term) if spliced else None
    inputs, targets, fire_counts, l1_sum = [], [], torch.zeros(sae.cfg.d_sae, dtype=torch.float64), 0.0
    token_batches = heldout_contexts(model, data, n_contexts, batch_contexts)
    for batch in activation_batches(sae, model, token_batches, excluded):
        inputs.append(batch.inputs)
        targets.append(batch.targets)
        latents = sae.encode(batch.inputs)
        fire_counts += (latents != 0).sum(0).double().cpu()
        l1_sum += float(latents.double().abs().sum())
        if downstream is not None:
            downstream.add(batch.tokens)
    x, y = torch.cat(inputs), torch.cat(targets)
    prediction = sae(x)
    n = x.shape[0]
    geometry = M.decoder_geometry(sae.W_dec.detach())
    density = M.log_feature_density(fire_counts, n)
    result: dict[str, Any] = {
        "sae": {
            "architecture": sae.cfg.architecture,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "hook_name": hook_in,
            "model_name": sae.cfg.model_name,
        },
        "tokens": n,
        "reconstruction": {
            "mse": M.mse(y, prediction),
            "explained_variance": M.explained_variance(y, prediction),
            "cosine_similarity": M.cosine_similarity(y, prediction),
            "l2_norm_ratio": M.l2_norm_ratio(y, prediction),
            "relative_reconstruction_bias": M.relative_reconstruction_bias(y, prediction),
        },
        "sparsity": {
            "l0": float(fire_counts.sum()) / n,
            "l1": l1_sum / n,
            **M.density_counts(fire_counts, n),
        },
        "geometry": {
            "decoder_norm_mean": float(geometry["decoder_norms"].mean()),
            "decoder_norm_std": float(geometry["decoder_norms"].std()),
            "max_decoder_cosine_mean": float(geometry["max_decoder_cosine"].mean()),
            "max_decoder_cosine_max": float(geometry["max_decoder_cosine"].max()),
        },
        "log10_feature_density": density.tolist(),
    }
    if downstream is not None:
        result["downstream"] = downstream.result()
    return result


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) rows for printing: every scalar of every section."""
    rows = [("tokens", str(result["tokens"]))]
    for section in ("reconstruction", "sparsity", "downstream", "geometry"):
        for name, value in result.get(section, {}).items():
            rows.append((f"{section}.{name}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    return rows


def write_report(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """eval.json and two PNG plots (feature density histogram, metric bars) in `folder`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import io

    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = [folder / EVAL_FILE]
    atomic_write_text(written[0], json.dumps(result, indent=2))

    def save(fig, name: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(folder / name, buffer.getvalue())
        written.append(folder / name)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([d for d in result["log10_feature_density"] if d > -10], bins=50)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"Feature density ({result['sparsity']['dead_latents']} never fired in {result['tokens']} tokens)")
    save(fig, "eval_density.png")

    bars = {
        k: v
        for k, v in {**result["reconstruction"], **result.get("downstream", {})}.items()
        if k
        in (
            "explained_variance",
            "cosine_similarity",
            "l2_norm_ratio",
            "relative_reconstruction_bias",
            "ce_loss_score",
            "kl_div_score",
        )
    }
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh(list(bars), list(bars.values()))
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_title("Metrics (1 is ideal for each)")
    save(fig, "eval_metrics.png")
    return written
