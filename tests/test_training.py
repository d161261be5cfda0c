"""The trainer: it learns planted features with every architecture, and its upkeep (schedules, dead latents,
decoder constraint, normalisation, checkpoints, divergence guard) does what it says."""

from __future__ import annotations

import math

import pytest
import torch

import saelab
from saelab.activations import TensorSource
from saelab.core.errors import ConfigError
from saelab.evals import explained_variance, l0
from saelab.synthetic import PlantedFeatures, SyntheticSource, feature_recovery
from saelab.training import TrainConfig, Trainer, TrainingDiverged
from saelab.training.schedules import lr_factor, warmup_factor

PLANTED = PlantedFeatures(d_in=32, n_features=64, mean_active=3, offset_scale=1.0)

# Settings per architecture for 1,500 steps of 256 planted-feature vectors (3 of 64 features active).
ARCHITECTURE_OPTIONS = {
    "standard": {"l1_coefficient": 0.8},
    "gated": {"l1_coefficient": 3.0},
    "jumprelu": {"l0_coefficient": 1.0},
    "topk": {"k": 6},
    "batchtopk": {"k": 5},
    "matryoshka": {"k": 5, "matryoshka_widths": [32, 64]},
}


def quick_config(**overrides) -> TrainConfig:
    options = dict(total_tokens=256 * 1500, batch_size=256, lr=3e-3, progress_bar=False, dead_window_tokens=256 * 200)
    return TrainConfig(**{**options, **overrides})


def test_every_architecture_has_planted_settings():
    assert set(ARCHITECTURE_OPTIONS) == set(saelab.available_architectures(layered=False))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURE_OPTIONS))
def test_recovers_planted_features(architecture):
    """Each architecture explains >= 90% of the variance and finds the planted directions (mean max cos >= 0.9)."""
    torch.manual_seed(0)
    sae = saelab.create_sae(
        architecture,
        32,
        128,
        b_dec_init="geometric_median",
        normalize_activations="expected_average_only_in",
        **ARCHITECTURE_OPTIONS[architecture],
    )
    trained = Trainer(sae, quick_config()).fit(SyntheticSource(PLANTED, 256))["sae"]
    x, coefficients = PLANTED.sample(4096, torch.Generator().manual_seed(123))
    with torch.no_grad():
        ev = explained_variance(x, trained(x))
        sparsity = l0(trained.encode(x))
    true_l0 = float((coefficients > 0).sum(-1).float().mean())
    assert ev >= 0.9
    assert feature_recovery(trained.W_dec, PLANTED.features) >= 0.9
    assert sparsity <= 5 * true_l0  # sparse (an L1 SAE keeps some small activations), not dense (~100)


