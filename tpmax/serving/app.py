"""`tpmax serve`: an OpenAI-compatible HTTP server over one continuous-batching `Engine`.

The routes (Starlette on uvicorn) parse requests (`serve_protocol`), hand them to the engine
thread (`serve_loop`) and answer whole or as Server-Sent Events. Every input is bounded:
body size, body read time, connections open, time a connection may stall, header size.

    python -m tpmax.cli serve [--model PATH] [--devices cpu:0,1] [--port 8000] ...

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream or not), GET /v1/models,
GET /health, GET /metrics (Prometheus).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..generation.api import encode_chat
from ..generation.engine import Completion, Engine
from ..nn.kv_cache import PAGE_SIZE
from ..checkpoint.loader import Model
from ..generation.sampling import SamplingParams
from .loop import EngineLoop, Job, Metrics, QueueFullError
from .protocol import (COMPLETIONS_DEFAULT_MAX_TOKENS, APIError, ChatRequest, CompletionRequest, Reply,
                             bad, check_model, failed, parse, sampling_params, sse)

log = logging.getLogger("tpmax.serve")

MAX_BODY_BYTES = 4 * 2**20  # a request body beyond this is answered 413
BODY_TIMEOUT_S = 30.0  # a body not received by then is answered 408
MAX_CONNECTIONS = 256  # connections open at once; more are answered 503 and closed
STALL_TIMEOUT_S = 10.0  # a connection with no request in progress is closed after 1-2 of these
MAX_HEADER_BYTES = 64 * 2**10  # request line + headers; more is answered 400
DRAIN_TIMEOUT_S = 60.0  # SIGTERM: requests still running after this are cut
LINGER_S = 2.0  # after answering a request the server will not read, read and drop for this long


def model_id(model: Model) -> str:
    return Path(model.path).name


# ------------------------------------------------------------------------------------------
# The routes.


class Routes:
    """The HTTP handlers over one engine loop."""

    def __init__(self, model: Model, engine_loop: EngineLoop, metrics: Metrics, *, name: str,
                 max_body_bytes: int, body_timeout: float):
        self.model, self.engine_loop, self.metrics, self.name = model, engine_loop, metrics, name
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        self.created = int(time.time())
        engine = engine_loop.engine
        self.cache_room = engine.cache.num_pages * engine.cache.params.page_size

    async def read(self, request, cls):
        """The request body, at most `max_body_bytes` (413) within `body_timeout` (408),
        parsed off the event loop."""
        too_large = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise too_large

        async def collect() -> bytes:
            chunks, n = [], 0
            async for chunk in request.stream():
                n += len(chunk)
                if n > self.max_body_bytes:
                    raise too_large
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(collect(), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:  # nobody reads the answer; not a server error
            raise APIError(400, "the client disconnected while sending the request body") from None
        req = await asyncio.to_thread(parse, cls, raw)
        check_model(req, self.name)
        return req

    def params(self, req, default_max_tokens: Callable[[], int]) -> SamplingParams:
        return sampling_params(req, default_max_tokens=default_max_tokens, eos=self.model.eos_token_ids,
                               model_defaults=getattr(self.model.tokenizer, "generation_defaults", None))

    async def chat_completions(self, request):
        req = await self.read(request, ChatRequest)
        tok = self.model.tokenizer
        if tok is None or not tok.has_chat_template:
            raise APIError(400, f"{self.model.path} has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = await asyncio.to_thread(encode_chat, self.model, messages)
        except Exception as e:  # a template that raises (roles out of order), text the tokenizer refuses
            raise bad("messages", f"the messages cannot be encoded: {type(e).__name__}: {e}") from None
        params = self.params(req, lambda: self.default_room(len(prompt)))
        return await self.respond(request, req, "chat", prompt, params, "messages")

    async def completions(self, request):
        req = await self.read(request, CompletionRequest)
        prompt = req.one_prompt()
        if isinstance(prompt, str):
            if self.model.tokenizer is None:
                raise bad("prompt", f"{self.model.path} has no tokenizer: send token ids")
            try:
                prompt = await asyncio.to_thread(self.model.tokenizer.encode, prompt)
            except ValueError as e:  # text the tokenizer refuses (a lone surrogate)
                raise bad("prompt", f"the prompt cannot be encoded: {e}") from None
        params = self.params(req, lambda: COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await self.respond(request, req, "completions", prompt, params, "prompt")

    def default_room(self, prompt_len: int) -> int:
        """max_tokens when a chat request names none: the rest of the context, within the cache."""
        return max(1, min(self.model.cfg.max_seq_len - prompt_len, self.cache_room - prompt_len + 1))

    async def respond(self, request, req, endpoint: str, prompt: list[int], params: SamplingParams, param: str):
        job = Job(prompt, params, asyncio.Queue(), asyncio.get_running_loop(), endpoint)
        try:
            self.engine_loop.submit(job)
        except QueueFullError as e:
            self.metrics.requests.labels(endpoint, "rejected_busy").inc()
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        reply = Reply(endpoint, ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex,
                      int(time.time()), self.name)
        if not req.stream:
            async def completion() -> Completion:
                await accepted(job, param)
                while (msg := await job.out.get())[0] != "done":
                    pass
                return msg[1]

            c = await until_disconnect(request, completion(), on_disconnect=lambda: self.engine_loop.cancel(job))
            if c is None:  # the client is gone; nobody reads this
                return Response(status_code=499)
            if c.finish_reason == "error":
                raise failed(c)
            return JSONResponse(reply.whole(c))
        try:
            await accepted(job, param)
        except BaseException:
            self.engine_loop.cancel(job)
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return CancellingStream(events(job, reply, include_usage), on_close=lambda: self.engine_loop.cancel(job),
                                media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model",
                                                         "created": self.created, "owned_by": "tpmax"}]})

    async def health(self, request):
        if not self.engine_loop.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def accepted(job: Job, param: str) -> None:
    """Wait for the engine to take the job; a request it refuses (too long) is a 400."""
    msg = await job.out.get()
    if msg[0] == "rejected":
        too_long = "context" in msg[1] or "KV cache" in msg[1]
        raise APIError(400, msg[1], param=param, code="context_length_exceeded" if too_long else "invalid_prompt")


async def events(job: Job, reply: Reply, include_usage: bool):
    """The Server-Sent Events of a streamed answer, ending with `data: [DONE]`."""
    if (first := reply.role()) is not None:
        yield first
    while True:
        try:
            msg = await asyncio.wait_for(job.out.get(), timeout=5.0)
        except asyncio.TimeoutError:
            yield ": waiting\n\n"  # an SSE comment while queued: a gone client shows up
            continue
        if msg[0] == "token" and msg[2]:
            yield reply.piece(msg[2])
        elif msg[0] == "done":
            c: Completion = msg[1]
            if c.finish_reason == "error":
                yield sse(failed(c).body())
            else:
                yield reply.piece(None, c.finish_reason)
                if include_usage:
                    yield reply.usage_chunk(c)
            yield "data: [DONE]\n\n"
            return


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


async def until_disconnect(request, coro, *, on_disconnect: Callable[[], None]):
    """Await `coro`; if the client disconnects first, call `on_disconnect` and return None
    (and call it too if this call is cancelled)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(coro), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
    finally:
        watch.cancel()
        if not work.done():  # the client is gone, or the server cut the request (drain time over)
            work.cancel()
            on_disconnect()
    return None


