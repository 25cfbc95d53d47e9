"""Decode tokens/s and resident weight bytes: float32 against GPTQ int4 and FP8, same run.

One random Llama-shaped model is written three times into a temporary directory — float32
safetensors, GPTQ v1 4-bit (round-to-nearest, group 128, sym) and compressed-tensors FP8
(per-channel scales) — and each is loaded with `tpmax.load` (the quantized ones stay
quantized on the devices, dequantized block by block per matmul). Each is prefilled with the
same prompts and decoded greedily: `--warmup` steps untimed, `--steps` timed.

    python bench/quant_decode.py [--devices cpu] [--batches 1 4] [--steps 16] [--layers 4] [--out DIR]
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from decode import prompts_for, tpmax_decode  # noqa: E402

COLUMNS = ["format", "devices", "batch", "tok_s", "step_ms", "weights_mib", "vs_f32", "linears_mib"]


def hf_config(args) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
            "intermediate_size": args.ffn, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
            "num_hidden_layers": args.layers, "vocab_size": args.vocab, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def checkpoints(args, root: Path) -> dict[str, Path]:
    """The same random weights as float32, GPTQ int4 and FP8 checkpoints under `root`."""
    from safetensors.numpy import save_file

    from tpmax.nn.config import ModelConfig
    from tpmax.core.devices import float8_e4m3fn
    from tpmax.nn.quant import pack_int32
    from tpmax.core.sharding import PARAMS
    from tpmax.nn.weights import random_weights

    config = hf_config(args)
    cfg = ModelConfig.from_hf_config(config, source="bench")
    full = random_weights(cfg, seed=0)
    hf = {}
    for name, a in full.items():
        p = PARAMS[name.rsplit(".", 1)[-1]]
        hf[(f"model.layers.{name.split('.')[1]}." if name.startswith("layers.") else "") + p.hf] = a
    linear = lambda k: k.startswith("model.layers.") and k.endswith("_proj.weight")  # noqa: E731
    out = {}

    def write(fmt, tensors, qc=None):
        d = root / fmt
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(config, **({"quantization_config": qc} if qc else {}))))
        save_file(tensors, str(d / "model.safetensors"))
        out[fmt] = d

    write("float32", hf)
    gs, gptq = args.group, {}
    for k, w in hf.items():
        if not linear(k):
            gptq[k] = w
            continue
        m = k[: -len(".weight")]
        n_out, n_in = w.shape
        wg = w.reshape(n_out, n_in // gs, gs)
        scale = (2 * np.abs(wg).max(-1) / 15).astype(np.float16)  # [out, G] sym: zero 8
        q = np.clip(np.round(wg / scale.astype(np.float32)[..., None]) + 8, 0, 15).reshape(n_out, n_in)
        gptq[m + ".qweight"] = pack_int32(q.T, 4, axis=0)
        gptq[m + ".qzeros"] = pack_int32(np.full((n_in // gs, n_out), 7), 4, axis=1)  # v1: zero - 1
        gptq[m + ".scales"] = np.ascontiguousarray(scale.T)
        gptq[m + ".g_idx"] = (np.arange(n_in) // gs).astype(np.int32)
    write("gptq_int4", gptq, {"quant_method": "gptq", "bits": 4, "group_size": gs, "sym": True, "desc_act": False,
                              "checkpoint_format": "gptq"})
    fp8, f8_keys = {}, set()
    for k, w in hf.items():
        if not linear(k):
            fp8[k] = w
            continue
        scale = (np.abs(w).max(1, keepdims=True) / 448.0).astype(np.float32)
        fp8[k] = (w / scale).astype(float8_e4m3fn).view(np.uint8)
        fp8[k[: -len(".weight")] + ".weight_scale"] = scale
        f8_keys.add(k)
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False}}}}
    write("fp8", fp8, qc)
    _retag(out["fp8"] / "model.safetensors", f8_keys)
    return out


def _retag(path: Path, keys: set[str]) -> None:
    """Rewrite a safetensors file with `keys` (written as U8) tagged F8_E4M3."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for k in keys:
        header[k]["dtype"] = "F8_E4M3"
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


def run(args) -> dict:
    import tpmax
    from tpmax.nn.quant import resident_bytes

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = checkpoints(args, Path(tmp))
        for spec in args.devices:
            f32_total = None
            for fmt, d in dirs.items():
                model = tpmax.load(d, devices=spec, progress=False)
                per_dev = resident_bytes(model.weights)
                held = sum(h for h, _ in per_dev)
                f32_total = f32_total or held
                lin = sum(w.nbytes for layer in model.weights.layers
                          for ws in (layer.w13, layer.w2, [a.wqkv for a in layer.attn], [a.wo for a in layer.attn])
                          for w in ws)
                for batch in args.batches:
                    prompts = prompts_for(batch, args.prompt, model.cfg.vocab_size)
                    step, _, _ = tpmax_decode(model, prompts, args.steps, args.warmup)
                    rows.append({"format": fmt, "devices": spec, "batch": batch, "tok_s": batch / step.median,
                                 "step_ms": step.median * 1e3, "weights_mib": held / 2**20,
                                 "vs_f32": held / f32_total, "linears_mib": lin / 2**20,
                                 "per_device_bytes": [h for h, _ in per_dev], "timing": step.as_dict()})
                    common.print_table(rows[-1:], COLUMNS)
    common.print_table(rows, COLUMNS, title="decode: float32 vs GPTQ int4 vs FP8")
    common.write_json("quant_decode", backend="tpmax", devices=args.devices, model=hf_config(args), dtype="float32",
                      figures=rows, out=args.out)
    return {"rows": rows}


def parser():
    ap = common.arg_parser(__doc__)
    ap.add_argument("--devices", nargs="+", default=["cpu"], metavar="SPEC", help="device specs, one per word")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4], metavar="B", help="decode batch sizes")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--group", type=int, default=128, help="GPTQ group size")
    common.add_out_arg(ap)
    return ap


def main(argv=None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
