"""The maths of each architecture, checked against hand computations."""

from __future__ import annotations

import pytest
import torch

import saelab
from saelab.saes.outputs import TrainOutput

ARCHITECTURES = saelab.available_architectures(layered=False)


def randomised(sae: saelab.SAE) -> saelab.SAE:
    """Perturb every parameter and buffer so that no bias or threshold is trivially zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.fill_(-2.0)
            sae.threshold.copy_(sae.log_threshold.exp())
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.05)
    return sae.eval()


def test_topk_keeps_exactly_the_k_largest():
    torch.manual_seed(0)
    sae = saelab.create_sae("topk", 16, 64, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # all pre-activations positive: ReLU never zeroes a kept value
    x = torch.randn(32, 16)
    latents = sae.encode(x)
    assert ((latents != 0).sum(dim=-1) == 5).all()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(5, dim=-1)
    assert torch.equal(latents.gather(-1, top.indices), top.values)


def test_batchtopk_keeps_k_times_batch_and_exports_to_jumprelu():
    torch.manual_seed(0)
    sae = saelab.create_sae("batchtopk", 16, 64, k=4, threshold_lr=0.1)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
        sae.b_enc[:8] += torch.arange(8.0)  # some latents favoured: rows differ in how many they use
    x = torch.randn(32, 16)
    out = sae.training_forward(x)
    assert int((out.latents != 0).sum()) == 4 * 32
    assert len(set((out.latents != 0).sum(-1).tolist())) > 1
    sae.update_after_step(out)
    smallest = out.latents[out.latents > 0].min()
    assert torch.equal(sae.topk_threshold, smallest)  # first update takes the observed value
    out2 = sae.training_forward(torch.randn(32, 16) * 2)
    sae.update_after_step(out2)
    assert torch.allclose(sae.topk_threshold, smallest + 0.1 * (out2.latents[out2.latents > 0].min() - smallest))
    sae.eval()
    jump = sae.to_jumprelu()
    assert jump.cfg.architecture == "jumprelu"
    x = torch.randn(64, 16)
    assert torch.equal(sae.encode(x), jump.encode(x))
    assert torch.equal(sae(x), jump(x))


def test_jumprelu_threshold_gradient_only_inside_the_kernel():
    sae = saelab.create_sae("jumprelu", 4, 3, bandwidth=0.2, init_threshold=1.0)
    threshold, bandwidth = 1.0, 0.2
    # latent 0: one value inside the window (|1.05 - 1| < 0.1); latent 1: two inside; latent 2: none
    hidden_pre = torch.tensor([[1.05, 0.95, 3.0], [0.2, 1.09, 1.5], [0.0, 0.5, -1.0]], requires_grad=True)
    out = TrainOutput(sae_in=torch.zeros(3, 4), hidden_pre=hidden_pre, latents=hidden_pre, output=torch.zeros(3, 4))
    sae.sparsity_loss(out).backward()
    in_window = torch.tensor([1.0, 2.0, 0.0])
    # d(mean L0)/d(log t) = -(1/bandwidth) * count / batch * t   (chain rule through t = exp(log t))
    expected = -(1 / bandwidth) * in_window / 3 * threshold
    assert torch.allclose(sae.log_threshold.grad, expected)
    assert sae.log_threshold.grad[2] == 0


def test_jumprelu_training_gradients_match_the_straight_through_formulas():
    """Against the formulas written out plainly: for loss = sum(w * latents) + L0, d/dx = w * H(x - t) and
    d/d(log t) = t * [-(t / bw) * sum_tokens w * K - (1 / bw) * sum_tokens K / tokens], K the rectangle kernel."""
    torch.manual_seed(0)
    bandwidth = 0.3
    sae = saelab.create_sae("jumprelu", 4, 32, bandwidth=bandwidth, init_threshold=1.0)
    with torch.no_grad():
        sae.log_threshold.add_(torch.randn(32) * 0.2)
    t = sae.log_threshold.exp().detach()
    x = (t + torch.randn(2, 50, 32) * 0.3).requires_grad_(True)  # (batch, positions, d_sae), many near t
    w = torch.randn(2, 50, 32)
    out = TrainOutput(sae_in=torch.zeros(100, 4), hidden_pre=x, latents=x, output=torch.zeros(100, 4))
    loss = (w * sae.activate(x)).sum() + sae.sparsity_loss(out)
    loss.backward()
    kernel = ((x.detach() - t) / bandwidth).abs() < 0.5
    assert 0 < kernel.sum() < kernel.numel()
    assert torch.allclose(x.grad, w * (x.detach() > t))
    d_threshold = -(t / bandwidth) * (w * kernel).sum((0, 1)) - (1 / bandwidth) * kernel.sum((0, 1)) / 100
    assert torch.allclose(sae.log_threshold.grad, d_threshold * t, atol=1e-5)
    assert float(sae.sparsity_loss(out).detach()) == pytest.approx(float((x > t).sum()) / 100)


def test_jumprelu_inference_is_relu_above_threshold():
    sae = randomised(saelab.create_sae("jumprelu", 8, 16))
    x = torch.randn(10, 8)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.equal(sae.encode(x), torch.relu(pre) * (pre > sae.threshold))


def test_standard_l1_is_weighted_by_decoder_row_norms():
    sae = randomised(saelab.create_sae("standard", 8, 16)).train()
    x = torch.randn(10, 8)
    out = sae.training_forward(x)
    by_hand = (out.latents.abs() * sae.W_dec.norm(dim=1)).sum(-1).mean()
    assert torch.allclose(sae.sparsity_loss(out), by_hand)
    with torch.no_grad():
        sae.W_dec[3] *= 2
    doubled = sae.sparsity_loss(sae.training_forward(x))  # the same latents (the encoder is unchanged)
    assert torch.allclose(doubled - by_hand, (out.latents[:, 3].abs() * sae.W_dec[3].norm() / 2).mean())


def test_gated_encoding_and_auxiliary_loss():
    sae = randomised(saelab.create_sae("gated", 8, 16)).train()
    x = torch.randn(10, 8)
    centred = x - sae.b_dec
    gate = centred @ sae.W_enc + sae.b_gate
    magnitude = torch.relu(centred @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag)
    assert torch.allclose(sae.encode(x), (gate > 0) * magnitude, atol=1e-6)
    out = sae.training_forward(x)
    aux = sae.auxiliary_loss(out, x, None)
    by_hand = (torch.relu(gate) @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    assert aux is not None and torch.allclose(aux, by_hand)
    aux.backward()
    assert sae.W_dec.grad is None and sae.b_gate.grad.abs().sum() > 0 and sae.W_enc.grad.abs().sum() > 0


def test_matryoshka_sums_prefix_reconstructions():
    sae = randomised(saelab.create_sae("matryoshka", 8, 16, k=4, matryoshka_widths=[4, 8])).train()
    x = torch.randn(10, 8)
    out = sae.training_forward(x)
    by_hand = sum((out.latents[:, :w] @ sae.W_dec[:w] + sae.b_dec - x).pow(2).sum(-1).mean() for w in (4, 8, 16))
    assert torch.allclose(sae.reconstruction_loss(out, x), by_hand)
    with pytest.raises(saelab.ConfigError, match="increase"):
        saelab.create_sae("matryoshka", 8, 16, k=4, matryoshka_widths=[8, 4])


@pytest.mark.parametrize("k_aux", [3, 5, 8])  # fewer than the 5 dead latents, as many, more (then all of them)
def test_auxk_reconstructs_the_residual_from_dead_latents(k_aux):
    sae = randomised(saelab.create_sae("topk", 8, 16, k=2, k_aux=k_aux)).train()
    x = torch.randn(10, 8)
    out = sae.training_forward(x)
    assert sae.auxiliary_loss(out, x, torch.zeros(16, dtype=torch.bool)) is None
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 6, 9, 12]] = True
    residual = x - out.output.detach()
    masked = out.hidden_pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(min(k_aux, 5), dim=-1)
    aux_latents = torch.zeros_like(masked).scatter(-1, top.indices, torch.relu(top.values))
    by_hand = (aux_latents @ sae.W_dec - residual).pow(2).sum(-1).mean()
    assert torch.allclose(sae.auxiliary_loss(out, x, dead), by_hand)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_transcoder_with_skip(architecture):
    sae = randomised(saelab.create_sae(architecture, 8, 64, d_out=5, skip_connection=True))
    assert sae.cfg.transcoder and not sae.cfg.apply_b_dec_to_input
    x = torch.randn(10, 8)
    y = sae(x)
    assert y.shape == (10, 5)
    assert torch.allclose(y, sae.decode(sae.encode(x)) + x @ sae.W_skip.T)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("transcoder", [False, True])
def test_folding_the_scale_gives_the_same_output_on_raw_inputs(architecture, transcoder):
    shape = {"d_out": 6, "skip_connection": True} if transcoder else {}
    sae = randomised(saelab.create_sae(architecture, 8, 32, **shape))
    in_scale, out_scale = (3.0, 0.25) if transcoder else (3.0, 3.0)
    folded = sae.clone()
    folded.fold_activation_scale(in_scale, out_scale)
    x = torch.randn(20, 8)
    assert torch.allclose(folded(x), sae(x * in_scale) / out_scale, atol=1e-5)
    assert torch.equal(folded.encode(x) != 0, sae.encode(x * in_scale) != 0)


def test_layer_norm_normalisation_is_undone_on_the_output():
    sae = randomised(saelab.create_sae("topk", 8, 32, k=32, normalize_activations="layer_norm"))
    x = torch.randn(5, 8) * 10 + 3
    mean, std = x.mean(-1, keepdim=True), x.std(-1, unbiased=False, keepdim=True)
    normalised = (x - mean) / (std**2 + 1e-5).sqrt()
    plain = sae.clone()
    plain.cfg.normalize_activations = "none"
    assert torch.allclose(sae(x), plain(normalised) * (std**2 + 1e-5).sqrt() + mean, atol=1e-4)


def test_unknown_options_are_rejected_with_a_suggestion():
    with pytest.raises(saelab.ConfigError, match="Did you mean 'k'"):
        saelab.create_sae("topk", 8, 16, kk=3)
    with pytest.raises(saelab.ConfigError, match="Did you mean 'topk'"):
        saelab.create_sae("topkk", 8, 16)
    with pytest.raises(saelab.ConfigError, match="k must be between"):
        saelab.create_sae("topk", 8, 16, k=17)
    with pytest.raises(saelab.ConfigError, match="must be an integer"):
        saelab.create_sae("topk", 8, 16, k="3")


def test_geometric_median_resists_outliers():
    from saelab.saes.init import geometric_median

    points = torch.zeros(101, 3)
    points[:100] = torch.randn(100, 3) * 0.01
    points[100] = 1000.0
    assert geometric_median(points).norm() < 0.05
    assert points.mean(0).norm() > 5


SELECTS_BY_SIZE = {"topk", "batchtopk", "matryoshka"}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("transcoder", [False, True])
def test_fold_W_dec_norm_gives_unit_decoder_rows_and_the_same_outputs(architecture, transcoder):
    """Per-latent norms move into the encoder (ReLU, JumpReLU, gated); TopK-family SAEs can move only a norm
    their rows share, as after folding the activation scale into a decoder kept on the sphere."""
    shape = {"d_out": 6, "skip_connection": True} if transcoder else {}
    sae = randomised(saelab.create_sae(architecture, 8, 32, **shape))
    if architecture in SELECTS_BY_SIZE:
        sae.normalize_decoder_rows()  # what training keeps
    sae.fold_activation_scale(3.0, 0.25 if transcoder else 3.0)  # rows now all of norm 1/out_scale (TopK family)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-3)
    folded = sae.clone()
    assert folded.fold_W_dec_norm()
    assert torch.allclose(folded.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    x = torch.randn(200, 8) * 2
    with torch.no_grad():
        reference = sae(x)  # sums of terms up to ~200: float32 rounding relative to that scale
        assert torch.allclose(folded(x), reference, atol=max(1e-5, 1e-6 * float(reference.abs().max())))
        assert torch.equal(folded.encode(x) != 0, sae.encode(x) != 0)
        assert torch.allclose(folded.encode(x), sae.encode(x) * sae.W_dec.norm(dim=1), rtol=1e-6, atol=1e-5)
    folded.train()  # the training-mode forward (log thresholds, batch selection) agrees too
    with torch.no_grad():
        trained = sae.clone().train().training_forward(x).output
        assert torch.allclose(
            folded.training_forward(x).output, trained, atol=max(1e-5, 1e-6 * float(trained.abs().max()))
        )


@pytest.mark.parametrize("architecture", sorted(SELECTS_BY_SIZE))
def test_fold_W_dec_norm_leaves_size_selecting_saes_with_unequal_rows_alone(architecture):
    sae = randomised(saelab.create_sae(architecture, 8, 32))
    before = {name: t.clone() for name, t in sae.state_dict().items()}
    assert not sae.fold_W_dec_norm()
    assert all(torch.equal(before[name], t) for name, t in sae.state_dict().items())
    with pytest.raises(ValueError, match="only a uniform scale"):
        sae.scale_latents(torch.rand(32) + 0.5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trained_saes_are_saved_with_unit_norm_decoder_rows(tmp_path, architecture):
    """What SAEBench checks of a custom SAE, after the activation scale was folded in on saving."""
    from saelab.activations import TensorSource
    from saelab.training import TrainConfig, Trainer

    torch.manual_seed(0)
    raw = torch.randn(2048, 16) * 37.0
    options = {"k": 4} if architecture in SELECTS_BY_SIZE else {}
    sae = saelab.create_sae(architecture, 16, 48, normalize_activations="expected_average_only_in", **options)
    config = TrainConfig(total_tokens=256 * 8, batch_size=256, lr=3e-3, progress_bar=False)
    trainer = Trainer(sae, config, out_dir=tmp_path)
    trainer.fit(TensorSource(raw, 256))
    loaded = saelab.load_sae(tmp_path / "sae").eval()
    assert torch.allclose(loaded.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    (in_scale,) = trainer.units[0].scaler.in_scale  # one hook point, one factor
    trained = trainer.saes["sae"].eval()
    with torch.no_grad():
        assert torch.allclose(loaded(raw[:256]), trained(raw[:256] * in_scale) / in_scale, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half", "double"])
def test_cfg_dtype_and_device_follow_the_parameters(cast):
    sae = saelab.create_sae("jumprelu", 8, 16)
    expected = {"to": torch.bfloat16, "bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
    moved = sae.to(device="cpu", dtype=torch.bfloat16) if cast == "to" else getattr(sae, cast)()
    assert moved is sae and sae.W_enc.dtype == expected and sae.threshold.dtype == expected
    assert sae.cfg.torch_dtype == expected and sae.cfg.device == "cpu"
    sae.float()
    assert sae.cfg.dtype == "float32"
