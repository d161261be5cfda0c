"""Fast paths of the training step against the plain computation they replace, in float64: the same values and
the same gradient for every parameter (the shared gated encoder, the standard SAE's fused ReLU + L1, the sparse
TopK kernels, the centred encoder, the decoder-gradient projection, the batch top-k selection)."""

from __future__ import annotations

import copy

import pytest
import torch

import saelab


@pytest.mark.parametrize("centre", [True, False])
def test_gated_step_gradients_equal_the_papers_formulas_written_out(centre):
    """One shared encoder matmul for the gate and the magnitude path (and the cheap b_dec gradient) gives the
    gradients of the two matmuls of the paper's formulas, for every parameter, in float64."""
    sae = saelab.create_sae("gated", 8, 16, dtype="float64", apply_b_dec_to_input=centre).train()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(30, 8, dtype=torch.float64)
    out = sae.training_forward(x)
    loss = sae.reconstruction_loss(out, x) + 3.0 * sae.sparsity_loss(out) + sae.auxiliary_loss(out, x, None)
    ours = torch.autograd.grad(loss, list(sae.parameters()))

    W_enc, W_dec, b_dec = sae.W_enc, sae.W_dec, sae.b_dec
    centred = x - b_dec if centre else x
    gate = centred @ W_enc + sae.b_gate
    magnitude = torch.relu(centred @ (W_enc * sae.r_mag.exp()) + sae.b_mag)
    latents = (gate > 0).to(x) * magnitude
    reconstruction = (latents @ W_dec + b_dec - x).pow(2).sum(-1).mean()
    l1 = (torch.relu(gate) * W_dec.norm(dim=1)).sum(-1).mean()
    aux = (torch.relu(gate) @ W_dec.detach() + b_dec.detach() - x).pow(2).sum(-1).mean()
    plain = torch.autograd.grad(reconstruction + 3.0 * l1 + aux, list(sae.parameters()))
    assert torch.allclose(loss, reconstruction + 3.0 * l1 + aux)
    for (name, _), a, b in zip(sae.named_parameters(), ours, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-12), name
    assert torch.equal(sae.encode(x), sae.eval().encode(x)) and torch.allclose(out.latents, latents)


@pytest.mark.parametrize("architecture", ["topk", "clt"])
def test_decoder_gradient_loses_its_component_along_each_row(architecture):
    """What keeps unit-norm decoder rows on the sphere: each row's gradient minus its projection on the row."""
    options = {"layers": [0, 1], "k": 3} if architecture == "clt" else {"k": 3}
    sae = saelab.create_sae(architecture, d_in=12, d_sae=32, dtype="float64", **options)
    decoders = [sae.W_dec] if architecture == "topk" else sae.decoders()
    for W in decoders:
        with torch.no_grad():
            W.mul_(1 + torch.rand(W.shape[0], *[1] * (W.dim() - 1), dtype=W.dtype))  # rows of different norms
        W.grad = torch.randn_like(W)
    before = [W.grad.clone().flatten(1) for W in decoders]
    sae.remove_parallel_decoder_grad()
    for W, g in zip(decoders, before, strict=True):
        rows = W.detach().flatten(1)
        unit = rows / rows.norm(dim=1, keepdim=True)
        expected = g - (g * unit).sum(1, keepdim=True) * unit
        assert torch.allclose(W.grad.flatten(1), expected, atol=1e-12)
        assert (W.grad.flatten(1) * rows).sum(1).abs().max() < 1e-10


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("centre", [True, False])
def test_sparse_topk_training_matches_the_dense_computation(with_dead, centre, architecture):
    """The sparse kernels give the dense forward's outputs and gradients (AuxK's dense route included)."""
    torch.manual_seed(0)
    options = {"matryoshka_widths": [10, 40]} if architecture == "matryoshka" else {}
    sparse = saelab.create_sae(
        architecture, d_in=24, d_sae=96, k=5, dtype="float64", apply_b_dec_to_input=centre, **options
    )
    with torch.no_grad():
        sparse.b_dec.normal_()
        sparse.b_enc.normal_()
    dense = copy.deepcopy(sparse)
    dense.sparse_training = False
    x = torch.randn(40, 24, dtype=torch.float64)
    dead = torch.rand(96) < 0.5 if with_dead else torch.zeros(96, dtype=torch.bool)
    outputs = []
    for sae in (sparse, dense):
        out = sae.training_forward(x)
        loss = sae.reconstruction_loss(out, x)
        aux = sae.auxiliary_loss(out, x, dead)
        assert (aux is not None) == with_dead
        (loss if aux is None else loss + aux).backward()
        outputs.append(out)
    assert outputs[0].sparse is not None and outputs[1].sparse is None
    assert torch.allclose(outputs[0].output, outputs[1].output)
    assert torch.allclose(outputs[0].latents, outputs[1].latents)
    assert torch.equal(outputs[0].firing_counts(), outputs[1].firing_counts())
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-12), name


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_centred_linear_gives_autograds_gradients(shift, input_grad):
    """The encoder matmul with the cheap b_dec gradient equals the plain formula's values and gradients."""
    from saelab.saes.centred_linear import centred_linear

    torch.manual_seed(0)
    x = torch.randn(3, 10, 6, dtype=torch.float64, requires_grad=input_grad)
    b_dec = torch.randn(6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 10, 9, dtype=torch.float64)
    grads = []
    for fn in (
        lambda: centred_linear(x, b_dec if shift else None, W, b),
        lambda: ((x - b_dec) if shift else x) @ W + b,
    ):
        out = fn()
        inputs = [t for t in (x, b_dec, W, b) if t.requires_grad and (shift or t is not b_dec)]
        grads.append((out, torch.autograd.grad(out, inputs, upstream)))
    assert torch.allclose(grads[0][0], grads[1][0])
    for ours, plain in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(ours, plain, atol=1e-12)


