"""Gemma Scope's `params.npz` (JumpReLU): `W_enc (d_in, d_sae)`, `W_dec (d_sae, d_in)`, `b_enc`, `b_dec`,
`threshold`. Its encoder does not subtract b_dec: latents = pre * (pre > threshold), pre = x W_enc + b_enc."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from saelab.io.saelens_format import FileFormatError

if TYPE_CHECKING:
    from saelab.saes.base import SAE

PARAMS_FILE = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def load_gemma_scope(path: str | Path, device: str | None = None) -> "SAE":
    """A saelab JumpReLU SAE from a Gemma Scope folder (or the params.npz file itself)."""
    from saelab.saes.base import create_sae

    path = Path(path)
    file = path / PARAMS_FILE if path.is_dir() else path
    try:
        with np.load(file, allow_pickle=False) as data:  # never unpickle
            arrays = {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in KEYS if k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise FileFormatError(f"{file}: not a readable .npz file: {e}") from None
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise FileFormatError(f"{file}: not a Gemma Scope JumpReLU SAE, missing {missing}")
    d_in, d_sae = arrays["W_enc"].shape
    expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise FileFormatError(f"{file}: {name} has shape {tuple(arrays[name].shape)}, W_enc implies {shape}")
    sae = create_sae("jumprelu", d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, device=device or "cpu",
                     metadata={"source_format": "gemma_scope"})
    sae.load_saved_weights({k: v.to(sae.device) for k, v in arrays.items()})
    return sae
