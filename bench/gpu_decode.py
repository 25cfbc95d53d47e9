"""The GPU step in one run: tpmax decode (batch 1 / 8 / 64) and 2,048-token prefill on a
Llama-3-8B-shaped model with random bf16 weights made on the device, against the device's
measured copy bandwidth and bf16 matmul peak, and Hugging Face transformers (eager) on the
same shapes.

Weights are drawn per device, at the shapes the sharding table gives each device
(`tpmax.nn.weights.expected_shapes` + `tpmax.core.sharding.shard_pieces`), with the device's own
random generator: nothing is downloaded and nothing crosses from the host.

    python bench/gpu_decode.py [--devices gpu:0] [--layers 32] [--batches 1,8,64] [--prefill 2048]
    python bench/gpu_decode.py --devices cpu --layers 2 --small    # the CPU smoke mode (tests)

Writes `bench/results/gpu_decode-<device>.json` (or `--out`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import roofline  # noqa: E402

PROMPT = 32  # tokens each decode sequence is prefilled with


# ------------------------------------------------------------------------------------------
# The model: config and random weights on the device.


def bench_config(layers: int | None, small: bool):
    """Llama-3-8B's config, cut to `layers`; `small` shrinks every width (CPU smoke mode)."""
    import tpmax

    cfg = tpmax.ModelConfig.preset("llama-3-8b")
    if small:
        cfg = dataclasses.replace(cfg, vocab_size=512, hidden_size=128, n_heads=8, n_kv_heads=2, head_dim=16,
                                  ffn_size=256, max_seq_len=1024)
    if layers is not None:
        cfg = dataclasses.replace(cfg, n_layers=layers)
    return cfg


def local_shape(name: str, cfg, layout) -> tuple[int, ...]:
    """The shape of one device's shard of table weight `name` (pieces stacked on axis 0)."""
    from tpmax.core.sharding import LAYER_SHARDING, MODEL_SHARDING, shard_pieces
    from tpmax.nn.weights import expected_shapes

    sizes = expected_shapes(cfg)
    symbolic = (LAYER_SHARDING.get(name) or MODEL_SHARDING[name])[0]
    full = tuple(sizes[s] for s in symbolic)
    rows, rest = 0, None
    for idx in shard_pieces(name, full, layout):
        idx = idx + (slice(None),) * (len(full) - len(idx))  # [piece rows, ...]
        piece = tuple(len(range(*s.indices(n))) for s, n in zip(idx, full))
        rows += piece[0]
        rest = piece[1:]
    return (rows,) + rest


def random_weights_on_devices(cfg, devices, dtype, *, seed: int = 0, std: float = 0.02):
    """`tpmax.Weights` with random values drawn on each device (CuPy or NumPy generator).

    Fused tensors (`wqkv` = q;k;v, `w13` = gate;up) get the summed shard shapes of their parts.
    Norm weights are near 1.
    """
    import tpmax
    from tpmax.core.devices import on_device_context

    tp = len(devices)
    cfg.check_tp(tp)
    dt = tpmax.as_dtype(dtype)
    layouts = [cfg.layout(tp, r) for r in range(tp)]
    rngs = []
    for r, d in enumerate(devices):
        with on_device_context(d):
            rngs.append(np.random.default_rng(seed + r) if d.kind == "cpu" else d.xp.random.RandomState(seed + r))

    def make(r: int, names: tuple[str, ...], norm: bool = False):
        shapes = [local_shape(n, cfg, layouts[r]) for n in names]
        shape = (sum(s[0] for s in shapes),) + shapes[0][1:]
        with on_device_context(devices[r]):
            a = rngs[r].standard_normal(shape, dtype=np.float32)  # float32 on the device
            a *= 0.1 if norm else std
            if norm:
                a += 1.0
            return a.astype(dt, copy=False)

    def each(names, norm=False):
        return tuple(make(r, names, norm) for r in range(tp))

    layers = []
    for _ in range(cfg.n_layers):
        wqkv, wo = each(("q_proj", "k_proj", "v_proj")), each(("o_proj",))
        layers.append(tpmax.LayerWeights(
            attn_norm=each(("attn_norm",), True),
            attn=tuple(tpmax.AttentionWeights(wqkv=q, wo=o) for q, o in zip(wqkv, wo)),
            mlp_norm=each(("mlp_norm",), True),
            w13=each(("gate_proj", "up_proj")),
            w2=each(("down_proj",)),
        ))
    embed = each(("embed",))
    lm_head = embed if cfg.tie_embeddings else each(("lm_head",))
    return tpmax.Weights(embed=embed, layers=tuple(layers), norm=each(("norm",), True), lm_head=lm_head)


