"""Sparse probing (saelab/evals/probing.py): known answers on planted features and random labels, the probes
(saelab/evals/probes.py: the exact fit's optimum, the early-stopped fit, the column ranking), the tasks of the
sae-probes wheel and of user files, and a run on a tiny model end to end."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import random

import pytest
import torch
from tiny import WORDS, save_tiny_model

import saelab
from saelab.core.config import from_dict
from saelab.core.errors import ConfigError
from saelab.evals.probes import accuracy, fit_logistic, fit_logistic_sgd, top_k_by_mean_difference
from saelab.evals.probing import ProbingConfig, _tokens, plot_probing, probe_metrics, run_probing, run_probing_saes
from saelab.evals.probing_tasks import read_sae_probes_task, read_task_file, split_task
from saelab.evals.results import read_result, write_result
from saelab.synthetic.planted import PlantedFeatures

HOOK = "blocks.1.hook_resid_post"
wheel = pytest.mark.skipif(
    importlib.util.find_spec("sae_probes") is None, reason="the sae-probes wheel is not installed"
)


def planted(n: int = 6000, feature: int = 5, seed: int = 0):
    """Pooled rows built from 24 orthogonal planted features in 32 dimensions, their coefficients, and an SAE whose
    latents are exactly those coefficients (encoder and decoder = the feature directions)."""
    features = PlantedFeatures(d_in=32, n_features=24, mean_active=4.0, orthogonalize=True, seed=seed)
    x, coefficients = features.sample(n, torch.Generator().manual_seed(seed))
    sae = saelab.create_sae("standard", d_in=32, d_sae=24)
    with torch.no_grad():
        sae.W_dec.copy_(features.features)
        sae.W_enc.copy_(features.features.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return x, coefficients, sae


def probe_both(x, latents, labels, k_values=(1, 2, 5, 20), seed=0):
    train, test = split_task(labels, 1024, 1000, seed)
    llm, _ = probe_metrics("llm", x[train], labels[train], x[test], labels[test], k_values, seed=seed)
    sae, ranking = probe_metrics("sae", latents[train], labels[train], latents[test], labels[test], k_values, seed=seed)
    return llm, sae, ranking


def test_a_task_whose_label_is_a_planted_feature_is_read_by_one_latent():
    x, coefficients, sae = planted()
    labels = (coefficients[:, 5] > 0).long()
    with torch.no_grad():
        latents = sae.encode(x)
    assert torch.allclose(latents, coefficients, atol=1e-5)  # the SAE's latents are the planted features
    llm, metrics, ranking = probe_both(x, latents, labels)
    assert int(ranking[0]) == 5
    assert metrics["sae_top_1_test_accuracy"] == pytest.approx(1.0, abs=0.005)
    assert metrics["sae_test_accuracy"] >= 0.97 and llm["llm_test_accuracy"] >= 0.97  # linear in both
    # no single raw dimension is the feature: the best one alone is far worse than the latent
    assert llm["llm_top_1_test_accuracy"] < 0.85


def test_random_labels_stay_near_chance():
    x, _, sae = planted(seed=1)
    labels = torch.randint(0, 2, (len(x),), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latents = sae.encode(x)
    llm, metrics, _ = probe_both(x, latents, labels)
    for name, value in {**llm, **metrics}.items():
        assert abs(value - 0.5) < 0.07, (name, value)


def test_fit_logistic_reaches_scikit_learns_optimum():
    """At the fit, the gradient of scikit-learn's objective C * sum_i s_i log-loss_i + |w|^2 / 2 (intercept not
    penalised; s_i = 1, or n / (2 * size of its class) for class_weight="balanced") is zero, whatever C, the
    balance of the classes and the scale of the inputs."""
    generator = torch.Generator().manual_seed(0)
    unbalanced = torch.randn(300, 3, generator=generator)
    data = [(unbalanced, unbalanced[:, 0] + 0.5 * torch.randn(300, generator=generator) > 0.8)]  # 64 of 300 positive
    generator = torch.Generator().manual_seed(0)
    scaled = torch.randn(300, 4, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 2.0
    data.append((scaled, (scaled[:, 0] + 0.1 * scaled[:, 1] + torch.randn(300, generator=generator) > 3.0).long()))
    for (x, y), C, balanced in itertools.product(data, (100.0, 1.0, 0.01), (False, True)):
        probe = fit_logistic(x, y, C=C, balanced=balanced)
        w, b = probe.weight[0].double(), probe.bias[0].double()
        n_pos = int(y.sum())
        s = torch.where(y.bool(), 300 / (2 * n_pos), 300 / (2 * (300 - n_pos))) if balanced else torch.ones(300)
        residual = s.double() * (torch.sigmoid(x.double() @ w + b) - y.double())
        # the objective divided by C: the same optimum, its gradient on the data's scale
        assert float((x.double().T @ residual + w / C).abs().max()) < 1e-4, (C, balanced)
        assert abs(float(residual.sum())) < 1e-4, (C, balanced)  # the intercept's gradient: no penalty on it
    # separable data: the penalty keeps the weights finite, and every row is classified right
    x = torch.cat([torch.rand(50, 1, generator=generator) + 1.0, -torch.rand(50, 1, generator=generator) - 1.0])
    labels = torch.tensor([1] * 50 + [0] * 50)
    probe = fit_logistic(x, labels)
    assert math.isfinite(float(probe.bias[0])) and accuracy(probe, x, labels) == 1.0
    with pytest.raises(ConfigError, match="both classes"):
        fit_logistic(x, torch.ones(100))
    with pytest.raises(ConfigError, match="C must be positive"):
        fit_logistic(x, labels, C=0.0)


def test_fit_logistic_sgd_gets_as_far_as_the_exact_fit():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2500, 20, generator=generator)
    y = (x[:, 3] - x[:, 7] > 0).long()
    probe = fit_logistic_sgd(x[:1200], y[:1200], x[1200:1500], y[1200:1500], seed=0)
    exact = fit_logistic(x[:1200], y[:1200], C=100.0)
    assert accuracy(probe, x[1500:], y[1500:]) >= max(0.95, accuracy(exact, x[1500:], y[1500:]) - 0.02)
    short = [fit_logistic_sgd(x[:1200], y[:1200], x[1200:1500], y[1200:1500], seed=0, max_epochs=3) for _ in "ab"]
    assert torch.equal(short[0].weight, short[1].weight)  # deterministic given the seed


def test_top_k_by_mean_difference():
    x = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 5.0, 3.0, -2.0], [1.0, 5.0, 0.0, 0.0], [1.0, 5.0, 0.0, 0.0]])
    y = torch.tensor([1, 1, 0, 0])
    # mean differences: -1, 0, 2, -1 -> |.| ranks column 2, then 0 and 3 (tie: lower index first), then 1
    assert top_k_by_mean_difference(x, y, 3).tolist() == [2, 0, 3]
    assert top_k_by_mean_difference(x, y.bool(), 9, absolute=False).tolist() == [2, 1, 0, 3]  # signed; k clipped
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=generator)
    x = torch.randn(600, 8, generator=generator) + 4 * torch.nn.functional.one_hot(labels, 8).float()
    assert top_k_by_mean_difference(x, labels == 1, 1).tolist() == [1]
    shifted = torch.cat([x[:, :1] - 5 * (labels == 2).float().unsqueeze(1), x[:, 1:]], dim=1)
    assert top_k_by_mean_difference(shifted, labels == 2, 1).tolist() == [0]  # by absolute difference
    assert top_k_by_mean_difference(shifted, labels == 2, 1, absolute=False).tolist() == [2]
    with pytest.raises(ConfigError, match="both classes"):
        top_k_by_mean_difference(x, torch.ones(600, dtype=torch.long), 1)


def test_split_task_is_balanced_disjoint_and_seeded():
    labels = torch.tensor([0] * 700 + [1] * 300)
    train, test = split_task(labels, 1024, 1000, seed=7)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert int(labels[train].sum()) * 2 == len(train) == 2 * 250  # 300 positives: 50 kept for testing
    assert int(labels[test].sum()) * 2 == len(test) == 2 * 50
    again, _ = split_task(labels, 1024, 1000, seed=7)
    other, _ = split_task(labels, 1024, 1000, seed=8)
    assert torch.equal(train, again) and not torch.equal(train, other)
    with pytest.raises(ConfigError, match="at least 3 texts of each label"):
        split_task(torch.tensor([0, 0, 0, 1, 1]), 10, 10, seed=0)


@wheel
def test_the_wheel_tasks_read_as_text_and_0_1_labels():
    task = read_sae_probes_task("5_hist_fig_ismale")
    assert len(task.texts) == 5000 and int(task.labels.sum()) == 2500  # every binary file is balanced
    assert task.texts[0] == "Margaret of Clisson" and int(task.labels[0]) == 0 and task.label_names == ("0", "1")
    assert task.labels.dtype == torch.long and set(task.labels.tolist()) == {0, 1}
    # LabelEncoder's order: the sorted values
    assert read_sae_probes_task("24_headline_isiran").label_names == ("False", "True")
    assert read_sae_probes_task("66_living-room").label_names == ("bigram", "not_bigram")
    code = read_sae_probes_task("159_code_Python")  # a file without a prompt_len column, of long texts
    assert len(code.texts) == 4000 and max(len(t) for t in code.texts) > 1000


@wheel
def test_bad_wheel_task_names_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"task '5_hist_fig_male'. Did you mean '5_hist_fig_ismale'"):
        read_sae_probes_task("5_hist_fig_male")
    with pytest.raises(ConfigError, match="excluded: its negatives are all code"):
        read_sae_probes_task("161_agnews_0")
    with pytest.raises(ConfigError, match=r"exactly 2 distinct labels, column 'target' has 10 \(CA, FL"):
        read_sae_probes_task("13_us_state")


def test_user_csv_and_jsonl_tasks(tmp_path):
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "stars"])
        writer.writerows([["great, really", "5"], ["awful", "1"], ["", "1"], ["fine, with a\nline break", "5"]])
    task = read_task_file(path, text_column="sentence", label_column="stars")
    assert task.name == "reviews" and task.texts == ("great, really", "awful", "fine, with a\nline break")
    assert task.labels.tolist() == [1, 0, 1] and task.label_names == ("1", "5")  # the empty text is dropped

    with pytest.raises(ConfigError) as error:
        read_task_file(path, text_column="text", label_column="stars")
    assert str(error.value) == f"{path} has no text column 'text'; its columns: sentence, stars"
    with pytest.raises(ConfigError, match="no label column 'label'; its columns: sentence, stars"):
        read_task_file(path, text_column="sentence")

    jsonl = tmp_path / "spam.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "spam": s}) + "\n" for t, s in [("win now", True), ("hi", False)]))
    task = read_task_file(jsonl, text_column="body", label_column="spam")
    assert task.labels.tolist() == [1, 0] and task.label_names == ("False", "True")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": "t", "label": v}) + "\n" for v in (10, 9, 10)))
    assert read_task_file(numbers).labels.tolist() == [1, 0, 1]  # 9 < 10 as numbers
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"text": "t", "label": v}) + "\n" for v in (1, 2, 3)))
    with pytest.raises(ConfigError, match=r"exactly 2 distinct labels, column 'label' has 3 \(1, 2, 3\)"):
        read_task_file(three)


def test_config_errors():
    with pytest.raises(ConfigError, match="name sae-probes tasks in `tasks` or your files in `files`"):
        ProbingConfig(tasks=[], files=[])
    with pytest.raises(ConfigError, match="k_values must be positive"):
        ProbingConfig(k_values=[0, 1])
    with pytest.raises(ConfigError, match="Did you mean 'k_values'"):
        from_dict(ProbingConfig, {"k_value": [1, 2]})


class _Tokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}


def test_last_token_pooling_keeps_the_end_of_long_texts():
    texts = ["10 11 12 13 14 15", "10 11"]
    assert _tokens(_Tokenizer(), texts, 4, True, keep_end=True) == [[1, 13, 14, 15], [1, 10, 11]]
    assert _tokens(_Tokenizer(), texts, 4, True, keep_end=False) == [[1, 10, 11, 12], [1, 10, 11]]
    assert _tokens(_Tokenizer(), texts, 4, False, keep_end=True) == [[12, 13, 14, 15], [10, 11]]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A tiny random model and a task its activations can read: does the text contain the word 'cat'?"""
    from saelab.models import load_model

    folder = tmp_path_factory.mktemp("probing")
    model = load_model(str(save_tiny_model(folder / "model")))
    rng = random.Random(0)
    words = [w for w in WORDS if w != "cat"]
    lines = []
    for _ in range(600):
        text = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        label = rng.random() < 0.5
        if label:
            text[rng.randrange(len(text))] = "cat"
        lines.append(json.dumps({"text": " ".join(text) + " .", "label": label}) + "\n")
    path = folder / "cat.jsonl"
    path.write_text("".join(lines))
    return model, path


