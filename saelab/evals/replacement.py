"""The replacement model: a cross-layer transcoder (or transcoder set) in place of the MLPs it covers.

`replacement_metrics(clt, model, data)` measures, on the held-out contexts the core eval reads (of each source of
a built-in corpus, and of all together):

* the model with the CLT spliced in without error terms (each covered layer's output replaced by the CLT's output
  from the replacement model's own activations, so that errors compound): next-token CE of the clean and the
  replacement model, CE increase, KL(clean || replacement), top-1 agreement, and the CE-loss score against the
  model with the covered layers' outputs set to zero (`saelab.evals.spliced`, as the core eval's);
* per layer, the reconstruction from the clean model's inputs: FVU (centred normalised MSE,
  sum ||y - y_hat||^2 / sum ||y - mean y||^2), the uncentred normalised MSE (/ sum ||y||^2), explained variance
  (1 - FVU), L0 (latents of that source layer active per token) and the fraction of its latents that never fired;
  the totals sum over layers before dividing.

Special tokens are left out as the core eval leaves them out. `run_replacement` gives the same in the suite's
envelope (`saelab eval CLT_DIR --suite replacement`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saelab.core.config import PYDANTIC
from saelab.core.errors import ConfigError
from saelab.data.config import DataConfig
from saelab.data.tokens import excluded_token_ids
from saelab.evals.evaluate import activation_batches, data_config_of
from saelab.evals.heldout import Groups, heldout_groups
from saelab.evals.results import make_result
from saelab.evals.spliced import SplicedEvaluation
from saelab.saes.base import SAE
from saelab.saes.clt import CrossLayerTranscoder
from saelab.splice import model_for


@dataclass
class ReplacementConfig:
    """Settings of the replacement eval (a cross-layer transcoder or transcoder set in place of its MLPs)."""

    __pydantic_config__ = PYDANTIC

    n_contexts: int = 32
    """Held-out contexts evaluated, of each source of a built-in corpus."""
    batch_contexts: int = 8
    """Contexts per forward pass of the model."""
    error_term: bool = True
    """Also check that the CLT's outputs plus error terms give the clean model's logits back (one more pass)."""


@dataclass
class _Sums:
    """Sums over the tokens of one group, in float64, per layer: what every per-layer metric is made of."""

    clt: CrossLayerTranscoder
    tokens: int = 0
    squared_error: Tensor = field(init=False)  # (layers,) sum ||y - y_hat||^2
    squared_norm: Tensor = field(init=False)  # (layers,) sum ||y||^2
    target_sum: Tensor = field(init=False)  # (layers, d_out per layer) sum y
    fire_counts: Tensor = field(init=False)  # (layers, latents per layer) tokens each latent fired on

    def __post_init__(self) -> None:
        L = self.clt.n_layers
        self.squared_error, self.squared_norm = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
        self.target_sum = torch.zeros(L, self.clt.d_layer_out, dtype=torch.float64)
        self.fire_counts = torch.zeros(L, self.clt.m, dtype=torch.float64)

    def add(self, target: Tensor, prediction: Tensor, latents: Tensor) -> None:
        """Rows of one batch: targets and predictions `(tokens, layers * d_out)`, latents `(tokens, layers * m)`."""
        y = target.double().cpu().view(len(target), self.clt.n_layers, -1)
        y_hat = prediction.double().cpu().view_as(y)
        self.tokens += len(y)
        self.squared_error += (y - y_hat).pow(2).sum(dim=(0, 2))
        self.squared_norm += y.pow(2).sum(dim=(0, 2))
        self.target_sum += y.sum(0)
        self.fire_counts += (latents != 0).view(len(y), self.clt.n_layers, -1).sum(0).double().cpu()

    @staticmethod
    def total(groups: list[_Sums]) -> _Sums:
        whole = _Sums(groups[0].clt)
        for group in groups:
            whole.tokens += group.tokens
            for name in ("squared_error", "squared_norm", "target_sum", "fire_counts"):
                getattr(whole, name).add_(getattr(group, name))
        return whole

    def scores(self) -> dict[str, Any]:
        """Per-layer metrics and their totals over the layers."""
        n = max(self.tokens, 1)
        centred = self.squared_norm - self.target_sum.pow(2).sum(-1) / n  # sum ||y - mean y||^2
        fvu, nmse = self.squared_error / centred, self.squared_error / self.squared_norm
        l0, dead = self.fire_counts.sum(-1) / n, (self.fire_counts == 0).double().mean(-1)
        total_fvu = float(self.squared_error.sum() / centred.sum())
        layers = [
            {
                "layer": layer,
                "fvu": float(fvu[i]),
                "nmse": float(nmse[i]),
                "explained_variance": 1.0 - float(fvu[i]),
                "l0": float(l0[i]),
                "dead_fraction": float(dead[i]),
            }
            for i, layer in enumerate(self.clt.cfg.layers)
        ]
        return {
            "tokens": self.tokens,
            "reconstruction": {
                "fvu": total_fvu,
                "nmse": float(self.squared_error.sum() / self.squared_norm.sum()),
                "explained_variance": 1.0 - total_fvu,
            },
            "sparsity": {"l0": float(l0.sum()), "dead_fraction": float((self.fire_counts == 0).double().mean())},
            "layers": layers,
        }


def _check_clt(sae: SAE) -> CrossLayerTranscoder:
    if not isinstance(sae, CrossLayerTranscoder):
        raise ConfigError(
            f"the replacement eval measures a cross-layer transcoder or transcoder set (architecture 'clt' or "
            f"'transcoder_set'), not a '{sae.cfg.architecture}': use the core eval"
        )
    return sae


@torch.no_grad()
def replacement_metrics(
    clt: SAE,
    model=None,
    data: DataConfig | None = None,
    n_contexts: int = 32,
    batch_contexts: int = 8,
    error_term: bool = True,
    contexts: Groups | None = None,
) -> dict[str, Any]:
    """The replacement model's metrics (see the module docstring) on `n_contexts` held-out contexts of each source
    (`result["sources"]`, on a built-in corpus of several) and of all together (the rest of the result). `model`
    defaults to the CLT's model_name, `data` to the data it was trained on; `contexts` (from `heldout_groups`)
    replaces the held-out contexts read."""
    clt = _check_clt(clt).eval()
    model = model_for(clt, model)
    data = data or data_config_of(clt)
    excluded = excluded_token_ids(model.tokenizer, data.exclude_special_tokens)
    sums: dict[str | None, _Sums] = {}
    downstream: dict[str | None, SplicedEvaluation] = {}
    for source, batches in (contexts or heldout_groups(model, data, n_contexts, batch_contexts)).items():
        sums[source] = _Sums(clt)
        downstream[source] = SplicedEvaluation(model, clt, excluded, error_term)
        for batch in activation_batches(clt, model, batches, excluded):
            latents = clt.encode(batch.inputs)
            sums[source].add(batch.targets, clt.output(latents, batch.inputs), latents)
            downstream[source].add(batch.tokens)

    def scores(parts: list[str | None]) -> dict[str, Any]:
        return {
            **_Sums.total([sums[p] for p in parts]).scores(),
            "replacement": SplicedEvaluation.combined([downstream[p] for p in parts]),
        }

    result: dict[str, Any] = {
        "clt": {
            "architecture": clt.cfg.architecture,
            "layers": list(clt.cfg.layers),
            "hook_name": clt.cfg.hook_name,
            "hook_name_out": clt.cfg.hook_name_out,
            "model_name": clt.cfg.model_name,
        },
        **scores(list(sums)),
    }
    if None not in sums:
        result["sources"] = {source: scores([source]) for source in sums}
    return result


BEHAVIOUR = ("kl_div_with_sae", "kl_div_score", "kl_div_with_ablation", "top1_agreement_with_sae")
PERFORMANCE = ("ce_loss_score", "ce_loss_increase", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation")


def run_replacement(
    sae: SAE,
    model=None,
    config: ReplacementConfig | None = None,
    progress: bool = True,
    data: DataConfig | None = None,
) -> dict[str, Any]:
    """`replacement_metrics` as a suite result: the replacement model's CE and KL under the core eval's category
    names (`_with_sae` is the replacement model), reconstruction and sparsity totals over the layers; one detail
    record per layer, then one per source of a built-in corpus; the whole result under
    `eval_result_unstructured`."""
    config = config or ReplacementConfig()
    start = time.perf_counter()
    full = replacement_metrics(sae, model, data, config.n_contexts, config.batch_contexts, error_term=config.error_term)
    replacement = full["replacement"]
    metrics = {
        "model_behavior_preservation": {key: replacement[key] for key in BEHAVIOUR},
        "model_performance_preservation": {key: replacement[key] for key in PERFORMANCE},
        "reconstruction_quality": full["reconstruction"],
        "sparsity": full["sparsity"],
        "token_stats": {"tokens": full["tokens"]},
    }
    sources = [
        {
            "source": name,
            "tokens": part["tokens"],
            **{key: part["replacement"][key] for key in ("ce_loss_score", "ce_loss_increase", "kl_div_with_sae")},
            "fvu": part["reconstruction"]["fvu"],
            "l0": part["sparsity"]["l0"],
        }
        for name, part in full.get("sources", {}).items()
    ]
    return make_result("replacement", sae, config, metrics, full["layers"] + sources, full, time.perf_counter() - start)
