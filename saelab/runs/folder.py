"""A run folder belongs to one run: starting, replacing and continuing the run in `out_dir`.

- A new run refuses a folder that holds another run's files (asking for `resume` or `overwrite`), so checkpoints,
  SAE folders or metrics of two runs never mix.
- `overwrite` replaces such a folder as a whole, once the new run is set up (configuration checked, model loaded):
  the new folder is built under a staging name beside it holding the new config.yaml, the old folder is renamed
  away, the new one renamed into place, and only then is the old one deleted. Readers of out_dir see the complete
  old run or the new one, never a mix; a crash between the two renames leaves the old run beside out_dir as
  `.NAME.old-*` (nothing lost). A folder that also holds files no run wrote is not replaced: they are named instead.
- A resumed run may change only `RESUMABLE_OPTIONS`; its checkpoints refuse any other difference (see
  `saelab.training.checkpoints`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from saelab.core.config import ConfigError
from saelab.core.files import atomic_write_text, replacing_directory
from saelab.training.checkpoints import CHECKPOINT_DIR, RESUMABLE_TRAIN_OPTIONS
from saelab.training.config import TrainConfig
from saelab.training.distributed import Distributed
from saelab.training.schedules import lr_factor

RUN_CONFIG_FILE = "config.yaml"
RUN_FILES = (RUN_CONFIG_FILE, "metrics.jsonl", "summary.json", CHECKPOINT_DIR)
SAE_FILES = ("cfg.json", "sae_weights.safetensors")
RESUMABLE_OPTIONS = tuple(f"train.{name}" for name in RESUMABLE_TRAIN_OPTIONS)
"""Dotted options `saelab train --resume` / `saelab.resume` accept; every other one is refused by name."""


def say(message: str) -> None:
    print(f"saelab: {message}", file=sys.stderr, flush=True)


def _written_by_a_run(entry: Path) -> bool:
    """A run's own files, checkpoints and SAE folders, and what an interrupted atomic write leaves (hidden
    `.NAME.*.tmp` files, `.NAME.new-*` / `.NAME.old-*` folders)."""
    if entry.name in RUN_FILES or (entry.is_dir() and any((entry / name).exists() for name in SAE_FILES)):
        return True
    name = entry.name
    return name.startswith(".") and (name.endswith(".tmp") or ".new-" in name or ".old-" in name)


def folder_entries(out_dir: Path) -> tuple[list[str], list[str]]:
    """Names in out_dir that a run wrote, and the others."""
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    ours = [e.name for e in entries if _written_by_a_run(e)]
    return ours, [e.name for e in entries if e.name not in ours]


def _listed(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_new_run(out_dir: Path, overwrite: bool) -> None:
    """ConfigError (one line) when a new run cannot start in out_dir as asked."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file, not a folder")
    ours, others = folder_entries(out_dir)
    if ours and not overwrite:
        raise ConfigError(
            f"{out_dir} already holds a run ({_listed(ours)}): continue it with --resume {out_dir} "
            "(saelab.resume), or replace it with --overwrite (overwrite=True), or choose another out_dir"
        )
    if ours and others:
        raise ConfigError(
            f"--overwrite would also delete {_listed(others)} in {out_dir}, which no saelab run wrote: "
            "move them out first, or choose another out_dir"
        )


def start_new_run(out_dir: Path, config_text: str, overwrite: bool) -> None:
    """Write the new run's config.yaml into out_dir, replacing the folder whole if it holds another run."""
    check_new_run(out_dir, overwrite)  # again: the folder may have changed while the model loaded
    ours, _ = folder_entries(out_dir)
    if not ours:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / RUN_CONFIG_FILE, config_text)
        return
    with replacing_directory(out_dir) as staging:
        atomic_write_text(staging / RUN_CONFIG_FILE, config_text)
    say(f"replaced the run in {out_dir} ({_listed(ours)}) with this one")


def on_main(dist: Distributed, action: Callable[[], None]) -> None:
    """Run `action` in the single process or on rank 0 only; with several ranks, every rank raises its error (so
    none waits for a rank that has stopped)."""
    if dist.world_size == 1:
        action()
        return
    error = None
    if dist.is_main:
        try:
            action()
        except (ConfigError, OSError) as e:
            error = str(e)
    error = dist.gather_objects(error)[0]
    if error is not None:
        raise ConfigError(error)


def dotted_names(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'section.key' for every leaf of a nested mapping of options."""
    names = []
    for key, value in overrides.items():
        if isinstance(value, Mapping) and value:
            names += dotted_names(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def no_checkpoint_message(out_dir: Path) -> str:
    """Why the run in out_dir cannot be continued: it wrote no complete checkpoint."""
    if (out_dir / "summary.json").exists():
        return (
            f"the run in {out_dir} finished without checkpoints (train.checkpoint_every was not set), so it cannot "
            f"be continued; start a new run from its weights with --sae.init_from {out_dir}/<sae folder>"
        )
    return (
        f"no complete checkpoint under {out_dir / CHECKPOINT_DIR} to resume from (the run stopped before writing "
        "one): start it again with --overwrite"
    )


def report_resume(trainer: Any, before: TrainConfig, now: TrainConfig) -> None:
    """One line saying where the run continues from; another when its learning rate so far followed a schedule
    that the new length changes (then the result differs from a run of that length from the start)."""
    step, total = trainer.step, now.total_steps
    finished = " (the run had already finished; extend it with --train.total_tokens)" if step == total else ""
    say(f"resumed from step {step} of {total} ({trainer.resumed_checkpoint}){finished}")
    changed = None
    if before.total_steps != now.total_steps:
        changed = next((s for s in range(step) if lr_factor(s, before) != lr_factor(s, now)), None)
    if changed is not None:
        say(
            f"warning: with lr_schedule {now.lr_schedule}, the learning rate depends on train.total_tokens: steps "
            f"{changed}..{step - 1} used the old length's, so this run will not equal one trained to the new length"
        )
