"""`loadsvc serve`: the standalone host of the gRPC and REST surfaces over one LoadStore.

    region file --LoadStore (polls every 1 ms)--+--> grpc.aio server  (add_load_services, add_orca_service)
         ^                                      +--> uvicorn + FastAPI (rest.create_app)
         |                                      one asyncio loop (uvloop when installed)
    Collector (--collect, ZMQ) relays remote ranks into the region
    Ingest (--sglang-endpoint/--sglang-server, --scrape) writes engines' own load into it

    --grpc-workers N (N > 1): N - 1 more processes, each a LoadStore over the same
    region and a grpc.aio server on the same port (SO_REUSEPORT); the kernel
    spreads connections over the N servers. REST and the collector stay here.

``serve(settings)`` runs until cancelled or until ``stop`` is set; ``run_serve``
adds SIGTERM/SIGINT handling and is what the CLI calls. Shutdown: health goes
NOT_SERVING, WatchLoads streams end with UNAVAILABLE, uvicorn and gRPC stop
(grace 1 s), the workers, the collector and the store stop; ports are released.

Why workers: one grpc.aio process writes WatchLoads messages one after another
(about 0.1 ms each on a 2-core machine), so a change reaches the 500th
subscriber of one process tens of milliseconds after the first. The region is
read lock-free by any number of processes, so more servers over it cost one
poll loop each and split the fan-out between cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import grpc

from loadsvc._exceptions import ServeError
from loadsvc._hosting import bind_tcp, is_loopback
from loadsvc._hosting import run as run_loop
from loadsvc.core.store import LoadStore
from loadsvc.settings import ServeSettings
from loadsvc.surfaces.grpc import LoadServices
from loadsvc.surfaces.limits import (
    ConnectionGuard,
    grpc_options,
    server_ssl_context,
    uvicorn_config,
)
from loadsvc.surfaces.orca import OrcaService
from loadsvc.surfaces.services import add_grpc_surfaces

__all__ = ["serve", "run_serve", "ServeError", "GRPC_OPTIONS", "MAX_REQUEST_BYTES"]

log = logging.getLogger("loadsvc.server")

GRPC_GRACE = 1.0  # seconds in-flight unary calls get at shutdown
HTTP_GRACE = 2  # seconds open HTTP connections get at shutdown
WORKER_START_TIMEOUT = 60.0  # seconds a gRPC worker process gets to listen
WORKER_STOP_TIMEOUT = 5.0  # seconds workers get to stop after SIGTERM before SIGKILL
WORKER_RESTART_DELAY = 1.0  # seconds before a worker that died is started again
FD_RESERVE = 128  # file descriptors beyond the connection caps: region, listeners, ZMQ, gRPC core, logs
# No SO_REUSEPORT with one process: a second server on the same port must fail,
# not share it silently. Workers share it on purpose (after a probe: see serve()).
# Requests are tiny (an empty GetLoadsRequest is 0 bytes; a full include list well
# under 1 KiB): a larger message is refused by gRPC itself with RESOURCE_EXHAUSTED
# before it is parsed, instead of costing a parse of megabytes on the serving loop.
MAX_REQUEST_BYTES = 64 * 1024
GRPC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
)


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


def _grpc_server(settings: ServeSettings, store: LoadStore, *,
                 shared_port: bool) -> tuple[grpc.aio.Server, LoadServices, OrcaService]:
    """A grpc.aio server with every loadsvc service over store (not listening yet)."""
    options = [(k, int(shared_port) if k == "grpc.so_reuseport" else v) for k, v in GRPC_OPTIONS]
    options += grpc_options(settings.grpc_limits)
    server = grpc.aio.server(options=options)
    surfaces = add_grpc_surfaces(server, store, api_key=settings.api_key, orca_ranks=settings.orca_ranks,
                                 max_streams=settings.max_streams)
    assert surfaces.orca is not None
    return server, surfaces.load, surfaces.orca


class _StreamMetrics:
    """This process's server-streaming calls on /metrics: open, and refused at --max-streams."""

    def __init__(self, services: LoadServices, orca: OrcaService) -> None:
        self.services = services
        self.orca = orca

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rows = (("WatchLoads", self.services.streams, self.services.refused_streams),
                ("StreamCoreMetrics", self.orca.streams, self.orca.refused_streams))
        opened = GaugeMetricFamily("loadsvc_grpc_streams", "Server-streaming gRPC calls open "
                                   "(this process; --grpc-workers have their own)", labels=["method"])
        refused = CounterMetricFamily("loadsvc_grpc_streams_refused", "Server-streaming gRPC calls "
                                      "refused with RESOURCE_EXHAUSTED at --max-streams", labels=["method"])
        for method, open_now, refused_total in rows:
            opened.add_metric([method], open_now)
            refused.add_metric([method], refused_total)
        yield opened
        yield refused


