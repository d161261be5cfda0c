"""An on-disk activation cache: harvest once, train many times.

Layout of a cache folder:
    metadata.json                  model, hook names and widths, dtype, context settings, shards
    acts-NNNNN.safetensors         one tensor per hook `(rows, width)` and `token_ids (rows,)`

The folder is written under a staging name and renamed when complete, so a cache that exists is whole.
Reading visits the shards in a new random order each epoch, one shard in memory at a time, through a
shuffle buffer: memory is one shard plus the buffer, whatever the size of the cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations.harvest import Harvester, concat_hooks, make_harvester, split_hooks
from saelab.activations.shuffle_buffer import ShuffleBuffer
from saelab.activations.source import Batch
from saelab.core.errors import ConfigError, FileFormatError
from saelab.core.files import atomic_directory, read_json, read_safetensors
from saelab.data.config import DataConfig
from saelab.data.tokens import training_contexts
from saelab.models.hooks import HookedModel

CACHE_FORMAT = "saelab-activations"
METADATA_FILE = "metadata.json"
TOKEN_IDS = "token_ids"


def write_activation_cache(
    harvester: Harvester,
    contexts,
    out_dir: str | Path,
    max_tokens: int,
    shard_rows: int = 65536,
    dtype: str = "float32",
    info: dict[str, Any] | None = None,
    progress_bar: bool = True,
) -> Path:
    """Harvest `max_tokens` activation rows from `contexts` into a new cache folder `out_dir`."""
    store_dtype = getattr(torch, dtype)
    shards: list[dict[str, Any]] = []
    pending: list[tuple[Tensor, Tensor]] = []
    pending_rows = total = 0
    widths: dict[str, int] = {}

    def flush(staging: Path, rows: int) -> None:
        nonlocal pending, pending_rows
        acts = torch.cat([a for a, _ in pending])
        ids = torch.cat([t for _, t in pending])
        name = f"acts-{len(shards):05d}.safetensors"
        parts = torch.split(acts[:rows], list(widths.values()), dim=-1)
        tensors = {hook: part.to(store_dtype).contiguous() for hook, part in zip(widths, parts, strict=True)}
        tensors[TOKEN_IDS] = ids[:rows].to(torch.int32)
        save_file(tensors, str(staging / name))
        shards.append({"file": name, "rows": rows})
        pending = [(acts[rows:], ids[rows:])] if rows < acts.shape[0] else []
        pending_rows = acts.shape[0] - rows

    bar = tqdm(total=max_tokens, disable=not progress_bar, desc="caching activations", unit="tok", unit_scale=True)
    with atomic_directory(out_dir) as staging, bar:
        for tokens in contexts:
            rows, ids = harvester(tokens)
            widths = {name: value.shape[-1] for name, value in rows.items()}
            block = concat_hooks(rows)[: max_tokens - total]
            pending.append((block, ids[: block.shape[0]]))
            pending_rows += block.shape[0]
            total += block.shape[0]
            bar.update(block.shape[0])
            while pending_rows >= shard_rows:
                flush(staging, shard_rows)
            if total >= max_tokens:
                break
        if pending_rows:
            flush(staging, pending_rows)
        if not shards:
            raise ConfigError("the data gave no activation rows to cache")
        metadata = {
            "format": CACHE_FORMAT,
            **(info or {}),
            "hooks": widths,
            "dtype": dtype,
            "rows": total,
            "shards": shards,
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return Path(out_dir)


def read_cache_metadata(folder: str | Path) -> dict[str, Any]:
    """The metadata of a cache folder, checked to be one."""
    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} is not an activation cache (no {METADATA_FILE}); make one with saelab cache-activations"
        )
    metadata = read_json(folder / METADATA_FILE)
    if metadata.get("format") != CACHE_FORMAT:
        raise FileFormatError(f"{folder / METADATA_FILE} does not describe a saelab activation cache")
    return metadata


class CachedActivations:
    """Shuffled activation batches from a cache folder, looping over it epoch after epoch.

    Shards are read in a random order per epoch and their rows in a random order per shard, both fixed by
    (seed, epoch, shard); the state (epoch, shard, row offset, the buffer) resumes exactly.
    """

    def __init__(
        self,
        folder: str | Path,
        batch_size: int,
        buffer_size: int,
        seed: int = 0,
        loop: bool = True,
        shard: tuple[int, int] = (0, 1),
    ):
        """`shard` = (index, count): read only every count-th shard file of each epoch's order, starting at
        index (data-parallel ranks read disjoint files; the order is common to all of them)."""
        self.folder = Path(folder)
        self.metadata = read_cache_metadata(self.folder)
        self.widths: dict[str, int] = dict(self.metadata["hooks"])
        self.seed, self.loop = seed, loop
        self.shard = shard
        if len(self.metadata["shards"]) < shard[1]:
            raise FileFormatError(
                f"{folder} has {len(self.metadata['shards'])} shard files, fewer than the {shard[1]} "
                "data-parallel ranks that each need their own"
            )
        self.buffer = ShuffleBuffer(buffer_size, batch_size, seed=seed + 1_000_003 * shard[0])
        self.epoch, self.shards_done, self.offset = 0, 0, 0

    def read_shard(self, index: int) -> Tensor:
        """All rows of one shard, hooks side by side `(rows, sum of widths)`, as float32."""
        shard = self.metadata["shards"][index]
        path = self.folder / shard["file"]
        tensors = read_safetensors(path)
        for hook, width in self.widths.items():
            if hook not in tensors or tuple(tensors[hook].shape) != (shard["rows"], width):
                found = tuple(tensors[hook].shape) if hook in tensors else "missing"
                raise FileFormatError(f"{path}: '{hook}' should be ({shard['rows']}, {width}), found {found}")
        return torch.cat([tensors[hook].float() for hook in self.widths], dim=-1)

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_007 + salt)

    def _shard_order(self) -> list[int]:
        order = torch.randperm(len(self.metadata["shards"]), generator=self._generator(0)).tolist()
        return order[self.shard[0] :: self.shard[1]]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = self._shard_order()
            while self.shards_done < len(order):
                index = order[self.shards_done]
                rows = self.read_shard(index)
                rows = rows[torch.randperm(rows.shape[0], generator=self._generator(1 + index))]
                while self.offset < rows.shape[0]:
                    self.offset += self.buffer.add(rows[self.offset :])
                    if self.buffer.full:
                        yield split_hooks(self.buffer.draw(), self.widths)
                self.shards_done, self.offset = self.shards_done + 1, 0
            if not self.loop:
                break
            self.epoch, self.shards_done = self.epoch + 1, 0
        for block in self.buffer.drain():
            yield split_hooks(block, self.widths)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "shards_done": self.shards_done,
            "offset": self.offset,
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.shards_done, self.offset = int(state["epoch"]), int(state["shards_done"]), int(state["offset"])
        self.buffer.load_state_dict(state["buffer"])


def cached_activations(
    data: DataConfig, batch_size: int, seed: int = 0, shard: tuple[int, int] = (0, 1)
) -> CachedActivations:
    """Shuffled batches from the cache folder `data.cache` (`shard`: this data-parallel rank's files)."""
    assert data.cache is not None
    return CachedActivations(data.cache, batch_size, data.shuffle_buffer, seed, shard=shard)


def cache_activations(
    model: HookedModel,
    data: DataConfig,
    out_dir: str | Path,
    max_tokens: int,
    hook_names: Sequence[str],
    dtype: str = "float32",
    shard_rows: int = 65536,
    info: dict[str, Any] | None = None,
) -> Path:
    """Run `model` over `max_tokens` tokens of the training part of `data.dataset` (runs train on caches: the
    held-out part stays out) and store its activations at `hook_names` in a new cache folder `out_dir`; `info`
    (where they came from) is recorded with each hook's layer."""
    harvester = make_harvester(model, data, hook_names)
    contexts = training_contexts(data, model.tokenizer, loop=False)
    info = {**(info or {}), "hook_layers": {h: model.hook_point(h).layer for h in hook_names}}
    return write_activation_cache(harvester, contexts, out_dir, max_tokens, shard_rows, dtype, info)
