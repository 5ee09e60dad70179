"""`loadsvc serve`: the standalone host of the gRPC and REST surfaces over one LoadStore.

    region file --LoadStore (polls every 1 ms)--+--> grpc.aio server  (add_load_services, add_orca_service)
         ^                                      +--> uvicorn + FastAPI (rest.create_app)
         |                                      one asyncio loop (uvloop when installed)
    Collector (--collect, ZMQ) relays remote ranks into the region

``serve(settings)`` runs until cancelled or until ``stop`` is set; ``run_serve``
adds SIGTERM/SIGINT handling and is what the CLI calls. Shutdown: health goes
NOT_SERVING, WatchLoads streams end with UNAVAILABLE, uvicorn and gRPC stop
(grace 1 s), the collector and the store stop; ports are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import grpc

from loadsvc._hosting import bind_tcp
from loadsvc.grpc_service import add_load_services
from loadsvc.orca import ORCA_SERVICE, add_orca_service
from loadsvc.settings import ServeSettings
from loadsvc.store import LoadStore

__all__ = ["serve", "run_serve", "ServeError", "GRPC_OPTIONS"]

log = logging.getLogger("loadsvc.server")

GRPC_GRACE = 1.0  # seconds in-flight unary calls get at shutdown
HTTP_GRACE = 2  # seconds open HTTP connections get at shutdown
# No SO_REUSEPORT: a second server on the same port must fail, not share it silently.
GRPC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
)


class ServeError(RuntimeError):
    """The server could not start (a port in use, a bad certificate, ...); the message says why."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_http(host: str, port: int) -> socket.socket:
    """The REST listening socket, bound here so a port in use is our error, not uvicorn's exit."""
    try:
        return bind_tcp(host, port, "REST")
    except OSError as e:
        raise ServeError(f"{e} [--host / --http-port]") from e


