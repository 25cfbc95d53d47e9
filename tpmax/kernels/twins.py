"""NumPy twins of the decode-step kernels: one function per kernel (or per family of kernel
variants), taking the same arrays in the same layouts, so the fused decomposition runs and is
tested on every CPU. A twin computes in float32 and rounds where its kernel rounds (to the
activation dtype: bfloat16 on a GPU); with float32 arrays it equals the unfused tpmax layers up
to summation order.

Kernels that write (the KV cache) write here too; the others return what their kernel stores.
"""
from __future__ import annotations

import numpy as np

from ..nn.layers import activation
from ..nn.quant import decode_e4m3, unpack_int32

GEMV_MAX_B = 8  # rows the GEMV kernels take in one launch
ACTS = ("silu", "gelu_tanh")  # the activations of the fused gate/up epilogue (act = index)


def _f32(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32, copy=False)


def _round(a: np.ndarray, dtype) -> np.ndarray:
    """float32 `a` rounded to `dtype` and back (what a store to `dtype` then a load does)."""
    return a.astype(dtype).astype(np.float32, copy=False)


def _check_rows(x: np.ndarray) -> None:
    if x.ndim != 2 or not 1 <= x.shape[0] <= GEMV_MAX_B:
        raise ValueError(f"the decode kernels take [B, K] activations with 1 <= B <= {GEMV_MAX_B}, got {x.shape}")


# ------------------------------------------------------------------------------------------
# gemv.cu


def rms_norm_rows(x: np.ndarray, w: np.ndarray, /, *, eps: float) -> np.ndarray:
    """`rms_norm_bf16` and the GEMV prologue: x `[B, K]` * rsqrt(mean(x^2) + eps) * w `[K]`,
    rounded to x's dtype, returned as float32 `[B, K]`."""
    x32 = _f32(x)
    inv = 1.0 / np.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + np.float32(eps))  # [B, 1]
    return _round(x32 * inv * _f32(w), x.dtype)


def gemv(x: np.ndarray, w: np.ndarray, /, *, norm_w: np.ndarray | None = None, eps: float = 0.0,
         residual: np.ndarray | None = None, glu: str | None = None, out_scale: float = 1.0,
         out_dtype=None) -> np.ndarray:
    """The GEMV family of gemv.cu: `y = out_scale * x @ W.T` (+ residual), x `[B, K]`.

    Kernel per option set: none -> `gemv_bf16`; residual -> `gemv_residual_bf16`; norm_w ->
    `rmsnorm_gemv_bf16` (`rmsnorm_gemv_f32` with out_dtype float32, the lm head); norm_w and
    glu -> `rmsnorm_gemv_glu_bf16`, where w `[2N, K]` = `[gate; up]` and y = act(gate) * up.

    Returns:
        `[B, N]` in out_dtype (default x's dtype).
    """
    _check_rows(x)
    out_dtype = np.dtype(out_dtype or x.dtype)
    xn = rms_norm_rows(x, norm_w, eps=eps) if norm_w is not None else _f32(x)  # [B, K]
    acc = xn @ _f32(w).T  # [B, K] @ [K, N or 2N] -> float32
    if glu is not None:
        if glu not in ACTS:
            raise ValueError(f"the fused gate/up epilogue supports {ACTS}, not {glu!r}")
        n = acc.shape[1] // 2
        gate, up = _round(acc[:, :n], x.dtype), _round(acc[:, n:], x.dtype)
        acc = _round(_f32(activation(glu)(gate.astype(x.dtype))), x.dtype) * up  # [B, N]
    acc = acc * np.float32(out_scale)
    if residual is not None:
        acc = acc + _f32(residual)
    return acc.astype(out_dtype)


def glu(gu: np.ndarray, /, *, act: str) -> np.ndarray:
    """`glu_bf16`: act(gate) * up of a quantized gate/up projection's output gu `[B, 2N]` ->
    `[B, N]` in gu's dtype."""
    n = gu.shape[1] // 2
    gate = gu[:, :n]
    return (_round(_f32(activation(act)(gate)), gu.dtype) * _f32(gu[:, n:])).astype(gu.dtype)


