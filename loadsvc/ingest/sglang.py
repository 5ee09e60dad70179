"""SGLang's per-scheduler load stream into the region: subscribe, check, map, write.

    SGLang scheduler r                          loadsvc serve: SglangSubscriber (a thread of its own)
    (--load-publish-endpoint auto|ADDR)         SUB per endpoint: --sglang-endpoint ENDPOINT=RANK, or
    PUB tcp://*:base+r, HWM 8   --frames-->     base and dp_size from --sglang-server URL's /server_info
                                                  decode_frame: parts, topic, seq, msgpack, types, ranges
                                                  sequence rules per endpoint (incarnations)
                                                  at most --sglang-max-rate writes/s per endpoint
                                                  to_snapshot -> RegionWriter.write(rank) -> region

Wire format, as SGLang 0.5.23 sends it (python/sglang/srt/managers/scheduler_components/
load_publisher.py: ``LoadStat``, ``SchedulerLoadPublisher.publish_load_stat``; the socket
came with SGLang PR #34608). One ZMQ message of three parts:

    part 0  b"load"                       the topic (/server_info's kv_events.load_topic)
    part 1  8 bytes, big-endian int64     sequence: 0, 1, 2, ... per scheduler process
    part 2  msgpack array (tagged, array_like msgspec Struct):
            ["LoadStat", num_running_reqs, num_waiting_reqs, num_tokens, max_total_num_tokens,
             attn_dp_rank, num_waiting_uncached_tokens, num_total_tokens, max_running_requests,
             total_prefill_uncached_tokens, total_prefill_busy_us]

The first six positions are the prefix every version since #34608 sends (its
``attn_dp_rank`` may be nil); later versions append positions, which older
readers ignore: positions beyond the tenth are accepted and ignored here too.
SGLang sends a changed stat at once and re-sends an unchanged one at least every
``LOAD_PUBLISH_HEARTBEAT_S`` = 1 s; its PUB high-water mark is 8, so a slow
subscriber loses frames, never the latest state for long (a gauge).

Discovery: SGLang's ``/server_info`` carries ``kv_events.load_endpoint_port_base``
and ``kv_events.dp_size`` when the server runs with ``--kv-events-config`` (a tcp
endpoint) and ``--load-publish-endpoint``; rank r publishes on port base + r of the
server URL's host (SGLang: subscribers use the worker URL's host, the advertised
host may be a wildcard).

Mapping (LoadStat -> LoadSnapshot; the region rank is the endpoint's, never the payload's):

    num_running_reqs             -> num_running_reqs
    num_waiting_reqs             -> num_waiting_reqs
    running + waiting            -> num_total_reqs
    num_tokens                   -> num_used_tokens
    max_total_num_tokens         -> max_total_num_tokens
    num_tokens / max_total       -> token_usage (0 when the capacity is 0, at most 1)
    num_waiting_uncached_tokens  -> num_waiting_uncached_tokens (0 before it was appended)
    num_total_tokens             -> num_total_tokens
    max_running_requests         -> max_running_requests
    running / max_running        -> utilization (0 when the limit is not sent)
    attn_dp_rank                 informational (SGLang's router keys by socket, as here)
    total_prefill_*              cumulative counters; no snapshot field carries them
    gen_throughput, cache_hit_rate: not in the stream (0)

Rules per endpoint (one SUB socket, one region rank):

- Every frame is checked before anything else happens: three parts, the topic,
  an 8-byte sequence >= 0, a msgpack array tagged "LoadStat" of at least six
  positions, integers >= 0 within the field's range where an integer belongs
  (attn_dp_rank may be nil). Anything else is refused, counted per reason in
  ``loadsvc_sglang_frames_rejected_total{reason}`` and logged (one line per
  reason per 10 s); the subscriber never stops for it.
- Order: on one connection ZMQ delivers in order, so a frame must carry a
  sequence after the last accepted (else ``stale_seq``); gaps are frames the
  publisher's high-water mark dropped (``loadsvc_sglang_frames_lost_total``).
  The first frame after a (re)connection, or a sequence back at 0, starts a new
  incarnation: a restarted scheduler, accepted whatever its sequence, with a new
  epoch in the snapshot.
- Rate: at most ``--sglang-max-rate`` writes per second per endpoint; a frame
  arriving sooner waits and is written when its turn comes unless a newer one
  replaces it first (the replaced one counts as ``rate_limited``).
- Freshness: each write is stamped with the receive time, so SGLang's 1 s
  heartbeat keeps a rank healthy and a scheduler that stops turns stale after
  ``--stale-after``, then unreachable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from loadsvc.core.rejects import Rejects
from loadsvc.core.schema import LoadSnapshot
from loadsvc.core.writer import REGION_CHECK, WRITE_REASONS, RegionWriter, WriteRefused
from loadsvc.settings import StoreSettings

__all__ = [
    "SglangSubscriber",
    "SglangDiscovery",
    "Rejected",
    "decode_frame",
    "encode_frame",
    "to_snapshot",
    "parse_server_info",
    "LOAD_TOPIC",
    "LOADSTAT_FIELDS",
    "REJECT_REASONS",
    "SGLANG_VERSION",
]

log = logging.getLogger("loadsvc.ingest.sglang")

SGLANG_VERSION = "0.5.23"  # the release whose publisher this module reads (see the docstring)
LOAD_TOPIC = b"load"
LOADSTAT_TAG = "LoadStat"
LOADSTAT_FIELDS = ("num_running_reqs", "num_waiting_reqs", "num_tokens", "max_total_num_tokens",
                   "attn_dp_rank", "num_waiting_uncached_tokens", "num_total_tokens",
                   "max_running_requests", "total_prefill_uncached_tokens", "total_prefill_busy_us")
PREFIX_FIELDS = 5  # fields every publisher since #34608 sends (six positions with the tag)
_I32 = 2**31 - 1
_I64 = 2**63 - 1
# Largest value per field: what the snapshot field holding it can carry.
_FIELD_MAX = (_I32, _I32, _I32, _I32, _I32, _I32, _I64, _I32, _I64, _I64)
_ATTN_DP_RANK = 4

DEFAULT_MAX_RATE = 200.0  # writes per second per endpoint
DEFAULT_MAX_FRAME_BYTES = 4096  # per part; a LoadStat is about 40 bytes
RCVHWM = 64  # frames queued per endpoint in serve before ZMQ drops (a gauge: the latest matters)
HEARTBEAT_IVL_MS = 1000  # ZMTP heartbeats: a publisher gone without a FIN is noticed within ~3 s
HEARTBEAT_TIMEOUT_MS = 3000
BATCH = 256  # frames read from one endpoint before looking at the others
DISCOVERY_TIMEOUT = 2.0  # seconds per /server_info request
DISCOVERY_MAX_BYTES = 1 << 20  # a larger /server_info response is refused
DISCOVERY_REFRESH = 30.0  # seconds between looks at a server that answered
DISCOVERY_RETRY = (1.0, 10.0)  # seconds: first retry of a server that did not answer, doubling to

REJECT_REASONS: dict[str, str] = {
    "oversized": "a part larger than --sglang-max-frame-bytes",
    "malformed": "not a three-part message",
    "bad_topic": "first part is not b'load'",
    "bad_seq": "second part is not an 8-byte big-endian sequence >= 0",
    "decode": "third part is not msgpack",
    "bad_shape": "payload is not an array ['LoadStat', ...] of at least six positions",
    "bad_type": "an integer position holds something else (attn_dp_rank: an integer or nil)",
    "non_finite": "NaN or infinity where an integer belongs",
    "out_of_range": "a negative number, or one beyond what the snapshot field holds (int32 counts)",
    "stale_seq": "sequence not after the last accepted on the same connection",
    "rate_limited": "replaced by a newer frame of the same rank before its turn (--sglang-max-rate)",
    **WRITE_REASONS,
    "internal_error": "an unexpected error while handling the frame (logged with its traceback)",
}


class Rejected(Exception):
    """A frame refused; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# -- the wire ------------------------------------------------------------------------------

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def encode_frame(seq: int, num_running_reqs: int, num_waiting_reqs: int, num_tokens: int,
                 max_total_num_tokens: int, attn_dp_rank: int | None = None, *appended: Any,
                 prefix_only: bool = False) -> list[bytes]:
    """The three parts SGLang's SchedulerLoadPublisher sends for these values.

    appended: positions after attn_dp_rank (num_waiting_uncached_tokens, ...); SGLang
    0.5.23 always sends all ten fields, missing ones as 0 (``prefix_only=True``: the
    six-position shape of #34608). Tests and ``loadsvc bench ingest`` publish with it;
    tests/test_ingest_sglang.py checks it byte for byte against SGLang's own encoding.
    """
    values: list[Any] = [num_running_reqs, num_waiting_reqs, num_tokens, max_total_num_tokens,
                         attn_dp_rank, *appended]
    if not prefix_only:
        values += [0] * (len(LOADSTAT_FIELDS) - len(values))
    return [LOAD_TOPIC, seq.to_bytes(8, "big"), _encode([LOADSTAT_TAG, *values])]


