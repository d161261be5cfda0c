"""saelab's files in SAELens and sparsify themselves, and theirs (and dictionary_learning's) in saelab: same
outputs both ways.

The README's test command installs these libraries (the `interop` extra, and dictionary-learning with
`--no-deps`), so these tests run there and in CI. Anywhere they are missing, each test is skipped, naming the
library.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import saelab
from saelab.io import save_sparsify

D_IN, D_SAE, D_OUT = 16, 48, 12


def perturbed(module):
    """Random non-zero values everywhere (fresh SAEs have zero biases and thresholds, which hide mistakes)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module.eval()


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(32, D_IN) * 3


SAELAB_TO_SAELENS = {
    "standard": {},
    "gated": {},
    "jumprelu": {},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "matryoshka": {"k": 4, "matryoshka_widths": [8, D_SAE]},
    "transcoder": {"architecture": "standard", "d_out": D_OUT},
    "skip_transcoder": {"architecture": "standard", "d_out": D_OUT, "skip_connection": True},
    "jumprelu_transcoder": {"architecture": "jumprelu", "d_out": D_OUT},
    "jumprelu_skip_transcoder": {"architecture": "jumprelu", "d_out": D_OUT, "skip_connection": True},
    # SAELens has no class of these: `saelab convert --to saelens` writes the equivalent one it has
    "gated_transcoder": {"architecture": "gated", "d_out": D_OUT},
    "gated_skip_transcoder": {"architecture": "gated", "d_out": D_OUT, "skip_connection": True},
    "batchtopk_skip_transcoder": {"architecture": "batchtopk", "k": 4, "d_out": D_OUT, "skip_connection": True},
    "matryoshka_transcoder": {"architecture": "matryoshka", "k": 4, "matryoshka_widths": [8, D_SAE], "d_out": D_OUT},
    "topk_transcoder_same_width": {
        "architecture": "topk",
        "k": 4,
        "transcoder": True,
        "hook_name_out": "blocks.0.hook_mlp_out",
    },
}
CONVERTED = {
    "batchtopk",
    "matryoshka",
    "gated_transcoder",
    "gated_skip_transcoder",
    "batchtopk_skip_transcoder",
    "matryoshka_transcoder",
}


def saelab_sae(name):
    """A trained-looking saelab SAE of SAELAB_TO_SAELENS[name] (BatchTopK ones with a running threshold)."""
    options = dict(SAELAB_TO_SAELENS[name])
    sae = perturbed(
        saelab.create_sae(
            options.pop("architecture", name),
            D_IN,
            D_SAE,
            hook_name="blocks.0.hook_mlp_in",
            model_name="gpt2",
            **options,
        )
    )
    if hasattr(sae, "topk_threshold"):
        with torch.no_grad():
            sae.topk_threshold.fill_(0.2)
    if name.startswith("gated"):  # equivalent JumpReLU thresholds b_mag - e^r_mag b_gate of both signs
        with torch.no_grad():
            sae.b_gate.copy_(torch.randn(D_SAE) * 2)
    return sae


def test_saelens_loads_an_sae_that_names_no_hook_point(tmp_path, x):
    """An SAE trained on activations from nowhere in particular (synthetic, a tensor) has no hook_name."""
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (pip install -e '.[interop]')")
    sae = perturbed(saelab.create_sae("jumprelu", D_IN, D_SAE))
    sae.save(tmp_path / "nowhere")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "nowhere")
    with torch.no_grad():
        assert torch.allclose(theirs(x), sae(x), atol=1e-5)
    assert saelab.load_sae(tmp_path / "nowhere").cfg.hook_name is None


@pytest.mark.parametrize("name", SAELAB_TO_SAELENS)
def test_saelens_loads_what_saelab_writes_for_it_and_computes_the_same(tmp_path, x, name):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (pip install -e '.[interop]')")
    from saelab.cli import main

    sae = saelab_sae(name)
    sae.save(tmp_path / "saelab")
    assert main(["convert", str(tmp_path / "saelab"), str(tmp_path / "saelens"), "--to", "saelens"]) == 0
    folder = tmp_path / ("saelens" if name in CONVERTED else "saelab")  # SAELens reads the others as saelab wrote them
    theirs = sae_lens.SAE.load_from_disk(folder)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)
        assert torch.allclose(theirs(x), sae(x), atol=1e-5)
        assert (theirs.encode(x) > 0).sum() > 0  # something fires: the comparison means something
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_mlp_in"
    if sae.cfg.hook_name_out:  # where SAELens splices the output
        assert theirs.cfg.metadata.hook_name_out == sae.cfg.hook_name_out
    # and saelab reads the converted folder back to the same outputs
    assert torch.allclose(saelab.load_sae(tmp_path / "saelens")(x), sae(x), atol=1e-5)


@pytest.fixture
def hub_uploads(tmp_path, monkeypatch):
    """huggingface_hub.HfApi replaced by one that copies each uploaded folder to tmp_path/hub/<repo>/<path>."""
    import shutil

    import huggingface_hub

    class CopyingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            pass

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None):
            shutil.copytree(folder_path, tmp_path / "hub" / repo_id / (path_in_repo or ""), dirs_exist_ok=True)
            return "https://example/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", CopyingApi)
    return tmp_path / "hub"


