"""Attribution graphs as files: circuit-tracer's / Neuronpedia's JSON, graph-metadata.json, the page's data, and
`saelab graph` end to end on a tiny saved model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny_model

from saelab.analysis.attribution import AttributionGraph
from saelab.analysis.graph_files import cantor, graph_json, graph_slug, write_graph_files
from saelab.cli.main import main
from saelab.saes import create_sae
from saelab.saes.files import save_sae

REQUIRED_NODE_KEYS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"}


def small_graph() -> AttributionGraph:
    """Two layers, prompt '<s> cat sat' (3 positions), features (layer 0, position 1, latent 7) and (1, 2, 3)."""
    # nodes: features 0, 1; errors 2..7 (layer 0: 2-4, layer 1: 5-7); tokens 8-10; logits 11, 12
    adjacency = torch.zeros(13, 13, dtype=torch.float64)
    adjacency[0, 9] = 1.0
    adjacency[1, 0], adjacency[1, 10] = 0.5, 1.0
    adjacency[11, 1], adjacency[11, 7], adjacency[11, 10] = 2.0, -0.5, 0.3
    adjacency[12, 0] = 1.0
    return AttributionGraph(
        prompt="cat sat",
        tokens=[1, 6, 7],
        token_strings=["<s>", "cat", "sat"],
        n_layers=2,
        features=torch.tensor([[0, 1, 7], [1, 2, 3]]),
        activations=torch.tensor([2.5, 1.25], dtype=torch.float64),
        logit_tokens=[8, 9],
        logit_strings=["on", "ran"],
        logit_probabilities=torch.tensor([0.62, 0.2], dtype=torch.float64),
        adjacency=adjacency,
        n_active_features=2,
        info={"model_name": "tiny-llama", "max_n_logits": 10},
    )


def test_graph_json_is_circuit_tracers_layout():
    graph = small_graph()
    data = graph_json(graph, "demo", node_threshold=1.0, edge_threshold=1.0)
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert (meta["slug"], meta["scan"], meta["prompt"], meta["prompt_tokens"]) == (
        "demo",
        "tiny-llama",
        "cat sat",
        ["<s>", "cat", "sat"],
    )
    nodes = {n["node_id"]: n for n in data["nodes"]}
    assert set(nodes) == {"0_7_1", "1_3_2", "1_-1_2", "E_1_0", "E_6_1", "E_7_2", "3_8_2", "3_9_2"}
    assert all(REQUIRED_NODE_KEYS <= set(n) for n in data["nodes"])
    feature = nodes["0_7_1"]
    assert (feature["feature"], feature["layer"], feature["ctx_idx"], feature["jsNodeId"]) == (
        cantor(0, 7),
        "0",
        1,
        "0_7-0",
    )
    assert feature["feature_type"] == "cross layer transcoder" and feature["activation"] == 2.5
    assert cantor(0, 7) == 35 and cantor(1, 3) == 13
    error = nodes["1_-1_2"]
    assert (error["feature"], error["layer"], error["ctx_idx"], error["feature_type"]) == (
        -1,
        "1",
        2,
        "mlp reconstruction error",
    )
    token = nodes["E_6_1"]
    assert (token["feature"], token["layer"], token["feature_type"], token["jsNodeId"]) == (
        1,
        "E",
        "embedding",
        "E_6-1",
    )
    top, second = nodes["3_8_2"], nodes["3_9_2"]
    assert top["clerp"] == 'Output "on" (p=0.620)' and top["is_target_logit"] and not second["is_target_logit"]
    assert top["token_prob"] == 0.62 and top["feature"] == 8 and top["feature_type"] == "logit"
    links = {(link["source"], link["target"]): link["weight"] for link in data["links"]}
    assert links == {
        ("E_6_1", "0_7_1"): 1.0,
        ("0_7_1", "1_3_2"): 0.5,
        ("E_7_2", "1_3_2"): 1.0,
        ("1_3_2", "3_8_2"): 2.0,
        ("1_-1_2", "3_8_2"): -0.5,
        ("E_7_2", "3_8_2"): 0.3,
        ("0_7_1", "3_9_2"): 1.0,
    }
    influences = [nodes[i]["influence"] for i in ("1_3_2", "0_7_1")]
    assert 0 < influences[0] < influences[1] <= 1  # the node feeding the top logit ranks first


def test_pruned_graphs_leave_out_nodes_without_kept_edges():
    data = graph_json(small_graph(), "demo", node_threshold=0.5, edge_threshold=0.8)
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == 3 and kinds.count("logit") == 2  # always there
    ids = {n["node_id"] for n in data["nodes"]}
    assert "1_-1_2" not in ids and all(link["source"] in ids and link["target"] in ids for link in data["links"])


def test_files_written_and_metadata_upserted(tmp_path):
    graph = small_graph()
    page = write_graph_files(graph, tmp_path, "first", node_threshold=1.0, edge_threshold=1.0)
    write_graph_files(graph, tmp_path, "second")
    write_graph_files(graph, tmp_path, "first", scan="other-scan")
    assert page == tmp_path / "graph.html" and (tmp_path / "graph.js").exists() and (tmp_path / "graph.css").exists()
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert [g["slug"] for g in listing] == ["second", "first"] and listing[1]["scan"] == "other-scan"
    assert json.loads((tmp_path / "first.json").read_text())["metadata"]["scan"] == "other-scan"
    script = (tmp_path / "data" / "graph_first.js").read_text()
    assert script.startswith("saelabGraph(") and '"replacement":' in script
    assert (tmp_path / "data" / "graphs.js").read_text() == 'saelabGraphs(["second", "first"]);\n'
    with pytest.raises(ValueError, match="slug"):
        write_graph_files(graph, tmp_path, "../escape")
    assert graph_slug("The capital of France is") == "the-capital-of-france-is" and graph_slug("?!") == "graph"


def test_saelab_graph_command(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model", n_layers=2)
    torch.manual_seed(0)
    clt = create_sae(
        "clt",
        d_in=64,
        d_sae=64,
        d_out=64,
        layers=[0, 1],
        hook_name="blocks.{layer}.hook_mlp_in",
        hook_name_out="blocks.{layer}.hook_mlp_out",
        k=4,
        model_name=str(model),
    )
    save_sae(clt, tmp_path / "clt")
    out = tmp_path / "graphs"
    code = main(["graph", str(tmp_path / "clt"), "the cat sat on the", "--out", str(out), "--node_threshold", "0.9"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "feature nodes of" in printed and "the-cat-sat-on-the.json" in printed
    data = json.loads((out / "the-cat-sat-on-the.json").read_text())
    assert data["metadata"]["prompt_tokens"][0] == "<s>" and data["metadata"]["node_threshold"] == 0.9
    assert any(n["feature_type"] == "logit" for n in data["nodes"]) and data["links"]
    assert (out / "graph.html").exists()
    topk = create_sae("topk", d_in=32, d_sae=64, k=4, hook_name="blocks.0.hook_resid_post", model_name=str(model))
    save_sae(topk, tmp_path / "sae")
    assert main(["graph", str(tmp_path / "sae"), "the cat", "--out", str(tmp_path / "no")]) == 2
    error = capsys.readouterr().err
    assert "cross-layer transcoder or transcoder set" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()
