"""The `saelab` command: a run from flags and YAML, its outputs, and its errors."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny import SMALL

import saelab
from saelab.cli import main


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
        (
            {"train": {"autocast": "sometimes"}},
            "config.train.autocast must be true or false or 'auto', got 'sometimes'",
        ),
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
