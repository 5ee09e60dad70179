"""loadsvc/ingest/scrape.py: engines' Prometheus /metrics into the region.

- In-process: pages in vLLM 0.32's and SGLang's exposition (lines as those
  servers print them) through Scraper.ingest_page into a real region: the name
  sets, rates from counters, the KV capacity from vLLM's cache_config_info,
  values refused per rank, a JSON map for another engine.
- serve --scrape against `loadsvc engine` (its /metrics carries SGLang's gauges),
  against endpoints that are slow, failing or too large (a local HTTP server),
  and against a real vLLM (CPU, DP 2, loadsvc's plugin off: vLLM runs none of
  loadsvc's code), whose ranks show up healthy on REST and `loadsvc get`.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conftest
import httpx
import pytest
from conftest import Burst, drive, wait_for
from prometheus_client import CollectorRegistry

from loadsvc.core.region import ShmReader
from loadsvc.ingest.scrape import (
    SGLANG,
    VLLM,
    NameSet,
    ScrapeFailed,
    Scraper,
    ScrapeTarget,
    load_name_set,
    parse_target,
    read_samples,
)
from loadsvc.settings import StoreSettings
from loadsvc.tools.fleet import Fleet

STALE_AFTER = 1.5
UNREACHABLE_AFTER = 3.0


def vllm_page(engines: dict[int, dict[str, float]], model: str = "/models/tiny") -> str:
    """A /metrics page as vLLM 0.32 prints it (trimmed: a histogram stands for the rest)."""
    out = ["# HELP python_gc_objects_collected_total Objects collected during gc",
           "# TYPE python_gc_objects_collected_total counter",
           'python_gc_objects_collected_total{generation="0"} 1234.0']
    series = [("vllm:num_requests_running", "gauge", "running"), ("vllm:num_requests_waiting", "gauge", "waiting"),
              ("vllm:kv_cache_usage_perc", "gauge", "kv"), ("vllm:prefix_cache_queries_total", "counter", "queries"),
              ("vllm:prefix_cache_hits_total", "counter", "hits"),
              ("vllm:generation_tokens_total", "counter", "generated")]
    for name, kind, key in series:
        out += [f"# HELP {name} ...", f"# TYPE {name} {kind}"]
        for e, v in engines.items():
            out.append(f'{name}{{engine="{e}",model_name="{model}"}} {v.get(key, 0.0)!r}')
    out += ["# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
            "# TYPE vllm:cache_config_info gauge"]
    for e in engines:
        out.append(f'vllm:cache_config_info{{block_size="128",cache_dtype="auto",engine="{e}",'
                   f'kv_cache_size_tokens="1048576",num_cpu_blocks="None",num_gpu_blocks="16384"}} 1.0')
    out += ["# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.",
            "# TYPE vllm:e2e_request_latency_seconds histogram"]
    for e in engines:
        for le in ("0.3", "0.5", "0.8", "1.0", "+Inf"):
            out.append(f'vllm:e2e_request_latency_seconds_bucket{{engine="{e}",le="{le}",model_name="{model}"}} 3.0')
    return "\n".join(out) + "\n"


def sglang_page(ranks: dict[int, dict[str, float]], prefix: str = "sglang:") -> str:
    """SGLang's scheduler gauges (sglang:..., labels as its SchedulerMetricsCollector sets them)."""
    out = []
    names = {"num_running_reqs": "num_running_reqs", "num_queue_reqs": "waiting", "token_usage": "token_usage",
             "gen_throughput": "gen_throughput", "cache_hit_rate": "cache_hit_rate",
             "num_used_tokens": "num_used_tokens", "max_total_num_tokens": "max_total_num_tokens"}
    for metric, key in names.items():
        out += [f"# HELP {prefix}{metric} ...", f"# TYPE {prefix}{metric} gauge"]
        for r, v in ranks.items():
            for tp in ("0", "1"):  # tensor-parallel rank 1's series must not count
                out.append(f'{prefix}{metric}{{dp_rank="{r}",engine_type="unified",model_name="m",'
                           f'moe_ep_rank="0",pp_rank="0",tp_rank="{tp}"}} {v.get(key, 0.0) + 1000 * int(tp)!r}')
    return "\n".join(out) + "\n"


