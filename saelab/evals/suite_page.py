"""The eval suite's dashboard page: one static `index.html` beside the suite's results (no server, no script):
the comparison table, each eval's plots, per-source core metrics, a cross-layer transcoder's metrics per layer,
absorption per letter, and every interpreted latent's explanation and scores."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saelab.core.files import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 80em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { padding: 2px 8px; border-bottom: 1px solid #eee; font-size: 0.9em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
img { max-width: 48%; margin: 0.3em; border: 1px solid #eee; }
.error { color: #c01c28; } .muted { color: #777; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.3f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], text_columns: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=text' if i in text_columns else ''}>{_cell(v)}</td>" for i, v in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _sections(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    parts = []
    for name, per_sae in results.items():
        lines = [f"<h2>{html.escape(name)}</h2>"]
        sae: Mapping[str, Any] = next((r["sae"] for r in per_sae.values() if "sae" in r), {})
        if sae:
            lines.append(f"<p class=muted>{html.escape(', '.join(f'{k} {v}' for k, v in sae.items()))}</p>")
        timing = [(e, r.get("seconds"), r.get("error", "")) for e, r in per_sae.items()]
        lines.append(_table(["eval", "seconds", "error"], [(e, s if s is not None else "–", m) for e, s, m in timing]))
        core = per_sae.get("core", {})
        if core.get("eval_result_details"):
            columns = [k for k in core["eval_result_details"][0] if k != "source"]
            rows = [[d["source"], *(d.get(k, math.nan) for k in columns)] for d in core["eval_result_details"]]
            lines += ["<h3>Core metrics per source (held out)</h3>", _table(["source", *columns], rows)]
        layers = [d for d in per_sae.get("replacement", {}).get("eval_result_details") or [] if "layer" in d]
        if layers:
            columns = [k for k in layers[0] if k != "layer"]
            rows = [[d["layer"], *(d[k] for k in columns)] for d in layers]
            lines += ["<h3>Replacement model per layer (from clean inputs)</h3>", _table(["layer", *columns], rows)]
        absorption = per_sae.get("absorption", {})
        if absorption.get("eval_result_details"):
            columns = [
                "mean_absorption_fraction",
                "full_absorption_rate",
                "num_split_features",
                "num_probe_true_positives",
            ]
            columns = [c for c in columns if c in absorption["eval_result_details"][0]]
            rows = [[d["first_letter"], *(d[c] for c in columns)] for d in absorption["eval_result_details"]]
            lines += ["<h3>Absorption per letter</h3>", _table(["letter", *columns], rows)]
        interp = per_sae.get("autointerp", {})
        if interp.get("eval_result_details"):
            llm = (interp.get("eval_result_unstructured") or {}).get("llm", "")
            rows = [
                [d["latent"], d["explanation"], d["autointerp_score"], d.get("fuzzing_accuracy", math.nan)]
                for d in interp["eval_result_details"]
            ]
            lines += [
                f"<h3>Auto-interpretation (explainer and judge: {html.escape(str(llm))})</h3>",
                _table(["latent", "explanation", "detection", "fuzzing"], rows, text_columns=[1]),
            ]
        parts.append("\n".join(lines))
    return parts


def write_suite_page(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    out: str | Path,
    table: tuple[Sequence[str], Sequence[Sequence[str]]],
    images: Sequence[Path] = (),
) -> Path:
    """Write `out/index.html` for the suite's `results` (SAE -> eval -> result), its comparison `table` (header,
    rows) and the plot files `images`."""
    out = Path(out)
    header, rows = table
    plots = "".join(f'<img src="{html.escape(p.relative_to(out).as_posix())}" alt="{p.stem}">' for p in images)
    links = " · ".join(
        f'<a href="{html.escape(n)}/{e}.json">{html.escape(n)}/{e}.json</a>' for n, r in results.items() for e in r
    )
    page = (
        "<!doctype html><html><head><meta charset=utf-8><title>saelab eval suite</title>"
        f"<style>{STYLE}</style></head><body><h1>Eval suite: {len(results)} SAE{'s' * (len(results) > 1)}</h1>"
        f"{_table(header, rows)}<p class=muted>Results: {links}</p>{plots}"
        + "".join(_sections(results))
        + "</body></html>\n"
    )
    path = out / "index.html"
    atomic_write_text(path, page)
    return path
