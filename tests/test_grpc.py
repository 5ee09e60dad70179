"""loadsvc/surfaces/grpc.py in-process: a grpc.aio server on a free loopback port with
add_load_services over a LoadStore, a publisher writing the region, grpc.aio clients."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loadsvc import (
    DisaggregationMetrics,
    LoadSnapshot,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    ShmPublisher,
    SpeculativeMetrics,
    __version__,
)
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc
from loadsvc._proto.sglang.grpc.scheduler import sglang_scheduler_pb2 as sg
from loadsvc._proto.sglang.grpc.scheduler import sglang_scheduler_pb2_grpc as sg_grpc
from loadsvc.core.store import LoadStore
from loadsvc.settings import StoreSettings
from loadsvc.surfaces.grpc import LoadServices, add_load_services

DP_SIZE = 3
SECTION_FIELDS = ("memory", "speculative", "lora", "disaggregation", "queues")
HEALTHY = pb.LOAD_STATUS_HEALTHY
STALE = pb.LOAD_STATUS_STALE


def full_snapshot(rank: int, running: int) -> Any:
    """A snapshot with every section filled and distinct values per field."""
    return LoadSnapshot(
        dp_rank=rank, num_running_reqs=running, num_waiting_reqs=3 + rank, num_total_reqs=running + 3 + rank,
        num_used_tokens=40960 + rank, max_total_num_tokens=200000, token_usage=0.25, gen_throughput=1500.5,
        cache_hit_rate=0.4, utilization=0.7, max_running_requests=256, num_waiting_uncached_tokens=17,
        num_total_tokens=41000,
        memory=MemoryMetrics(weight_gb=15.2, kv_cache_gb=40.0, graph_gb=1.5, token_capacity=123456),
        speculative=SpeculativeMetrics(accept_length=2.5, accept_rate=0.75),
        lora=LoRAMetrics(slots_used=2, slots_total=8, utilization=0.25),
        disaggregation=DisaggregationMetrics(mode="prefill", prefill_prealloc_queue_reqs=4,
                                             kv_transfer_speed_gb_s=12.5),
        queues=QueueMetrics(waiting=3, grammar=1, paused=0, retracted=2),
    )


def core_snapshot(rank: int, running: int) -> Any:
    return LoadSnapshot(dp_rank=rank, num_running_reqs=running, num_waiting_reqs=1, num_total_reqs=running + 1,
                        token_usage=0.5, gen_throughput=100.0, utilization=0.5, max_running_requests=64)


@dataclass
class Env:
    shm: Path
    store: LoadStore
    server: grpc.aio.Server
    services: LoadServices
    port: int
    channel: grpc.aio.Channel
    publishers: dict[int, ShmPublisher] = field(default_factory=dict)

    @property
    def stub(self) -> pb_grpc.LoadServiceStub:
        return pb_grpc.LoadServiceStub(self.channel)

    def publish(self, snap: Any) -> int:
        pub = self.publishers.get(snap.dp_rank)
        if pub is None:
            pub = self.publishers[snap.dp_rank] = ShmPublisher(self.shm, dp_size=DP_SIZE, dp_rank=snap.dp_rank)
        return pub.publish(snap)


@pytest.fixture
async def make_env(shm_path: Path) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    envs: list[Env] = []

    async def make(*, dp_size: int | None = DP_SIZE, stale_after: float = 3.0, api_key: str | None = None,
                   publish: bool = True) -> Env:
        store = LoadStore(StoreSettings(shm=shm_path, dp_size=dp_size, stale_after=stale_after,
                                        unreachable_after=max(30.0, stale_after)))
        await store.start()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        services = add_load_services(server, store, api_key=api_key)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        env = Env(shm_path, store, server, services, port, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        envs.append(env)
        if publish:
            env.publish(full_snapshot(0, 12))
            env.publish(core_snapshot(1, 5))
            await wait_for(lambda: len(store.view().snapshots) == 2)
        return env

    yield make
    for env in envs:
        await env.channel.close()
        await env.services.aclose(timeout=1.0)
        await env.server.stop(0.5)
        await env.store.stop()
        env.store.close()
        for pub in env.publishers.values():
            pub.close()


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class Subscriber:
    """A WatchLoads call read by a task into a queue (cancelling a pending read would cancel the call)."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.call:
                self.queue.put_nowait(msg)
        except grpc.aio.AioRpcError as e:
            self.queue.put_nowait(e)

    async def next(self, timeout: float = 2.0) -> Any:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        self.call.cancel()
        self.task.cancel()


