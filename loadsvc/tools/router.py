"""The reference P2C router: an HTTP proxy in front of engines, routing on loads pushed to it.

    client --HTTP--> Router (ASGI) --pick a target--> httpx --> engine i  /generate, /v1/...
                        ^   score(target): requests ahead = the others' (running + waiting of the
                        |   latest WatchLoads message, less ours it counts) + ours in flight now
    engine i gRPC --WatchLoads stream (one per engine, grpc.aio)--> per-rank view, fresh within
                                                                     one publish period

A target is one rank of one engine. ``p2c`` (power of two choices): draw two
distinct eligible targets at random; the lower score wins (ties: the first
drawn). The score estimates how long the new request would take there, in
units of one output token, for an engine that runs up to M requests as one
batch (M = max_running_requests) and queues the rest:

    q     = max(0, running + waiting - own_in_view) + own_inflight   (requests ahead of it)
    score = (1 + max(0, q + 1 - M) / M) / rate

Below M the request joins the batch at once and takes 1/rate per token; above,
it first waits for (q + 1 - M) of the batch's M slots to free up, each slot
turning over once per request duration. running, waiting and M are the rank's
figures in its latest WatchLoads message: everybody's requests at its publish
time (other router replicas', traffic no router sent). own_in_view is how many
of them were this router's: its requests there sent before the publish (less
SLACK_NS for one still in transit) and not ended by then. own_inflight is this
router's requests there now, known exactly. So the load it did not send counts
as of the last publish, its own as of now, each once: a burst between two
publishes does not all land on one rank (sent_since_publish, the requests the
message cannot include yet, are in own_inflight), and a request that ended
after the publish is not counted again until the next one. rate is the rank's decode rate per
running request: gen_throughput over the mean num_running_reqs of the messages
of the last RATE_WINDOW_S (gen_throughput is itself a recent average, so the
two cover the same stretch); a rank that has not run anything yet gets the mean
rate of the others. The rate is what tells a slow rank from a fast one, and it
falls as a batch grows, which spreads requests over idle ranks. When an engine has more than one rank the router
names the rank in the JSON body (``data_parallel_rank``), as SGLang's DP-aware
router does; with one rank the body is forwarded untouched.

A target is eligible while its engine's stream is connected, a message (data or
heartbeat) arrived within ``stale_after`` seconds, its rank's status is healthy
(loadsvc marks a rank stale when its publisher stops), and its engine has not
refused a connection in the last DOWN_S seconds. With no eligible target the
router falls back to round robin over every engine and logs it (rate limited).

``round_robin``: each request to the next engine in turn, loads ignored (the
engine picks the rank); the benchmark's baseline.

Local routes: ``GET /health`` (200 while a target is eligible, else 503) and
``GET /router/workers`` (the router's view, its counters and view lag). Every
other path is proxied.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import time
from typing import Any

import grpc
import httpx

from loadsvc._hosting import bind_tcp, run, serve_until_signal
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc.settings import RouterSettings, RouterWorker

__all__ = ["Router", "run_router", "POLICIES", "parse_worker"]

log = logging.getLogger("loadsvc.tools.router")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per proxied request

POLICIES = ("p2c", "round_robin")
WATCH_METHOD = "/loadsvc.v1.LoadService/WatchLoads"
HEARTBEAT_MS = 250  # WatchLoads heartbeat asked of each engine (stale detection needs it)
SLACK_NS = 2_000_000  # a request sent this long before a publish may not be in it yet
RATE_WINDOW_S = 1.0  # running counts averaged over this long, to match gen_throughput's window
STARTUP_GRACE_S = 5.0  # an engine that refuses WatchLoads this long after start is worth a warning
DOWN_S = 1.0  # an engine that refused a connection is skipped this long
LAG_SAMPLES = 4096
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade",
        b"proxy-connection", b"host", b"content-length", b"trailer"}
_HEALTHY = pb.LOAD_STATUS_HEALTHY


def parse_worker(text: str) -> RouterWorker:
    """'http://127.0.0.1:30000=127.0.0.1:30001' -> RouterWorker (HTTP URL = gRPC address)."""
    url, sep, grpc_addr = text.partition("=")
    if not sep or not url.startswith(("http://", "https://")) or ":" not in grpc_addr:
        raise ValueError(f"worker must look like http://HOST:PORT=HOST:GRPC_PORT (HTTP URL, then the "
                         f"engine's gRPC address for WatchLoads), got {text!r}")
    return RouterWorker(url=url.rstrip("/"), grpc=grpc_addr)


class _Target:
    """One rank of one engine, as the router sees it."""

    __slots__ = ("worker", "rank", "running", "waiting", "max_running", "token_usage", "healthy",
                 "publish_ns", "rate", "_history", "_history_sum", "sent_after", "done_after", "in_view",
                 "sent", "inflight")

    def __init__(self, worker: _Worker, rank: int) -> None:
        self.worker = worker
        self.rank = rank
        self.running = 0
        self.waiting = 0
        self.max_running = 1
        self.token_usage = 0.0
        self.healthy = False
        self.publish_ns = 0
        self.rate = 0.0  # tokens/s per running request; 0 until the rank has run something
        self._history: collections.deque[tuple[int, int]] = collections.deque()  # (publish ns, running)
        self._history_sum = 0
        self.sent_after: collections.deque[int] = collections.deque()  # send times (ns) not yet in a publish
        self.done_after: collections.deque[int] = collections.deque()  # end times (ns) not yet in a publish
        self.in_view = 0  # this router's requests the latest publish counts (sent before it, not ended)
        self.sent = 0
        self.inflight = 0

    def queued(self) -> int:
        """Requests ahead of a new one: the others' as of the last publish, ours as of now."""
        # in_view < 0 only for a moment, when a request ends within SLACK_NS of being sent
        return max(0, self.running + self.waiting - max(0, self.in_view)) + self.inflight

    def score(self, default_rate: float) -> float:
        m = self.max_running
        return (1.0 + max(0, self.queued() + 1 - m) / m) / (self.rate or default_rate)

    def update(self, snap: Any) -> None:
        self.running = snap.num_running_reqs
        self.waiting = snap.num_waiting_reqs
        self.token_usage = snap.token_usage
        self.healthy = snap.status == _HEALTHY
        self.max_running = max(1, snap.max_running_requests)
        if snap.publish_time_ns != self.publish_ns:  # a new publish, not a heartbeat repeating one
            h = self._history
            h.append((snap.publish_time_ns, snap.num_running_reqs))
            self._history_sum += snap.num_running_reqs
            oldest = snap.publish_time_ns - int(RATE_WINDOW_S * 1e9)
            while h[0][0] < oldest:
                self._history_sum -= h.popleft()[1]
            mean_running = self._history_sum / len(h)
            if mean_running >= 0.5 and snap.gen_throughput > 0:
                self.rate = snap.gen_throughput / mean_running
        self.publish_ns = snap.publish_time_ns
        horizon = snap.publish_time_ns - SLACK_NS
        q = self.sent_after
        while q and q[0] <= horizon:
            q.popleft()
            self.in_view += 1
        q = self.done_after
        while q and q[0] <= snap.publish_time_ns:
            q.popleft()
            self.in_view -= 1


