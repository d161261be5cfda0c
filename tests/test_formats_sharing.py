"""Sharing SAEs: what SAEBench reads from a custom SAE, the Hugging Face hub (faked: no network), and the CLI's
upload and convert."""

from __future__ import annotations

import json

import pytest
import torch
from peer_files import D_IN, D_SAE, K, e2e_sae_by_hand, write_e2e_sae_run

import saelab
from saelab.core.files import FileFormatError

SAEBENCH_CFG_READS = (
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "dataset_trust_remote_code",
    "exclude_special_tokens",
    "model_from_pretrained_kwargs",
    "d_in",
    "d_sae",
    "architecture",
    "dtype",
    "device",
)
"""What SAEBench 0.6 reads from `sae.cfg` (custom_saes/base_sae.py, sae_bench_utils/general_utils.py, and the
core, sparse_probing and absorption evals); `_standardize_sae_cfg` also writes each onto cfg and cfg.metadata."""


@pytest.mark.parametrize("architecture", saelab.available_architectures(layered=False))
def test_every_sae_meets_saebench_custom_sae_contract(architecture, tmp_path):
    """What SAEBench reads from and writes to a custom SAE: weights, encode/decode, cfg fields filled from the
    run's data settings, metadata by attribute, a JSON-ready cfg.to_dict(), dtype kept by sae.to(...)."""
    from saelab.data.config import DataConfig
    from saelab.data.tokens import data_info
    from saelab.runs.specs import build_sae

    origin = {
        **data_info("m", DataConfig(dataset="corpus.txt", context_size=64, prepend_bos=False)),
        "hook_name": "blocks.2.hook_resid_post",
        "hook_layer": 2,
    }
    options = {"k": 4} if architecture in ("topk", "batchtopk", "matryoshka") else {}
    sae = build_sae({"architecture": architecture, "d_sae": D_SAE, **options}, D_IN, origin)
    for name in ("W_enc", "W_dec", "b_dec", "b_mag" if architecture == "gated" else "b_enc"):
        assert isinstance(getattr(sae, name), torch.Tensor)
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)
    cfg = sae.cfg
    assert {name: getattr(cfg, name) for name in SAEBENCH_CFG_READS} == {
        "model_name": "m",
        "hook_name": "blocks.2.hook_resid_post",
        "hook_layer": 2,
        "hook_head_index": None,
        "context_size": 64,
        "prepend_bos": False,
        "dataset_path": "corpus.txt",
        "dataset_trust_remote_code": False,
        "exclude_special_tokens": True,
        "model_from_pretrained_kwargs": {},
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": architecture,
        "dtype": "float32",
        "device": "cpu",
    }
    assert sae.dtype == torch.float32 and sae.device == torch.device("cpu")
    assert not sae.hook_z_reshaping_mode
    sae.turn_off_forward_pass_hook_z_reshaping()
    x = torch.randn(3, 4, D_IN)
    assert sae.encode(x).shape == (3, 4, D_SAE) and sae.decode(sae.encode(x)).shape == (3, 4, D_IN)
    # SAEBench standardises the cfg: each name read (cfg first, then cfg.metadata) and written onto both
    for name in SAEBENCH_CFG_READS[:10]:
        value = getattr(cfg, name)
        setattr(cfg, name, value)
        setattr(cfg.metadata, name, value)
    cfg.architecture_str = cfg.architecture
    assert cfg.metadata.hook_layer == 2 and cfg.metadata["context_size"] == 64 and cfg.metadata.neuronpedia_id is None
    assert json.loads(json.dumps(cfg.to_dict()))["metadata"]["context_size"] == 64
    # the evals move the SAE to the model's dtype; SAEBench's runner reads cfg.dtype
    assert sae.to(device="cpu", dtype=torch.bfloat16) is sae
    assert cfg.dtype == "bfloat16" and sae.W_enc.dtype == torch.bfloat16
    sae.save(tmp_path / "sae")
    loaded = saelab.load_sae(tmp_path / "sae")
    assert loaded.W_enc.dtype == torch.bfloat16 and loaded.cfg.context_size == 64 and not loaded.cfg.prepend_bos


def test_hub_repo_ids_download_the_subfolder_and_push_uploads_the_saelens_files(tmp_path, hub_downloads, fake_hub_api):
    sae = saelab.create_sae("topk", d_in=D_IN, d_sae=D_SAE, k=K)
    sae.save(tmp_path / "snapshot" / "blocks.3.hook_resid_pre")
    loaded = saelab.load_sae("someone/gpt2-saes", subfolder="blocks.3.hook_resid_pre")
    assert hub_downloads == [("someone/gpt2-saes", ["blocks.3.hook_resid_pre/*"])]
    assert torch.equal(loaded.W_enc, sae.W_enc)

    uploaded = fake_hub_api
    assert saelab.push_to_hub(sae, "me/my-sae", path_in_repo="layer3") == "https://example/commit/1"
    assert uploaded == {
        "repo": ("me/my-sae", False, True),
        "files": ["cfg.json", "sae_weights.safetensors"],
        "path_in_repo": "layer3",
    }


