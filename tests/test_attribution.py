"""Attribution graphs on tiny random models in float64: the edges are the exact slopes of the local replacement
model (frozen attention patterns and norm denominators, errors held), the edges into a node plus what no node
explains add up to its pre-activation or logit, node order, logit selection, pruning, scores."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_causal_lm, word_tokenizer

from saelab.analysis.attribution import AttributionGraph, attribute, logit_targets, prompt_tokens
from saelab.analysis.influence import influence, normalized_inputs, prune
from saelab.analysis.local_replacement import LOGITS, LocalReplacement
from saelab.core.errors import ConfigError
from saelab.models.hooks import HookedModel
from saelab.saes import create_sae

PROMPT = "the cat sat on the mat and"


def tiny(architecture: str = "llama", n_layers: int = 3) -> HookedModel:
    return HookedModel(tiny_causal_lm(architecture, n_layers=n_layers).double(), word_tokenizer())


def make_clt(
    architecture="clt", layers=(0, 1, 2), hook_name="blocks.{layer}.hook_resid_mid", skip=True, activation="topk"
):
    torch.manual_seed(1)
    n = len(layers)
    clt = create_sae(
        architecture,
        d_in=32 * n,
        d_sae=16 * n,
        d_out=32 * n,
        layers=list(layers),
        hook_name=hook_name,
        hook_name_out="blocks.{layer}.hook_mlp_out",
        k=4,
        skip_connection=skip,
        activation=activation,
    ).double()
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(0.2 * torch.randn_like(p))  # biases too: what no node explains is not zero
    return clt


def directions(local: LocalReplacement, graph: AttributionGraph) -> list:
    """Every target of the graph as (layer, position, direction): logits first, then its features."""
    unembedding = local.unembed.weight.double()
    found = [(LOGITS, graph.n_positions - 1, unembedding[k] - unembedding.mean(0)) for k in graph.logit_tokens]
    layer_of = {layer: i for i, layer in enumerate(local.clt.cfg.layers)}
    for layer, position, latent in graph.features.tolist():
        found.append((layer, position, local.clt.W_enc[layer_of[layer]][:, latent].double()))
    return found


def rows_of_targets(graph: AttributionGraph) -> torch.Tensor:
    """The adjacency rows of the targets in `directions`' order, over the source columns."""
    sources = graph.logit_nodes.start
    return torch.cat([graph.adjacency[graph.logit_nodes, :sources], graph.adjacency[: graph.n_features, :sources]])


