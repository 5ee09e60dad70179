"""`loadsvc bench routing`: does routing on fresh loads finish requests sooner? Same trace, five routers.

    trace (fixed seed): Poisson arrivals at rate R, lognormal prompt and output lengths
        |  open loop: each request leaves at its arrival time, whatever came back
        |--F of it (--direct), the same requests for every kind--> straight to an engine
        v  the rest round robin over N replicas of the router kind (--routers; an L4 balancer)
    router kind under test --HTTP--> 4 x `loadsvc engine` (speeds 1, 1, 1, 0.5)
      (i)   round robin            `loadsvc router --policy round_robin` (loads ignored)
      (ii)  smg power_of_two       the SGLang gateway polling each engine's /v1/loads every 1 s
      (iii) vllm-router            vLLM's router, power_of_two polling each engine's /get_load
                                   every 1 s (its shortest period)
      (iv)  loadsvc P2C            `loadsvc router --policy p2c` on WatchLoads pushes
      (v)   oracle                 one router that sees all traffic, the direct share too, and
                                   the exact in-flight count of every engine (loadsvc.bench.oracle)

Capacity is calibrated first: every engine saturated directly (closed loop,
three times its batch in flight) for a few seconds; the arrival rates are
fractions of that sum (--loads, default 0.7 and 0.9). Each router kind gets the
same trace at each rate, engines idle and caches flushed in between; the
kinds run in turn at each rate. Time to completion (every request, direct ones
too) is measured from the request's scheduled arrival, so a generator that
falls behind is not hidden. requests/s is completed requests over the time from
the first arrival to the last completion. Share is each engine's part of the
requests (its own counter), the half-speed engine last. The issue's targets for
loadsvc P2C's p99 against smg, round robin and the oracle are judged (TARGETS).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadsvc.bench.oracle import DIRECT_HEADER
from loadsvc.tools.fleet import EngineProc, Fleet, Proc, smg_available, vllm_router_available

__all__ = ["run", "Trace", "Result", "make_trace", "direct_plan", "judge", "judge_repeats", "KINDS"]

SPEEDS = (1.0, 1.0, 1.0, 0.5)
MAX_RUNNING = 8  # per engine: small, so queues form near saturation
STEP_MS = 10.0
BATCH_KNEE = 32.0  # the engines' --batch-knee; the oracle's timing model uses the same
OUTPUT_MEDIAN, OUTPUT_SIGMA = 48, 0.6  # tokens, lognormal
PROMPT_MEDIAN, PROMPT_SIGMA = 64, 0.5
OUTPUT_MAX, PROMPT_MAX = 400, 1024
CALIBRATE_S = 4.0
SMG_POLL_S = 1
VLLM_ROUTER_POLL_S = 1  # its --worker-startup-check-interval, also its /get_load poll period

ROUND_ROBIN, SMG, VLLM_ROUTER, P2C, ORACLE = (
    "round robin", "smg power_of_two", "vllm-router power_of_two", "loadsvc P2C", "oracle")
KINDS = (ROUND_ROBIN, SMG, VLLM_ROUTER, P2C, ORACLE)


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
    repeat: int = 0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.span if self.span > 0 else 0.0


def direct_plan(n: int, fraction: float, engines: int, seed: int) -> tuple[int | None, ...]:
    """Per request of an n-request trace: the engine it goes to straight (round(fraction * n) of
    them, chosen uniformly at random, each engine uniformly too), else None (through a router).
    The same for one seed, whatever the router kind."""
    rng = random.Random(seed * 7919 + 17)  # not the trace's own stream: its requests stay the same
    chosen = set(rng.sample(range(n), round(fraction * n)))
    return tuple(rng.randrange(engines) if i in chosen else None for i in range(n))


def _targets(trace: Trace, plan: tuple[int | None, ...], fronts: list[str], engines: list[str],
             oracle: bool) -> list[tuple[str, dict[str, str] | None]]:
    """(URL, headers) per request: routed ones round robin over the fronts (an L4 balancer), direct
    ones to their engine (through the oracle, which must see them, naming the engine)."""
    out: list[tuple[str, dict[str, str] | None]] = []
    k = 0
    for engine in plan[:len(trace.requests)]:
        if engine is None:
            out.append((fronts[k % len(fronts)], None))
            k += 1
        elif oracle:
            out.append((fronts[0], {DIRECT_HEADER: str(engine)}))
        else:
            out.append((engines[engine], None))
    return out


async def _replay(targets: list[tuple[str, dict[str, str] | None]],
                  trace: Trace) -> tuple[list[float], int, float]:
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
            url, headers = targets[i]
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                r = await client.post(url + "/generate", json=_body(i, req), headers=headers)
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


@dataclass(frozen=True)
class Setup:
    """What every router kind of one run shares: the engines, replicas per kind, the direct plan."""

    engines: list[EngineProc]
    replicas: int
    plan: tuple[int | None, ...]
    seed: int


def _fronts(fleet: Fleet, kind: str, setup: Setup) -> list[Proc]:
    """The router processes of one kind (replicas of it; the oracle is always one)."""
    engines, n = setup.engines, setup.replicas
    if kind == ROUND_ROBIN:
        return [fleet.router(engines, policy="round_robin") for _ in range(n)]
    if kind == SMG:
        fronts = [fleet.smg(engines, policy="power_of_two", load_monitor_interval=SMG_POLL_S)
                  for _ in range(n)]
        time.sleep(SMG_POLL_S + 0.5)  # its first poll of every worker
        return fronts
    if kind == VLLM_ROUTER:
        fronts = [fleet.vllm_router(engines, policy="power_of_two", load_interval=VLLM_ROUTER_POLL_S)
                  for _ in range(n)]
        time.sleep(VLLM_ROUTER_POLL_S + 0.5)
        return fronts
    if kind == P2C:
        return [fleet.router(engines, policy="p2c", seed=setup.seed + k) for k in range(n)]
    if kind == ORACLE:
        return [fleet.oracle(engines, SPEEDS, max_running=MAX_RUNNING, batch_knee=BATCH_KNEE,
                             seed=setup.seed)]
    raise ValueError(f"unknown router kind {kind!r}")


def _run_one(fleet: Fleet, kind: str, trace: Trace, setup: Setup) -> Result:
    engines = setup.engines
    fronts = _fronts(fleet, kind, setup)
    targets = _targets(trace, setup.plan, [f.url for f in fronts], [e.url for e in engines],
                       oracle=kind == ORACLE)
    before = _completed(engines)
    latencies, errors, span = asyncio.run(_replay(targets, trace))
    after = _completed(engines)
    result = Result(kind, trace.rate, latencies, errors, span, [a - b for a, b in zip(after, before)])
    if kind == P2C:
        lags = [httpx.get(f.url + "/router/workers", timeout=5).json()["view_lag_ms"] for f in fronts]
        lags = [lag for lag in lags if lag]
        if lags:
            result.note = (f"view lag p50 {max(lag['p50'] for lag in lags):.1f} ms, p99 "
                           f"{max(lag['p99'] for lag in lags):.1f} ms (worst of {len(fronts)} replicas)")
    for f in fronts:
        fleet.stop(f)
    _settle(engines)
    return result


def _fmt_s(x: float) -> str:
    return f"{x:.2f}"


# The targets for loadsvc P2C's p99, as a fraction of each other kind's (set for
# --routers 3 --direct 0.3 at 90% of capacity); judged wherever both kinds ran.
TARGETS = ((SMG, 0.6), (ROUND_ROBIN, 0.4), (ORACLE, 1.3))


def judge(group: list[Result]) -> list[tuple[str, float, float, bool]]:
    """(other kind, P2C p99 / its p99, the bound, met) for each target whose kinds are in group."""
    by_kind = {r.router: r for r in group}
    p2c = by_kind.get(P2C)
    out: list[tuple[str, float, float, bool]] = []
    if p2c is None:
        return out
    for kind, bound in TARGETS:
        other = by_kind.get(kind)
        if other is not None and other.latencies and p2c.latencies:
            ratio = p2c.pct(0.99) / other.pct(0.99)
            out.append((kind, ratio, bound, ratio <= bound))
    return out


def judge_repeats(group: list[Result]) -> list[tuple[str, float, list[float], float, bool]]:
    """judge() within each repeat of one load, then the median: (kind, median ratio, the ratios,
    bound, met by the median)."""
    repeats: dict[int, list[Result]] = {}
    for r in group:
        repeats.setdefault(r.repeat, []).append(r)
    ratios: dict[str, list[float]] = {}
    bounds: dict[str, float] = {}
    for rep in sorted(repeats):
        for kind, ratio, bound, _ in judge(repeats[rep]):
            ratios.setdefault(kind, []).append(ratio)
            bounds[kind] = bound
    return [(kind, statistics.median(xs), xs, bounds[kind], statistics.median(xs) <= bounds[kind])
            for kind, xs in ratios.items()]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from loadsvc import __version__
    from loadsvc.bench.shm import machine

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    console = Console(width=max(100, Console().width))
    loads = tuple(args.loads)
    kinds = [k for k in KINDS if k in args.kinds] if args.kinds else list(KINDS)
    for kind, why in ((SMG, smg_available()), (VLLM_ROUTER, vllm_router_available())):
        if why and kind in kinds:
            console.print(f"[yellow]{kind} left out: {why}[/yellow]")
            kinds.remove(kind)
    info = machine()
    console.print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    console.print(f"loadsvc {__version__}; engines: speeds {', '.join(f'{s:g}' for s in SPEEDS)}, "
                  f"max_running_requests {MAX_RUNNING}, step {STEP_MS:g} ms; outputs lognormal median "
                  f"{OUTPUT_MEDIAN} tokens (sigma {OUTPUT_SIGMA}), prompts median {PROMPT_MEDIAN}; "
                  f"{args.requests} requests per run, seed {args.seed}; {args.routers} replica(s) of "
                  f"each router kind (the oracle: one), {args.direct:.0%} of the trace straight to "
                  f"the engines")
    started = time.monotonic()
    results: list[Result] = []
    plan = direct_plan(args.requests, args.direct, len(SPEEDS), args.seed)
    with Fleet() as fleet:
        engines = [fleet.engine(speeds=(s,), max_running_requests=MAX_RUNNING, step_ms=STEP_MS,
                                batch_knee=BATCH_KNEE,
                                max_total_tokens=MAX_RUNNING * (OUTPUT_MAX + PROMPT_MAX), wait=False)
                   for s in SPEEDS]
        fleet.wait(*engines, timeout=60)
        per_engine = asyncio.run(_calibrate(engines, args.seed))
        capacity = sum(per_engine)
        _settle(engines)
        console.print(f"capacity: {capacity:.1f} requests/s in all (per engine "
                      f"{', '.join(f'{c:.1f}' for c in per_engine)}), measured saturating each engine "
                      f"for {CALIBRATE_S:g} s")
        setup = Setup(engines, args.routers, plan, args.seed)
        for load in loads:
            trace = make_trace(load * capacity, args.requests, args.seed)
            for rep in range(args.repeats):
                # each repeat starts one kind later: a machine busy for a while hurts no kind alone
                order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
                for kind in order:
                    console.print(f"  {kind} at {load:.0%} of capacity ({trace.rate:.1f} req/s)"
                                  + (f", repeat {rep + 1} of {args.repeats}" if args.repeats > 1 else "")
                                  + " ...")
                    result = _run_one(fleet, kind, trace, setup)
                    result.repeat = rep
                    results.append(result)

    many = args.repeats > 1
    table = Table(title=f"Routing quality: time to completion of the same open-loop trace "
                        f"({args.routers} router(s) per kind, {args.direct:.0%} direct"
                        + (f"; medians of {args.repeats} repeats" if many else "") + ")")
    for col, just in (("load", "right"), ("arrivals/s", "right"), ("router", "left"), ("p50 s", "right"),
                      ("p99 s", "right"), ("mean s", "right"), ("done/s", "right"),
                      ("share % (slow last)", "left"), ("errors", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    by_rate: dict[float, list[Result]] = {}
    for r in results:
        by_rate.setdefault(r.rate, []).append(r)
    for load, (rate, group) in zip(loads, by_rate.items()):
        rows = []
        for kind in kinds:
            runs = [r for r in group if r.router == kind]
            share = [sum(col) for col in zip(*(r.share for r in runs))]
            rows.append((kind, _median([r.pct(0.5) for r in runs]), _median([r.pct(0.99) for r in runs]),
                         _median([sum(r.latencies) / max(1, len(r.latencies)) for r in runs]),
                         _median([r.rps for r in runs]), share, sum(r.errors for r in runs)))
        best = min(row[2] for row in rows if row[0] != ORACLE)
        for kind, p50, p99, mean, rps, share, errors in rows:
            text = _fmt_s(p99)
            total = sum(share) or 1
            table.add_row(f"{load:.0%}", f"{rate:.1f}", kind, _fmt_s(p50),
                          f"[bold]{text}[/bold]" if p99 == best and kind != ORACLE else text,
                          _fmt_s(mean), f"{rps:.1f}", "/".join(f"{100 * s / total:.0f}" for s in share),
                          str(errors))
        table.add_section()
    console.print(table)
    for r in results:
        if r.note:
            console.print(f"{r.router} at {r.rate:.1f} req/s" + (f", repeat {r.repeat + 1}" if many else "")
                          + f": {r.note}")
    setting = "" if (args.routers, args.direct) == (3, 0.3) else \
        f" (set for --routers 3 --direct 0.3; this run: --routers {args.routers} --direct {args.direct:g})"
    console.print(f"targets for loadsvc P2C's p99{setting}"
                  + (", median of the ratios within each repeat" if many else "") + ":")
    for load, (rate, group) in zip(loads, by_rate.items()):
        for kind, ratio, ratios, bound, met in judge_repeats(group):
            verdict = "[green]met[/green]" if met else "[red]NOT met[/red]"
            each = f" (each repeat: {', '.join(f'{x:.2f}' for x in ratios)})" if many else ""
            console.print(f"  at {load:.0%} ({rate:.1f} req/s): {ratio:.2f}x {kind}'s{each} "
                          f"(target <= {bound:g}x): {verdict}")
    console.print(f"load average after the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"took {time.monotonic() - started:.0f} s")
    return 0
