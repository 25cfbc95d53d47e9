"""`tpmax serve` through the real `openai` client: a server subprocess on a free loopback
port serving the tiny fixture (with a byte-level tokenizer and a 16k context, so long
requests take seconds)."""
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package ships with
import openai
import pytest

import tpmax
from tpmax.api import encode_chat
from tpmax.sampling import SamplingParams
from conftest import make_chat_model_dir

CONTEXT = 16384
CACHE = 8192
LONG = 8000  # max_tokens of a request that runs for seconds unless cancelled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tpmax.cli", "serve", "--model", str(model_dir), "--port",
                                      str(self.port), "--quiet", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.communicate()[1]}")
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
    """One sequence at a time and one waiting: the third concurrent request is refused."""
    s = Server(model_dir, "--max-batch", "1", "--max-queue", "1", "--cache-tokens", str(CACHE))
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
    default = server.client.completions.create(model="tinychat", prompt="x", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_streaming_chat_and_completions(server, model):
    parts, finish, usage = [], None, None
    for ch in chat(server, "Stream me", max_tokens=25, seed=9, stream=True, stream_options={"include_usage": True}):
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
    assert chat(s, "now there is room", max_tokens=3).usage.completion_tokens == 3


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
    assert chat(server, "still alive?", max_tokens=2).usage.completion_tokens == 2


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
