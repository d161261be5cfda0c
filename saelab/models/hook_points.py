"""Where TransformerLens's hook names live in the modules of a Hugging Face causal LM.

The names mean what they mean in TransformerLens's HookedTransformer (the `hook_name` of SAELens SAEs):

    blocks.{i}.hook_resid_pre        the residual stream entering block i
    blocks.{i}.ln1.hook_normalized   resid_pre normalised by the block's first norm, before its weight and bias
    blocks.{i}.attn.hook_z           the heads' outputs, input of attention's output projection (n_heads * d_head);
                                     `blocks.{i}.hook_z` is the same place
    blocks.{i}.hook_attn_out         what attention adds to the residual stream
    blocks.{i}.hook_resid_mid        resid_pre + attn_out, the residual stream between attention and MLP (absent
                                     in parallel-attention blocks, where attention and MLP both read resid_pre)
    blocks.{i}.hook_mlp_in           the MLP branch's un-normalised input: resid_mid (resid_pre in parallel
                                     blocks). Replacing it changes what the MLP sees, not the residual stream;
                                     replacing resid_mid changes both, as in TransformerLens
    blocks.{i}.ln2.hook_normalized   hook_mlp_in normalised by the second norm, before its weight and bias
    blocks.{i}.mlp.hook_in           the MLP module's own input: the second norm's output, after weight and bias
    blocks.{i}.mlp.hook_post         the MLP's hidden activation, input of its output projection (d_mlp)
    blocks.{i}.hook_mlp_out          what the MLP adds to the residual stream
    blocks.{i}.hook_resid_post       the residual stream leaving block i
    ln_final.hook_normalized         the last residual stream normalised by the final norm, before its weight

`hook_normalized` is computed in float32 from the norm's input, (x - mean) / sqrt(var + eps) for LayerNorm and
x / sqrt(mean(x^2) + eps) for RMSNorm, as TransformerLens computes it; replacing it re-applies the norm's weight
(and bias). Sandwich-norm blocks (Gemma 2/3) count attention's and the MLP's outputs after their post-norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from saelab.core.errors import ConfigError

BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
OUT_PROJECTION_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
DOWN_PROJECTION_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc_out", "fc2")
FIRST_NORM_NAMES = ("input_layernorm", "ln_1", "ln1", "attention_norm", "self_attn_layer_norm")
SECOND_NORM_NAMES = ("post_attention_layernorm", "ln_2", "ln2", "ffn_norm")
SANDWICH_SECOND_NORM = ("pre_feedforward_layernorm",)  # where post_attention_layernorm follows attention
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
ATTENTION_POST_NORM, MLP_POST_NORM = "post_attention_layernorm", "post_feedforward_layernorm"

FIRST, DEFAULT, LAST = 0, 1, 2
"""Orders of hook points that share a side of a module: resid_mid runs before hook_mlp_in (which TransformerLens
computes from it), and the residual stream moved by a resid_mid write before anything reads the block output."""


Side = Literal["input", "output", "normalized"]


@dataclass(frozen=True)
class HookPoint:
    """Where a named activation lives: a module, which side of it, and the block it belongs to."""

    name: str
    module: str
    side: Side
    """The module's (first) input, its output, or (a norm) its input normalised before its weight and bias."""
    layer: int | None
    order: int = DEFAULT
    """Among hook points on the same side of the same module, lower orders run first."""
    residual: str | None = None
    """For a residual stream that is no module's output (resid_mid): the module (the block) that adds the rest of
    the block to it. Replacing the activation moves that module's output by the same change."""


class _Stop(Exception):
    pass


def first_input(args: tuple, kwargs: dict) -> Tensor:
    """A module call's first tensor input, positional or (e.g. hidden_states=) keyword."""
    return args[0] if args else next(iter(kwargs.values()))


