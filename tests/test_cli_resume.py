"""`saelab train` on a run folder: a folder holding a run is refused or replaced whole, `--resume` continues and
extends a run exactly and refuses what would change its weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from tiny import SMALL

import saelab
from saelab.cli import main


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
