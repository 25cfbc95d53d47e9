"""Run under mpirun by tests/test_mpi_model.py: the Python API over MPI ranks, every rank
running this same program; every rank writes what it saw as JSON (rank r to OUT.json with
`.rank{r}` before the suffix, rank 0 to OUT.json itself).

Usage: mpirun -n R python model_worker.py MODE DEVICES OUT.json
  fixtures  logits of every HF fixture (one ragged batch each) and the checkpoint bytes this
            rank read for it (quantized fixtures too), then a bad request (a token id
            outside the vocabulary: rank 0 refuses it before anything is broadcast) and
            the next request served
  smollm2   the default model: greedy answer of the reference prompt and perplexity
  kill      rank 1 SIGKILLs itself while rank 0 runs forward passes (the job must end)
  disagree  rank 1 loads float16 where rank 0 loads float32 (every rank stops, rank 0 says why)
  stop      rank 1 SIGSTOPs itself while rank 0 runs forward passes (rank 0 must end the job after
            TPMAX_MPI_TIMEOUT seconds)
"""
import json
import os
import signal
import sys
from pathlib import Path

import safetensors.numpy as stn

import tpmax
import tpmax.parallel.mpi
from tpmax.generation.api import encode_prompt
from tpmax.parallel.executor import LeaderError

FIX = Path(__file__).resolve().parent.parent / "fixtures"
HF_CASES = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "granite", "llama_sharded"]
QUANT_CASES = ["llama_gptq", "qwen2_gptq", "llama_fp8", "llama_fp8_block"]


def fixture_ids(case):
    r = stn.load_file(str(FIX / "hf" / case / "reference.safetensors"))
    return [r[f"input_ids_{i}"].tolist() for i in range(3)]


def fixtures(devices):
    out = {"read": {}}
    for case in QUANT_CASES:
        out["read"][case] = tpmax.load(FIX / "hf" / case, devices=devices, progress=False).bytes_read
    for case in HF_CASES:
        model = tpmax.load(FIX / "hf" / case, devices=devices, progress=False)
        out["read"][case] = model.bytes_read
        out[case] = [lg.tolist() for lg in tpmax.logits(model, fixture_ids(case))]
    try:
        tpmax.logits(model, [[1, 2, 10**6]])
        out["bad"] = "accepted"
    except (ValueError, LeaderError) as e:
        out["bad"] = f"{type(e).__name__}: {e}"
    out["after_bad"] = [lg.tolist() for lg in tpmax.logits(model, fixture_ids(HF_CASES[-1])[:1])]
    return out


def smollm2(devices):
    ref = json.loads((FIX / "smollm2_reference.json").read_text())
    model = tpmax.load(None, devices=devices, progress=False)
    ids = encode_prompt(model, ref["chat"]["messages"][0]["content"])
    engine_params = tpmax.SamplingParams(max_new_tokens=16, stop_token_ids=())
    (c,) = tpmax.generate(model, [ref["chat"]["messages"][0]["content"]], engine_params)
    text = (FIX / "perplexity.txt").read_text(encoding="utf-8")
    ppl, n = tpmax.perplexity(model, model.tokenizer.encode(text), context_length=ref["perplexity"]["context_length"])
    seeded = tpmax.generate(model, ["Name a color.", "Count to three."],
                            tpmax.SamplingParams(max_new_tokens=12, temperature=0.8, seed=7))
    return {"prompt_ids": ids, "tokens": list(c.tokens), "perplexity": ppl, "scored": n,
            "seeded": [s.text for s in seeded], "rank_devices": [str(d) for d in model.devices]}


def kill(devices, sig=signal.SIGKILL):
    model = tpmax.load(FIX / "hf" / "llama", devices=devices, progress=False)
    if model.comm.mpi.Get_rank() == 1:
        os.kill(os.getpid(), sig)
    for _ in range(20):  # rank 0 leads passes until the job ends
        tpmax.logits(model, [list(range(3, 40))] * 4)
    return {}


def disagree(devices):
    tpmax.load(FIX / "hf" / "llama", devices=devices, progress=False,
               dtype="float16" if tpmax.parallel.mpi.world().rank == 1 else "float32")
    return {}


if __name__ == "__main__":
    mode, devices, out = sys.argv[1:4]
    result = {"fixtures": fixtures, "smollm2": smollm2, "kill": kill,
              "stop": lambda d: kill(d, signal.SIGSTOP), "disagree": disagree}[mode](devices)
    rank, out = tpmax.parallel.mpi.world().rank, Path(out)
    (out.with_suffix(f".rank{rank}{out.suffix}") if rank else out).write_text(json.dumps(result))
