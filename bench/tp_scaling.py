"""Tensor-parallel scaling: tpmax decode (batch 1) and 128-token prefill tokens/s at TP 1, 2,
4 on virtual CPU devices (and on GPUs when present), with speed-up over TP 1.

Virtual CPU devices share this machine's cores (one worker thread per device, each calling a
multi-threaded BLAS), so on CPU this measures the overhead of the TP structure - the split
matmuls, the per-device threads, the in-process all-reduces - not extra hardware.

    python bench/tp_scaling.py [--devices cpu cpu:0,1 cpu:0,1,2,3] [--steps 24] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import decode  # noqa: E402
import prefill  # noqa: E402
import roofline  # noqa: E402

COLUMNS = ["devices", "tp", "decode_tok_s", "decode_speedup", "decode_bw_frac", "prefill_tok_s",
           "prefill_speedup", "prefill_flop_frac"]


def default_specs() -> list[str]:
    import tpmax

    specs = ["cpu", "cpu:0,1", "cpu:0,1,2,3"]
    n = tpmax.gpu_count()
    specs += ["gpu:" + ",".join(map(str, range(k))) for k in (1, 2, 4, 8) if k <= n]
    return specs


def run(args) -> dict:
    import tpmax

    path = common.model_path(args.model)
    specs = args.devices or default_specs()
    roof = roofline.measure_verbose(quick=args.quick_roofline)
    rows = []
    for spec in specs:
        model = tpmax.load(path, devices=spec, dtype="float32", progress=False)
        cfg = model.cfg
        ids = decode.prompts_for(1, args.prompt, cfg.vocab_size)
        t, _, _ = decode.tpmax_decode(model, ids, args.steps, args.warmup)
        d = decode.figures(spec, 1, t, cfg=cfg, wbytes=common.weight_bytes(cfg, 4),
                           context=args.prompt + args.warmup + (args.steps + 1) / 2, roof=roof)
        p = prefill.figures(spec, args.prefill, prefill.tpmax_prefill(
            model, decode.prompts_for(1, args.prefill, cfg.vocab_size, seed=args.prefill)[0], warmup=1,
            repeats=args.repeats), cfg=cfg, roof=roof)
        rows.append({"devices": spec, "tp": len(model.devices), "decode_tok_s": d["tok_s"],
                     "decode_bw_frac": d["bw_frac"], "prefill_tok_s": p["tok_s"], "prefill_flop_frac": p["flop_frac"],
                     "decode": d, "prefill": p})
        del model
        kind = lambda r: r["devices"].split(":")[0]  # noqa: E731
        same = [r for r in rows if kind(r) == kind(rows[-1])]
        base = next((r for r in same if r["tp"] == 1), same[0])
        rows[-1]["decode_speedup"] = rows[-1]["decode_tok_s"] / base["decode_tok_s"]
        rows[-1]["prefill_speedup"] = rows[-1]["prefill_tok_s"] / base["prefill_tok_s"]
        common.print_table(rows[-1:], COLUMNS)
    common.print_table(rows, COLUMNS, title=f"TP scaling: decode batch 1 (prompt {args.prompt}, {args.steps} timed "
                                            f"steps), prefill {args.prefill} tokens")
    common.write_json("tp_scaling", backend="numpy", devices=specs, model=str(path), dtype="float32", roofline=roof,
                      protocol={"decode_batch": 1, "prompt_tokens": args.prompt, "warmup_steps": args.warmup,
                                "timed_steps": args.steps, "prefill_tokens": args.prefill,
                                "speedup": "over TP 1 of the same device kind"},
                      figures=rows, out=args.out)
    return {"rows": rows}


def parser() -> argparse.ArgumentParser:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--devices", nargs="+", default=None, metavar="SPEC",
                    help="device specs, one per word (default: cpu cpu:0,1 cpu:0,1,2,3, plus gpu:0 gpu:0,1 "
                         "... when GPUs are present)")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps")
    ap.add_argument("--prompt", type=int, default=32, help="decode prompt tokens")
    ap.add_argument("--prefill", type=int, default=128, help="prefill tokens")
    ap.add_argument("--repeats", type=int, default=5, help="timed prefill repeats")
    ap.add_argument("--model", default=None, help="GGUF file (default: tpmax's default model)")
    ap.add_argument("--quick-roofline", action="store_true", help="fewer roofline repeats")
    common.add_out_arg(ap)
    return ap


def main(argv=None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
