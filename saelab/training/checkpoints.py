"""Checkpoint folders: `out_dir/checkpoints/step_N/`, each complete only once its COMPLETE marker exists.

A checkpoint is built under a staging name and renamed whole, so a crash or a full disk while writing leaves the
older ones intact; reading falls back to the previous checkpoint when the newest is damaged.

Each checkpoint records the configuration of the run that wrote it (`identity`): resuming compares it with the
run being resumed and refuses one that differs, except in the options a resumed run may change
(`RESUMABLE_TRAIN_OPTIONS`).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.core.config import ConfigError
from saelab.core.files import FileFormatError, atomic_directory, atomic_write_text
from saelab.training.state import load_state, save_state

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
RESUMABLE_TRAIN_OPTIONS = (
    "total_tokens",
    "log_every",
    "eval_every",
    "eval_contexts",
    "checkpoint_every",
    "keep_checkpoints",
    "progress_bar",
    "wandb_project",
    "distributed_timeout",
)
"""TrainConfig fields a resumed run may change: its length and how it logs, evaluates and checkpoints. Every
other setting decides the weights, so a checkpoint continues only the run configured as the one that wrote it."""


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories whose completion marker was written, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE_MARKER).exists())


def write_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as `root/step_N/` and delete all but the newest `keep` complete checkpoints."""
    path = root / f"step_{step:09d}"
    if path.exists():
        shutil.rmtree(path)
    with atomic_directory(path) as staging:
        save_state(state, staging)
        atomic_write_text(staging / COMPLETE_MARKER, str(step))
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_newest_checkpoint(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable complete checkpoint under root and its state, or None when there is none."""
    for checkpoint in reversed(complete_checkpoints(root)):
        try:
            return checkpoint, load_state(checkpoint)
        except FileFormatError as e:  # damaged after it was completed: fall back to the one before
            warnings.warn(f"skipping unreadable checkpoint {checkpoint}: {e}", stacklevel=3)
    return None


def plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples as lists, odd objects as strings), so a configuration compares equal
    to itself after a trip through a checkpoint."""
    return json.loads(json.dumps(value, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'name (value there, value here)' for every dotted setting that differs between two configurations."""
    saved, current = _flatten(plain(saved)), _flatten(plain(current))
    keys = list(dict.fromkeys([*saved, *current]))

    def show(flat: dict[str, Any], key: str) -> str:
        return repr(flat[key]) if key in flat else "unset"

    return [
        f"{key} ({show(saved, key)} there, {show(current, key)} here)"
        for key in keys
        if key not in saved or key not in current or saved[key] != current[key]
    ]


def check_same_run(
    checkpoint: Path, state: dict[str, Any], identity: dict[str, Any], units: dict[str, Any], some_units: bool = False
) -> None:
    """One ConfigError line naming what differs when `state` (read from `checkpoint`) was written by a run
    configured otherwise than this one: its `identity` and its SAEs' (`units`, by name; `some_units`: this process
    trains only some of the checkpoint's SAEs). A checkpoint of an older saelab, which records neither, gives a
    warning."""
    if "identity" not in state:
        warnings.warn(
            f"{checkpoint} was written by an older saelab and does not record its run's configuration: "
            "it cannot be checked against this run",
            stacklevel=3,
        )
        return
    differing = differences(state["identity"], identity)
    saved = state["units"]
    if not (set(units) <= set(saved) if some_units else set(units) == set(saved)):
        differing.append(f"SAEs ({', '.join(sorted(saved))} there, {', '.join(sorted(units))} here)")
    for name in sorted(set(units) & set(saved)):
        differing += [f"SAE '{name}' {d}" for d in differences(saved[name]["identity"], units[name])]
    if differing:
        more = f" (and {len(differing) - 2} more)" if len(differing) > 2 else ""
        raise ConfigError(
            f"{checkpoint} was written by a run configured differently: {'; '.join(differing[:2])}"
            f"{more}; refusing to resume from it (start a new run with another out_dir, or --overwrite)"
        )


def random_states() -> dict[str, Any]:
    """The state of every random generator a run draws from (torch, numpy, Python), for a checkpoint."""
    return {"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}


def restore_random_states(state: dict[str, Any]) -> None:
    """Put back the generators `random_states` recorded (checkpoints older than numpy's entry hold torch's only)."""
    torch.set_rng_state(state["torch_rng"])
    if "numpy_rng" in state:
        np.random.set_state(state["numpy_rng"])
        random.setstate(_as_tuples(state["python_rng"]))


def _as_tuples(value):
    """random.setstate wants the nested tuples back that JSON turned into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