def test_transcoder_learns_a_linear_map_of_sparse_features():
    """A transcoder with d_out != d_in learns to predict targets y = x @ A from x."""
    torch.manual_seed(0)
    x, _ = PLANTED.sample(16384, torch.Generator().manual_seed(1))
    A = torch.randn(32, 20) / math.sqrt(32)
    y = x @ A
    sae = saelab.create_sae("topk", 32, 128, d_out=20, k=6)
    trained = Trainer(sae, quick_config(total_tokens=256 * 800)).fit(TensorSource((x, y), 256))["sae"]
    x_test, _ = PLANTED.sample(2048, torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert explained_variance(x_test @ A, trained(x_test)) >= 0.85


def test_folded_normalisation_works_on_raw_activations(tmp_path):
    """Trained on scaled inputs, the saved SAE reconstructs raw inputs and records no normalisation."""
    torch.manual_seed(0)
    x, _ = PLANTED.sample(16384, torch.Generator().manual_seed(1))
    raw = x * 37.0  # far from norm sqrt(d_in): the scale matters
    sae = saelab.create_sae("topk", 32, 128, k=6, normalize_activations="expected_average_only_in")
    trainer = Trainer(sae, quick_config(total_tokens=256 * 600), out_dir=tmp_path)
    trainer.fit(TensorSource(raw, 256))
    unit = trainer.units[0]
    assert unit.scaler.in_scale == [pytest.approx(math.sqrt(32) / float(raw.norm(dim=-1).mean()), rel=0.05)]
    loaded = saelab.load_sae(tmp_path / "sae")
    assert loaded.cfg.normalize_activations == "none"
    with torch.no_grad():
        (in_scale,) = unit.scaler.in_scale
        assert torch.allclose(loaded(raw), trainer.saes["sae"](raw * in_scale) / in_scale, atol=1e-3)
        assert explained_variance(raw, loaded(raw)) >= 0.85


def test_decoder_rows_stay_unit_norm_when_constrained():
    sae = saelab.create_sae("topk", 32, 64, k=4)
    assert sae.normalize_decoder
    Trainer(sae, quick_config(total_tokens=256 * 50)).fit(SyntheticSource(PLANTED, 256))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_dead_latents_are_counted_and_fed_to_auxk():
    """A latent that cannot fire is dead after the window, and AuxK then appears in the logged terms."""
    torch.manual_seed(0)
    sae = saelab.create_sae("topk", 32, 64, k=4)
    with torch.no_grad():
        sae.b_enc[:8] = -1e4  # these eight can never win the top-k
    config = quick_config(total_tokens=256 * 40, dead_window_tokens=256 * 10, log_every=40, lr=1e-9)
    trainer = Trainer(sae, config)
    trainer.fit(SyntheticSource(PLANTED, 256))
    dead = trainer.units[0].tokens_since_fired >= config.dead_window_tokens
    assert dead[:8].all()
    assert trainer.last_record["dead_fraction"] >= 8 / 64
    assert trainer.last_record["aux_loss"] > 0


def test_lr_schedules():
    config = quick_config(total_tokens=256 * 100, lr_warmup_steps=10, lr_schedule="linear", lr_end_factor=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(99, config) == pytest.approx(0.1 + 0.9 * (1 / 90))
    cosine = quick_config(total_tokens=256 * 100, lr_schedule="cosine", lr_decay_steps=50)
    assert lr_factor(49, cosine) == 1.0
    assert lr_factor(75, cosine) == pytest.approx(0.5)
    assert warmup_factor(4, 10) == pytest.approx(0.5) and warmup_factor(50, 10) == 1.0


def test_sparsity_warmup_scales_the_penalty():
    torch.manual_seed(0)
    sae = saelab.create_sae("standard", 32, 64, l1_coefficient=2.0)
    trainer = Trainer(sae, quick_config(total_tokens=256 * 4, sparsity_warmup_steps=4, log_every=1, lr=1e-9))
    penalties = []
    source = SyntheticSource(PLANTED, 256)
    for step, batch in zip(range(4), source, strict=False):  # the source is endless
        trainer.step = step
        out = sae.training_forward(batch)
        penalties.append(float(sae.sparsity_loss(out).detach()))
        trainer.train_step(batch)
        expected = 2.0 * (step + 1) / 4 * penalties[-1]
        assert trainer.units[0].window["sparsity_loss"][-1] == pytest.approx(expected, rel=1e-4)


def test_nan_stops_training_with_the_step_named(tmp_path):
    data = torch.randn(2048, 32)
    data[1500] = float("nan")
    sae = saelab.create_sae("standard", 32, 64)
    trainer = Trainer(sae, quick_config(total_tokens=2048, checkpoint_every=2), out_dir=tmp_path)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=r"step \d+: loss is nan"):
        trainer.fit(TensorSource(data, 256, shuffle=False))
    # the failing step changed nothing, and the checkpoint written before it is intact
    assert not all(torch.equal(before[k], v) for k, v in sae.state_dict().items())  # earlier steps did train
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert trainer.resume()


def test_resume_without_a_run_directory_says_so(tmp_path):
    trainer = Trainer(saelab.create_sae("standard", 32, 64), quick_config())
    with pytest.raises(ConfigError, match="resuming needs an out_dir"):
        trainer.resume()
    assert not trainer.resume(tmp_path)  # given one, an empty directory simply has no checkpoint


@pytest.mark.parametrize("architecture", ["jumprelu", "batchtopk"])
def test_resume_continues_the_same_run(tmp_path, architecture):
    """Stopping after a checkpoint and resuming gives bit-identical weights to an uninterrupted run."""
    data = PLANTED.sample(8192, torch.Generator().manual_seed(5))[0]
    config = quick_config(total_tokens=256 * 30, checkpoint_every=10, lr_schedule="cosine")

    def fresh() -> saelab.SAE:
        torch.manual_seed(0)
        return saelab.create_sae(architecture, 32, 64, normalize_activations="expected_average_only_in")

    straight = Trainer(fresh(), config, out_dir=tmp_path / "a").fit(TensorSource(data, 256, seed=3))["sae"]

    interrupted = Trainer(fresh(), config, out_dir=tmp_path / "b")
    source = TensorSource(data, 256, seed=3)
    batches = iter(source)
    interrupted.prepare([next(batches) for _ in range(config.norm_estimate_batches)])
    for _ in range(20):  # run 20 steps by hand, checkpointing at 10 and 20, then "crash"
        interrupted.train_step(next(batches))
        interrupted.step += 1
        if interrupted.step % 10 == 0:
            interrupted.save_checkpoint(source)

    resumed = Trainer(fresh(), config, out_dir=tmp_path / "b")
    assert resumed.resume()
    assert resumed.step == 20 and resumed.resumed_from == 20
    final = resumed.fit(TensorSource(data, 256, seed=3))["sae"]
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, final.state_dict()[name]), name


