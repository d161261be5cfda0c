"""sparsify, Gemma Scope, dictionary_learning and e2e_sae files, written as those libraries write them, loaded by
saelab and computing what they compute; checkpoints that run code are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peer_files import (
    D_IN,
    D_SAE,
    CodeInPickle,
    K,
    dictionary_learning_by_hand,
    e2e_sae_by_hand,
    sparsify_by_hand,
    write_dictionary_learning,
    write_e2e_sae_run,
    write_gemma_scope,
    write_sparsify,
)

import saelab
from saelab.core.files import FileFormatError
from saelab.io import save_sparsify


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


@pytest.mark.parametrize(
    "dict_class", ["AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"]
)
def test_dictionary_learning_checkpoints_load_and_compute_the_same(tmp_path, dict_class):
    weights = write_dictionary_learning(tmp_path / "trainer_0", dict_class)
    sae = saelab.load_sae(tmp_path / "trainer_0").eval()
    x = torch.randn(30, D_IN)
    assert torch.allclose(sae(x), dictionary_learning_by_hand(dict_class, weights, x), atol=1e-4)
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.hook_layer) == ("tiny", "blocks.3.hook_resid_post", 3)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    (tmp_path / "dl").mkdir()
    torch.save({"encoder.weight": CodeInPickle(tmp_path / "pwned")}, tmp_path / "dl" / "ae.pt")
    (tmp_path / "dl" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(FileFormatError, match="refused or unreadable"):
        saelab.load_sae(tmp_path / "dl")
    assert not (tmp_path / "pwned").exists()


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
