"""`saelab train`, `pretokenize` and `cache-activations` on a tiny local model and text, end to end."""

from __future__ import annotations

import json
import math

import pytest
from tiny import save_tiny_model, sentences, write_jsonl

import saelab
from saelab.cli import main

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return str(save_tiny_model(folder / "model")), str(write_jsonl(folder / "text.jsonl", sentences(600)))


def flags(model: str, dataset: str) -> list[str]:
    return [
        "--model.name",
        model,
        "--model.hook_name",
        HOOK,
        "--data.dataset",
        dataset,
        "--data.context_size",
        "16",
        "--data.contexts_per_batch",
        "8",
        "--data.shuffle_buffer",
        "512",
    ]


TRAIN = [
    "--train.total_tokens",
    "8192",
    "--train.batch_size",
    "128",
    "--train.progress_bar",
    "false",
    "--sae.k",
    "4",
    "--sae.expansion_factor",
    "4",
]


def test_train_on_a_model_records_where_the_activations_came_from(tiny, tmp_path, capsys):
    model, dataset = tiny
    out = tmp_path / "run"
    assert main(["train", *flags(model, dataset), *TRAIN, "--out_dir", str(out)]) == 0
    assert "explained variance" in capsys.readouterr().out
    sae = saelab.load_sae(out / "sae")
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.hook_name, sae.cfg.hook_layer) == (32, 128, HOOK, 1)
    assert sae.cfg.model_name == model
    assert sae.cfg.metadata["dataset"] == dataset and sae.cfg.metadata["context_size"] == 16
    summary = json.loads((out / "summary.json").read_text())["sae"]
    assert summary["tokens"] == 8192 and summary["l0"] == pytest.approx(4, abs=0.01)


