"""How tensors are split across devices: the split rule, head layouts, and the one table.

Everything here is plain data and index arithmetic (no arrays are moved): the loader reads
only the slices a device needs, the layers use the same ranges, and docs/sharding.md is
generated from `LAYER_SHARDING` / `MODEL_SHARDING`.

Strategy names follow MAX and are relative to the stored weight `[out, in]`: `rowwise`
splits axis 0 (Megatron "column parallel"), `columnwise` splits axis 1 ("row parallel").
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np


# ------------------------------------------------------------------------------------------
# The split rule: the first `n % k` shards get one extra row.


def split_sizes(n: int, k: int) -> list[int]:
    """Sizes of `k` shards of `n` rows: 151674 over 4 -> [37919, 37919, 37918, 37918]."""
    if k <= 0:
        raise ValueError(f"cannot split into {k} shards")
    base, extra = divmod(n, k)
    return [base + (i < extra) for i in range(k)]


def split_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """`(start, stop)` of each shard under `split_sizes`."""
    stops = np.cumsum([0] + split_sizes(n, k)).tolist()
    return list(zip(stops[:-1], stops[1:]))


# ------------------------------------------------------------------------------------------
# Attention heads: always split by whole heads.


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """The attention heads one device owns.

    q heads `[q0, q1)`; kv heads `[kv0, kv1)` (the kv heads those q heads read, so a kv
    head is replicated on several devices when TP > n_kv_heads or the split is uneven).
    """

    q0: int
    q1: int
    kv0: int
    kv1: int
    group: int  # q heads per kv head (GQA ratio)

    @property
    def n_q(self) -> int:
        return self.q1 - self.q0

    @property
    def n_kv(self) -> int:
        return self.kv1 - self.kv0

    @functools.cached_property
    def grouped(self) -> bool:
        """True when local q heads come in equal consecutive groups per local kv head."""
        g = self.n_q // self.n_kv
        return g * self.n_kv == self.n_q and np.array_equal(self.kv_of_q(), np.repeat(np.arange(self.n_kv), g))

    @functools.cache
    def kv_of_q(self) -> np.ndarray:
        """For each local q head, the index of its kv head among this device's kv heads."""
        return np.arange(self.q0, self.q1) // self.group - self.kv0


