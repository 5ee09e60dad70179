"""loadsvc/server.py through the real `loadsvc serve` process: ports, surfaces, signals, auth."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import free_port, port_in_use, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadsvc import LoadSnapshot, MemoryMetrics, ShmPublisher
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc
from loadsvc._proto.sglang.grpc.scheduler import sglang_scheduler_pb2 as sg
from loadsvc._proto.sglang.grpc.scheduler import sglang_scheduler_pb2_grpc as sg_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StreamReader:
    """Reads a (sync) WatchLoads call on a thread into a queue; next(timeout) takes one item."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.items: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.items.put(msg)
        except grpc.RpcError as e:
            self.items.put(e)

    def next(self, timeout: float = 2.0) -> Any:
        item = self.items.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture
def channel_to() -> Iterator[Any]:
    channels: list[grpc.Channel] = []

    def open_channel(target: str) -> grpc.Channel:
        ch = grpc.insecure_channel(target)
        channels.append(ch)
        return ch

    yield open_channel
    for ch in channels:
        ch.close()


def test_serve_surfaces_and_sigterm(shm_path: Path, serve_process: Any, channel_to: Any) -> None:
    server = serve_process(shm_path, dp_size=4)
    log = server.wait_for_log("REST listening")
    assert f"gRPC listening on 127.0.0.1:{server.grpc_port}" in log
    assert f"REST listening on http://127.0.0.1:{server.http_port}/v1/loads" in log
    with ShmPublisher(shm_path, dp_size=4, dp_rank=2) as pub:
        pub.publish(LoadSnapshot(dp_rank=2, num_running_reqs=7, token_usage=0.5,
                                 memory=MemoryMetrics(weight_gb=3.0)))
        ch = channel_to(server.grpc_target)
        stub = pb_grpc.LoadServiceStub(ch)
        deadline = time.monotonic() + 3
        while not (resp := stub.GetLoads(pb.GetLoadsRequest(), timeout=2)).loads:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert resp.dp_rank_count == 4
        (load,) = resp.loads
        assert (load.dp_rank, load.num_running_reqs, load.token_usage, load.memory.weight_gb) == (2, 7, 0.5, 3.0)
        assert load.status == pb.LOAD_STATUS_HEALTHY

        sg_resp = sg_grpc.SglangSchedulerStub(ch).GetLoads(sg.GetLoadsRequest(dp_rank=2), timeout=2)
        assert [(s.dp_rank, s.num_running_reqs) for s in sg_resp.loads] == [(2, 7)]

        with pytest.raises(grpc.RpcError) as err:  # a bad request, then the server still answers
            stub.GetLoads(pb.GetLoadsRequest(dp_rank=4), timeout=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dp_rank" in err.value.details()

        rest = httpx.get(f"{server.http_url}/v1/loads", timeout=5)
        assert rest.status_code == 200
        assert [(x["dp_rank"], x["num_running_reqs"]) for x in rest.json()["loads"]] == [(2, 7)]

        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == SERVING

        # heartbeats a minute apart: a message within 2 s is the change pushed, not a heartbeat
        stream = StreamReader(stub.WatchLoads(pb.WatchLoadsRequest(dp_rank=2, max_interval_ms=60_000)))
        assert stream.next().loads[0].seq == 1
        t0 = time.monotonic()
        seq = pub.publish(LoadSnapshot(dp_rank=2, num_running_reqs=8))
        while (msg := stream.next()).loads[0].seq != seq:
            pass
        assert msg.loads[0].num_running_reqs == 8 and time.monotonic() - t0 < 2.0

        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as err:  # the stream ends with a status
            while True:
                stream.next(timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    assert not port_in_use(server.grpc_port) and not port_in_use(server.http_port)
    server.wait_for_log("stopped")


def test_serve_waits_for_region_then_serves(shm_path: Path, serve_process: Any, channel_to: Any) -> None:
    server = serve_process(shm_path)  # no --dp-size: waits for a publisher to create the region
    ch = channel_to(server.grpc_target)
    health = health_pb2_grpc.HealthStub(ch)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == NOT_SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="loadsvc.v1.LoadService"),
                        timeout=2).status == NOT_SERVING
    stub = pb_grpc.LoadServiceStub(ch)
    resp = stub.GetLoads(pb.GetLoadsRequest(), timeout=2)
    assert resp.dp_rank_count == 0 and not resp.loads
    assert not shm_path.exists()
    with ShmPublisher(shm_path, dp_size=2, dp_rank=1) as pub:
        pub.publish(LoadSnapshot(dp_rank=1, num_waiting_reqs=4))
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest(), timeout=2).status != SERVING:
            assert time.monotonic() < deadline, "health never turned SERVING"
            time.sleep(0.05)
        resp = stub.GetLoads(pb.GetLoadsRequest(), timeout=2)
        assert resp.dp_rank_count == 2
        assert [(x.dp_rank, x.num_waiting_reqs) for x in resp.loads] == [(1, 4)]
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(10) == 0


