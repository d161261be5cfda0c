"""Sparse probing: how well a few SAE latents, chosen per task, classify texts, against probes on the model's own
activations (SAEBench's `sparse_probing`, on the offline tasks of the sae-probes wheel or on files of yours).

For each binary task, every text is run through the model to the SAE's hook and reduced to one row: the mean over
its tokens (special tokens left out) or its last token, of the activations and, encoded token by token, of the SAE's
latents. On a balanced train set:
- `llm_test_accuracy` / `sae_test_accuracy`: a logistic regression on every dimension / every latent (AdamW,
  early-stopped on a fifth of the train set);
- `llm_top_{k}_test_accuracy` / `sae_top_{k}_test_accuracy`: the k dimensions / latents whose class means differ
  most, then an L2 logistic regression (C = 1) on those alone.
Each is the accuracy on the balanced test set, per task (`eval_result_details`) and averaged over tasks. A good SAE
has single latents that track the tasks' concepts, so its top-1 and top-2 accuracies approach the LLM's.
"""

from __future__ import annotations

import functools
import io
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from saelab.core.config import PYDANTIC
from saelab.core.errors import ConfigError
from saelab.core.files import atomic_write_bytes
from saelab.evals.evaluate import data_config_of
from saelab.evals.probes import accuracy, fit_logistic, fit_logistic_sgd, top_k_by_mean_difference
from saelab.evals.probing_tasks import (
    DEFAULT_TASKS,
    ProbingTask,
    read_sae_probes_task,
    read_task_file,
    split_task,
)
from saelab.evals.results import make_result
from saelab.evals.text_activations import pooled_activations, tokenize_texts
from saelab.saes.base import SAE

EVAL_TYPE_ID = "sparse_probing"
TOP_K_C = 1.0  # the k-sparse probes' inverse penalty: scikit-learn's default C = 1, as SAEBench uses
VALIDATION_FRACTION = 0.2  # of the train set, for the full-width probe's early stop


@dataclass
class ProbingConfig:
    """Settings of the sparse-probing eval."""

    __pydantic_config__ = PYDANTIC

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    """Tasks of the sae-probes wheel, by file name (`5_hist_fig_ismale`); [] to probe only `files`."""
    files: list[str] = field(default_factory=list)
    """Tasks of yours: .csv, .csv.zst or .jsonl files with a text column and a 2-valued label column."""
    text_column: str = "text"
    """The text column of `files`."""
    label_column: str = "label"
    """The label column of `files` (two distinct values; sorted, the first becomes 0)."""
    pooling: Literal["mean", "last"] = "mean"
    """One row per text: the mean over its tokens, special tokens left out, its first `context_length` tokens
    kept (SAEBench's sparse_probing); or its last token, its last `context_length` tokens kept (sae-probes)."""
    context_length: int = 128
    """Tokens read per text at most (a BOS counts when the SAE was trained with one)."""
    train_size: int = 1024
    """Training texts per task at most, half of each label."""
    test_size: int = 1000
    """Test texts per task at most, half of each label."""
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 20])
    """Sizes of the k-sparse probes."""
    full_width: bool = True
    """Also fit the probes on every dimension and every latent (llm_test_accuracy, sae_test_accuracy)."""
    batch_tokens: int = 2048
    """Tokens per forward pass of the model, padding included: many short texts or a few long ones per pass."""
    seed: int = 42
    """Seed of the train/test split and of the full-width probes' minibatches."""

    def __post_init__(self) -> None:
        if not self.tasks and not self.files:
            raise ConfigError("probing needs tasks: name sae-probes tasks in `tasks` or your files in `files`")
        if not self.k_values or min(self.k_values) < 1:
            raise ConfigError(f"probing k_values must be positive integers, got {self.k_values}")
        if self.context_length < 2:
            raise ConfigError(
                f"probing context_length must be at least 2 (a BOS and a token), got {self.context_length}"
            )
        if self.batch_tokens < 1:
            raise ConfigError(f"probing batch_tokens must be positive, got {self.batch_tokens}")
        if self.train_size < 4 or self.test_size < 2:
            raise ConfigError(
                f"probing needs train_size >= 4 and test_size >= 2, got {self.train_size}, {self.test_size}"
            )


