"""The run config: one dataclass with a section per concern (each section's config lives beside its code), read from
YAML files and --section.key flags, with the defaults of the default run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from saelab.core.config import PYDANTIC, ConfigError, deep_merge, from_dict, to_dict
from saelab.data.config import DataConfig
from saelab.models.config import ModelConfig
from saelab.runs.specs import merge_options, sae_specs
from saelab.synthetic.planted import PlantedFeatures
from saelab.training.config import ObjectiveConfig, TrainConfig

DEFAULT_TOKENS = 1_000_000
# TopK k 32 x8 on block 5 of SmolLM2-135M. A short dead window and a stronger AuxK than Gao et al.'s 1/32 keep
# latents alive within a 1M-token budget: 5.5% never fire on 8k held-out tokens (26% with 500k and 1/32).
DEFAULT_SAE = {
    "architecture": "topk",
    "k": 32,
    "expansion_factor": 8,
    "normalize_activations": "expected_average_only_in",
    "aux_coefficient": 0.25,
}


@dataclass
class RunConfig:
    """Everything a training run needs; `saelab train` builds it from YAML and --section.key flags."""

    __pydantic_config__ = PYDANTIC

    sae: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SAE))
    """SAE options: architecture plus that architecture's fields (see `saelab train --help`); d_in comes from
    the data; give d_sae or expansion_factor (d_sae = expansion_factor * d_in). Also `lr` (this SAE's learning
    rate) and `init_from` (a saved SAE to start from)."""
    saes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Several SAEs in one run, by name, each overriding some `sae` options, e.g. {layer2: {hook_name:
    blocks.2.hook_resid_post}, layer4: {...}}. One model pass feeds them all."""
    sweep: dict[str, Any] = field(default_factory=dict)  # each value a list: specs.py says so by key
    """Values to sweep, e.g. {k: [16, 32, 64], lr: [0.001, 0.0003]}: one SAE per combination (and per `saes`
    entry), all trained side by side from one stream of activations."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            total_tokens=DEFAULT_TOKENS,
            batch_size=1024,
            lr=1e-3,
            dead_window_tokens=10_000,
            eval_every=250,
            autocast="auto",
        )
    )
    """Optimisation settings."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Loss terms: local reconstruction, or end to end (KL to the clean model, downstream reconstruction)."""
    source: Literal["model", "synthetic"] = "model"
    """Where activations come from: 'model' (the model's activations on the dataset, or data.cache when set)
    or 'synthetic' (planted sparse features with known ground truth)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model and the hook point read."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text, contexts and activation buffering."""
    synthetic: PlantedFeatures = field(default_factory=lambda: PlantedFeatures(d_in=64, n_features=256, mean_active=4))
    """Planted-feature generator used when source is 'synthetic'."""
    out_dir: str | None = None
    """Output directory; None means runs/<date>_<time>."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or a ConfigError saying what is wrong with the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_run_config(data: Mapping[str, Any] | str | Path | None = None) -> RunConfig:
    """A validated RunConfig from a dict, a YAML file path, or None (the defaults)."""
    if data is None:
        data = {}
    elif isinstance(data, (str, Path)):
        data = read_config_file(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"a run config must be a mapping of sections, got {data!r}")
    # Sections given in part keep the run's defaults for the rest (not the bare class defaults).
    defaults = to_dict(RunConfig())
    del defaults["sae"]
    config = from_dict(RunConfig, deep_merge(defaults, data), where="config")
    config.sae = _with_sae_defaults(config.sae)
    return config


def _with_sae_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """Fill in the default SAE's options; those specific to its architecture only when that is kept."""
    defaults = dict(RunConfig().sae)
    if "d_sae" in options:
        defaults.pop("expansion_factor", None)
    return merge_options(defaults, options)


def run_sae_specs(config: RunConfig) -> dict[str, dict[str, Any]]:
    """Name -> options of every SAE the run trains (one called 'sae' unless `saes` or `sweep` say more)."""
    default_hook = config.model.hook_name if config.source == "model" else None
    specs = sae_specs(config.sae, config.saes, config.sweep, default_hook)
    if config.source == "synthetic" and (named := {h for o in specs.values() if (h := o.get("hook_name")) is not None}):
        raise ConfigError(f"synthetic activations have no hook points, but SAEs name {', '.join(sorted(named))}")
    return specs
