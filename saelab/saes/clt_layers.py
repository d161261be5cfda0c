"""A transcoder set as ordinary per-layer transcoders, and back.

Layer i of a transcoder set is a transcoder like any other: `layer_transcoder(tset, i)` is that layer as a saelab
SAE (architecture 'jumprelu' or 'topk', with `d_out`, its skip connection and its layer's hook names), computing
the same latents and outputs, so that every tool written for one SAE (SAELens's layout, evals, dashboards) takes
it. `transcoder_set_from_layers` joins such transcoders (also 'standard' ones: ReLU is JumpReLU at threshold 0)
into a set.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from saelab.core.errors import ConfigError
from saelab.saes.base import SAE
from saelab.saes.clt import CrossLayerTranscoder, TranscoderSet
from saelab.saes.clt_config import LAYER
from saelab.saes.registry import create_sae

JUMPRELU_FAMILY = ("standard", "jumprelu")
"""Per-layer architectures a JumpReLU set is made of ('standard' is ReLU: JumpReLU at threshold 0)."""


def layer_template(hook: str | None, layer: int) -> str | None:
    """`hook` (which names model layer `layer`) with '{layer}' where the layer goes: `blocks.3.hook_mlp_out` ->
    `blocks.{layer}.hook_mlp_out`. None stays None; a ConfigError if the hook does not name that layer."""
    if hook is None or LAYER in hook:
        return hook
    template, found = re.subn(rf"(?<=\.){layer}(?=\.|:|$)", LAYER, hook, count=1)
    if not found:
        raise ConfigError(f"hook '{hook}' does not name layer {layer}, so its layer cannot be replaced by '{{layer}}'")
    return template


@torch.no_grad()
def layer_transcoder(tset: CrossLayerTranscoder, i: int) -> SAE:
    """Layer index `i` of a transcoder set (model layer `tset.cfg.layers[i]`) as an ordinary transcoder, a copy
    with the same latents and outputs. JumpReLU layers compute `relu(pre) * (pre > threshold)` as a saelab or
    SAELens JumpReLU SAE does: the same as the set's `pre * (pre > threshold)` for the thresholds >= 0 training
    gives."""
    cfg = tset.cfg
    if cfg.cross_layer:
        raise ConfigError(
            "a cross-layer transcoder's latents write to several layers: only a transcoder set's layer "
            "is an ordinary transcoder"
        )
    if not 0 <= i < tset.n_layers:
        raise IndexError(f"layer index {i} out of range: the set has {tset.n_layers} layers ({cfg.layers})")
    layer = cfg.layers[i]
    m, d_out = tset.m, tset.d_layer_out
    if cfg.activation == "jumprelu" and bool((tset.threshold[i * m : (i + 1) * m] < 0).any()):
        raise ConfigError(
            f"layer {layer} has negative thresholds, which let negative pre-activations through: a JumpReLU "
            "transcoder (a ReLU after the jump) would compute other latents"
        )
    hook_in = cfg.input_hooks()[i] if cfg.hook_name is not None else None
    hook_out = cfg.output_hooks()[i] if cfg.hook_name_out is not None else None
    options: dict = {"k": cfg.k, "k_aux": cfg.k_aux} if cfg.activation == "topk" else {"bandwidth": cfg.bandwidth}
    if cfg.activation == "topk" and cfg.aux_coefficient is not None:
        options["aux_coefficient"] = cfg.aux_coefficient
    sae = create_sae(
        cfg.activation,
        d_in=tset.d_layer,
        d_sae=tset.m,
        d_out=tset.d_layer_out,
        transcoder=True,
        skip_connection=cfg.skip_connection,
        normalize_activations=cfg.normalize_activations,
        normalize_decoder=tset.normalize_decoder,
        dtype=cfg.dtype,
        device=cfg.device,
        model_name=cfg.model_name,
        hook_name=hook_in,
        hook_layer=layer,
        hook_name_out=hook_out,
        metadata=dict(cfg.metadata),
        **options,
    )
    weights = {
        "W_enc": tset.W_enc[i],
        "b_enc": tset.b_enc[i * m : (i + 1) * m],
        "W_dec": getattr(tset, f"W_dec_{i}")[:, 0],
        "b_dec": tset.b_dec[i * d_out : (i + 1) * d_out],
    }
    if cfg.skip_connection:
        weights["W_skip"] = tset.W_skip[i]
    if cfg.activation == "jumprelu":
        weights["threshold"] = tset.threshold[i * m : (i + 1) * m]
    sae.load_saved_weights({name: t.detach().clone().contiguous() for name, t in weights.items()})
    return sae.eval()


def _agreed(values: list, what: str):
    """The value every layer's transcoder has, or a ConfigError listing them."""
    if any(v != values[0] for v in values):
        raise ConfigError(f"the layers' transcoders differ in {what} ({values}); a set needs one {what}")
    return values[0]