def test_pretokenized_and_cached_data_feed_training(tiny, tmp_path, capsys):
    model, dataset = tiny
    tokens, cache = tmp_path / "tokens", tmp_path / "cache"
    assert main(["pretokenize", *flags(model, dataset), "--out", str(tokens)]) == 0
    assert (
        main(
            [
                "cache-activations",
                *flags(model, str(tokens)),
                "--out",
                str(cache),
                "--max_tokens",
                "3000",
                "--shard_rows",
                "1000",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "contexts of 16 tokens" in printed and "3000 activation rows" in printed
    metadata = json.loads((cache / "metadata.json").read_text())
    assert metadata["hooks"] == {HOOK: 32} and len(metadata["shards"]) == 3 and metadata["hook_layers"] == {HOOK: 1}
    out = tmp_path / "run"
    assert main(["train", "--data.cache", str(cache), "--model.hook_name", HOOK, *TRAIN, "--out_dir", str(out)]) == 0
    sae = saelab.load_sae(out / "sae")
    assert sae.cfg.hook_name == HOOK and sae.cfg.model_name == model and sae.cfg.metadata["dataset"] == str(tokens)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--model.hook_name", "blocks.1.hook_resid_pots"], "Did you mean 'blocks.1.hook_resid_post'?"),
        (["--data.text_column", "body"], "no text column 'body' (columns: text)"),
        (["--sae.d_in", "48"], "sae.d_in is 48 but the activations have width 32"),
        (["--data.dataset", "missing-folder/none.jsonl"], "dataset file not found: missing-folder/none.jsonl"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tiny, tmp_path, capsys, bad, message):
    model, dataset = tiny
    out = tmp_path / "run"
    assert main(["train", *flags(model, dataset), *TRAIN, "--out_dir", str(out), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cache_without_the_hook_is_refused(tiny, tmp_path, capsys):
    model, dataset = tiny
    cache = tmp_path / "cache"
    assert main(["cache-activations", *flags(model, dataset), "--out", str(cache), "--max_tokens", "500"]) == 0
    code = main(
        [
            "train",
            "--data.cache",
            str(cache),
            "--model.hook_name",
            "blocks.0.hook_resid_post",
            *TRAIN,
            "--out_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2 and f"holds {HOOK}, not 'blocks.0.hook_resid_post'" in capsys.readouterr().err


def test_eval_prints_the_table_and_writes_the_report(tiny, tmp_path, capsys):
    model, dataset = tiny
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *flags(model, dataset),
                *TRAIN,
                "--data.heldout_contexts",
                "16",
                "--out_dir",
                str(out),
                "--train.eval_every",
                "32",
                "--train.eval_contexts",
                "4",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/ce_loss_score" in r]
    assert [r["step"] for r in evals] == [32, 64] and all(math.isfinite(r["eval/kl_div_with_sae"]) for r in evals)
    capsys.readouterr()
    assert main(["eval", str(out / "sae"), "--n_contexts", "16", "--batch_contexts", "8"]) == 0
    printed = capsys.readouterr().out
    assert "downstream.ce_loss_score" in printed and "reconstruction.explained_variance" in printed
    report = json.loads((out / "sae" / "eval.json").read_text())
    assert report["downstream"]["kl_div_with_sae_and_error"] == pytest.approx(0.0, abs=1e-9)
    assert (out / "sae" / "eval_density.png").exists() and (out / "sae" / "eval_metrics.png").exists()


@pytest.mark.parametrize("source", ["model", "cache", "e2e", "two_hooks"])
def test_resume_mid_run_gives_the_same_sae(tiny, tmp_path, source):
    """Resuming from a mid-run checkpoint continues exactly: shuffle buffer, pending rows and data position
    are in the checkpoint, so the final weights equal an uninterrupted run's."""
    import shutil

    import torch

    model, dataset = tiny
    data_flags = flags(model, dataset)
    if source == "cache":
        cache = tmp_path / "cache"
        assert (
            main(["cache-activations", *data_flags, "--out", str(cache), "--max_tokens", "3000", "--shard_rows", "700"])
            == 0
        )
        data_flags = ["--data.cache", str(cache), "--model.hook_name", HOOK, "--data.shuffle_buffer", "512"]
    if source == "e2e":  # token contexts spliced through the model: the context position is the state
        data_flags += [
            "--objective.kl",
            "1",
            "--objective.downstream",
            "1",
            "--objective.downstream_hooks",
            "[blocks.2.hook_resid_post]",
        ]
    if source == "two_hooks":
        data_flags += ["--saes", "{a: {}, b: {hook_name: blocks.0.hook_mlp_out, architecture: standard}}"]
    run = [*data_flags, *TRAIN, "--train.checkpoint_every", "16", "--train.keep_checkpoints", "4"]
    assert main(["train", *run, "--out_dir", str(tmp_path / "a")]) == 0
    assert main(["train", *run, "--out_dir", str(tmp_path / "b")]) == 0
    checkpoints = sorted((tmp_path / "b" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step_000000016", "step_000000032", "step_000000048", "step_000000064"]
    for later in checkpoints[1:]:
        shutil.rmtree(later)  # as if the run had died after step 16
    names = ["a", "b"] if source == "two_hooks" else ["sae"]
    for name in names:
        shutil.rmtree(tmp_path / "b" / name)
    assert main(["train", "--resume", str(tmp_path / "b")]) == 0
    for name in names:
        straight, resumed = saelab.load_sae(tmp_path / "a" / name), saelab.load_sae(tmp_path / "b" / name)
        for key, tensor in straight.state_dict().items():
            assert torch.equal(tensor, resumed.state_dict()[key]), (name, key)


def test_metrics_hold_each_step_once_after_a_resume(tiny, tmp_path):
    import shutil

    model, dataset = tiny
    out = tmp_path / "run"
    run = [
        *flags(model, dataset),
        *TRAIN,
        "--train.checkpoint_every",
        "16",
        "--train.keep_checkpoints",
        "4",
        "--train.log_every",
        "8",
        "--out_dir",
        str(out),
    ]
    assert main(["train", *run]) == 0
    for later in sorted((out / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 1.')  # torn line of a crashed write
    assert main(["train", "--resume", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]  # training records (evaluations have their own)
    assert steps == sorted(set(steps)) and steps[-1] == 64 and 16 in steps and 24 in steps
