"""Auto-interpretation: can an LLM explain a latent from examples, and then tell, from the explanation alone, where
the latent fires? (SAEBench's `autointerp`, with Delphi's non-activating examples and fuzzing.)

For a seeded sample of alive latents, one streaming pass of `feature_statistics` over held-out contexts keeps each
latent's top contexts, samples of its firings in each interval of its activation range, and a sample of windows of
the whole stream with every latent's maximum in them. Per latent:
1. **Explain.** Top and interval-sampled windows (strongest first), their activating tokens marked `<<...>>`, go to
   the explainer LLM, which answers "This feature activates on ...".
2. **Detection.** Other top and interval-sampled windows (activating) and windows where the latent never fires
   (non-activating) are shuffled and shown unmarked, with the explanation; the judge names the activating ones.
   The latent's score is the fraction judged right: `autointerp_score` is its mean over latents.
3. **Fuzzing.** The same windows with marks: the activating ones on the tokens the latent fires on, the others on
   random tokens; the judge names those marked right.
Answering "None" every time scores `chance_score` in detection (the share of non-activating windows).
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

import torch

from saelab.analysis.features import feature_statistics
from saelab.analysis.statistics import FeatureStats
from saelab.core.config import PYDANTIC
from saelab.core.errors import ConfigError
from saelab.core.files import atomic_write_bytes
from saelab.evals.autointerp_prompts import (
    explanation_messages,
    judge,
    mark,
    parse_explanation,
    random_marks,
    rows,
    scores,
    token_pieces,
)
from saelab.evals.evaluate import data_config_of
from saelab.evals.explainers import LLM, open_llm
from saelab.evals.results import make_result
from saelab.saes.base import SAE
from saelab.splice import model_for

EVAL_TYPE_ID = "autointerp"
HISTOGRAM_BINS = 32  # FeatureStatistics' default: quantile_intervals must divide it


@dataclass
class AutoInterpConfig:
    """Settings of the auto-interpretation eval. The example counts and thresholds are SAEBench's."""

    __pydantic_config__ = PYDANTIC

    n_latents: int = 10
    """Latents to interpret, sampled (seeded) among the eligible ones: fire more than dead_latent_threshold times
    and in at least n_top_ex_for_generation + n_top_ex_for_scoring contexts."""
    override_latents: list[int] | None = None
    """Interpret these latents instead of a sample (an ineligible one is skipped, and the result says why)."""
    dead_latent_threshold: int = 15
    """A latent that fires at most this many times in the text read is not interpreted."""
    n_contexts: int = 256
    """Contexts of text read (the first of the dataset: a training run holds them out)."""
    batch_contexts: int = 8
    """Contexts per forward pass of the model."""
    dataset: str | None = None
    """The text to read (see DataConfig.dataset); None: the data the SAE was trained on."""
    window_before: int = 12
    """Tokens shown before an example's central token."""
    window_after: int = 4
    """Tokens shown after it."""
    n_top_ex_for_generation: int = 10
    """Top-activating windows (one per context) shown to the explainer."""
    n_quantile_ex_for_generation: int = 5
    """Windows sampled across the latent's activation range shown to the explainer."""
    n_top_ex_for_scoring: int = 2
    """Top-activating windows the judge sees (not shown to the explainer)."""
    n_quantile_ex_for_scoring: int = 2
    """Windows sampled across the activation range that the judge sees."""
    n_non_activating_ex_for_scoring: int = 10
    """Windows where the latent never fires that the judge sees."""
    quantile_intervals: int = 8
    """Equal parts of each latent's activation range that windows are sampled from (a divisor of 32)."""
    samples_per_interval: int = 2
    """Windows kept per interval while reading."""
    random_windows: int = 256
    """Windows of the text kept while reading, from which the non-activating ones are drawn."""
    act_threshold_frac: float = 0.01
    """A window counts as activating when its peak exceeds this fraction of the latent's maximum."""
    mark_threshold_frac: float = 0.3
    """Tokens marked in an activating window: those above this fraction of the window's peak (Delphi's)."""
    fuzzing: bool = True
    """Also score by fuzzing (one more judge call per latent)."""
    max_tokens_in_explanation: int = 30
    """Longest explanation answer, in tokens."""
    judge_demos: bool = True
    """Show the judge one made-up question with its answer first (a small model then answers in that form)."""
    llm_base_url: str | None = None
    """An OpenAI-compatible chat-completions endpoint (`https://api.openai.com/v1`, `http://localhost:8000/v1`)
    that explains and judges; None: a local transformers model (llm_model)."""
    llm_model: str | None = None
    """The endpoint's model name (needed with llm_base_url), or a local model name or folder (default: the embedded
    SmolLM2-135M-Instruct)."""
    llm_api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (none is sent when it is not set)."""
    llm_dtype: str = "auto"
    """Weights of a local LLM: auto (bfloat16 where the CPU or GPU runs it fast, else float32), float32, ..."""
    llm_temperature: float = 0.0
    """Sampling temperature sent to the endpoint (local models always decode greedily)."""
    llm_timeout: float = 60.0
    """Seconds to wait for one answer of the endpoint."""
    llm_retries: int = 2
    """Retries after a rate limit, server error or timeout of the endpoint."""
    seed: int = 42
    """Seed of the latent sample, the example choice and the shuffles."""

    def __post_init__(self) -> None:
        at_least = dict.fromkeys(("n_latents", "n_contexts", "batch_contexts", "n_top_ex_for_generation"), 1)
        at_least |= dict.fromkeys(("window_before", "window_after", "n_quantile_ex_for_generation", "llm_retries"), 0)
        at_least |= dict.fromkeys(("n_top_ex_for_scoring", "n_quantile_ex_for_scoring", "samples_per_interval"), 0)
        at_least |= {"n_non_activating_ex_for_scoring": 0, "random_windows": 0, "dead_latent_threshold": 0}
        for name, low in {**at_least, "max_tokens_in_explanation": 1}.items():
            if getattr(self, name) < low:
                raise ConfigError(f"autointerp {name} must be >= {low}, got {getattr(self, name)}")
        if self.n_top_ex_for_scoring + self.n_quantile_ex_for_scoring < 1:
            raise ConfigError("autointerp needs activating windows to score: n_top_ex_for_scoring or n_quantile_...")
        if self.quantile_intervals < 1 or HISTOGRAM_BINS % self.quantile_intervals:
            raise ConfigError(f"autointerp quantile_intervals must divide 32, got {self.quantile_intervals}")
        for name in ("act_threshold_frac", "mark_threshold_frac"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"autointerp {name} must be in [0, 1), got {getattr(self, name)}")
        if self.override_latents is not None and (not self.override_latents or min(self.override_latents) < 0):
            raise ConfigError(f"autointerp override_latents must be latent indices, got {self.override_latents}")
        if self.llm_base_url is not None and not self.llm_base_url.startswith(("http://", "https://")):
            raise ConfigError(f"autointerp llm_base_url must start with http:// or https://, got {self.llm_base_url}")


@dataclass(eq=False)  # examples are told apart by identity: two windows may hold the same tokens
class Example:
    """A window of tokens (-1 beyond the context) and the latent's activations over it."""

    tokens: list[int]
    acts: list[float]
    kind: str  # "top", "quantile" or "non-activating"

    @property
    def activating(self) -> bool:
        return self.kind != "non-activating"