def test_checkpoints_keep_only_the_newest(tmp_path):
    config = quick_config(total_tokens=256 * 40, checkpoint_every=5, keep_checkpoints=2)
    Trainer(saelab.create_sae("topk", 32, 64, k=4), config, out_dir=tmp_path).fit(SyntheticSource(PLANTED, 256))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_000000035", "step_000000040"]  # the last step's too: the run can be extended


def test_a_checkpoint_of_another_configuration_is_refused_before_loading(tmp_path):
    """TopK and standard SAEs of one width have the same tensors: only the recorded configuration tells them apart."""
    config = quick_config(total_tokens=256 * 20, checkpoint_every=10)

    def sae(architecture, **options):
        torch.manual_seed(0)
        return saelab.create_sae(architecture, 32, 64, **options)

    Trainer(sae("topk", k=4), config, out_dir=tmp_path).fit(SyntheticSource(PLANTED, 256))
    standard = sae("standard")
    untouched = {k: v.clone() for k, v in standard.state_dict().items()}
    with pytest.raises(saelab.ConfigError, match=r"SAE 'sae' architecture \('topk' there, 'standard' here\)"):
        Trainer(standard, config, out_dir=tmp_path).resume()
    assert all(torch.equal(v, standard.state_dict()[k]) for k, v in untouched.items())
    with pytest.raises(saelab.ConfigError, match=r"train.lr \(0.003 there, 0.001 here\)"):
        Trainer(sae("topk", k=4), quick_config(total_tokens=256 * 20, lr=1e-3), out_dir=tmp_path).resume()
    with pytest.raises(saelab.ConfigError, match="SAEs \\(sae there, a, b here\\)"):
        Trainer({"a": sae("topk", k=4), "b": sae("topk", k=4)}, config, out_dir=tmp_path).resume()
    with pytest.raises(saelab.ConfigError, match="less than .* has trained already"):
        Trainer(sae("topk", k=4), quick_config(total_tokens=256 * 15), out_dir=tmp_path).resume()
    # its length and how it logs and checkpoints may change
    longer = quick_config(total_tokens=256 * 30, checkpoint_every=3, log_every=7, keep_checkpoints=5, eval_every=2)
    resumed = Trainer(sae("topk", k=4), longer, out_dir=tmp_path)
    assert resumed.resume() and resumed.resumed_from == 20


