"""The gRPC surface: servicers over a LoadStore, added to any ``grpc.aio`` server.

    LoadStore --view()--> View --encoded(("pb", selection))--> bytes, serialized once per view
        |                                                        |
        | change_version                 GetLoads (loadsvc.v1 and SGLang) return them as is
        v                                                        |
    _pump task --wakes--> every WatchLoads subscriber --------- yields the latest bytes

Services (``add_load_services(server, store)``):

- ``loadsvc.v1.LoadService/GetLoads`` and ``/WatchLoads``.
- ``sglang.grpc.scheduler.SglangScheduler/GetLoads``: the same handler and the
  same bytes. loadsvc.v1's messages are wire-identical to SGLang's contract for
  fields 1-17; loadsvc's additions (numbers >= 100: publish time, sequence,
  status, age) travel along and are skipped as unknown fields by any proto3
  parser built from the SGLang contract.
- ``grpc.health.v1.Health``: SERVING for "" and each service while the store
  has its region attached, NOT_SERVING otherwise; never behind the API key.
- Server reflection listing the services above.

Handlers are registered with identity serializers: a response is the bytes a
View memoized, so every caller (and every subscriber with the same filter) of
one view shares one serialization.

WatchLoads, per subscriber: send the current state at once; then wait for a
store change (or the heartbeat deadline). A message goes out when the selected
ranks' (rank, seq, status) signature differs from the last one sent, no sooner
than ``min_interval_ms`` after the previous message, and at least every
``max_interval_ms`` (heartbeat). A subscriber always sends the *latest* view:
one that reads slowly stalls only its own coroutine in the write (gRPC flow
control) and then skips to the newest state; nothing is queued per subscriber
beyond the one message being written.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc.core.rejects import LogLimiter
from loadsvc.core.store import BadRequest, LoadStore, Selection, View
from loadsvc.surfaces.encode import response_proto

__all__ = ["add_load_services", "LoadServices", "LOAD_SERVICE", "SGLANG_SERVICE",
           "MAX_INTERVAL_LIMIT_MS", "MIN_HEARTBEAT_MS", "DEFAULT_MAX_INTERVAL_MS", "DEFAULT_MAX_STREAMS"]

log = logging.getLogger("loadsvc.grpc")

LOAD_SERVICE = pb.DESCRIPTOR.services_by_name["LoadService"].full_name  # loadsvc.v1.LoadService
SGLANG_SERVICE = "sglang.grpc.scheduler.SglangScheduler"
DEFAULT_MAX_INTERVAL_MS = 1000  # heartbeat when the request says 0
MAX_INTERVAL_LIMIT_MS = 3_600_000  # one hour: the largest min/max interval accepted
MIN_HEARTBEAT_MS = 10  # the smallest max_interval_ms accepted: no stream floods at 1 kHz
CLOSE_WAIT = 2.0  # seconds aclose() waits for streams to end with their status
# WatchLoads streams open at once per server (process); one more is RESOURCE_EXHAUSTED.
# Each open stream costs about 17 KB of the server's memory (measured), so the
# default bounds them to about 70 MB; a router needs one.
DEFAULT_MAX_STREAMS = 4096


class _Wakeup:
    """Wakes every waiting subscriber at once: one future per waiter, no task per wait."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    async def wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.add(fut)
        handle = loop.call_later(max(timeout, 0.0), _resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._waiters.discard(fut)

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            _resolve(fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class LoadServices:
    """What ``add_load_services`` added to a server: its handlers, health and shutdown.

    ``health`` is the grpc_health HealthServicer (None when health=False).
    ``await aclose()`` ends every WatchLoads stream with UNAVAILABLE and marks
    health NOT_SERVING; call it before ``server.stop(grace)``.
    """

    def __init__(self, store: LoadStore, *, api_key: str | None, health: Any,
                 service_names: tuple[str, ...], max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self.store = store
        self.health = health
        self.service_names = service_names
        self.max_streams = max_streams
        self.refused_streams = 0  # WatchLoads calls refused because max_streams were open
        self._log_limited = LogLimiter(log)  # refused streams: one warning per LOG_EVERY
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty: it would switch authentication off; pass a key or None")
        self._api_key = api_key.encode() if api_key else None
        self._closed = False
        self._changes = _Wakeup()  # subscribers waiting for a store change or a deadline
        self._timers = _Wakeup()  # subscribers holding back for min_interval (only close wakes)
        self._pump_task: asyncio.Task[None] | None = None
        self._streams = 0
        self.gone_subscribers = 0  # WatchLoads streams whose client went away during a write
        self._streams_done: asyncio.Event | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()
        if health is not None:
            self._set_health(store.attached, initial=True)
            store.on_attach_change(self._set_health)

    # -- health ----------------------------------------------------------------

    def _set_health(self, attached: bool, initial: bool = False) -> None:
        from grpc_health.v1 import health_pb2

        status = (health_pb2.HealthCheckResponse.SERVING if attached
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        names = ("", *self.service_names)
        if self._closed:
            return  # shutting down: enter_graceful_shutdown() set NOT_SERVING for good
        if not initial:
            log.info("health: %s", "SERVING" if attached else "NOT_SERVING (region not attached)")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("loadsvc's gRPC services need a running event loop: add them from async "
                               "code, before server.start() (grpc.aio)") from None
        # HealthServicer.set() is a coroutine: tasks on the serving loop. The initial
        # ones run before server.start() returns, so no Check sees an unset service.
        for name in names:
            task = loop.create_task(self.health.set(name, status))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    # -- auth --------------------------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        """Abort with UNAUTHENTICATED unless `authorization: Bearer <api key>` is present."""
        if self._api_key is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key):
                    return
                break
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key: send metadata `authorization: Bearer <key>`")

    # -- requests ------------------------------------------------------------------

    def _selection(self, request: Any) -> Selection:
        """Selection of a (Get|Watch)LoadsRequest; BadRequest naming the field.

        Parsed on every call and never cached by what the client sent: the
        include list is bounded (MAX_INCLUDE_TOKENS), so a parse costs about a
        microsecond, and a cache keyed on raw lists is memory a client can fill.
        What is memoized (a View's encodings) is keyed on the normalized Selection.
        """
        dp_rank = request.dp_rank if request.HasField("dp_rank") else None
        return Selection.parse(dp_rank, request.include, self.store.dp_size)

    @staticmethod
    def _encoder(sel: Selection) -> Callable[[View], bytes]:
        return lambda view: response_proto(view, sel).SerializeToString()

    async def _parse(self, data: bytes, cls: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid {cls.DESCRIPTOR.full_name} message")

    # -- GetLoads --------------------------------------------------------------------

    async def get_loads(self, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """GetLoads for both services: the view's memoized bytes for this selection."""
        await self._authorize(context)
        request = await self._parse(data, pb.GetLoadsRequest, context)
        try:
            sel = self._selection(request)
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        view = self.store.view()
        return view.encoded(("pb", sel), self._encoder(sel))

    # -- WatchLoads ------------------------------------------------------------------

    @staticmethod
    def _intervals(request: Any) -> tuple[float, float]:
        """(min, max) seconds between messages; BadRequest naming the field when out of range."""
        lo, hi = request.min_interval_ms, request.max_interval_ms
        if lo > MAX_INTERVAL_LIMIT_MS:
            raise BadRequest("min_interval_ms", f"{lo} is out of range 0..{MAX_INTERVAL_LIMIT_MS}")
        if hi > MAX_INTERVAL_LIMIT_MS:
            raise BadRequest("max_interval_ms", f"{hi} is out of range 0..{MAX_INTERVAL_LIMIT_MS} "
                                                f"(0 = default {DEFAULT_MAX_INTERVAL_MS})")
        if 0 < hi < MIN_HEARTBEAT_MS:
            raise BadRequest("max_interval_ms", f"{hi} is below the smallest heartbeat interval, "
                                                f"{MIN_HEARTBEAT_MS} (0 = default {DEFAULT_MAX_INTERVAL_MS})")
        if hi == 0:
            hi = max(DEFAULT_MAX_INTERVAL_MS, lo)
        elif lo > hi:
            raise BadRequest("min_interval_ms", f"{lo} is larger than max_interval_ms {hi}")
        return lo / 1000.0, hi / 1000.0

    async def _ensure_pump(self) -> None:
        if self._pump_task is None:
            await self.store.start()  # idempotent; an embedding app may not have started it
            self._pump_task = asyncio.get_running_loop().create_task(self._pump(),
                                                                     name="loadsvc-watch-pump")

    async def _pump(self) -> None:
        """One waiter on the store; wakes every subscriber when anything changed."""
        seen = self.store.change_version
        while not self._closed:
            await self.store.wait_change(seen, 1.0)
            if self.store.change_version != seen:
                seen = self.store.change_version
                self._changes.wake()

    async def watch_loads(self, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        await self._authorize(context)
        request = await self._parse(data, pb.WatchLoadsRequest, context)
        try:
            sel = self._selection(request)
            min_s, max_s = self._intervals(request)
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "loadsvc is shutting down; reconnect")
        if self._streams >= self.max_streams:
            await self._refuse_stream(context)
        await self._ensure_pump()
        encode = self._encoder(sel)
        key = ("pb", sel)
        clock = time.monotonic
        self._streams += 1
        try:
            view = self.store.view()
            sent_sig = view.signature(sel)
            sent_at = clock()
            if not await self._write(context, view.encoded(key, encode)):
                return
            while not self._closed:
                view = self.store.view()
                sig = view.signature(sel)
                now = clock()
                if sig != sent_sig:
                    due = sent_at + min_s
                    if now < due:
                        await self._timers.wait(due - now)  # hold back; the newest view goes then
                        continue
                elif now < sent_at + max_s:
                    await self._changes.wait(sent_at + max_s - now)
                    continue
                sent_sig, sent_at = sig, now
                if not await self._write(context, view.encoded(key, encode)):
                    return
            await context.abort(grpc.StatusCode.UNAVAILABLE, "loadsvc is shutting down; reconnect")
        finally:
            self._streams -= 1
            if self._streams == 0 and self._streams_done is not None:
                self._streams_done.set()

    async def _refuse_stream(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        self.refused_streams += 1
        self._log_limited("stream_limit", logging.WARNING, "refused a WatchLoads stream from %s: %d open, "
                          "the limit (--max-streams); %d refused so far", context.peer(), self._streams,
                          self.refused_streams)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"WatchLoads: {self._streams} streams open, this server's limit "
                            "(--max-streams); retry later, or share one stream per client")

    async def _write(self, context: grpc.aio.ServicerContext[bytes, bytes], message: bytes) -> bool:
        """Write one WatchLoads message; False when the subscriber went away (counted, DEBUG).

        A write the call ends under (the client cancelled, or its connection died
        while the write waited for flow control) fails with grpc's internal error
        type; written from a generator, grpc would log each at ERROR with a traceback.
        """
        try:
            await context.write(message)
        except Exception as e:  # noqa: BLE001 - the write of bytes failed: the call is over, counted
            self.gone_subscribers += 1
            log.debug("WatchLoads subscriber %s went away during a write (%s: %s)", context.peer(),
                      type(e).__name__, e)
            return False
        return True

    # -- shutdown ----------------------------------------------------------------------

    def close(self) -> None:
        """End every WatchLoads stream (UNAVAILABLE) without waiting for them."""
        self._closed = True
        self._changes.wake()
        self._timers.wake()
        if self._pump_task is not None:
            self._pump_task.cancel()

    async def aclose(self, timeout: float = CLOSE_WAIT) -> None:
        """Health NOT_SERVING, end every stream with UNAVAILABLE, wait up to timeout for them."""
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        self.close()
        if self._streams:
            self._streams_done = asyncio.Event()
            try:
                await asyncio.wait_for(self._streams_done.wait(), timeout)
            except TimeoutError:
                log.warning("%d WatchLoads stream(s) still writing after %.1f s (clients not reading); "
                            "the server stop cancels them", self._streams, timeout)
        if self._pump_task is not None:
            try:
                await self._pump_task
            except asyncio.CancelledError:
                pass
            self._pump_task = None

    @property
    def streams(self) -> int:
        """WatchLoads streams currently open."""
        return self._streams


def _reflection_servicer(names: tuple[str, ...], services: LoadServices) -> Any:
    from grpc_reflection.v1alpha.reflection import aio as reflection_aio

    class _Reflection(reflection_aio.ReflectionServicer):
        async def ServerReflectionInfo(self, request_iterator: Any, context: Any) -> Any:
            await services._authorize(context)
            # types-grpcio-reflection declares a coroutine; at runtime it is an async generator
            async for response in super().ServerReflectionInfo(  # type: ignore[attr-defined]
                    request_iterator, context):
                yield response

    return _Reflection(names)


def add_load_services(server: grpc.aio.Server, store: LoadStore, *, sglang: bool = True,
                      health: bool = True, reflection: bool = True,
                      api_key: str | None = None, extra_services: tuple[str, ...] = (),
                      max_streams: int = DEFAULT_MAX_STREAMS) -> LoadServices:
    """Add loadsvc's gRPC services over ``store`` to a ``grpc.aio`` server (before it starts).

    api_key: when set, every method except health requires metadata
    ``authorization: Bearer <api_key>`` (UNAUTHENTICATED otherwise).
    extra_services: full names of services the caller adds to the same server
    over the same store (ORCA: loadsvc.surfaces.orca.ORCA_SERVICE), listed in reflection
    and health alongside loadsvc's own.
    max_streams: WatchLoads streams open at once; one more is RESOURCE_EXHAUSTED.
    """
    names = [LOAD_SERVICE] + ([SGLANG_SERVICE] if sglang else []) + list(extra_services)
    health_servicer = None
    if health:
        from grpc_health.v1 import health as grpc_health
        from grpc_health.v1 import health_pb2_grpc

        health_servicer = grpc_health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = LoadServices(store, api_key=api_key, health=health_servicer, service_names=tuple(names),
                            max_streams=max_streams)

    get: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(services.get_loads)
    handlers: dict[str, dict[str, Any]] = {
        LOAD_SERVICE: {"GetLoads": get, "WatchLoads": grpc.unary_stream_rpc_method_handler(services.watch_loads)},
    }
    if sglang:
        handlers[SGLANG_SERVICE] = {"GetLoads": get}
    for service, methods in handlers.items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        if hasattr(server, "add_registered_method_handlers"):
            server.add_registered_method_handlers(service, methods)

    if reflection:
        from grpc_health.v1 import health_pb2
        from grpc_reflection.v1alpha import reflection as grpc_reflection
        from grpc_reflection.v1alpha import reflection_pb2_grpc

        listed = [*names]
        if health:
            listed.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        listed.append(grpc_reflection.SERVICE_NAME)
        if sglang:
            import loadsvc._proto.sglang.grpc.scheduler.sglang_scheduler_pb2  # noqa: F401  (descriptor pool)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
            _reflection_servicer(tuple(listed), services), server)  # (untyped in its stubs)
    return services
