"""Kill a training process with SIGKILL at random moments (checkpoint writes included), resume each time, and
get bit-identical weights to an uninterrupted run (which writes no checkpoints: writing them must not change the
weights either). The resumed processes must say so: equal weights alone would also come from a run that silently
started over.

The runs are short (256 steps): a kill comes at most a tenth of a second after the attempt's first checkpoint,
so three kills use up well under half of the run, and the uninterrupted run trains meanwhile on the other core."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import saelab

RUN = [
    "--source",
    "synthetic",
    "--synthetic.d_in",
    "16",
    "--synthetic.n_features",
    "32",
    "--train.total_tokens",
    "65536",  # 256 steps
    "--train.batch_size",
    "256",
    "--train.progress_bar",
    "false",
]
CHECKPOINTS = ["--train.checkpoint_every", "5", "--train.keep_checkpoints", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def saelab_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from saelab.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def start_straight_run(out: Path, run: list[str]) -> subprocess.Popen:
    """The uninterrupted run, without checkpoints, in the background (wait for it with `finish`)."""
    args = saelab_command("train", *run, "--out_dir", str(out))
    return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()


def assert_same_weights(straight: Path, killed: Path) -> None:
    expected, resumed = saelab.load_sae(straight).state_dict(), saelab.load_sae(killed).state_dict()
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name


def newest_checkpoint(out: Path) -> int:
    complete = sorted((out / "checkpoints").glob("step_*/COMPLETE")) if (out / "checkpoints").is_dir() else []
    return int(complete[-1].parent.name.split("_")[1]) if complete else 0


def run_with_kills(out: Path, extra: list[str], kills: int, seed: int, run: list[str] = RUN) -> tuple[int, list[int]]:
    """Start (or resume) the run; SIGKILL it at a random moment after it has made progress, `kills` times; then let
    it finish. Returns how many kills hit a running process, and the steps the resumed processes said they resumed
    from."""
    rng = random.Random(seed)
    interrupted, resumed = 0, []
    for attempt in range(kills + 1):
        started = newest_checkpoint(out)
        fresh = ["train", *run, *CHECKPOINTS, *extra, "--out_dir", str(out), "--overwrite"]
        args = ["train", "--resume", str(out)] if started else fresh
        process = subprocess.Popen(saelab_command(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < kills:
            # Wait for this attempt's first checkpoint (start-up time varies with the machine's load), then kill it
            # somewhere in the next steps (a checkpoint is written every 5 of them, a few ms each, so often while
            # writing one; a step takes a few ms, so the attempt has trained at most a few dozen steps).
            deadline = time.monotonic() + 120
            while process.poll() is None and newest_checkpoint(out) <= started and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.1))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                interrupted += 1
            _, err = process.communicate()
        else:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err.decode()
        steps = [int(n) for n in re.findall(r"resumed from step (\d+) of", err.decode())]
        assert steps == ([started] if started else [])  # a resume says so, naming its newest checkpoint's step
        resumed += steps
    return interrupted, resumed


@pytest.mark.parametrize(
    "extra",
    [["--sae.k", "4"], ["--sae.architecture", "jumprelu", "--sae.normalize_activations", "expected_average_only_in"]],
    ids=["topk", "jumprelu"],
)
def test_sigkill_and_resume_is_bit_identical(tmp_path, extra):
    straight = start_straight_run(tmp_path / "straight", [*RUN, *extra])
    interrupted, resumed = run_with_kills(tmp_path / "killed", extra, kills=3, seed=len(extra))
    finish(straight)
    assert interrupted >= 2 and any(step > 0 for step in resumed), resumed
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "killed" / "sae")


def test_sigkill_and_resume_from_an_activation_cache_is_bit_identical(tmp_path):
    from tiny import save_tiny_model, sentences, write_jsonl

    from saelab.cli import main

    model = str(save_tiny_model(tmp_path / "model"))
    text = str(write_jsonl(tmp_path / "text.jsonl", sentences(400)))
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "cache-activations",
                "--model.name",
                model,
                "--model.hook_name",
                "blocks.1.hook_resid_post",
                "--data.dataset",
                text,
                "--data.context_size",
                "16",
                "--out",
                str(cache),
                "--max_tokens",
                "2000",
                "--shard_rows",
                "450",
            ]
        )
        == 0
    )
    run = [
        "--data.cache",
        str(cache),
        "--model.hook_name",
        "blocks.1.hook_resid_post",
        "--data.shuffle_buffer",
        "1024",
        "--train.total_tokens",
        "65536",  # 256 steps, ~50 passes over the cache
        "--train.batch_size",
        "256",
        "--train.progress_bar",
        "false",
        "--sae.k",
        "4",
        "--sae.expansion_factor",
        "4",
    ]
    straight = start_straight_run(tmp_path / "straight", run)
    interrupted, resumed = run_with_kills(tmp_path / "killed", [], kills=3, seed=7, run=run)
    finish(straight)
    assert interrupted >= 2 and any(step > 0 for step in resumed), resumed
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "killed" / "sae")
