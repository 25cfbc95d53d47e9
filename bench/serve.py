"""Serving throughput and latency: N concurrent streaming clients against `tpmax serve`
(and llama.cpp's OpenAI server when `llama-cpp-python[server]` is installed).

Each client sends `--requests` chat completions one after another (streamed, greedy,
`--max-tokens` output tokens, EOS ignored so every request has the same length; prompts
differ per request). Per concurrency level: requests/s and output tokens/s over the wall
time, time to first token (TTFT) and inter-token latency (ITL: gaps between streamed
chunks) p50/p99. One warm-up request per server is excluded.

    python bench/serve.py [--clients 1 4 16] [--requests 2] [--max-tokens 32] [--devices cpu] [--out DIR]
"""
from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = ["backend", "clients", "requests", "req_s", "out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
           "itl_p99_ms", "tpot_ms"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float = 600) -> subprocess.Popen:
    import httpx2 as httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not answer in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion: arrival times of its content chunks, its token count."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunks, tokens = [], None
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            if any((c.get("delta") or {}).get("content") for c in d.get("choices", [])):
                chunks.append(time.perf_counter() - t0)
    return {"chunks": chunks, "tokens": tokens if tokens is not None else len(chunks),
            "end": time.perf_counter() - t0}


def level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx2 as httpx

    def client_loop(c: int) -> list[dict]:
        with httpx.Client() as http:
            return [one_request(http, url, model, f"Client {c}, request {i}: tell me about the number {c * 97 + i}.",
                                max_tokens) for i in range(requests)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttft = np.array([r["chunks"][0] for r in results if r["chunks"]])
    itl = np.concatenate([np.diff(r["chunks"]) for r in results if len(r["chunks"]) > 1] or [np.zeros(0)])
    tpot = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in results
            if r["chunks"] and r["tokens"] > 1]
    out = sum(r["tokens"] for r in results)
    pct = lambda a, q: float(np.percentile(a, q) * 1e3) if len(a) else None  # noqa: E731
    return {"clients": clients, "requests": len(results), "output_tokens": out, "wall_s": wall,
            "req_s": len(results) / wall, "out_tok_s": out / wall, "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
            "tpot_ms": float(np.mean(tpot) * 1e3) if tpot else None}


def bench_server(backend: str, cmd: list[str], url: str, model: str, args) -> list[dict]:
    print(f"\nstarting {backend} ...", flush=True)
    proc = start(cmd, url)
    try:
        level(url, model, 1, 1, args.max_tokens)  # warm-up
        rows = []
        for n in args.clients:
            rows.append({"backend": backend, **level(url, model, n, args.requests, args.max_tokens)})
            common.print_table(rows[-1:], COLUMNS)
        return rows
    finally:
        stop(proc)


def parser():
    ap = common.arg_parser(__doc__)
    ap.add_argument("--model", default=None, help="GGUF file (default: tpmax's default model)")
    ap.add_argument("--devices", default="cpu", help="tpmax device spec")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16], metavar="N",
                    help="concurrent clients, one level per word")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--cache-tokens", type=int, default=8192, help="the server's --cache-tokens")
    ap.add_argument("--peers", nargs="*", default=["llamacpp"], choices=["llamacpp"], metavar="PEER",
                    help="peers to compare when installed; none with a bare --peers")
    common.add_out_arg(ap)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    path = common.model_path(args.model)
    rows, skipped = [], {}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tpmax.cli", "serve", "--model", str(path), "--devices", args.devices, "--port", str(port),
           "--max-batch", str(args.max_batch), "--cache-tokens", str(args.cache_tokens), "--quiet",
           "--served-model-name", "bench"]
    rows += bench_server("tpmax", cmd, url, "bench", args)

    if "llamacpp" in args.peers:
        try:
            import llama_cpp.server  # noqa: F401
        except Exception as e:
            skipped["llamacpp"] = f"llama_cpp.server is not importable ({type(e).__name__}: {e})"
            print(f"\nskipping llamacpp: {skipped['llamacpp']}")
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
                   "--host", "127.0.0.1", "--model_alias", "bench", "--n_ctx", str(args.cache_tokens)]
            rows += bench_server("llamacpp", cmd, url, "bench", args)

    common.print_table(rows, COLUMNS, title="serving: streamed chat completions")
    common.write_json("serve", backend="tpmax serve", devices=args.devices, model=str(path), dtype="float32",
                      figures=rows, skipped=skipped, out=args.out,
                      settings={"max_tokens": args.max_tokens, "requests_per_client": args.requests,
                                "max_batch": args.max_batch, "cache_tokens": args.cache_tokens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
