"""`tpmax serve`: an OpenAI-compatible HTTP server over one continuous-batching `Engine`.

One engine thread owns the model and steps the `Engine`; HTTP handlers (Starlette on
uvicorn's event loop) hand it requests through a thread-safe queue and receive tokens
through per-request asyncio queues (`loop.call_soon_threadsafe`), so requests from many
connections share the same decode steps and neither side blocks the other.

    python -m tpmax.serve [--model PATH] [--devices cpu:0,1] [--port 8000] ...

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream or not), GET /v1/models,
GET /health, GET /metrics (Prometheus).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import queue
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from . import spmd
from .generate import Completion, Engine, SamplingParams, encode_chat
from .loader import Model

log = logging.getLogger("tpmax.serve")

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# ------------------------------------------------------------------------------------------
# Metrics.


class Metrics:
    """The server's Prometheus metrics, in their own registry (several servers per process
    in tests stay apart)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("tpmax_requests", "HTTP generation requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("tpmax_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("tpmax_generation_tokens", "Generated tokens", registry=r)
        self.preemptions = Gauge("tpmax_preemptions", "Sequences preempted (recomputed later) so far", registry=r)
        self.queue_depth = Gauge("tpmax_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("tpmax_running_requests", "Requests decoding", registry=r)
        self.kv_pages_in_use = Gauge("tpmax_kv_pages_in_use", "KV cache pages held by sequences", registry=r)
        self.kv_pages_total = Gauge("tpmax_kv_pages_total", "KV cache pages in all", registry=r)
        lat = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
        self.ttft = Histogram("tpmax_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=lat, registry=r)
        self.itl = Histogram("tpmax_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=lat, registry=r)
        self.batch = Histogram("tpmax_batch_size", "Tokens produced by each engine step (sequences batched)",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.e2e = Histogram("tpmax_request_duration_seconds", "From request arrival to its last token",
                             buckets=lat, registry=r)


# ------------------------------------------------------------------------------------------
# The engine thread.


class QueueFullError(RuntimeError):
    pass


@dataclasses.dataclass(eq=False)
class Job:
    """One HTTP request's generation, as the engine thread sees it. Messages to the handler,
    through `out`: ("rejected", message) or ("accepted",), then ("token", id, text) per
    token and ("done", Completion) at the end."""

    prompt: list[int]
    params: SamplingParams
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    endpoint: str = "completions"
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    rid: int | None = None
    last_token_at: float | None = None
    cancelled: bool = False
    done: bool = False

    def send(self, msg: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, msg)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class EngineLoop:
    """Owns the `Engine` on one thread. `submit` and `cancel` may be called from any thread.

    Args:
        max_queue: requests that may wait for a batch slot beyond the `max_batch` running
            ones; `submit` raises QueueFullError past that.
    """

    def __init__(self, engine: Engine, *, max_queue: int, metrics: Metrics):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted, not yet finished (under _lock)
        self._jobs: dict[int, Job] = {}  # engine request id -> job (engine thread only)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tpmax-engine", daemon=True)
        metrics.kv_pages_total.set(engine.cache.num_pages)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every request already submitted, then end the thread."""
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._in_flight >= self.engine.max_batch + self.max_queue:
                raise QueueFullError(f"the server is busy: {self._in_flight} requests in flight "
                                     f"(--max-batch {self.engine.max_batch} + --max-queue {self.max_queue}); "
                                     f"retry later")
            self._in_flight += 1
        self._commands.put(("submit", job))

    def cancel(self, job: Job) -> None:
        if not job.done:
            self._commands.put(("cancel", job))

    def _release(self, job: Job, outcome: str) -> None:
        if not job.done:
            job.done = True
            with self._lock:
                self._in_flight -= 1
            self.metrics.requests.labels(job.endpoint, outcome).inc()

    # -- on the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._take_commands(block=not self.engine.busy)
                if self._stop and not self.engine.busy:
                    break
                if self.engine.busy:
                    self._step()
                self._update_gauges()
            except Exception:  # a bug here must not leave every client waiting on a dead thread
                log.exception("engine loop error")
                self._fail_all("engine loop error")
        log.info("engine loop stopped")

    def _take_commands(self, *, block: bool) -> None:
        while True:
            try:
                kind, job = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "stop":
                self._stop = True
            elif kind == "submit":
                self._start(job)
            elif kind == "cancel" and not job.done:
                job.cancelled = True
                if job.rid is not None:
                    self.engine.cancel(job.rid)
                    self._jobs.pop(job.rid, None)
                self._release(job, "cancelled")
                self._update_gauges()

    def _start(self, job: Job) -> None:
        if job.cancelled:
            return
        try:
            job.rid = self.engine.submit(job.prompt, job.params)
        except Exception as e:  # ValueError: the prompt can never run here (too long, bad ids)
            self._release(job, "rejected_invalid")
            job.send(("rejected", str(e)))
            return
        self._jobs[job.rid] = job
        self.metrics.prompt_tokens.inc(len(job.prompt))
        job.send(("accepted",))

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # a bug in the engine: end what it was doing, keep serving
            log.exception("engine step failed")
            self._fail_all(f"engine failure: {type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        if any(ev.token is not None for ev in events):
            self.metrics.batch.observe(sum(ev.token is not None for ev in events))
        for ev in events:
            job = self._jobs.get(ev.request.id)
            if job is None:
                continue
            if ev.token is not None:
                self.metrics.generation_tokens.inc()
                if job.last_token_at is None:
                    self.metrics.ttft.observe(now - job.arrived)
                else:
                    self.metrics.itl.observe(now - job.last_token_at)
                job.last_token_at = now
                job.send(("token", ev.token, ev.text))
            if ev.completion is not None:
                self.metrics.e2e.observe(now - job.arrived)
                del self._jobs[ev.request.id]
                self._release(job, ev.completion.finish_reason)
                job.send(("done", ev.completion))

    def _fail_all(self, message: str) -> None:
        """End every request the engine holds with an error."""
        for rid, job in list(self._jobs.items()):
            c = self.engine.cancel(rid) or Completion(rid, len(job.prompt), [], "", "error")
            job.send(("done", dataclasses.replace(c, finish_reason="error", error=message)))
            del self._jobs[rid]
            self._release(job, "error")

    def _update_gauges(self) -> None:
        m, e = self.metrics, self.engine
        m.queue_depth.set(len(e.waiting) + self._commands.qsize())
        m.running.set(len(e.running))
        m.kv_pages_in_use.set(e.pages_in_use)
        m.preemptions.set(e.stats.preemptions)


# ------------------------------------------------------------------------------------------
# Request parsing: OpenAI's fields -> SamplingParams, every fault an `APIError`.


class APIError(Exception):
    """An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with a status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"'{name}' must be a finite number, got {json.dumps(v)}")
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise _bad(name, f"'{name}' must be an integer, got {json.dumps(v)}")
    return v


def sampling_params(body: dict, *, default_max_tokens: Callable[[], int], eos: tuple[int, ...]) -> SamplingParams:
    """SamplingParams from an OpenAI request body (max_tokens / max_completion_tokens,
    temperature, top_p, seed, stop, n; extensions as in vLLM: top_k, ignore_eos)."""
    n = _integer(body, "n")
    if n not in (None, 1):
        raise _bad("n", f"only n=1 is supported, got n={n}")
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    name = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise _bad(name, f"'{name}' must be at least 1, got {max_tokens}")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise _bad("temperature", f"'temperature' must be >= 0, got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"'top_p' must be in (0, 1], got {top_p}")
    top_k = _integer(body, "top_k") or 0
    if top_k < -1:
        raise _bad("top_k", f"'top_k' must be >= 0 (or -1 = off), got {top_k}")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**64:
        raise _bad("seed", f"'seed' must be in [0, 2**64), got {seed}")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "'stop' must be a non-empty string or a list of non-empty strings")
    ignore_eos = body.get("ignore_eos") or False
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "'ignore_eos' must be a boolean")
    for unsupported in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions"):
        if body.get(unsupported):
            raise _bad(unsupported, f"'{unsupported}' is not supported by this server")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of", "only best_of=1 is supported")
    return SamplingParams(max_new_tokens=max_tokens if max_tokens is not None else default_max_tokens(),
                          temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed, stop=tuple(stop),
                          stop_token_ids=() if ignore_eos else eos)


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}].role {json.dumps(role)} is not one of {list(CHAT_ROLES)}")
        if isinstance(content, list):  # content parts: only text
            parts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise _bad(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body: dict, model: Model) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if model.tokenizer is None:
            raise _bad("prompt", f"{model.path} has no tokenizer: send token ids")
        return model.tokenizer.encode(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    if isinstance(p, list) and len(p) > 1:
        raise _bad("prompt", "only one prompt per request is supported")
    raise _bad("prompt", "'prompt' must be a non-empty string or a list of token ids")


# ------------------------------------------------------------------------------------------
# The web application.


def model_id(model: Model) -> str:
    return Path(model.path).name


def create_app(model: Model, *, max_batch: int = 16, max_queue: int = 64, cache_tokens: int = 8192,
               page_size: int = 16, served_name: str | None = None):
    """The Starlette application; the engine thread starts and stops with its lifespan
    (a stop finishes the requests in flight first)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    metrics = Metrics()
    engine = Engine(model, max_batch=max_batch, cache_tokens=cache_tokens, page_size=page_size)
    loop_ = EngineLoop(engine, max_queue=max_queue, metrics=metrics)
    name = served_name or model_id(model)
    created = int(time.time())
    cache_room = engine.cache.num_pages * page_size
    ctx = model.cfg.max_seq_len

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop_.start()
        yield
        await asyncio.to_thread(loop_.stop)

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is not None and m != name:
            raise APIError(404, f"the model {json.dumps(m)} does not exist; this server serves {json.dumps(name)}",
                           param="model", code="model_not_found")

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def stream_flag(body: dict) -> tuple[bool, bool]:
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _bad("stream", "'stream' must be a boolean")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _bad("stream_options", "'stream_options' must be an object")
        return stream, bool(opts.get("include_usage"))

    class CancellingStream(StreamingResponse):
        """A streaming response that calls `on_close` however it ends (finished, client gone,
        server stopping): a request still in the engine is cancelled, its pages freed."""

        def __init__(self, content, *, on_close: Callable[[], None], **kw):
            super().__init__(content, **kw)
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    async def accepted(job: Job, param: str) -> None:
        """Wait for the engine to take the job; a request it refuses (too long) is a 400."""
        msg = await job.out.get()
        if msg[0] == "rejected":
            too_long = "context" in msg[1] or "KV cache" in msg[1]
            raise APIError(400, msg[1], param=param, code="context_length_exceeded" if too_long else "invalid_prompt")

    async def generate_response(request: Request, endpoint: str, prompt: list[int], params: SamplingParams,
                                stream: bool, include_usage: bool, param: str):
        job = Job(prompt, params, asyncio.Queue(), asyncio.get_running_loop(), endpoint)
        try:
            loop_.submit(job)
        except QueueFullError as e:
            metrics.requests.labels(endpoint, "rejected_busy").inc()
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if endpoint == "chat" else "text_completion"
        now = int(time.time())

        def usage(c: Completion) -> dict:
            return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
                    "total_tokens": c.prompt_tokens + len(c.tokens)}

        def failed(c: Completion) -> APIError:
            return APIError(500, f"generation failed: {c.error}", type="server_error", code="generation_error")

        if not stream:
            async def completion() -> Completion:
                await accepted(job, param)
                while (msg := await job.out.get())[0] != "done":
                    pass
                return msg[1]

            c = await until_disconnect(request, completion(), on_disconnect=lambda: loop_.cancel(job))
            if c is None:  # the client is gone; nobody reads this
                return Response(status_code=499)
            if c.finish_reason == "error":
                raise failed(c)
            choice = ({"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                       "finish_reason": c.finish_reason} if endpoint == "chat" else
                      {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason})
            return JSONResponse({"id": rid, "object": obj, "created": now, "model": name, "choices": [choice],
                                 "usage": usage(c)})

        try:
            await accepted(job, param)
        except BaseException:
            loop_.cancel(job)
            raise
        chunk_obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

        def chunk(choice: dict, **extra) -> str:
            return sse({"id": rid, "object": chunk_obj, "created": now, "model": name, "choices": [choice], **extra})

        def piece(text: str | None, finish: str | None = None, *, role: bool = False) -> str:
            if endpoint == "chat":
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                return chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})
            return chunk({"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish})

        async def events():
            if endpoint == "chat":
                yield piece(None, role=True)
            while True:
                try:
                    msg = await asyncio.wait_for(job.out.get(), timeout=5.0)
                except asyncio.TimeoutError:
                    yield ": waiting\n\n"  # an SSE comment while queued: a gone client shows up
                    continue
                if msg[0] == "token" and msg[2]:
                    yield piece(msg[2])
                elif msg[0] == "done":
                    c: Completion = msg[1]
                    if c.finish_reason == "error":
                        yield sse(failed(c).body())
                    else:
                        yield piece(None, c.finish_reason)
                        if include_usage:
                            yield sse({"id": rid, "object": chunk_obj, "created": now, "model": name, "choices": [],
                                       "usage": usage(c)})
                    yield "data: [DONE]\n\n"
                    return

        return CancellingStream(events(), on_close=lambda: loop_.cancel(job), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_completions(request: Request):
        body = await read_body(request)
        check_model(body)
        messages = chat_messages(body)
        stream, include_usage = stream_flag(body)
        if model.tokenizer is None or not model.tokenizer.has_chat_template:
            raise APIError(400, f"{model.path} has no chat template: use /v1/completions", param="messages")
        try:
            prompt = await asyncio.to_thread(encode_chat, model, messages)
        except Exception as e:  # a template that raises (e.g. roles out of order)
            raise _bad("messages", f"the chat template rejected the messages: {e}") from None
        params = sampling_params(body, default_max_tokens=lambda: default_room(len(prompt)),
                                 eos=model.eos_token_ids)
        return await generate_response(request, "chat", prompt, params, stream, include_usage, "messages")

    async def completions(request: Request):
        body = await read_body(request)
        check_model(body)
        stream, include_usage = stream_flag(body)
        prompt = await asyncio.to_thread(completion_prompt, body, model)
        params = sampling_params(body, default_max_tokens=lambda: COMPLETIONS_DEFAULT_MAX_TOKENS,
                                 eos=model.eos_token_ids)
        return await generate_response(request, "completions", prompt, params, stream, include_usage, "prompt")

    def default_room(prompt_len: int) -> int:
        """max_tokens when the request names none: the rest of the context, within the cache."""
        return max(1, min(ctx - prompt_len, cache_room - prompt_len + 1))

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                                         "owned_by": "tpmax"}]})

    async def health(request: Request):
        if not loop_.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                            status_code=500)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_endpoint, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.engine_loop, app.state.metrics = loop_, metrics
    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def until_disconnect(request, coro, *, on_disconnect: Callable[[], None]):
    """Await `coro`; if the client disconnects first, call `on_disconnect` and return None."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(coro), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    on_disconnect()
    return None


# ------------------------------------------------------------------------------------------
# Command line.


def run_serve(args) -> int:
    """`tpmax serve`: load the model and serve until SIGTERM / Ctrl-C (requests in flight
    finish first). `args` as `tpmax.cli` parses them."""
    from .loader import load

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 0 or args.cache_tokens < 1:
        raise ValueError("--max-batch and --cache-tokens must be >= 1, --max-queue >= 0")
    model = load(args.model, devices=args.devices, dtype=args.dtype, progress=not args.quiet, threads=args.threads)
    if not spmd.is_leader(model):  # under MPI: rank 0 serves, this rank runs each step with it
        spmd.follow(model)
        return 0
    with spmd.session(model):
        return _serve(model, args)


def _serve(model: Model, args) -> int:
    import uvicorn

    app = create_app(model, max_batch=args.max_batch, max_queue=args.max_queue, cache_tokens=args.cache_tokens,
                     served_name=args.served_model_name)
    if not args.quiet:
        print(f"tpmax: serving {app.state.engine_loop.engine.model.path} as "
              f"{args.served_model_name or model_id(model)!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                            access_log=not args.quiet, lifespan="on", timeout_graceful_shutdown=600)
    main_thread = threading.current_thread() is threading.main_thread()
    # uvicorn drains on SIGTERM, then re-raises it: exit 0 then rather than die by the signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main_thread else None
    try:
        uvicorn.Server(config).run()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
