"""Sparse TopK training kernels: only the encoder's forward matmul is dense.

A dense TopK step costs five (batch x d_in x d_sae) matmuls. But only k of d_sae latents are nonzero per
token, so the decoder, its gradient and the encoder's gradient need only O(batch x k x d) work:

- `topk_encode` computes the pre-activations with one matmul and keeps the top k; its backward scatters the
  k gradients per token straight into the encoder weights (index_add) instead of a dense matmul. When a loss
  also used the dense pre-activations (AuxK, on dead latents), their gradient takes the dense route.
- `sparse_decode` sums k decoder rows per token (`embedding_bag`), whose gradient is again k rows per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, shift: Tensor | None, k: int):  # type: ignore[override]
        if shift is not None:
            x = x - shift
        pre = torch.addmm(b_enc, x, W_enc)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, W_enc, indices)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return values, indices, pre

    @staticmethod
    def backward(ctx, grad_values: Tensor | None, _grad_indices, grad_pre: Tensor | None):  # type: ignore[override]
        x, W_enc, indices = ctx.saved_tensors
        need_x, need_w, need_b, need_shift = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_shift = None
        if grad_pre is not None:  # dense route: the full pre-activations were used too
            dense = grad_pre.clone()
            if grad_values is not None:
                dense.scatter_add_(-1, indices, grad_values)
            grad_x = dense @ W_enc.T if need_x or need_shift else None
            grad_w = x.T @ dense if need_w else None
            grad_b = dense.sum(0)
            grad_shift = -grad_x.sum(0) if need_shift else None  # type: ignore[union-attr]
            return grad_x if need_x else None, grad_w, grad_b if need_b else None, grad_shift, None
        if grad_values is None:
            return None, None, None, None, None
        flat_indices = indices.reshape(-1)
        d_in, d_sae = W_enc.shape
        if need_x:
            grad_x = F.embedding_bag(indices, W_enc.T.contiguous(), per_sample_weights=grad_values, mode="sum")
        if need_w:
            grad_w = _scatter_rows(indices, grad_values, x, d_sae).T
        grad_b = torch.zeros(d_sae, dtype=x.dtype, device=x.device).index_add_(0, flat_indices, grad_values.reshape(-1))
        if need_shift:  # sum over tokens of -W_enc g_t = -W_enc (sum of g per latent), no per-token work
            grad_shift = -(W_enc @ grad_b)
        return grad_x, grad_w, grad_b if need_b else None, grad_shift, None


def _scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """out[indices[t, j]] += weights[t, j] * rows[t], summed: the weight gradient of an embedding_bag, which
    PyTorch computes without materialising the (batch * k, d) products."""
    with torch.enable_grad():
        table = torch.zeros(n_out, rows.shape[-1], dtype=rows.dtype, device=rows.device, requires_grad=True)
        bags = F.embedding_bag(indices, table, per_sample_weights=weights.detach(), mode="sum")
        (grad,) = torch.autograd.grad(bags, table, grad_outputs=rows)
    return grad


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, shift: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k pre-activation values, their latent indices, all pre-activations) of `(x - shift) @ W_enc + b_enc`
    for inputs `(batch, d_in)`; `shift` is b_dec when the SAE centres its input."""
    return _TopKEncode.apply(x, W_enc, b_enc, shift, k)


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]]: the decoder applied to k nonzero latents per token."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
