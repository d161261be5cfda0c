"""SAEs spliced into a model: the one mechanism behind end-to-end training, spliced evaluations, analysis and steering.

Inside `with spliced(model, saes):` every forward pass of `model` runs each SAE at its hook points: it reads
`cfg.hook_name` and replaces the activation at its output hook (the same hook, or a transcoder's
`cfg.hook_name_out`) with what the SAE puts out. Several SAEs splice at once; one downstream of another reads
the other's output. Each SAE adds named hook points of its own, under its output hook's name (SAELens's names):

    {hook}.hook_sae_input       what the SAE reads
    {hook}.hook_sae_acts_post   its latents
    {hook}.hook_sae_recons      its reconstruction (from the latents, edited or not)
    {hook}.hook_sae_error       activation - reconstruction of the unedited latents
    {hook}.hook_sae_output      what the model receives

With `error_term=True` the model receives reconstruction + error: without edits that is the clean activation
exactly, so the logits are the clean ones while every latent is visible; an edit of the latents then changes
the activation by exactly the change of the decoded reconstruction.

A cross-layer transcoder (or transcoder set) splices at each of its layers: it reads each layer's input hook and
replaces each layer's output hook with the decoding of the latents of that layer and the layers before it (plus
the skip connection). Each layer's latents are computed once per forward pass, at that layer's output hook, from
the input the model gives it in that pass, and kept for the later layers. Each layer has the hook points above
under its own output hook; an edit of one layer's latents changes what every later layer decodes from them.

`positions` (a (batch, position) mask) limits the splice to those positions, e.g. all but special tokens: the
SAE then runs on the rows of those positions only, and its hook points hold those rows. `run(sae, x, activation)`
replaces how an SAE computes what the model receives (end-to-end training runs its training forward; the
zero-ablation baseline returns zeros; a cross-layer transcoder's `run` is called at each layer with that layer's
rows); the SAE hook points are then not available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

from torch import Tensor

from saelab.core.config import ConfigError, closest
from saelab.models.hooks import HookedModel, UnknownHookError
from saelab.saes.base import SAE
from saelab.saes.clt import CrossLayerTranscoder

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")

Edit = Callable[[Tensor], Tensor]
"""A function applied at an SAE hook point (e.g. `ablate([3])` at `...hook_sae_acts_post`)."""

Run = Callable[[SAE, Tensor, Tensor], Tensor]
"""(sae, its input rows, the activation rows it replaces) -> the rows the model receives instead."""

Compute = Callable[[Tensor, Tensor], Tensor]
"""(input rows, activation rows) -> the rows the model receives: one SAE (or one layer of a CLT) at one hook."""


def hooks_of(sae: SAE) -> tuple[str, str]:
    """(hook read, hook replaced): the same for an SAE, input and output hooks for a transcoder."""
    hook_in = sae.cfg.hook_name
    if hook_in is None:
        raise ConfigError("splicing an SAE into a model needs its hook point (cfg.hook_name)")
    return hook_in, (sae.cfg.hook_name_out if sae.cfg.transcoder and sae.cfg.hook_name_out else hook_in)


def splice_points(sae: SAE) -> list[tuple[str, str]]:
    """(hook read, hook replaced) of each place the SAE splices in: one (`hooks_of`), or one per layer of a
    cross-layer transcoder."""
    if isinstance(sae, CrossLayerTranscoder):
        return list(zip(sae.cfg.input_hooks(), sae.cfg.output_hooks(), strict=True))
    if len(sae.cfg.input_hooks()) > 1:
        raise ConfigError(
            f"a {sae.cfg.architecture} reads {', '.join(sae.cfg.input_hooks())} at once: it cannot be spliced "
            "into one forward pass (its output at a layer depends on later layers)"
        )
    return [hooks_of(sae)]


def _widths(sae: SAE) -> tuple[int, int]:
    """(input width, output width) at each splice point."""
    if isinstance(sae, CrossLayerTranscoder):
        return sae.d_layer, sae.d_layer_out
    assert sae.cfg.d_out is not None  # set from d_in by the config
    return sae.cfg.d_in, sae.cfg.d_out


def check_splice(model: HookedModel, saes: SAE | Sequence[SAE]) -> None:
    """Refuse SAEs that cannot be spliced together into `model`: a hook point it lacks (UnknownHookError,
    listing the valid ones), or two SAEs replacing the same activation."""
    replaced: set[str] = set()
    for sae in _as_list(saes):
        for hook_in, hook_out in splice_points(sae):
            model.hook_point(hook_in)
            model.hook_point(hook_out)
            if hook_out in replaced:
                raise ConfigError(f"two SAEs replace the same hook point '{hook_out}': splice them one at a time")
            replaced.add(hook_out)


def check_fits(model: HookedModel, saes: SAE | Sequence[SAE]) -> None:
    """`check_splice`, and that the model's activations at each SAE's hooks have the SAE's widths (one short
    forward pass): a clear error instead of a shape mismatch deep inside a forward pass."""
    saes = _as_list(saes)
    check_splice(model, saes)
    hooks = list(dict.fromkeys(hook for sae in saes for point in splice_points(sae) for hook in point))
    widths = model.hook_widths(hooks)
    for sae in saes:
        d_in, d_out = _widths(sae)
        per_layer = " per layer" if isinstance(sae, CrossLayerTranscoder) else ""
        where = f" of {sae.cfg.model_name}" if sae.cfg.model_name else ""
        for hook_in, hook_out in splice_points(sae):
            if widths[hook_in] != d_in:
                raise ConfigError(
                    f"the SAE's d_in{per_layer} is {d_in} but {hook_in}{where} has width {widths[hook_in]} "
                    "(is it the SAE's model and hook point?)"
                )
            if widths[hook_out] != d_out:
                raise ConfigError(
                    f"the transcoder's d_out{per_layer} is {d_out} but its output hook {hook_out}{where} has "
                    f"width {widths[hook_out]}"
                )


def model_for(sae: SAE, model: HookedModel | None = None) -> HookedModel:
    """`model` (checked with `check_fits`), or, if None, the model the SAE's config names, loaded on its device."""
    if model is None:
        if not sae.cfg.model_name:
            raise ConfigError("the SAE does not say which model it reads (cfg.model_name): pass the model")
        from saelab.models.loading import load_model  # loading pulls in transformers: only when needed

        model = load_model(sae.cfg.model_name, device=str(sae.device))
    check_fits(model, sae)
    return model


