"""Downstream evaluation: the SAE spliced into the model at its hook, against the clean and the zero-ablated run.

Per batch of contexts, four forward passes: clean, with the SAE's reconstruction in place of the activation,
with the reconstruction plus its error term (which must give the clean logits back: a check of the splice),
and with the activation zeroed. Positions holding special tokens are left untouched when asked, and the
losses are averaged over the other positions (the prediction made at a special token is not counted), as
SAELens does.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.evals.metrics import kl_divergence, recovered_fraction
from saelab.saes.base import SAE


def _replace(keep: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(keep.unsqueeze(-1).to(old.device), new.to(old.dtype), old)


def _next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of each position's prediction of the next token, `(batch, positions - 1)`."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten().to(logits.device), reduction="none").view(
        tokens.shape[0], -1
    )


class SplicedEvaluation:
    """Accumulates CE losses and KL divergences over batches; `result()` gives the means and the scores."""

    def __init__(self, model, sae: SAE, excluded_token_ids: Iterable[int] = (), error_term: bool = True):
        self.model, self.sae, self.error_term = model, sae, error_term
        self.hook_in = sae.cfg.hook_name
        self.hook_out = sae.cfg.hook_name_out if sae.cfg.transcoder and sae.cfg.hook_name_out else sae.cfg.hook_name
        if self.hook_in is None:
            raise ValueError("spliced evaluation needs the SAE's hook_name (cfg.hook_name)")
        self.excluded = torch.tensor(sorted(set(excluded_token_ids)), dtype=torch.long)
        self.sums: dict[str, float] = defaultdict(float)
        self.counts = {"ce": 0, "kl": 0}

    def _run(self, tokens: Tensor, keep: Tensor, mode: str) -> Tensor:
        """Logits with the output hook replaced according to `mode` (sae, sae+error, zero)."""
        captured: dict[str, Tensor] = {}

        def replace(out: Tensor) -> Tensor:
            x = captured[self.hook_in] if self.hook_in != self.hook_out else out
            if mode == "zero":
                return _replace(keep, torch.zeros_like(out), out)
            recon = self.sae(x.to(self.sae.device, self.sae.dtype)).to(out.dtype)
            if mode == "sae+error":
                recon = recon + (out - recon)
            return _replace(keep, recon, out)

        read = [self.hook_in] if self.hook_in != self.hook_out else []
        with self.model.hooks(read=read) as cache:
            captured = cache
            return self.model.logits(tokens, write={self.hook_out: replace})

    @torch.no_grad()
    def add(self, tokens: Tensor) -> None:
        """Evaluate one batch of contexts `(batch, context_size)`."""
        keep = ~torch.isin(tokens, self.excluded)
        counted = keep[:, :-1]
        clean = self.model.logits(tokens)
        ce_clean = _next_token_loss(clean, tokens)
        runs = ["sae", "zero"] + (["sae+error"] if self.error_term else [])
        self.sums["ce_loss_without_sae"] += float(ce_clean[counted].sum())
        for mode in runs:
            logits = self._run(tokens, keep, mode)
            name = {"sae": "with_sae", "zero": "with_ablation", "sae+error": "with_sae_and_error"}[mode]
            self.sums[f"ce_loss_{name}"] += float(_next_token_loss(logits, tokens)[counted].sum())
            self.sums[f"kl_div_{name}"] += float(kl_divergence(clean, logits)[keep].sum())
        self.counts["ce"] += int(counted.sum())
        self.counts["kl"] += int(keep.sum())

    def result(self) -> dict[str, float]:
        metrics = {
            name: total / max(self.counts["ce" if name.startswith("ce") else "kl"], 1) for name, total in self.sums.items()
        }
        metrics["ce_loss_score"] = recovered_fraction(
            metrics["ce_loss_with_ablation"], metrics["ce_loss_with_sae"], metrics["ce_loss_without_sae"]
        )
        metrics["kl_div_score"] = recovered_fraction(metrics["kl_div_with_ablation"], metrics["kl_div_with_sae"], 0.0)
        metrics["tokens"] = self.counts["kl"]
        return metrics
