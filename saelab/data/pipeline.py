"""The data steps as one-call functions (the CLI's `pretokenize` and `cache-activations` call these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from saelab.data.activation_cache import CachedActivations, write_activation_cache
from saelab.data.activation_store import ActivationStore, GatheredActivationStore, Harvester
from saelab.data.config import DataConfig
from saelab.data.docstrings import corpus_version
from saelab.data.text import BUILTIN_DATASET
from saelab.data.tokens import ContextBatches, excluded_token_ids, iter_contexts, pretokenize
from saelab.models.config import ModelConfig
from saelab.models.hooks import HookedModel
from saelab.models.loading import load_model


def open_model(config: ModelConfig, backpropagate: bool = False) -> HookedModel:
    """The configured model. `backpropagate`: gradients will flow through it (end-to-end training), so 'auto'
    keeps float32 there; bfloat16 only when asked for by name."""
    dtype = "float32" if backpropagate and config.dtype == "auto" else config.dtype
    return load_model(config.name, dtype=dtype, device=config.device)


def make_harvester(model: HookedModel, data: DataConfig, hook_names: Sequence[str]) -> Harvester:
    """A Harvester for the data settings: special tokens dropped when asked, positions sliced."""
    excluded = excluded_token_ids(model.tokenizer, data.exclude_special_tokens)
    return Harvester(model, hook_names, excluded, data.seq_start, data.seq_end)


def data_info(model_config: ModelConfig, data: DataConfig) -> dict[str, Any]:
    """Where activations came from, recorded with caches and SAEs so a run can be traced and repeated."""
    return {
        "model_name": model_config.name,
        "dataset": data.dataset,
        "corpus_version": corpus_version() if data.dataset == BUILTIN_DATASET else None,
        "context_size": data.context_size,
        "prepend_bos": data.prepend_bos,
        "separator": data.separator,
        "exclude_special_tokens": data.exclude_special_tokens,
        "seq_start": data.seq_start,
        "seq_end": data.seq_end,
        "heldout_contexts": data.heldout_contexts,
    }


def model_activations(
    model: HookedModel, data: DataConfig, hook_names: Sequence[str], batch_size: int, seed: int = 0, dist=None
) -> ActivationStore:
    """Shuffled batches of activations at `hook_names`, read from the model as training goes. With several
    processes (`dist`): data parallel, each rank its own contexts and buffer; module parallel, the harvest is
    split across ranks and gathered, so every rank sees the single-process stream."""
    harvester = make_harvester(model, data, hook_names)
    shard = (dist.rank, dist.world_size) if dist is not None and dist.mode == "data" else (0, 1)
    contexts = ContextBatches(data, model.tokenizer, shard=shard)
    contexts.position = data.heldout_contexts  # training starts after the held-out contexts
    if dist is not None and dist.mode == "module":
        return GatheredActivationStore(harvester, contexts, batch_size, data.shuffle_buffer, seed, dist)
    return ActivationStore(harvester, contexts, batch_size, data.shuffle_buffer, seed + 1_000_003 * shard[0])


def model_contexts(model: HookedModel, data: DataConfig, batch_size: int, shard: tuple[int, int] = (0, 1)) -> ContextBatches:
    """Batches of token contexts holding about `batch_size` tokens (end-to-end training runs the model on them)."""
    import dataclasses

    per_batch = max(1, batch_size // data.context_size)
    contexts = ContextBatches(dataclasses.replace(data, contexts_per_batch=per_batch), model.tokenizer, shard=shard)
    contexts.position = data.heldout_contexts  # training starts after the held-out contexts
    return contexts


def check_dataset(data: DataConfig, tokenizer) -> None:
    """Raise now if the dataset cannot give a first context (missing file or column, bad format)."""
    if next(iter_contexts(data, tokenizer), None) is None:
        raise ValueError(f"dataset '{data.dataset}' gives no complete context of {data.context_size} tokens")


def cached_activations(data: DataConfig, batch_size: int, seed: int = 0, shard: tuple[int, int] = (0, 1)) -> CachedActivations:
    """Shuffled batches from the cache folder `data.cache` (`shard`: this data-parallel rank's files)."""
    assert data.cache is not None
    return CachedActivations(data.cache, batch_size, data.shuffle_buffer, seed, shard=shard)


def pretokenize_dataset(model: ModelConfig, data: DataConfig, out_dir: str | Path, max_tokens: int | None = None) -> Path:
    """Tokenise and pack `data.dataset` with the model's tokenizer into token shards under out_dir."""
    from transformers import AutoTokenizer

    from saelab.models.loading import model_source

    source, local_only = model_source(model.name)  # the same names, and the same errors, as load_model
    return pretokenize(data, AutoTokenizer.from_pretrained(source, local_files_only=local_only), out_dir, max_tokens)


def cache_activations(
    model_config: ModelConfig,
    data: DataConfig,
    out_dir: str | Path,
    max_tokens: int,
    hook_names: Sequence[str] | None = None,
    dtype: str = "float32",
    shard_rows: int = 65536,
) -> Path:
    """Run the model over `max_tokens` tokens of `data.dataset` and store the activations under out_dir."""
    model = open_model(model_config)
    hook_names = list(hook_names or [model_config.hook_name])
    harvester = make_harvester(model, data, hook_names)
    contexts = ContextBatches(data, model.tokenizer, loop=False)
    info = {**data_info(model_config, data), "hook_layers": {h: model.hook_point(h).layer for h in hook_names}}
    return write_activation_cache(harvester, contexts, out_dir, max_tokens, shard_rows, dtype, info)
