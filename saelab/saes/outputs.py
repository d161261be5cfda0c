"""What an SAE's training forward pass hands to the losses: `TrainOutput`, with sparse latents where it has them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SparseLatents(NamedTuple):
    """The nonzero latents of a batch in embedding_bag's layout: token t's latents are `cols[offsets[t]:
    offsets[t+1]]` with values `values[offsets[t]:offsets[t+1]]`, so a token may have any number of them."""

    cols: Tensor
    offsets: Tensor
    values: Tensor

    def rows(self) -> Tensor:
        """The token of each entry."""
        counts = torch.diff(self.offsets, append=self.offsets.new_tensor([self.cols.numel()]))
        return torch.repeat_interleave(torch.arange(len(self.offsets), device=self.cols.device), counts)


class TrainOutput:
    """One training forward pass: what the losses and the trainer's statistics read.

    `sae_in` is the encoder's input (centred and normalised), `hidden_pre` the pre-activations, `output` the
    prediction (skip connection included; `skip` is that part alone, for losses that rebuild the output),
    `extras` architecture-specific tensors (gated's gate pre-activations). Sparse forwards (TopK family) give
    `sparse` instead of dense `latents`; the dense form is then built only if something asks for it.
    """

    def __init__(
        self,
        sae_in: Tensor,
        hidden_pre: Tensor,
        output: Tensor,
        latents: Tensor | None = None,
        sparse: SparseLatents | None = None,
        skip: Tensor | None = None,
        extras: dict[str, Tensor] | None = None,
    ):
        if latents is None and sparse is None:
            raise ValueError("a TrainOutput needs dense latents or sparse ones")
        self.sae_in, self.hidden_pre, self.output, self.skip = sae_in, hidden_pre, output, skip
        self.sparse = sparse
        self.extras = extras or {}
        self._latents = latents

    @property
    def latents(self) -> Tensor:
        """Dense latents `(..., d_sae)`."""
        if self._latents is None:
            assert self.sparse is not None
            values = self.sparse.values
            flat = torch.zeros(
                len(self.sparse.offsets), self.hidden_pre.shape[-1], dtype=values.dtype, device=values.device
            )
            flat = flat.index_put((self.sparse.rows(), self.sparse.cols), values)
            self._latents = flat.reshape(self.hidden_pre.shape)
        return self._latents

    @torch.no_grad()
    def firing_counts(self) -> Tensor:
        """Per latent, the number of tokens it fired on (float)."""
        d_sae = self.hidden_pre.shape[-1]
        if self._latents is None and self.sparse is not None:
            cols, _, values = self.sparse
            return torch.bincount(cols[values > 0], minlength=d_sae).float()
        # |sign| is 1 where a latent fired: two passes, where a bool mask then its float copy and their sum take
        # three (bool sums are slower still on CPU); float32 counts stay exact (bfloat16 ones would not)
        return torch.sign(self.latents.reshape(-1, d_sae)).abs_().sum(dim=0, dtype=torch.float32)
