"""`loadsvc engine`: a toy inference engine (not a model) that serves real traffic and publishes its real load.

    HTTP (FastAPI, SGLang-like)                   gRPC (grpc.aio, --grpc-port)
    /generate /v1/completions /v1/chat/...        loadsvc.v1.LoadService, SGLang GetLoads,
       |  rank: body's data_parallel_rank,        ORCA, health, reflection (loadsvc.embed)
       |  else the shortest queue                      ^
       v                                               |
    Rank 0..N-1:  waiting (FIFO) --admit--> running batch           GET /v1/loads (loadsvc.embed)
       admit while running < max_running_requests    ^                 ^
       and reserved + prompt + max_new <= max_total_tokens            |
       |                                                             LoadStore
       v                                                              ^
    publisher task, --publish-rate Hz per rank --ShmPublisher--> region (one per engine port)

Timing model. A running request advances one decode step every
``step_ms * (1 + batch / batch_knee) / speed`` milliseconds, where ``batch`` is
its rank's running requests: a bigger batch makes every step slower, as on a
GPU, and a rank with speed 0.5 takes twice as long. A request needs
``ceil(uncached_prompt_tokens / prefill_tokens_per_step) + max_new_tokens``
steps, so its time grows with its tokens. Nothing spins: each rank sleeps until
its next completion or the next arrival and then moves every running request
forward by the elapsed time (batch size is constant between those events), so
an idle engine costs no CPU and a busy one a few wakeups per request.

Tokens. A prompt of text counts ``ceil(len(text) / 4)`` tokens (``input_ids``
count one each); every request generates exactly ``max_new_tokens`` /
``max_tokens`` tokens (default 16). A rank remembers its last 1024 prompts: a
repeated prompt is a prefix-cache hit for all but its last token, which skips
their prefill and counts in ``cache_hit_rate``.

KV budget. Admission reserves ``prompt + max_new`` tokens of the rank's
``max_total_tokens``; requests that do not fit (or find the batch full) wait in
FIFO order. ``num_used_tokens`` is the tokens the running requests actually hold
(prompt plus generated so far); ``num_total_tokens`` adds the waiting prompts.
A request that could never fit is refused with 400.

Rank selection, as SGLang's data-parallel controller: ``data_parallel_rank`` in
the request body (every endpoint) sends it to that rank; otherwise the rank
with the fewest running + waiting requests takes it (SGLang's
``--load-balance-method shortest_queue``), ties going round robin.

Published per rank (>= 20 Hz, default 50): running, waiting, total, used and
total tokens, token_usage (used / max_total_tokens), gen_throughput (tokens per
second over the last second), cache_hit_rate (cached / prompt tokens admitted
over the last second), utilization (running / max_running_requests),
num_waiting_uncached_tokens, and the ``memory`` and ``queues`` sections.

``GET /metrics`` carries SGLang's scheduler gauges under SGLang's names and labels
(``sglang:num_running_reqs{dp_rank="0",...}``, SGLANG_GAUGES), so a scraper that
reads SGLang reads this engine too.

Stopping the publisher alone (routers then see the ranks go stale while the
engine keeps serving): ``kill -USR1 <pid>`` or ``POST /loadsvc/publisher``
with ``{"enabled": false}`` (from loopback only: 403 otherwise); ``kill -USR2``
or ``{"enabled": true}`` resumes.
SIGTERM/SIGINT stop everything; the default region file is removed at exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loadsvc._exceptions import LoadsvcError
from loadsvc._hosting import bind_tcp, is_loopback, run, serve_until_signal
from loadsvc._version import __version__
from loadsvc.core.region import RegionError, ShmPublisher, default_path
from loadsvc.core.schema import LoadSnapshot, MemoryMetrics, QueueMetrics
from loadsvc.embed import add_to_grpc_server, loads_router, open_store
from loadsvc.settings import EngineSettings, GrpcLimits
from loadsvc.surfaces.limits import grpc_options

__all__ = ["Engine", "EngineError", "run_engine", "prompt_tokens", "region_path"]

log = logging.getLogger("loadsvc.tools.engine")

DEFAULT_MAX_NEW_TOKENS = 16
MAX_NEW_TOKENS_LIMIT = 1 << 20
PREFIX_CACHE_ENTRIES = 1024
WINDOW_S = 1.0  # gen_throughput and cache_hit_rate are measured over this window
STREAM_INTERVAL_S = 0.05  # how often a streaming response sends the tokens made so far
KV_BYTES_PER_TOKEN = 128 * 1024  # what `memory.kv_cache_gb` pretends one token of KV costs
WEIGHT_GB = 1.0  # what `memory.weight_gb` reports
STORE_POLL_S = 0.05  # the store's own poll (status changes); publishes refresh it at once
FINISH_SLACK_S = 0.0005  # a request this close to its last step counts as finished


class EngineError(LoadsvcError, ValueError):
    """A request the engine cannot serve (HTTP 400); the message says which field and why."""


class EngineStopping(LoadsvcError, RuntimeError):
    """The engine stopped while the request was in flight (HTTP 503)."""


def prompt_tokens(text: str) -> int:
    """The toy tokenizer: about four characters per token, at least one."""
    return max(1, (len(text) + 3) // 4)


def region_path(settings: EngineSettings) -> Path:
    """The region this engine publishes into: --shm, else one per HTTP port beside default_path()."""
    if settings.shm is not None:
        return Path(settings.shm)
    return default_path(f"engine-{settings.http_port}")


class _Request:
    __slots__ = ("key", "prompt", "cached", "max_new", "prefill_steps", "steps", "done_steps",
                 "future", "arrival", "started", "finished", "rank")

    def __init__(self, key: int, prompt: int, max_new: int, rank: int, arrival: float) -> None:
        self.key = key  # hash of the prompt: the prefix cache's key
        self.prompt = prompt
        self.cached = 0
        self.max_new = max_new
        self.prefill_steps = 0
        self.steps = 0.0  # steps needed in all, set at admission (the cache decides prefill)
        self.done_steps = 0.0
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.arrival = arrival
        self.started = 0.0
        self.finished = 0.0
        self.rank = rank

    @property
    def reserve(self) -> int:
        return self.prompt + self.max_new

    @property
    def generated(self) -> int:
        """Output tokens made so far."""
        return min(self.max_new, max(0, int(self.done_steps - self.prefill_steps + 1e-9)))


class _Rank:
    """One data-parallel rank: a FIFO waiting queue, a running batch, a KV budget."""

    def __init__(self, index: int, speed: float, settings: EngineSettings) -> None:
        self.index = index
        self.speed = speed
        self.max_running = settings.max_running_requests
        self.max_tokens = settings.max_total_tokens
        self.step_s = settings.step_ms / 1000.0
        self.knee = settings.batch_knee
        self.prefill_per_step = settings.prefill_tokens_per_step
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: list[_Request] = []
        self.reserved = 0  # KV tokens reserved by running requests
        self.waiting_prompt = 0  # prompt tokens of waiting requests
        self.waiting_uncached = 0  # waiting prompt tokens the prefix cache does not hold
        self._prefix: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._last = time.monotonic()
        self._wake = asyncio.Event()
        # counters
        self.received = 0
        self.completed = 0
        self.generated_done = 0  # output tokens of finished requests
        self._window: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self._prompt_admitted = 0
        self._cached_admitted = 0

    # -- timing ----------------------------------------------------------------

    def step_time(self) -> float:
        return self.step_s * (1.0 + len(self.running) / self.knee) / self.speed

    def advance(self, now: float) -> None:
        """Move every running request forward by the time since the last call."""
        dt = now - self._last
        self._last = now
        if dt > 0 and self.running:
            steps = dt / self.step_time()
            for r in self.running:
                r.done_steps += steps

    # -- queueing --------------------------------------------------------------

    def enqueue(self, req: _Request) -> None:
        self.received += 1
        self.waiting.append(req)
        self.waiting_prompt += req.prompt
        req.cached = self._cache_hit(req, record=False)  # an estimate until admission
        self.waiting_uncached += req.prompt - req.cached
        self._wake.set()

    def _admit(self, now: float) -> None:
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            if self.reserved + req.reserve > self.max_tokens:
                break  # head of line waits for KV, as a FIFO scheduler does
            self.waiting.popleft()
            self.waiting_prompt -= req.prompt
            self.waiting_uncached -= req.prompt - req.cached
            if req.future.done():  # cancelled while waiting (client gone, shutdown)
                continue
            req.cached = self._cache_hit(req, record=True)
            req.prefill_steps = math.ceil((req.prompt - req.cached) / self.prefill_per_step)
            req.steps = req.prefill_steps + req.max_new
            req.started = now
            self.reserved += req.reserve
            self.running.append(req)
            self._prompt_admitted += req.prompt
            self._cached_admitted += req.cached

    def _cache_hit(self, req: _Request, *, record: bool) -> int:
        """Prompt tokens of req the prefix cache holds: all but the last of a repeated prompt.

        record: the request is admitted, so its prompt enters the cache (LRU).
        """
        if not record:
            hit = self._prefix.get(req.key)
        else:
            hit = self._prefix.pop(req.key, None)
            self._prefix[req.key] = req.prompt
            if len(self._prefix) > PREFIX_CACHE_ENTRIES:
                self._prefix.popitem(last=False)
        return max(0, min(hit, req.prompt) - 1) if hit is not None else 0

    def _finish(self, now: float) -> None:
        keep = []
        slack = FINISH_SLACK_S / self.step_time()  # timers may fire a little early
        for r in self.running:
            if r.done_steps + slack >= r.steps or r.future.done():
                self.reserved -= r.reserve
                if not r.future.done():
                    r.finished = now
                    self.completed += 1
                    self.generated_done += r.max_new
                    r.future.set_result(None)
            else:
                keep.append(r)
        self.running = keep

    async def run(self) -> None:
        """The scheduler loop: sleep until the next completion or arrival, then move on."""
        while True:
            now = time.monotonic()
            self.advance(now)
            self._finish(now)
            self._admit(now)
            timeout = None
            if self.running:
                step = self.step_time()
                timeout = max(0.0, min(r.steps - r.done_steps for r in self.running) * step)
            self._wake.clear()
            if timeout is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    def cancel_all(self) -> None:
        """Fail every request in flight with EngineStopping (HTTP 503): the engine is stopping."""
        for r in [*self.running, *self.waiting]:
            if not r.future.done():
                r.future.set_exception(EngineStopping("the engine is shutting down"))
                r.future.exception()  # retrieved: nobody may be left awaiting it

    # -- state -----------------------------------------------------------------

    @property
    def queue_len(self) -> int:
        return len(self.running) + len(self.waiting)

    def snapshot(self, now: float) -> Any:
        self.advance(now)
        used = sum(r.prompt + r.generated for r in self.running)
        generated = self.generated_done + sum(r.generated for r in self.running)
        w = self._window
        w.append((now, generated, self._prompt_admitted, self._cached_admitted))
        while len(w) > 2 and now - w[1][0] >= WINDOW_S:
            w.popleft()
        t0, g0, p0, c0 = w[0]
        dt = now - t0
        throughput = (generated - g0) / dt if dt > 0 else 0.0
        prompt_delta = self._prompt_admitted - p0
        hit_rate = (self._cached_admitted - c0) / prompt_delta if prompt_delta > 0 else 0.0
        running, waiting = len(self.running), len(self.waiting)
        return LoadSnapshot(
            dp_rank=self.index,
            num_running_reqs=running,
            num_waiting_reqs=waiting,
            num_total_reqs=running + waiting,
            num_used_tokens=used,
            max_total_num_tokens=self.max_tokens,
            token_usage=round(used / self.max_tokens, 6),
            gen_throughput=round(throughput, 3),
            cache_hit_rate=round(hit_rate, 6),
            utilization=round(running / self.max_running, 6),
            max_running_requests=self.max_running,
            num_waiting_uncached_tokens=self.waiting_uncached,
            num_total_tokens=used + self.waiting_prompt,
            memory=MemoryMetrics(weight_gb=WEIGHT_GB,
                                 kv_cache_gb=round(self.max_tokens * KV_BYTES_PER_TOKEN / 2**30, 6),
                                 graph_gb=0.0, token_capacity=self.max_tokens),
            queues=QueueMetrics(waiting=waiting, grammar=0, paused=0, retracted=0),
        )

    def counters(self) -> dict[str, Any]:
        return {"dp_rank": self.index, "speed": self.speed, "received": self.received,
                "completed": self.completed, "running": len(self.running),
                "waiting": len(self.waiting), "reserved_tokens": self.reserved}


class Engine:
    """The ranks, the publisher and rank selection; the HTTP and gRPC surfaces sit on top.

    Create it inside a running event loop, ``await start()``, ``await stop()``.
    """

    def __init__(self, settings: EngineSettings) -> None:
        speeds = settings.speeds or (1.0,) * settings.dp_size
        if len(speeds) != settings.dp_size:
            raise ValueError(f"speeds has {len(speeds)} values for dp_size {settings.dp_size}")
        if any(not s > 0 for s in speeds):
            raise ValueError(f"speeds must all be > 0, got {speeds}")
        if not settings.publish_rate >= 20:
            raise ValueError(f"publish_rate must be >= 20 Hz, got {settings.publish_rate}")
        self.settings = settings
        self.ranks = [_Rank(i, s, settings) for i, s in enumerate(speeds)]
        self.region = region_path(settings)
        self.publishing = True
        self.publishes = 0
        self._rr = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._publishers: list[ShmPublisher] = []
        self._publish_wake = asyncio.Event()
        # The engine refreshes the store right after each publish (below), so its own
        # poll task only has to notice status changes: no need to wake every millisecond.
        self.store = open_store(self.region, dp_size=settings.dp_size,
                                stale_after=settings.stale_after, poll_interval=STORE_POLL_S)
        self.started_at = time.time()

    async def start(self) -> None:
        s = self.settings
        self._publishers = [ShmPublisher(self.region, dp_size=s.dp_size, dp_rank=r.index)
                            for r in self.ranks]
        self._publish_all()  # ranks are healthy from the first request on
        loop = asyncio.get_running_loop()
        for r in self.ranks:
            self._tasks.append(loop.create_task(r.run(), name=f"engine-rank-{r.index}"))
        self._tasks.append(loop.create_task(self._publish_loop(), name="engine-publisher"))
        await self.store.start()

    def end_requests(self) -> None:
        """Every request in flight or waiting fails with EngineStopping (HTTP 503)."""
        for r in self.ranks:
            r.cancel_all()

    async def stop(self) -> None:
        self.end_requests()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.store.stop()
        self.store.close()
        for p in self._publishers:
            p.close()
        self._publishers = []
        if self.settings.shm is None:  # the default region is this engine's own
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.region)

    # -- publishing --------------------------------------------------------------

    def set_publishing(self, enabled: bool) -> None:
        if enabled != self.publishing:
            log.warning("publisher %s (region %s)", "resumed" if enabled else "stopped: ranks will "
                        "turn stale for readers", self.region)
        self.publishing = enabled
        self._publish_wake.set()

    def _publish_all(self) -> None:
        now = time.monotonic()
        for r, p in zip(self.ranks, self._publishers):
            p.publish(r.snapshot(now))
        self.publishes += 1
        self.store.poll()  # WatchLoads subscribers hear of it now, not at the next poll

    async def _publish_loop(self) -> None:
        interval = 1.0 / self.settings.publish_rate
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if not self.publishing:
                self._publish_wake.clear()
                await self._publish_wake.wait()
                next_at = loop.time()
                continue
            try:
                self._publish_all()
            except ValueError:  # a snapshot too large for the slot: a bug, say so once per second
                log.exception("publish failed")
                await asyncio.sleep(1.0)
            next_at += interval
            delay = next_at - loop.time()
            if delay < -interval:  # fell behind (a busy machine): do not burst to catch up
                next_at = loop.time()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

    # -- requests ----------------------------------------------------------------

    def pick_rank(self, requested: int | None) -> _Rank:
        if requested is not None:
            if not 0 <= requested < len(self.ranks):
                raise EngineError(f"data_parallel_rank: {requested} out of range; this engine has "
                                  f"ranks 0..{len(self.ranks) - 1}")
            return self.ranks[requested]
        n = len(self.ranks)
        best = None
        for k in range(n):
            r = self.ranks[(self._rr + k) % n]
            if best is None or r.queue_len < best.queue_len:
                best = r
        self._rr = (self._rr + 1) % n
        assert best is not None
        return best

    def new_request(self, prompt_text: str | None, prompt_ids: list[int] | None, max_new: Any,
                    dp_rank: Any) -> _Request:
        if max_new is None:
            max_new = DEFAULT_MAX_NEW_TOKENS
        if not isinstance(max_new, int) or isinstance(max_new, bool) or not 0 <= max_new <= MAX_NEW_TOKENS_LIMIT:
            raise EngineError(f"max_new_tokens: expected an integer in 0..{MAX_NEW_TOKENS_LIMIT}, "
                              f"got {max_new!r}")
        if dp_rank is not None and (not isinstance(dp_rank, int) or isinstance(dp_rank, bool)):
            raise EngineError(f"data_parallel_rank: expected an integer, got {dp_rank!r}")
        if prompt_ids is not None:
            if not isinstance(prompt_ids, list) or not all(type(t) is int for t in prompt_ids):
                raise EngineError("input_ids: expected a list of integer token ids")
            n, key = max(1, len(prompt_ids)), hash(tuple(prompt_ids))
        else:
            text = prompt_text or ""
            n, key = prompt_tokens(text), hash(text)
        if n + max_new > self.settings.max_total_tokens:
            raise EngineError(f"prompt ({n} tokens) + max_new_tokens ({max_new}) exceeds the KV "
                              f"budget of {self.settings.max_total_tokens} tokens per rank")
        rank = self.pick_rank(dp_rank)
        req = _Request(key, n, max_new, rank.index, time.monotonic())
        rank.enqueue(req)
        return req

    async def wait(self, req: _Request) -> None:
        try:
            await asyncio.shield(req.future)
        except asyncio.CancelledError:
            req.future.cancel()  # the client went away: free the slot at the next event
            self.ranks[req.rank]._wake.set()
            raise

    def progress(self, req: _Request) -> int:
        """Output tokens the request has so far."""
        self.ranks[req.rank].advance(time.monotonic())
        return req.generated

    def server_info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model_path": s.model, "tokenizer_path": s.model, "served_model_name": s.model,
            "version": f"loadsvc-{__version__}", "dp_size": s.dp_size, "tp_size": 1, "pp_size": 1,
            "max_running_requests": s.max_running_requests, "max_total_num_tokens": s.max_total_tokens,
            "context_length": s.max_total_tokens, "load_balance_method": "shortest_queue",
            "host": s.host, "port": s.http_port, "grpc_port": s.grpc_port,
            "disaggregation_mode": "null", "is_embedding": False,
            "internal_states": [{"dp_rank": r.index, "max_total_num_tokens": s.max_total_tokens,
                                 "last_gen_throughput": 0.0} for r in self.ranks],
            "loadsvc_engine": {
                "shm": str(self.region), "publishing": self.publishing, "publishes": self.publishes,
                "publish_rate": s.publish_rate, "step_ms": s.step_ms, "batch_knee": s.batch_knee,
                "prefill_tokens_per_step": s.prefill_tokens_per_step,
                "ranks": [r.counters() for r in self.ranks],
                "received": sum(r.received for r in self.ranks),
                "completed": sum(r.completed for r in self.ranks),
            },
        }

    def model_info(self) -> dict[str, Any]:
        m = self.settings.model
        return {"model_path": m, "tokenizer_path": m, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default",
                "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": "loadsvc-toy", "architectures": ["LoadsvcToyForCausalLM"]}


# -- HTTP ---------------------------------------------------------------------------


def _output_text(n: int) -> str:
    return " tok" * n  # n tokens by the toy tokenizer's count, give or take


def _error(status: int, message: str, kind: str = "BadRequestError") -> Any:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status},
                         "object": "error", "message": message}, status_code=status)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chat_prompt(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise EngineError("messages: expected a non-empty list of {role, content}")
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(p["text"] for p in content
                               if isinstance(p, dict) and isinstance(p.get("text"), str))
        elif content is not None and not isinstance(content, str):
            raise EngineError("messages: content must be a string or a list of {type, text} parts")
        parts.append(f"{m.get('role', 'user') if isinstance(m, dict) else 'user'}: {content or ''}")
    return "\n".join(parts)


def create_app(engine: Engine) -> Any:
    """The SGLang-like FastAPI app of one engine, with loadsvc's /v1/loads mounted."""
    app = FastAPI(title="loadsvc toy engine", version=__version__)
    model = engine.settings.model

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise EngineError("body: expected a JSON object") from None
        if not isinstance(body, dict):
            raise EngineError("body: expected a JSON object")
        return body

    @app.exception_handler(EngineError)
    async def _bad(_request: Request, exc: EngineError) -> Any:
        return _error(400, str(exc))

    @app.exception_handler(EngineStopping)
    async def _stopping(_request: Request, exc: EngineStopping) -> Any:
        return _error(503, str(exc), "ServiceUnavailableError")

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        return engine.server_info()

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        return engine.model_info()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model, "object": "model", "created": int(engine.started_at),
            "owned_by": "sglang",  # the API it speaks: gateways detect the backend from this
            "root": model, "max_model_len": engine.settings.max_total_tokens}]}

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        for r in engine.ranks:
            r._prefix.clear()
        return Response("Cache flushed.\n", status_code=200)

    @app.post("/loadsvc/publisher")
    async def publisher(request: Request) -> Any:
        # It turns this engine's loads off for every router, and the engine has no API key:
        # only a caller on this host may flip it (anyone else: kill -USR1 / -USR2 on the host).
        peer = request.client.host if request.client else ""
        if not is_loopback(peer):
            return _error(403, f"POST /loadsvc/publisher is for callers on this host (loopback) only, "
                               f"not {peer or 'an unknown peer'}; on the host: kill -USR1 / -USR2 <pid>",
                          "PermissionDeniedError")
        body = await body_of(request)
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise EngineError(f"enabled: expected true or false, got {enabled!r}")
        engine.set_publishing(enabled)
        return {"publishing": engine.publishing}

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        body = await body_of(request)
        text, ids = body.get("text"), body.get("input_ids")
        if isinstance(text, list) or (isinstance(ids, list) and ids and isinstance(ids[0], list)):
            raise EngineError("text/input_ids: batches are not supported by the toy engine; "
                              "send one prompt per request")
        if text is not None and not isinstance(text, str):
            raise EngineError(f"text: expected a string, got {type(text).__name__}")
        sampling = body.get("sampling_params") or {}
        if not isinstance(sampling, dict):
            raise EngineError("sampling_params: expected an object")
        req = engine.new_request(text, ids, sampling.get("max_new_tokens"), body.get("data_parallel_rank"))
        rid = body.get("rid") or uuid.uuid4().hex

        def meta(n: int, done: bool) -> dict[str, Any]:
            m: dict[str, Any] = {"id": rid, "prompt_tokens": req.prompt, "completion_tokens": n,
                                 "cached_tokens": req.cached, "dp_rank": req.rank,
                                 "finish_reason": {"type": "length", "length": n} if done else None}
            if done:
                m["e2e_latency"] = round(req.finished - req.arrival, 6)
                m["queue_time"] = round(req.started - req.arrival, 6)
            return m

        if body.get("stream"):
            async def chunks() -> AsyncIterator[bytes]:
                async for n, done in _progress(engine, req):
                    yield _sse({"text": _output_text(n), "meta_info": meta(n, done)})
                yield b"data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        await engine.wait(req)
        return JSONResponse({"text": _output_text(req.max_new), "meta_info": meta(req.max_new, True)})

    def usage(req: _Request, n: int) -> dict[str, Any]:
        return {"prompt_tokens": req.prompt, "completion_tokens": n, "total_tokens": req.prompt + n,
                "prompt_tokens_details": {"cached_tokens": req.cached}}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            if prompt and isinstance(prompt[0], int):
                req = engine.new_request(None, prompt, body.get("max_tokens"), body.get("data_parallel_rank"))
                prompt = None
            elif len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            else:
                raise EngineError("prompt: batches are not supported by the toy engine")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise EngineError(f"prompt: expected a string, got {type(prompt).__name__}")
            req = engine.new_request(prompt, None, body.get("max_tokens"), body.get("data_parallel_rank"))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        name = body.get("model") or model

        if body.get("stream"):
            async def chunks() -> AsyncIterator[bytes]:
                sent = 0
                async for n, done in _progress(engine, req):
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": name,
                                "choices": [{"index": 0, "text": _output_text(n - sent), "logprobs": None,
                                             "finish_reason": "length" if done else None}],
                                **({"usage": usage(req, n)} if done else {})})
                    sent = n
                yield b"data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        await engine.wait(req)
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": _output_text(req.max_new), "logprobs": None,
                             "finish_reason": "length"}],
                "usage": usage(req, req.max_new)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        max_new = body.get("max_completion_tokens", body.get("max_tokens"))
        req = engine.new_request(_chat_prompt(body.get("messages")), None, max_new,
                                 body.get("data_parallel_rank"))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        name = body.get("model") or model

        if body.get("stream"):
            async def chunks() -> AsyncIterator[bytes]:
                sent = 0
                first = True
                async for n, done in _progress(engine, req):
                    delta: dict[str, Any] = {"content": _output_text(n - sent)}
                    if first:
                        delta["role"] = "assistant"
                        first = False
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": name, "choices": [{"index": 0, "delta": delta,
                                                            "finish_reason": "length" if done else None}],
                                **({"usage": usage(req, n)} if done else {})})
                    sent = n
                yield b"data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        await engine.wait(req)
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": _output_text(req.max_new)},
                             "finish_reason": "length"}],
                "usage": usage(req, req.max_new)}

    gauges = _sglang_gauges(engine)

    @app.get("/metrics")
    async def metrics() -> Response:  # SGLang's scheduler gauges, named and labelled as SGLang does
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(gauges), media_type=CONTENT_TYPE_LATEST)

    # GET /v1/loads, as `loadsvc serve` has it, and GET /get_load as vllm-router's power_of_two
    # reads it ({"load": N}; SGLang's own /get_load answers a per-rank list vllm-router cannot read)
    app.include_router(loads_router(engine.store, get_load=True))
    return app


