"""Downstream evaluation: SAEs spliced into the model at their hooks, against the clean and the zero-ablated run.

Per batch of contexts, four forward passes: clean, with the SAEs' reconstructions in place of the activations
(one SAE, or several at once to measure their joint effect),
with the reconstruction plus its error term (which must give the clean logits back: a check of the splice),
and with the activation zeroed. Positions holding special tokens are left untouched when asked, and the
losses are averaged over the other positions (the prediction made at a special token is not counted), as
SAELens does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from saelab.evals.metrics import kl_from_log_probs, recovered_fraction
from saelab.saes.base import SAE
from saelab.splice import check_splice, spliced


def _log_probs(logits: Tensor) -> Tensor:
    """Next-token log-probabilities in float64, computed once per run and shared by its CE and KL."""
    return logits.double().log_softmax(-1)


def _next_token_loss(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of each position's prediction of the next token, `(batch, positions - 1)`."""
    targets = tokens[:, 1:].to(log_probs.device).unsqueeze(-1)
    return -log_probs[:, :-1].gather(-1, targets).squeeze(-1)


class SplicedEvaluation:
    """Accumulates CE losses and KL divergences over batches; `result()` gives the means and the scores."""

    def __init__(
        self, model, sae: SAE | Sequence[SAE], excluded_token_ids: Iterable[int] = (), error_term: bool = True
    ):
        self.model, self.error_term = model, error_term
        self.saes = [sae] if isinstance(sae, SAE) else list(sae)
        check_splice(model, self.saes)
        self.excluded = torch.tensor(sorted(set(excluded_token_ids)), dtype=torch.long)
        self.sums: dict[str, float] = defaultdict(float)
        self.counts = {"ce": 0, "kl": 0}

    def _run(self, tokens: Tensor, keep: Tensor, mode: str) -> Tensor:
        """Logits with each SAE's output hook replaced at the kept positions as `mode` says: by the SAE's
        output (sae), by it plus its error term (sae+error, which must give the clean logits), or by zeros."""
        modes: dict[str, dict[str, Any]] = {"sae": {}, "sae+error": {"error_term": True}, "zero": {"run": _zeros}}
        options = modes[mode]
        with spliced(self.model, self.saes, positions=keep, **options):
            return self.model.logits(tokens)

    @torch.no_grad()
    def add(self, tokens: Tensor) -> None:
        """Evaluate one batch of contexts `(batch, context_size)`."""
        keep = ~torch.isin(tokens, self.excluded)
        counted = keep[:, :-1]
        clean = self.model.logits(tokens)
        clean_log_probs = _log_probs(clean)
        clean_probs = clean_log_probs.exp()
        runs = ["sae", "zero"] + (["sae+error"] if self.error_term else [])
        self.sums["ce_loss_without_sae"] += float(_next_token_loss(clean_log_probs, tokens)[counted].sum())
        clean_top1 = clean.argmax(-1)
        for mode in runs:
            logits = self._run(tokens, keep, mode)
            log_probs = _log_probs(logits)
            name = {"sae": "with_sae", "zero": "with_ablation", "sae+error": "with_sae_and_error"}[mode]
            self.sums[f"ce_loss_{name}"] += float(_next_token_loss(log_probs, tokens)[counted].sum())
            self.sums[f"kl_div_{name}"] += float(kl_from_log_probs(clean_log_probs, log_probs, clean_probs)[keep].sum())
            if mode == "sae":
                self.sums["top1_agreement_with_sae"] += float((logits.argmax(-1) == clean_top1)[keep].sum())
        self.counts["ce"] += int(counted.sum())
        self.counts["kl"] += int(keep.sum())

    def result(self) -> dict[str, float]:
        """Mean losses and divergences over every batch added, and the scores."""
        return _metrics(self.sums, self.counts)

    @staticmethod
    def combined(evaluations: Sequence[SplicedEvaluation]) -> dict[str, float]:
        """The result of several evaluations (of the same model and SAEs, on other batches) taken together."""
        sums: dict[str, float] = defaultdict(float)
        counts = {"ce": 0, "kl": 0}
        for evaluation in evaluations:
            for name, total in evaluation.sums.items():
                sums[name] += total
            for name, count in evaluation.counts.items():
                counts[name] += count
        return _metrics(sums, counts)


def _metrics(sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    metrics = {name: total / max(counts["ce" if name.startswith("ce") else "kl"], 1) for name, total in sums.items()}
    metrics["ce_loss_increase"] = metrics["ce_loss_with_sae"] - metrics["ce_loss_without_sae"]
    metrics["ce_loss_score"] = recovered_fraction(
        metrics["ce_loss_with_ablation"], metrics["ce_loss_with_sae"], metrics["ce_loss_without_sae"]
    )
    metrics["kl_div_score"] = recovered_fraction(metrics["kl_div_with_ablation"], metrics["kl_div_with_sae"], 0.0)
    metrics["tokens"] = counts["kl"]
    return metrics


def _zeros(sae: SAE, x: Tensor, activation: Tensor) -> Tensor:
    """The zero-ablation baseline: the activation replaced by zeros."""
    return torch.zeros_like(activation)