def load_tasks(config: ProbingConfig) -> list[ProbingTask]:
    """The config's tasks: the wheel's, then the files'."""
    tasks = [read_sae_probes_task(name) for name in config.tasks]
    tasks += [read_task_file(path, config.text_column, config.label_column) for path in config.files]
    names = [t.name for t in tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"two probing tasks have the same name: {', '.join(names)}")
    return tasks


def probe_metrics(
    prefix: str,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    k_values: Sequence[int],
    full_width: bool = True,
    seed: int = 0,
) -> tuple[dict[str, float], Tensor]:
    """`{prefix}_test_accuracy` (NaN unless `full_width`) and `{prefix}_top_{k}_test_accuracy` of probes trained on
    pooled rows `x_train` and tested on `x_test`; also the columns ranked by class-mean difference (the best
    max(k_values))."""
    metrics = {f"{prefix}_test_accuracy": math.nan}
    if full_width:
        fit, validation = _validation_split(y_train, seed)
        probe = fit_logistic_sgd(x_train[fit], y_train[fit], x_train[validation], y_train[validation], seed=seed)
        metrics[f"{prefix}_test_accuracy"] = accuracy(probe, x_test, y_test)
    ranking = top_k_by_mean_difference(x_train, y_train, max(k_values))
    for k in sorted(set(k_values)):
        columns = ranking[:k]
        probe = fit_logistic(x_train[:, columns], y_train, C=TOP_K_C)
        metrics[f"{prefix}_top_{k}_test_accuracy"] = accuracy(probe, x_test[:, columns], y_test)
    return metrics, ranking


