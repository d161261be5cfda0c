"""Named hook points on any Hugging Face causal LM: read (capture) or write (replace) activations.

Every place an activation can be read or replaced has a name. TransformerLens's names cover the places of each
decoder block, with TransformerLens's meaning (see `saelab.models.hook_points` for the list); any module path
also works, as `path` (its output) or `path:input`.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from saelab.core.config import closest
from saelab.core.errors import ConfigError, SaelabError
from saelab.models.hook_points import (
    FIRST,
    LAST,
    HookPoint,
    discover,
    discover_hook_points,
    find_blocks,
    first_input,
)

__all__ = ["HookPoint", "HookedModel", "UnknownHookError", "discover_hook_points", "find_blocks"]

Entry = Callable[[Tensor], "Tensor | None"]
"""A function run at a hook site: activation -> its replacement, or None to keep it."""


class UnknownHookError(SaelabError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class _StopForward(Exception):
    """Raised after the last needed block, so the rest of the model (and the unembedding) never runs."""


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _with_first(value, first):
    return (first, *value[1:]) if isinstance(value, tuple) else first


class Removable(Protocol):
    """A handle that takes a hook off (torch's RemovableHandle, or a TransformerLens one)."""

    def remove(self) -> None: ...


class _Site:
    """The functions active on one side of one module, run in (order, registration) order by one torch hook, so
    that the order of hook points sharing a place does not depend on which `hooks()` block added them first."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int, Entry]] = []
        self.handle: Removable | None = None  # set once the site is installed

    def run(self, value: Tensor) -> Tensor:
        for _, _, fn in list(self.entries):
            new = fn(value)
            if new is not None:
                value = new
        return value


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 models


def _centred(norm: nn.Module, x: Tensor) -> Tensor:
    x = x.to(_compute_dtype(x))
    return x if "rmsnorm" in type(norm).__name__.lower() else x - x.mean(-1, keepdim=True)


def norm_scale(norm: nn.Module, x: Tensor) -> Tensor:
    """`(..., 1)`: the reciprocal of the norm's denominator for its input `x` (1 / rms or 1 / std)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    assert eps is not None  # hook points are put only on norms with an epsilon (hook_points.is_norm)
    return torch.rsqrt(_centred(norm, x).pow(2).mean(-1, keepdim=True) + eps)


def normalized(norm: nn.Module, x: Tensor, scale: Tensor | None = None) -> Tensor:
    """The norm's input normalised before its weight and bias, in float32 or wider (as TransformerLens's
    hook_normalized). `scale`: the reciprocal denominator to use instead of x's own (a frozen norm)."""
    return _centred(norm, x) * (norm_scale(norm, x) if scale is None else scale)


def norm_affine(norm: nn.Module, n: Tensor, output: Tensor, name: str) -> Callable[[Tensor], Tensor]:
    """The map from normalised values to the norm's output (its weight and bias), checked against the output
    it just gave: RMSNorms scale by `weight` (Llama) or by `1 + weight` (Gemma)."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    dtype = _compute_dtype(n)
    gains = [None] if weight is None else [weight.to(dtype), 1.0 + weight.to(dtype)]
    tolerance = 1e-4 if output.dtype in (torch.float32, torch.float64) else 2e-2
    for gain in gains:

        def affine(values: Tensor, gain=gain) -> Tensor:
            out = values.to(dtype) if gain is None else values.to(dtype) * gain
            return (out if bias is None else out + bias.to(dtype)).to(output.dtype)

        if torch.allclose(affine(n), output, rtol=tolerance, atol=tolerance):
            return affine
    raise ConfigError(
        f"{name}: saelab cannot reproduce what {type(norm).__name__} outputs from its normalised input "
        "(an unfamiliar normalisation); read or replace its output (the module path) instead"
    )


class HookedModel:
    """A frozen causal LM whose activations can be read or replaced by hook-point name."""

    def __init__(self, model: nn.Module, tokenizer=None):
        self._adopt(model, tokenizer)
        self.blocks_path, self.blocks = find_blocks(model)
        self.hook_points, self.unavailable = discover(model)

    def _adopt(self, model: nn.Module, tokenizer) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self._modules = dict(model.named_modules())
        self._sites: dict[tuple[str, str], _Site] = {}
        self._added = 0

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
        example = f"{self.blocks_path}.0.mlp"
        raise self.unknown_hook(name, f"; or any module path (e.g. '{example}', optionally with ':input')")

    def unknown_hook(self, name: str, also: str = "") -> UnknownHookError:
        """The error for an unknown hook name: why it is absent, or the closest valid name; and the valid ones."""
        if name in self.unavailable:
            return UnknownHookError(f"hook point '{name}' does not exist in this model: {self.unavailable[name]}")
        hint = closest(name, self.hook_points)
        suggestion = f" Did you mean '{hint}'?" if hint else ""
        valid = ", ".join(self.hook_points)
        return UnknownHookError(f"unknown hook point '{name}'.{suggestion} Valid names: {valid}{also}")

    def _install(self, module: str, side: str, site: _Site) -> Removable:
        """Put `site` on a side of a module with one torch hook; returns its handle."""
        target = self._modules[module]
        if side == "input":

            def on_input(_m, args, kwargs):
                x = first_input(args, kwargs)
                new = site.run(x)
                if new is x:
                    return None
                if args:
                    return (new, *args[1:]), kwargs
                key = next(iter(kwargs))  # e.g. hidden_states passed by keyword
                return args, {**kwargs, key: new}

            return target.register_forward_pre_hook(on_input, with_kwargs=True)
        if side == "output":

            def on_output(_m, _args, output):
                y = _first(output)
                new = site.run(y)
                return None if new is y else _with_first(output, new)

            return target.register_forward_hook(on_output)

        def on_normalized(_m, args, kwargs, output):
            x, y = first_input(args, kwargs), _first(output)
            n = normalized(target, x)
            affine = norm_affine(target, n, y, module)
            start = n.to(x.dtype)
            new = site.run(start)
            return None if new is start else _with_first(output, affine(new))

        # before any hook on the norm's output, which the normalised values come before
        return target.register_forward_hook(on_normalized, with_kwargs=True, prepend=True)

    def _attach(self, module: str, side: str, order: int, fn: Entry) -> Callable[[], None]:
        """Run `fn` at a side of a module until the returned function is called."""
        key = (module, side)
        if key not in self._sites:
            site = self._sites[key] = _Site()
            site.handle = self._install(module, side, site)
        site = self._sites[key]
        self._added += 1
        entry = (order, self._added, fn)
        insort(site.entries, entry, key=lambda e: e[:2])

        def detach() -> None:
            site.entries.remove(entry)
            if not site.entries:
                assert site.handle is not None  # installed when the site was made
                site.handle.remove()
                del self._sites[key]

        return detach

    def _add(self, point: HookPoint, fn: Callable[[Tensor], Tensor | None], writes: bool) -> list[Callable[[], None]]:
        """Run `fn` on the activation at `point` (replacing it by what fn returns, unless None)."""
        if not (writes and point.residual):
            return [self._attach(point.module, point.side, point.order, fn)]
        # A residual stream that is no module's output: what reads it (the norm in front of the MLP) sees the
        # replacement, and the block's output, which adds the MLP's output to the unreplaced stream, moves by
        # the same change, so that everything after sees the replaced stream, as in TransformerLens.
        change: list[Tensor | None] = [None]

        def replace(value: Tensor) -> Tensor | None:
            new = fn(value)
            change[0] = None if new is None else new - value
            return new

        def move(value: Tensor) -> Tensor | None:
            moved, change[0] = (None if change[0] is None else value + change[0]), None
            return moved

        return [
            self._attach(point.module, point.side, point.order, replace),
            self._attach(point.residual, "output", FIRST, move),
        ]

    def _stop_point(self, layer: int) -> HookPoint:
        """The hook point after which nothing of block `layer` remains to run."""
        return self.hook_point(f"blocks.{layer}.hook_resid_post")

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
        cache: dict[str, Tensor] = {}
        detach: list[Callable[[], None]] = []
        try:
            for name, fn in (write or {}).items():
                detach += self._add(self.hook_point(name), fn, writes=True)
            points = [self.hook_point(name) for name in read]
            for point in points:

                def capture(x: Tensor, name: str = point.name) -> None:
                    cache[name] = x

                detach += self._add(point, capture, writes=False)
            layers = [p.layer for p in points if p.layer is not None]
            if stop_after_last_read and points and len(layers) == len(points):

                def stop(_value):
                    raise _StopForward

                last = self._stop_point(max(layers))
                detach.append(self._attach(last.module, last.side, LAST + 1, stop))
            yield cache
        finally:
            for undo in reversed(detach):
                undo()

    def _logits(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def run_with_cache(
        self, input_ids: Tensor, names: Sequence[str], attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Activations at `names` for a batch of token ids, running only as far as the deepest one needs."""
        with torch.no_grad(), self.hooks(read=names, stop_after_last_read=True) as cache:
            try:
                self._logits(input_ids, attention_mask)
            except _StopForward:
                pass
        return {name: cache[name] for name in names}

    def hook_widths(self, names: Sequence[str]) -> dict[str, int]:
        """The width of the activation at each hook point (from a two-token forward pass)."""
        device = next(self.model.parameters()).device
        acts = self.run_with_cache(torch.zeros(1, 2, dtype=torch.long, device=device), names)
        return {name: value.shape[-1] for name, value in acts.items()}

    def logits(
        self,
        input_ids: Tensor,
        write: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits of a full forward pass, with activations replaced at the `write` hook points."""
        with self.hooks(write=write):
            return self._logits(input_ids, attention_mask)
