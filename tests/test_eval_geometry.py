"""The geometry eval: a small SAE whose every number is worked out by hand, the chunked pairwise cosines against the
full matrix, every architecture (and transcoders) against a direct computation, agreement with `evaluate()`."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
import torch
from tiny import save_tiny_model, sentences, write_jsonl

import saelab
from saelab.core.config import from_dict
from saelab.core.errors import ConfigError
from saelab.data.config import DataConfig
from saelab.evals import metrics as M
from saelab.evals.evaluate import evaluate
from saelab.evals.geometry import GeometryConfig, plot_geometry, run_geometry
from saelab.evals.results import read_result, write_result
from saelab.models import load_model
from saelab.saes.registry import architecture_class

HOOK = "blocks.1.hook_resid_post"
R = 1 / math.sqrt(2)


def hand_sae(scale: float = 1.0) -> saelab.SAE:
    """d_in 2, three latents. Decoder rows d0 = (1, 0), d1 = (0.6, 0.8), d2 = (0, -1): cosines d0.d1 = 0.6,
    d0.d2 = 0, d1.d2 = -0.8. Encoder columns e0 = (1, 0), e1 = (0, 0.5), e2 = (-1, -1): encoder-decoder cosines 1,
    0.8, 1/sqrt(2); e2 never fires on inputs with non-negative coordinates. With `scale`, latent 1 is `scale` times
    smaller and d1 `scale` times longer: the same outputs, and the same SAE once the decoder norms are folded."""
    sae = saelab.create_sae("standard", d_in=2, d_sae=3)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6 * scale, 0.8 * scale], [0.0, -1.0]]))
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5 / scale, -1.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# Two sequences of two tokens: a = (2, 0) -> latent 0 at 2 -> x_hat (2, 0), ratio 1;
# b = (0, 1) -> latent 1 at 0.5 -> x_hat (0.3, 0.4), norm 0.5, ratio 0.5.
A, B = [2.0, 0.0], [0.0, 1.0]
SEQUENCES = torch.tensor([[A, A], [A, B]])


def close(a, b, tolerance: float = 1e-6) -> bool:
    """Nested dicts and lists equal, numbers to `tolerance` (NaN equal to NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list):
        return (
            isinstance(b, list) and len(a) == len(b) and all(close(x, y, tolerance) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) and isinstance(b, (int, float)):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    return a == b


@pytest.mark.parametrize("decoder_scale", [1.0, 2.0])
def test_geometry_of_a_small_sae_worked_out_by_hand(decoder_scale):
    """With d1 twice as long and e1 half as long, folding gives the first SAE back: only decoder_norm differs."""
    config = GeometryConfig(batch_tokens=2, top_pairs=2)  # one sequence per batch
    result = run_geometry(hand_sae(decoder_scale), activations=SEQUENCES, config=config, progress=False)
    metrics = result["eval_result_metrics"]
    assert metrics["shrinkage"] == pytest.approx(
        {
            "l2_norm_in": (2 * 3 + 1) / 4,
            "l2_norm_out": (2 * 3 + 0.5) / 4,
            "l2_ratio": (1 * 3 + 0.5) / 4,
            "relative_reconstruction_bias": (4 * 3 + 0.25) / (4 * 3 + 0.4),  # x . x_hat for b: 0.4
        }
    )
    # latent 0 fires on 3 of 4 tokens, latent 1 on 1, latent 2 never
    assert metrics["misc_metrics"] == pytest.approx(
        {
            "frac_alive": 2 / 3,
            "freq_over_1_percent": 2 / 3,
            "freq_over_10_percent": 2 / 3,
            "normalized_freq_over_1_percent": 1.0,
            "normalized_freq_over_10_percent": 1.0,
            "average_max_encoder_cosine_sim": (0 + 0 - R) / 3,  # e0.e1 = 0; e2 against either: -1/sqrt(2)
            "average_max_decoder_cosine_sim": (0.6 + 0.6 + 0) / 3,
        }
    )
    assert metrics["density"] == {"tokens": 4, "dead_latents": 1, "dense_latents": 2}
    assert metrics["weights"]["largest_decoder_cosine_sim"] == pytest.approx(0.6)
    assert metrics["weights"]["average_encoder_decoder_cosine_sim"] == pytest.approx((1 + 0.8 + R) / 3)
    assert metrics["weights"]["decoder_norm_mean"] == pytest.approx((2 + decoder_scale) / 3)
    pairs = result["eval_result_unstructured"]["top_decoder_pairs"]
    assert [(p["latent_a"], p["latent_b"]) for p in pairs] == [(0, 1), (0, 2)]
    assert [p["cosine_sim"] for p in pairs] == pytest.approx([0.6, 0.0], abs=1e-7)
    details = result["eval_result_details"]
    expected = {
        "feature_density": [0.75, 0.25, 0.0],
        "encoder_decoder_cosine_sim": [1.0, 0.8, R],
        "max_decoder_cosine_sim": [0.6, 0.6, 0.0],
        "max_decoder_cosine_partner": [1, 0, 0],
        "max_encoder_cosine_sim": [0.0, 0.0, -R],
        "encoder_norm": [1.0, 0.5, math.sqrt(2)],
        "decoder_norm": [1.0, decoder_scale, 1.0],
        "encoder_bias": [0.0, 0.0, 0.0],
    }
    for name, values in expected.items():
        assert [d[name] for d in details] == pytest.approx(values, abs=1e-6), name
    # firing tokens per sequence it fires in: latent 0 fires 3 times in 2 sequences, latent 1 once in 1
    heuristic = [d["consistent_activation_heuristic"] for d in details]
    assert heuristic[:2] == pytest.approx([1.5, 1.0]) and math.isnan(heuristic[2])
    assert result["eval_result_unstructured"]["decoder_folded"] is True
    # the same tokens as rows: everything but the per-sequence heuristic is the same
    rows = run_geometry(hand_sae(decoder_scale), activations=SEQUENCES.reshape(4, 2), progress=False)
    assert close(rows["eval_result_metrics"], metrics)
    assert all(math.isnan(d["consistent_activation_heuristic"]) for d in rows["eval_result_details"])


def test_chunked_pairwise_cosines_equal_the_full_matrix():
    torch.manual_seed(0)
    vectors = torch.randn(37, 8)
    vectors[5] = 0.0  # a zero row: cosine 0 with everything
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    full = unit @ unit.T
    full.fill_diagonal_(-math.inf)
    i, j = torch.triu_indices(37, 37, offset=1)
    order = full[i, j].argsort(descending=True)[:10]
    for chunk in (1, 5, 36, 37, None):
        got = M.pairwise_cosines(vectors, chunk=chunk, top_pairs=10)
        assert torch.allclose(got["max_cosine"], full.max(dim=1).values, atol=1e-6), chunk
        assert torch.equal(got["partner"], full.argmax(dim=1)), chunk
        assert torch.equal(got["pairs"], torch.stack([i[order], j[order]], dim=1)), chunk
        assert torch.allclose(got["pair_cosines"], full[i[order], j[order]], atol=1e-6), chunk
    # more pairs asked for than there are: all 3 pairs of 3 rows, each once, the most similar first
    three = M.pairwise_cosines(vectors[:3], chunk=2, top_pairs=50)
    assert three["pairs"].tolist() == sorted([[0, 1], [0, 2], [1, 2]], key=lambda p: -float(full[p[0], p[1]]))


def test_chunked_run_equals_unchunked_run():
    torch.manual_seed(1)
    sae = saelab.create_sae("standard", d_in=8, d_sae=40)
    x = torch.randn(64, 8)
    results = [
        run_geometry(sae, activations=x, config=GeometryConfig(chunk_size=chunk), progress=False) for chunk in (3, None)
    ]
    for key in ("eval_result_metrics", "eval_result_details", "eval_result_unstructured"):
        assert close(results[0][key], results[1][key]), key
    assert len(results[0]["eval_result_unstructured"]["top_decoder_pairs"]) == 20


def random_sae(architecture: str, transcoder: bool = False) -> saelab.SAE:
    """An SAE of `architecture` with every parameter random (so that decoder norms differ and biases matter)."""
    names = {f.name for f in fields(architecture_class(architecture).config_class)}
    options = {"k": 3} if "k" in names else {}
    if transcoder:
        options.update(d_out=6, skip_connection=True)
    torch.manual_seed(2)
    sae = saelab.create_sae(architecture, d_in=8, d_sae=24, **options)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.1 if name in ("b_enc", "b_gate", "b_mag") else 0.5))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(24) * 0.3)
        if architecture in ("batchtopk", "matryoshka"):
            sae.topk_threshold.fill_(0.2)
    return sae.eval()


