"""`tpmax serve` through the real `openai` client: a server subprocess on a free loopback
port serving the tiny fixture (with a byte-level tokenizer and a 16k context, so long
requests take seconds)."""
import concurrent.futures
import importlib.util
import os
import select
import shutil
import contextlib
import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package ships with
import openai
import pytest

import tpmax
from tpmax.serving import app as serve
from tpmax.generation.api import encode_chat
from tpmax.generation.sampling import SamplingParams
from tpmax.text.tokenizer import GenerationDefaults
from conftest import make_chat_model_dir

CONTEXT = 16384
CACHE = 8192
LONG = 8000  # max_tokens of a request that runs for seconds unless cancelled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """What the tests do with a running server at `self.url`."""

    def wait_up(self, alive=lambda: True):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            alive()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            self.close()
            raise RuntimeError("server did not come up in 60 s")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def wait_metric(self, name: str, value: float, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric(name) == value:
                return True
            time.sleep(0.05)
        return False


class Server(Client):
    """`tpmax serve` in a subprocess."""

    def __init__(self, model_dir: Path, *args: str, launcher=(), env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*launcher, sys.executable, "-m", "tpmax.cli", "serve", "--model", str(model_dir),
                                      "--port", str(self.port), "--quiet", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)

        def alive():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.communicate()[1]}")

        self.wait_up(alive)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


class InProcess(Client):
    """The server on a thread of this process, for a wrapped model or small bounds:
    `server_options` go to `tpmax.serving.app.server`, the rest to `create_app`."""

    def __init__(self, model, server_options=None, **app_options):
        sock = serve.listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = serve.create_app(model, **app_options)
        self.server = serve.server(self.app, quiet=True, **(server_options or {}))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.wait_up()

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model_dir(tmp_path_factory.mktemp("serve") / "tinychat", context=CONTEXT)


@pytest.fixture(scope="module")
def model(model_dir):
    return tpmax.load(model_dir, progress=False)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-batch", "8", "--max-queue", "32", "--cache-tokens", str(CACHE))
    yield s
    s.close()


@pytest.fixture(scope="module")
def small_server(model_dir):
    """One sequence at a time and one waiting: the third concurrent request is refused; bodies
    up to 100 kB."""
    s = Server(model_dir, "--max-batch", "1", "--max-queue", "1", "--cache-tokens", str(CACHE), "--max-body-bytes",
               "100000")
    yield s
    s.close()


def chat(server, prompt, **kw):
    return server.client.chat.completions.create(model="tinychat", messages=[{"role": "user", "content": prompt}],
                                                 **kw)


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["tinychat"]
    assert httpx.get(server.url + "/health", timeout=5).json() == {"status": "ok"}


def test_chat_seeded_equals_generate(server, model):
    for seed, temperature in ((0, 0.0), (5, 0.8), (2**64 - 1, 1.3)):
        r = chat(server, "Hello there", max_tokens=20, seed=seed, temperature=temperature)
        (ref,) = tpmax.generate(model, ["Hello there"], SamplingParams(max_new_tokens=20, seed=seed,
                                                                       temperature=temperature))
        assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == ref.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, len(ref.tokens))
        assert r.usage.total_tokens == ref.prompt_tokens + len(ref.tokens)


def test_completions_seeded_equals_generate(server, model):
    r = server.client.completions.create(model="tinychat", prompt="Once upon", max_tokens=15, seed=3, temperature=1.0)
    (ref,) = tpmax.generate(model, ["Once upon"], SamplingParams(max_new_tokens=15, seed=3, temperature=1.0),
                            chat=False)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(model.tokenizer.encode("Once upon")) and r.usage.completion_tokens == 15
    default = server.client.completions.create(model="tinychat", prompt="x", temperature=0,
                                               extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_streaming_chat_and_completions(server, model):
    parts, finish, usage = [], None, None
    for ch in chat(server, "Stream me", max_tokens=25, seed=9, temperature=1.0, stream=True,
                   stream_options={"include_usage": True}):
        assert ch.object == "chat.completion.chunk"
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    (ref,) = tpmax.generate(model, ["Stream me"], SamplingParams(max_new_tokens=25, seed=9, temperature=1.0))
    assert "".join(parts) == ref.text and finish == "length" and usage.completion_tokens == 25
    texts = [c.choices[0].text for c in server.client.completions.create(
        model="tinychat", prompt="abc", max_tokens=10, temperature=0, stream=True)]
    (ref,) = tpmax.generate(model, ["abc"], SamplingParams(max_new_tokens=10), chat=False)
    assert "".join(texts) == ref.text
    raw = httpx.post(server.url + "/v1/completions", json={"model": "tinychat", "prompt": "abc", "max_tokens": 3,
                                                           "stream": True}, timeout=30).text
    assert raw.rstrip().endswith("data: [DONE]") and '"object": "text_completion"' in raw


def test_stop_strings(server, model):
    full = chat(server, "stop here", max_tokens=30, temperature=0).choices[0].message.content
    stop = full[6:8]
    for s in (stop, [stop, "\x00never"]):
        r = chat(server, "stop here", max_tokens=30, temperature=0, stop=s)
        assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, "stop here", max_tokens=30,
                                                                       temperature=0, stop=stop, stream=True)
                       if c.choices)
    assert streamed == full[:full.index(stop)]


