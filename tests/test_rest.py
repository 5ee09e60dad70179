"""loadsvc/surfaces/rest.py: GET /v1/loads (JSON, Prometheus), /health, /metrics over a real region.

Snapshots are published with ShmPublisher into a unique /dev/shm region; the
app is driven in-process through httpx's ASGI transport (both the standalone
create_app, whose /v1/loads takes a fast path, and an engine-style FastAPI app
that mounts create_router), and once through a real uvicorn process on a
loopback port.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, port_answers
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from loadsvc import (
    DisaggregationMetrics,
    LoadSnapshot,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    ShmPublisher,
    SpeculativeMetrics,
    __version__,
)
from loadsvc.core.schema import to_dict
from loadsvc.core.store import LoadStore, Selection
from loadsvc.settings import StoreSettings
from loadsvc.surfaces import rest

# The twelve keys of SGLang's SchedulerLoad JSON that every rank always carries.
SGLANG_CORE_KEYS = (
    "dp_rank", "num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
    "max_total_num_tokens", "token_usage", "gen_throughput", "cache_hit_rate", "utilization",
    "max_running_requests", "num_waiting_uncached_tokens",
)
SECTION_NAMES = ("memory", "speculative", "lora", "disaggregation", "queues")


def snapshots() -> list[Any]:
    """Three ranks with distinct values; rank 0 has every section, rank 1 some, rank 2 none."""
    return [
        LoadSnapshot(dp_rank=0, num_running_reqs=12, num_waiting_reqs=3, num_total_reqs=15,
                     num_used_tokens=40960, max_total_num_tokens=200000, token_usage=0.2048,
                     gen_throughput=1500.5, cache_hit_rate=0.4, utilization=0.7,
                     max_running_requests=256, num_waiting_uncached_tokens=900, num_total_tokens=41000,
                     memory=MemoryMetrics(weight_gb=15.25, kv_cache_gb=40.0, graph_gb=2.5,
                                          token_capacity=200000),
                     speculative=SpeculativeMetrics(accept_length=2.75, accept_rate=0.625),
                     lora=LoRAMetrics(slots_used=2, slots_total=8, utilization=0.25),
                     disaggregation=DisaggregationMetrics(mode="prefill", prefill_prealloc_queue_reqs=4,
                                                          kv_transfer_speed_gb_s=12.5,
                                                          kv_transfer_latency_ms=3.25),
                     queues=QueueMetrics(waiting=3, grammar=1, paused=0, retracted=2)),
        LoadSnapshot(dp_rank=1, num_running_reqs=30, num_waiting_reqs=0, num_total_reqs=30,
                     num_used_tokens=100000, max_total_num_tokens=200000, token_usage=0.5,
                     gen_throughput=2200.0, cache_hit_rate=0.1, utilization=0.9,
                     max_running_requests=256, num_total_tokens=100000,
                     memory=MemoryMetrics(weight_gb=15.25, kv_cache_gb=40.0),
                     queues=QueueMetrics(waiting=0, grammar=0, paused=1, retracted=0)),
        LoadSnapshot(dp_rank=2, num_running_reqs=1, num_waiting_reqs=7, num_total_reqs=8,
                     num_used_tokens=512, max_total_num_tokens=100000, token_usage=0.00512,
                     gen_throughput=80.0, cache_hit_rate=0.0, utilization=0.05,
                     max_running_requests=128, num_waiting_uncached_tokens=3000),
    ]


class Region:
    """Publishers for every rank of one region file."""

    def __init__(self, path: Path, dp_size: int) -> None:
        self.path = path
        self.pubs = [ShmPublisher(path, dp_size=dp_size, dp_rank=r) for r in range(dp_size)]

    def publish(self, snap: Any) -> int:
        return self.pubs[snap.dp_rank].publish(snap)

    def close(self) -> None:
        for p in self.pubs:
            p.close()


@pytest.fixture
def region(shm_path: Path) -> Iterator[Region]:
    r = Region(shm_path, dp_size=4)  # rank 3 never publishes
    for snap in snapshots():
        r.publish(snap)
    yield r
    r.close()


@pytest.fixture
def make_store() -> Iterator[Callable[..., LoadStore]]:
    stores: list[LoadStore] = []

    def make(path: Path, clock: Callable[[], int] = time.time_ns, **kwargs: Any) -> LoadStore:
        store = LoadStore(StoreSettings(shm=path, **kwargs), clock=clock)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


def engine_app(store: LoadStore, **kwargs: Any) -> FastAPI:
    """An engine's own FastAPI app with its own routes, mounting loadsvc's router (issue 7)."""
    app = FastAPI()

    @app.get("/engine/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    app.include_router(rest.create_router(store, **kwargs))
    return app


APP_KINDS = {"create_app": rest.create_app, "embedded": engine_app}


@pytest.fixture(params=list(APP_KINDS))
def app_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[Any], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(app: Any, **kwargs: Any) -> httpx.AsyncClient:
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loadsvc",
                              **kwargs)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.aclose()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def client(region: Region, make_store: Callable[..., LoadStore], app_kind: str,
                 registry: CollectorRegistry,
                 client_for: Callable[[Any], httpx.AsyncClient]) -> httpx.AsyncClient:
    store = make_store(region.path)
    return client_for(APP_KINDS[app_kind](store, registry=registry))


def by_rank(body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {load["dp_rank"]: load for load in body["loads"]}


# -- JSON ------------------------------------------------------------------------------


async def test_all_ranks_equal_what_was_published(client: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)
    r = await client.get("/v1/loads")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["version"] == __version__
    assert body["dp_rank_count"] == 4
    ts = datetime.fromisoformat(body["timestamp"])
    assert ts.tzinfo is not None and abs((ts - before).total_seconds()) < 5
    loads = by_rank(body)
    assert sorted(loads) == [0, 1, 2]  # rank 3 never published
    for snap in snapshots():
        got = loads[snap.dp_rank]
        expected = to_dict(snap)
        for key in (*SGLANG_CORE_KEYS, "num_total_tokens"):
            assert got[key] == expected[key], key
        for section in SECTION_NAMES:
            if expected[section] is None:
                assert section not in got
            else:
                assert got[section] == expected[section]  # a nested object, every field
        assert got["status"] == "healthy"
        assert 0 <= got["age_ms"] < 5000
        assert got["seq"] == 1
    agg = body["aggregate"]
    snaps = snapshots()
    assert agg["total_running_reqs"] == sum(s.num_running_reqs for s in snaps)
    assert agg["total_waiting_reqs"] == sum(s.num_waiting_reqs for s in snaps)
    assert agg["total_reqs"] == sum(s.num_total_reqs for s in snaps)
    assert agg["avg_token_usage"] == pytest.approx(sum(s.token_usage for s in snaps) / 3)
    assert agg["avg_throughput"] == pytest.approx(sum(s.gen_throughput for s in snaps) / 3)
    assert agg["avg_utilization"] == pytest.approx(sum(s.utilization for s in snaps) / 3)


async def test_one_rank(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/loads", params={"dp_rank": 1})
    assert r.status_code == 200
    body = r.json()
    assert [load["dp_rank"] for load in body["loads"]] == [1]
    assert body["loads"][0]["num_running_reqs"] == 30
    assert body["aggregate"]["total_running_reqs"] == 30
    assert body["aggregate"]["avg_utilization"] == pytest.approx(0.9)
    assert body["dp_rank_count"] == 4
    # A rank inside the region that never published: no loads, still 200.
    r = await client.get("/v1/loads", params={"dp_rank": 3})
    assert r.status_code == 200 and r.json()["loads"] == []


@pytest.mark.parametrize(("params", "sections"), [
    ([], set(SECTION_NAMES)),
    ([("include", "all")], set(SECTION_NAMES)),
    ([("include", "")], set(SECTION_NAMES)),
    ([("include", "core")], set()),
    ([("include", "memory")], {"memory"}),
    ([("include", "spec"), ("include", "disagg")], {"speculative", "disaggregation"}),
    ([("include", "lora,queues")], {"lora", "queues"}),
    ([("include", " core , memory ")], {"memory"}),
    ([("include", "core,memory"), ("include", "queues")], {"memory", "queues"}),
    ([("include", "MEMORY,Queues")], {"memory", "queues"}),  # any case, as gRPC takes it
])
async def test_include_selects_sections(client: httpx.AsyncClient, params: list[tuple[str, str]],
                                        sections: set[str]) -> None:
    r = await client.get("/v1/loads", params=params)
    assert r.status_code == 200, r.text
    loads = by_rank(r.json())
    published = {s.dp_rank: to_dict(s) for s in snapshots()}
    for rank, load in loads.items():
        for key in SGLANG_CORE_KEYS:
            assert key in load  # the twelve core keys, whatever include says
        assert load["status"] == "healthy" and "age_ms" in load
        expected = {name for name in sections if published[rank][name] is not None}
        assert {name for name in SECTION_NAMES if name in load} == expected
        for name in expected:
            assert load[name] == published[rank][name]


async def test_body_encoded_once_per_state(region: Region, make_store: Callable[..., LoadStore],
                                           client_for: Callable[[Any], httpx.AsyncClient],
                                           app_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Selection] = []
    real = rest._json_body

    def counting(view: Any, sel: Selection) -> bytes:
        builds.append(sel)
        return real(view, sel)

    monkeypatch.setattr(rest, "_json_body", counting)
    # A clock that moves only when told, so the store's 100 ms age refresh cannot
    # start a new view in the middle of the burst.
    now = [time.time_ns()]
    store = make_store(region.path, clock=lambda: now[0])
    client = client_for(APP_KINDS[app_kind](store))
    first = await client.get("/v1/loads")
    view = store.view()
    responses = [await client.get("/v1/loads") for _ in range(20)]
    assert store.view() is view
    assert len(builds) == 1
    assert all(r.content == first.content for r in responses)
    # The bytes the view memoized are what was served, and are not built again.
    cached = view.encoded(("json", Selection()), lambda v: pytest.fail("encoded again"))
    assert cached == first.content
    # Another selection is its own body, also built once.
    for _ in range(3):
        await client.get("/v1/loads", params={"dp_rank": 0})
    assert len(builds) == 2
    # A new publish is a new state: encoded again, with the new value.
    region.publish(LoadSnapshot(dp_rank=2, num_running_reqs=99))
    now[0] = time.time_ns() + 1_000_000  # just after the publish (ages are never negative)
    r = await client.get("/v1/loads")
    assert by_rank(r.json())[2]["num_running_reqs"] == 99
    assert by_rank(r.json())[2]["seq"] == 2
    assert len(builds) == 3
    age = by_rank(r.json())[2]["age_ms"]
    # Time alone refreshes ages (a new view, encoded once more).
    now[0] += 200_000_000
    r = await client.get("/v1/loads")
    assert by_rank(r.json())[2]["age_ms"] == pytest.approx(age + 200, abs=0.01)
    assert len(builds) == 4


def test_view_encoded_returns_the_same_object(region: Region,
                                              make_store: Callable[..., LoadStore]) -> None:
    store = make_store(region.path)
    view = store.view()
    sel = Selection()
    a = view.encoded(("json", sel), lambda v: rest._json_body(v, sel))
    b = view.encoded(("json", sel), lambda v: pytest.fail("encoded twice"))
    assert a is b


# -- Prometheus ------------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], name: str, **labels: str) -> float:
    matches = [s.value for s in fams[name].samples if s.labels == labels]
    assert len(matches) == 1, (name, labels, fams[name].samples)
    return matches[0]


async def test_prometheus_parses_and_values_equal(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/loads", params={"format": "prometheus"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# HELP loadsvc_num_running_reqs " in r.text
    assert "# TYPE loadsvc_num_running_reqs gauge" in r.text
    fams = families(r.text)
    for fam in fams.values():
        assert fam.type == "gauge" and fam.documentation
    for snap in snapshots():
        rank = str(snap.dp_rank)
        d = to_dict(snap)
        for key in SGLANG_CORE_KEYS[1:] + ("num_total_tokens",):
            assert sample(fams, f"loadsvc_{key}", dp_rank=rank) == pytest.approx(d[key]), key
        for section in SECTION_NAMES:
            if d[section] is None:
                assert not [s for name, fam in fams.items() if name.startswith(f"loadsvc_{section}_")
                            for s in fam.samples if s.labels["dp_rank"] == rank]
                continue
            for field, value in d[section].items():
                name = f"loadsvc_{section}_{field}"
                if isinstance(value, str):
                    assert sample(fams, name, dp_rank=rank, **{field: value}) == 1
                else:
                    assert sample(fams, name, dp_rank=rank) == pytest.approx(value), name
        assert sample(fams, "loadsvc_rank_status", dp_rank=rank, status="healthy") == 1
        assert sample(fams, "loadsvc_rank_status", dp_rank=rank, status="stale") == 0
        assert sample(fams, "loadsvc_rank_status", dp_rank=rank, status="unreachable") == 0
        assert 0 <= sample(fams, "loadsvc_age_ms", dp_rank=rank) < 5000
        assert sample(fams, "loadsvc_seq", dp_rank=rank) == 1
    # Rank 1 has memory but no lora: its lora gauges are absent, its memory ones present.
    assert {s.labels["dp_rank"] for s in fams["loadsvc_lora_slots_used"].samples} == {"0"}
    assert {s.labels["dp_rank"] for s in fams["loadsvc_memory_weight_gb"].samples} == {"0", "1"}
    assert sample(fams, "loadsvc_memory_weight_gb", dp_rank="1") == 15.25
    snaps = snapshots()
    assert sample(fams, "loadsvc_aggregate_total_running_reqs") == sum(s.num_running_reqs for s in snaps)
    assert sample(fams, "loadsvc_dp_rank_count") == 4


async def test_prometheus_filters(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/loads", params={"format": "prometheus", "dp_rank": "0",
                                              "include": "core"})
    fams = families(r.text)
    assert {s.labels["dp_rank"] for s in fams["loadsvc_num_running_reqs"].samples} == {"0"}
    assert not any(name.startswith("loadsvc_memory_") for name in fams)
    assert sample(fams, "loadsvc_aggregate_total_running_reqs") == 12
    r = await client.get("/v1/loads", params={"format": "prometheus", "include": "queues"})
    fams = families(r.text)
    assert sample(fams, "loadsvc_queues_paused", dp_rank="1") == 1
    assert not any(name.startswith("loadsvc_memory_") for name in fams)


# -- freshness ----------------------------------------------------------------------------


async def test_status_goes_stale_then_unreachable(region: Region, make_store: Callable[..., LoadStore],
                                                 client_for: Callable[[Any], httpx.AsyncClient],
                                                 app_kind: str) -> None:
    store = make_store(region.path, stale_after=0.3, unreachable_after=0.9)
    client = client_for(APP_KINDS[app_kind](store))

    async def statuses() -> dict[int, str]:
        body = (await client.get("/v1/loads")).json()
        return {load["dp_rank"]: load["status"] for load in body["loads"]}

    def keep_alive() -> None:
        region.publish(LoadSnapshot(dp_rank=0, num_running_reqs=5))

    keep_alive()
    assert await statuses() == {0: "healthy", 1: "healthy", 2: "healthy"}
    deadline = time.monotonic() + 5
    while (s := await statuses()) != {0: "healthy", 1: "stale", 2: "stale"}:
        assert time.monotonic() < deadline, s
        keep_alive()
        time.sleep(0.05)
    body = (await client.get("/v1/loads")).json()
    assert by_rank(body)[1]["age_ms"] > 300
    while (s := await statuses()) != {0: "healthy", 1: "unreachable", 2: "unreachable"}:
        assert time.monotonic() < deadline, s
        keep_alive()
        time.sleep(0.05)
    body = (await client.get("/v1/loads")).json()
    assert by_rank(body)[2]["age_ms"] > 900
    # The aggregate leaves unreachable ranks out.
    assert body["aggregate"]["total_running_reqs"] == 5
    r = await client.get("/v1/loads", params={"format": "prometheus"})
    fams = families(r.text)
    assert sample(fams, "loadsvc_rank_status", dp_rank="2", status="unreachable") == 1
    assert sample(fams, "loadsvc_rank_status", dp_rank="2", status="healthy") == 0


# -- health ------------------------------------------------------------------------------


async def test_health_503_until_the_region_exists(shm_path: Path, make_store: Callable[..., LoadStore],
                                                  client_for: Callable[[Any], httpx.AsyncClient],
                                                  app_kind: str) -> None:
    store = make_store(shm_path)
    client = client_for(APP_KINDS[app_kind](store, api_key="secret"))  # health needs no key
    r = await client.get("/health")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable" and body["attached"] is False
    assert str(shm_path) in body["reason"]
    r = await client.get("/v1/loads", headers={"Authorization": "Bearer secret"})
    assert r.status_code == 200 and r.json()["loads"] == [] and r.json()["dp_rank_count"] == 0
    region = Region(shm_path, dp_size=2)
    try:
        region.publish(LoadSnapshot(dp_rank=1, num_running_reqs=4))
        deadline = time.monotonic() + 5
        while (r := await client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.json() == {"status": "ok", "attached": True, "ranks": 2, "published": 1}
        r = await client.get("/v1/loads", headers={"Authorization": "Bearer secret"})
        assert [load["num_running_reqs"] for load in r.json()["loads"]] == [4]
    finally:
        region.close()


# -- bad input ------------------------------------------------------------------------------

BAD_QUERIES = [
    ("dp_rank=abc", "dp_rank", "not_an_integer"),
    ("dp_rank=1.5", "dp_rank", "not_an_integer"),
    ("dp_rank=", "dp_rank", "not_an_integer"),
    ("dp_rank=1e3", "dp_rank", "not_an_integer"),
    ("dp_rank=-1", "dp_rank", "negative"),
    ("dp_rank=4", "dp_rank", "out_of_range"),
    ("dp_rank=99999999999999999999", "dp_rank", "out_of_range"),
    # past int()'s digit limit: a 400 naming dp_rank, not a 500
    pytest.param("dp_rank=" + "9" * 1000, "dp_rank", "out_of_range", id="dp_rank=9x1000"),
    pytest.param("dp_rank=-" + "9" * 1000, "dp_rank", "negative", id="dp_rank=-9x1000"),
    # past the query string's limit: refused unparsed, still naming dp_rank
    pytest.param("dp_rank=" + "9" * 5000, "dp_rank", "too_long", id="dp_rank=9x5000"),
    ("include=bogus", "include", "unknown_token"),
    ("include=core,bogus", "include", "unknown_token"),
    ("include=memory&include=nope", "include", "unknown_token"),
    ("include=%00", "include", "unknown_token"),
    ("format=xml", "format", "unknown_format"),
    ("format=", "format", "unknown_format"),
    ("format=JSON", "format", "unknown_format"),
]


@pytest.mark.parametrize(("query", "field", "reason"), BAD_QUERIES)
async def test_bad_input_is_a_counted_400(client: httpx.AsyncClient, registry: CollectorRegistry,
                                          query: str, field: str, reason: str) -> None:
    labels = {"field": field, "reason": reason}
    for attempt in (1, 2):  # the second answer comes from the parsed-query memo
        r = await client.get(f"/v1/loads?{query}")
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["field"] == field
        assert error["message"]
        assert registry.get_sample_value("loadsvc_rest_bad_requests_total", labels) == attempt
    assert registry.get_sample_value("loadsvc_rest_requests_total",
                                     {"endpoint": "/v1/loads", "status": "400"}) == 2
    r = await client.get("/v1/loads")  # still serving
    assert r.status_code == 200 and len(r.json()["loads"]) == 3


LIMIT_QUERIES = [
    ("include=" + ",".join(["core"] * 9), "include", "too_many_tokens"),
    ("&".join(["include=memory"] * 9), "include", "too_many_values"),
    ("include=" + ",".join(["memory"] * 8) + " " * 80, "include", "value_too_long"),
    ("include=core&pad=" + "a" * 4100, "query", "too_long"),  # past 4096 bytes: not even parsed
]


@pytest.mark.parametrize(("query", "field", "reason"), LIMIT_QUERIES,
                         ids=["tokens", "values", "long-value", "long-query"])
async def test_query_and_include_limits_are_counted_400s(client: httpx.AsyncClient,
                                                         registry: CollectorRegistry,
                                                         query: str, field: str, reason: str) -> None:
    r = await client.get(f"/v1/loads?{query}")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["field"] == field and len(error["message"]) < 300, error
    assert registry.get_sample_value("loadsvc_rest_bad_requests_total",
                                     {"field": field, "reason": reason}) == 1
    ok = "&".join(["include=core"] * 7) + "&include=" + ",".join(["memory"] * 8)  # at the limits: fine
    r = await client.get(f"/v1/loads?{ok}")
    assert r.status_code == 200 and len(r.json()["loads"]) == 3


async def test_head_answers_like_get_without_a_body(client: httpx.AsyncClient) -> None:
    for query in ("", "?format=prometheus", "?dp_rank=x"):
        get, head = await client.get(f"/v1/loads{query}"), await client.head(f"/v1/loads{query}")
        assert head.status_code == get.status_code != 405
        assert head.headers["content-type"] == get.headers["content-type"]
        assert int(head.headers["content-length"]) == len(get.content) > 0
        assert head.content == b""


async def test_a_huge_dp_rank_is_named_and_cut_short(client: httpx.AsyncClient) -> None:
    error = (await client.get("/v1/loads", params={"dp_rank": "7" * 3000})).json()["error"]
    assert error["field"] == "dp_rank" and "int32" in error["message"]
    assert len(error["message"]) < 200  # not 3,000 digits echoed back
    error = (await client.get("/v1/loads", params={"dp_rank": "7" * 5000})).json()["error"]
    assert error["field"] == "dp_rank" and "dp_rank alone is 5000 bytes" in error["message"]
    assert len(error["message"]) < 200


async def test_bad_messages_say_what_is_expected(client: httpx.AsyncClient) -> None:
    msg = (await client.get("/v1/loads?dp_rank=9")).json()["error"]["message"]
    assert "9" in msg and "0..3" in msg
    msg = (await client.get("/v1/loads?include=bogus")).json()["error"]["message"]
    assert "bogus" in msg and "memory" in msg
    msg = (await client.get("/v1/loads?format=xml")).json()["error"]["message"]
    assert "xml" in msg and "prometheus" in msg


# -- api key ------------------------------------------------------------------------------


async def test_api_key(region: Region, make_store: Callable[..., LoadStore], app_kind: str,
                       registry: CollectorRegistry,
                       client_for: Callable[[Any], httpx.AsyncClient]) -> None:
    client = client_for(APP_KINDS[app_kind](make_store(region.path), api_key="s3cret",
                                            registry=registry))
    for path in ("/v1/loads", "/v1/loads?format=prometheus", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            r = await client.get(path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["field"] == "authorization"
            assert r.headers["www-authenticate"] == "Bearer"
        r = await client.get(path, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200, path
    assert (await client.get("/health")).status_code == 200
    assert registry.get_sample_value("loadsvc_rest_requests_total",
                                     {"endpoint": "/v1/loads", "status": "401"}) == 8


# -- /metrics, OpenAPI, embedding ----------------------------------------------------------------


async def test_metrics_endpoint(client: httpx.AsyncClient, region: Region) -> None:
    await client.get("/v1/loads")
    await client.get("/v1/loads?dp_rank=x")
    fams = families((await client.get("/metrics")).text)
    assert sample(fams, "loadsvc_rest_requests", endpoint="/v1/loads", status="200") >= 1
    assert sample(fams, "loadsvc_rest_bad_requests", field="dp_rank", reason="not_an_integer") == 1
    assert sample(fams, "loadsvc_shm_reader_unavailable", region=str(region.path)) == 0
    assert sample(fams, "loadsvc_region_attached", region=str(region.path)) == 1


async def test_openapi_describes_the_contract(client: httpx.AsyncClient, app_kind: str) -> None:
    spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/v1/loads"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {"dp_rank", "include", "format"}
    assert params["dp_rank"]["schema"]["type"] == "integer"
    assert params["dp_rank"]["schema"]["minimum"] == 0
    # The standalone app states the attached region's last rank, so a schema-valid rank is served.
    if app_kind == "create_app":
        assert params["dp_rank"]["schema"]["maximum"] == 3
    include_pattern = params["include"]["schema"]["items"]["pattern"]
    assert re.search(include_pattern, "core, memory,queues") and not re.search(include_pattern, "x")
    assert re.search(include_pattern, "MEMORY, Lora") and not re.search(include_pattern, "memoryx")
    assert params["format"]["schema"]["enum"] == ["json", "prometheus"]
    assert all(p["description"] for p in params.values())
    assert {"200", "400", "401"} <= set(op["responses"])
    assert "422" not in op["responses"]
    loads = op["responses"]["200"]["content"]["application/json"]["schema"]
    rank = loads["properties"]["loads"]["items"]
    assert set(SGLANG_CORE_KEYS) <= set(rank["required"])
    assert spec["paths"]["/health"]["get"]["responses"].keys() >= {"200", "503"}


async def test_embedded_router_keeps_the_engines_routes_and_lifespan(
        region: Region, make_store: Callable[..., LoadStore],
        client_for: Callable[[Any], httpx.AsyncClient]) -> None:
    store = make_store(region.path)
    app = engine_app(store)
    client = client_for(app)
    assert (await client.get("/engine/ping")).json() == {"pong": "yes"}
    assert len((await client.get("/v1/loads")).json()["loads"]) == 3
    assert not store.running
    async with app.router.lifespan_context(app):  # the router's lifespan is merged into the app's
        assert store.running
    assert not store.running


async def test_router_can_leave_health_and_metrics_to_the_engine(
        region: Region, make_store: Callable[..., LoadStore],
        client_for: Callable[[Any], httpx.AsyncClient]) -> None:
    app = FastAPI()
    app.include_router(rest.create_router(make_store(region.path), health=False, metrics=False))

    @app.get("/health")
    async def engine_health() -> dict[str, str]:
        return {"engine": "ok"}

    client = client_for(app)
    assert (await client.get("/health")).json() == {"engine": "ok"}
    assert (await client.get("/metrics")).status_code == 404
    assert len((await client.get("/v1/loads")).json()["loads"]) == 3


async def test_lifespan_leaves_a_started_store_running(region: Region,
                                                       make_store: Callable[..., LoadStore]) -> None:
    store = make_store(region.path)
    await store.start()
    app = rest.create_app(store)
    async with app.router.lifespan_context(app):
        assert store.running
    assert store.running  # started by its owner, so not stopped by the app
    await store.stop()


async def test_middleware_added_to_create_app_sees_v1_loads(
        region: Region, make_store: Callable[..., LoadStore],
        client_for: Callable[[Any], httpx.AsyncClient]) -> None:
    app = rest.create_app(make_store(region.path))

    @app.middleware("http")
    async def tag(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-engine"] = "seen"
        return response

    client = client_for(app)
    for query in ("", "?format=prometheus", "?dp_rank=x"):
        r = await client.get(f"/v1/loads{query}")
        assert r.headers["x-engine"] == "seen"
    assert r.status_code == 400 and r.json()["error"]["field"] == "dp_rank"
    assert len((await client.get("/v1/loads")).json()["loads"]) == 3


# -- a real server ------------------------------------------------------------------------------

SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import uvicorn
    from loadsvc.surfaces.rest import create_app
    from loadsvc.settings import StoreSettings
    from loadsvc.core.store import LoadStore
    store = LoadStore(StoreSettings(shm=Path(sys.argv[1])))
    uvicorn.run(create_app(store, api_key=sys.argv[3] or None), host="127.0.0.1",
                port=int(sys.argv[2]), loop="uvloop", http="httptools", access_log=False,
                log_level="warning")
""")


