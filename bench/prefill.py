"""Prefill throughput: tokens/s for one prompt of 128 / 512 / 2048 tokens, tpmax against its
peers, with the achieved FLOP/s as a fraction of the measured float32 matmul peak.

Each repeat prefills the prompt into an empty KV cache and returns the last token's logits
(the lm_head runs on one row). FLOPs = 2 x layer-matmul params x T + 2 x vocab x D
+ causal attention (see `common.forward_flops`).

    python bench/prefill.py [--devices cpu:0,1 cpu] [--lengths 128 512 2048] [--peers transformers llamacpp]
                            [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import decode  # noqa: E402
import roofline  # noqa: E402

COLUMNS = ["backend", "tokens", "tok_s", "ms", "gflops", "flop_frac"]


def figures(backend: str, T: int, t: common.Timing, *, cfg, roof: dict, **extra) -> dict:
    flops = common.forward_flops(cfg, T, 0, 1)
    s = t.median
    return {"backend": backend, "tokens": T, "tok_s": T / s, "ms": s * 1e3, "gflops": flops / s / 1e9,
            "flop_frac": flops / s / 1e9 / roof["cpu"]["peak_gflops_f32"], "flops": flops,
            "flops_2NT": 2 * cfg.n_params() * T, "timing": t.as_dict(), **extra}


def tpmax_prefill(model, ids: np.ndarray, *, warmup: int, repeats: int) -> common.Timing:
    T = len(ids)
    ex = model.executor
    cache = ex.new_cache(T + 16)

    def once():
        cache.add(0)
        (last,) = ex.run(cache, ex.step([0], [ids]))
        int(np.asarray(last).argmax())
        cache.release(0)

    return common.timed(once, warmup=warmup, repeats=repeats)


def transformers_prefill(model, ids: np.ndarray, *, warmup: int, repeats: int) -> common.Timing:
    import torch

    x = torch.from_numpy(ids)[None]  # [1, T]

    def once():
        with torch.inference_mode():
            int(model(input_ids=x, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())

    return common.timed(once, warmup=warmup, repeats=repeats)


def llamacpp_prefill(llm, ids: np.ndarray, *, warmup: int, repeats: int) -> common.Timing:
    def once():
        llm.reset()
        llm.eval(ids.tolist())
        int(np.argmax(decode.llamacpp_last_logits(llm)))

    return common.timed(once, warmup=warmup, repeats=repeats)


def run(args) -> dict:
    import tpmax

    path = common.model_path(args.model)
    lengths, peers = args.lengths, args.peers
    roof = roofline.measure_verbose(quick=args.quick_roofline)
    reps = lambda T: max(2, args.repeats if T <= 512 else args.repeats - 1)  # noqa: E731
    rows, skipped = [], {}
    for spec in args.devices:
        model = tpmax.load(path, devices=spec, dtype="float32", progress=False)
        cfg = model.cfg
        prompts = {T: decode.prompts_for(1, T, cfg.vocab_size, seed=T)[0] for T in lengths}
        for T in lengths:
            t = tpmax_prefill(model, prompts[T], warmup=1, repeats=reps(T))
            rows.append(figures(f"tpmax[{spec}]", T, t, cfg=cfg, roof=roof))
            common.print_table(rows[-1:], COLUMNS)
        del model
    for peer in common.available_peers(peers, skipped):
        if peer == "transformers":
            hf = decode.load_transformers(path)
            for T in lengths:
                t = transformers_prefill(hf, prompts[T], warmup=1, repeats=reps(T))
                rows.append(figures("transformers", T, t, cfg=cfg, roof=roof, threads=common.cpu_cores()))
                common.print_table(rows[-1:], COLUMNS)
            del hf
        else:
            llm = decode.load_llamacpp(path, max(lengths) + 16)
            for T in lengths:
                t = llamacpp_prefill(llm, prompts[T], warmup=1, repeats=reps(T))
                rows.append(figures("llama.cpp", T, t, cfg=cfg, roof=roof, threads=common.cpu_cores(),
                                    weights="gguf as stored (quantized)"))
                common.print_table(rows[-1:], COLUMNS)
            del llm
    common.print_table(rows, COLUMNS, title=f"prefill, one sequence, last-token logits "
                                            f"(f32 matmul peak {roof['cpu']['peak_gflops_f32']:.1f} GFLOP/s)")
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")
    common.write_json("prefill", backend="numpy", devices=args.devices, model=str(path), dtype="float32",
                      roofline=roof, protocol={"warmup": 1, "tok_s": "tokens / median prefill time",
                                               "flops": "2*layer_params*T + 2*V*D + causal attention"},
                      skipped=skipped, figures=rows, out=args.out)
    return {"rows": rows}


def parser() -> argparse.ArgumentParser:
    ap = common.arg_parser(__doc__)
    common.add_model_args(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048], metavar="T",
                    help="prompt lengths, one run each")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (one fewer above 512 tokens)")
    return ap


def main(argv=None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
