"""Sparse TopK / BatchTopK training kernels: only the encoder's forward matmul is dense.

A dense step costs five (batch x d_in x d_sae) matmuls. But only about k of d_sae latents are nonzero per
token, so the decoder, its gradient and the encoder's gradient need only O(batch x k x d) work:

- `sparse_encode` computes the pre-activations with one matmul and keeps the selected entries (the top k of
  each row, or the top k * batch of the whole batch); its backward scatters their gradients straight into the
  encoder weights instead of a dense matmul. When a loss also used the dense pre-activations (AuxK, on dead
  latents), their gradient takes the dense route.
- `sparse_decode` sums the selected decoder rows per token (`embedding_bag`), whose gradient is again only
  those rows.

The selected entries are kept as `SparseLatents(cols, offsets, values)` (embedding_bag's layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.saes.autocast import to_autocast
from saelab.saes.outputs import SparseLatents

Selector = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Pre-activations (batch, d_sae) -> (cols, offsets) of the entries to keep, grouped by token."""


def select_topk(k: int) -> Selector:
    """The k largest pre-activations of each token."""

    def select(pre: Tensor) -> tuple[Tensor, Tensor]:
        cols = pre.topk(k, dim=-1, sorted=False).indices.reshape(-1)
        return cols, torch.arange(0, cols.numel(), k, device=pre.device)

    return select


def batch_topk_flat_indices(pre: Tensor, k: int) -> Tensor:
    """Flat indices of the k * batch largest entries of the whole batch, in increasing order.

    A full-batch topk is slow on CPU (78 ms for 2048 x 4608). Instead a threshold is read off a sample of the
    entries, set a little low so that about 1.5 k * batch entries pass it, and the top k * batch of those are
    taken. That is exact whenever at least k * batch entries pass (the k * batch-th largest is then above the
    threshold); otherwise the full topk runs.
    """
    flat = pre.reshape(-1)
    n_keep = min(k * pre.shape[0], flat.numel())
    # ~2,000 sampled entries above the threshold put it within a few percent of the right rank
    stride = _coprime_stride(n_keep // 2048, pre.shape[1]) if n_keep < flat.numel() else 1
    if stride > 1:
        sample = flat[::stride]
        wanted = n_keep * sample.numel() / flat.numel()
        rank = min(sample.numel(), int(1.5 * wanted + 4 * wanted**0.5) + 1)
        threshold = sample.topk(rank, sorted=False).values.min()
        candidates = (flat >= threshold).nonzero().squeeze(1)
        if candidates.numel() >= n_keep:
            chosen = flat[candidates].topk(n_keep, sorted=False).indices
            return candidates[chosen].sort().values
    return flat.topk(n_keep, sorted=False).indices.sort().values


def _coprime_stride(stride: int, width: int) -> int:
    """The smallest stride >= `stride` sharing no factor with the row width, so a strided sample visits every
    column rather than a few."""
    while stride > 1 and math.gcd(stride, width) != 1:
        stride += 1
    return max(stride, 1)


def select_batch_topk(k: int) -> Selector:
    """The k * batch largest pre-activations of the whole batch (tokens keep any number)."""

    def select(pre: Tensor) -> tuple[Tensor, Tensor]:
        flat = batch_topk_flat_indices(pre, k)
        rows, cols = flat // pre.shape[1], flat % pre.shape[1]
        counts = torch.bincount(rows, minlength=pre.shape[0])
        return cols, torch.cumsum(counts, 0) - counts

    return select


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, shift: Tensor | None, select: Selector):
        if shift is not None:
            x = x - shift
        pre = torch.addmm(b_enc, x, W_enc)
        cols, offsets = select(pre)
        rows = SparseLatents(cols, offsets, cols).rows()
        values = pre[rows, cols]
        ctx.save_for_backward(x, W_enc, cols, offsets, rows)
        ctx.mark_non_differentiable(cols, offsets)
        ctx.set_materialize_grads(False)
        return values, cols, offsets, pre

    @staticmethod
    def backward(ctx, grad_values: Tensor | None, _grad_cols, _grad_offsets, grad_pre: Tensor | None):
        x, W_enc, cols, offsets, rows = ctx.saved_tensors
        need_x, need_w, need_b, need_shift = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_shift = None
        if grad_pre is not None:  # dense route: the full pre-activations were used too
            dense = grad_pre.clone()
            if grad_values is not None:
                dense.index_put_((rows, cols), grad_values, accumulate=True)
            grad_x = dense @ W_enc.T if need_x or need_shift else None
            grad_w = x.T @ dense if need_w else None
            grad_b = dense.sum(0)
            grad_shift = -grad_x.sum(0) if need_shift and grad_x is not None else None
            return grad_x if need_x else None, grad_w, grad_b if need_b else None, grad_shift, None
        if grad_values is None:
            return None, None, None, None, None
        d_in, d_sae = W_enc.shape
        if need_x:
            grad_x = F.embedding_bag(cols, W_enc.T.contiguous(), offsets, per_sample_weights=grad_values, mode="sum")
        if need_w:
            grad_w = _scatter_rows(cols, offsets, grad_values, x, d_sae).T
        grad_b = torch.zeros(d_sae, dtype=x.dtype, device=x.device).index_add_(0, cols, grad_values)
        if need_shift:  # sum over tokens of -W_enc g_t = -W_enc (sum of g per latent), no per-token work
            grad_shift = -(W_enc @ grad_b)
        return grad_x, grad_w, grad_b if need_b else None, grad_shift, None


def _scatter_rows(cols: Tensor, offsets: Tensor, weights: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """out[cols[i]] += weights[i] * rows[token of i], summed: the weight gradient of an embedding_bag, which
    PyTorch computes without materialising the (entries, d) products."""
    with torch.enable_grad():
        table = torch.zeros(n_out, rows.shape[-1], dtype=rows.dtype, device=rows.device, requires_grad=True)
        bags = F.embedding_bag(cols, table, offsets, per_sample_weights=weights.detach(), mode="sum")
        (grad,) = torch.autograd.grad(bags, table, grad_outputs=rows)
    return grad


def sparse_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, select: Selector, shift: Tensor | None = None
) -> tuple[SparseLatents, Tensor]:
    """(the selected pre-activations as `SparseLatents`, all pre-activations) of `(x - shift) @ W_enc + b_enc` for
    inputs `(batch, d_in)`; `shift` is b_dec when the SAE centres its input. Values are not yet ReLU'd."""
    x, W_enc, b_enc, shift = to_autocast(x, W_enc, b_enc, shift)
    values, cols, offsets, pre = _SparseEncode.apply(x, W_enc, b_enc, shift, select)
    return SparseLatents(cols, offsets, values), pre


def sparse_decode(active: SparseLatents, W_dec: Tensor) -> Tensor:
    """sum over a token's entries of value * W_dec[col]: the decoder applied to the nonzero latents only."""
    values, W_dec = to_autocast(active.values, W_dec)
    return F.embedding_bag(active.cols, W_dec, active.offsets, per_sample_weights=values, mode="sum")
