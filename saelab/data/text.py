"""Where documents come from: a built-in corpus, local files, or a Hugging Face dataset.

`iter_documents` yields each document either as a string (to be tokenised) or as a list of token ids (a
pretokenised dataset: rows with `input_ids` or `tokens` instead of text), always in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from saelab.core.errors import MissingDependency, SaelabError
from saelab.data.builtin import DEFAULT_CORPUS, corpus_documents, is_builtin

BUILTIN_DATASET = DEFAULT_CORPUS
TOKEN_COLUMNS = ("input_ids", "tokens")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
ROW_SUFFIXES = (".jsonl", ".json", ".parquet")

Document = str | list[int]


class DatasetFormatError(SaelabError, ValueError):
    """A dataset that cannot be read as documents (missing column, unknown format, bad row)."""


def _document(row: dict[str, Any], text_column: str, where: str) -> Document:
    if text_column in row:
        value = row[text_column]
        if not isinstance(value, str):
            raise DatasetFormatError(f"{where}: column '{text_column}' holds {type(value).__name__}, not text")
        return value
    for column in TOKEN_COLUMNS:
        if column in row:
            return [int(t) for t in row[column]]
    raise DatasetFormatError(
        f"{where} has no text column '{text_column}' (columns: {', '.join(map(str, row)) or 'none'}); "
        f"set data.text_column to one of them"
    )


def _rows_of_file(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingDependency("reading Parquet needs pyarrow: pip install 'saelab[datasets]'") from None
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
        return
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".json" and f.read(1) == "[":  # one JSON array rather than JSON lines
            f.seek(0)
            yield from json.load(f)
            return
        f.seek(0)
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetFormatError(f"{path}:{number} is not valid JSON: {e}") from None


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise MissingDependency(f"{what} needs the datasets package: pip install 'saelab[datasets]'") from None
    return datasets


def _saved_dataset_documents(path: Path, text_column: str, split: str) -> Iterator[Document]:
    """A dataset written by `datasets`' save_to_disk (a Dataset, or a DatasetDict from which `split` is taken)."""
    loaded = _import_datasets(f"reading the saved dataset {path}").load_from_disk(str(path))
    if hasattr(loaded, "keys"):  # DatasetDict
        if split not in loaded:
            raise DatasetFormatError(f"{path} has no split '{split}' (splits: {', '.join(loaded)}); set data.split")
        loaded = loaded[split]
    for number, row in enumerate(loaded):
        yield _document(row, text_column, f"{path} row {number}")


def _local_documents(path: Path, text_column: str) -> Iterator[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in TEXT_SUFFIXES + ROW_SUFFIXES]
    if not files:
        raise DatasetFormatError(f"no {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)} files in {path}")
    for file in files:
        if file.suffix in TEXT_SUFFIXES:
            yield file.read_text(encoding="utf-8")
            continue
        for number, row in enumerate(_rows_of_file(file)):
            if not isinstance(row, dict):
                raise DatasetFormatError(f"{file} row {number} is {type(row).__name__}, not an object with columns")
            yield _document(row, text_column, f"{file} row {number}")


def _hub_documents(name: str, text_column: str, split: str) -> Iterator[Document]:
    datasets = _import_datasets(f"'{name}' is neither a built-in corpus nor a local path; a Hugging Face dataset")
    stream = datasets.load_dataset(name, split=split, streaming=True)
    for number, row in enumerate(stream):
        yield _document(row, text_column, f"dataset '{name}' row {number}")


def iter_documents(
    dataset: str = BUILTIN_DATASET, text_column: str = "text", split: str = "train"
) -> Iterator[Document]:
    """Documents of `dataset`: a built-in corpus ('english-mix', 'docstrings': its training part), a local
    .txt/.md/.rst/.jsonl/.json/.parquet file or a folder of them, a folder written by datasets' save_to_disk, or a
    Hugging Face dataset name (streamed; offline it needs the local datasets cache)."""
    if is_builtin(dataset):
        return corpus_documents(dataset)
    path = Path(dataset).expanduser()
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return _saved_dataset_documents(path, text_column, split)
    if path.exists():
        return _local_documents(path, text_column)
    if path.suffix in TEXT_SUFFIXES + ROW_SUFFIXES or dataset.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset file not found: {dataset}")
    return _hub_documents(dataset, text_column, split)


def tokenize_documents(documents: Iterable[Document], tokenizer) -> Iterator[list[int]]:
    """Token ids of each document without special tokens (packing adds BOS and separators itself)."""
    for document in documents:
        if isinstance(document, str):
            yield tokenizer(document, add_special_tokens=False)["input_ids"]
        else:
            yield document
