"""A tiny Llama and its word-level tokenizer, built and saved locally by the tests (nothing downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = (
    "the a cat dog sat ran on under mat box red blue big small and then it was very quiet "
    "model layer sparse feature read write token text"
).split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

SMALL = [
    "--train.total_tokens",
    "40960",
    "--train.batch_size",
    "512",
    "--train.progress_bar",
    "false",
    "--source",
    "synthetic",
    "--synthetic.d_in",
    "16",
    "--synthetic.n_features",
    "32",
]
"""`saelab train` flags of a run on synthetic activations that trains in seconds (no model)."""


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " ." for _ in range(n)]


def word_tokenizer():
    """A word-level tokenizer over WORDS and '.' (BOS <s>, EOS </s>, PAD <pad>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + ["."])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_model(folder: Path, n_layers: int = 3, hidden_size: int = 32) -> Path:
    """A randomly initialised Llama with a word-level tokenizer (BOS <s>, EOS </s>, PAD <pad>) in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts))
    return path


ARCHITECTURES = ("llama", "gpt2", "neox-parallel", "neox", "gemma2", "olmo2", "gptj")


def tiny_causal_lm(architecture: str, n_layers: int = 2, seed: int = 0):
    """A random Hugging Face causal LM of one family (see ARCHITECTURES: `neox-parallel` has parallel attention)
    over word_tokenizer's vocabulary, d_model 32, 4 heads of 8. Every weight is perturbed, so that no norm has
    weight 1 or bias 0 and a name read before a norm's weight differs from one read after it."""
    import transformers as t

    vocab = len(word_tokenizer().get_vocab())
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4)
    configs = {
        "llama": lambda: t.LlamaConfig(num_key_value_heads=2, **small),
        "gpt2": lambda: t.GPT2Config(n_embd=32, n_layer=n_layers, n_head=4, n_positions=64),
        "neox-parallel": lambda: t.GPTNeoXConfig(use_parallel_residual=True, **small),
        "neox": lambda: t.GPTNeoXConfig(use_parallel_residual=False, **small),
        "gemma2": lambda: t.Gemma2Config(num_key_value_heads=2, head_dim=8, **small),
        "olmo2": lambda: t.Olmo2Config(num_key_value_heads=2, **small),
        "gptj": lambda: t.GPTJConfig(n_embd=32, n_layer=n_layers, n_head=4, n_positions=64, rotary_dim=4),
    }
    config = configs[architecture]()
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = vocab, 1, 2, 0
    torch.manual_seed(seed)
    model = t.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model
