"""Token contexts: documents tokenised and packed, served in batches with a resumable position, and saved
as token shards by `saelab pretokenize`.

A pretokenised folder holds `tokens-NNNNN.safetensors` shards (a `tokens` int32 tensor `(n, context_size)`)
and `metadata.json` (tokenizer, context size, BOS/separator choices, shard sizes). It is written in a staging
folder and renamed into place when complete, so a folder that exists is whole.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from saelab.core.errors import ConfigError
from saelab.core.files import FileFormatError, atomic_directory, read_json, read_safetensors
from saelab.data import builtin
from saelab.data.config import DataConfig
from saelab.data.packing import pack_tokens
from saelab.data.text import iter_documents, tokenize_documents

TOKENS_FORMAT = "saelab-tokens"
METADATA_FILE = "metadata.json"
Part = Literal["train", "heldout", "all"]
"""Which contexts of a dataset: those training reads, those held out for evaluation, or all (held-out first)."""


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """BOS, EOS and PAD ids of a tokenizer (None where it has none)."""
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}


def excluded_token_ids(tokenizer, exclude_special_tokens: bool = True) -> list[int]:
    """Ids whose positions are left out of activations and metrics (BOS, EOS, PAD), when asked."""
    if not exclude_special_tokens:
        return []
    return sorted({i for i in special_token_ids(tokenizer).values() if i is not None})


def packing_ids(config: DataConfig, tokenizer) -> tuple[int | None, int | None]:
    """(BOS to prepend, separator between documents) for this config and tokenizer."""
    ids = special_token_ids(tokenizer)
    if config.prepend_bos and ids["bos"] is None:
        raise ConfigError("data.prepend_bos is set but the tokenizer has no BOS token; set data.prepend_bos false")
    bos = ids["bos"] if config.prepend_bos else None
    separator = None if config.separator == "none" else ids[config.separator]
    return bos, separator


def is_pretokenized(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file() and any(Path(path).glob("tokens-*.safetensors"))


def _shard_contexts(folder: Path, context_size: int) -> Iterator[Tensor]:
    metadata = read_json(folder / METADATA_FILE)
    if metadata.get("format") != TOKENS_FORMAT:
        raise FileFormatError(f"{folder / METADATA_FILE} is not a saelab token folder")
    if int(metadata["context_size"]) != context_size:
        raise ConfigError(
            f"{folder} holds contexts of {metadata['context_size']} tokens but data.context_size is {context_size}"
        )
    for shard in metadata["shards"]:
        tokens = read_safetensors(folder / shard["file"])["tokens"]
        if tokens.shape != (shard["contexts"], context_size):
            raise FileFormatError(f"{folder / shard['file']} has shape {tuple(tokens.shape)}, metadata says otherwise")
        yield from tokens.long()


def _packed(config: DataConfig, tokenizer, documents) -> Iterator[Tensor]:
    bos, separator = packing_ids(config, tokenizer)
    return pack_tokens(tokenize_documents(documents, tokenizer), config.context_size, bos, separator)


def iter_contexts(config: DataConfig, tokenizer, part: Part = "all", source: str | None = None) -> Iterator[Tensor]:
    """The contexts `(context_size,)` of one part of the configured dataset, in order. A built-in corpus holds out
    a fixed part of each of its sources (`source`: that source's contexts alone, None: all sources mixed); any
    other dataset holds out its first `data.heldout_contexts` contexts. Training reads "train" only, evaluation
    "heldout"; "all" is the held-out part followed by the training part."""
    if builtin.is_builtin(config.dataset) and not is_pretokenized(config.dataset):
        if part == "all":
            return chain(*(iter_contexts(config, tokenizer, p, source) for p in ("heldout", "train")))
        return _packed(config, tokenizer, builtin.corpus_documents(config.dataset, part, source))
    if source is not None:
        raise ConfigError(
            f"dataset '{config.dataset}' has no sources: only the built-in corpora "
            f"({', '.join(builtin.CORPORA)}) are made of several"
        )
    if is_pretokenized(config.dataset):
        contexts = _shard_contexts(Path(config.dataset), config.context_size)
    else:
        contexts = _packed(config, tokenizer, iter_documents(config.dataset, config.text_column, config.split))
    held = config.heldout_contexts
    return {"all": contexts, "heldout": islice(contexts, held), "train": islice(contexts, held, None)}[part]


class ContextBatches:
    """Batches `(contexts_per_batch, context_size)` of token ids of one part of the dataset (see `iter_contexts`;
    training reads part "train"); the position is the number of contexts read, and a restored position skips that
    many (the stream is deterministic). With `shard` = (index, count) only every count-th batch is served,
    starting at index (each data-parallel rank its own)."""

    def __init__(
        self,
        config: DataConfig,
        tokenizer,
        loop: bool = True,
        shard: tuple[int, int] = (0, 1),
        part: Part = "all",
        source: str | None = None,
    ):
        self.config, self.tokenizer, self.loop, self.shard = config, tokenizer, loop, shard
        self.part, self.source = part, source
        self.position = 0

    def _passes(self) -> Iterator[Tensor]:
        while True:
            count = 0
            for context in iter_contexts(self.config, self.tokenizer, self.part, self.source):
                count += 1
                yield context
            if count < self.config.contexts_per_batch:
                what = "" if self.part == "all" else f"the {self.part} part of "
                what += f"source '{self.source}' of " if self.source else ""
                raise ConfigError(
                    f"{what}dataset '{self.config.dataset}' has {count} contexts of {self.config.context_size} "
                    f"tokens, fewer than data.contexts_per_batch ({self.config.contexts_per_batch})"
                )
            if not self.loop:
                return

    def __iter__(self) -> Iterator[Tensor]:
        contexts = islice(self._passes(), self.position, None)
        per_batch = self.config.contexts_per_batch
        while len(batch := list(islice(contexts, per_batch))) == per_batch:
            index = self.position // per_batch
            self.position += len(batch)
            if index % self.shard[1] == self.shard[0]:
                yield torch.stack(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def pretokenize(
    config: DataConfig, tokenizer, out_dir: str | Path, max_tokens: int | None = None, shard_contexts: int = 8192
) -> Path:
    """Tokenise and pack `config.dataset` into token shards under out_dir (which must not exist yet): all of it,
    or of a built-in corpus its training part (so that training on the folder never reads held-out text)."""
    bos, separator = packing_ids(config, tokenizer)
    max_contexts = None if max_tokens is None else max(1, max_tokens // config.context_size)
    part: Part = "train" if builtin.is_builtin(config.dataset) else "all"
    contexts = islice(iter_contexts(config, tokenizer, part), max_contexts)
    with atomic_directory(out_dir) as staging:
        shards: list[dict[str, Any]] = []
        while chunk := list(islice(contexts, shard_contexts)):
            name = f"tokens-{len(shards):05d}.safetensors"
            save_file({"tokens": torch.stack(chunk).to(torch.int32)}, str(staging / name))
            shards.append({"file": name, "contexts": len(chunk)})
        if not shards:
            raise ConfigError(f"dataset '{config.dataset}' gave no complete context of {config.context_size} tokens")
        metadata = {
            "format": TOKENS_FORMAT,
            "dataset": config.dataset,
            "corpus_version": corpus_version(config.dataset),
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "vocab_size": len(tokenizer),
            "context_size": config.context_size,
            "bos_token_id": bos,
            "separator_token_id": separator,
            "n_contexts": sum(s["contexts"] for s in shards),
            "shards": shards,
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return Path(out_dir)


def training_contexts(
    data: DataConfig, tokenizer, loop: bool = True, shard: tuple[int, int] = (0, 1)
) -> ContextBatches:
    """The contexts every kind of training reads (activations harvested as it goes, activation caches, end-to-end
    batches): the training part of the dataset, so held-out text never reaches an SAE."""
    return ContextBatches(data, tokenizer, loop=loop, shard=shard, part="train")


def model_contexts(tokenizer, data: DataConfig, batch_size: int, shard: tuple[int, int] = (0, 1)) -> ContextBatches:
    """Batches of training contexts holding about `batch_size` tokens (end-to-end training runs the model on
    them)."""
    per_batch = max(1, batch_size // data.context_size)
    return training_contexts(dataclasses.replace(data, contexts_per_batch=per_batch), tokenizer, shard=shard)


def check_dataset(data: DataConfig, tokenizer) -> None:
    """Raise now if the dataset cannot give a first training context (missing file or column, bad format)."""
    if next(iter_contexts(data, tokenizer, "train"), None) is None:
        beyond = "" if builtin.is_builtin(data.dataset) else f" beyond the {data.heldout_contexts} held-out ones"
        raise ConfigError(f"dataset '{data.dataset}' gives no complete context of {data.context_size} tokens{beyond}")


def corpus_version(dataset: str) -> dict[str, str] | None:
    """What a built-in corpus is a function of (None for any other dataset), recorded with tokens and SAEs."""
    return builtin.corpus_version(dataset) if builtin.is_builtin(dataset) else None


def data_info(model_name: str, data: DataConfig) -> dict[str, Any]:
    """Where activations came from, recorded with caches and SAEs so a run can be traced and repeated."""
    return {
        "model_name": model_name,
        "dataset": data.dataset,
        "corpus_version": corpus_version(data.dataset),
        "context_size": data.context_size,
        "prepend_bos": data.prepend_bos,
        "separator": data.separator,
        "exclude_special_tokens": data.exclude_special_tokens,
        "seq_start": data.seq_start,
        "seq_end": data.seq_end,
        "heldout_contexts": data.heldout_contexts,
    }
