"""A tiny Llama and its word-level tokenizer, built and saved locally by the tests (nothing downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the a cat dog sat ran on under mat box red blue big small and then it was very quiet "
         "model layer sparse feature read write token text").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " ." for _ in range(n)]


def save_tiny_model(folder: Path, n_layers: int = 3, hidden_size: int = 32) -> Path:
    """A randomly initialised Llama with a word-level tokenizer (BOS <s>, EOS </s>, PAD <pad>) in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + ["."])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts))
    return path
