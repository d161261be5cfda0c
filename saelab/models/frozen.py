"""A causal LM with its attention patterns and normalisation denominators frozen: linear in its residual stream.

Attribution graphs (Ameisen et al. 2025) study a *local replacement model*: the model on one prompt with its
attention patterns and every norm's denominator held at the values they take on that prompt. What remains between
the residual stream's entries (token embeddings, what MLPs write) and what reads it (later MLPs' inputs, the
unembedding) is then linear: residual additions, attention's value-output path through fixed patterns, norms as
fixed scalings, biases.

`Freeze(model).frozen()` installs that on a Hugging Face model, without changing any value of a forward pass:

* norms (every LayerNorm / RMSNorm module saelab recognises) pass gradient as `(x - mean) * scale` with the
  reciprocal denominator `scale` detached, then their weight and bias (their values stay their own);
* attention patterns depend only on the query and key projections' outputs (and fixed positions), so those are
  detached: gradients flow through the values only. Separate `q_proj`/`k_proj` (Llama, Mistral, Qwen, Gemma,
  OLMo, GPT-J), GPT-2's fused `c_attn` and GPT-NeoX's `query_key_value` are known.

The first pass *records* the detached values; `frozen(replay=True)` re-runs with the recorded ones instead of
recomputing them (an intervention in the local replacement model: change an input, and attention patterns and
norm scales stay those of the recorded prompt). A recording of copies of one prompt replays for any batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from saelab.core.errors import ConfigError
from saelab.models.hook_points import ATTENTION_NAMES, child, first_input, is_norm
from saelab.models.hooks import HookedModel, norm_affine, norm_scale, normalized

SEPARATE, GPT2_FUSED, NEOX_FUSED = "separate", "gpt2", "neox"


def attention_projections(model: HookedModel) -> list[tuple[str, str]]:
    """(module path, layout) of the modules whose outputs decide each block's attention pattern; a clear error
    for a block whose attention saelab cannot freeze."""
    found = []
    for i, block in enumerate(model.blocks):
        path = f"{model.blocks_path}.{i}"
        name = child(block, ATTENTION_NAMES)
        attention = getattr(block, name) if name else None
        if attention is None:
            raise ConfigError(f"saelab finds no attention module in block {i} ({type(block).__name__})")
        where = f"{path}.{name}"
        if child(attention, ("q_proj",)) and child(attention, ("k_proj",)):
            found += [(f"{where}.q_proj", SEPARATE), (f"{where}.k_proj", SEPARATE)]
        elif child(attention, ("c_attn",)) and not getattr(attention, "is_cross_attention", False):
            found.append((f"{where}.c_attn", GPT2_FUSED))
        elif child(attention, ("query_key_value",)) and hasattr(attention, "head_size"):
            found.append((f"{where}.query_key_value", NEOX_FUSED))
        else:
            raise ConfigError(
                f"saelab cannot freeze the attention pattern of {type(attention).__name__} (block {i}): it knows "
                "separate q_proj/k_proj projections (Llama, Mistral, Qwen, Gemma, OLMo), GPT-2's c_attn and "
                "GPT-NeoX's query_key_value"
            )
    return found


class Freeze:
    """Freezes `model`'s attention patterns and norm denominators (see the module docstring)."""

    def __init__(self, model: HookedModel):
        if not isinstance(model.model, nn.Module) or not hasattr(model.model, "get_input_embeddings"):
            raise ConfigError("freezing a model needs a Hugging Face model (load it without the 'tl:' prefix)")
        self.model = model
        self.projections = attention_projections(model)
        self.norms = {path: module for path, module in model.model.named_modules() if is_norm(module)}
        self.recorded: dict[str, Tensor] = {}
        self._affine: dict[str, Callable[[Tensor], Tensor]] = {}
        self.replaying = False

    def held(self, key: str, compute: Callable[[], Tensor], batch: int) -> Tensor:
        """The value frozen under `key`: computed and recorded (detached), or, when replaying, the recording
        (row 0 broadcast when the batch size differs)."""
        if not self.replaying:
            value = compute().detach()
            self.recorded[key] = value
            return value
        if key not in self.recorded:
            raise RuntimeError(f"nothing recorded for {key}: run frozen() without replay first")
        value = self.recorded[key]
        return value if value.shape[0] == batch else value[:1].expand(batch, *value.shape[1:])

    def normalize(self, path: str, x: Tensor) -> Tensor:
        """What norm `path` makes of `x` before its weight and bias, with the frozen denominator."""
        norm = self.norms[path]
        return normalized(norm, x, scale=self.held(path, lambda: norm_scale(norm, x), x.shape[0]))

    def _norm_hook(self, path: str):
        def hook(module: nn.Module, args, kwargs, output):
            x = first_input(args, kwargs)
            n = self.normalize(path, x)
            y = output[0] if isinstance(output, tuple) else output
            if self.replaying:
                new = self._affine[path](n)
            else:  # the norm's own values, with the gradient of the frozen map (its weight and bias, checked)
                self._affine[path] = norm_affine(module, n[:1], y[:1], path)
                linear = self._affine[path](n)
                new = y.detach() + (linear - linear.detach())
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _projection_hook(self, path: str, layout: str):
        def hook(module: nn.Module, args, output: Tensor) -> Tensor:
            batch = output.shape[0]
            if layout == SEPARATE:
                return self.held(path, lambda: output, batch)
            if layout == GPT2_FUSED:  # [query | key | value] along the last dimension
                width = output.shape[-1] // 3
                return torch.cat(
                    [self.held(path, lambda: output[..., : 2 * width], batch), output[..., 2 * width :]], -1
                )
            # GPT-NeoX: per head [query | key | value]
            heads = output.view(*output.shape[:-1], -1, 3 * module_head_size(self.model, path))
            width = heads.shape[-1] // 3
            query_key = self.held(path, lambda: heads[..., : 2 * width], batch)
            return torch.cat([query_key, heads[..., 2 * width :]], -1).view(output.shape)

        return hook

    @contextmanager
    def frozen(self, replay: bool = False) -> Iterator[Freeze]:
        """Within the block, forward passes of the model run frozen (recording, or with `replay` replaying)."""
        modules = dict(self.model.model.named_modules())
        self.replaying = replay
        handles = [modules[path].register_forward_hook(self._norm_hook(path), with_kwargs=True) for path in self.norms]
        handles += [modules[path].register_forward_hook(self._projection_hook(path, k)) for path, k in self.projections]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.replaying = False


def module_head_size(model: HookedModel, projection_path: str) -> int:
    attention = model.model.get_submodule(projection_path.rpartition(".")[0])
    size = attention.head_size
    assert isinstance(size, int)
    return size
