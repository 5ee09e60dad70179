"""The vLLM integration without vLLM: EngineRank's mapping and timing, the settings, the middleware.

vLLM's stats are stood in for by dataclasses with vLLM 0.32's field names
(vllm/v1/metrics/stats.py: SchedulerStats, PrefixCacheStats, IterationStats,
SpecDecodingStats); tests/test_vllm.py runs the real thing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadsvc import ShmPublisher, ShmReader
from loadsvc.embed import open_store
from loadsvc.engines.vllm.middleware import LoadsMiddleware
from loadsvc.engines.vllm.rank import EngineLimits, EngineRank
from loadsvc.engines.vllm.settings import SettingsError, VllmSettings


@dataclass
class PrefixCacheStats:
    reset: bool = False
    requests: int = 0
    queries: int = 0
    hits: int = 0


@dataclass
class SpecDecodingStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_skipped_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    spec_decoding_stats: SpecDecodingStats | None = None
    running_lora_adapters: dict[str, int] = field(default_factory=dict)


@dataclass
class IterationStats:
    num_generation_tokens: int = 0


LIMITS = EngineLimits(dp_size=2, max_num_seqs=8, kv_tokens=10_000, max_loras=4)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_rank(published: list[Any], clock: Clock | None = None, **kwargs: Any) -> EngineRank:
    return EngineRank(1, LIMITS, published.append, clock=clock or Clock(), **kwargs)


def test_mapping_from_vllm_stats() -> None:
    published: list[Any] = []
    clock = Clock()
    rank = make_rank(published, clock)
    rank.record(None, IterationStats(num_generation_tokens=300))
    clock.now += 0.5
    rank.record(SchedulerStats(num_running_reqs=6, num_waiting_reqs=3, num_skipped_waiting_reqs=2,
                               kv_cache_usage=0.25,
                               prefix_cache_stats=PrefixCacheStats(requests=4, queries=400, hits=100),
                               spec_decoding_stats=SpecDecodingStats(num_drafts=10, num_draft_tokens=40,
                                                                     num_accepted_tokens=20),
                               running_lora_adapters={"a": 2, "b": 1}),
                IterationStats(num_generation_tokens=200))
    snap = published[-1]
    assert (snap.dp_rank, snap.num_running_reqs, snap.num_waiting_reqs, snap.num_total_reqs) == (1, 6, 5, 11)
    assert snap.token_usage == 0.25 and snap.num_used_tokens == 2500
    assert snap.max_total_num_tokens == 10_000 and snap.max_running_requests == 8
    assert snap.utilization == 6 / 8
    assert snap.cache_hit_rate == 0.25
    assert snap.gen_throughput == 500.0  # tokens of the last second
    assert (snap.queues.waiting, snap.queues.paused) == (3, 2)
    assert (snap.speculative.accept_rate, snap.speculative.accept_length) == (0.5, 3.0)
    assert (snap.lora.slots_used, snap.lora.slots_total, snap.lora.utilization) == (2, 4, 0.5)
    clock.now += 1.5  # the tokens leave the one-second window
    assert rank.snapshot(clock.now).gen_throughput == 0.0


def test_counts_publish_at_once_other_changes_at_most_every_interval() -> None:
    published: list[Any] = []
    clock = Clock()
    rank = make_rank(published, clock, publish_interval=0.020)
    rank.record(SchedulerStats(num_running_reqs=1, kv_cache_usage=0.1), None)
    assert len(published) == 1
    clock.now += 0.001
    rank.record(SchedulerStats(num_running_reqs=1, kv_cache_usage=0.2), None)  # same counts: held
    assert len(published) == 1
    clock.now += 0.001
    rank.record(SchedulerStats(num_running_reqs=2, kv_cache_usage=0.3), None)  # a count: at once
    assert len(published) == 2 and published[-1].token_usage == 0.3
    clock.now += 0.025
    rank.record(SchedulerStats(num_running_reqs=2, kv_cache_usage=0.4), None)  # interval passed
    assert len(published) == 3 and published[-1].token_usage == 0.4


async def test_timers_flush_held_state_and_keep_only_an_idle_rank_fresh() -> None:
    published: list[Any] = []
    rank = EngineRank(0, LIMITS, published.append, publish_interval=0.05, heartbeat=0.1)
    rank.start()
    assert len(published) == 1  # idle at start
    await asyncio.sleep(0.35)
    idle_beats = len(published) - 1
    assert idle_beats >= 2, published  # idle: re-published every heartbeat
    rank.record(SchedulerStats(num_running_reqs=3, kv_cache_usage=0.1), None)
    rank.record(SchedulerStats(num_running_reqs=3, kv_cache_usage=0.5), None)  # held ...
    n = len(published)
    assert published[-1].token_usage == 0.1
    await asyncio.sleep(0.08)
    assert len(published) == n + 1 and published[-1].token_usage == 0.5  # ... and flushed
    # Busy and silent (a hung engine): nothing re-published, so the rank turns stale.
    await asyncio.sleep(0.4)
    assert len(published) == n + 1
    rank.record(SchedulerStats(), None)  # idle again: heartbeats resume
    resumed = time.monotonic()
    while len(published) < n + 4 and time.monotonic() - resumed < 2.0:  # ~0.2 s; more if the loop stalls
        await asyncio.sleep(0.05)
    assert len(published) >= n + 4
    rank.close()


def test_missing_fields_and_failures_never_reach_vllm(caplog: pytest.LogCaptureFixture) -> None:
    @dataclass
    class OldStats:  # a vLLM without most fields
        num_running_reqs: int = 2

    published: list[Any] = []
    rank = make_rank(published)
    with caplog.at_level(logging.WARNING, logger="loadsvc.vllm"):
        rank.record(OldStats(), None)
        rank.record(OldStats(num_running_reqs=3), None)
    assert published[-1].num_running_reqs == 3 and published[-1].num_waiting_reqs == 0
    warnings = [r for r in caplog.records if "has no" in r.getMessage()]
    assert len(warnings) == 1 and "num_waiting_reqs" in warnings[0].getMessage()

    def broken(snapshot: Any) -> None:
        raise ValueError("slot too small")

    rank = EngineRank(0, LIMITS, broken, clock=Clock())
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="loadsvc.vllm"):
        for running in range(5):
            rank.record(SchedulerStats(num_running_reqs=running), None)  # never raises
        rank.record(SchedulerStats(num_running_reqs="many"), None)  # type: ignore[arg-type]  # read as 0
    assert rank.counters.errors == 6 and rank.counters.publishes == 0
    assert len([r for r in caplog.records if "slot too small" in r.getMessage()]) == 1


def test_nonsense_values_are_not_reported() -> None:
    published: list[Any] = []
    rank = make_rank(published)
    rank.record(SchedulerStats(num_running_reqs=-3, num_waiting_reqs=2**40, kv_cache_usage=float("nan")),
                IterationStats(num_generation_tokens=-5))
    snap = published[-1]
    assert snap.num_running_reqs == 0 and snap.num_waiting_reqs == 2**31 - 1
    assert snap.token_usage == 0.0 and snap.gen_throughput == 0.0
    rank.record(SchedulerStats(kv_cache_usage=7.0), None)
    assert published[-1].token_usage == 1.0


def test_settings_from_env() -> None:
    s = VllmSettings.from_env({})
    assert s.shm.name == "loadsvc-default.shm" and s.publish and s.publish_interval == 0.020
    assert s.heartbeat == 1.0 and s.region_mode == 0o600 and s.api_key is None
    s = VllmSettings.from_env({"LOADSVC_SHM": "/dev/shm/x.shm", "LOADSVC_VLLM_PUBLISH": "0",
                               "LOADSVC_PUBLISH_INTERVAL_MS": "5", "LOADSVC_HEARTBEAT_MS": "250",
                               "LOADSVC_REGION_MODE": "0660", "LOADSVC_API_KEY": "k",
                               "LOADSVC_STALE_AFTER": "1.5"})
    assert (s.shm, s.publish, s.publish_interval, s.heartbeat, s.region_mode, s.api_key, s.stale_after) == (
        Path("/dev/shm/x.shm"), False, 0.005, 0.25, 0o660, "k", 1.5)
    assert s.unreachable_after == 30.0
    for env, message in (({"LOADSVC_HEARTBEAT_MS": "fast"}, "LOADSVC_HEARTBEAT_MS='fast' is not a number"),
                         ({"LOADSVC_HEARTBEAT_MS": "nan"}, "outside 10..3.6e+06"),
                         ({"LOADSVC_REGION_MODE": "777"}, "no execute bits"),
                         ({"LOADSVC_API_KEY": "  "}, "LOADSVC_API_KEY is set but empty"),
                         ({"LOADSVC_VLLM_PUBLISH": "maybe"}, "expected 1 or 0"),
                         ({"LOADSVC_STALE_AFTER": "10", "LOADSVC_UNREACHABLE_AFTER": "5"}, "outside 10..")):
        with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("+", r"\+")):
            VllmSettings.from_env(env)


async def test_middleware_answers_v1_loads_get_load_and_passes_the_rest(shm_path: Path) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # stands in for vLLM's app
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    with ShmPublisher(shm_path, dp_size=2, dp_rank=1) as pub:
        rank = EngineRank(1, LIMITS, pub.publish, clock=Clock())
        rank.record(SchedulerStats(num_running_reqs=5, num_waiting_reqs=1, kv_cache_usage=0.5), None)
        store = open_store(shm_path)
        middleware = LoadsMiddleware(app, store=store, api_key="secret")
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://vllm") as client:
            assert (await client.get("/v1/loads")).status_code == 401
            auth = {"authorization": "Bearer secret"}
            body = (await client.get("/v1/loads", params={"dp_rank": 1}, headers=auth)).json()
            (load,) = body["loads"]
            assert (load["dp_rank"], load["num_running_reqs"], load["num_waiting_reqs"]) == (1, 5, 1)
            assert load["num_used_tokens"] == 5000 and load["status"] == "healthy"
            bad = await client.get("/v1/loads", params={"dp_rank": 7}, headers=auth)
            assert bad.status_code == 400 and bad.json()["error"]["field"] == "dp_rank"
            prom = await client.get("/v1/loads", params={"format": "prometheus"}, headers=auth)
            assert 'loadsvc_num_running_reqs{dp_rank="1"} 5.0' in prom.text
            head = await client.head("/v1/loads", headers=auth)
            assert head.status_code == 200 and head.content == b""
            other = await client.get("/v1/models")
            assert other.text == "/v1/models" and other.headers["x-app"] == "1"
            posted = await client.post("/v1/loads")
            assert posted.headers["x-app"] == "1"  # not ours: vLLM answers (404/405 there)
            # vllm-router's power_of_two polls /get_load for {"load": N} (stock vLLM has none)
            assert (await client.get("/get_load")).status_code == 401
            assert (await client.get("/get_load", headers=auth)).json() == {
                "load": 6, "num_running_reqs": 5, "num_waiting_reqs": 1, "ranks": 1}
        with ShmReader(shm_path) as reader:
            assert reader.read(1).num_running_reqs == 5
        store.close()