def test_sixteen_simultaneous_streams(server, model):
    prompts = [(f"client {i} " + "x" * (i % 5), i, 0.0 if i % 4 == 0 else 1.0, 10 + 3 * i) for i in range(16)]

    def one(p):
        text, seed, temp, n = p
        out = []
        for ch in chat(server, text, max_tokens=n, seed=seed, temperature=temp, stream=True):
            out.extend(c.delta.content or "" for c in ch.choices)
        return "".join(out)

    steps_before = server.metric("tpmax_batch_size_count")
    single_before = server.metric('tpmax_batch_size_bucket{le="1.0"}')
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts, timeout=120))
    steps = server.metric("tpmax_batch_size_count") - steps_before
    assert server.metric('tpmax_batch_size_bucket{le="1.0"}') - single_before < steps / 2  # mostly batched steps
    assert steps < sum(p[3] for p in prompts) / 2
    for (text, seed, temp, n), g in zip(prompts, got):
        engine = tpmax.Engine(model, max_batch=1, cache_tokens=512)
        engine.submit(encode_chat(model, [{"role": "user", "content": text}]),
                      SamplingParams(max_new_tokens=n, seed=seed, temperature=temp))
        (ref,) = engine.run()
        assert g == ref.text
    assert server.metric("tpmax_kv_pages_in_use") == 0


def read_chunks(lines, n):
    """The next n SSE data lines from a streaming response's `iter_lines()` (keep that
    iterator alive: dropping it closes the connection)."""
    got = []
    while len(got) < n:
        line = next(lines)
        if line.startswith("data: "):
            got.append(json.loads(line[6:]))
    return got


def long_stream(client, url, **kw):
    body = {"model": "tinychat", "messages": [{"role": "user", "content": "go on"}], "max_tokens": LONG,
            "stream": True, "ignore_eos": True, **kw}
    return client.stream("POST", url + "/v1/chat/completions", json=body, timeout=30)


def test_disconnect_mid_stream_cancels_and_frees_pages(server):
    before = server.metric('tpmax_requests_total{endpoint="chat",outcome="cancelled"}')
    with httpx.Client() as client, long_stream(client, server.url) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        read_chunks(lines, 5)
        time.sleep(0.3)
        assert server.metric("tpmax_kv_pages_in_use") > 0 and server.metric("tpmax_running_requests") == 1
    # The client hung up after a few of its 8000 tokens (seconds of work left).
    assert server.wait_metric("tpmax_kv_pages_in_use", 0, timeout=5)
    assert server.metric('tpmax_requests_total{endpoint="chat",outcome="cancelled"}') == before + 1


def test_disconnect_while_waiting_for_a_whole_answer_cancels_too(server):
    before = server.metric('tpmax_requests_total{endpoint="completions",outcome="cancelled"}')
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: its connection closes
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(5, read=0.5),
                   json={"model": "tinychat", "prompt": "long", "max_tokens": LONG, "ignore_eos": True})
    assert server.wait_metric('tpmax_requests_total{endpoint="completions",outcome="cancelled"}', before + 1)
    assert server.wait_metric("tpmax_kv_pages_in_use", 0)


