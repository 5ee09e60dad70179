"""loadsvc/surfaces/limits.py through real servers: what one client may hold of serve's REST, the engine, the router.

    endless header lines / one endless header   431 or closed; serve's RSS stays bounded
    idle, slowloris, CRLF after a response      closed after --http-header-timeout
    a flood of idle connections                 capped (--http-max-connections): under a low
                                                RLIMIT_NOFILE, gRPC and REST still answer
    a TLS handshake that never finishes         closed after --handshake-timeout
    a WatchLoads subscriber that vanished       its stream freed after --grpc-keepalive (network namespace)
    a 1 GB body (declared or chunked)           413 from the engine and the router, not buffered

Every server is a real process on loopback; every flood is bounded in bytes and sockets,
and every wait in time.
"""

from __future__ import annotations

import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import ServeProcess, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

from loadsvc import LoadSnapshot, ShmPublisher
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration  # every test here starts a server process

MiB = 1024 * 1024
REQUEST_START = b"GET /v1/loads HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def closed_count(http_url: str, reason: str, prefix: str = "loadsvc_rest") -> float:
    text = httpx.get(f"{http_url}/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        if fam.name == f"{prefix}_connections_closed":
            for s in fam.samples:
                if s.name.endswith("_total") and s.labels.get("reason") == reason:
                    return s.value
    raise AssertionError(f"no {prefix}_connections_closed_total{{reason={reason!r}}} in /metrics")


def flood(port: int, first: bytes, chunk: bytes, limit: int) -> tuple[int, bytes]:
    """Send first, then chunk after chunk until the server closes or limit bytes went out.

    Returns (bytes sent, what the server answered: b"" when it only closed).
    """
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(first)
            while sent < limit:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while data := s.recv(65536):
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    return sent, answer


def is_closed(s: socket.socket) -> bool:
    """True once the peer closed s (EOF or reset); never blocks."""
    try:
        return s.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def region(shm_path: Path) -> Iterator[Path]:
    with ShmPublisher(shm_path, dp_size=1, dp_rank=0) as pub:
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=5))
        yield shm_path


def answers(server: ServeProcess) -> bool:
    r = httpx.get(f"{server.http_url}/v1/loads", timeout=5)
    return r.status_code == 200 and r.json()["loads"][0]["num_running_reqs"] == 5


# -- class 1: endless request headers ----------------------------------------------------------


@pytest.mark.parametrize("shape", ["many lines", "one endless line"])
def test_endless_headers_are_cut_off_and_memory_stays_bounded(region: Path, serve_process: Any,
                                                               shape: str) -> None:
    server = serve_process(region)
    assert answers(server)
    before = rss_kib(server.proc.pid)
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n" if shape == "many lines" else b"a" * 1024
    first = REQUEST_START if shape == "many lines" else REQUEST_START + b"X-Endless: "
    sent, answer = flood(server.http_port, first, line * 64, 48 * MiB)
    grown = rss_kib(server.proc.pid) - before
    assert sent < 48 * MiB, "serve kept reading a header block of 48 MiB"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert grown < 16 * 1024, f"serve grew by {grown} KiB under one endless header"
    assert answers(server)
    assert closed_count(server.http_url, "header_too_large") == 1


def test_a_header_block_just_over_the_limit_is_answered_431(region: Path, serve_process: Any) -> None:
    server = serve_process(region, args=["--http-max-header-bytes", "4096"])
    _, answer = flood(server.http_port, REQUEST_START + b"X-Pad: " + b"a" * 5000, b"", 0)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    assert b"4096" in answer
    ok = REQUEST_START + b"X-Pad: " + b"a" * 3000 + b"\r\n\r\n"
    _, answer = flood(server.http_port, ok.replace(b"HTTP/1.1", b"HTTP/1.0"), b"", 0)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert "Traceback" not in server.log()  # one counted line, no traceback
    assert server.log().count("header_too_large") == 1


# -- class 2: idle and slow connections -------------------------------------------------------------


def test_idle_and_slow_connections_are_closed(region: Path, serve_process: Any) -> None:
    server = serve_process(region, args=["--http-header-timeout", "1", "--http-idle-timeout", "1"])
    port = server.http_port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    for s in slow:
        s.sendall(REQUEST_START)
    # a client that got an answer and then keeps the connection with a CRLF now and then
    crlf = socket.create_connection(("127.0.0.1", port))
    crlf.sendall(REQUEST_START + b"\r\n")
    assert crlf.recv(65536).startswith(b"HTTP/1.1 200 ")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for s in slow:  # a header byte now and then (slowloris)
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
            try:
                crlf.sendall(b"\r\n")
            except OSError:
                pass
            if all(is_closed(s) for s in [*idle, *slow, crlf]):
                break
            time.sleep(0.2)
        still_open = [s for s in [*idle, *slow, crlf] if not is_closed(s)]
        assert not still_open, f"{len(still_open)} of {len(idle) + len(slow) + 1} connections still open"
    finally:
        for s in [*idle, *slow, crlf]:
            s.close()
    assert answers(server)
    assert closed_count(server.http_url, "idle") >= len(idle)
    assert closed_count(server.http_url, "header_timeout") >= len(slow) + 1


