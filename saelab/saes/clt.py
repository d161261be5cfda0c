"""Cross-layer transcoders (Ameisen et al. 2025) and transcoder sets: dictionaries over several layers' MLPs.

A CLT reads one hook point in each of `layers` (e.g. `blocks.{layer}.hook_resid_mid`) and writes one in each
(`blocks.{layer}.hook_mlp_out`). Layer i has its own encoder and latents; a latent of layer i writes to the outputs
of layers i, i+1, ..., through one decoder per later layer (circuit-tracer's layout: `W_dec_i` is
`(latents per layer, layers from i to the last, d_out)`). With `cross_layer: false` each latent writes its own layer
only: a transcoder set, one transcoder per layer trained side by side (architecture name `transcoder_set`).

To the trainer a CLT is an SAE whose input and target are the concatenations of its layers' activations, so that
one trainer, one harvest and one checkpoint format serve it: `d_in`, `d_out` and `d_sae` are totals over the layers
(per layer: `d_in // n_layers`, ...), and the squared error summed over the concatenation is the sum of the
per-layer errors the paper trains on. Activation: TopK per layer and token (sparse kernels), or JumpReLU with the
paper's sparsity penalty `tanh(c * a * ||decoder||)` and its pre-activation loss for latents that never fire.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from saelab.saes.base import SAE, remove_parallel_component
from saelab.saes.clt_config import CLTConfig, TranscoderSetConfig, per_layer_factors
from saelab.saes.fused_topk import select_topk, sparse_decode, sparse_encode
from saelab.saes.jumprelu import _JumpReLU, add_thresholds, with_log_threshold
from saelab.saes.outputs import SparseLatents, TrainOutput
from saelab.saes.registry import register


@register("clt")
class CrossLayerTranscoder(SAE):
    """See the module docstring. Parameters: `W_enc (L, d, m)`, `b_enc (L*m)`, `W_dec_i (m, L-i, d_out)` for each
    layer index i (`(m, 1, d_out)` without cross-layer decoders), `b_dec (L*d_out)`, optional `W_skip (L, d_out, d)`
    and, for JumpReLU, per-latent thresholds."""

    config_class = CLTConfig
    cfg: CLTConfig
    layered = True
    default_decoder_init_norm = 0.1
    log_threshold: nn.Parameter  # JumpReLU only, as the threshold buffer
    threshold: Tensor
    per_latent_scaling = False  # one code path for TopK and JumpReLU: only uniform scales are folded

    # ----- shapes --------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def d_layer(self) -> int:
        return self.cfg.d_in // self.n_layers

    @property
    def d_layer_out(self) -> int:
        assert self.cfg.d_out is not None
        return self.cfg.d_out // self.n_layers

    @property
    def m(self) -> int:
        """Latents per layer."""
        return self.cfg.d_sae // self.n_layers

    def reach(self, i: int) -> int:
        """How many layers (from i on) the latents of layer index i write to."""
        return self.n_layers - i if self.cfg.cross_layer else 1

    def decoders(self) -> list[Tensor]:
        return [getattr(self, f"W_dec_{i}") for i in range(self.n_layers)]

    def decoder(self, source: int, target: int) -> Tensor | None:
        """`(m, d_out)`: how latents of layer index `source` write to layer index `target` (None: they do not)."""
        offset = target - source
        if not 0 <= offset < self.reach(source):
            return None
        return getattr(self, f"W_dec_{source}")[:, offset]

    @property
    def default_normalize_decoder(self) -> bool:  # type: ignore[override]
        return self.cfg.activation == "topk"  # TopK keeps each latent's decoder (all its layers) at unit norm

    # ----- parameters ----------------------------------------------------------------------------------
    def create_parameters(self) -> None:
        L, d, d_out, m = self.n_layers, self.d_layer, self.d_layer_out, self.m
        self.W_enc = self._empty(L, d, m)
        self.b_enc = self._empty(L * m)
        for i in range(L):
            setattr(self, f"W_dec_{i}", self._empty(m, self.reach(i), d_out))
        self.b_dec = self._empty(L * d_out)
        if self.cfg.skip_connection:
            self.W_skip = self._empty(L, d_out, d)
        if self.cfg.activation == "jumprelu":
            add_thresholds(self, L * m, self.cfg.init_threshold)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random decoder directions, each latent's whole decoder at `decoder_init_norm`; encoders random with
        columns of the same norm (layer widths differ in general, so the encoder is not a transpose)."""
        for W in self.decoders():
            W.normal_()
            W.mul_(self.decoder_init_norm / W.flatten(1).norm(dim=1).view(-1, 1, 1))
        self.W_enc.normal_()
        self.W_enc.mul_(self.decoder_init_norm / self.W_enc.norm(dim=1, keepdim=True))

    # ----- per layer (what splicing and attribution read) -----------------------------------------------
    def layer_pre_activation(self, i: int, x: Tensor) -> Tensor:
        """Pre-activations `(..., m)` of layer index i's latents for its raw input `x (..., d)`."""
        return x @ self.W_enc[i] + self.b_enc[i * self.m : (i + 1) * self.m]

    def layer_activate(self, i: int, pre: Tensor) -> Tensor:
        if self.cfg.activation == "topk":
            top = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        threshold = self.current_threshold()[i * self.m : (i + 1) * self.m]
        return pre * (pre > threshold).to(pre)

    def encode_layer(self, i: int, x: Tensor) -> Tensor:
        """Latents `(..., m)` of layer index i from its raw input."""
        return self.layer_activate(i, self.layer_pre_activation(i, x))

    def decode_layer(self, j: int, latents: Sequence[Tensor | None]) -> Tensor:
        """Output at layer index j from the latents of layers 0..j (`latents[i]` of layer i; None: not active)."""
        out = self.b_dec[j * self.d_layer_out : (j + 1) * self.d_layer_out]
        for i in range(j + 1):
            W = self.decoder(i, j)
            if W is not None and latents[i] is not None:
                out = out + latents[i] @ W  # type: ignore[operator]
        return out

    def skip_layer(self, j: int, x: Tensor) -> Tensor | None:
        """Layer index j's skip connection for its raw input, or None."""
        return x @ self.W_skip[j].T if self.cfg.skip_connection else None

    # ----- the SAE interface on concatenated activations -------------------------------------------------
    def _layers_of(self, x: Tensor, width: int) -> Tensor:
        return x.reshape(*x.shape[:-1], self.n_layers, width)

    def pre_activation(self, sae_in: Tensor) -> Tensor:
        xs = self._layers_of(sae_in, self.d_layer)
        pre = torch.einsum("...ld,ldm->...lm", xs, self.W_enc)
        return pre.reshape(*sae_in.shape[:-1], -1) + self.b_enc

    def activate(self, hidden_pre: Tensor) -> Tensor:
        if self.cfg.activation == "jumprelu" and self.training:  # thresholds learn through the STE
            return _JumpReLU.apply(hidden_pre, self.log_threshold.exp(), self.cfg.bandwidth)
        pres = self._layers_of(hidden_pre, self.m)
        latents = [self.layer_activate(i, pres[..., i, :]) for i in range(self.n_layers)]
        return torch.cat(latents, dim=-1)

    def decode(self, latents: Tensor) -> Tensor:
        per_layer = self._layers_of(latents, self.m)
        lead = latents.shape[:-1]
        out = self.b_dec.expand(*lead, -1).clone()
        for i, W in enumerate(self.decoders()):
            written = (per_layer[..., i, :] @ W.flatten(1)).reshape(*lead, -1)
            start = i * self.d_layer_out
            out[..., start : start + written.shape[-1]] += written
        return out

    def skip(self, x: Tensor) -> Tensor | None:
        if not self.cfg.skip_connection:
            return None
        out = torch.einsum("...ld,lod->...lo", self._layers_of(x, self.d_layer), self.W_skip)
        return out.reshape(*x.shape[:-1], -1)

    def training_forward(self, x: Tensor) -> TrainOutput:
        if self.cfg.activation == "jumprelu":
            hidden_pre = self.pre_activation(x)
            latents = self.activate(hidden_pre)
            skip = self.skip(x)
            return TrainOutput(x, hidden_pre, self.with_skip(self.decode(latents), skip), latents=latents, skip=skip)
        # TopK: per layer, the sparse kernels (one dense matmul each); the decoders read only the active rows
        flat = x.reshape(-1, self.cfg.d_in)
        xs = self._layers_of(flat, self.d_layer)
        n, k = flat.shape[0], self.cfg.k
        out = self.b_dec.expand(n, -1).clone()
        pres, values, cols = [], [], []
        for i, W in enumerate(self.decoders()):
            W_enc, b_enc = self.W_enc[i], self.b_enc[i * self.m : (i + 1) * self.m]
            active, pre = sparse_encode(xs[:, i], W_enc, b_enc, select_topk(k))
            active = active._replace(values=torch.relu(active.values))
            start = i * self.d_layer_out
            out[:, start : start + W.shape[1] * self.d_layer_out] += sparse_decode(active, W.flatten(1))
            pres.append(pre)
            values.append(active.values.view(n, k))
            cols.append(active.cols.view(n, k) + i * self.m)
        active_all = SparseLatents(
            torch.cat(cols, dim=1).reshape(-1),
            torch.arange(0, n * k * self.n_layers, k * self.n_layers, device=x.device),
            torch.cat(values, dim=1).reshape(-1),
        )
        skip = self.skip(x)
        output = self.with_skip(out.reshape(*x.shape[:-1], -1), skip)
        hidden_pre = torch.cat(pres, dim=1).reshape(*x.shape[:-1], -1)
        return TrainOutput(x, hidden_pre, output, sparse=active_all, skip=skip)

    # ----- losses --------------------------------------------------------------------------------------
    def decoder_norms(self) -> Tensor:
        """`(L*m)`: each latent's decoder norm over every layer it writes to."""
        return torch.cat([W.flatten(1).norm(dim=1) for W in self.decoders()])

    def current_threshold(self) -> Tensor:
        return self.log_threshold.exp() if self.training else self.threshold

    def sparsity_coefficient(self) -> float:
        return self.cfg.sparsity_coefficient if self.cfg.activation == "jumprelu" else 0.0

    def sparsity_loss(self, out: TrainOutput) -> Tensor | None:
        if self.cfg.activation != "jumprelu":
            return None
        weighted = out.latents.reshape(-1, self.cfg.d_sae) * self.decoder_norms()
        return torch.tanh(self.cfg.tanh_scale * weighted).sum(dim=-1).mean()

    def aux_coefficient(self) -> float:
        if self.cfg.aux_coefficient is not None:
            return self.cfg.aux_coefficient
        return 1 / 32 if self.cfg.activation == "topk" else 3e-6

    def auxiliary_loss(self, out: TrainOutput, target: Tensor, dead_mask: Tensor | None) -> Tensor | None:
        pre = out.hidden_pre.reshape(-1, self.cfg.d_sae)
        if self.cfg.activation == "jumprelu":  # pulls every latent's pre-activation towards its threshold
            below = torch.relu(self.log_threshold.exp() - pre)
            return (below * self.decoder_norms()).sum(dim=-1).mean()
        if dead_mask is None or not bool(dead_mask.any()):
            return None
        # AuxK per layer: the top k_aux dead latents of each layer model what the live latents left
        residual = (target - out.output).detach().reshape(pre.shape[0], -1)
        predicted = torch.zeros_like(residual)
        k_aux = self.cfg.k_aux or min(self.m // 2, 256)
        n_dead = 0
        for i, W in enumerate(self.decoders()):
            dead = dead_mask[i * self.m : (i + 1) * self.m].nonzero().squeeze(1)
            if dead.numel() == 0:
                continue
            n_dead += dead.numel()
            k = min(k_aux, dead.numel())
            top = pre[:, i * self.m + dead].topk(k, dim=-1, sorted=False)
            # decoded from the selected rows only (a (tokens, k_aux, width) gather would take gigabytes)
            chosen = SparseLatents(
                dead[top.indices].reshape(-1),
                torch.arange(0, top.indices.numel(), k, device=pre.device),
                torch.relu(top.values).reshape(-1),
            )
            written = sparse_decode(chosen, W.flatten(1))
            start = i * self.d_layer_out
            predicted[:, start : start + written.shape[-1]] += written
        scale = min(1.0, n_dead / (k_aux * self.n_layers))
        return scale * (predicted - residual).pow(2).sum(dim=-1).mean()

    @torch.no_grad()
    def update_after_step(self, out: TrainOutput) -> None:
        if self.cfg.activation == "jumprelu":
            self.threshold.copy_(self.log_threshold.exp())

    # ----- decoder norms, folding, saving --------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        for W in self.decoders():
            if W.grad is None:
                continue
            remove_parallel_component(W.grad.view(W.shape[0], -1), W.flatten(1))

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        for W in self.decoders():
            W.div_(W.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1))

    @torch.no_grad()
    def fold_activation_scale(
        self, in_scale: float | Sequence[float], out_scale: float | Sequence[float] | None = None
    ) -> None:
        """As `SAE.fold_activation_scale`, with one factor per layer allowed (each layer's activations scaled by
        their own factor in training)."""
        ins = per_layer_factors(in_scale, self.n_layers)
        outs = ins if out_scale is None else per_layer_factors(out_scale, self.n_layers)
        self.W_enc.mul_(ins.to(self.W_enc).view(-1, 1, 1))
        for i, W in enumerate(self.decoders()):
            W.div_(outs[i : i + W.shape[1]].to(W).view(1, -1, 1))
        self.b_dec.div_(outs.to(self.b_dec).repeat_interleave(self.d_layer_out))
        if self.cfg.skip_connection:
            self.W_skip.mul_((ins / outs).to(self.W_skip).view(-1, 1, 1))

    def scale_latents(self, factors: Tensor) -> None:
        raise NotImplementedError("a cross-layer transcoder's latents are not rescaled (fold_W_dec_norm keeps them)")

    def fold_W_dec_norm(self) -> bool:
        """Latent norms are left as trained: a CLT latent's decoder spans several layers, with no unit form that
        readers expect (circuit-tracer reads the decoders as they are)."""
        return False

    def weights_for_saving(self) -> dict[str, Tensor]:
        weights = super().weights_for_saving()
        weights.pop("log_threshold", None)
        return weights

    @torch.no_grad()
    def load_saved_weights(self, weights: dict[str, Tensor]) -> None:
        if self.cfg.activation == "jumprelu":
            weights = with_log_threshold(self, weights)
        super().load_saved_weights(weights)


@register("transcoder_set")
class TranscoderSet(CrossLayerTranscoder):
    """One transcoder per layer, trained side by side as one dictionary (a CLT without cross-layer decoders)."""

    config_class = TranscoderSetConfig
    cfg: TranscoderSetConfig
