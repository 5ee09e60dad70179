"""`loadsvc bench routing`: does routing on fresh loads finish requests sooner? Same trace, three routers.

    trace (fixed seed): Poisson arrivals at rate R, lognormal prompt and output lengths
        |  open loop: each request leaves at its arrival time, whatever came back
        v
    router under test --HTTP--> 4 x `loadsvc engine` (speeds 1, 1, 1, 0.5)
      (i)   round robin            `loadsvc router --policy round_robin` (loads ignored)
      (ii)  smg power_of_two       the SGLang gateway polling each engine's /v1/loads every 1 s
      (iii) loadsvc P2C            `loadsvc router --policy p2c` on WatchLoads pushes

Capacity is calibrated first: every engine saturated directly (closed loop,
three times its batch in flight) for a few seconds; the arrival rates are
fractions of that sum (--loads, default 0.7 and 0.9). Each router gets the
same trace at each rate, engines idle and caches flushed in between; the
routers run in turn at each rate. Time to completion is measured from the
request's scheduled arrival, so a generator that falls behind is not hidden.
requests/s is completed requests over the time from the first arrival to the
last completion. Share is each engine's part of the requests (its own counter),
the half-speed engine last.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadsvc.tools.fleet import EngineProc, Fleet, smg_available

__all__ = ["run", "Trace", "make_trace"]

SPEEDS = (1.0, 1.0, 1.0, 0.5)
MAX_RUNNING = 8  # per engine: small, so queues form near saturation
STEP_MS = 10.0
OUTPUT_MEDIAN, OUTPUT_SIGMA = 48, 0.6  # tokens, lognormal
PROMPT_MEDIAN, PROMPT_SIGMA = 64, 0.5
OUTPUT_MAX, PROMPT_MAX = 400, 1024
CALIBRATE_S = 4.0
SMG_POLL_S = 1


@dataclass(frozen=True)
class Request:
    at: float  # seconds after the start
    prompt_tokens: int
    max_new: int


@dataclass(frozen=True)
class Trace:
    rate: float
    requests: tuple[Request, ...]


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def make_trace(rate: float, n: int, seed: int) -> Trace:
    """n requests, Poisson arrivals at rate per second, lognormal lengths; the same for one seed."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Request(t, _lognormal(rng, PROMPT_MEDIAN, PROMPT_SIGMA, 1, PROMPT_MAX),
                           _lognormal(rng, OUTPUT_MEDIAN, OUTPUT_SIGMA, 1, OUTPUT_MAX)))
    return Trace(rate, tuple(out))


def _body(i: int, req: Request) -> dict[str, Any]:
    # A prompt of prompt_tokens toy tokens (four characters each), unique per request: no cache hits.
    text = f"{i:08d}" + "x" * (4 * req.prompt_tokens - 8)
    return {"text": text, "sampling_params": {"max_new_tokens": req.max_new}}


@dataclass
class Result:
    router: str
    rate: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    span: float = 0.0
    share: list[int] = field(default_factory=list)
    note: str = ""

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.span if self.span > 0 else 0.0


