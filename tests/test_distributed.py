"""Two processes on torch.distributed (gloo, CPU): data parallel equals one process on the same global batch,
module parallel equals one process training every SAE, and a failed rank is an error, not a hang."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tiny import save_tiny_model, sentences, write_jsonl

import saelab
from saelab.activations.source import TensorSource
from saelab.training import TrainConfig, Trainer
from saelab.training.distributed import DistributedError, choose_backend, init_distributed

WORLD = 2
GLOBAL_BATCH, HALF = 256, 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, *args) -> None:
    """Run fn(rank, *args) in WORLD processes joined as torchrun would join them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    mp.spawn(_enter, args=(fn, args), nprocs=WORLD, join=True)


def _enter(rank, fn, args):
    faulthandler.enable(all_threads=True)  # a rank that aborts prints where every thread was
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)  # two processes on two cores
    fn(rank, *args)
    # Skip interpreter finalization in these spawned children: there, now and then (about one run in ten of this
    # file), a native thread aborts the finished process ("terminate called without an active exception") even
    # after train() has ended the process group. The same jobs outside pytest (torchrun 10 of 10, a plain
    # mp.spawn script 16 of 16) never did.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def planted(n_rows=4096, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(48, d, generator=g), dim=1)
    codes = torch.rand(n_rows, 48, generator=g) * (torch.rand(n_rows, 48, generator=g) < 0.08)
    return codes @ features * 5


def config(**overrides):
    defaults = dict(
        total_tokens=4096 * 2,
        batch_size=GLOBAL_BATCH,
        lr=3e-3,
        progress_bar=False,
        dead_window_tokens=512,
        norm_estimate_batches=2,
        log_every=8,
    )
    return TrainConfig(**{**defaults, **overrides})


def new_sae(architecture):
    torch.manual_seed(0)
    options = {"k": 4, "aux_coefficient": 0.5} if architecture == "topk" else {}
    return saelab.create_sae(architecture, 16, 64, normalize_activations="expected_average_only_in", **options)


def data_parallel_worker(rank, architecture, data, out):
    dist = init_distributed("data")
    # Rank r's batch i is rows [i * 256 + r * 128, i * 256 + (r + 1) * 128): the halves of one global batch.
    mine = data.view(-1, WORLD, HALF, data.shape[-1])[:, rank].reshape(-1, data.shape[-1])
    trainer = Trainer(new_sae(architecture), config(), out_dir=out, dist=dist)
    sae = trainer.fit(TensorSource(mine, HALF, shuffle=False))["sae"]
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, f"{out}/rank{rank}.safetensors")
    dist.close()


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_data_parallel_equals_one_process_on_the_same_global_batch(tmp_path, architecture):
    data = planted()
    alone = Trainer(new_sae(architecture), config()).fit(TensorSource(data, GLOBAL_BATCH, shuffle=False))["sae"]
    run_ranks(data_parallel_worker, architecture, data, str(tmp_path))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    for name, tensor in alone.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # replicas stay identical
        assert torch.allclose(ranks[0][name], tensor, rtol=1e-4, atol=1e-5), name
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["sae"]  # only rank 0 wrote it
    assert (tmp_path / "summary.json").exists() and (tmp_path / "metrics.jsonl").exists()


def tiny_run(folder, out, distributed, checkpoint_every=None):
    model, dataset = str(folder / "model"), str(folder / "text.jsonl")
    return {
        "model": {"name": model},
        "out_dir": str(out),
        "data": {
            "dataset": dataset,
            "context_size": 16,
            "contexts_per_batch": 4,
            "shuffle_buffer": 512,
            "heldout_contexts": 4,
        },
        "sae": {"architecture": "topk", "k": 4, "expansion_factor": 4},
        "saes": {"early": {"hook_name": "blocks.0.hook_resid_post"}, "late": {"hook_name": "blocks.2.hook_resid_post"}},
        "train": {
            "total_tokens": 2048,
            "batch_size": 128,
            "progress_bar": False,
            "distributed": distributed,
            "checkpoint_every": checkpoint_every,
            "keep_checkpoints": 4,
        },
    }


def saelab_train_worker(rank, run_config):
    saelab.train(run_config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(folder / "model")
    write_jsonl(folder / "text.jsonl", sentences(400))
    return folder


def test_module_parallel_trains_each_layer_on_its_rank_as_one_process_would(tiny, tmp_path):
    alone = saelab.train(tiny_run(tiny, tmp_path / "alone", "module"))
    run_ranks(saelab_train_worker, tiny_run(tiny, tmp_path / "two", "module"))
    for name in ("early", "late"):
        split = saelab.load_sae(tmp_path / "two" / name)
        for key, tensor in alone[name].state_dict().items():
            assert torch.equal(split.state_dict()[key], tensor), (name, key)
    summary = (tmp_path / "two" / "summary.json").read_text()
    assert '"early"' in summary and '"late"' in summary
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    keys = {key for record in logged for key in record}
    assert {"early/l0", "late/l0", "early/explained_variance", "late/explained_variance"} <= keys
    assert "l0" not in keys  # one rank's SAE must not log under no name (and the other's overwrite it)
    for name in ("early", "late"):  # the final evaluation of each, gathered from its rank
        assert any(key.startswith(f"{name}/eval/") for key in keys), name


@pytest.mark.parametrize("mode", ["module", "data"])
def test_two_ranks_resume_from_a_checkpoint_exactly(tiny, tmp_path, mode):
    """Both ranks die after the first checkpoint; resuming ends with the uninterrupted run's weights (data
    parallel: each rank's own data position and shuffle buffer come back)."""
    import shutil

    run = tiny_run(tiny, tmp_path / "run", mode, checkpoint_every=4)
    run_ranks(saelab_train_worker, run)
    finished = {n: saelab.load_sae(tmp_path / "run" / n) for n in ("early", "late")}
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    for later in checkpoints[1:]:
        shutil.rmtree(later)  # as if both ranks had died after the first checkpoint
    for name in finished:
        shutil.rmtree(tmp_path / "run" / name)
    run_ranks(resume_worker, str(tmp_path / "run"))
    for name, sae in finished.items():
        again = saelab.load_sae(tmp_path / "run" / name)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in sae.state_dict().items()), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["early"]["resumed_from_step"] == summary["late"]["resumed_from_step"] == 4  # it did resume


