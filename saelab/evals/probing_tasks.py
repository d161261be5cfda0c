"""Binary text-classification tasks for sparse probing: the data files of the `sae-probes` wheel, or your own.

The sae-probes wheel (installed `--no-deps`; saelab never imports the package, whose `__init__` pulls in heavy
dependencies) ships its probing datasets as zstd-compressed CSV files `sae_probes/data/cleaned_data/{N}_{tag}.csv.zst`
with a `prompt` column (the text) and a `target` column (the label). A task is one such file, or a CSV / JSON-lines
file of yours with a text column and a label column. Labels become 0/1 as scikit-learn's `LabelEncoder` (which
sae-probes uses) makes them: the two distinct values sorted, the first is 0 (False/True, 0/1, bigram/not_bigram).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saelab.core.errors import ConfigError, FileFormatError, MissingDependency
from saelab.data import sae_probes_text

PINNED_VERSION = sae_probes_text.PINNED_VERSION  # the version whose files DEFAULT_TASKS names
SUFFIX = ".csv.zst"

DEFAULT_TASKS = (
    "5_hist_fig_ismale",  # entity knowledge from a bare name
    "21_headline_istrump",  # topic / entity in a headline
    "92_glue_sst2",  # sentiment
    "107_hate_offensive",  # toxicity, tweets
    "139_news_class_Politics",  # news topic
    "159_code_Python",  # programming language
    "66_living-room",  # a lexical bigram at the end of the text
    "120_us_timezone_Chicago",  # geography from a place name (a hard control)
)
"""Eight diverse binary tasks, about 0.6M tokens at 1024 train + 1000 test texts each (128 tokens at most)."""

EXCLUDED_TASKS = {
    name: "its negatives are all code snippets (the positives news), so any probe separates them trivially"
    for name in ("161_agnews_0", "162_agnews_1", "163_agnews_2")
}
"""Files of the wheel that are not a fair task: refused by name."""

HOLD_OUT = 50
"""Rows per label kept for testing however large train_size is (sae-probes keeps 100 rows in all)."""


@dataclass(frozen=True)
class ProbingTask:
    """One binary task: texts, their 0/1 labels, and what 0 and 1 stand for."""

    name: str
    texts: tuple[str, ...]
    labels: Tensor
    label_names: tuple[str, str]


def sae_probes_folder() -> Path:
    """The folder of sae-probes' CSV files (the built-in corpus's reader finds it), found without importing it."""
    return sae_probes_text.data_folder(
        "sparse probing's built-in tasks are data files of", "or probe your own files: tasks [] and files"
    )


def sae_probes_version() -> str:
    """The installed sae-probes version (the tasks are a function of it)."""
    return sae_probes_text.version()


def sae_probes_task_names() -> list[str]:
    """Every data file of the wheel by name (`5_hist_fig_ismale`, ...), numerically ordered. Some are not binary
    (`13_us_state` has 50 labels; its one-vs-rest splits such as `119_us_state_TX` are): reading one says so."""
    names = [p.name.removesuffix(SUFFIX) for p in sae_probes_folder().glob(f"*{SUFFIX}")]
    return sorted(names, key=lambda n: (int(n.split("_")[0]) if n.split("_")[0].isdigit() else 10**9, n))


def read_sae_probes_task(name: str) -> ProbingTask:
    """The task of one wheel file: its `prompt` and `target` columns."""
    if name in EXCLUDED_TASKS:
        raise ConfigError(f"sae-probes task '{name}' is excluded: {EXCLUDED_TASKS[name]}")
    path = sae_probes_folder() / f"{name}{SUFFIX}"
    if not path.is_file():
        names = sae_probes_task_names()
        hint = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        raise ConfigError(
            f"unknown sae-probes task '{name}'."
            + (f" Did you mean '{hint[0]}'?" if hint else "")
            + f" The {len(names)} tasks are the file names in {path.parent} ({sae_probes_version()})"
        )
    header, rows = _read_csv(path)
    return _task(name, path, header, rows, "prompt", "target")


def read_task_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> ProbingTask:
    """A task of yours: a .csv (or .csv.zst) file with a header row, or a .jsonl file of one object per line, with
    a text column and a label column of two distinct values. The task is named after the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"probing task file {path} not found")
    name = path.name.split(".")[0]
    rows: list[list[object]] | list[list[str]]
    if path.name.endswith((".csv", SUFFIX)):
        header, rows = _read_csv(path)
    elif path.suffix in (".jsonl", ".ndjson"):
        header, rows = _read_jsonl(path)
    else:
        raise ConfigError(f"probing task file {path}: expected a .csv, .csv.zst or .jsonl file")
    return _task(name, path, header, rows, text_column, label_column)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    if path.name.endswith(SUFFIX):
        try:
            import zstandard
        except ImportError:
            raise MissingDependency(f"reading {path.name} needs the zstandard package: pip install zstandard") from None
        with path.open("rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            data = reader.read()
    else:
        data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FileFormatError(f"{path}: not UTF-8 text") from None
    csv.field_size_limit(1 << 30)  # some texts are whole source files
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise FileFormatError(f"{path}: empty file (expected a header row naming the columns)")
    return rows[0], rows[1:]


def _read_jsonl(path: Path) -> tuple[list[str], list[list[object]]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{path}:{number}: not a JSON object ({e})") from None
        if not isinstance(record, dict):
            raise FileFormatError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    header = list(dict.fromkeys(key for record in records for key in record))
    return header, [[record.get(key) for key in header] for record in records]


def _task(
    name: str, path: Path, header: list[str], rows: list[list], text_column: str, label_column: str
) -> ProbingTask:
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in header:
            raise ConfigError(
                f"{path} has no {role} column '{column}'; its columns: {', '.join(map(str, header)) or 'none'}"
            )
    text_at, label_at = header.index(text_column), header.index(label_column)
    texts, raw = [], []
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise FileFormatError(f"{path}: row {number} has {len(row)} fields, the header {len(header)}")
        text, label = row[text_at], row[label_at]
        if not isinstance(text, str) or not text.strip():
            continue  # nothing to read: no activations
        if label is None or label == "":
            raise FileFormatError(f"{path}: row {number} has no label (column '{label_column}')")
        texts.append(text)
        raw.append(str(label))
    values = sorted(set(raw), key=_label_order)
    if len(values) != 2:
        shown = ", ".join(values[:6]) + (", ..." if len(values) > 6 else "")
        raise ConfigError(
            f"{path}: probing needs exactly 2 distinct labels, column '{label_column}' has {len(values)} ({shown})"
        )
    labels = torch.tensor([values.index(v) for v in raw], dtype=torch.long)
    return ProbingTask(name, tuple(texts), labels, (values[0], values[1]))


def _label_order(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order (so 9 < 10), then strings in string order (False < True)."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def split_task(labels: Tensor, train_size: int, test_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Row indices of a balanced train set and a balanced test set, disjoint and drawn at random (seeded): up to
    train_size/2 rows of each label for training, keeping at least HOLD_OUT rows per label (or half the smaller
    label's rows) for testing, and up to test_size/2 rows of each label of the remainder for testing."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.nonzero(labels == value).flatten() for value in (0, 1)]
    rows = [r[torch.randperm(len(r), generator=generator)] for r in rows]
    smaller = min(len(r) for r in rows)
    n_train = min(train_size // 2, smaller - min(HOLD_OUT, smaller // 2))
    n_test = min(test_size // 2, smaller - n_train)
    if n_train < 2 or n_test < 1:
        raise ConfigError(f"a task needs at least 3 texts of each label to probe; one label has {smaller}")
    train = torch.cat([r[:n_train] for r in rows]).sort().values
    test = torch.cat([r[n_train : n_train + n_test] for r in rows]).sort().values
    return train, test
