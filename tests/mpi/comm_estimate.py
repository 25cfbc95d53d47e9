"""Paper estimate of tensor parallelism's per-token communication (docs/distributed.md).

Usage: python tests/mpi/comm_estimate.py  -> the markdown tables of the doc.

Model (all numbers here are ASSUMPTIONS or published figures, none measured on this machine):
- one decode step of batch B moves, per layer, 2 all-reduces of [B, D] (after o_proj and
  after down_proj), plus 1 all-reduce of [B, D] for the vocab-parallel embedding and 1
  all-gather of the logits [B, V]; activations and logits in bfloat16 (2 bytes);
- ring all-reduce of S bytes over n ranks: 2(n-1) steps, each one hop's latency plus
  S/n bytes on the slowest link: t = 2(n-1) * (alpha + S/n / beta);
  ring all-gather of a total of S bytes: t = (n-1) * (alpha + S/n / beta);
- "hierarchical" (TP 16 = 2 hosts x 8 GPUs): reduce-scatter and all-gather inside each host
  over NVLink (2*7 steps), and one all-reduce between the 2 hosts of S/8 bytes per GPU
  (2 steps, one NIC per GPU) -- what NCCL's tree / NVLS-tree algorithms approach;
- compute at the HBM roofline: every GPU streams its 1/n of the bf16 weights once per step
  (H100 SXM 3.35 TB/s); KV-cache reads and kernel launch overheads are left out.
"""
LINKS = {  # name: (alpha = per-hop latency [s], beta = bandwidth per direction per GPU [B/s])
    "NVLink 4 (H100, 450 GB/s)": (0.7e-6, 450e9),
    "InfiniBand NDR 400 Gb/s": (3e-6, 50e9),
    "Ethernet 100 Gb/s": (10e-6, 12.5e9),
}
MODELS = {  # name: (params, D, layers, vocab)
    "Llama-3-8B": (8.03e9, 4096, 32, 128256),
    "Llama-3-70B": (70.6e9, 8192, 80, 128256),
}
HBM = 3.35e12
BYTES = 2  # bfloat16


def ring_allreduce(s, n, alpha, beta):
    return 2 * (n - 1) * (alpha + s / n / beta)


def ring_allgather(s, n, alpha, beta):
    return (n - 1) * (alpha + s / n / beta)


def per_token(model, n, link, b, hierarchical=False):
    params, d, layers, vocab = MODELS[model]
    alpha, beta = LINKS[link]
    s = b * d * BYTES
    if hierarchical:  # n = 2 hosts x 8 GPUs; NVLink inside, `link` between
        na, nb = LINKS["NVLink 4 (H100, 450 GB/s)"]
        ar = 2 * 7 * (na + s / 8 / nb) + 2 * (alpha + s / 8 / 2 / beta)
    else:
        ar = ring_allreduce(s, n, alpha, beta)
    ag = ring_allgather(b * vocab * BYTES, n, alpha, beta)
    comm = (2 * layers + 1) * ar + ag
    compute = params * BYTES / n / HBM
    return comm, compute, (2 * layers + 1) * s + b * vocab * BYTES


def main():
    print("| model | TP | link | B | bytes reduced+gathered / token step | comm (ms) | HBM compute (ms) | comm / compute |")
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for n, link, hier in [(8, "NVLink 4 (H100, 450 GB/s)", False),
                              (16, "InfiniBand NDR 400 Gb/s", False), (16, "InfiniBand NDR 400 Gb/s", True),
                              (16, "Ethernet 100 Gb/s", False), (16, "Ethernet 100 Gb/s", True)]:
            for b in (1, 64):
                comm, compute, nbytes = per_token(model, n, link, b, hier)
                name = link + (", hierarchical" if hier else ", ring") if n == 16 else link
                print(f"| {model} | {n} | {name} | {b} | {nbytes / 1e6:.2f} MB | {comm * 1e3:.2f} | "
                      f"{compute * 1e3:.2f} | {comm / compute:.2f} |")


if __name__ == "__main__":
    main()