def resume_worker(rank, out_dir):
    saelab.resume(out_dir)


def test_data_parallel_model_run_writes_one_set_of_files(tiny, tmp_path):
    run = tiny_run(tiny, tmp_path / "dp", "data")
    run_ranks(saelab_train_worker, run)
    assert sorted(p.name for p in (tmp_path / "dp").iterdir()) == [
        "config.yaml",
        "early",
        "late",
        "metrics.jsonl",
        "summary.json",
    ]


def failing_worker(rank, out):
    dist = init_distributed("data", timeout_seconds=20)
    if rank == 1:
        raise SystemExit(1)  # this rank dies before the collective
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.ones(3)
    try:
        dist.average_gradients([parameter])
    except DistributedError as e:
        (out / "error.txt").write_text(str(e))


def test_a_failed_rank_is_a_clear_error_not_a_hang(tmp_path):
    with pytest.raises(mp.ProcessExitedException, match="process 1 terminated with exit code 1"):
        run_ranks(failing_worker, tmp_path)
    message = (tmp_path / "error.txt").read_text()
    assert message.startswith("rank 0: all-reduce of gradients failed") and "another rank" in message


def test_close_ends_only_a_group_saelab_started(monkeypatch):
    """train() ends the process group it started (so no rank tears gloo down at exit while another still uses it),
    but leaves a group the caller started alone."""
    calls = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    from saelab.training.distributed import Distributed

    Distributed(0, 2, owns_group=False).close()
    assert calls == ["barrier"]
    Distributed(0, 2, owns_group=True).close()
    assert calls == ["barrier", "barrier", "destroy"]


@pytest.mark.parametrize(
    "devices, gpus, local_rank, local_world, backend",
    [
        (["cpu"], 0, 1, 2, "gloo"),
        (["cpu"], 8, 1, 2, "gloo"),  # a CPU run stays on gloo on a machine with GPUs
        (["cpu", "cpu"], 1, 3, 4, "gloo"),  # more CPU ranks than GPUs is fine
        (["cuda"], 2, 1, 2, "cpu:gloo,cuda:nccl"),  # NCCL for the CUDA tensors, gloo for the CPU counters
        (["cpu", "cuda:0"], 1, 0, 1, "cpu:gloo,cuda:nccl"),  # SAEs on CPU, model on GPU
        (["cuda"], 4, 1, None, "cpu:gloo,cuda:nccl"),  # LOCAL_WORLD_SIZE unknown: this rank has a GPU
    ],
)
def test_the_backend_follows_where_the_run_tensors_live(devices, gpus, local_rank, local_world, backend):
    assert choose_backend(devices, gpus, local_rank, local_world) == backend


@pytest.mark.parametrize(
    "gpus, local_rank, local_world, message",
    [
        (2, 0, 4, "4 ranks on this node but only 2 CUDA device"),  # rank 0 fails too, so no rank waits for the others
        (2, 2, None, "3 ranks on this node but only 2 CUDA device"),
        (0, 0, 2, "no CUDA device is visible"),
    ],
)
def test_a_cuda_run_with_more_ranks_than_gpus_is_a_clear_error(gpus, local_rank, local_world, message):
    with pytest.raises(DistributedError, match=message):
        choose_backend(["cuda"], gpus, local_rank, local_world)


def test_a_cpu_run_joins_with_gloo_where_cuda_exists(monkeypatch):
    """torchrun on a GPU machine with a CPU run: no NCCL group, no torch.cuda.set_device."""
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.append(f"set_device {device}"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: joined.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert init_distributed("data").rank == 1 and joined == ["gloo"]
    with pytest.raises(DistributedError, match="2 ranks on this node but only 1 CUDA device"):
        init_distributed("data", devices=["cuda"])


def test_a_run_names_the_devices_its_tensors_live_on():
    from saelab.runs.config import load_run_config
    from saelab.runs.runner import run_devices

    assert run_devices(load_run_config({"source": "synthetic", "model": {"device": "cuda"}})) == ["cpu"]
    assert run_devices(load_run_config({"model": {"device": "cuda"}, "sae": {"device": "cuda"}})) == ["cuda", "cuda"]
    assert run_devices(load_run_config({"model": {"device": "cuda"}, "data": {"cache": "acts"}})) == ["cpu"]
