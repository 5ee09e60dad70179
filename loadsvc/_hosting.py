"""Hosting an ASGI app inside a process that owns its event loop and its signals.

    sock = bind_tcp(host, port, "the engine's HTTP")   # a port in use is a clear error, here
    server = quiet_uvicorn(app, host, port)             # no signal handlers of its own
    task = loop.create_task(server.serve(sockets=[sock]))
    ...; server.should_exit = True; await task

Used by `loadsvc engine` and the reference router, which run uvicorn next to
their own tasks (schedulers, a gRPC server, WatchLoads subscriptions).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

__all__ = ["bind_tcp", "quiet_uvicorn"]


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


def quiet_uvicorn(app: Any, host: str, port: int, *, graceful: float = 2.0) -> Any:
    """A uvicorn.Server that leaves SIGTERM/SIGINT to its host process and logs only warnings."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", ws="none", timeout_graceful_shutdown=graceful,
                            server_header=False)
    return _Server(config)
