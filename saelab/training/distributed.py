"""Several processes on torch.distributed (torchrun; gloo for CPU runs, NCCL for CUDA runs), kept at the trainer's
edges.

Two ways to split the work:
- `data`: every rank trains a replica of every SAE on its own share of the data (its own contexts, or its own
  rows of an in-memory source); gradients are averaged and firing statistics summed across ranks before each
  update, so the replicas stay identical. Only rank 0 writes files.
- `module`: the SAEs are dealt out to the ranks (SAE i to rank i mod world size). Each rank runs the model on
  every world-size-th batch of contexts and the harvested activations are all-gathered, so every rank sees the
  whole stream and trains its SAEs on it exactly as a single process would. Each rank saves its own SAEs.

A rank that fails ends the run with its rank named; a collective that waits longer than `timeout_seconds`
raises instead of hanging. A single process is `Distributed()` (rank 0 of 1), whose collectives return at once,
so the trainer has one code path.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from saelab.core.errors import SaelabError

Mode = Literal["data", "module"]


class DistributedError(SaelabError, RuntimeError):
    """A collective failed or timed out: another rank most likely died (its own error says why)."""


@dataclass
class Distributed:
    """This process's place in the group and the collectives the trainer needs (no-ops for a single process)."""

    rank: int = 0
    world_size: int = 1
    mode: Mode = "data"
    owns_group: bool = False  # this process group was started by init_distributed, so close() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        """Several ranks, each training replicas of every SAE on its share of the data."""
        return self.mode == "data" and self.world_size > 1

    @property
    def module_parallel(self) -> bool:
        """Several ranks, each training its share of the SAEs on the whole stream."""
        return self.mode == "module" and self.world_size > 1

    def owns(self, index: int) -> bool:
        """Whether this rank trains SAE number `index` (every SAE in data-parallel mode)."""
        return self.mode == "data" or index % self.world_size == self.rank

    def _run(self, what: str, fn, *args):
        if self.world_size == 1:
            return None
        try:
            return fn(*args)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(
                f"rank {self.rank}: {what} failed ({str(e).splitlines()[0]}); "
                "another rank probably failed first: see its error"
            ) from None

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Mean of every rank's gradients, in one flat all-reduce."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads or self.world_size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._run("all-reduce of gradients", dist.all_reduce, flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum over ranks (a new tensor)."""
        total = tensor.clone()
        self._run("all-reduce", dist.all_reduce, total)
        return total

    def gather_rows(self, rows: Tensor) -> list[Tensor]:
        """Every rank's `rows` (any number of rows, same width and dtype), in rank order."""
        if self.world_size == 1:
            return [rows]
        count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        self._run("all-gather of row counts", dist.all_gather, counts, count)
        longest = int(max(c.item() for c in counts))
        padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        padded[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._run("all-gather of activations", dist.all_gather, gathered, padded)
        return [g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (metrics, states of this process's own making), in rank order."""
        if self.world_size == 1:
            return [obj]
        result: list[Any] = [None] * self.world_size
        self._run("all-gather", dist.all_gather_object, result, obj)
        return result

    def merged(self, mapping: dict[str, Any]) -> dict[str, Any]:
        """Every rank's mapping merged into one (module parallel: each rank's entries are its own SAEs')."""
        return {key: value for part in self.gather_objects(mapping) for key, value in part.items()}

    def barrier(self) -> None:
        self._run("barrier", dist.barrier)

    def close(self) -> None:
        """Wait for every rank, then end the process group if saelab started it. Leaving it to interpreter
        exit lets one rank tear down gloo while another still talks to it (an abort, seen here now and then)."""
        self.barrier()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def choose_backend(
    devices: Iterable[str], cuda_devices: int, local_rank: int, local_world_size: int | None = None
) -> str:
    """The torch.distributed backend for a run whose tensors live on `devices` ('cpu', 'cuda', 'cuda:1', ...), on a
    node with `cuda_devices` visible GPUs where this process is `local_rank` of `local_world_size` (torchrun's
    LOCAL_WORLD_SIZE; None when unknown). CPU-only runs use gloo, even where CUDA exists; runs with CUDA tensors use
    NCCL for those and gloo for the small CPU tensors the trainer also reduces (counters, gathered objects).
    Raises DistributedError when a CUDA run has more ranks on this node than visible GPUs (one GPU per rank)."""
    if not any(str(d).split(":")[0] == "cuda" for d in devices):
        return "gloo"
    ranks = local_world_size if local_world_size is not None else local_rank + 1
    if cuda_devices < 1:
        raise DistributedError(
            "the run's tensors are on CUDA (model.device / sae.device) but no CUDA device is visible"
        )
    if ranks > cuda_devices or local_rank >= cuda_devices:
        raise DistributedError(
            f"{max(ranks, local_rank + 1)} ranks on this node but only {cuda_devices} CUDA device(s) visible: a CUDA "
            f"run needs one GPU per rank (torchrun --nproc_per_node {cuda_devices}), or set model.device and "
            "sae.device to cpu"
        )
    return "cpu:gloo,cuda:nccl"


def init_distributed(
    mode: Mode = "data", timeout_seconds: float = 600, devices: Iterable[str] = ("cpu",)
) -> Distributed:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or a single process's `Distributed()`.
    `devices`: where the run's tensors live, which decides the backend (see `choose_backend`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(mode=mode)
    started = not dist.is_initialized()
    if started:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = os.environ.get("LOCAL_WORLD_SIZE")
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = choose_backend(devices, cuda_devices, local_rank, int(local_world) if local_world else None)
        if "nccl" in backend:
            torch.cuda.set_device(local_rank)  # 'cuda' means this rank's own GPU
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return Distributed(dist.get_rank(), dist.get_world_size(), mode, owns_group=started)
