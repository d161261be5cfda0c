"""The encoder matmul `(x - shift) @ W + b` with a cheap gradient for the shift (b_dec).

Written plainly, `x - b_dec` needs a gradient (b_dec learns), so autograd computes the gradient of the whole
centred input, a (batch x d_sae x d_in) matmul, only to sum it over the batch for b_dec. Here the shift's
gradient is `-W @ (sum of the output gradient over the batch)`, a matrix-vector product: a dense SAE step
needs five large matmuls instead of six. The input's gradient is computed only when the input needs one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.saes.autocast import to_autocast


class _CentredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shift: Tensor | None, W: Tensor, b: Tensor | None) -> Tensor:
        centred = x if shift is None else x - shift
        ctx.save_for_backward(centred, W)
        return centred @ W if b is None else torch.addmm(b, centred, W)

    @staticmethod
    def backward(ctx, grad: Tensor):
        centred, W = ctx.saved_tensors
        need_x, need_shift, need_w, need_b = ctx.needs_input_grad
        grad_sum = grad.sum(0) if need_b or need_shift else None
        grad_x = grad @ W.T if need_x else None
        grad_shift = -(W @ grad_sum) if need_shift else None
        grad_w = centred.T @ grad if need_w else None
        return grad_x, grad_shift, grad_w, grad_sum if need_b else None


def centred_linear(x: Tensor, shift: Tensor | None, W: Tensor, b: Tensor | None) -> Tensor:
    """`(x - shift) @ W + b` for inputs `(..., d_in)` (no shift when `shift` is None, no bias when `b` is)."""
    flat, shift, W, b = to_autocast(x.reshape(-1, x.shape[-1]), shift, W, b)
    return _CentredLinear.apply(flat, shift, W, b).reshape(*x.shape[:-1], W.shape[1])