def test_l1_as_a_matrix_vector_product_matches_the_norm():
    from saelab.saes.standard import decoder_weighted_lp

    torch.manual_seed(0)
    latents, W_dec = torch.relu(torch.randn(20, 30, dtype=torch.float64)), torch.randn(30, 8, dtype=torch.float64)
    expected = (latents * W_dec.norm(dim=1)).norm(p=1, dim=-1).mean()
    assert torch.allclose(decoder_weighted_lp(latents, W_dec, 1.0), expected)
    assert torch.allclose(decoder_weighted_lp(latents, W_dec, 2.0), (latents * W_dec.norm(dim=1)).norm(dim=-1).mean())


def test_batch_topk_selection_equals_a_full_topk_even_when_one_row_dominates():
    from saelab.saes.fused_topk import batch_topk_flat_indices

    torch.manual_seed(0)
    dominant = (torch.arange(512) == 7).unsqueeze(1) * 50.0
    shifted_columns = torch.arange(1000.0) % 8 == 0  # a strided sample that hit only these would mislead
    for pre in (
        torch.randn(512, 1000),
        torch.randn(512, 1000) + dominant,
        torch.randn(512, 1000) + 3 * shifted_columns,
        torch.randn(64, 300),
    ):
        for k in (8, 32):
            expected = pre.reshape(-1).topk(pre.shape[0] * k).indices.sort().values
            assert torch.equal(batch_topk_flat_indices(pre, k), expected)


@pytest.mark.parametrize("centre", [True, False])
def test_standard_step_gradients_equal_relu_and_weighted_l1_written_out(centre):
    """The fused ReLU + decoder-weighted L1 node gives the values and every parameter's gradient of the plain
    formulas, and the same firing counts."""
    torch.manual_seed(0)
    sae = saelab.create_sae("standard", 8, 16, dtype="float64", apply_b_dec_to_input=centre).train()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 10, 8, dtype=torch.float64)  # a leading dimension besides the tokens
    out = sae.training_forward(x)
    loss = sae.reconstruction_loss(out, x) + 5.0 * sae.sparsity_loss(out)
    ours = torch.autograd.grad(loss, list(sae.parameters()))

    pre = ((x - sae.b_dec) if centre else x) @ sae.W_enc + sae.b_enc
    latents = torch.relu(pre)
    reconstruction = (latents @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    l1 = (latents.abs() * sae.W_dec.norm(dim=1)).sum(-1).mean()
    plain = torch.autograd.grad(reconstruction + 5.0 * l1, list(sae.parameters()))
    assert torch.allclose(out.latents, latents) and torch.allclose(loss, reconstruction + 5.0 * l1)
    assert 0 < int((latents > 0).sum()) < latents.numel()  # the ReLU's mask matters
    for (name, _), a, b in zip(sae.named_parameters(), ours, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-12), name
    assert torch.equal(out.firing_counts(), (latents != 0).reshape(-1, 16).sum(0).to(out.firing_counts()))


@pytest.mark.parametrize("used", ["latents", "penalty", "both"])
def test_relu_weighted_l1_gradients_when_one_output_is_unused(used):
    from saelab.saes.standard import relu_weighted_l1

    torch.manual_seed(0)
    pre = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(12, 7, dtype=torch.float64)
    grads = []
    for latents, sums in (relu_weighted_l1(pre, W_dec), _plain_relu_l1(pre, W_dec)):
        terms = {"latents": [(latents * upstream).sum()], "penalty": [2.0 * sums.mean()]}
        loss = sum(terms["latents"] + terms["penalty"]) if used == "both" else terms[used][0]
        grads.append(torch.autograd.grad(loss, [pre, W_dec], allow_unused=True))
    for ours, plain in zip(*grads, strict=True):
        if used == "latents" and ours is None:  # W_dec reaches only the penalty
            assert (pre.new_zeros(()) if plain is None else plain).abs().max() == 0
            continue
        assert torch.allclose(ours, plain, atol=1e-12)


def _plain_relu_l1(pre: torch.Tensor, W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    latents = torch.relu(pre)
    return latents, (latents * W_dec.norm(dim=1)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_firing_counts_count_every_nonzero_latent_exactly(dtype):
    from saelab.saes.outputs import TrainOutput

    torch.manual_seed(0)
    latents = (torch.randn(3000, 40) * (torch.rand(3000, 40) < 0.3)).to(dtype)  # negative ones count too
    latents[:, 5] = 0
    out = TrainOutput(latents, latents, latents[:, :8], latents=latents)
    counts = out.firing_counts()
    assert counts.dtype == torch.float32 and counts[5] == 0
    assert torch.equal(counts, (latents != 0).sum(0).float())  # 3,000 ones: beyond bfloat16's exact integers