def decode_frame(parts: Sequence[bytes], max_part_bytes: int = DEFAULT_MAX_FRAME_BYTES
                 ) -> tuple[int, tuple[int, ...]]:
    """(sequence, the ten LoadStat fields with absent ones 0 and attn_dp_rank -1 for nil).

    Raises Rejected naming the reason and what was wrong; never anything else for bad input.
    """
    if len(parts) != 3:
        raise Rejected("malformed", f"message of {len(parts)} parts, expected 3 (topic, sequence, LoadStat)")
    for part in parts:
        if len(part) > max_part_bytes:
            raise Rejected("oversized", f"a part of {len(part)} bytes, limit {max_part_bytes} "
                                        "(--sglang-max-frame-bytes)")
    topic, seq_bytes, payload = parts
    if bytes(topic) != LOAD_TOPIC:
        raise Rejected("bad_topic", f"topic {bytes(topic)[:32]!r}, expected {LOAD_TOPIC!r}")
    if len(seq_bytes) != 8:
        raise Rejected("bad_seq", f"sequence part of {len(seq_bytes)} bytes, expected 8")
    seq = int.from_bytes(seq_bytes, "big", signed=True)
    if seq < 0:
        raise Rejected("bad_seq", f"negative sequence {seq}")
    try:
        stat = _decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError) as e:
        raise Rejected("decode", f"payload is not msgpack: {e}") from None
    if not isinstance(stat, list) or len(stat) < 1 + PREFIX_FIELDS or stat[0] != LOADSTAT_TAG:
        shape = (f"an array of {len(stat)} starting with {stat[0]!r:.40}" if isinstance(stat, list) and stat
                 else type(stat).__name__)
        raise Rejected("bad_shape", f"payload is {shape}; expected ['LoadStat', ...] of at least "
                                    f"{1 + PREFIX_FIELDS} positions")
    values = []
    for i, name in enumerate(LOADSTAT_FIELDS):
        v = stat[i + 1] if i + 1 < len(stat) else 0
        if v is None and i == _ATTN_DP_RANK:
            values.append(-1)
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise Rejected("non_finite", f"{name} is {v}")
        if not isinstance(v, int) or isinstance(v, bool):
            raise Rejected("bad_type", f"{name} is {type(v).__name__} {v!r:.40}, expected an integer")
        if not 0 <= v <= _FIELD_MAX[i]:
            raise Rejected("out_of_range", f"{name} is {v}, expected 0..{_FIELD_MAX[i]}")
        values.append(v)
    return seq, tuple(values)


