"""Streaming feature statistics (top activations, histograms, interval samples, token enrichment) equal their
brute-force definitions."""

from __future__ import annotations

import pytest
import torch

from saelab.analysis import (
    FeatureStatistics,
)


def stream(batches, **options):
    stats = FeatureStatistics(d_sae=batches[0][1].shape[-1], **options)
    for tokens, latents in batches:
        stats.add(tokens, latents)
    return stats.result()


def random_batches(n_batches=5, contexts=6, positions=20, d_sae=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        tokens = torch.randint(0, 50, (contexts, positions), generator=generator)
        scale = 1.0 + 3 * i  # later batches reach larger activations: histograms must widen their bins
        latents = torch.relu(torch.randn(contexts, positions, d_sae, generator=generator) - 1) * scale
        batches.append((tokens, latents))
    return batches


def test_streaming_top_k_equals_brute_force():
    batches = random_batches()
    stats = stream(batches, top_k=4, window=(3, 2))
    tokens = torch.cat([t for t, _ in batches])
    latents = torch.cat([a for _, a in batches])
    per_context_max, argmax = latents.max(dim=1)  # (contexts, d_sae)
    values, contexts = per_context_max.T.topk(4, dim=1)
    assert torch.equal(stats.top_values, values) and torch.equal(stats.top_contexts, contexts)
    for latent in range(10):
        for place in range(4):
            context = int(contexts[latent, place])
            position = int(argmax[context, latent])
            assert stats.top_positions[latent, place] == position
            for offset in range(-3, 3):
                where = position + offset
                expected = int(tokens[context, where]) if 0 <= where < 20 else -1
                assert stats.top_tokens[latent, place, offset + 3] == expected
                expected_act = float(latents[context, where, latent]) if 0 <= where < 20 else 0.0
                assert stats.top_acts[latent, place, offset + 3] == expected_act


def test_streaming_histogram_density_and_means_equal_brute_force():
    batches = random_batches()
    stats = stream(batches, n_bins=8)
    latents = torch.cat([a for _, a in batches]).reshape(-1, 10).double()
    assert stats.n_tokens == latents.shape[0]
    assert torch.equal(stats.firing_counts, (latents > 0).sum(0))
    assert torch.allclose(stats.mean_activations, latents.sum(0) / (latents > 0).sum(0))
    assert torch.equal(stats.max_activations, latents.max(0).values.float())
    for latent in range(10):
        values = latents[:, latent][latents[:, latent] > 0]
        width = float(stats.bin_widths[latent])
        assert values.max() < width * 8 and values.max() >= width * 4  # widened to fit, no further
        expected = torch.bincount((values / width).long().clamp(max=7), minlength=8)
        assert torch.equal(stats.histogram[latent], expected)
        assert width > float(batches[0][1][..., latent].max()) / 8  # the first batch's width was doubled


def test_interval_samples_are_tokens_of_their_interval_and_counts_are_exact():
    batches = random_batches()
    stats = stream(batches, window=(3, 2), n_bins=8, quantile_intervals=4, samples_per_interval=3)
    tokens = torch.cat([t for t, _ in batches])
    latents = torch.cat([a for _, a in batches])
    for latent in range(10):
        acts = latents[..., latent]
        width = float(stats.interval_width[latent])
        interval = (acts / width).long().clamp(max=3)
        for i in range(4):
            members = (acts > 0) & (interval == i)
            assert stats.interval_counts[latent, i] == int(members.sum())
            sampled = stats.interval_tokens[latent, i, :, 3] >= 0
            assert int(sampled.sum()) == min(3, int(members.sum()))
            for sample in sampled.nonzero().flatten().tolist():
                window_acts = stats.interval_acts[latent, i, sample]
                context, position = (acts == window_acts[3]).nonzero()[0].tolist()  # values are distinct
                assert members[context, position]
                for offset in range(-3, 3):
                    where = position + offset
                    expected = int(tokens[context, where]) if 0 <= where < 20 else -1
                    assert stats.interval_tokens[latent, i, sample, offset + 3] == expected


def test_interval_samples_are_uniform_across_batches_and_bin_merges():
    """Each of 12 tokens in one interval is kept equally often, though later batches double the bin width."""
    values = [[0.5, 0.6, 0.7, 0.8], [1.1, 1.2, 1.3, 1.4], [2.5, 2.6, 2.7, 2.8]]  # widths double as these arrive
    chosen = torch.zeros(12)
    for seed in range(300):
        stats = FeatureStatistics(
            1, top_k=1, window=(0, 0), n_bins=4, quantile_intervals=1, samples_per_interval=2, seed=seed
        )
        for batch in values:
            stats.add(torch.zeros(1, 4, dtype=torch.long), torch.tensor(batch).reshape(1, 4, 1))
        for value in stats.result().interval_acts[0, 0, :, 0].tolist():
            chosen[[v for row in values for v in row].index(pytest.approx(value))] += 1
    assert chosen.sum() == 600 and chosen.min() > 25 and chosen.max() < 80  # 50 each expected


def test_latents_that_never_fire_have_no_contexts_and_masked_positions_do_not_count():
    tokens = torch.arange(12).reshape(2, 6)
    latents = torch.zeros(2, 6, 3)
    latents[0, 2, 1] = 2.0
    latents[1, 0, 1] = 9.0  # at a masked (special) position
    stats = FeatureStatistics(3, top_k=2, window=(1, 1))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 0] = False
    stats.add(tokens, latents, keep)
    result = stats.result()
    assert result.n_tokens == 11 and result.firing_counts.tolist() == [0, 1, 0]
    assert result.top_values[1].tolist() == [2.0, 0.0] and result.top_contexts[1].tolist() == [0, -1]
    assert result.top_tokens[1, 0].tolist() == [1, 2, 3] and (result.top_contexts[0] == -1).all()


def test_token_set_enrichment_by_hand():
    tokens = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])
    latents = torch.zeros(1, 8, 2)
    latents[0, [0, 4], 0] = 1.0  # latent 0 fires only on token 1
    latents[0, :, 1] = 1.0  # latent 1 fires everywhere
    stats = FeatureStatistics(2, token_sets={"ones": torch.tensor([1]), "odd": torch.tensor([1, 3])})
    stats.add(tokens, latents)
    result = stats.result()
    assert result.enrichment("ones").tolist() == [4.0, 1.0]  # share 1/4: all of latent 0's firings -> 4x
    assert result.enrichment("odd").tolist() == [2.0, 1.0]
    with pytest.raises(KeyError, match="no token set"):
        result.enrichment("evens")
