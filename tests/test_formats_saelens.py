"""SAELens files of every version loaded by saelab, and saelab SAEs written for SAELens with the same outputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peer_files import D_IN, D_SAE, K, saelens_2_cfg, saelens_weights
from safetensors.torch import save_file

import saelab
from saelab.core.files import FileFormatError


def test_saelens_5_topk_cfg_with_its_dataset_fields(tmp_path):
    w = saelens_weights("topk", tmp_path / "sae")
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "model_name": "gpt2",
        "hook_name": "blocks.3.hook_resid_post",
        "hook_layer": 3,
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": "some/dataset",
        "dtype": "float32",
        "dataset_trust_remote_code": False,
        "normalize_activations": "none",
        "device": "cpu",
        "sae_lens_training_version": "5.1.0",
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    sae = saelab.load_sae(tmp_path / "sae")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_layer) == ("topk", K, 3)
    assert sae.cfg.metadata["dataset_path"] == "some/dataset" and sae.cfg.metadata["context_size"] == 128
    x = torch.randn(20, D_IN)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(K, dim=-1)
    by_hand = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ w["W_dec"] + w["b_dec"]
    assert torch.allclose(sae(x), by_hand, atol=1e-4)


def test_saelens_3_and_6_style_cfgs(tmp_path):
    w = saelens_weights("jumprelu", tmp_path / "v6")
    v6 = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "gemma-2-2b",
            "hook_name": "blocks.12.hook_resid_post",
            "context_size": 1024,
            "sae_lens_version": "6.5.0",
        },
    }
    (tmp_path / "v6" / "cfg.json").write_text(json.dumps(v6))
    sae = saelab.load_sae(tmp_path / "v6")
    assert sae.cfg.model_name == "gemma-2-2b" and sae.cfg.hook_name == "blocks.12.hook_resid_post"
    x = torch.randn(20, D_IN)
    pre = x @ w["W_enc"] + w["b_enc"]
    assert torch.allclose(sae(x), (pre * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"], atol=1e-4)
    saelens_weights("standard", tmp_path / "v3")
    v3 = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_point": "blocks.1.hook_resid_pre",
        "hook_point_layer": 1,
        "activation_fn": "relu",
        "normalize_activations": False,
        "apply_b_dec_to_input": True,
        "context_size": 128,
        "dtype": "float32",
        "device": "cpu",
        "architecture": "standard",
    }
    (tmp_path / "v3" / "cfg.json").write_text(json.dumps(v3))
    old = saelab.load_sae(tmp_path / "v3")
    assert old.cfg.hook_name == "blocks.1.hook_resid_pre"
    assert (old.cfg.hook_layer, old.cfg.normalize_activations) == (1, "none")


def test_saelens_1_and_2_cfgs_with_their_training_keys_load(tmp_path):
    w = saelens_weights("standard", tmp_path / "v2")
    save_file({**w, "scaling_factor": torch.ones(D_SAE)}, str(tmp_path / "v2" / "sae_weights.safetensors"))
    (tmp_path / "v2" / "cfg.json").write_text(json.dumps(saelens_2_cfg(D_IN, D_SAE)))
    sae = saelab.load_sae(tmp_path / "v2")
    x = torch.randn(20, D_IN)
    latents = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert torch.allclose(sae.encode(x), latents, atol=1e-5)
    assert torch.allclose(sae(x), latents @ w["W_dec"] + w["b_dec"], atol=1e-4)
    assert (
        sae.cfg.architecture,
        sae.cfg.hook_name,
        sae.cfg.hook_layer,
        sae.cfg.model_name,
        sae.cfg.dtype,
        sae.cfg.device,
    ) == ("standard", "blocks.4.hook_resid_pre", 4, "gpt2-small", "float32", "cpu")
    assert sae.cfg.metadata["lr"] == 0.0004 and sae.cfg.metadata["l1_coefficient"] == 8e-05
    assert sae.cfg.metadata["device"] == "cuda"  # where it was trained, not where it loads
    sae.save(tmp_path / "resaved")  # saelab's own keys now: loads strictly, to the same SAE
    again = saelab.load_sae(tmp_path / "resaved")
    assert torch.equal(again(x), sae(x)) and again.cfg.metadata["lr"] == 0.0004

    # jbloom's first GPT-2 small residual SAEs (SAELens 0.x): d_sae null beside expansion_factor, no
    # apply_b_dec_to_input (it defaulted to true), no version, training fields since renamed
    old = {
        "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre",
        "hook_point_layer": 8,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False,
        "context_size": 128,
        "use_cached_activations": False,
        "d_in": D_IN,
        "n_batches_in_buffer": 128,
        "total_training_tokens": 300_000_000,
        "store_batch_size": 32,
        "device": "mps",
        "seed": 42,
        "dtype": "torch.float32",
        "b_dec_init_method": "geometric_median",
        "expansion_factor": D_SAE // D_IN,
        "from_pretrained_path": None,
        "l1_coefficient": 8e-05,
        "lr": 0.0004,
        "lr_scheduler_name": None,
        "lr_warm_up_steps": 5000,
        "train_batch_size": 4096,
        "use_ghost_grads": False,
        "feature_sampling_window": 1000,
        "feature_sampling_method": None,
        "resample_batches": 1028,
        "feature_reinit_scale": 0.2,
        "dead_feature_window": 5000,
        "dead_feature_estimation_method": "no_re_init",
        "dead_feature_threshold": 1e-08,
        "log_to_wandb": True,
        "wandb_project": "mats_sae_training_gpt2_small",
        "wandb_entity": None,
        "wandb_log_frequency": 100,
        "n_checkpoints": 10,
        "d_sae": None,
        "tokens_per_buffer": 67_108_864,
        "run_name": "24576-L1-8e-05-LR-0.0004-Tokens-3.000e+08",
    }
    d_sae = D_IN * (D_SAE // D_IN)
    g = torch.Generator().manual_seed(1)
    w = {
        "W_enc": torch.randn(D_IN, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    (tmp_path / "v0").mkdir()
    save_file(w, str(tmp_path / "v0" / "sae_weights.safetensors"))
    (tmp_path / "v0" / "cfg.json").write_text(json.dumps(old))
    sae = saelab.load_sae(tmp_path / "v0")
    assert (sae.cfg.d_sae, sae.cfg.hook_name, sae.cfg.hook_layer, sae.cfg.apply_b_dec_to_input) == (
        d_sae,
        "blocks.8.hook_resid_pre",
        8,
        True,
    )
    assert torch.allclose(
        sae(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"], atol=1e-4
    )


def test_saelens_3_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path):
    w = saelens_weights("standard", tmp_path / "v3")
    scale = torch.rand(D_SAE) + 0.5
    save_file({**w, "finetuning_scaling_factor": scale}, str(tmp_path / "v3" / "sae_weights.safetensors"))
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2",
        "hook_name": "blocks.1.hook_resid_pre",
        "hook_layer": 1,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": True,
        "sae_lens_training_version": "3.5.0",
        "prepend_bos": True,
        "dataset_path": "x",
        "context_size": 128,
        "normalize_activations": "none",
    }
    (tmp_path / "v3" / "cfg.json").write_text(json.dumps(cfg))
    sae = saelab.load_sae(tmp_path / "v3")
    x = torch.randn(20, D_IN)
    latents = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert torch.allclose(sae.encode(x), latents, atol=1e-5)  # SAELens applies the factor when decoding
    assert torch.allclose(sae(x), (latents * scale) @ w["W_dec"] + w["b_dec"], atol=1e-4)


def test_old_saelens_activation_functions_saelab_does_not_compute_are_refused(tmp_path):
    saelens_weights("standard", tmp_path / "tanh")
    cfg = {**saelens_2_cfg(D_IN, D_SAE), "activation_fn": "tanh-relu"}
    (tmp_path / "tanh" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="activation_fn 'tanh-relu' is not supported"):
        saelab.load_sae(tmp_path / "tanh")


@pytest.mark.parametrize(
    "architecture, options, converted",
    [
        ("batchtopk", {"k": K}, "jumprelu"),
        ("matryoshka", {"k": K, "matryoshka_widths": [8]}, "jumprelu"),
        ("gated", {"d_out": 7}, "jumprelu_transcoder"),
        ("gated", {"d_out": 7, "skip_connection": True}, "jumprelu_skip_transcoder"),
        ("batchtopk", {"k": K, "d_out": 7}, "jumprelu_transcoder"),
        ("topk", {"k": K}, "topk"),
        ("gated", {}, "gated"),
        ("topk", {"k": K, "transcoder": True}, "topk"),
    ],
)
def test_convert_to_saelens_writes_what_saelens_has_a_class_for_with_the_same_outputs(
    tmp_path, architecture, options, converted
):
    from saelab.cli import main

    torch.manual_seed(0)
    sae = saelab.create_sae(architecture, d_in=D_IN, d_sae=D_SAE, **options)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.3)
    sae.eval().save(tmp_path / "sae", sparsity=torch.full((D_SAE,), -1.5))
    assert main(["convert", str(tmp_path / "sae"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["architecture"] == converted
    x = torch.randn(50, D_IN) * 2
    back = saelab.load_sae(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5) and (sae.encode(x) > 0).any()
        assert torch.allclose(back(x), sae(x), atol=1e-5)
    assert torch.equal(saelab.io.load_sparsity(tmp_path / "out"), torch.full((D_SAE,), -1.5))


@pytest.mark.parametrize("architecture, options", [("batchtopk", {"k": K}), ("gated", {"d_out": 7})])
def test_an_sae_converted_for_saelens_answers_saelens_attribute_names(architecture, options):
    from saelab.io.saelens_compat import to_saelens

    sae = saelab.create_sae(architecture, d_in=D_IN, d_sae=D_SAE, metadata={"context_size": 64}, **options)
    converted = to_saelens(sae)
    assert converted is not sae and converted.cfg.architecture == "jumprelu"
    assert converted.cfg.metadata.converted_from == architecture and converted.cfg.context_size == 64
    assert "converted_from" not in sae.cfg.metadata  # the SAE converted is left as it was


@pytest.mark.parametrize(
    "options, message",
    [
        ({"architecture": "topk", "k": K, "d_out": 7}, "no TopK transcoder class.*maps 12 -> 7\\)$"),
        ({"architecture": "topk", "k": K, "skip_connection": True}, "no TopK transcoder.*W_skip.*--to sparsify$"),
        (
            {"architecture": "standard", "normalize_activations": "layer_norm"},
            "layer_norm.*unbiased standard deviation",
        ),
    ],
)
def test_saes_saelens_has_no_equivalent_of_are_refused_in_one_line_before_writing_or_uploading(
    tmp_path, fake_hub_api, capsys, options, message
):
    from saelab.cli import main

    sae = saelab.create_sae(options.pop("architecture"), d_in=D_IN, d_sae=D_SAE, **options)
    sae.save(tmp_path / "sae")  # saelab's own format keeps it
    assert main(["convert", str(tmp_path / "sae"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search("cannot be written for SAELens: .*" + message, err.strip())
    assert not (tmp_path / "out").exists()
    assert main(["upload", str(tmp_path / "sae"), "me/saes"]) == 2
    assert fake_hub_api == {} and "cannot be written for SAELens" in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        saelab.push_to_hub(sae, "me/saes")
    if "sparsify" in message:  # the way out the message offers works
        assert main(["convert", str(tmp_path / "sae"), str(tmp_path / "sp"), "--to", "sparsify"]) == 0
