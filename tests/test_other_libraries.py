"""saelab's files in SAELens and sparsify themselves, and theirs (and dictionary_learning's) in saelab: same
outputs both ways.

These run where those libraries are installed and are skipped elsewhere (SAELens pins transformer-lens < 4,
which the test extra's TransformerLens adapter cannot share an environment with). To run them:

    python3 -m venv /tmp/interop && /tmp/interop/bin/pip install torch==2.13.0 sae-lens eai-sparsify pytest \
        && /tmp/interop/bin/pip install --no-deps dictionary-learning && /tmp/interop/bin/pip install nnsight \
        && /tmp/interop/bin/pip install -e . && /tmp/interop/bin/python -m pytest tests/test_other_libraries.py
"""

from __future__ import annotations

import json

import pytest
import torch

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
    "standard": {}, "gated": {}, "jumprelu": {}, "topk": {"k": 4},
    "batchtopk": {"k": 4}, "matryoshka": {"k": 4, "matryoshka_widths": [8, D_SAE]},
    "transcoder": {"architecture": "standard", "d_out": D_OUT},
    "skip_transcoder": {"architecture": "standard", "d_out": D_OUT, "skip_connection": True},
    "jumprelu_transcoder": {"architecture": "jumprelu", "d_out": D_OUT},
    "jumprelu_skip_transcoder": {"architecture": "jumprelu", "d_out": D_OUT, "skip_connection": True},
}


@pytest.mark.parametrize("name", SAELAB_TO_SAELENS)
def test_saelens_loads_saelab_files_and_computes_the_same(tmp_path, x, name):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (see this file's docstring)")
    options = dict(SAELAB_TO_SAELENS[name])
    sae = perturbed(saelab.create_sae(options.pop("architecture", name), D_IN, D_SAE, hook_name="blocks.0.hook_mlp_in",
                                      model_name="gpt2", **options))
    if hasattr(sae, "to_jumprelu"):  # BatchTopK-family SAEs run as JumpReLU at inference, in SAELens too
        with torch.no_grad():
            sae.topk_threshold.fill_(0.2)
        sae = sae.to_jumprelu()
    sae.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    with torch.no_grad():
        assert torch.allclose(theirs(x), sae(x), atol=1e-5)
        assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)


SAELENS_TO_SAELAB = {
    "StandardSAE": {}, "GatedSAE": {}, "JumpReLUSAE": {}, "TopKSAE": {"k": 4},
    "TopKSAE-rescaled": {"k": 4, "rescale_acts_by_decoder_norm": True},
    "Transcoder": {"d_out": D_OUT, "apply_b_dec_to_input": False},
    "SkipTranscoder": {"d_out": D_OUT, "apply_b_dec_to_input": False},
    "JumpReLUTranscoder": {"d_out": D_OUT, "apply_b_dec_to_input": False},
    "JumpReLUSkipTranscoder": {"d_out": D_OUT, "apply_b_dec_to_input": False},
}


@pytest.mark.parametrize("name", SAELENS_TO_SAELAB)
def test_saelab_loads_files_saelens_writes_and_computes_the_same(tmp_path, x, name):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (see this file's docstring)")
    cls = name.split("-")[0]
    theirs = perturbed(getattr(sae_lens, cls)(getattr(sae_lens, cls + "Config")(d_in=D_IN, d_sae=D_SAE, **SAELENS_TO_SAELAB[name])))
    theirs.save_model(str(tmp_path / "sae"))
    sae = saelab.load_sae(tmp_path / "sae").eval()
    with torch.no_grad():
        assert torch.allclose(sae(x), theirs(x), atol=1e-5)
        assert torch.allclose(sae.encode(x), theirs.encode(x), atol=1e-5)


@pytest.mark.parametrize("transcode, skip", [(False, False), (True, False), (True, True)])
def test_sparsify_and_saelab_read_each_others_files(tmp_path, x, transcode, skip):
    sparsify = pytest.importorskip("sparsify", reason="EleutherAI sparsify not installed (see this file's docstring)")
    coder = perturbed(sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=4, transcode=transcode,
                                                                            skip_connection=skip), device="cpu"))
    coder.save_to_disk(tmp_path / "theirs")
    ours = saelab.load_sae(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), coder(x).sae_out, atol=1e-5)
    save_sparsify(ours, tmp_path / "back")
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "back")
    with torch.no_grad():
        assert torch.allclose(again(x).sae_out, coder(x).sae_out, atol=1e-5)


@pytest.mark.parametrize("dict_class", ["AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
                                        "BatchTopKSAE"])
def test_saelab_loads_dictionary_learning_checkpoints_and_computes_the_same(tmp_path, x, dict_class):
    pytest.importorskip("dictionary_learning.dictionary", reason="dictionary_learning not installed (see the docstring)")
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    classes = {c.__name__: c for c in (AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE)}
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