# (metric, help, LoadSnapshot field): the gauges SGLang's SchedulerMetricsCollector exports
# under these names (SGLang 0.5.23, python/sglang/srt/observability/metrics_collector.py).
SGLANG_GAUGES = (
    ("sglang:num_running_reqs", "The number of running requests.", "num_running_reqs"),
    ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", "num_waiting_reqs"),
    ("sglang:token_usage", "The token usage.", "token_usage"),
    ("sglang:gen_throughput", "The generation throughput (token/s).", "gen_throughput"),
    ("sglang:cache_hit_rate", "The prefix cache hit rate.", "cache_hit_rate"),
    ("sglang:num_used_tokens", "The number of used tokens.", "num_used_tokens"),
    ("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.",
     "max_total_num_tokens"),
)


def _sglang_gauges(engine: Engine) -> Any:
    """A prometheus_client registry whose /metrics reads each rank's state as SGLang's would show it.

    Labels as SGLang's scheduler sets them: model_name, engine_type ("unified"), tp_rank,
    pp_rank, moe_ep_rank, and dp_rank when there is more than one rank.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

    names = ["model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"]
    dp = engine.settings.dp_size > 1

    class Gauges:
        def collect(self) -> Any:
            now = time.monotonic()
            snaps = [r.snapshot(now) for r in engine.ranks]
            families = [GaugeMetricFamily(name, text, labels=names + ["dp_rank"] * dp)
                        for name, text, _ in SGLANG_GAUGES]
            for snap in snaps:
                labels = [engine.settings.model, "unified", "0", "0", "0"] + [str(snap.dp_rank)] * dp
                for family, (_, _, attr) in zip(families, SGLANG_GAUGES):
                    family.add_metric(labels, float(getattr(snap, attr)))
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Gauges())
    return registry


async def _progress(engine: Engine, req: _Request) -> AsyncIterator[tuple[int, bool]]:
    """(tokens so far, finished) every STREAM_INTERVAL_S while the request runs, then the last."""
    sent = -1
    try:
        while not req.future.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(req.future), STREAM_INTERVAL_S)
            if req.future.done():
                break
            n = engine.progress(req)
            if n != sent:
                sent = n
                yield n, False
        if req.future.cancelled() or req.future.exception() is not None:
            return  # client gone, or the engine is stopping: end the stream
        yield req.max_new, True
    finally:
        if not req.future.done():  # the client disconnected mid-stream
            req.future.cancel()
            engine.ranks[req.rank]._wake.set()


# -- process -----------------------------------------------------------------------------


async def _serve(settings: EngineSettings) -> None:
    import grpc

    http_sock = bind_tcp(settings.host, settings.http_port, "the engine's HTTP (--port)")
    engine = Engine(settings)
    await engine.start()
    try:
        # so_reuseport off: a second engine on the same --grpc-port must fail, not share it.
        grpc_server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *grpc_options(GrpcLimits())])
        surfaces = add_to_grpc_server(grpc_server, engine.store)
        grpc_addr = f"[{settings.host}]:{settings.grpc_port}" if ":" in settings.host \
            else f"{settings.host}:{settings.grpc_port}"
        try:
            grpc_server.add_insecure_port(grpc_addr)
        except RuntimeError as e:
            raise OSError(f"cannot listen for the engine's gRPC (--grpc-port) on {grpc_addr}: {e}") from e
        await grpc_server.start()
        log.info("loadsvc engine: %d ranks (speeds %s), HTTP http://%s:%d, gRPC %s, region %s",
                 settings.dp_size, ",".join(f"{r.speed:g}" for r in engine.ranks), settings.host,
                 settings.http_port, grpc_addr, engine.region)
        try:
            # SIGUSR1 / SIGUSR2 stop and resume the publisher alone; SIGTERM / SIGINT stop it all.
            await serve_until_signal(create_app(engine), http_sock, settings.host, settings.http_port,
                                     what="engine HTTP", limits=settings.http_limits,
                                     signals={signal.SIGUSR1: lambda: engine.set_publishing(False),
                                              signal.SIGUSR2: lambda: engine.set_publishing(True)},
                                     on_stop=engine.end_requests)  # so HTTP drains at once
        finally:
            await surfaces.aclose()  # WatchLoads and ORCA streams end with a status
            await grpc_server.stop(0.5)
    finally:
        await engine.stop()
        log.info("loadsvc engine stopped")


def run_engine(settings: EngineSettings) -> int:
    """Run the engine until SIGTERM or SIGINT; 0 on a clean stop, 1 when it cannot start."""
    try:
        run(_serve(settings))
    except (OSError, RegionError, ValueError) as e:  # a port in use, a region in use, bad settings
        log.error("loadsvc engine cannot start: %s", e)
        return 1
    return 0