def new_cache(cfg, devices, dtype, n_seqs: int, tokens_per_seq: int, page_size: int = 16):
    """A paged KV cache with room for `n_seqs` sequences of `tokens_per_seq` tokens each
    (sequences do not share pages, so each is rounded up to whole pages)."""
    import tpmax
    from tpmax.parallel.executor import new_kv_cache

    per_seq = -(-tokens_per_seq // page_size) * page_size
    return new_kv_cache(cfg, devices, str(tpmax.as_dtype(dtype)), n_seqs * per_seq, page_size=page_size)


# ------------------------------------------------------------------------------------------
# tpmax.


def forward(weights, cfg, tokens, offsets, cache, seq_ids, comm):
    """One forward pass of a ragged batch through tpmax's executor (reserve its KV slots,
    compute, commit; roll back on failure). Last-token logits `[B, V]` on device 0."""
    import tpmax

    ex = tpmax.Executor(weights, cfg, comm, cache.params.dtype)
    (last,) = ex.run(cache, ex.step(seq_ids, np.split(np.asarray(tokens), np.asarray(offsets)[1:-1])))
    return last


def greedy(logits) -> np.ndarray:
    """`[B, V]` logits -> `[B]` host token ids (argmax on the device, then one small copy)."""
    import tpmax

    xp = tpmax.xp_of(logits)
    return tpmax.to_numpy(xp.argmax(logits, axis=-1)).astype(np.int64)


def tpmax_decode(weights, cfg, comm, dtype, batch: int, steps: int, warmup: int, sync) -> dict:
    """Prefill `batch` sequences of PROMPT random tokens as one batch, then time greedy steps."""
    cache = new_cache(cfg, comm.devices, dtype, batch, PROMPT + warmup + steps)
    seqs = list(range(batch))
    for s in seqs:
        cache.add(s)
    prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, size=(batch, PROMPT))
    nxt = greedy(forward(weights, cfg, prompts.reshape(-1), np.arange(0, batch * PROMPT + 1, PROMPT), cache, seqs,
                         comm))
    offs = np.arange(batch + 1)
    times = []
    for _ in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        nxt = greedy(forward(weights, cfg, nxt, offs, cache, seqs, comm))  # greedy() copies to host: a sync
        times.append(time.perf_counter() - t0)
    return {"timing": common.step_timing(times, warmup), "context": PROMPT + warmup + steps // 2}


def tpmax_prefill(weights, cfg, comm, dtype, T: int, repeats: int, sync) -> common.Timing:
    """One `T`-token prompt into an empty cache, last-token logits; median of `repeats`."""
    cache = new_cache(cfg, comm.devices, dtype, 1, T)
    tokens = np.random.default_rng(T).integers(0, cfg.vocab_size, size=T)

    def once():
        cache.add(0)
        forward(weights, cfg, tokens, np.array([0, T]), cache, [0], comm)
        cache.release(0)

    return common.timed(once, warmup=1, repeats=repeats, sync=sync)


# ------------------------------------------------------------------------------------------
# Hugging Face transformers (eager attention) on the same shapes.


def hf_model(cfg, device: str, dtype: str):
    """`LlamaForCausalLM` with random weights initialised on `device` (no download)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    s = cfg.rope_scaling
    rope_scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
                         max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                         attn_implementation="eager")
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.device(device):  # parameters are created (and randomly initialised) on the device
        model = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch_dtype)
    return model.eval()


def hf_prefill(model, ids):
    """Forward over `ids [1, T]` computing the lm_head for the last token only."""
    try:
        return model(ids, use_cache=False, logits_to_keep=1)
    except TypeError:  # transformers < 4.48
        return model(ids, use_cache=False, num_logits_to_keep=1)


def hf_run(cfg, device: str, dtype: str, batches, steps: int, warmup: int, prefill: int, repeats: int) -> dict:
    import torch

    model = hf_model(cfg, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out: dict = {"attn_implementation": "eager", "torch": torch.__version__, "decode": [], "prefill": None}
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(0, cfg.vocab_size, (b, PROMPT), device=device)
            res = model(ids, use_cache=True)
            past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            times = []
            for _ in range(warmup + steps):
                sync()
                t0 = time.perf_counter()
                res = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                nxt.cpu()
                times.append(time.perf_counter() - t0)
            t = common.step_timing(times, warmup)
            out["decode"].append({"batch": b, "tokens_per_s": b / t.median, "timing": t.as_dict()})
            del past, res
        ids = torch.randint(0, cfg.vocab_size, (1, prefill), device=device)
        t = common.timed(lambda: hf_prefill(model, ids), warmup=1, repeats=repeats, sync=sync)
        out["prefill"] = {"tokens": prefill, "tokens_per_s": prefill / t.median, "timing": t.as_dict()}
    del model
    return out


# ------------------------------------------------------------------------------------------
# Main.


def device_name(dev) -> str:
    """The device's name: the GPU's (CUDA properties) or the CPU model."""
    if dev.kind == "gpu":
        p = dev.xp.cuda.runtime.getDeviceProperties(dev.id)
        return p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
    return common.cpu_model()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def main(argv=None) -> int:
    import tpmax

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="gpu:0", help="tpmax device spec (default gpu:0)")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to N layers (default: all 32)")
    ap.add_argument("--small", action="store_true", help="scaled-down widths and sizes (CPU smoke test)")
    ap.add_argument("--batches", nargs="+", type=int, default=None, metavar="B",
                    help="decode batch sizes (default 1 8 64; small: 1 2 4)")
    ap.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 2048; small: 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32; small: 3)")
    ap.add_argument("--dtype", default=None, help="weight dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--peers", nargs="*", default=["transformers"], choices=["transformers"], metavar="PEER",
                    help="peers to run (default transformers; a bare --peers runs none)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_decode-<device>.json)")
    args = ap.parse_args(argv)

    devices = tpmax.devices(args.devices)
    comm = tpmax.communicator(devices)
    d0 = devices[0]
    small = args.small
    cfg = bench_config(args.layers, small)
    dtype = args.dtype or ("bfloat16" if d0.kind == "gpu" else "float32")
    batches = args.batches or ([1, 2, 4] if small else [1, 8, 64])
    T = args.prefill or (32 if small else 2048)
    steps = args.steps or (3 if small else 32)
    warmup = 1 if small else 3
    repeats = 2 if small else 5
    sync = (lambda: tpmax.synchronize(devices)) if d0.kind == "gpu" else (lambda: None)

    print(f"roofline of {d0} ...", flush=True)
    roof = (roofline.device_roofline(d0, copy_mib=8, matmul_n=128, repeats=3) if small
            else roofline.device_roofline(d0))
    print(f"  copy {roof['copy_gbps']:.1f} GB/s, {roof['matmul_dtype']} matmul {roof['matmul_tflops']:.2f} TFLOP/s")

    print(f"random {dtype} weights on {args.devices}: {cfg.n_layers} layers, {cfg.n_params() / 1e6:,.1f} M params",
          flush=True)
    t0 = time.perf_counter()
    weights = random_weights_on_devices(cfg, devices, dtype)
    sync()
    build_s = time.perf_counter() - t0
    itemsize = tpmax.as_dtype(dtype).itemsize
    wbytes = common.weight_bytes(cfg, itemsize)

    decode_rows = []
    for b in batches:
        r = tpmax_decode(weights, cfg, comm, dtype, b, steps, warmup, sync)
        s = r["timing"].median
        moved = wbytes + b * common.kv_bytes(cfg, r["context"], itemsize)
        gbps = moved / s / 1e9
        decode_rows.append({"batch": b, "tokens_per_s": b / s, "step_ms": s * 1e3, "achieved_gbps": gbps,
                            "bw_frac": gbps / roof["copy_gbps"], "bytes_per_step": moved,
                            "mean_context": r["context"], "timing": r["timing"].as_dict()})
    pt = tpmax_prefill(weights, cfg, comm, dtype, T, repeats, sync)
    flops = common.forward_flops(cfg, T)
    tflops = flops / pt.median / 1e12
    prefill = {"tokens": T, "tokens_per_s": T / pt.median, "achieved_tflops": tflops,
               "flop_frac": tflops / roof["matmul_tflops"], "flops": flops, "timing": pt.as_dict()}
    del weights
    sync()
    if d0.kind == "gpu":  # hand CuPy's cached blocks back before torch allocates
        d0.xp.get_default_memory_pool().free_all_blocks()

    peer: dict
    why = common.peer_status("transformers") if "transformers" in args.peers else "not requested (--peers)"
    if why:
        print(f"skipping transformers: {why}")
        peer = {"skipped": why}
    else:
        print("transformers (eager) ...", flush=True)
        torch_device = f"cuda:{d0.id}" if d0.kind == "gpu" else "cpu"
        peer = hf_run(cfg, torch_device, dtype, batches, steps, warmup, T, repeats)
        for row in peer["decode"]:
            row["achieved_gbps"] = wbytes / (row["timing"]["median_s"]) / 1e9

    rows = [{"backend": "tpmax", "what": f"decode b={r['batch']}", "tok_s": r["tokens_per_s"],
             "rate": r["achieved_gbps"], "frac": r["bw_frac"]} for r in decode_rows]
    rows.append({"backend": "tpmax", "what": f"prefill {T}", "tok_s": prefill["tokens_per_s"], "rate": tflops,
                 "frac": prefill["flop_frac"]})
    for r in peer.get("decode", []):
        rows.append({"backend": "transformers", "what": f"decode b={r['batch']}", "tok_s": r["tokens_per_s"]})
    if peer.get("prefill"):
        rows.append({"backend": "transformers", "what": f"prefill {T}", "tok_s": peer["prefill"]["tokens_per_s"]})
    common.print_table(rows, ["backend", "what", "tok_s", "rate", "frac"],
                       title=f"{device_name(d0)} ({args.devices}); rate = GB/s (decode) or TFLOP/s (prefill)")

    name = device_name(d0)
    doc = {
        "benchmark": "gpu_decode",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "devices": args.devices,
        "machine": common.machine_info(),
        "model": {"preset": "llama-3-8b", "small": small, "n_layers": cfg.n_layers, "n_params": cfg.n_params(),
                  "dtype": dtype, "weight_bytes": wbytes, "build_s": build_s},
        "config": {"batches": batches, "prompt": PROMPT, "steps": steps, "warmup": warmup, "prefill": T,
                   "repeats": repeats},
        "roofline": roof,
        "figures": {"decode": decode_rows, "prefill": prefill, "transformers": peer},
    }
    out = Path(args.out) if args.out else common.RESULTS / f"gpu_decode-{slug(name)}.json"
    common.save_json(doc, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