def child(module: nn.Module, names: Sequence[str]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and ModuleList of the decoder blocks."""
    modules = dict(model.named_modules())
    for path in BLOCK_LISTS:
        if isinstance(modules.get(path), nn.ModuleList):
            return path, modules[path]
    lists = [(p, m) for p, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"cannot find the decoder blocks of {type(model).__name__}")
    return max(lists, key=lambda pm: len(pm[1]))


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm whose normalisation saelab can compute (it knows its epsilon)."""
    name = type(module).__name__.lower()
    has_eps = getattr(module, "variance_epsilon", getattr(module, "eps", None)) is not None
    return has_eps and (isinstance(module, nn.LayerNorm) or "layernorm" in name or "rmsnorm" in name)


def _block_points(i: int, path: str, block: nn.Module) -> tuple[list[HookPoint], str | None, str | None]:
    """Block i's hook points but resid_mid; the module whose input begins its MLP branch (or None); and why
    there is none, when there is none."""

    def point(name: str, module: str = "", side: Side = "output", order: int = DEFAULT) -> HookPoint:
        return HookPoint(f"blocks.{i}.{name}", f"{path}.{module}".rstrip("."), side, i, order)

    attention, mlp, ln1 = child(block, ATTENTION_NAMES), child(block, MLP_NAMES), child(block, FIRST_NORM_NAMES)
    # Sandwich norms (Gemma 2/3: a norm before and after each branch) and post-norms (OLMo 2: only after) add
    # the post-norms' outputs to the residual stream; with post-norms only, the MLP reads the stream itself.
    post_norms = all(child(block, (name,)) for name in (ATTENTION_POST_NORM, MLP_POST_NORM))
    ln2 = child(block, SANDWICH_SECOND_NORM if post_norms else SECOND_NORM_NAMES) if ln1 else None
    points = [point("hook_resid_pre", side="input"), point("hook_resid_post")]
    if attention:
        points.append(point("hook_attn_out", ATTENTION_POST_NORM if post_norms else attention))
        if projection := child(getattr(block, attention), OUT_PROJECTION_NAMES):
            z = point("attn.hook_z", f"{attention}.{projection}", "input")
            points += [z, replace(z, name=f"blocks.{i}.hook_z")]
    if mlp:
        points.append(point("hook_mlp_out", MLP_POST_NORM if post_norms else mlp))
        points.append(point("mlp.hook_in", mlp, "input", LAST))
        if projection := child(getattr(block, mlp), DOWN_PROJECTION_NAMES):
            points.append(point("mlp.hook_post", f"{mlp}.{projection}", "input"))
    for name, norm in (("ln1", ln1), ("ln2", ln2)):
        if norm and is_norm(getattr(block, norm)):
            points.append(point(f"{name}.hook_normalized", norm, "normalized"))
    entry = ln2 or (mlp if post_norms and not ln1 else None)
    if entry is None:
        return (
            points,
            None,
            (
                f"saelab finds no norm of block {i}'s own in front of its MLP (attention and MLP "
                "share one, in a parallel block, or it has an unfamiliar name), so it cannot place "
                f"this name; module paths ('{path}.{mlp or 'mlp'}:input') still work"
            ),
        )
    points.append(point("hook_mlp_in", entry, "input"))
    return points, f"{path}.{entry}", None


def discover_hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """TransformerLens's names for the places of every block of `model`, mapped onto its modules."""
    return discover(model)[0]


def discover(model: nn.Module) -> tuple[dict[str, HookPoint], dict[str, str]]:
    """The hook points of `model`, and why each TransformerLens name it lacks is absent."""
    blocks_path, blocks = find_blocks(model)
    points: dict[str, HookPoint] = {}
    missing: dict[str, str] = {}
    entries: dict[int, str] = {}
    for i, block in enumerate(blocks):
        block_points, entry, reason = _block_points(i, f"{blocks_path}.{i}", block)
        points.update((p.name, p) for p in block_points)
        if entry:
            entries[i] = entry
        else:
            assert reason is not None  # _block_points says why whenever it finds no entry
            missing[f"blocks.{i}.hook_mlp_in"] = missing[f"blocks.{i}.hook_resid_mid"] = reason
    parallel = _parallel_blocks(model, blocks_path, entries)
    for i, entry in entries.items():
        name = f"blocks.{i}.hook_resid_mid"
        if isinstance(parallel, str):
            missing[name] = f"saelab could not run the model to see if block {i} has parallel attention: {parallel}"
        elif i in parallel:
            missing[name] = (
                f"block {i} is a parallel-attention block: attention and MLP both read the block's input, "
                f"so no residual stream runs between them (blocks.{i}.hook_mlp_in is the MLP's input)"
            )
        else:
            points[name] = HookPoint(name, entry, "input", i, FIRST, residual=f"{blocks_path}.{i}")
    parent = blocks_path.rpartition(".")[0]
    root = model.get_submodule(parent)
    if (final := child(root, FINAL_NORM_NAMES)) and is_norm(getattr(root, final)):
        name = "ln_final.hook_normalized"
        points[name] = HookPoint(name, f"{parent}.{final}".lstrip("."), "normalized", None)
    ordered = sorted(points.values(), key=lambda p: (p.layer is None, p.layer or 0))  # block by block, then ln_final
    return {p.name: p for p in ordered}, missing


def _parallel_blocks(model: nn.Module, blocks_path: str, entries: dict[int, str]) -> set[int] | str:
    """Blocks whose MLP branch reads the block's own input (parallel attention), seen in a two-token forward
    pass; or, if the model could not run, why."""
    if not entries:
        return set()
    seen: dict[tuple[str, int], Tensor] = {}

    def keep(key):
        return lambda _m, args, kwargs: seen.__setitem__(key, first_input(args, kwargs))

    def stop(*_):
        raise _Stop

    handles = []
    for i, entry in entries.items():
        for key, module in ((("block", i), f"{blocks_path}.{i}"), (("entry", i), entry)):
            handles.append(model.get_submodule(module).register_forward_pre_hook(keep(key), with_kwargs=True))
    handles.append(model.get_submodule(f"{blocks_path}.{max(entries)}").register_forward_hook(stop))
    # Not the padding token: its embedding may be all zeros, and attention over zeros adds nothing, which
    # would make every block look parallel.
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    ids = [i for i in range(4) if i != pad][:2]
    tokens = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    except _Stop:
        pass
    except Exception as error:  # noqa: BLE001 - a model that cannot run here still reads and writes everything else
        return f"{type(error).__name__}: {error}"
    finally:
        for handle in handles:
            handle.remove()
    return {i for i in entries if torch.equal(seen[("block", i)], seen[("entry", i)])}
