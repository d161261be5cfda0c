"""The eval suite: every eval of several SAEs in one call and one command, results equal to each eval run alone,
one comparison (table, CSV, page), and errors that name what is wrong."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import WORDS, save_tiny_model, sentences, write_jsonl

import saelab
from saelab.cli import main
from saelab.core.errors import ConfigError
from saelab.data.config import DataConfig
from saelab.evals.absorption import AbsorptionConfig
from saelab.evals.autointerp import AutoInterpConfig, explanations_of
from saelab.evals.geometry import GeometryConfig, run_geometry
from saelab.evals.probing import ProbingConfig
from saelab.evals.results import read_result, write_result
from saelab.evals.suite import CoreConfig, comparison_rows, parse_suite, run_core, run_suite

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, its text, a probing task (does the text hold 'cat'?) and the suite's settings scaled to it."""
    folder = tmp_path_factory.mktemp("suite")
    save_tiny_model(folder / "model")
    text = write_jsonl(folder / "text.jsonl", sentences(200))
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        words = [rng.choice([w for w in WORDS if w != "cat"]) for _ in range(rng.randint(3, 6))]
        label = rng.random() < 0.5
        if label:
            words[rng.randrange(len(words))] = "cat"
        rows.append(json.dumps({"text": " ".join(words), "label": int(label)}))
    task = folder / "cat.jsonl"
    task.write_text("\n".join(rows) + "\n")
    configs = {
        "core": CoreConfig(n_contexts=4, batch_contexts=4),
        "geometry": GeometryConfig(n_contexts=4, batch_contexts=4),
        "absorption": AbsorptionConfig(
            n_words=None,
            test_fraction=0.3,
            n_icl_examples=3,
            probe_epochs=5,
            max_k_value=3,
            k_sparse_probe_num_epochs=5,
            min_GT_probe_f1=-1.0,
        ),  # fmt: skip
        "probing": ProbingConfig(
            tasks=[], files=[str(task)], train_size=200, test_size=100, k_values=[1, 2], full_width=False
        ),
        "autointerp": AutoInterpConfig(
            n_latents=2, n_contexts=48, dataset=str(text), fuzzing=False, n_top_ex_for_generation=4
        ),
    }
    return folder, DataConfig(dataset=str(text), context_size=16), configs


def scripted_llm(messages: list[dict], max_tokens: int) -> str:
    """An explainer that names one word, and a judge that never picks an example."""
    if "Answer in the form: This feature activates on" in messages[0]["content"]:
        return "This feature activates on the word zebra."
    return "None"


