"""Other libraries' SAE layouts, written here the way those libraries write them, loaded by saelab."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import saelab
from saelab.core.files import FileFormatError
from saelab.io import save_sparsify

D_IN, D_SAE, K = 12, 40, 5


def write_sparsify(folder, transcode=False, skip=False, seed=0):
    """A sparsify SparseCoder folder: nn.Linear encoder, W_dec (d_sae, d_in), b_dec, optional W_skip."""
    g = torch.Generator().manual_seed(seed)
    weights = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    if skip:
        weights["W_skip"] = torch.randn(D_IN, D_IN, generator=g)
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": K,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D_IN,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return weights


def sparsify_by_hand(w, x, transcode, skip):
    """What sparsify's forward computes: relu(encoder(x - b_dec)) top-k, decoded, + skip."""
    pre = torch.relu((x if transcode else x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(K, dim=-1)
    out = (top.values.unsqueeze(-1) * w["W_dec"][top.indices]).sum(1) + w["b_dec"]
    return out + x @ w["W_skip"].T if skip else out


@pytest.mark.parametrize("transcode, skip", [(False, False), (True, False), (True, True)])
def test_sparsify_folders_load_and_compute_the_same(tmp_path, transcode, skip):
    weights = write_sparsify(tmp_path / "layers.3", transcode, skip)
    sae = saelab.load_sae(tmp_path / "layers.3")
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", K)
    assert (sae.cfg.transcoder, sae.cfg.skip_connection) == (transcode or skip, skip)
    x = torch.randn(30, D_IN)
    assert torch.allclose(sae(x), sparsify_by_hand(weights, x, transcode, skip), atol=1e-5)


@pytest.mark.parametrize(
    "folder, transcode, hooks",
    [
        ("layers.3", False, ("blocks.3.hook_resid_post", None)),
        ("layers.3.mlp", False, ("blocks.3.hook_mlp_out", None)),
        ("h.3.attn", False, ("blocks.3.hook_attn_out", None)),
        ("layers.3.mlp", True, ("blocks.3.hook_mlp_in", "blocks.3.hook_mlp_out")),
        ("layers.3", True, ("blocks.3.hook_resid_pre", "blocks.3.hook_resid_post")),
        ("layers.3.mlp.act_fn", False, (None, None)),
    ],
)
def test_sparsify_folders_say_their_hook_and_their_run_says_the_model(tmp_path, folder, transcode, hooks):
    """sparsify names each SAE's folder after its hook point and writes the run's config.json beside them."""
    write_sparsify(tmp_path / "run" / folder, transcode)
    run_config = {"model": "EleutherAI/pythia-70m", "hookpoints": [folder]}
    (tmp_path / "run" / "config.json").write_text(json.dumps(run_config))
    sae = saelab.load_sae(tmp_path / "run" / folder)
    assert (sae.cfg.hook_name, sae.cfg.hook_name_out) == hooks
    assert sae.cfg.hook_layer == 3 and sae.cfg.model_name == "EleutherAI/pythia-70m"


def test_saelab_to_sparsify_and_back_is_exact(tmp_path):
    sae = saelab.create_sae("topk", d_in=D_IN, d_sae=D_SAE, k=K)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    save_sparsify(sae, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["k"] == K
    back = saelab.load_sae(tmp_path / "out")
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    with pytest.raises(ValueError, match="TopK"):
        save_sparsify(saelab.create_sae("standard", d_in=D_IN, d_sae=D_SAE), tmp_path / "bad")


def test_gemma_scope_params_load_and_compute_the_same(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)),
        "W_dec": rng.normal(size=(D_SAE, D_IN)),
        "b_enc": rng.normal(size=D_SAE),
        "b_dec": rng.normal(size=D_IN),
        "threshold": rng.uniform(0.1, 1, D_SAE),
    }
    (tmp_path / "gs").mkdir()
    np.savez(tmp_path / "gs" / "params.npz", **{k: v.astype(np.float32) for k, v in params.items()})
    sae = saelab.load_sae(tmp_path / "gs")
    x = torch.randn(30, D_IN)
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in params.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    by_hand = (pre * (pre > t["threshold"])) @ t["W_dec"] + t["b_dec"]
    assert sae.cfg.architecture == "jumprelu" and torch.allclose(sae(x), by_hand, atol=1e-4)


def write_gemma_scope(folder, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)),
        "W_dec": rng.normal(size=(D_SAE, D_IN)),
        "b_enc": rng.normal(size=D_SAE),
        "b_dec": rng.normal(size=D_IN),
        "threshold": rng.uniform(0.1, 1, D_SAE),
    }
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in params.items()})


