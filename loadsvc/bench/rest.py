"""`loadsvc bench rest`: GET /v1/loads under wrk, loadsvc against the reference design, one run.

    publisher process (8 ranks, 100 Hz each)
        |-- ShmPublisher x 8 --> /dev/shm region --> loadsvc server (create_app, uvicorn)
        '-- flock(LOCK_EX) per write --> flock file --> baseline server (FastAPI route)
                                                             ^
    wrk -t2 -c32 --latency, one server at a time -----------'

The baseline models the reference design: a file with a 16 KiB slot per rank,
a shared flock around every read, every slot decoded with msgspec into dicts,
and the response dicts built on every request and serialized by FastAPI.
Both servers run uvicorn with uvloop and httptools, one worker, access log off,
each in its own process; the two are measured in alternating rounds and each side's
median round is reported. Targets (docs/benchmarks/rest.md): loadsvc serves at least 3x the
baseline's requests/s at no more than a third of its p99 latency.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadsvc.bench import free_port, machine_summary
from loadsvc.tools.procs import python_command

RANKS = 8
RATE_HZ = 100.0
THREADS = 2
BASELINE_SLOT = 16 * 1024
WARMUP_SECONDS = 2
ROUNDS = 3  # alternating wrk runs per side; the median of each is reported
TARGET_RPS_RATIO = 3.0
TARGET_P99_RATIO = 1 / 3
PATH = "/v1/loads"

# wrk reports its own numbers as one JSON line (microseconds), so nothing is parsed from prose.
_WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "LOADSVC_WRK {\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p90_us\\": %d, "
    .. "\\"p99_us\\": %d, \\"max_us\\": %d, \\"non2xx\\": %d, \\"socket_errors\\": %d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


# -- the load source ---------------------------------------------------------------


def _snapshot(rank: int, tick: int, rng: random.Random) -> Any:
    from loadsvc import (
        DisaggregationMetrics,
        LoadSnapshot,
        MemoryMetrics,
        QueueMetrics,
        SpeculativeMetrics,
    )

    running = 20 + (rank * 7 + tick) % 200
    waiting = rng.randrange(0, 40)
    used = running * 900 + rng.randrange(0, 5000)
    return LoadSnapshot(
        dp_rank=rank, num_running_reqs=running, num_waiting_reqs=waiting,
        num_total_reqs=running + waiting, num_used_tokens=used, max_total_num_tokens=400_000,
        token_usage=used / 400_000, gen_throughput=1000.0 + rng.random() * 800,
        cache_hit_rate=rng.random(), utilization=running / 256, max_running_requests=256,
        num_waiting_uncached_tokens=waiting * 300, num_total_tokens=used + waiting * 300,
        memory=MemoryMetrics(weight_gb=15.2, kv_cache_gb=40.0, graph_gb=2.5, token_capacity=400_000),
        queues=QueueMetrics(waiting=waiting, grammar=0, paused=0, retracted=rank % 2),
        speculative=SpeculativeMetrics(accept_length=2.5, accept_rate=0.7) if rank % 2 else None,
        disaggregation=DisaggregationMetrics(mode="prefill" if rank < RANKS // 2 else "decode")
        if rank % 4 == 0 else None,
    )


def _publish(shm: Path, baseline: Path, ranks: int, rate: float) -> None:
    """Publish every rank at rate Hz into the region and, under flock, into the baseline file."""
    import msgspec

    from loadsvc import ShmPublisher
    from loadsvc.core.schema import to_dict

    pubs = [ShmPublisher(shm, dp_size=ranks, dp_rank=r) for r in range(ranks)]
    fd = os.open(baseline, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, ranks * BASELINE_SLOT)
    encode = msgspec.msgpack.encode
    rng = random.Random(1)
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    period = 1.0 / rate
    tick = 0
    next_at = time.monotonic()
    while not stop:
        for r, pub in enumerate(pubs):
            snap = _snapshot(r, tick, rng)
            pub.publish(snap)
            record = to_dict(snap)
            record["publish_time_ns"] = time.time_ns()
            payload = encode(record)
            fcntl.flock(fd, fcntl.LOCK_EX)  # the reference design locks the file for every write
            try:
                os.pwrite(fd, struct.pack("<I", len(payload)) + payload, r * BASELINE_SLOT)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        tick += 1
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()
    for pub in pubs:
        pub.close()
    os.close(fd)


# -- the two servers ---------------------------------------------------------------------


def _uvicorn(app: Any, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", workers=1,
                access_log=False, log_level="warning", lifespan="on")


def _serve_loadsvc(shm: Path, port: int) -> None:
    from loadsvc.core.store import LoadStore
    from loadsvc.settings import StoreSettings
    from loadsvc.surfaces.rest import create_app

    _uvicorn(create_app(LoadStore(StoreSettings(shm=shm))), port)


def baseline_app(path: Path, ranks: int, stale_after: float = 3.0) -> Any:
    """The reference design's endpoint: flock, decode every slot, build dicts, FastAPI serializes."""
    from datetime import UTC, datetime

    import msgspec
    from fastapi import FastAPI, HTTPException, Query

    from loadsvc import __version__

    app = FastAPI()
    fd = os.open(path, os.O_RDONLY)
    decode = msgspec.msgpack.decode
    sections = {"memory": "memory", "spec": "speculative", "lora": "lora", "disagg": "disaggregation",
                "queues": "queues"}

    def read_all() -> list[dict[str, Any]]:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            data = os.pread(fd, ranks * BASELINE_SLOT, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        out = []
        for r in range(ranks):
            (size,) = struct.unpack_from("<I", data, r * BASELINE_SLOT)
            if size:
                start = r * BASELINE_SLOT + 4
                out.append(decode(data[start:start + size]))
        return out

    @app.get("/v1/loads")
    async def loads(dp_rank: int | None = None, include: list[str] | None = Query(None),
                    format: str = "json") -> Any:
        wanted: set[str] = set(sections.values())
        tokens = [t.strip() for v in include or [] for t in v.split(",") if t.strip()]
        if tokens and "all" not in tokens:
            unknown = [t for t in tokens if t != "core" and t not in sections]
            if unknown:
                raise HTTPException(400, f"unknown include {unknown[0]!r}")
            wanted = {sections[t] for t in tokens if t in sections}
        now = time.time_ns()
        result = []
        for record in read_all():
            if dp_rank is not None and record["dp_rank"] != dp_rank:
                continue
            age_ms = (now - record["publish_time_ns"]) / 1e6
            item = {k: v for k, v in record.items()
                    if k not in sections.values() and k not in ("publish_time_ns", "seq", "epoch",
                                                                 "status", "age_ms")}
            for name in wanted:
                if record.get(name) is not None:
                    item[name] = record[name]
            item["status"] = "healthy" if age_ms <= stale_after * 1000 else "stale"
            item["age_ms"] = round(age_ms, 3)
            result.append(item)
        n = len(result) or 1
        return {
            "timestamp": datetime.now(UTC).isoformat(),
            "version": __version__,
            "dp_rank_count": ranks,
            "loads": result,
            "aggregate": {
                "total_running_reqs": sum(x["num_running_reqs"] for x in result),
                "total_waiting_reqs": sum(x["num_waiting_reqs"] for x in result),
                "total_reqs": sum(x["num_total_reqs"] for x in result),
                "avg_token_usage": sum(x["token_usage"] for x in result) / n,
                "avg_throughput": sum(x["gen_throughput"] for x in result) / n,
                "avg_utilization": sum(x["utilization"] for x in result) / n,
            },
        }

    return app


def _serve_baseline(path: Path, ranks: int, port: int) -> None:
    _uvicorn(baseline_app(path, ranks), port)


# -- orchestration -------------------------------------------------------------------------


def _spawn(*role: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(python_command("-m", "loadsvc.bench.rest", *role),
                            stdin=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a benchmark process exited early (waiting for {url})")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                body = r.json()
                if len(body["loads"]) == RANKS:
                    return body
                last = f"{len(body['loads'])} of {RANKS} ranks"
            else:
                last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = str(e) or type(e).__name__
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last})")


def _wrk(wrk: str, script: Path, url: str, seconds: int, connections: int) -> dict[str, Any]:
    cmd = [wrk, f"-t{THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("LOADSVC_WRK "):
            result = json.loads(line.removeprefix("LOADSVC_WRK "))
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            return result
    raise RuntimeError(f"could not read wrk's summary from:\n{out}")


def machine() -> str:
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return machine_summary() + load


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per readiness probe
    wrk = shutil.which("wrk")
    if wrk is None:
        console.print("[red]wrk is not installed.[/] Install it (Debian/Ubuntu: "
                      "`sudo apt-get install wrk`; macOS: `brew install wrk`) and run again.")
        return 2
    seconds, connections = int(args.seconds), int(args.connections)
    tag = f"{os.getpid()}-{os.urandom(3).hex()}"
    shm = Path(f"/dev/shm/loadsvc-bench-rest-{tag}.shm")
    flock_file = Path(tempfile.gettempdir()) / f"loadsvc-bench-rest-{tag}.flock"
    if Path("/dev/shm").is_dir():
        flock_file = Path(f"/dev/shm/loadsvc-bench-rest-{tag}.flock")
    script = Path(tempfile.gettempdir()) / f"loadsvc-bench-rest-{tag}.lua"
    script.write_text(_WRK_LUA)
    ports = {"loadsvc": free_port(), "baseline": free_port()}
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[str, Any]] = {}
    try:
        procs.append(_spawn("publish", str(shm), str(flock_file), str(RANKS), str(RATE_HZ)))
        deadline = time.monotonic() + 10
        while not (shm.exists() and flock_file.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        procs.append(_spawn("serve-loadsvc", str(shm), str(ports["loadsvc"])))
        procs.append(_spawn("serve-baseline", str(flock_file), str(RANKS), str(ports["baseline"])))
        urls = {name: f"http://127.0.0.1:{port}{PATH}" for name, port in ports.items()}
        sizes = {}
        for name, url in urls.items():
            body = _wait_ready(url, procs)
            sizes[name] = len(json.dumps(body, separators=(",", ":")))
        console.print(f"wrk -t{THREADS} -c{connections} -d{seconds}s on GET {PATH} ({RANKS} ranks "
                      f"published at {RATE_HZ:g} Hz each; bodies ~{sizes['loadsvc']} B loadsvc, "
                      f"~{sizes['baseline']} B baseline)")
        for name in ("baseline", "loadsvc"):
            _wrk(wrk, script, urls[name], WARMUP_SECONDS, connections)
        # Alternate rounds so a noisy neighbour hurts both sides alike; report each side's
        # median round (by requests/s, with that round's latencies).
        rounds: dict[str, list[dict[str, Any]]] = {"baseline": [], "loadsvc": []}
        for round_no in range(ROUNDS):
            for name in ("baseline", "loadsvc"):
                r = _wrk(wrk, script, urls[name], seconds, connections)
                console.print(f"  round {round_no + 1} {name}: {r['rps']:,.0f} requests/s, "
                              f"p50 {r['p50_us'] / 1000:.2f} ms, p99 {r['p99_us'] / 1000:.2f} ms")
                rounds[name].append(r)
        for name, rs in rounds.items():
            results[name] = sorted(rs, key=lambda r: r["rps"])[len(rs) // 2]
    finally:
        _stop(procs)
        for path in (shm, flock_file, script):
            path.unlink(missing_ok=True)

    base, ours = results["baseline"], results["loadsvc"]
    rps_ratio = ours["rps"] / base["rps"]
    p99_ratio = ours["p99_us"] / base["p99_us"]
    rps_ok = rps_ratio >= TARGET_RPS_RATIO
    p99_ok = p99_ratio <= TARGET_P99_RATIO

    def ms(us: float) -> str:
        return f"{us / 1000:.2f} ms"

    table = Table(title=f"loadsvc bench rest: GET {PATH}, {RANKS} ranks, wrk {THREADS} threads "
                        f"{connections} connections, median of {ROUNDS} x {seconds} s")
    table.add_column("")
    table.add_column("requests/s", justify="right")
    table.add_column("p50", justify="right")
    table.add_column("p90", justify="right")
    table.add_column("p99", justify="right")
    table.add_column("max", justify="right")
    table.add_column("errors", justify="right")
    for label, r in (("baseline (flock, dicts per request)", base), ("loadsvc", ours)):
        table.add_row(label, f"{r['rps']:,.0f}", ms(r["p50_us"]), ms(r["p90_us"]), ms(r["p99_us"]),
                      ms(r["max_us"]), str(r["non2xx"] + r["socket_errors"]))
    table.add_row("loadsvc / baseline", f"{rps_ratio:.2f}x", f"{ours['p50_us'] / base['p50_us']:.2f}x",
                  f"{ours['p90_us'] / base['p90_us']:.2f}x", f"{p99_ratio:.2f}x", "", "")
    table.add_row("target", f">= {TARGET_RPS_RATIO:g}x", "", "", f"<= {TARGET_P99_RATIO:.2f}x", "", "")
    table.add_row("met", "[green]yes[/]" if rps_ok else "[red]no[/]", "", "",
                  "[green]yes[/]" if p99_ok else "[red]no[/]", "", "")
    console.print(table)
    console.print(f"machine: {machine()}")
    return 0 if rps_ok and p99_ok else 1


def _main(argv: list[str]) -> None:
    role, *rest = argv
    if role == "publish":
        _publish(Path(rest[0]), Path(rest[1]), int(rest[2]), float(rest[3]))
    elif role == "serve-loadsvc":
        _serve_loadsvc(Path(rest[0]), int(rest[1]))
    elif role == "serve-baseline":
        _serve_baseline(Path(rest[0]), int(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown role {role!r} (publish, serve-loadsvc, serve-baseline)")


if __name__ == "__main__":
    _main(sys.argv[1:])