@pytest.fixture
def scraper(shm_path: Path) -> Iterator[Any]:
    """Factory: scraper(dp_size, names...) -> (Scraper, its one target's state); closed afterwards."""
    made: list[Scraper] = []

    def make(dp_size: int = 2, name_sets: tuple[NameSet, ...] = (VLLM, SGLANG), first_rank: int = 0,
             monotonic: Any = time.monotonic) -> tuple[Scraper, Any]:
        s = Scraper(StoreSettings(shm=shm_path, dp_size=dp_size), [ScrapeTarget("http://e/metrics", first_rank)],
                    registry=CollectorRegistry(), name_sets=name_sets, monotonic=monotonic)
        made.append(s)
        return s, s._states[0]

    yield make
    for s in made:
        s.writer.close()


def read(shm: Path) -> dict[int, Any]:
    with ShmReader(shm) as reader:
        return {s.dp_rank: s for s in reader.read_all()}


def test_a_vllm_page_fills_each_engines_rank(scraper: Any, shm_path: Path) -> None:
    now = [100.0]
    s, state = scraper(monotonic=lambda: now[0])
    page = vllm_page({0: {"running": 3, "waiting": 2, "kv": 0.25, "queries": 100, "hits": 0, "generated": 1000},
                      1: {"running": 1, "kv": 0.5, "queries": 10, "generated": 50}})
    assert s.ingest_page(state, page, time.time_ns())
    assert state.names is VLLM
    snaps = read(shm_path)
    assert (snaps[0].num_running_reqs, snaps[0].num_waiting_reqs, snaps[0].num_total_reqs) == (3, 2, 5)
    assert (snaps[0].token_usage, snaps[0].max_total_num_tokens, snaps[0].num_used_tokens) == (0.25, 1048576, 262144)
    assert (snaps[1].num_running_reqs, snaps[1].token_usage, snaps[1].num_used_tokens) == (1, 0.5, 524288)
    assert snaps[0].gen_throughput == 0.0  # a rate needs two pages
    # A second page, 0.5 s later by the scraper's clock: rates and the hit rate from the counters.
    now[0] += 0.5
    page = vllm_page({0: {"running": 4, "kv": 0.25, "queries": 300, "hits": 150, "generated": 1500},
                      1: {"running": 1, "kv": 0.5, "queries": 10, "generated": 50}})
    assert s.ingest_page(state, page, time.time_ns())
    snaps = read(shm_path)
    assert snaps[0].num_running_reqs == 4
    assert snaps[0].gen_throughput == 1000.0  # 500 tokens in 0.5 s
    assert snaps[0].cache_hit_rate == 0.75  # 150 hits of 200 queries since the first page
    assert (snaps[1].gen_throughput, snaps[1].cache_hit_rate) == (0.0, 0.0)
    assert snaps[0].seq == 2 and snaps[0].publish_time_ns > 0


