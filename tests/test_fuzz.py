"""Fuzzing the readers: random bytes, truncations and wrong types give the documented errors and nothing else."""

from __future__ import annotations

import json
import random

import pytest
import torch

import saelab
from saelab.config import ConfigError
from saelab.data.activation_cache import CachedActivations, read_cache_metadata
from saelab.io.saelens_format import FileFormatError
from saelab.io.state import load_state, save_state
from saelab.runner import build_saes, load_run_config, read_config_file

CASES = 60


def mutations(data: bytes, rng: random.Random):
    """Truncations, random bytes, flipped bytes and empty content of a valid file."""
    yield b""
    yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    for _ in range(CASES):
        kind = rng.randrange(3)
        if kind == 0:
            yield data[: rng.randrange(len(data))]
        elif kind == 1:
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 8)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            yield bytes(flipped)
        else:
            yield data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 50)))


@pytest.mark.parametrize("part", ["sae_weights.safetensors", "cfg.json"])
def test_damaged_sae_files_give_file_format_errors(tmp_path, part):
    rng = random.Random(part)
    saelab.create_sae("jumprelu", d_in=8, d_sae=16).save(tmp_path / "good")
    original = (tmp_path / "good" / part).read_bytes()
    for damaged in mutations(original, rng):
        (tmp_path / "good" / part).write_bytes(damaged)
        try:
            saelab.load_sae(tmp_path / "good")
        except FileFormatError:
            pass  # the documented error; a flip inside a float may also load fine, which is correct


def test_damaged_checkpoint_state_gives_file_format_errors(tmp_path):
    rng = random.Random(1)
    save_state({"step": 3, "w": torch.randn(4, 4), "rng": torch.get_rng_state(), "nested": {"a": (1, 2)}}, tmp_path)
    for file in ("state.safetensors", "state.json"):
        original = (tmp_path / file).read_bytes()
        for damaged in mutations(original, rng):
            (tmp_path / file).write_bytes(damaged)
            try:
                load_state(tmp_path)
            except FileFormatError:
                pass
        (tmp_path / file).write_bytes(original)


def test_random_config_files_and_values_give_config_errors(tmp_path):
    rng = random.Random(2)
    values = [None, True, -1, 0, 3.5, "x", "", [], [1, "a"], {}, {"k": 1}, 1e30, "topk", "blocks.0.hook_resid_post"]
    keys = ["sae", "train", "data", "model", "synthetic", "source", "out_dir", "bogus"]
    subkeys = ["k", "lr", "batch_size", "total_tokens", "architecture", "d_sae", "expansion_factor", "dataset",
               "context_size", "hook_name", "shuffle_buffer", "firing", "hierarchy", "bogus", "l1_coefficient"]
    for _ in range(1500):
        config = {}
        for key in rng.sample(keys, rng.randrange(1, 4)):
            if rng.random() < 0.3:
                config[key] = rng.choice(values)
            else:
                config[key] = {sub: rng.choice(values) for sub in rng.sample(subkeys, rng.randrange(1, 4))}
        try:
            build_saes(load_run_config(config), d_in=8)
        except ConfigError:
            pass
    file = tmp_path / "config.yaml"
    for damaged in mutations(b"sae:\n  architecture: topk\n  k: 8\ntrain:\n  lr: 0.001\n", rng):
        file.write_bytes(damaged)
        try:
            load_run_config(read_config_file(file))
        except ConfigError:
            pass


def test_damaged_cache_metadata_and_shards(tmp_path):
    rng = random.Random(3)
    folder = tmp_path / "cache"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"h": torch.randn(10, 4), "token_ids": torch.zeros(10, dtype=torch.int32)}, str(folder / "acts-00000.safetensors"))
    metadata = {"format": "saelab-activations", "hooks": {"h": 4}, "dtype": "float32", "rows": 10,
                "shards": [{"file": "acts-00000.safetensors", "rows": 10}]}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    shard = (folder / "acts-00000.safetensors").read_bytes()
    for damaged in mutations(shard, rng):
        (folder / "acts-00000.safetensors").write_bytes(damaged)
        try:
            list(CachedActivations(folder, batch_size=2, buffer_size=4, loop=False))
        except FileFormatError:
            pass
    for damaged in mutations(json.dumps(metadata).encode(), rng):
        (folder / "metadata.json").write_bytes(damaged)
        try:
            read_cache_metadata(folder)
        except FileFormatError:
            pass
