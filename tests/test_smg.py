"""The SGLang model gateway (smg, from PyPI) routing by loadsvc's loads, unchanged.

smg --policy power_of_two --load-monitor-interval 1 polls each worker's
GET /v1/loads, which `loadsvc engine` serves through the embedding API. Two
engines, one at a quarter of the other's speed: the gateway must send most
requests to the fast one, its /get_loads must show the values loadsvc
publishes, and a worker whose publisher stops must turn stale in loadsvc.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import grpc
import httpx
import pytest
from conftest import drive, wait_for

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc.tools.fleet import EngineProc, Fleet, smg_available

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90),
              pytest.mark.skipif(smg_available() is not None, reason=smg_available() or "")]

REQUESTS = 80
CONCURRENCY = 4



def engine_loads(engine: EngineProc) -> dict[str, Any]:
    return httpx.get(engine.url + "/v1/loads", params={"include": "all"}, timeout=5).json()["loads"][0]


def gateway_loads(gateway_url: str) -> dict[str, dict[str, Any]]:
    """The gateway's own view, by worker URL."""
    body = httpx.get(gateway_url + "/get_loads", timeout=5).json()
    return {entry["worker"]: entry for entry in body["loads"]}




def test_smg_power_of_two_routes_on_loadsvc_loads(fleet: Fleet) -> None:
    # Distinct KV budgets mark which worker a value in the gateway's view came from.
    fast = fleet.engine(speeds=(1.0,), max_total_tokens=50_000, stale_after=1.0, wait=False)
    slow = fleet.engine(speeds=(0.25,), max_total_tokens=40_000, stale_after=1.0, wait=False)
    fleet.wait(fast, slow)  # smg retries an unready worker only after 30 s: start it after them
    gateway = fleet.smg([fast, slow], policy="power_of_two", load_monitor_interval=1)

    # 1. The gateway's /get_loads carries what loadsvc serves on each worker's /v1/loads.
    view = wait_for(lambda: (v := gateway_loads(gateway.url)) and len(v) == 2 and v, 10,
                    "the gateway to have polled both workers")
    for engine, budget in ((fast, 50_000), (slow, 40_000)):
        ours, theirs = engine_loads(engine), view[engine.url]
        for key in ("max_total_num_tokens", "max_running_requests", "num_running_reqs",
                    "num_waiting_reqs", "token_usage"):
            assert theirs[key] == ours[key], (engine.url, key, theirs, ours)
        assert theirs["max_total_num_tokens"] == budget
        assert theirs["memory"] == {k: ours["memory"][k] for k in theirs["memory"]}

    # A live value: a long request on the slow worker shows up in the gateway's view.
    with httpx.Client(timeout=60) as client:
        pending = client.build_request("POST", slow.url + "/generate", json={
            "text": "x", "sampling_params": {"max_new_tokens": 200}})  # ~8 s on the slow worker
        import threading

        t = threading.Thread(target=client.send, args=(pending,))
        t.start()
        live = wait_for(lambda: (v := gateway_loads(gateway.url)[slow.url])["num_used_tokens"] > 0 and v, 15,
                        "the gateway to see the slow worker's running request")  # it polls every 1 s
        assert live["num_running_reqs"] == 1
        t.join(30)  # before the drive below: both workers start idle

    # 2. Most requests go to the fast worker (counted by the engines themselves).
    before = fast.completed(), slow.completed()
    started = time.monotonic()
    codes = asyncio.run(drive(gateway.url, REQUESTS, CONCURRENCY))
    assert codes == [200] * REQUESTS
    n_fast, n_slow = fast.completed() - before[0], slow.completed() - before[1]
    assert n_fast + n_slow == REQUESTS
    assert n_fast >= 0.7 * REQUESTS, (f"power_of_two on loadsvc loads sent {n_fast} to the fast worker "
                                      f"and {n_slow} to the slow one in {time.monotonic() - started:.1f} s")

    # 3. The slow worker's publisher stops: loadsvc reports its rank stale, over REST and gRPC.
    slow.send_signal(signal.SIGUSR1)
    stale = wait_for(lambda: (ld := engine_loads(slow))["status"] == "stale" and ld, 5,
                     "the slow worker's rank to turn stale")
    assert stale["age_ms"] > 1000
    with grpc.insecure_channel(slow.grpc) as channel:
        resp = channel.unary_unary("/sglang.grpc.scheduler.SglangScheduler/GetLoads",
                                   request_serializer=pb.GetLoadsRequest.SerializeToString,
                                   response_deserializer=pb.GetLoadsResponse.FromString)(
            pb.GetLoadsRequest(), timeout=5)
        assert resp.loads[0].status == pb.LOAD_STATUS_STALE
    assert engine_loads(fast)["status"] == "healthy"
    # The gateway still polls the worker and keeps routing; it reads the numbers, not the status.
    assert gateway_loads(gateway.url)[slow.url]["max_total_num_tokens"] == 40_000
