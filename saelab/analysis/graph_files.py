"""An attribution graph as files: the JSON circuit-tracer's and Neuronpedia's graph viewers read, and a static page
of saelab's dashboard that draws it (offline: no server, no CDN).

    out/{slug}.json            the pruned graph in circuit-tracer's layout: {metadata, qParams, nodes, links}
    out/graph-metadata.json    {"graphs": [metadata, ...]}, one entry per slug (circuit-tracer's server lists it)
    out/graph.html#{slug}      the graph drawn by saelab (hover a node for its details, click it to follow its
                               edges); graph.js, graph.css beside it, and data/graph_{slug}.js (the same JSON
                               with the graph's scores, as a script: browsers refuse to fetch JSON from file://)

circuit-tracer's viewer (`circuit-tracer start-server --graph_file_dir out`) and Neuronpedia's upload read the first
two. Node ids follow circuit-tracer's (features `{layer}_{latent}_{position}`, tokens `E_{token}_{position}`, logits
`{layers + 1}_{token}_{last position}`) except error nodes, `{layer}_-1_{position}` as Neuronpedia writes them
(circuit-tracer's `0_{layer}_{position}` can collide with a layer-0 feature's id).
"""

from __future__ import annotations

import json
import re
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

from saelab.analysis.attribution import AttributionGraph
from saelab.analysis.influence import Pruned
from saelab.core.files import atomic_write_text

PAGE_ASSETS = ("graph.html", "graph.js", "graph.css")
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def graph_slug(prompt: str, longest: int = 40) -> str:
    """A file name for a prompt's graph: its words in lower case, joined by '-' ('graph' if none)."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    slug = "-".join(words)[:longest].strip("-")
    return slug or "graph"


def cantor(x: int, y: int) -> int:
    """The feature number circuit-tracer gives latent y of layer x."""
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, position: int, kind: str, js_id: str, **extra: Any) -> dict:
    record = {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": position,
        "feature_type": kind,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_id,
        "clerp": "",
        "influence": None,
        "activation": None,
    }
    return {**record, **extra}


def node_records(graph: AttributionGraph, cumulative: list[float]) -> list[dict]:
    """Every node of the graph as the viewer's node record, in node order."""
    records = []
    for n, (layer, position, latent) in enumerate(graph.features.tolist()):
        records.append(
            _node(
                f"{layer}_{latent}_{position}",
                cantor(layer, latent),
                str(layer),
                position,
                "cross layer transcoder",
                f"{layer}_{latent}-0",
                influence=cumulative[n],
                activation=float(graph.activations[n]),
            )
        )
    for n in range(graph.errors.start, graph.errors.stop):
        layer, position = divmod(n - graph.errors.start, graph.n_positions)
        records.append(
            _node(
                f"{layer}_-1_{position}", -1, str(layer), position, "mlp reconstruction error", f"{layer}_{position}-0"
            )
        )
        records[-1]["influence"] = cumulative[n]
    for position, token in enumerate(graph.tokens):
        n = graph.token_nodes.start + position
        records.append(_node(f"E_{token}_{position}", position, "E", position, "embedding", f"E_{token}-{position}"))
        records[-1]["influence"] = cumulative[n]
    last, layer = graph.n_positions - 1, str(graph.n_layers + 1)
    for k, (token, text) in enumerate(zip(graph.logit_tokens, graph.logit_strings, strict=True)):
        probability = float(graph.logit_probabilities[k])
        records.append(
            _node(
                f"{layer}_{token}_{last}",
                token,
                layer,
                last,
                "logit",
                f"L_{token}-{last}",
                token_prob=probability,
                is_target_logit=k == 0,
                clerp=f'Output "{text}" (p={probability:.3f})',
            )
        )
    return records


def graph_json(
    graph: AttributionGraph,
    slug: str,
    scan: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    pruned: Pruned | None = None,
) -> dict[str, Any]:
    """The graph, pruned (`AttributionGraph.prune`), in circuit-tracer's JSON layout: nodes with a kept edge
    (tokens and logits always), and each kept edge `{source, target, weight}` (the signed direct effect)."""
    if not SLUG.match(slug):
        raise ValueError(f"a graph's slug names its files: letters, digits, '.', '_' and '-', got {slug!r}")
    pruned = pruned or graph.prune(node_threshold, edge_threshold)
    records = node_records(graph, pruned.cumulative.tolist())
    edges = pruned.edges & pruned.nodes[:, None] & pruned.nodes[None, :]
    targets, sources = edges.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        {"source": records[s]["node_id"], "target": records[t]["node_id"], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    nodes = [
        r
        for n, r in enumerate(records)
        if (pruned.nodes[n] and r["node_id"] in linked) or r["feature_type"] in ("embedding", "logit")
    ]
    metadata = {
        "slug": slug,
        "scan": scan or str(graph.info.get("model_name") or "unknown"),
        "transcoder_list": [],
        "prompt_tokens": graph.token_strings,
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": 1,
        "generation_settings": {
            key: graph.info.get(key)
            for key in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
        },
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def write_graph_files(
    graph: AttributionGraph,
    out_dir: str | Path,
    slug: str = "graph",
    scan: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Path:
    """Write the graph's files into `out_dir` (see the module docstring; other graphs there stay, one of the same
    slug is replaced); returns the page, `graph.html`."""
    out = Path(out_dir)
    pruned = graph.prune(node_threshold, edge_threshold)
    data = graph_json(graph, slug, scan, node_threshold, edge_threshold, pruned)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{slug}.json", json.dumps(data, ensure_ascii=False))
    listing_file = out / "graph-metadata.json"
    listing = json.loads(listing_file.read_text()) if listing_file.exists() else {"graphs": []}
    listing["graphs"] = [g for g in listing.get("graphs", []) if g.get("slug") != slug] + [data["metadata"]]
    atomic_write_text(listing_file, json.dumps(listing, indent=2, ensure_ascii=False))
    replacement, completeness = graph.scores()
    pruned_scores = graph.scores(pruned)
    extra = {
        "scores": {
            "replacement": replacement,
            "completeness": completeness,
            "pruned_replacement": pruned_scores[0],
            "pruned_completeness": pruned_scores[1],
        },
        "n_active_features": graph.n_active_features,
        "n_feature_nodes": graph.n_features,
        "n_layers": graph.n_layers,
        "info": graph.info,
    }
    (out / "data").mkdir(exist_ok=True)
    payload = json.dumps({**data, "saelab": extra}, ensure_ascii=False, separators=(",", ":"))
    atomic_write_text(out / "data" / f"graph_{slug}.js", f"saelabGraph({payload});\n")
    slugs = [g["slug"] for g in listing["graphs"]]
    atomic_write_text(out / "data" / "graphs.js", f"saelabGraphs({json.dumps(slugs)});\n")
    for name in PAGE_ASSETS:
        shutil.copyfile(str(files("saelab.analysis") / "dashboard_assets" / name), out / name)
    return out / "graph.html"
