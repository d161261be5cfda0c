"""Several SAEs from one forward pass (layers, sweeps) and end-to-end training, on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny_model, sentences, write_jsonl

import saelab
from saelab.core.config import ConfigError
from saelab.models import load_model
from saelab.runs.config import load_run_config
from saelab.training.config import TrainConfig
from saelab.training.e2e import SplicedModel
from saelab.training.unit import TrainingUnit

LAYERS = {"early": "blocks.0.hook_resid_post", "late": "blocks.2.hook_resid_post"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return str(save_tiny_model(folder / "model")), str(write_jsonl(folder / "text.jsonl", sentences(600)))


def run_config(tiny, out, **sections):
    model, dataset = tiny
    config = {
        "model": {"name": model, "hook_name": LAYERS["early"]},
        "data": {
            "dataset": dataset,
            "context_size": 16,
            "contexts_per_batch": 8,
            "shuffle_buffer": 512,
            "heldout_contexts": 8,
        },
        "train": {"total_tokens": 3072, "batch_size": 128, "progress_bar": False, "lr": 3e-3, "eval_every": 0},
        "sae": {"architecture": "topk", "k": 4, "expansion_factor": 4},
        "out_dir": str(out),
    }
    for section, values in sections.items():
        merge = isinstance(values, dict) and section != "saes"
        config[section] = {**config.get(section, {}), **values} if merge else values
    return config


def same_weights(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_saes_at_several_hooks_train_as_if_each_were_alone(tiny, tmp_path):
    together = saelab.train(run_config(tiny, tmp_path / "both", saes={n: {"hook_name": h} for n, h in LAYERS.items()}))
    assert set(together) == set(LAYERS)
    for name, hook in LAYERS.items():
        alone = saelab.train(run_config(tiny, tmp_path / name, model={"hook_name": hook}))["sae"]
        assert together[name].cfg.hook_name == hook and together[name].cfg.hook_layer == alone.cfg.hook_layer
        assert same_weights(together[name], alone), name
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert set(summary) == set(LAYERS) and summary["late"]["tokens"] == 3072


def test_a_sweep_trains_every_combination_from_one_stream_as_if_alone(tiny, tmp_path):
    sweep = {"k": [2, 6], "lr": [0.003, 0.0005]}
    saes = saelab.train(run_config(tiny, tmp_path / "sweep", sweep=sweep))
    assert sorted(saes) == ["k=2_lr=0.0005", "k=2_lr=0.003", "k=6_lr=0.0005", "k=6_lr=0.003"]
    assert saes["k=6_lr=0.003"].cfg.k == 6
    alone = saelab.train(run_config(tiny, tmp_path / "alone", sae={"k": 6, "lr": 0.0005}))["sae"]
    assert same_weights(saes["k=6_lr=0.0005"], alone)
    assert not same_weights(saes["k=6_lr=0.003"], alone)  # the learning rate did apply per SAE
    for name in saes:
        assert (tmp_path / "sweep" / name / "cfg.json").exists()


def test_sweep_over_architectures_drops_the_options_of_the_other_one(tiny):
    config = load_run_config(run_config(tiny, "unused", sweep={"architecture": ["topk", "standard"]}))
    from saelab.runs.config import run_sae_specs

    specs = run_sae_specs(config)
    assert "k" in specs["architecture=topk"] and "k" not in specs["architecture=standard"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"saes": {"a": {"hok_name": "x"}}}, "hook_name"),
        ({"sweep": {"k": 4}}, "sweep.k must be a non-empty list"),
        ({"objective": {"downstream": 1.0}}, "downstream_hooks"),
        ({"objective": {"kl": 1.0}, "data": {"cache": "somewhere"}}, "cannot read activations from data.cache"),
        ({"objective": {"reconstruction": 0.0}}, "every objective coefficient is 0"),
    ],
)
def test_bad_multi_sae_configs_are_refused_clearly(tiny, tmp_path, bad, message):
    with pytest.raises((ConfigError, KeyError, ValueError), match=message):
        saelab.train(run_config(tiny, tmp_path / "x", **bad))
    assert not (tmp_path / "x" / "sae").exists()


def e2e_config(tiny, out, **objective):
    return run_config(
        tiny,
        out,
        objective={"reconstruction": 0.0, "kl": 1.0, **objective},
        train={"total_tokens": 4096, "batch_size": 128, "log_every": 4, "lr": 1e-2},
    )


def test_e2e_training_lowers_kl_and_leaves_the_model_untouched(tiny, tmp_path):
    model = load_model(tiny[0])
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    config = load_run_config(e2e_config(tiny, tmp_path / "e2e"))
    from saelab.runs.runner import activation_source, build_saes, make_trainer

    torch.manual_seed(0)
    _, widths, origin, layers, _ = activation_source(config)
    saes = build_saes(config, widths, origin, layers)
    trainer = make_trainer(config, saes, model, tmp_path / "e2e")
    from saelab.data.tokens import model_contexts

    trainer.fit(model_contexts(model.tokenizer, config.data, config.train.batch_size))
    assert all(p.grad is None and not p.requires_grad for p in model.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    records = [json.loads(line) for line in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["model/kl"] for r in records if "model/kl" in r]
    assert len(kls) >= 6 and kls[-1] < 0.5 * kls[0], kls
    last = records[-1]
    assert 0 <= last["model/top1_agreement"] <= 1 and "model/ce_loss_increase" in last and "l0" in last
    assert "mse_loss" not in last  # the local term is off: only KL (and AuxK) train the SAE


def test_e2e_with_downstream_measures_the_named_hooks_against_a_hand_splice(tiny):
    model = load_model(tiny[0])
    torch.manual_seed(0)
    sae = saelab.create_sae("topk", 32, 64, k=4, hook_name=LAYERS["early"])
    downstream = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    splicer = SplicedModel(model, [0, 1, 2], downstream)

    unit = TrainingUnit.create("sae", sae, [], 1e-3, TrainConfig())
    tokens = torch.randint(4, 30, (3, 10))
    tokens[:, 0] = 1  # BOS stays unspliced and uncounted
    forwards, run = splicer.run(tokens, [unit])
    assert list(run.clean_downstream) == downstream and run.keep[:, 0].logical_not().all()

    # By hand: the clean and the spliced activations at the downstream hooks, the SAE only off BOS.
    clean = model.run_with_cache(tokens, downstream)

    def splice(act):
        out = act.clone()
        out[:, 1:] = sae(act[:, 1:])
        return out

    with torch.no_grad(), model.hooks(read=downstream) as cache:
        logits = model.logits(tokens, write={LAYERS["early"]: splice})
    expected = sum(
        ((cache[h][:, 1:] - clean[h][:, 1:]).pow(2).sum(-1).mean() / clean[h][:, 1:].pow(2).sum(-1).mean())
        for h in downstream
    )
    assert float(run.downstream_loss().detach()) == pytest.approx(float(expected), rel=1e-4)
    assert torch.allclose(run.logits, logits, atol=1e-5)
    clean_logits = model.logits(tokens)
    p = clean_logits[:, 1:].log_softmax(-1)
    q = logits[:, 1:].log_softmax(-1)
    assert float(run.kl().detach()) == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)
    # Gradients reach the SAE through the frozen model
    run.downstream_loss().backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.parameters())


def test_a_later_sae_reads_the_earlier_ones_output_when_spliced_together(tiny):
    model = load_model(tiny[0])
    torch.manual_seed(0)
    first = saelab.create_sae("standard", 32, 64, hook_name="blocks.0.hook_resid_post")
    second = saelab.create_sae("standard", 32, 64, hook_name="blocks.1.hook_resid_post")
    units = [
        TrainingUnit.create(name, sae, [], 1e-3, TrainConfig()) for name, sae in (("first", first), ("second", second))
    ]
    tokens = torch.randint(4, 30, (2, 8))
    forwards, run = SplicedModel(model).run(tokens, units)
    with torch.no_grad(), model.hooks(read=["blocks.1.hook_resid_post"]) as cache:
        model.logits(tokens, write={"blocks.0.hook_resid_post": first})
    assert torch.allclose(forwards["second"][0], cache["blocks.1.hook_resid_post"].flatten(0, 1), atol=1e-5)
    # ... and its gradient reaches the first SAE through the second
    run.kl().backward()
    assert first.W_enc.grad.abs().sum() > 0


def test_downstream_hooks_before_every_sae_are_refused(tiny, tmp_path):
    config = e2e_config(tiny, tmp_path / "x", downstream=1.0, downstream_hooks=["blocks.0.hook_resid_pre"])
    config["model"]["hook_name"] = LAYERS["late"]
    with pytest.raises(ConfigError, match="comes before every SAE"):
        saelab.train(config)


def test_e2e_run_from_the_cli_saves_the_sae_and_whole_model_metrics(tiny, tmp_path, capsys):
    from saelab.cli import main

    model, dataset = tiny
    start = tmp_path / "local"
    saelab.train(run_config(tiny, start))
    out = tmp_path / "e2e"
    args = [
        "train",
        "--model.name",
        model,
        "--model.hook_name",
        LAYERS["early"],
        "--data.dataset",
        dataset,
        "--data.context_size",
        "16",
        "--data.heldout_contexts",
        "8",
        "--train.total_tokens",
        "1024",
        "--train.batch_size",
        "128",
        "--train.progress_bar",
        "false",
        "--train.eval_every",
        "4",
        "--sae.k",
        "4",
        "--sae.expansion_factor",
        "4",
        "--sae.init_from",
        str(start / "sae"),
        "--objective.kl",
        "1",
        "--objective.downstream",
        "0.5",
        "--objective.downstream_hooks",
        "[blocks.1.hook_resid_post, blocks.2.hook_resid_post]",
        "--out_dir",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"kl", "ce_loss_increase", "top1_agreement", "kl_loss", "downstream_loss"} <= set(summary["model"])
    assert "eval/ce_loss_increase" in summary["sae"]
    sae = saelab.load_sae(out / "sae")
    assert sae.cfg.hook_name == LAYERS["early"]


EXAMPLES = sorted((__import__("pathlib").Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_is_valid(path):
    from saelab.runs.config import run_sae_specs

    config = load_run_config(path)
    specs = run_sae_specs(config)
    assert specs and all("architecture" in options for options in specs.values())
    if "e2e" in path.name:
        assert config.objective.end_to_end and all(o.get("init_from") for o in specs.values())


def test_a_null_hook_name_in_a_model_run_is_a_config_error():
    """A missing hook_name reads model.hook_name; an explicit null has no activations to read."""
    from saelab.runs.runner import build_saes

    specs = {"named": {"hook_name": LAYERS["late"]}, "default": {}, "null": {"hook_name": None}}
    config = load_run_config(
        {"model": {"hook_name": LAYERS["early"]}, "sae": {"architecture": "topk", "k": 4}, "saes": specs}
    )
    with pytest.raises(ConfigError, match="SAE 'null' has hook_name null"):
        build_saes(config, {LAYERS["early"]: 8, LAYERS["late"]: 8})
    del config.saes["null"]
    saes = build_saes(config, {LAYERS["early"]: 8, LAYERS["late"]: 16})
    assert saes["default"].cfg.hook_name == LAYERS["early"] and saes["named"].cfg.d_in == 16
