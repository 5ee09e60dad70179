"""`loadsvc bench soak --minutes N`: a long run under steady load, looking for leaks, errors and stalls.

    publisher process --ShmPublisher x 8, each rank at 100 Hz--> fresh region
                                                                    |
    `loadsvc serve` subprocess (free loopback ports) <--------------+
        ^  WatchLoads x 200 (one process, 4 channels, min_interval_ms 100 by default)
        ^  REST GET /v1/loads, paced (one process, httpx, 16 connections, 400 req/s by default;
        |  rotating json / one rank / core only / prometheus)
        RSS sampled every 5 s (/proc/PID/status)

Reported: REST requests served and errors (non-200 or transport), WatchLoads
messages and errors (a stream that ended before the run did), the serve
process's RSS at launch, after warm-up ("start"), at the end and at its peak,
its CPU, and the publisher's longest stall: the slowest single publish() call
and the longest gap between two publishes of a rank (100 Hz = 10 ms apart; the
excess is the publisher being descheduled on a busy machine, not loadsvc).

Pass (exit 0) when: no REST or watch errors, every subscriber ends on the final
published sequences, the server answers with all 8 ranks at the end and stops
cleanly, and RSS grows by at most RSS_GROWTH_BOUND_MB from warm-up to the end.
Nothing here is a test: run it by hand (docs/benchmarks/soak.md records a 10-minute run).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadsvc.bench import (
    cpu_seconds,
    free_port,
    machine_summary,
    percentile,
    reap,
    stop_process,
    wait_listening,
)
from loadsvc.tools.procs import loadsvc_command

__all__ = ["run", "RSS_GROWTH_BOUND_MB"]

RANKS = 8
RATE_HZ = 100.0
SUBSCRIBERS = 200
STREAMS_PER_CHANNEL = 50
REST_CONNECTIONS = 16
REST_RATE = 400.0  # requests per second in all
WATCH_MIN_INTERVAL_MS = 100
RSS_GROWTH_BOUND_MB = 20.0  # from warm-up to the end of the run
SAMPLE_EVERY = 5.0  # seconds between RSS samples
SETTLE = 10.0  # seconds subscribers get to reach the final state after the last publish
REST_PATHS = ("/v1/loads", "/v1/loads?dp_rank=3", "/v1/loads?include=core", "/v1/loads?format=prometheus")


# -- helpers ---------------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    """Resident set size of pid in MiB (Linux /proc; nan elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _snapshot(rank: int, i: int) -> Any:
    from loadsvc.core.schema import LoadSnapshot, MemoryMetrics, QueueMetrics

    running = 10 + (i + 7 * rank) % 50
    return LoadSnapshot(dp_rank=rank, num_running_reqs=running, num_waiting_reqs=i % 7,
                        num_total_reqs=running + i % 7, num_used_tokens=4096 + i % 10000,
                        max_total_num_tokens=200000, token_usage=(4096 + i % 10000) / 200000,
                        gen_throughput=1500.0 + i % 100, cache_hit_rate=0.4, utilization=running / 64,
                        max_running_requests=256,
                        memory=MemoryMetrics(weight_gb=15.2, kv_cache_gb=40.0, token_capacity=200000),
                        queues=QueueMetrics(waiting=i % 7))


# -- child processes ---------------------------------------------------------------------------------


def _publisher(shm: str, stop: Any, result: Any) -> None:
    """Every rank at RATE_HZ until stop; reports publish() durations and gaps between ticks."""
    from loadsvc.core.region import ShmPublisher

    pubs = [ShmPublisher(shm, dp_size=RANKS, dp_rank=r) for r in range(RANKS)]
    period = 1.0 / RATE_HZ
    perf = time.perf_counter_ns
    slowest_ns = 0
    over_1ms = 0
    durations: list[int] = []  # a sample (every 16th publish) for percentiles
    max_gap_ns = 0
    publishes = 0
    i = 0
    start = time.monotonic()
    last_tick = perf()
    result.put(("started", None))
    while not stop.is_set():
        tick = perf()
        if i:
            max_gap_ns = max(max_gap_ns, tick - last_tick)
        last_tick = tick
        for r, pub in enumerate(pubs):
            snap = _snapshot(r, i)
            t0 = perf()
            pub.publish(snap)
            dt = perf() - t0
            if dt > slowest_ns:
                slowest_ns = dt
            if dt > 1_000_000:
                over_1ms += 1
            if publishes & 15 == 0:
                durations.append(dt)
            publishes += 1
        i += 1
        due = start + i * period
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif -wait > period:  # fell behind (descheduled): do not burst to catch up
            start += -wait
    final = [pub.seq for pub in pubs]
    for pub in pubs:
        pub.close()
    durations.sort()
    result.put(("done", {"publishes": publishes, "slowest_us": slowest_ns / 1e3, "over_1ms": over_1ms,
                         "p50_us": percentile(durations, 50) / 1e3,
                         "p999_us": percentile(durations, 99.9) / 1e3,
                         "max_gap_ms": max_gap_ns / 1e6, "final": final}))


def _watcher(target: str, subscribers: int, min_interval_ms: int, ready: Any, final: Any, result: Any) -> None:
    asyncio.run(_watch_main(target, subscribers, min_interval_ms, ready, final, result))


async def _watch_main(target: str, subscribers: int, min_interval_ms: int, ready: Any, final: Any,
                      result: Any) -> None:
    import grpc

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    n_channels = max(1, -(-subscribers // STREAMS_PER_CHANNEL))
    channels = [grpc.aio.insecure_channel(target) for _ in range(n_channels)]
    request = pb.WatchLoadsRequest(min_interval_ms=min_interval_ms, max_interval_ms=1000).SerializeToString()
    latest: list[bytes] = [b""] * subscribers  # raw bytes; parsed only at the end (client CPU)
    messages = [0] * subscribers
    errors: list[str] = []
    first = asyncio.Event()
    stopping = False

    async def subscriber(k: int) -> None:
        watch = channels[k % n_channels].unary_stream("/loadsvc.v1.LoadService/WatchLoads")
        while not stopping:
            call = watch(request)
            try:
                async for raw in call:
                    latest[k] = raw
                    messages[k] += 1
                    if all(messages):
                        first.set()
            except grpc.aio.AioRpcError as e:
                if stopping or e.code() == grpc.StatusCode.CANCELLED:
                    return
                errors.append(f"{e.code().name}: {e.details()}")
                await asyncio.sleep(0.5)  # then subscribe again, as a router would
                continue
            if not stopping:
                errors.append("stream ended without a status")

    tasks = [asyncio.ensure_future(subscriber(k)) for k in range(subscribers)]
    await asyncio.wait_for(first.wait(), 60)
    ready.put(os.getpid())
    loop = asyncio.get_running_loop()
    cpu0, t0 = time.process_time(), time.monotonic()
    final_seqs: list[int] = await loop.run_in_executor(None, final.get)
    cpu = (time.process_time() - cpu0) / (time.monotonic() - t0)

    def seqs(raw: bytes) -> list[int]:
        return [x.seq for x in pb.GetLoadsResponse.FromString(raw).loads] if raw else []

    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        reached = sum(1 for raw in latest if seqs(raw) == final_seqs)
        if reached == subscribers:
            break
        await asyncio.sleep(0.2)
    stopping = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    result.put({"messages": sum(messages), "reached": reached, "errors": errors[:5], "n_errors": len(errors),
                "cpu": cpu})


def _rest(url: str, connections: int, rate: float, stop: Any, result: Any) -> None:
    asyncio.run(_rest_main(url, connections, rate, stop, result))


async def _rest_main(url: str, connections: int, rate: float, stop: Any, result: Any) -> None:
    import httpx

    statuses: dict[int, int] = {}
    failures: dict[str, int] = {}
    latencies: list[float] = []
    interval = connections / rate if rate > 0 else 0.0  # each worker's pace

    async def worker(k: int, client: httpx.AsyncClient) -> None:
        i = k
        next_at = time.monotonic() + interval * k / connections
        while not stop.is_set():
            path = REST_PATHS[i % len(REST_PATHS)]
            i += 1
            t0 = time.perf_counter()
            try:
                r = await client.get(path)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                latencies.append(time.perf_counter() - t0)
            except httpx.HTTPError as e:
                name = type(e).__name__
                failures[name] = failures.get(name, 0) + 1
                await asyncio.sleep(0.1)
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -1.0:  # far behind: do not burst
                    next_at = time.monotonic()

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:
        await asyncio.gather(*(worker(k, client) for k in range(connections)))
    latencies.sort()
    result.put({"statuses": statuses, "failures": failures, "p50_ms": percentile(latencies, 50) * 1e3,
                "p99_ms": percentile(latencies, 99) * 1e3, "max_ms": (latencies[-1] if latencies else 0) * 1e3})


_WRK_SCRIPT = """
local paths = {%(paths)s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1])
end
delay = function() return %(delay_ms)d end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LOADSVC_SOAK %%d %%d %%d %%.3f %%.3f %%.3f\\n", summary.requests,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""


class _Wrk:
    """REST load with wrk, paced by a Lua delay() per connection: cheap on the client side."""

    def __init__(self, wrk: str, url: str, seconds: float, connections: int, rate: float) -> None:
        delay_ms = max(0, round(connections / rate * 1000)) if rate > 0 else 0
        script = _WRK_SCRIPT % {"paths": ", ".join(f'"{p}"' for p in REST_PATHS), "delay_ms": delay_ms}
        fd, name = tempfile.mkstemp(prefix="loadsvc-soak-", suffix=".lua")
        with os.fdopen(fd, "w") as f:
            f.write(script)
        self.script = Path(name)
        self.proc = subprocess.Popen([wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                                      "--timeout", "10s", "-s", name, url], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            self.script.unlink(missing_ok=True)
        for line in out.splitlines():
            if line.startswith("LOADSVC_SOAK "):
                requests, transport, status, p50, p99, worst = line.split()[1:]
                return {"statuses": {200: int(requests) - int(status), 0: int(status)},
                        "failures": {"transport": int(transport)} if int(transport) else {},
                        "p50_ms": float(p50), "p99_ms": float(p99), "max_ms": float(worst)}
        raise RuntimeError(f"could not read wrk's summary from:\n{out}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.script.unlink(missing_ok=True)


# -- the run -------------------------------------------------------------------------------------------


def _get_loads(target: str) -> Any:
    import grpc

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
    from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        return pb_grpc.LoadServiceStub(ch).GetLoads(pb.GetLoadsRequest(), timeout=10)


def machine() -> str:
    return machine_summary()


def run(args: argparse.Namespace) -> int:
    """`loadsvc bench soak`: prints the figures; 0 when every check passed, 1 otherwise."""
    minutes = float(getattr(args, "minutes", 10.0))
    subscribers = int(getattr(args, "subscribers", SUBSCRIBERS))
    rest_rate = float(getattr(args, "rest_rate", REST_RATE))
    min_interval = int(getattr(args, "watch_min_interval_ms", WATCH_MIN_INTERVAL_MS))
    seconds = minutes * 60
    warmup = min(30.0, max(5.0, seconds / 10))
    shm = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()) / \
        f"loadsvc-bench-soak-{os.getpid()}-{secrets.token_hex(4)}.shm"
    grpc_port, http_port = free_port(), free_port()
    while http_port == grpc_port:
        http_port = free_port()
    target = f"127.0.0.1:{grpc_port}"
    wrk = shutil.which("wrk")
    log_file = tempfile.NamedTemporaryFile(prefix="loadsvc-soak-serve-", suffix=".log", delete=False)
    print(f"loadsvc bench soak: {minutes:g} min, {RANKS} ranks at {RATE_HZ:g} Hz, {subscribers} WatchLoads "
          f"subscribers (min_interval_ms {min_interval}), REST {rest_rate:g} req/s over {REST_CONNECTIONS} "
          f"connections ({'wrk' if wrk else 'httpx'})\nmachine: {machine()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
          f"region {shm}, serve log {log_file.name}", flush=True)

    ctx = mp.get_context("spawn")
    serve = subprocess.Popen([*loadsvc_command("serve"), "--shm", str(shm), "--dp-size",
                              str(RANKS), "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
                             stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    children: list[Any] = []
    rest_load: _Wrk | None = None
    ok = True
    try:
        wait_listening(grpc_port, serve)
        wait_listening(http_port, serve)
        rss_launch = _rss_mb(serve.pid)

        pub_stop, pub_q = ctx.Event(), ctx.Queue()
        publisher = ctx.Process(target=_publisher, args=(str(shm), pub_stop, pub_q), daemon=True)
        publisher.start()
        children.append(publisher)
        pub_q.get(timeout=60)

        watch_ready, watch_final, watch_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        watcher = ctx.Process(target=_watcher, args=(target, subscribers, min_interval, watch_ready, watch_final,
                                                     watch_q), daemon=True)
        watcher.start()
        children.append(watcher)
        watch_ready.get(timeout=90)

        t0 = time.monotonic()
        url = f"http://127.0.0.1:{http_port}"
        rest_stop, rest_q = ctx.Event(), ctx.Queue()
        if wrk is not None:
            rest_load = _Wrk(wrk, url, seconds, REST_CONNECTIONS, rest_rate)
        else:
            rest = ctx.Process(target=_rest, args=(url, REST_CONNECTIONS, rest_rate, rest_stop, rest_q),
                               daemon=True)
            rest.start()
            children.append(rest)
        time.sleep(warmup)
        rss_start = _rss_mb(serve.pid)
        cpu_start = cpu_seconds(serve.pid)
        t_start = time.monotonic()
        peak = rss_start
        next_report = t_start + 60
        end = t0 + seconds
        while (now := time.monotonic()) < end:
            if serve.poll() is not None:
                raise RuntimeError(f"loadsvc serve exited with {serve.returncode} during the run")
            peak = max(peak, _rss_mb(serve.pid))
            if now >= next_report:
                next_report += 60
                print(f"  {(now - t0) / 60:4.1f} min: serve RSS {_rss_mb(serve.pid):.1f} MiB", flush=True)
            time.sleep(min(SAMPLE_EVERY, max(0.0, end - now)))
        rss_end = _rss_mb(serve.pid)
        peak = max(peak, rss_end)
        cpu = (cpu_seconds(serve.pid) - cpu_start) / (time.monotonic() - t_start)

        if rest_load is not None:
            rest_result = rest_load.result(timeout=60)
        else:
            rest_stop.set()
            rest_result = rest_q.get(timeout=60)
        pub_stop.set()
        _, pub_result = pub_q.get(timeout=60)  # ("done", figures)
        watch_final.put(pub_result["final"])
        watch_result = watch_q.get(timeout=SETTLE + 60)
        final_view = _get_loads(target)
    finally:
        if rest_load is not None:
            rest_load.stop()
        reap(children)
        stop_process(serve, 15)
        shm.unlink(missing_ok=True)
        log_file.close()

    served = rest_result["statuses"].get(200, 0)
    rest_errors = sum(n for code, n in rest_result["statuses"].items() if code != 200) + \
        sum(rest_result["failures"].values())
    log_text = Path(log_file.name).read_text(errors="replace")
    log_errors = sum(1 for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line)
    growth = rss_end - rss_start
    run_s = seconds - warmup
    checks = {
        "REST errors == 0": rest_errors == 0,
        "WatchLoads errors == 0": watch_result["n_errors"] == 0,
        f"every subscriber on the final state ({watch_result['reached']}/{subscribers})":
            watch_result["reached"] == subscribers,
        f"all {RANKS} ranks in the final GetLoads": [x.dp_rank for x in final_view.loads] == list(range(RANKS)),
        f"RSS growth {growth:+.1f} MiB <= {RSS_GROWTH_BOUND_MB:g} MiB": growth <= RSS_GROWTH_BOUND_MB,
        "serve stopped cleanly (exit 0) with no ERROR lines": serve.returncode == 0 and log_errors == 0,
    }
    print(f"""
REST       {served} requests served ({served / seconds:.0f}/s of {rest_rate:g}/s asked), \
{rest_errors} errors {rest_result['failures'] or ''}
           latency p50 {rest_result['p50_ms']:.2f} ms, p99 {rest_result['p99_ms']:.2f} ms, \
max {rest_result['max_ms']:.1f} ms
WatchLoads {subscribers} subscribers, {watch_result['messages']} messages \
({watch_result['messages'] / seconds:.0f}/s), \
{watch_result['n_errors']} errors {watch_result['errors'] or ''}
publisher  {pub_result['publishes']} publishes; publish() p50 {pub_result['p50_us']:.1f} us, \
p99.9 {pub_result['p999_us']:.1f} us, slowest {pub_result['slowest_us']:.0f} us ({pub_result['over_1ms']} over 1 ms)
           longest gap between two publishes of a rank {pub_result['max_gap_ms']:.1f} ms (period {1000 / RATE_HZ:g} ms)
serve RSS  launch {rss_launch:.1f} MiB, after {warmup:g} s warm-up {rss_start:.1f} MiB, end {rss_end:.1f} MiB \
(growth {growth:+.1f} MiB over {run_s / 60:.1f} min), peak {peak:.1f} MiB
serve CPU  {cpu * 100:.0f}% of one core""")
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAIL'}] {name}")
        ok = ok and passed
    if ok:
        Path(log_file.name).unlink(missing_ok=True)
    else:
        print(f"serve log kept: {log_file.name}")
    return 0 if ok else 1


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m loadsvc.bench.soak")
    p.add_argument("--minutes", type=float, default=10.0)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