def test_a_flood_of_idle_connections_leaves_grpc_and_rest_answering(region: Path,
                                                                    serve_process: Any) -> None:
    """400 idle REST sockets against serve with 256 descriptors: the cap keeps the rest for gRPC."""
    server = serve_process(region, args=["--http-max-connections", "64", "--grpc-max-connections", "32"])
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (256, 256))
    flood_sockets: list[socket.socket] = []
    try:
        for _ in range(400):
            flood_sockets.append(socket.create_connection(("127.0.0.1", server.http_port)))
        with grpc.insecure_channel(server.grpc_target) as ch:  # a new connection now
            resp = pb_grpc.LoadServiceStub(ch).GetLoads(pb.GetLoadsRequest(), timeout=10)
        assert [x.num_running_reqs for x in resp.loads] == [5]
        assert answers(server)  # a new REST connection: the longest-waiting idle one made room
        wait_for(lambda: sum(is_closed(s) for s in flood_sockets) >= 400 - 64, 10,
                 "the connections over the cap to be closed")
    finally:
        for s in flood_sockets:
            s.close()
    assert closed_count(server.http_url, "cap_evicted") >= 400 - 64
    assert "Too many open files" not in server.log()


def test_grpc_closes_connections_past_its_cap_and_silent_or_idle_ones(region: Path,
                                                                     serve_process: Any) -> None:
    server = serve_process(region, args=["--grpc-max-connections", "8", "--handshake-timeout", "1",
                                         "--grpc-idle-timeout", "1"])
    silent = [socket.create_connection(("127.0.0.1", server.grpc_port)) for _ in range(20)]
    preface = socket.create_connection(("127.0.0.1", server.grpc_port))  # HTTP/2 set up, then no call
    preface.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
    try:
        wait_for(lambda: all(is_closed(s) for s in [*silent, preface]), 20,
                 "gRPC to close silent and idle connections")
    finally:
        for s in [*silent, preface]:
            s.close()
    with grpc.insecure_channel(server.grpc_target) as ch:
        resp = pb_grpc.LoadServiceStub(ch).GetLoads(pb.GetLoadsRequest(), timeout=10)
    assert [x.num_running_reqs for x in resp.loads] == [5]


@pytest.mark.parametrize(("limit", "raised"), [((512, 4096), 896), ((512, 512), 512)])
def test_serve_fits_its_open_file_limit_to_the_caps(shm_path: Path, limit: tuple[int, int],
                                                    raised: int) -> None:
    """256 REST + 512 gRPC connections + 128 need 896 descriptors: raised when the hard limit allows."""
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
    proc = subprocess.Popen([sys.executable, "-m", "loadsvc", "serve", "--shm", str(shm_path), "--dp-size", "1",
                             *ports],
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or shm_path.exists(), 20, "serve to start")
        wait_for(lambda: proc.poll() is not None or resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[0]
                 == raised, 10, f"the soft limit to be {raised}")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=15)[0]
    assert proc.returncode == 0, out
    assert ("open-file limit (512) is below what the connection caps need (896" in out) == (raised < 896), out


# A WatchLoads subscriber asking for a message at most once an hour (a quiet stream), on its own host.
SUBSCRIBER = """
import sys, grpc
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb, loads_pb2_grpc as pb_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    for message in pb_grpc.LoadServiceStub(channel).WatchLoads(pb.WatchLoadsRequest(max_interval_ms=3_600_000)):
        print("message", message.timestamp, flush=True)
"""


