"""Reading what a checkpoint names, safely: files must be regular files inside the model
directory (no `../`, absolute paths, symlinks out, FIFOs or devices), and JSON is read with a
size limit and decoded as UTF-8. Every failure is a `LoadError` naming the file.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import LoadError

MAX_JSON_BYTES = 256 << 20  # tokenizer.json of the largest vocabularies is ~20 MiB


def regular_file(path: Path) -> Path:
    """`path` if it names a regular file (after symlinks); else LoadError. Never opens it, so a
    FIFO or a device cannot block or stream forever."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise LoadError(f"{path}: cannot open ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise LoadError(f"{path}: is a directory, not a regular file")
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(f"{path}: not a regular file")
    return path


def inside(directory: Path, name: str) -> Path:
    """The file `name` (as a checkpoint writes it, relative) inside `directory`: it must not
    leave the directory (`..`, absolute paths, symlinks pointing out) and must be a regular file.

    One exception, the Hugging Face hub cache's own layout: in `models--org--name/snapshots/REV/`
    the files are symlinks into `models--org--name/blobs/`, which is allowed.
    """
    if not isinstance(name, str) or not name or "\0" in name or Path(name).is_absolute():
        raise LoadError(f"{directory}: file {name!r} is outside the model directory")
    if ".." in Path(name).parts:
        raise LoadError(f"{directory}: file {name!r} is outside the model directory")
    root = directory.resolve()
    path = (directory / name).resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(a in path.parents for a in allowed):
        raise LoadError(f"{directory}: file {name!r} is outside the model directory (it resolves to {path})")
    return regular_file(path)


def read_text(path: Path, *, limit: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of `path` (a regular file of at most `limit` bytes; a BOM is dropped)."""
    regular_file(path)
    try:
        with open(path, "rb") as f:
            return text_of(f, name=str(path), limit=limit)
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror or e})") from None


def text_of(stream, *, name: str, limit: int) -> str:
    """The UTF-8 text of a binary stream (a file, stdin) of at most `limit` bytes; a BOM is
    dropped. Errors name `name`."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise LoadError(f"{name}: larger than the {limit:,}-byte limit; refusing to read it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoadError(f"{name}: not UTF-8 ({e.reason} at byte {e.start})") from None


def parse_json(path: Path, text: str):
    """`text` (read from `path`) as JSON; errors name the file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise LoadError(f"{path}: invalid JSON (nested too deeply)") from None


def read_json(path: Path, *, limit: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in `path` (a regular file of at most `limit` bytes, UTF-8)."""
    value = parse_json(path, read_text(path, limit=limit))
    if not isinstance(value, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
