"""The local replacement model of one prompt: a model with a cross-layer transcoder (or transcoder set) in place of
its MLPs, error terms, and frozen attention patterns and norm denominators (Ameisen et al. 2025, section 2.1).

On the prompt, every MLP output is split into what the transcoder writes (its active latents' decoder vectors times
their activations, its decoder bias, its skip connection) and an error (the true output minus that), held constant.
A model layer the transcoder does not cover is all error. With attention patterns and norm denominators frozen
(`saelab.models.frozen`), every value the transcoder or the unembedding reads is an affine function of the
*sources*: active latents, errors, token embeddings. The forward pass is the unmodified model's (its values, logits
included, are the clean ones); only the gradient graph is cut: an MLP output passes gradient through its skip
connection alone.

* `rows(targets)`: for a batch of targets (a read point, a position and a direction read there), one backward
  pass with those directions injected as gradients gives each target's direct linear effect of every source
  (the gradient at each source's write point contracted with its output vector).
* `replay(scales)`: the frozen model run again with each source's output scaled (0 removes it, 2 doubles it),
  patterns and denominators replayed from the prompt: what every target then reads. The edges are exactly the
  slopes of this affine map, which is how the tests check them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saelab.core.errors import ConfigError
from saelab.models.frozen import Freeze
from saelab.models.hooks import HookedModel
from saelab.saes.clt import CrossLayerTranscoder
from saelab.saes.clt_config import LAYER

CHUNK = 1024
"""Source vectors contracted with a batch of gradients at a time (bounds the memory of a backward pass's rows)."""
LOGITS = -1
"""The read point of logit targets: the unembedding's input, at the last position."""


def module_path(model: HookedModel, module) -> str:
    return next(path for path, m in model.model.named_modules() if m is module)


def _output_name(clt: CrossLayerTranscoder, layer: int) -> str:
    """The hook point written at a model layer, covered by the transcoder or not (its MLP output there)."""
    template = clt.cfg.hook_name_out or ""
    if LAYER not in template:
        template = re.sub(r"^blocks\.\d+\.", "blocks.{layer}.", template)
    if LAYER not in template:
        raise ConfigError(
            f"the transcoder covers layers {clt.cfg.layers} only and its output hook '{clt.cfg.hook_name_out}' "
            "does not say where the layer goes: name it with '{layer}' so that the other layers' MLP outputs "
            "become error nodes"
        )
    return template.replace(LAYER, str(layer))


@dataclass
class _Pass:
    """What one forward pass of the local replacement model leaves: per model layer the transcoder's reads and
    the MLP outputs as written (and as the model computed them); the embedding; the unembedding's input."""

    reads: dict[int, Tensor] = field(default_factory=dict)
    written: dict[int, Tensor] = field(default_factory=dict)
    outputs: dict[int, Tensor] = field(default_factory=dict)
    embedded: Tensor | None = None
    embedding: Tensor | None = None
    final: Tensor | None = None
    logits: Tensor | None = None


class LocalReplacement:
    """`model` run on `tokens` (1-D, position 0 a special token whose latents and error are not sources) with
    `clt` in place of its MLPs, as `batch` copies so that one backward pass serves `batch` targets."""

    def __init__(self, model: HookedModel, clt: CrossLayerTranscoder, tokens: Tensor, batch: int = 64):
        if not isinstance(clt, CrossLayerTranscoder):
            raise ConfigError(
                f"attribution graphs need a cross-layer transcoder or transcoder set (architecture 'clt' or "
                f"'transcoder_set'), not a {clt.cfg.architecture} SAE"
            )
        if max(clt.cfg.layers) >= model.n_layers:
            raise ConfigError(f"the transcoder covers layers {clt.cfg.layers} but the model has {model.n_layers}")
        self.model, self.clt, self.tokens, self.batch = model, clt, tokens, batch
        self.freeze = Freeze(model)
        self.covered = {layer: i for i, layer in enumerate(clt.cfg.layers)}  # model layer -> transcoder layer
        self.points = {
            layer: model.hook_point(name) for layer, name in zip(clt.cfg.layers, clt.cfg.input_hooks(), strict=True)
        }
        self.writes = {layer: _output_name(clt, layer) for layer in range(model.n_layers)}
        for name in self.writes.values():
            if model.hook_point(name).residual:
                raise ConfigError(f"a transcoder's output hook must be an MLP's output, not the residual {name}")
        hf: Any = model.model  # a Hugging Face model (Freeze checked)
        self.embed_path = module_path(model, hf.get_input_embeddings())
        self.unembed = hf.get_output_embeddings()
        self.n_layers, self.n_pos = model.n_layers, tokens.shape[0]
        self.dtype = torch.promote_types(next(hf.parameters()).dtype, torch.float32)
        self._record()

    # ----- forward passes ----------------------------------------------------------------------------
    def _read_name(self, layer: int) -> str:
        point = self.points[layer]
        return f"{point.module}:input" if point.side == "normalized" else point.name

    def _skip(self, layer: int, x: Tensor) -> Tensor | None:
        i = self.covered.get(layer)
        if i is None:
            return None
        skip = self.clt.skip_layer(i, x.to(self.clt.dtype))
        return None if skip is None else skip.to(x.dtype)

    def _run(self, batch: int, constants: dict[int, Tensor] | None = None, embedding: Tensor | None = None) -> _Pass:
        """One forward pass on `batch` copies of the prompt: recording (with gradients; MLP outputs held as their
        values minus the skip), or, given `constants` per layer and the `embedding`, replaying."""
        replay = constants is not None
        run = _Pass()
        names = [self._read_name(layer) for layer in self.points]
        unembed_in = f"{module_path(self.model, self.unembed)}:input"

        def read(layer: int) -> Tensor:
            if layer not in run.reads:
                name = self._read_name(layer)
                if name not in cache:
                    raise ConfigError(f"the transcoder reads {self.points[layer].name} after it writes layer {layer}")
                point = self.points[layer]
                x = cache[name]
                run.reads[layer] = self.freeze.normalize(point.module, x) if point.side == "normalized" else x
            return run.reads[layer]

        def writer(layer: int):
            def write(m: Tensor) -> Tensor:
                skip = self._skip(layer, read(layer)) if layer in self.covered else None
                run.outputs[layer] = m.detach()
                held = constants[layer].to(m).expand_as(m) if constants is not None else m.detach()
                if skip is not None and not replay:
                    held = held - skip.detach()
                new = held.clone().requires_grad_(not replay) if skip is None else (held + skip).to(m.dtype)
                run.written[layer] = new
                return new

            return write

        def embed(e: Tensor) -> Tensor:
            run.embedded = e.detach()
            value = run.embedded if embedding is None else embedding.to(e).expand_as(e)
            run.embedding = value.clone().requires_grad_(not replay)
            return run.embedding

        write = {name: writer(layer) for layer, name in self.writes.items()}
        forward = self.model.model.forward
        kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}
        with (
            torch.set_grad_enabled(not replay),
            self.freeze.frozen(replay=replay),
            self.model.hooks(read=[*names, unembed_in], write={self.embed_path: embed, **write}) as cache,
        ):
            run.logits = self.model.model(input_ids=self.tokens.expand(batch, -1), use_cache=False, **kwargs).logits
            for layer in self.points:
                read(layer)
        run.final = cache[unembed_in]
        return run

    @torch.no_grad()
    def _record(self) -> None:
        """The recording pass, and every source and constant of the prompt."""
        run = self._run(self.batch)
        assert run.final is not None and run.embedding is not None and run.embedded is not None
        assert run.logits is not None
        self.reads, self.written, self.final, self.embedding_leaf = run.reads, run.written, run.final, run.embedding
        self.logits = run.logits[0, -1].detach()
        self.token_vectors = run.embedded[0].to(self.dtype)  # the embedding module's outputs (Gemma's scale in)
        clt, T = self.clt, self.n_pos
        acts = []
        for layer, i in self.covered.items():
            a = clt.encode_layer(i, run.reads[layer][0].detach().to(clt.dtype))
            a[:1] = 0  # position 0 (a special token) has no feature nodes
            acts.append(a)
        stacked = torch.stack(acts)  # (transcoder layers, positions, latents)
        self.active = stacked.nonzero()  # (F, 3): transcoder layer, position, latent, sorted in that order
        self.values = stacked[tuple(self.active.T)].to(self.dtype)
        self.n_features = self.active.shape[0]
        self.error_start = self.n_features
        self.token_start = self.n_features + self.n_layers * T
        self.n_sources = self.token_start + T
        encoders = [clt.W_enc[i][:, f] for i, _, f in self.active.tolist()]
        self.encoders = torch.stack(encoders).to(self.dtype) if encoders else torch.zeros(0, clt.d_layer)
        self.errors: dict[int, Tensor] = {}
        self.constants: dict[int, Tensor] = {}
        self.pieces: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> (positions, columns, vectors)
        for layer in range(self.n_layers):
            m = run.outputs[layer][0].to(self.dtype)
            skip = self._skip(layer, run.reads[layer][0].detach()) if layer in self.covered else None
            held = m if skip is None else m - skip.to(self.dtype)
            if layer in self.covered:
                j = self.covered[layer]
                reconstruction = clt.decode_layer(j, acts).to(self.dtype)
                bias = clt.b_dec[j * clt.d_layer_out : (j + 1) * clt.d_layer_out].to(self.dtype)
                if (pieces := self._pieces(j)) is not None:
                    self.pieces[layer] = pieces
            else:
                reconstruction, bias = torch.zeros_like(m), torch.zeros_like(m[0])
            error = held - reconstruction
            error[:1] = 0
            constant = bias.expand_as(m).clone()
            constant[:1] = held[:1]  # at position 0, everything is a constant: its features are not sources
            self.errors[layer], self.constants[layer] = error, constant

    def _pieces(self, j: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """What the active latents write at transcoder layer j: (positions, columns, activation * decoder row),
        or None if none does."""
        rows, columns = [], []
        for c, (i, _, latent) in enumerate(self.active.tolist()):
            decoder = self.clt.decoder(i, j)
            if decoder is not None:
                rows.append(decoder[latent])
                columns.append(c)
        if not rows:
            return None
        at = torch.tensor(columns, dtype=torch.long, device=self.active.device)
        vectors = torch.stack(rows).to(self.dtype) * self.values[at, None]
        return self.active[at, 1], at, vectors

    # ----- edges ------------------------------------------------------------------------------------
    def rows(self, targets: Sequence[tuple[int, int, Tensor]], keep_graph: bool = True) -> Tensor:
        """`(len(targets), n_sources)`: the direct effect of every source on each target `(layer, position,
        direction)` read at the transcoder's input of that model layer (or at the unembedding's input: LOGITS)."""
        if len(targets) > self.batch:
            raise ValueError(f"{len(targets)} targets for a batch of {self.batch}")
        injected: dict[int, Tensor] = {}
        for b, (layer, position, direction) in enumerate(targets):
            tensor = self.final if layer == LOGITS else self.reads[layer]
            if layer not in injected:
                injected[layer] = torch.zeros_like(tensor)
            injected[layer][b, -1 if layer == LOGITS else position] = direction.to(tensor.dtype)
        outputs: list[Tensor] = [self.final if layer == LOGITS else self.reads[layer] for layer in injected]
        inputs: list[Tensor] = [self.written[layer] for layer in range(self.n_layers)] + [self.embedding_leaf]
        grads = torch.autograd.grad(
            outputs, inputs, list(injected.values()), retain_graph=keep_graph, allow_unused=True
        )
        n, T = len(targets), self.n_pos
        rows = torch.zeros(n, self.n_sources, dtype=self.dtype, device=self.token_vectors.device)
        for layer, grad in enumerate(grads[:-1]):
            if grad is None:
                continue
            g = grad[:n].to(self.dtype)
            if layer in self.pieces:
                positions, columns, vectors = self.pieces[layer]
                for start in range(0, len(columns), CHUNK):  # (targets, chunk, d) at a time
                    part = slice(start, start + CHUNK)
                    effects = (g[:, positions[part]] * vectors[part]).sum(-1)
                    rows.index_add_(1, columns[part], effects)
            start = self.error_start + layer * T
            rows[:, start : start + T] = torch.einsum("btd,td->bt", g, self.errors[layer])
        if grads[-1] is not None:
            rows[:, self.token_start :] = torch.einsum("btd,td->bt", grads[-1][:n].to(self.dtype), self.token_vectors)
        return rows

    # ----- values -----------------------------------------------------------------------------------
    @torch.no_grad()
    def replay(self, scales: Tensor, directions: Sequence[tuple[int, int, Tensor]]) -> Tensor:
        """What each target `(layer, position, direction)` reads when every source's output is multiplied by
        `scales` (n_sources), attention patterns and norm denominators those of the prompt."""
        scales = scales.to(self.token_vectors.device, self.dtype)
        constants = {}
        for layer in range(self.n_layers):
            value = self.constants[layer].clone()
            start = self.error_start + layer * self.n_pos
            value += scales[start : start + self.n_pos, None] * self.errors[layer]
            if layer in self.pieces:
                positions, columns, vectors = self.pieces[layer]
                value.index_add_(0, positions, scales[columns, None] * vectors)
            constants[layer] = value
        embedding = scales[self.token_start :, None] * self.token_vectors
        run = self._run(1, constants, embedding)
        assert run.final is not None
        values = []
        for layer, position, direction in directions:
            tensor = run.final if layer == LOGITS else run.reads[layer]
            at = -1 if layer == LOGITS else position  # the unembedding may read the last position only
            values.append(tensor[0, at].to(self.dtype) @ direction.to(self.dtype))
        return torch.stack(values)
