"""`evaluate(sae, model, data)`: every metric of an SAE on held-out contexts, as `saelab eval` prints them.

Held-out contexts: a run never trains on the held-out part of its dataset and records its data settings in the
SAE's metadata, so `evaluate` reads exactly that part by default. On a built-in corpus of several sources the
SAE is evaluated on each source's held-out contexts (the result's `sources`) and on all of them together
(see `saelab.evals.heldout`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saelab.core.errors import ConfigError
from saelab.core.files import atomic_write_bytes, atomic_write_text
from saelab.data.config import DataConfig, data_config_from_metadata
from saelab.data.tokens import excluded_token_ids
from saelab.evals import metrics as M
from saelab.evals.heldout import Groups, by_source, heldout_groups, worst_source
from saelab.evals.spliced import SplicedEvaluation
from saelab.saes.base import SAE
from saelab.saes.clt import CrossLayerTranscoder
from saelab.splice import hooks_of, model_for, splice_points

EVAL_FILE = "eval.json"


def data_config_of(sae: SAE, **overrides: Any) -> DataConfig:
    """The data settings an SAE was trained with (from its metadata), with overrides."""
    return data_config_from_metadata(sae.cfg.metadata, **overrides)


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
    token id dropped (what `evaluate`, the geometry and the replacement evals read). A cross-layer transcoder's
    inputs and targets are the concatenations of its layers' activations."""
    points = splice_points(sae)
    hooks = list(dict.fromkeys(hook for point in points for hook in point))
    excluded_ids = torch.tensor(list(excluded), dtype=torch.long)
    for tokens in token_batches:
        acts = model.run_with_cache(tokens, hooks)
        keep = ~torch.isin(tokens, excluded_ids)
        x, y = (torch.cat([acts[point[side]][keep] for point in points], dim=-1) for side in (0, 1))
        yield ActivationBatch(tokens, keep, x.to(sae.device, sae.dtype), y.to(sae.device, sae.dtype))


@dataclasses.dataclass
class _Group:
    """What one group of held-out contexts gave: activations in and out, latent firing, downstream totals."""

    fire_counts: Tensor
    inputs: list[Tensor] = dataclasses.field(default_factory=list)
    targets: list[Tensor] = dataclasses.field(default_factory=list)
    l1_sum: float = 0.0
    downstream: SplicedEvaluation | None = None


def _scores(sae: SAE, groups: list[_Group]) -> dict[str, Any]:
    """Reconstruction and sparsity over the activations of `groups` together (and downstream, when measured)."""
    x, y = torch.cat([t for g in groups for t in g.inputs]), torch.cat([t for g in groups for t in g.targets])
    fire_counts = torch.stack([g.fire_counts for g in groups]).sum(0)
    prediction = sae(x)
    n = x.shape[0]
    scores: dict[str, Any] = {
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
            "l1": sum(g.l1_sum for g in groups) / n,
            **M.density_counts(fire_counts, n),
        },
    }
    downstream = [g.downstream for g in groups if g.downstream is not None]
    if downstream:
        scores["downstream"] = SplicedEvaluation.combined(downstream)
    return scores


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
    contexts: Groups | None = None,
) -> dict[str, Any]:
    """Reconstruction, sparsity, geometry and (with `spliced`) downstream metrics of `sae` on `n_contexts`
    held-out contexts: of each source, on a built-in corpus of several (`result["sources"]` then holds each
    source's metrics; the rest of the result is over all of them). `model` defaults to the SAE's model_name,
    `data` to the data it was trained on; `contexts` (batches by source, from `heldout_groups`) saves reading
    the held-out contexts again when the same ones are evaluated many times."""

    if isinstance(sae, CrossLayerTranscoder):
        raise ConfigError("a cross-layer transcoder has its own eval: saelab eval --suite replacement")
    sae = sae.eval()
    model = model_for(sae, model)
    data = data or data_config_of(sae)
    exclude = data.exclude_special_tokens if exclude_special_tokens is None else exclude_special_tokens
    excluded = excluded_token_ids(model.tokenizer, exclude)
    hook_in = hooks_of(sae)[0]
    groups: dict[str | None, _Group] = {}
    for source, batches in (contexts or heldout_groups(model, data, n_contexts, batch_contexts)).items():
        group = groups[source] = _Group(fire_counts=torch.zeros(sae.cfg.d_sae, dtype=torch.float64))
        if spliced:
            group.downstream = SplicedEvaluation(model, sae, excluded, error_term)
        for batch in activation_batches(sae, model, batches, excluded):
            group.inputs.append(batch.inputs)
            group.targets.append(batch.targets)
            latents = sae.encode(batch.inputs)
            group.fire_counts += (latents != 0).sum(0).double().cpu()
            group.l1_sum += float(latents.double().abs().sum())
            if group.downstream is not None:
                group.downstream.add(batch.tokens)
    scores = _scores(sae, list(groups.values()))
    geometry = M.decoder_geometry(sae.W_dec.detach())
    fire_counts = torch.stack([g.fire_counts for g in groups.values()]).sum(0)
    result: dict[str, Any] = {
        "sae": {
            "architecture": sae.cfg.architecture,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "hook_name": hook_in,
            "model_name": sae.cfg.model_name,
        },
        **scores,
        "geometry": {
            "decoder_norm_mean": float(geometry["decoder_norms"].mean()),
            "decoder_norm_std": float(geometry["decoder_norms"].std()),
            "max_decoder_cosine_mean": float(geometry["max_decoder_cosine"].mean()),
            "max_decoder_cosine_max": float(geometry["max_decoder_cosine"].max()),
        },
        "log10_feature_density": M.log_feature_density(fire_counts, scores["tokens"]).tolist(),
    }
    if None not in groups:
        result["sources"] = {source: _scores(sae, [group]) for source, group in groups.items()}
    return result


def source_table(result: dict[str, Any]) -> list[str]:
    """Lines of a table of the core metrics per source, and the worst source (none when the result has no
    sources)."""
    sources = by_source(result)
    if not sources:
        return []
    spliced = all("ce_loss_score" in m for m in sources.values())
    width = max(6, *map(len, sources))
    columns = [("EV", "explained_variance", ">8.3f"), ("L0", "l0", ">8.1f")]
    if spliced:
        columns += [("CE score", "ce_loss_score", ">8.3f"), ("CE incr.", "ce_loss_increase", ">+8.4f")]
        columns += [("KL", "kl_div_with_sae", ">8.4f"), ("KL score", "kl_div_score", ">8.3f")]
    lines = [f"{'source':<{width}}  {'tokens':>6}" + "".join(f"  {label:>8}" for label, _, _ in columns)]
    for name, metrics in sources.items():
        values = "".join(f"  {metrics[key]:{fmt}}" for _, key, fmt in columns)
        lines.append(f"{name:<{width}}  {result['sources'][name]['tokens']:>6}{values}")
    lines.append(f"worst source: {worst_source(sources)} (lowest {'CE-loss score' if spliced else 'EV'})")
    return lines


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
