"""The docker-compose topology, run for real on network-namespace hosts (no Docker needed).

    bridge 10.77.N.1 (this test process talks to node0 through it)
      |-- keys     `sh -c "loadsvc keys gen ..."`      (compose command, /keys -> a temp dir)
      |-- node0    `loadsvc serve --collect ... CURVE`  REST :8000, gRPC :50051, ZMQ :5557
      |-- node1    `loadsvc simulate --zmq tcp://node0:5557 --ranks 0-3`
      |-- node2    `loadsvc simulate --zmq tcp://node0:5557 --ranks 4-7`
      |-- router   `python /app/examples/router.py --grpc node0:50051`
      `-- intruder a publisher whose CURVE key node0 never authorized

Every command is docker-compose.yml's own, with container paths mapped to this
checkout (/app), temp dirs (volumes) and a unique region file; service names
resolve through per-namespace hosts files. The test checks that node0's REST
and gRPC show all 8 remote ranks healthy, kills node2 and sees ranks 4-7 go
stale, restarts it and sees them healthy, and that the intruder's frames never
reach the region while the unauthorized counter on /metrics grows.

Skipped (with the reason) only where namespaces cannot be made: not root, no
`ip`, no permission. Namespaces, bridge and hosts files are removed afterwards
even when the test fails.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadsvc.bench.netns import NetnsUnavailable, Topology, check_available, wait_until

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
HOSTS = ("keys", "node0", "node1", "node2", "router", "intruder")
INTRUDER_MARK = 987_654  # num_running_reqs no honest simulator publishes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _child_env() -> dict[str, str]:
    """Our environment minus proxies (every target here is a namespace address or loopback)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ComposeOnNetns:
    """Translates docker-compose.yml's services into commands for this machine."""

    def __init__(self, compose: dict[str, Any], workdir: Path) -> None:
        self.compose = compose
        self.services = compose["services"]
        self.workdir = workdir
        self.shm = Path(f"/dev/shm/loadsvc-netns-{os.getpid()}-{uuid.uuid4().hex[:8]}.shm")
        # container path -> path here: the image's /app is this checkout; named volumes
        # are temp dirs; node0's region gets a name no parallel run uses.
        self.paths: dict[str, str] = {"/app": str(ROOT)}
        for svc in self.services.values():
            for volume in svc.get("volumes", []):
                name, target = volume.split(":")[:2]
                host_dir = workdir / "volumes" / name
                host_dir.mkdir(parents=True, exist_ok=True)
                self.paths[target] = str(host_dir)
        for arg in self.command("node0", translate=False):
            if arg.startswith("/dev/shm/"):
                self.paths[arg] = str(self.shm)

    def _path(self, arg: str) -> str:
        for container, here in self.paths.items():
            if arg == container or arg.startswith(container + "/"):
                return here + arg[len(container):]
        return arg

    def command(self, service: str, *, translate: bool = True) -> list[str]:
        argv = list(self.services[service]["command"])
        if not translate:
            return argv
        if argv[:2] == ["sh", "-c"]:
            script = re.sub(r"(?<![\w/])(/[\w./-]+)", lambda m: shlex.quote(self._path(m.group(1))),
                            argv[2])
            script = re.sub(r"(^|&&\s*)loadsvc\b",
                            lambda m: m.group(1) + f"{shlex.quote(sys.executable)} -m loadsvc", script)
            return ["sh", "-c", script]
        argv = [self._path(a) for a in argv]
        if argv[0] == "loadsvc":
            return [sys.executable, "-m", "loadsvc", *argv[1:]]
        if argv[0] == "python":
            return [sys.executable, *argv[1:]]
        return argv

    def flag(self, service: str, name: str) -> str:
        argv = self.command(service)
        return argv[argv.index(name) + 1]

    def healthcheck(self, service: str) -> list[str]:
        test = self.services[service]["healthcheck"]["test"]
        assert test[0] == "CMD"
        argv = [self._path(a) for a in test[1:]]
        return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


@pytest.fixture
def topology() -> Iterator[Topology]:
    try:
        check_available()
    except NetnsUnavailable as e:
        pytest.skip(f"cannot create network namespaces here: {e}")
    topo = Topology(HOSTS)
    try:
        topo.up()
        yield topo
    finally:
        topo.close()


