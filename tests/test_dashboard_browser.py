"""The dashboard in a real browser: headless Chromium opens the pages from disk (file://, no server), runs their
scripts, and the rendered DOM holds the expected latents and tokens. Screenshots go to test-artifacts/.

Needs Debian's `chromium` (`.ci/run` installs it). Elsewhere the test is skipped unless SAELAB_REQUIRE_BROWSER=1,
which CI sets so that a missing browser fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from saelab.analysis import FeatureStatistics, write_dashboard

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSER = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)

if BROWSER is None and os.environ.get("SAELAB_REQUIRE_BROWSER") != "1":
    pytest.skip("headless Chromium not installed (apt-get install chromium; .ci/run does)", allow_module_level=True)


class WordTokenizer:
    """Enough of a tokenizer for the dashboard: token i is the word WORDS[i]."""

    WORDS = [f" word{i}" for i in range(40)] + [" <b>bold?</b>", " quiet", " cat"]

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.WORDS[i]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


def browser(*args: str) -> subprocess.CompletedProcess:
    assert BROWSER is not None, "SAELAB_REQUIRE_BROWSER=1 but no chromium found"
    profile = tempfile.mkdtemp(prefix="saelab-chromium-")
    flags = [
        f"--user-data-dir={profile}",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--no-first-run",
        "--allow-file-access-from-files",
        "--virtual-time-budget=5000",
        "--window-size=1280,900",
    ]
    try:
        return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    stats = FeatureStatistics(d_sae=300, top_k=3, window=(3, 1))
    tokens = torch.randint(0, 40, (20, 12), generator=generator)
    tokens[5, 6] = 42  # " cat"
    tokens[5, 5] = 40  # markup in a token must show as text, not become markup
    latents = torch.zeros(20, 12, 300)
    latents[5, 6, 217] = 7.5  # latent 217 peaks on " cat"
    latents[5, 5, 217] = 2.0
    latents[:, :, 3] = torch.rand(20, 12, generator=generator)  # a dense latent
    stats.add(tokens, latents)
    out = tmp_path_factory.mktemp("site") / "dashboard"
    write_dashboard(
        stats.result(info={"hook_name": "blocks.5.hook_resid_post", "model_name": "test"}),
        WordTokenizer(),
        out,
        chunk_size=64,
        explanations={217: {"explanation": "the animal <i>cat</i>", "detection": 0.9, "fuzzing": 0.75, "llm": "judge"}},
    )
    ARTIFACTS.mkdir(exist_ok=True)
    return out


def test_index_page_renders_the_latents_from_disk(dashboard):
    page = browser("--dump-dom", (dashboard / "index.html").as_uri())
    assert page.returncode == 0, page.stderr[-2000:]
    dom = page.stdout
    rows = re.findall(r'<tr data-latent="(\d+)">', dom)
    assert rows[:3] == ["0", "1", "2"] and len(rows) == 100  # first page of 300
    assert "300 latents" in dom and "page 1 of 3" in dom
    assert "blocks.5.hook_resid_post" in dom
    assert 'href="latent.html#217"' not in dom  # 217 is on page 3
    shot = browser(f"--screenshot={ARTIFACTS / 'dashboard_index.png'}", (dashboard / "index.html").as_uri())
    assert shot.returncode == 0 and (ARTIFACTS / "dashboard_index.png").stat().st_size > 5000


def test_index_search_and_sort_from_the_address(dashboard):
    found = browser("--dump-dom", (dashboard / "index.html").as_uri() + "#q=cat").stdout
    assert re.findall(r'<tr data-latent="(\d+)">', found) == ["217"] and "1 latents" in found
    explained = browser("--dump-dom", (dashboard / "index.html").as_uri() + "#q=animal").stdout  # explanations too
    assert re.findall(r'<tr data-latent="(\d+)">', explained) == ["217"] and "<i>cat</i>" not in explained
    dense_first = browser("--dump-dom", (dashboard / "index.html").as_uri() + "#sort=density").stdout
    assert re.findall(r'<tr data-latent="(\d+)">', dense_first)[:2] == ["3", "217"]


def test_latent_page_shows_its_contexts_with_tokens(dashboard):
    page = browser("--dump-dom", (dashboard / "latent.html").as_uri() + "#217")
    assert page.returncode == 0, page.stderr[-2000:]
    dom = page.stdout
    assert "latent 217" in dom
    assert re.search(r'class="token max"[^>]*title="activation 7.50"[^>]*> cat</span>', dom), dom[-3000:]
    assert "&lt;b&gt;bold?&lt;/b&gt;" in dom and "<b>bold?</b>" not in dom
    assert dom.count('class="context"') == 1  # it fired in one context only
    assert "Explanation: the animal &lt;i&gt;cat&lt;/i&gt; (detection 0.900, fuzzing 0.750; by judge)" in dom
    assert "<svg" in dom  # the histogram
    shot = browser(f"--screenshot={ARTIFACTS / 'dashboard_latent.png'}", (dashboard / "latent.html").as_uri() + "#217")
    assert shot.returncode == 0 and (ARTIFACTS / "dashboard_latent.png").stat().st_size > 5000


def test_graph_page_draws_the_graph_and_follows_a_node(tmp_path):
    from test_graph_files import small_graph

    from saelab.analysis.graph_files import write_graph_files

    page = write_graph_files(small_graph(), tmp_path, "demo", node_threshold=1.0, edge_threshold=1.0)
    dom = browser("--dump-dom", page.as_uri() + "#demo").stdout
    drawn = set(re.findall(r'data-node="([^"]+)"', dom))
    assert drawn == {"0_7_1", "1_3_2", "1_-1_2", "E_1_0", "E_6_1", "E_7_2", "3_8_2", "3_9_2"}
    assert dom.count('class="edge positive"') == 6 and dom.count('class="edge negative"') == 1
    assert "8 nodes, 7 edges" in dom and "replacement score" in dom
    # ?node= opens a node as a click does: its inputs and outputs, strongest first
    chosen = browser("--dump-dom", page.as_uri() + "?node=1_3_2#demo").stdout
    assert "latent 3 of layer 1 at" in chosen and "inputs (2)" in chosen and "outputs (1)" in chosen
    rows = re.findall(r'<tr data-node="([^"]+)">', chosen)
    assert rows == ["E_7_2", "0_7_1", "3_8_2"]
    # drawn at its own size, the frame scrolls; ?fit=1 scales the drawing to the frame's width
    width = re.search(r'<svg [^>]*id="graph"[^>]*>', dom).group(0)
    assert re.search(r'width="(\d+)"', width) and 'viewBox="0 0 ' in width
    fitted = browser("--dump-dom", page.as_uri() + "?fit=1#demo").stdout
    svg = re.search(r'<svg [^>]*id="graph"[^>]*>', fitted).group(0)
    assert 'width="100%"' in svg and re.search(r'<input id="fit" type="checkbox"[^>]*>', fitted)
    assert '<div id="canvas" class="fit">' in fitted
    ARTIFACTS.mkdir(exist_ok=True)
    shot = browser(f"--screenshot={ARTIFACTS / 'attribution_graph.png'}", page.as_uri() + "?node=1_3_2&fit=1")
    assert shot.returncode == 0 and (ARTIFACTS / "attribution_graph.png").stat().st_size > 5000
