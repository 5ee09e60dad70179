"""loadsvc/tools/engine.py: the toy engine as a real process on loopback ports.

Timing bounds are loose on purpose (a busy 2-core machine); what they check is
proportion: twice the tokens or half the speed takes about twice as long.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import wait_for

from loadsvc import ShmReader
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc.tools.engine import prompt_tokens
from loadsvc.tools.fleet import EngineProc, Fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]



def generate(engine: EngineProc, max_new: int, *, rank: int | None = None, text: str = "hi",
             client: httpx.Client | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"text": text, "sampling_params": {"max_new_tokens": max_new}}
    if rank is not None:
        body["data_parallel_rank"] = rank
    r = (client or httpx).post(engine.url + "/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


async def agenerate(client: httpx.AsyncClient, engine: EngineProc, max_new: int,
                    rank: int | None = None, text: str = "hi") -> httpx.Response:
    body: dict[str, Any] = {"text": text, "sampling_params": {"max_new_tokens": max_new}}
    if rank is not None:
        body["data_parallel_rank"] = rank
    return await client.post(engine.url + "/generate", json=body, timeout=60)


def loads(engine: EngineProc) -> list[dict[str, Any]]:
    r = httpx.get(engine.url + "/v1/loads", params={"include": "all"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["loads"]


def grpc_loads(engine: EngineProc) -> Any:
    with grpc.insecure_channel(engine.grpc) as channel:
        call = channel.unary_unary("/loadsvc.v1.LoadService/GetLoads",
                                   request_serializer=pb.GetLoadsRequest.SerializeToString,
                                   response_deserializer=pb.GetLoadsResponse.FromString)
        return call(pb.GetLoadsRequest(), timeout=5)



def test_generate_time_grows_with_tokens_and_shrinks_with_speed(fleet: Fleet) -> None:
    engine = fleet.engine(dp_size=2, speeds=(1.0, 0.5), step_ms=10)
    with httpx.Client() as client:
        generate(engine, 2, client=client)  # warm the connection

        def fastest(max_new: int, rank: int) -> dict[str, Any]:
            # a late wake-up of the engine's timer only ever adds time: the least of three is the model's
            runs = [generate(engine, max_new, rank=rank, client=client)["meta_info"] for _ in range(3)]
            return min(runs, key=lambda m: m["e2e_latency"])

        fast50, fast100, slow50 = fastest(50, 0), fastest(100, 0), fastest(50, 1)
    # batch 1: a step is 10 ms * (1 + 1/32); 50 tokens + 1 prefill step ~ 0.53 s
    assert 0.45 < fast50["e2e_latency"] < 0.9, fast50
    assert 1.7 < fast100["e2e_latency"] / fast50["e2e_latency"] < 2.3, (fast50, fast100)
    assert 1.7 < slow50["e2e_latency"] / fast50["e2e_latency"] < 2.3, (fast50, slow50)
    assert (fast50["dp_rank"], slow50["dp_rank"]) == (0, 1)
    assert fast50["completion_tokens"] == 50 and fast50["finish_reason"] == {"type": "length", "length": 50}
    assert fast50["prompt_tokens"] == prompt_tokens("hi") == 1


def test_data_parallel_rank_is_honoured_and_counted(fleet: Fleet) -> None:
    engine = fleet.engine(dp_size=3)
    with httpx.Client() as client:
        for rank in (2, 2, 0, 2):
            assert generate(engine, 1, rank=rank, client=client)["meta_info"]["dp_rank"] == rank
        bad = client.post(engine.url + "/generate", json={"text": "x", "data_parallel_rank": 3})
        assert bad.status_code == 400 and "data_parallel_rank" in bad.json()["error"]["message"]
        comp = client.post(engine.url + "/v1/completions",
                           json={"prompt": "x", "max_tokens": 1, "data_parallel_rank": 1})
        assert comp.status_code == 200, comp.text
    ranks = engine.server_info()["loadsvc_engine"]["ranks"]
    assert [(r["dp_rank"], r["completed"]) for r in ranks] == [(0, 1), (1, 1), (2, 3)]


def test_openai_endpoints_and_streaming(fleet: Fleet) -> None:
    engine = fleet.engine()
    prompt = "x" * 40  # ten tokens
    with httpx.Client(base_url=engine.url, timeout=30) as c:
        comp = c.post("/v1/completions", json={"model": "loadsvc-toy", "prompt": prompt, "max_tokens": 7}).json()
        assert comp["object"] == "text_completion" and comp["choices"][0]["finish_reason"] == "length"
        assert comp["usage"]["prompt_tokens"] == 10 and comp["usage"]["completion_tokens"] == 7
        chat = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 3}).json()
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["usage"]["completion_tokens"] == 3
        models = c.get("/v1/models").json()
        assert models["data"][0]["id"] == "loadsvc-toy"
        for path in ("/get_model_info", "/model_info"):
            assert c.get(path).json()["model_path"] == "loadsvc-toy"
        for path in ("/get_server_info", "/server_info"):
            assert c.get(path).json()["dp_size"] == 1
        assert c.get("/health").status_code == 200 and c.get("/health_generate").status_code == 200

        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 3  # tokens arrive while the request runs (~0.3 s), not all at the end
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        assert text.count("tok") == 30 and chunks[-1]["usage"]["completion_tokens"] == 30

        with c.stream("POST", "/generate", json={"text": "hi", "stream": True,
                                                 "sampling_params": {"max_new_tokens": 20}}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        last = json.loads(events[-2])
        assert last["meta_info"]["finish_reason"]["length"] == 20 and last["text"].count("tok") == 20

        too_big = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 10**6}})
        assert too_big.status_code == 400 and "KV budget" in too_big.json()["error"]["message"]
        assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": -1}}).status_code == 400
        assert c.post("/v1/completions", content=b"not json").status_code == 400


def test_malformed_bodies_are_a_400_naming_the_field(fleet: Fleet) -> None:
    engine = fleet.engine()
    bad = [("/generate", {"input_ids": [{"a": 1}]}, "input_ids"),
           ("/generate", {"input_ids": [1, [2]]}, "input_ids"),
           ("/generate", {"input_ids": [True, 2]}, "input_ids"),
           ("/v1/completions", {"prompt": [1, "a"]}, "input_ids"),
           ("/v1/chat/completions", {"messages": [{"content": {"a": 2}}]}, "messages"),
           ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2.5}}, "max_new_tokens")]
    with httpx.Client(base_url=engine.url, timeout=30) as c:
        for path, body, field_name in bad:
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            assert r.json()["error"]["message"].startswith(field_name), r.text
        parts = c.post("/v1/chat/completions", json={"messages": [{"content": [1, {"text": 5},
                                                                              {"text": "hi"}]}]})
        assert parts.status_code == 200, parts.text  # parts without text are skipped
    assert "Traceback" not in engine.log()


async def test_published_state_moves_with_requests_in_flight(fleet: Fleet) -> None:
    """max_running_requests=2: six long requests -> 2 running, 4 waiting, seen three ways.

    250 new tokens each: a pair runs ~2.7 s (257 steps of ~10.6 ms), long enough for every look
    below to see the first pair running and four waiting on a machine under load.
    """
    engine = fleet.engine(dp_size=2, max_running_requests=2, step_ms=10, max_total_tokens=10000)
    region = Path(engine.server_info()["loadsvc_engine"]["shm"])
    async with httpx.AsyncClient() as client:
        tasks = [asyncio.create_task(agenerate(client, engine, 250, rank=1, text=f"{i}" + "y" * 399))
                 for i in range(6)]  # distinct prompts of 100 tokens: no prefix-cache hits

        def busy() -> Any:
            # not just 4 waiting: a publish between arrivals and the scheduler's pass shows (0, 4)
            ls = loads(engine)
            return ls if ls[1]["num_total_reqs"] == 6 and ls[1]["num_running_reqs"] >= 2 else None

        ls = await asyncio.to_thread(wait_for, busy, 10, "6 requests on rank 1, 2 admitted")
        r1 = ls[1]
        assert (r1["num_running_reqs"], r1["num_waiting_reqs"], r1["num_total_reqs"]) == (2, 4, 6)
        assert r1["status"] == "healthy" and r1["queues"]["waiting"] == 4
        assert r1["num_waiting_uncached_tokens"] == 4 * 100  # four prompts of 400 chars
        assert 2 * 100 <= r1["num_used_tokens"] <= 2 * 350  # prompts in KV, plus what they generated
        assert r1["num_total_tokens"] == r1["num_used_tokens"] + 400
        assert r1["token_usage"] == pytest.approx(r1["num_used_tokens"] / 10000, abs=1e-4)
        assert r1["utilization"] == 1.0 and r1["max_running_requests"] == 2
        assert r1["memory"]["token_capacity"] == 10000
        assert ls[0]["num_total_reqs"] == 0

        with ShmReader(region) as reader:
            snap = reader.read(1)
            assert snap.num_running_reqs == 2 and snap.num_waiting_reqs in (3, 4)
            resp = await asyncio.to_thread(grpc_loads, engine)
            assert resp.dp_rank_count == 2
            assert resp.loads[1].num_running_reqs == 2 and resp.loads[1].num_waiting_reqs >= 2
            seq0 = reader.read(1).seq
            await asyncio.sleep(1.0)
            published = reader.read(1).seq - seq0
            assert published >= 20, f"only {published} publishes in a second"  # >= 20 Hz (default 50)
            assert reader.read(1).gen_throughput > 50  # two requests at ~95 tokens/s each

        results = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 for r in results)
        queue_times = sorted(r.json()["meta_info"]["queue_time"] for r in results)
        assert queue_times[1] < 0.1 < queue_times[2]  # two ran at once, the rest waited their turn

    def idle() -> Any:
        r1 = loads(engine)[1]
        return r1 if r1["num_total_reqs"] == 0 and r1["num_used_tokens"] == 0 else None

    wait_for(idle, 5, "rank 1 to drain")


async def test_kv_budget_makes_requests_wait(fleet: Fleet) -> None:
    # each request reserves 1 prompt token + 180 new ones: two fit in 400 tokens, a third waits
    # (for the ~1.9 s the two run: 181 steps of ~10.6 ms)
    engine = fleet.engine(max_total_tokens=400, max_running_requests=32)
    async with httpx.AsyncClient() as client:
        tasks = [asyncio.create_task(agenerate(client, engine, 180)) for _ in range(3)]

        def admitted() -> Any:
            # a publish may land between the arrivals and the scheduler's next pass, showing
            # (0, 3) or (1, 2) for a moment: wait for the pass that admits what the budget allows
            r0 = loads(engine)[0]
            return r0 if r0["num_total_reqs"] == 3 and r0["num_running_reqs"] >= 2 else None

        r0 = await asyncio.to_thread(wait_for, admitted, 10, "three requests at the engine, two admitted")
        assert (r0["num_running_reqs"], r0["num_waiting_reqs"]) == (2, 1)
        results = [r.json()["meta_info"] for r in await asyncio.gather(*tasks)]
    waited = sorted(m["queue_time"] for m in results)
    assert waited[2] > 0.5 * min(m["e2e_latency"] - m["queue_time"] for m in results)


def test_repeated_prompt_hits_the_prefix_cache(fleet: Fleet) -> None:
    engine = fleet.engine(step_ms=10)
    prompt = "z" * 4000  # 1000 tokens: 63 prefill steps uncached, 1 cached
    with httpx.Client() as client:
        first = generate(engine, 1, text=prompt, client=client)["meta_info"]
        second = generate(engine, 1, text=prompt, client=client)["meta_info"]
    assert (first["cached_tokens"], second["cached_tokens"]) == (0, 999)
    assert second["e2e_latency"] < first["e2e_latency"] / 4  # prefill skipped
    rank = loads(engine)[0]
    # 999 of the 2000 prompt tokens admitted in the last second (999 of 1000 if the first fell out)
    assert 0.45 < rank["cache_hit_rate"] < 1.0


def test_publisher_stops_and_resumes_independently(fleet: Fleet) -> None:
    engine = fleet.engine(stale_after=0.5)
    assert loads(engine)[0]["status"] == "healthy"
    engine.send_signal(signal.SIGUSR1)
    stale = wait_for(lambda: (ls := loads(engine)) and ls[0]["status"] == "stale" and ls[0], 5,
                     "the rank to turn stale after SIGUSR1")
    assert stale["age_ms"] > 500
    assert generate(engine, 1)["meta_info"]["completion_tokens"] == 1  # it still serves
    assert engine.server_info()["loadsvc_engine"]["publishing"] is False
    engine.send_signal(signal.SIGUSR2)
    wait_for(lambda: loads(engine)[0]["status"] == "healthy", 5, "healthy again after SIGUSR2")
    r = httpx.post(engine.url + "/loadsvc/publisher", json={"enabled": False})
    assert r.json() == {"publishing": False}
    wait_for(lambda: loads(engine)[0]["status"] == "stale", 5, "stale after POST enabled=false")
    httpx.post(engine.url + "/loadsvc/publisher", json={"enabled": True})
    wait_for(lambda: loads(engine)[0]["status"] == "healthy", 5, "healthy after POST enabled=true")
    assert httpx.post(engine.url + "/loadsvc/publisher", json={"enabled": "no"}).status_code == 400


def test_the_publisher_switch_answers_callers_on_this_host_only(tmp_path: Path) -> None:
    """An engine listening on a network-namespace bridge address (made here): a POST from that
    address, not loopback, is refused 403 and the rank keeps publishing."""
    import subprocess
    import sys

    from loadsvc.bench.netns import NetnsUnavailable, Topology, check_available
    from loadsvc.tools.procs import free_port, port_answers

    try:
        check_available()
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    with Topology(["peer"]) as topo:
        port = free_port()
        shm = tmp_path / "engine.shm"
        with open(tmp_path / "engine.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "loadsvc", "engine", "--host", topo.gateway, "--port",
                                     str(port), "--grpc-port", str(free_port()), "--shm", str(shm)],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://{topo.gateway}:{port}"
            wait_for(lambda: port_answers(port, topo.gateway), 20, "the engine to listen")
            r = httpx.post(url + "/loadsvc/publisher", json={"enabled": False}, timeout=5)
            assert r.status_code == 403, r.text
            assert f"loopback) only, not {topo.gateway}" in r.json()["message"]
            info = httpx.get(url + "/get_server_info", timeout=5).json()
            assert info["loadsvc_engine"]["publishing"] is True
        finally:
            proc.terminate()
            proc.wait(10)


def test_sigterm_stops_cleanly_and_removes_its_region(fleet: Fleet) -> None:
    engine = fleet.engine(dp_size=2)
    region = Path(engine.server_info()["loadsvc_engine"]["shm"])
    assert region.exists() and region.name == f"loadsvc-engine-{engine.url.rsplit(':', 1)[1]}.shm"
    with httpx.Client() as client:
        import threading

        result: dict[str, Any] = {}

        def long_request() -> None:
            result["r"] = client.post(engine.url + "/generate", timeout=30,
                                      json={"text": "x", "sampling_params": {"max_new_tokens": 5000}})

        t = threading.Thread(target=long_request)
        t.start()
        wait_for(lambda: loads(engine)[0]["num_running_reqs"] + loads(engine)[1]["num_running_reqs"] == 1,
                 10, "the long request to run")
        started = time.monotonic()
        assert engine.stop(timeout=10) == 0, engine.log()
        assert time.monotonic() - started < 8  # "a second or two"; more on a machine under other load
        t.join(10)
    assert result["r"].status_code == 503  # the request in flight is told, not left hanging
    assert not region.exists()
    assert "Traceback" not in engine.log(), engine.log()


def test_second_engine_on_a_busy_port_says_so(fleet: Fleet) -> None:
    first = fleet.engine()
    port = first.url.rsplit(":", 1)[1]
    from loadsvc.tools.fleet import FleetError

    with pytest.raises(FleetError, match="cannot listen for the engine's gRPC"):
        fleet.engine(args=["--grpc-port", str(first.grpc_port)], timeout=20)
    assert port  # the first engine is unaffected
    assert generate(first, 1)["meta_info"]["completion_tokens"] == 1


def test_shared_region_path(fleet: Fleet, tmp_path: Path) -> None:
    """--shm: the engine publishes where it is told and leaves the file for its owner."""
    region = tmp_path / "engine.shm"
    engine = fleet.engine(dp_size=2, shm=region)
    with ShmReader(region) as reader:
        assert [s.dp_rank for s in reader.read_all()] == [0, 1]
    engine.stop()
    assert region.exists()
    os.unlink(region)
