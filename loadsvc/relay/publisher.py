"""The engine side of the relay on another node: ZmqPublisher pushes one rank's snapshots.

    ZmqPublisher(rank r) --PUSH (conflating), CURVE--> Collector on node 0 (loadsvc.relay.collector)

Never blocks the caller: while the collector is away only the latest snapshot
waits. Frames: loadsvc.relay.frame.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from loadsvc._closing import Closing
from loadsvc.core import schema
from loadsvc.core.region import DEFAULT_PAYLOAD_CAPACITY
from loadsvc.core.schema import LoadSnapshot
from loadsvc.relay.frame import (
    FRAME_HEADER,
    HANDSHAKE_FAILED_EVENTS,
    MAGIC_VERSION,
    set_heartbeats,
)
from loadsvc.relay.keys import load_public, load_secret
from loadsvc.settings import CurveClientSettings

__all__ = ["ZmqPublisher", "HANDSHAKE_RETRY"]

log = logging.getLogger("loadsvc.relay")

HANDSHAKE_RETRY = 2.0  # seconds: a publisher whose handshake was refused tries again


class ZmqPublisher(Closing):
    """The engine side on another node: pushes one rank's snapshots to a collector.

    ``ZmqPublisher("tcp://node0:5557", dp_size=8, dp_rank=5)`` connects (ZMQ
    reconnects by itself whenever the collector goes away and comes back).
    ``publish(snapshot)`` never blocks: the socket is conflating, so while the
    collector is unreachable only the latest snapshot waits, and it is the one
    delivered on reconnection. ``maybe_publish(build)`` calls build() and
    publishes on every ``interval``-th call. ``curve`` (CurveClientSettings)
    enables CURVE with this publisher's secret certificate and the collector's
    public one. When the collector refuses the handshake (key not authorized
    yet) the publisher logs it and tries again every HANDSHAKE_RETRY seconds,
    re-reading its key files, so authorizing the key later is enough.
    """

    def __init__(self, endpoint: str, *, dp_size: int, dp_rank: int,
                 curve: CurveClientSettings | None = None, interval: int = 1,
                 payload_capacity: int = DEFAULT_PAYLOAD_CAPACITY,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None, linger_ms: int = 200) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in 0..{dp_size - 1} for dp_size={dp_size}, got {dp_rank}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.endpoint = endpoint
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.interval = interval
        self.epoch = secrets.randbits(63) | 1
        self._capacity = payload_capacity
        self._calls = 0
        self._seq = 0
        self.dropped = 0  # publishes the socket refused (never expected with CONFLATE)
        self._encode = msgspec.msgpack.Encoder().encode
        self._check = msgspec.msgpack.Decoder(LoadSnapshot).decode
        ctx = context if context is not None else zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        try:
            # CONFLATE keeps exactly one outgoing message (the latest) while the
            # collector is away; it works because a frame is a single part.
            sock.setsockopt(zmq.CONFLATE, 1)
            sock.setsockopt(zmq.LINGER, linger_ms)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            set_heartbeats(sock)
            self._curve = curve
            self._load_curve(sock)
            monitor = sock.get_monitor_socket(HANDSHAKE_FAILED_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise ValueError(f"cannot connect to collector endpoint {endpoint!r}: {e} "
                             "(expected e.g. tcp://node0:5557)") from e
        except BaseException:
            sock.close(linger=0)
            raise
        self._sock: zmq.Socket[bytes] | None = sock
        self._monitor = monitor
        self._next_check = 0.0
        self._retry_at: float | None = None
        self._last_frame: bytes | None = None
        self.handshake_failures = 0  # handshakes the collector refused (see _check_link)
        self._head = (MAGIC_VERSION, dp_rank, dp_size, schema.SCHEMA_FINGERPRINT, self.epoch)
        self._pack = FRAME_HEADER.pack

    @property
    def seq(self) -> int:
        """Sequence of the last publish (0 before the first)."""
        return self._seq

    def publish(self, snapshot: LoadSnapshot) -> int:
        """Queue snapshot for the collector (replacing any undelivered one); return its seq.

        Raises ValueError when the snapshot's dp_rank is not this publisher's,
        its encoding exceeds the region's slot, or a field breaks the schema's
        value rule (negative, NaN, infinite): the collector would drop it.
        """
        if self._sock is None:
            raise ValueError(f"publisher for dp_rank {self.dp_rank} is closed")
        if snapshot.dp_rank != self.dp_rank:
            raise ValueError(f"snapshot.dp_rank={snapshot.dp_rank} but this publisher owns "
                             f"dp_rank {self.dp_rank}")
        payload = self._encode(snapshot)
        if len(payload) > self._capacity:
            raise ValueError(f"snapshot encodes to {len(payload)} bytes, more than a region slot's "
                             f"payload capacity of {self._capacity} bytes; nothing sent")
        try:
            self._check(payload)  # the collector's own decode: what it would refuse is refused here
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            raise ValueError(f"dp_rank {self.dp_rank}: snapshot field {schema.value_error(payload) or e} "
                             "(no number in a snapshot may be negative, NaN or infinite); "
                             "nothing sent") from None
        n = self._seq + 1
        m, rank, size, fp, epoch = self._head
        frame = self._pack(m, rank, size, fp, epoch, n) + payload
        self._last_frame = frame
        try:
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1  # the next publish carries the whole state again
        self._seq = n
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + 0.25
            self._check_link(now)
        return n

    def _load_curve(self, sock: zmq.Socket[bytes]) -> None:
        """(Re)read the CURVE certificates: a retry after a refused handshake sees rotated files."""
        curve = self._curve
        if curve is None:
            return
        server_public = load_public(curve.server_key, "--curve-server-key")
        public, secret = load_secret(curve.secret_key, "--curve-secret-key")
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    def _check_link(self, now: float) -> None:
        """Reconnect some time after the collector refused the handshake.

        libzmq reconnects by itself after network errors, but never again after a
        refused handshake (an unauthorized key, a wrong server key, CURVE on one
        side only). Authorizing the key later must not need an engine restart, so
        the publisher reconnects itself every HANDSHAKE_RETRY seconds.
        """
        sock, monitor = self._sock, self._monitor
        if sock is None:  # closed
            return
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            if event & HANDSHAKE_FAILED_EVENTS:
                self.handshake_failures += 1
                if self._retry_at is None:
                    log.warning("collector %s refused dp_rank %d's handshake (%s); retrying in %.0f s",
                                self.endpoint, self.dp_rank,
                                "CURVE key not authorized" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                else "wrong server key, or CURVE on one side only", HANDSHAKE_RETRY)
                    self._retry_at = now + HANDSHAKE_RETRY
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._retry_at = None
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            try:
                sock.disconnect(self.endpoint)
            except zmq.ZMQError:
                pass  # already gone
            try:
                self._load_curve(sock)
            except ValueError as e:
                log.warning("dp_rank %d: %s; keeping the previous keys", self.dp_rank, e)
            sock.connect(self.endpoint)
            if self._last_frame is not None:
                try:
                    sock.send(self._last_frame, zmq.NOBLOCK)
                except zmq.Again:
                    pass

    def maybe_publish(self, build: Callable[[], LoadSnapshot]) -> bool:
        """Call build() and publish its snapshot on every interval-th call; True if it did."""
        self._calls += 1
        if self._calls < self.interval:
            return False
        self._calls = 0
        self.publish(build())
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close()
            self._sock = None
