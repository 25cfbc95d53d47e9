"""Decode throughput: tokens/s for 1..N concurrent sequences, tpmax against its peers, with
the achieved weight bandwidth and FLOP/s as fractions of the measured machine roofline.

Every backend gets the same prompts (`--prompt` random token ids per sequence, equal
lengths), prefills them as one batch, then decodes greedily: `--warmup` steps untimed,
`--steps` steps timed one by one. tokens/s = batch / median step time.

    python bench/decode.py [--devices cpu:0,1 cpu] [--batches 1 2 4 8 16 32] [--steps 32]
                           [--peers transformers llamacpp] [--model PATH.gguf] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import roofline  # noqa: E402

COLUMNS = ["backend", "batch", "tok_s", "step_ms", "weight_gbps", "bw_frac", "gflops", "flop_frac",
           "roofline_tok_s", "roofline_frac"]


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """`[batch, length]` token ids, the same for every backend (ids kept clear of specials)."""
    return np.random.default_rng(seed).integers(100, vocab, size=(batch, length), dtype=np.int64)


def figures(backend: str, batch: int, step: common.Timing, *, cfg, wbytes: int, context: int, roof: dict,
            **extra) -> dict:
    """One row: tokens/s and what the step read and computed, against the roofline.

    The roofline bound for a step is max(bytes / peak_read, flops / peak_flops), where bytes =
    weights + every sequence's K/V at the mean context of the timed steps.
    """
    c = roof["cpu"]
    s = step.median
    kv = batch * common.kv_bytes(cfg, context)
    flops = batch * common.forward_flops(cfg, 1, context)
    bound_s = max((wbytes + kv) / (c["peak_read_gbps"] * 1e9), flops / (c["peak_gflops_f32"] * 1e9))
    return {
        "backend": backend, "batch": batch, "tok_s": batch / s, "step_ms": s * 1e3,
        "weight_gbps": wbytes / s / 1e9, "bw_frac": wbytes / s / 1e9 / c["peak_read_gbps"],
        "kv_gbps": kv / s / 1e9, "gflops": flops / s / 1e9, "flop_frac": flops / s / 1e9 / c["peak_gflops_f32"],
        "roofline_tok_s": batch / bound_s, "roofline_frac": bound_s / s,
        "weight_bytes": wbytes, "kv_bytes_per_step": kv, "flops_per_step": flops, "mean_context": context,
        "timing": step.as_dict(), **extra,
    }


# ------------------------------------------------------------------------------------------
# tpmax.


def tpmax_decode(model, prompts: np.ndarray, steps: int, warmup: int) -> tuple[common.Timing, list[int], float]:
    """Prefill `prompts [B, P]` as one ragged batch, then decode greedily step by step.

    Returns (step timing, batch row 0's generated tokens, prefill seconds).
    """
    B, P = prompts.shape
    ex = model.executor
    cache = ex.new_cache(B * (P + warmup + steps + 16))
    seqs = list(range(B))
    for s in seqs:
        cache.add(s)
    t0 = time.perf_counter()
    (last,) = ex.run(cache, ex.step(seqs, prompts))  # reserve, forward, commit
    prefill_s = time.perf_counter() - t0
    nxt = np.asarray(last).argmax(-1)  # [B]
    out, times = [int(nxt[0])], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        (last,) = ex.run(cache, ex.step(seqs, nxt[:, None]))
        nxt = np.asarray(last).argmax(-1)
        times.append(time.perf_counter() - t0)
        out.append(int(nxt[0]))
    for s in seqs:
        cache.release(s)
    return common.step_timing(times, warmup), out, prefill_s


# ------------------------------------------------------------------------------------------
# Peers.


def load_transformers(path: Path):
    torch = common.set_torch_threads()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def transformers_decode(model, prompts: np.ndarray, steps: int, warmup: int):
    """Same protocol as `tpmax_decode` with a Hugging Face model and its KV cache: one batch
    row per sequence (equal prompt lengths, so no padding or mask)."""
    import torch

    with torch.inference_mode():
        ids = torch.from_numpy(prompts)
        t0 = time.perf_counter()
        o = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        out, times = [int(nxt[0, 0])], []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            o = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
            out.append(int(nxt[0, 0]))
    return common.step_timing(times, warmup), out, prefill_s


def load_llamacpp(path: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=common.cpu_cores(),
                 n_threads_batch=common.cpu_cores(), verbose=False)


def llamacpp_last_logits(llm) -> np.ndarray:
    """`[V]` logits of the last token evaluated (`Llama.scores` is only filled with
    logits_all=True, which would compute the lm_head for every prompt token)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def llamacpp_decode(llm, prompt: np.ndarray, steps: int, warmup: int):
    """Batch 1 only: llama.cpp's multi-sequence batches need its low-level C API."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt.tolist())
    prefill_s = time.perf_counter() - t0
    nxt = int(np.argmax(llamacpp_last_logits(llm)))
    out, times = [nxt], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        llm.eval([nxt])
        nxt = int(np.argmax(llamacpp_last_logits(llm)))
        times.append(time.perf_counter() - t0)
        out.append(nxt)
    return common.step_timing(times, warmup), out, prefill_s


def gguf_data_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF file: what llama.cpp reads per decode step (quantized)."""
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(str(path)).tensors))


