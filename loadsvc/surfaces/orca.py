"""ORCA out-of-band load reports (``xds.service.orca.v3.OpenRcaService``) over a LoadStore.

    LoadStore --view() at each send--> report(view, ranks) --> OrcaLoadReport bytes
                                        (memoized per View)        |
    client: StreamCoreMetrics(report_interval) <-- one now, then one every interval

gRPC clients that balance with ``weighted_round_robin`` (grpc-js, grpcio's
C-core, grpc-java, grpc-go) open ``StreamCoreMetrics`` on each connection they
balance over and weigh each server by ``rps_fractional / application_utilization``.
``add_orca_service(server, store)`` serves that stream on any ``grpc.aio``
server, so it must be added to the server the clients call (an engine's own
gRPC port: see ``loadsvc.embed.add_to_grpc_server``).

Interval: the request's ``report_interval``; unset or zero means
DEFAULT_REPORT_INTERVAL (1 s); shorter than ``min_report_interval``
(MIN_REPORT_INTERVAL, 100 ms, unless the server says otherwise) is raised to it.
The first report goes out at once. Every report is computed from the store's
current View when it is sent, never replayed: a rank that stops publishing is
counted stale, then unreachable, in the reports sent from then on.

Which ranks: ``ranks`` (default: every rank of the region). One report describes
the server as a whole, the aggregate of those ranks, each counted by status:

    healthy       its published load, below
    stale         utilization 1.0 (its last values are not trusted as current)
    unreachable   left out (as is a rank that never published)

Mapping, per healthy rank (fields of LoadSnapshot):

    busy  = max(token_usage, num_running_reqs / max_running_requests, utilization), in [0, 1]
    queue = min(1, num_waiting_reqs / max(max_running_requests, 1))
    u     = busy + queue                                         in [0, 2]

    application_utilization  mean of u over healthy and stale ranks, at least
                             UTILIZATION_FLOOR (0.01); 1.0 when no rank is
                             healthy or stale
    cpu_utilization          the same value (C-core falls back to it; grpc-js
                             reads only application_utilization)
    mem_utilization          mean token_usage of the healthy ranks (KV cache)
    rps_fractional           max(sum of gen_throughput over healthy ranks /
                             TOKENS_PER_REQUEST (256), RPS_FLOOR (1.0) per healthy
                             or stale rank, and never below RPS_FLOOR): a request
                             rate estimated from token throughput, so that
                             rps / utilization estimates capacity
    eps                      0 (snapshots carry no error counts)
    utilization{}            token_usage and utilization: means over healthy
                             ranks; running: sum num_running_reqs / sum
                             max_running_requests
    named_metrics{}          sums over healthy ranks of num_running_reqs,
                             num_waiting_reqs, num_total_reqs, num_used_tokens,
                             num_total_tokens, num_waiting_uncached_tokens,
                             max_total_num_tokens, max_running_requests,
                             gen_throughput; mean cache_hit_rate; counts
                             ranks_healthy, ranks_stale, ranks_unreachable

Both utilizations and rps_fractional are always > 0, so both grpc-js and C-core
compute a weight from every report.

Not behind an API key: clients open this stream on the subchannel itself,
without the per-call credentials of their own calls (grpc-js uses an insecure
call with no metadata). Protect the port with TLS if the loads are sensitive.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from xds.data.orca.v3 import orca_load_report_pb2
from xds.service.orca.v3 import orca_pb2

from loadsvc.core.schema import LoadSnapshot, Status
from loadsvc.core.store import LoadStore, View, finite_mean
from loadsvc.surfaces.grpc import DEFAULT_MAX_STREAMS

__all__ = [
    "add_orca_service",
    "OrcaService",
    "report",
    "ORCA_SERVICE",
    "MIN_REPORT_INTERVAL",
    "DEFAULT_REPORT_INTERVAL",
    "UTILIZATION_FLOOR",
    "RPS_FLOOR",
    "TOKENS_PER_REQUEST",
]

log = logging.getLogger("loadsvc.surfaces.orca")

ORCA_SERVICE = orca_pb2.DESCRIPTOR.services_by_name["OpenRcaService"].full_name
MIN_REPORT_INTERVAL = 0.1  # seconds; shorter requested intervals are raised to this
DEFAULT_REPORT_INTERVAL = 1.0  # seconds, when the request leaves report_interval unset or 0
UTILIZATION_FLOOR = 0.01  # an idle server still reports a positive utilization
RPS_FLOOR = 1.0  # requests/s credited to each healthy or stale rank, at least
TOKENS_PER_REQUEST = 256.0  # tokens per request assumed when turning gen_throughput into rps

OrcaLoadReport = orca_load_report_pb2.OrcaLoadReport
OrcaLoadReportRequest = orca_pb2.OrcaLoadReportRequest

_LARGEST = sys.float_info.max
_SUMMED = ("num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
           "num_total_tokens", "num_waiting_uncached_tokens", "max_total_num_tokens",
           "max_running_requests", "gen_throughput")


def rank_utilization(snap: LoadSnapshot) -> float:
    """u of one healthy rank (module docstring): busy in [0, 1] plus a waiting-queue term in [0, 1]."""
    cap = snap.max_running_requests
    running = snap.num_running_reqs / cap if cap > 0 else 0.0
    busy = min(1.0, max(0.0, snap.token_usage, running, snap.utilization))
    queue = min(1.0, max(0, snap.num_waiting_reqs) / max(cap, 1))
    return busy + queue


def report(view: View, ranks: Sequence[int] | None = None) -> Any:
    """The OrcaLoadReport for ``ranks`` (None: every rank of the region) in ``view``."""
    by_rank = {s.dp_rank: s for s in view.snapshots}
    wanted = range(view.dp_size) if ranks is None else ranks
    healthy: list[LoadSnapshot] = []
    stale = unreachable = 0
    for rank in wanted:
        snap = by_rank.get(rank)
        status = snap.status if snap is not None else Status.UNREACHABLE
        if snap is not None and status is Status.HEALTHY:
            healthy.append(snap)
        elif status is Status.STALE:
            stale += 1
        else:
            unreachable += 1

    counted = len(healthy) + stale
    if counted:
        app = sum(rank_utilization(s) for s in healthy) + 1.0 * stale
        app = max(UTILIZATION_FLOOR, app / counted)
    else:
        app = 1.0
    # Every number of a served snapshot is finite and >= 0 (the schema's value rule);
    # sums and means are kept finite too, so no report carries inf or NaN.
    sums = {name: min(sum(getattr(s, name) for s in healthy), _LARGEST) for name in _SUMMED}
    rps = max(RPS_FLOOR * max(counted, 1), sums["gen_throughput"] / TOKENS_PER_REQUEST)
    token_usage = finite_mean([s.token_usage for s in healthy])
    cap = sums["max_running_requests"]
    utilization = {
        "token_usage": token_usage,
        "utilization": finite_mean([s.utilization for s in healthy]),
        "running": sums["num_running_reqs"] / cap if cap > 0 else 0.0,
    }
    named = {name: float(value) for name, value in sums.items()}
    named["cache_hit_rate"] = finite_mean([s.cache_hit_rate for s in healthy])
    named["ranks_healthy"] = float(len(healthy))
    named["ranks_stale"] = float(stale)
    named["ranks_unreachable"] = float(unreachable)
    return OrcaLoadReport(
        application_utilization=app,
        cpu_utilization=app,
        mem_utilization=token_usage,
        rps_fractional=rps,
        eps=0.0,
        utilization=utilization,
        named_metrics=named,
    )


class OrcaService:
    """StreamCoreMetrics over one store, for one set of ranks (what add_orca_service registers)."""

    def __init__(self, store: LoadStore, *, ranks: Sequence[int] | None = None,
                 min_report_interval: float = MIN_REPORT_INTERVAL,
                 max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if not min_report_interval > 0:
            raise ValueError(f"min_report_interval must be > 0 seconds, got {min_report_interval}")
        if ranks is not None:
            ranks = tuple(sorted(set(ranks)))
            if not ranks or min(ranks) < 0:
                raise ValueError(f"ranks must be non-negative rank numbers (or None for all), got {ranks}")
        self.store = store
        self.ranks: tuple[int, ...] | None = ranks
        self.min_report_interval = float(min_report_interval)
        self.streams = 0  # StreamCoreMetrics calls currently open
        self.calls = 0  # StreamCoreMetrics calls since the start
        self.max_streams = max_streams
        self.refused_streams = 0  # calls refused because max_streams were open
        self._refused_logged = -10.0
        self._key = ("orca", self.ranks)
        self._closed = False
        self._sleepers: set[asyncio.Future[None]] = set()

    def interval(self, request: Any) -> float:
        """Seconds between reports for a request: its report_interval, defaulted and clamped."""
        seconds = 0.0
        if request.HasField("report_interval"):
            d = request.report_interval
            seconds = d.seconds + d.nanos / 1e9
        if seconds <= 0:
            seconds = DEFAULT_REPORT_INTERVAL
        return max(seconds, self.min_report_interval)

    def current(self) -> bytes:
        """The serialized report for the store's current View (encoded once per View)."""
        ranks = self.ranks

        def build(view: View) -> bytes:
            data: bytes = report(view, ranks).SerializeToString()  # (xds-protos has no types)
            return data

        return self.store.view().encoded(self._key, build)

    async def stream_core_metrics(self, data: bytes,
                                  context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        try:
            request = OrcaLoadReportRequest.FromString(data)
        except Exception as e:  # DecodeError; the client learns what it sent wrong
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid {OrcaLoadReportRequest.DESCRIPTOR.full_name} "
                                f"message ({e})")
        interval = self.interval(request)
        loop = asyncio.get_running_loop()
        if self.streams >= self.max_streams:  # open to anyone (no API key): bounded here
            self.refused_streams += 1
            if loop.time() - self._refused_logged >= 10.0:
                self._refused_logged = loop.time()
                log.warning("refused a StreamCoreMetrics stream from %s: %d open, the limit "
                            "(--max-streams); %d refused so far", context.peer(), self.streams,
                            self.refused_streams)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"StreamCoreMetrics: {self.streams} streams open, this server's limit "
                                "(--max-streams); retry later")
        self.calls += 1
        self.streams += 1
        log.debug("StreamCoreMetrics from %s every %.3f s", context.peer(), interval)
        try:
            due = loop.time()
            while not self._closed:
                yield self.current()
                due += interval
                now = loop.time()
                if due < now:  # the client read slowly: skip the missed ticks, never burst
                    due = now + interval
                await self._sleep(loop, due - now)
        finally:
            self.streams -= 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "loadsvc is shutting down; reconnect")

    async def _sleep(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Sleep, or less when close() is called: one future per stream, no task."""
        fut: asyncio.Future[None] = loop.create_future()
        self._sleepers.add(fut)
        handle = loop.call_later(seconds, _resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    def close(self) -> None:
        """End every open stream with UNAVAILABLE now (a server stop would wait out its grace)."""
        self._closed = True
        sleepers, self._sleepers = self._sleepers, set()
        for fut in sleepers:
            _resolve(fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def add_orca_service(server: grpc.aio.Server, store: LoadStore, *,
                     ranks: Sequence[int] | None = None,
                     min_report_interval: float = MIN_REPORT_INTERVAL,
                     max_streams: int = DEFAULT_MAX_STREAMS) -> OrcaService:
    """Serve ``xds.service.orca.v3.OpenRcaService/StreamCoreMetrics`` on ``server`` (before it starts).

    ranks: the ranks this server reports for (None: every rank of the region).
    min_report_interval: seconds; a client asking for reports more often gets
    them this often. max_streams: streams open at once (the service needs no API
    key, so this is what bounds them); one more is RESOURCE_EXHAUSTED. Returns the
    OrcaService (its ``streams`` count is handy in tests and metrics).
    """
    service = OrcaService(store, ranks=ranks, min_report_interval=min_report_interval,
                          max_streams=max_streams)
    # Identity serializers: the handler yields the bytes memoized per View.
    methods: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "StreamCoreMetrics": grpc.unary_stream_rpc_method_handler(service.stream_core_metrics)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ORCA_SERVICE, methods),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(ORCA_SERVICE, methods)
    return service