def test_run_probing_end_to_end_on_a_tiny_model(tiny_task, tmp_path):
    model, path = tiny_task
    torch.manual_seed(0)
    saes = {
        name: saelab.create_sae("topk", d_in=32, d_sae=64, k=k, hook_name=HOOK, model_name="tiny")
        for name, k in (("k8", 8), ("k2", 2))
    }
    config = ProbingConfig(
        tasks=[], files=[str(path)], train_size=300, test_size=200, k_values=[1, 2, 5], batch_tokens=512
    )
    results = run_probing_saes(saes, model, config, progress=False)
    result = results["k8"]
    metrics = result["eval_result_metrics"]
    assert result["eval_type_id"] == "sparse_probing" and result["seconds"] > 0
    assert set(metrics["sae"]) == {
        "sae_test_accuracy",
        "sae_top_1_test_accuracy",
        "sae_top_2_test_accuracy",
        "sae_top_5_test_accuracy",
    }
    assert metrics["llm"]["llm_test_accuracy"] > 0.8  # the word is linearly readable from mean-pooled activations
    (detail,) = result["eval_result_details"]
    assert detail["dataset_name"] == "cat" and detail["n_test"] == 200 and detail["label_names"] == ["False", "True"]
    assert detail["llm_test_accuracy"] == metrics["llm"]["llm_test_accuracy"]  # one task: the mean is the task
    assert results["k2"]["eval_result_metrics"]["llm"] == metrics["llm"]  # one model pass, shared LLM probes
    # the same SAE alone gives the same numbers (the split and the probes are seeded); no full-width probes
    narrow = dataclasses.replace(config, full_width=False)
    alone = run_probing(saes["k8"], model, narrow, progress=False)["eval_result_metrics"]
    assert math.isnan(alone["sae"].pop("sae_test_accuracy")) and math.isnan(alone["llm"].pop("llm_test_accuracy"))
    assert alone["sae"] == {k: v for k, v in metrics["sae"].items() if k != "sae_test_accuracy"}
    write_result(result, tmp_path / "probing.json")
    assert read_result(tmp_path / "probing.json")["eval_result_metrics"] == metrics
    written = plot_probing(
        {name: read_result(write_result(r, tmp_path / f"{name}.json")) for name, r in results.items()},
        tmp_path / "plots",
    )
    assert [p.name for p in written] == ["probing_accuracy_vs_k.png", "probing_tasks.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_run_probing_checks_the_config_before_loading_anything(tiny_task):
    model, path = tiny_task
    sae = saelab.create_sae("topk", d_in=32, d_sae=64, k=4, hook_name=HOOK, model_name="tiny")
    config = ProbingConfig(tasks=[], files=[str(path)], label_column="y")
    with pytest.raises(ConfigError, match="no label column 'y'; its columns: text, label"):
        run_probing(sae, None, config, progress=False)  # None: would load model 'tiny', which does not exist


LLM_FLOORS = {"5_hist_fig_ismale": 0.75, "92_glue_sst2": 0.68, "66_living-room": 0.88}
"""Test accuracy of the full-width probe on SmolLM2's activations, measured 0.839, 0.768 and 0.971 with 1024 + 1000
texts (the default sizes), less a margin for this test's 512 + 400."""


@wheel
@pytest.mark.slow
def test_the_default_model_reads_real_tasks():
    """SmolLM2-135M at blocks.5.hook_resid_post, three of the default tasks (~45k tokens): the model's activations
    classify sentiment, a name's gender and the living-room bigram well above chance; a random SAE's latents less
    well than all 576 dimensions."""
    from saelab.models import load_model

    model = load_model()
    torch.manual_seed(0)
    sae = saelab.create_sae(
        "topk", d_in=576, d_sae=2304, k=32, hook_name="blocks.5.hook_resid_post", model_name="smollm2-135m"
    )
    tasks = ["5_hist_fig_ismale", "92_glue_sst2", "66_living-room"]
    config = ProbingConfig(tasks=tasks, train_size=512, test_size=400)
    result = run_probing(sae, model, config, progress=False)
    by_task = {d["dataset_name"]: d for d in result["eval_result_details"]}
    assert list(by_task) == tasks and all(d["n_test"] == 400 for d in by_task.values())
    for name, floor in LLM_FLOORS.items():
        assert by_task[name]["llm_test_accuracy"] > floor, (name, by_task[name])
    metrics = result["eval_result_metrics"]
    assert metrics["sae"]["sae_top_1_test_accuracy"] < metrics["llm"]["llm_test_accuracy"]
    assert 30 < result["eval_result_unstructured"]["tokens"] < 80_000
