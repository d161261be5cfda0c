"""Synthetic data with ground truth: firing rates, correlations, hierarchies, dictionaries, MCC."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.synthetic import PlantedFeatures, feature_dictionary, feature_recall, mcc, train_toy_sae
from saelab.synthetic.firing import firing_probabilities

N = 40_000


def draw(features: PlantedFeatures, n: int = N) -> torch.Tensor:
    return features.sample(n, torch.Generator().manual_seed(1))[1] != 0


@pytest.mark.parametrize("profile", ["uniform", "zipfian", "linear", "random"])
def test_firing_rates_match_the_configured_probabilities(profile):
    features = PlantedFeatures(d_in=16, n_features=32, mean_active=3, firing=profile)
    p = features.probabilities
    assert float(p.sum()) == pytest.approx(3.0, rel=1e-5)
    if profile == "zipfian":
        assert float(p[0] / p[9]) == pytest.approx(10.0, rel=1e-4)
    rates = draw(features).float().mean(0)
    tolerance = 4 * (p * (1 - p) / N).sqrt() + 1e-4  # four standard errors
    assert ((rates - p).abs() <= tolerance).all()


def test_probabilities_are_capped_at_one_and_keep_the_mean():
    p = firing_probabilities(10, 4.0, "zipfian", zipf_exponent=2.0)
    assert float(p.max()) <= 1.0 and float(p.sum()) == pytest.approx(4.0, rel=1e-5)


def test_correlated_firing_keeps_marginals_and_correlates():
    independent = draw(PlantedFeatures(d_in=16, n_features=20, mean_active=4)).float()
    correlated_features = PlantedFeatures(
        d_in=16, n_features=20, mean_active=4, correlation_rank=1, correlation_strength=0.8
    )
    correlated = draw(correlated_features).float()
    p = correlated_features.probabilities
    assert ((correlated.mean(0) - p).abs() <= 4 * (p * (1 - p) / N).sqrt()).all()

    def mean_abs_offdiagonal(x: torch.Tensor) -> float:
        c = torch.corrcoef(x.T)
        return float(c[~torch.eye(c.shape[0], dtype=torch.bool)].abs().mean())

    assert mean_abs_offdiagonal(independent) < 0.02 < 0.1 < mean_abs_offdiagonal(correlated)


def test_hierarchy_children_need_their_parent_and_exclusive_children_never_co_fire():
    hierarchy = [{"parent": 0, "children": [1, 2, 3], "exclusive": True}, {"parent": 1, "children": [4, 5]}]
    features = PlantedFeatures(d_in=16, n_features=8, mean_active=4, hierarchy=hierarchy)
    active = draw(features)
    assert not (active[:, 1:4] & ~active[:, :1]).any()
    assert not (active[:, 4:6] & ~active[:, 1:2]).any()
    assert int(active[:, 1:4].sum(1).max()) == 1
    assert active[:, 4].any() and active[:, 5].any()  # children still fire (with their parent)
    both = (active[:, 4] & active[:, 5]).any()
    assert bool(both)  # not exclusive: may co-fire


def test_dictionaries_are_unit_and_orthogonal_when_asked():
    g = torch.Generator().manual_seed(0)
    exact = feature_dictionary(8, 16, True, g)
    assert torch.allclose(exact @ exact.T, torch.eye(8), atol=1e-5)
    random = feature_dictionary(64, 16, False, g)
    spread = feature_dictionary(64, 16, True, torch.Generator().manual_seed(0))
    assert torch.allclose(spread.norm(dim=1), torch.ones(64), atol=1e-5)

    def max_cos(d: torch.Tensor) -> float:
        c = (d @ d.T).abs()
        return float(c[~torch.eye(64, dtype=torch.bool)].max())

    assert max_cos(spread) < max_cos(random)


def test_mcc_by_hand():
    truth = torch.eye(3)
    assert mcc(truth[[2, 0, 1]], truth) == pytest.approx(1.0)  # any order
    assert mcc(-truth, truth) == pytest.approx(1.0)  # signs do not matter
    assert mcc(truth[:2], truth) == pytest.approx(2 / 3)  # a missing feature counts 0
    tilted = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert mcc(tilted, truth) == pytest.approx((1 / math.sqrt(2) + 1 + 1) / 3)
    assert feature_recall(tilted, truth).tolist() == [False, True, True]


def test_topk_recovers_easy_features_and_a_narrow_one_cannot(tmp_path):
    easy = PlantedFeatures(d_in=32, n_features=32, mean_active=3, orthogonalize=True, seed=3)
    _, good = train_toy_sae(
        easy, "topk", d_sae=32, k=3, total_tokens=300_000, batch_size=512, plot=tmp_path / "matching.png"
    )
    _, narrow = train_toy_sae(easy, "topk", d_sae=16, k=3, total_tokens=300_000, batch_size=512)
    assert good["mcc"] >= 0.95 and good["recall"] >= 0.9
    assert narrow["mcc"] < good["mcc"] - 0.3
    assert (tmp_path / "matching.png").read_bytes()[:4] == b"\x89PNG"


def test_a_full_correlation_matrix_couples_the_chosen_pair_only():
    matrix = torch.eye(6)
    matrix[0, 1] = matrix[1, 0] = 0.9
    features = PlantedFeatures(d_in=8, n_features=6, mean_active=1.5, correlation_matrix=matrix.tolist())
    active = draw(features).float()
    c = torch.corrcoef(active.T)
    assert float(c[0, 1]) > 0.5 and float(c[2:, 2:][~torch.eye(4, dtype=torch.bool)].abs().max()) < 0.03
    assert ((active.mean(0) - features.probabilities).abs() < 0.01).all()
    with pytest.raises(ValueError, match="positive definite"):
        PlantedFeatures(d_in=8, n_features=2, correlation_matrix=[[1.0, 2.0], [2.0, 1.0]])