def to_snapshot(rank: int, values: Sequence[int], epoch: int = 0) -> Any:
    """The LoadSnapshot of region rank ``rank`` from decode_frame's fields (mapping: module docstring)."""
    running, waiting, tokens, capacity, _, uncached, total_tokens, max_running = values[:8]
    return LoadSnapshot(
        dp_rank=rank,
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        num_total_reqs=min(_I32, running + waiting),
        num_used_tokens=tokens,
        max_total_num_tokens=capacity,
        token_usage=min(1.0, tokens / capacity) if capacity else 0.0,
        utilization=min(1.0, running / max_running) if max_running else 0.0,
        max_running_requests=max_running,
        num_waiting_uncached_tokens=uncached,
        num_total_tokens=total_tokens,
        epoch=epoch,
    )


# -- the subscriber ------------------------------------------------------------------------


class _Endpoint:
    """One SUB socket: the publisher's address, the region rank it fills, its sequence state."""

    __slots__ = ("address", "rank", "source", "sock", "monitor", "seq", "reconnected", "epoch",
                 "connected", "last_write", "pending")

    def __init__(self, address: str, rank: int, source: str) -> None:
        self.address = address
        self.rank = rank
        self.source = source  # "--sglang-endpoint", or the server URL it was discovered from
        self.sock: zmq.Socket[bytes] | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        self.seq = -1  # last accepted sequence; -1: none yet
        self.reconnected = True  # the next frame starts an incarnation
        self.epoch = 0
        self.connected = False
        self.last_write = -math.inf  # monotonic time of the last write
        self.pending: tuple[Any, int] | None = None  # (snapshot, received_ns) waiting for its turn


