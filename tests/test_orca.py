"""ORCA (loadsvc/surfaces/orca.py) and the gRPC embedding (loadsvc/embed.py), over real regions and sockets.

    ShmPublisher(s) --> region --> LoadStore --> grpc.aio server(s): add_orca_service / add_to_grpc_server
                                                      ^
    a Python ORCA client (StreamCoreMetrics) ---------+
    node + @grpc/grpc-js, weighted_round_robin -------+   (tests/js: npm ci --prefix tests/js)
    grpcio C-core, weighted_round_robin --------------+
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from loadsvc import LoadSnapshot, ShmPublisher
from loadsvc.core.store import LoadStore
from loadsvc.embed import add_to_grpc_server, open_store
from loadsvc.surfaces.orca import (
    DEFAULT_REPORT_INTERVAL,
    ORCA_SERVICE,
    RPS_FLOOR,
    TOKENS_PER_REQUEST,
    UTILIZATION_FLOOR,
    OrcaLoadReport,
    OrcaLoadReportRequest,
    OrcaService,
    add_orca_service,
    rank_utilization,
)

JS_DIR = Path(__file__).parent / "js"
ORCA_METHOD = f"/{ORCA_SERVICE}/StreamCoreMetrics"
GET_LOADS = "/loadsvc.v1.LoadService/GetLoads"


class Publishing:
    """Publishes each rank's current snapshot every `period` seconds until told to stop that rank."""

    def __init__(self, path: Path, dp_size: int, period: float = 0.05) -> None:
        self.path = path
        self.dp_size = dp_size
        self.period = period
        self.loads: dict[int, dict[str, Any]] = {}
        self._pubs: dict[int, ShmPublisher] = {}
        self._task: asyncio.Task[None] | None = None

    def set(self, rank: int, **fields: Any) -> None:
        if rank not in self._pubs:
            self._pubs[rank] = ShmPublisher(self.path, dp_size=self.dp_size, dp_rank=rank)
        self.loads[rank] = fields
        self._pubs[rank].publish(LoadSnapshot(dp_rank=rank, **fields))

    def stop(self, rank: int) -> None:
        self.loads.pop(rank, None)
        pub = self._pubs.pop(rank, None)
        if pub is not None:
            pub.close()

    async def __aenter__(self) -> Publishing:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        for rank in list(self._pubs):
            self.stop(rank)

    async def _run(self) -> None:
        while True:
            for rank, fields in list(self.loads.items()):
                self._pubs[rank].publish(LoadSnapshot(dp_rank=rank, **fields))
            await asyncio.sleep(self.period)


class MethodCounter(grpc.aio.ServerInterceptor):
    """Counts the calls a server received, per method."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.counts[details.method] += 1
        return await continuation(details)


async def start_server(store: LoadStore, *, embed: bool = False, **orca_kwargs: Any
                       ) -> tuple[grpc.aio.Server, int, MethodCounter, Any]:
    counter = MethodCounter()
    server = grpc.aio.server(interceptors=[counter])
    if embed:
        added = add_to_grpc_server(server, store, **orca_kwargs)
    else:
        added = add_orca_service(server, store, **orca_kwargs)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, counter, added


def orca_stream(channel: grpc.aio.Channel, interval: float | None) -> Any:
    request = OrcaLoadReportRequest()
    if interval is not None:
        request.report_interval.CopyFrom(Duration(seconds=int(interval), nanos=int(interval % 1 * 1e9)))
    stub = channel.unary_stream(ORCA_METHOD, request_serializer=OrcaLoadReportRequest.SerializeToString,
                                response_deserializer=OrcaLoadReport.FromString)
    return stub(request)


async def collect(call: Any, window: float) -> list[tuple[float, Any]]:
    """(time since start, report) for every report received within window seconds."""
    out: list[tuple[float, Any]] = []
    start = time.monotonic()

    async def read() -> None:
        async for report in call:
            out.append((time.monotonic() - start, report))

    try:
        await asyncio.wait_for(read(), window)
    except TimeoutError:
        pass
    call.cancel()
    return out


async def next_report(call: Any, timeout: float = 2.0) -> Any:
    return await asyncio.wait_for(call.read(), timeout)


async def wait_report(call: Any, predicate: Any, timeout: float) -> Any:
    """Read reports until one satisfies predicate; fail with the last one after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await next_report(call)
        if predicate(last):
            return last
    pytest.fail(f"no report matched within {timeout} s; last report:\n{last}")


