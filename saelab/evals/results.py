"""One result format for every eval of the suite: SAEBench's envelope, so that tools reading SAEBench results read
saelab's too.

A result is a plain dict: `eval_type_id` (what was measured), `eval_config` (the settings, as a dict),
`eval_result_metrics` ({category: {metric: value}}, the numbers a comparison table shows), `eval_result_details`
(a list of per-item records: per letter, per task, per latent), `eval_result_unstructured` (anything else worth
keeping, e.g. prompts and explanations), plus `sae` (what was evaluated), `seconds` and `datetime_epoch_millis`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saelab.core.config import to_dict
from saelab.core.files import atomic_write_text, read_json
from saelab.saes.base import SAE


def sae_summary(sae: SAE) -> dict[str, Any]:
    """What a result records about the SAE it measured."""
    cfg = sae.cfg
    return {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "hook_name": cfg.hook_name,
        "model_name": cfg.model_name,
    }


def make_result(
    eval_type_id: str,
    sae: SAE,
    config: Any,
    metrics: Mapping[str, Mapping[str, float]],
    details: list[dict[str, Any]] | None = None,
    unstructured: Any = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """A result in the suite's envelope. `config` is the eval's config dataclass (or a dict)."""
    return {
        "eval_type_id": eval_type_id,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_config": config if isinstance(config, dict) else to_dict(config),
        "sae": sae_summary(sae),
        "eval_result_metrics": {category: dict(values) for category, values in metrics.items()},
        "eval_result_details": list(details or []),
        "eval_result_unstructured": unstructured,
        "seconds": seconds,
    }


def flat_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """`category/metric` -> value, for tables and plots."""
    return {
        f"{category}/{name}": value
        for category, values in result["eval_result_metrics"].items()
        for name, value in values.items()
    }


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_result(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a result as JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(_finite(dict(result)), indent=2, default=str))
    return path


def read_result(path: str | Path) -> dict[str, Any]:
    """A result written by `write_result` (a FileFormatError names the file if it is not one)."""
    return read_json(Path(path))
