"""The SAE interface shared by every architecture (its config: saes/config.py; the registry: saes/registry.py).

Parameter names and shapes follow SAELens / SAEBench: `W_enc (d_in, d_sae)`, `W_dec (d_sae, d_out)`,
`b_enc (d_sae)`, `b_dec (d_out)`, so encoding is `x @ W_enc + b_enc` and decoding `z @ W_dec + b_dec`.
An SAE whose output is another activation than its input (`transcoder`) is the same module with `d_out`
and, optionally, a linear skip connection `W_skip (d_out, d_in)`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from saelab.saes.centred_linear import centred_linear
from saelab.saes.config import SAEConfig
from saelab.saes.files import save_sae
from saelab.saes.init import geometric_median
from saelab.saes.outputs import TrainOutput


class SAE(nn.Module):
    """Base class: a dictionary that encodes activations into latents and decodes them back.

    Architectures override `activate` (latents from pre-activations) and, where they differ, the loss hooks
    `sparsity_loss` and `auxiliary_loss`. Everything else (wiring, normalisation, folding, saving) is shared.
    """

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    architecture: ClassVar[str] = ""
    default_decoder_init_norm: ClassVar[float] = 0.1
    default_normalize_decoder: ClassVar[bool] = False
    per_latent_scaling: ClassVar[bool] = True
    """Scaling one latent (and dividing its decoder row) leaves outputs unchanged; false where latents compete
    for selection (TopK, BatchTopK), where only a uniform scale does."""
    layered: ClassVar[bool] = False
    """A dictionary over several layers (cross-layer transcoders and transcoder sets, with parameters of their own
    shapes: saes/clt.py; crosscoders: saes/crosscoder.py); the rest read one hook point."""
    hook_z_reshaping_mode: ClassVar[bool] = False
    """SAEBench asks SAELens SAEs this for hook_z: saelab's hook_z SAEs read the heads flattened already."""

    cfg: SAEConfig
    # Parameters (nn.Module registers them on assignment; declared here so that their type is known)
    W_enc: nn.Parameter
    b_enc: nn.Parameter  # gated SAEs have b_gate, r_mag and b_mag instead
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    W_skip: nn.Parameter  # skip transcoders only

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self._layer_norm_stats: tuple[Tensor, Tensor] | None = None
        self.create_parameters()
        self.reset_parameters()

    # ----- parameters --------------------------------------------------------------------------------
    def _empty(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, dtype=self.cfg.torch_dtype, device=self.cfg.device))

    def create_parameters(self) -> None:
        c, d_out = self.cfg, self.cfg.d_out
        assert d_out is not None  # SAEConfig.__post_init__ defaults it to d_in
        self.W_enc = self._empty(c.d_in, c.d_sae)
        self.create_encoder_biases()
        self.W_dec = self._empty(c.d_sae, d_out)
        self.b_dec = self._empty(d_out)
        if c.skip_connection:
            self.W_skip = self._empty(d_out, c.d_in)

    def create_encoder_biases(self) -> None:
        """The per-latent parameters of the encoder; gated replaces b_enc with its gate/magnitude pair."""
        self.b_enc = self._empty(self.cfg.d_sae)

    @property
    def decoder_init_norm(self) -> float:
        return self.cfg.decoder_init_norm or self.default_decoder_init_norm

    @property
    def normalize_decoder(self) -> bool:
        flag = self.cfg.normalize_decoder
        return self.default_normalize_decoder if flag is None else flag

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit decoder directions scaled to `decoder_init_norm`; the encoder is their transpose."""
        directions = torch.randn_like(self.W_dec)
        self.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True) * self.decoder_init_norm)
        if self.cfg.d_in == self.cfg.d_out:
            self.W_enc.copy_(self.W_dec.T)
        else:
            directions = torch.randn_like(self.W_enc)
            self.W_enc.copy_(directions / directions.norm(dim=0, keepdim=True) * self.decoder_init_norm)

    # ----- the interface -----------------------------------------------------------------------------
    def _normalize_input(self, x: Tensor) -> Tensor:
        if self.cfg.normalize_activations == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            std = (x - mean).pow(2).mean(dim=-1, keepdim=True).add(1e-5).sqrt()
            self._layer_norm_stats = (mean, std)
            x = (x - mean) / std
        return x

    def _sae_input(self, x: Tensor) -> Tensor:
        x = self._normalize_input(x)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_activation(self, sae_in: Tensor) -> Tensor:
        """Encoder pre-activations of an already centred/normalised input."""
        return sae_in @ self.W_enc + self.b_enc

    def activate(self, hidden_pre: Tensor) -> Tensor:
        """Latents from pre-activations. Overridden by each architecture."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations `(..., d_sae)` of inputs `(..., d_in)`."""
        return self.activate(self.pre_activation(self._sae_input(x)))

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruction `(..., d_out)` from latents (without the skip connection, which needs the input)."""
        return self._sae_output(latents @ self.W_dec + self.b_dec)

    def _sae_output(self, out: Tensor) -> Tensor:
        """Undo input normalisation on a decoded output."""
        if self.cfg.normalize_activations == "layer_norm" and self._layer_norm_stats is not None:
            mean, std = self._layer_norm_stats
            out = out * std + mean
        return out

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip connection's part of the output for raw input `x` (skip transcoders), else None."""
        return x @ self.W_skip.T if self.cfg.skip_connection else None

    def output(self, latents: Tensor, x: Tensor) -> Tensor:
        """What the SAE puts out for latents read from raw input `x`: the decoding plus the skip connection."""
        return self.with_skip(self.decode(latents), self.skip(x))

    @staticmethod
    def with_skip(decoded: Tensor, skip: Tensor | None) -> Tensor:
        return decoded if skip is None else decoded + skip

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of `x` (or, for a transcoder, prediction of its target)."""
        return self.output(self.encode(x), x)

    # ----- training ----------------------------------------------------------------------------------
    def training_forward(self, x: Tensor) -> TrainOutput:
        """Forward pass that keeps what the losses need."""
        sae_in, hidden_pre = self._training_projection(x, self.b_enc)
        latents, extras = self.training_latents(hidden_pre)
        skip = self.skip(x)
        output = self.with_skip(self.decode(latents), skip)
        return TrainOutput(sae_in, hidden_pre, output, latents=latents, skip=skip, extras=extras)

    def training_latents(self, hidden_pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The latents of a training forward and what the losses read besides (`TrainOutput.extras`); an
        architecture whose penalty can be computed with its activation does both here (standard: the L1)."""
        return self.activate(hidden_pre), {}

    def _centring(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(normalised input, the shift the encoder subtracts (b_dec, or None), sae_in) for training kernels that
        take the shift themselves (for b_dec's cheap gradient); sae_in is kept for losses that encode again."""
        normalized = self._normalize_input(x)
        shift = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return normalized, shift, normalized if shift is None else normalized - shift

    def _training_projection(self, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """(sae_in, sae_in @ W_enc + bias) for raw input `x`, the matmul through `centred_linear`."""
        normalized, shift, sae_in = self._centring(x)
        return sae_in, centred_linear(normalized, shift, self.W_enc, bias)

    def reconstruction_loss(self, out: TrainOutput, target: Tensor) -> Tensor:
        """Squared error summed over the activation dimension, averaged over tokens (as in SAELens)."""
        return (out.output - target).pow(2).sum(dim=-1).mean()

    def sparsity_loss(self, out: TrainOutput) -> Tensor | None:
        """Unweighted sparsity penalty, or None when the architecture enforces sparsity by construction."""
        return None

    def auxiliary_loss(self, out: TrainOutput, target: Tensor, dead_mask: Tensor | None) -> Tensor | None:
        """Unweighted auxiliary loss (gated's gate reconstruction, TopK's AuxK), or None."""
        return None

    def sparsity_coefficient(self) -> float:
        """Weight of `sparsity_loss` (architectures with a penalty return their config's coefficient)."""
        return 0.0

    def aux_coefficient(self) -> float:
        """Weight of `auxiliary_loss`."""
        return 0.0

    def update_after_step(self, out: TrainOutput) -> None:
        """Non-gradient state updates after an optimiser step (e.g. BatchTopK's running threshold)."""

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each decoder row, so unit-norm rows stay on the sphere."""
        if self.W_dec.grad is None:
            return
        remove_parallel_component(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def initialize_b_dec(self, sample: Tensor) -> None:
        """Set b_dec from a sample of targets, as `cfg.b_dec_init` says."""
        if self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(sample.mean(dim=0))
        elif self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(sample.to(self.b_dec)))

    # ----- normalisation folding and saving ----------------------------------------------------------
    @torch.no_grad()
    def fold_activation_scale(
        self, in_scale: float | Sequence[float], out_scale: float | Sequence[float] | None = None
    ) -> None:
        """Make an SAE trained on `x * in_scale` (targets `* out_scale`) work on raw activations.

        Latents are unchanged; only weights move: pre-activations of `x` through `in_scale * W_enc` equal
        those of the scaled input, and dividing the decoder by `out_scale` returns outputs to raw units.
        """
        in_scale = _one_factor(in_scale)
        out_scale = in_scale if out_scale is None else _one_factor(out_scale)
        self.W_enc.mul_(in_scale)
        self.W_dec.div_(out_scale)
        self.b_dec.div_(out_scale)
        if self.cfg.skip_connection:
            self.W_skip.mul_(in_scale / out_scale)
        self.fold_extra(in_scale, out_scale)

    def fold_extra(self, in_scale: float, out_scale: float) -> None:
        """Architecture-specific part of folding (none by default)."""

    @torch.no_grad()
    def scale_latents(self, factors: Tensor) -> None:
        """Multiply each latent by its positive factor and divide its decoder row by it, so outputs stay the same.

        The encoder side scales with the latent (its W_enc column, biases and thresholds: `scale_encoder_biases`),
        which is exact where activation is positively homogeneous per latent (ReLU, JumpReLU, gated). Where
        latents compete for selection (TopK, BatchTopK) only a uniform factor leaves the outputs unchanged.
        """
        factors = factors.to(self.W_dec)
        if not self.per_latent_scaling and not bool((factors == factors[0]).all()):
            raise ValueError(
                f"a {self.cfg.architecture} SAE selects latents by size: only a uniform scale keeps "
                "its outputs, got per-latent factors"
            )
        self.W_enc.mul_(factors)
        self.scale_encoder_biases(factors)
        self.W_dec.div_(factors.unsqueeze(1))

    def scale_encoder_biases(self, factors: Tensor) -> None:
        """The per-latent encoder parameters' part of `scale_latents` (b_enc; architectures add thresholds)."""
        self.b_enc.mul_(factors)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> bool:
        """Give decoder rows unit norm, moving each row's norm into the encoder side, outputs unchanged (the
        form SAEBench expects and SAELens's method of this name gives). Architectures that select latents by
        size (TopK family) can move only a norm the rows share: the decoder kept on the sphere in training,
        then divided by the activation scale on folding. Rows of differing norms are left as they are there,
        as are all-zero rows. Returns whether every nonzero row now has unit norm."""
        norms = self.W_dec.norm(dim=1)
        live = norms > 0
        if not bool(live.any()):
            return False
        if self.per_latent_scaling:
            factors = torch.where(live, norms, torch.ones_like(norms))
        else:
            common = norms[live].mean()
            if not torch.allclose(norms[live], common.expand(int(live.sum())), rtol=1e-4, atol=0):
                return False
            factors = common.expand_as(norms).clone()
        self.scale_latents(factors)
        return True

    def weights_for_saving(self) -> dict[str, Tensor]:
        """Tensors under their SAELens names."""
        return {name: t.detach().contiguous() for name, t in self.state_dict().items()}

    def load_saved_weights(self, weights: dict[str, Tensor]) -> None:
        """Inverse of `weights_for_saving`."""
        self.load_state_dict(weights, strict=True)

    def save(self, path: str | Path, sparsity: Tensor | None = None) -> None:
        """Write `cfg.json`, `sae_weights.safetensors` (and `sparsity.safetensors`) to directory `path`."""
        save_sae(self, path, sparsity=sparsity)

    def clone(self) -> SAE:
        return copy.deepcopy(self)

    def _apply(self, fn: Callable, recurse: bool = True) -> SAE:
        # Every move or cast (.to, .cuda, .half, .bfloat16, ...) passes here: keep cfg.dtype/cfg.device true,
        # since SAELens/SAEBench code reads them rather than the parameters.
        result = super()._apply(fn, recurse)
        self.cfg.dtype = str(self.b_dec.dtype).removeprefix("torch.")  # every architecture has b_dec
        self.cfg.device = str(self.b_dec.device)
        return result

    def turn_off_forward_pass_hook_z_reshaping(self) -> None:
        """SAEBench's switch for SAELens hook_z SAEs; saelab SAEs never reshape, so there is nothing to switch."""

    def turn_on_forward_pass_hook_z_reshaping(self) -> None:
        raise NotImplementedError(
            "saelab SAEs read hook_z with the heads flattened (n_heads * d_head); they do not reshape it themselves"
        )

    @property
    def device(self) -> torch.device:
        return self.b_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.b_dec.dtype


def _one_factor(scale: float | Sequence[float]) -> float:
    """An SAE reads one hook: one scale factor (dictionaries over several layers take one per layer)."""
    if isinstance(scale, (int, float)):
        return float(scale)
    if len(scale) != 1:
        raise ValueError(f"an SAE over one hook point takes one scale factor, got {len(scale)}")
    return float(scale[0])


@torch.no_grad()
def remove_parallel_component(grad: Tensor, rows: Tensor) -> None:
    """In place, each row of `grad` minus its component along the same row of `rows` (both 2-D):
    g - (g . w) w / |w|^2, in three passes over the rows and no temporary of their size."""
    parallel = torch.linalg.vecdot(grad, rows) / rows.norm(dim=1).square_().clamp_min_(1e-24)
    grad.addcmul_(rows, parallel.unsqueeze(1), value=-1)
