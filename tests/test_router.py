"""loadsvc/tools/router.py: the reference router as a real process in front of real toy engines."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import drive

from loadsvc.tools.fleet import EngineProc, Fleet
from loadsvc.tools.router import parse_worker

pytestmark = pytest.mark.timeout(120)




def per_rank(engine: EngineProc) -> list[int]:
    return [r["completed"] for r in engine.server_info()["loadsvc_engine"]["ranks"]]


def state(router_url: str) -> dict[str, Any]:
    return httpx.get(router_url + "/router/workers", timeout=5).json()


def test_parse_worker() -> None:
    w = parse_worker("http://127.0.0.1:30000/=127.0.0.1:30001")
    assert (w.url, w.grpc) == ("http://127.0.0.1:30000", "127.0.0.1:30001")
    for bad in ("127.0.0.1:30000=127.0.0.1:30001", "http://127.0.0.1:30000", "http://h:1=nohost"):
        with pytest.raises(ValueError, match="HTTP URL"):
            parse_worker(bad)


@pytest.mark.integration
def test_p2c_sends_most_requests_to_the_fast_engine(fleet: Fleet) -> None:
    fast = fleet.engine(speeds=(1.0,), wait=False)
    slow = fleet.engine(speeds=(0.25,), wait=False)
    fleet.wait(fast, slow)
    router = fleet.router([fast, slow], policy="p2c", seed=7)
    assert asyncio.run(drive(router.url, 80, 4)) == [200] * 80
    n_fast, n_slow = fast.completed(), slow.completed()
    assert n_fast + n_slow == 80 and n_fast >= 0.7 * 80, (n_fast, n_slow)
    st = state(router.url)
    assert [w["sent"] for w in st["workers"]] == [n_fast, n_slow]
    assert st["fallbacks"] == 0
    lag = st["view_lag_ms"]
    assert lag["samples"] > 50 and lag["p50"] < 50, lag  # a fresh view: pushed within a publish period


@pytest.mark.integration
def test_p2c_picks_the_rank_of_a_multi_rank_engine(fleet: Fleet) -> None:
    engine = fleet.engine(dp_size=2, speeds=(1.0, 0.25))
    router = fleet.router([engine], policy="p2c", seed=1)
    assert asyncio.run(drive(router.url, 60, 4)) == [200] * 60
    fast, slow = per_rank(engine)
    assert fast + slow == 60 and fast >= 0.7 * 60, (fast, slow)
    ranks = state(router.url)["workers"][0]["ranks"]
    assert [r["sent"] for r in ranks] == [fast, slow]
    # a rank the client names is left alone
    assert asyncio.run(drive(router.url, 5, 2, max_new=1, extra={"data_parallel_rank": 1})) == [200] * 5
    assert per_rank(engine)[1] == slow + 5


@pytest.mark.integration
def test_p2c_skips_an_engine_whose_loads_are_stale(fleet: Fleet) -> None:
    a = fleet.engine(stale_after=1.0, wait=False)
    b = fleet.engine(stale_after=1.0, wait=False)
    fleet.wait(a, b)
    router = fleet.router([a, b], policy="p2c")
    b.send_signal(signal.SIGUSR1)  # b keeps serving but stops publishing: loadsvc marks it stale
    deadline = time.monotonic() + 5
    while state(router.url)["workers"][1]["ranks"][0]["healthy"]:
        assert time.monotonic() < deadline, "the router never saw b's rank turn stale"
        time.sleep(0.05)
    before = b.completed()
    assert asyncio.run(drive(router.url, 20, 4, max_new=2)) == [200] * 20
    assert b.completed() == before
    b.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while not state(router.url)["workers"][1]["ranks"][0]["healthy"]:
        assert time.monotonic() < deadline, "the router never saw b healthy again"
        time.sleep(0.05)


async def async_wait_for(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    """wait_for without blocking the event loop (requests of the test are in flight on it)."""
    deadline = time.monotonic() + timeout
    while not (value := await asyncio.to_thread(predicate)):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)
    return value


@contextlib.asynccontextmanager
async def held(url: str, n: int) -> AsyncIterator[None]:
    """n long streaming requests open through url (an engine or the router) until the exit."""
    async with httpx.AsyncClient(timeout=30) as client, contextlib.AsyncExitStack() as stack:
        for i in range(n):
            await stack.enter_async_context(client.stream("POST", url + "/generate", json={
                "text": f"held {i}", "stream": True, "sampling_params": {"max_new_tokens": 5000}}))
        yield


async def test_p2c_counts_load_it_did_not_send_and_its_own_once(fleet: Fleet) -> None:
    a = fleet.engine(max_running_requests=4, stale_after=30, wait=False)
    b = fleet.engine(max_running_requests=4, stale_after=30, wait=False)
    fleet.wait(a, b)
    router = fleet.router([a, b], policy="p2c", seed=3)

    def rank(i: int) -> dict[str, Any]:
        return state(router.url)["workers"][i]["ranks"][0]

    # 12 requests on a that no router sent (4 running, 8 waiting): the router sees them in a's
    # loads and sends it nothing (a margin of 3x over the rate estimates of a rank just started).
    async with held(a.url, 12), httpx.AsyncClient(timeout=60) as client:
        await async_wait_for(lambda: rank(0)["running"] + rank(0)["waiting"] == 12, "the router to see a's 12")
        assert await drive(router.url, 20, 2, max_new=4) == [200] * 20
        assert (a.completed(), b.completed()) == (0, 20)

        # 3 of the router's own on b (about 4 s each), once published: counted once, not in the
        # loads and again as its own.
        own = [asyncio.create_task(client.post(router.url + "/generate", json={
            "text": f"own {i}", "sampling_params": {"max_new_tokens": 400}})) for i in range(3)]
        r = await async_wait_for(lambda: (r := rank(1))["running"] == 3 and r["sent_since_publish"] == 0
                                 and r, "b's loads to include the router's 3")
        assert (r["inflight"], r["own_in_view"], r["queued"]) == (3, 3, 3)
        b.send_signal(signal.SIGUSR1)  # b stops publishing: its loads in the router stay at 3 running
        assert [x.status_code for x in await asyncio.gather(*own)] == [200] * 3
    # The router's 3 ended after b's last publish: not counted again from its frozen figures.
    r = rank(1)
    assert (r["running"], r["inflight"], r["queued"]) == (3, 0, 0), r
    b.send_signal(signal.SIGUSR2)


def test_engine_gone_requests_still_served(fleet: Fleet) -> None:
    a = fleet.engine(wait=False)
    b = fleet.engine(wait=False)
    fleet.wait(a, b)
    router = fleet.router([a, b], policy="p2c")
    b.stop()
    assert asyncio.run(drive(router.url, 20, 4, max_new=2)) == [200] * 20
    assert httpx.get(router.url + "/health").status_code == 200
    a.stop()
    deadline = time.monotonic() + 5
    while httpx.get(router.url + "/health").status_code != 503:
        assert time.monotonic() < deadline, "the router still called itself healthy with no engine"
        time.sleep(0.05)
    r = httpx.post(router.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]


@pytest.mark.integration
def test_round_robin_alternates_and_streams_through(fleet: Fleet) -> None:
    a = fleet.engine(wait=False)
    b = fleet.engine(wait=False)
    fleet.wait(a, b)
    router = fleet.router([a, b], policy="round_robin")
    with httpx.Client(base_url=router.url, timeout=30) as c:
        for _ in range(6):
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
        assert (a.completed(), b.completed()) == (3, 3)
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 20, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 3
        assert c.get("/v1/models").json()["data"][0]["id"] == "loadsvc-toy"
        bad = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": -1}})
        assert bad.status_code == 400  # the engine's answer, passed through