def test_an_sglang_page_and_the_underscore_names(scraper: Any, shm_path: Path) -> None:
    s, state = scraper(dp_size=3, first_rank=1)
    assert s.ingest_page(state, sglang_page({0: {"num_running_reqs": 2, "waiting": 5, "token_usage": 0.1,
                                                 "num_used_tokens": 100, "max_total_num_tokens": 1000,
                                                 "gen_throughput": 42.5, "cache_hit_rate": 0.3}}), time.time_ns())
    snap = read(shm_path)[1]  # dp_rank="0" of a URL given as URL=1
    assert (snap.num_running_reqs, snap.num_waiting_reqs, snap.token_usage, snap.num_used_tokens,
            snap.max_total_num_tokens, snap.gen_throughput, snap.cache_hit_rate) == (2, 5, 0.1, 100, 1000, 42.5, 0.3)
    s2, state2 = scraper(dp_size=3)
    page = ('sglang_num_running_reqs{dp_rank="2"} 7\nsglang_num_waiting_reqs{dp_rank="2"} 1\n'
            'sglang_max_running_requests{dp_rank="2"} 14\nsglang_num_total_tokens{dp_rank="2"} 3000000000\n')
    assert s2.ingest_page(state2, page, time.time_ns())
    snap = read(shm_path)[2]
    assert (snap.num_running_reqs, snap.max_running_requests, snap.utilization, snap.num_total_tokens) == (
        7, 14, 0.5, 3000000000)


def test_bad_values_refuse_their_rank_only(scraper: Any, shm_path: Path) -> None:
    s, state = scraper()
    for bad, reason in (({"running": float("nan")}, "bad_value"), ({"waiting": -1}, "bad_value"),
                        ({"kv": float("inf")}, "bad_value"), ({"kv": 1.5}, "out_of_range"),
                        ({"running": 2.0**31}, "out_of_range"), ({"generated": -5}, "bad_value")):
        before = dict(s.reject.counts)
        page = vllm_page({0: {"running": 1}, 1: {"running": 2, **bad}})
        assert s.ingest_page(state, page, time.time_ns())
        assert read(shm_path)[0].num_running_reqs == 1
        assert 1 not in read(shm_path), bad
        assert {k: v - before[k] for k, v in s.reject.counts.items() if v != before[k]} == {reason: 1}, bad
    s.ingest_page(state, 'vllm:num_requests_running{engine="x"} 3\nvllm:num_requests_running{engine="0"} 4\n',
                  time.time_ns())
    assert s.reject.counts["bad_rank_label"] == 1 and read(shm_path)[0].num_running_reqs == 4
    page = vllm_page({5: {"running": 1}})  # engine 5 of a region of 2 ranks
    assert not s.ingest_page(state, page, time.time_ns())
    assert s.reject.counts["rank_out_of_range"] == 1


@pytest.mark.parametrize("page, result", [
    ("# nothing here\nprocess_cpu_seconds_total 1.0\n", "unknown_names"),
    ('vllm:num_requests_running{engine="0" 1\n', "parse_error"),
    ('vllm:num_requests_running{engine="0"} one\n', "parse_error"),
    ('vllm:num_requests_running{engine="x"} 1\n', "no_ranks"),
])
def test_pages_that_write_nothing_say_why(scraper: Any, page: str, result: str) -> None:
    s, state = scraper()
    with pytest.raises(ScrapeFailed) as e:
        s.ingest_page(state, page, time.time_ns())
    assert e.value.result == result


def test_only_the_wanted_lines_are_parsed() -> None:
    page = vllm_page({0: {"running": 1}}) + "this line is not Prometheus at all {{{\n"
    samples = read_samples(page, ["vllm:num_requests_running"])
    assert samples == [("vllm:num_requests_running", {"engine": "0", "model_name": "/models/tiny"}, 1.0)]
    assert read_samples("vllm:num_requests_running_total 5\n", ["vllm:num_requests_running"]) == []


def test_lines_that_did_not_change_are_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import prometheus_client.parser as parser

    parsed: list[str] = []
    real = parser.text_string_to_metric_families

    def counting(text: str) -> Any:
        parsed.extend(text.splitlines())
        return real(text)

    monkeypatch.setattr(parser, "text_string_to_metric_families", counting)
    names, cache = ["vllm:num_requests_running", "vllm:cache_config_info"], {}
    first = vllm_page({0: {"running": 1}, 1: {"running": 2}})
    assert [v for n, _, v in read_samples(first, names, cache) if n.endswith("running")] == [1.0, 2.0]
    assert len(parsed) == 4
    second = vllm_page({0: {"running": 1}, 1: {"running": 5}})
    assert [v for n, _, v in read_samples(second, names, cache) if n.endswith("running")] == [1.0, 5.0]
    assert parsed[4:] == ['vllm:num_requests_running{engine="1",model_name="/models/tiny"} 5']


