"""TransformerLens models (the optional extra) behind the same interface, on a tiny local model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny import save_tiny_model, tiny_causal_lm, word_tokenizer

from saelab.activations.harvest import Harvester
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


def test_reading_stops_after_the_deepest_block(models):
    _, tl = models
    calls = []
    last = tl.model.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    acts = tl.run_with_cache(TOKENS, ["blocks.1.hook_resid_mid", "blocks.0.hook_mlp_in"])
    last.remove()
    assert calls == [] and acts["blocks.1.hook_resid_mid"].shape == (2, 7, 32)
    assert not tl._sites  # every hook removed


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
    expected = 2.0 * sae.W_dec[3].detach().expand_as(clean)
    assert torch.allclose(steered["blocks.1.hook_resid_post"] - clean, expected, atol=1e-4)
    assert torch.allclose(logit_effects(sae, tl)["top_values"], logit_effects(sae, hf)["top_values"], atol=1e-4)


# Name by name against TransformerLens on the same weights: the bridge (the `tl:` path) and the classic
# HookedTransformer (whose names SAELens SAEs' hook_name values use), for a Llama-style and a GPT-2-style model.


def hooked_transformer(hf_model):
    """TransformerLens's HookedTransformer with the weights of `hf_model`, unprocessed (as SAELens loads models)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    c = hf_model.config
    if c.model_type == "gpt2":
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer,
            d_model=c.n_embd,
            d_head=c.n_embd // c.n_head,
            n_heads=c.n_head,
            d_mlp=4 * c.n_embd,
            d_vocab=c.vocab_size,
            n_ctx=c.n_positions,
            act_fn=c.activation_function,
            normalization_type="LN",
            eps=c.layer_norm_epsilon,
            original_architecture="GPT2LMHeadModel",
            default_prepend_bos=False,
        )
        convert = convert_gpt2_weights
    else:
        d_head = c.hidden_size // c.num_attention_heads
        cfg = HookedTransformerConfig(
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            d_head=d_head,
            n_heads=c.num_attention_heads,
            d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size,
            n_ctx=c.max_position_embeddings,
            act_fn=c.hidden_act,
            n_key_value_heads=c.num_key_value_heads,
            normalization_type="RMS",
            eps=c.rms_norm_eps,
            final_rms=True,
            gated_mlp=True,
            positional_embedding_type="rotary",
            rotary_dim=d_head,
            rotary_adjacent_pairs=False,
            rotary_base=c.rope_parameters["rope_theta"],
            original_architecture="LlamaForCausalLM",
            default_prepend_bos=False,
        )
        convert = convert_llama_weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert(hf_model, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.set_use_hook_mlp_in(True)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def three(request, tmp_path_factory):
    """(Hugging Face path, `tl:` path, HookedTransformer) on the same random weights."""
    from transformers import AutoTokenizer

    from saelab.models import HookedModel
    from saelab.models.transformer_lens import wrap_transformer_lens

    folder = tmp_path_factory.mktemp("tokenizer")
    word_tokenizer().save_pretrained(folder)  # the bridge wants a tokenizer that knows where it came from
    hf_model = tiny_causal_lm(request.param)
    reference = hooked_transformer(hf_model)
    # the bridge wraps the modules it is given: each path gets its own copy
    tl = wrap_transformer_lens(copy.deepcopy(hf_model), AutoTokenizer.from_pretrained(folder), "tiny")
    return HookedModel(copy.deepcopy(hf_model)), tl, reference


def bent(x: torch.Tensor) -> torch.Tensor:
    """A replacement that no norm undoes (norms ignore scaling and, LayerNorm, shifting)."""
    return x + torch.tanh(2 * x).flip(-1)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(-2) if x.dim() == 4 else x


def test_every_name_reads_the_same_values_as_transformer_lens(three):
    """Every name of the Hugging Face path exists on the `tl:` path with the same values, and all but two
    (hook_z, kept for saved SAEs; mlp.hook_in, the bridge's name for the MLP module's input) are names of
    HookedTransformer, with its values."""
    hf, tl, reference = three
    names = list(hf.hook_points)
    ours, bridge = hf.run_with_cache(TOKENS, names), tl.run_with_cache(TOKENS, names)
    _, classic = reference.run_with_cache(TOKENS, names_filter=lambda name: name in hf.hook_points)
    assert set(names) - set(classic.keys()) == {f"blocks.{i}.{n}" for i in range(2) for n in ("hook_z", "mlp.hook_in")}
    for name in names:
        assert torch.allclose(ours[name], bridge[name], atol=1e-5), name
        if name in classic:
            assert torch.allclose(ours[name], flat(classic[name]), atol=1e-5), name


WRITTEN = [
    "blocks.0.hook_resid_pre",
    "blocks.0.ln1.hook_normalized",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_mlp_in",
    "blocks.0.ln2.hook_normalized",
    "blocks.0.mlp.hook_post",
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_resid_post",
    "ln_final.hook_normalized",
]


@pytest.mark.parametrize("name", WRITTEN)
def test_replacing_an_activation_changes_the_logits_as_in_transformer_lens(three, name):
    """Replacing any activation by a function of itself gives HookedTransformer's logits on both paths
    (resid_mid moves the residual stream too; hook_mlp_in only what the MLP reads)."""
    hf, tl, reference = three
    ours, bridge = hf.logits(TOKENS, write={name: bent}), tl.logits(TOKENS, write={name: bent})
    classic = reference.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook: bent(flat(x)).reshape(x.shape))])
    assert torch.allclose(ours, classic, atol=1e-4) and torch.allclose(bridge, classic, atol=1e-4)
    assert not torch.allclose(ours, hf.logits(TOKENS), atol=1e-3)


def test_a_transcoder_splices_the_same_on_both_paths(three):
    """A transcoder reading the MLP's normalised input and writing its output (as SAELens's transcoders do)
    gives the same logits through both paths."""
    import saelab
    from saelab.analysis import run_with_saes

    hf, tl, _ = three
    torch.manual_seed(0)
    transcoder = saelab.create_sae(
        "topk", d_in=32, d_sae=64, k=4, hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out"
    )
    ours, theirs = run_with_saes(hf, TOKENS, transcoder), run_with_saes(tl, TOKENS, transcoder)
    assert torch.allclose(ours, theirs, atol=1e-4) and not torch.allclose(ours, hf.logits(TOKENS), atol=1e-3)
