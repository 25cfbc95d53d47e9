"""Plot `bench/results/decode_vs_batch.png` from a decode JSON: decode tokens/s against
concurrent sequences for tpmax and its peers (left), and the fraction of the roofline-bound
throughput each reaches (right).

    python bench/plot.py [--out DIR] [DECODE_JSON]

Needs matplotlib (`pip install -e '.[bench]'`).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def plot(src: Path, dst: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(src.read_text())
    rows = doc["figures"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["backend"], []).append(r)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["batch"])
        xs = [r["batch"] for r in rs]
        ax.plot(xs, [r["tok_s"] for r in rs], marker="o", label=name)
        ax2.plot(xs, [r["roofline_frac"] for r in rs], marker="o", label=name)
    roof_rows = sorted({r["batch"]: r["roofline_tok_s"] for r in rows if not r["backend"].startswith("llama")}.items())
    if roof_rows:
        ax.plot([b for b, _ in roof_rows], [v for _, v in roof_rows], "k--", lw=1,
                label="roofline bound (f32 weights + KV)")
    c = doc["roofline"]["cpu"]
    m = doc["machine"]
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent sequences (decode batch)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title("decode throughput")
    ax2.set_ylabel("fraction of roofline-bound tokens/s")
    ax2.set_title("roofline fraction")
    ax.legend(fontsize=8)
    fig.suptitle(f"{Path(doc['model']).name}, float32 - {m['cpu']}, {m['cores']} cores; "
                 f"roofline {c['peak_read_gbps']:.1f} GB/s read, {c['peak_gflops_f32']:.0f} GFLOP/s f32", fontsize=9)
    fig.tight_layout()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=120)
    print(f"wrote {dst}")
    return dst


def parser():
    ap = common.arg_parser(__doc__)
    ap.add_argument("src", nargs="?", type=Path, metavar="DECODE_JSON",
                    help="the decode results to plot (default: DIR/decode-<this machine>.json)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, metavar="DIR",
                    help="where the decode JSON is looked for and decode_vs_batch.png is written")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print("plot.py: matplotlib is not installed; install it with: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    src = args.src or args.out / f"decode-{common.machine_tag()}.json"
    if not src.is_file():
        print(f"plot.py: {src} does not exist; run bench/decode.py first", file=sys.stderr)
        return 1
    plot(src, args.out / "decode_vs_batch.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
