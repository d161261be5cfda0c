"""Files, safely: atomic writes (a reader sees the old file or the whole new one, never a half-written one) and
reads of JSON and safetensors files that name the file in their errors."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from saelab.core.errors import FileFormatError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a staging name beside `target`; on success it is renamed to `target` (which must
    not exist or be empty), on any error it is removed. Readers see the whole folder or none."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def replacing_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a staging name beside `target`, then put it in target's place: an existing `target` is
    renamed away and deleted only once the new folder stands in its place. Readers see the old folder or the whole
    new one, never a mix of both; a crash between the two renames leaves the old folder beside target, named
    `.NAME.old-*`. On any error while building, the staging folder is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_safetensors(file: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file, or a FileFormatError that names the file."""
    if not file.is_file():
        raise FileFormatError(f"{file}: file not found")
    try:
        return load_file(file)  # memory-mapped: no second copy of the bytes
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{file}: not a valid safetensors file (truncated or corrupt?): {e}") from None


def read_json(file: Path) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{file}: file not found") from None
    except UnicodeDecodeError:
        raise FileFormatError(f"{file}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{file}: invalid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data
