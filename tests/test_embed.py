"""loadsvc/embed.py: loads served from an engine's own FastAPI app (the gRPC half: test_orca.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

import loadsvc
from loadsvc import LoadSnapshot, ShmPublisher
from loadsvc.embed import loads_router, open_store


@pytest.fixture
def region(tmp_path: Path) -> Path:
    return tmp_path / "embed.shm"


def engine_app(region: Path, **router_kwargs: object) -> FastAPI:
    """What an engine does: its own routes first, then one line for the loads."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"engine": "ok"}

    @app.get("/get_model_info")
    async def model_info() -> dict[str, str]:
        return {"model_path": "toy"}

    app.include_router(loads_router(open_store(region, dp_size=2), **router_kwargs))
    return app


async def test_loads_router_serves_v1_loads_in_an_engine_app(region: Path) -> None:
    app = engine_app(region)
    with ShmPublisher(region, dp_size=2, dp_rank=1) as pub:
        pub.publish(LoadSnapshot(dp_rank=1, num_running_reqs=7, num_waiting_reqs=2, token_usage=0.25,
                                 max_total_num_tokens=1000))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine") as c:
            body = (await c.get("/v1/loads", params={"include": "core"})).json()
            assert [(x["dp_rank"], x["num_running_reqs"], x["num_waiting_reqs"], x["token_usage"],
                     x["status"]) for x in body["loads"]] == [(1, 7, 2, 0.25, "healthy")]
            assert body["aggregate"]["total_running_reqs"] == 7
            assert (await c.get("/health")).json() == {"engine": "ok"}  # the engine's own
            assert (await c.get("/metrics")).status_code == 404  # not added unless asked for
            assert (await c.get("/get_model_info")).json() == {"model_path": "toy"}
            prom = (await c.get("/v1/loads", params={"format": "prometheus"})).text
            assert 'num_running_reqs{dp_rank="1"} 7.0' in prom


async def test_loads_router_can_add_health_and_metrics(region: Path) -> None:
    app = FastAPI()
    app.include_router(loads_router(open_store(region, dp_size=2), health=True, metrics=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine") as c:
        assert (await c.get("/health")).json()["attached"] is True
        assert "loadsvc_region_attached" in (await c.get("/metrics")).text


async def test_loads_router_api_key(region: Path) -> None:
    app = engine_app(region, api_key="k3y")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine") as c:
        assert (await c.get("/v1/loads")).status_code == 401
        ok = await c.get("/v1/loads", headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and ok.json()["dp_rank_count"] == 2


async def test_loads_router_get_load_in_vllm_routers_shape(region: Path) -> None:
    plain = engine_app(region)
    app = engine_app(region, get_load=True, api_key="k3y")
    auth = {"Authorization": "Bearer k3y"}
    with ShmPublisher(region, dp_size=2, dp_rank=0) as a, ShmPublisher(region, dp_size=2, dp_rank=1) as b:
        a.publish(LoadSnapshot(dp_rank=0, num_running_reqs=3, num_waiting_reqs=1))
        b.publish(LoadSnapshot(dp_rank=1, num_running_reqs=7, num_waiting_reqs=2))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url="http://e") as c:
            assert (await c.get("/get_load")).status_code == 404  # only when asked for
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://e") as c:
            assert (await c.get("/get_load")).status_code == 401  # behind the API key, as /v1/loads
            # vllm-router reads the integer `load` of an object: running + waiting over the ranks
            assert (await c.get("/get_load", headers=auth)).json() == {
                "load": 13, "num_running_reqs": 10, "num_waiting_reqs": 3, "ranks": 2}
            spec = (await c.get("/openapi.json")).json()
            assert spec["paths"]["/get_load"]["get"]["operationId"] == "get_load"


def test_open_store_defaults_and_checks(region: Path) -> None:
    store = open_store(region, dp_size=3, stale_after=0.5, unreachable_after=2.0)
    assert store.attached and store.dp_size == 3
    assert (store.settings.stale_after, store.settings.unreachable_after) == (0.5, 2.0)
    assert open_store(region).dp_size == 3  # attaches to the existing region
    with pytest.raises(ValueError, match="stale_after"):
        open_store(region, stale_after=0)
    with pytest.raises(ValueError, match="unreachable_after"):
        open_store(region, stale_after=5.0, unreachable_after=1.0)
    missing = open_store(region.with_name("not-there.shm"))  # waits for a publisher
    assert not missing.attached and missing.view().snapshots == ()


@pytest.mark.integration
def test_public_names_and_a_light_import() -> None:
    for name in ("open_store", "loads_router", "add_to_grpc_server", "add_orca_service"):
        assert name in loadsvc.__all__ and callable(getattr(loadsvc, name))
    # Publishing engines import loadsvc without paying for grpc or FastAPI.
    code = "import sys, loadsvc; print(any(m in sys.modules for m in ('grpc', 'fastapi')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