def eligible_latents(stats: FeatureStats, config: AutoInterpConfig) -> torch.Tensor:
    """Latents that fire often enough, in enough contexts, to be explained and scored."""
    contexts = (stats.top_values > config.act_threshold_frac * stats.max_activations[:, None]) & (stats.top_values > 0)
    needed = config.n_top_ex_for_generation + config.n_top_ex_for_scoring
    return (stats.firing_counts > config.dead_latent_threshold) & (contexts.sum(1) >= needed)


def choose_latents(stats: FeatureStats, config: AutoInterpConfig) -> tuple[list[int], dict[str, str]]:
    """(latents to interpret, {latent: why it is skipped})."""
    eligible = eligible_latents(stats, config)
    if config.override_latents is None:
        candidates = eligible.nonzero().flatten().tolist()
        return sorted(random.Random(config.seed).sample(candidates, min(config.n_latents, len(candidates)))), {}
    if max(config.override_latents) >= stats.d_sae:
        raise ConfigError(
            f"autointerp override_latents go up to {max(config.override_latents)}; d_sae is {stats.d_sae}"
        )
    chosen = list(dict.fromkeys(config.override_latents))
    skipped = {
        str(i): f"fires {int(stats.firing_counts[i])} times, in too few contexts or too rarely to explain and score"
        for i in chosen
        if not eligible[i]
    }
    return [i for i in chosen if str(i) not in skipped], skipped


