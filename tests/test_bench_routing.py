"""loadsvc/bench/routing.py: the trace and its direct share are reproducible, targets are judged,
and a tiny run with two replicas per kind and a direct share prints the table and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loadsvc.bench.routing import KINDS, Result, direct_plan, judge, judge_repeats, make_trace
from loadsvc.tools.fleet import smg_available, vllm_router_available


def test_trace_is_fixed_by_its_seed_and_open_loop_at_its_rate() -> None:
    a, b = make_trace(20.0, 2000, seed=5), make_trace(20.0, 2000, seed=5)
    assert a == b and make_trace(20.0, 2000, seed=6) != a
    gaps = [y.at - x.at for x, y in zip(a.requests, a.requests[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20.0, rel=0.1)  # Poisson at 20/s
    outputs = sorted(r.max_new for r in a.requests)
    assert 40 <= outputs[len(outputs) // 2] <= 56  # lognormal, median 48
    assert outputs[-1] > 2 * outputs[len(outputs) // 2]  # with a long tail


def test_direct_plan_is_fixed_by_its_seed_and_spread_over_the_engines() -> None:
    plan = direct_plan(1000, 0.3, 4, seed=5)
    assert plan == direct_plan(1000, 0.3, 4, seed=5) and plan != direct_plan(1000, 0.3, 4, seed=6)
    direct = [e for e in plan if e is not None]
    assert len(direct) == 300  # exactly round(F * n) requests bypass the routers
    assert all(50 <= direct.count(e) <= 100 for e in range(4))  # each engine about a quarter
    assert sum(e is not None for e in plan[:500]) in range(110, 191)  # spread over the trace
    assert direct_plan(50, 0.0, 4, seed=1) == (None,) * 50


def test_judge_compares_p2c_p99_with_each_target() -> None:
    def result(kind: str, p99: float) -> Result:
        return Result(kind, 30.0, latencies=[0.1] * 99 + [p99])

    group = [result("round robin", 10.0), result("smg power_of_two", 4.0), result("loadsvc P2C", 2.0),
             result("oracle", 1.8)]
    assert judge(group) == [("smg power_of_two", 0.5, 0.6, True), ("round robin", 0.2, 0.4, True),
                            ("oracle", pytest.approx(2.0 / 1.8), 1.3, True)]
    assert judge(group[:1]) == []  # no P2C row: nothing to judge
    assert [j[3] for j in judge([result("loadsvc P2C", 3.0), result("smg power_of_two", 4.0)])] == [False]


def test_judge_repeats_takes_the_median_of_the_ratios_within_each_repeat() -> None:
    def result(kind: str, p99: float, repeat: int) -> Result:
        return Result(kind, 30.0, latencies=[0.1] * 99 + [p99], repeat=repeat)

    group = [result("loadsvc P2C", 2.0, 0), result("smg power_of_two", 4.0, 0),
             result("loadsvc P2C", 3.0, 1), result("smg power_of_two", 3.0, 1),
             result("loadsvc P2C", 2.0, 2), result("smg power_of_two", 2.5, 2)]
    assert judge_repeats(group) == [("smg power_of_two", 0.8, [0.5, 1.0, 0.8], 0.6, False)]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bench_routing_runs_every_router_and_prints_the_table() -> None:
    result = subprocess.run([sys.executable, "-m", "loadsvc", "bench", "routing", "--requests", "30",
                             "--loads", "0.5", "--routers", "2", "--direct", "0.3"],
                            capture_output=True, text=True, timeout=280, env={**os.environ, "COLUMNS": "160"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "capacity:" in out and "Routing quality" in out and "2 router(s) per kind, 30% direct" in out
    left_out = {"smg power_of_two": smg_available(), "vllm-router power_of_two": vllm_router_available()}
    rows = [line for line in out.splitlines() if line.startswith("│")]
    for kind in KINDS:
        assert any(kind in row for row in rows) == (not left_out.get(kind)), kind
    assert "targets for loadsvc P2C's p99 (set for --routers 3 --direct 0.3" in out
    assert "oracle's (target <= 1.3x)" in out
    assert "Traceback" not in result.stderr
