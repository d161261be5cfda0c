"""Cross-layer transcoders and transcoder sets (saes/clt.py): the per-layer view equals the concatenated one, a CLT
without its cross-layer decoders is a transcoder set, the sparse TopK step equals the dense computation, the
JumpReLU penalty is the paper's, per-layer scales fold exactly, and the trainer learns cross-layer structure that a
transcoder set cannot."""

from __future__ import annotations

import pytest
import torch

import saelab
from saelab.activations import TensorSource
from saelab.core.errors import ConfigError
from saelab.evals import explained_variance
from saelab.training import TrainConfig, Trainer

HOOKS = {"hook_name": "blocks.{layer}.hook_resid_mid", "hook_name_out": "blocks.{layer}.hook_mlp_out"}
L, D, M = 3, 8, 16  # layers, width per layer, latents per layer


def make(architecture="clt", activation="topk", skip=False, dtype="float32", **options):
    torch.manual_seed(0)
    sae = saelab.create_sae(
        architecture,
        d_in=L * D,
        d_sae=L * M,
        layers=[2, 3, 5],
        activation=activation,
        k=4,
        skip_connection=skip,
        dtype=dtype,
        **HOOKS,
        **options,
    )
    with torch.no_grad():  # every parameter away from its initial value, so that no term hides at zero
        for name, p in sae.named_parameters():
            if name != "log_threshold":
                p.add_(torch.randn_like(p) * 0.1)
    return sae


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
@pytest.mark.parametrize("skip", [False, True])
def test_per_layer_view_equals_the_concatenated_forward(activation, skip):
    sae = make(activation=activation, skip=skip).eval()
    x = torch.randn(6, L * D)
    layers = [x[:, i * D : (i + 1) * D] for i in range(L)]
    latents = [sae.encode_layer(i, layers[i]) for i in range(L)]
    outputs = [sae.decode_layer(j, latents) for j in range(L)]
    if skip:
        outputs = [o + sae.skip_layer(j, layers[j]) for j, o in enumerate(outputs)]
    torch.testing.assert_close(sae(x), torch.cat(outputs, dim=-1))
    torch.testing.assert_close(sae.encode(x), torch.cat(latents, dim=-1))
    if activation == "topk":
        assert all(int((z != 0).sum(-1).max()) <= 4 for z in latents)
    # the output of layer j depends on the inputs of layers <= j only (a causal splice relies on it)
    later = x.clone()
    later[:, 2 * D :] += 1.0
    torch.testing.assert_close(sae(later)[:, : 2 * D], sae(x)[:, : 2 * D])
    assert not torch.allclose(sae(later)[:, 2 * D :], sae(x)[:, 2 * D :])


def test_hooks_come_from_the_templates_and_bad_configs_fail_clearly():
    sae = make()
    assert sae.cfg.input_hooks() == ["blocks.2.hook_resid_mid", "blocks.3.hook_resid_mid", "blocks.5.hook_resid_mid"]
    assert sae.cfg.output_hooks()[2] == "blocks.5.hook_mlp_out"
    with pytest.raises(ConfigError, match="must say where the layer goes"):
        saelab.create_sae("clt", 2 * D, 2 * M, layers=[0, 1], hook_name="blocks.0.hook_resid_mid")
    with pytest.raises(ConfigError, match="multiple of the 2 layers"):
        saelab.create_sae("clt", 2 * D + 1, 2 * M, layers=[0, 1])
    with pytest.raises(ConfigError, match="distinct and increasing"):
        saelab.create_sae("clt", 2 * D, 2 * M, layers=[1, 0])
    with pytest.raises(ConfigError, match="no cross-layer decoders"):
        saelab.create_sae("transcoder_set", 2 * D, 2 * M, layers=[0, 1], k=4, cross_layer=True)


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_a_clt_without_cross_layer_decoders_is_a_transcoder_set(activation):
    clt, tset = make("clt", activation, skip=True), make("transcoder_set", activation, skip=True)
    assert [tuple(W.shape) for W in tset.decoders()] == [(M, 1, D)] * L
    with torch.no_grad():
        for name, p in tset.named_parameters():
            if name.startswith("W_dec_"):
                W = getattr(clt, name)
                W.zero_()
                W[:, :1] = p  # the same-layer decoder; the later layers' decoders stay zero
            else:
                getattr(clt, name).copy_(p)
        if activation == "jumprelu":
            clt.threshold.copy_(tset.threshold)
    x, target = torch.randn(32, L * D), torch.randn(32, L * D)
    torch.testing.assert_close(clt.eval()(x), tset.eval()(x))
    clt.train(), tset.train()
    losses = []
    for sae in (clt, tset):
        out = sae.training_forward(x)
        terms = [sae.reconstruction_loss(out, target), sae.auxiliary_loss(out, target, torch.ones(L * M, dtype=bool))]
        losses.append(torch.stack([t for t in terms if t is not None]).sum())
    torch.testing.assert_close(losses[0], losses[1])


