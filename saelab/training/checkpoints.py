"""Checkpoint folders: `out_dir/checkpoints/step_N/`, each complete only once its COMPLETE marker exists.

A checkpoint is built under a staging name and renamed whole, so a crash or a full disk while writing leaves the
older ones intact; reading falls back to the previous checkpoint when the newest is damaged.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from saelab.io.atomic import atomic_directory, atomic_write_text
from saelab.io.saelens_format import FileFormatError
from saelab.io.state import load_state, save_state

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"


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


def read_newest_checkpoint(root: Path) -> dict[str, Any] | None:
    """The state in the newest readable complete checkpoint under root, or None when there is none."""
    for checkpoint in reversed(complete_checkpoints(root)):
        try:
            return load_state(checkpoint)
        except FileFormatError as e:  # damaged after it was completed: fall back to the one before
            warnings.warn(f"skipping unreadable checkpoint {checkpoint}: {e}", stacklevel=3)
    return None
