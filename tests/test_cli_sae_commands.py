"""The commands that read a saved SAE (eval, dashboard, convert, upload): local, other libraries' and hub folders,
and one-line errors that write nothing."""

from __future__ import annotations

import json

import pytest
import torch

import saelab
from saelab.cli import main

# ----- commands that load an SAE: eval, dashboard, convert, upload ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A two-block tiny Llama (width 32) and a text file, saved locally."""
    from tiny import save_tiny_model, sentences, write_jsonl

    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(folder / "model", n_layers=2)
    write_jsonl(folder / "text.jsonl", sentences(100))
    return folder


def run_flags(folder):
    return [
        "--data.dataset",
        str(folder / "text.jsonl"),
        "--data.context_size",
        "16",
        "--n_contexts",
        "4",
        "--batch_contexts",
        "4",
    ]


def error_line(capsys) -> str:
    """The command's whole stderr, checked to be one line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saelab: error: "), err
    return err.strip()


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command", ["eval", "dashboard"])
def test_an_sae_of_another_width_than_its_hook_is_one_line_and_writes_nothing(tiny_model, tmp_path, capsys, command):
    model = str(tiny_model / "model")
    saelab.create_sae("topk", d_in=16, d_sae=64, k=4, model_name=model, hook_name="blocks.1.hook_resid_post").save(
        tmp_path / "narrow"
    )
    saelab.create_sae(
        "topk",
        d_in=32,
        d_sae=64,
        k=4,
        d_out=16,
        model_name=model,
        hook_name="blocks.1.hook_mlp_in",
        hook_name_out="blocks.1.hook_mlp_out",
    ).save(tmp_path / "transcoder")
    before = files_under(tmp_path)
    assert main([command, str(tmp_path / "narrow"), *run_flags(tiny_model)]) == 2
    assert "the SAE's d_in is 16 but blocks.1.hook_resid_post of " in error_line(capsys)
    assert main([command, str(tmp_path / "transcoder"), *run_flags(tiny_model)]) == 2
    assert "the transcoder's d_out is 16 but its output hook blocks.1.hook_mlp_out of " in error_line(capsys)
    assert files_under(tmp_path) == before


def test_other_libraries_folders_evaluate_where_their_files_say(tiny_model, tmp_path, capsys):
    """sparsify's folder names the hook and its run config the model; dictionary_learning's trainer config names
    both; a Gemma Scope folder outside its repo names only the layer, so the model and hook are given."""

    from saelab.io import save_sparsify

    sae = saelab.create_sae("topk", d_in=32, d_sae=64, k=4)
    save_sparsify(sae, tmp_path / "sparsify_run" / "layers.1")
    (tmp_path / "sparsify_run" / "config.json").write_text(json.dumps({"model": str(tiny_model / "model")}))
    assert main(["eval", str(tmp_path / "sparsify_run" / "layers.1"), *run_flags(tiny_model), "--no_spliced"]) == 0
    report = json.loads((tmp_path / "sparsify_run" / "layers.1" / "eval.json").read_text())
    assert report["sae"]["hook_name"] == "blocks.1.hook_resid_post"

    (tmp_path / "dl").mkdir()
    weights = {
        "bias": sae.b_dec,
        "encoder.weight": sae.W_enc.T,
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.T,
    }
    torch.save(weights, tmp_path / "dl" / "ae.pt")
    trainer = {
        "dict_class": "AutoEncoder",
        "lm_name": str(tiny_model / "model"),
        "layer": 0,
        "submodule_name": "resid_post_layer_0",
    }
    (tmp_path / "dl" / "config.json").write_text(json.dumps({"trainer": trainer}))
    assert main(["eval", str(tmp_path / "dl"), *run_flags(tiny_model), "--no_spliced"]) == 0
    assert json.loads((tmp_path / "dl" / "eval.json").read_text())["sae"]["hook_name"] == "blocks.0.hook_resid_post"

    import numpy as np

    folder = tmp_path / "gs" / "layer_1"
    folder.mkdir(parents=True)
    np.savez(
        folder / "params.npz",
        W_enc=sae.W_enc.detach().numpy(),
        W_dec=sae.W_dec.detach().numpy(),
        b_enc=sae.b_enc.detach().numpy(),
        b_dec=sae.b_dec.detach().numpy(),
        threshold=np.full(64, 0.1, np.float32),
    )
    dashboard = ["dashboard", str(folder), *run_flags(tiny_model), "--top_k", "2"]
    assert main(dashboard) == 2
    assert error_line(capsys).endswith(
        "does not say which model it reads: give --model_name (a Hugging Face model name or a local folder)"
    )
    assert main([*dashboard, "--model_name", str(tiny_model / "model")]) == 2
    assert error_line(capsys).endswith("give --hook_name (e.g. blocks.1.hook_resid_post)")
    assert not (folder / "dashboard").exists()
    assert main([*dashboard, "--model_name", str(tiny_model / "model"), "--hook_name", "blocks.1.hook_resid_post"]) == 0
    assert (folder / "dashboard" / "index.html").exists()


def test_eval_of_a_hub_sae_writes_its_report_in_a_local_folder(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo_id, revision=None, allow_patterns=None: str(tmp_path / "snapshot"),
    )
    saelab.create_sae(
        "topk", d_in=32, d_sae=64, k=4, model_name=str(tiny_model / "model"), hook_name="blocks.0.hook_resid_post"
    ).save(tmp_path / "snapshot" / "layer_0")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "someone/saes", "--subfolder", "layer_0", *run_flags(tiny_model), "--no_spliced"]) == 0
    assert (tmp_path / "saes" / "layer_0" / "eval.json").exists()
    assert files_under(tmp_path / "snapshot") == ["layer_0", "layer_0/cfg.json", "layer_0/sae_weights.safetensors"]


SOURCES = {
    "hub": (["someone/saes", "--subfolder", "layer_8"], {"subfolder": "layer_8", "sae_id": None}),
    "release": (
        ["gpt2-small-res-jb", "--sae_id", "blocks.8.hook_resid_pre"],
        {"subfolder": None, "sae_id": "blocks.8.hook_resid_pre"},
    ),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("command", ["eval", "dashboard", "convert", "upload"])
def test_every_command_reaches_hub_folders_and_releases(monkeypatch, capsys, tmp_path, command, source):
    import saelab.io.load

    calls = []

    def recording_load_sae(path, **options):
        calls.append((str(path), options))
        raise saelab.FileFormatError("recorded")

    monkeypatch.setattr(saelab.io.load, "load_sae", recording_load_sae)
    args, expected = SOURCES[source]
    extra = {"convert": [str(tmp_path / "out")], "upload": ["me/copy"]}.get(command, [])
    assert main([command, args[0], *extra, *args[1:], "--hook_name", "blocks.8.hook_resid_pre"]) == 2
    assert error_line(capsys) == "saelab: error: recorded"
    assert calls == [
        (
            args[0],
            {
                **expected,
                "revision": None,
                "device": "cpu",
                "model_name": None,
                "hook_name": "blocks.8.hook_resid_pre",
                "hook_layer": None,
            },
        )
    ]


def test_loading_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for command in (["eval", "runs/missing"], ["dashboard", "runs/missing"], ["convert", "runs/missing", "out"]):
        assert main(command) == 2
        assert error_line(capsys) == "saelab: error: no such folder: runs/missing"
    saelab.create_sae("topk", d_in=8, d_sae=16, k=2).save(tmp_path / "runs" / "sae")
    cfg = json.loads((tmp_path / "runs" / "sae" / "cfg.json").read_text())
    (tmp_path / "runs" / "sae" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_sae"}))
    assert main(["convert", "runs/sae", "out"]) == 2
    assert error_line(capsys) == "saelab: error: runs/sae/cfg.json: SAE config (topk): missing key 'd_sae'"
    assert files_under(tmp_path) == ["runs", "runs/sae", "runs/sae/cfg.json", "runs/sae/sae_weights.safetensors"]


def test_an_sae_saved_on_a_gpu_converts_on_the_cpu(tmp_path, capsys):

    sae = saelab.create_sae("topk", d_in=8, d_sae=16, k=2)
    sae.save(tmp_path / "gpu")
    cfg = json.loads((tmp_path / "gpu" / "cfg.json").read_text())
    (tmp_path / "gpu" / "cfg.json").write_text(json.dumps({**cfg, "device": "cuda"}))
    assert main(["convert", str(tmp_path / "gpu"), str(tmp_path / "out")]) == 0
    assert torch.equal(saelab.load_sae(tmp_path / "out").W_enc, sae.W_enc)
    if not torch.cuda.is_available():
        assert main(["convert", str(tmp_path / "gpu"), str(tmp_path / "out2"), "--device", "cuda"]) == 2
        assert "device 'cuda' is not available on this machine" in error_line(capsys)
        assert not (tmp_path / "out2").exists()