def examples_of(stats: FeatureStats, latent: int, config: AutoInterpConfig, rng: random.Random) -> dict[str, list]:
    """{"explain": [...], "score": [...]}: the latent's windows for the explainer (strongest first) and, shuffled,
    for the judge."""
    threshold = config.act_threshold_frac * float(stats.max_activations[latent])
    top = [
        Example(stats.top_tokens[latent, j].tolist(), stats.top_acts[latent, j].tolist(), "top")
        for j in range(stats.top_values.shape[1])
        if stats.top_contexts[latent, j] >= 0 and stats.top_values[latent, j] > max(threshold, 0)
    ]
    assert stats.interval_tokens is not None and stats.interval_acts is not None
    seen = {tuple(e.tokens) + tuple(e.acts) for e in top}
    by_interval: list[list[Example]] = []  # highest interval first
    for i in reversed(range(stats.interval_tokens.shape[1])):
        found = []
        windows = zip(stats.interval_tokens[latent, i].tolist(), stats.interval_acts[latent, i].tolist(), strict=True)
        for tokens, acts in windows:
            key = tuple(tokens) + tuple(acts)
            if tokens[stats.window_left] >= 0 and acts[stats.window_left] > max(threshold, 0) and key not in seen:
                seen.add(key)
                found.append(Example(tokens, acts, "quantile"))
        by_interval.append(found)
    quantile: list[Example] = []  # round robin over the intervals, so that the windows span the range
    wanted = config.n_quantile_ex_for_generation + config.n_quantile_ex_for_scoring
    while len(quantile) < wanted and any(by_interval):
        for found in by_interval:
            if found and len(quantile) < wanted:
                quantile.append(found.pop(0))
    top_score = rng.sample(top, min(config.n_top_ex_for_scoring, len(top)))
    quantile_score = rng.sample(quantile, min(config.n_quantile_ex_for_scoring, len(quantile)))
    explain = [e for e in top if e not in top_score][: config.n_top_ex_for_generation]
    explain += [e for e in quantile if e not in quantile_score][: config.n_quantile_ex_for_generation]
    explain.sort(key=lambda e: -max(e.acts))
    assert stats.random_tokens is not None and stats.random_max is not None
    quiet = (stats.random_max[:, latent] <= 0).nonzero().flatten().tolist()
    quiet = [i for i in quiet if sum(t >= 0 for t in stats.random_tokens[i].tolist()) >= 2]
    chosen = rng.sample(quiet, min(config.n_non_activating_ex_for_scoring, len(quiet)))
    width = stats.random_tokens.shape[1]
    score = (
        top_score
        + quantile_score
        + [Example(stats.random_tokens[i].tolist(), [0.0] * width, "non-activating") for i in chosen]
    )
    rng.shuffle(score)
    return {"explain": explain, "score": score}


def marks_of(example: Example, config: AutoInterpConfig) -> list[bool]:
    peak = max(example.acts)
    return [a > config.mark_threshold_frac * peak and a > 0 for a in example.acts]