RANK0 = dict(num_running_reqs=8, num_waiting_reqs=8, num_total_reqs=16, num_used_tokens=3000,
             num_total_tokens=4000, max_total_num_tokens=10000, max_running_requests=32,
             token_usage=0.3, gen_throughput=1000.0, cache_hit_rate=0.5, utilization=0.1,
             num_waiting_uncached_tokens=700)
RANK1 = dict(num_running_reqs=30, num_waiting_reqs=0, num_total_reqs=30, num_used_tokens=1000,
             num_total_tokens=1000, max_total_num_tokens=10000, max_running_requests=32,
             token_usage=0.1, gen_throughput=1560.0, cache_hit_rate=0.3, utilization=0.2)
U0 = 0.3 + 8 / 32  # busy = token_usage 0.3 (> running 0.25, utilization 0.1); queue 8/32
U1 = 30 / 32  # busy = running 30/32; no queue


@pytest.fixture
def region(tmp_path: Path) -> Path:
    return tmp_path / "orca.shm"


# -- the mapping -----------------------------------------------------------------------------


def test_rank_utilization_terms() -> None:
    assert rank_utilization(LoadSnapshot(dp_rank=0, **RANK0)) == pytest.approx(U0)
    assert rank_utilization(LoadSnapshot(dp_rank=1, **RANK1)) == pytest.approx(U1)
    full = LoadSnapshot(dp_rank=0, token_usage=1.7, num_waiting_reqs=500, max_running_requests=8)
    assert rank_utilization(full) == 2.0  # busy and queue each capped at 1
    no_cap = LoadSnapshot(dp_rank=0, num_running_reqs=5, num_waiting_reqs=1)
    assert rank_utilization(no_cap) == 1.0  # unknown capacity: one waiting request counts as full


