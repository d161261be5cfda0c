"""e2e_sae's layout (Apollo Research): a run folder holding `final_config.yaml` and checkpoints
`samples_N.pt`, each the state dict of every SAE of the run, keyed by hook position with dots written as dashes
(`blocks-6-hook_resid_pre.encoder.0.weight`, ...).

An e2e_sae SAE is `c = ReLU(x W1^T + b1)`, `x_hat = c D^T + b2` with D the decoder weight normalised column by
column (unit-norm dictionary elements), and no centring of the input: a saelab standard SAE with
W_enc = W1^T, W_dec = D^T, b_dec = b2 and apply_b_dec_to_input false. Checkpoints are read with
`torch.load(weights_only=True)`: a pickle that would run code is refused.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from saelab.core.files import FileFormatError
from saelab.io.locations import layer_of
from saelab.saes.base import SAE
from saelab.saes.registry import create_sae

CONFIG = "final_config.yaml"
CHECKPOINT = re.compile(r"^samples_(\d+)\.pt$")
TENSORS = ("encoder.0.weight", "encoder.0.bias", "decoder.weight", "decoder.bias")


def checkpoints(path: Path) -> list[Path]:
    """The folder's `samples_N.pt` files, oldest (fewest samples) first."""
    found = [(int(m.group(1)), p) for p in path.glob("samples_*.pt") if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def is_e2e_sae_folder(path: Path) -> bool:
    return bool(checkpoints(path))


def _read_config(path: Path) -> dict[str, Any]:
    if not (path / CONFIG).exists():
        return {}
    try:
        config = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path / CONFIG} is not valid YAML: {e}") from None
    return config if isinstance(config, dict) else {}


def _read_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first_line = str(e).splitlines()[0]
        raise FileFormatError(f"{file}: refused or unreadable (only plain tensors are loaded): {first_line}") from None
    if not isinstance(state, dict):
        raise FileFormatError(f"{file}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def e2e_sae_positions(path: str | Path) -> list[str]:
    """Hook positions of the SAEs in an e2e_sae run folder (from its newest checkpoint)."""
    path = Path(path)
    state = _read_checkpoint(checkpoints(path)[-1])
    prefixes = {key[: -len(".decoder.bias")] for key in state if key.endswith(".decoder.bias")}
    return sorted(p.removeprefix("saes.").replace("-", ".") for p in prefixes)


def load_e2e_sae(path: str | Path, position: str | None = None, device: str = "cpu") -> SAE:
    """The SAE at hook `position` (e.g. 'blocks.6.hook_resid_pre'; may be omitted when the run has one) from
    the newest checkpoint of an e2e_sae run folder, on `device`, with its model (`tlens_model_name`), hook and
    layer."""
    path = Path(path)
    file = checkpoints(path)[-1]
    state = _read_checkpoint(file)
    positions = e2e_sae_positions(path)
    if position is None:
        if len(positions) != 1:
            raise FileFormatError(f"{path} holds SAEs at {', '.join(positions)}: name one (sae_id=...)")
        position = positions[0]
    if position not in positions:
        raise FileFormatError(f"{path} has no SAE at '{position}'; it has {', '.join(positions)}")
    key = position.replace(".", "-")
    prefix = next(p for p in (f"saes.{key}.", f"{key}.") if f"{p}decoder.bias" in state)
    try:
        w1, b1, w2, b2 = (state[prefix + name].float() for name in TENSORS)
    except KeyError as e:
        raise FileFormatError(f"{file}: no tensor {e} for the SAE at {position}") from None
    d_sae, d_in = w1.shape
    if b1.shape != (d_sae,) or w2.shape != (d_in, d_sae) or b2.shape != (d_in,):
        raise FileFormatError(
            f"{file}: shapes of the SAE at {position} do not fit together (encoder {tuple(w1.shape)}, "
            f"encoder bias {tuple(b1.shape)}, decoder {tuple(w2.shape)}, decoder bias {tuple(b2.shape)})"
        )
    config = _read_config(path)
    model_name = config.get("tlens_model_name")
    sae = create_sae(
        "standard",
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=False,
        hook_name=position,
        hook_layer=layer_of(position),
        model_name=model_name if isinstance(model_name, str) else None,
        device=device,
        metadata={"source_format": "e2e_sae", "checkpoint": file.name, "loss": config.get("loss")},
    )
    sae.load_saved_weights(
        {
            "W_enc": w1.T.contiguous(),
            "b_enc": b1,
            "W_dec": F.normalize(w2, dim=0).T.contiguous(),
            "b_dec": b2,
        }
    )
    return sae.to(sae.device)