@pytest.mark.parametrize(
    "repo, model, hook",
    [
        ("gemma-scope-2b-pt-res", "google/gemma-2-2b", "blocks.12.hook_resid_post"),
        ("gemma-scope-9b-it-mlp", "google/gemma-2-9b-it", "blocks.12.hook_mlp_out"),
        ("models--google--gemma-scope-2b-pt-att/snapshots/0123abc", "google/gemma-2-2b", "blocks.12.hook_z"),
    ],
)
def test_gemma_scope_paths_say_the_model_hook_and_layer(tmp_path, repo, model, hook):
    """A local clone of a Gemma Scope repo, or the hub cache's folder for it, names the model and the site."""
    folder = tmp_path / repo / "layer_12" / "width_16k" / "average_l0_82"
    write_gemma_scope(folder)
    for path in (folder, folder / "params.npz"):
        sae = saelab.load_sae(path)
        assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.hook_layer) == (model, hook, 12)
        assert sae.cfg.metadata["average_l0"] == 82
    write_gemma_scope(tmp_path / "elsewhere" / "layer_5")  # the layer alone: the hook is the caller's to say
    sae = saelab.load_sae(tmp_path / "elsewhere" / "layer_5")
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.hook_layer) == (None, None, 5)


def test_load_sae_arguments_replace_what_the_files_say(tmp_path):
    write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res" / "layer_12")
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12"
    sae = saelab.load_sae(folder, model_name="me/gemma-ft", hook_name="blocks.7.hook_mlp_out")
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.hook_layer) == ("me/gemma-ft", "blocks.7.hook_mlp_out", 7)
    sae = saelab.load_sae(folder, hook_name="model.layers.7.mlp:input", hook_layer=9)
    assert (sae.cfg.hook_name, sae.cfg.hook_layer) == ("model.layers.7.mlp:input", 9)
    assert sae.cfg.model_name == "google/gemma-2-2b"
    write_dictionary_learning(tmp_path / "dl", "AutoEncoder")
    assert saelab.load_sae(tmp_path / "dl", hook_layer=4).cfg.hook_layer == 4


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_every_reader_loads_onto_the_device_asked_for(tmp_path):
    """meta is a device every torch has; a reader that ignored `device` would give CPU tensors."""
    write_sparsify(tmp_path / "sparsify")
    write_gemma_scope(tmp_path / "gemma_scope")
    write_dictionary_learning(tmp_path / "dictionary_learning", "AutoEncoderTopK")
    write_e2e_sae_run(tmp_path / "e2e_sae", positions=("blocks.1.hook_resid_pre",))
    saelab.create_sae("gated", d_in=D_IN, d_sae=D_SAE).save(tmp_path / "saelab")
    for folder in sorted(tmp_path.iterdir()):
        sae = saelab.load_sae(folder, device="meta")
        assert sae.device.type == "meta" and sae.cfg.device == "meta", folder.name
        assert all(p.device.type == "meta" for p in sae.parameters()), folder.name