def test_sparse_topk_step_equals_the_dense_computation_in_value_and_gradient():
    sae = make(skip=True, dtype="float64").train()
    x, target = torch.randn(16, L * D, dtype=torch.float64), torch.randn(16, L * D, dtype=torch.float64)
    out = sae.training_forward(x)
    loss = sae.reconstruction_loss(out, target)
    sparse_grads = torch.autograd.grad(loss, list(sae.parameters()))
    dense_output = sae.output(sae.activate(sae.pre_activation(x)), x)  # the plain per-layer computation
    torch.testing.assert_close(out.output, dense_output)
    dense_grads = torch.autograd.grad((dense_output - target).pow(2).sum(-1).mean(), list(sae.parameters()))
    for (name, _), a, b in zip(sae.named_parameters(), sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_jumprelu_penalty_is_tanh_of_activation_times_decoder_norm():
    sae = make(activation="jumprelu", sparsity_coefficient=0.5, tanh_scale=3.0, dtype="float64").train()
    x = torch.randn(10, L * D, dtype=torch.float64)
    out = sae.training_forward(x)
    expected = 0.0
    for i in range(L):  # written out: per latent, the norm of its decoders to every layer it writes
        latents = out.latents[:, i * M : (i + 1) * M]
        norms = torch.cat([sae.decoder(i, j) for j in range(i, L)], dim=1).norm(dim=1)
        expected = expected + torch.tanh(3.0 * latents * norms).sum(-1)
    torch.testing.assert_close(sae.sparsity_loss(out), expected.mean())
    assert sae.sparsity_coefficient() == 0.5
    # the pre-activation loss pulls latents below their thresholds up, weighted by decoder norm
    assert sae.auxiliary_loss(out, x, None) > 0
    grads = torch.autograd.grad(sae.sparsity_loss(out), sae.log_threshold)[0]
    assert grads.abs().sum() > 0  # the thresholds learn through the straight-through estimator


def test_per_layer_scales_fold_exactly_and_survive_saving(tmp_path):
    """Each layer's activations are scaled by their own factor in training; folding them makes the saved CLT
    give on raw activations what the trained one gave on scaled ones."""
    from saelab.training.scaling import ActivationScaler

    sae = make(activation="jumprelu", skip=True, normalize_activations="expected_average_only_in").eval()
    widths = torch.tensor([1.0, 10.0, 100.0]).repeat_interleave(D)  # norms that differ by layer, as with depth
    x, y = torch.randn(64, L * D) * widths, torch.randn(64, L * D) * widths.flip(0)
    scaler = ActivationScaler()
    scaler.estimate(sae, x, y)
    assert len(scaler.in_scale) == L and scaler.in_scale[0] > 50 * scaler.in_scale[2]
    expected = scaler.unscale_output(sae(scaler.scale_input(x)))
    latents = sae.encode(scaler.scale_input(x))
    folded = sae.clone()
    scaler.fold_into(folded)
    assert folded.cfg.normalize_activations == "none"
    torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.encode(x), latents, rtol=1e-4, atol=1e-5)
    folded.save(tmp_path / "clt")
    loaded = saelab.load_sae(tmp_path / "clt").eval()
    assert type(loaded).__name__ == "CrossLayerTranscoder" and loaded.cfg.layers == [2, 3, 5]
    torch.testing.assert_close(loaded(x), folded(x))


