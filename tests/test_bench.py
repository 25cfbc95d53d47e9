"""The benchmark scripts' command lines: one list syntax, --help everywhere, quick runs kept
out of the committed bench/results/, a clear message when matplotlib is missing. Nothing
here runs a benchmark."""
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


@pytest.fixture(scope="module")
def bench(request):
    sys.path.insert(0, str(BENCH))
    request.addfinalizer(lambda: sys.path.remove(str(BENCH)))
    return {m: importlib.import_module(m) for m in ("common", "decode", "prefill", "tp_scaling", "quant_decode", "serve", "plot",
                                                        "run_all")}


def test_plot_help_and_missing_matplotlib(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "plot.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--out" in r.stdout, r.stderr
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', '--out', sys.argv[1]]; "
            f"runpy.run_path({str(BENCH / 'plot.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", hide, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "pip install -e '.[bench]'" in r.stderr, r.stderr


def test_one_list_syntax(bench):
    a = bench["decode"].parser().parse_args(["--devices", "cpu:0,1", "cpu", "--batches", "1", "4", "--peers"])
    assert (a.devices, a.batches, a.peers) == (["cpu:0,1", "cpu"], [1, 4], [])
    a = bench["prefill"].parser().parse_args(["--lengths", "128", "512", "--peers", "transformers"])
    assert (a.devices, a.lengths, a.peers) == (["cpu:0,1", "cpu"], [128, 512], ["transformers"])
    a = bench["tp_scaling"].parser().parse_args(["--steps", "8", "--repeats", "2"])
    assert (a.steps, a.repeats) == (8, 2)
    with pytest.raises(SystemExit):
        bench["decode"].parser().parse_args(["--peers", "torch"])


def test_run_all_commands_parse_and_quick_runs_stay_out_of_results(bench, tmp_path):
    calls = []
    for argv in (["--quick"], []):
        calls.clear()
        assert bench["run_all"].main(argv, run=lambda cmd: calls.append(cmd) or 0) == 0
        outs = set()
        for _, script, *args in calls:
            name = Path(script).stem
            if name != "roofline":
                parsed = bench[name].parser().parse_args(args)  # every command run_all gives is valid
                outs.add(Path(parsed.out))
            assert "--out" in args
        assert len(outs) == 1
        out = outs.pop()
        if argv == ["--quick"]:  # a fresh, empty temp dir
            assert out.parent == Path(tempfile.gettempdir()) and out.name.startswith("tpmax-bench-quick-")
            out.rmdir()
        else:
            assert out == bench["common"].RESULTS


def test_run_all_reports_failures(bench, tmp_path):
    calls = []
    failing = lambda cmd: calls.append(cmd) or (3 if Path(cmd[1]).stem == "prefill" else 0)  # noqa: E731
    assert bench["run_all"].main(["--quick", "--out", str(tmp_path / "o")], run=failing) == 1
    assert len(calls) == 7 and all(c[c.index("--out") + 1] == str(tmp_path / "o") for c in calls)