def test_a_json_map_for_another_engine(tmp_path: Path, scraper: Any, shm_path: Path) -> None:
    path = tmp_path / "tgi.json"
    path.write_text(json.dumps({
        "name": "tgi", "rank_label": "shard",
        "gauges": {"num_running_reqs": "tgi_batch_current_size",
                   "num_waiting_reqs": ["tgi_queue_size_v2", "tgi_queue_size"],
                   "token_usage": 'tgi_kv_usage{kind="gpu"}'},
        "rates": {"gen_throughput": "tgi_generated_tokens_total"},
        "labels": {"max_total_num_tokens": ["tgi_info", "kv_tokens"]}}))
    names = load_name_set(path)
    s, state = scraper(name_sets=(names, VLLM, SGLANG))
    page = ('tgi_batch_current_size{shard="1"} 3\ntgi_queue_size{shard="1"} 4\n'
            'tgi_kv_usage{kind="cpu",shard="1"} 0.9\ntgi_kv_usage{kind="gpu",shard="1"} 0.5\n'
            'tgi_info{kv_tokens="8000",shard="1"} 1\ntgi_generated_tokens_total{shard="1"} 10\n')
    assert s.ingest_page(state, page, time.time_ns())
    snap = read(shm_path)[1]
    assert (snap.num_running_reqs, snap.num_waiting_reqs, snap.token_usage, snap.max_total_num_tokens,
            snap.num_used_tokens) == (3, 4, 0.5, 8000, 4000)
    for spec, error in (({"gauges": {"num_running_reqs": "a"}}, "num_waiting_reqs is required"),
                        ({"gauges": {"num_running_reqs": "a", "num_waiting_reqs": "b", "speed": "c"}},
                         "'speed' is not a field"),
                        ({"gauges": {"num_running_reqs": "a{x=1}", "num_waiting_reqs": "b"}}, "labels must look"),
                        ({"guages": {}}, "unknown key(s) guages")):
        path.write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=re.escape(error)):
            load_name_set(path)


def test_parse_target() -> None:
    assert parse_target("http://10.0.0.5:8000") == ScrapeTarget("http://10.0.0.5:8000/metrics", 0)
    assert parse_target("http://h:8000/metrics=3") == ScrapeTarget("http://h:8000/metrics", 3)
    assert parse_target("https://h/m?x=a") == ScrapeTarget("https://h/m?x=a", 0)
    with pytest.raises(ValueError, match="expected http"):
        parse_target("h:8000")


# -- serve --scrape --------------------------------------------------------------------------------


def _get_rows(serve: conftest.ServeProcess) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "loadsvc", "get", "--grpc", serve.grpc_target],
                         capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if re.match(r"^\s*│?\s*\d+\s", line)]


