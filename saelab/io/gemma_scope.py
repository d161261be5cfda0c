"""Gemma Scope's `params.npz` (JumpReLU): `W_enc (d_in, d_sae)`, `W_dec (d_sae, d_in)`, `b_enc`, `b_dec`,
`threshold`. Its encoder does not subtract b_dec: latents = pre * (pre > threshold), pre = x W_enc + b_enc.

The file holds no metadata; its place does. Repos are named `gemma-scope-<size>-<pt|it>-<site>` (res: the
residual stream after the block, mlp: the MLP output, att: the attention heads' concatenated outputs before
the output projection) and hold `layer_<N>/width_<W>/average_l0_<L>/params.npz`; a hub cache folder keeps the
repo name (`models--google--gemma-scope-2b-pt-res`), as does a local clone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.core.files import FileFormatError
from saelab.io.locations import site_hook
from saelab.saes.base import SAE
from saelab.saes.registry import create_sae

PARAMS_FILE = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)(?![a-z])")
SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "z"}


def gemma_scope_location(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model_name, hook_name and hook_layer a Gemma Scope path tells (keys it does not tell left out), and
    its provenance (average L0)."""
    found: dict[str, Any] = {}
    metadata: dict[str, Any] = {"source_format": "gemma_scope"}
    for part in Path(path).absolute().parts:
        if match := REPO.search(part):
            size, variant, site = match.groups()
            found["model_name"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
            found["site"] = SITES[site]
        if match := re.fullmatch(r"layer_(\d+)", part):
            found["hook_layer"] = int(match.group(1))
        if match := re.fullmatch(r"average_l0_(\d+)", part):
            metadata["average_l0"] = int(match.group(1))
    site = found.pop("site", None)
    if site and "hook_layer" in found:
        found["hook_name"] = site_hook(found["hook_layer"], site)
    return found, metadata


def load_gemma_scope(path: str | Path, device: str = "cpu") -> SAE:
    """A saelab JumpReLU SAE from a Gemma Scope folder (or the params.npz file itself), on `device`, with the
    model, hook and layer its path names."""
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
    location, metadata = gemma_scope_location(file.parent)
    sae = create_sae(
        "jumprelu", d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, device=device, metadata=metadata, **location
    )
    sae.load_saved_weights({k: v.to(sae.device) for k, v in arrays.items()})
    return sae
