"""loadsvc/bench/routing.py: the trace is reproducible, and a tiny run prints the table and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loadsvc.bench.routing import make_trace
from loadsvc.tools.fleet import smg_available


def test_trace_is_fixed_by_its_seed_and_open_loop_at_its_rate() -> None:
    a, b = make_trace(20.0, 2000, seed=5), make_trace(20.0, 2000, seed=5)
    assert a == b and make_trace(20.0, 2000, seed=6) != a
    gaps = [y.at - x.at for x, y in zip(a.requests, a.requests[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20.0, rel=0.1)  # Poisson at 20/s
    outputs = sorted(r.max_new for r in a.requests)
    assert 40 <= outputs[len(outputs) // 2] <= 56  # lognormal, median 48
    assert outputs[-1] > 2 * outputs[len(outputs) // 2]  # with a long tail


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_bench_routing_runs_every_router_and_prints_the_table() -> None:
    result = subprocess.run([sys.executable, "-m", "loadsvc", "bench", "routing", "--requests", "30",
                             "--loads", "0.5"], capture_output=True, text=True, timeout=170,
                            env={**os.environ, "COLUMNS": "140"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "capacity:" in out and "Routing quality" in out
    routers = ["round robin", "loadsvc P2C"] + ([] if smg_available() else ["smg power_of_two"])
    for name in routers:
        assert name in out
    assert "Traceback" not in result.stderr