def head_shard(n_heads: int, n_kv_heads: int, tp: int, rank: int) -> HeadShard:
    """The heads device `rank` of `tp` owns.

    TP <= n_kv_heads: kv heads are split by the split rule and each device takes the q heads
    of its kv groups (no replication). TP > n_kv_heads: q heads are split by the split rule
    and each device takes the kv heads its q heads need (kv heads replicated).
    """
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if tp > n_heads:
        raise ValueError(f"cannot split {n_heads} attention heads over {tp} devices")
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} out of range for tp={tp}")
    g = n_heads // n_kv_heads
    if tp <= n_kv_heads:
        kv0, kv1 = split_bounds(n_kv_heads, tp)[rank]
        return HeadShard(kv0 * g, kv1 * g, kv0, kv1, g)
    q0, q1 = split_bounds(n_heads, tp)[rank]
    return HeadShard(q0, q1, q0 // g, (q1 - 1) // g + 1, g)


# ------------------------------------------------------------------------------------------
# Strategies. Each turns a stored shape into the index pieces one device reads; the pieces
# are concatenated on axis 0 (several pieces only for stacked weights).


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a strategy needs to know about the model and the device."""

    tp: int
    rank: int
    heads: HeadShard
    head_dim: int


Index = tuple  # a tuple of slices into the stored tensor


def _rows(a: int, b: int) -> Index:
    return (slice(a, b),)


def rowwise(shape, lay: Layout) -> list[Index]:
    a, b = split_bounds(shape[0], lay.tp)[lay.rank]
    return [_rows(a, b)]


def columnwise(shape, lay: Layout) -> list[Index]:
    a, b = split_bounds(shape[1], lay.tp)[lay.rank]
    return [(slice(None), slice(a, b))]


def replicate(shape, lay: Layout) -> list[Index]:
    return [(slice(None),)]


def q_heads(shape, lay: Layout) -> list[Index]:
    """Rows of whole q heads (q_proj weight/bias)."""
    hd, h = lay.head_dim, lay.heads
    return [_rows(h.q0 * hd, h.q1 * hd)]


def kv_heads(shape, lay: Layout) -> list[Index]:
    """Rows of whole kv heads (k_proj / v_proj weight/bias)."""
    hd, h = lay.head_dim, lay.heads
    return [_rows(h.kv0 * hd, h.kv1 * hd)]


def stacked_qkv(shape, lay: Layout) -> list[Index]:
    """`[q; k; v]` stacked on axis 0: each segment split by whole heads."""
    hd, h = lay.head_dim, lay.heads
    n_kv = shape[0] // hd // (h.group + 2)  # rows = (Hq + 2 Hkv) * hd with Hq = group * Hkv
    k = h.group * n_kv * hd
    v = k + n_kv * hd
    return [_rows(h.q0 * hd, h.q1 * hd), _rows(k + h.kv0 * hd, k + h.kv1 * hd),
            _rows(v + h.kv0 * hd, v + h.kv1 * hd)]


def gate_up(shape, lay: Layout) -> list[Index]:
    """`[gate; up]` stacked on axis 0: each half split by the split rule."""
    half = shape[0] // 2
    a, b = split_bounds(half, lay.tp)[lay.rank]
    return [_rows(a, b), _rows(half + a, half + b)]


def head_aware_columnwise(shape, lay: Layout) -> list[Index]:
    """Columns of whole q heads (o_proj weight)."""
    hd, h = lay.head_dim, lay.heads
    return [(slice(None), slice(h.q0 * hd, h.q1 * hd))]


STRATEGIES = {f.__name__: f for f in (rowwise, columnwise, replicate, q_heads, kv_heads,
                                      stacked_qkv, gate_up, head_aware_columnwise)}


# ------------------------------------------------------------------------------------------
# THE table: every weight of the model, its stored shape (symbolic) and its strategy.
# D = hidden size, V = vocab, F = ffn size, Hq/Hkv = heads, hd = head dim.
# `fused` names the device-side tensor the piece goes into (q/k/v -> wqkv, gate/up -> w13).

LAYER_SHARDING = {
    #  name          shape               strategy                  fused into
    "attn_norm":    (("D",),             "replicate",              "attn_norm"),
    "q_proj":       (("Hq*hd", "D"),     "q_heads",                "wqkv"),
    "k_proj":       (("Hkv*hd", "D"),    "kv_heads",               "wqkv"),
    "v_proj":       (("Hkv*hd", "D"),    "kv_heads",               "wqkv"),
    "qkv_proj":     (("(Hq+2Hkv)*hd", "D"), "stacked_qkv",         "wqkv"),
    "q_bias":       (("Hq*hd",),         "q_heads",                "bqkv"),
    "k_bias":       (("Hkv*hd",),        "kv_heads",               "bqkv"),
    "v_bias":       (("Hkv*hd",),        "kv_heads",               "bqkv"),
    "q_norm":       (("hd",),            "replicate",              "q_norm"),
    "k_norm":       (("hd",),            "replicate",              "k_norm"),
    "o_proj":       (("D", "Hq*hd"),     "head_aware_columnwise",  "wo"),
    "mlp_norm":     (("D",),             "replicate",              "mlp_norm"),
    "gate_proj":    (("F", "D"),         "rowwise",                "w13"),
    "up_proj":      (("F", "D"),         "rowwise",                "w13"),
    "gate_up_proj": (("2F", "D"),        "gate_up",                "w13"),
    "down_proj":    (("D", "F"),         "columnwise",             "w2"),
}

MODEL_SHARDING = {
    "embed":   (("V", "D"), "rowwise",   "embed"),
    "norm":    (("D",),     "replicate", "norm"),
    "lm_head": (("V", "D"), "rowwise",   "lm_head"),
}


def strategy_of(name: str):
    """The strategy function for a weight name of either table."""
    table = LAYER_SHARDING if name in LAYER_SHARDING else MODEL_SHARDING
    if name not in table:
        raise KeyError(f"no sharding rule for weight {name!r}")
    return STRATEGIES[table[name][1]]


def shard_pieces(name: str, shape, lay: Layout) -> list[Index]:
    """Index pieces of weight `name` (stored `shape`) that device `lay.rank` reads."""
    return strategy_of(name)(tuple(shape), lay)


def shard(name: str, w: np.ndarray, lay: Layout) -> np.ndarray:
    """Device `lay.rank`'s shard of the full weight `w` (pieces concatenated on axis 0)."""
    pieces = [w[idx] for idx in shard_pieces(name, w.shape, lay)]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


def sharding_markdown() -> str:
    """The table as Markdown: what docs/sharding.md shows (a test keeps them equal)."""
    lines = ["| weight | stored shape | strategy | device tensor |", "| --- | --- | --- | --- |"]
    for table in (LAYER_SHARDING, MODEL_SHARDING):
        for name, (shape, strategy, fused) in table.items():
            lines.append(f"| `{name}` | `[{', '.join(shape)}]` | `{strategy}` | `{fused}` |")
    return "\n".join(lines) + "\n"
