"""The GGUF shard cache (tpmax.checkpoint.shard_cache): damaged entries are found and rebuilt with one
warning, a disk that cannot be written only skips the cache, stale and least recently used
entries go, and `describe` / `clear` show and empty it."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tpmax
from tpmax.checkpoint import shard_cache
from tpmax.checkpoint.loader import load
from test_models import GGUF_CFG, write_gguf

SEQ = [np.arange(7)]
HIT = "from the shard cache"
DAMAGED = "failed its check"


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    """A Q8_0 GGUF inside an empty model cache, and its logits loaded without any cache."""
    monkeypatch.setenv("TPMAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(shard_cache.MAX_BYTES_ENV, raising=False)
    (tmp_path / "cache").mkdir()
    path = tmp_path / "cache" / "m.gguf"
    write_gguf(path, GGUF_CFG, tpmax.random_weights(GGUF_CFG, seed=5, std=0.2), "Q8_0")
    want = tpmax.logits(load(path, devices="cpu:0,1", progress=False, cache_shards=False), SEQ)[0]
    return path, want


def entry_folder():
    (folder,) = [f for f in shard_cache.root().iterdir()]
    return folder


def load_twice(path, capsys, devices="cpu:0,1"):
    """Load, then check the next load is a clean cache hit; returns the first load's stderr."""
    model = load(path, devices=devices)
    err = capsys.readouterr().err
    again = load(path, devices=devices)
    err2 = capsys.readouterr().err
    assert HIT in err2 and DAMAGED not in err2
    np.testing.assert_array_equal(tpmax.logits(again, SEQ)[0], tpmax.logits(model, SEQ)[0])
    return model, err


def scale_a_tensor(folder):
    f = folder / "device1.safetensors"
    with safe_open(str(f), framework="numpy") as h:
        meta = h.metadata()
    t = load_file(str(f))
    t["layers.0.wo"] = t["layers.0.wo"] * np.float32(1.5)
    save_file(t, str(f), metadata=meta)  # the checksum kept: as a writer unaware of it would


def nan_in_a_tensor(folder):
    f = folder / "device0.safetensors"
    with safe_open(str(f), framework="numpy") as h:
        meta = h.metadata()
    t = load_file(str(f))
    t["norm"] = t["norm"].copy()
    t["norm"][3] = np.nan
    save_file(t, str(f), metadata=meta)


def swap_device_files(folder):
    a, b = folder / "device0.safetensors", folder / "device1.safetensors"
    tmp = folder / "x"
    a.rename(tmp), b.rename(a), tmp.rename(b)


def truncate(folder):
    f = folder / "device1.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def edit_header(edit):
    def apply(folder):
        saved = json.loads((folder / "header.json").read_text())
        edit(saved["header"]["metadata"])
        (folder / "header.json").write_text(json.dumps(saved))
    return apply


@pytest.mark.parametrize("damage", [
    scale_a_tensor, nan_in_a_tensor, swap_device_files, truncate,
    edit_header(lambda m: m.update({"llama.rope.freq_base": 1.0})),
    edit_header(lambda m: m.update({"tokenizer.chat_template": "{{ 'injected' }}"})),
    lambda folder: (folder / "header.json").write_text("{not json"),
], ids=["tensor_x1.5", "nan", "swapped", "truncated", "rope_freq_base", "chat_template", "bad_json"])
def test_damaged_entry_is_rebuilt_with_one_warning(gguf, capsys, damage):
    path, want = gguf
    load_twice(path, capsys)
    damage(entry_folder())
    model, err = load_twice(path, capsys)
    assert err.count(DAMAGED) == 1 and HIT not in err
    assert len([line for line in err.splitlines() if "shard cache" in line]) == 1
    np.testing.assert_array_equal(tpmax.logits(model, SEQ)[0], want)


