"""JumpReLU SAE (Rajamanoharan et al. 2024): a latent passes only above its own learned threshold.

The threshold is trained in log space (positive, scale-free steps) through straight-through estimators:
the step function's derivative is replaced by a rectangle kernel of width `bandwidth` around the threshold,
so only pre-activations within bandwidth/2 of a threshold move it. Sparsity is an L0 penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.saes.base import SAE
from saelab.saes.config import SAEConfig
from saelab.saes.masking import where_positive
from saelab.saes.outputs import TrainOutput
from saelab.saes.registry import register


def in_window(x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """The rectangle kernel K((x - threshold) / bandwidth) as float32 0/1, flattened to (tokens, d_sae): 1 where
    x is within bandwidth / 2 of its latent's threshold."""
    x = x.reshape(-1, x.shape[-1])
    half = bandwidth / 2
    return ((x > threshold - half) & (x < threshold + half)).float()


class _JumpReLU(torch.autograd.Function):
    """x * H(x - threshold); d/dthreshold = -(threshold / bandwidth) * K((x - threshold) / bandwidth)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        latents = where_positive(
            x, x - threshold
        )  # two passes, where a bool mask, its float copy and a product take three
        ctx.save_for_backward(x, threshold, latents)
        ctx.bandwidth = bandwidth
        return latents

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, threshold, latents = ctx.saved_tensors
        # thresholds are positive (exp of a parameter), so a latent is positive exactly where x > threshold
        grad_x = where_positive(grad, latents)
        # summed over tokens first, scaled per latent after: no full-size pass for the scale
        summed = (in_window(x, threshold, ctx.bandwidth) * grad.reshape(-1, x.shape[-1])).sum(0)
        return grad_x, -(threshold / ctx.bandwidth) * summed, None


class _FiringCount(torch.autograd.Function):
    """Per token, the number of latents above their thresholds: sum_i H(x_i - threshold_i);
    d/dthreshold_i = -(1 / bandwidth) * K((x_i - threshold_i) / bandwidth). The counts, not the (tokens, d_sae)
    steps, are the output, so the backward is one matrix-vector product over the kernel."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).float().sum(dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        x, threshold = ctx.saved_tensors
        per_latent = grad.reshape(-1).float() @ in_window(x, threshold, ctx.bandwidth)
        return None, (-(1.0 / ctx.bandwidth) * per_latent).to(threshold.dtype), None


def add_thresholds(sae: SAE, n: int, init_threshold: float) -> None:
    """Gives `sae` n learned thresholds: the parameter `log_threshold` that training moves, and the buffer
    `threshold`, the exact value used outside training and written to disk (a log parameter cannot hold every
    float threshold exactly, so loading a file sets the buffer rather than exp(log))."""
    init = torch.full((n,), math.log(init_threshold), dtype=sae.cfg.torch_dtype, device=sae.cfg.device)
    sae.log_threshold = nn.Parameter(init)
    sae.register_buffer("threshold", init.exp())


@torch.no_grad()
def with_log_threshold(sae: SAE, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Saved weights (which hold `threshold` only) completed with the `log_threshold` they imply, which is set
    on `sae` too."""
    # A threshold <= 0 acts as 0 after the ReLU; log(0) = -inf and exp(-inf) = 0 keep that exactly.
    log_threshold = sae.get_parameter("log_threshold")
    log_threshold.data = weights["threshold"].clamp_min(0).log().to(log_threshold)
    return {**weights, "log_threshold": log_threshold.data}


@dataclass
class JumpReLUConfig(SAEConfig):
    l0_coefficient: float = 1.0
    """Weight of the (straight-through) L0 penalty."""
    bandwidth: float = 0.05
    """Width of the rectangle kernel that estimates the threshold's gradient."""
    init_threshold: float = 0.1
    """Threshold of every latent at initialisation (in normalised units). Lower starts (SAELens uses 0.01) need
    many thousands of steps for the threshold to climb to the pre-activation scale; 0.1 converges in hundreds."""


@register("jumprelu")
class JumpReLUSAE(SAE):
    config_class = JumpReLUConfig
    cfg: JumpReLUConfig
    log_threshold: nn.Parameter  # what training moves
    threshold: Tensor  # a buffer (see create_parameters)

    def create_parameters(self) -> None:
        super().create_parameters()
        add_thresholds(self, self.cfg.d_sae, self.cfg.init_threshold)

    def current_threshold(self) -> Tensor:
        return self.log_threshold.exp() if self.training else self.threshold

    def activate(self, hidden_pre: Tensor) -> Tensor:
        if self.training:
            return _JumpReLU.apply(hidden_pre, self.log_threshold.exp(), self.cfg.bandwidth)
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre)

    def sparsity_coefficient(self) -> float:
        return self.cfg.l0_coefficient

    def sparsity_loss(self, out: TrainOutput) -> Tensor:
        return _FiringCount.apply(out.hidden_pre, self.log_threshold.exp(), self.cfg.bandwidth).mean()

    @torch.no_grad()
    def update_after_step(self, out: TrainOutput) -> None:
        self.threshold.copy_(self.log_threshold.exp())

    def scale_encoder_biases(self, factors: Tensor) -> None:
        super().scale_encoder_biases(factors)
        self.threshold *= factors  # the latent fires when its scaled pre-activation passes its scaled threshold
        self.log_threshold.add_(factors.log())

    def weights_for_saving(self) -> dict[str, Tensor]:
        weights = super().weights_for_saving()
        del weights["log_threshold"]
        return weights

    @torch.no_grad()
    def load_saved_weights(self, weights: dict[str, Tensor]) -> None:
        super().load_saved_weights(with_log_threshold(self, weights))