def test_serve_scrapes_loadsvc_engines_sglang_gauges(fleet: Any, shm_path: Path, serve_process: Any) -> None:
    engine = fleet.engine(dp_size=2, max_running_requests=2, step_ms=20)
    text = httpx.get(engine.url + "/metrics", timeout=5).text
    for name in ("num_running_reqs", "num_queue_reqs", "token_usage", "gen_throughput", "cache_hit_rate",
                 "num_used_tokens"):
        assert re.search(rf'^sglang:{name}{{dp_rank="1",engine_type="unified",model_name="loadsvc-toy",'
                         rf'moe_ep_rank="0",pp_rank="0",tp_rank="0"}} \S+$', text, re.M), name
    serve = serve_process(shm_path, dp_size=2, args=["--scrape", engine.url])
    wait_for(lambda: len(serve.loads()) == 2, 10, "both ranks scraped")

    async def burst() -> list[int]:
        return await drive(engine.url, 16, 16, max_new=64)

    busy: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            ours = serve.loads()
            busy.extend((ld["num_running_reqs"], ld["num_waiting_reqs"]) for ld in ours.values())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert asyncio.run(burst()) == [200] * 16
    finally:
        done.set()
        sampler.join(10)
    assert max(r for r, _ in busy) == 2 and max(w for _, w in busy) > 0, busy
    # Idle again: the engine's own /v1/loads and serve's agree; both ranks healthy.
    def agree() -> bool:
        theirs = {ld["dp_rank"]: ld for ld in httpx.get(engine.url + "/v1/loads", timeout=5).json()["loads"]}
        ours = serve.loads()
        keys = ("num_running_reqs", "num_waiting_reqs", "max_total_num_tokens", "num_used_tokens")
        return all(ours[r]["status"] == "healthy" and all(ours[r][k] == theirs[r][k] for k in keys)
                   for r in (0, 1))

    wait_for(agree, 10, "serve's scraped ranks to agree with the engine")
    rows = _get_rows(serve)
    assert len(rows) == 2 and all("healthy" in row for row in rows), rows
    assert serve.metric("loadsvc_scrapes_total", result="ok") > 5


class _Pages(http.server.BaseHTTPRequestHandler):
    """GET /<mode>: what an engine's /metrics may do."""

    protocol_version = "HTTP/1.0"
    mode: dict[str, str] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        name = self.path.strip("/")
        mode = self.mode.get(name, "missing")
        if mode == "ok":
            body = vllm_page({0: {"running": 2, "kv": 0.5}}).encode()
        elif mode == "slow":
            time.sleep(1.0)
            body = vllm_page({0: {"running": 2}}).encode()
        elif mode == "error":
            self.send_error(500)
            return
        elif mode == "huge":
            body = b"#" * (10 << 20)
        elif mode == "huge-stream":  # no Content-Length: the size shows only while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"#" * (1 << 20))
            return
        elif mode == "nan":
            body = vllm_page({0: {"running": float("nan")}}).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def pages() -> Iterator[str]:
    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a scraper hanging up on a 10 MB page mid-write: expected here

    httpd = Server(("127.0.0.1", 0), _Pages)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_slow_or_failing_endpoint_turns_stale_never_zero(pages: str, shm_path: Path,
                                                           serve_process: Any) -> None:
    _Pages.mode = {"a": "ok", "b": "ok", "c": "huge", "d": "huge-stream", "e": "nan"}
    serve = serve_process(shm_path, dp_size=5, args=[
        "--scrape", f"{pages}/a=0", "--scrape", f"{pages}/b=1", "--scrape", f"{pages}/c=2",
        "--scrape", f"{pages}/d=3", "--scrape", f"{pages}/e=4", "--scrape-timeout-ms", "300",
        "--stale-after", str(STALE_AFTER), "--unreachable-after", str(UNREACHABLE_AFTER)])
    wait_for(lambda: {r: ld["status"] for r, ld in serve.loads().items()} == {0: "healthy", 1: "healthy"}, 10,
             "the two good endpoints' ranks")
    # 10 MB pages are refused (declared or not), a NaN refuses its rank: ranks 2..4 never appear.
    wait_for(lambda: serve.metric("loadsvc_scrapes_total", result="too_large") >= 4, 10, "too_large counted")
    wait_for(lambda: serve.metric("loadsvc_scrape_ranks_rejected_total", reason="bad_value") >= 2, 10,
             "the NaN counted")
    assert set(serve.loads()) == {0, 1}
    # One endpoint turns slow (past --scrape-timeout-ms), the other fails with HTTP 500.
    _Pages.mode.update(a="slow", b="error")
    failed = time.monotonic()
    wait_for(lambda: {ld["status"] for r, ld in serve.loads().items()} == {"stale"}, STALE_AFTER + 3,
             "both ranks stale")
    assert time.monotonic() - failed > STALE_AFTER - 1.1
    loads = serve.loads()
    assert (loads[0]["num_running_reqs"], loads[0]["token_usage"]) == (2, 0.5)  # the last values, never zero
    assert serve.metric("loadsvc_scrapes_total", result="timeout") >= 1
    assert serve.metric("loadsvc_scrapes_total", result="http_status") >= 1
    wait_for(lambda: {ld["status"] for ld in serve.loads().values()} == {"unreachable"}, UNREACHABLE_AFTER + 3,
             "both ranks unreachable")
    # Back to normal: healthy again, without restarting serve.
    _Pages.mode.update(a="ok", b="ok")
    wait_for(lambda: {ld["status"] for ld in serve.loads().values()} == {"healthy"}, 10, "healthy again")
    log = serve.log()
    assert "refused a scrape [timeout]" in log and "(--scrape-timeout-ms)" in log
    assert log.count("refused a scrape [too_large]") <= 2  # at most one line per reason per 10 s, and the first


