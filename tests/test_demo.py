"""loadsvc/tools/demo.py: `loadsvc demo` as a real process with its real children, on free loopback ports."""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import free_port, port_in_use

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc
from loadsvc.settings import DemoSettings
from loadsvc.tools import demo as demo_module
from loadsvc.tools.demo import run_demo

READY = "Ctrl-C stops the demo."


class DemoProcess:
    def __init__(self, *args: str, command: Sequence[str] = (sys.executable, "-m", "loadsvc"),
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        while self.http_port == self.grpc_port:
            self.http_port = free_port()
        self.proc = subprocess.Popen(
            [*command, "demo", "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output: the demo exited

    def wait_ready(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {READY!r} within {timeout} s; stdout so far:\n"
                                     + "".join(self.out)) from None
            if not line:
                self.proc.wait(10)
                raise AssertionError(f"the demo exited with {self.proc.returncode} before {READY!r}; "
                                     f"stdout:\n{''.join(self.out)}stderr:\n{self.proc.stderr.read()}")
            self.out.append(line)
            if line.strip() == READY:
                return "".join(self.out)

    def children(self) -> list[int]:
        pid = self.proc.pid
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def demo_process():
    started: list[DemoProcess] = []

    def start(*args: str, **kwargs: Any) -> DemoProcess:
        d = DemoProcess(*args, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.integration
def test_demo_serves_four_moving_ranks_and_stops_on_sigint(demo_process):
    demo = demo_process()
    banner = demo.wait_ready()
    region = Path(re.search(r"publishing into (\S+\.shm)", banner).group(1))
    assert region.exists() and region.name.startswith("loadsvc-demo-")
    rest = f"http://127.0.0.1:{demo.http_port}"
    assert f"gRPC  127.0.0.1:{demo.grpc_port}" in banner
    assert f"curl -s '{rest}/v1/loads?include=all'" in banner
    assert f"loadsvc watch --grpc 127.0.0.1:{demo.grpc_port}" in banner
    children = demo.children()
    assert len(children) == 2  # the server and the simulator

    with httpx.Client(trust_env=False, timeout=5) as http:
        first = http.get(f"{rest}/v1/loads", params={"include": "all"}).json()
        time.sleep(0.5)
        second = http.get(f"{rest}/v1/loads", params={"include": "all"}).json()
    for body in (first, second):
        assert [load["dp_rank"] for load in body["loads"]] == [0, 1, 2, 3]
        assert {load["status"] for load in body["loads"]} == {"healthy"}
    for a, b in zip(first["loads"], second["loads"]):
        assert b["seq"] > a["seq"]  # every rank keeps publishing
    assert first["loads"][0]["lora"]["slots_total"] == 8  # the simulator's sections come through
    assert first["loads"][2]["disaggregation"]["mode"] == "prefill"

    with grpc.insecure_channel(f"127.0.0.1:{demo.grpc_port}") as channel:
        resp = loads_pb2_grpc.LoadServiceStub(channel).GetLoads(pb.GetLoadsRequest(), timeout=5)
    assert resp.dp_rank_count == 4
    assert [load.dp_rank for load in resp.loads] == [0, 1, 2, 3]
    assert {load.status for load in resp.loads} == {pb.LOAD_STATUS_HEALTHY}
    assert all(g.seq >= r["seq"] for g, r in zip(resp.loads, second["loads"]))

    start = time.monotonic()
    demo.proc.send_signal(signal.SIGINT)
    demo.proc.wait(15)
    assert demo.proc.returncode == 0, demo.proc.stderr.read()
    assert time.monotonic() - start < 8
    assert all(gone(pid) for pid in children)
    assert not region.exists()
    assert not port_in_use(demo.grpc_port) and not port_in_use(demo.http_port)
    assert "Traceback" not in demo.proc.stderr.read()


@pytest.mark.integration
@pytest.mark.parametrize("engine", [False, True], ids=["simulator", "engine"])
def test_demo_runs_from_a_directory_holding_another_loadsvc_folder(demo_process, tmp_path, engine):
    """`loadsvc demo` started where a `loadsvc/` folder (a clone, say) sits in the current directory:
    its children (`python -m loadsvc ...`) import the installed package, not that folder."""
    decoy = tmp_path / "loadsvc"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('imported the loadsvc/ folder of the current "
                                       "directory instead of the installed package')\n")
    command = Path(sysconfig.get_path("scripts")) / "loadsvc"  # the console script, as a user runs it
    assert command.exists(), f"no {command}: is loadsvc installed in this environment?"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    args = ("--engine", "--router-port", str(free_port())) if engine else ()
    demo = demo_process(*args, command=[str(command)], cwd=tmp_path, env=env)
    banner = demo.wait_ready()
    assert f"REST  http://127.0.0.1:{demo.http_port}/v1/loads" in banner
    with httpx.Client(trust_env=False, timeout=5) as http:
        loads = http.get(f"http://127.0.0.1:{demo.http_port}/v1/loads").json()["loads"]
    assert [load["dp_rank"] for load in loads] == [0, 1, 2, 3]
    demo.proc.send_signal(signal.SIGINT)
    demo.proc.wait(15)
    err = demo.proc.stderr.read()
    assert demo.proc.returncode == 0, err
    assert "ImportError" not in err and "Traceback" not in err


@pytest.mark.integration
def test_demo_stops_everything_when_a_child_dies(demo_process):
    demo = demo_process()
    banner = demo.wait_ready()
    region = Path(re.search(r"publishing into (\S+\.shm)", banner).group(1))
    server, simulator = demo.children()
    os.kill(simulator, signal.SIGKILL)
    demo.proc.wait(15)
    assert demo.proc.returncode == 1
    err = demo.proc.stderr.read()
    assert "the simulator exited with code -9" in err
    assert gone(server) and not region.exists()
    assert not port_in_use(demo.grpc_port) and not port_in_use(demo.http_port)


@pytest.mark.integration
@pytest.mark.parametrize("which, flag", [("http", "--http-port"), ("grpc", "--grpc-port")])
def test_busy_port_names_the_port_and_the_flag(which, flag):
    grpc_port, http_port = free_port(), free_port()
    busy = http_port if which == "http" else grpc_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        result = subprocess.run([sys.executable, "-m", "loadsvc", "demo", "--grpc-port", str(grpc_port),
                                 "--http-port", str(http_port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"port {busy} on 127.0.0.1" in result.stderr and f"{flag} PORT" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_engine_mode_not_available_without_the_engine(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "loadsvc.tools.engine" else real(name, *a))
    assert run_demo(DemoSettings(engine=True, grpc_port=free_port(), http_port=free_port())) == 2
    err = capsys.readouterr().err
    assert "--engine" in err and "not available yet" in err


@pytest.mark.integration
def test_demo_engine_mode_routes_through_the_reference_router(demo_process):
    router_port = free_port()
    demo = demo_process("--engine", "--router-port", str(router_port))
    banner = demo.wait_ready()
    assert "loadsvc demo: a toy engine with 4 ranks publishing into " in banner
    region = Path(re.search(r"publishing into (\S+\.shm)", banner).group(1))
    router = re.search(r"router HTTP  (http://\S+)", banner).group(1)
    assert router == f"http://127.0.0.1:{router_port}"
    assert f"curl -s {router}/generate" in banner
    assert len(demo.children()) == 3  # the server, the engine and the router
    with httpx.Client(trust_env=False, timeout=30) as http:
        for _ in range(4):
            r = http.post(f"{router}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 4}})
            assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 4
        view = http.get(f"{router}/router/workers").json()
        assert view["policy"] == "p2c" and sum(w["sent"] for w in view["workers"]) == 4
        assert [t["dp_rank"] for t in view["workers"][0]["ranks"]] == [0, 1, 2, 3]
        loads = http.get(f"http://127.0.0.1:{demo.http_port}/v1/loads").json()["loads"]
        assert [load["dp_rank"] for load in loads] == [0, 1, 2, 3]  # the engine's ranks, served by serve
    demo.proc.send_signal(signal.SIGINT)
    demo.proc.wait(15)
    assert demo.proc.returncode == 0 and not region.exists()
    assert "Traceback" not in demo.proc.stderr.read()


def test_same_port_twice_is_a_usage_error(capsys):
    port = free_port()
    assert run_demo(DemoSettings(grpc_port=port, http_port=port)) == 2
    assert f"--grpc-port and --http-port are both {port}" in capsys.readouterr().err


def test_default_ports_are_taken_when_free_and_replaced_when_in_use(monkeypatch):
    """Without port flags the demo takes the usual ports (the README's examples paste as they
    are); one in use is replaced by a free port, with a note naming the flag that picks one."""
    usual = {"DEFAULT_GRPC_PORT": free_port(), "DEFAULT_HTTP_PORT": free_port(),
             "DEFAULT_ROUTER_PORT": free_port()}
    assert len(set(usual.values())) == 3
    for name, port in usual.items():
        monkeypatch.setattr(demo_module, name, port)
    grpc_port, http_port, router_port = usual.values()

    ports, notes = demo_module._resolve_ports(DemoSettings(engine=True))
    assert (ports.grpc, ports.http, ports.router) == (grpc_port, http_port, router_port) and notes == []
    assert len({ports.grpc, ports.http, ports.router, ports.engine_http, ports.engine_grpc}) == 5

    with socket.socket() as s:
        s.bind(("127.0.0.1", http_port))
        s.listen()
        ports, notes = demo_module._resolve_ports(DemoSettings(engine=True))
    assert (ports.grpc, ports.router) == (grpc_port, router_port) and ports.http not in usual.values()
    assert notes == [f"port {http_port} (REST) is in use; using {ports.http} instead "
                     "(--http-port PORT picks one)"]

    # a flag that takes another default port moves that one aside
    ports, notes = demo_module._resolve_ports(DemoSettings(grpc_port=http_port))
    assert ports.grpc == http_port and ports.http not in usual.values()
    assert notes == [f"port {http_port} (REST) is in use; using {ports.http} instead "
                     "(--http-port PORT picks one)"]


def test_banner_counts_ranks_in_words(capsys):
    ports = demo_module._Ports(grpc=50051, http=8000, router=8080, engine_http=30000, engine_grpc=30001)
    region = Path("/dev/shm/loadsvc-demo-x.shm")
    demo_module._Demo(DemoSettings(engine=True, dp_size=1), region, ports).banner()
    demo_module._Demo(DemoSettings(dp_size=1), region, ports).banner()
    out = capsys.readouterr().out
    assert f"loadsvc demo: a toy engine with 1 rank publishing into {region}" in out
    assert f"loadsvc demo: 1 simulated rank publishing into {region}" in out
    assert "curl -s http://127.0.0.1:8080/generate" in out and "  loadsvc get\n" in out  # default ports: no --grpc
