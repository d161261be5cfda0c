"""Feature absorption (Chanin et al. 2024, "A is for Absorption"), measured as SAEBench's `absorption_first_letter`.

A ground-truth linear probe finds the direction of a concept (a word's first letter) in the activations; k-sparse
probing finds the SAE's main latents for it. On the words the probe recognises, a latent *absorbs* the concept
when it carries the probe's direction while the main latents stay silent, e.g. a latent for " short" whose decoder
row holds the "starts with S" direction, firing instead of the S latent. Per word:

- P = x . p (x the activation, p the unit probe direction), proj_i = f_i (d_i . p) for each latent;
- M = sum of proj_i over the main latents; A = sum of the three largest positive proj_i among the other latents
  with cos(d_i, p) >= 0.1;
- absorption fraction: 0 when M >= P or A < 0.4 P; 1 when M <= 0; else a / (a + M) with a = min(A, P - M);
- full absorption: every main latent silent, and the latent of largest proj_i has cos(d_i, p) >= 0.025 and
  proj_i >= 0.4 P.

Averaged per letter, then over the letters whose probe reaches F1 > 0.6. `word_absorption` is that computation on
any activations, probe direction and SAE; `absorption_on_task` the whole measure on any labelled activations;
`run_absorption` the first-letter task on the SAE's model. docs/eval-absorption.md describes every number.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor
from tqdm.auto import tqdm

from saelab.core.config import PYDANTIC, ConfigError
from saelab.core.errors import FileFormatError
from saelab.core.files import atomic_write_bytes, read_safetensors
from saelab.evals.first_letter import LETTERS, first_letter_data, letter_labels
from saelab.evals.probes import LinearProbe, binary_metrics, fit_logistic, one_vs_rest_targets, train_probe
from saelab.evals.results import make_result
from saelab.saes.base import SAE

EVAL_TYPE_ID = "absorption_first_letter"
ABSORPTION_FRACTION_PROBE_COS = 0.1
"""A latent may absorb (absorption fraction) only if its decoder row has at least this cosine with the probe."""
FULL_ABSORPTION_PROBE_COS = 0.025
"""The single absorbing latent of full absorption must have at least this cosine with the probe."""
PROBE_PROJECTION_PROPORTION = 0.4
"""Absorbing latents must make up at least this share of the activation's probe projection."""
MAX_ABSORBING_LATENTS = 3
"""At most this many latents share the absorbed part (absorption fraction)."""
SILENT = 1e-8
"""A main latent below this (in activation units) does not fire."""


