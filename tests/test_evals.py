"""Evaluation metrics against hand-computed values, and spliced evaluation on a tiny local model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import save_tiny_model, sentences, write_jsonl

import saelab
from saelab.data.config import DataConfig
from saelab.evals import metrics as M
from saelab.evals.evaluate import evaluate, write_report
from saelab.evals.heldout import heldout_contexts
from saelab.evals.spliced import SplicedEvaluation
from saelab.models import load_model

HOOK = "blocks.1.hook_resid_post"


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    assert M.mse(x, x_hat) == pytest.approx((0 + 1 + 0 + 4) / 4)
    # deviations from the mean (2, 2): (-1,-2), (1,2) -> total 10; squared error 5
    assert M.explained_variance(x, x_hat) == pytest.approx(1 - 5 / 10)
    cos = (1 / math.sqrt(2) + (9 + 8) / (5 * math.sqrt(13))) / 2
    assert M.cosine_similarity(x, x_hat) == pytest.approx(cos)
    assert M.l2_norm_ratio(x, x_hat) == pytest.approx((math.sqrt(2) / 1 + math.sqrt(13) / 5) / 2)
    assert M.relative_reconstruction_bias(x, x_hat) == pytest.approx(((2 + 13) / 2) / ((1 + 17) / 2))
    assert M.relative_reconstruction_bias(x, 0.5 * x) == pytest.approx(0.5)


def test_sparsity_density_and_kl_by_hand():
    z = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 3.0]])
    assert M.l0(z) == 1.5 and M.l1(z) == 3.0
    counts = torch.tensor([0.0, 5.0, 60.0])
    assert M.density_counts(counts, 100) == {"dead_latents": 1, "dense_latents": 1}
    p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()
    assert float(M.kl_divergence(p, q)) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert float(M.kl_divergence(p, p)) == pytest.approx(0.0)
    assert M.recovered_fraction(10.0, 10.0, 2.0) == 0.0 and M.recovered_fraction(10.0, 2.0, 2.0) == 1.0
    geometry = M.decoder_geometry(torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]]))
    assert torch.allclose(geometry["decoder_norms"], torch.tensor([2.0, math.sqrt(2), 3.0]))
    assert torch.allclose(geometry["max_decoder_cosine"], torch.tensor([1 / math.sqrt(2)] * 2 + [0.0]), atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = load_model(str(save_tiny_model(folder / "model")))
    data = DataConfig(dataset=str(write_jsonl(folder / "text.jsonl", sentences(300))), context_size=16)
    return model, data


def identity_sae(d: int) -> saelab.SAE:
    """relu(x) - relu(-x) = x exactly: a standard SAE that reconstructs perfectly."""
    sae = saelab.create_sae("standard", d_in=d, d_sae=2 * d, hook_name=HOOK)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def run(model, data, sae, error_term=True):
    evaluation = SplicedEvaluation(model, sae, [model.tokenizer.bos_token_id], error_term=error_term)
    for tokens in heldout_contexts(model, data, 8, 4):
        evaluation.add(tokens)
    return evaluation.result()


def test_identity_sae_recovers_everything_and_a_zero_sae_nothing(tiny):
    model, data = tiny
    perfect = run(model, data, identity_sae(32))
    assert perfect["ce_loss_score"] == pytest.approx(1.0)
    assert perfect["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["kl_div_score"] == pytest.approx(1.0)
    zero = identity_sae(32)
    with torch.no_grad():
        zero.W_dec.zero_()
    nothing = run(model, data, zero)
    assert nothing["ce_loss_score"] == pytest.approx(0.0, abs=1e-9)
    assert nothing["kl_div_score"] == pytest.approx(0.0, abs=1e-9)
    assert nothing["kl_div_with_ablation"] > 1e-3  # ablation does change this (random, flat) model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_with_the_error_term_any_sae_gives_the_clean_logits(tiny, dtype):
    """Also exact with the model in bfloat16 and the SAE in float32."""
    model, data = tiny
    model.model.to(getattr(torch, dtype))
    sae = saelab.create_sae("topk", d_in=32, d_sae=64, k=3, hook_name=HOOK)  # random: a poor SAE
    try:
        result = run(model, data, sae)
    finally:
        model.model.to(torch.float32)
    assert result["kl_div_with_sae"] > 1e-3
    assert result["kl_div_with_sae_and_error"] == pytest.approx(0.0, abs=1e-9)
    assert result["ce_loss_with_sae_and_error"] == pytest.approx(result["ce_loss_without_sae"], abs=1e-6)


def test_spliced_losses_equal_cross_entropy_and_kl_written_out(tiny):
    """The evaluation shares one log-softmax per run between its CE and KL: the same numbers as computing each
    from the logits."""
    import torch.nn.functional as F

    from saelab.splice import spliced

    model, data = tiny
    sae = saelab.create_sae("topk", d_in=32, d_sae=64, k=3, hook_name=HOOK)
    bos = model.tokenizer.bos_token_id
    result = run(model, data, sae, error_term=False)
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "kl_sae": 0.0, "counted": 0, "kept": 0}
    with torch.no_grad():
        for tokens in heldout_contexts(model, data, 8, 4):
            keep = tokens != bos
            clean = model.logits(tokens)
            with spliced(model, [sae], positions=keep):
                with_sae = model.logits(tokens)
            counted = keep[:, :-1]
            for name, logits in (("ce_clean", clean), ("ce_sae", with_sae)):
                losses = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten(), reduction="none"
                )
                sums[name] += float(losses[counted.flatten()].sum())
            sums["kl_sae"] += float(M.kl_divergence(clean, with_sae)[keep].sum())
            sums["counted"] += int(counted.sum())
            sums["kept"] += int(keep.sum())
    assert result["ce_loss_without_sae"] == pytest.approx(sums["ce_clean"] / sums["counted"], rel=1e-12)
    assert result["ce_loss_with_sae"] == pytest.approx(sums["ce_sae"] / sums["counted"], rel=1e-12)
    assert result["kl_div_with_sae"] == pytest.approx(sums["kl_sae"] / sums["kept"], rel=1e-9)
    assert result["kl_div_with_sae"] > 1e-3


def test_evaluate_writes_eval_json_and_plots(tiny, tmp_path):
    model, data = tiny
    sae = saelab.create_sae("topk", d_in=32, d_sae=64, k=3, hook_name=HOOK)
    result = evaluate(sae, model=model, data=data, n_contexts=8, batch_contexts=4)
    assert result["sparsity"]["l0"] == pytest.approx(3.0)
    tokens = torch.cat(heldout_contexts(model, data, 8, 4))
    assert result["tokens"] == int((tokens != model.tokenizer.bos_token_id).sum()) < 8 * 16  # BOS excluded
    assert set(result["downstream"]) >= {"ce_loss_score", "kl_div_score", "ce_loss_with_ablation"}
    perfect = evaluate(identity_sae(32), model=model, data=data, n_contexts=8, batch_contexts=4, spliced=False)
    assert perfect["reconstruction"]["explained_variance"] == pytest.approx(1.0)
    assert perfect["reconstruction"]["relative_reconstruction_bias"] == pytest.approx(1.0)
    files = write_report(result, tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["tokens"] == result["tokens"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files if f.suffix == ".png") and len(files) == 3
