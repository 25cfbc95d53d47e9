"""Scoring and generation over a loaded `Model`: `logits`, `perplexity`, `generate`, and
encoding prompts (text, chat messages or token ids). Each call runs through the model's
executor, so under MPI every rank calls it alike and gets rank 0's result.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from ..core.devices import to_numpy
from .engine import Completion, Engine, Request, Stats, cache_tokens_for
from ..parallel.executor import token_ids
from ..nn.kv_cache import PAGE_SIZE
from ..checkpoint.loader import Model
from .sampling import SamplingParams, is_int
from ..core.sharding import ceil_div
from ..nn.transformer import ReturnLogits


def _check_context(model: Model, n: int, what: str) -> None:
    if n > model.cfg.max_seq_len:
        raise ValueError(f"{what} of {n} tokens is longer than the model's context ({model.cfg.max_seq_len} tokens, "
                         f"{model.path})")


def logits(model: Model, sequences: Sequence[Sequence[int]], *, page_size: int = PAGE_SIZE) -> list[np.ndarray]:
    """Logits at every position of every sequence, computed as one ragged batch.

    Under MPI every rank calls it alike; rank 0 checks the input and leads, the others follow.

    Args:
        sequences: token-id lists, each non-empty and within the model context.
    Returns:
        per sequence a float32 NumPy array `[len, vocab]`.
    """
    def receive(_, out):  # ranks > 0: the logits of their own copy of the pass
        return [] if out is None else _split(to_numpy(out[1]), out[2])

    return model.executor.call(lambda: _logits(model, sequences, page_size=page_size), receive=receive)


def _logits(model: Model, sequences, *, page_size: int) -> list[np.ndarray]:
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
        raise ValueError(f"sequences must be a list of token-id lists, got {type(sequences).__name__}")
    if len(sequences) == 0:
        return []
    ex = model.executor
    step = ex.step(list(range(len(sequences))), sequences, return_logits=ReturnLogits.ALL)  # validates the ids
    for i, n in enumerate(step.n_new):
        _check_context(model, n, f"sequence {i}")
    cache = ex.new_cache(sum(ceil_div(n, page_size) * page_size for n in step.n_new), page_size=page_size)
    for i in step.seq_ids:
        cache.add(i)
    try:
        _, all_logits, offs = ex.run(cache, step)
    finally:
        ex.free_cache(cache)
    return _split(to_numpy(all_logits), offs)


def _split(all_logits: np.ndarray, offs) -> list[np.ndarray]:
    return [all_logits[offs[i]:offs[i + 1]] for i in range(len(offs) - 1)]


def perplexity(model: Model, ids: Sequence[int], *, context_length: int,
               on_progress: Callable[[int, int, float], None] | None = None) -> tuple[float, int]:
    """Perplexity over non-overlapping windows of `context_length` tokens, each window scored
    from its second token.

    Args:
        context_length: window size, 2 .. the model context.
        on_progress: called after each window with (scored tokens so far, tokens to score,
            perplexity so far).
    Returns:
        (perplexity, scored tokens).
    """
    return model.executor.call(lambda: _perplexity(model, ids, context_length=context_length, on_progress=on_progress),
                               send=list, receive=lambda r, _: tuple(r))


def _perplexity(model: Model, ids, *, context_length: int, on_progress) -> tuple[float, int]:
    if context_length < 2:
        raise ValueError("context_length must be at least 2")
    if context_length > model.cfg.max_seq_len:
        raise ValueError(f"context_length {context_length} is longer than the model's context "
                         f"({model.cfg.max_seq_len} tokens, {model.path})")
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens to compute perplexity")
    ids = token_ids(ids, model.cfg.vocab_size, "perplexity text")
    windows = [ids[a:a + context_length] for a in range(0, len(ids), context_length)]
    windows = [w for w in windows if len(w) >= 2]
    total = sum(len(w) - 1 for w in windows)
    nll, n = 0.0, 0
    for w in windows:  # one window per forward: memory stays [context_length, vocab]
        (lg,) = _logits(model, [w], page_size=PAGE_SIZE)
        lg = lg[:-1].astype(np.float64)  # [L-1, V]: predicts w[1:]
        m = lg.max(axis=-1, keepdims=True)
        logz = (m + np.log(np.exp(lg - m).sum(axis=-1, keepdims=True)))[:, 0]
        nll += float((logz - lg[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
        if on_progress is not None:
            on_progress(n, total, math.exp(nll / n))
    return math.exp(nll / n), n


def encode_prompt(model: Model, prompt: str, *, chat: bool = True) -> list[int]:
    """Token ids of a prompt, through the chat template when the model has one and `chat`."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.path}: the model has no tokenizer; pass token ids instead")
    if chat and tok.has_chat_template:
        return encode_chat(model, [{"role": "user", "content": prompt}])
    return tok.encode(prompt)