CASES = [(a, False) for a in saelab.available_architectures(layered=False)] + [("standard", True), ("jumprelu", True)]


@pytest.mark.parametrize("architecture,transcoder", CASES)
def test_every_architecture_against_a_direct_computation(architecture, transcoder):
    sae = random_sae(architecture, transcoder)
    torch.manual_seed(3)
    x = torch.randn(300, 8)
    y = torch.randn(300, 6) if transcoder else x
    result = run_geometry(sae, activations=x, targets=y if transcoder else None, progress=False)
    with torch.no_grad():  # the unfolded SAE: folding must not change what it computes
        latents, output = sae.encode(x), sae(x)
    fired = (latents != 0).float().mean(0)
    metrics, details = result["eval_result_metrics"], result["eval_result_details"]
    assert [d["feature_density"] for d in details] == pytest.approx(fired.tolist())
    assert metrics["misc_metrics"]["frac_alive"] == pytest.approx(float((fired > 0).float().mean()))
    out_norm, in_norm = output.norm(dim=-1), y.norm(dim=-1)
    assert metrics["shrinkage"]["l2_ratio"] == pytest.approx(float((out_norm / in_norm).mean()), rel=1e-5)
    bias = float(out_norm.pow(2).mean() / (output * y).sum(-1).mean())
    assert metrics["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(bias, rel=1e-5)
    W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
    dec = torch.nn.functional.normalize(W_dec, dim=-1)
    cos = dec @ dec.T
    cos.fill_diagonal_(-2)
    assert [d["max_decoder_cosine_sim"] for d in details] == pytest.approx(cos.max(1).values.tolist(), abs=1e-6)
    enc = torch.nn.functional.normalize(W_enc.T, dim=-1)
    enc_cos = enc @ enc.T
    enc_cos.fill_diagonal_(-2)
    assert [d["max_encoder_cosine_sim"] for d in details] == pytest.approx(enc_cos.max(1).values.tolist(), abs=1e-6)
    enc_dec = [d["encoder_decoder_cosine_sim"] for d in details]
    if transcoder:  # input and output spaces differ: undefined
        assert all(math.isnan(v) for v in enc_dec)
    else:
        assert enc_dec == pytest.approx((enc * dec).sum(-1).tolist(), abs=1e-6)
    # SAEBench's encoder norm is measured after folding, where it is exact: per latent, or TopK's uniform scale only
    folds = architecture_class(architecture).per_latent_scaling
    scale = W_dec.norm(dim=-1) if folds else torch.ones(24)
    assert result["eval_result_unstructured"]["decoder_folded"] is folds
    assert [d["encoder_norm"] for d in details] == pytest.approx((W_enc.norm(dim=0) * scale).tolist(), rel=1e-5)
    bias_name = "b_mag" if architecture == "gated" else "b_enc"
    assert [d["encoder_bias"] for d in details] == pytest.approx(
        (getattr(sae, bias_name).detach() * scale).tolist(), rel=1e-5, abs=1e-7
    )


def test_bad_settings_and_inputs_are_one_clear_error():
    with pytest.raises(ConfigError, match="top_pairs must be 0 or more, got -1"):
        GeometryConfig(top_pairs=-1)
    with pytest.raises(ConfigError, match="Did you mean 'top_pairs'"):
        from_dict(GeometryConfig, {"top_pair": 5})
    with pytest.raises(ConfigError, match=r"activations must be \(tokens, 2\) .* got \(4, 3\)"):
        run_geometry(hand_sae(), activations=torch.zeros(4, 3), progress=False)
    with pytest.raises(ConfigError, match="transcoder needs `targets`"):
        run_geometry(random_sae("standard", transcoder=True), activations=torch.zeros(4, 8), progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = load_model(str(save_tiny_model(folder / "model")))
    data = DataConfig(dataset=str(write_jsonl(folder / "text.jsonl", sentences(300))), context_size=16)
    return model, data


def test_geometry_on_held_out_contexts_agrees_with_evaluate(tiny, tmp_path):
    """One mechanism: the numbers `evaluate()` also reports are the same on the same contexts."""
    model, data = tiny
    torch.manual_seed(4)
    sae = saelab.create_sae("standard", d_in=32, d_sae=64, hook_name=HOOK)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # eight dead latents; the random rest fire on about half the tokens: dense
    config = GeometryConfig(n_contexts=8, batch_contexts=4)
    result = run_geometry(sae, model, config, progress=False, data=data)
    reference = evaluate(sae, model=model, data=data, n_contexts=8, batch_contexts=4, spliced=False)
    metrics = result["eval_result_metrics"]
    assert metrics["density"]["tokens"] == reference["tokens"] > 0
    assert 8 == metrics["density"]["dead_latents"] == reference["sparsity"]["dead_latents"]
    assert 0 < metrics["density"]["dense_latents"] == reference["sparsity"]["dense_latents"]
    assert metrics["shrinkage"]["l2_ratio"] == pytest.approx(reference["reconstruction"]["l2_norm_ratio"], rel=1e-5)
    assert metrics["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(
        reference["reconstruction"]["relative_reconstruction_bias"], rel=1e-5
    )
    geometry = reference["geometry"]
    assert metrics["weights"]["decoder_norm_mean"] == pytest.approx(geometry["decoder_norm_mean"])
    assert metrics["weights"]["decoder_norm_std"] == pytest.approx(geometry["decoder_norm_std"])
    assert metrics["weights"]["largest_decoder_cosine_sim"] == pytest.approx(geometry["max_decoder_cosine_max"])
    assert metrics["misc_metrics"]["average_max_decoder_cosine_sim"] == pytest.approx(
        geometry["max_decoder_cosine_mean"]
    )
    density = M.log_feature_density(torch.tensor([d["feature_density"] for d in result["eval_result_details"]]), 1)
    assert density.tolist() == pytest.approx(reference["log10_feature_density"], abs=1e-5)
    # per context: a context's worth of firings at most, at least one
    heuristic = torch.tensor([d["consistent_activation_heuristic"] for d in result["eval_result_details"]])
    alive = heuristic[~heuristic.isnan()]
    assert len(alive) == 64 - metrics["density"]["dead_latents"] and bool(((alive >= 1) & (alive <= 16)).all())
    assert result["seconds"] > 0 and result["eval_type_id"] == "geometry"


def test_plots_compare_several_saes_and_results_round_trip(tmp_path):
    results = {
        name: run_geometry(random_sae(architecture), activations=torch.randn(200, 8), progress=False)
        for name, architecture in (("relu", "standard"), ("topk", "topk"))
    }
    path = write_result(results["relu"], tmp_path / "relu.json")
    assert json.loads(path.read_text())["eval_result_metrics"] == results["relu"]["eval_result_metrics"]
    assert read_result(path)["eval_result_unstructured"]["top_decoder_pairs"][0]["cosine_sim"] == pytest.approx(
        results["relu"]["eval_result_metrics"]["weights"]["largest_decoder_cosine_sim"]
    )
    files = plot_geometry(results, tmp_path / "plots")
    names = ["geometry_density.png", "geometry_enc_dec.png", "geometry_max_decoder.png"]
    assert [f.name for f in files] == names and all(f.read_bytes()[:4] == b"\x89PNG" for f in files)
    transcoder = run_geometry(
        random_sae("standard", True), activations=torch.randn(50, 8), targets=torch.randn(50, 6), progress=False
    )
    files = plot_geometry({"transcoder": transcoder}, tmp_path / "transcoder")
    assert "geometry_enc_dec.png" not in [f.name for f in files] and len(files) == 2  # nothing to draw there