@torch.no_grad()
def transcoder_set_from_layers(saes: Sequence[SAE], layers: Sequence[int] | None = None) -> TranscoderSet:
    """A transcoder set made of one transcoder per layer ('standard', 'jumprelu' or 'topk' SAEs of one shape and
    activation), computing what each computes at its layer. `layers` are their model layers (default: each
    one's `hook_layer`); their hook names, with the layer replaced by '{layer}', must agree."""
    if not saes:
        raise ConfigError("a transcoder set needs at least one layer's transcoder")
    architectures = {sae.cfg.architecture for sae in saes}
    if architectures <= set(JUMPRELU_FAMILY):
        activation = "jumprelu"
    elif architectures == {"topk"}:
        activation = "topk"
    else:
        raise ConfigError(
            f"a transcoder set's layers are all TopK or all ReLU/JumpReLU transcoders, not {sorted(architectures)}"
        )
    for sae in saes:
        if sae.cfg.apply_b_dec_to_input:
            raise ConfigError("a transcoder set's layers read their input as it is (apply_b_dec_to_input false)")
        if sae.cfg.normalize_activations != "none":
            raise ConfigError(
                f"a transcoder set's layers must read raw activations, not normalize_activations "
                f"'{sae.cfg.normalize_activations}' (fold the normalisation into the weights first)"
            )
    if layers is None:
        found = [sae.cfg.hook_layer for sae in saes]
        if any(layer is None for layer in found):
            raise ConfigError("give the model layer of each transcoder (layers=...): some have no hook_layer")
        layers = [int(layer) for layer in found if layer is not None]
    if len(layers) != len(saes):
        raise ConfigError(f"{len(layers)} layers for {len(saes)} transcoders")
    pairs = sorted(zip(saes, map(int, layers), strict=True), key=lambda pair: pair[1])
    saes, model_layers = [sae for sae, _ in pairs], [layer for _, layer in pairs]
    d_in, d_sae, d_out = _agreed([(s.cfg.d_in, s.cfg.d_sae, s.cfg.d_out) for s in saes], "shape (d_in, d_sae, d_out)")
    skip = _agreed([s.cfg.skip_connection for s in saes], "skip connection")
    options: dict = {"k": _agreed([getattr(s.cfg, "k", None) for s in saes], "k")} if activation == "topk" else {}
    tset = create_sae(
        "transcoder_set",
        d_in=len(saes) * d_in,
        d_sae=len(saes) * d_sae,
        d_out=len(saes) * d_out,
        layers=model_layers,
        activation=activation,
        skip_connection=skip,
        dtype=_agreed([s.cfg.dtype for s in saes], "dtype"),
        device=str(saes[0].device),
        model_name=_agreed([s.cfg.model_name for s in saes], "model_name"),
        hook_name=_agreed([layer_template(s.cfg.hook_name, n) for s, n in pairs], "hook_name"),
        hook_name_out=_agreed([layer_template(s.cfg.hook_name_out, n) for s, n in pairs], "hook_name_out"),
        metadata=dict(saes[0].cfg.metadata),
        **options,
    )
    weights: dict[str, Tensor] = {
        "W_enc": torch.stack([sae.W_enc for sae in saes]),
        "b_enc": torch.cat([sae.b_enc for sae in saes]),
        "b_dec": torch.cat([sae.b_dec for sae in saes]),
    }
    for i, sae in enumerate(saes):
        weights[f"W_dec_{i}"] = sae.W_dec.unsqueeze(1)
    if skip:
        weights["W_skip"] = torch.stack([sae.W_skip for sae in saes])
    if activation == "jumprelu":
        weights["threshold"] = torch.cat(
            [sae.state_dict()["threshold"] if sae.cfg.architecture == "jumprelu" else sae.b_enc * 0 for sae in saes]
        )
    tset.load_saved_weights({name: t.detach().clone().contiguous() for name, t in weights.items()})
    return tset.eval()  # type: ignore[return-value]