def encode_chat(model: Model, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation through the model's chat template, ready for the answer."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.path}: the model has no tokenizer; pass token ids instead")
    return tok.encode_chat(messages, add_generation_prompt=True)  # message text never becomes special tokens


def generate(model: Model, prompts, params: SamplingParams = SamplingParams(), *, chat: bool = True,
             max_batch: int = 16, on_token: Callable[[Request, int, str], None] | None = None,
             stats: Stats | None = None) -> list[Completion]:
    """Generate a completion for each prompt (continuous batching over all of them).

    A prompt is a text (through the chat template when the model has one and `chat`), a chat
    conversation (a list of `{"role", "content"}` dicts) or a list of token ids; `prompts` is
    one prompt or a list of them, and the result has one completion per prompt.

    `on_token(request, token, new_text)` is called for every token as it is produced;
    `stats`, if given, accumulates prefill/decode token counts and times. The KV cache is
    sized from the capped lengths (prompt + max new tokens, at most the model context): room
    for every request, and for `max_batch` of them at once.

    Under MPI every rank calls it alike: rank 0 encodes, schedules and samples, the others
    run each forward pass with it; every rank returns rank 0's completions.
    """
    def run():
        return _generate(model, prompts, params, chat=chat, max_batch=max_batch, on_token=on_token, stats=stats)

    return model.executor.call(run, send=lambda outs: [dataclasses.asdict(c) for c in outs],
                               receive=lambda result, _: [Completion(**c) for c in result])


def encode(model: Model, prompt, *, chat: bool = True) -> list[int]:
    """Token ids of one prompt: a text, a chat conversation (list of dicts) or token ids."""
    if isinstance(prompt, str):
        return encode_prompt(model, prompt, chat=chat)
    items = list(prompt) if isinstance(prompt, (list, tuple)) else None
    if items and all(isinstance(m, dict) for m in items):
        return encode_chat(model, items)
    if items is not None or isinstance(prompt, np.ndarray):
        return token_ids(prompt, model.cfg.vocab_size, "prompt").tolist()
    raise ValueError(f"a prompt is a text, a list of chat messages or a list of token ids; got {type(prompt).__name__}")


def _is_one_prompt(prompts) -> bool:
    """A text, a chat (list of dicts) or token ids (list of ints) is one prompt, not a list of them."""
    if isinstance(prompts, (str, np.ndarray)):
        return True
    items = list(prompts) if isinstance(prompts, (list, tuple)) else []
    return bool(items) and all(isinstance(x, dict) or (is_int(x)) for x in items)


def _generate(model, prompts, params, *, chat, max_batch, on_token, stats) -> list[Completion]:
    if _is_one_prompt(prompts):
        prompts = [prompts]
    prompts = [encode(model, p, chat=chat) for p in prompts]
    engine = Engine(model, max_batch=max_batch, cache_tokens=cache_tokens_for(model, prompts, params, max_batch),
                    stats=stats)
    for p in prompts:
        engine.submit(p, params)
    return engine.run(on_token)