def test_serve_api_key(shm_path: Path, serve_process: Any, channel_to: Any) -> None:
    server = serve_process(shm_path, dp_size=1, env={"LOADSVC_API_KEY": "k-123"})
    ch = channel_to(server.grpc_target)
    stub = pb_grpc.LoadServiceStub(ch)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetLoads(pb.GetLoadsRequest(), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = stub.GetLoads(pb.GetLoadsRequest(), metadata=(("authorization", "Bearer k-123"),), timeout=2)
    assert resp.dp_rank_count == 1
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert health.status == SERVING
    assert server.stop() == 0


@pytest.mark.integration
def test_serve_port_in_use_fails_with_a_message(shm_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, other in (("--grpc-port", "--http-port"), ("--http-port", "--grpc-port")):
            proc = subprocess.run(
                [sys.executable, "-m", "loadsvc", "serve", "--shm", str(shm_path), "--dp-size", "1",
                 flag, str(port), other, str(free_port())],
                capture_output=True, text=True, timeout=30)
            assert proc.returncode == 1, proc.stderr
            assert f"cannot listen for {'gRPC' if flag == '--grpc-port' else 'REST'}" in proc.stderr
            assert str(port) in proc.stderr and "Traceback" not in proc.stderr


def test_serve_warns_without_tls_or_key_beyond_loopback(shm_path: Path, serve_process: Any) -> None:
    server = serve_process(shm_path, dp_size=1, args=["--host", "0.0.0.0"])
    server.wait_for_log("without TLS or an API key")
    assert server.stop() == 0


async def test_serve_in_process_ready_and_stop(shm_path: Path) -> None:
    import asyncio

    from loadsvc.server import serve
    from loadsvc.settings import ServeSettings, StoreSettings

    settings = ServeSettings(StoreSettings(shm=shm_path, dp_size=2), grpc_port=free_port(), http_port=free_port())
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(settings, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 10)
    with ShmPublisher(shm_path, dp_size=2, dp_rank=0) as pub:
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=3))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as ch:
            stub = pb_grpc.LoadServiceStub(ch)
            for _ in range(200):
                resp = await stub.GetLoads(pb.GetLoadsRequest())
                if resp.loads:
                    break
                await asyncio.sleep(0.01)
            assert [(x.dp_rank, x.num_running_reqs) for x in resp.loads] == [(0, 3)]
            async with httpx.AsyncClient() as http:
                body = (await http.get(f"http://127.0.0.1:{settings.http_port}/v1/loads")).json()
            assert body["loads"][0]["num_running_reqs"] == 3
            stop.set()
            await asyncio.wait_for(task, 5)
    assert not port_in_use(settings.grpc_port) and not port_in_use(settings.http_port)