# -- a real vLLM ---------------------------------------------------------------------------------




@pytest.mark.timeout(420)
@pytest.mark.vllm
def test_a_real_vllms_metrics_show_up_as_healthy_ranks(vllm_python: Path, tiny_model: Path, shm_path: Path,
                                                       serve_process: Any, tmp_path: Path) -> None:
    with Fleet() as fleet:
        # loadsvc's plugin off, its own region: vLLM runs none of loadsvc's code for this.
        server = fleet.vllm(tiny_model, python=vllm_python, shm=tmp_path / "unused.shm", dp_size=2,
                            max_num_seqs=4, middleware=False, env={"LOADSVC_VLLM_PUBLISH": "0"})
        page = httpx.get(server.url + "/metrics", timeout=10).text
        kv_tokens = int(re.search(r'kv_cache_size_tokens="(\d+)"', page)[1])
        serve = serve_process(shm_path, dp_size=2, args=[
            # a busy vLLM on 2 CPUs answers /metrics in seconds: a scrape may take that long here
            "--scrape", server.url, "--scrape-timeout-ms", "5000", "--stale-after", str(STALE_AFTER),
            "--unreachable-after", str(UNREACHABLE_AFTER)])
        wait_for(lambda: [ld["status"] for ld in serve.loads().values()] == ["healthy", "healthy"], 15,
                 "both vLLM engines as healthy ranks")
        for ld in serve.loads().values():
            assert ld["max_total_num_tokens"] == kv_tokens
            assert (ld["num_running_reqs"], ld["num_waiting_reqs"]) == (0, 0)
        rows = _get_rows(serve)
        assert len(rows) == 2 and all("healthy" in row for row in rows), rows

        # A burst (4 seats per engine, 48 in flight) kept up until serve's ranks were seen full with a
        # queue: a busy vLLM on 2 CPUs answers /metrics slowly, so a one-shot burst can end unseen.
        ours: list[dict[int, tuple[int, int]]] = []

        def seen_full() -> bool:
            ours.append({r: (ld["num_running_reqs"], ld["num_waiting_reqs"]) for r, ld in serve.loads().items()})
            return all(any(s[r][0] == 4 and s[r][1] > 0 for s in ours) for r in (0, 1))

        with Burst(server.url, str(tiny_model), in_flight=48, max_tokens=240) as burst:
            try:
                wait_for(seen_full, 150, "serve's scraped ranks to show the burst", interval=0.05)
            except AssertionError:
                pass  # the checks below show what was seen
        assert set(burst.codes) <= {200} and not burst.errors, (burst.codes, burst.errors)
        for rank in (0, 1):
            assert max(s[rank][0] for s in ours) == 4, ours
            assert 0 < max(s[rank][1] for s in ours) <= 48 - 2 * 4, ours
        wait_for(lambda: {r: (ld["num_running_reqs"], ld["num_waiting_reqs"]) for r, ld in serve.loads().items()}
                 == {0: (0, 0), 1: (0, 0)}, 60, "serve's ranks back to 0")  # vLLM aborts the dropped
        # requests, then serve scrapes a /metrics that a starved API server may take seconds to answer
        loads = serve.loads()
        assert all(ld["gen_throughput"] >= 0 and ld["status"] == "healthy" for ld in loads.values())
        assert serve.metric("loadsvc_scrape_ranks_rejected_total", reason="bad_value") == 0

        # vLLM dies: the scrape fails, the ranks turn stale, then unreachable.
        server.kill()
        wait_for(lambda: {ld["status"] for ld in serve.loads().values()} == {"stale"}, STALE_AFTER + 3,
                 "the ranks stale")
        wait_for(lambda: {ld["status"] for ld in serve.loads().values()} == {"unreachable"},
                 UNREACHABLE_AFTER + 3, "the ranks unreachable")
        assert math.isfinite(serve.metric("loadsvc_scrapes_total", result="unreachable"))


