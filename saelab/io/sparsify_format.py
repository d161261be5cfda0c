"""EleutherAI sparsify's layout: one folder per hook point with `cfg.json` and `sae.safetensors`.

sparsify stores the encoder as an `nn.Linear` (`encoder.weight (d_sae, d_in)`, `encoder.bias`), the decoder
as `W_dec (d_sae, d_in)`, `b_dec (d_in)` and an optional `W_skip (d_in, d_in)`; cfg.json holds `d_in`, `k`,
`num_latents` (or `expansion_factor`), `normalize_decoder`, `transcode`, `skip_connection`. Its encoder
subtracts b_dec first unless it is a transcoder, then keeps the top k of relu(pre-activations): the same
function as saelab's TopK, so the conversion only renames and transposes.

The folder's name is the hook point, a module path under the model's base (`layers.6` the block's output,
`layers.6.mlp` the MLP's; `h.6` in GPT-2), and a training run's `config.json` beside the folders names the
model. An SAE reads its module's output; a transcoder reads the module's input and predicts its output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes

from saelab.core.errors import ConfigError
from saelab.core.files import FileFormatError, atomic_write_bytes, atomic_write_text, read_json, read_safetensors
from saelab.io.locations import site_hook
from saelab.saes.base import SAE
from saelab.saes.registry import create_sae
from saelab.saes.topk import TopKConfig

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
HOOKPOINT = re.compile(r"(?:.*\.)?(?:layers|h|blocks)\.(\d+)(?:\.([\w.]+))?")
MODULE_SITES = {
    None: ("resid_pre", "resid_post"),
    "mlp": ("mlp_in", "mlp_out"),
    "feed_forward": ("mlp_in", "mlp_out"),
    "self_attn": (None, "attn_out"),
    "attn": (None, "attn_out"),
    "attention": (None, "attn_out"),
}
"""Module under a block -> the saelab sites of its (input, output)."""


def is_sparsify_folder(path: Path) -> bool:
    return (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file()


def sparsify_location(path: Path, transcode: bool) -> dict[str, Any]:
    """model_name, hook_name(_out) and hook_layer of a sparsify folder, from its name and its run's config.json
    (keys it does not tell are left out)."""
    found: dict[str, Any] = {}
    run_config = path.parent / "config.json"
    if run_config.is_file():
        try:
            model = read_json(run_config).get("model")
        except FileFormatError:
            model = None  # the run's settings are provenance only; the SAE's own files decide whether it loads
        if isinstance(model, str):
            found["model_name"] = model
    match = HOOKPOINT.fullmatch(path.name)
    if match:
        found["hook_layer"] = layer = int(match.group(1))
        if match.group(2) in MODULE_SITES:
            site_in, site_out = MODULE_SITES[match.group(2)]
            if not transcode:
                found["hook_name"] = site_hook(layer, site_out)
            elif site_in:
                found["hook_name"], found["hook_name_out"] = site_hook(layer, site_in), site_hook(layer, site_out)
    return found


def load_sparsify(path: str | Path, device: str = "cpu") -> SAE:
    """A saelab TopK SAE (or transcoder) from a sparsify folder, computing what sparsify computes, on `device`,
    with the model, hook and layer its folder name and run config tell."""
    path = Path(path)
    cfg = read_json(path / SPARSIFY_CFG)
    weights = read_safetensors(path / SPARSIFY_WEIGHTS)
    missing = [k for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if k not in weights]
    if missing or "d_in" not in cfg or "k" not in cfg:
        raise FileFormatError(f"{path}: not a sparsify SAE (missing {missing or ['d_in/k in cfg.json']})")
    if cfg.get("activation", "topk") != "topk":
        raise FileFormatError(f"{path}: sparsify activation '{cfg['activation']}' is not supported (only topk)")
    d_sae, d_in = weights["encoder.weight"].shape
    if d_in != cfg["d_in"] or weights["W_dec"].shape[0] != d_sae:
        raise FileFormatError(
            f"{path}: weight shapes {tuple(weights['encoder.weight'].shape)} and "
            f"{tuple(weights['W_dec'].shape)} disagree with d_in {cfg['d_in']}"
        )
    transcode = bool(cfg.get("transcode", False))
    skip = "W_skip" in weights
    sae = create_sae(
        "topk",
        d_in=d_in,
        d_sae=d_sae,
        k=int(cfg["k"]),
        d_out=weights["W_dec"].shape[1],
        transcoder=transcode or skip,
        skip_connection=skip,
        apply_b_dec_to_input=not transcode,
        normalize_decoder=bool(cfg.get("normalize_decoder", True)),
        dtype=str(weights["W_dec"].dtype).removeprefix("torch."),
        device=device,
        metadata={"source_format": "sparsify", "sparsify_cfg": cfg, "hookpoint": path.name},
        **sparsify_location(path, transcode),
    )
    state = {
        "W_enc": weights["encoder.weight"].T,
        "b_enc": weights["encoder.bias"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
    }
    if skip:
        state["W_skip"] = weights["W_skip"]
    sae.load_saved_weights({name: t.contiguous().to(sae.device) for name, t in state.items()})
    return sae


def save_sparsify(sae: SAE, path: str | Path) -> Path:
    """Write a TopK SAE in sparsify's layout (loadable with sparsify's SparseCoder.load_from_disk)."""
    cfg = sae.cfg
    if cfg.architecture != "topk":
        raise ConfigError(
            f"sparsify holds TopK SAEs only; this one is {cfg.architecture} (saelab convert --to "
            "saelens writes it for SAELens)"
        )
    if cfg.normalize_activations != "none":
        raise ConfigError("sparsify holds SAEs on raw activations; fold the normalisation first (trained SAEs are)")
    if cfg.apply_b_dec_to_input == cfg.transcoder:
        raise ConfigError("sparsify subtracts b_dec from the input exactly when it is not a transcoder")
    if cfg.d_out != cfg.d_in:
        raise ConfigError("sparsify's decoder has the input width")
    assert isinstance(cfg, TopKConfig)  # the config class of architecture 'topk'
    path = Path(path)
    tensors = {"encoder.weight": sae.W_enc.T, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if cfg.skip_connection:
        tensors["W_skip"] = sae.W_skip
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path / SPARSIFY_WEIGHTS, safetensors_bytes(plain))
    sparsify_cfg = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
        "normalize_decoder": sae.normalize_decoder,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": cfg.skip_connection,
        "transcode": cfg.transcoder,
        "d_in": cfg.d_in,
    }
    atomic_write_text(path / SPARSIFY_CFG, json.dumps(sparsify_cfg, indent=2))
    return path
