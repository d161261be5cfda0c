"""The masked select of the training kernels: values kept where another tensor is positive, zero elsewhere.

ReLU's backward, gated's gate and JumpReLU's step all keep values where some tensor is positive. aten's
`threshold_backward(values, source, 0)` does exactly that in one pass, and on CPU it runs 3-8x faster than `where`,
`masked_fill` or a product with a bool mask (which is first copied to floats).
"""

from __future__ import annotations

import torch
from torch import Tensor


def where_positive(values: Tensor, source: Tensor) -> Tensor:
    """`values` where `source > 0`, else 0 (same shapes)."""
    return torch.ops.aten.threshold_backward(values, source, 0)
