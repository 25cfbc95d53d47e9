"""Scoring and generation over a loaded `Model`.

`logits` scores whole sequences in one ragged batch. `Engine` generates with continuous
batching over the paged KV cache: each step admits waiting prompts by the pages still free
after what the step already promised (one decode token for every running sequence), prefills
them, then decodes one token for every running sequence in one ragged batch. When decoding
needs a page and none is free, the most recently admitted sequence is preempted (pages freed,
recomputed later from its prompt and tokens), so no request is lost for lack of pages. Every
pass goes through `forward` (reserve -> forward -> commit, rollback on error). Sampling is
greedy, or temperature / top-k / top-p with a per-request seed.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from typing import Callable, Iterable, Sequence

import numpy as np

from .devices import to_numpy
from .executor import Executor, token_ids
from .kv_cache import PAGE_SIZE
from .loader import Model
from .sharding import ceil_div
from .transformer import ReturnLogits


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


# ------------------------------------------------------------------------------------------
# Sampling.


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 = greedy.

    `max_new_tokens` beyond the model context is capped at the context (finish "length").
    `stop` is a tuple of strings (a single string is accepted and wrapped).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None = fresh entropy
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's EOS ids

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            if not all(_is_int(t) for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


def sample(lg: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from logits `[V]` (float32)."""
    if params.temperature == 0:
        return int(np.argmax(lg))
    z = lg.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < len(z):
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < params.top_p  # the smallest prefix reaching top_p
        mask = np.zeros_like(p, bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


# ------------------------------------------------------------------------------------------
# Continuous batching.


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    max_tokens: int  # params.max_new_tokens capped at the model context
    stream: object | None = None  # the detokenizer (`push(id) -> str`, `flush() -> str`), if any
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    held: str = ""  # decoded text not yet emitted (could be the start of a stop string)
    finish_reason: str | None = None
    error: str | None = None
    preemptions: int = 0

    def completion(self) -> Completion:
        return Completion(self.id, len(self.prompt), list(self.tokens), self.text, self.finish_reason, self.error)


@dataclasses.dataclass(frozen=True)
class Completion:
    id: int
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "error" | "cancelled"
    error: str | None = None  # the message, when finish_reason == "error"


@dataclasses.dataclass(frozen=True)
class Event:
    """What one step did for one request: a new token (and the text it made safe to show),
    and/or the request's end (`completion`; the engine has forgotten the request then)."""

    request: Request
    token: int | None
    text: str
    completion: Completion | None = None


@dataclasses.dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    preemptions: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["decode_tok_per_s"] = self.decode_tokens / self.decode_s if self.decode_s else 0.0
        d["prefill_tok_per_s"] = self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0
        return d


class Engine:
    """Continuous-batching generation over one model and one paged KV cache.

    Not thread-safe: one thread submits, steps and cancels (the server's engine loop).

    Args:
        max_batch: most sequences decoding at once (>= 1).
        cache_tokens: KV cache capacity in tokens (all sequences together).
    """

    def __init__(self, model: Model, *, max_batch: int = 16, cache_tokens: int = 8192, page_size: int = PAGE_SIZE,
                 stats: Stats | None = None, executor: Executor | None = None):
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not _is_int(cache_tokens) or cache_tokens < 1:
            raise ValueError(f"cache_tokens must be an integer >= 1, got {cache_tokens!r}")
        self.model = model
        self.max_batch = max_batch
        self.executor = executor if executor is not None else model.executor
        self.cache = self.executor.new_cache(cache_tokens, page_size=page_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.stats = stats if stats is not None else Stats()
        self._next_id = 0
        tok = model.tokenizer
        # Sample only ids the tokenizer knows: a vocabulary padded past it has rows that are not tokens.
        self._n_vocab = min(model.cfg.vocab_size, tok.vocab_size) if tok is not None else model.cfg.vocab_size

    # -- requests in and out ---------------------------------------------------------------

    def max_new_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """`params.max_new_tokens` capped at the room the model context leaves after the prompt."""
        return max(0, min(params.max_new_tokens, self.model.cfg.max_seq_len - prompt_len))

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), *,
               detokenizer: object | None = None) -> int:
        """Queue a prompt (token ids); returns its request id.

        Raises ValueError (nothing queued) for a prompt that is empty, has ids outside the
        vocabulary, fills the model context, or can never fit the KV cache (prompt + max new
        tokens beyond all its pages).

        Args:
            detokenizer: decodes this request's tokens to text (`push(id) -> str`,
                `flush() -> str`); default a fresh `model.tokenizer.stream()`.
        """
        prompt = token_ids(prompt, self.model.cfg.vocab_size, "prompt").tolist()
        if len(prompt) >= self.model.cfg.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the model's context "
                             f"({self.model.cfg.max_seq_len} tokens)")
        n_max = self.max_new_tokens(len(prompt), params)
        need = self.cache.pages_for(len(prompt) + n_max - 1)  # the last sampled token is never fed back
        if need > self.cache.num_pages:
            cap = self.cache.num_pages * self.cache.params.page_size
            raise ValueError(f"prompt of {len(prompt)} tokens + {n_max} new tokens does not fit the KV cache "
                             f"({cap} tokens): shorten the prompt or lower max_new_tokens to "
                             f"{max(0, cap - len(prompt) + 1)} or less")
        rid = self._next_id
        self._next_id += 1
        if detokenizer is None and self.model.tokenizer is not None:
            detokenizer = self.model.tokenizer.stream()
        self.waiting.append(Request(rid, prompt, params, np.random.default_rng(params.seed), n_max, detokenizer))
        return rid

    def cancel(self, request_id: int) -> Completion | None:
        """End a waiting or running request ("cancelled") and free its pages now.

        Returns its completion, or None if the engine does not hold it (already finished).
        """
        for r in list(self.waiting) + self.running:
            if r.id == request_id:
                return self._finish(r, "cancelled")
        return None

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def pages_in_use(self) -> int:
        return self.cache.num_pages - self.cache.free_pages

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit waiting prompts (prefill), then decode one token for every running sequence.

        Returns:
            the events of this step, in order: one per token produced, and one carrying the
            `completion` of every request that ended (the engine forgets it then).
        """
        events: list[Event] = []
        self._make_room_for_decode()
        joined = self._admit()
        if joined:
            t0 = time.perf_counter()
            chunks = [r.prompt + r.tokens for r in joined]  # a preempted request recomputes its tokens too
            events += self._run_batch(joined, chunks)
            self.stats.prefill_s += time.perf_counter() - t0
            self.stats.prefill_tokens += sum(map(len, chunks))
        decoding = [r for r in self.running if r not in joined]
        if decoding:
            t0 = time.perf_counter()
            events += self._run_batch(decoding, [[r.tokens[-1]] for r in decoding])
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.decode_tokens += len(decoding)
        return events

    def _make_room_for_decode(self) -> None:
        """Preempt the most recently admitted sequences until every running sequence has a
        page for its next token."""
        while self.running and sum(self.cache.pages_needed(r.id, 1) for r in self.running) > self.cache.free_pages:
            r = self.running.pop()
            self.cache.release(r.id)
            r.preemptions += 1
            self.stats.preemptions += 1
            self.waiting.appendleft(r)  # first to come back

    def _admit(self) -> list[Request]:
        """Move waiting requests to running while their prefill fits the pages left after this
        step's promises (one decode token per running sequence, the prefills admitted so far)."""
        budget = self.cache.free_pages - sum(self.cache.pages_needed(r.id, 1) for r in self.running)
        joined = []
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            need = self.cache.pages_for(len(r.prompt) + len(r.tokens))
            if need > budget:
                break  # it waits for pages (in order: a long prompt is not starved by short ones)
            budget -= need
            self.waiting.popleft()
            self.cache.add(r.id)
            self.running.append(r)
            joined.append(r)
        return joined

    def _run_batch(self, reqs: list[Request], chunks: list[list[int]]) -> list[Event]:
        """One forward pass, then one sampled token per request. A failing pass ends the
        batch's requests with "error" (the cache rolled back by `forward`)."""
        try:
            step = self.executor.step([r.id for r in reqs], chunks)
            (last,) = self.executor.run(self.cache, step)
            last = to_numpy(last)  # [B, V]
        except Exception as e:
            msg = f"forward pass failed ({self.model.path}): {type(e).__name__}: {e}"
            return [Event(r, None, "", self._finish(r, "error", msg)) for r in reqs]
        events = []
        for r, lg in zip(reqs, last):
            try:
                events.append(self._accept(r, lg))
            except Exception as e:  # this request's fault (sampling, detokenizing, stop strings)
                events.append(Event(r, None, "", self._finish(r, "error", f"{type(e).__name__}: {e}")))
        return events

    def _accept(self, r: Request, lg: np.ndarray) -> Event:
        lg = lg[:self._n_vocab]
        if not np.isfinite(lg).all():
            return Event(r, None, "", self._finish(
                r, "error", f"{self.model.path}: the model produced non-finite logits (nan/inf) at position "
                            f"{len(r.prompt) + len(r.tokens)}"))
        tok = sample(lg, r.params, r.rng)
        r.tokens.append(tok)
        stops = r.params.stop_token_ids if r.params.stop_token_ids is not None else self.model.eos_token_ids
        if tok in stops:
            piece = self._emit(r, new=r.stream.flush() if r.stream else "", final=True)
            return Event(r, tok, piece, self._finish(r, "stop"))
        piece = self._emit(r, new=r.stream.push(tok) if r.stream else "")
        if r.finish_reason:  # a stop string completed
            return Event(r, tok, piece, self._forget(r))
        if len(r.tokens) >= r.max_tokens or len(r.prompt) + len(r.tokens) >= self.model.cfg.max_seq_len:
            piece += self._emit(r, new=r.stream.flush() if r.stream else "", final=True)
            return Event(r, tok, piece, self._finish(r, "length"))
        return Event(r, tok, piece)

    def _emit(self, r: Request, new: str = "", final: bool = False) -> str:
        """Text that is safe to show now: held back while it could still become a stop string."""
        r.held += new
        for s in r.params.stop:
            at = r.held.find(s)
            if at >= 0:
                out, r.held = r.held[:at], ""
                r.text += out
                r.finish_reason = "stop"
                return out
        keep = 0 if final else max((k for s in r.params.stop for k in range(len(s), 0, -1)
                                    if r.held.endswith(s[:k])), default=0)
        out, r.held = r.held[:len(r.held) - keep], r.held[len(r.held) - keep:]
        r.text += out
        return out

    def _finish(self, r: Request, reason: str, error: str | None = None) -> Completion:
        if r.finish_reason is None:
            r.finish_reason, r.error = reason, error
        return self._forget(r)

    def _forget(self, r: Request) -> Completion:
        """Take a finished request out of the engine, its pages freed."""
        if r in self.running:
            self.running.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        if r.id in self.cache:
            self.cache.release(r.id)
        return r.completion()

    def run(self, on_token: Callable[[Request, int, str], None] | None = None) -> list[Completion]:
        """Step until every request is done; returns the completions of the requests that
        ended meanwhile, in submission order (the engine keeps none of them)."""
        done = []
        while self.busy:
            for ev in self.step():
                if on_token and ev.token is not None:
                    on_token(ev.request, ev.token, ev.text)
                if ev.completion is not None:
                    done.append(ev.completion)
        return sorted(done, key=lambda c: c.id)


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
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False if text.startswith(tok.bos_token or "\0") else True)


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
    return bool(items) and all(isinstance(x, dict) or (_is_int(x)) for x in items)


def _generate(model, prompts, params, *, chat, max_batch, on_token, stats) -> list[Completion]:
    if _is_one_prompt(prompts):
        prompts = [prompts]
    prompts = [encode(model, p, chat=chat) for p in prompts]
    ctx = model.cfg.max_seq_len
    sizes = sorted((ceil_div(len(p) + max(0, min(params.max_new_tokens, ctx - len(p))), PAGE_SIZE) * PAGE_SIZE
                    for p in prompts), reverse=True)
    engine = Engine(model, max_batch=max_batch, cache_tokens=max(1, sum(sizes[:max_batch])), stats=stats)
    for p in prompts:
        engine.submit(p, params)
    return engine.run(on_token)