CASES = {
    "clt-resid_mid-skip": dict(),
    "transcoder_set-jumprelu": dict(architecture="transcoder_set", activation="jumprelu"),
    "normalized-input-two-layers": dict(layers=(1, 2), hook_name="blocks.{layer}.ln2.hook_normalized"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edges_plus_constants_give_each_target_and_match_the_clean_model(case):
    model, clt = tiny(), make_clt(**CASES[case])
    graph = attribute(model, clt, PROMPT, batch_size=16)
    assert graph.n_features > 20
    local = LocalReplacement(model, clt, torch.tensor(graph.tokens), batch=2)
    targets = directions(local, graph)
    sources = torch.ones(local.n_sources, dtype=torch.float64)
    everything, nothing = local.replay(sources, targets), local.replay(0 * sources, targets)
    # in the frozen model each target reads the sum of its incoming edges plus what no node explains
    torch.testing.assert_close(rows_of_targets(graph).sum(1) + nothing, everything, rtol=0, atol=1e-10)
    # and, with every source in place, what the unmodified model computes: demeaned logits, pre-activations
    tokens = torch.tensor([graph.tokens])
    logits = model.logits(tokens)[0, -1].double()
    torch.testing.assert_close(local.logits, logits, rtol=0, atol=1e-12)  # the recording pass: the clean model
    torch.testing.assert_close(
        everything[: graph.n_logits], (logits - logits.mean())[graph.logit_tokens], atol=1e-5, rtol=0
    )
    reads = model.run_with_cache(tokens, clt.cfg.input_hooks())
    layer_of = {layer: i for i, layer in enumerate(clt.cfg.layers)}
    for n, (layer, position, latent) in enumerate(graph.features.tolist()):
        i = layer_of[layer]
        pre = clt.layer_pre_activation(i, reads[clt.cfg.input_hooks()[i]][0, position])[latent]
        assert abs(everything[graph.n_logits + n] - (pre - clt.b_enc[i * 16 + latent])) < 1e-5


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gemma2", "neox"])
def test_edges_are_the_slopes_of_the_frozen_model(architecture):
    """Scaling every source's output at random moves every target by the adjacency times the scales, and doubling
    one feature moves each target by that feature's column (circuit-tracer's check)."""
    model, clt = tiny(architecture, n_layers=2), make_clt(layers=(0, 1))
    graph = attribute(model, clt, PROMPT, batch_size=32)
    local = LocalReplacement(model, clt, torch.tensor(graph.tokens), batch=1)
    targets, rows = directions(local, graph), rows_of_targets(graph)
    base = local.replay(torch.zeros(local.n_sources, dtype=torch.float64), targets)
    scales = torch.randn(local.n_sources, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(local.replay(scales, targets) - base, rows @ scales, rtol=0, atol=1e-10)
    doubled = torch.ones(local.n_sources, dtype=torch.float64)
    before = local.replay(doubled, targets)
    doubled[3] = 2.0
    torch.testing.assert_close(local.replay(doubled, targets) - before, rows[:, 3], rtol=0, atol=1e-10)
    assert rows[:, 3].abs().max() > 1e-3  # the feature does reach something


def test_node_order_and_what_has_no_inputs():
    model, clt = tiny(), make_clt()
    graph = attribute(model, clt, PROMPT, batch_size=64)
    features = graph.features.tolist()
    assert features == sorted(features) and all(position > 0 for _, position, _ in features)
    reads = model.run_with_cache(torch.tensor([graph.tokens]), clt.cfg.input_hooks())
    for n, (layer, position, latent) in enumerate(features):  # the forward pass is the clean model's
        expected = clt.encode_layer(layer, reads[clt.cfg.input_hooks()[layer]][0, position])[latent]
        assert graph.activations[n] == pytest.approx(float(expected.detach()), abs=1e-12)
    n = graph.adjacency.shape[0]
    assert n == graph.n_features + 3 * graph.n_positions + graph.n_positions + graph.n_logits
    assert not graph.adjacency[graph.errors.start : graph.logit_nodes.start].any()  # errors, tokens: no inputs
    assert not graph.adjacency[:, graph.logit_nodes].any()  # logits feed nothing
    layers = graph.features[:, 0]
    later_or_same = layers[None, :] >= layers[:, None]  # a feature reads before its layer's MLP writes
    assert not graph.adjacency[: graph.n_features, : graph.n_features][later_or_same].any()
    at_zero = [graph.errors.start + layer * graph.n_positions for layer in range(3)]
    assert not graph.adjacency[:, at_zero].any()  # position 0's errors are no sources
    probabilities = torch.softmax(model.logits(torch.tensor([graph.tokens]))[0, -1].double(), -1)
    assert graph.logit_probabilities.tolist() == pytest.approx(
        probabilities.sort(descending=True).values[: graph.n_logits].tolist()
    )


def test_a_transcoder_set_is_a_clt_without_cross_layer_decoders():
    model, clt = tiny(), make_clt()
    graph = attribute(model, clt, PROMPT)
    transcoders = make_clt(architecture="transcoder_set")
    transcoders.load_state_dict({k: v[:, :1] if k.startswith("W_dec_") else v for k, v in clt.state_dict().items()})
    same = attribute(model, transcoders, PROMPT)
    assert same.features.tolist() == graph.features.tolist()
    # only the edges through cross-layer decoders differ: from a layer-0 feature to a layer-2 feature, say
    changed = (same.adjacency - graph.adjacency).abs() > 1e-9
    assert changed.any()
    with torch.no_grad():
        for i in range(3):
            clt.get_parameter(f"W_dec_{i}")[:, 1:] = 0
    torch.testing.assert_close(attribute(model, clt, PROMPT).adjacency, same.adjacency, rtol=0, atol=1e-12)


def test_fewer_feature_nodes_keep_their_rows_and_the_most_influential():
    model, clt = tiny(), make_clt()
    full = attribute(model, clt, PROMPT, batch_size=8)
    part = attribute(model, clt, PROMPT, batch_size=8, max_feature_nodes=10, update_interval=1)
    assert part.n_features == 10 and part.n_active_features == full.n_active_features
    chosen = [full.features.tolist().index(f) for f in part.features.tolist()]
    columns = chosen + list(range(full.n_features, full.adjacency.shape[0]))
    torch.testing.assert_close(part.adjacency[:10], full.adjacency[chosen][:, columns], rtol=0, atol=1e-12)
    torch.testing.assert_close(part.adjacency[part.logit_nodes], full.adjacency[full.logit_nodes][:, columns])
    scores = influence(normalized_inputs(full.adjacency), full.logit_weights())[: full.n_features]
    assert scores[chosen].min() >= scores.topk(30).values.min()  # among the most influential, not arbitrary


def test_logit_targets_stop_at_the_desired_probability_or_the_cap():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert logit_targets(logits, 10, 0.8)[0].tolist() == [0, 1]
    assert logit_targets(logits, 10, 0.81)[0].tolist() == [0, 1, 2]
    assert logit_targets(logits, 2, 0.99)[0].tolist() == [0, 1]
    assert logit_targets(logits, 10, 0.8)[1].tolist() == pytest.approx([0.5, 0.3])


def test_prompts_begin_with_a_special_token():
    tokenizer = word_tokenizer()
    assert prompt_tokens(tokenizer, "the cat").tolist() == [
        1,
        *tokenizer("the cat", add_special_tokens=False).input_ids,
    ]
    assert prompt_tokens(tokenizer, [1, 5, 6]).tolist() == [1, 5, 6]
    with pytest.raises(ConfigError, match="empty"):
        prompt_tokens(tokenizer, "")


def test_influence_is_the_sum_over_paths():
    # nodes: feature 0, feature 1, error 2, token 3, logit 4
    adjacency = torch.zeros(5, 5, dtype=torch.float64)
    adjacency[4, 0], adjacency[4, 2], adjacency[4, 3] = 3.0, -1.0, 0.0
    adjacency[0, 1], adjacency[0, 3] = 2.0, 2.0
    adjacency[1, 3] = -5.0
    weights = torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64)
    shares = normalized_inputs(adjacency)
    closed = weights @ (
        torch.linalg.inv(torch.eye(5, dtype=torch.float64) - shares) - torch.eye(5, dtype=torch.float64)
    )
    torch.testing.assert_close(influence(shares, weights), closed)
    assert influence(shares, weights).tolist() == pytest.approx([0.75, 0.375, 0.25, 0.75, 0.0])


def test_pruning_keeps_the_influential_nodes_and_edges():
    # features 0..3, errors 4..5, tokens 6..7, logit 8
    adjacency = torch.zeros(9, 9, dtype=torch.float64)
    adjacency[8, 0], adjacency[8, 1], adjacency[8, 4] = 6.0, 3.0, 1.0
    adjacency[0, 6], adjacency[1, 7], adjacency[1, 5] = 1.0, 1.0, 0.02
    adjacency[2, 6] = 1.0  # feature 2 reaches nothing: no influence
    adjacency[8, 3], adjacency[3, 7] = 0.001, 1.0  # feature 3 barely
    weights = torch.zeros(9, dtype=torch.float64)
    weights[8] = 1.0
    everything = prune(adjacency, weights, n_features=4, n_kept=3, node_threshold=1.0, edge_threshold=1.0)
    assert everything.nodes.tolist() == [True, True, False, True, True, True, True, True, True]
    # influence: f0 .6, t6 .6, f1 .3, t7 .294, e4 .1, e5 .006, f3 .0001: 95% is reached with e4
    result = prune(adjacency, weights, n_features=4, n_kept=3, node_threshold=0.95, edge_threshold=0.99)
    assert result.nodes.nonzero().squeeze(1).tolist() == [0, 1, 4, 6, 7, 8]  # not 2, 3, nor error 5
    assert result.edges[8, 4] and result.edges[8, 0] and result.edges[1, 7] and not result.edges[1, 5]
    assert result.cumulative[0] < result.cumulative[1] < result.cumulative[4] < result.cumulative[3]
    # edge scores .6 .6 .3 .3 .1: 90% drops e4's only edge, and so e4
    fewer = prune(adjacency, weights, n_features=4, n_kept=3, node_threshold=0.95, edge_threshold=0.9)
    assert not fewer.edges[8, 4] and fewer.nodes.nonzero().squeeze(1).tolist() == [0, 1, 6, 7, 8]
    with pytest.raises(ValueError, match="node_threshold"):
        prune(adjacency, weights, 4, 3, node_threshold=1.5, edge_threshold=0.9)


def test_graph_scores_count_what_errors_carry():
    model, clt = tiny(), make_clt()
    graph = attribute(model, clt, PROMPT)
    replacement, completeness = graph.scores()
    assert 0 < replacement < 1 and 0 < completeness < 1
    graph.adjacency[:, graph.errors] = 0  # without errors, everything comes from tokens through features
    assert graph.scores() == pytest.approx((1.0, 1.0))
    pruned = graph.prune(0.5, 0.5)
    assert graph.scores(pruned)[1] == pytest.approx(1.0)


def test_what_cannot_be_attributed_is_one_clear_error():
    model = tiny()
    with pytest.raises(ConfigError, match="cross-layer transcoder or transcoder set"):
        attribute(model, create_sae("topk", d_in=32, d_sae=64, k=4, hook_name="blocks.0.hook_resid_mid"), PROMPT)
    with pytest.raises(ConfigError, match="covers layers"):
        attribute(model, _too_deep(), PROMPT)
    del model.blocks[1].self_attn.k_proj
    with pytest.raises(ConfigError, match="cannot freeze the attention pattern of LlamaAttention"):
        attribute(model, make_clt(), PROMPT)


def _too_deep():
    clt = make_clt(layers=(0, 1, 2))
    clt.cfg.layers = [1, 2, 3]
    return clt
