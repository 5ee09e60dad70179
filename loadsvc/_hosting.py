"""Hosting an ASGI app inside a process that owns its event loop and its signals.

    run(main())                                          # uvloop when installed
      sock = bind_tcp(host, port, "the engine's HTTP")   # a port in use is a clear error, here
      is_loopback("127.0.0.1")                           # an address (or "localhost") of this host only
      await serve_until_signal(app, sock, host, port,    # uvicorn without signal handlers of
                               what="the engine's HTTP",  # its own, until SIGTERM / SIGINT,
                               limits=HttpLimits(...),    # under loadsvc/surfaces/limits.py
                               signals={SIGUSR1: f})

Used by `loadsvc engine` and the reference router, which run uvicorn next to
their own tasks (schedulers, a gRPC server, WatchLoads subscriptions). Both run
under loadsvc/surfaces/limits.py's connection, header and body limits (HttpLimits), as
`loadsvc serve`'s REST does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

from loadsvc.settings import HttpLimits
from loadsvc.surfaces.limits import BodyLimit, ConnectionGuard, uvicorn_config

__all__ = ["bind_tcp", "is_loopback", "quiet_uvicorn", "serve_until_signal", "run"]


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1); False for names and the rest."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_tcp(host: str, port: int, what: str) -> socket.socket:
    """A bound TCP socket for uvicorn; OSError naming what, where and why when it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r} for {what}: {e.strerror}") from e
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen for {what} on {host}:{port}: {e.strerror} "
                      "(is something else on that port? choose another)") from e
    sock.set_inheritable(False)
    return sock


def quiet_uvicorn(app: Any, host: str, port: int, *, limits: HttpLimits, guard: ConnectionGuard,
                  graceful: float = 2.0) -> Any:
    """A uvicorn.Server under limits that leaves SIGTERM/SIGINT to its host process, logs only warnings."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn_config(BodyLimit(app, limits.max_body_bytes, guard), limits, guard, host=host,
                            port=port, log_level="warning", access_log=False, lifespan="off", ws="none",
                            timeout_graceful_shutdown=graceful, server_header=False)
    return _Server(config)


async def serve_until_signal(app: Any, sock: socket.socket, host: str, port: int, *,
                             what: str, limits: HttpLimits = HttpLimits(),
                             signals: Mapping[int, Callable[[], None]] | None = None,
                             on_stop: Callable[[], None] | None = None) -> None:
    """Serve app on sock under limits until SIGTERM or SIGINT (or until uvicorn stops by itself).

    what names the server in log lines about closed connections. signals: more
    handlers while serving (e.g. SIGUSR1). on_stop runs first when stopping, e.g.
    to end requests in flight so that connections drain at once.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handlers: dict[int, Callable[[], None]] = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set,
                                               **(signals or {})}
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    http = quiet_uvicorn(app, host, port, limits=limits, guard=ConnectionGuard(limits, what))
    http_task = loop.create_task(http.serve(sockets=[sock]), name=f"http-{port}")
    stop_task = loop.create_task(stop.wait())
    try:
        await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_task.cancel()
        if on_stop is not None:
            on_stop()
        http.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await http_task
        for sig in handlers:
            loop.remove_signal_handler(sig)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run main in a fresh event loop: uvloop's when installed (uvicorn[standard] brings it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
    else:
        uvloop.run(main)
