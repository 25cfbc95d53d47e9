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
        raise LoadError(f"{path}: cannot read ({e.strerror or e})") from None
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


def read_json(path: Path, *, limit: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in `path` (a regular file of at most `limit` bytes, UTF-8)."""
    regular_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise LoadError(f"{path}: larger than {limit >> 20} MiB; not a config file")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LoadError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