@pytest.fixture
def mtls_files(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", "ca.key",
            "-out", "ca.pem", "-subj", "/CN=loadsvc test CA")
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", None)):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        extra = ["-extfile", "san.ext"] if san else []
        if san:
            (tmp_path / "san.ext").write_text(san + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-out", f"{name}.pem", *extra)
    return {n: tmp_path / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_serve_mutual_tls(shm_path: Path, serve_process: Any, mtls_files: dict[str, Path]) -> None:
    f = mtls_files
    server = serve_process(shm_path, dp_size=1, args=[
        "--tls-cert", str(f["server.pem"]), "--tls-key", str(f["server.key"]),
        "--tls-client-ca", str(f["ca.pem"])])
    server.wait_for_log(f"REST listening on https://127.0.0.1:{server.http_port}")
    ca = f["ca.pem"].read_bytes()
    with_cert = grpc.ssl_channel_credentials(ca, f["client.key"].read_bytes(), f["client.pem"].read_bytes())
    with grpc.secure_channel(server.grpc_target, with_cert) as ch:
        resp = pb_grpc.LoadServiceStub(ch).GetLoads(pb.GetLoadsRequest(), timeout=5)
        assert resp.dp_rank_count == 1
    with grpc.secure_channel(server.grpc_target, grpc.ssl_channel_credentials(ca)) as ch:
        with pytest.raises(grpc.RpcError) as err:  # no client certificate: the handshake fails
            pb_grpc.LoadServiceStub(ch).GetLoads(pb.GetLoadsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    url = f"https://127.0.0.1:{server.http_port}/v1/loads"
    import ssl

    ctx = ssl.create_default_context(cafile=str(f["ca.pem"]))
    ctx.load_cert_chain(str(f["client.pem"]), str(f["client.key"]))
    assert httpx.get(url, verify=ctx, timeout=5).json()["dp_rank_count"] == 1
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=ssl.create_default_context(cafile=str(f["ca.pem"])), timeout=5)
    assert server.stop() == 0


# -- --grpc-workers: several gRPC processes on one port ----------------------------------------


def _worker_pids(parent: int) -> set[int]:
    """PIDs of the spawned gRPC workers of a serve process (children running spawn_main)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            pids.add(int(entry.name))
    return pids


def _established_on(port: int, pid: int) -> int:
    """How many ESTABLISHED TCP connections to local port `port` process pid holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC may use v4-mapped IPv6 sockets
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            if local_port == port and cols[3] == "01" and cols[9] in inodes:
                count += 1
    return count


def test_serve_grpc_workers_share_the_port(shm_path: Path, serve_process: Any, channel_to: Any) -> None:
    server = serve_process(shm_path, dp_size=2, args=["--grpc-workers", "3"])
    server.wait_for_log("3 processes share the port", timeout=30)
    workers = _worker_pids(server.proc.pid)
    assert len(workers) == 2, workers
    with ShmPublisher(shm_path, dp_size=2, dp_rank=1) as pub:
        pub.publish(LoadSnapshot(dp_rank=1, num_running_reqs=5))
        # 32 connections (a local subchannel pool each: channels of one process share
        # connections otherwise); the kernel hashes each to one of the three servers.
        channels = [grpc.insecure_channel(server.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(32)]
        stubs = [pb_grpc.LoadServiceStub(ch) for ch in channels]
        for stub in stubs:
            loads = wait_for(lambda stub=stub: stub.GetLoads(pb.GetLoadsRequest(), timeout=2).loads, 5, "rank 1")
            assert [(x.dp_rank, x.num_running_reqs) for x in loads] == [(1, 5)]
        per_process = {pid: _established_on(server.grpc_port, pid) for pid in (server.proc.pid, *workers)}
        assert sum(per_process.values()) == 32 and all(per_process.values()), per_process

        # Every process follows the region: a publish reaches streams on all of them.
        streams = [StreamReader(stub.WatchLoads(pb.WatchLoadsRequest(dp_rank=1))) for stub in stubs]
        for stream in streams:
            assert stream.next(5).loads[0].num_running_reqs == 5
        seq = pub.publish(LoadSnapshot(dp_rank=1, num_running_reqs=6))
        for stream in streams:
            while (msg := stream.next(5)).loads[0].seq != seq:
                pass
            assert msg.loads[0].num_running_reqs == 6

        # A worker that dies is started again; the port keeps answering meanwhile.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        server.wait_for_log(f"(pid {victim}) exited with code -9", timeout=10)
        server.wait_for_log("started again", timeout=30)
        assert len(_worker_pids(server.proc.pid) - {victim}) == 2
        for _ in range(6):
            ch = channel_to(server.grpc_target)
            assert pb_grpc.LoadServiceStub(ch).GetLoads(pb.GetLoadsRequest(dp_rank=1), timeout=5).loads[0].seq == seq

        workers = _worker_pids(server.proc.pid)
        assert server.stop() == 0
        for ch in channels:
            ch.close()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert not port_in_use(server.grpc_port) and not port_in_use(server.http_port)


@pytest.mark.integration
def test_serve_grpc_workers_port_in_use_fails_with_a_message(shm_path: Path) -> None:
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: workers must not join it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "loadsvc", "serve", "--shm", str(shm_path), "--dp-size", "1",
             "--grpc-workers", "2", "--grpc-port", str(port), "--http-port", str(free_port())],
            capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_max_streams_bounds_watch_and_orca_streams(shm_path: Path, serve_process: Any,
                                                        channel_to: Any) -> None:
    """--max-streams 3: a fourth WatchLoads, and a fourth ORCA stream (no API key needed for it),
    is RESOURCE_EXHAUSTED; /metrics counts both; a stream that ends frees its place."""
    from xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport
    from xds.service.orca.v3.orca_pb2 import OrcaLoadReportRequest

    from loadsvc.surfaces.orca import ORCA_SERVICE

    with ShmPublisher(shm_path, dp_size=1, dp_rank=0) as pub:
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=3))
        server = serve_process(shm_path, args=["--max-streams", "3"])
        ch = channel_to(server.grpc_target)
        stub = pb_grpc.LoadServiceStub(ch)
        orca = ch.unary_stream(f"/{ORCA_SERVICE}/StreamCoreMetrics",
                               request_serializer=OrcaLoadReportRequest.SerializeToString,
                               response_deserializer=OrcaLoadReport.FromString)
        watches = [StreamReader(stub.WatchLoads(pb.WatchLoadsRequest(), timeout=60)) for _ in range(3)]
        reports = [StreamReader(orca(OrcaLoadReportRequest(), timeout=60)) for _ in range(3)]
        for reader in (*watches, *reports):
            reader.next(10)  # each got its first message: all six are open
        for extra, method in ((lambda: stub.WatchLoads(pb.WatchLoadsRequest(), timeout=10), "WatchLoads"),
                              (lambda: orca(OrcaLoadReportRequest(), timeout=10), "StreamCoreMetrics")):
            with pytest.raises(grpc.RpcError) as err:
                next(iter(extra()))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details().startswith(f"{method}: 3 streams open"), err.value.details()
        assert stub.GetLoads(pb.GetLoadsRequest(), timeout=10).loads[0].num_running_reqs == 3

        def metric(name: str, method: str) -> float | None:
            for line in httpx.get(f"{server.http_url}/metrics", timeout=5).text.splitlines():
                if line.startswith(f'{name}{{method="{method}"}} '):
                    return float(line.split()[-1])
            return None

        for method in ("WatchLoads", "StreamCoreMetrics"):
            assert metric("loadsvc_grpc_streams", method) == 3
            assert metric("loadsvc_grpc_streams_refused_total", method) == 1
        watches[0].call.cancel()
        wait_for(lambda: metric("loadsvc_grpc_streams", "WatchLoads") == 2, 10, "a stream to end")
        again = StreamReader(stub.WatchLoads(pb.WatchLoadsRequest(), timeout=60))
        assert again.next(10).loads[0].num_running_reqs == 3
        for reader in (again, *watches[1:], *reports):
            reader.call.cancel()
