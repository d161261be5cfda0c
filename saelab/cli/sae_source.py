"""The SAE a command names (`saelab eval`, `dashboard`, `convert`, `upload`): the options they share, defined
once, and for eval and dashboard its model, checked to have the SAE's hook at the SAE's width."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from saelab.core.config import ConfigError, unknown_key_error
from saelab.splice import check_fits

SAE_SOURCE_HELP = (
    "an SAE folder of any format saelab reads, a Hugging Face repo id owner/name (with --subfolder) "
    "or a release name (with --sae_id)"
)
REPORT_DEFAULT = "default: the SAE's folder; for an SAE from the hub, ./<repo or release>/<subfolder or sae_id>"


def add_sae_source_options(parser: argparse.ArgumentParser, with_model: bool) -> None:
    """The options of every command that loads an SAE: where it is, which device it goes to, and where it
    belongs when its files do not say (Gemma Scope, sparsify, dictionary_learning folders often do not)."""
    group = parser.add_argument_group("where the SAE comes from and where it belongs")
    group.add_argument(
        "--subfolder", default=None, help="the SAE's folder inside a hub repo (or inside a local folder)"
    )
    group.add_argument(
        "--sae_id",
        default=None,
        help="which SAE of a release (gpt2-small-res-jb --sae_id blocks.8.hook_resid_pre) or of an "
        "e2e_sae run folder (its hook position)",
    )
    group.add_argument("--revision", default=None, help="hub branch, tag or commit (default: the main branch)")
    group.add_argument(
        "--device",
        default=None,
        help="device the SAE is loaded on"
        + (
            " and the model runs on (--model.device alone also sets both; give both to split them)"
            if with_model
            else ""
        )
        + " (default: cpu; the device recorded in the SAE's files is never used)",
    )
    also = " (same as --model.name)" if with_model else ""
    group.add_argument(
        "--model_name",
        default=None,
        help=f"the model the SAE reads, a Hugging Face name or local folder{also}; replaces what its files say",
    )
    also = " (same as --model.hook_name)" if with_model else ""
    group.add_argument(
        "--hook_name",
        default=None,
        help=f"the hook point it reads, e.g. blocks.6.hook_resid_post{also}; replaces what its files "
        "say and sets the layer it names",
    )
    group.add_argument(
        "--hook_layer", type=int, default=None, help="the hook's layer, when the hook name does not say it"
    )


def load_sae_from_args(args: argparse.Namespace, source: str, **location: Any):
    """The SAE a command names, with its source options (--subfolder, --sae_id, --revision, --device,
    --model_name, --hook_name, --hook_layer); `location` gives values decided by the command instead."""
    from saelab.io.load import load_sae

    options = {
        "device": args.device or "cpu",
        "model_name": args.model_name,
        "hook_name": args.hook_name,
        "hook_layer": args.hook_layer,
        **location,
    }
    return load_sae(source, subfolder=args.subfolder, revision=args.revision, sae_id=args.sae_id, **options)


def report_folder(args: argparse.Namespace) -> Path:
    """Where a command writes what it learns about an SAE: its own folder, or for an SAE from the hub a local
    folder named after it (the hub cache is not written to)."""
    local = Path(args.sae_dir).expanduser()
    if local.exists():
        return local / args.subfolder if args.subfolder else local
    return Path(args.sae_dir.rstrip("/").split("/")[-1], *filter(None, [args.subfolder or args.sae_id]))


def _one_of(flag: str, value: Any, config_flag: str, config_value: Any) -> Any:
    if value is not None and config_value is not None and value != config_value:
        raise ConfigError(f"--{flag} {value} and --{config_flag} {config_value} disagree; give one of them")
    return value if value is not None else config_value


def sae_model_and_data(args: argparse.Namespace, overrides: dict[str, Any], opened: dict | None = None):
    """The SAE, its model and its data settings: from its files, with --model_name / --hook_name and the
    --model.* / --data.* `overrides` (a nested dict). Checks that the model has the SAE's hook at the SAE's
    width before any work. `opened` (model settings -> model) keeps models for the next SAE of a command that
    reads several: SAEs of one model then share it, and one pass of it."""
    from saelab.core.config import check_device, from_dict
    from saelab.data.config import DataConfig
    from saelab.evals.evaluate import data_config_of
    from saelab.models.config import ModelConfig
    from saelab.models.loading import open_model

    data_overrides = overrides.get("data", {})
    for key in data_overrides:
        if key not in DataConfig.__dataclass_fields__:
            raise unknown_key_error(key, DataConfig.__dataclass_fields__, "data")
    model_options = dict(overrides.get("model", {}))
    model_name = _one_of("model_name", args.model_name, "model.name", model_options.pop("name", None))
    hook_name = _one_of("hook_name", args.hook_name, "model.hook_name", model_options.pop("hook_name", None))
    device = check_device(str(args.device or model_options.get("device") or "cpu"))
    model_options.setdefault("device", device)
    sae = load_sae_from_args(args, args.sae_dir, device=device, model_name=model_name, hook_name=hook_name)
    if sae.cfg.model_name is None:
        raise ConfigError(
            f"{args.sae_dir} does not say which model it reads: give --model_name (a Hugging Face "
            "model name or a local folder)"
        )
    if sae.cfg.hook_name is None:
        layer = sae.cfg.hook_layer if sae.cfg.hook_layer is not None else "N"
        raise ConfigError(
            f"{args.sae_dir} does not say which hook point it reads: give --hook_name "
            f"(e.g. blocks.{layer}.hook_resid_post)"
        )
    model_options.update(name=sae.cfg.model_name, hook_name=sae.cfg.hook_name)
    config = from_dict(ModelConfig, model_options, "model")
    check_device(config.device)
    key = repr({**dataclasses.asdict(config), "hook_name": None})  # one model serves every hook point
    model = opened[key] if opened is not None and key in opened else open_model(config)
    if opened is not None:
        opened[key] = model
    check_fits(model, sae)
    return sae, model, data_config_of(sae, **data_overrides)