@dataclass
class AbsorptionConfig:
    """Settings of the first-letter absorption eval. SAEBench's names where the setting is the same."""

    __pydantic_config__ = PYDANTIC

    n_words: int | None = 4_000
    """Words sampled (seeded) from the model's single-token alphabetic vocabulary; None: all of them (SAEBench;
    47,078 for SmolLM2, ~12x the cost)."""
    test_fraction: float = 0.2
    """Share of the words held out to score the probes and measure absorption on."""
    prompt_template: str = "{word} has the first letter:"
    """Question of each prompt line; the answer ' X' (the upper-case first letter) follows it in the examples."""
    n_icl_examples: int = 10
    """Solved examples before the question in each prompt."""
    llm_batch_size: int = 16
    """Prompts per model forward pass."""
    prepend_bos: bool | None = None
    """Start prompts with the BOS token; None: as the SAE's training data did."""
    probe_epochs: int = 50
    """Epochs of the ground-truth probe (Adam, batch 64, lr 1e-2 decaying to 1e-5, weight decay 1e-4)."""
    f1_jump_threshold: float = 0.03
    """k-sparse probing adds a letter's next latent only while the probe's test F1 rises by more than this."""
    max_k_value: int = 10
    """Most main latents per letter."""
    k_sparse_probe_l1_decay: float = 0.01
    """L1 weight of the probe on all latents that ranks them for k-sparse probing."""
    k_sparse_probe_batch_size: int = 512
    """Batch size of that probe (SAEBench: 4096, on ~37,600 training words; 512 on 3,200 gives the probe about as
    many steps)."""
    k_sparse_probe_num_epochs: int = 50
    """Epochs of that probe."""
    min_GT_probe_f1: float = 0.6
    """A letter is measured only if its ground-truth probe reaches a test F1 above this."""
    min_feats_for_eval: int = 20
    """Fewer measured letters than this flags the result (`enough_letters` false); it is written anyway."""
    random_seed: int = 42
    """Seed of the word sample, the split, the prompts' examples and the probes."""
    cache: bool = True
    """Keep the prompts' activations (which do not depend on the SAE) in saelab's cache folder, so that the
    next SAE of the same model and hook point skips the model passes."""

    def __post_init__(self) -> None:
        positive = ("n_icl_examples", "llm_batch_size", "probe_epochs", "max_k_value", "k_sparse_probe_batch_size")
        for name in (*positive, "k_sparse_probe_num_epochs", *(("n_words",) if self.n_words is not None else ())):
            if getattr(self, name) < 1:
                raise ConfigError(f"absorption {name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"absorption test_fraction must be between 0 and 1, got {self.test_fraction}")
        if self.f1_jump_threshold < 0 or self.k_sparse_probe_l1_decay < 0:
            raise ConfigError("absorption f1_jump_threshold and k_sparse_probe_l1_decay must be >= 0")


@dataclass
class AbsorptionTask:
    """Labelled activations: what absorption is measured on, with or without a language model."""

    classes: list[str]
    """Name of each class (the letters)."""
    train_acts: Tensor
    train_labels: Tensor
    """Class index of each row; -1: none of the classes."""
    test_acts: Tensor
    test_labels: Tensor
    absorb_acts: Tensor | None = None
    """The test items again in other contexts, where absorption is measured (None: test_acts)."""
    test_items: list[str] | None = None
    """Names of the test rows (the words), for the examples in the result."""
    probe: LinearProbe | None = None
    """The ground-truth probe, a head per class; None: trained by `ground_truth_probe`."""


def ground_truth_probe(task: AbsorptionTask, config: AbsorptionConfig) -> LinearProbe:
    """SAEBench's ground-truth probe: a logistic-regression head per class on the train activations (Adam, batch
    64, lr 1e-2 decaying to 1e-5, weight decay 1e-4, positives up-weighted)."""
    targets = one_vs_rest_targets(task.train_labels, len(task.classes))
    return train_probe(task.train_acts, targets, epochs=config.probe_epochs, seed=config.random_seed)


def _unit_rows(sae: SAE) -> tuple[Tensor, Tensor]:
    """The decoder rows and their norms (float32); absorption reads the SAE as if its rows were folded to unit norm,
    latents scaled by the norms: f_i * |d_i| and d_i / |d_i|. That leaves the reconstruction as it is."""
    decoder = sae.W_dec.detach().float().cpu()
    return decoder, decoder.norm(dim=1)


def encode(sae: SAE, acts: Tensor, batch_size: int = 1024) -> Tensor:
    """Latents of `acts` (float32, on the CPU), in batches."""
    parts = []
    with torch.no_grad():
        for rows in acts.split(batch_size):
            parts.append(sae.encode(rows.to(sae.device, sae.dtype)).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, sae.cfg.d_sae)


def encode_folded(sae: SAE, acts: Tensor) -> Tensor:
    """Latents of `acts` scaled by their decoder rows' norms: the latents of the SAE folded to unit rows."""
    return encode(sae, acts) * _unit_rows(sae)[1]


def word_absorption(acts: Tensor, probe_direction: Tensor, sae: SAE, main_latents: Sequence[int]) -> dict[str, Tensor]:
    """Absorption of each row of `acts` (n, d_in) for the concept of `probe_direction` (its norm and the probe's
    bias do not matter), given the concept's main latents. Returns per-row tensors: `absorption_fraction`,
    `is_full_absorption`, `probe_projection` (P), `main_projection` (M), `top_latent`, `top_projection` and
    `top_latent_cos` (the latent of largest projection). Decoder norms need not be 1 (see `_unit_rows`)."""
    if sae.cfg.transcoder:
        raise ConfigError("absorption compares an SAE's decoder with a probe on its input: not for transcoders")
    decoder, norms = _unit_rows(sae)
    direction = probe_direction.detach().float().cpu().reshape(-1)
    direction = direction / direction.norm()
    along = decoder @ direction  # |d_i| cos_i: the projection of one unit of latent i on the probe
    cos = along / norms.clamp_min(1e-12)
    latents = encode(sae, acts)
    proj = latents * along
    p = acts.detach().float().cpu() @ direction
    main = torch.zeros(len(cos), dtype=torch.bool)
    main[list(main_latents)] = True
    m = proj[:, main].sum(1)
    candidates = ~main & (cos >= ABSORPTION_FRACTION_PROBE_COS) & (proj > 0)
    a = proj.where(candidates, 0.0).topk(min(MAX_ABSORBING_LATENTS, len(cos)), dim=1).values.sum(1)
    safe_p = p.where(p > 0, 1.0)
    partial = torch.minimum(a, p - m)
    fraction = (partial / (partial + m).where(partial + m > 0, 1.0)).clamp(0, 1)
    fraction = torch.where(m <= 0, 1.0, fraction)
    no_absorption = (p <= 0) | (m >= p) | (a / safe_p < PROBE_PROJECTION_PROPORTION)
    fraction = torch.where(no_absorption, 0.0, fraction)
    top_projection, top_latent = proj.max(dim=1)
    main_silent = (latents[:, main].abs() * norms[main] < SILENT).all(1)
    full = (
        main_silent
        & (cos[top_latent] >= FULL_ABSORPTION_PROBE_COS)
        & (p > 0)
        & (top_projection / safe_p >= PROBE_PROJECTION_PROPORTION)
    )
    return {
        "absorption_fraction": fraction,
        "is_full_absorption": full,
        "probe_projection": p,
        "main_projection": m,
        "top_latent": top_latent,
        "top_projection": top_projection,
        "top_latent_cos": cos[top_latent],
    }


def split_feature_count(f1_by_k: Sequence[float], threshold: float) -> int:
    """SAEBench's F1-jump rule: how many of the ranked latents are main latents. The first always is; each next one
    only while the k-sparse probe's F1 exceeds the best so far by more than `threshold`."""
    best, count = -math.inf, 0
    for f1 in f1_by_k:
        if not f1 > best + threshold:
            break
        best, count = f1, count + 1
    return count


def main_latents(
    ranking: Tensor, train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, config: AbsorptionConfig
) -> tuple[list[int], list[float]]:
    """A class's main latents by k-sparse probing: logistic regressions on its top-1, top-2, ... latents of
    `ranking` (scikit-learn's defaults, balanced classes), scored by test F1, kept by the F1-jump rule. Returns the
    main latents and the F1 of each k tried (the probes stop once the rule does)."""
    f1s: list[float] = []
    for k in range(1, min(config.max_k_value, len(ranking)) + 1):
        columns = ranking[:k]
        probe = fit_logistic(train[:, columns], train_y, balanced=True)
        f1s.append(binary_metrics(probe.scores(test[:, columns])[:, 0], test_y)["f1"])
        if split_feature_count(f1s, config.f1_jump_threshold) < k:
            break
    return ranking[: split_feature_count(f1s, config.f1_jump_threshold)].tolist(), f1s


def absorption_on_task(
    sae: SAE, task: AbsorptionTask, config: AbsorptionConfig | None = None, progress: bool = False
) -> tuple[dict[str, dict[str, float]], list[dict], dict]:
    """The absorption measure on labelled activations: (metrics, per-class details, unstructured), as
    `run_absorption` puts them in its result."""
    config = config or AbsorptionConfig()
    n_classes = len(task.classes)
    absorb_acts = task.test_acts if task.absorb_acts is None else task.absorb_acts
    if len(absorb_acts) != len(task.test_acts):
        raise ValueError(f"{len(absorb_acts)} absorption rows for {len(task.test_acts)} test rows")
    truth = task.probe or ground_truth_probe(task, config)
    truth_scores = truth.scores(task.test_acts)
    train_latents, test_latents = encode_folded(sae, task.train_acts), encode_folded(sae, task.test_acts)
    ranker = train_probe(
        train_latents, one_vs_rest_targets(task.train_labels, n_classes), epochs=config.k_sparse_probe_num_epochs,
        batch_size=config.k_sparse_probe_batch_size, weight_decay=1e-6, l1=config.k_sparse_probe_l1_decay,
        seed=config.random_seed,
    )  # fmt: skip
    classes, details, examples = [], [], []
    for c, name in enumerate(tqdm(task.classes, desc="absorption: letters", disable=not progress)):
        train_y, test_y = task.train_labels == c, task.test_labels == c
        gt = binary_metrics(truth_scores[:, c], test_y)
        evaluated = gt["f1"] > config.min_GT_probe_f1 and bool(train_y.any()) and not bool(train_y.all())
        row = {"class": name, "evaluated": evaluated, "n_train": int(train_y.sum()), "n_test": int(test_y.sum())}
        classes.append({**row, **{f"{k}_probe": v for k, v in gt.items()}})
        if not evaluated:
            continue
        ranking = ranker.weight[c].topk(min(config.max_k_value, ranker.weight.shape[1])).indices
        main, f1s = main_latents(ranking, train_latents, train_y, test_latents, test_y, config)
        hits = (test_y & (truth_scores[:, c] > 0)).nonzero().squeeze(1)
        scores = word_absorption(absorb_acts[hits], truth.weight[c], sae, main)
        n_tp, n_full = len(hits), int(scores["is_full_absorption"].sum())
        details.append({
            "first_letter": name,
            "mean_absorption_fraction": float(scores["absorption_fraction"].sum()) / n_tp if n_tp else 0.0,
            "full_absorption_rate": n_full / n_tp if n_tp else 0.0,
            "num_full_absorption": n_full,
            "num_probe_true_positives": n_tp,
            "num_split_features": len(main),
            "split_feats": main,
            "f1_probe": gt["f1"],
            "k_sparse_f1": f1s,
        })  # fmt: skip
        for i in scores["absorption_fraction"].argsort(descending=True)[:3].tolist():
            if scores["absorption_fraction"][i] > 0:
                examples.append(_example(task, int(hits[i]), name, scores, i))
    metrics = {"mean": _means(details), "coverage": _coverage(details, classes)}
    unstructured = {
        "enough_letters": len(details) >= config.min_feats_for_eval,
        "classes": classes,
        "absorbed_examples": examples,
    }
    return metrics, details, unstructured


def _example(task: AbsorptionTask, row: int, name: str, scores: dict[str, Tensor], i: int) -> dict:
    return {
        "item": task.test_items[row] if task.test_items else row,
        "first_letter": name,
        "absorption_fraction": float(scores["absorption_fraction"][i]),
        "is_full_absorption": bool(scores["is_full_absorption"][i]),
        "top_latent": int(scores["top_latent"][i]),
        "top_latent_cos": float(scores["top_latent_cos"][i]),
    }


def _means(details: list[dict]) -> dict[str, float]:
    """SAEBench's overall numbers: mean and sample standard deviation over the measured letters (NaN where
    undefined: no letter, or one letter for a deviation)."""
    out = {}
    for metric, key in (
        ("absorption_fraction_score", "mean_absorption_fraction"),
        ("full_absorption_score", "full_absorption_rate"),
        ("num_split_features", "num_split_features"),
    ):
        values = [float(d[key]) for d in details]
        out[f"mean_{metric}"] = statistics.mean(values) if values else math.nan
        out[f"std_dev_{metric}"] = statistics.stdev(values) if len(values) > 1 else math.nan
    return out


def _coverage(details: list[dict], classes: list[dict]) -> dict[str, float]:
    return {
        "n_letters_evaluated": len(details),
        "num_probe_true_positives": sum(d["num_probe_true_positives"] for d in details),
        "mean_f1_probe": statistics.mean(c["f1_probe"] for c in classes) if classes else math.nan,
    }


def run_absorption(sae: SAE, model=None, config: AbsorptionConfig | None = None, progress: bool = True) -> dict:
    """The first-letter absorption eval of `sae` on its model (`model`, or the one its config names): SAEBench's
    `absorption_first_letter` result (metrics `mean/mean_absorption_fraction_score`, `mean/mean_full_absorption_score`,
    `mean/mean_num_split_features` and their standard deviations; per-letter details), and the time taken."""
    from saelab.models.loading import cache_dir
    from saelab.splice import hooks_of, model_for

    start = time.perf_counter()
    config = config or AbsorptionConfig()
    if sae.cfg.transcoder:
        raise ConfigError("absorption compares an SAE's decoder with a probe on its input: not for transcoders")
    model = model_for(sae, model)
    data = first_letter_data(
        model, hooks_of(sae)[0], n_words=config.n_words, test_fraction=config.test_fraction,
        template=config.prompt_template, n_examples=config.n_icl_examples,
        prepend_bos=sae.cfg.prepend_bos if config.prepend_bos is None else config.prepend_bos,
        seed=config.random_seed, batch_size=config.llm_batch_size,
        cache=cache_dir() / "absorption" if config.cache else None, progress=progress,
    )  # fmt: skip
    task = AbsorptionTask(
        classes=list(LETTERS), train_acts=data.train_acts, train_labels=letter_labels(data.train_words),
        test_acts=data.test_acts, test_labels=letter_labels(data.test_words), absorb_acts=data.absorb_acts,
        test_items=data.test_words,
    )  # fmt: skip
    task.probe = _cached_probe(data.folder, task, config)
    metrics, details, unstructured = absorption_on_task(sae, task, config, progress)
    unstructured.update(
        n_vocab_words=data.n_vocab_words, n_train_words=len(data.train_words), n_test_words=len(data.test_words),
        n_dropped_words=data.n_dropped,
    )  # fmt: skip
    return make_result(EVAL_TYPE_ID, sae, config, metrics, details, unstructured, time.perf_counter() - start)


def _cached_probe(folder: Path | None, task: AbsorptionTask, config: AbsorptionConfig) -> LinearProbe:
    """The ground-truth probe, kept beside the cached activations it was trained on (it depends on nothing else
    than them, the seed and the epochs)."""
    if folder is None:
        return ground_truth_probe(task, config)
    file = folder / f"probe-epochs{config.probe_epochs}.safetensors"
    if file.is_file():
        try:
            tensors = read_safetensors(file)
            return LinearProbe(tensors["weight"], tensors["bias"])
        except (FileFormatError, KeyError):
            pass  # unreadable: trained again and replaced
    probe = ground_truth_probe(task, config)
    atomic_write_bytes(file, save({"weight": probe.weight.contiguous(), "bias": probe.bias.contiguous()}))
    return probe


def plot_absorption(results: Mapping[str, dict], folder: str | Path) -> list[Path]:
    """`absorption.png` in `folder`: each letter's mean absorption fraction, one bar per SAE (name -> result of
    `run_absorption`; a letter whose probe failed the F1 gate has no bar), and beside it each SAE's overall
    absorption fraction and full-absorption scores (error bars: standard deviation over letters)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(results)
    if not names:
        raise ValueError("plot_absorption needs at least one result")
    width = 0.8 / len(names)
    fig, (letters, overall) = plt.subplots(
        1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [5, 1 + 0.3 * len(names)]}
    )
    for j, name in enumerate(names):
        per_letter = {d["first_letter"]: d["mean_absorption_fraction"] for d in results[name]["eval_result_details"]}
        xs = [i for i, letter in enumerate(LETTERS) if letter in per_letter]
        values = [per_letter[LETTERS[i]] for i in xs]
        letters.bar([x + (j - (len(names) - 1) / 2) * width for x in xs], values, width, label=name)
        mean = results[name]["eval_result_metrics"]["mean"]
        for k, metric in enumerate(("absorption_fraction_score", "full_absorption_score")):
            value, spread = mean[f"mean_{metric}"], mean[f"std_dev_{metric}"]
            overall.bar(
                k + (j - (len(names) - 1) / 2) * width, _finite_or_zero(value), width,
                yerr=_finite_or_zero(spread), color=f"C{j}", capsize=2,
            )  # fmt: skip
    letters.set_xticks(range(len(LETTERS)), list(LETTERS))
    letters.set_ylabel("mean absorption fraction")
    letters.set_title("Absorption per first letter (probe true positives)")
    letters.legend(fontsize="small")
    overall.set_xticks([0, 1], ["fraction", "full"])
    overall.set_title("Mean over letters")
    for ax in (letters, overall):
        ax.set_ylim(0, max(1e-3, ax.get_ylim()[1]))
    path = Path(folder) / "absorption.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return [path]


def _finite_or_zero(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0