@pytest.mark.parametrize("name", ["batchtopk", "gated_skip_transcoder", "jumprelu"])
def test_what_saelab_uploads_loads_in_saelens(tmp_path, x, hub_uploads, name):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (pip install -e '.[interop]')")
    from saelab.cli import main

    sae = saelab_sae(name)
    sae.save(tmp_path / "sae", sparsity=torch.full((D_SAE,), -2.0))
    (tmp_path / "sae" / "eval.json").write_text("{}")
    assert main(["upload", str(tmp_path / "sae"), "me/saes", "--path_in_repo", "layer0"]) == 0
    uploaded = hub_uploads / "me/saes/layer0"
    assert sorted(p.name for p in uploaded.iterdir()) == [
        "cfg.json",
        "eval.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    theirs = sae_lens.SAE.load_from_disk(uploaded)
    with torch.no_grad():
        assert torch.allclose(theirs(x), sae(x), atol=1e-5)
    saelab.push_to_hub(sae, "me/api")
    assert torch.allclose(sae_lens.SAE.load_from_disk(hub_uploads / "me/api")(x).detach(), sae(x).detach(), atol=1e-5)


def test_saelens_and_saelab_read_a_saelens_2_cfg_the_same(tmp_path, x):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (pip install -e '.[interop]')")
    from peer_files import saelens_2_cfg

    g = torch.Generator().manual_seed(3)
    weights = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
        "scaling_factor": torch.ones(D_SAE),
    }
    (tmp_path / "old").mkdir()
    save_file(weights, str(tmp_path / "old" / "sae_weights.safetensors"))
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(saelens_2_cfg(D_IN, D_SAE)))
    theirs, ours = sae_lens.SAE.load_from_disk(tmp_path / "old"), saelab.load_sae(tmp_path / "old")
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-5)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


SAELENS_TO_SAELAB = {
    "StandardSAE": {},
    "GatedSAE": {},
    "JumpReLUSAE": {},
    "TopKSAE": {"k": 4},
    "TopKSAE-rescaled": {"k": 4, "rescale_acts_by_decoder_norm": True},
    "Transcoder": {"d_out": D_OUT, "apply_b_dec_to_input": False},
    "SkipTranscoder": {"d_out": D_OUT, "apply_b_dec_to_input": False},
    "JumpReLUTranscoder": {"d_out": D_OUT, "apply_b_dec_to_input": False},
    "JumpReLUSkipTranscoder": {"d_out": D_OUT, "apply_b_dec_to_input": False},
}


@pytest.mark.parametrize("name", SAELENS_TO_SAELAB)
def test_saelab_loads_files_saelens_writes_and_computes_the_same(tmp_path, x, name):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (pip install -e '.[interop]')")
    cls = name.split("-")[0]
    their_config = getattr(sae_lens, cls + "Config")(d_in=D_IN, d_sae=D_SAE, **SAELENS_TO_SAELAB[name])
    theirs = perturbed(getattr(sae_lens, cls)(their_config))
    theirs.save_model(str(tmp_path / "sae"))
    sae = saelab.load_sae(tmp_path / "sae").eval()
    with torch.no_grad():
        assert torch.allclose(sae(x), theirs(x), atol=1e-5)
        assert torch.allclose(sae.encode(x), theirs.encode(x), atol=1e-5)


@pytest.mark.parametrize("transcode, skip", [(False, False), (True, False), (True, True)])
def test_sparsify_and_saelab_read_each_others_files(tmp_path, x, transcode, skip):
    sparsify = pytest.importorskip("sparsify", reason="EleutherAI sparsify not installed (pip install -e '.[interop]')")
    coder = perturbed(
        sparsify.SparseCoder(
            D_IN,
            sparsify.SparseCoderConfig(num_latents=D_SAE, k=4, transcode=transcode, skip_connection=skip),
            device="cpu",
        )
    )
    coder.save_to_disk(tmp_path / "theirs")
    ours = saelab.load_sae(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), coder(x).sae_out, atol=1e-5)
    save_sparsify(ours, tmp_path / "back")
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "back")
    with torch.no_grad():
        assert torch.allclose(again(x).sae_out, coder(x).sae_out, atol=1e-5)


@pytest.mark.parametrize(
    "dict_class", ["AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"]
)
def test_saelab_loads_dictionary_learning_checkpoints_and_computes_the_same(tmp_path, x, dict_class):
    pytest.importorskip(
        "dictionary_learning.dictionary",
        reason="dictionary_learning not installed (pip install --no-deps dictionary-learning)",
    )
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    classes = {
        c.__name__: c for c in (AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE)
    }
    theirs = perturbed(classes[dict_class](D_IN, D_SAE, *((4,) if "TopK" in dict_class else ())))
    if dict_class in ("JumpReluAutoEncoder", "BatchTopKSAE"):  # thresholds that matter
        with torch.no_grad():
            theirs.threshold.copy_(torch.rand_like(theirs.threshold) * 0.3)
    (tmp_path / "dl").mkdir()
    torch.save(theirs.state_dict(), tmp_path / "dl" / "ae.pt")
    (tmp_path / "dl" / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, "layer": 1}}))
    ours = saelab.load_sae(tmp_path / "dl").eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