def _listen_grpc(server: grpc.aio.Server, settings: ServeSettings, port: int) -> int:
    """Add the listening port; the port bound (port 0 picks one), ServeError when it cannot be."""
    credentials = _grpc_credentials(settings)
    address = _grpc_address(settings.host, port)
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:
        bound, reason = 0, str(e)
    else:
        reason = "address in use or not available"
    if not bound:
        raise ServeError(f"cannot listen for gRPC on {address}: {reason} "
                         "(is another server running? choose another --grpc-port)")
    return bound


def _probe_grpc_port(settings: ServeSettings) -> None:
    """ServeError when something already listens on the gRPC port.

    Workers share the port through SO_REUSEPORT, which would also let them join
    another SO_REUSEPORT server of the same user on that port; binding once
    without it first turns a port in use into an error, as with one process.
    """
    if settings.grpc_port == 0:
        return  # the first server picks a free port; the workers join that one
    try:
        bind_tcp(settings.host, settings.grpc_port, "gRPC").close()
    except OSError as e:
        raise ServeError(f"{e} [--host / --grpc-port]") from e


def _rest_guard(settings: ServeSettings) -> ConnectionGuard:
    """The REST server's connection limits, with its TLS context; ServeError when TLS files are unusable."""
    tls = settings.tls
    ctx = None
    if tls is not None:
        try:
            ctx = server_ssl_context(str(tls.cert), str(tls.key),
                                     str(tls.client_ca) if tls.client_ca else None)
        except (OSError, ssl.SSLError) as e:
            raise ServeError(f"cannot use the TLS files for REST ({tls.cert}, {tls.key}"
                             f"{', ' + str(tls.client_ca) if tls.client_ca else ''}): {e}") from e
    return ConnectionGuard(settings.http_limits, "REST", ctx)


def _uvicorn_server(app: Any, settings: ServeSettings, port: int, guard: ConnectionGuard) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn without its own signal handling: serve() owns SIGTERM/SIGINT."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def install_signal_handlers(self) -> None:  # uvicorn < 0.29
            pass

    config = uvicorn_config(app, settings.http_limits, guard, host=settings.host, port=port,
                            log_level="warning", access_log=False, lifespan="auto", ws="none",
                            timeout_graceful_shutdown=HTTP_GRACE, server_header=False)
    return _Server(config)


