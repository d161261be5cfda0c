"""A whole training run from one config: data source, SAEs, trainer, outputs. The CLI calls this."""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from saelab.activations.source import ActivationSource
from saelab.core.config import ConfigError, deep_merge, to_dict
from saelab.core.files import atomic_write_text
from saelab.runs import folder as run_folder
from saelab.runs.config import DEFAULT_TOKENS, RunConfig, load_run_config, read_config_file, run_sae_specs
from saelab.runs.folder import RESUMABLE_OPTIONS, RUN_CONFIG_FILE
from saelab.runs.specs import build_sae, initial_sae, spec_hooks
from saelab.saes.base import SAE
from saelab.saes.clt import CrossLayerTranscoder
from saelab.splice import splice_points
from saelab.synthetic.planted import SyntheticSource, feature_recovery
from saelab.training.distributed import Distributed, init_distributed
from saelab.training.memory import keep_freed_memory
from saelab.training.objectives import local_objectives, model_objectives
from saelab.training.trainer import WHOLE_MODEL, Trainer


def build_saes(
    config: RunConfig,
    d_in: int | dict[str, int],
    origin: dict[str, Any] | None = None,
    layers: dict[str, int | None] | None = None,
) -> dict[str, SAE]:
    """The run's SAEs by name. `d_in` is the activation width (per hook name when the SAEs read several);
    `origin` (model, data settings) and each hook's layer are recorded in the SAEs' configs."""
    saes = {}
    for name, options in run_sae_specs(config).items():
        hook = options.get("hook_name")
        inputs, outputs = spec_hooks(options)
        if isinstance(d_in, int):
            width = d_in
        elif hook is None:  # the model's hook_name fills in a missing one, not a null
            raise ConfigError(
                f"SAE '{name}' has hook_name null: name the hook point it reads (or leave it out to "
                "read model.hook_name)"
            )
        else:
            width = sum(d_in[h] for h in inputs)
            if len(inputs) > 1:  # several layers: the target's width is theirs too
                options = {"d_out": sum(d_in[h] for h in outputs), **options}
        where = None
        if origin:
            layer = None if hook is None else (layers or {}).get(hook)
            where = {**origin, "hook_name": hook, "hook_layer": layer}
        torch.manual_seed(config.train.seed)  # each SAE starts as it would alone, whatever else is trained
        saes[name] = build_sae(options, width, where)
    return saes


def _hooks_read(specs: dict[str, dict[str, Any]]) -> list[str]:
    hooks = [h for options in specs.values() for side in spec_hooks(options) for h in side]
    return list(dict.fromkeys(hooks))


def activation_source(
    config: RunConfig, dist: Distributed | None = None
) -> tuple[ActivationSource, int | dict[str, int], dict[str, Any], dict[str, int | None], Any]:
    """The run's batches, the activation width per hook (one width for synthetic activations, which have no
    hooks), where they come from, each hook's layer, and the
    model (None when the activations do not come from a live model). End-to-end runs get token contexts.
    Data-parallel ranks each get their own share of the data and of the batch."""
    batch_size, seed = config.train.batch_size, config.train.seed
    shard = (0, 1)
    dist = dist or Distributed()
    if dist.data_parallel:
        if batch_size % dist.world_size:
            raise ConfigError(f"train.batch_size {batch_size} does not split evenly between {dist.world_size} ranks")
        batch_size, shard = batch_size // dist.world_size, (dist.rank, dist.world_size)
    if dist.module_parallel and config.objective.end_to_end:
        raise ConfigError("end-to-end training splices every SAE into one forward pass: use train.distributed: data")
    if config.source == "synthetic":
        if config.objective.end_to_end:
            raise ConfigError("end-to-end training needs a model (source: model), not synthetic activations")
        synthetic = SyntheticSource(config.synthetic, batch_size, seed=seed + 1_000_003 * shard[0])
        return synthetic, config.synthetic.d_in, {}, {}, None
    from saelab.activations.cache import cached_activations
    from saelab.activations.harvest import model_activations
    from saelab.data.tokens import check_dataset, data_info, model_contexts
    from saelab.models.loading import open_models
    from saelab.models.pair import ModelPair

    hooks = _hooks_read(run_sae_specs(config))
    if config.model.compare_with is not None and (config.data.cache or config.objective.end_to_end):
        reason = "data.cache holds one model's activations" if config.data.cache else "end-to-end training splices one"
        raise ConfigError(f"model.compare_with runs two models on the same tokens: {reason}")
    if config.data.cache:
        if config.objective.end_to_end:
            raise ConfigError("end-to-end training runs the model: it cannot read activations from data.cache")
        cached = cached_activations(config.data, batch_size, seed, shard)
        for hook in hooks:
            if hook not in cached.widths:
                raise ConfigError(f"the cache {config.data.cache} holds {', '.join(cached.widths)}, not '{hook}'")
        info = {k: v for k, v in cached.metadata.items() if k not in ("shards", "hooks", "format", "hook_layers")}
        layers = {h: cached.metadata.get("hook_layers", {}).get(h) for h in hooks}
        return cached, {h: cached.widths[h] for h in hooks}, info, layers, None
    models = open_models(config.model, backpropagate=config.objective.end_to_end)
    model = models.first if isinstance(models, ModelPair) else models  # the one evaluations splice into
    source: ActivationSource
    if config.objective.end_to_end:
        source = model_contexts(model.tokenizer, config.data, batch_size, shard)
    else:
        source = model_activations(models, config.data, hooks, batch_size, seed, dist)
    check_dataset(config.data, model.tokenizer)  # fail now, before anything is written
    layers = {h: models.hook_point(h).layer for h in hooks}
    info = data_info(config.model.name, config.data)
    if config.model.compare_with is not None:
        info["compare_with"] = config.model.compare_with
    return source, models.hook_widths(hooks), info, layers, model


