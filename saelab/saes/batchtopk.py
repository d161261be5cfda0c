"""BatchTopK SAE (Bussmann et al. 2024): the k * batch largest activations across the whole batch fire.

Tokens may use more or fewer than k latents while the batch averages k. For inference, where batches vary,
it keeps a running estimate of the smallest activation that fired and acts as a JumpReLU at that threshold;
`to_jumprelu()` exports exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from saelab.core.config import ConfigError
from saelab.saes.base import SAE
from saelab.saes.config import SAEConfig
from saelab.saes.fused_topk import Selector, batch_topk_flat_indices, select_batch_topk
from saelab.saes.outputs import TrainOutput
from saelab.saes.registry import make_config, register, sae_from_config
from saelab.saes.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_lr: float = 0.01
    """Step size of the running average of the smallest firing activation (the inference threshold)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.threshold_lr <= 1:
            raise ConfigError(f"threshold_lr must be in (0, 1], got {self.threshold_lr}")


def keep_batch_topk(values: Tensor, k: int) -> Tensor:
    """Zero all but the k * rows largest entries of the whole batch, then ReLU."""
    flat = values.reshape(-1)
    index = batch_topk_flat_indices(values.reshape(-1, values.shape[-1]), k)
    kept = torch.zeros_like(flat).scatter_(0, index, torch.relu(flat[index]))
    return kept.reshape(values.shape)


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """TopK's decoder constraint and AuxK, with batch-level selection and a threshold for inference."""

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig
    topk_threshold: Tensor  # buffer: the running inference threshold

    def selector(self) -> Selector:
        return select_batch_topk(self.cfg.k)

    def create_parameters(self) -> None:
        super().create_parameters()
        self.register_buffer("topk_threshold", torch.zeros((), dtype=self.cfg.torch_dtype, device=self.cfg.device))

    def activate(self, hidden_pre: Tensor) -> Tensor:
        if self.training:
            return keep_batch_topk(hidden_pre, self.cfg.k)
        return torch.relu(hidden_pre) * (hidden_pre > self.topk_threshold).to(hidden_pre)

    def scale_encoder_biases(self, factors: Tensor) -> None:
        super().scale_encoder_biases(factors)
        self.topk_threshold *= factors[0]  # uniform (checked by scale_latents)

    @torch.no_grad()
    def update_after_step(self, out: TrainOutput) -> None:
        values = out.sparse.values if out.sparse is not None else out.latents
        fired = values[values > 0]
        if fired.numel() == 0:
            return
        smallest = fired.min().to(self.topk_threshold.dtype)
        if self.topk_threshold <= 0:  # first update: start from the observed value, not from zero
            self.topk_threshold.copy_(smallest)
        else:
            self.topk_threshold.lerp_(smallest, self.cfg.threshold_lr)

    def to_jumprelu(self) -> SAE:
        """A JumpReLU SAE with the same weights whose per-latent threshold is the running threshold."""
        shared = {f.name for f in fields(SAEConfig)}
        options = {k: v for k, v in vars(self.cfg).items() if k in shared}
        jump = sae_from_config(make_config({**options, "architecture": "jumprelu"}))
        weights = {name: t for name, t in self.weights_for_saving().items() if name != "topk_threshold"}
        weights["threshold"] = self.topk_threshold.expand(self.cfg.d_sae).clone()
        jump.load_saved_weights(weights)
        return jump.eval()