async def serve(settings: ServeSettings, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve gRPC and REST over one store until cancelled or ``stop`` is set.

    ``ready`` is set once both ports listen. Raises ServeError when a port or a
    certificate is unusable (nothing is left listening then).
    """
    from prometheus_client import CollectorRegistry

    from loadsvc.surfaces.rest import create_app

    host = settings.host
    if settings.api_key is not None and not settings.api_key.strip():
        raise ServeError("the API key is empty: it would switch authentication off; give a key or none")
    if not is_loopback(host) and settings.tls is None and settings.api_key is None:
        log.warning("listening on %s without TLS or an API key: anyone who can reach this host can "
                    "read the loads; use --tls-cert/--tls-key and/or --api-key", host)
    registry = CollectorRegistry()
    store = LoadStore(settings.store)
    shared = settings.grpc_workers > 1
    grpc_server, services, orca = _grpc_server(settings, store, shared_port=shared)
    registry.register(_StreamMetrics(services, orca))
    http_sock: socket.socket | None = None
    http_task: asyncio.Task[None] | None = None
    uv: Any = None
    collector: Any = None
    ingest: Any = None
    workers: _Workers | None = None
    grpc_started = False
    try:
        if shared:
            _probe_grpc_port(settings)
        grpc_port = _listen_grpc(grpc_server, settings, settings.grpc_port)
        guard = _rest_guard(settings)
        registry.register(guard.collector("loadsvc_rest"))
        http_sock = _bind_http(host, settings.http_port)
        http_port = http_sock.getsockname()[1]

        await store.start()
        await grpc_server.start()
        grpc_started = True
        if shared:
            workers = _Workers(settings, grpc_port)
            await workers.start()
        if settings.collect:
            from loadsvc.relay import Collector

            loop = asyncio.get_running_loop()
            # the collector thread wakes the store after writing, so a relayed
            # rank reaches the streams without waiting for the next poll
            assert settings.collector is not None
            collector = Collector(settings.collector, registry=registry,
                                  on_write=lambda: loop.call_soon_threadsafe(store.poll))
            await collector.start()
        if settings.ingest is not None:
            from loadsvc.ingest import Ingest

            loop = asyncio.get_running_loop()
            ingest = Ingest(settings, registry=registry, on_write=lambda: loop.call_soon_threadsafe(store.poll))
            await ingest.start()

        uv = _uvicorn_server(create_app(store, api_key=settings.api_key, registry=registry),
                             settings, http_port, guard)
        http_task = asyncio.get_running_loop().create_task(uv.serve(sockets=[http_sock]),
                                                           name="loadsvc-uvicorn")
        while not uv.started:
            if http_task.done():
                http_task.result()  # re-raises what stopped uvicorn
                raise ServeError(f"REST server on {host}:{http_port} did not start (see the log above)")
            await asyncio.sleep(0.01)

        scheme = "https" if settings.tls else "http"
        shown = f"[{host}]" if ":" in host else host
        log.info("gRPC listening on %s (%s%s; %s, health, reflection%s)", _grpc_address(host, grpc_port),
                 "TLS" if settings.tls else "plaintext", ", API key" if settings.api_key else "",
                 ", ".join(services.service_names),
                 f"; {settings.grpc_workers} processes share the port" if shared else "")
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
        if workers is not None:
            workers.signal_stop()  # they stop in parallel with this process
        if ingest is not None:
            await ingest.stop()
        await _shutdown(store, grpc_server, grpc_started, services, uv, http_task, http_sock, collector)
        if workers is not None:
            await workers.wait_stopped()


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
        except TimeoutError:
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


class _Workers:
    """The extra gRPC processes of ``--grpc-workers``: started, watched, restarted, stopped.

    Each runs ``_worker_main`` (spawned, so nothing of this process's event loop or
    gRPC core is inherited) with the same settings and the port the first server
    bound. One that dies is started again after WORKER_RESTART_DELAY; its clients'
    connections drop and they reconnect (to any of the servers).
    """

    def __init__(self, settings: ServeSettings, port: int) -> None:
        self._ctx = mp.get_context("spawn")
        self._settings = dataclasses.replace(settings, grpc_port=port)
        self._events: Any = self._ctx.Queue()
        self._procs: dict[int, Any] = {}
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(target=_worker_main, name=f"loadsvc-grpc-worker-{index}", daemon=True,
                                 args=(self._settings, index, os.getpid(), self._events,
                                       logging.getLogger().getEffectiveLevel()))
        proc.start()
        self._procs[index] = proc

    async def _wait_ready(self, indexes: set[int]) -> None:
        """Until each worker in indexes reported it listens; ServeError if one failed or is late.

        Polls the queue without blocking (never a thread parked in get(): a
        shutdown would wait for it).
        """
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while indexes:
            try:
                kind, index, detail = self._events.get_nowait()
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise ServeError(f"gRPC worker(s) {sorted(indexes)} did not start within "
                                     f"{WORKER_START_TIMEOUT:g} s") from None
                await asyncio.sleep(0.05)
                continue
            if kind == "error":
                raise ServeError(f"gRPC worker {index}: {detail}")
            indexes.discard(index)

    async def start(self) -> None:
        """Start workers 1..N-1 and wait until every one listens; ServeError when one cannot."""
        indexes = set(range(1, self._settings.grpc_workers))
        for index in indexes:
            self._spawn(index)
        await self._wait_ready(set(indexes))
        self._watch = asyncio.get_running_loop().create_task(self._supervise(), name="loadsvc-workers")

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, proc in list(self._procs.items()):
                if proc.exitcode is None or self._stopping:
                    continue
                log.warning("gRPC worker %d (pid %d) exited with code %s; its clients reconnect to the "
                            "other servers; starting it again in %g s", index, proc.pid, proc.exitcode,
                            WORKER_RESTART_DELAY)
                await asyncio.sleep(WORKER_RESTART_DELAY)
                if self._stopping:
                    return
                self._spawn(index)
                try:
                    await self._wait_ready({index})
                except ServeError as e:
                    log.error("%s", e)
                else:
                    log.info("gRPC worker %d started again (pid %d)", index, self._procs[index].pid)

    def signal_stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for proc in self._procs.values():
            if proc.exitcode is None:
                proc.terminate()  # SIGTERM: the worker stops like serve does

    async def wait_stopped(self) -> None:
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        for index, proc in self._procs.items():
            while proc.exitcode is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.exitcode is None:
                log.warning("gRPC worker %d did not stop within %g s; killing it", index, WORKER_STOP_TIMEOUT)
                proc.kill()
                proc.join(2)
        self._events.close()


def _worker_main(settings: ServeSettings, index: int, parent: int, events: Any, log_level: int) -> None:
    """A spawned gRPC worker: the same services over its own store, on the shared port."""
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s [grpc worker {index}]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    run_loop(_worker_serve(settings, index, parent, events))


async def _worker_serve(settings: ServeSettings, index: int, parent: int, events: Any) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    store = LoadStore(settings.store)
    server, services, orca = _grpc_server(settings, store, shared_port=True)
    started = False
    try:
        try:
            _listen_grpc(server, settings, settings.grpc_port)
            await store.start()
            await server.start()
            started = True
        except ServeError as e:
            events.put(("error", index, str(e)))
            return
        events.put(("ready", index, os.getpid()))
        while not stop.is_set():
            if os.getppid() != parent:  # serve died without stopping us
                log.warning("serve (pid %d) is gone; stopping", parent)
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        orca.close()
        await _shutdown(store, server, started, services, None, None, None, None)


def _fd_budget(settings: ServeSettings) -> None:
    """Raise the soft open-file limit to what the connection caps need; warn when it cannot be.

    REST and gRPC connections hold one descriptor each. With the caps within the
    limit a flood of connections to one surface is refused there and never takes
    the descriptors the other needs (the common soft limit, 1024, fits the defaults).
    """
    import resource

    http, grpc_cap = settings.http_limits.max_connections, settings.grpc_limits.max_connections
    need = http + grpc_cap + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if raised > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft < need:
        log.warning("the open-file limit (%d) is below what the connection caps need (%d: "
                    "--http-max-connections %d + --grpc-max-connections %d + %d): a flood of connections "
                    "could exhaust it; raise `ulimit -n` or lower the caps", soft, need, http, grpc_cap,
                    FD_RESERVE)


def run_serve(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean stop, 1 when it could not start."""
    _fd_budget(settings)
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
