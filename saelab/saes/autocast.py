"""Mixed precision for saelab's own autograd kernels.

Under `torch.autocast`, PyTorch's matmuls cast their inputs to the autocast dtype (bfloat16) and their
backward follows. A custom `autograd.Function` (the centred encoder, the sparse TopK kernels) sees its inputs
as they come, mixed float32 weights and bfloat16 activations, and its backward runs outside autocast. So such
kernels take every floating input in the autocast dtype first: their forward and backward then run in one
dtype, and the casts' own backward hands float32 gradients to the float32 weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def to_autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors in the autocast dtype when autocast is on for their device; otherwise unchanged."""
    device_type = next(t for t in tensors if t is not None).device.type
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