def test_an_unreachable_hub_is_one_clear_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileFormatError, match="cannot reach the Hugging Face hub for 'nobody/nothing'"):
        saelab.load_sae("nobody/nothing")


def test_named_releases_resolve_to_their_repo_folder(tmp_path, hub_downloads):
    sae = saelab.create_sae(
        "topk",
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        model_name="gpt2-small",  # TransformerLens's name
        hook_name="blocks.8.hook_resid_pre",
        hook_layer=8,
    )
    sae.save(tmp_path / "snapshot" / "blocks.8.hook_resid_pre")
    loaded = saelab.load_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")
    assert hub_downloads == [("jbloom/GPT2-Small-SAEs-Reformatted", ["blocks.8.hook_resid_pre/*"])]
    assert torch.equal(loaded.W_dec, sae.W_dec)
    location = (loaded.cfg.model_name, loaded.cfg.hook_name, loaded.cfg.hook_layer)
    assert location == ("gpt2", "blocks.8.hook_resid_pre", 8)
    with pytest.raises(FileFormatError, match="needs an sae_id like 'blocks.8.hook_resid_pre'"):
        saelab.load_sae("gpt2-small-res-jb", sae_id="blocks.12.hook_resid_pre")
    with pytest.raises(FileFormatError, match="unknown release 'gpt2-small-res-jbb'; did you mean 'gpt2-small-res-jb'"):
        saelab.load_sae("gpt2-small-res-jbb", sae_id="x")


def test_cli_upload_sends_saelab_folders_whole_and_converts_other_formats(tmp_path, fake_hub_api, capsys):
    from saelab.cli import main

    sae = saelab.create_sae("topk", d_in=D_IN, d_sae=D_SAE, k=K)
    sae.save(tmp_path / "mine", sparsity=torch.zeros(D_SAE))
    (tmp_path / "mine" / "eval.json").write_text("{}")
    assert main(["upload", str(tmp_path / "mine"), "me/saes", "--path_in_repo", "layer3", "--private"]) == 0
    assert fake_hub_api == {
        "repo": ("me/saes", True, True),
        "path_in_repo": "layer3",
        "files": ["cfg.json", "eval.json", "sae_weights.safetensors", "sparsity.safetensors"],
    }
    write_e2e_sae_run(tmp_path / "e2e", positions=("blocks.1.hook_resid_pre",))
    assert main(["upload", str(tmp_path / "e2e"), "me/e2e"]) == 0
    assert fake_hub_api["files"] == ["cfg.json", "sae_weights.safetensors"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cfg.json").write_text("{")
    fake_hub_api.clear()
    assert main(["upload", str(tmp_path / "broken"), "me/broken"]) == 2
    assert fake_hub_api == {} and "cfg.json" in capsys.readouterr().err


def test_cli_convert_writes_saelens_and_sparsify_layouts(tmp_path):
    from saelab.cli import main

    state = write_e2e_sae_run(tmp_path / "e2e")
    assert main(["convert", str(tmp_path / "e2e"), str(tmp_path / "out"), "--sae_id", "blocks.4.hook_resid_pre"]) == 0
    x = torch.randn(7, D_IN)
    expected = e2e_sae_by_hand(state, "blocks.4.hook_resid_pre", x)[0]
    assert torch.allclose(saelab.load_sae(tmp_path / "out")(x), expected, atol=1e-4)
    sae = saelab.create_sae("topk", d_in=D_IN, d_sae=D_SAE, k=K)
    sae.save(tmp_path / "topk")
    assert main(["convert", str(tmp_path / "topk"), str(tmp_path / "sp"), "--to", "sparsify"]) == 0
    assert (tmp_path / "sp" / "sae.safetensors").exists()
    assert torch.allclose(saelab.load_sae(tmp_path / "sp")(x), sae(x), atol=1e-5)


def test_cli_convert_reaches_a_hub_repo_folder(tmp_path, hub_downloads):
    from saelab.cli import main

    sae = saelab.create_sae("topk", d_in=D_IN, d_sae=D_SAE, k=K)
    sae.save(tmp_path / "snapshot" / "layer_3")
    assert main(["convert", "someone/saes", str(tmp_path / "out"), "--subfolder", "layer_3"]) == 0
    assert hub_downloads == [("someone/saes", ["layer_3/*"])]
    assert torch.equal(saelab.load_sae(tmp_path / "out").W_enc, sae.W_enc)
