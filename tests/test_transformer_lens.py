"""TransformerLens models (the optional extra) behind the same interface, on a tiny local model."""

from __future__ import annotations

import pytest
import torch
from tiny import save_tiny_model

from saelab.data.activation_store import Harvester
from saelab.models import UnknownHookError, load_model

pytest.importorskip("transformer_lens.model_bridge", reason="the transformer-lens extra is not installed")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))
    return load_model(folder), load_model("tl:" + folder)


TOKENS = torch.tensor([[1, 5, 6, 7, 8, 9, 4], [1, 9, 9, 8, 7, 6, 5]])


def test_transformer_lens_names_read_the_same_activations(models):
    hf, tl = models
    ours = hf.run_with_cache(TOKENS, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.hook_z"])
    theirs = tl.run_with_cache(TOKENS, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"])
    assert torch.allclose(ours["blocks.1.hook_resid_post"], theirs["blocks.1.hook_resid_post"], atol=1e-4)
    assert torch.allclose(ours["blocks.0.hook_mlp_out"], theirs["blocks.0.hook_mlp_out"], atol=1e-4)
    assert theirs["blocks.1.attn.hook_z"].shape == (2, 7, 32)  # heads flattened: 4 x 8
    assert torch.allclose(ours["blocks.1.hook_z"], theirs["blocks.1.attn.hook_z"], atol=1e-4)
    assert tl.hook_point("blocks.2.hook_resid_pre").layer == 2 and tl.n_layers == 3


def test_writes_splice_and_unknown_names_fail_with_the_list(models):
    hf, tl = models
    zero = {"blocks.0.hook_mlp_out": torch.zeros_like}
    assert torch.allclose(hf.logits(TOKENS, write=zero), tl.logits(TOKENS, write=zero), atol=1e-4)
    assert not torch.allclose(tl.logits(TOKENS), tl.logits(TOKENS, write=zero), atol=1e-4)
    with pytest.raises(UnknownHookError, match="Did you mean 'blocks.1.hook_resid_post'"):
        Harvester(tl, ["blocks.1.hook_resid_psot"])
    rows, ids = Harvester(tl, ["blocks.1.hook_resid_post"], exclude_token_ids=[1])(TOKENS)
    assert rows["blocks.1.hook_resid_post"].shape == (12, 32) and (ids != 1).all()


def test_analysis_splices_steers_and_reads_logit_effects_on_transformer_lens_models(models):
    import saelab
    from saelab.analysis import logit_effects, run_with_cache_and_saes, run_with_saes, steer

    hf, tl = models
    torch.manual_seed(0)
    sae = saelab.create_sae("topk", d_in=32, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post")
    assert torch.equal(run_with_saes(tl, TOKENS, sae, error_term=True), tl.logits(TOKENS))
    _, ours = run_with_cache_and_saes(hf, TOKENS, sae)
    _, theirs = run_with_cache_and_saes(tl, TOKENS, sae)
    latents = "blocks.1.hook_resid_post.hook_sae_acts_post"
    assert torch.allclose(ours[latents], theirs[latents], atol=1e-3)
    with steer(tl, sae, latent=3, coefficient=2.0), tl.hooks(read=["blocks.1.hook_resid_post"]) as steered:
        tl.logits(TOKENS)
    clean = tl.run_with_cache(TOKENS, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    assert torch.allclose(steered["blocks.1.hook_resid_post"] - clean, 2.0 * sae.W_dec[3].detach().expand_as(clean), atol=1e-4)
    assert torch.allclose(logit_effects(sae, tl)["top_values"], logit_effects(sae, hf)["top_values"], atol=1e-4)
