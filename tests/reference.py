"""The unsharded reference: a plain float64 NumPy transformer, one sequence at a time, no
cache, no sharding, and no code shared with tpmax's layers (only the config dataclass is
read). Weights are the full arrays keyed by the sharding table's names.
"""
import math

import numpy as np


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def act(name, x):
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return np.maximum(x, 0)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-x))
    raise ValueError(name)


def inv_freq(cfg):
    hd = cfg.head_dim
    inv = np.array([cfg.rope_theta ** (-(2 * i) / hd) for i in range(hd // 2)])
    s = cfg.rope_scaling
    if s is None:
        return inv
    if type(s).__name__ == "LinearScaling":
        return inv / s.factor
    out = []
    for f in inv:  # Llama-3 scaling, element by element as in the paper's pseudo-code
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_position / s.high_freq_factor:
            out.append(f)
        elif wavelen > s.original_max_position / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return np.array(out)


def rope(x, pos, cfg):
    """x [T, H, hd] at positions pos [T]."""
    ang = pos[:, None] * inv_freq(cfg)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    y = x.copy()
    if cfg.rope_interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        y[..., 0::2], y[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        y[..., :h], y[..., h:] = a * c - b * s, b * c + a * s
    return y


def attention(x, W, i, cfg, mask):
    T, hd, Hq, Hkv = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    p = f"layers.{i}."
    q, k, v = x @ W[p + "q_proj"].T, x @ W[p + "k_proj"].T, x @ W[p + "v_proj"].T
    if cfg.qkv_bias:
        q, k, v = q + W[p + "q_bias"], k + W[p + "k_bias"], v + W[p + "v_bias"]
    q, k, v = q.reshape(T, Hq, hd), k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd)
    if cfg.qk_norm:
        q, k = rms(q, W[p + "q_norm"], cfg.norm_eps), rms(k, W[p + "k_norm"], cfg.norm_eps)
    pos = np.arange(T, dtype=np.float64)
    q, k = rope(q, pos, cfg), rope(k, pos, cfg)
    scale = cfg.attention_scale if cfg.attention_scale is not None else 1 / math.sqrt(hd)
    out = np.zeros((T, Hq, hd))
    for h in range(Hq):
        kh = h // (Hq // Hkv)
        s = q[:, h] @ k[:, kh].T * scale  # [T, T]
        s = np.where(mask, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        out[:, h] = pr @ v[:, kh]
    return out.reshape(T, Hq * hd) @ W[p + "o_proj"].T


def make_mask(T, kind, window=None):
    qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]
    if kind == "null":
        return np.ones((T, T), bool)
    m = ki <= qi
    if kind == "sliding_window":
        m &= ki > qi - window
    return m


def forward(W, cfg, ids, *, mask_kind=None):
    """Logits [T, V] (float64) and the final hidden states before the norm [T, D]."""
    W = {k: np.asarray(v, np.float64) for k, v in W.items()}
    T = len(ids)
    kind = mask_kind or ("sliding_window" if cfg.sliding_window else "causal")
    mask = make_mask(T, kind, cfg.sliding_window)
    x = W["embed"][np.asarray(ids)] * cfg.embedding_multiplier
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        x = x + cfg.residual_multiplier * attention(rms(x, W[p + "attn_norm"], cfg.norm_eps), W, i, cfg, mask)
        h = rms(x, W[p + "mlp_norm"], cfg.norm_eps)
        ff = (act(cfg.activation, h @ W[p + "gate_proj"].T) * (h @ W[p + "up_proj"].T)) @ W[p + "down_proj"].T
        x = x + cfg.residual_multiplier * ff
    head = W["embed"] if cfg.tie_embeddings else W["lm_head"]
    logits = rms(x, W["norm"], cfg.norm_eps) @ head.T / cfg.logits_scaling
    return logits, x
