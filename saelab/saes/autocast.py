"""Mixed precision for saelab's own autograd kernels.

Under `torch.autocast`, PyTorch's matmuls cast their inputs to the autocast dtype (bfloat16) and their
backward follows. A custom `autograd.Function` (the centred encoder, the sparse TopK kernels) sees its inputs
as they come, mixed float32 weights and bfloat16 activations, and its backward runs outside autocast. So such
kernels take every floating input in the autocast dtype first: their forward and backward then run in one
dtype, and the casts' own backward hands float32 gradients to the float32 weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

if TYPE_CHECKING:  # typing names of Python >= 3.11, for the checker only (saelab runs on 3.10)
    from typing import TypeVarTuple, Unpack

    Ts = TypeVarTuple("Ts")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def to_autocast(*tensors: Unpack[Ts]) -> tuple[Unpack[Ts]]:
    """The tensors (each a Tensor or None) in the autocast dtype when autocast is on for their device; otherwise
    unchanged. Each keeps its type: a Tensor given is a Tensor returned, a None a None."""
    device_type = next(t for t in tensors if isinstance(t, Tensor)).device.type
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    cast_ = tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)
    return cast("tuple[Unpack[Ts]]", cast_)