class _Worker:
    def __init__(self, index: int, spec: RouterWorker) -> None:
        self.index = index
        self.spec = spec
        self.targets: list[_Target] = []
        self.connected = False
        self.last_message = 0.0  # monotonic
        self.messages = 0
        self.down_until = 0.0
        self.warned = False
        self.sent = 0
        self.completed = 0
        self.errors = 0
        self.inflight = 0

    def update(self, msg: Any) -> None:
        self.last_message = time.monotonic()
        self.messages += 1
        by_rank = {t.rank: t for t in self.targets}
        targets = []
        for snap in msg.loads:
            t = by_rank.get(snap.dp_rank) or _Target(self, snap.dp_rank)
            t.update(snap)
            targets.append(t)
        self.targets = targets

    @property
    def multi_rank(self) -> bool:
        return len(self.targets) > 1


class Router:
    """The proxy and its views; an ASGI app. ``await start()`` in the serving loop, ``await stop()``."""

    def __init__(self, settings: RouterSettings) -> None:
        if settings.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {settings.policy!r}")
        if not settings.workers:
            raise ValueError("the router needs at least one worker")
        self.settings = settings
        self.workers = [_Worker(i, w) for i, w in enumerate(settings.workers)]
        self._rng = random.Random(settings.seed)
        self._rr = 0
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lag_ms: collections.deque[float] = collections.deque(maxlen=LAG_SAMPLES)
        self.fallbacks = 0
        self._last_fallback_log = 0.0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self._client = httpx.AsyncClient(limits=limits, timeout=self.settings.request_timeout)
        if self.settings.policy == "p2c":
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._watch(w), name=f"router-watch-{w.index}")
                           for w in self.workers]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- WatchLoads ------------------------------------------------------------------

    async def _watch(self, w: _Worker) -> None:
        backoff = 0.1
        request = pb.WatchLoadsRequest(include=["core"], max_interval_ms=HEARTBEAT_MS)
        started = time.monotonic()
        while True:
            channel = grpc.aio.insecure_channel(w.spec.grpc)
            try:
                call = channel.unary_stream(WATCH_METHOD,
                                            request_serializer=pb.WatchLoadsRequest.SerializeToString,
                                            response_deserializer=pb.GetLoadsResponse.FromString)(request)
                async for msg in call:
                    now_ns = time.time_ns()
                    if not w.connected:
                        log.info("watching loads of %s (%s)", w.spec.url, w.spec.grpc)
                    w.connected = True
                    w.update(msg)
                    newest = max((s.publish_time_ns for s in msg.loads), default=0)
                    if newest:
                        self._lag_ms.append((now_ns - newest) / 1e6)
                    backoff = 0.1
            except grpc.aio.AioRpcError as e:
                # Warn when a stream drops, and once when an engine never answered for a while
                # (engines starting next to the router are refused for a moment: not worth a line).
                if w.connected or (not w.warned and time.monotonic() - started > STARTUP_GRACE_S):
                    w.warned = True
                    log.warning("WatchLoads from %s (%s) failed: %s %s; retrying", w.spec.url,
                                w.spec.grpc, e.code().name, e.details())
            finally:
                w.connected = False
                await channel.close()
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    # -- picking ---------------------------------------------------------------------

    def _eligible(self, now: float) -> list[_Target]:
        stale = self.settings.stale_after
        out: list[_Target] = []
        for w in self.workers:
            if w.connected and now - w.last_message <= stale and now >= w.down_until:
                out.extend(t for t in w.targets if t.healthy)
        return out

    def pick(self) -> tuple[_Worker, _Target | None]:
        """The engine for the next request and, under p2c, the rank (None: the engine picks)."""
        now = time.monotonic()
        if self.settings.policy == "p2c":
            targets = self._eligible(now)
            if len(targets) >= 2:
                a, b = self._rng.sample(targets, 2)
                default = 1.0
                if not (a.rate and b.rate):
                    known = [t.rate for t in targets if t.rate]
                    default = sum(known) / len(known) if known else 1.0
                if b.score(default) < a.score(default):
                    a = b
                return a.worker, a
            if targets:
                return targets[0].worker, targets[0]
            self.fallbacks += 1
            if now - self._last_fallback_log > 5.0:
                self._last_fallback_log = now
                log.warning("no engine has fresh, healthy loads; routing round robin (%d times so far)",
                            self.fallbacks)
        n = len(self.workers)
        for k in range(n):
            w = self.workers[(self._rr + k) % n]
            if now >= w.down_until:
                self._rr = (self._rr + k + 1) % n
                return w, None
        self._rr = (self._rr + 1) % n
        return self.workers[self._rr - 1], None

    # -- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan or websockets: the host process starts and stops the router
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            ok = self.settings.policy == "round_robin" or bool(self._eligible(time.monotonic()))
            await _respond(send, 200 if ok else 503, {"healthy": ok})
            return
        if method == "GET" and path == "/router/workers":
            await _respond(send, 200, self.state())
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await self._proxy(scope, bytes(body), send)

    async def _proxy(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        assert self._client is not None, "Router.start() was not awaited"
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP]
        path = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string") and "?" not in path:
            path += "?" + scope["query_string"].decode("latin-1")
        for attempt in (1, 2):
            w, target = self.pick()
            content = body
            if target is not None and w.multi_rank and body[:1] == b"{":
                content = _with_rank(body, target.rank)
            now_ns = time.time_ns()
            w.sent += 1
            w.inflight += 1
            if target is not None:
                target.sent += 1
                target.inflight += 1
                target.sent_after.append(now_ns)
            started = False
            try:
                request = self._client.build_request(scope["method"], w.spec.url + path,
                                                     headers=headers, content=content)
                response = await self._client.send(request, stream=True)
                try:
                    started = True
                    await send({"type": "http.response.start", "status": response.status_code,
                                "headers": [(k, v) for k, v in response.headers.raw
                                            if k.lower() not in _HOP]})
                    async for chunk in response.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                finally:
                    await response.aclose()
                w.completed += 1
                return
            except httpx.ConnectError as e:
                w.errors += 1
                w.down_until = time.monotonic() + DOWN_S
                log.warning("engine %s refused the connection (%s); skipping it for %.0f s", w.spec.url,
                            e, DOWN_S)
                if attempt == 2:
                    await _respond(send, 502, {"error": {"message": f"engine {w.spec.url} unreachable: {e}",
                                                         "type": "BadGateway", "code": 502}})
                    return
            except httpx.HTTPError as e:
                w.errors += 1
                if started:
                    raise  # the response began: nothing sensible can be sent any more
                await _respond(send, 502, {"error": {"message": f"engine {w.spec.url}: {e!r}",
                                                     "type": "BadGateway", "code": 502}})
                return
            finally:
                w.inflight -= 1
                if target is not None:
                    target.inflight -= 1
                    target.done_after.append(time.time_ns())

    # -- introspection -----------------------------------------------------------------

    def lag_ms(self) -> dict[str, float]:
        """Percentiles of (receive time - publish time) over recent WatchLoads messages."""
        lags = sorted(self._lag_ms)
        if not lags:
            return {}
        def pick(q: float) -> float:
            return lags[min(len(lags) - 1, int(q * len(lags)))]

        return {"p50": round(pick(0.5), 3), "p99": round(pick(0.99), 3), "max": round(lags[-1], 3),
                "samples": len(lags)}

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "policy": self.settings.policy,
            "fallbacks": self.fallbacks,
            "view_lag_ms": self.lag_ms(),
            "workers": [{
                "url": w.spec.url, "grpc": w.spec.grpc, "connected": w.connected,
                "message_age_ms": round((now - w.last_message) * 1000, 3) if w.messages else None,
                "messages": w.messages, "sent": w.sent, "completed": w.completed, "errors": w.errors,
                "inflight": w.inflight,
                "ranks": [{"dp_rank": t.rank, "running": t.running, "waiting": t.waiting,
                           "token_usage": t.token_usage, "healthy": t.healthy,
                           "rate": round(t.rate, 3), "sent_since_publish": len(t.sent_after),
                           "own_in_view": t.in_view, "queued": t.queued(), "sent": t.sent,
                           "inflight": t.inflight} for t in w.targets],
            } for w in self.workers],
        }