def test_several_saes_train_side_by_side_as_if_alone():
    """Two SAEs in one trainer see the same batches and end as each would alone."""

    def make(k):
        torch.manual_seed(k)
        return saelab.create_sae("topk", 32, 64, k=k)

    config = quick_config(total_tokens=256 * 20)
    together = Trainer({"k3": make(3), "k5": make(5)}, config).fit(SyntheticSource(PLANTED, 256))
    for k in (3, 5):
        alone = Trainer(make(k), config).fit(SyntheticSource(PLANTED, 256))["sae"]
        assert torch.equal(alone.W_dec, together[f"k{k}"].W_dec)


def test_source_running_out_is_reported():
    sae = saelab.create_sae("topk", 32, 64, k=4)
    with pytest.raises(RuntimeError, match="ran out after"):
        Trainer(sae, quick_config(total_tokens=256 * 50)).fit(TensorSource(torch.randn(2560, 32), 256, loop=False))


def test_activations_of_the_wrong_width_are_refused_by_name():
    sae = saelab.create_sae("topk", d_in=16, d_sae=32, k=2, hook_name="blocks.3.hook_resid_post")
    config = TrainConfig(total_tokens=256, batch_size=64, progress_bar=False)
    expected = "takes inputs of width 16 but the activations at 'blocks.3.hook_resid_post' have width 24"
    with pytest.raises(ValueError, match=expected):
        Trainer(sae, config).fit(TensorSource(torch.randn(512, 24), batch_size=64))


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    config = quick_config(total_tokens=256 * 20, checkpoint_every=5, keep_checkpoints=3)
    Trainer(saelab.create_sae("topk", 32, 64, k=4), config, out_dir=tmp_path).fit(SyntheticSource(PLANTED, 256))
    newest = sorted((tmp_path / "checkpoints").iterdir())[-1]
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after completion (disk error, bad copy)
    resumed = Trainer(saelab.create_sae("topk", 32, 64, k=4), config, out_dir=tmp_path)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step_000000020"):
        assert resumed.resume()
    assert resumed.step == 15


def test_a_full_disk_during_a_checkpoint_loses_nothing(tmp_path, monkeypatch):
    import errno

    import saelab.core.files as atomic

    config = quick_config(total_tokens=256 * 20, checkpoint_every=5, keep_checkpoints=5)
    trainer = Trainer(saelab.create_sae("topk", 32, 64, k=4), config, out_dir=tmp_path)
    source = SyntheticSource(PLANTED, 256)
    batches = iter(source)
    trainer.prepare([next(batches) for _ in range(config.norm_estimate_batches)])
    for _ in range(5):
        trainer.train_step(next(batches))
        trainer.step += 1
    trainer.save_checkpoint(source)
    good = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_000000005").iterdir()}

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer.step += 5
    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(source)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000000005"]  # no debris
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_000000005").iterdir()} == good
    resumed = Trainer(saelab.create_sae("topk", 32, 64, k=4), config, out_dir=tmp_path)
    assert resumed.resume() and resumed.step == 5


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_compiled_training_matches_eager(architecture):
    from torch._dynamo.utils import counters

    options = {"k": 4} if architecture == "topk" else {}
    data = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    trained = {}
    counters.clear()
    for compile_ in (False, True):
        torch.manual_seed(1)
        sae = saelab.create_sae(architecture, d_in=16, d_sae=64, **options)
        config = TrainConfig(total_tokens=1024, batch_size=256, progress_bar=False, compile=compile_)
        trained[compile_] = Trainer(sae, config).fit(TensorSource(data, batch_size=256))["sae"]
    assert counters["stats"]["unique_graphs"] > 0  # something was compiled
    for name, eager in trained[False].state_dict().items():
        assert torch.allclose(trained[True].state_dict()[name], eager, atol=1e-4), name
    torch.manual_seed(1)
    assert not torch.allclose(trained[True].W_enc, saelab.create_sae(architecture, d_in=16, d_sae=64, **options).W_enc)
