"""The node-0 side of the relay: the Collector checks every frame, then writes it into the region.

    ZmqPublisher (other nodes) --frames--> Collector (PULL, bind, own thread)
                                             validate: size, header, fingerprint, dp_size,
                                             rank, decode, value rule, payload rank, epoch/seq
                                               | valid                     | invalid
                                               v                           v
                                   one writer per rank into the     counted per reason
                                   region (publish time = receive   (REJECT_REASONS), logged
                                   time)                            rate-limited, dropped

Ordering, per rank (the collector keeps the epoch, seq and receive time of the
last accepted frame, and the same for the epochs it has seen replaced):

- same epoch: accepted only if seq is larger (a replayed or reordered frame
  cannot move a rank backwards): otherwise ``stale_seq``; and only if seq is at
  most ``last + SEQ_RATE_CAP * seconds since the last accepted frame +
  SEQ_SLACK``: otherwise ``seq_jump``, refused and not adopted (one frame with
  seq 2**64-1 cannot block the epoch). SEQ_RATE_CAP (1,000,000/s) is beyond
  any publisher (a publish costs microseconds of encoding and sending); seq
  gaps come from frames the conflating socket dropped while the collector was
  away or slow, and grow at the publisher's rate with time. SEQ_SLACK (1,000)
  covers a backlog the collector drains back to back, where the gap arrives
  right after the previous frame; past it, the next frames are accepted as
  soon as the time since the last accepted frame covers the gap.
- an epoch never seen for that rank: a restarted publisher (its seq starts
  again at 1). Accepted at once; the previous epoch joins the rank's retired
  epochs.
- a retired epoch: ``old_epoch`` while the rank's current epoch is live (a
  frame accepted within ``stale_after``, the store's --stale-after). A delayed
  frame from before a restart, or a second publisher for the same rank, cannot
  flip a live rank back. Once the current epoch has been silent for longer than
  ``stale_after``, a retired epoch is accepted again (same seq rules against its
  own last accepted frame) and becomes current: a short-lived extra publisher,
  or a restarted one that died again, holds the rank only while it sends, and
  the publisher it displaced takes the rank back. Epochs carry no clock (a
  restarted rank may move to a node whose clock is behind), so "newer" means
  "seen later by this collector". The last RETIRED_EPOCHS epochs per rank are
  remembered; a collector restart forgets them (the first frame wins).

Freshness: a node that stops publishing turns its ranks stale after the store's
``stale_after`` and unreachable after ``unreachable_after`` (both measured from
the collector's receive time); its next frame (a new epoch if it restarted)
makes them healthy again, without restarting serve.

Threading: the collector runs its ZMQ socket in a thread of its own, so a busy
serving event loop (hundreds of WatchLoads subscribers, REST under load) never
delays writes into the region, and a region write never stalls the loop. The
serving process drives it with ``await start()`` / ``await stop()``; scripts
and tests may use it as a context manager. (Measured with `loadsvc bench relay`
on 2 cores: the same collector on a zmq.asyncio socket inside serve's loop
saturated the loop at 800 frames/s and the streams fell seconds behind; the
thread adds about 15 us of work per frame.)

Authentication: with ``CollectorSettings.curve`` the socket is a CURVE server and
pyzmq's ZAP authenticator admits only public certificates found in
``authorized_dir`` (re-read when the directory changes). A refused handshake is
counted as reason ``unauthorized``; such a peer never delivers a frame (it
retries every HANDSHAKE_RETRY seconds, so a key authorized later gets in). Without
CURVE the relay is open to anyone who can reach the port: use CURVE on any
shared network.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Self

import msgspec
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from loadsvc.core import schema
from loadsvc.core.rejects import LogLimiter, Rejects
from loadsvc.core.schema import LoadSnapshot
from loadsvc.core.writer import REGION_CHECK, RegionWriter, WriteRefused
from loadsvc.relay.frame import (
    FRAME_HEADER,
    FRAME_MAGIC,
    FRAME_VERSION,
    HANDSHAKE_FAILED_EVENTS,
    set_heartbeats,
)
from loadsvc.relay.keys import load_secret
from loadsvc.settings import CollectorSettings, CurveServerSettings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from zmq.auth.thread import ThreadAuthenticator

__all__ = ["Collector", "REJECT_REASONS"]

log = logging.getLogger("loadsvc.relay")

RETIRED_EPOCHS = 16  # replaced incarnations remembered per rank
SEQ_RATE_CAP = 1_000_000  # publishes per second no publisher reaches: bounds a seq jump
SEQ_SLACK = 1_000  # seq jump allowed on top of SEQ_RATE_CAP * elapsed (a backlog drained at once)
AUTH_RELOAD = 2.0  # seconds between looks at the authorized directory
# Collector socket bounds: frames queued per connection (each at most twice
# --max-frame-bytes: about 2 MiB per connection by default), and how long a
# connection may take to complete its handshake before it is dropped (ZMQ: 30 s).
RCVHWM = 16
HANDSHAKE_IVL_MS = 5000

REJECT_REASONS: dict[str, str] = {
    "oversized": "frame larger than --max-frame-bytes",
    "malformed": "not a single-part message",
    "short": "shorter than the frame header",
    "bad_magic": "does not start with the relay's magic bytes",
    "bad_version": "frame version this collector does not read",
    "fingerprint": "schema fingerprint differs (publisher runs another LoadSnapshot schema)",
    "bad_header": "epoch or seq is 0",
    "dp_size_mismatch": "publisher's dp_size differs from the region's",
    "rank_out_of_range": "dp_rank outside the region's dp_size",
    "decode": "payload does not decode as a LoadSnapshot",
    "bad_value": "a number negative, NaN, infinite or beyond its protobuf type (the schema's value rule)",
    "rank_mismatch": "payload's dp_rank differs from the header's",
    "stale_seq": "seq not newer than the last accepted for that rank and epoch (replay, reorder)",
    "seq_jump": "seq further ahead of the last accepted than any publisher could have got since",
    "old_epoch": "epoch of a replaced publisher incarnation, while the current one is live",
    "no_region": "no region yet and no --dp-size to create one",
    "rank_owned": "a local publisher owns that rank",
    "slot_overflow": "snapshot larger than the region's slot",
    "region_error": "the region could not be opened for writing",
    "unauthorized": "CURVE handshake refused: key not in the authorized directory (per attempt)",
    "handshake_failed": "handshake failed (wrong server key, or CURVE on one side only; per attempt)",
    "no_handshake": "a connection ended or timed out in the handshake with no error seen here: port scans, "
                    "TCP health checks (and some attempts of a one-sided CURVE publisher)",
    "internal_error": "an unexpected error while handling the frame (logged with its traceback)",
}


class _RankState:
    """Ordering of one rank: the current epoch's last accepted (seq, time), and the retired ones'."""

    __slots__ = ("epoch", "seq", "at", "retired")

    def __init__(self, epoch: int, seq: int, at: float) -> None:
        self.epoch = epoch
        self.seq = seq
        self.at = at  # time.monotonic() when the last frame of this epoch was accepted
        # epoch -> (seq, at) of its last accepted frame, oldest first
        self.retired: collections.OrderedDict[int, tuple[int, float]] = collections.OrderedDict()

    def switch_to(self, epoch: int) -> None:
        """Make epoch current (new, or a retired one back); the current one retires."""
        self.retired.pop(epoch, None)
        self.retired[self.epoch] = (self.seq, self.at)
        if len(self.retired) > RETIRED_EPOCHS:
            self.retired.popitem(last=False)
        self.epoch = epoch


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Collector:
    """PULL side of the relay: validates every frame, then writes it into the node's region.

    ``Collector(settings, registry)``: binds ``settings.endpoint``,
    writes into ``settings.shm`` and registers its counters
    (``loadsvc_relay_frames_accepted_total``,
    ``loadsvc_relay_frames_rejected_total{reason}``) in the given
    prometheus_client registry. ``await start()`` raises if the endpoint
    cannot be bound or the CURVE files are unusable; ``await stop()`` closes
    everything. ``on_write`` is called from the collector thread once per batch
    of frames written; serve passes one that wakes its store
    (``loop.call_soon_threadsafe(store.poll)``), so a relayed rank is on the
    streams without waiting for the store's next poll (measured: p50
    publish-to-visible 2.1 -> 1.3 ms). The collector never dies of bad input: every frame that fails a
    check is counted, logged (at most one line per reason per LOG_EVERY
    seconds) and dropped before it touches the region.
    """

    def __init__(self, settings: CollectorSettings, registry: CollectorRegistry | None = None, *,
                 on_write: Callable[[], object] | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if not settings.endpoint:
            raise ValueError("Collector needs an endpoint such as tcp://0.0.0.0:5557")
        from prometheus_client import CollectorRegistry, Counter

        self.settings = settings
        self.endpoint = settings.endpoint
        self.path = Path(settings.shm)
        self.max_frame_bytes = settings.max_frame_bytes
        self.stale_after = settings.stale_after  # silence after which a retired epoch may return
        self._clock = clock
        self._on_write = on_write
        self.registry = registry if registry is not None else CollectorRegistry()
        self._accepted_metric = Counter(
            "loadsvc_relay_frames_accepted", "Relay frames written into the region",
            registry=self.registry)
        self._rejected_metric = Counter(
            "loadsvc_relay_frames_rejected",
            "Relay frames (and, for unauthorized/handshake_failed/no_handshake, connections) refused",
            ["reason"], registry=self.registry)
        self._reject = Rejects(self._rejected_metric, REJECT_REASONS, "relay frame", log)
        self.rejected = self._reject.counts  # reason -> frames (or connections) refused
        self.accepted = 0
        self.bound_endpoint: str | None = None  # after start (the real port for tcp://...:0)
        self._decode = msgspec.msgpack.Decoder(LoadSnapshot).decode
        self._ranks: dict[int, _RankState] = {}
        self._writer = RegionWriter(self.path, dp_size=settings.dp_size, mode=settings.region_mode)
        self._log_limited = LogLimiter(log)  # new and returning epochs, once per LOG_EVERY
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start the collector thread; raises when it cannot bind or load keys."""
        await asyncio.to_thread(self.start_thread)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_thread)

    def start_thread(self) -> None:
        """Synchronous start (scripts, tests, benchmarks)."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="loadsvc-collector", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error

    def stop_thread(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("collector thread did not stop within %.1f s", timeout)
        self._thread = None

    def __enter__(self) -> Self:
        self.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    # -- the thread ----------------------------------------------------------------

    def _open(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> tuple[
            zmq.Socket[bytes], zmq.Socket[bytes], ThreadAuthenticator | None]:
        auth = None
        curve: CurveServerSettings | None = self.settings.curve
        sock = ctx.socket(zmq.PULL)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # ZMQ itself drops a peer announcing a message beyond twice the limit,
            # before buffering it; frames between the limit and that are counted.
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_frame_bytes + FRAME_HEADER.size)
            # Frames queued per connection while this thread is busy: a publisher sends
            # one at a time (CONFLATE), so more only ever come from a flood, and ZMQ's
            # default (1000) let one flooding peer park ~130 MB here.
            sock.setsockopt(zmq.RCVHWM, RCVHWM)
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
            set_heartbeats(sock)
            if curve is not None:
                public, secret = load_secret(curve.secret_key, "--curve-secret-key")
                if not Path(curve.authorized_dir).is_dir():
                    raise ValueError(f"--curve-authorized-dir {curve.authorized_dir}: not a directory "
                                     "(put the publishers' NAME.key public certificates there)")
                from zmq.auth.thread import ThreadAuthenticator

                auth = ThreadAuthenticator(ctx, log=logging.getLogger("loadsvc.relay.auth"))
                auth.start()
                self._configure_auth(auth)
                sock.curve_secretkey = secret
                sock.curve_publickey = public
                sock.curve_server = True
            sock.bind(self.endpoint)
            monitor = sock.get_monitor_socket(HANDSHAKE_FAILED_EVENTS)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            raise OSError(f"collector cannot bind {self.endpoint!r}: {e}") from e
        except BaseException:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            raise
        self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock, monitor, auth

    def _authorized_dir(self) -> Path:
        """--curve-authorized-dir (asked only with CURVE on)."""
        if self.settings.curve is None:
            raise RuntimeError("the collector runs without CURVE: it has no authorized directory")
        return Path(self.settings.curve.authorized_dir)

    def _configure_auth(self, auth: ThreadAuthenticator) -> None:
        directory = self._authorized_dir()
        keys = sorted(directory.glob("*.key"))
        auth.configure_curve(domain="*", location=str(directory))
        if not keys:
            log.warning("no public certificates (*.key) in %s: no publisher can connect", directory)
        else:
            log.info("CURVE: %d authorized publisher key(s) from %s", len(keys), directory)

    def _auth_dir_stamp(self) -> tuple[tuple[str, int], ...]:
        directory = self._authorized_dir()
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in directory.glob("*.key")))
        except OSError:
            return ()

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = monitor = auth = None
        try:
            sock, monitor, auth = self._open(ctx)
        except BaseException as e:
            self._start_error = e
            ctx.term()
            self._ready.set()
            return
        log.info("collector listening on %s (%s), writing into %s", self.bound_endpoint,
                 "CURVE" if auth is not None else "open: no CURVE, anyone reaching the port may publish",
                 self.path)
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        auth_stamp = self._auth_dir_stamp() if auth is not None else ()
        next_auth_check = time.monotonic() + AUTH_RELOAD
        next_region_check = time.monotonic() + REGION_CHECK
        try:
            while not self._stopping.is_set():
                try:
                    events = dict(poller.poll(100))
                    if sock in events:
                        wrote = False
                        for _ in range(1024):  # bounded batch, then look at the rest
                            try:
                                parts = sock.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            wrote |= self.handle(parts, self._clock())
                        if wrote and self._on_write is not None:
                            self._on_write()
                    if monitor in events:
                        self._drain_monitor(monitor)
                    now = time.monotonic()
                    if now >= next_region_check:
                        next_region_check = now + REGION_CHECK
                        self._writer.check_region()
                    if auth is not None and now >= next_auth_check:
                        next_auth_check = now + AUTH_RELOAD
                        stamp = self._auth_dir_stamp()
                        if stamp != auth_stamp:
                            auth_stamp = stamp
                            self._configure_auth(auth)
                except Exception as e:  # not bad input (handle() survives that): keep relaying
                    self._reject("internal_error", f"collector loop: {type(e).__name__}: {e}",
                                 exc_info=True)
                    time.sleep(0.1)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._writer.close()

    def _drain_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        while True:
            try:
                msg = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = msg["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._reject("unauthorized", f"refused a publisher's CURVE key (ZAP status "
                                             f"{msg['value']}) on {self.bound_endpoint}")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._reject("handshake_failed", f"handshake failed on {self.bound_endpoint} "
                                                 "(wrong --curve-server-key, or CURVE on one side only)")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # libzmq's event for a connection that closed (or timed out, HANDSHAKE_IVL_MS)
                # in the handshake without a protocol error on this side: port scans and TCP
                # health checks, and those attempts of a one-sided CURVE publisher where the
                # publisher saw the mismatch first (its other attempts are handshake_failed).
                # Counted on its own, logged at debug only: a health check never fills the log.
                self._reject("no_handshake", f"a connection to {self.bound_endpoint} ended before a "
                                             f"ZMTP handshake (errno {int(msg['value'])})",
                             level=logging.DEBUG)

    # -- frames ------------------------------------------------------------------------

    def handle(self, parts: list[bytes], received_ns: int) -> bool:
        """Validate one message and write it into the region; True if accepted.

        Called by the collector thread; public so tests and tools can feed
        frames directly. Never raises for bad input.
        """
        try:
            rank, snapshot, epoch, seq = self._validate(parts)
            self._write(rank, snapshot, epoch, seq, received_ns)
        except _Rejected as r:
            self._reject(r.reason, str(r))
            return False
        except Exception as e:  # a bug or an OS error, not bad input: counted, logged, survived
            self._reject("internal_error", f"{type(e).__name__}: {e}", exc_info=True)
            return False
        self.accepted += 1
        self._accepted_metric.inc()
        return True

    def _validate(self, parts: list[bytes]) -> tuple[int, LoadSnapshot, int, int]:
        if len(parts) != 1:
            raise _Rejected("malformed", f"message of {len(parts)} parts, expected 1")
        frame = parts[0]
        size = len(frame)
        if size > self.max_frame_bytes:
            raise _Rejected("oversized", f"frame of {size} bytes, limit {self.max_frame_bytes} "
                                         "(--max-frame-bytes)")
        if size < FRAME_HEADER.size:
            raise _Rejected("short", f"frame of {size} bytes, the header alone is {FRAME_HEADER.size}")
        magic, rank, dp_size, fingerprint, epoch, seq = FRAME_HEADER.unpack_from(frame)
        if magic[:3] != FRAME_MAGIC:
            raise _Rejected("bad_magic", f"frame starts with {magic[:3]!r}, expected {FRAME_MAGIC!r}")
        if magic[3] != FRAME_VERSION:
            raise _Rejected("bad_version", f"frame version {magic[3]}, this collector reads "
                                           f"{FRAME_VERSION}; run one loadsvc version everywhere")
        if fingerprint != schema.SCHEMA_FINGERPRINT:
            raise _Rejected("fingerprint", f"schema fingerprint {fingerprint:#018x} (dp_rank {rank}) "
                                           f"differs from this loadsvc's {schema.SCHEMA_FINGERPRINT:#018x}; "
                                           "the publisher runs another LoadSnapshot schema")
        if epoch == 0 or seq == 0:
            raise _Rejected("bad_header", f"dp_rank {rank}: epoch {epoch} and seq {seq} must be non-zero")
        region_size = self._writer.dp_size()
        if region_size is None:
            raise _Rejected("no_region", f"no region at {self.path} and no --dp-size to create "
                                         "it; start serve with --dp-size N")
        if dp_size != region_size:
            raise _Rejected("dp_size_mismatch", f"publisher of dp_rank {rank} has dp_size {dp_size}, "
                                                f"the region {region_size}; use one --dp-size everywhere")
        if rank >= region_size:
            raise _Rejected("rank_out_of_range", f"dp_rank {rank} outside 0..{region_size - 1}")
        try:
            snapshot = self._decode(memoryview(frame)[FRAME_HEADER.size:])
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            # msgspec raises UnicodeDecodeError (not DecodeError) for an enum string that is
            # not UTF-8: found by tests/test_fuzz.py; it must not end the collector thread.
            bad = None
            if isinstance(e, msgspec.ValidationError):  # a number breaking the value rule, or a type
                bad = schema.value_error(frame[FRAME_HEADER.size:])
            if bad is not None:
                raise _Rejected("bad_value", f"dp_rank {rank}: {bad}") from None
            raise _Rejected("decode", f"dp_rank {rank}: payload is not a LoadSnapshot: {e}") from None
        if snapshot.dp_rank != rank:
            raise _Rejected("rank_mismatch", f"header dp_rank {rank}, payload dp_rank {snapshot.dp_rank}")
        state = self._ranks.get(rank)
        if state is not None:
            self._check_order(state, rank, epoch, seq, time.monotonic())
        return rank, snapshot, epoch, seq

    def _check_order(self, state: _RankState, rank: int, epoch: int, seq: int, now: float) -> None:
        """The ordering rules of the module docstring; raises _Rejected."""
        if epoch == state.epoch:
            last, at = state.seq, state.at
        elif epoch in state.retired:
            silent = now - state.at
            if silent <= self.stale_after:
                raise _Rejected("old_epoch", f"dp_rank {rank}: epoch {epoch:#x} was replaced by "
                                             f"{state.epoch:#x}, which is live (last frame {silent:.1f} s "
                                             f"ago; the old epoch may return after {self.stale_after:g} s "
                                             "of silence)")
            last, at = state.retired[epoch]
        else:
            return  # a new epoch: a restarted publisher, accepted at once
        if seq <= last:
            raise _Rejected("stale_seq", f"dp_rank {rank}: seq {seq} not after {last} "
                                         "(replayed or reordered frame)")
        bound = last + int(SEQ_RATE_CAP * max(0.0, now - at)) + SEQ_SLACK
        if seq > bound:
            raise _Rejected("seq_jump", f"dp_rank {rank}: seq {seq} jumps from {last} further than "
                                        f"{SEQ_RATE_CAP:,} publishes/s could since the last accepted frame "
                                        f"{now - at:.3f} s ago (at most {bound}); refused")

    def _write(self, rank: int, snapshot: LoadSnapshot, epoch: int, seq: int, received_ns: int) -> None:
        snapshot.epoch = epoch
        try:
            self._writer.write(rank, snapshot, received_ns)
        except WriteRefused as e:
            raise _Rejected(e.reason, str(e)) from None
        now = time.monotonic()
        state = self._ranks.get(rank)
        if state is None:
            self._ranks[rank] = _RankState(epoch, seq, now)
            return
        if epoch != state.epoch:
            back = epoch in state.retired
            self._log_limited("epoch", logging.INFO, "dp_rank %d: %s %#x replaces %#x%s", rank,
                              "earlier publisher epoch" if back else "new publisher epoch", epoch,
                              state.epoch, f" (silent for {now - state.at:.1f} s)" if back
                              else ": a restarted publisher")
            state.switch_to(epoch)
        state.seq = seq
        state.at = now