@pytest.mark.integration
def test_real_uvicorn_server(region: Region) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(region.path), str(port), "k"],
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not port_answers(port):
            assert proc.poll() is None, "server exited"
            assert time.monotonic() < deadline, "server did not listen"
            time.sleep(0.05)
        auth = {"Authorization": "Bearer k"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=5) as c:
            assert c.get("/health").json()["status"] == "ok"
            body = c.get("/v1/loads").json()
            assert by_rank(body)[0]["memory"] == to_dict(snapshots()[0].memory)
            # The lifespan started the poll task: a publish shows up without any on-demand poll.
            region.publish(LoadSnapshot(dp_rank=1, num_running_reqs=77))
            deadline = time.monotonic() + 3
            while by_rank(c.get("/v1/loads").json())[1]["num_running_reqs"] != 77:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # Keep-alive connection, many requests, then bad input, then still serving.
            for _ in range(50):
                assert c.get("/v1/loads", params={"dp_rank": 0, "include": "core"}).status_code == 200
            r = c.get("/v1/loads", params={"dp_rank": "x"})
            assert r.status_code == 400 and r.json()["error"]["field"] == "dp_rank"
            assert c.get("/v1/loads", headers={"Authorization": "Bearer no"}).status_code == 401
            fams = families(c.get("/v1/loads", params={"format": "prometheus"}).text)
            assert sample(fams, "loadsvc_num_running_reqs", dp_rank="1") == 77
            fams = families(c.get("/metrics").text)
            assert sample(fams, "loadsvc_rest_bad_requests", field="dp_rank",
                          reason="not_an_integer") == 1
    finally:
        proc.terminate()
        proc.wait(10)
