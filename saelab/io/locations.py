"""Where an SAE belongs: the model it reads, its hook point and that hook's layer.

saelab names hook points TransformerLens-style (`blocks.6.hook_resid_post`, see `saelab.models.hooks`). Other
libraries record the same places their own way (sparsify: a module path per folder, Gemma Scope: the repo and
a `layer_N` folder, dictionary_learning: `submodule_name`); each reader maps its names onto these with
`site_hook`, so that a loaded SAE can be evaluated and spliced without restating where it came from. `locate`
applies what the caller says on top of what the files say.
"""

from __future__ import annotations

import re

from saelab.core.errors import ConfigError
from saelab.saes.base import SAE

SITES = ("resid_pre", "resid_post", "attn_out", "z", "mlp_in", "mlp_out")
"""The per-block hook points every model has in saelab (`blocks.{layer}.hook_{site}`)."""

_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.|:|$)")


def site_hook(layer: int, site: str) -> str:
    """saelab's name for a per-block hook point: `site_hook(6, "mlp_out")` is `blocks.6.hook_mlp_out`."""
    if site not in SITES:
        raise ConfigError(f"unknown site '{site}'; one of {', '.join(SITES)}")
    return f"blocks.{layer}.hook_{site}"


def layer_of(hook_name: str | None) -> int | None:
    """The block index a hook name refers to (`blocks.6.hook_mlp_out`, `model.layers.6.mlp` -> 6), or None."""
    match = _LAYER.search(hook_name or "")
    return int(match.group(1)) if match else None


def locate(sae: SAE, model_name: str | None = None, hook_name: str | None = None, hook_layer: int | None = None) -> SAE:
    """`sae` with the given model name, hook name and layer replacing what its files said (None keeps those).
    A new hook name without a layer takes the layer it names, so the pair never disagrees."""
    if model_name is not None:
        sae.cfg.model_name = model_name
    if hook_name is not None:
        sae.cfg.hook_name = hook_name
        sae.cfg.hook_layer = layer_of(hook_name) if hook_layer is None else hook_layer
    elif hook_layer is not None:
        sae.cfg.hook_layer = hook_layer
    return sae