@dataclass(frozen=True)
class SglangEndpoint:
    """An SGLang scheduler's load socket and the region rank it fills."""

    address: str  # tcp://host:port (what the subscriber connects to)
    rank: int


class SglangSubscriber:
    """Subscribes to SGLang load sockets in a thread of its own and writes each into its rank.

    ``SglangSubscriber(store_settings, endpoints, registry=...)``; ``start()`` /
    ``stop()`` (or as a context manager). ``set_endpoints(source, endpoints)``
    replaces the endpoints of one source (a discovered server) from any thread.
    ``on_write`` is called from the thread after each batch that wrote something
    (serve passes one that wakes its store). Counters go to ``registry``
    (prometheus_client): ``loadsvc_sglang_frames_accepted_total``,
    ``loadsvc_sglang_frames_rejected_total{reason}``, ``loadsvc_sglang_frames_lost_total``,
    ``loadsvc_sglang_incarnations_total``, ``loadsvc_sglang_endpoints{state}``.
    """

    def __init__(self, store: StoreSettings, endpoints: Sequence[SglangEndpoint] = (), *,
                 registry: Any = None, max_rate: float = DEFAULT_MAX_RATE,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, max_endpoints: int = 256,
                 on_write: Callable[[], object] | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        if not max_rate > 0:
            raise ValueError(f"max_rate must be > 0 writes per second, got {max_rate}")
        if len(endpoints) > max_endpoints:
            raise ValueError(f"{len(endpoints)} SGLang endpoints, more than the limit of {max_endpoints} "
                             "(--ingest-max-endpoints)")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.writer = RegionWriter(store.shm, dp_size=store.dp_size, mode=store.region_mode)
        self.min_interval = 1.0 / max_rate
        self.max_frame_bytes = max_frame_bytes
        self.max_endpoints = max_endpoints
        self._on_write = on_write
        self._clock = clock
        self._accepted_metric = Counter("loadsvc_sglang_frames_accepted",
                                        "SGLang load frames written into the region", registry=self.registry)
        self._lost_metric = Counter("loadsvc_sglang_frames_lost",
                                    "SGLang load frames never received (sequence gaps: the publisher's "
                                    "high-water mark dropped them)", registry=self.registry)
        self._incarnation_metric = Counter("loadsvc_sglang_incarnations",
                                           "SGLang publisher incarnations seen (first frames, restarts)",
                                           registry=self.registry)
        endpoints_gauge = Gauge("loadsvc_sglang_endpoints", "SGLang load sockets subscribed to",
                                ["state"], registry=self.registry)
        self._connected_gauge = endpoints_gauge.labels(state="connected")
        self._total_gauge = endpoints_gauge.labels(state="configured")
        self.reject = Rejects(Counter("loadsvc_sglang_frames_rejected",
                                      "SGLang load frames refused, per reason", ["reason"],
                                      registry=self.registry),
                              REJECT_REASONS, "SGLang load frame", log)
        self.accepted = 0
        self.lost = 0
        self._sources: dict[str, list[SglangEndpoint]] = {}
        if endpoints:
            self._sources["--sglang-endpoint"] = list(endpoints)
        self._changes: queue.SimpleQueue[tuple[str, list[SglangEndpoint]]] = queue.SimpleQueue()
        self._endpoints: dict[str, _Endpoint] = {}
        self._by_socket: dict[zmq.Socket[bytes], _Endpoint] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="loadsvc-sglang", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("SGLang subscriber thread did not stop within %.1f s", timeout)
        self._thread = None

    def __enter__(self) -> SglangSubscriber:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_endpoints(self, source: str, endpoints: Sequence[SglangEndpoint]) -> None:
        """Replace the endpoints of source (thread-safe; applied within 100 ms)."""
        self._changes.put((source, list(endpoints)))

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context()
        poller = zmq.Poller()
        next_region_check = time.monotonic() + REGION_CHECK
        try:
            self._apply(ctx, poller)
            while not self._stopping.is_set():
                try:
                    if not self._changes.empty():
                        self._apply(ctx, poller)
                    events = dict(poller.poll(self._poll_timeout_ms()))
                    wrote = False
                    for sock in events:
                        owner = self._by_socket.get(sock)
                        if owner is None:
                            continue  # an endpoint closed meanwhile
                        # Its monitor first, even when only the data socket woke us: a connection's
                        # event is queued before that connection's first frame.
                        self._drain_monitor(owner)
                        data = owner.sock
                        if data is None or sock is not data:
                            continue
                        for _ in range(BATCH):
                            try:
                                parts = data.recv_multipart(zmq.NOBLOCK, copy=True)
                            except zmq.Again:
                                break
                            wrote |= self.handle(owner, parts, self._clock())
                    wrote |= self._flush_due()
                    if wrote and self._on_write is not None:
                        self._on_write()
                    now = time.monotonic()
                    if now >= next_region_check:
                        next_region_check = now + REGION_CHECK
                        self.writer.check_region()
                except Exception as e:  # not bad input (handle() survives that): keep subscribing
                    self.reject("internal_error", f"subscriber loop: {type(e).__name__}: {e}", exc_info=True)
                    time.sleep(0.1)
        finally:
            for ep in list(self._endpoints.values()):
                self._close_endpoint(ep, poller)
            ctx.term()
            self.writer.close()

    def _poll_timeout_ms(self) -> int:
        due = [ep.last_write + self.min_interval for ep in self._endpoints.values() if ep.pending]
        if not due:
            return 100
        return max(0, min(100, math.ceil((min(due) - time.monotonic()) * 1000)))

    def _apply(self, ctx: zmq.Context[zmq.Socket[bytes]], poller: zmq.Poller) -> None:
        """Open and close sockets so they match every source's endpoints."""
        while True:
            try:
                source, endpoints = self._changes.get_nowait()
            except queue.Empty:
                break
            self._sources[source] = endpoints
        wanted: dict[str, SglangEndpoint] = {}
        for source, endpoints in self._sources.items():
            for e in endpoints:
                if e.address in wanted:
                    continue
                if len(wanted) >= self.max_endpoints:
                    log.error("SGLang endpoint %s (rank %d, from %s) not subscribed: already %d endpoints, "
                              "the limit (--ingest-max-endpoints)", e.address, e.rank, source, len(wanted))
                    continue
                wanted[e.address] = e
        for address, ep in list(self._endpoints.items()):
            keep = wanted.get(address)
            if keep is None or keep.rank != ep.rank:
                self._close_endpoint(ep, poller)
        for address, e in wanted.items():
            if address not in self._endpoints:
                source = next(s for s, eps in self._sources.items() if e in eps)
                self._open_endpoint(ctx, poller, _Endpoint(address, e.rank, source))
        self._total_gauge.set(len(self._endpoints))

    def _open_endpoint(self, ctx: zmq.Context[zmq.Socket[bytes]], poller: zmq.Poller, ep: _Endpoint) -> None:
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, RCVHWM)
            # ZMQ drops a peer announcing a part beyond twice the limit before buffering it;
            # parts between the limit and that are counted as oversized.
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_frame_bytes)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
            sock.setsockopt(zmq.SUBSCRIBE, LOAD_TOPIC)
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(ep.address)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            log.error("cannot subscribe to SGLang endpoint %r (rank %d, from %s): %s", ep.address, ep.rank,
                      ep.source, e)
            return
        ep.sock, ep.monitor = sock, monitor
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self._endpoints[ep.address] = ep
        self._by_socket[sock] = ep
        self._by_socket[monitor] = ep
        log.info("subscribed to SGLang load socket %s as dp_rank %d (%s)", ep.address, ep.rank, ep.source)

    def _close_endpoint(self, ep: _Endpoint, poller: zmq.Poller) -> None:
        if ep.sock is not None:
            poller.unregister(ep.sock)
            self._by_socket.pop(ep.sock, None)
            ep.sock.disable_monitor()
            ep.sock.close(linger=0)
        if ep.monitor is not None:
            poller.unregister(ep.monitor)
            self._by_socket.pop(ep.monitor, None)
            ep.monitor.close(linger=0)
        if ep.connected:
            self._connected_gauge.dec()
        ep.sock = ep.monitor = None
        self._endpoints.pop(ep.address, None)

    def _drain_monitor(self, ep: _Endpoint) -> None:
        if ep.monitor is None:
            return
        while True:
            try:
                event = recv_monitor_message(ep.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_CONNECTED:
                ep.reconnected = True
                if not ep.connected:
                    ep.connected = True
                    self._connected_gauge.inc()
            elif event == zmq.EVENT_DISCONNECTED and ep.connected:
                ep.connected = False
                self._connected_gauge.dec()

    # -- frames ---------------------------------------------------------------------------

    def handle(self, ep: _Endpoint, parts: Sequence[bytes], received_ns: int) -> bool:
        """Check one message of ep and write it (now or at its turn); True if written now."""
        try:
            seq, values = decode_frame(parts, self.max_frame_bytes)
            if ep.reconnected or seq == 0 or ep.seq < 0:
                if ep.seq >= 0:
                    log.info("SGLang endpoint %s (dp_rank %d): new publisher incarnation (sequence %d, "
                             "the last was %d)", ep.address, ep.rank, seq, ep.seq)
                ep.reconnected = False
                ep.epoch = secrets.randbits(63) | 1
                self._incarnation_metric.inc()
            elif seq <= ep.seq:
                raise Rejected("stale_seq", f"sequence {seq} not after {ep.seq} on the same connection")
            elif seq > ep.seq + 1:
                self.lost += seq - ep.seq - 1
                self._lost_metric.inc(seq - ep.seq - 1)
            ep.seq = seq
            snapshot = to_snapshot(ep.rank, values, ep.epoch)
        except Rejected as r:
            self.reject(r.reason, f"{ep.address} (dp_rank {ep.rank}): {r}")
            return False
        except Exception as e:  # a bug, not bad input: counted, logged, survived
            self.reject("internal_error", f"{type(e).__name__}: {e}", exc_info=True)
            return False
        if ep.pending is not None:
            self.reject("rate_limited", f"dp_rank {ep.rank} ({ep.address}): a frame replaced before its "
                                        f"turn (at most {1 / self.min_interval:g} writes/s, --sglang-max-rate)")
        if time.monotonic() - ep.last_write >= self.min_interval:
            ep.pending = None
            return self._write(ep, snapshot, received_ns)
        ep.pending = (snapshot, received_ns)
        return False

    def _flush_due(self) -> bool:
        wrote = False
        now = time.monotonic()
        for ep in self._endpoints.values():
            if ep.pending is not None and now - ep.last_write >= self.min_interval:
                snapshot, received_ns = ep.pending
                ep.pending = None
                wrote |= self._write(ep, snapshot, received_ns)
        return wrote

    def _write(self, ep: _Endpoint, snapshot: Any, received_ns: int) -> bool:
        ep.last_write = time.monotonic()
        try:
            self.writer.write(ep.rank, snapshot, received_ns)
        except WriteRefused as r:
            self.reject(r.reason, f"{ep.address}: {r}")
            return False
        except Exception as e:
            self.reject("internal_error", f"{type(e).__name__}: {e}", exc_info=True)
            return False
        self.accepted += 1
        self._accepted_metric.inc()
        return True


# -- discovery ------------------------------------------------------------------------------


class DiscoveryError(Exception):
    """/server_info did not name a load range; ``reason`` says why, the message what to do."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


DISCOVERY_RESULTS = {
    "ok": "found the load range",
    "unreachable": "no answer, or not HTTP 200, within the timeout",
    "too_large": f"response larger than {DISCOVERY_MAX_BYTES} bytes",
    "bad_response": "not JSON, or kv_events fields of the wrong type",
    "no_load_publisher": "the server publishes no load (no kv_events.load_endpoint_port_base)",
}


def parse_server_info(url: str, info: Any, *, first_rank: int = 0, max_dp_size: int = 4096
                      ) -> list[SglangEndpoint]:
    """The load endpoints an SGLang /server_info names: tcp://URL's host:base+r -> rank first_rank+r."""
    if not isinstance(info, dict):
        raise DiscoveryError("bad_response", f"{url}/server_info: expected a JSON object")
    kv = info.get("kv_events")
    if not isinstance(kv, dict) or "load_endpoint_port_base" not in kv:
        raise DiscoveryError("no_load_publisher", f"{url}/server_info has no kv_events.load_endpoint_port_base: "
                             "start SGLang with --kv-events-config (a tcp:// endpoint) and "
                             "--load-publish-endpoint auto")
    base, dp_size, topic = kv.get("load_endpoint_port_base"), kv.get("dp_size", 1), kv.get("load_topic", "load")
    if (not isinstance(base, int) or isinstance(base, bool) or not isinstance(dp_size, int)
            or isinstance(dp_size, bool) or not 1 <= dp_size <= max_dp_size
            or not 1 <= base <= 65535 - dp_size + 1):
        raise DiscoveryError("bad_response", f"{url}/server_info: load_endpoint_port_base {base!r} and dp_size "
                             f"{dp_size!r} do not make a port range (dp_size 1..{max_dp_size})")
    if topic != LOAD_TOPIC.decode():
        raise DiscoveryError("bad_response", f"{url}/server_info: load_topic {topic!r}, this loadsvc reads "
                             f"{LOAD_TOPIC.decode()!r}")
    host = urlsplit(url).hostname or ""
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return [SglangEndpoint(f"tcp://{host}:{base + r}", first_rank + r) for r in range(dp_size)]


class SglangDiscovery:
    """Finds each SGLang server's load sockets from its /server_info and hands them to the subscriber.

    Runs as an asyncio task in serve's loop (``await start()`` / ``await stop()``).
    A server that does not answer is asked again after 1 s, doubling to 10 s; one
    that answered is asked again every DISCOVERY_REFRESH s, and a changed range
    (a restart with another --load-publish-endpoint) replaces its endpoints. A
    server that stops answering keeps its endpoints (their ranks turn stale if it
    is gone). Results are counted in ``loadsvc_sglang_discoveries_total{result}``.
    """

    def __init__(self, subscriber: SglangSubscriber, servers: Sequence[tuple[str, int]], *,
                 registry: Any) -> None:
        from prometheus_client import Counter

        self.subscriber = subscriber
        self.servers = list(servers)
        counter = Counter("loadsvc_sglang_discoveries", "Looks at an SGLang server's /server_info, per result",
                          ["result"], registry=registry)
        self._results = {r: counter.labels(result=r) for r in DISCOVERY_RESULTS}
        self._tasks: list[asyncio.Task[None]] = []
        self._client: Any = None

    async def start(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(timeout=DISCOVERY_TIMEOUT, trust_env=False)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(url, rank), name=f"loadsvc-sglang-discovery-{url}")
                       for url, rank in self.servers]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def discover(self, url: str, first_rank: int) -> list[SglangEndpoint]:
        """One look at url's /server_info; DiscoveryError when it names no load range."""
        import httpx

        try:
            async with self._client.stream("GET", url.rstrip("/") + "/server_info") as response:
                if response.status_code != 200:
                    raise DiscoveryError("unreachable", f"{url}/server_info answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > DISCOVERY_MAX_BYTES:
                        raise DiscoveryError("too_large", f"{url}/server_info is larger than "
                                                          f"{DISCOVERY_MAX_BYTES} bytes; refused")
        except httpx.HTTPError as e:
            raise DiscoveryError("unreachable", f"{url}/server_info: {type(e).__name__}: {e}") from None
        try:
            info = msgspec.json.decode(body)
        except msgspec.DecodeError as e:
            raise DiscoveryError("bad_response", f"{url}/server_info is not JSON: {e}") from None
        return parse_server_info(url, info, first_rank=first_rank,
                                 max_dp_size=self.subscriber.max_endpoints)

    async def _watch(self, url: str, first_rank: int) -> None:
        retry = DISCOVERY_RETRY[0]
        current: list[SglangEndpoint] | None = None
        last_error = ""
        while True:
            try:
                found = await self.discover(url, first_rank)
            except DiscoveryError as e:
                self._results[e.reason].inc()
                if str(e) != last_error:  # once per distinct problem, not every retry
                    last_error = str(e)
                    log.warning("SGLang discovery: %s%s", e, "; keeping its current endpoints"
                                if current else f"; asking again in {retry:g} s, doubling to "
                                                f"{DISCOVERY_RETRY[1]:g} s")
                await asyncio.sleep(retry if current is None else DISCOVERY_REFRESH)
                retry = min(retry * 2, DISCOVERY_RETRY[1])
                continue
            self._results["ok"].inc()
            last_error = ""
            if found != current:
                log.info("SGLang discovery: %s publishes load on %s (dp_ranks %d..%d)", url,
                         ", ".join(e.address for e in found), found[0].rank, found[-1].rank)
                self.subscriber.set_endpoints(url, found)
                current = found
            retry = DISCOVERY_RETRY[0]
            await asyncio.sleep(DISCOVERY_REFRESH)
