"""The `saelab` command: a run from flags and YAML, its outputs, and its errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import saelab
from saelab.cli import main

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


def test_train_writes_sae_metrics_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out_dir", str(out), "--sae.k", "4"]) == 0
    printed = capsys.readouterr().out
    assert "explained variance" in printed and str(out) in printed
    sae = saelab.load_sae(out / "sae")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4 and sae.cfg.d_in == 16 and sae.cfg.d_sae == 128
    summary = json.loads((out / "summary.json").read_text())["sae"]
    assert 0 < summary["explained_variance"] <= 1 and summary["l0"] == 4.0
    assert 0 <= summary["feature_recovery"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 80
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["total_tokens"] == 40960


def test_yaml_config_with_flag_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"sae": {"architecture": "jumprelu", "d_sae": 48}, "train": {"lr": 0.002}}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), *SMALL, "--sae.l0_coefficient", "0.5", "--out_dir", str(out)]) == 0
    sae = saelab.load_sae(out / "sae")
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.d_sae == 48 and sae.cfg.l0_coefficient == 0.5
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.002


@pytest.mark.parametrize(
    "flag, meant",
    [
        ("--train.learning_rate", "--train.lr"),
        ("--sae.num_latents", "--sae.d_sae"),
        ("--train.k", "--sae.k"),
        ("--train.l1_coefficient", "--sae.l1_coefficient"),
        ("--train.expansion_factor", "--sae.expansion_factor"),
    ],
)
def test_unknown_flag_suggests_the_close_name(capsys, flag, meant):
    """Names from SAELens and sparsify suggest saelab's (learning_rate is closer in spelling to lr_decay_steps)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", flag, "3"])
    assert exit_info.value.code == 2
    hint = f"saelab: error: unknown option {flag}; did you mean {meant}? (see saelab train --help)\n"
    assert capsys.readouterr().err == hint


def test_unknown_config_keys_suggest_saelab_names():
    from saelab.core.config import ConfigError
    from saelab.runs.config import load_run_config

    with pytest.raises(ConfigError, match="unknown key 'learning_rate' in config.train. Did you mean 'lr'"):
        load_run_config({"train": {"learning_rate": 3e-4}})
    with pytest.raises(ConfigError, match="unknown key 'training_tokens' in config.train. Did you mean 'total_tokens'"):
        load_run_config({"train": {"training_tokens": 1000}})
    with pytest.raises(ConfigError, match="unknown key 'num_latents' .*Did you mean 'd_sae'"):
        saelab.create_sae("topk", d_in=8, d_sae=16, num_latents=16)


def test_bad_values_give_one_clear_line_and_no_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--sae.k", "100000", "--out_dir", str(out)]) == 2
    assert "k must be between 1 and d_sae" in capsys.readouterr().err
    assert main(["train", *SMALL, "--train.lr", "fast", "--out_dir", str(out)]) == 2
    assert "train.lr must be a number" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert not out.exists()


def same_weights(a, b) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict()
    )


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_from_cli_continues_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--train.checkpoint_every", "20", "--out_dir", str(out)]) == 0
    first = saelab.load_sae(out / "sae")
    shutil.rmtree(out / "checkpoints" / "step_000000080")  # as if the run had died after step 60
    shutil.rmtree(out / "sae")
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    assert "resumed from step 60 of 80" in capsys.readouterr().err
    assert same_weights(saelab.load_sae(out / "sae"), first)
    assert json.loads((out / "summary.json").read_text())["sae"]["resumed_from_step"] == 60


