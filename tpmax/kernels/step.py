"""One decode step of the distributed transformer built only from the decode kernels: one
body for both kinds of device, calling the kernels' NumPy twins (`twins`) on `cpu:i` devices
and their CuPy launchers (`gpu_ops`, same names and arguments) on `gpu:i` devices. Tested on CPU
against `tpmax.distributed_transformer`; the GPU form is tested only by the `gpu` tests.

Per layer and device: `rmsnorm_gemv` (attn norm + qkv) -> `qkv_rope_kv_write` ->
`flash_decode_split` + `flash_decode_combine` -> `gemv` (o_proj; at TP 1 with the residual
epilogue) -> all-reduce -> `residual_add` -> `rmsnorm_gemv_glu` (mlp norm + gate/up + act) ->
`gemv` (down) -> all-reduce -> `residual_add`. Then `rmsnorm_gemv_f32` (final norm + lm head),
an all-gather, and `sample_tokens`. Quantized weights take `rms_norm` + the dequantize-GEMV
(+ `glu`) instead of the fused prologue / epilogue.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..nn.attention import MHAMaskVariant, local_heads
from ..core.comm import Communicator
from ..nn.config import ModelConfig
from ..core.devices import asarray, on_device_context, to_numpy, xp_of
from ..core.distributed import per_device
from ..nn.kv_cache import BatchSlots
from ..nn.layers import vocab_parallel_embedding
from ..nn.quant import ConcatOut, FP8Weight, GPTQWeight, is_quantized
from ..nn.weights import Weights
from . import twins

SPLIT_KEYS = 256  # keys per flash-decoding split


@dataclasses.dataclass(frozen=True)
class _StepInputs:
    """What every layer of one decode step shares on one device (on a GPU, static buffers)."""

    positions: object  # [B] int32
    page: object  # [B] int32
    slot: object  # [B] int32
    tables: object  # [B, max_pages] int32
    lengths: object  # [B] int32, cache length with this token
    cos_tab: object  # [max_pos, hd/2] float32
    sin_tab: object
    window: int  # 0 = none
    chunk: int
    max_splits: int


def kernels_for(device):
    """The kernel module of a device: `twins` on a CPU, `gpu_ops` (CuPy) on a GPU."""
    if device.kind == "cpu":
        return twins
    from . import gpu_ops
    return gpu_ops


def fused_decode_step(weights: Weights, cfg: ModelConfig, tokens, kv_pages, kv_slots: BatchSlots,
                      comm: Communicator, *, chunk: int = SPLIT_KEYS) -> np.ndarray:
    """Logits of one decode step (every sequence brings one token), from the decode kernels.

    Args:
        tokens: `[B]` ids; kv_pages, kv_slots, comm: as for `tpmax.distributed_transformer`
            (the caller reserves one slot per sequence and commits after).
        chunk: keys per flash-decoding split (no numeric effect beyond rounding).
    Returns:
        `[B, V]` float32 on the host (the first device's copy), divided by `cfg.logits_scaling`.
    """
    return to_numpy(_decode_logits(weights, cfg, tokens, kv_pages, kv_slots, comm, chunk))


def fused_decode_sample(weights: Weights, cfg: ModelConfig, tokens, kv_pages, kv_slots: BatchSlots,
                        comm: Communicator, *, temperature, top_k, top_p, seed, chunk: int = SPLIT_KEYS) -> np.ndarray:
    """The decode step then `sample_tokens` on the first device: only the B token ids come to
    the host (`[B]` int32). temperature, top_k, top_p, seed: `[B]` each (see
    `twins.sample_tokens`); each draw is keyed by (seed, the token's position)."""
    logits = _decode_logits(weights, cfg, tokens, kv_pages, kv_slots, comm, chunk)  # [B, V] on device 0
    d = comm.devices[0]
    params = [asarray(np.asarray(a, t), d) for a, t in ((temperature, np.float32), (top_k, np.int32),
                                                        (top_p, np.float32), (seed, np.uint64),
                                                        (kv_slots.positions, np.int64))]
    with on_device_context(d):
        return to_numpy(kernels_for(d).sample_tokens(logits, *params))


def _decode_logits(weights, cfg, tokens, kv_pages, kv_slots, comm, chunk):
    """`[B, V]` float32 logits on the first device (see `fused_decode_step`)."""
    tokens = np.asarray(tokens)
    B = len(tokens)
    if not np.array_equal(np.asarray(kv_slots.input_row_offsets), np.arange(B + 1)):
        raise ValueError("fused_decode_step takes one new token per sequence; "
                         f"kv_slots has offsets {list(kv_slots.input_row_offsets)} for {B} tokens")
    if cfg.activation not in twins.ACTS:
        raise ValueError(f"the fused gate/up epilogue supports {twins.ACTS}, not {cfg.activation!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    acfg, devs, m = cfg.attention(), comm.devices, cfg.residual_multiplier
    inps = _step_inputs(cfg, kv_slots, chunk, devs)  # per device
    ops = [kernels_for(d) for d in devs]
    heads = local_heads(acfg, comm)
    xs = vocab_parallel_embedding(tokens, weights.embed, comm, vocab_size=cfg.vocab_size)  # per device [B, D]
    if cfg.embedding_multiplier != 1.0:
        xs = per_device(lambda x: x * cfg.embedding_multiplier, xs, devices=devs)
    fuse_residual = comm.tp == 1  # no all-reduce in between: o_proj / down add the residual themselves
    for i, lw in enumerate(weights.layers):
        def attention(k, x, aw, norm_w, h, pages, inp):
            qkv = _linear(k, x, aw.wqkv, norm_w=norm_w, eps=cfg.norm_eps)  # [B, (n_q + 2 n_kv) * hd]
            q = k.qkv_rope_kv_write(qkv, aw.bqkv, aw.q_norm, aw.k_norm, acfg.qk_norm_eps or 0.0, inp.cos_tab,
                                    inp.sin_tab, inp.positions, inp.page, inp.slot, pages, i, n_q=h.n_q, n_kv=h.n_kv,
                                    head_dim=acfg.head_dim, interleaved=cfg.rope_interleaved)
            o = k.flash_decode(q, pages, i, inp.tables, inp.lengths, h.kv_of_q(), scale=acfg.softmax_scale,
                               window=inp.window, chunk=inp.chunk, max_splits=inp.max_splits)  # [B, n_q, hd]
            return _linear(k, o.reshape(B, -1), aw.wo, residual=x if fuse_residual else None, out_scale=m)

        attn = per_device(attention, ops, xs, lw.attn, lw.attn_norm, heads, kv_pages, inps,
                          devices=devs)  # per device [B, D] partials
        hs = attn if fuse_residual else per_device(lambda k, x, a: k.residual_add(x, a), ops, xs,
                                                   comm.allreduce_sum(attn), devices=devs)

        def ffn(k, h, w13, w2, norm_w):
            gu = _linear(k, h, w13, norm_w=norm_w, eps=cfg.norm_eps, glu=cfg.activation)  # [B, F_r]
            return _linear(k, gu, w2, residual=h if fuse_residual else None, out_scale=m)  # [B, D]

        ff = per_device(ffn, ops, hs, lw.w13, lw.w2, lw.mlp_norm, devices=devs)
        xs = ff if fuse_residual else per_device(lambda k, h, f: k.residual_add(h, f), ops, hs,
                                                 comm.allreduce_sum(ff), devices=devs)
    logits = per_device(lambda k, x, w, nw: _linear(k, x, w, norm_w=nw, eps=cfg.norm_eps, out_dtype=np.float32,
                                                    out_scale=1.0 / cfg.logits_scaling),
                        ops, xs, weights.lm_head, weights.norm, devices=devs)  # per device [B, V_r]
    return comm.allgather(logits, axis=-1)[0]  # [B, V]


def _step_inputs(cfg: ModelConfig, slots: BatchSlots, chunk: int, devices) -> list[_StepInputs]:
    acfg = cfg.attention()
    B = len(slots.positions)
    tables = np.zeros((B, max(len(t) for t in slots.tables)), np.int32)  # padding: page 0, never read
    for b, t in enumerate(slots.tables):
        tables[b, :len(t)] = t
    cos, sin = cfg.rope().cos_sin(np.arange(int(slots.positions.max()) + 1))  # [max_pos, hd/2]
    window = acfg.sliding_window if acfg.mask == MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK else 0
    lengths = np.asarray(slots.start) + 1
    host = [np.asarray(a, np.int32) for a in (slots.positions, slots.page, slots.slot)] + [tables, lengths.astype(
        np.int32), cos, sin]
    S = twins.num_splits(lengths, window, chunk)
    return [_StepInputs(*(asarray(a, d) for a in host), window, chunk, S) for d in devices]


def _linear(k, x, w, /, *, norm_w=None, eps: float = 0.0, residual=None, glu: str | None = None,
            out_scale: float = 1.0, out_dtype=None):
    """The GEMV launch(es) of kernel module `k` for x `[B, K]` and one weight, GEMV_MAX_B
    rows at a time. Dense weights take the fused prologue / epilogues; quantized ones
    `rms_norm` + the dequantize-GEMV (+ `glu`, `residual_add`)."""
    out = []
    for a in range(0, len(x), twins.GEMV_MAX_B):
        rows = slice(a, a + twins.GEMV_MAX_B)
        res = None if residual is None else residual[rows]
        if not is_quantized(w):
            out.append(k.gemv(x[rows], w, norm_w=norm_w, eps=eps, residual=res, glu=glu, out_scale=out_scale,
                              out_dtype=out_dtype))
            continue
        xn = x[rows] if norm_w is None else k.rms_norm_rows(x[rows], norm_w, eps=eps).astype(x.dtype)
        y = _quant_gemv(k, xn, w)  # [b, N] in x's dtype
        y = k.glu(y, act=glu) if glu is not None else y
        y = k.residual_add(res, y, scale=out_scale) if res is not None else (
            (y.astype(np.float32) * np.float32(out_scale)).astype(out_dtype or x.dtype))
        out.append(y)
    return xp_of(x).concatenate(out)


def _quant_gemv(k, x, w):
    """x `[b, K]` @ W.T for a quantized W, by its dequantize-GEMV kernel. GPTQ with other than
    4 bits and FP8 with block scales have no kernel: their own matmul runs."""
    if isinstance(w, ConcatOut):
        return xp_of(x).concatenate([_quant_gemv(k, x, p) if is_quantized(p) else k.gemv(x, p) for p in w.parts],
                                    axis=1)
    if isinstance(w, GPTQWeight) and w.bits == 4:
        return k.gptq_int4_gemv(x, w.qweight, w.scales, w.zeros, None if w.group_size else w.g_idx,
                                group_size=w.group_size or 1, in_features=w.in_features)
    if isinstance(w, FP8Weight) and w.block is None:
        return k.fp8_e4m3_gemv(x, w.w, w.scale)
    return w.matmul_t(x).astype(x.dtype)
