"""The engine thread of `tpmax serve`: one thread owns the `Engine` and steps it; HTTP
handlers hand it `Job`s through a thread-safe queue and receive tokens through per-request
asyncio queues (`loop.call_soon_threadsafe`), so neither side blocks the other. And the
server's Prometheus metrics."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

from ..generation.engine import Completion, Engine
from ..generation.sampling import SamplingParams

log = logging.getLogger("tpmax.serve")

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