def residual_add(x: np.ndarray, a: np.ndarray, /, *, scale: float = 1.0) -> np.ndarray:
    """`residual_add_bf16`: x + scale * a (after an all-reduce), in x's dtype."""
    return (_f32(x) + np.float32(scale) * _f32(a)).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# qkv_rope.cu


def qkv_rope_kv_write(qkv: np.ndarray, bias, q_norm, k_norm, qk_eps: float, cos_tab: np.ndarray,
                      sin_tab: np.ndarray, positions: np.ndarray, page: np.ndarray, slot: np.ndarray,
                      pages: np.ndarray, layer: int, /, *, n_q: int, n_kv: int, head_dim: int,
                      interleaved: bool) -> np.ndarray:
    """`qkv_rope_kv_write`: bias, qk-norm, RoPE; k, v stored into `pages` in place.

    Args:
        qkv: `[B, (n_q + 2 n_kv) * hd]`; bias: `[(n_q + 2 n_kv) * hd]` or None;
        q_norm, k_norm: `[hd]` or None; cos_tab, sin_tab: `[max_pos, hd/2]` float32;
        positions, page, slot: `[B]` ints; pages: one device's cache
        `[num_layers, 2, num_pages, page_size, n_kv, hd]`.
    Returns:
        q `[B, n_q, hd]` in qkv's dtype.
    """
    B, hd, half, dt = qkv.shape[0], head_dim, head_dim // 2, qkv.dtype
    h = _f32(qkv).reshape(B, n_q + 2 * n_kv, hd)  # [B, heads, hd]
    if bias is not None:
        h = _round(h + _f32(bias).reshape(-1, hd), dt)
    qk = h[:, :n_q + n_kv].copy()  # [B, n_q + n_kv, hd]
    for a, b, nw in ((0, n_q, q_norm), (n_q, n_q + n_kv, k_norm)):
        if nw is not None:
            qk[:, a:b] = rms_norm_rows(qk[:, a:b].reshape(-1, hd).astype(dt), nw, eps=qk_eps).reshape(B, b - a, hd)
    pos = np.asarray(positions)
    cos, sin = cos_tab[pos][:, None, :], sin_tab[pos][:, None, :]  # [B, 1, hd/2]
    first, second = (np.s_[..., 0::2], np.s_[..., 1::2]) if interleaved else (np.s_[..., :half], np.s_[..., half:])
    x0, x1 = qk[first].copy(), qk[second].copy()  # the pairs, [B, n_q + n_kv, hd/2] each
    qk[first], qk[second] = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    pages[layer, 0, page, slot] = qk[:, n_q:].astype(pages.dtype)
    pages[layer, 1, page, slot] = h[:, n_q + n_kv:].astype(pages.dtype)
    return qk[:, :n_q].astype(dt)


# ------------------------------------------------------------------------------------------
# flash_decode.cu


def visible_range(length: int, window: int) -> tuple[int, int]:
    """Keys `[lo, L)` the one query of a sequence of cache length L sees (window 0 = all)."""
    return (max(0, length - window) if window > 0 else 0), length