def resolved_autocast(autocast: bool | str, model: Any) -> bool:
    """train.autocast 'auto': bfloat16 matmuls in the SAEs when the live model they read runs in bfloat16."""
    if autocast != "auto":
        return bool(autocast)
    return model is not None and next(model.model.parameters()).dtype == torch.bfloat16


def make_trainer(
    config: RunConfig, saes: dict[str, SAE], model: Any, out_dir: Path | None, dist: Distributed | None = None
) -> Trainer:
    """The trainer for the run's SAEs: objectives, per-SAE learning rates and starting points, evaluation."""
    from saelab.data.tokens import excluded_token_ids
    from saelab.training.e2e import SplicedModel

    specs = run_sae_specs(config)
    lrs = {name: float(o["lr"]) for name, o in specs.items() if o.get("lr") is not None}
    initial = {name: initial_sae(o["init_from"], saes[name]) for name, o in specs.items() if o.get("init_from")}
    objective, splicer = config.objective, None
    if objective.end_to_end:
        if layered := [name for name, sae in saes.items() if len(sae.cfg.input_hooks()) > 1]:
            raise ConfigError(f"end-to-end training reads one hook per SAE: {', '.join(layered)} read several layers")
        excluded = excluded_token_ids(model.tokenizer, config.data.exclude_special_tokens)
        splicer = SplicedModel(model, excluded, objective.downstream_hooks)
        _check_downstream(model, objective.downstream_hooks, saes)
    dist = dist or Distributed()
    evaluates = model is not None and config.train.eval_every and (dist.module_parallel or dist.is_main)
    evaluator = make_evaluator(model, config) if evaluates else None
    return Trainer(
        saes,
        config.train,
        out_dir=out_dir,
        evaluator=evaluator,
        splicer=splicer,
        lrs=lrs,
        initial=initial,
        dist=dist,
        objectives=local_objectives(config.train.sparsity_warmup_steps, objective.reconstruction),
        model_objectives=model_objectives(objective),
        run_identity={k: v for k, v in to_dict(config).items() if k not in ("train", "out_dir")},
    )


def _check_downstream(model: Any, hooks: list[str], saes: dict[str, SAE]) -> None:
    """Downstream hooks must come after an SAE, or their loss could not change."""
    first = min((model.hook_point(s.cfg.hook_name).layer or 0) for s in saes.values())
    for hook in hooks:
        layer = model.hook_point(hook).layer
        if layer is not None and layer < first:
            raise ConfigError(
                f"objective.downstream_hooks: '{hook}' (layer {layer}) comes before every SAE (layer {first})"
            )


def splices(sae: SAE) -> bool:
    """Whether `sae` can be spliced into one forward pass (all but dictionaries that read several layers at once
    without writing them in order: crosscoders)."""
    return isinstance(sae, CrossLayerTranscoder) or len(sae.cfg.input_hooks()) <= 1