def watch(env: Env, **request: Any) -> Subscriber:
    return Subscriber(env.stub.WatchLoads(pb.WatchLoadsRequest(**request)))


# -- GetLoads -------------------------------------------------------------------------------------


async def test_get_loads_all_ranks_values_equal_published(make_env: Any) -> None:
    env = await make_env()
    before = time.time()
    resp = await env.stub.GetLoads(pb.GetLoadsRequest())
    assert resp.version == __version__
    assert resp.dp_rank_count == DP_SIZE
    assert [load.dp_rank for load in resp.loads] == [0, 1]  # rank 2 never published
    ts = datetime.fromisoformat(resp.timestamp)
    assert ts.utcoffset() is not None and abs(ts.timestamp() - before) < 5
    r0, r1 = resp.loads
    want = full_snapshot(0, 12)
    for name in ("num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
                 "max_total_num_tokens", "token_usage", "gen_throughput", "cache_hit_rate", "utilization",
                 "max_running_requests", "num_waiting_uncached_tokens", "num_total_tokens"):
        assert getattr(r0, name) == getattr(want, name), name
    assert r0.memory.token_capacity == 123456 and r0.memory.weight_gb == pytest.approx(15.2)
    assert r0.speculative.accept_length == 2.5
    assert r0.lora.slots_total == 8
    assert r0.disaggregation.mode == "prefill" and r0.disaggregation.kv_transfer_speed_gb_s == 12.5
    assert r0.queues.retracted == 2
    assert r0.seq == 1 and r0.publish_time_ns > 0
    assert r0.status == HEALTHY and 0 <= r0.age_ms < 3000
    assert r1.num_running_reqs == 5
    assert not any(r1.HasField(name) for name in SECTION_FIELDS)  # rank 1 published none
    agg = resp.aggregate
    assert agg.total_running_reqs == 17
    assert agg.total_waiting_reqs == 3 + 1
    assert agg.total_reqs == (12 + 3) + (5 + 1)
    assert agg.avg_token_usage == pytest.approx((0.25 + 0.5) / 2)
    assert agg.avg_throughput == pytest.approx((1500.5 + 100.0) / 2)


async def test_get_loads_one_rank_and_include_filters(make_env: Any) -> None:
    env = await make_env()
    resp = await env.stub.GetLoads(pb.GetLoadsRequest(dp_rank=1))
    assert [load.dp_rank for load in resp.loads] == [1]
    assert resp.dp_rank_count == DP_SIZE
    assert resp.aggregate.total_running_reqs == 5  # aggregate over the selection

    resp = await env.stub.GetLoads(pb.GetLoadsRequest(dp_rank=2))  # in range, never published
    assert list(resp.loads) == []

    cases = {
        ("core",): set(),
        ("memory",): {"memory"},
        ("spec", "lora"): {"speculative", "lora"},
        ("core,disagg",): {"disaggregation"},
        ("queues", "core"): {"queues"},
        ("all",): set(SECTION_FIELDS),
        (): set(SECTION_FIELDS),
        ("ALL",): set(SECTION_FIELDS),
    }
    for include, sections in cases.items():
        resp = await env.stub.GetLoads(pb.GetLoadsRequest(dp_rank=0, include=include))
        (load,) = resp.loads
        present = {name for name in SECTION_FIELDS if load.HasField(name)}
        assert present == sections, include
        assert load.num_running_reqs == 12  # core fields always there


async def test_get_loads_bytes_shared_per_view(make_env: Any) -> None:
    env = await make_env()
    raw = env.channel.unary_unary("/loadsvc.v1.LoadService/GetLoads")  # no (de)serializers: bytes
    view = env.store.view()
    a = await raw(pb.GetLoadsRequest(dp_rank=0).SerializeToString())
    b = await raw(pb.GetLoadsRequest(dp_rank=0).SerializeToString())
    if env.store.view() is view:  # same view: one serialization, identical bytes
        assert a == b
        assert view.encoded(("pb", env.services._selection(pb.GetLoadsRequest(dp_rank=0))), None) == a
    assert pb.GetLoadsResponse.FromString(a).loads[0].num_running_reqs == 12


