"""From a run config's `sae`, `saes` and `sweep` sections to the named SAEs a run trains.

`sae` holds the options every SAE shares; `saes` names several SAEs, each overriding some of them (its hook
point, say); `sweep` lists values to try, and every SAE is trained once per combination. All of them read one
stream of activations, so a sweep or a set of layers costs one harvest. Two keys are not SAE options but
per-SAE training settings: `lr` (its learning rate) and `init_from` (a saved SAE to start from).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

from saelab.core.config import ConfigError
from saelab.saes.base import SAE
from saelab.saes.clt_config import hooks_at_layers
from saelab.saes.config import SAEConfig
from saelab.saes.registry import architecture_class, make_config, sae_from_config

RUN_KEYS = ("lr", "init_from")
"""Per-SAE settings that are not part of the SAE's config."""


def _shared_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(SAEConfig)} | {"expansion_factor", *RUN_KEYS}


def _own_keys(architecture: Any) -> set[str]:
    """The options an architecture takes (none for a name that is not one: make_config reports it later)."""
    try:
        return {f.name for f in dataclasses.fields(architecture_class(architecture).config_class)}
    except ConfigError:
        return set()


def merge_options(defaults: Mapping[str, Any], *overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` updated by each override in turn; an override that changes the architecture drops the
    options the new one does not take (a TopK `k` means nothing to a standard SAE)."""
    merged = dict(defaults)
    for override in overrides:
        if "architecture" in override and override["architecture"] != merged.get("architecture"):
            kept = _shared_keys() | _own_keys(override["architecture"])  # topk -> batchtopk keeps k
            merged = {k: v for k, v in merged.items() if k in kept}
        merged.update(override)
    if "d_sae" in merged and "expansion_factor" in merged and not any("expansion_factor" in o for o in overrides):
        merged.pop("expansion_factor")  # an explicit width wins over the inherited factor
    return merged


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sae_specs(
    base: Mapping[str, Any],
    named: Mapping[str, Mapping[str, Any]],
    sweep: Mapping[str, list[Any]],
    default_hook: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Name -> options of every SAE of the run. Without `named` there is one SAE called 'sae'; each sweep
    combination adds `key=value` parts to the name."""
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key} must be a non-empty list of values, got {values!r}")
    entries = {name: dict(options or {}) for name, options in named.items()} or {"sae": {}}
    specs: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"saes.{name} must be a mapping of SAE options, got {entry!r}")
        for combination in itertools.product(*sweep.values()):
            combo = dict(zip(sweep, combination, strict=True))
            label = "_".join(f"{k}={_label(v)}" for k, v in combo.items())
            full_name = "_".join(p for p in (name if named or not label else "", label) if p) or name
            options = merge_options(base, entry, combo)
            if default_hook is not None:  # a list of hooks names its own: the first one's layer is recorded
                named_hooks = options.get("hook_names")
                first = named_hooks[0] if isinstance(named_hooks, list) and _is_hook_list(named_hooks) else None
                options.setdefault("hook_name", first or default_hook)
            specs[full_name] = options
    return specs


def spec_hooks(options: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(the hook points read, the hook points reconstructed) of an SAE's options; a dictionary over several
    layers (`layers` given) names them with a '{layer}' template, a crosscoder may list them (`hook_names`)."""
    hook, hook_out = options.get("hook_name"), options.get("hook_name_out")
    layers, named = options.get("layers"), options.get("hook_names")
    if named is not None:
        if not _is_hook_list(named):
            raise ConfigError(f"hook_names must be a non-empty list of hook names, got {named!r}")
        if layers is not None:
            raise ConfigError("give the hooks read as hook_names or as hook_name at each of layers, not both")
        return list(named), list(named)
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(layer, int) for layer in layers):
            raise ConfigError(f"layers must be a list of layer numbers, got {layers!r}")
        return hooks_at_layers(hook, layers), hooks_at_layers(hook_out or hook, layers)
    inputs = [] if hook is None else [hook]
    return inputs, ([hook_out] if hook_out else inputs)


def _is_hook_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(name, str) for name in value)


def build_sae(options: Mapping[str, Any], d_in: int, origin: Mapping[str, Any] | None = None) -> SAE:
    """One SAE from its options: width from d_in and expansion_factor when d_sae is not given, provenance
    (`origin`: model, data, hook layer) recorded in its config, weights from `init_from` when given."""
    options = {k: v for k, v in options.items() if k not in RUN_KEYS}
    expansion = options.pop("expansion_factor", None)
    if "d_sae" not in options:
        if expansion is None:
            raise ConfigError("sae needs d_sae or expansion_factor")
        if isinstance(expansion, bool) or not isinstance(expansion, (int, float)) or not 0 < expansion < 2**20:
            raise ConfigError(f"sae.expansion_factor must be a positive number, got {expansion!r}")
        options["d_sae"] = int(math.ceil(float(expansion) * d_in))
    options.setdefault("d_in", d_in)
    if options["d_in"] != d_in:
        raise ConfigError(f"sae.d_in is {options['d_in']} but the activations have width {d_in}")
    if origin:
        origin = dict(origin)
        for key in ("model_name", "hook_name", "hook_layer"):
            value = origin.pop(key, None)
            if options.get(key) is None:
                options[key] = value
        options["metadata"] = {**origin, **options.get("metadata", {})}
    return sae_from_config(make_config(options))


def initial_sae(path: str, sae: SAE) -> SAE:
    """The saved SAE at `path` that `sae` starts from (fine-tuning, or end-to-end training from a locally
    trained SAE), checked to have the same architecture and shapes."""
    from saelab.io.load import load_sae

    start = load_sae(path)
    if start.cfg.architecture != sae.cfg.architecture:
        raise ConfigError(f"init_from {path} is a {start.cfg.architecture} SAE, this one is {sae.cfg.architecture}")
    own, theirs = sae.state_dict(), start.state_dict()
    if set(own) != set(theirs):
        raise ConfigError(f"init_from {path} has tensors {sorted(theirs)}, expected {sorted(own)}")
    for key, value in theirs.items():
        if own[key].shape != value.shape:
            raise ConfigError(
                f"init_from {path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    return start