# ------------------------------------------------------------------------------------------
# CLI.


def run(args) -> dict:
    import tpmax

    path = common.model_path(args.model)
    batches, peers, specs = args.batches, args.peers, args.devices
    roof = roofline.measure_verbose(quick=args.quick_roofline)
    P, W, S = args.prompt, args.warmup, args.steps
    ctx = P + W + (S + 1) / 2  # mean cache length over the timed steps
    rows, samples, skipped = [], {}, {}
    for spec in specs:
        model = tpmax.load(path, devices=spec, dtype="float32", progress=False)
        cfg = model.cfg
        wbytes = common.weight_bytes(cfg, 4)
        label = f"tpmax[{spec}]"
        for b in batches:
            t, toks, pf = tpmax_decode(model, prompts_for(b, P, cfg.vocab_size), S, W)
            rows.append(figures(label, b, t, cfg=cfg, wbytes=wbytes, context=ctx, roof=roof, prefill_s=pf,
                                tp=len(model.devices)))
            samples.setdefault(label, toks)
            common.print_table(rows[-1:], COLUMNS)
        del model
    label = f"tpmax[{specs[0]}]"

    for peer in common.available_peers(peers, skipped):
        if peer == "transformers":
            hf = load_transformers(path)
            for b in batches:
                t, toks, pf = transformers_decode(hf, prompts_for(b, P, cfg.vocab_size), S, W)
                rows.append(figures("transformers", b, t, cfg=cfg, wbytes=wbytes, context=ctx, roof=roof,
                                    prefill_s=pf, threads=common.cpu_cores()))
                samples.setdefault("transformers", toks)
                common.print_table(rows[-1:], COLUMNS)
            del hf
        else:
            llm = load_llamacpp(path, P + W + S + 16)
            qbytes = gguf_data_bytes(path)
            t, toks, pf = llamacpp_decode(llm, prompts_for(1, P, cfg.vocab_size)[0], S, W)
            name = "llama.cpp (gguf as stored)"
            rows.append(figures(name, 1, t, cfg=cfg, wbytes=qbytes, context=ctx, roof=roof, prefill_s=pf,
                                weights="gguf tensors as stored (quantized)", threads=common.cpu_cores()))
            samples[name] = toks
            common.print_table(rows[-1:], COLUMNS)
            skipped["llama.cpp batch>1"] = "llama-cpp-python's high-level API decodes one sequence"
            del llm

    common.print_table(rows, COLUMNS, title=f"decode, prompt {P} tokens, {S} timed steps after {W} warm-up "
                                            f"(roofline: {roof['cpu']['peak_read_gbps']:.2f} GB/s, "
                                            f"{roof['cpu']['peak_gflops_f32']:.1f} GFLOP/s)")
    ref = samples.get(label, [])
    agree = {k: sum(a == b for a, b in zip(ref, v)) / max(1, min(len(ref), len(v)))
             for k, v in samples.items() if k != label}
    if agree:
        print("greedy tokens (batch row 0) agreeing with tpmax:", {k: f"{v:.0%}" for k, v in agree.items()})
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")
    common.write_json("decode", backend="numpy", devices=specs, model=str(path), dtype="float32",
                      roofline=roof, protocol={"prompt_tokens": P, "warmup_steps": W, "timed_steps": S,
                                               "tok_s": "batch / median step time", "sampling": "greedy"},
                      model_config={"n_params": cfg.n_params(), "weight_bytes_f32": wbytes},
                      skipped=skipped, greedy_agreement_with_tpmax=agree, figures=rows, out=args.out)
    return {"rows": rows}


def parser() -> argparse.ArgumentParser:
    ap = common.arg_parser(__doc__)
    common.add_model_args(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], metavar="B",
                    help="concurrent sequences, one run each")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps before them")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    return ap


def main(argv=None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
