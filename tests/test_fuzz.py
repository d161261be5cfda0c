"""Fuzzing the readers: random bytes, truncations and wrong types give the documented errors and nothing else."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import yaml

import saelab
from saelab.activations.cache import CachedActivations, read_cache_metadata
from saelab.core.config import ConfigError
from saelab.core.files import FileFormatError
from saelab.runs.config import load_run_config, read_config_file
from saelab.runs.runner import build_saes
from saelab.training.state import load_state, save_state

CASES = 60
MUST_FAIL = ("empty", "random", "truncated")
"""Damage no reader may accept: nothing, random bytes, a strict prefix of a valid file."""


def mutations(data: bytes, rng: random.Random):
    """(kind, bytes): empty content, random bytes, truncations, flipped bytes and appended bytes of a valid file."""
    yield "empty", b""
    yield "random", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    for _ in range(CASES):
        kind = rng.randrange(3)
        if kind == 0:
            yield "truncated", data[: rng.randrange(len(data))]
        elif kind == 1:
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 8)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            yield "flipped", bytes(flipped)
        else:
            yield "appended", data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 50)))


def must_fail(kind: str, damaged: bytes, original: bytes, json_file: bool) -> bool:
    """Whether a reader has to refuse this damage: empty, random and truncated always; bytes appended to a
    safetensors file always (its header covers the file exactly), to a JSON file unless they are whitespace. A
    flipped byte may land inside a number and leave a valid file."""
    if kind in MUST_FAIL:
        return True
    if kind == "appended":
        return not json_file or bool(damaged[len(original) :].strip(b" \t\r\n"))
    return False


def check_damage(read, original: bytes, rng: random.Random, json_file=False, error=FileFormatError):
    """`read` of every mutation of `original` either returns or raises `error` (nothing else escapes); each
    mutation that must fail does. Returns what was read from the mutations that read."""
    results = []
    for kind, damaged in mutations(original, rng):
        if must_fail(kind, damaged, original, json_file):
            with pytest.raises(error):
                read(damaged)
        else:
            try:
                results.append(read(damaged))
            except error:
                pass
    return results


@pytest.mark.parametrize("part", ["sae_weights.safetensors", "cfg.json"])
def test_damaged_sae_files_give_file_format_errors(tmp_path, part):
    rng = random.Random(part)
    saelab.create_sae("jumprelu", d_in=8, d_sae=16).save(tmp_path / "good")
    file = tmp_path / "good" / part
    original = file.read_bytes()

    def read(damaged):
        file.write_bytes(damaged)
        return saelab.load_sae(tmp_path / "good")

    loaded = check_damage(read, original, rng, json_file=part.endswith(".json"))
    assert all(sae.W_enc.shape == (8, 16) for sae in loaded)  # whatever loads is still the SAE the weights hold


def test_damaged_checkpoint_state_gives_file_format_errors(tmp_path):
    rng = random.Random(1)
    state = {"step": 3, "w": torch.randn(4, 4), "rng": torch.get_rng_state(), "nested": {"a": (1, 2)}}
    save_state(state, tmp_path)
    for file in ("state.safetensors", "state.json"):
        original = (tmp_path / file).read_bytes()

        def read(damaged, file=file):
            (tmp_path / file).write_bytes(damaged)
            return load_state(tmp_path)

        check_damage(read, original, rng, json_file=file.endswith(".json"))
        (tmp_path / file).write_bytes(original)
    assert torch.equal(load_state(tmp_path)["w"], state["w"])


SECTIONS = {"train", "data", "model", "synthetic", "sae"}


def config_must_fail(config) -> bool:
    """Whether a random run config is certainly invalid: an unknown key, a section that is not a mapping or
    holds a key its class does not have, a source other than model/synthetic, an out_dir that is not a string."""
    from saelab.runs.config import RunConfig

    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key, value in config.items():
        if key not in fields or key == "source":
            return True
        if key == "out_dir" and not (value is None or isinstance(value, str)):
            return True
        if key in SECTIONS:
            if not isinstance(value, dict) or "bogus" in value:
                return True
            section = getattr(RunConfig(), key)
            if key != "sae" and set(value) - {f.name for f in dataclasses.fields(section)}:
                return True
    return False


def test_random_config_files_and_values_give_config_errors(tmp_path):
    rng = random.Random(2)
    values = [None, True, -1, 0, 3.5, "x", "", [], [1, "a"], {}, {"k": 1}, 1e30, "topk", "blocks.0.hook_resid_post"]
    keys = ["sae", "train", "data", "model", "synthetic", "source", "out_dir", "bogus"]
    subkeys = [
        "k",
        "lr",
        "batch_size",
        "total_tokens",
        "architecture",
        "d_sae",
        "expansion_factor",
        "dataset",
        "context_size",
        "hook_name",
        "shuffle_buffer",
        "firing",
        "hierarchy",
        "bogus",
        "l1_coefficient",
    ]
    built = 0
    for _ in range(1500):
        config = {}
        for key in rng.sample(keys, rng.randrange(1, 4)):
            if rng.random() < 0.3:
                config[key] = rng.choice(values)
            else:
                config[key] = {sub: rng.choice(values) for sub in rng.sample(subkeys, rng.randrange(1, 4))}
        if config_must_fail(config):
            with pytest.raises(ConfigError):
                build_saes(load_run_config(config), d_in=8)
            continue
        try:
            saes = build_saes(load_run_config(config), d_in=8)
        except ConfigError:
            continue
        assert saes and all(sae.cfg.d_in == 8 for sae in saes.values())
        built += 1
    assert built >= 20  # the valid share of random configs builds (or the oracle above refuses too much)

    file = tmp_path / "config.yaml"
    original = b"sae:\n  architecture: topk\n  k: 8\ntrain:\n  lr: 0.001\n"
    outcomes = {"read": 0, "refused": 0}
    for kind, damaged in mutations(original, rng):
        file.write_bytes(damaged)
        try:
            parsed = yaml.safe_load(damaged.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            parsed = "unreadable"
        certain = parsed is not None and (not isinstance(parsed, dict) or config_must_fail(parsed))
        try:
            load_run_config(read_config_file(file))
            outcomes["read"] += 1
            assert not certain, f"{kind} config {damaged!r} was accepted"
        except ConfigError:
            outcomes["refused"] += 1
    assert outcomes["read"] and outcomes["refused"]


def test_damaged_cache_metadata_and_shards(tmp_path):
    rng = random.Random(3)
    folder = tmp_path / "cache"
    folder.mkdir()
    from safetensors.torch import save_file

    rows = torch.randn(10, 4)
    save_file({"h": rows, "token_ids": torch.zeros(10, dtype=torch.int32)}, str(folder / "acts-00000.safetensors"))
    metadata = {
        "format": "saelab-activations",
        "hooks": {"h": 4},
        "dtype": "float32",
        "rows": 10,
        "shards": [{"file": "acts-00000.safetensors", "rows": 10}],
    }
    (folder / "metadata.json").write_text(json.dumps(metadata))
    shard = (folder / "acts-00000.safetensors").read_bytes()

    def read_shard(damaged):
        (folder / "acts-00000.safetensors").write_bytes(damaged)
        return list(CachedActivations(folder, batch_size=2, buffer_size=4, loop=False))

    check_damage(read_shard, shard, rng)
    (folder / "acts-00000.safetensors").write_bytes(shard)
    assert sum(len(batch) for batch in read_shard(shard)) == 10

    def read_metadata(damaged):
        (folder / "metadata.json").write_bytes(damaged)
        return read_cache_metadata(folder)

    text = json.dumps(metadata).encode()
    check_damage(read_metadata, text, rng, json_file=True)