@pytest.mark.parametrize("argv, message", [
    (["--sglang-endpoint", "tcp://h:5559"], "--sglang-endpoint 'tcp://h:5559': expected ENDPOINT=RANK"),
    (["--sglang-endpoint", "h:5559=0"], "--sglang-endpoint 'h:5559': expected tcp://HOST:PORT=RANK"),
    (["--sglang-endpoint", "tcp://h:5559=4"], "--sglang-endpoint rank 4 is outside --dp-size 2"),
    (["--sglang-server", "h:30000"], "--sglang-server 'h:30000': expected http(s)://HOST:PORT[=RANK]"),
    (["--scrape", "h:8000"], "'h:8000': expected http(s)://HOST:PORT[/PATH][=RANK]"),
    (["--scrape", "http://a", "--scrape", "http://b", "--ingest-max-endpoints", "1"],
     "0 --sglang-endpoint and 2 --scrape, more than --ingest-max-endpoints 1"),
    (["--scrape", "http://a", "--scrape-map", "/nonexistent/map.json"], "--scrape-map /nonexistent/map.json: No such"),
])
def test_serve_ingest_flags_that_do_not_fit_are_one_line_errors(argv: list[str], message: str) -> None:
    from loadsvc.cli import _serve_settings, build_parser

    args = build_parser().parse_args(["serve", "--shm", "/tmp/x.shm", "--dp-size", "2", *argv])
    with pytest.raises(SystemExit) as e:
        _serve_settings(args)
    assert message in str(e.value.code)


def test_serve_ingest_flags_parse_into_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from loadsvc.cli import _serve_settings, build_parser

    args = build_parser().parse_args([
        "serve", "--shm", "/tmp/x.shm", "--dp-size", "4", "--sglang-endpoint", "tcp://10.0.0.5:5559=1",
        "--sglang-server", "http://h:30000=2", "--scrape", "http://v:8000", "--scrape-interval-ms", "250",
        "--scrape-timeout-ms", "400", "--scrape-max-bytes", "1000000", "--sglang-max-rate", "50"])
    ingest = _serve_settings(args).ingest
    assert ingest is not None
    assert (ingest.sglang_endpoints, ingest.sglang_servers, ingest.scrape) == (
        (("tcp://10.0.0.5:5559", 1),), (("http://h:30000", 2),), (("http://v:8000/metrics", 0),))
    assert (ingest.scrape_interval, ingest.scrape_timeout, ingest.scrape_max_bytes, ingest.sglang_max_rate) == (
        0.25, 0.4, 1000000, 50.0)
    assert _serve_settings(build_parser().parse_args(["serve", "--shm", "/tmp/x.shm"])).ingest is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--shm", "/tmp/x.shm", "--scrape-interval-ms", "10"])
    assert "the scrape interval's floor is 20 ms" in capsys.readouterr().err