async def test_report_follows_the_mapping(region: Path) -> None:
    store = open_store(region, dp_size=2)
    async with Publishing(region, 2) as pub:
        pub.set(0, **RANK0)
        pub.set(1, **RANK1)
        server, port, counter, _ = await start_server(store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = orca_stream(ch, 0.1)
                r = await next_report(call)
                call.cancel()
        finally:
            await server.stop(None)
    assert counter.counts[ORCA_METHOD] == 1
    app = (U0 + U1) / 2
    assert r.application_utilization == pytest.approx(app)
    assert r.cpu_utilization == pytest.approx(app)
    assert r.mem_utilization == pytest.approx(0.2)  # mean token_usage
    assert r.rps_fractional == pytest.approx((1000 + 1560) / TOKENS_PER_REQUEST)  # 10 > floor 2
    assert r.eps == 0
    assert dict(r.utilization) == pytest.approx(
        {"token_usage": 0.2, "utilization": 0.15, "running": 38 / 64})
    assert dict(r.named_metrics) == pytest.approx({
        "num_running_reqs": 38, "num_waiting_reqs": 8, "num_total_reqs": 46, "num_used_tokens": 4000,
        "num_total_tokens": 5000, "num_waiting_uncached_tokens": 700, "max_total_num_tokens": 20000,
        "max_running_requests": 64, "gen_throughput": 2560, "cache_hit_rate": 0.4,
        "ranks_healthy": 2, "ranks_stale": 0, "ranks_unreachable": 0})


async def test_idle_server_reports_positive_floors(region: Path) -> None:
    """grpc-js drops a report whose weight is 0: an idle server must still report > 0."""
    store = open_store(region, dp_size=3)
    async with Publishing(region, 3) as pub:
        for rank in range(3):
            pub.set(rank, max_running_requests=16)
        server, port, _, _ = await start_server(store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = orca_stream(ch, None)
                r = await next_report(call)
                call.cancel()
        finally:
            await server.stop(None)
    assert r.application_utilization == UTILIZATION_FLOOR
    assert r.cpu_utilization == UTILIZATION_FLOOR
    assert r.rps_fractional == 3 * RPS_FLOOR  # one floor per healthy rank
    assert r.named_metrics["ranks_healthy"] == 3


async def test_ranks_select_what_a_server_reports(region: Path) -> None:
    store = open_store(region, dp_size=4)
    async with Publishing(region, 4) as pub:
        pub.set(0, **RANK0)
        pub.set(1, **RANK1)
        server, port, _, _ = await start_server(store, ranks=[1, 3])  # rank 3 never published
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = orca_stream(ch, 0.1)
                r = await next_report(call)
                call.cancel()
        finally:
            await server.stop(None)
    assert r.application_utilization == pytest.approx(U1)  # rank 3 is left out, not averaged in
    assert r.named_metrics["num_running_reqs"] == 30
    assert r.named_metrics["ranks_healthy"] == 1
    assert r.named_metrics["ranks_unreachable"] == 1


def test_bad_arguments_are_refused(region: Path) -> None:
    store = open_store(region, dp_size=1)
    with pytest.raises(ValueError, match="min_report_interval"):
        OrcaService(store, min_report_interval=0)
    with pytest.raises(ValueError, match="ranks"):
        OrcaService(store, ranks=[-1])
    with pytest.raises(ValueError, match="ranks"):
        OrcaService(store, ranks=[])


# -- report_interval -------------------------------------------------------------------------


async def test_report_interval_is_honoured(region: Path) -> None:
    store = open_store(region, dp_size=1)
    async with Publishing(region, 1) as pub:
        pub.set(0, **RANK0)
        server, port, _, _ = await start_server(store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                reports = await collect(orca_stream(ch, 0.25), 1.4)
        finally:
            await server.stop(None)
    times = [t for t, _ in reports]
    # one at once, then every 0.25 s: 6 in 1.4 s (loose bounds for a busy machine)
    assert 3 <= len(times) <= 7, times
    assert times[0] < 0.5, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 0.15 <= sum(gaps) / len(gaps) <= 0.5, gaps


async def test_short_interval_is_clamped_and_unset_means_default(region: Path) -> None:
    store = open_store(region, dp_size=1)
    async with Publishing(region, 1) as pub:
        pub.set(0, **RANK0)
        server, port, _, _ = await start_server(store, min_report_interval=0.2)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                fast = await collect(orca_stream(ch, 0.01), 1.0)  # asks for 100/s
                unset = await collect(orca_stream(ch, None), DEFAULT_REPORT_INTERVAL * 0.8)
        finally:
            await server.stop(None)
    assert 2 <= len(fast) <= 8, [t for t, _ in fast]  # 0.2 s apart: ~6, not ~100
    assert len(unset) == 1  # the first report at once, the next after 1 s


# -- stale and unreachable ranks ---------------------------------------------------------------


async def test_stale_and_unreachable_ranks_are_reflected_on_an_open_stream(region: Path) -> None:
    store = open_store(region, dp_size=2, stale_after=0.3, unreachable_after=1.0)
    async with Publishing(region, 2) as pub:
        pub.set(0, **RANK0)
        pub.set(1, **RANK1)
        server, port, _, _ = await start_server(store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = orca_stream(ch, 0.1)
                first = await next_report(call)
                assert first.named_metrics["ranks_healthy"] == 2

                pub.stop(1)  # rank 1's engine stops publishing
                r = await wait_report(call, lambda r: r.named_metrics["ranks_stale"] == 1, 2.0)
                # a stale rank counts as fully utilized, its old numbers are not summed
                assert r.application_utilization == pytest.approx((U0 + 1.0) / 2)
                assert r.named_metrics["num_running_reqs"] == RANK0["num_running_reqs"]
                assert r.named_metrics["ranks_healthy"] == 1

                r = await wait_report(call, lambda r: r.named_metrics["ranks_unreachable"] == 1, 3.0)
                assert r.application_utilization == pytest.approx(U0)  # gone: left out
                assert r.named_metrics["ranks_stale"] == 0

                pub.stop(0)  # no healthy rank left
                r = await wait_report(call, lambda r: r.named_metrics["ranks_healthy"] == 0, 2.0)
                assert r.application_utilization == 1.0
                assert r.cpu_utilization == 1.0
                assert r.rps_fractional > 0
                assert r.named_metrics["num_running_reqs"] == 0

                pub.set(0, **RANK1)  # the engine comes back with other numbers
                r = await wait_report(call, lambda r: r.named_metrics["ranks_healthy"] == 1, 2.0)
                assert r.application_utilization == pytest.approx(U1)
                call.cancel()
        finally:
            await server.stop(None)


# -- the embedding and `loadsvc serve` -------------------------------------------------------------


async def _reflected_services(channel: grpc.aio.Channel) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2

    stub = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    call = stub(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    response = await call.read()
    call.cancel()
    return {s.name for s in response.list_services_response.service}


async def test_add_to_grpc_server_serves_loads_orca_health_and_reflection(region: Path) -> None:
    from grpc_health.v1 import health_pb2

    store = open_store(region, dp_size=2)
    async with Publishing(region, 2) as pub:
        pub.set(0, **RANK0)
        pub.set(1, **RANK1)
        server, port, _, surfaces = await start_server(store, embed=True, orca_ranks=[0])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                loads = await ch.unary_unary(GET_LOADS)(b"", timeout=5)
                assert b"" != loads
                r = await next_report(orca_stream(ch, 0.1))
                assert r.application_utilization == pytest.approx(U0)  # orca_ranks=[0]
                listed = await _reflected_services(ch)
                assert {ORCA_SERVICE, "loadsvc.v1.LoadService",
                        "sglang.grpc.scheduler.SglangScheduler", "grpc.health.v1.Health"} <= listed
                check = ch.unary_unary("/grpc.health.v1.Health/Check",
                                       request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                       response_deserializer=health_pb2.HealthCheckResponse.FromString)
                health = await check(health_pb2.HealthCheckRequest(service=ORCA_SERVICE), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                open_stream = orca_stream(ch, 0.1)
                await next_report(open_stream)
                await surfaces.aclose()  # ends ORCA streams at once, not after the stop grace
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    while True:
                        await next_report(open_stream)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)


async def test_orca_is_not_behind_the_api_key(region: Path) -> None:
    """WRR clients open ORCA without their calls' credentials; GetLoads still needs the key."""
    store = open_store(region, dp_size=1)
    async with Publishing(region, 1) as pub:
        pub.set(0, **RANK0)
        server, port, _, _ = await start_server(store, embed=True, api_key="s3cret")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ch.unary_unary(GET_LOADS)(b"", timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                await ch.unary_unary(GET_LOADS)(b"", timeout=5,
                                                metadata=(("authorization", "Bearer s3cret"),))
                r = await next_report(orca_stream(ch, 0.1))
                assert r.application_utilization == pytest.approx(U0)
        finally:
            await server.stop(None)


def test_loadsvc_serve_serves_orca_for_orca_ranks(shm_path: Path, serve_process: Any) -> None:
    pubs = [ShmPublisher(shm_path, dp_size=2, dp_rank=r) for r in range(2)]
    stop = threading.Event()

    def publish() -> None:  # both ranks stay healthy however long the server takes to start
        while not stop.is_set():
            pubs[0].publish(LoadSnapshot(dp_rank=0, **RANK0))
            pubs[1].publish(LoadSnapshot(dp_rank=1, **RANK1))
            stop.wait(0.05)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        server = serve_process(shm_path, args=["--orca-ranks", "1"])

        async def read_reports() -> list[Any]:
            async with grpc.aio.insecure_channel(server.grpc_target) as ch:
                listed = await _reflected_services(ch)
                assert ORCA_SERVICE in listed, listed
                return [r for _, r in await collect(orca_stream(ch, 0.1), 0.5)]

        reports = asyncio.run(read_reports())
        assert 2 <= len(reports) <= 8  # every 0.1 s for 0.5 s
        assert reports[-1].application_utilization == pytest.approx(U1)  # rank 1 only
        assert reports[-1].named_metrics["ranks_healthy"] == 1

        # An open ORCA stream does not hold up SIGTERM (streams end at once, no grace wait).
        ch = grpc.insecure_channel(server.grpc_target)
        stub = ch.unary_stream(ORCA_METHOD, request_serializer=OrcaLoadReportRequest.SerializeToString,
                               response_deserializer=OrcaLoadReport.FromString)
        stream = stub(OrcaLoadReportRequest())
        next(stream)
        t0 = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        ch.close()
    finally:
        stop.set()
        publisher.join()
        for p in pubs:
            p.close()


# -- stock clients balancing by ORCA: grpc-js and grpcio C-core --------------------------------------

# Loads 0.2 and 0.8 with equal throughput: weights rps/utilization are 4:1.
LIGHT = dict(token_usage=0.2, max_running_requests=64, gen_throughput=512.0)
HEAVY = dict(token_usage=0.8, max_running_requests=64, gen_throughput=512.0)
SPLIT_BAND = (2.5, 6.5)


async def _two_engines(tmp_path: Path) -> Any:
    """Two 'engines': each its own region and gRPC server with add_to_grpc_server (GetLoads + ORCA)."""
    stores, servers, pubs = [], [], []
    for name, load in (("light", LIGHT), ("heavy", HEAVY)):
        path = tmp_path / f"{name}.shm"
        pub = Publishing(path, 1, period=0.1)
        await pub.__aenter__()
        pub.set(0, **load)
        store = open_store(path, stale_after=5.0)
        server, port, counter, surfaces = await start_server(store, embed=True)
        stores.append(store)
        pubs.append(pub)
        servers.append((server, port, counter, surfaces))
    return pubs, servers


async def _stop(pubs: list[Publishing], servers: list[Any]) -> None:
    for server, _, _, surfaces in servers:
        await surfaces.aclose()
        await server.stop(None)
    for pub in pubs:
        await pub.__aexit__(None, None, None)


async def _weights_settled(servers: list[Any], timeout: float = 15.0) -> None:
    """Wait until the client has an ORCA stream open to every server, then a few report periods.

    The clients ask for a report every 0.1 s and recompute weights every 0.1 s.
    """
    deadline = time.monotonic() + timeout
    while not all(surfaces.orca.streams >= 1 for _, _, _, surfaces in servers):
        if time.monotonic() > deadline:
            pytest.fail(f"the client opened no ORCA stream to some server within {timeout} s: "
                        f"{[dict(c.counts) for _, _, c, _ in servers]}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.6)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the grpc-js weighted_round_robin test needs Node.js >= 18)")
    if not (JS_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        # .ci/run installs it up front; a bare `pytest` on a fresh clone installs it here,
        # from package-lock.json, once.
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(f"{JS_DIR}/node_modules is missing and npm is not installed: run "
                        "`npm ci --prefix tests/js` where npm exists")
        done = subprocess.run([npm, "ci", "--prefix", str(JS_DIR), "--no-audit", "--no-fund",
                               "--loglevel=error"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"`npm ci --prefix tests/js` failed ({done.returncode}): {done.stderr[-2000:]}")
    return node


@pytest.mark.integration
async def test_grpc_js_weighted_round_robin_follows_orca(tmp_path: Path) -> None:
    node = _node()
    pubs, servers = await _two_engines(tmp_path)
    try:
        (_, light_port, light, _), (_, heavy_port, heavy, _) = servers
        target = f"ipv4:127.0.0.1:{light_port},127.0.0.1:{heavy_port}"
        proc = await asyncio.create_subprocess_exec(
            node, str(JS_DIR / "wrr_client.js"), target, GET_LOADS, "15000", "1500", "8",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await _weights_settled(servers)
            out, err = await asyncio.wait_for(proc.communicate(b"go\n"), 40)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail("the grpc-js client did not finish within 40 s")
        assert proc.returncode == 0, err.decode()
        result = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        await _stop(pubs, servers)

    assert result["errors"] == 0, result
    peers = result["peers"]
    n_light = peers.get(f"127.0.0.1:{light_port}", 0)
    n_heavy = peers.get(f"127.0.0.1:{heavy_port}", 0)
    assert n_light + n_heavy == 1500, result
    ratio = n_light / max(n_heavy, 1)
    assert SPLIT_BAND[0] <= ratio <= SPLIT_BAND[1], f"light:heavy = {n_light}:{n_heavy} ({ratio:.2f}), {result}"
    # each engine saw the client's ORCA stream, on the port it served the calls on
    assert light.counts[ORCA_METHOD] >= 1 and heavy.counts[ORCA_METHOD] >= 1, (light.counts, heavy.counts)
    assert light.counts[GET_LOADS] >= n_light and heavy.counts[GET_LOADS] >= n_heavy


async def test_grpcio_c_core_weighted_round_robin_follows_orca(tmp_path: Path) -> None:
    config = {"loadBalancingConfig": [{"weighted_round_robin": {
        "enableOobLoadReport": True, "oobReportingPeriod": "0.1s", "blackoutPeriod": "0s",
        "weightUpdatePeriod": "0.1s",
        # grpc-js's spelling rides along: C-core ignores keys it does not know
        "enable_oob_load_report": True, "oob_load_reporting_period": "0.1s"}}]}
    pubs, servers = await _two_engines(tmp_path)
    try:
        (_, light_port, light, _), (_, heavy_port, heavy, _) = servers
        target = f"ipv4:127.0.0.1:{light_port},127.0.0.1:{heavy_port}"
        options = [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 0)]
        async with grpc.aio.insecure_channel(target, options=options) as ch:
            get = ch.unary_unary(GET_LOADS)
            await get(b"", timeout=5)  # connect; the ORCA streams open with the connections
            await _weights_settled(servers)
            before = (light.counts[GET_LOADS], heavy.counts[GET_LOADS])
            for _ in range(150):
                await asyncio.gather(*(get(b"", timeout=5) for _ in range(8)))
            n_light = light.counts[GET_LOADS] - before[0]
            n_heavy = heavy.counts[GET_LOADS] - before[1]
    finally:
        await _stop(pubs, servers)
    assert n_light + n_heavy == 1200
    ratio = n_light / max(n_heavy, 1)
    assert SPLIT_BAND[0] <= ratio <= SPLIT_BAND[1], f"light:heavy = {n_light}:{n_heavy} ({ratio:.2f})"
    assert light.counts[ORCA_METHOD] >= 1 and heavy.counts[ORCA_METHOD] >= 1, (light.counts, heavy.counts)
