"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): nested prefixes of the dictionary must each reconstruct.

The first w_1 latents alone, then the first w_2, ..., then all of them, each pay their own reconstruction
loss. Early latents therefore learn general features and later ones refine them, which curbs absorption.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saelab.core.config import ConfigError
from saelab.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.saes.fused_topk import sparse_decode
from saelab.saes.outputs import SparseLatents, TrainOutput
from saelab.saes.registry import register


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    matryoshka_widths: list[int] = field(default_factory=list)
    """Sizes of the nested prefix dictionaries, increasing; d_sae is added as the last one. Empty means
    [d_sae // 8, d_sae // 4, d_sae // 2]."""

    def validate(self) -> None:
        super().validate()
        widths = self.prefix_widths
        if any(w < 1 for w in widths) or widths != sorted(set(widths)) or widths[-1] != self.d_sae:
            raise ConfigError(
                f"matryoshka_widths must increase strictly within 1..d_sae ({self.d_sae}), got {self.matryoshka_widths}"
            )

    @property
    def prefix_widths(self) -> list[int]:
        widths = list(self.matryoshka_widths) or [self.d_sae // 8, self.d_sae // 4, self.d_sae // 2]
        widths = [w for w in widths if w > 0]
        return widths if widths and widths[-1] == self.d_sae else [*widths, self.d_sae]


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def _segments(self, out: TrainOutput) -> Iterator[Tensor]:
        """The decoded contribution of each prefix's new latents [start, width), sparse when possible."""
        start = 0
        if out.sparse is not None:
            rows = out.sparse.rows()
            for width in self.cfg.prefix_widths:
                keep = (out.sparse.cols >= start) & (out.sparse.cols < width)
                counts = torch.bincount(rows[keep], minlength=len(out.sparse.offsets))
                offsets = torch.cumsum(counts, 0) - counts
                segment = SparseLatents(out.sparse.cols[keep], offsets, out.sparse.values[keep])
                yield sparse_decode(segment, self.W_dec).reshape(out.output.shape)
                start = width
            return
        for width in self.cfg.prefix_widths:
            yield out.latents[..., start:width] @ self.W_dec[start:width]
            start = width

    def reconstruction_loss(self, out: TrainOutput, target: Tensor) -> Tensor:
        """Sum over prefixes of each prefix's squared error; the last prefix is the whole dictionary."""
        partial: Tensor = self.b_dec
        losses = []
        for segment in self._segments(out):
            partial = partial + segment
            prediction = self.with_skip(self._sae_output(partial), out.skip)
            losses.append((prediction - target).pow(2).sum(dim=-1).mean())
        return functools.reduce(operator.add, losses)  # there is always one prefix: the whole dictionary