def test_full_queue_answers_429_at_once(small_server):
    s = small_server
    with httpx.Client() as c1, httpx.Client() as c2, long_stream(c1, s.url) as running, \
            long_stream(c2, s.url) as waiting:
        lines = running.iter_lines(), waiting.iter_lines()
        read_chunks(lines[0], 3)
        read_chunks(lines[1], 1)  # accepted (the role chunk), waiting for the running one
        assert s.metric("tpmax_queue_depth") == 1
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            chat(s, "one more", max_tokens=5)
        assert time.monotonic() - t0 < 5 and e.value.status_code == 429
        assert e.value.body["code"] == "queue_full" and "busy" in e.value.body["message"]
    assert s.wait_metric("tpmax_kv_pages_in_use", 0) and s.wait_metric("tpmax_queue_depth", 0)
    assert chat(s, "now there is room", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}).usage.completion_tokens == 3


BAD = [
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("chat", {"model": "tinychat", "messages": "hi"}, 400, "messages"),
    ("chat", {"model": "tinychat", "messages": []}, 400, "messages"),
    ("chat", {"model": "tinychat", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400,
     "max_tokens"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}, 400,
     "max_tokens"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400,
     "temperature"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400,
     "stream"),
    ("completions", {"model": "tinychat", "prompt": "x" * (CONTEXT + 10)}, 400, "prompt"),
    ("completions", {"model": "tinychat", "prompt": "hi", "max_tokens": CACHE + 10}, 400, "prompt"),
    ("completions", {"model": "tinychat", "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": "tinychat", "prompt": [10**9]}, 400, "prompt"),
    ("completions", {"model": "tinychat", "prompt": 3}, 400, "prompt"),
    # Each of these answered 500 (or took seconds on the engine thread) before.
    ("completions", b"[" * 100_000 + b"]" * 100_000, 400, None),  # RecursionError in json.loads
    ("completions", b'{"model": "tinychat", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e-310}, 400,
     "temperature"),  # NaN probabilities
    ("completions", b'{"model": "tinychat", "prompt": "a\\ud800b"}', 400, None),  # a lone surrogate
    ("chat", b'{"model": "tinychat", "messages": [{"role": "user", "content": "\\udc80"}]}', 400, None),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "stop": "ab" * 150_000}, 400,
     "stop"),  # quadratic on the engine thread
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "stop": ["s"] * 17}, 400,
     "stop"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "top_k": -2}, 400, "top_k"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400,
     "frequency_penalty"),  # was ignored silently
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 100}}, 400,
     "logit_bias"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "temperature": True}, 400,
     "temperature"),
    ("chat", {"model": "tinychat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
]


@pytest.mark.parametrize("endpoint, body, status, param", BAD)
def test_bad_input_is_an_openai_error_and_the_server_goes_on(server, endpoint, body, status, param):
    raw = isinstance(body, bytes)
    kw = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
    path = "chat/completions" if endpoint == "chat" else "completions"
    r = httpx.post(f"{server.url}/v1/{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert "Traceback" not in r.text
    assert chat(server, "still alive?", max_tokens=2, temperature=0,
                extra_body={"ignore_eos": True}).usage.completion_tokens == 2


def test_bad_input_through_the_client(server):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(server, "hi", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.completions.create(model="tinychat", prompt="y" * (CONTEXT + 1))


def test_sigterm_drains_in_flight_requests_then_exits(model_dir):
    s = Server(model_dir, "--cache-tokens", "4096")
    try:
        n = 1500
        with httpx.Client() as client, client.stream(
                "POST", s.url + "/v1/completions", timeout=60,
                json={"model": "tinychat", "prompt": "drain", "max_tokens": n, "ignore_eos": True, "stream": True,
                      "stream_options": {"include_usage": True}}) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == n
        assert json.loads(rest[-3][6:])["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.close()


# ------------------------------------------------------------------------------------------
# Bounds: body size and time, headers, connections.


def raw_http(port: int, data: bytes, *, timeout: float = 20) -> bytes:
    """Send `data` on a new connection; return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


POST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_an_oversized_body_is_refused_early_and_health_goes_on(small_server):
    """413 from Content-Length alone (the body never sent), and from the bytes counted in a
    chunked body (no length given), while /health answers. Before: the server read 16 MB,
    held it and tokenized it (64 s, /health blocked)."""
    status, err = status_and_error(raw_http(small_server.port, POST + b"Content-Length: 60000000\r\n\r\n"))
    assert status == 413 and err["code"] == "request_too_large" and "100000 bytes" in err["message"]
    with socket.create_connection(("127.0.0.1", small_server.port), timeout=20) as s:
        s.sendall(POST + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"prompt": "' + b"x" * 16_000
        for _ in range(8):  # 8 x 16 KB: past the 100 KB limit
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            assert httpx.get(small_server.url + "/health", timeout=5).json() == {"status": "ok"}
            chunk = b"x" * 16_000
            if select.select([s], [], [], 0)[0]:
                break  # answered
        status, err = status_and_error(read_all(s))
    assert status == 413 and err["code"] == "request_too_large"
    assert chat(small_server, "after", max_tokens=2, temperature=0, extra_body={"ignore_eos": True}
                ).usage.completion_tokens == 2


def test_a_200_kb_header_is_answered_not_reset(server):
    status, err = status_and_error(raw_http(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " +
                                            b"y" * 200_000 + b"\r\n\r\n"))
    assert status == 400 and "headers over" in err["message"]


@pytest.fixture
def bounded(model):
    """A server whose bounds tests can reach in a second."""
    s = InProcess(model, {"stall_timeout": 0.3}, body_timeout=1.0, cache_tokens=512)
    yield s
    s.close()


def test_stalled_connections_are_closed(bounded):
    """A connection that sends nothing, or half its headers, or half its body, is closed
    (the body with 408); before, each stayed open forever."""
    socks = [socket.create_connection(("127.0.0.1", bounded.port), timeout=20) for _ in range(3)]
    try:
        socks[1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        socks[2].sendall(POST + b"Content-Length: 100\r\n\r\n{\"prompt\"")
        assert read_all(socks[0]) == b"" and read_all(socks[1]) == b""
        status, err = status_and_error(read_all(socks[2]))
        assert status == 408 and err["code"] == "request_timeout"
    finally:
        for s in socks:
            s.close()


def test_connections_past_the_limit_are_answered_503(model):
    s = InProcess(model, {"max_connections": 6}, cache_tokens=512)
    socks = [socket.create_connection(("127.0.0.1", s.port), timeout=20) for _ in range(7)]
    try:
        status, err = status_and_error(read_all(socks[-1]))  # the 7th of at most 6
        assert status == 503 and err["code"] == "service_unavailable"
        socks[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # the 6 are served
        assert read_all(socks[0]).startswith(b"HTTP/1.1 200")
        for sock in socks:
            sock.close()
        assert s.client.models.list().data  # the held ones closed: room again
    finally:
        for sock in socks:
            sock.close()
        s.close()


# ------------------------------------------------------------------------------------------
# The model's own defaults, failures, load, start and stop.


class Wrapped:
    """The model's tokenizer with some attributes replaced."""

    def __init__(self, tok, **attrs):
        self._tok = tok
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_unset_sampling_options_take_the_models_defaults(model):
    """A request without temperature / top_k samples as the model's generation defaults say
    (here: greedy); one that sets them is obeyed. Before, the server sampled at 1."""
    for defaults in (GenerationDefaults(temperature=0.0), GenerationDefaults(temperature=1.0, top_k=1)):
        s = InProcess(dataclasses.replace(model, tokenizer=Wrapped(model.tokenizer, generation_defaults=defaults)),
                      cache_tokens=512)
        try:
            (greedy,) = tpmax.generate(model, ["defaults"], SamplingParams(max_new_tokens=20, stop_token_ids=()))
            (hot,) = tpmax.generate(model, ["defaults"], SamplingParams(max_new_tokens=20, seed=1, temperature=1.0,
                                                                        stop_token_ids=()))
            assert greedy.text != hot.text
            kw = {"max_tokens": 20, "seed": 1, "extra_body": {"ignore_eos": True}}
            assert chat(s, "defaults", **kw).choices[0].message.content == greedy.text
            assert chat(s, "defaults", temperature=1.0, **{**kw, "extra_body": {"ignore_eos": True, "top_k": 0}}
                        ).choices[0].message.content == hot.text
        finally:
            s.close()


def test_served_model_name_and_the_defaults_of_a_model_without_any(model):
    """--served-model-name is the id clients send; a model whose files name no sampling
    defaults samples at temperature 1, and a chat without max_tokens runs to the end of the
    room the cache leaves (here less than the context)."""
    none = GenerationDefaults()
    s = InProcess(dataclasses.replace(model, tokenizer=Wrapped(model.tokenizer, generation_defaults=none)),
                  cache_tokens=256, served_name="my-model")
    try:
        assert [m.id for m in s.client.models.list().data] == ["my-model"]
        with pytest.raises(openai.NotFoundError):
            s.client.chat.completions.create(model="tinychat", messages=[{"role": "user", "content": "hi"}])
        r = s.client.chat.completions.create(model="my-model", messages=[{"role": "user", "content": "room"}],
                                             seed=3, extra_body={"ignore_eos": True})
        prompt = encode_chat(model, [{"role": "user", "content": "room"}])
        room = 256 - len(prompt) + 1  # the cache's tokens after the prompt (the last token is never fed back)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == room
        (want,) = tpmax.generate(model, [prompt], SamplingParams(max_new_tokens=room, temperature=1.0, seed=3,
                                                                 stop_token_ids=()))
        assert r.choices[0].message.content == want.text
    finally:
        s.close()


class FailingStream:
    """A detokenizer that fails at its third token."""

    def __init__(self, stream):
        self.stream, self.n = stream, 0

    def push(self, token):
        self.n += 1
        if self.n == 3:
            raise RuntimeError("injected detokenizer failure")
        return self.stream.push(token)

    def flush(self):
        return self.stream.flush()


def test_a_failed_generation_answers_500_and_the_others_go_on(model):
    armed = threading.Event()

    def stream(**kw):
        s = model.tokenizer.stream(**kw)
        if armed.is_set():
            armed.clear()
            return FailingStream(s)
        return s

    def refusing(encode):
        def refuse(x, **kw):
            if "\x01" in (x if isinstance(x, str) else "".join(m["content"] for m in x)):
                raise ValueError("the tokenizer refuses this text")
            return encode(x, **kw)
        return refuse

    tok = Wrapped(model.tokenizer, stream=stream, encode=refusing(model.tokenizer.encode),
                  encode_chat=refusing(model.tokenizer.encode_chat))
    s = InProcess(dataclasses.replace(model, tokenizer=tok), cache_tokens=1024)
    prompts = [f"busy {i}" for i in range(3)]
    try:
        with httpx.Client() as client, contextlib.ExitStack() as stack:
            streams = []
            for p in prompts:
                resp = stack.enter_context(client.stream("POST", s.url + "/v1/chat/completions", timeout=60, json={
                    "messages": [{"role": "user", "content": p}], "max_tokens": 60, "temperature": 0,
                    "ignore_eos": True, "stream": True}))
                lines = resp.iter_lines()
                read_chunks(lines, 1)  # accepted: its detokenizer is made
                streams.append(lines)
            armed.set()
            with pytest.raises(openai.InternalServerError) as e:
                chat(s, "fail", max_tokens=30, temperature=0)
            assert e.value.body["code"] == "generation_error" and "injected" in e.value.body["message"]
            with pytest.raises(openai.BadRequestError, match="refuses"):  # a ValueError from encoding: 400
                s.client.completions.create(model=serve.model_id(model), prompt="a\x01b")
            with pytest.raises(openai.BadRequestError, match="refuses"):
                chat(s, "a\x01b")
            texts = ["".join(c["choices"][0]["delta"].get("content", "") for c in
                             (json.loads(line[6:]) for line in lines if line.startswith("data: {")))
                     for lines in streams]
        refs = tpmax.generate(model, prompts, SamplingParams(max_new_tokens=60, stop_token_ids=()))
        assert texts == [r.text for r in refs]
        assert s.wait_metric("tpmax_kv_pages_in_use", 0)
        assert s.metric('tpmax_requests_total{endpoint="chat",outcome="error"}') == 1
    finally:
        s.close()


def test_nothing_is_lost_under_load_with_preemption(model_dir, model):
    """12 concurrent requests through a KV cache of 128 tokens (one or two requests' worth):
    sequences are preempted and recomputed, and every text equals the request served alone."""
    s = Server(model_dir, "--max-batch", "8", "--cache-tokens", "128")
    jobs = [(f"load {i}", 40 + 2 * i, None if i % 2 else i) for i in range(12)]

    def one(job):
        text, n, seed = job
        r = chat(s, text, max_tokens=n, seed=seed, temperature=0.0 if seed is None else 1.0,
                 extra_body={"ignore_eos": True})
        return r.choices[0].message.content, r.usage.completion_tokens

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            got = list(pool.map(one, jobs, timeout=300))
        assert s.metric("tpmax_preemptions") > 0
        assert s.wait_metric("tpmax_kv_pages_in_use", 0)
    finally:
        s.close()
    for (text, n, seed), g in zip(jobs, got):
        (ref,) = tpmax.generate(model, [text], SamplingParams(max_new_tokens=n, seed=seed, stop_token_ids=(),
                                                              temperature=0.0 if seed is None else 1.0))
        assert g == (ref.text, n)


def test_a_port_in_use_fails_at_once_before_loading(tmp_path):
    """Exit 2 with one line, before the model is read (it does not exist here)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tpmax.cli", "serve", "--model", str(tmp_path / "absent"),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"tpmax: error: cannot serve on 127.0.0.1:{port}: Address already in use"]


def test_sigterm_drains_twenty_whole_answers(model_dir):
    """SIGTERM with 20 non-streaming requests taken (16 decoding, 4 queued): each gets its
    whole answer, then the server exits 0. A connection whose request was not yet read is
    answered 503 (it got an empty reply before: how 4 of 20 requests once got none)."""
    s = Server(model_dir, "--cache-tokens", "8192")
    n = 300

    def one(i):
        r = httpx.post(s.url + "/v1/completions", timeout=120, json={
            "prompt": f"drain {i}", "max_tokens": n, "temperature": 0, "ignore_eos": True})
        return r.status_code, r.json()["usage"]["completion_tokens"]

    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(one, i) for i in range(20)]
            deadline = time.monotonic() + 60
            while s.metric("tpmax_running_requests") + s.metric("tpmax_queue_depth") < 20:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            half = [socket.create_connection(("127.0.0.1", s.port), timeout=30) for _ in range(3)]
            for h in half:
                h.sendall(POST)  # headers not finished
            assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # the 3 are accepted by now
            s.proc.send_signal(signal.SIGTERM)
            for h in half:
                with h:
                    status, err = status_and_error(read_all(h))
                assert status == 503 and err["code"] == "shutting_down"
            assert [f.result(timeout=120) for f in futures] == [(200, n)] * 20
        assert s.proc.wait(60) == 0
    finally:
        s.close()


def test_the_drain_is_bounded(model):
    """Requests still running when the drain time is over, streamed or whole, are cut (no
    [DONE], no answer) and cancelled in the engine, and the server and its engine thread end."""
    s = InProcess(model, {"drain_timeout": 1.0}, cache_tokens=2 * LONG + 64)
    rest = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool, httpx.Client() as client, \
            long_stream(client, s.url) as resp:
        whole = pool.submit(httpx.post, s.url + "/v1/completions", timeout=120, json={
            "prompt": "long", "max_tokens": LONG, "ignore_eos": True})
        lines = resp.iter_lines()
        read_chunks(lines, 2)
        assert s.wait_metric("tpmax_running_requests", 2)
        s.server.should_exit = True
        with pytest.raises(httpx.RemoteProtocolError):  # the stream ends mid-answer
            rest.extend(lines)
        assert whole.result(timeout=120).status_code == 500  # uvicorn's own, for a request it cut
    assert "data: [DONE]" not in rest
    s.thread.join(60)
    assert not s.thread.is_alive() and not s.app.state.engine_loop.alive
    registry = s.app.state.metrics.registry
    for endpoint in ("chat", "completions"):
        assert registry.get_sample_value("tpmax_requests_total", {"endpoint": endpoint, "outcome": "cancelled"}) == 1


MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent))


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None or importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py and mpirun")
def test_sigusr1_drains_under_mpirun(model_dir):
    """mpirun answers SIGTERM with SIGTERM then SIGKILL to every rank 0.3 s later (no drain
    can finish), and forwards SIGUSR1: rank 0 drains on it while rank 1 keeps following."""
    from tpmax.parallel.mpi import LAUNCHER_ENV

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OPENBLAS_NUM_THREADS="1")
    s = Server(model_dir, "--devices", "cpu:0,1", "--cache-tokens", "1024", env=env,
               launcher=(MPIRUN, "-n", "2", "--oversubscribe", "--bind-to", "none"))
    try:
        n = 100
        with httpx.Client() as client, client.stream("POST", s.url + "/v1/completions", timeout=120, json={
                "prompt": "drain", "max_tokens": n, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            s.proc.send_signal(signal.SIGUSR1)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["usage"]["completion_tokens"] == n
        assert s.proc.wait(60) == 0
    finally:
        s.close()
