"""The `tpmax` command line: a thin layer over `tpmax.load` and `tpmax.generate`.

    tpmax generate [--model PATH] [--devices SPEC] ... PROMPT...
    tpmax perplexity [--model PATH] --file TEXT [--context-length N] [--json]
    tpmax info [--model PATH [--devices SPEC]]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpmax", description="Tensor-parallel transformer inference.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
        sp.add_argument("--devices", default="cpu", help="device spec: cpu, cpu:0,1, gpu:0,1, gpu:0,0 (default: cpu)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    g = sub.add_parser("generate", help="generate text for one or more prompts (streamed)")
    model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--stats", action="store_true", help="one JSON line of timings on stderr")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")

    pp = sub.add_parser("perplexity", help="perplexity of a text file")
    model_args(pp)
    pp.add_argument("--file", required=True, type=Path)
    pp.add_argument("--context-length", type=int, default=512)
    pp.add_argument("--json", action="store_true")

    i = sub.add_parser("info", help="backends, devices, NCCL; with --model, its quantization and resident bytes")
    i.add_argument("--model", help="also load this model and show its quantization and bytes per device")
    i.add_argument("--devices", default="cpu", help="devices to load --model on (default: cpu)")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def _generate(args) -> int:
    from .generate import SamplingParams, Stats, generate
    from .loader import load

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    model = load(args.model, devices=args.devices, dtype=args.dtype)
    single = len(args.prompts) == 1

    def on_token(req, tok, piece):
        if single:
            sys.stdout.write(piece)
            sys.stdout.flush()

    stats = Stats()
    outs = generate(model, args.prompts, params, chat=not args.no_chat, on_token=on_token, stats=stats)
    if single:
        sys.stdout.write("\n")
    else:
        for i, c in enumerate(outs):
            sys.stdout.write(f"[{i}] {c.text}\n")
    if args.stats:
        print(json.dumps(stats.as_dict()), file=sys.stderr)
    return 0


def _perplexity(args) -> int:
    from .generate import perplexity
    from .loader import load

    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{args.file}: cannot read ({e})") from None
    model = load(args.model, devices=args.devices, dtype=args.dtype)
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model has no tokenizer")
    ppl, n = perplexity(model, model.tokenizer.encode(text), context_length=args.context_length)
    print(json.dumps({"perplexity": ppl, "tokens": n}) if args.json else f"perplexity {ppl:.4f} over {n} tokens")
    return 0


def _info(args) -> int:
    import numpy as np

    from . import __version__
    from .comm import nccl_available
    from .devices import cupy_version, gpu_count

    info = {"tpmax": __version__, "numpy": np.__version__, "cupy": cupy_version(), "gpus": gpu_count(),
            "nccl": nccl_available()}
    for k, v in info.items():
        print(f"{k:7s} {v}")
    print("devices cpu:0,1,... (virtual)" + (f", gpu:0..{info['gpus'] - 1}" if info["gpus"] else ""))
    if args.model:
        from .loader import load
        from .quant import resident_bytes

        model = load(args.model, devices=args.devices, dtype=args.dtype, progress=False)
        print(f"model   {model!r}")
        print(f"quant   {model.quant.describe() if model.quant else 'none'}")
        for dev, (held, f32) in zip(model.devices, resident_bytes(model.weights)):
            print(f"{str(dev):7s} {held / 2**20:.3f} MiB resident ({held / f32:.2f} of float32 {f32 / 2**20:.3f} MiB)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    run = {"generate": _generate, "perplexity": _perplexity, "info": _info}[args.command]
    try:
        return run(args)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        print(f"tpmax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