def interpret(latent: int, stats: FeatureStats, tokenizer, llm: LLM, config: AutoInterpConfig) -> dict[str, Any]:
    """Explain one latent and score the explanation: its full record (prompts, answers, examples, scores)."""
    rng = random.Random(config.seed * 1_000_003 + latent)
    examples = examples_of(stats, latent, config, rng)
    hidden = set(tokenizer.all_special_ids)
    pieces = {id(e): token_pieces(tokenizer, e.tokens, hidden) for e in examples["explain"] + examples["score"]}
    shown = [mark(pieces[id(e)], marks_of(e, config)) for e in examples["explain"]]
    messages = explanation_messages(shown)
    answer = llm(messages, config.max_tokens_in_explanation)
    explanation, problem = parse_explanation(answer)
    record: dict[str, Any] = {
        "latent": latent,
        "explanation": explanation,
        "explanation_prompt": messages,
        "explanation_answer": answer,
        "problems": [f"explanation: {problem}"] if problem else [],
    }
    scored = examples["score"]
    kinds = [e.kind for e in scored]
    for kind in ["detection"] + (["fuzzing"] if config.fuzzing else []):
        if kind == "detection":
            texts = [mark(pieces[id(e)], [False] * len(e.tokens)) for e in scored]
        else:  # the same windows, in a new order: activating ones marked right, the others at random
            order = rng.sample(range(len(scored)), len(scored))
            scored, kinds = [scored[j] for j in order], [kinds[j] for j in order]
            right = [marks_of(e, config) for e in scored if e.activating]
            n_marks = max(1, round(sum(map(sum, right)) / max(len(right), 1)))
            marks = [marks_of(e, config) if e.activating else random_marks(pieces[id(e)], n_marks, rng) for e in scored]
            texts = [mark(pieces[id(e)], m) for e, m in zip(scored, marks, strict=True)]
        if problem:  # no explanation to judge: every example counts as wrong
            judged = rows(texts, kinds, [None] * len(texts))
            record[kind] = {"prompt": None, "answer": None, "problem": problem, "examples": judged}
        else:
            record[kind] = judge(kind, explanation, texts, kinds, llm, rng, config.judge_demos)
            if record[kind]["problem"]:
                record["problems"].append(f"{kind}: {record[kind]['problem']}")
        record[f"{kind}_scores"] = scores(record[kind]["examples"])
    record["chance_score"] = sum(not e.activating for e in scored) / len(scored) if scored else math.nan
    record["n_activating"] = sum(e.activating for e in scored)
    record["n_non_activating"] = len(scored) - record["n_activating"]
    record["n_explained"] = len(shown)
    return record


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and unbiased standard deviation of the numbers that are not NaN (NaN when there are too few)."""
    finite = [v for v in values if not math.isnan(v)]
    return (fmean(finite) if finite else math.nan), (stdev(finite) if len(finite) > 1 else math.nan)


def run_autointerp(
    sae: SAE,
    model=None,
    config: AutoInterpConfig | None = None,
    progress: bool = True,
    llm: LLM | None = None,
) -> dict[str, Any]:
    """Explain a sample of the SAE's latents with an LLM and score the explanations by detection and fuzzing.
    `model` defaults to the SAE's model; `llm` (any `(messages, max_tokens) -> str`) defaults to the one the
    config names. Returns the result envelope: metrics `autointerp/autointerp_score` ..., one detail per latent,
    and in `eval_result_unstructured` every prompt, answer and judged example."""
    start = time.perf_counter()
    config = config or AutoInterpConfig()
    sae = sae.eval()
    model = model_for(sae, model)
    llm = llm or open_llm(config, model, sae.cfg.model_name)
    data = data_config_of(sae, **({"dataset": config.dataset} if config.dataset else {}))
    stats = feature_statistics(
        sae,
        model,
        data,
        n_contexts=config.n_contexts,
        batch_contexts=config.batch_contexts,
        top_k=config.n_top_ex_for_generation + config.n_top_ex_for_scoring,
        window=(config.window_before, config.window_after),
        token_sets={},
        n_logits=0,
        progress=progress,
        quantile_intervals=config.quantile_intervals,
        samples_per_interval=config.samples_per_interval,
        random_windows=config.random_windows,
        seed=config.seed,
    )
    latents, skipped = choose_latents(stats, config)
    records = []
    if progress:
        from tqdm.auto import tqdm

        latents = tqdm(latents, desc="autointerp latents")
    for latent in latents:
        records.append(interpret(latent, stats, model.tokenizer, llm, config))
    return autointerp_result(sae, config, stats, records, skipped, repr(llm), time.perf_counter() - start)


def autointerp_result(
    sae: SAE,
    config: AutoInterpConfig,
    stats: FeatureStats,
    records: list[dict[str, Any]],
    skipped: dict[str, str],
    llm: str,
    seconds: float,
) -> dict[str, Any]:
    """The result envelope of interpreted latents' records."""
    kinds = ["detection"] + (["fuzzing"] if config.fuzzing else [])
    score, std = _mean_std([r["detection_scores"]["accuracy"] for r in records])
    metrics: dict[str, dict[str, float]] = {
        "autointerp": {
            "autointerp_score": score,
            "autointerp_std_dev": std,
            "chance_score": _mean_std([r["chance_score"] for r in records])[0],
            "n_latents": len(records),
            "malformed_answers": sum(len(r["problems"]) for r in records),
        }
    }
    for kind in kinds:
        pooled = scores([row for r in records for row in r[kind]["examples"]])
        metrics[kind] = {
            "accuracy": _mean_std([r[f"{kind}_scores"]["accuracy"] for r in records])[0],
            "balanced_accuracy": pooled["balanced_accuracy"],
            "f1": pooled["f1"],
        }
    details = [
        {
            "latent": r["latent"],
            "explanation": r["explanation"],
            "autointerp_score": r["detection_scores"]["accuracy"],
            **{f"{k}_{name}": r[f"{k}_scores"][name] for k in kinds for name in ("accuracy", "balanced_accuracy")},
            "chance_score": r["chance_score"],
            "n_activating": r["n_activating"],
            "n_non_activating": r["n_non_activating"],
            "firing_count": int(stats.firing_counts[r["latent"]]),
            "max_activation": float(stats.max_activations[r["latent"]]),
            "problems": r["problems"],
        }
        for r in records
    ]
    unstructured = {
        "llm": llm,
        "tokens_read": stats.n_tokens,
        "eligible_latents": int(eligible_latents(stats, config).sum()),
        "skipped_latents": skipped,
        "latents": {
            str(r["latent"]): {k: r[k] for k in ("explanation_prompt", "explanation_answer", *kinds)} for r in records
        },
    }
    return make_result(EVAL_TYPE_ID, sae, config, metrics, details, unstructured, seconds)


