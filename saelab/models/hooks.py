"""Named hook points on any Hugging Face causal LM: read (capture) or write (replace) activations.

Every place an activation can be read or replaced has a name. TransformerLens-style aliases cover the usual
places of each decoder block; any module path also works, as `path` (its output) or `path:input`.

    blocks.{i}.hook_resid_pre    input of block i (residual stream before it)
    blocks.{i}.hook_resid_post   output of block i (residual stream after it)
    blocks.{i}.hook_attn_out     output of block i's attention
    blocks.{i}.hook_z            input of the attention output projection (n_heads * d_head)
    blocks.{i}.hook_mlp_in       input of block i's MLP
    blocks.{i}.hook_mlp_out      output of block i's MLP
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from saelab.config import closest

BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
OUT_PROJECTION_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


@dataclass(frozen=True)
class HookPoint:
    """Where a named activation lives: a module, which side of it, and the block it belongs to."""

    name: str
    module: str
    side: Literal["input", "output"]
    layer: int | None


class UnknownHookError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class _StopForward(Exception):
    """Raised after the last needed block, so the rest of the model (and the unembedding) never runs."""


def _child(module: nn.Module, names: Sequence[str]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and ModuleList of the decoder blocks."""
    modules = dict(model.named_modules())
    for path in BLOCK_LISTS:
        if isinstance(modules.get(path), nn.ModuleList):
            return path, modules[path]
    lists = [(p, m) for p, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return max(lists, key=lambda pm: len(pm[1]))


def discover_hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Aliases for every block of `model`, mapped onto its module paths."""
    blocks_path, blocks = find_blocks(model)
    points: dict[str, HookPoint] = {}
    for i, block in enumerate(blocks):
        path = f"{blocks_path}.{i}"
        points[f"blocks.{i}.hook_resid_pre"] = HookPoint(f"blocks.{i}.hook_resid_pre", path, "input", i)
        points[f"blocks.{i}.hook_resid_post"] = HookPoint(f"blocks.{i}.hook_resid_post", path, "output", i)
        attention = _child(block, ATTENTION_NAMES)
        if attention:
            points[f"blocks.{i}.hook_attn_out"] = HookPoint(f"blocks.{i}.hook_attn_out", f"{path}.{attention}", "output", i)
            projection = _child(getattr(block, attention), OUT_PROJECTION_NAMES)
            if projection:
                module = f"{path}.{attention}.{projection}"
                points[f"blocks.{i}.hook_z"] = HookPoint(f"blocks.{i}.hook_z", module, "input", i)
        mlp = _child(block, MLP_NAMES)
        if mlp:
            points[f"blocks.{i}.hook_mlp_in"] = HookPoint(f"blocks.{i}.hook_mlp_in", f"{path}.{mlp}", "input", i)
            points[f"blocks.{i}.hook_mlp_out"] = HookPoint(f"blocks.{i}.hook_mlp_out", f"{path}.{mlp}", "output", i)
    return points


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _with_first(value, first):
    return (first, *value[1:]) if isinstance(value, tuple) else first


class HookedModel:
    """A frozen causal LM whose activations can be read or replaced by hook-point name."""

    def __init__(self, model: nn.Module, tokenizer=None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.blocks_path, self.blocks = find_blocks(model)
        self.hook_points = discover_hook_points(model)
        self._modules = dict(model.named_modules())

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def hook_point(self, name: str) -> HookPoint:
        """The hook point called `name` (an alias, a module path, or `path:input`)."""
        if name in self.hook_points:
            return self.hook_points[name]
        path, _, side = name.partition(":")
        if path in self._modules and side in ("", "input", "output"):
            layer = None
            prefix = self.blocks_path + "."
            if path.startswith(prefix):
                layer = int(path[len(prefix) :].split(".")[0])
            return HookPoint(name, path, "input" if side == "input" else "output", layer)
        raise self.unknown_hook(name, f"; or any module path (e.g. '{self.blocks_path}.0.mlp', optionally with ':input')")

    def unknown_hook(self, name: str, also: str = "") -> UnknownHookError:
        """The error for an unknown hook name: the closest valid name and the list of valid ones."""
        hint = closest(name, self.hook_points)
        suggestion = f" Did you mean '{hint}'?" if hint else ""
        return UnknownHookError(f"unknown hook point '{name}'.{suggestion} Valid names: {', '.join(self.hook_points)}{also}")

    @contextmanager
    def hooks(
        self,
        read: Sequence[str] = (),
        write: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
        stop_after_last_read: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        """Within the block, forward passes fill the yielded dict with the `read` activations and replace
        each `write` activation by `fn(activation)`. With `stop_after_last_read`, the pass stops after the
        block of the deepest read (catch nothing: use `run_with_cache`)."""
        write = dict(write or {})
        cache: dict[str, Tensor] = {}
        handles = []

        def add(point: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> None:
            module = self._modules[point.module]
            if point.side == "output":
                def on_output(_m, _args, output):
                    new = fn(_first(output))
                    return None if new is None else _with_first(output, new)
                handles.append(module.register_forward_hook(on_output))
            else:
                def on_input(_m, args, kwargs):
                    if args:
                        new = fn(args[0])
                        return None if new is None else ((new, *args[1:]), kwargs)
                    key = next(iter(kwargs))  # e.g. hidden_states passed by keyword
                    new = fn(kwargs[key])
                    return None if new is None else (args, {**kwargs, key: new})
                handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))

        try:
            for name, fn in write.items():
                add(self.hook_point(name), fn)
            points = [self.hook_point(name) for name in read]
            for point in points:
                def capture(x, name=point.name):
                    cache[name] = x
                    return None
                add(point, capture)
            if stop_after_last_read and points:
                layers = [p.layer for p in points]
                if None not in layers:
                    def stop(_m, _args, _output):
                        raise _StopForward
                    handles.append(self.blocks[max(layers)].register_forward_hook(stop))
            yield cache
        finally:
            for handle in handles:
                handle.remove()

    def run_with_cache(
        self, input_ids: Tensor, names: Sequence[str], attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Activations at `names` for a batch of token ids, running only as far as the deepest one needs."""
        with torch.no_grad(), self.hooks(read=names, stop_after_last_read=True) as cache:
            try:
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
        return {name: cache[name] for name in names}

    def hook_widths(self, names: Sequence[str]) -> dict[str, int]:
        """The width of the activation at each hook point (from a two-token forward pass)."""
        device = next(self.model.parameters()).device
        acts = self.run_with_cache(torch.zeros(1, 2, dtype=torch.long, device=device), names)
        return {name: value.shape[-1] for name, value in acts.items()}

    def logits(
        self, input_ids: Tensor, write: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits of a full forward pass, with activations replaced at the `write` hook points."""
        with self.hooks(write=write):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