def _cross_layer_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs: one sparse code per layer (6 features, fewer than the width, so each layer's input determines its
    code). Targets: layer j's output sums the decoded codes of every layer <= j, each through its own dictionary,
    so layer 0's features reach layers 1 and 2 only through cross-layer decoders (layer 1's input lacks them)."""
    g = torch.Generator().manual_seed(seed)
    n_features = 6
    enc = torch.randn(L, n_features, D, generator=torch.Generator().manual_seed(99))
    dec = torch.randn(L, L, n_features, D, generator=torch.Generator().manual_seed(98))
    codes = torch.rand(n, L, n_features, generator=g) * (torch.rand(n, L, n_features, generator=g) < 2 / n_features)
    x = torch.einsum("nlm,lmd->nld", codes, enc)
    y = torch.stack([sum(codes[:, i] @ dec[i, j] for i in range(j + 1)) for j in range(L)], dim=1)
    return x.reshape(n, -1), y.reshape(n, -1)


def test_a_clt_learns_cross_layer_structure_that_a_transcoder_set_cannot():
    x, y = _cross_layer_data(8192, seed=0)
    config = TrainConfig(total_tokens=256 * 800, batch_size=256, lr=3e-3, progress_bar=False)
    results = {}
    for architecture in ("clt", "transcoder_set"):
        torch.manual_seed(0)
        sae = saelab.create_sae(
            architecture,
            L * D,
            L * 2 * M,
            layers=[0, 1, 2],
            k=4,
            normalize_activations="expected_average_only_in",
            **HOOKS,
        )
        trained = Trainer(sae, config).fit(TensorSource((x, y), 256))["sae"]
        x_test, y_test = _cross_layer_data(2048, seed=1)
        with torch.no_grad():
            results[architecture] = explained_variance(y_test, trained(x_test))
    assert results["clt"] >= 0.9, results
    assert results["transcoder_set"] <= results["clt"] - 0.15, results


def test_a_run_trains_a_clt_from_a_models_hooks_and_saves_it_whole(tmp_path):
    """`saelab train` with a '{layer}' template: one harvest feeds every layer, the saved CLT reloads with its
    layers and computes what the run's final SAE computed; its layers' widths come from the model."""
    from tiny import save_tiny_model, sentences, write_jsonl

    from saelab.cli import main

    model = save_tiny_model(tmp_path / "model", n_layers=3)
    data = write_jsonl(tmp_path / "text.jsonl", sentences(200))
    flags = {
        "--model.name": str(model),
        "--data.dataset": str(data),
        "--data.context_size": "16",
        "--data.heldout_contexts": "4",
        "--data.shuffle_buffer": "1024",
        "--train.total_tokens": "4096",
        "--train.batch_size": "256",
        "--train.eval_every": "0",
        "--train.progress_bar": "false",
        "--sae.architecture": "clt",
        "--sae.layers": "[0, 2]",
        "--sae.k": "4",
        "--sae.expansion_factor": "2",
        "--sae.hook_name": "blocks.{layer}.hook_resid_mid",
        "--sae.hook_name_out": "blocks.{layer}.hook_mlp_out",
        "--out_dir": str(tmp_path / "run"),
    }
    assert main(["train", *[part for item in flags.items() for part in item]]) == 0
    clt = saelab.load_sae(tmp_path / "run" / "sae")
    assert clt.cfg.layers == [0, 2] and clt.cfg.d_in == 2 * 32 and clt.cfg.d_sae == 2 * 64
    assert clt.cfg.input_hooks() == ["blocks.0.hook_resid_mid", "blocks.2.hook_resid_mid"]
    assert clt.cfg.normalize_activations == "none"  # the per-layer scales were folded in
    from saelab.models.loading import load_model

    hooked = load_model(str(model))
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9]])
    acts = hooked.run_with_cache(tokens, clt.cfg.input_hooks() + clt.cfg.output_hooks())
    x = torch.cat([acts[h][0] for h in clt.cfg.input_hooks()], dim=-1)
    y = torch.cat([acts[h][0] for h in clt.cfg.output_hooks()], dim=-1)
    with torch.no_grad():
        out = clt(x)
    # in raw units, layer by layer (unfolded, each layer's output would be ~sqrt(width) / its norm too large)
    for j in range(2):
        ratio = out[:, 32 * j : 32 * (j + 1)].norm() / y[:, 32 * j : 32 * (j + 1)].norm()
        assert 0.1 < float(ratio) < 10, ratio


def test_crosscoder_loss_is_the_per_layer_sum_written_out():
    torch.manual_seed(0)
    cc = saelab.create_sae("crosscoder", L * D, 24, layers=[1, 2, 4], hook_name="blocks.{layer}.hook_resid_post")
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.W_dec.mul_(torch.rand(24, 1) + 0.5)
    x = torch.randn(12, L * D)
    out = cc.training_forward(x)
    blocks = range(L)
    per_layer_error = sum(
        (x[:, slice(layer * D, (layer + 1) * D)] - out.output[:, layer * D : (layer + 1) * D]).pow(2).sum(-1)
        for layer in blocks
    )
    torch.testing.assert_close(cc.reconstruction_loss(out, x), per_layer_error.mean())
    norms = [
        cc.W_dec[:, layer * D : (layer + 1) * D].norm(dim=1) for layer in blocks
    ]  # each latent's decoder into layer layer
    penalty = (out.latents * sum(norms)).sum(-1).mean()
    torch.testing.assert_close(cc.sparsity_loss(out), penalty)
    assert cc.cfg.input_hooks() == cc.cfg.output_hooks() == [f"blocks.{layer}.hook_resid_post" for layer in (1, 2, 4)]
    from saelab.splice import splice_points

    with pytest.raises(ConfigError, match="cannot be spliced"):
        splice_points(cc)


def test_auxk_per_layer_is_the_dead_latents_top_k_aux_reconstruction_of_the_residual():
    sae = make(dtype="float64", k_aux=3).train()
    x, y = torch.randn(7, L * D, dtype=torch.float64), torch.randn(7, L * D, dtype=torch.float64)
    dead = torch.rand(L * M, generator=torch.Generator().manual_seed(1)) < 0.5
    out = sae.training_forward(x)
    pre, residual = out.hidden_pre.reshape(-1, L * M), (y - out.output).detach()
    predicted = torch.zeros_like(residual)
    for i in range(L):  # written out: each layer's top-3 dead latents decode into every layer they reach
        ids = dead[i * M : (i + 1) * M].nonzero().squeeze(1)
        top = pre[:, i * M + ids].topk(3, dim=-1)
        for j in range(i, L):
            rows = sae.decoder(i, j)[ids][top.indices]  # (tokens, 3, D)
            predicted[:, j * D : (j + 1) * D] += torch.einsum("tk,tkd->td", torch.relu(top.values), rows)
    expected = min(1.0, int(dead.sum()) / (3 * L)) * (predicted - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(sae.auxiliary_loss(out, y, dead), expected)