async def _replay(url: str, trace: Trace) -> tuple[list[float], int, float]:
    """Send the trace open loop; (times to completion, errors, first arrival to last completion)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2
        latencies: list[float] = []
        errors = 0
        last = start

        async def one(i: int, req: Request) -> None:
            nonlocal errors, last
            due = start + req.at
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                r = await client.post(url + "/generate", json=_body(i, req))
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            now = loop.time()
            if ok:
                latencies.append(now - due)
                last = max(last, now)
            else:
                errors += 1

        await asyncio.gather(*(one(i, r) for i, r in enumerate(trace.requests)))
        return latencies, errors, last - (start + trace.requests[0].at)


async def _saturate(engine: EngineProc, seconds: float, seed: int) -> float:
    """Completions per second of one engine kept full (closed loop, 3 x its batch in flight)."""
    rng = random.Random(seed)
    done = 0
    stop_at = 0.0
    async with httpx.AsyncClient(timeout=120) as client:
        loop = asyncio.get_running_loop()
        warm_until = loop.time() + 1.0
        stop_at = warm_until + seconds

        async def worker(k: int) -> None:
            nonlocal done
            i = 0
            while loop.time() < stop_at:
                req = Request(0, _lognormal(rng, PROMPT_MEDIAN, PROMPT_SIGMA, 1, PROMPT_MAX),
                              _lognormal(rng, OUTPUT_MEDIAN, OUTPUT_SIGMA, 1, OUTPUT_MAX))
                r = await client.post(engine.url + "/generate", json=_body(k * 100000 + i, req))
                i += 1
                if r.status_code == 200 and warm_until <= loop.time() <= stop_at:
                    done += 1

        await asyncio.gather(*(worker(k) for k in range(3 * MAX_RUNNING)))
    return done / seconds


async def _calibrate(engines: list[EngineProc], seed: int) -> list[float]:
    return list(await asyncio.gather(*(_saturate(e, CALIBRATE_S, seed + i) for i, e in enumerate(engines))))


def _settle(engines: list[EngineProc], timeout: float = 60.0) -> None:
    """Wait until every engine is idle, then flush its prefix cache."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as c:
        for e in engines:
            while any(r["running"] or r["waiting"] for r in e.server_info()["loadsvc_engine"]["ranks"]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine {e.url} still busy {timeout:.0f} s after a run")
                time.sleep(0.1)
            c.post(e.url + "/flush_cache")


def _completed(engines: list[EngineProc]) -> list[int]:
    return [e.completed() for e in engines]


def _run_one(fleet: Fleet, engines: list[EngineProc], name: str, trace: Trace, seed: int) -> Result:
    if name == "round robin":
        front = fleet.router(engines, policy="round_robin")
    elif name == "smg power_of_two":
        front = fleet.smg(engines, policy="power_of_two", load_monitor_interval=SMG_POLL_S)
        time.sleep(SMG_POLL_S + 0.5)  # its first poll of every worker
    else:
        front = fleet.router(engines, policy="p2c", seed=seed)
    before = _completed(engines)
    latencies, errors, span = asyncio.run(_replay(front.url, trace))
    after = _completed(engines)
    result = Result(name, trace.rate, latencies, errors, span, [a - b for a, b in zip(after, before)])
    if name == "loadsvc P2C":
        lag = httpx.get(front.url + "/router/workers", timeout=5).json()["view_lag_ms"]
        if lag:
            result.note = f"view lag p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms"
    fleet.stop(front)
    _settle(engines)
    return result


def _fmt_s(x: float) -> str:
    return f"{x:.2f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from loadsvc import __version__
    from loadsvc.bench.shm import machine

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    console = Console(width=max(100, Console().width))
    loads = tuple(args.loads)
    routers = ["round robin", "smg power_of_two", "loadsvc P2C"]
    why = smg_available()
    if why:
        console.print(f"[yellow]smg power_of_two left out: {why}[/yellow]")
        routers.remove("smg power_of_two")
    info = machine()
    console.print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    console.print(f"loadsvc {__version__}; engines: speeds {', '.join(f'{s:g}' for s in SPEEDS)}, "
                  f"max_running_requests {MAX_RUNNING}, step {STEP_MS:g} ms; outputs lognormal median "
                  f"{OUTPUT_MEDIAN} tokens (sigma {OUTPUT_SIGMA}), prompts median {PROMPT_MEDIAN}; "
                  f"{args.requests} requests per run, seed {args.seed}")
    started = time.monotonic()
    results: list[Result] = []
    with Fleet() as fleet:
        engines = [fleet.engine(speeds=(s,), max_running_requests=MAX_RUNNING, step_ms=STEP_MS,
                                max_total_tokens=MAX_RUNNING * (OUTPUT_MAX + PROMPT_MAX), wait=False)
                   for s in SPEEDS]
        fleet.wait(*engines, timeout=60)
        per_engine = asyncio.run(_calibrate(engines, args.seed))
        capacity = sum(per_engine)
        _settle(engines)
        console.print(f"capacity: {capacity:.1f} requests/s in all (per engine "
                      f"{', '.join(f'{c:.1f}' for c in per_engine)}), measured saturating each engine "
                      f"for {CALIBRATE_S:g} s")
        for load in loads:
            trace = make_trace(load * capacity, args.requests, args.seed)
            for name in routers:
                console.print(f"  {name} at {load:.0%} of capacity ({trace.rate:.1f} req/s) ...")
                results.append(_run_one(fleet, engines, name, trace, args.seed))

    table = Table(title="Routing quality: time to completion of the same open-loop trace")
    for col, just in (("load", "right"), ("arrivals/s", "right"), ("router", "left"), ("p50 s", "right"),
                      ("p99 s", "right"), ("mean s", "right"), ("done/s", "right"),
                      ("share % (slow last)", "left"), ("errors", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    by_rate: dict[float, list[Result]] = {}
    for r in results:
        by_rate.setdefault(r.rate, []).append(r)
    for load, (rate, group) in zip(loads, by_rate.items()):
        best = min(g.pct(0.99) for g in group)
        for r in group:
            p99 = _fmt_s(r.pct(0.99))
            total = sum(r.share) or 1
            table.add_row(f"{load:.0%}", f"{rate:.1f}", r.router, _fmt_s(r.pct(0.5)),
                          f"[bold]{p99}[/bold]" if r.pct(0.99) == best else p99,
                          _fmt_s(sum(r.latencies) / max(1, len(r.latencies))), f"{r.rps:.1f}",
                          "/".join(f"{100 * s / total:.0f}" for s in r.share), str(r.errors))
        table.add_section()
    console.print(table)
    for r in results:
        if r.note:
            console.print(f"{r.router} at {r.rate:.1f} req/s: {r.note}")
    top = max(by_rate)
    rr = next((g for g in by_rate[top] if g.router == "round robin"), None)
    p2c = next((g for g in by_rate[top] if g.router == "loadsvc P2C"), None)
    if rr and p2c:
        verdict = "beats" if p2c.pct(0.99) < rr.pct(0.99) else "does NOT beat"
        console.print(f"at {top:.1f} req/s loadsvc P2C {verdict} round robin on p99: "
                      f"{p2c.pct(0.99):.2f} s against {rr.pct(0.99):.2f} s")
    console.print(f"load average after the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"took {time.monotonic() - started:.0f} s")
    return 0