@pytest.fixture
def compose(tmp_path: Path) -> Iterator[ComposeOnNetns]:
    c = ComposeOnNetns(yaml.safe_load(COMPOSE.read_text()), tmp_path)
    yield c
    c.shm.unlink(missing_ok=True)


class Node0:
    """What the test reads from node0: REST /v1/loads and /metrics, gRPC GetLoads."""

    def __init__(self, addr: str, http_port: str, grpc_port: str) -> None:
        self.http = httpx.Client(base_url=f"http://{addr}:{http_port}", timeout=2.0, trust_env=False)
        self.channel = grpc.insecure_channel(f"{addr}:{grpc_port}", options=[("grpc.enable_http_proxy", 0)])
        from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
        from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc

        self.pb = pb
        self.stub = pb_grpc.LoadServiceStub(self.channel)

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    def rest_loads(self) -> dict[str, Any]:
        r = self.http.get("/v1/loads")
        r.raise_for_status()
        return r.json()

    def rest_status(self) -> dict[int, str]:
        return {load["dp_rank"]: load["status"] for load in self.rest_loads()["loads"]}

    def grpc_status(self) -> tuple[int, dict[int, str]]:
        resp = self.stub.GetLoads(self.pb.GetLoadsRequest(), timeout=2.0)
        return resp.dp_rank_count, {
            load.dp_rank: self.pb.LoadStatus.Name(load.status).removeprefix("LOAD_STATUS_").lower()
            for load in resp.loads}

    def metric(self, name: str, **labels: str) -> float:
        r = self.http.get("/metrics")
        r.raise_for_status()
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


def _all(status: dict[int, str], ranks: range, want: str) -> bool:
    return all(status.get(r) == want for r in ranks)


INTRUDER = f"""
import sys, time
from pathlib import Path
from loadsvc import LoadSnapshot
from loadsvc.relay import ZmqPublisher
from loadsvc.settings import CurveClientSettings
endpoint, server_key, secret = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
curve = CurveClientSettings(server_key, secret)
pubs = [ZmqPublisher(endpoint, dp_size=8, dp_rank=r, curve=curve) for r in range(8)]
pubs += [ZmqPublisher(endpoint, dp_size=8, dp_rank=r) for r in range(8)]  # and one without CURVE
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    for p in pubs:
        p.publish(LoadSnapshot(dp_rank=p.dp_rank, num_running_reqs={INTRUDER_MARK}))
    time.sleep(0.02)
print("intruder done", sum(p.seq for p in pubs), flush=True)
"""


