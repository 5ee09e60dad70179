"""What one client may hold of loadsvc's servers: HTTP connection limits (uvicorn) and gRPC options.

    accept --> cap: at most max_connections open; at the cap the connection that has
      |        waited longest for its next request is closed (none waiting: the new one is)
      v
    TLS handshake (when serving TLS), within tls_handshake_timeout
      v
    request line + headers: at most max_header_bytes (431, closed), complete within
      |        header_timeout of the connect or of the previous response (closed)
      v
    body: at most max_body_bytes (BodyLimit middleware: 413, closed), never buffered past it
      v
    response, then keep-alive: idle_timeout (uvicorn's timeout_keep_alive)

``uvicorn_config(app, limits, guard, ...)`` is the one place a loadsvc HTTP server
(serve's REST, the toy engine, the reference router) gets its uvicorn.Config: the
httptools protocol below, with ``guard`` (a ConnectionGuard: the server's open
connections and what was closed, per reason) enforcing the limits. uvicorn itself
bounds neither the header block (httptools keeps every header line it is given)
nor the time to the first request, so the protocol counts the bytes it feeds
the parser and holds one deadline per connection. TLS is done here too
(``loop.start_tls`` with a handshake timeout), so a connection counts against
the cap from its accept on, not only once its handshake is through.

``grpc_options(limits)`` are the matching grpc.aio server options.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Iterator
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from loadsvc.core.rejects import LogLimiter
from loadsvc.settings import GrpcLimits, HttpLimits

__all__ = ["ConnectionGuard", "BodyLimit", "uvicorn_config", "grpc_options", "server_ssl_context",
           "CLOSE_REASONS"]

log = logging.getLogger("loadsvc.limits")

SWEEP_EVERY = 1.0  # seconds between deadline checks (at most; shorter for short timeouts)
# Why a connection was closed by the guard (the `reason` label of the metric).
CLOSE_REASONS = ("header_too_large", "header_timeout", "idle", "cap_evicted", "cap_refused",
                 "tls_handshake_failed", "body_too_large")
_QUIET = {"idle"}  # clients that connect and never send are common (preconnects): counted only


def _response(status: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class ConnectionGuard:
    """One HTTP server's open connections, their deadlines, and what was closed, by reason.

    ``closed[reason]`` counts connections the limits closed (CLOSE_REASONS);
    ``open`` is how many are open now. serve exposes both on /metrics.
    """

    def __init__(self, limits: HttpLimits, what: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self.what = what  # "REST", "the engine's HTTP", ...: for log lines
        self.ssl_context = ssl_context
        self.closed: collections.Counter[str] = collections.Counter()
        self._open: set[_GuardedProtocol] = set()
        # connections waiting for a request (or a handshake), oldest first -> when they began waiting
        self._waiting: dict[_GuardedProtocol, float] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._sweep_every = min(SWEEP_EVERY, limits.header_timeout / 4)
        self._log_limited = LogLimiter(log)  # one warning per reason per LOG_EVERY

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, conn: _GuardedProtocol) -> bool:
        """Take a new connection in; False when it must be refused (the cap, nobody to evict)."""
        if len(self._open) >= self.limits.max_connections:
            oldest = next(iter(self._waiting), None)
            if oldest is None:
                self.count("cap_refused", f"{len(self._open)} connections open, all busy "
                                          f"(max_connections {self.limits.max_connections})")
                return False
            self.count("cap_evicted", f"{len(self._open)} connections open (max_connections "
                                      f"{self.limits.max_connections}); closed the one waiting longest "
                                      f"for a request, from {oldest.peer}")
            oldest.drop()
        self._open.add(conn)
        return True

    def waiting(self, conn: _GuardedProtocol) -> None:
        """conn waits for a request from now on: it must send one within header_timeout."""
        self._waiting.pop(conn, None)
        self._waiting[conn] = time.monotonic()
        if self._sweep_handle is None:
            self._sweep_handle = asyncio.get_running_loop().call_later(self._sweep_every, self._sweep)

    def busy(self, conn: _GuardedProtocol) -> None:
        self._waiting.pop(conn, None)

    def remove(self, conn: _GuardedProtocol) -> None:
        self._open.discard(conn)
        self._waiting.pop(conn, None)

    def _sweep(self) -> None:
        self._sweep_handle = None
        deadline = time.monotonic() - self.limits.header_timeout
        expired = []
        for conn, since in self._waiting.items():
            if since > deadline:
                break  # oldest first: the rest are younger
            expired.append(conn)
        for conn in expired:
            self._waiting.pop(conn, None)
            conn.expire()
        if self._waiting:
            self._sweep_handle = asyncio.get_running_loop().call_later(self._sweep_every, self._sweep)

    def count(self, reason: str, detail: str) -> None:
        """Count a connection (or request) the limits closed; a warning at most every LOG_EVERY s
        (loadsvc/core/rejects.py) per reason."""
        self.closed[reason] += 1
        if reason in _QUIET:
            log.debug("%s: closed a connection [%s]: %s", self.what, reason, detail)
            return
        self._log_limited(reason, logging.WARNING, "%s: closed a connection [%s]: %s", self.what, reason, detail)

    def collector(self, prefix: str) -> Any:
        """A prometheus_client collector of collect(prefix), for registry.register()."""
        guard = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                return guard.collect(prefix)

        return _Collector()

    def collect(self, prefix: str) -> Iterator[Any]:
        """Prometheus families <prefix>_connections_closed_total{reason} and <prefix>_connections_open."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fam = CounterMetricFamily(f"{prefix}_connections_closed",
                                  f"{self.what} connections (or requests) closed by a limit, by reason",
                                  labels=["reason"])
        for reason in CLOSE_REASONS:
            fam.add_metric([reason], self.closed[reason])
        yield fam
        gauge = GaugeMetricFamily(f"{prefix}_connections_open", f"{self.what} connections open now")
        gauge.add_metric([], len(self._open))
        yield gauge


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under a ConnectionGuard (class attribute, one subclass per server).

    Header bytes are counted as fed to the parser: after each read that leaves a
    header block incomplete, its length adds to the block's count (a read that
    completes one is not counted, so the count errs low by at most one read).
    The deadline runs whenever no request of the connection is being served:
    from the accept and from each response on, until a header block is complete.
    """

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._raw: asyncio.Transport | None = None  # the TCP transport (TLS: under the TLS one)
        self._tls_pending: bytearray | None = None  # TLS: data before start_tls returned
        self._handshaking = False
        self._gone = False  # closed, or never admitted
        self._dropped = False  # closed by the limits (counted already) or by a server shutdown
        self._in_headers = True  # the next bytes belong to a request line or headers
        self._header_bytes = 0
        self._headers_done = False  # a header block completed during the current read
        self._serving = 0  # requests whose headers are in and whose response is not complete
        self.peer = "?"

    # -- connection ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        guard = self.guard
        if not guard.admit(self):
            self._gone = True
            if guard.ssl_context is None:
                transport.write(_response("503 Service Unavailable",
                                          f"{guard.what}: too many connections; retry later\n"))
            transport.close()
            return
        guard.waiting(self)
        if guard.ssl_context is None:
            super().connection_made(transport)
            return
        # TLS: the handshake runs under our own timeout; uvicorn sees the TLS transport after it.
        self._handshaking = True
        self._tls_pending = bytearray()
        self.connections.add(self)  # so that a server shutdown reaches a handshaking connection
        _step_now(self.loop.start_tls(transport, self, guard.ssl_context, server_side=True,
                                      ssl_handshake_timeout=guard.limits.tls_handshake_timeout),
                  self._handshake_done)

    def _handshake_done(self, tls: asyncio.Transport | None, error: BaseException | None) -> None:
        self._handshaking = False
        if error is not None or tls is None:
            if not self._dropped:
                self.guard.count("tls_handshake_failed",
                                 f"from {self.peer}: {str(error) or type(error).__name__}")
            self._forget()
            if self._raw is not None:
                self._raw.close()
            return
        if self._gone:
            return
        pending, self._tls_pending = self._tls_pending, None
        super().connection_made(tls)
        if pending:
            self.data_received(bytes(pending))

    def connection_lost(self, exc: Exception | None) -> None:
        handshaking = self._handshaking or self.transport is None
        self._forget()
        if not handshaking:
            super().connection_lost(exc)

    def _forget(self) -> None:
        self._gone = True
        self.guard.remove(self)
        self.connections.discard(self)

    def shutdown(self) -> None:
        if self._handshaking or self.transport is None:
            self._dropped = True
            self._forget()
            if self._raw is not None:
                self._raw.close()
            return
        super().shutdown()

    def drop(self) -> None:
        """Close now (evicted at the cap, or past the deadline)."""
        self._dropped = True
        self.guard.remove(self)
        transport = self.transport if self.transport is not None else self._raw
        if transport is not None:
            transport.close()

    def expire(self) -> None:
        """The deadline passed without a complete header block (called by the guard's sweep)."""
        if self._serving or self._gone:
            return
        if self._header_bytes or self._handshaking:
            self.guard.count("header_timeout", f"from {self.peer}: no complete request header within "
                                               f"{self.guard.limits.header_timeout:g} s")
        else:
            self.guard.count("idle", f"from {self.peer}: nothing sent within "
                                     f"{self.guard.limits.header_timeout:g} s")
        self.drop()

    # -- bytes and parser events ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._tls_pending is not None:  # the handshake is through, start_tls has not returned yet
            self._tls_pending += data
            if len(self._tls_pending) > self.guard.limits.max_header_bytes and self._raw is not None:
                self.guard.count("header_too_large", f"from {self.peer}: request line and headers over "
                                                     f"{self.guard.limits.max_header_bytes} bytes")
                self._forget()
                self._raw.close()
            return
        self._headers_done = False
        super().data_received(data)
        if self._in_headers and not self._headers_done:
            self._header_bytes += len(data)
            if self._header_bytes > self.guard.limits.max_header_bytes:
                self._too_large()

    def _too_large(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        self.guard.count("header_too_large", f"from {self.peer}: request line and headers over "
                                             f"{self.guard.limits.max_header_bytes} bytes")
        if not self._serving:  # never in the middle of a response still being written
            transport.write(_response("431 Request Header Fields Too Large",
                                      f"request line and headers over {self.guard.limits.max_header_bytes} "
                                      "bytes\n"))
        self.guard.remove(self)
        transport.close()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._in_headers = False
        self._headers_done = True
        self._header_bytes = 0
        self._serving += 1
        self.guard.busy(self)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._serving -= 1
        if not self._serving and not self._gone and not self.transport.is_closing():
            self.guard.waiting(self)


def _step_now(coro: Any, done: Any) -> None:
    """Run coro up to its first suspension now, the rest as the futures it awaits complete; then
    done(result, None) or done(None, exception).

    For loop.start_tls in connection_made: a Task would take its first step only on the next
    loop iteration, and uvloop starts reading a new connection right after connection_made, so
    the client's first handshake bytes could reach the HTTP parser before start_tls took the
    transport over. Its first step (pause reading, hand the transport to TLS) has to run now.
    """
    def step(exc: BaseException | None) -> None:
        try:
            future = coro.send(None) if exc is None else coro.throw(exc)
        except StopIteration as stop:
            done(stop.value, None)
        except BaseException as e:  # noqa: BLE001 - handed to done, which counts and closes
            done(None, e)
        else:
            future.add_done_callback(lambda f: step(None))

    step(None)


class BodyLimit:
    """ASGI middleware: a request body over max_bytes is answered 413 (connection closed).

    A declared Content-Length over the limit is refused before any of the body is
    read; a chunked body is counted as the app receives it, and the app's read
    that crosses the limit ends the request. Nothing past the limit is buffered.
    """

    def __init__(self, app: Any, max_bytes: int, guard: ConnectionGuard | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.guard = guard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if len(value) > 19 or (value.isdigit() and int(value) > self.max_bytes):
                    await self._refuse(scope, send, f"Content-Length {value[:24].decode('latin-1')}")
                    return
        received = 0
        over = False
        started = False

        async def limited_receive() -> Any:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            if over:
                return  # the app's error answer to _BodyTooLarge; ours goes instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, send, f"over {received} bytes so far")

    async def _refuse(self, scope: Any, send: Any, detail: str) -> None:
        client = scope.get("client")
        if self.guard is not None:
            self.guard.count("body_too_large", f"{scope.get('method')} {scope.get('path')} from "
                                               f"{client[0] if client else '?'}: {detail}")
        message = f"request body larger than {self.max_bytes} bytes"
        body = (b'{"error":{"message":"%s","type":"RequestEntityTooLarge","code":413}}'
                % message.encode())
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(body)), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised into the app by BodyLimit's receive when the body crosses the limit."""


def server_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A TLS server context (mutual TLS when client_ca is given); OSError / ssl.SSLError when unusable."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def uvicorn_config(app: Any, limits: HttpLimits, guard: ConnectionGuard, *, host: str, port: int,
                   **kwargs: Any) -> Any:
    """uvicorn.Config for app under limits: the guarded httptools protocol, no ssl_* (the guard's)."""
    import uvicorn

    protocol = type("GuardedHttpToolsProtocol", (_GuardedProtocol,), {"guard": guard})
    # uvicorn annotates timeout_keep_alive as int but only hands it to loop.call_later (a float delay)
    return uvicorn.Config(app, host=host, port=port, http=protocol,
                          timeout_keep_alive=limits.idle_timeout,  # type: ignore[arg-type]
                          **kwargs)


def grpc_options(limits: GrpcLimits) -> list[tuple[str, Any]]:
    """grpc.aio server options enforcing limits (connections, streams, idle, handshake, dead peers)."""
    return [
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)),
        ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout * 1000)),
        ("grpc.keepalive_time_ms", int(limits.keepalive * 1000)),
        # a ping is never given longer to answer than the quiet time that sent it
        ("grpc.keepalive_timeout_ms", int(min(limits.keepalive_timeout, limits.keepalive) * 1000)),
    ]
