"""Acausal crosscoder (Lindsey et al. 2024, "Sparse Crosscoders"): one set of latents read from and written to
several layers at once.

It reads the concatenation of one hook point at each of `layers` (a '{layer}' template, as a CLT's hooks) and
reconstructs all of them from one latent vector: `f = ReLU(sum_l x_l W_enc^l + b_enc)`, `x_l' = f W_dec^l +
b_dec^l`. In saelab's shapes that is an SAE on the concatenated activations (`W_enc (L*d, m)`, `W_dec (m, L*d)`),
trained with each layer's activations scaled by their own factor; what makes it a crosscoder is the sparsity
penalty: each latent weighted by the *sum* of its per-layer decoder norms, `sum_i f_i sum_l ||W_dec_i^l||`. (The
norm of the concatenated decoder would make it an ordinary SAE on concatenated activations; the sum favours latents
that live in few layers, and `layer_decoder_norms` shows where each one lives.)

A crosscoder reads layers after the ones it writes, so it cannot be spliced into one forward pass of a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saelab.core.config import ConfigError
from saelab.saes.clt_config import hooks_at_layers, per_layer_factors
from saelab.saes.outputs import TrainOutput
from saelab.saes.registry import register
from saelab.saes.standard import StandardConfig, StandardSAE


@dataclass
class CrosscoderConfig(StandardConfig):
    layers: list[int] = field(default_factory=lambda: [0])
    """Model layers read (and reconstructed); hook_name names their hook point with '{layer}'. d_in is the total
    width over these layers."""

    hook_names: list[str] | None = None
    """The hook points read, in order, instead of hook_name at each of `layers`: e.g. one hook of two models for
    model diffing (`[blocks.5.hook_resid_post, blocks.5.hook_resid_post@compare]`, see `model.compare_with`).
    hook_name, when given, is one of them (the one whose layer is recorded)."""

    def validate(self) -> None:
        super().validate()
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers must be distinct, got {self.layers}")
        if self.hook_names is not None:
            _check_hook_names(self.hook_names, self.layers, self.hook_name)
        if self.d_in % self.n_blocks:
            raise ConfigError(f"d_in ({self.d_in}) must be a multiple of the {self.n_blocks} hooks read")
        if self.transcoder:
            raise ConfigError("a crosscoder reconstructs the activations it reads: no hook_name_out or d_out")
        if self.hook_names is None and self.hook_name is not None and "{layer}" not in self.hook_name:
            if len(self.layers) > 1:
                raise ConfigError(f"hook_name '{self.hook_name}' must say where the layer goes ('blocks.{{layer}}...')")

    @property
    def n_blocks(self) -> int:
        """How many hooks' activations are concatenated."""
        return len(self.hook_names) if self.hook_names is not None else len(self.layers)

    def input_hooks(self) -> list[str]:
        if self.hook_names is not None:
            return list(self.hook_names)
        return [] if self.hook_name is None else hooks_at_layers(self.hook_name, self.layers)

    def output_hooks(self) -> list[str]:
        return self.input_hooks()


def _check_hook_names(names: list[str], layers: list[int], hook_name: str | None) -> None:
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"hook_names must be a list of distinct hook names, got {names!r}")
    if layers != [0]:
        raise ConfigError("give the hooks read as hook_names or as hook_name at each of layers, not both")
    if hook_name is not None and hook_name not in names:
        raise ConfigError(f"hook_name '{hook_name}' is not one of hook_names ({', '.join(names)})")


@register("crosscoder")
class Crosscoder(StandardSAE):
    config_class = CrosscoderConfig
    cfg: CrosscoderConfig
    layered = True

    @property
    def n_layers(self) -> int:
        """How many blocks (layers, or hooks of `hook_names`) it reads and writes."""
        return self.cfg.n_blocks

    def layer_decoder_norms(self) -> Tensor:
        """`(d_sae, n_layers)`: each latent's decoder norm into each layer, or each hook of `hook_names` (where the
        latent lives)."""
        return self.W_dec.reshape(self.cfg.d_sae, self.n_layers, -1).norm(dim=-1)

    def sparsity_loss(self, out: TrainOutput) -> Tensor:
        weights = self.layer_decoder_norms().sum(dim=1).to(out.latents.dtype)
        return (out.latents.reshape(-1, self.cfg.d_sae) @ weights).mean()

    @torch.no_grad()
    def fold_activation_scale(
        self, in_scale: float | Sequence[float], out_scale: float | Sequence[float] | None = None
    ) -> None:
        """As `SAE.fold_activation_scale`, with one factor per layer allowed (input and target are the same
        activations, so one set of factors)."""
        factors = per_layer_factors(in_scale, self.n_layers).to(self.W_enc)
        per_dim = factors.repeat_interleave(self.cfg.d_in // self.n_layers)
        self.W_enc.mul_(per_dim.unsqueeze(1))
        self.W_dec.div_(per_dim)
        self.b_dec.div_(per_dim)
