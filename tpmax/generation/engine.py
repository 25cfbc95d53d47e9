"""Continuous batching over one model and one paged KV cache (`Engine`).

Each step admits waiting prompts by the pages still free after what the step already
promised (one decode token for every running sequence), prefills them, then decodes one
token for every running sequence in one ragged batch. When decoding needs a page and none is
free, the most recently admitted sequence is preempted (pages freed, recomputed later from
its prompt and tokens), so no request is lost for lack of pages. Every pass is a `Step` run
by the model's executor (reserve -> forward -> commit, rollback on error).
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Callable, Sequence

import numpy as np

from ..core.devices import to_numpy
from ..parallel.executor import Executor, token_ids
from ..nn.kv_cache import PAGE_SIZE
from ..checkpoint.loader import Model
from .sampling import SamplingParams, is_int, sample
from ..core.sharding import ceil_div
from .stops import split_held


def cache_tokens_for(model: Model, prompts: Sequence[Sequence[int]], params: SamplingParams, max_batch: int) -> int:
    """KV cache tokens that hold the `max_batch` largest of these requests at once (prompt +
    new tokens, capped at the model context, in whole pages): room for every one of them."""
    ctx = model.cfg.max_seq_len
    sizes = sorted((ceil_div(len(p) + max(0, min(params.max_new_tokens, ctx - len(p))), PAGE_SIZE) * PAGE_SIZE
                    for p in prompts), reverse=True)
    return max(1, sum(sizes[:max_batch]))


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
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not is_int(cache_tokens) or cache_tokens < 1:
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
        out, r.held, stopped = split_held(r.held + new, r.params.stop, final=final)
        r.text += out
        if stopped:
            r.finish_reason = "stop"
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
