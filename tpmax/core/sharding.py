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


def ceil_div(a: int, b: int) -> int:
    """`ceil(a / b)` for non-negative ints (pages for tokens, blocks for rows)."""
    return -(-a // b)


def check_heads(n_heads: int, n_kv_heads: int) -> None:
    """The one check of a head layout: positive counts, q heads in whole groups per kv head."""
    if n_heads <= 0 or n_kv_heads <= 0:
        raise ValueError(f"head counts must be positive, got n_heads={n_heads}, n_kv_heads={n_kv_heads}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")


def head_shard(n_heads: int, n_kv_heads: int, tp: int, rank: int) -> HeadShard:
    """The heads device `rank` of `tp` owns.

    TP <= n_kv_heads: kv heads are split by the split rule and each device takes the q heads
    of its kv groups (no replication). TP > n_kv_heads: q heads are split by the split rule
    and each device takes the kv heads its q heads need (kv heads replicated).
    """
    check_heads(n_heads, n_kv_heads)
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
# THE table: every tensor of a layer and of the model, one row each. A row says everything
# tpmax knows about a tensor: its stored shape (symbolic: D = hidden size, V = vocab, F = ffn
# size, Hq/Hkv = heads, hd = head dim), its strategy, when a checkpoint has it, its names in
# Hugging Face and GGUF checkpoints (layer rows relative to `model.layers.{i}.` / `blk.{i}.`),
# and the device tensor it lands in (pieces landing in one tensor are concatenated on axis 0
# in table order: q, k, v -> wqkv; gate, up -> w13). The loader's name maps, the checks,
# random weights, the progress count, the weight dataclasses' construction and
# docs/sharding.md are all derived from these rows.


@dataclasses.dataclass(frozen=True)
class Param:
    """One row of the sharding table.

    `when` names a presence rule of `PRESENCE` ("always", "qkv_bias", "qk_norm", "untied").
    Rows with a `stacked` form are an alternative: a checkpoint stores either the separate
    rows feeding `into` (`stacked=False`) or the one stacked row (`stacked=True`).
    """

    name: str
    shape: tuple[str, ...]
    strategy: str
    into: str
    hf: str
    gguf: str | None = None
    when: str = "always"
    stacked: bool = False


P = Param
LAYER_PARAMS: tuple[Param, ...] = (
    #  name          stored shape            strategy                 into         HF name (model.layers.{i}.)        GGUF (blk.{i}.)
    P("attn_norm",    ("D",),                 "replicate",             "attn_norm", "input_layernorm.weight",          "attn_norm.weight"),
    P("q_proj",       ("Hq*hd", "D"),         "q_heads",               "wqkv",      "self_attn.q_proj.weight",         "attn_q.weight"),
    P("k_proj",       ("Hkv*hd", "D"),        "kv_heads",              "wqkv",      "self_attn.k_proj.weight",         "attn_k.weight"),
    P("v_proj",       ("Hkv*hd", "D"),        "kv_heads",              "wqkv",      "self_attn.v_proj.weight",         "attn_v.weight"),
    P("qkv_proj",     ("(Hq+2Hkv)*hd", "D"),  "stacked_qkv",           "wqkv",      "self_attn.qkv_proj.weight",       None, stacked=True),
    P("q_bias",       ("Hq*hd",),             "q_heads",               "bqkv",      "self_attn.q_proj.bias",           "attn_q.bias", "qkv_bias"),
    P("k_bias",       ("Hkv*hd",),            "kv_heads",              "bqkv",      "self_attn.k_proj.bias",           "attn_k.bias", "qkv_bias"),
    P("v_bias",       ("Hkv*hd",),            "kv_heads",              "bqkv",      "self_attn.v_proj.bias",           "attn_v.bias", "qkv_bias"),
    P("q_norm",       ("hd",),                "replicate",             "q_norm",    "self_attn.q_norm.weight",         "attn_q_norm.weight", "qk_norm"),
    P("k_norm",       ("hd",),                "replicate",             "k_norm",    "self_attn.k_norm.weight",         "attn_k_norm.weight", "qk_norm"),
    P("o_proj",       ("D", "Hq*hd"),         "head_aware_columnwise", "wo",        "self_attn.o_proj.weight",         "attn_output.weight"),
    P("mlp_norm",     ("D",),                 "replicate",             "mlp_norm",  "post_attention_layernorm.weight", "ffn_norm.weight"),
    P("gate_proj",    ("F", "D"),             "rowwise",               "w13",       "mlp.gate_proj.weight",            "ffn_gate.weight"),
    P("up_proj",      ("F", "D"),             "rowwise",               "w13",       "mlp.up_proj.weight",              "ffn_up.weight"),
    P("gate_up_proj", ("2F", "D"),            "gate_up",               "w13",       "mlp.gate_up_proj.weight",         None, stacked=True),
    P("down_proj",    ("D", "F"),             "columnwise",            "w2",        "mlp.down_proj.weight",            "ffn_down.weight"),
)
MODEL_PARAMS: tuple[Param, ...] = (
    P("embed",        ("V", "D"),             "rowwise",               "embed",     "model.embed_tokens.weight",       "token_embd.weight"),
    P("norm",         ("D",),                 "replicate",             "norm",      "model.norm.weight",               "output_norm.weight"),
    P("lm_head",      ("V", "D"),             "rowwise",               "lm_head",   "lm_head.weight",                  "output.weight", "untied"),
)
del P

# When a row is present, by the config's flags (a tied model may still store lm_head: it is
# then ignored, as transformers does).
PRESENCE = {
    "always": lambda cfg: True,
    "qkv_bias": lambda cfg: cfg.qkv_bias,
    "qk_norm": lambda cfg: cfg.qk_norm,
    "untied": lambda cfg: not cfg.tie_embeddings,
}

PARAMS: dict[str, Param] = {p.name: p for p in LAYER_PARAMS + MODEL_PARAMS}
LAYER_SHARDING = {p.name: (p.shape, p.strategy, p.into) for p in LAYER_PARAMS}  # name -> (shape, strategy, into)
MODEL_SHARDING = {p.name: (p.shape, p.strategy, p.into) for p in MODEL_PARAMS}


def base_name(name: str) -> str:
    """The row name of a weight name: `layers.3.q_proj` -> `q_proj`, `embed` -> `embed`."""
    return name.rsplit(".", 1)[-1]


def strategy_of(name: str):
    """The strategy function of a weight name (`q_proj`, `layers.3.q_proj`, `embed`, ...)."""
    base = base_name(name)
    if base not in PARAMS:
        raise KeyError(f"no sharding rule for weight {name!r}")
    return STRATEGIES[PARAMS[base].strategy]


def shard_pieces(name: str, shape, lay: Layout) -> list[Index]:
    """Index pieces of weight `name` (stored `shape`) that device `lay.rank` reads."""
    return strategy_of(name)(tuple(shape), lay)


def shard(name: str, w: np.ndarray, lay: Layout) -> np.ndarray:
    """Device `lay.rank`'s shard of the full weight `w` (pieces concatenated on axis 0)."""
    pieces = [w[idx] for idx in shard_pieces(name, w.shape, lay)]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


def sharding_markdown() -> str:
    """The table as Markdown: what docs/sharding.md shows (a test keeps them equal)."""
    lines = ["| weight | stored shape | strategy | device tensor | present | HF name | GGUF name |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for table, hf_prefix, gguf_prefix in ((LAYER_PARAMS, "model.layers.{i}.", "blk.{i}."), (MODEL_PARAMS, "", "")):
        for p in table:
            present = p.when + (" (stacked form)" if p.stacked else "")
            gguf = f"`{gguf_prefix}{p.gguf}`" if p.gguf else "-"
            lines.append(f"| `{p.name}` | `[{', '.join(p.shape)}]` | `{p.strategy}` | `{p.into}` | {present} "
                         f"| `{hf_prefix}{p.hf}` | {gguf} |")
    return "\n".join(lines) + "\n"