def test_a_full_disk_only_skips_the_cache(gguf, tmp_path):
    """A file-size limit makes every write past 64 KiB fail (EFBIG), as a full disk does: the load
    succeeds, one warning says the cache was not written, no temporary is left behind."""
    path, want = gguf
    script = (
        "import resource, signal, sys, numpy as np, tpmax\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        f"m = tpmax.load({str(path)!r}, devices='cpu:0,1')\n"
        "np.save(sys.stdout.buffer, tpmax.logits(m, [np.arange(7)])[0])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(tpmax.__file__).parents[1]), OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err.count("shard cache: not written") == 1 and "Traceback" not in err
    import io
    np.testing.assert_array_equal(np.load(io.BytesIO(proc.stdout)), want)
    assert not [p for p in shard_cache.root().rglob("*") if p.name.startswith(".")]


def test_stale_entries_of_an_older_file_are_removed(gguf, capsys):
    path, _ = gguf
    load_twice(path, capsys)
    load_twice(path, capsys, devices="cpu:0,1,2")
    old = {f.name for f in shard_cache.root().iterdir()}
    assert len(old) == 2
    os.utime(path, ns=(0, 10**18))  # a new version of the file
    load(path, devices="cpu:0,1", progress=False)
    (new,) = [f.name for f in shard_cache.root().iterdir()]
    assert new not in old


def test_least_recently_used_entries_are_evicted(gguf, capsys, monkeypatch):
    path, _ = gguf
    load(path, devices="cpu:0", progress=False)
    one = shard_cache.entries()[0][1]
    monkeypatch.setenv(shard_cache.MAX_BYTES_ENV, str(int(2.5 * one)))
    folders = {}
    for devs in ("cpu:0,1", "cpu:0", "cpu:0,1,2"):  # tp1 used again after tp2: tp2 is the oldest
        time.sleep(0.05)  # distinct folder mtimes on coarse clocks
        load(path, devices=devs, progress=False)
        folders[devs] = {f for f, _, _ in shard_cache.entries()}
    names = {f.name.rsplit("-", 1)[1] for f in folders["cpu:0,1,2"]}
    assert names == {"tp1", "tp3"}
    assert sum(size for _, size, _ in shard_cache.entries()) <= 2.5 * one


def test_an_entry_over_the_bound_is_not_written(gguf, capsys, monkeypatch):
    path, _ = gguf
    monkeypatch.setenv(shard_cache.MAX_BYTES_ENV, "1000")
    load(path, devices="cpu:0,1")
    assert "shard cache: not written" in capsys.readouterr().err
    assert not shard_cache.entries()
    monkeypatch.setenv(shard_cache.MAX_BYTES_ENV, "0")  # off: not even looked up
    load(path, devices="cpu:0,1", progress=False)
    assert not shard_cache.root().exists() or not any(shard_cache.root().iterdir())
    monkeypatch.setenv(shard_cache.MAX_BYTES_ENV, "2GB")
    with pytest.raises(ValueError, match="TPMAX_CACHE_MAX_BYTES='2GB': expected a whole number of bytes"):
        load(path, devices="cpu:0,1", progress=False)


def test_describe_and_clear(gguf, capsys):
    path, _ = gguf
    load(path, devices="cpu:0,1", progress=False)
    s = shard_cache.summary()
    size = sum(f.stat().st_size for f in shard_cache.root().rglob("*") if f.is_file())
    assert (s["models"], s["model_bytes"], s["shard_entries"], s["shard_bytes"]) == (
        ["m.gguf"], path.stat().st_size, 1, size)
    assert shard_cache.describe().startswith(f"{path.parent}: 1 model(s)")
    assert shard_cache.clear() == size and not shard_cache.root().exists() and path.exists()
    assert shard_cache.summary()["shard_entries"] == 0


def test_cli_info_shows_and_clears_the_cache(gguf, capsys):
    from tpmax.cli import main

    path, _ = gguf
    load(path, devices="cpu:0,1", progress=False)
    assert main(["info"]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("cache ")]
    assert line == [f"cache   {shard_cache.describe()}"] and "1 shard cache entry" in line[0]
    assert main(["info", "--clear-cache"]) == 0
    out = capsys.readouterr().out
    assert "cleared" in out and "0 shard cache entries" in out and not shard_cache.entries()


@pytest.mark.filterwarnings("ignore:dtype")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_are_cached_and_checked(gguf, capsys, dtype):
    path, _ = gguf
    first = load(path, devices="cpu:0,1", dtype=dtype)
    assert HIT not in capsys.readouterr().err
    second = load(path, devices="cpu:0,1", dtype=dtype)
    assert HIT in capsys.readouterr().err
    np.testing.assert_array_equal(tpmax.logits(second, SEQ)[0], tpmax.logits(first, SEQ)[0])
    nan_in_a_tensor(entry_folder())
    load(path, devices="cpu:0,1", dtype=dtype)
    assert capsys.readouterr().err.count(DAMAGED) == 1