async def test_store_without_region_reports_no_ranks(make_env: Any) -> None:
    env = await make_env(dp_size=None, publish=False)
    resp = await env.stub.GetLoads(pb.GetLoadsRequest())
    assert resp.dp_rank_count == 0 and list(resp.loads) == []
    resp = await env.stub.GetLoads(pb.GetLoadsRequest(dp_rank=7))  # no region: range unknown
    assert list(resp.loads) == []


# -- bad requests -----------------------------------------------------------------------------------


async def test_bad_requests_get_invalid_argument_naming_the_field(make_env: Any) -> None:
    env = await make_env()
    bad_get = [
        (pb.GetLoadsRequest(dp_rank=-1), "dp_rank"),
        (pb.GetLoadsRequest(dp_rank=DP_SIZE), "dp_rank"),
        (pb.GetLoadsRequest(dp_rank=2**31 - 1), "dp_rank"),
        (pb.GetLoadsRequest(include=["memory", "bogus"]), "include"),
        (pb.GetLoadsRequest(include=["core,nope"]), "include"),
        (pb.GetLoadsRequest(include=["core"] * 9), "include"),  # more than 8 values
        (pb.GetLoadsRequest(include=["memory," * 8]), "include"),  # 9 tokens, the last one empty
        (pb.GetLoadsRequest(include=["m" * 129]), "include"),  # a value longer than 128 characters
    ]
    for request, name in bad_get:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.stub.GetLoads(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert err.value.details().startswith(f"{name}:"), err.value.details()
        assert "Traceback" not in err.value.details()

    bad_watch = [
        (pb.WatchLoadsRequest(dp_rank=-5), "dp_rank"),
        (pb.WatchLoadsRequest(include=["cores"]), "include"),
        (pb.WatchLoadsRequest(include=["all"] * 1000), "include"),
        (pb.WatchLoadsRequest(min_interval_ms=3_600_001), "min_interval_ms"),
        (pb.WatchLoadsRequest(max_interval_ms=3_600_001), "max_interval_ms"),
        (pb.WatchLoadsRequest(max_interval_ms=5), "max_interval_ms"),
        (pb.WatchLoadsRequest(min_interval_ms=500, max_interval_ms=100), "min_interval_ms"),
    ]
    for request, name in bad_watch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in env.stub.WatchLoads(request):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert err.value.details().startswith(f"{name}:"), err.value.details()

    raw = env.channel.unary_unary("/loadsvc.v1.LoadService/GetLoads")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\xff\xff\xff")  # not a protobuf message
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request:")

    resp = await env.stub.GetLoads(pb.GetLoadsRequest())  # the server still answers
    assert len(resp.loads) == 2
    # At the limits: 8 values, 8 tokens in one, 128 characters (spaces around real tokens)
    at_limits = ["core"] * 7 + [",".join(["memory"] * 8).center(128)]
    resp = await env.stub.GetLoads(pb.GetLoadsRequest(include=at_limits))
    assert any(load.HasField("memory") for load in resp.loads)
    assert not any(load.HasField("queues") or load.HasField("lora") for load in resp.loads)


# -- WatchLoads --------------------------------------------------------------------------------------


async def test_watch_initial_then_publish_arrives_quickly(make_env: Any) -> None:
    env = await make_env()
    it = watch(env, max_interval_ms=60_000)
    first = await it.next()
    assert [(load.dp_rank, load.seq) for load in first.loads] == [(0, 1), (1, 1)]
    assert first.dp_rank_count == DP_SIZE and first.aggregate.total_running_reqs == 17
    for running in (20, 21, 22):
        t0 = time.monotonic()
        seq = env.publish(full_snapshot(0, running))
        msg = await it.next(2.0)
        elapsed = time.monotonic() - t0
        assert msg.loads[0].seq == seq and msg.loads[0].num_running_reqs == running
        assert msg.loads[1].seq == 1
        assert elapsed < 0.5, elapsed
    it.cancel()


async def test_watch_filters_rank_and_sections(make_env: Any) -> None:
    env = await make_env()
    it = watch(env, dp_rank=1, include=["core"], max_interval_ms=60_000)
    first = await it.next()
    assert [load.dp_rank for load in first.loads] == [1]
    env.publish(full_snapshot(0, 30))  # another rank: no message for this subscriber
    with pytest.raises(asyncio.TimeoutError):
        await it.next(0.3)
    env.publish(core_snapshot(1, 9))
    msg = await it.next()
    assert [(load.dp_rank, load.num_running_reqs, load.seq) for load in msg.loads] == [(1, 9, 2)]
    env.publish(full_snapshot(1, 10))
    msg = await it.next()
    assert not any(msg.loads[0].HasField(name) for name in SECTION_FIELDS)  # include=core
    it.cancel()


async def test_watch_heartbeat_when_nothing_changes(make_env: Any) -> None:
    env = await make_env()
    it = watch(env, max_interval_ms=200)
    await it.next()
    stamps = []
    for _ in range(6):
        msg = await it.next(2.0)
        stamps.append(time.monotonic())
        assert [load.seq for load in msg.loads] == [1, 1]  # nothing published: same state
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert all(gap < 1.0 for gap in gaps), gaps  # ~0.2 s; loose: a busy machine delays reads
    # ~0.2 s apart, not a message per store poll: judged on the mean, since a stalled read
    # takes two messages back to back
    assert (stamps[-1] - stamps[0]) / len(gaps) > 0.1, gaps
    it.cancel()


async def test_watch_min_interval_limits_rate_and_ends_on_latest(make_env: Any) -> None:
    env = await make_env()
    call = env.stub.WatchLoads(pb.WatchLoadsRequest(dp_rank=0, min_interval_ms=300, max_interval_ms=10_000))
    received: list[tuple[float, int]] = []

    async def read() -> None:
        async for msg in call:
            received.append((time.monotonic(), msg.loads[0].seq))

    reader = asyncio.create_task(read())
    await wait_for(lambda: len(received) == 1)
    last = 0
    started = time.monotonic()
    for i in range(24):  # 24 changes over ~1.2 s (longer on a busy machine)
        last = env.publish(full_snapshot(0, 100 + i))
        await asyncio.sleep(0.05)
    publishing = time.monotonic() - started
    await wait_for(lambda: received[-1][1] == last, timeout=2.0)
    call.cancel()
    reader.cancel()
    times = [t for t, _ in received]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # The server spaces them >= 0.3 s. Judged on the mean, since a stalled read takes two
    # messages back to back; without the limit the mean would be ~0.05 s.
    assert (times[-1] - times[0]) / len(gaps) >= 0.2, gaps
    assert 3 <= len(received) <= 3 + publishing / 0.3, (publishing, received)  # ~1.2 s / 0.3 s, not 25
    assert [seq for _, seq in received] == sorted(seq for _, seq in received)


async def test_watch_staleness_over_time(make_env: Any) -> None:
    env = await make_env(stale_after=0.3)
    it = watch(env, max_interval_ms=60_000)
    first = await it.next()
    assert [load.status for load in first.loads] == [HEALTHY, HEALTHY]
    t0 = time.monotonic()
    msg = await it.next(3.0)  # no publish: the status change itself is news
    assert [load.status for load in msg.loads] == [STALE, STALE]
    assert all(load.age_ms > 300 for load in msg.loads)
    assert time.monotonic() - t0 < 2.0
    env.publish(core_snapshot(1, 2))  # rank 1 comes back
    msg = await it.next()
    assert [load.status for load in msg.loads] == [STALE, HEALTHY]
    it.cancel()


async def test_slow_subscriber_does_not_delay_others(make_env: Any) -> None:
    env = await make_env()
    # A subscriber that never reads, on its own connection and on the shared one, fed a heartbeat
    # every 10 ms: both fill their flow-control windows and stall in the server's write.
    slow_channel = grpc.aio.insecure_channel(f"127.0.0.1:{env.port}")
    slow_calls = [pb_grpc.LoadServiceStub(ch).WatchLoads(pb.WatchLoadsRequest(max_interval_ms=10))
                  for ch in (slow_channel, env.channel)]
    await asyncio.sleep(2.0)  # ~200 heartbeats of ~400 bytes each per slow subscriber
    it = watch(env, dp_rank=0, max_interval_ms=60_000)
    await it.next()
    latencies = []
    for running in range(40, 45):
        t0 = time.monotonic()
        seq = env.publish(full_snapshot(0, running))
        msg = await it.next(2.0)
        latencies.append(time.monotonic() - t0)
        assert msg.loads[0].seq == seq
        await asyncio.sleep(0.05)
    assert max(latencies) < 0.5, latencies
    assert env.services.streams == 3
    # The slow subscriber, reading at last, catches up and reaches the latest state.
    slow = Subscriber(slow_calls[0])
    deadline = time.monotonic() + 5
    while (await slow.next()).loads[0].seq != seq:
        assert time.monotonic() < deadline
    slow.cancel()
    slow_calls[1].cancel()
    it.cancel()
    await slow_channel.close()


GONE_CLIENT = """
import asyncio, sys, grpc
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb, loads_pb2_grpc as pb_grpc
async def main():
    ch = grpc.aio.insecure_channel(sys.argv[1], options=[("grpc.http2.bdp_probe", 0),
                                                         ("grpc.http2.lookahead_bytes", 1024)])
    calls = [pb_grpc.LoadServiceStub(ch).WatchLoads(pb.WatchLoadsRequest(max_interval_ms=10))
             for _ in range(10)]
    for call in calls:
        await call.read()
    print("reading no more", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


@pytest.mark.integration
async def test_a_subscriber_gone_during_a_write_is_counted_not_an_error(
        make_env: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Subscribers that stop reading (the server's writes stall on flow control), then die."""
    env = await make_env()
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", GONE_CLIENT, f"127.0.0.1:{env.port}",
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), 20) == b"reading no more\n"
        await asyncio.sleep(1.0)  # ~100 heartbeats per stream: far past its window
        with caplog.at_level(logging.DEBUG):
            client.kill()
            await client.wait()
            await wait_for(lambda: env.services.streams == 0, 10.0)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert env.services.gone_subscribers >= 1
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [r.getMessage() for r in errors]
    it = watch(env)  # the service still serves
    assert len((await it.next()).loads) == 2
    it.cancel()


