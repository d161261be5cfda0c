"""The configs of cross-layer transcoders and transcoder sets (the modules: saes/clt.py), and how their hook
points are named: a template with '{layer}' at each of `layers`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from saelab.core.config import ConfigError
from saelab.saes.config import SAEConfig

LAYER = "{layer}"


@dataclass
class CLTConfig(SAEConfig):
    layers: list[int] = field(default_factory=lambda: [0])
    """Model layers read and written, in order; hook_name and hook_name_out name their hook points with
    '{layer}' (e.g. 'blocks.{layer}.hook_resid_mid'). d_in, d_out and d_sae are totals over these layers."""
    cross_layer: bool = True
    """Latents of layer i write to every later layer's output (a CLT); false: to their own layer only."""
    activation: Literal["topk", "jumprelu"] = "topk"
    """'topk' (k latents per layer and token) or 'jumprelu' (learned thresholds, tanh sparsity penalty)."""
    k: int = 32
    """TopK: active latents per layer and token."""
    k_aux: int | None = None
    """TopK: dead latents per layer used by the AuxK loss; None means half a layer's latents, at most 256 (AuxK
    decodes into every later layer: half of a wide layer would cost more than the rest of the step)."""
    aux_coefficient: float | None = None
    """Weight of the auxiliary loss (TopK: AuxK, default 1/32; JumpReLU: pre-activation loss, default 3e-6)."""
    sparsity_coefficient: float = 1.0
    """JumpReLU: weight of the sum over latents of tanh(tanh_scale * activation * decoder norm)."""
    tanh_scale: float = 4.0
    """JumpReLU: c in the sparsity penalty (how soon a latent's cost saturates)."""
    bandwidth: float = 0.05
    """JumpReLU: width of the straight-through kernel that gives the thresholds their gradient."""
    init_threshold: float = 0.1
    """JumpReLU: every latent's threshold at initialisation (normalised units)."""

    def __post_init__(self) -> None:
        self.transcoder = True  # inputs and outputs are different hook points, even at equal widths
        super().__post_init__()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def validate(self) -> None:
        super().validate()
        if not self.layers or len(set(self.layers)) != len(self.layers) or self.layers != sorted(self.layers):
            raise ConfigError(f"layers must be distinct and increasing, got {self.layers}")
        assert self.d_out is not None
        for name in ("d_in", "d_out", "d_sae"):
            if getattr(self, name) % self.n_layers:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of the {self.n_layers} layers")
        for name in ("hook_name", "hook_name_out"):
            hook = getattr(self, name)
            if hook is not None and LAYER not in hook and self.n_layers > 1:
                example = "blocks.{layer}.hook_mlp_out"
                raise ConfigError(f"{name} '{hook}' must say where the layer goes, e.g. '{example}'")
        if self.activation == "topk" and not 1 <= self.k <= self.d_sae // self.n_layers:
            raise ConfigError(f"k must be between 1 and the latents per layer ({self.d_sae // self.n_layers})")
        if self.normalize_activations == "layer_norm":
            raise ConfigError("a cross-layer transcoder cannot use normalize_activations='layer_norm'")

    def input_hooks(self) -> list[str]:
        """The hook point read at each layer."""
        return hooks_at_layers(self.hook_name, self.layers)

    def output_hooks(self) -> list[str]:
        """The hook point written at each layer."""
        return hooks_at_layers(self.hook_name_out, self.layers)


def hooks_at_layers(template: str | None, layers: Sequence[int]) -> list[str]:
    """`template` ('blocks.{layer}.hook_mlp_out') at each of `layers`."""
    if template is None:
        raise ConfigError("a cross-layer transcoder needs hook_name and hook_name_out (with '{layer}')")
    return [template.replace(LAYER, str(layer)) for layer in layers]


@dataclass
class TranscoderSetConfig(CLTConfig):
    cross_layer: bool = False
    """Fixed: each layer's latents write to their own layer only."""

    def validate(self) -> None:
        super().validate()
        if self.cross_layer:
            raise ConfigError("a transcoder set has no cross-layer decoders: use architecture 'clt' for those")


def per_layer_factors(scale: float | Sequence[float], n_layers: int) -> Tensor:
    """One activation-scaling factor per layer, from a single factor (every layer) or a list of them."""
    values = torch.tensor([float(scale)] * n_layers if isinstance(scale, (int, float)) else list(map(float, scale)))
    if values.numel() != n_layers:
        raise ValueError(f"{values.numel()} scale factors for {n_layers} layers")
    return values