def test_the_suite_runs_every_eval_of_several_saes_and_writes_one_comparison(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    folder, data, configs = tiny
    model = saelab.load_model(str(folder / "model"))
    torch.manual_seed(0)
    saes = {
        "k4": saelab.create_sae("topk", d_in=32, d_sae=64, k=4, hook_name=HOOK),
        "k8": saelab.create_sae("topk", d_in=32, d_sae=64, k=8, hook_name=HOOK),
        "transcoder": saelab.create_sae(
            "topk", d_in=32, d_sae=64, k=4, hook_name="blocks.1.hook_mlp_in", hook_name_out="blocks.1.hook_mlp_out"
        ),
    }
    out = tmp_path / "suite"
    results = run_suite(saes, "all", model, configs, out, progress=False, llm=scripted_llm, data=data)
    assert list(results) == ["k4", "k8", "transcoder"]
    for name in ("k4", "k8"):
        assert list(results[name]) == ["core", "geometry", "absorption", "probing", "autointerp"]
        assert all("error" not in r for r in results[name].values()), results[name]
    # each eval's numbers are those of the eval run alone with the same settings
    alone = run_core(saes["k8"], model, configs["core"], progress=False, data=data)
    assert results["k8"]["core"]["eval_result_metrics"] == alone["eval_result_metrics"]
    geometry = run_geometry(saes["k4"], model, configs["geometry"], progress=False, data=data)
    assert results["k4"]["geometry"]["eval_result_metrics"] == geometry["eval_result_metrics"]
    assert results["k4"]["absorption"]["eval_config"]["k_sparse_probe_num_epochs"] == 5  # the settings given
    assert results["k4"]["probing"]["eval_result_details"][0]["dataset_name"] == "cat"
    interp = results["k4"]["autointerp"]
    assert [d["explanation"] for d in interp["eval_result_details"]] == ["the word zebra"] * 2
    assert interp["eval_result_metrics"]["autointerp"]["autointerp_score"] == pytest.approx(
        interp["eval_result_metrics"]["autointerp"]["chance_score"]
    )  # a judge that answers None scores the share of non-activating examples
    shown = explanations_of(read_result(out / "k4" / "autointerp.json"))  # what the dashboard shows
    llm = interp["eval_result_unstructured"]["llm"]
    assert shown == {
        d["latent"]: {"explanation": "the word zebra", "detection": d["autointerp_score"], "fuzzing": None, "llm": llm}
        for d in interp["eval_result_details"]
    }
    with pytest.raises(ConfigError, match="not an autointerp result"):
        explanations_of(results["k4"]["core"])
    # an eval that cannot measure an SAE says why and the others still run
    assert "not for transcoders" in results["transcoder"]["absorption"]["error"]
    assert 0 < results["transcoder"]["core"]["eval_result_metrics"]["sparsity"]["l0"] <= 4
    # files: every result, the table (values as the results have them), the page with the explanations and plots
    for name, per_sae in results.items():
        for eval_name, result in per_sae.items():
            assert read_result(out / name / f"{eval_name}.json")["eval_type_id"] == result["eval_type_id"]
    header, rows = comparison_rows(results)
    ev = results["k8"]["core"]["eval_result_metrics"]["reconstruction_quality"]["explained_variance"]
    assert rows[1][header.index("EV")] == f"{ev:.3f}" and rows[2][header.index("absorption")] == "error"
    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 5 and table[3].startswith("| k8 ") and f" {ev:.3f} " in table[3]
    assert (out / "comparison.csv").read_text().splitlines()[0] == ",".join(header)
    page = (out / "index.html").read_text()
    assert page.count("the word zebra") == 6 and "not for transcoders" in page
    images = [p for p in out.glob("*.png")]
    assert {"absorption.png", "probing_accuracy_vs_k.png", "geometry_density.png"} <= {p.name for p in images}
    assert all(f'src="{p.name}"' in page for p in images)


def test_unknown_evals_and_settings_are_named_before_any_work(tiny):
    with pytest.raises(ConfigError, match="unknown eval 'absorbtion'. Did you mean 'absorption'"):
        parse_suite("core,absorbtion")
    sae = saelab.create_sae("topk", d_in=32, d_sae=64, k=4, hook_name=HOOK, model_name="/nonexistent/model")
    with pytest.raises(ConfigError, match="n_word"):  # the config is checked before the model is loaded
        run_suite({"a": sae}, ["absorption"], configs={"absorption": {"n_word": 5}}, progress=False)
    assert parse_suite("all") == ["core", "geometry", "absorption", "probing", "autointerp"]
    assert parse_suite("probing, core") == ["core", "probing"]  # suite order, spaces allowed


def test_the_eval_command_compares_saved_saes(tiny, tmp_path, capsys, monkeypatch):
    from saelab.models import loading

    folder, _, _ = tiny
    opened = []
    monkeypatch.setattr(loading, "open_model", lambda config, open_model=loading.open_model: opened.append(config)
                        or open_model(config))  # fmt: skip
    for k in (4, 8):
        saelab.create_sae("topk", d_in=32, d_sae=64, k=k, hook_name=HOOK, model_name=str(folder / "model")).save(
            tmp_path / f"sae{k}"
        )
    flags = ["--data.dataset", str(folder / "text.jsonl"), "--data.context_size", "16"]
    flags += ["--n_contexts", "4", "--batch_contexts", "4", "--geometry.n_contexts", "4", "--geometry.top_pairs", "3"]
    out = tmp_path / "out"
    command = ["eval", str(tmp_path / "sae4"), str(tmp_path / "sae8"), "--suite", "core,geometry", "--out", str(out)]
    assert main([*command, *flags, "--names", "small,large"]) == 0
    assert len(opened) == 1  # SAEs of one model share it (and probing's pass over the texts)
    printed = capsys.readouterr().out
    assert "| small " in printed and "| large " in printed
    large = read_result(out / "large" / "geometry.json")
    assert large["eval_config"]["top_pairs"] == 3 and len(large["eval_result_unstructured"]["top_decoder_pairs"]) == 3
    assert read_result(out / "large" / "core.json")["eval_result_metrics"]["sparsity"]["l0"] <= 8
    assert (out / "index.html").exists() and not (out / "small" / "absorption.json").exists()
    interp = {"eval_type_id": "autointerp", "eval_result_unstructured": {"llm": "judge"}, "eval_result_details": [
        {"latent": 5, "explanation": "sentences about cats", "autointerp_score": 0.8, "fuzzing_accuracy": 0.7}
    ]}  # fmt: skip
    write_result(interp, tmp_path / "autointerp.json")
    dashboard = ["dashboard", str(tmp_path / "sae4"), *flags[:4], "--n_contexts", "4", "--top_k", "2"]
    assert main([*dashboard, "--autointerp", str(tmp_path / "autointerp.json")]) == 0
    index = (tmp_path / "sae4" / "dashboard" / "data" / "index.js").read_text()
    assert index.count("sentences about cats") == 1 and '"explanation":""' in index  # latent 5's, and the others'
    assert main([*dashboard, "--autointerp", str(out / "large" / "core.json")]) == 2
    assert "not an autointerp result" in capsys.readouterr().err
    assert main([*command, *flags, "--absorption.n_words", "5"]) == 2  # a setting of an eval not run
    assert "--absorption.* settings given, but absorption is not in --suite core,geometry" in capsys.readouterr().err
    assert main([*command, *flags, "--names", "one"]) == 2
    assert "--names needs one distinct name per SAE (2)" in capsys.readouterr().err
