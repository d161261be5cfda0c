"""A static, self-contained HTML dashboard of an SAE's latents, written from `FeatureStats`.

    out/index.html          every latent: density, max and mean activation, top tokens (sortable, searchable,
                            100 per page)
    out/latent.html#17      one latent: histogram, promoted / suppressed logits, token-set enrichment, top
                            contexts with each token coloured by the latent's activation
    out/data/index.js       the index table
    out/data/chunk_0000.js  per-latent details, `chunk_size` latents per file, read only when a page shows them

Data files are scripts rather than JSON because browsers refuse to fetch JSON from file:// pages, while a
script tag loads from disk: the site opens by double-clicking index.html, no server.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from saelab.analysis.statistics import FeatureStats
from saelab.core.files import atomic_directory, atomic_write_text

ASSETS = ("index.html", "latent.html", "dashboard.js", "dashboard.css")


class TokenText:
    """Token id -> the text it stands for (byte-level BPE markers turned into spaces), cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            token = self.tokenizer.convert_ids_to_tokens(int(token_id))
            text = self.tokenizer.convert_tokens_to_string([token]) if token is not None else f"<{token_id}>"
            self.cache[token_id] = text
        return self.cache[token_id]


def _round(values, digits: int = 4) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in values.tolist()]


def _top_token_summary(stats: FeatureStats, latent: int, text: TokenText, n: int = 5) -> str:
    """The distinct tokens at which the latent's top contexts peak, most activating first."""
    seen: list[str] = []
    for place in range(stats.top_values.shape[1]):
        if stats.top_values[latent, place] <= 0:
            break
        token = text(int(stats.top_tokens[latent, place, stats.window_left])).strip()
        if token and token not in seen:
            seen.append(token)
        if len(seen) == n:
            break
    return " · ".join(seen)


def latent_record(stats: FeatureStats, latent: int, text: TokenText, n_logits: int = 10) -> dict[str, Any]:
    """Everything the latent page shows about one latent, as plain JSON values."""
    contexts = []
    for place in range(stats.top_values.shape[1]):
        value = float(stats.top_values[latent, place])
        if value <= 0:
            break
        ids = stats.top_tokens[latent, place]
        valid = ids >= 0
        contexts.append(
            {
                "value": float(f"{value:.4g}"),
                "tokens": [text(int(i)) for i in ids[valid]],
                "acts": _round(stats.top_acts[latent, place][valid], 3),
                "at": int(valid[: stats.window_left].sum()),
            }
        )
    record: dict[str, Any] = {
        "id": latent,
        "density": float(stats.density[latent]),
        "max": float(stats.max_activations[latent]),
        "mean": float(stats.mean_activations[latent]),
        "count": int(stats.firing_counts[latent]),
        "histogram": stats.histogram[latent].tolist(),
        "bin_width": float(stats.bin_widths[latent]),
        "contexts": contexts,
        "promoted": [],
        "suppressed": [],
        "enrichment": sorted(
            ([name, float(stats.enrichment(name)[latent])] for name in stats.token_set_names), key=lambda pair: -pair[1]
        ),
    }
    if stats.logits:
        for key, side in (("promoted", "top"), ("suppressed", "bottom")):
            ids = stats.logits[f"{side}_ids"][latent, :n_logits]
            values = stats.logits[f"{side}_values"][latent, :n_logits]
            record[key] = [[text(int(i)), float(f"{float(v):.4g}")] for i, v in zip(ids, values, strict=True)]
    return record


def _script(call: str, payload: Any) -> str:
    return f"{call}({json.dumps(payload, ensure_ascii=False, separators=(',', ':'))});\n"


def write_dashboard(
    stats: FeatureStats,
    tokenizer,
    out_dir: str | Path,
    title: str | None = None,
    chunk_size: int = 64,
    explanations: Mapping[int, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the dashboard of `stats` into `out_dir`; returns its index.html. The folder appears whole; an earlier
    dashboard there is replaced only once the new one is complete (anything else there is refused).
    `explanations` (latent -> {"explanation", "detection", "fuzzing"}, e.g. `explanations_of` an autointerp
    result) are shown in the index and on each latent's page."""
    explanations = explanations or {}
    text = TokenText(tokenizer)
    title = title or f"{stats.info.get('hook_name') or 'SAE'} · {stats.d_sae:,} latents"
    n_logits = 5
    index_rows = []
    for latent in range(stats.d_sae):
        promoted = []
        if stats.logits:
            promoted = [text(int(i)).strip() for i in stats.logits["top_ids"][latent, :n_logits]]
        index_rows.append(
            {
                "id": latent,
                "density": float(f"{float(stats.density[latent]):.4g}"),
                "max": float(f"{float(stats.max_activations[latent]):.4g}"),
                "mean": float(f"{float(stats.mean_activations[latent]):.4g}"),
                "top": _top_token_summary(stats, latent, text),
                "logits": " · ".join(promoted),
                "explanation": str(explanations.get(latent, {}).get("explanation", "")),
            }
        )
    never = int((stats.firing_counts == 0).sum())
    summary = (
        f"{stats.info.get('model_name') or 'model'} · {stats.info.get('hook_name') or ''} · "
        f"{stats.n_tokens:,} tokens of {stats.info.get('dataset') or 'text'} · {never:,} latents never fired"
    )
    index = {
        "title": title,
        "summary": summary,
        "d_sae": stats.d_sae,
        "n_tokens": stats.n_tokens,
        "chunk_size": chunk_size,
        "latents": index_rows,
    }
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "data" / "index.js").exists():
        raise FileExistsError(f"{out_dir} exists and is not a saelab dashboard: choose another folder")
    fresh = out_dir.with_name(f".{out_dir.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    with atomic_directory(fresh) as staging:
        for name in ASSETS:
            shutil.copyfile(str(files("saelab.analysis") / "dashboard_assets" / name), staging / name)
        (staging / "data").mkdir()
        atomic_write_text(staging / "data" / "index.js", _script("saelab.index", index))
        for chunk, start in enumerate(range(0, stats.d_sae, chunk_size)):
            latents = range(start, min(start + chunk_size, stats.d_sae))
            records = [
                {**latent_record(stats, latent, text), "explanation": explanations.get(latent)} for latent in latents
            ]
            payload = f"saelab.chunk({chunk}, {json.dumps(records, ensure_ascii=False, separators=(',', ':'))});\n"
            atomic_write_text(staging / "data" / f"chunk_{chunk:04d}.js", payload)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(fresh, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(fresh, out_dir)
    return out_dir / "index.html"