def _validation_split(y: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """A fifth of each label's rows (at least one) for validation, the rest to fit."""
    generator = torch.Generator().manual_seed(seed + 1)
    fit, validation = [], []
    for value in (0, 1):
        rows = torch.nonzero(y == value).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n = max(1, round(VALIDATION_FRACTION * len(rows)))
        validation.append(rows[:n])
        fit.append(rows[n:])
    return torch.cat(fit), torch.cat(validation)


def run_probing(sae: SAE, model=None, config: ProbingConfig | None = None, progress: bool = True) -> dict:
    """Sparse probing of one SAE on its model (loaded from the SAE's config when None): the result in the suite's
    envelope (`saelab.evals.results`), metrics under `llm` and `sae`, one detail record per task."""
    return run_probing_saes({"sae": sae}, model, config, progress)["sae"]


def run_probing_saes(
    saes: Mapping[str, SAE], model=None, config: ProbingConfig | None = None, progress: bool = True
) -> dict[str, dict]:
    """Sparse probing of several SAEs that read the same hook of the same model, in one pass of the model over the
    texts (the costly part): name -> result. The LLM probes are fitted once and shared; `seconds` is the whole
    run's."""
    from tqdm.auto import tqdm

    from saelab.splice import hooks_of, model_for

    config = config or ProbingConfig()
    if not saes:
        raise ConfigError("no SAE to probe")
    start = time.perf_counter()
    first = next(iter(saes.values()))
    hook = hooks_of(first)[0]
    prepend_bos = data_config_of(first).prepend_bos
    for name, sae in saes.items():
        if hooks_of(sae)[0] != hook or sae.cfg.model_name != first.cfg.model_name:
            raise ConfigError(
                f"SAE '{name}' reads {sae.cfg.model_name}:{hooks_of(sae)[0]}, not "
                f"{first.cfg.model_name}:{hook}: probe SAEs of different hooks separately"
            )
    tasks = load_tasks(config)  # before the model loads: a bad task name fails at once
    model = model_for(first, model)
    folded: dict[str, SAE] = {}
    for name, sae in saes.items():
        # SAEBench's evals assume unit-norm decoder rows: the mean-difference ranking compares latent scales
        folded[name] = sae.clone().eval()
        folded[name].fold_W_dec_norm()
    encoders: dict[str, Callable[[Tensor], Tensor]] = {"llm": lambda x: x}
    for name, sae in folded.items():
        encoders[f"sae:{name}"] = functools.partial(_encode, sae)
    tokenizer = model.tokenizer
    excluded = [t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]

    splits, token_lists = [], []
    for task in tasks:
        train, test = split_task(task.labels, config.train_size, config.test_size, config.seed)
        texts = [task.texts[i] for i in torch.cat([train, test]).tolist()]
        splits.append((train, test))
        token_lists.append(_tokens(tokenizer, texts, config.context_length, prepend_bos, config.pooling == "last"))
    n_tokens = sum(len(ids) for lists in token_lists for ids in lists)
    bar = tqdm(total=n_tokens, desc="sparse probing", unit="tok", unit_scale=True, disable=not progress)

    details: dict[str, list[dict[str, Any]]] = {name: [] for name in saes}
    for task, (train, test), lists in zip(tasks, splits, token_lists, strict=True):
        bar.set_postfix_str(task.name)
        rows = _pooled(model, lists, hook, config, encoders, excluded, bar)
        n_train = len(train)
        labels = (task.labels[train], task.labels[test])
        llm, _ = _task_metrics("llm", rows["llm"], n_train, labels, config)
        for name in saes:
            sae_metrics, ranking = _task_metrics("sae", rows[f"sae:{name}"], n_train, labels, config)
            details[name].append(
                {
                    "dataset_name": task.name,
                    "n_train": n_train,
                    "n_test": len(test),
                    "label_names": list(task.label_names),
                    **llm,
                    **sae_metrics,
                    "sae_top_latents": ranking.tolist(),
                }
            )
    bar.close()
    seconds = time.perf_counter() - start
    results = {}
    for name, sae in saes.items():
        metrics = {prefix: _means(details[name], prefix) for prefix in ("llm", "sae")}
        unstructured = {
            "hook_name": hook,
            "tokens": n_tokens,
            "prepend_bos": prepend_bos,
            "decoder_unit_norm": bool(torch.allclose(folded[name].W_dec.norm(dim=1), torch.ones(1), atol=1e-4)),
        }
        results[name] = make_result(EVAL_TYPE_ID, sae, config, metrics, details[name], unstructured, seconds)
    return results


def _encode(sae: SAE, x: Tensor) -> Tensor:
    return sae.encode(x.to(sae.dtype))


def _task_metrics(
    prefix: str, rows: Tensor, n_train: int, labels: tuple[Tensor, Tensor], config: ProbingConfig
) -> tuple[dict[str, float], Tensor]:
    """probe_metrics of one task's pooled rows: the first n_train train, the rest test."""
    y_train, y_test = labels
    return probe_metrics(
        prefix, rows[:n_train], y_train, rows[n_train:], y_test, config.k_values, config.full_width, config.seed
    )


def _tokens(tokenizer, texts: list[str], length: int, prepend_bos: bool, keep_end: bool) -> list[list[int]]:
    """Token ids of each text, at most `length` with the BOS: its beginning, or its end when `keep_end`."""
    if not keep_end:
        return tokenize_texts(tokenizer, texts, length, prepend_bos)
    lists = tokenize_texts(tokenizer, texts, 2**62, prepend_bos=False)
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    return [bos + ids[len(ids) - (length - len(bos)) :] if len(ids) + len(bos) > length else bos + ids for ids in lists]


def _pooled(model, lists, hook, config, encoders, excluded, bar) -> dict[str, Tensor]:
    """pooled_activations over texts sorted by length (little padding), one forward pass of at most
    config.batch_tokens tokens at a time (at least one text)."""
    order = sorted(range(len(lists)), key=lambda i: len(lists[i]))
    parts: dict[str, list[Tensor]] = {name: [] for name in encoders}
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(lists[order[end]]) <= config.batch_tokens:
            end += 1
        chunk = [lists[i] for i in order[start:end]]
        pooled = pooled_activations(model, chunk, hook, config.pooling, encoders, excluded, batch_size=len(chunk))
        for name, value in pooled.items():
            parts[name].append(value)
        bar.update(sum(len(ids) for ids in chunk))
        start = end
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {name: torch.cat(values)[inverse] for name, values in parts.items()}


def _means(details: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Each `prefix_*` accuracy averaged over the tasks."""
    keys = [k for k in details[0] if k.startswith(f"{prefix}_") and k.endswith("_accuracy")]
    return {k: sum(d[k] for d in details) / len(details) for k in keys}


def plot_probing(results: Mapping[str, dict], folder: str | Path) -> list[Path]:
    """`probing_accuracy_vs_k.png` (mean test accuracy of the k-sparse probes against k, one line per SAE, the
    LLM's full-width and top-k probes as references) and `probing_tasks.png` (per task, each SAE's accuracy at the
    largest k beside the LLM's full-width probe) in `folder`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(folder / name, buffer.getvalue())
        written.append(folder / name)

    def top_k(values: Mapping[str, Any], prefix: str) -> dict[int, float]:
        found = {}
        for key, value in values.items():
            middle = key.removeprefix(f"{prefix}_top_").removesuffix("_test_accuracy")
            if key.startswith(f"{prefix}_top_") and middle.isdigit() and value is not None:
                found[int(middle)] = float(value)
        return dict(sorted(found.items()))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    baselines: dict[float, list[str]] = {}
    for i, (name, result) in enumerate(results.items()):
        metrics = result["eval_result_metrics"]
        curve = top_k(metrics["sae"], "sae")
        ax.plot(list(curve), list(curve.values()), marker="o", color=f"C{i}", label=f"{name}: top-k latents")
        full = metrics["sae"].get("sae_test_accuracy")
        if full is not None and math.isfinite(full):
            ax.axhline(full, color=f"C{i}", linestyle=":", linewidth=1, label=f"{name}: all latents")
        llm = metrics["llm"].get("llm_test_accuracy")
        if llm is not None and math.isfinite(llm):
            baselines.setdefault(round(float(llm), 6), []).append(name)
    for value, names in baselines.items():
        label = "LLM: all dims" + (f" ({', '.join(names)})" if len(baselines) > 1 else "")
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=label)
    if results:
        llm_curve = top_k(next(iter(results.values()))["eval_result_metrics"]["llm"], "llm")
        ax.plot(
            list(llm_curve), list(llm_curve.values()), marker="x", color="gray", linestyle="--", label="LLM: top-k dims"
        )
        ax.set_xscale("log")
        ax.set_xticks(list(llm_curve), [str(k) for k in llm_curve])
        ax.minorticks_off()
    ax.axhline(0.5, color="lightgray", linewidth=0.8)
    ax.set_xlabel("k (latents or dimensions per probe)")
    ax.set_ylabel("test accuracy, mean over tasks")
    ax.set_title("Sparse probing")
    ax.legend(fontsize=7, loc="lower right")
    save(fig, "probing_accuracy_vs_k.png")

    if results:
        tasks = [d["dataset_name"] for d in next(iter(results.values()))["eval_result_details"]]
        width = 0.8 / (len(results) + 1)
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(tasks) + 1.2))
        positions = range(len(tasks))
        first = next(iter(results.values()))["eval_result_details"]
        llm = [d.get("llm_test_accuracy") for d in first]
        ax.barh(
            [p - 0.4 + width / 2 for p in positions],
            [v if v is not None else 0 for v in llm],
            height=width,
            color="black",
            label="LLM: all dims",
        )
        for i, (name, result) in enumerate(results.items()):
            details = result["eval_result_details"]
            k = max(top_k(details[0], "sae"))
            values = [top_k(d, "sae").get(k, 0.0) for d in details]
            ax.barh(
                [p - 0.4 + width * (i + 1.5) for p in positions],
                values,
                height=width,
                color=f"C{i}",
                label=f"{name}: top-{k} latents",
            )
        ax.set_yticks(list(positions), tasks, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0.4, 1.0)
        ax.axvline(0.5, color="lightgray", linewidth=0.8)
        ax.set_xlabel("test accuracy")
        ax.legend(fontsize=7, loc="lower right")
        save(fig, "probing_tasks.png")
    return written
