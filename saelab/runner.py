"""A whole training run from one config: data source, SAEs, trainer, outputs. The CLI calls this."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import yaml

from saelab.config import ConfigError, deep_merge, from_dict, to_dict
from saelab.data.config import DataConfig
from saelab.data.tensor_source import ActivationSource
from saelab.io.atomic import atomic_write_text
from saelab.models.config import ModelConfig
from saelab.saes.base import SAE, make_config, sae_from_config
from saelab.synthetic.planted import PlantedFeatures, SyntheticSource, feature_recovery
from saelab.training.config import TrainConfig
from saelab.training.trainer import Trainer

RUN_CONFIG_FILE = "config.yaml"
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

    sae: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SAE))
    """SAE options: architecture plus that architecture's fields (see `saelab train --help`); d_in comes from
    the data; give d_sae or expansion_factor (d_sae = expansion_factor * d_in)."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            total_tokens=DEFAULT_TOKENS, batch_size=1024, lr=1e-3, dead_window_tokens=10_000, eval_every=250
        )
    )
    """Optimisation settings."""
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
    from saelab.saes.base import SAEConfig

    defaults = dict(RunConfig().sae)
    if options.get("architecture", defaults["architecture"]) != defaults["architecture"]:
        shared = {f.name for f in dataclasses.fields(SAEConfig)} | {"expansion_factor"}
        defaults = {k: v for k, v in defaults.items() if k in shared}
    if "d_sae" in options:
        defaults.pop("expansion_factor", None)
    return {**defaults, **options}


def build_saes(config: RunConfig, d_in: int, origin: dict[str, Any] | None = None) -> dict[str, SAE]:
    """The run's SAE, its width set from d_in and expansion_factor when d_sae is not given; `origin` (model,
    hook, data settings) is recorded in its config."""
    options = dict(config.sae)
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
            options.setdefault(key, origin.pop(key, None))
        options["metadata"] = {**origin, **options.get("metadata", {})}
    cfg = make_config(options)
    return {"sae": sae_from_config(cfg)}


def activation_source(config: RunConfig) -> tuple[ActivationSource, int, dict[str, Any], Any]:
    """The run's batches, the width of the activations, where they come from, and the model (None when the
    activations do not come from a live model)."""
    batch_size, seed = config.train.batch_size, config.train.seed
    if config.source == "synthetic":
        return SyntheticSource(config.synthetic, batch_size, seed=seed), config.synthetic.d_in, {}, None
    from saelab.data import pipeline

    hook = config.model.hook_name
    if config.data.cache:
        cached = pipeline.cached_activations(config.data, batch_size, seed)
        if hook not in cached.widths:
            raise ConfigError(f"the cache {config.data.cache} holds {', '.join(cached.widths)}, not '{hook}' (model.hook_name)")
        info = {k: v for k, v in cached.metadata.items() if k not in ("shards", "hooks", "format", "hook_layers")}
        info.update(hook_name=hook, hook_layer=cached.metadata.get("hook_layers", {}).get(hook))
        return cached, cached.widths[hook], info, None
    model = pipeline.open_model(config.model)
    store = pipeline.model_activations(model, config.data, [hook], batch_size, seed)
    pipeline.check_dataset(config.data, model.tokenizer)  # fail now, before anything is written
    info = {**pipeline.data_info(config.model, config.data), "hook_name": hook, "hook_layer": model.hook_point(hook).layer}
    return store, model.hook_widths([hook])[hook], info, model


def make_evaluator(model, config: RunConfig):
    """Spliced CE/KL of each SAE on the first `train.eval_contexts` held-out contexts (for eval_every)."""
    from saelab.data.tokens import excluded_token_ids
    from saelab.evals.evaluate import heldout_contexts
    from saelab.evals.spliced import SplicedEvaluation

    count = min(config.train.eval_contexts, config.data.heldout_contexts)
    if count < 1:
        raise ConfigError("train.eval_every needs held-out contexts: set data.heldout_contexts >= 1")
    batches = heldout_contexts(model, config.data, count, batch_contexts=count)
    excluded = excluded_token_ids(model.tokenizer, config.data.exclude_special_tokens)
    keep = ("ce_loss_score", "kl_div_score", "ce_loss_with_sae", "kl_div_with_sae")

    def evaluate(saes: dict[str, SAE]) -> dict[str, dict[str, float]]:
        results = {}
        for name, sae in saes.items():
            evaluation = SplicedEvaluation(model, sae, excluded, error_term=False)
            for tokens in batches:
                evaluation.add(tokens)
            results[name] = {k: v for k, v in evaluation.result().items() if k in keep}
        return results

    return evaluate


def default_out_dir() -> Path:
    return Path("runs") / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def train(config: RunConfig | Mapping[str, Any] | str | Path | None = None, resume: bool = False) -> dict[str, SAE]:
    """Run training as configured and return the trained SAEs (also saved under out_dir)."""
    if not isinstance(config, RunConfig):
        config = load_run_config(config)
    out_dir = Path(config.out_dir) if config.out_dir else default_out_dir()
    config.out_dir = str(out_dir)
    torch.manual_seed(config.train.seed)
    source, d_in, origin, model = activation_source(config)
    saes = build_saes(config, d_in, origin)
    evaluator = make_evaluator(model, config) if model is not None and config.train.eval_every else None
    trainer = Trainer(saes, config.train, out_dir=out_dir, evaluator=evaluator)
    if resume:
        if not trainer.resume():
            raise FileNotFoundError(f"no complete checkpoint under {out_dir / 'checkpoints'} to resume from")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / RUN_CONFIG_FILE, yaml.safe_dump(to_dict(config), sort_keys=False))
    saes = trainer.fit(source)
    if config.source == "synthetic":  # ground truth is known: report how much of it each SAE found
        summary = trainer.summary()
        for name, sae in saes.items():
            summary[name]["feature_recovery"] = feature_recovery(sae.W_dec, config.synthetic.features)
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return saes


def pretokenize(out_dir: str | Path, config: RunConfig | Mapping[str, Any] | str | Path | None = None,
                max_tokens: int | None = None) -> Path:
    """Tokenise and pack the config's dataset with its model's tokenizer into token shards (`saelab pretokenize`)."""
    from saelab.data.pipeline import pretokenize_dataset

    if not isinstance(config, RunConfig):
        config = load_run_config(config)
    return pretokenize_dataset(config.model, config.data, out_dir, max_tokens)


def cache_activations(
    out_dir: str | Path,
    config: RunConfig | Mapping[str, Any] | str | Path | None = None,
    max_tokens: int = DEFAULT_TOKENS,
    hooks: list[str] | None = None,
    dtype: str = "float32",
    shard_rows: int = 65536,
) -> Path:
    """Store the model's activations at `hooks` (default: model.hook_name) on the config's data
    (`saelab cache-activations`); train from them with data.cache."""
    from saelab.data import pipeline

    if not isinstance(config, RunConfig):
        config = load_run_config(config)
    return pipeline.cache_activations(config.model, config.data, out_dir, max_tokens, hooks, dtype, shard_rows)


def resume(out_dir: str | Path) -> dict[str, SAE]:
    """Continue the run in out_dir from its newest complete checkpoint."""
    config = load_run_config(Path(out_dir) / RUN_CONFIG_FILE)
    config.out_dir = str(out_dir)
    return train(config, resume=True)