def _grpc_credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if tls is None:
        return None
    try:
        key, cert = tls.key.read_bytes(), tls.cert.read_bytes()
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as e:
        raise ServeError(f"cannot read TLS file {e.filename}: {e.strerror}") from e
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _uvicorn_server(app: Any, settings: ServeSettings, port: int) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn without its own signal handling: serve() owns SIGTERM/SIGINT."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def install_signal_handlers(self) -> None:  # uvicorn < 0.29
            pass

    kwargs: dict[str, Any] = {}
    if settings.tls is not None:
        kwargs = {"ssl_certfile": str(settings.tls.cert), "ssl_keyfile": str(settings.tls.key)}
        if settings.tls.client_ca is not None:
            kwargs |= {"ssl_ca_certs": str(settings.tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(app, host=settings.host, port=port, log_level="warning", access_log=False,
                            lifespan="auto", ws="none", timeout_graceful_shutdown=HTTP_GRACE,
                            server_header=False, **kwargs)
    return _Server(config)


async def serve(settings: ServeSettings, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve gRPC and REST over one store until cancelled or ``stop`` is set.

    ``ready`` is set once both ports listen. Raises ServeError when a port or a
    certificate is unusable (nothing is left listening then).
    """
    from prometheus_client import CollectorRegistry

    from loadsvc.rest import create_app

    host = settings.host
    if not _is_loopback(host) and settings.tls is None and settings.api_key is None:
        log.warning("listening on %s without TLS or an API key: anyone who can reach this host can "
                    "read the loads; use --tls-cert/--tls-key and/or --api-key", host)
    registry = CollectorRegistry()
    store = LoadStore(settings.store)
    grpc_server = grpc.aio.server(options=list(GRPC_OPTIONS))
    services = add_load_services(grpc_server, store, api_key=settings.api_key,
                                 extra_services=(ORCA_SERVICE,))
    orca = add_orca_service(grpc_server, store, ranks=settings.orca_ranks)
    http_sock: socket.socket | None = None
    http_task: asyncio.Task[None] | None = None
    uv: Any = None
    collector: Any = None
    grpc_started = False
    try:
        credentials = _grpc_credentials(settings)
        address = _grpc_address(host, settings.grpc_port)
        try:
            grpc_port = (grpc_server.add_secure_port(address, credentials) if credentials
                         else grpc_server.add_insecure_port(address))
        except RuntimeError as e:
            grpc_port = 0
            reason = str(e)
        else:
            reason = "address in use or not available"
        if not grpc_port:
            raise ServeError(f"cannot listen for gRPC on {address}: {reason} "
                             "(is another server running? choose another --grpc-port)")
        http_sock = _bind_http(host, settings.http_port)
        http_port = http_sock.getsockname()[1]

        await store.start()
        await grpc_server.start()
        grpc_started = True
        if settings.collect:
            from loadsvc.relay import Collector

            loop = asyncio.get_running_loop()
            # the collector thread wakes the store after writing, so a relayed
            # rank reaches the streams without waiting for the next poll
            collector = Collector(settings, registry=registry,
                                  on_write=lambda: loop.call_soon_threadsafe(store.poll))
            await collector.start()

        uv = _uvicorn_server(create_app(store, api_key=settings.api_key, registry=registry),
                             settings, http_port)
        http_task = asyncio.get_running_loop().create_task(uv.serve(sockets=[http_sock]),
                                                           name="loadsvc-uvicorn")
        while not uv.started:
            if http_task.done():
                http_task.result()  # re-raises what stopped uvicorn
                raise ServeError(f"REST server on {host}:{http_port} did not start (see the log above)")
            await asyncio.sleep(0.01)

        scheme = "https" if settings.tls else "http"
        shown = f"[{host}]" if ":" in host else host
        log.info("gRPC listening on %s (%s%s; %s, health, reflection)", _grpc_address(host, grpc_port),
                 "TLS" if settings.tls else "plaintext", ", API key" if settings.api_key else "",
                 ", ".join(services.service_names))
        log.info("REST listening on %s://%s:%d/v1/loads (also /health, /metrics)", scheme, shown, http_port)
        log.info("region %s%s", settings.store.shm,
                 "" if store.attached else " (not there yet: waiting for a publisher; health NOT_SERVING)")
        if ready is not None:
            ready.set()
        if stop is None:
            await asyncio.Future()  # until cancelled
        else:
            await stop.wait()
    finally:
        orca.close()  # ORCA streams end now rather than at the end of the gRPC grace period
        await _shutdown(store, grpc_server, grpc_started, services, uv, http_task, http_sock, collector)


async def _shutdown(store: LoadStore, grpc_server: grpc.aio.Server, grpc_started: bool, services: Any,
                    uv: Any, http_task: asyncio.Task[None] | None, http_sock: socket.socket | None,
                    collector: Any) -> None:
    if grpc_started:
        log.info("stopping")
    await services.aclose()
    if uv is not None and http_task is not None:
        uv.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(http_task), HTTP_GRACE + 2)
        except asyncio.TimeoutError:
            log.warning("REST server did not stop within %d s; cancelling it", HTTP_GRACE + 2)
            http_task.cancel()
        except Exception:  # noqa: BLE001 - shutting down anyway; say what happened
            log.exception("REST server ended with an error")
    if http_sock is not None:
        http_sock.close()
    if grpc_started:
        await grpc_server.stop(GRPC_GRACE)
    else:
        await grpc_server.stop(None)
    if collector is not None:
        await collector.stop()
    await store.stop()
    store.close()
    if grpc_started:
        log.info("stopped")


def run_serve(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean stop, 1 when it could not start."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # optional: plain asyncio works, a little slower
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve_until_signal(settings))


async def _serve_until_signal(settings: ServeSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            # A second Ctrl-C forces; a repeated SIGTERM (a supervisor, a process group) does not.
            if signum == signal.SIGINT:
                log.warning("SIGINT again while stopping: exiting now")
                os._exit(130)
            log.info("%s received while stopping; still stopping", name)
            return
        log.info("%s received: shutting down", name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await serve(settings, stop=stop)
    except ServeError as e:
        log.error("%s", e)
        return 1
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