def explanations_of(result: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """latent -> {"explanation", "detection", "fuzzing", "llm"} of an autointerp result, as the dashboard shows them
    (`write_dashboard(..., explanations=...)`, `saelab dashboard --autointerp FILE`)."""
    if result.get("eval_type_id") != EVAL_TYPE_ID:
        raise ConfigError(f"not an autointerp result (eval_type_id {result.get('eval_type_id')!r})")
    llm = (result.get("eval_result_unstructured") or {}).get("llm")
    return {
        int(d["latent"]): {
            "explanation": d["explanation"],
            "detection": d["autointerp_score"],
            "fuzzing": d.get("fuzzing_accuracy"),
            "llm": llm,
        }
        for d in result["eval_result_details"]
    }


def plot_autointerp(results: Mapping[str, dict[str, Any]], folder: str | Path) -> list[Path]:
    """autointerp_scores.png: the distribution of per-latent detection (and fuzzing) accuracy of each SAE, its mean
    (a diamond) and the chance score of answering "None" (a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(results)
    kinds = [k for k in ("detection", "fuzzing") if any(k in r["eval_result_metrics"] for r in results.values())]
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.5 + 1.4 * len(names) * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        values = [[d.get(f"{kind}_accuracy", math.nan) for d in results[n]["eval_result_details"]] for n in names]
        values = [[v for v in vs if v is not None and not math.isnan(v)] for vs in values]
        for i, vs in enumerate(values):
            jitter = random.Random(i).random
            ax.scatter([i + 0.15 * (jitter() - 0.5) for _ in vs], vs, s=14, alpha=0.6)
            if vs:
                ax.scatter([i], [sum(vs) / len(vs)], marker="D", color="black", zorder=3)
            chance = results[names[i]]["eval_result_metrics"]["autointerp"].get("chance_score")
            if kind == "detection" and chance is not None and not math.isnan(chance):
                ax.hlines(chance, i - 0.35, i + 0.35, colors="gray", linestyles="dashed")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(f"{kind} accuracy per latent")
        ax.set_title(f"Auto-interpretation: {kind}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path = Path(folder) / "autointerp_scores.png"
    atomic_write_bytes(path, buffer.getvalue())
    return [path]