def test_a_vanished_watchloads_subscriber_frees_its_stream(shm_path: Path, serve_process: Any,
                                                           tmp_path: Path) -> None:
    """A subscriber whose host drops off the network (no FIN, no RST) while its stream is quiet.

    Nothing is written to it, so no TCP timeout ever fires: only the keepalive ping
    (--grpc-keepalive) finds it gone. The subscriber runs in a network namespace whose
    link the test takes down.
    """
    from loadsvc.bench.netns import NetnsUnavailable, Topology, check_available, wait_until

    try:
        check_available()
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    with ShmPublisher(shm_path, dp_size=1, dp_rank=0) as pub, Topology(["subscriber"]) as topo:
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=5))
        server = serve_process(shm_path, host=topo.gateway, args=[
            "--grpc-keepalive", "2", "--stale-after", "3600", "--unreachable-after", "3600"])
        log = tmp_path / "subscriber.log"

        def streams() -> float:
            return server.metric("loadsvc_grpc_streams", method="WatchLoads")

        topo.start("subscriber", [sys.executable, "-c", SUBSCRIBER, server.grpc_target], log)
        wait_until(lambda: streams() == 1 and "message" in log.read_text(), 20,
                 lambda: f"the subscriber's stream to open; its log: {log.read_text()[-2000:]}")
        assert topo.run("subscriber", ["ip", "link", "set", "eth0", "down"]).returncode == 0
        gone = time.monotonic()
        time.sleep(1)
        assert streams() == 1  # still held: nothing tells serve yet
        wait_for(lambda: streams() == 0, 15, "serve to free the vanished subscriber's stream")
        assert time.monotonic() - gone < 10  # 2 s to the ping, at most 2 s for its answer, and the poll
        assert log.read_text().count("message") == 1  # the stream was quiet all along


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_security import _write_certs

    return _write_certs(tmp_path_factory.mktemp("certs"))


def test_tls_handshakes_that_never_finish_are_closed(region: Path, serve_process: Any, certs: Any) -> None:
    server = serve_process(region, args=["--tls-cert", str(certs.server_cert), "--tls-key",
                                         str(certs.server_key), "--handshake-timeout", "1",
                                         "--http-max-connections", "8"])
    silent = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(10)]
    half = socket.create_connection(("127.0.0.1", server.http_port))
    half.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello, never the rest
    try:
        wait_for(lambda: all(is_closed(s) for s in [*silent, half]), 15, "the handshakes to be closed")
    finally:
        for s in [*silent, half]:
            s.close()
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    with httpx.Client(verify=ctx, timeout=5) as client:
        assert client.get(f"https://127.0.0.1:{server.http_port}/v1/loads").json()["loads"][0][
            "num_running_reqs"] == 5
        text = client.get(f"https://127.0.0.1:{server.http_port}/metrics").text
    counts = {s.labels["reason"]: s.value for fam in text_string_to_metric_families(text)
              if fam.name == "loadsvc_rest_connections_closed" for s in fam.samples
              if s.name.endswith("_total")}
    # the cap counts handshaking connections too: 11 against a cap of 8 evicted at least 3 of them
    assert counts["cap_evicted"] >= 3
    assert counts["cap_evicted"] + counts["tls_handshake_failed"] + counts["header_timeout"] >= 11


# -- the engine and the router ------------------------------------------------------------------

LIMIT_ARGS = ["--http-max-body-bytes", str(MiB), "--http-header-timeout", "2"]


@pytest.fixture
def engine_and_router(fleet: Any) -> tuple[Any, Any]:
    engine = fleet.engine(dp_size=1, args=LIMIT_ARGS)
    router = fleet.router([engine], policy="round_robin", args=LIMIT_ARGS)
    return engine, router


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("which", ["engine", "router"])
def test_a_huge_body_is_refused_not_buffered(engine_and_router: tuple[Any, Any], which: str) -> None:
    proc = engine_and_router[0] if which == "engine" else engine_and_router[1]
    port = _port(proc.url)
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # declared: 1 GB, refused before any of it is read
    _, answer = flood(port, head + b"Content-Length: 1073741824\r\n\r\n" + b"{", b"", 0)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    # chunked: counted as it comes, refused at the limit; the engine never holds 64 MiB
    before = rss_kib(proc.proc.pid)
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
    sent, answer = flood(port, head + b"Transfer-Encoding: chunked\r\n\r\n", chunk * 4, 64 * MiB)
    assert sent < 64 * MiB, f"the {which} read a 64 MiB body"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert rss_kib(proc.proc.pid) - before < 16 * 1024
    # and it still serves
    r = httpx.post(f"{proc.url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1}},
                   timeout=10)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("which", ["engine", "router"])
def test_engine_and_router_cut_off_headers_and_idle_connections(engine_and_router: tuple[Any, Any],
                                                               which: str) -> None:
    proc = engine_and_router[0] if which == "engine" else engine_and_router[1]
    port = _port(proc.url)
    sent, answer = flood(port, b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-Pad: " + b"a" * 1000 + b"\r\n",
                         48 * MiB)
    assert sent < 48 * MiB and (answer == b"" or answer.startswith(b"HTTP/1.1 431 ")), answer[:200]
    idle = socket.create_connection(("127.0.0.1", port))
    try:
        wait_for(lambda: is_closed(idle), 15, f"the {which} to close an idle connection")
    finally:
        idle.close()
    assert httpx.get(f"{proc.url}/health", timeout=5).status_code == 200
