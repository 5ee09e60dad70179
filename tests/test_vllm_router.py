"""vllm-router (PyPI vllm-router, vLLM's Rust router) routing on loadsvc's loads.

Its power_of_two policy polls each worker's GET /get_load for ``{"load": N}``
(every --worker-startup-check-interval seconds) and sends each request to the
lower of two; it keeps no count of its own requests under that policy. Stock
vLLM has no /get_load, so there it routes at random. `loadsvc engine` serves
/get_load through the embedding (loads_router(get_load=True)), the vLLM
middleware does the same from vLLM's port.

1. The router's view (its /get_loads) carries what each engine's /get_load
   says; an engine busy with requests the router did not send gets none.
2. Fast and slow engine (a quarter of the speed): most requests go to the fast
   one. Where vllm-router is missing the test skips, except under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import drive, wait_for

from loadsvc.tools.fleet import EngineProc, Fleet, vllm_router_available

pytestmark = [pytest.mark.timeout(120), pytest.mark.integration]
HELD = 6  # requests held open on the busy engine, more than the router ever has in flight
CONCURRENCY = 4
LOAD_INTERVAL = 1  # seconds between vllm-router's polls of /get_load (whole seconds, at least 1)


@pytest.fixture(autouse=True)
def _needs_vllm_router() -> None:
    why = vllm_router_available()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the vllm-router test: {why}")
        pytest.skip(why)


def router_loads(router_url: str) -> dict[str, int]:
    """Each worker's load as vllm-router reads it (its GET /get_loads asks every /get_load now; -1
    where it cannot read one). Its policy uses what its poll task read last."""
    body = httpx.get(router_url + "/get_loads", timeout=5).json()
    return {w["worker"]: w["load"] for w in body["workers"]}


@contextlib.asynccontextmanager
async def held_busy(engine: EngineProc) -> AsyncIterator[None]:
    """HELD long streaming requests open on engine (not through the router) until the exit."""
    async with httpx.AsyncClient(timeout=30) as client, contextlib.AsyncExitStack() as stack:
        for i in range(HELD):
            await stack.enter_async_context(client.stream("POST", engine.url + "/generate", json={
                "text": f"held {i}", "stream": True, "sampling_params": {"max_new_tokens": 5000}}))
        yield


def counts(*engines: EngineProc) -> list[int]:
    return [e.completed() for e in engines]


async def test_vllm_router_power_of_two_routes_on_loadsvc_get_load(fleet: Fleet) -> None:
    fast = fleet.engine(speeds=(1.0,), wait=False)
    slow = fleet.engine(speeds=(0.25,), wait=False)
    fleet.wait(fast, slow)
    assert httpx.get(fast.url + "/get_load", timeout=5).json()["load"] == 0
    router = fleet.vllm_router([fast, slow], policy="power_of_two", load_interval=LOAD_INTERVAL)

    # 1. Load the router did not send: it reads it from /get_load and sends nothing there.
    async with held_busy(slow):
        view: dict[str, Any] = wait_for(
            lambda: (v := router_loads(router.url)).get(slow.url) == HELD and v, 10,
            "vllm-router to read the slow engine's held requests from its /get_load")
        assert view[fast.url] == 0
        await asyncio.sleep(2 * LOAD_INTERVAL)  # the router's own poll has read it too
        before = counts(fast, slow)
        assert await drive(router.url, 40, CONCURRENCY, max_new=8) == [200] * 40
        after = counts(fast, slow)
        assert (after[0] - before[0], after[1] - before[1]) == (40, 0)
    wait_for(lambda: router_loads(router.url).get(slow.url) == 0, 10,
             "vllm-router to see the slow engine idle again")
    await asyncio.sleep(2 * LOAD_INTERVAL)

    # 2. Fast and slow, only the router's own traffic: most of it goes to the fast engine.
    before = counts(fast, slow)
    assert await drive(router.url, 80, CONCURRENCY) == [200] * 80
    after = counts(fast, slow)
    n_fast, n_slow = after[0] - before[0], after[1] - before[1]
    assert n_fast + n_slow == 80 and n_fast > n_slow, (n_fast, n_slow)