def _with_rank(body: bytes, rank: int) -> bytes:
    try:
        obj = json.loads(body)
    except ValueError:
        return body  # not JSON after all: let the engine answer it
    if not isinstance(obj, dict) or "data_parallel_rank" in obj:
        return body  # the client chose a rank itself
    obj["data_parallel_rank"] = rank
    return json.dumps(obj, separators=(",", ":")).encode()


async def _respond(send: Any, status: int, obj: Any) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# -- process -------------------------------------------------------------------------


async def _serve(settings: RouterSettings) -> None:
    sock = bind_tcp(settings.host, settings.port, "the router's HTTP (--port)")
    router = Router(settings)
    await router.start()
    log.info("loadsvc router (%s) on http://%s:%d in front of %s", settings.policy, settings.host,
             settings.port, ", ".join(w.url for w in settings.workers))
    try:
        await serve_until_signal(router, sock, settings.host, settings.port, what="router HTTP",
                                 limits=settings.http_limits)
    finally:
        await router.stop()
        log.info("loadsvc router stopped")


def run_router(settings: RouterSettings) -> int:
    """Run the router until SIGTERM or SIGINT; 0 on a clean stop, 1 when it cannot start."""
    try:
        run(_serve(settings))
    except OSError as e:  # the port in use
        log.error("loadsvc router cannot start: %s", e)
        return 1
    return 0
