"""The built-in English text: the prose of the docstrings that installed wheels ship.

saelab must train on real text with no download at run time and on any OS, so the default corpus comes from
what pip already installed with saelab itself: the docstrings of `transformers`, `torch` and `numpy`
(about 6 MB of prose, ~1.5M SmolLM2 tokens). Only prose paragraphs are kept (no code examples, no tables,
no parameter lists made of symbols), each paragraph once. Files are visited in a fixed pseudo-random order
so that any prefix of the corpus mixes the three libraries. The corpus is a pure function of the installed
versions of those packages, which `corpus_version()` reports and run metadata records.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

DOCSTRING_PACKAGES = ("transformers", "torch", "numpy")
MIN_PARAGRAPH_CHARS = 80
MIN_LETTER_FRACTION = 0.85
ORDER_SEED = 20261125
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def corpus_version(packages: tuple[str, ...] = DOCSTRING_PACKAGES) -> dict[str, str]:
    """The installed version of each package the corpus is read from (the corpus is a function of these)."""
    return {name: importlib.metadata.version(name) for name in packages}


def _package_files(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed; the built-in corpus reads its docstrings")
    root = Path(list(spec.submodule_search_locations)[0])
    return sorted(root.rglob("*.py"))


def _is_prose(paragraph: str) -> bool:
    if len(paragraph) < MIN_PARAGRAPH_CHARS or ">>>" in paragraph or paragraph[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return letters / len(paragraph) >= MIN_LETTER_FRACTION


def file_paragraphs(path: Path) -> list[str]:
    """The prose paragraphs of every docstring in one Python file, whitespace normalised."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in third-party sources
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    paragraphs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                for block in _PARAGRAPH_BREAK.split(docstring):
                    text = " ".join(block.split())
                    if _is_prose(text):
                        paragraphs.append(text)
    return paragraphs


def docstring_documents(packages: tuple[str, ...] = DOCSTRING_PACKAGES) -> Iterator[str]:
    """Documents (one per source file with prose: its paragraphs joined by blank lines), in a fixed order."""
    files = [path for package in packages for path in _package_files(package)]
    random.Random(ORDER_SEED).shuffle(files)
    seen: set[bytes] = set()
    for path in files:
        kept = []
        for paragraph in file_paragraphs(path):
            digest = hashlib.blake2b(paragraph.encode(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                kept.append(paragraph)
        if kept:
            yield "\n\n".join(kept)
