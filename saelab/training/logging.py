"""Where training metrics go: a JSONL file, the progress bar, and Weights & Biases when asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saelab.core.errors import MissingDependency
from saelab.core.files import atomic_write_text


def _keep_records_up_to(path: Path, step: int) -> None:
    """After a resume from `step`, drop the records a crashed run wrote past it (and a torn last line), so
    the file holds each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when the run died
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl`; mirrors it to wandb if configured."""

    def __init__(
        self,
        out_dir: str | Path | None,
        wandb_project: str | None = None,
        run_config: dict | None = None,
        start_step: int = 0,
    ):
        self.file = None
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            path = Path(out_dir) / "metrics.jsonl"
            _keep_records_up_to(path, start_step)
            self.file = open(path, "a", encoding="utf-8")
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise MissingDependency(
                    "train.wandb_project is set but wandb is not installed: pip install wandb"
                ) from None
            self.wandb = wandb.init(project=wandb_project, config=run_config or {})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