def sae_hook_names(saes: SAE | Sequence[SAE]) -> list[str]:
    """Every SAE hook point of `saes` (see the module docstring)."""
    return [f"{hook_out}.{name}" for sae in _as_list(saes) for _, hook_out in splice_points(sae) for name in SAE_HOOKS]


def _as_list(saes: SAE | Sequence[SAE]) -> list[SAE]:
    return [saes] if isinstance(saes, SAE) else list(saes)


@contextmanager
def spliced(
    model: HookedModel,
    saes: SAE | Sequence[SAE],
    error_term: bool = False,
    read: Sequence[str] = (),
    edit: Mapping[str, Edit] | None = None,
    positions: Tensor | None = None,
    run: Run | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Within the block, `model`'s forward passes run through `saes` (see the module docstring).

    `read` names SAE hook points or the model's own hook points; the yielded dict fills with their values.
    `edit` maps SAE hook points to functions applied there. `positions`: where to splice (default everywhere).
    `run`: how each SAE computes what the model receives (default: encode, decode, with the SAE hook points).
    """
    saes = _as_list(saes)
    check_splice(model, saes)
    edit = dict(edit or {})
    valid = sae_hook_names(saes)
    sae_reads = [name for name in read if name in valid or name.rsplit(".", 1)[-1].startswith("hook_sae")]
    for name in [*edit, *sae_reads]:
        if name not in valid:
            hint = closest(name, valid)
            raise UnknownHookError(
                f"unknown SAE hook point '{name}'."
                + (f" Did you mean '{hint}'?" if hint else "")
                + f" Valid names: {', '.join(valid)}"
            )
    if run is not None and (edit or sae_reads or error_term):
        raise ValueError("an SAE spliced with its own `run` has no SAE hook points, edits or error term")
    inputs = [hook_in for sae in saes for hook_in, hook_out in splice_points(sae) if hook_in != hook_out]
    model_reads = [name for name in read if name not in sae_reads]

    # One dict for both: the model's hooks fill it with what is read (transcoder inputs among them), the SAEs
    # add their own hook points.
    with model.hooks(read=[*inputs, *model_reads]) as cache:

        def replacing(hook_in: str, hook_out: str, compute: Compute) -> Callable[[Tensor], Tensor]:
            def replace(activation: Tensor) -> Tensor:
                x = cache[hook_in] if hook_in != hook_out else activation
                if positions is None:
                    return compute(x, activation).to(activation.dtype)
                keep = positions.to(activation.device)
                new = activation.clone()
                new[keep] = compute(x[keep], activation[keep]).to(activation.dtype)
                return new

            return replace

        writes = {}
        for sae in saes:
            computes: list[Compute]
            if run is not None:
                computes = [partial(run, sae)] * len(splice_points(sae))
            elif isinstance(sae, CrossLayerTranscoder):
                computes = _clt_hook_points(sae, cache, error_term, edit, sae_reads)
            else:
                computes = [_sae_hook_points(sae, cache, error_term, edit, sae_reads)]
            for (hook_in, hook_out), compute in zip(splice_points(sae), computes, strict=True):
                writes[hook_out] = replacing(hook_in, hook_out, compute)
        with model.hooks(write=writes):
            yield cache


HookPointValue = Callable[[str, Tensor], Tensor]
"""(SAE hook point name without its output hook, value) -> the value, edited and recorded as asked."""


def _at(hook_out: str, cache: dict[str, Tensor], edit: Mapping[str, Edit], reads: Sequence[str]) -> HookPointValue:
    def at(name: str, value: Tensor) -> Tensor:
        full = f"{hook_out}.{name}"
        if full in edit:  # on a copy, so that an in-place edit cannot reach the unedited values
            value = edit[full](value.clone())
        if full in reads:
            cache[full] = value
        return value

    return at


def _sae_hook_points(
    sae: SAE, cache: dict[str, Tensor], error_term: bool, edit: Mapping[str, Edit], reads: Sequence[str]
) -> Compute:
    """The default splice: encode and decode, passing through the SAE hook points (edits, reads, error term)."""
    hook_out = hooks_of(sae)[1]
    at = _at(hook_out, cache, edit, reads)
    wants_error = error_term or any(f"{hook_out}.hook_sae_error" in names for names in (reads, edit))

    def compute(x: Tensor, activation: Tensor) -> Tensor:
        x = at("hook_sae_input", x.to(sae.device, sae.dtype))
        latents = sae.encode(x)
        skip = sae.skip(x)
        clean = sae.with_skip(sae.decode(latents), skip)
        edited = at("hook_sae_acts_post", latents)
        recons = clean if edited is latents else sae.with_skip(sae.decode(edited), skip)
        return _output(at, activation, clean, recons, error_term, wants_error)

    return compute


def _clt_hook_points(
    clt: CrossLayerTranscoder,
    cache: dict[str, Tensor],
    error_term: bool,
    edit: Mapping[str, Edit],
    reads: Sequence[str],
) -> list[Compute]:
    """The default splice of a cross-layer transcoder, one function per layer index: layer j encodes its input
    and decodes the latents of layers 0..j kept from the same forward pass (the model reaches them in order)."""
    clean: list[Tensor] = []  # this pass's latents of the layers reached so far, as encoded
    edited: list[Tensor] = []  # and as edited: what the decoders read

    def layer(j: int, hook_out: str) -> Compute:
        at = _at(hook_out, cache, edit, reads)
        wants_error = error_term or any(f"{hook_out}.hook_sae_error" in names for names in (reads, edit))

        def compute(x: Tensor, activation: Tensor) -> Tensor:
            if j == 0:  # a new forward pass
                clean.clear()
                edited.clear()
            if len(clean) != j:
                raise RuntimeError(f"{hook_out} ran before the cross-layer transcoder's earlier layers in this pass")
            x = at("hook_sae_input", x.to(clt.device, clt.dtype))
            latents = clt.encode_layer(j, x)
            clean.append(latents)
            edited.append(at("hook_sae_acts_post", latents))
            skip = clt.skip_layer(j, x)
            decoded = clt.with_skip(clt.decode_layer(j, clean), skip)
            unchanged = all(e is c for e, c in zip(edited, clean, strict=True))
            recons = decoded if unchanged else clt.with_skip(clt.decode_layer(j, edited), skip)
            return _output(at, activation, decoded, recons, error_term, wants_error)

        return compute

    return [layer(j, hook_out) for j, hook_out in enumerate(clt.cfg.output_hooks())]


def _output(
    at: HookPointValue, activation: Tensor, clean: Tensor, recons: Tensor, error_term: bool, wants_error: bool
) -> Tensor:
    """What the model receives from the reconstruction of unedited latents (`clean`) and of the edited ones
    (`recons`, the same tensor when nothing was edited), through the last SAE hook points."""
    output = recons = at("hook_sae_recons", recons)
    if wants_error:
        error = activation.to(recons.dtype) - clean.detach()
        edited_error = at("hook_sae_error", error)
        if error_term:
            output = _with_error(activation, recons, clean, error, edited_error)
    return at("hook_sae_output", output)


def _with_error(activation: Tensor, recons: Tensor, clean: Tensor, error: Tensor, edited_error: Tensor) -> Tensor:
    """reconstruction + error, computed so that what was not edited stays exact."""
    if edited_error is not error:
        return recons + edited_error
    if recons is clean:  # nothing edited: the activation itself, bit for bit
        return activation
    return activation + (recons - clean).to(activation.dtype)  # moved by exactly the reconstruction's change
