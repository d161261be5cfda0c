"""Where the default run's time goes, against harvesting and training timed alone.

    python benchmarks/default_run.py [--tokens 1000000] [--out_dir DIR] [--set train.autocast=false ...]

Runs `saelab.train` on the default configuration (or with fewer tokens) and times, by wrapping the trainer's
methods: the whole call; inside `Trainer.fit` the training steps and the evaluations, the rest of `fit` being
the activation source (tokenising, harvesting, shuffling), logging and saving; before `fit`, model loading and
setting up the corpus. Then, in the same process, the two parts alone: the bare model forward stopped at the
hooked block on as many tokens (`throughput.harvest_rates`) and the same SAE's training step on random
activations of the batch size. What the pipeline costs beyond those two and the evaluations is what
separates it from its parts. Figures are from one run: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from functools import wraps
from pathlib import Path

import torch
import yaml
from throughput import harvest_rates, timed

import saelab
from saelab.training import Trainer

SPENT: dict[str, float] = defaultdict(float)


def clocked(owner: type, name: str, label: str) -> None:
    """Add the time spent in `owner.name` to SPENT[label]."""
    method = getattr(owner, name)

    @wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def alone_step_seconds(sae: saelab.SAE, config: dict) -> float:
    """One training step of a fresh SAE configured as the run's, on random activations of the batch size."""
    from saelab.runs.config import load_run_config

    train = load_run_config(config).train
    fresh = saelab.create_sae(sae.cfg.architecture, **{k: v for k, v in vars(sae.cfg).items() if k != "architecture"})
    trainer = Trainer(fresh, train)
    trainer.prepared = True
    batches = [torch.randn(train.batch_size, sae.cfg.d_in) for _ in range(4)]
    step = iter(range(10**9))
    return timed(lambda: trainer.train_step(batches[next(step) % 4]), 8.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="train.total_tokens (default: the default run's)")
    parser.add_argument("--out_dir", default=None, help="run folder (default: a temporary one, removed)")
    parser.add_argument("--set", nargs="*", default=[], help="more options as section.key=value (YAML values)")
    args = parser.parse_args()
    config: dict = defaultdict(dict, {"train": {"progress_bar": False}})
    if args.tokens:
        config["train"]["total_tokens"] = args.tokens
    for option in args.set:
        key, _, value = option.partition("=")
        section, _, field = key.partition(".")
        config[section][field] = yaml.safe_load(value)
    clocked(Trainer, "fit", "fit")
    clocked(Trainer, "train_step", "steps")
    clocked(Trainer, "_evaluate", "evaluations")
    with tempfile.TemporaryDirectory() as scratch:
        config["out_dir"] = args.out_dir or str(Path(scratch) / "run")
        start = time.perf_counter()
        sae = saelab.train(dict(config))["sae"]
        total = time.perf_counter() - start
        recorded = yaml.safe_load((Path(config["out_dir"]) / "config.yaml").read_text())
    steps = recorded["train"]["total_tokens"] // recorded["train"]["batch_size"]
    tokens = steps * recorded["train"]["batch_size"]
    layer = int(recorded["model"]["hook_name"].split(".")[1])
    model_dtype = recorded["model"]["dtype"]
    (_, _, bare_rate), *_ = harvest_rates([layer], model_dtype)
    harvest_alone = tokens / bare_rate
    train_alone = steps * alone_step_seconds(sae, recorded)
    source = SPENT["fit"] - SPENT["steps"] - SPENT["evaluations"]
    rows = [
        ("whole run", total),
        ("  before training (imports done): model, corpus", total - SPENT["fit"]),
        ("  activation source, logging, saving", source),
        ("  training steps", SPENT["steps"]),
        ("  evaluations", SPENT["evaluations"]),
        ("harvest alone (bare forward, same tokens)", harvest_alone),
        ("train alone (same steps, random activations)", train_alone),
    ]
    print(f"\n{tokens:,} tokens, {steps} steps, model {model_dtype}, train.autocast {recorded['train']['autocast']}")
    for label, seconds in rows:
        print(f"{label:<48}{seconds:>9.1f} s")
    parts = harvest_alone + train_alone + SPENT["evaluations"]
    print(f"{'pipeline beyond its parts (whole - parts)':<48}{total - parts:>9.1f} s")
    print(
        f"source / harvest alone {source / harvest_alone:.2f}; steps / train alone {SPENT['steps'] / train_alone:.2f}"
    )


if __name__ == "__main__":
    main()