def test_compose_topology_on_network_namespaces(topology: Topology, compose: ComposeOnNetns,
                                                tmp_path: Path) -> None:
    t, c = topology, compose
    env = _child_env()
    logs = tmp_path / "logs"
    logs.mkdir()

    def log_of(name: str) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(logs.glob(f"{name}*.log")))

    def all_logs() -> str:
        return log_of("")

    # keys: the compose command generates every key pair into the shared volume
    done = t.run("keys", c.command("keys"), env=env)
    assert done.returncode == 0, done.stderr
    keys_dir = Path(c.paths["/keys"])
    assert (keys_dir / "node0.key_secret").exists() and (keys_dir / "publishers" / "node2.key").exists()

    node0_proc = t.start("node0", c.command("node0"), logs / "node0.log", env)
    http_port, grpc_port = c.flag("node0", "--http-port"), c.flag("node0", "--grpc-port")
    stale_after = float(c.flag("node0", "--stale-after"))
    assert stale_after <= 3, "the compose file's --stale-after is what this test waits for"
    node0 = Node0(t.addr["node0"], http_port, grpc_port)
    try:
        # node0's own healthcheck command, run inside its namespace, passes once it is up
        wait_until(lambda: node0_proc.poll() is None and t.run("node0", c.healthcheck("node0"),
                                                               timeout=10, env=env).returncode == 0,
                   20, lambda: f"node0's healthcheck\n{all_logs()}", interval=0.2)

        node1 = t.start("node1", c.command("node1"), logs / "node1.log", env)
        node2 = t.start("node2", c.command("node2"), logs / "node2-a.log", env)
        wait_until(lambda: _all(node0.rest_status(), range(8), "healthy"), 20,
                   lambda: f"all 8 remote ranks healthy over REST\n{all_logs()}")
        body = node0.rest_loads()
        assert body["dp_rank_count"] == 8 and [x["dp_rank"] for x in body["loads"]] == list(range(8))
        count, status = node0.grpc_status()
        assert count == 8 and _all(status, range(8), "healthy"), status
        accepted_before = node0.metric("loadsvc_relay_frames_accepted_total")
        assert accepted_before > 0

        # the router: the compose command, briefly (a few picks from the live stream)
        router = t.run("router", [*c.command("router"), "--count", "3", "--seed", "1"], timeout=30,
                       env=env)
        assert router.returncode == 0, router.stdout + router.stderr
        picks = [line for line in router.stdout.splitlines() if "pick rank" in line]
        assert len(picks) == 3 and all("[8/8 healthy]" in p for p in picks), router.stdout

        # node2 dies: its ranks turn stale after --stale-after; node1's stay healthy
        killed_at = time.monotonic()
        Topology.stop(node2, signal.SIGKILL)
        wait_until(lambda: (lambda s: _all(s, range(4, 8), "stale") and _all(s, range(4), "healthy"))(
            node0.rest_status()), stale_after + 8, lambda: f"ranks 4-7 stale\n{all_logs()}")
        assert time.monotonic() - killed_at >= stale_after - 0.5  # not before the bound
        count, status = node0.grpc_status()
        assert _all(status, range(4, 8), "stale") and _all(status, range(4), "healthy"), status

        # node2 comes back (a new publisher epoch): healthy again, serve never restarted
        node2 = t.start("node2", c.command("node2"), logs / "node2-b.log", env)
        wait_until(lambda: _all(node0.rest_status(), range(8), "healthy"), 20,
                   lambda: f"ranks 4-7 healthy again\n{all_logs()}")
        assert node0_proc.poll() is None
        _, status = node0.grpc_status()
        assert _all(status, range(8), "healthy"), status

        # an intruder with a key node0 never authorized (and one with no key at all)
        unauthorized_before = node0.metric("loadsvc_relay_frames_rejected_total", reason="unauthorized")
        done = t.run("keys", [sys.executable, "-m", "loadsvc", "keys", "gen", str(tmp_path / "intruder"),
                              "intruder"], env=env)
        assert done.returncode == 0, done.stderr
        collect_port = c.flag("node0", "--collect").rsplit(":", 1)[1]
        intruder = t.start("intruder", [
            sys.executable, "-c", INTRUDER, f"tcp://node0:{collect_port}",
            c.flag("node1", "--curve-server-key"), str(tmp_path / "intruder" / "intruder.key_secret"),
            "2"], logs / "intruder.log", env)
        deadline = time.monotonic() + 15
        while intruder.poll() is None and time.monotonic() < deadline:
            loads = node0.rest_loads()["loads"]
            assert all(x["num_running_reqs"] != INTRUDER_MARK for x in loads), loads
            time.sleep(0.05)
        assert intruder.returncode == 0, log_of("intruder")
        assert "intruder done" in log_of("intruder")
        for _ in range(10):  # and nothing arrives late
            assert all(x["num_running_reqs"] != INTRUDER_MARK for x in node0.rest_loads()["loads"])
            time.sleep(0.05)
        wait_until(lambda: node0.metric("loadsvc_relay_frames_rejected_total", reason="unauthorized")
                   > unauthorized_before, 5, "the unauthorized counter on /metrics to grow")
        # the keyless attempts: handshake_failed, or no_handshake when libzmq reports the
        # one-sided CURVE mismatch without detail (loadsvc/relay/collector.py, REJECT_REASONS)
        assert sum(node0.metric("loadsvc_relay_frames_rejected_total", reason=r)
                   for r in ("handshake_failed", "no_handshake")) > 0
        assert _all(node0.rest_status(), range(8), "healthy")
        assert node0.metric("loadsvc_relay_frames_accepted_total") > accepted_before

        for proc in (node1, node2):
            assert Topology.stop(proc) == 0, all_logs()
        assert Topology.stop(node0_proc) == 0, all_logs()
    finally:
        node0.close()