def make_evaluator(model, config: RunConfig):
    """For eval_every: each SAE evaluated alone (`evaluate`: explained variance, L0, spliced CE/KL), and all of them
    spliced at once when there are several, on `train.eval_contexts` held-out contexts. On a built-in corpus of
    several sources the last evaluation reads that many contexts of each source and reports each one
    (`source/<name>/<metric>`); the ones before read the mixed held-out stream, which costs a sixth as much."""
    from saelab.data.builtin import is_builtin
    from saelab.data.tokens import excluded_token_ids
    from saelab.evals.evaluate import evaluate as evaluate_sae
    from saelab.evals.heldout import Groups, by_source, core_metrics, heldout_contexts, heldout_groups
    from saelab.evals.replacement import replacement_metrics
    from saelab.evals.spliced import SplicedEvaluation

    count = config.train.eval_contexts
    if not is_builtin(config.data.dataset):
        count = min(count, config.data.heldout_contexts)
    if count < 1:
        raise ConfigError("train.eval_every needs held-out contexts: set data.heldout_contexts >= 1")
    mixed: Groups = {None: heldout_contexts(model, config.data, count, batch_contexts=count)}
    per_source: Groups = {}  # read at the last evaluation
    excluded = excluded_token_ids(model.tokenizer, config.data.exclude_special_tokens)
    keep = (
        "ce_loss_score",
        "kl_div_score",
        "ce_loss_with_sae",
        "kl_div_with_sae",
        "ce_loss_increase",
        "top1_agreement_with_sae",
    )

    def run(sae: SAE, groups: Groups) -> dict[str, float]:
        if isinstance(sae, CrossLayerTranscoder):
            return run_replacement(sae, groups)
        if not splices(sae):  # a crosscoder: reads layers after those it writes, no spliced model to measure
            return {}
        result = evaluate_sae(sae, model, config.data, error_term=False, contexts=groups)
        metrics = {**core_metrics(result), **{k: v for k, v in result["downstream"].items() if k in keep}}
        for source, values in by_source(result).items():
            metrics.update({f"source/{source}/{k}": v for k, v in values.items()})
        return metrics

    def run_replacement(clt: CrossLayerTranscoder, groups: Groups) -> dict[str, float]:
        """The replacement model's CE/KL (all layers spliced in) and the reconstruction over all layers."""
        result = replacement_metrics(clt, model, config.data, error_term=False, contexts=groups)
        parts = {None: result, **result.get("sources", {})}
        metrics = {}
        for source, part in parts.items():
            prefix = "" if source is None else f"source/{source}/"
            values = {
                "explained_variance": part["reconstruction"]["explained_variance"],
                "l0": part["sparsity"]["l0"],
                **{k: v for k, v in part["replacement"].items() if k in keep},
            }
            metrics.update({prefix + k: v for k, v in values.items()})
        return metrics

    def run_together(saes: list[SAE], groups: Groups) -> dict[str, float]:
        evaluation = SplicedEvaluation(model, saes, excluded, error_term=False)
        for batches in groups.values():
            for tokens in batches:
                evaluation.add(tokens)
        return {k: v for k, v in evaluation.result().items() if k in keep}

    def evaluate(saes: dict[str, SAE], final: bool = True) -> dict[str, dict[str, float]]:
        if final and not per_source:
            per_source.update(heldout_groups(model, config.data, count, batch_contexts=count))
        groups = per_source if final else mixed
        results = {name: run(sae, groups) for name, sae in saes.items()}
        spliceable = [sae for sae in saes.values() if splices(sae)]
        replaced = [hook for sae in spliceable for _, hook in splice_points(sae)]
        if len(spliceable) > 1 and len(set(replaced)) == len(replaced):  # a sweep on one hook cannot splice at once
            results[WHOLE_MODEL] = run_together(spliceable, groups)
        return results

    return evaluate


def default_out_dir() -> Path:
    return Path("runs") / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_devices(config: RunConfig) -> list[str]:
    """Every device the run's tensors live on: the SAEs' and, when a live model feeds them, the model's."""
    devices = [str(options.get("device", "cpu")) for options in run_sae_specs(config).values()]
    if config.source == "model" and not config.data.cache:
        devices.append(config.model.device)
    return devices


def train(config: RunConfig | Mapping[str, Any] | str | Path | None = None, overwrite: bool = False) -> dict[str, SAE]:
    """Run training as configured and return the trained SAEs (also saved under out_dir). An out_dir that holds
    another run is refused (continue that one with `resume`), unless `overwrite`: then, once the new run is set up,
    the old folder is replaced by the new run's as a whole (see `saelab.runs.folder`)."""
    if not isinstance(config, RunConfig):
        config = load_run_config(config)
    return _run(config, overwrite=overwrite)