def test_a_folder_holding_a_run_is_refused_and_overwrite_replaces_it_whole(tmp_path, capsys):
    out = tmp_path / "reuse"
    assert main(["train", *SMALL, "--sae.k", "4", "--train.checkpoint_every", "20", "--out_dir", str(out)]) == 0
    before = files(out)
    capsys.readouterr()
    standard = [*SMALL, "--sae.architecture", "standard"]
    assert main(["train", *standard, "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert files(out) == before  # nothing written
    (out / "notes.txt").write_text("mine")
    assert main(["train", *standard, "--out_dir", str(out), "--overwrite"]) == 2
    assert "would also delete notes.txt" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert main(["train", *standard, "--out_dir", str(out), "--overwrite"]) == 0
    assert main(["train", *standard, "--out_dir", str(tmp_path / "fresh")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "reuse"]  # no leftovers beside it
    assert sorted(files(out)) == sorted(files(tmp_path / "fresh"))  # the old run's checkpoints are gone
    assert same_weights(saelab.load_sae(out / "sae"), saelab.load_sae(tmp_path / "fresh" / "sae"))
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2  # the new run wrote no checkpoints: none of the old is used
    assert "finished without checkpoints" in capsys.readouterr().err


def test_python_api_overwrite(tmp_path):
    run = {
        "source": "synthetic",
        "synthetic": {"d_in": 16, "n_features": 32},
        "out_dir": str(tmp_path / "run"),
        "train": {"total_tokens": 10240, "batch_size": 512, "progress_bar": False, "checkpoint_every": 5},
    }
    saelab.train(run)
    with pytest.raises(saelab.ConfigError, match="already holds a run"):
        saelab.train({**run, "sae": {"architecture": "standard"}})
    standard = {**run, "sae": {"architecture": "standard"}, "train": {**run["train"], "checkpoint_every": 7}}
    trained = saelab.train(standard, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000000014", "step_000000020"]
    assert same_weights(saelab.load_sae(tmp_path / "run" / "sae"), trained["sae"])


def test_resume_with_more_tokens_extends_a_finished_run_exactly(tmp_path, capsys):
    run = [*SMALL, "--sae.k", "4", "--train.checkpoint_every", "30"]
    assert main(["train", *run, "--out_dir", str(tmp_path / "short")]) == 0  # 80 steps
    capsys.readouterr()
    assert (
        main(["train", "--resume", str(tmp_path / "short"), "--train.total_tokens", "81920", "--train.log_every", "40"])
        == 0
    )
    assert "resumed from step 80 of 160" in capsys.readouterr().err
    long = [*run, "--train.total_tokens", "81920"]
    assert main(["train", *long, "--out_dir", str(tmp_path / "long")]) == 0
    assert same_weights(saelab.load_sae(tmp_path / "short" / "sae"), saelab.load_sae(tmp_path / "long" / "sae"))
    saved = yaml.safe_load((tmp_path / "short" / "config.yaml").read_text())["train"]
    assert saved["total_tokens"] == 81920 and saved["log_every"] == 40
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())["sae"]
    assert summary["steps"] == 160 and summary["resumed_from_step"] == 80
    records = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 80, "resumed_from_step": 80} in records and records[-1]["step"] == 160


def test_extending_a_run_whose_learning_rate_decays_with_its_length_warns(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            ["train", *SMALL, "--train.lr_schedule", "cosine", "--train.checkpoint_every", "40", "--out_dir", str(out)]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--train.total_tokens", "81920"]) == 0
    err = capsys.readouterr().err
    assert "resumed from step 80 of 160" in err and "warning: with lr_schedule cosine" in err and "steps 1..79" in err


def test_a_finished_run_without_checkpoints_cannot_be_extended(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out_dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--train.total_tokens", "81920"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished without checkpoints" in err[0] and "--sae.init_from" in err[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["total_tokens"] == 40960


def test_resume_refuses_options_that_decide_the_weights_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--sae.k", "4", "--train.checkpoint_every", "20", "--out_dir", str(out)]) == 0
    before = files(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--sae.k", "8", "--train.total_tokens", "81920"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot change sae.k " in err[0] and "train.total_tokens" not in err[0].split("(")[0]
    assert main(["train", "--resume", str(out), "--train.lr", "0.1", "--synthetic.d_in", "8"]) == 2
    assert "cannot change train.lr, synthetic.d_in " in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--config", str(out / "config.yaml")]) == 2
    assert "cannot be combined with --config" in capsys.readouterr().err
    with pytest.raises(saelab.ConfigError, match="cannot change sae.k"):
        saelab.resume(out, sae={"k": 8})
    assert files(out) == before


def test_a_checkpoint_of_another_configuration_is_refused_before_anything_is_written(tmp_path, capsys):
    """What a reused folder used to end as: a TopK run's checkpoints under a standard run's config.yaml."""
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--sae.k", "4", "--train.checkpoint_every", "20", "--out_dir", str(out)]) == 0
    assert main(["train", *SMALL, "--sae.architecture", "standard", "--out_dir", str(tmp_path / "standard")]) == 0
    shutil.copy(tmp_path / "standard" / "config.yaml", out / "config.yaml")
    before = files(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configured differently" in err[0]
    assert "sae.architecture ('topk' there, 'standard' here)" in err[0]
    assert files(out) == before


def test_every_train_option_has_help(capsys):
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    for flag in (
        "--train.lr",
        "--sae.k",
        "--sae.l1_coefficient",
        "--sae.matryoshka_widths",
        "--synthetic.d_in",
        "--model.hook_name",
        "--data.dataset",
        "--data.shuffle_buffer",
        "--data.cache",
    ):
        assert flag in text
    assert "Peak Adam learning rate" in text and "Tokens per context fed to the model" in text


@pytest.mark.parametrize(
    "command, flags",
    [
        ("pretokenize", ["--out", "--max_tokens", "--data.context_size", "--data.separator", "--model.name"]),
        ("cache-activations", ["--out", "--hooks", "--dtype", "--shard_rows", "--data.seq_start", "--model.hook_name"]),
    ],
)
def test_data_commands_document_every_option(capsys, command, flags):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags)
    assert text.count("(default:") >= 10


def test_partial_sections_keep_the_run_defaults():
    """Overriding one train field keeps the default run's other train settings, not the class defaults."""
    from saelab.runs.config import RunConfig, load_run_config

    config = load_run_config({"train": {"seed": 3}, "sae": {"k": 4}})
    default = RunConfig()
    assert config.train.lr == default.train.lr and config.train.batch_size == default.train.batch_size
    assert config.train.seed == 3
    assert config.sae == {**default.sae, "k": 4}
    other = load_run_config({"sae": {"architecture": "standard"}})
    assert "k" not in other.sae and other.sae["expansion_factor"] == default.sae["expansion_factor"]


def test_bad_config_files_give_one_clear_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("sae: [unclosed")
    assert main(["train", "--config", str(broken)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert main(["train", "--config", str(listed)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_divergence_is_one_line_and_keeps_the_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            *SMALL,
            "--train.lr",
            "1e30",
            "--train.max_grad_norm",
            "null",
            "--train.checkpoint_every",
            "1",
            "--sae.architecture",
            "standard",
            "--out_dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "training diverged" in err[0] and "at step" in err[0]
    step = int(err[0].split("at step ")[1].split(":")[0])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept and kept[-1] == f"step_{step:09d}"  # the last good state, written before the bad step


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
    import torch

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
    import torch

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


def test_a_bug_shows_its_traceback_and_debug_shows_user_errors_in_full(tmp_path, monkeypatch, capsys):
    """User errors are one line; any other exception is a bug and propagates (traceback), and --debug lets a
    user error propagate too."""
    import saelab.runs.runner as runner

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug inside saelab")

    monkeypatch.setattr(runner, "train", broken)
    with pytest.raises(ZeroDivisionError, match="a bug inside saelab"):
        main(["train", *SMALL, "--out_dir", str(tmp_path / "a")])
    monkeypatch.undo()
    assert main(["train", *SMALL, "--sae.k", "100000", "--out_dir", str(tmp_path / "b")]) == 2
    assert "k must be between 1 and d_sae" in capsys.readouterr().err
    with pytest.raises(saelab.ConfigError, match="k must be between 1 and d_sae"):
        main(["--debug", "train", *SMALL, "--sae.k", "100000", "--out_dir", str(tmp_path / "b")])


def test_the_cli_uses_no_private_argparse_attributes():
    from pathlib import Path

    import saelab.cli

    sources = [p.read_text() for p in Path(saelab.cli.__file__).parent.glob("*.py")]
    assert not [s for s in sources if "._actions" in s or "_SubParsersAction" in s]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"train": {"lr": "fast"}}, "config.train.lr must be a number, got 'fast'"),
        ({"train": {"total_tokens": 1.5}}, "config.train.total_tokens must be an integer, got 1.5"),
        ({"train": {"progress_bar": 1}}, "config.train.progress_bar must be true or false, got 1"),
        ({"model": {"hook_name": 5}}, "config.model.hook_name must be a string, got 5"),
        ({"source": "disk"}, "config.source must be 'model' or 'synthetic', got 'disk'"),
        ({"saes": {"a": 3}}, "config.saes.a must be a mapping, got 3"),
        ({"synthetic": {"hierarchy": [{"parent": 0}, 5]}}, r"config.synthetic.hierarchy\[1\] must be a mapping, got 5"),
        ({"data": {"cntext_size": 8}}, "unknown key 'cntext_size' in config.data. Did you mean 'context_size'"),
    ],
)
def test_config_errors_name_the_dotted_key_and_what_it_must_be(config, message):
    from saelab.runs.config import load_run_config

    with pytest.raises(saelab.ConfigError, match=f"^{message}"):
        load_run_config(config)