# ------------------------------------------------------------------------------------------
# The application.


def create_app(model: Model, *, max_batch: int = 16, max_queue: int = 64, cache_tokens: int = 8192,
               page_size: int = PAGE_SIZE, served_name: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout: float = BODY_TIMEOUT_S):
    """The Starlette application; the engine thread starts and stops with its lifespan
    (a stop finishes the requests in flight first)."""
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    metrics = Metrics()
    engine = Engine(model, max_batch=max_batch, cache_tokens=cache_tokens, page_size=page_size)
    engine_loop = EngineLoop(engine, max_queue=max_queue, metrics=metrics)
    routes = Routes(model, engine_loop, metrics, name=served_name or model_id(model), max_body_bytes=max_body_bytes,
                    body_timeout=body_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine_loop.start()
        yield
        await asyncio.to_thread(engine_loop.stop)

    async def api_error(request, exc: APIError):
        headers = {"Connection": "close"} if exc.status in (408, 413) else None  # the body is left unread
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request, exc: HTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                            status_code=500)

    app = Starlette(routes=[Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
                            Route("/v1/completions", routes.completions, methods=["POST"]),
                            Route("/v1/models", routes.models, methods=["GET"]),
                            Route("/health", routes.health, methods=["GET"]),
                            Route("/metrics", routes.metrics_text, methods=["GET"])],
                    lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.engine_loop, app.state.metrics = engine_loop, metrics
    return app


# ------------------------------------------------------------------------------------------
# Connections: uvicorn's h11 protocol, bounded.


def bounded_protocol(*, max_connections: int = MAX_CONNECTIONS, stall_timeout: float = STALL_TIMEOUT_S):
    """uvicorn's h11 protocol class with bounds: past `max_connections` open connections a new
    one is answered 503 and closed; a connection that starts no request for one to two
    `stall_timeout` periods (headers sent slowly, or nothing) is closed; and a request the
    server answers without reading it all (malformed, headers too large) is answered with a
    lingering close (what the client still sends is read and dropped for LINGER_S) so the
    client sees the answer instead of a reset."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._lingering, self._seen = False, object()
            if len(self.connections) > max_connections:
                self.refuse(503, f"the server has {max_connections} connections open; retry later",
                            "service_unavailable")
                return
            self._tick = self.loop.call_later(stall_timeout, self.check_stalled)

        def check_stalled(self) -> None:
            cycle = self.cycle
            if (cycle is None or cycle.response_complete) and cycle is self._seen:
                self.transport.close()  # no request began since the last check
                return
            self._seen = cycle
            self._tick = self.loop.call_later(stall_timeout, self.check_stalled)

        def connection_lost(self, exc):
            if getattr(self, "_tick", None) is not None:
                self._tick.cancel()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            """SIGTERM: a request in progress finishes; a connection with none (idle, or its
            request not yet read) is told why it closes, instead of an empty reply."""
            if self.cycle is None or self.cycle.response_complete:
                self.refuse(503, "the server is shutting down", "shutting_down")
            else:
                super().shutdown()

        def data_received(self, data: bytes) -> None:
            if not self._lingering:
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            self.refuse(400, f"invalid HTTP request (malformed, or request line and headers over "
                             f"{MAX_HEADER_BYTES} bytes): {msg}", None)

        def refuse(self, status: int, message: str, code: str | None) -> None:
            """Answer `status` with an OpenAI-style error, then a lingering close."""
            if self._lingering or self.transport.is_closing():
                return
            kind = "invalid_request_error" if status < 500 else "server_error"
            body = json.dumps(APIError(status, message, code=code, type=kind).body()).encode()
            self.transport.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            self._lingering = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return BoundedH11Protocol


# ------------------------------------------------------------------------------------------
# Command line.


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket: bound before the model loads, so a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_serve(args) -> int:
    """`tpmax serve`: bind, load the model, serve until SIGTERM / Ctrl-C (requests in flight
    finish first, for up to DRAIN_TIMEOUT_S). `args` as `tpmax.cli` parses them."""
    from ..checkpoint.loader import load

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 0 or args.cache_tokens < 1:
        raise ValueError("--max-batch and --cache-tokens must be >= 1, --max-queue >= 0")
    sock = listen(args.host, args.port) if getattr(args, "leader", True) else None
    try:
        model = load(args.model, devices=args.devices, dtype=args.dtype, progress=not args.quiet,
                     threads=args.threads)
        if not model.executor.leads:  # mpirun forwards SIGUSR1 to every rank: rank 0 drains, this one follows
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        # Under MPI rank 0 serves; the other ranks run each of its steps and return 0.
        return model.executor.call(lambda: serve(
            model, sock, max_batch=args.max_batch, max_queue=args.max_queue, cache_tokens=args.cache_tokens,
            served_name=args.served_model_name, quiet=args.quiet, max_body_bytes=args.max_body_bytes),
            receive=lambda *_: 0)
    finally:
        if sock is not None:
            sock.close()


def server(app, *, quiet: bool = False, max_connections: int = MAX_CONNECTIONS, stall_timeout: float = STALL_TIMEOUT_S,
           drain_timeout: float = DRAIN_TIMEOUT_S):
    """The uvicorn server for `app`, every connection bounded (see `bounded_protocol`); on
    SIGTERM it stops accepting and finishes the requests in flight (cut after `drain_timeout` s)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(
        app, http=bounded_protocol(max_connections=max_connections, stall_timeout=stall_timeout),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=5,
        log_level="warning" if quiet else "info", access_log=not quiet, lifespan="on",
        timeout_graceful_shutdown=drain_timeout))


def serve(model: Model, sock: socket.socket, *, quiet: bool = False, **app_options) -> int:
    """Serve `model` on the listening socket `sock` (see `listen`) until SIGTERM / Ctrl-C,
    which drain (see `server`), then return 0. `app_options` go to `create_app`."""
    app = create_app(model, **app_options)
    host, port = sock.getsockname()[:2]
    if not quiet:
        print(f"tpmax: serving {model.path} as {app_options.get('served_name') or model_id(model)!r} on "
              f"http://{host}:{port}/v1", file=sys.stderr)
    srv = server(app, quiet=quiet)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # uvicorn drains on SIGTERM / SIGINT, then re-raises it: exit 0 then rather than die by
        # the signal. SIGUSR1 drains too: under mpirun, SIGTERM ends every rank within 0.3 s
        # (SIGTERM, then SIGKILL), while SIGUSR1 is only forwarded.
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGUSR1, lambda *_: srv.handle_exit(signal.SIGTERM, None))
    try:
        srv.run(sockets=[sock])
    finally:
        if main_thread:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0
