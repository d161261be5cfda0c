"""train.autocast: the forward runs in bfloat16, the gradients of saelab's own kernels stay right, and the
weights, gradients and optimiser state stay float32."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import saelab
from saelab.saes.outputs import TrainOutput
from saelab.synthetic import PlantedFeatures, SyntheticSource
from saelab.training import TrainConfig, Trainer

CASES = {  # id: (architecture, options, sparse kernels?)
    "standard": ("standard", {}, True),
    "gated": ("gated", {}, True),
    "jumprelu": ("jumprelu", {}, True),
    "topk-sparse": ("topk", {"k": 8}, True),
    "topk-dense": ("topk", {"k": 8}, False),
    "batchtopk": ("batchtopk", {"k": 8}, True),
    "matryoshka": ("matryoshka", {"k": 8, "matryoshka_widths": [64, 256]}, True),
    "transcoder-skip": ("topk", {"k": 8, "d_out": 24, "skip_connection": True}, True),
}


def make(case: str):
    architecture, options, sparse = CASES[case]
    torch.manual_seed(0)
    sae = saelab.create_sae(architecture, d_in=32, d_sae=256, **options)
    if not sparse:
        sae.sparse_training = False
    return sae


def one_step(sae, batch, autocast: bool) -> tuple[dict[str, torch.Tensor], TrainOutput]:
    """Gradients of one training step (read before the update changes the weights) and the forward's output."""
    config = TrainConfig(total_tokens=10**6, batch_size=512, progress_bar=False, autocast=autocast, max_grad_norm=None)
    trainer = Trainer(sae, config)
    trainer.prepared = True
    outputs = []
    unit = trainer.units[0]
    forward = unit.forward
    unit.forward = lambda x: outputs.append(forward(x)) or outputs[-1]
    trainer.train_step(batch)
    return {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}, outputs[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_autocast_gradients_match_float32(case):
    """One step under autocast: the output moved by bfloat16 rounding only (and its TopK picks), and every
    gradient is float32 and points where the float32 gradient points (cosine >= 0.99), including those of the
    custom encoder and sparse kernels."""
    sae = make(case)
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1)) * 2
    target = x if sae.cfg.d_out == 32 else torch.randn(512, sae.cfg.d_out, generator=torch.Generator().manual_seed(2))
    batch = (x, target) if sae.cfg.d_out != 32 else x
    exact, out32 = one_step(copy.deepcopy(sae), batch, autocast=False)
    mixed, out16 = one_step(sae, batch, autocast=True)
    ran_in_bf16 = out16.output.float() - out32.output
    assert ran_in_bf16.abs().max() > 0 and ran_in_bf16.norm() <= 0.1 * out32.output.norm()
    assert set(mixed) == set(exact) and len(exact) >= 3
    for name, grad in exact.items():
        assert mixed[name].dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(mixed[name].flatten(), grad.flatten(), dim=0)
        assert cosine >= 0.99, (name, float(cosine))
    assert all(p.dtype == torch.float32 for p in sae.parameters())


@pytest.mark.parametrize("architecture", ["standard", "topk", "batchtopk"])
def test_autocast_training_learns_as_float32_does(architecture):
    """A whole run under autocast ends within 0.02 explained variance of the float32 run, with float32 weights,
    optimiser state and exact (whole-number) firing counts."""
    planted = PlantedFeatures(d_in=32, n_features=64, mean_active=3, offset_scale=1.0)
    options = {"l1_coefficient": 0.8} if architecture == "standard" else {"k": 6}
    results = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        sae = saelab.create_sae(architecture, 32, 128, **options)
        config = TrainConfig(total_tokens=256 * 400, batch_size=256, lr=3e-3, progress_bar=False, autocast=autocast)
        trainer = Trainer(sae, config)
        trained = trainer.fit(SyntheticSource(planted, 256))["sae"]
        x, _ = planted.sample(4096, torch.Generator().manual_seed(5))
        with torch.no_grad():
            results[autocast] = saelab.evals.explained_variance(x, trained(x))
        unit = trainer.units[0]
        assert all(p.dtype == torch.float32 for p in trained.parameters())
        assert all(v.dtype == torch.float32 for s in unit.optimizer.state.values() for k, v in s.items() if k != "step")
        assert torch.equal(unit.fire_counts, unit.fire_counts.round()) and unit.fire_counts.sum() > 0
    assert results[True] >= 0.7
    assert abs(results[True] - results[False]) <= 0.02, results


def test_autocast_in_end_to_end_training_from_the_cli(tmp_path, capsys):
    """End-to-end training (the model runs under autocast too) and multi-SAE runs take --train.autocast."""
    from tiny import save_tiny_model, sentences, write_jsonl

    from saelab.cli import main

    model = save_tiny_model(tmp_path / "model")
    dataset = write_jsonl(tmp_path / "text.jsonl", sentences(300))
    args = [
        "train",
        "--model.name",
        str(model),
        "--model.hook_name",
        "blocks.1.hook_resid_post",
        "--data.dataset",
        str(dataset),
        "--data.context_size",
        "16",
        "--data.heldout_contexts",
        "4",
        "--train.total_tokens",
        "1024",
        "--train.batch_size",
        "128",
        "--train.progress_bar",
        "false",
        "--train.eval_every",
        "0",
        "--train.autocast",
        "true",
        "--sae.k",
        "4",
        "--sae.expansion_factor",
        "4",
        "--objective.kl",
        "1",
        "--objective.reconstruction",
        "0",
        "--out_dir",
        str(tmp_path / "run"),
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["model/kl"]) for r in records if "model/kl" in r)
    sae = saelab.load_sae(tmp_path / "run" / "sae")
    assert all(p.dtype == torch.float32 for p in sae.parameters())


@pytest.mark.parametrize(("model_dtype", "expected"), [("bfloat16", True), ("float32", False)])
def test_auto_autocast_follows_the_models_dtype(tmp_path, monkeypatch, model_dtype, expected):
    """`saelab train`'s default train.autocast 'auto' runs the SAE steps under autocast when the model runs in
    bfloat16 (and records what ran in config.yaml), not when it runs in float32."""
    import yaml
    from tiny import save_tiny_model, sentences, write_jsonl

    from saelab.saes.topk import TopKSAE

    seen: list[bool] = []
    original = TopKSAE.training_forward

    def recording(self, x):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, x)

    monkeypatch.setattr(TopKSAE, "training_forward", recording)
    config = {
        "model": {
            "name": str(save_tiny_model(tmp_path / "model")),
            "dtype": model_dtype,
            "hook_name": "blocks.1.hook_resid_post",
        },
        "data": {
            "dataset": str(write_jsonl(tmp_path / "text.jsonl", sentences(300))),
            "context_size": 16,
            "heldout_contexts": 4,
        },
        "train": {"total_tokens": 512, "batch_size": 128, "progress_bar": False, "eval_every": 0},
        "sae": {"k": 4, "expansion_factor": 2},
        "out_dir": str(tmp_path / "run"),
    }
    saelab.train(config)
    assert seen and set(seen) == {expected}
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["train"]["autocast"] is expected