def test_bad_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError, match="no SAE found; expected cfg.json"):
        saelab.load_sae(tmp_path / "empty")
    weights = write_sparsify(tmp_path / "wrong")
    cfg = json.loads((tmp_path / "wrong" / "cfg.json").read_text())
    (tmp_path / "wrong" / "cfg.json").write_text(json.dumps({**cfg, "d_in": D_IN + 1}))
    with pytest.raises(FileFormatError, match="disagree with d_in"):
        saelab.load_sae(tmp_path / "wrong")
    (tmp_path / "pickled").mkdir()
    np.save(tmp_path / "pickled" / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    (tmp_path / "pickled" / "obj.npy").rename(tmp_path / "pickled" / "params.npz")
    with pytest.raises(FileFormatError, match="params.npz"):
        saelab.load_sae(tmp_path / "pickled")
    assert weights["W_dec"].shape == (D_SAE, D_IN)


def write_dictionary_learning(folder, dict_class, seed=0):
    """ae.pt and config.json as dictionary_learning's trainers save them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    layouts = {
        "AutoEncoder": {
            "bias": r(D_IN),
            "encoder.weight": r(D_SAE, D_IN),
            "encoder.bias": r(D_SAE),
            "decoder.weight": r(D_IN, D_SAE),
        },
        "GatedAutoEncoder": {
            "decoder_bias": r(D_IN),
            "encoder.weight": r(D_SAE, D_IN),
            "r_mag": r(D_SAE) * 0.1,
            "gate_bias": r(D_SAE),
            "mag_bias": r(D_SAE),
            "decoder.weight": r(D_IN, D_SAE),
        },
        "JumpReluAutoEncoder": {
            "W_enc": r(D_IN, D_SAE),
            "b_enc": r(D_SAE),
            "W_dec": r(D_SAE, D_IN),
            "b_dec": r(D_IN),
            "threshold": r(D_SAE).abs() + 0.1,
        },
        "AutoEncoderTopK": {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(-1.0),
            "decoder.weight": r(D_IN, D_SAE),
            "encoder.weight": r(D_SAE, D_IN),
            "encoder.bias": r(D_SAE),
            "b_dec": r(D_IN),
        },
        "BatchTopKSAE": {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(0.7),
            "decoder.weight": r(D_IN, D_SAE),
            "encoder.weight": r(D_SAE, D_IN),
            "encoder.bias": r(D_SAE),
            "b_dec": r(D_IN),
        },
    }
    folder.mkdir(parents=True)
    torch.save(layouts[dict_class], folder / "ae.pt")
    trainer = {
        "dict_class": dict_class,
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "lm_name": "tiny",
        "layer": 3,
        "submodule_name": "resid_post_layer_3",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    return layouts[dict_class]


def dictionary_learning_by_hand(dict_class, w, x):
    """Each class's encode + decode as dictionary_learning computes them (up to its norm rescaling)."""
    if dict_class == "AutoEncoder":
        latents = torch.relu((x - w["bias"]) @ w["encoder.weight"].T + w["encoder.bias"])
        return latents @ w["decoder.weight"].T + w["bias"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - w["decoder_bias"]) @ w["encoder.weight"].T
        gate = (x_enc + w["gate_bias"] > 0).float()
        mag = torch.relu(w["r_mag"].exp() * x_enc + w["mag_bias"])
        return (gate * mag) @ w["decoder.weight"].T + w["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ w["W_enc"] + w["b_enc"]
        return torch.relu(pre * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
    post = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    if dict_class == "BatchTopKSAE":
        f = post * (post > w["threshold"])
    else:
        top = post.topk(K, dim=-1)
        f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    return f @ w["decoder.weight"].T + w["b_dec"]


@pytest.mark.parametrize(
    "dict_class", ["AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"]
)
def test_dictionary_learning_checkpoints_load_and_compute_the_same(tmp_path, dict_class):
    weights = write_dictionary_learning(tmp_path / "trainer_0", dict_class)
    sae = saelab.load_sae(tmp_path / "trainer_0").eval()
    x = torch.randn(30, D_IN)
    assert torch.allclose(sae(x), dictionary_learning_by_hand(dict_class, weights, x), atol=1e-4)
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.hook_layer) == ("tiny", "blocks.3.hook_resid_post", 3)


class CodeInPickle:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, ("touch " + self.marker,))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    (tmp_path / "dl").mkdir()
    torch.save({"encoder.weight": CodeInPickle(tmp_path / "pwned")}, tmp_path / "dl" / "ae.pt")
    (tmp_path / "dl" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(FileFormatError, match="refused or unreadable"):
        saelab.load_sae(tmp_path / "dl")
    assert not (tmp_path / "pwned").exists()


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


@pytest.mark.parametrize("architecture", saelab.available_architectures())
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


def saelens_weights(architecture, folder, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(D_SAE, generator=g) + 0.1
    folder.mkdir(parents=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    return w


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


def saelens_2_cfg(d_in, d_sae):
    """cfg.json as SAELens 2.x wrote it: its whole LanguageModelSAERunnerConfig, dtype as str(torch.float32)."""
    return {
        "model_name": "gpt2-small",
        "model_class_name": "HookedTransformer",
        "hook_point": "blocks.4.hook_resid_pre",
        "hook_point_eval": "blocks.{layer}.attn.pattern",
        "hook_point_layer": 4,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "streaming": True,
        "is_dataset_tokenized": False,
        "context_size": 128,
        "use_cached_activations": False,
        "cached_activations_path": None,
        "d_in": d_in,
        "d_sae": d_sae,
        "b_dec_init_method": "geometric_median",
        "expansion_factor": d_sae // d_in,
        "activation_fn": "relu",
        "normalize_sae_decoder": True,
        "noise_scale": 0.0,
        "from_pretrained_path": None,
        "apply_b_dec_to_input": True,
        "decoder_orthogonal_init": False,
        "decoder_heuristic_init": False,
        "init_encoder_as_decoder_transpose": False,
        "n_batches_in_buffer": 64,
        "training_tokens": 300_000_000,
        "finetuning_tokens": 0,
        "store_batch_size_prompts": 32,
        "train_batch_size_tokens": 4096,
        "normalize_activations": False,
        "device": "cuda",
        "seed": 42,
        "dtype": "torch.float32",
        "prepend_bos": True,
        "autocast": False,
        "compile_llm": False,
        "llm_compilation_mode": None,
        "compile_sae": False,
        "sae_compilation_mode": None,
        "adam_beta1": 0,
        "adam_beta2": 0.999,
        "mse_loss_normalization": None,
        "l1_coefficient": 8e-05,
        "lp_norm": 1,
        "scale_sparsity_penalty_by_decoder_norm": False,
        "l1_warm_up_steps": 0,
        "lr": 0.0004,
        "lr_scheduler_name": "constant",
        "lr_warm_up_steps": 5000,
        "lr_end": 4e-05,
        "lr_decay_steps": 0,
        "n_restart_cycles": 1,
        "finetuning_method": None,
        "use_ghost_grads": False,
        "feature_sampling_window": 1000,
        "dead_feature_window": 5000,
        "dead_feature_threshold": 1e-08,
        "n_eval_batches": 10,
        "eval_batch_size_prompts": None,
        "log_to_wandb": True,
        "log_activations_store_to_wandb": False,
        "log_optimizer_state_to_wandb": False,
        "wandb_project": "mats_sae_training_gpt2_small_resid_pre_5",
        "wandb_id": "a1b2c3",
        "run_name": "jb-l4",
        "wandb_entity": None,
        "wandb_log_frequency": 100,
        "eval_every_n_wandb_logs": 100,
        "resume": False,
        "n_checkpoints": 10,
        "checkpoint_path": "checkpoints/a1b2c3",
        "verbose": True,
        "model_kwargs": {},
        "model_from_pretrained_kwargs": {},
        "sae_lens_version": "2.1.3",
        "sae_lens_training_version": "2.1.3",
        "tokens_per_buffer": 33_554_432,
    }


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


@pytest.fixture
def hub_downloads(tmp_path, monkeypatch):
    """snapshot_download replaced by the local folder tmp_path/snapshot; returns the calls it received."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls


@pytest.fixture
def fake_hub_api(monkeypatch):
    """huggingface_hub.HfApi replaced by a recorder of what would be uploaded (no network)."""
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None):
            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded["path_in_repo"] = path_in_repo
            return "https://example/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return uploaded


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


def write_e2e_sae_run(folder, positions=("blocks.2.hook_resid_pre", "blocks.4.hook_resid_pre"), seed=0):
    """An e2e_sae run folder: SAETransformer.saes' state dict (positions with dashes) in samples_N.pt files and
    final_config.yaml. Decoder weight is (d_in, d_sae), normalised column-wise at use."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for position in positions:
        key = position.replace(".", "-")
        state.update(
            {
                f"{key}.encoder.0.weight": torch.randn(D_SAE, D_IN, generator=g),
                f"{key}.encoder.0.bias": torch.randn(D_SAE, generator=g),
                f"{key}.decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 3,
                f"{key}.decoder.bias": torch.randn(D_IN, generator=g),
            }
        )
    folder.mkdir(parents=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, folder / "samples_1000.pt")  # older checkpoint
    torch.save(state, folder / "samples_25000.pt")
    (folder / "final_config.yaml").write_text(
        "tlens_model_name: gpt2\nsaes:\n  sae_positions: [" + ", ".join(positions) + "]\n"
        "  dict_size_to_input_ratio: 3.33\nloss:\n  logits_kl: {coeff: 1.0}\n"
    )
    return state


def e2e_sae_by_hand(state, position, x):
    """e2e_sae's SAE.forward: c = relu(encoder(x)); x_hat = c @ normalize(decoder.weight, dim=0).T + bias."""
    key = position.replace(".", "-")
    c = torch.relu(x @ state[f"{key}.encoder.0.weight"].T + state[f"{key}.encoder.0.bias"])
    dictionary = torch.nn.functional.normalize(state[f"{key}.decoder.weight"], dim=0)
    return c @ dictionary.T + state[f"{key}.decoder.bias"], c


def test_e2e_sae_runs_load_each_position_from_the_newest_checkpoint(tmp_path):
    state = write_e2e_sae_run(tmp_path / "run")
    x = torch.randn(25, D_IN)
    for position in ("blocks.2.hook_resid_pre", "blocks.4.hook_resid_pre"):
        sae = saelab.load_sae(tmp_path / "run", sae_id=position).eval()
        x_hat, c = e2e_sae_by_hand(state, position, x)
        assert torch.allclose(sae(x), x_hat, atol=1e-4) and torch.allclose(sae.encode(x), c, atol=1e-5)
        assert (sae.cfg.hook_name, sae.cfg.hook_layer, sae.cfg.model_name) == (position, int(position[7]), "gpt2")
        assert sae.cfg.metadata["checkpoint"] == "samples_25000.pt"
    with pytest.raises(FileFormatError, match="name one"):
        saelab.load_sae(tmp_path / "run")
    with pytest.raises(FileFormatError, match="no SAE at 'blocks.3.hook_resid_pre'"):
        saelab.load_sae(tmp_path / "run", sae_id="blocks.3.hook_resid_pre")
    # a loaded e2e_sae SAE saves to saelab's format and reloads exactly
    sae = saelab.load_sae(tmp_path / "run", sae_id="blocks.2.hook_resid_pre")
    sae.save(tmp_path / "converted")
    assert torch.equal(saelab.load_sae(tmp_path / "converted")(x), sae(x))


def test_e2e_sae_checkpoints_with_code_or_wrong_shapes_are_refused(tmp_path):
    (tmp_path / "evil").mkdir()
    torch.save(
        {"blocks-1-hook_resid_pre.decoder.bias": CodeInPickle(tmp_path / "pwned")}, tmp_path / "evil" / "samples_10.pt"
    )
    with pytest.raises(FileFormatError, match="refused or unreadable"):
        saelab.load_sae(tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()
    state = write_e2e_sae_run(tmp_path / "bad", positions=("blocks.1.hook_resid_pre",))
    state["blocks-1-hook_resid_pre.decoder.weight"] = torch.randn(D_IN + 1, D_SAE)
    torch.save(state, tmp_path / "bad" / "samples_25000.pt")
    with pytest.raises(FileFormatError, match="do not fit together"):
        saelab.load_sae(tmp_path / "bad")


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
