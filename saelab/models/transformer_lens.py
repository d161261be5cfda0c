"""TransformerLens models behind HookedModel's interface (optional: `pip install -e '.[transformer-lens]'`).

TransformerLens's `TransformerBridge` wraps a Hugging Face model and gives its activations the names researchers
know (`blocks.3.hook_resid_post`, `blocks.3.attn.hook_z`, `blocks.3.mlp.hook_post`, ...). This adapter exposes
the bridge with HookedModel's methods and mechanics, so harvesting, training and splicing work unchanged, and
the names shared with the plain Hugging Face path read and replace the same activations there and here:

- `blocks.N.hook_mlp_in` (gated off in the bridge by default) is switched on;
- `blocks.N.hook_resid_mid` is replaced as in HookedTransformer: the MLP and the rest of the residual stream both
  see the replacement (the bridge alone changes only what the second norm sees);
- `blocks.N.hook_z` is the same place as `blocks.N.attn.hook_z`.

Per-head activations `(batch, pos, n_heads, d_head)` are read and written as `(batch, pos, n_heads * d_head)`,
the width an SAE sees.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from torch import Tensor, nn

from saelab.core.errors import MissingDependency
from saelab.models.hook_points import FIRST, HookPoint
from saelab.models.hooks import HookedModel, _Site

if TYPE_CHECKING:  # an optional dependency: imported where a model is wrapped
    from transformer_lens.hook_points import HookPoint as TLHookPoint
    from transformer_lens.model_bridge import TransformerBridge

_LAYER = re.compile(r"^blocks\.(\d+)\.")
_LEVELS = itertools.count(10**6)  # TransformerLens removes hooks by level: one of its own for each site


def _flat(x: Tensor) -> Tensor:
    return x.flatten(-2) if x.dim() == 4 else x


class _Handle:
    def __init__(self, hook_point: TLHookPoint, level: int):
        self.hook_point, self.level = hook_point, level

    def remove(self) -> None:
        self.hook_point.remove_hooks("fwd", level=self.level)


def bridge_hook_points(bridge: TransformerBridge) -> tuple[dict[str, HookPoint], dict[str, str]]:
    """HookPoints for every name of the bridge (each the output of a TransformerLens HookPoint module), with
    resid_mid and hook_z as on the Hugging Face path; and why the resid_mid names it lacks are absent."""
    paths: dict[int, str] = {}
    for path, module in bridge.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), path)
    points = {
        name: HookPoint(name, paths[id(hook)], "output", int(m.group(1)) if (m := _LAYER.match(name)) else None)
        for name, hook in bridge.hook_dict.items()
    }
    missing = {}
    for i in range(int(bridge.cfg.n_layers)):
        block = f"blocks.{i}."
        if (z := points.get(block + "attn.hook_z")) is not None:
            points[block + "hook_z"] = replace(z, name=block + "hook_z")
        mlp_in, mid = points.get(block + "hook_mlp_in"), block + "hook_resid_mid"
        if mlp_in is None:
            continue
        if mid in points:  # read where hook_mlp_in is read, before it, as HookedTransformer computes one from the other
            points[mid] = replace(mlp_in, name=mid, order=FIRST, residual=points[block + "hook_resid_post"].module)
        else:
            missing[mid] = (
                f"block {i} is a parallel-attention block: attention and MLP both read the block's input, "
                f"so no residual stream runs between them ({block}hook_mlp_in is the MLP's input)"
            )
    return points, missing


class TransformerLensModel(HookedModel):
    """A TransformerLens TransformerBridge with HookedModel's interface and hook mechanics."""

    model: TransformerBridge

    def __init__(self, bridge: TransformerBridge, tokenizer=None):  # noqa: D107 - HookedModel's init expects HF blocks
        self._adopt(bridge, tokenizer if tokenizer is not None else getattr(bridge, "tokenizer", None))
        bridge.set_use_hook_mlp_in(True)
        self.hook_points, self.unavailable = bridge_hook_points(bridge)

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def hook_point(self, name: str) -> HookPoint:
        if name in self.hook_points:
            return self.hook_points[name]
        raise self.unknown_hook(name)

    def _install(self, module: str, side: str, site: _Site) -> _Handle:
        """Put `site` on a TransformerLens HookPoint (through TransformerLens, which must know its hooks)."""
        # every module hooked here is one of the bridge's HookPoints (bridge_hook_points made the names)
        hook_point, level = cast("TLHookPoint", self._modules[module]), next(_LEVELS)

        def hook(tensor: Tensor, hook: TLHookPoint | None = None) -> Tensor | None:  # TransformerLens's signature
            flat = _flat(tensor)
            new = site.run(flat)
            return None if new is flat else new.reshape(tensor.shape)

        hook_point.add_hook(hook, level=level)
        return _Handle(hook_point, level)

    def _logits(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask)


def wrap_transformer_lens(hf_model: nn.Module, tokenizer, name: str) -> TransformerLensModel:
    """A loaded Hugging Face model seen through TransformerLens (nothing is downloaded: the model is given)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        needed = "pip install 'saelab[transformer-lens]' (TransformerLens >= 3.9)"
        raise MissingDependency(f"TransformerLens models need: {needed}") from None
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
    return TransformerLensModel(bridge, tokenizer)
