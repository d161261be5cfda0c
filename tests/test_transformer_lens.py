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