async def test_aclose_ends_streams_with_unavailable(make_env: Any) -> None:
    env = await make_env()
    it = watch(env)
    await it.next()
    await env.services.aclose()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while True:
            await it.next()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert env.services.streams == 0
    health = health_pb2_grpc.HealthStub(env.channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


# -- SGLang contract ------------------------------------------------------------------------------------


async def test_sglang_get_loads_with_a_client_from_the_contract(make_env: Any) -> None:
    env = await make_env()
    stub = sg_grpc.SglangSchedulerStub(env.channel)
    resp = await stub.GetLoads(sg.GetLoadsRequest(include=["core", "memory"]))
    assert isinstance(resp, sg.GetLoadsResponse)
    assert resp.version == __version__ and resp.dp_rank_count == DP_SIZE
    r0, r1 = resp.loads
    assert (r0.dp_rank, r0.num_running_reqs, r0.num_waiting_uncached_tokens) == (0, 12, 17)
    assert r0.token_usage == 0.25 and r0.max_running_requests == 256
    assert r0.memory.token_capacity == 123456 and not r0.HasField("queues")
    assert r1.num_running_reqs == 5
    assert resp.aggregate.total_running_reqs == 17
    resp = await stub.GetLoads(sg.GetLoadsRequest(dp_rank=1))
    assert [load.dp_rank for load in resp.loads] == [1]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetLoads(sg.GetLoadsRequest(dp_rank=-1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Same bytes on both paths (loadsvc's messages are wire-identical to SGLang's).
    raw_sg = env.channel.unary_unary("/sglang.grpc.scheduler.SglangScheduler/GetLoads")
    raw_lv = env.channel.unary_unary("/loadsvc.v1.LoadService/GetLoads")
    request = sg.GetLoadsRequest(dp_rank=0).SerializeToString()
    for _ in range(5):  # same view unless a TICK rebuild fell in between
        view = env.store.view()
        a, b = await raw_sg(request), await raw_lv(request)
        if env.store.view() is view:
            assert a == b
            break
    else:
        pytest.fail("could not catch one view for both calls")


# -- health, reflection, API key ---------------------------------------------------------------------------


async def test_health_follows_region_attach(make_env: Any, shm_path: Path) -> None:
    env = await make_env(dp_size=None, publish=False)
    health = health_pb2_grpc.HealthStub(env.channel)
    names = ("", "loadsvc.v1.LoadService", "sglang.grpc.scheduler.SglangScheduler")
    for name in names:
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING, name
    env.publish(core_snapshot(2, 1))  # a publisher creates the region
    deadline = time.monotonic() + 3
    while (await health.Check(health_pb2.HealthCheckRequest(service=""))).status != \
            health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health did not turn SERVING"
        await asyncio.sleep(0.05)
    for name in names:
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
    resp = await env.stub.GetLoads(pb.GetLoadsRequest())
    assert resp.dp_rank_count == DP_SIZE and [load.dp_rank for load in resp.loads] == [2]


async def list_services(channel: grpc.aio.Channel, metadata: Any = None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[Any]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="sglang.grpc.scheduler.SglangScheduler")

    responses = [r async for r in stub.ServerReflectionInfo(requests(), metadata=metadata)]
    assert responses[1].HasField("file_descriptor_response")
    return sorted(s.name for s in responses[0].list_services_response.service)


async def test_reflection_lists_the_services(make_env: Any) -> None:
    env = await make_env()
    assert await list_services(env.channel) == sorted([
        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
        "loadsvc.v1.LoadService", "sglang.grpc.scheduler.SglangScheduler"])


async def test_api_key_required_except_health(make_env: Any) -> None:
    env = await make_env(api_key="s3cret-key")
    good = (("authorization", "Bearer s3cret-key"),)
    for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret-key"),)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.stub.GetLoads(pb.GetLoadsRequest(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in env.stub.WatchLoads(pb.WatchLoadsRequest(), metadata=metadata):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sg_grpc.SglangSchedulerStub(env.channel).GetLoads(sg.GetLoadsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Reflection without the key: a stream that sends nothing, so the client reads the
    # status (a request written after the server ended the call fails with INTERNAL).
    never = asyncio.Event()

    async def silent() -> AsyncIterator[Any]:
        await never.wait()
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in reflection_pb2_grpc.ServerReflectionStub(env.channel).ServerReflectionInfo(silent()):
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    resp = await env.stub.GetLoads(pb.GetLoadsRequest(), metadata=good)
    assert len(resp.loads) == 2
    resp = await env.stub.GetLoads(pb.GetLoadsRequest(), metadata=(("authorization", "bearer s3cret-key"),))
    assert len(resp.loads) == 2
    assert "loadsvc.v1.LoadService" in await list_services(env.channel, metadata=good)
    health = await health_pb2_grpc.HealthStub(env.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# -- loadsvc serve under requests far past any sane size ---------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def test_serve_refuses_huge_include_lists_and_its_memory_stays_bounded(shm_path: Path,
                                                                       serve_process: Any) -> None:
    """Multi-megabyte include lists: RESOURCE_EXHAUSTED before they are parsed; lists under the
    message limit but past the token limit: INVALID_ARGUMENT naming include; nothing is kept."""
    with ShmPublisher(shm_path, dp_size=2, dp_rank=0) as pub:
        pub.publish(full_snapshot(0, 5))
        server = serve_process(shm_path)
        with grpc.insecure_channel(server.grpc_target) as ch:
            stub = pb_grpc.LoadServiceStub(ch)
            assert len(stub.GetLoads(pb.GetLoadsRequest(), timeout=10).loads) == 1
            before = _rss_kib(server.proc.pid)
            for i in range(16):  # ~4.5 MB each, every one different (a cache keyed on them would grow)
                include = [f"memory{i:02d}", *["memory"] * 640_000]
                request: Any = (pb.GetLoadsRequest(include=include) if i % 2 else
                                pb.WatchLoadsRequest(include=include))
                with pytest.raises(grpc.RpcError) as err:
                    if i % 2:
                        stub.GetLoads(request, timeout=10)
                    else:
                        next(stub.WatchLoads(request, timeout=10))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            for include, what in ((["core"] * 9000, "more than 8 values"),
                                  (["m" * 60_000], "a value of 60000 characters"),
                                  (["," * 100], "101 comma-separated tokens in one value")):
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetLoads(pb.GetLoadsRequest(include=include), timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
                assert err.value.details().startswith("include: ") and what in err.value.details()
                assert len(err.value.details()) < 300
            resp = stub.GetLoads(pb.GetLoadsRequest(dp_rank=0, include=["core", "memory"]), timeout=10)
            assert resp.loads[0].num_running_reqs == 5 and resp.loads[0].HasField("memory")
            grown = _rss_kib(server.proc.pid) - before
        # 72 MB of requests went in; the old per-request cache kept them (hundreds of MB). What is
        # left is allocator slack of a few megabytes.
        assert grown < 32 * 1024, f"serve grew by {grown} KiB"
        assert server.proc.poll() is None
        assert "Traceback" not in server.log()