def resume(out_dir: str | Path, **overrides: Mapping[str, Any]) -> dict[str, SAE]:
    """Continue the run in out_dir from its newest complete checkpoint and return the trained SAEs. `overrides`, by
    section (e.g. `train={"total_tokens": 4_000_000}`), may change only the options in RESUMABLE_OPTIONS: the
    run's length (a finished run that wrote checkpoints is extended) and how it logs, evaluates and checkpoints.
    Any other option is refused by name; the accepted changes are written to the run's config.yaml."""
    out_dir = Path(out_dir)
    if not (out_dir / RUN_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{out_dir} holds no saelab run to resume (no {RUN_CONFIG_FILE})")
    stored = read_config_file(out_dir / RUN_CONFIG_FILE)
    refused = [name for name in run_folder.dotted_names(overrides) if name not in RESUMABLE_OPTIONS]
    if refused:
        raise ConfigError(
            f"a resumed run keeps the configuration in {out_dir / RUN_CONFIG_FILE}: it cannot change "
            f"{', '.join(refused)} (it can change {', '.join(RESUMABLE_OPTIONS)})"
        )
    before = load_run_config(copy.deepcopy(stored))
    config = load_run_config(deep_merge(stored, overrides))
    config.out_dir = str(out_dir)
    return _run(config, resuming=before)


def _run(config: RunConfig, overwrite: bool = False, resuming: RunConfig | None = None) -> dict[str, SAE]:
    """A new run (`resuming` None) or the continuation of the run whose configuration was `resuming`."""
    keep_freed_memory()  # before the model loads: harvesting allocates large activations every batch
    devices = run_devices(config)  # decide the backend: gloo for a CPU run, NCCL for CUDA tensors
    dist = init_distributed(config.train.distributed, config.train.distributed_timeout, devices)  # torchrun: ranks
    main = dist.is_main
    out_dir = Path(config.out_dir) if config.out_dir else default_out_dir()
    out_dir = Path(dist.gather_objects(str(out_dir))[0])  # rank 0's clock names the run for every rank
    config.out_dir = str(out_dir)
    if resuming is None:  # fail now, before the model loads
        run_folder.on_main(dist, lambda: run_folder.check_new_run(out_dir, overwrite))
    torch.manual_seed(config.train.seed)
    source, widths, origin, layers, model = activation_source(config, dist)
    config.train.autocast = resolved_autocast(config.train.autocast, model)  # config.yaml records what ran
    saes = build_saes(config, widths, origin, layers)
    if dist.module_parallel:
        saes = {name: sae for i, (name, sae) in enumerate(saes.items()) if dist.owns(i)}
        if not saes:
            raise ConfigError(f"module-parallel training needs at least one SAE per rank ({dist.world_size} ranks)")
    trainer = make_trainer(config, saes, model, out_dir, dist)
    config_text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if resuming is not None:
        if not trainer.resume():  # refuses a checkpoint of a differently configured run, before anything is written
            raise FileNotFoundError(run_folder.no_checkpoint_message(out_dir))
        if main:
            run_folder.report_resume(trainer, resuming.train, config.train)
            if to_dict(config) != to_dict(resuming):
                atomic_write_text(out_dir / RUN_CONFIG_FILE, config_text)
    else:
        run_folder.on_main(dist, lambda: run_folder.start_new_run(out_dir, config_text, overwrite))
    saes = trainer.fit(source)
    if config.source == "synthetic":  # ground truth is known: report how much of it each SAE found
        found = {name: feature_recovery(sae.W_dec, config.synthetic.features) for name, sae in saes.items()}
        if dist.module_parallel:
            found = dist.merged(found)
        if main:
            summary = json.loads((out_dir / "summary.json").read_text())
            for name, recovery in found.items():
                summary[name]["feature_recovery"] = recovery
            atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    dist.close()
    return saes


def pretokenize(
    out_dir: str | Path, config: RunConfig | Mapping[str, Any] | str | Path | None = None, max_tokens: int | None = None
) -> Path:
    """Tokenise and pack the config's dataset with its model's tokenizer into token shards (`saelab pretokenize`)."""
    from transformers import AutoTokenizer

    from saelab.data.tokens import pretokenize as pretokenize_data
    from saelab.models.loading import model_source

    if not isinstance(config, RunConfig):
        config = load_run_config(config)
    source, local_only = model_source(config.model.name)  # the same names, and the same errors, as load_model
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    return pretokenize_data(config.data, tokenizer, out_dir, max_tokens)


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
    from saelab.activations.cache import cache_activations as write_cache
    from saelab.data.tokens import data_info
    from saelab.models.loading import open_model

    if not isinstance(config, RunConfig):
        config = load_run_config(config)
    if config.model.compare_with is not None:
        raise ConfigError("cache-activations stores one model's activations: leave model.compare_with out")
    model = open_model(config.model)
    info = data_info(config.model.name, config.data)
    hooks = hooks or [config.model.hook_name]
    return write_cache(model, config.data, out_dir, max_tokens, hooks, dtype, shard_rows, info)
