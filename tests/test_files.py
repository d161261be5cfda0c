"""SAE files: SAELens layout, exact round trips, and clear errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_saes import randomised

import saelab
from saelab.training.state import load_state, save_state

ARCHITECTURES = saelab.available_architectures(layered=False)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("shape", [{}, {"d_out": 6, "skip_connection": True}])
def test_save_load_round_trip_is_exact(tmp_path, architecture, shape):
    sae = randomised(saelab.create_sae(architecture, 8, 32, hook_name="blocks.3.hook_resid_post", **shape))
    sae.save(tmp_path / "sae")
    loaded = saelab.load_sae(tmp_path / "sae").eval()
    assert loaded.cfg == sae.cfg
    saved, again = sae.weights_for_saving(), loaded.weights_for_saving()
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    x = torch.randn(16, 8)
    assert torch.equal(sae.encode(x), loaded.encode(x)) and torch.equal(sae(x), loaded(x))


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_loaded_sae_is_ready_for_inference(tmp_path, architecture):
    """A loaded BatchTopK-family SAE fires by its threshold, not by a per-batch selection (training mode)."""
    options = {"matryoshka_widths": [8, 32]} if architecture == "matryoshka" else {}
    sae = randomised(saelab.create_sae(architecture, 8, 32, k=4, **options))
    with torch.no_grad():
        sae.topk_threshold.fill_(0.05)
    sae.save(tmp_path / "sae")
    loaded = saelab.load_sae(tmp_path / "sae")
    x = torch.randn(64, 8)
    assert not loaded.training
    assert torch.equal(loaded.encode(x), sae.to_jumprelu().encode(x))


def test_saelens_layout(tmp_path):
    sae = saelab.create_sae("jumprelu", 8, 32)
    sae.save(tmp_path / "j", sparsity=torch.full((32,), -2.0))
    weights = load_file(tmp_path / "j" / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (8, 32),
        "W_dec": (32, 8),
        "b_enc": (32,),
        "b_dec": (8,),
        "threshold": (32,),
    }
    assert load_file(tmp_path / "j" / "sparsity.safetensors")["sparsity"].shape == (32,)
    cfg = json.loads((tmp_path / "j" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 8 and cfg["d_sae"] == 32
    saelab.create_sae("gated", 8, 32).save(tmp_path / "g")
    saved = set(load_file(tmp_path / "g" / "sae_weights.safetensors"))
    assert saved == {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}


@pytest.fixture
def saved(tmp_path):
    saelab.create_sae("topk", 8, 32, k=4).save(tmp_path / "sae")
    return tmp_path / "sae"


def test_truncated_weights(saved):
    file = saved / "sae_weights.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(saelab.FileFormatError, match="sae_weights.safetensors: not a valid safetensors file"):
        saelab.load_sae(saved)


def test_random_bytes_weights(saved):
    (saved / "sae_weights.safetensors").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(saelab.FileFormatError, match="not a valid safetensors file"):
        saelab.load_sae(saved)


def test_invalid_json_config(saved):
    (saved / "cfg.json").write_text('{"d_in": 8, "d_sae"')
    with pytest.raises(saelab.FileFormatError, match="cfg.json: invalid JSON"):
        saelab.load_sae(saved)


def test_unknown_config_key_suggests_close_name(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["kk"] = cfg.pop("k")
    (saved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(saelab.FileFormatError, match="unknown key 'kk'.*Did you mean 'k'"):
        saelab.load_sae(saved)


def test_config_disagreeing_with_weights(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["d_sae"] = 64
    (saved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(saelab.FileFormatError, match=r"'W_enc' has shape \(8, 32\) but cfg.json implies \(8, 64\)"):
        saelab.load_sae(saved)


def test_missing_files(saved, tmp_path):
    (saved / "sae_weights.safetensors").unlink()
    with pytest.raises(saelab.FileFormatError, match="file not found"):
        saelab.load_sae(saved)
    with pytest.raises(saelab.FileFormatError, match="no such folder: .*nowhere"):
        saelab.load_sae(tmp_path / "nowhere")


@pytest.mark.parametrize("recorded", ["cuda", "cuda:1", "mps"])
def test_the_device_a_file_was_written_from_is_not_where_it_loads(saved, recorded):
    """A cfg.json saved on a GPU (saelab or SAELens write the device into it) loads on the CPU by default."""
    cfg = json.loads((saved / "cfg.json").read_text())
    (saved / "cfg.json").write_text(json.dumps({**cfg, "device": recorded}))
    sae = saelab.load_sae(saved)
    assert sae.device == torch.device("cpu") and sae.cfg.device == "cpu"
    weights = load_file(saved / "sae_weights.safetensors")
    assert torch.equal(sae.W_enc, weights["W_enc"])


def test_the_device_asked_for_is_checked(saved):
    assert saelab.load_sae(saved, device="meta").device.type == "meta"  # available everywhere: honoured
    if not torch.cuda.is_available():
        with pytest.raises(saelab.ConfigError, match="device 'cuda' is not available on this machine"):
            saelab.load_sae(saved, device="cuda")
    with pytest.raises(saelab.ConfigError, match="unknown device 'gpu'"):
        saelab.load_sae(saved, device="gpu")


def test_a_config_without_d_sae_names_the_file_and_the_key(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    del cfg["d_sae"]
    (saved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(saelab.FileFormatError, match=r"cfg.json: SAE config \(topk\): missing key 'd_sae'$"):
        saelab.load_sae(saved)


def test_missing_local_paths_are_no_such_folder_not_a_hub_error(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a local path must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/missing", "./missing", "~/surely/not/here", "a/b/c", "missing"):
        with pytest.raises(saelab.FileFormatError, match=f"^no such folder: {path}$"):
            saelab.load_sae(path)
    saelab.create_sae("topk", 8, 16, k=2).save(tmp_path / "runs" / "sae")
    with pytest.raises(saelab.FileFormatError, match="^no such folder: runs/sae/nope$"):
        saelab.load_sae("runs/sae", subfolder="nope")
    assert saelab.load_sae("runs", subfolder="sae").cfg.d_sae == 16


def test_no_temporary_files_left_behind(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_state_round_trip(tmp_path):
    state = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "rng": torch.get_rng_state(),
        "python": (3, (1, 2, 3), None),
        "numpy": np.arange(5, dtype=np.uint32),
        "scale": 1.5,
    }
    save_state(state, tmp_path)
    back = load_state(tmp_path)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(back["rng"], state["rng"]) and back["python"] == state["python"]
    assert np.array_equal(back["numpy"], state["numpy"]) and back["numpy"].dtype == np.uint32
    file = tmp_path / "state.safetensors"
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(saelab.FileFormatError):
        load_state(tmp_path)