def num_splits(lengths: np.ndarray, window: int, chunk: int) -> int:
    """The split grid dimension: splits of the longest visible range."""
    return max(-(-(b - a) // chunk) for a, b in (visible_range(int(L), window) for L in lengths))


def flash_decode(q: np.ndarray, pages: np.ndarray, layer: int, tables: np.ndarray, lengths: np.ndarray,
                 kv_of_q: np.ndarray, /, *, scale: float, window: int = 0, chunk: int = 256,
                 max_splits: int | None = None) -> np.ndarray:
    """`flash_decode_split` then `flash_decode_combine`: attention of one query per sequence
    over its paged keys, a split of `chunk` keys at a time, the splits merged.

    Args:
        q: `[B, n_q, hd]`; pages: `[num_layers, 2, num_pages, page_size, n_kv, hd]`;
        tables: `[B, max_pages]` page ids; lengths: `[B]` cache lengths (this token included);
        kv_of_q: `[n_q]` local kv head of each q head; window: sliding window (0 = none).
        max_splits: the split grid (at least `num_splits(lengths, window, chunk)`; default that).
    Returns:
        `[B, n_q, hd]` in q's dtype.
    """
    B, nq, hd = q.shape
    ps, S = pages.shape[3], max_splits or num_splits(lengths, window, chunk)
    o_part = np.zeros((B, nq, S, hd), np.float32)
    m_part = np.full((B, nq, S), -np.inf, np.float32)
    l_part = np.zeros((B, nq, S), np.float32)
    qs = _f32(q) * np.float32(scale)
    for b in range(B):
        lo, L = visible_range(int(lengths[b]), window)
        for s in range(S):  # flash_decode_split: one block per (b, head group, split)
            t = np.arange(lo + s * chunk, min(L, lo + (s + 1) * chunk))
            if t.size == 0:
                continue
            kv = _f32(pages[layer][:, tables[b, t // ps], t % ps][:, :, kv_of_q])  # [2, n, n_q, hd]
            sc = np.einsum("hd,thd->ht", qs[b], kv[0])  # [n_q, n]
            m = sc.max(axis=1)  # [n_q]
            p = np.exp(sc - m[:, None])
            m_part[b, :, s], l_part[b, :, s] = m, p.sum(axis=1)
            o_part[b, :, s] = np.einsum("ht,thd->hd", p, kv[1])
    # flash_decode_combine
    M = m_part.max(axis=2, keepdims=True)  # [B, n_q, 1]
    c = np.where(np.isfinite(m_part), np.exp(m_part - M), 0.0).astype(np.float32)  # [B, n_q, S]
    out = (c[..., None] * o_part).sum(axis=2) / (c * l_part).sum(axis=2)[..., None]
    return out.astype(q.dtype)


# ------------------------------------------------------------------------------------------
# sample.cu


MASS_ONE = 2 ** 40  # the kernel's fixed-point unit of probability mass


def order_key(f: np.ndarray) -> np.ndarray:
    """The kernel's `fkey`: uint32 keys of float32 values with a < b <=> key(a) < key(b)."""
    u = np.asarray(f, np.float32).view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))


def radix_select(keys: np.ndarray, weights: np.ndarray, target: int) -> tuple[int, int]:
    """The kernel's `radix_select`: the key tau with weight(key > tau) < target <=
    weight(key >= tau), 8 bits a pass from the top; returns (tau, weight(key > tau)).
    If the total weight falls short of target, tau is the smallest key."""
    prefix, mask, above = 0, 0, 0
    for shift in (24, 16, 8, 0):
        sel = (keys & np.uint32(mask)) == prefix
        digits = ((keys[sel] >> np.uint32(shift)) & np.uint32(255)).astype(np.int64)
        hist = np.bincount(digits, weights=weights[sel], minlength=256).astype(np.int64)[::-1]  # digit 255 first
        cum = above + np.cumsum(hist)
        hit = np.nonzero((cum >= target) & (hist > 0))[0]
        j = int(hit[0]) if hit.size else int(np.nonzero(hist)[0][-1])  # short of target: the lowest digit
        above = int(cum[j] - hist[j])
        prefix |= (255 - j) << shift
        mask |= 255 << shift
    return prefix, above


def kept_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution `sample_tokens` draws one row from: float64 `[V]`, by the kernel's
    steps. z = l * (1/T) in float32; top-k: keep key(z) >= the k-th key (ties kept, by counts
    through `radix_select`); p = softmax of the kept z (float32); top-p: tau = the probability
    where the mass (40-bit fixed point) counted from the top first reaches top_p; keep p > tau
    and, of the tokens with p == tau, the first n by index with mass(p > tau) + i * tau < top_p.
    The kept tokens get softmax(z) in float64 (the Gumbel-max draw's exact law). T == 0: one-hot
    at the first argmax.
    """
    lg = np.asarray(logits, np.float32)
    V = lg.size
    if temperature <= 0:
        return np.eye(V)[int(np.argmax(lg))]
    z = lg * np.float32(1.0 / np.float32(temperature))  # [V] float32
    kept = np.ones(V, bool)
    if 0 < top_k < V:
        kkey, _ = radix_select(order_key(z), np.ones(V, np.int64), int(top_k))
        kept = order_key(z) >= kkey
    if top_p < 1.0:
        e = np.exp(z - z.max(), dtype=np.float32)
        p = e * np.float32(1.0 / e[kept].sum(dtype=np.float32))  # [V] float32
        w = np.floor(p.astype(np.float64) * MASS_ONE).astype(np.int64)
        target = int(np.float64(np.float32(top_p)) * MASS_ONE)
        pkey, above = radix_select(order_key(p)[kept], w[kept], target)
        w_tau = int(np.float64(order_key_value(pkey)) * MASS_ONE)
        n_tied = -(-(target - above) // w_tau) if w_tau else V
        tied = np.nonzero(kept & (order_key(p) == pkey))[0][:n_tied]
        kept &= order_key(p) > pkey
        kept[tied] = True
    z64 = np.where(kept, z.astype(np.float64), -np.inf)
    q = np.exp(z64 - z64.max())
    return q / q.sum()


def order_key_value(key: int) -> np.float32:
    """The non-negative float32 whose `order_key` is `key`."""
    return np.array([key & 0x7FFFFFFF], np.uint32).view(np.float32)[0]


def sample_tokens(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                  seed: np.ndarray, position: np.ndarray, /) -> np.ndarray:
    """`sample_tokens`: one id per row of logits `[B, V]` float32, drawn from `kept_probs`
    by a Gumbel-max with NumPy's Philox keyed by `seed[b]` at counter `position[b]` (a
    deterministic stream per (seed, position), not the device's stream).

    Returns:
        `[B]` int32.
    """
    out = np.empty(len(logits), np.int32)
    for b, row in enumerate(np.asarray(logits)):
        p = kept_probs(row, float(temperature[b]), int(top_k[b]), float(top_p[b]))
        if temperature[b] <= 0:
            out[b] = int(np.argmax(p))
            continue
        rng = np.random.Generator(np.random.Philox(key=int(seed[b]), counter=int(position[b])))
        g = rng.gumbel(size=p.size)
        with np.errstate(divide="ignore"):
            out[b] = int(np.argmax(np.log(p) + g))  # log 0 = -inf: dropped tokens never win
    return out


# ------------------------------------------------------------------------------------------
# dequant_gemv.cu


def gptq_int4_gemv(x: np.ndarray, qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx, /, *,
                   group_size: int, in_features: int, out_scale: float = 1.0) -> np.ndarray:
    """`gptq_int4_gemv`: x `[B, K]` @ dequantized W.T, W[n, k] = (q[k, n] - zeros[g, n]) *
    scales[g, n], g = g_idx[k] (or k // group_size when g_idx is None).

    Args:
        qweight: int32 `[ceil(K/8), N]`; scales: `[G, N]`; zeros: uint8 `[G, N]`; g_idx: `[K]` or None.
    Returns:
        `[B, N]` in x's dtype.
    """
    _check_rows(x)
    K = in_features
    g = np.asarray(g_idx) if g_idx is not None else np.arange(K) // group_size  # [K]
    q = unpack_int32(qweight, 4, axis=0)[:K].astype(np.float32)  # [K, N]
    w = (q - zeros[g].astype(np.float32)) * _f32(scales[g])  # [K, N]
    return ((_f32(x) @ w) * np.float32(out_scale)).astype(x.dtype)


def fp8_e4m3_gemv(x: np.ndarray, w: np.ndarray, scale: np.ndarray, /, *, out_scale: float = 1.0) -> np.ndarray:
    """`fp8_e4m3_gemv`: x `[B, K]` @ (e4m3(w) * scale).T; w uint8 `[N, K]`, scale `[]`/`[1]`
    (tensor) or `[N]` (row). Returns `[B, N]` in x's dtype."""
    _check_rows(x)
    s = _f32(scale).reshape(-1)  # [1] or [N]
    acc = _f32(x) @ decode_e4m3(np.asarray(w)).T  # [B, K] @ [K, N]
    return (acc * (s * np.float32(out_scale))).astype(x.dtype)
