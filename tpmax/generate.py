"""Scoring and generation over a loaded `Model`.

`logits` scores whole sequences in one ragged batch. `Engine` generates with continuous
batching over the paged KV cache: each step first prefills the prompts that joined, then
decodes one token for every running sequence in one ragged batch; sequences leave as they
finish and waiting prompts take their place. Sampling is greedy, or temperature / top-k /
top-p with a per-request seed.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from typing import Callable, Iterable, Sequence

import numpy as np

from .devices import to_numpy
from .kv_cache import KVCacheFullError, PagedKVCache
from .loader import Model
from .transformer import ReturnLogits, distributed_transformer


def logits(model: Model, sequences: Sequence[Sequence[int]], *, page_size: int = 16) -> list[np.ndarray]:
    """Logits at every position of every sequence, computed as one ragged batch.

    Args:
        sequences: token-id lists (each non-empty).
    Returns:
        per sequence a float32 NumPy array `[len, vocab]`.
    """
    seqs = [np.asarray(s, np.int64) for s in sequences]
    if not seqs:
        return []
    offs = np.cumsum([0] + [len(s) for s in seqs])
    cache = model.new_cache(sum(-(-len(s) // page_size) * page_size for s in seqs), page_size=page_size)
    for i in range(len(seqs)):
        cache.add(i)
    _, all_logits, _ = forward(model, cache, list(range(len(seqs))), seqs, return_logits=ReturnLogits.ALL)
    all_logits = to_numpy(all_logits)
    return [all_logits[offs[i]:offs[i + 1]] for i in range(len(seqs))]


def forward(model: Model, cache: PagedKVCache, seq_ids: Sequence, chunks: Sequence[Sequence[int]], **kw) -> tuple:
    """One ragged step: reserve the chunks' KV slots, run the forward pass, commit.

    `chunks[b]` are the new tokens of sequence `seq_ids[b]`. If the pass fails, the
    reservation is rolled back (no page stays reserved but uncommitted) and the error raised.
    Returns the tuple of `distributed_transformer`.
    """
    n_new = [len(c) for c in chunks]
    tokens = np.concatenate([np.asarray(c, np.int64) for c in chunks])
    offsets = np.cumsum([0] + n_new)
    slots = cache.reserve(seq_ids, n_new)
    try:
        out = distributed_transformer(model.weights, model.cfg, tokens, offsets, cache.pages, slots, model.comm, **kw)
    except BaseException:
        cache.rollback(seq_ids)
        raise
    cache.commit(seq_ids, n_new)
    return out


def perplexity(model: Model, ids: Sequence[int], *, context_length: int) -> tuple[float, int]:
    """Perplexity over non-overlapping windows of `context_length` tokens, each window scored
    from its second token. Returns (perplexity, scored tokens)."""
    if context_length < 2:
        raise ValueError("context_length must be at least 2")
    ids = np.asarray(ids, np.int64)
    windows = [ids[a:a + context_length] for a in range(0, len(ids), context_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("need at least 2 tokens to compute perplexity")
    nll, n = 0.0, 0
    for w in windows:  # one window per forward: memory stays [context_length, vocab]
        (lg,) = logits(model, [w])
        lg = lg[:-1].astype(np.float64)  # predicts w[1:]
        m = lg.max(axis=-1, keepdims=True)
        logz = (m + np.log(np.exp(lg - m).sum(axis=-1, keepdims=True)))[:, 0]
        nll += float((logz - lg[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    return math.exp(nll / n), n


# ------------------------------------------------------------------------------------------
# Sampling.


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 = greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's EOS ids

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


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
    stream: object | None = None  # the tokenizer's StreamDecoder, if any
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    held: str = ""  # decoded text not yet emitted (could be the start of a stop string)
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    id: int
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "kv_cache_full"


@dataclasses.dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["decode_tok_per_s"] = self.decode_tokens / self.decode_s if self.decode_s else 0.0
        d["prefill_tok_per_s"] = self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0
        return d


class Engine:
    """Continuous-batching generation over one model and one paged KV cache.

    Args:
        max_batch: most sequences decoding at once.
        cache_tokens: KV cache capacity in tokens (all sequences together).
    """

    def __init__(self, model: Model, *, max_batch: int = 16, cache_tokens: int = 8192, page_size: int = 16,
                 stats: Stats | None = None):
        self.model = model
        self.max_batch = max_batch
        self.cache = model.new_cache(cache_tokens, page_size=page_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = stats if stats is not None else Stats()
        self.finished: list[Request] = []  # in the order they finished
        self._next_id = 0

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams()) -> int:
        """Queue a prompt (token ids); returns its request id."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt")
        V = self.model.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} outside the vocabulary [0, {V})")
        if len(prompt) >= self.model.cfg.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the model's context "
                             f"({self.model.cfg.max_seq_len})")
        need = -(-(len(prompt) + 1) // self.cache.params.page_size)
        if need > self.cache.num_pages:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the KV cache "
                             f"({self.cache.num_pages * self.cache.params.page_size} tokens)")
        rid = self._next_id
        self._next_id += 1
        seed = params.seed + rid if params.seed is not None else None
        tok = self.model.tokenizer
        self.waiting.append(Request(rid, prompt, params, np.random.default_rng(seed),
                                    tok.stream() if tok is not None else None))
        return rid

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[tuple[Request, int, str]]:
        """Admit waiting prompts (prefill), then decode one token for every running sequence.

        Returns:
            `(request, token, new_text)` for every token produced in this step.
        """
        events = []
        joined = self._admit()
        if joined:
            t0 = time.perf_counter()
            last = self._forward(joined, [r.prompt for r in joined])
            self.stats.prefill_s += time.perf_counter() - t0
            self.stats.prefill_tokens += sum(len(r.prompt) for r in joined)
            events += self._accept(joined, last)
        decoding = [r for r in self.running if r not in joined]
        if decoding:
            t0 = time.perf_counter()
            last = self._forward(decoding, [[r.tokens[-1]] for r in decoding])
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.decode_tokens += len(decoding)
            events += self._accept(decoding, last)
        return events

    def _admit(self) -> list[Request]:
        joined = []
        ps = self.cache.params.page_size
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            if -(-(len(r.prompt) + 1) // ps) > self.cache.free_pages:
                break  # wait for pages to free up
            self.waiting.popleft()
            self.cache.add(r.id)
            self.running.append(r)
            joined.append(r)
        return joined

    def _forward(self, reqs: list[Request], chunks: list[list[int]]) -> np.ndarray:
        """Run one ragged batch; a request that finds the cache full is ended (others go on)."""
        while True:
            try:
                (last,) = forward(self.model, self.cache, [r.id for r in reqs], chunks)
                return to_numpy(last)
            except KVCacheFullError as e:
                i = [r.id for r in reqs].index(e.seq_id)
                self._finish(reqs[i], "kv_cache_full")
                del reqs[i], chunks[i]
                if not reqs:
                    return np.zeros((0, self.model.cfg.vocab_size), np.float32)

    def _accept(self, reqs: list[Request], last: np.ndarray) -> list[tuple[Request, int, str]]:
        events = []
        for r, lg in zip(reqs, last):
            if r.finish_reason:
                continue
            tok = sample(lg, r.params, r.rng)
            r.tokens.append(tok)
            stops = r.params.stop_token_ids if r.params.stop_token_ids is not None else self.model.eos_token_ids
            if tok in stops:
                events.append((r, tok, self._emit(r, final=True)))
                self._finish(r, "stop")
                continue
            piece = self._emit(r, new=r.stream.push(tok) if r.stream else "")
            if r.finish_reason:  # a stop string completed
                events.append((r, tok, piece))
                continue
            out_of_room = len(r.prompt) + len(r.tokens) >= self.model.cfg.max_seq_len
            if len(r.tokens) >= r.params.max_new_tokens or out_of_room:
                piece += self._emit(r, new=r.stream.flush() if r.stream else "", final=True)
                self._finish(r, "length")
            events.append((r, tok, piece))
        return events

    def _emit(self, r: Request, new: str = "", final: bool = False) -> str:
        """Text that is safe to show now: held back while it could still become a stop string."""
        r.held += new
        for s in r.params.stop:
            at = r.held.find(s)
            if at >= 0:
                out, r.held = r.held[:at], ""
                r.text += out
                self._finish(r, "stop")
                return out
        keep = 0 if final else max((k for s in r.params.stop for k in range(len(s), 0, -1)
                                    if r.held.endswith(s[:k])), default=0)
        out, r.held = r.held[:len(r.held) - keep], r.held[len(r.held) - keep:]
        r.text += out
        return out

    def _finish(self, r: Request, reason: str) -> None:
        if r.finish_reason is None:
            r.finish_reason = reason
            self.finished.append(r)
        if r in self.running:
            self.running.remove(r)
            self.cache.release(r.id)

    def run(self, on_token: Callable[[Request, int, str], None] | None = None) -> list[Completion]:
        """Step until every request is done; returns their completions in submission order."""
        start = len(self.finished)
        while self.busy:
            for r, tok, piece in self.step():
                if on_token:
                    on_token(r, tok, piece)
        done = sorted(self.finished[start:], key=lambda r: r.id)
        return [Completion(r.id, len(r.prompt), r.tokens, r.text, r.finish_reason) for r in done]


def encode_prompt(model: Model, prompt: str, *, chat: bool = True) -> list[int]:
    """Token ids of a prompt, through the chat template when the model has one and `chat`."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.path}: the model has no tokenizer; pass token ids instead")
    if chat and tok.has_chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False if text.startswith(tok.bos_token or "\0") else True)
    return tok.encode(prompt)


def generate(model: Model, prompts: Iterable[str], params: SamplingParams = SamplingParams(), *, chat: bool = True,
             max_batch: int = 16, on_token: Callable[[Request, int, str], None] | None = None,
             stats: Stats | None = None) -> list[Completion]:
    """Generate a completion for each text prompt (continuous batching over all of them).

    `on_token(request, token, new_text)` is called for every token as it is produced;
    `stats`, if given, accumulates prefill/decode token counts and times.
    """
    prompts = [encode_prompt(model, p, chat=chat) for p in prompts]
    budget = sum(len(p) + params.max_new_tokens + 16 for p in prompts[:max_batch])
    engine = Engine(model, max_batch=max_batch, cache_tokens=budget, stats=stats)
    for p in prompts:
        engine.submit(p, params)
    return engine.run(on_token)
