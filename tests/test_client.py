"""loadsvc/client.py: `loadsvc get` and `loadsvc watch` against a real `loadsvc serve` process.

One region of five ranks: the simulator publishes ranks 0-2, the test itself
publishes rank 3 with known values (so output can be compared exactly), rank 4
is never published. The server runs with --stale-after 1 so a rank turns stale
within a test.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port, start_serve

from loadsvc import (
    LoadSnapshot,
    MemoryMetrics,
    QueueMetrics,
    ShmPublisher,
    ShmReader,
    default_path,
)
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc

DP_SIZE = 5
SIM_RANKS = (0, 1, 2)
OWN_RANK = 3
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def own_snapshot(running: int = 17) -> Any:
    return LoadSnapshot(
        dp_rank=OWN_RANK, num_running_reqs=running, num_waiting_reqs=4, num_total_reqs=running + 4,
        num_used_tokens=51234, max_total_num_tokens=123456, token_usage=51234 / 123456,
        gen_throughput=1234.5, cache_hit_rate=0.375, utilization=0.625, max_running_requests=96,
        num_waiting_uncached_tokens=777, num_total_tokens=60000,
        memory=MemoryMetrics(weight_gb=15.5, kv_cache_gb=20.25, graph_gb=1.5, token_capacity=123456),
        queues=QueueMetrics(waiting=4, grammar=1, paused=0, retracted=2))


class Deployment:
    def __init__(self) -> None:
        self.shm = default_path(f"test-client-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "loadsvc", "simulate", "--shm", str(self.shm), "--dp-size", str(DP_SIZE),
             "--ranks", "0-2", "--rate", "20", "--seed", "11"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.server = start_serve(self.shm, dp_size=DP_SIZE,
                                  args=["--stale-after", "1", "--unreachable-after", "60"])
        self.target = self.server.grpc_target
        self.pub = ShmPublisher(self.shm, dp_size=DP_SIZE, dp_rank=OWN_RANK)
        self.pub.publish(own_snapshot())
        # Rank 3 is republished (same values) every 100 ms, so it stays healthy
        # however slowly a client starts; pause_own() lets it turn stale.
        self._own_paused = threading.Event()
        self._own_stop = threading.Event()
        self._own_thread = threading.Thread(target=self._refresh_own, daemon=True)
        self._own_thread.start()
        self.channel = grpc.insecure_channel(self.target)
        self.stub = loads_pb2_grpc.LoadServiceStub(self.channel)
        deadline = time.monotonic() + 15
        while True:
            try:
                resp = self.stub.GetLoads(pb.GetLoadsRequest(), timeout=2)
                if [load.dp_rank for load in resp.loads] == [0, 1, 2, 3]:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the deployment never showed ranks 0-3"
            time.sleep(0.05)

    def _refresh_own(self) -> None:
        while not self._own_stop.wait(0.1):
            if not self._own_paused.is_set():
                self.pub.publish(own_snapshot())

    def pause_own(self) -> None:
        self._own_paused.set()

    def resume_own(self) -> None:
        self.pub.publish(own_snapshot())
        self._own_paused.clear()

    def status(self, rank: int) -> str:
        resp = self.stub.GetLoads(pb.GetLoadsRequest(dp_rank=rank, include=["core"]), timeout=5)
        return pb.LoadStatus.Name(resp.loads[0].status)

    def close(self) -> None:
        self._own_stop.set()
        self._own_thread.join()
        self.channel.close()
        self.pub.close()
        self.sim.send_signal(signal.SIGTERM)
        try:
            self.sim.wait(5)
        except subprocess.TimeoutExpired:
            self.sim.kill()
            self.sim.wait()
        self.server.close()
        self.shm.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    d = Deployment()
    try:
        yield d
    finally:
        d.close()


def loadsvc(*args: str, timeout: float = 20, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadsvc", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.fixture
def cli(capsys, monkeypatch):
    """`loadsvc ARGS` in this process (cli.main, real gRPC to the real server): faster than a
    subprocess for the many small cases; the subprocess tests above cover the real process."""
    from loadsvc.cli import main

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        monkeypatch.setenv("COLUMNS", "200")
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            code = main(list(args))
        finally:  # main() configures logging for the process; leave the test session's alone
            root.handlers[:], root.level = handlers, level
        out, err = capsys.readouterr()
        for name in env or {}:
            monkeypatch.delenv(name)
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def rows(text: str) -> dict[str, list[str]]:
    """Table rows of rich output keyed by rank: the cells between the box-drawing bars."""
    out = {}
    for line in ANSI.sub("", text).splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            out[cells[0]] = cells
    return out


# -- get ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_get_prints_every_rank(deployment):
    result = loadsvc("get", "--grpc", deployment.target)
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert sorted(table) == ["0", "1", "2", "3", "4"]
    with ShmReader(deployment.shm) as reader:
        for rank in SIM_RANKS:
            snap = reader.read(rank)
            cells = table[str(rank)]
            assert cells[1] == "healthy"
            assert cells[3].endswith(f"/{snap.max_running_requests}")
            assert cells[5].endswith(f"/{snap.max_total_num_tokens:,}")
    own = table["3"]
    assert own[1] == "healthy"
    assert own[3:10] == ["17/96", "4", "51,234/123,456", "41%", "1,234 tok/s", "38%", "62%"]
    assert own[10] == "mem queues"
    assert table["4"][1] == "not published"
    assert "/5 ranks healthy" in result.stdout and f"loadsvc {deployment.target}" in result.stdout
    assert re.search(r"aggregate: \d+ running, \d+ waiting, \d+ total", result.stdout)


@pytest.mark.integration
def test_get_json_matches_the_published_values(deployment):
    result = loadsvc("get", "--grpc", deployment.target, "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["dp_rank_count"] == DP_SIZE
    loads = {load["dp_rank"]: load for load in body["loads"]}
    assert sorted(loads) == [0, 1, 2, 3]
    own, expected = loads[OWN_RANK], own_snapshot()
    for name in ("num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
                 "max_total_num_tokens", "token_usage", "gen_throughput", "cache_hit_rate",
                 "utilization", "max_running_requests", "num_waiting_uncached_tokens"):
        assert own[name] == getattr(expected, name), name
    assert int(own["num_total_tokens"]) == 60000  # int64: a string in protobuf's JSON
    assert own["memory"] == {"weight_gb": 15.5, "kv_cache_gb": 20.25, "graph_gb": 1.5,
                             "token_capacity": 123456}
    assert own["queues"] == {"waiting": 4, "grammar": 1, "paused": 0, "retracted": 2}
    assert own["status"] == "LOAD_STATUS_HEALTHY"
    assert 0 < int(own["seq"]) <= deployment.pub.seq
    with ShmReader(deployment.shm) as reader:
        for rank in SIM_RANKS:
            load, snap = loads[rank], reader.read(rank)
            assert load["max_total_num_tokens"] == snap.max_total_num_tokens
            assert load["token_usage"] == load["num_used_tokens"] / load["max_total_num_tokens"]
            assert load["num_total_reqs"] == load["num_running_reqs"] + load["num_waiting_reqs"]
            assert 0 < int(load["seq"]) <= snap.seq
    running = sum(load["num_running_reqs"] for load in loads.values())
    assert body["aggregate"]["total_running_reqs"] == running


@pytest.mark.integration
def test_get_one_rank_core_only(deployment, cli):
    result = cli("get", "--grpc", deployment.target, "--json", "--dp-rank", "3", "--include", "core")
    assert result.returncode == 0, result.stderr
    (load,) = json.loads(result.stdout)["loads"]
    assert load["dp_rank"] == 3 and load["num_running_reqs"] == 17
    assert "memory" not in load and "queues" not in load
    table = rows(cli("get", "--grpc", deployment.target, "--dp-rank", "3").stdout)
    assert list(table) == ["3"]  # the one rank, no unpublished rows


@pytest.mark.integration
def test_stale_rank_is_coloured_yellow(deployment):
    deployment.pause_own()
    try:
        deadline = time.monotonic() + 10
        while deployment.status(OWN_RANK) != "LOAD_STATUS_STALE":  # --stale-after 1
            assert time.monotonic() < deadline
            time.sleep(0.1)
        result = loadsvc("get", "--grpc", deployment.target, env={"FORCE_COLOR": "1", "TERM": "xterm"})
    finally:
        deployment.resume_own()
    assert result.returncode == 0, result.stderr
    assert rows(result.stdout)["3"][1] == "stale"
    assert rows(result.stdout)["0"][1] == "healthy"
    line3 = next(line for line in result.stdout.splitlines() if "stale" in line)
    assert "\x1b[33m" in line3  # yellow
    line4 = next(line for line in result.stdout.splitlines() if "not published" in line)
    assert "\x1b[31m" in line4  # red


@pytest.mark.parametrize("args, field", [
    (["--include", "bogus"], "include"),
    (["--dp-rank", "9"], "dp_rank"),
    (["--dp-rank", "-1"], "dp_rank"),
])
@pytest.mark.integration
def test_get_invalid_argument_exit_2(deployment, cli, args, field):
    result = cli("get", "--grpc", deployment.target, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("loadsvc get: invalid request: ") and field in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.integration
def test_get_server_down():
    target = f"127.0.0.1:{free_port()}"
    result = loadsvc("get", "--grpc", target)
    assert result.returncode == 1
    assert result.stderr.startswith(f"loadsvc get: cannot reach loadsvc at {target}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# -- watch -------------------------------------------------------------------------------


@pytest.mark.integration
def test_watch_count_exits_after_that_many_messages(deployment):
    start = time.monotonic()
    result = loadsvc("watch", "--grpc", deployment.target, "--count", "3", "--dp-rank", "0",
                     timeout=15)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 10
    for i in (1, 2, 3):
        assert f"message {i} of 3" in result.stdout
    assert "message 4" not in result.stdout
    tables = [rows(block) for block in result.stdout.split("message ")[1:]]
    assert [list(t) for t in tables] == [["0"]] * 3
    assert len({t["0"][5] for t in tables}) > 1  # the simulated rank moves between messages


@pytest.mark.integration
def test_watch_sigint_exits_0(deployment):
    proc = subprocess.Popen([sys.executable, "-m", "loadsvc", "watch", "--grpc", deployment.target],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline()  # the first table is on its way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_watch_server_down(cli):
    target = f"127.0.0.1:{free_port()}"
    result = cli("watch", "--grpc", target, "--count", "1")
    assert result.returncode == 1
    assert result.stderr.startswith(f"loadsvc watch: cannot reach loadsvc at {target}")
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_watch_bad_interval(deployment, cli):
    result = cli("watch", "--grpc", deployment.target, "--max-interval-ms", "-5")
    assert result.returncode == 2
    assert "--max-interval-ms" in result.stderr and "Traceback" not in result.stderr


# -- reconnecting -----------------------------------------------------------------------------


class _Output:
    """Text a child writes to a pipe or a pty, gathered by a thread; wait_for() polls it."""

    def __init__(self, fd: int) -> None:
        self.fd, self.chunks = fd, []  # type: ignore[var-annotated]
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the pty's other side closed
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def plain(self) -> str:
        """The text without terminal control sequences, runs of whitespace as one space."""
        return " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.text).split())

    def wait_for(self, needle: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.plain():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} within {timeout} s; output:\n{self.text[-3000:]}")
            time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_watch_reconnects_when_the_server_restarts(shm_path, terminal):
    """`loadsvc watch --count 4` over a serve that is stopped and started again on the same port:
    it says it reconnects (stderr for a pipe, the table's title in a terminal), reconnects, and
    counts messages across both servers: 1 (connect), 2 (a publish), [restart], 3 (connect), 4."""
    import pty

    grpc_port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    store_args = ["--stale-after", "60", "--unreachable-after", "120"]  # no status change mid-test
    pub = ShmPublisher(shm_path, dp_size=1, dp_rank=0)
    pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=1, max_running_requests=8))
    server = start_serve(shm_path, grpc_port=grpc_port, http_port=http_port, args=store_args)
    argv = [sys.executable, "-m", "loadsvc", "watch", "--grpc", target, "--count", "4",
            "--max-interval-ms", "3600000"]  # no heartbeats: a message per connect and per publish
    env = {**os.environ, "COLUMNS": "200"}
    if terminal:
        main, child = pty.openpty()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=child, stderr=child, env=env)
        os.close(child)
        out = err = _Output(main)
    else:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        out, err = _Output(proc.stdout.fileno()), _Output(proc.stderr.fileno())
    try:
        out.wait_for("message 1 of 4", proc)
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=2, max_running_requests=8))
        out.wait_for("message 2 of 4", proc)
        assert server.stop() == 0
        if terminal:
            out.wait_for("reconnecting (attempt 1, next in 0.1 s): loadsvc is shutting down; reconnect", proc)
        else:
            err.wait_for(f"loadsvc watch: loadsvc is shutting down; reconnect; reconnecting to {target} "
                         "in 0.1 s (attempt 1)", proc)
            err.wait_for("(attempt 2)", proc)  # the server is down: attempts go on, 0.2 s later
        assert proc.poll() is None
        server.close()
        server = start_serve(shm_path, grpc_port=grpc_port, http_port=http_port, args=store_args)
        out.wait_for("message 3 of 4", proc)
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=3, max_running_requests=8))
        assert proc.wait(20) == 0, out.text + err.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
        pub.close()
    out.thread.join(5)
    err.thread.join(5)
    if terminal:
        os.close(main)
        assert "message 4 of 4 · Ctrl-C quits" in out.plain()
        assert "Traceback" not in out.text
    else:
        running = [rows(block)["0"][3] for block in out.text.split("message ")[1:]]
        assert running == ["1/8", "2/8", "2/8", "3/8"]  # the new server's first message: the region as it is
        assert f"loadsvc watch: reconnected to {target}" in err.text
        assert "Traceback" not in err.text


@pytest.mark.integration
def test_watch_reconnects_after_a_silent_partition(shm_path, tmp_path):
    """The server's host drops off the network without a word (its link goes down: no FIN, no
    error): watch notices the missing heartbeats (3 x --max-interval-ms, at least 3 s), says so,
    keeps trying, and is back once the link is up. serve runs in a network namespace."""
    from loadsvc.bench.netns import NetnsUnavailable, Topology, check_available, wait_until
    from loadsvc.tools.procs import port_answers

    try:
        check_available()
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    with ShmPublisher(shm_path, dp_size=1, dp_rank=0) as pub, Topology(["server"]) as topo:
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=1, max_running_requests=8))
        addr = topo.addr["server"]
        target = f"{addr}:50051"
        topo.start("server", [sys.executable, "-m", "loadsvc", "serve", "--shm", str(shm_path), "--host", addr,
                              "--grpc-port", "50051", "--http-port", "8000", "--stale-after", "600",
                              "--unreachable-after", "600"], tmp_path / "serve.log")
        wait_until(lambda: port_answers(50051, addr), 20, lambda: (tmp_path / "serve.log").read_text())
        proc = subprocess.Popen([sys.executable, "-m", "loadsvc", "watch", "--grpc", target,
                                 "--max-interval-ms", "200"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
        out, err = _Output(proc.stdout.fileno()), _Output(proc.stderr.fileno())
        try:
            out.wait_for("message 5", proc)  # heartbeats every 200 ms
            assert topo.run("server", ["ip", "link", "set", "eth0", "down"]).returncode == 0
            down = time.monotonic()
            err.wait_for(f"no message for 3 s (heartbeats missed); reconnecting to {target}", proc, timeout=10)
            assert 2.5 < time.monotonic() - down < 8
            assert proc.poll() is None
            assert topo.run("server", ["ip", "link", "set", "eth0", "up"]).returncode == 0
            err.wait_for(f"loadsvc watch: reconnected to {target}", proc, timeout=30)
            shown = out.text.count("message ")
            out.wait_for(f"message {shown + 3}", proc)  # the table is live again
        finally:
            proc.kill()
            proc.wait()
        assert "Traceback" not in err.text


@pytest.mark.integration
def test_watch_gives_up_on_errors_that_a_reconnect_does_not_cure(deployment, cli):
    """Before its first message, or for a refused request, watch ends (exit 1/2) instead of retrying."""
    result = cli("watch", "--grpc", deployment.target, "--include", "bogus", "--count", "1")
    assert result.returncode == 2 and "invalid request" in result.stderr and "reconnect" not in result.stderr


# -- the table at any width ----------------------------------------------------------------------


def _wide_response() -> Any:
    """Four ranks: a busy healthy one with every section, an unreachable one, a stale one, one never
    published; numbers as wide as they get in practice."""
    return pb.GetLoadsResponse(
        timestamp="2026-01-02T03:04:05.678+00:00", dp_rank_count=4,
        loads=[
            pb.LoadSnapshot(dp_rank=0, status=pb.LOAD_STATUS_HEALTHY, age_ms=4, num_running_reqs=128,
                            max_running_requests=128, num_waiting_reqs=1234, num_used_tokens=1_234_567,
                            max_total_num_tokens=2_000_000, token_usage=0.617, gen_throughput=12_345,
                            cache_hit_rate=0.23, utilization=1.0, memory=pb.MemoryMetrics(weight_gb=1),
                            speculative=pb.SpeculativeMetrics(accept_length=2),
                            lora=pb.LoRAMetrics(slots_used=1),
                            disaggregation=pb.DisaggregationMetrics(mode="prefill"), queues=pb.QueueMetrics()),
            pb.LoadSnapshot(dp_rank=1, status=pb.LOAD_STATUS_UNREACHABLE, age_ms=754_000, num_running_reqs=7,
                            max_running_requests=64, num_waiting_reqs=0, num_used_tokens=51_234,
                            max_total_num_tokens=123_456, token_usage=0.415, gen_throughput=987,
                            cache_hit_rate=0.375, utilization=0.625, memory=pb.MemoryMetrics()),
            pb.LoadSnapshot(dp_rank=2, status=pb.LOAD_STATUS_STALE, age_ms=3_500, num_running_reqs=0,
                            max_running_requests=64, max_total_num_tokens=65_536),
        ])


# every number of _wide_response, as each column shows it (full, compact)
_EXPECTED = {
    "0": {"running": "128/128", "waiting": "1234", "tokens used/max": ("1,234,567/2,000,000", "1.2M/2M"),
          "usage": "62%", "throughput": ("12,345 tok/s", "12,345"), "cache hit": "23%", "util": "100%",
          "age": "4 ms", "status": "healthy", "sections": "mem spec lora disagg:prefill queues"},
    "1": {"running": "7/64", "waiting": "0", "tokens used/max": ("51,234/123,456", "51k/123k"), "usage": "42%",
          "throughput": ("987 tok/s", "987"), "cache hit": "38%", "util": "62%", "age": "12m 34s",
          "status": "unreachable", "sections": "mem"},
    "2": {"running": "0/64", "waiting": "0", "tokens used/max": ("0/65,536", "0/66k"), "usage": "0%",
          "throughput": ("0 tok/s", "0"), "cache hit": "0%", "util": "0%", "age": "3.5 s", "status": "stale",
          "sections": ""},
}
_SHORT = {"running": "run", "waiting": "wait", "tokens used/max": "tokens", "throughput": "tok/s",
          "cache hit": "hit"}


def _render(width: int | None, console_width: int) -> str:
    import io

    from rich.console import Console

    from loadsvc.client import loads_table

    console = Console(width=console_width, file=io.StringIO(), color_system=None)
    console.print(loads_table(_wide_response(), "127.0.0.1:50051", note="message 12 of 100 · Ctrl-C quits",
                              width=width))
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [60, 80, 100, 120, 136, 160])
def test_table_fits_the_console_and_shows_every_number_it_keeps_whole(width):
    text = _render(width, width)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width
    assert "…" not in text
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    names = [c.strip() for c in header.strip("┃").split("┃")]
    full = {name: name for name in ("rank", "status", "age", "usage", "util", "sections", *_SHORT)}
    short = {**full, **{v: k for k, v in _SHORT.items()}}
    compact = names != [n for n in names if n in full] or any(n in _SHORT.values() for n in names)
    columns = [(short if compact else full)[n] for n in names]
    # always there: who is busy and who is not
    assert {"rank", "status", "running", "waiting", "usage", "util"} <= set(columns), names
    table = rows(text)
    assert table["3"][:2] == ["3", "not published"]
    for rank, expected in _EXPECTED.items():
        cells = dict(zip(columns, table[rank]))
        for column, value in cells.items():
            if column == "rank":
                continue
            want = expected[column]
            if isinstance(want, tuple):
                want = want[compact]
            assert value == want, (width, rank, column)
    hidden = [name for name in ("sections", "tokens used/max", "age", "cache hit", "throughput")
              if name not in columns]
    if hidden:
        assert f"not shown at {width} columns: {', '.join(hidden)}" in " ".join(text.split())
    if width >= 160:
        assert columns == ["rank", "status", "age", "running", "waiting", "tokens used/max", "usage",
                           "throughput", "cache hit", "util", "sections"] and not compact


def test_table_without_a_width_has_every_column():
    text = _render(None, 200)
    assert "tokens used/max" in text and "sections" in text and "not shown" not in text
    assert rows(text)["0"][5] == "1,234,567/2,000,000"


@pytest.mark.integration
def test_get_at_80_columns_and_through_a_pipe(deployment):
    """COLUMNS=80: the table fits 80 columns; a pipe without COLUMNS: every column, plain text."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    narrow = subprocess.run([sys.executable, "-m", "loadsvc", "get", "--grpc", deployment.target],
                            capture_output=True, text=True, timeout=20, env={**env, "COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80 and "…" not in narrow.stdout
    own = rows(narrow.stdout)["3"]
    assert own[:2] == ["3", "healthy"] and "17/96" in own and "41%" in own and "62%" in own
    assert "not shown at 80 columns: sections" in " ".join(narrow.stdout.split())
    piped = subprocess.run([sys.executable, "-m", "loadsvc", "get", "--grpc", deployment.target],
                           capture_output=True, text=True, timeout=20, env=env)
    assert piped.returncode == 0, piped.stderr
    assert "\x1b[" not in piped.stdout and "…" not in piped.stdout
    assert rows(piped.stdout)["3"][3:11] == ["17/96", "4", "51,234/123,456", "41%", "1,234 tok/s", "38%",
                                            "62%", "mem queues"]


# -- --grpc that cannot be right ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["get", "watch"])
@pytest.mark.parametrize("target, says", [
    ("localhost", "--grpc localhost has no port (gRPC would dial 443): give --grpc HOST:PORT, "
                  "e.g. 127.0.0.1:50051"),
    ("127.0.0.1:http", "--grpc 127.0.0.1:http: the port must be a number 1..65535: give --grpc HOST:PORT, "
                       "e.g. 127.0.0.1:50051"),
    ("::1", "--grpc ::1: an IPv6 address goes in brackets, e.g. [::1]:50051"),
])
def test_grpc_target_without_a_port_or_bad_is_a_one_line_error(cli, command, target, says):
    result = cli(command, "--grpc", target)
    assert result.returncode == 2
    assert result.stderr == f"loadsvc {command}: {says}\n"


@pytest.mark.integration
@pytest.mark.parametrize("command", ["get", "watch"])
def test_grpc_pointed_at_the_rest_port_says_so(deployment, cli, command):
    target = f"127.0.0.1:{deployment.server.http_port}"
    result = cli(command, "--grpc", target, *(["--count", "1"] if command == "watch" else []))
    assert result.returncode == 1
    assert result.stderr == (f"loadsvc {command}: {target} answers HTTP/1, not gRPC: is it the REST port "
                             "(--http-port)? point --grpc at the gRPC port (--grpc-port of serve and demo), "
                             "e.g. --grpc 127.0.0.1:50051\n")


# -- TLS and API key -----------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.integration
def test_tls_and_api_key(shm_path, serve_process, tls_files, cli):
    cert, key = tls_files
    server = serve_process(shm_path, dp_size=2, args=["--tls-cert", str(cert), "--tls-key", str(key),
                                                      "--api-key", "s3cret"])
    with ShmPublisher(shm_path, dp_size=2, dp_rank=1) as pub:
        pub.publish(LoadSnapshot(dp_rank=1, num_running_reqs=5, max_running_requests=8,
                                 max_total_num_tokens=1000))
        target = server.grpc_target
        ok = loadsvc("get", "--grpc", target, "--tls-ca", str(cert), "--api-key", "s3cret", "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["loads"][0]["num_running_reqs"] == 5
        env_key = cli("get", "--grpc", target, "--tls-ca", str(cert), env={"LOADSVC_API_KEY": "s3cret"})
        assert env_key.returncode == 0, env_key.stderr
        assert rows(env_key.stdout)["1"][3] == "5/8"
        no_key = cli("get", "--grpc", target, "--tls-ca", str(cert))
        assert no_key.returncode == 1
        assert "--api-key" in no_key.stderr and "Traceback" not in no_key.stderr
        watch = cli("watch", "--grpc", target, "--tls-ca", str(cert), "--api-key", "s3cret",
                        "--count", "1")
        assert watch.returncode == 0, watch.stderr
        assert rows(watch.stdout)["1"][3] == "5/8"
        missing = cli("get", "--grpc", target, "--tls-ca", str(cert.with_name("nope.pem")))
        assert missing.returncode == 2 and "cannot read --tls-ca" in missing.stderr
