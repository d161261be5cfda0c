"""Settings of the data pipeline: text -> token contexts -> activations -> shuffled batches."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from saelab.core.config import PYDANTIC


@dataclass
class DataConfig:
    """Which text, how it is cut into contexts, and how activations are read from the model."""

    __pydantic_config__ = PYDANTIC

    dataset: str = "english-mix"
    """'english-mix' (built in: English prose of six kinds, from web pages and news to docstrings; needs the
    sae-probes wheel), 'docstrings' (built in: the prose of the docstrings of transformers, torch and numpy), a
    local .txt/.md/.rst/.jsonl/.json/.parquet file or folder, a folder written by `saelab pretokenize`, or a
    Hugging Face dataset name (streamed)."""
    text_column: str = "text"
    """Column holding the text in JSON/Parquet/Hugging Face rows (rows with input_ids or tokens are used as tokens)."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    context_size: int = 128
    """Tokens per context fed to the model."""
    prepend_bos: bool = True
    """Start every context with the BOS token."""
    separator: Literal["bos", "eos", "none"] = "bos"
    """Token placed between documents when packing them into contexts."""
    exclude_special_tokens: bool = True
    """Drop activations at BOS/EOS/PAD positions (their norms are outliers that dominate the loss)."""
    seq_start: int = 0
    """First context position whose activations are used."""
    seq_end: int | None = None
    """Position after the last one used (None: to the end of the context)."""
    heldout_contexts: int = 64
    """The first contexts of the dataset, kept out of training for evaluation (saelab eval, eval_every). A built-in
    corpus holds out a fixed part of each of its sources instead, whatever this says."""
    contexts_per_batch: int = 16
    """Contexts per forward pass of the model."""
    shuffle_buffer: int = 65536
    """Activation rows held for shuffling (memory: shuffle_buffer x width x 4 bytes)."""
    cache: str | None = None
    """Folder written by `saelab cache-activations`: train from it instead of running the model."""


def data_config_from_metadata(metadata: Mapping[str, Any], **overrides: Any) -> DataConfig:
    """The data settings a run recorded in an SAE's metadata (`sae.cfg.metadata`), with overrides; the activation
    cache a run read from is left out (evaluation reads text)."""
    known = {k: v for k, v in metadata.items() if k in DataConfig.__dataclass_fields__ and k != "cache"}
    return DataConfig(**{**known, **overrides})
