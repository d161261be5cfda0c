"""TransformerLens models behind HookedModel's interface (optional: `pip install -e '.[transformer-lens]'`).

TransformerLens >= 4 wraps a Hugging Face model in a `TransformerBridge` whose hook points carry the names
researchers know (`blocks.3.hook_resid_post`, `blocks.3.attn.hook_z`, `blocks.3.mlp.hook_post`, ...). This
adapter exposes that bridge with the same methods as `HookedModel`, so harvesting, training and splicing
work unchanged. Per-head activations `(batch, pos, n_heads, d_head)` are read and written as
`(batch, pos, n_heads * d_head)`, the width an SAE sees.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from saelab.models.hooks import HookedModel, HookPoint

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def _flat(x: Tensor) -> Tensor:
    return x.flatten(-2) if x.dim() == 4 else x


def _flat_fn(fn: Callable[[Tensor], Tensor]) -> Callable:
    """A TransformerLens hook that shows `fn` flattened heads and gives the model back its own layout."""

    def hook(x: Tensor, hook=None) -> Tensor:
        new = fn(_flat(x))
        return new.reshape(x.shape) if new is not None else None

    return hook


class TransformerLensModel(HookedModel):
    """A TransformerLens TransformerBridge with HookedModel's interface (its own hook names and mechanics)."""

    def __init__(self, bridge: nn.Module, tokenizer=None):  # noqa: D107 - HookedModel's init expects HF blocks
        self.model = bridge.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(bridge, "tokenizer", None)
        self.hook_points = {
            name: HookPoint(name, name, "output", int(m.group(1)) if (m := _LAYER.match(name)) else None)
            for name in bridge.hook_dict
        }

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def hook_point(self, name: str) -> HookPoint:
        if name in self.hook_points:
            return self.hook_points[name]
        raise self.unknown_hook(name)

    @contextmanager
    def hooks(
        self,
        read: Sequence[str] = (),
        write: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
        stop_after_last_read: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        """As HookedModel.hooks (stopping early is done by run_with_cache, through TransformerLens)."""
        cache: dict[str, Tensor] = {}
        fwd_hooks = [(self.hook_point(name).name, _flat_fn(fn)) for name, fn in (write or {}).items()]
        for name in read:
            def capture(x: Tensor, name: str = self.hook_point(name).name) -> None:
                cache[name] = x
            fwd_hooks.append((name, _flat_fn(capture)))
        with self.model.hooks(fwd_hooks=fwd_hooks):
            yield cache

    def run_with_cache(
        self, input_ids: Tensor, names: Sequence[str], attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Activations at `names`, running only the blocks up to the deepest one."""
        layers = [self.hook_point(name).layer for name in names]
        stop = max(layers) + 1 if None not in layers and max(layers) + 1 < self.n_layers else None
        with torch.no_grad():
            _, cache = self.model.run_with_cache(
                input_ids, names_filter=list(names), stop_at_layer=stop, attention_mask=attention_mask
            )
        return {name: _flat(cache[name]) for name in names}

    def logits(
        self, input_ids: Tensor, write: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        with self.hooks(write=write):
            return self.model(input_ids, attention_mask=attention_mask)


def wrap_transformer_lens(hf_model: nn.Module, tokenizer, name: str) -> TransformerLensModel:
    """A loaded Hugging Face model seen through TransformerLens (nothing is downloaded: the model is given)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        raise ImportError("TransformerLens models need: pip install 'saelab[transformer-lens]' (TransformerLens >= 4)") from None
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
    return TransformerLensModel(bridge, tokenizer)
