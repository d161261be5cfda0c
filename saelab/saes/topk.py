"""TopK SAE (Gao et al. 2024): exactly the k largest pre-activations of each token fire.

Sparsity is enforced by construction; AuxK feeds a reconstruction gradient to dead latents by letting the
k_aux largest of them model the residual the live latents leave.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.core.config import ConfigError
from saelab.saes.base import SAE
from saelab.saes.config import SAEConfig
from saelab.saes.fused_topk import Selector, select_topk, sparse_decode, sparse_encode
from saelab.saes.outputs import TrainOutput
from saelab.saes.registry import register


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    """Number of active latents per token."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss; None means d_sae // 2."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss."""

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"k must be between 1 and d_sae ({self.d_sae}), got {self.k}")
        if self.k_aux is not None and self.k_aux < 1:
            raise ConfigError(f"k_aux must be positive, got {self.k_aux}")


def keep_topk(values: Tensor, k: int) -> Tensor:
    """Zero all but the k largest entries of each row, then ReLU."""
    top = values.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(values).scatter_(-1, top.indices, torch.relu(top.values))


def auxk_loss(sae: SAE, out: TrainOutput, target: Tensor, dead_mask: Tensor | None, k_aux: int) -> Tensor | None:
    """Squared error of the dead latents' top-k_aux reconstruction of the live latents' residual.

    At full weight however few latents are dead (sparsify scales it by min(1, dead / k_aux), which with k_aux =
    d_sae / 2 all but switches it off once most latents live): the default run's aux_coefficient was chosen
    with this loss at full weight to keep latents alive within 1M tokens.
    """
    if dead_mask is None:
        return None
    num_dead = int(dead_mask.sum())
    if num_dead == 0:
        return None
    residual = (target - out.output).detach()
    # Only the dead latents' columns are computed: the cost scales with how many are dead, not with d_sae.
    dead = dead_mask.nonzero().squeeze(1)
    dead_pre = out.sae_in.reshape(-1, sae.cfg.d_in) @ sae.W_enc[:, dead] + sae.b_enc[dead]
    k_aux = min(k_aux, num_dead)
    if k_aux == num_dead:  # every dead latent takes part (the usual case, k_aux being d_sae / 2): no selection
        aux_latents = torch.relu(dead_pre)
    else:
        top = dead_pre.topk(k_aux, dim=-1, sorted=False)
        aux_latents = torch.zeros_like(dead_pre).scatter(-1, top.indices, torch.relu(top.values))
    predicted = aux_latents @ sae.W_dec[dead]
    return (predicted.reshape(residual.shape) - residual).pow(2).sum(dim=-1).mean()


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig
    cfg: TopKConfig
    default_decoder_init_norm = 1.0
    default_normalize_decoder = True
    per_latent_scaling = False  # scaling one latent changes which k are largest

    sparse_training = True
    """Train with the sparse kernels of fused_topk (False: the dense computation, same results)."""

    def selector(self) -> Selector:
        """Which pre-activations fire in training: the k largest of each token."""
        return select_topk(self.cfg.k)

    def activate(self, hidden_pre: Tensor) -> Tensor:
        return keep_topk(hidden_pre, self.cfg.k)

    def training_forward(self, x: Tensor) -> TrainOutput:
        """As the dense forward, but decoding only the k active latents of each token (same values)."""
        if not self.sparse_training:
            return super().training_forward(x)
        normalized, shift, sae_in = self._centring(x)  # sae_in: what AuxK encodes dead latents from
        flat = normalized.reshape(-1, self.cfg.d_in)
        active, hidden_pre = sparse_encode(flat, self.W_enc, self.b_enc, self.selector(), shift)
        active = active._replace(values=torch.relu(active.values))
        decoded = self._sae_output((sparse_decode(active, self.W_dec) + self.b_dec).reshape(*x.shape[:-1], -1))
        skip = self.skip(x)
        hidden_pre = hidden_pre.reshape(*x.shape[:-1], self.cfg.d_sae)
        return TrainOutput(sae_in, hidden_pre, self.with_skip(decoded, skip), sparse=active, skip=skip)

    @property
    def k_aux(self) -> int:
        return self.cfg.k_aux or self.cfg.d_sae // 2

    def aux_coefficient(self) -> float:
        return self.cfg.aux_coefficient

    def auxiliary_loss(self, out: TrainOutput, target: Tensor, dead_mask: Tensor | None) -> Tensor | None:
        return auxk_loss(self, out, target, dead_mask, self.k_aux)
