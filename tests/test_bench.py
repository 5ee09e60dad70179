"""`loadsvc bench shm` and `bench grpc` run end to end and print their tables (no timing assertions)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from loadsvc import default_path


def test_bench_shm_prints_the_table() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "loadsvc", "bench", "shm", "--seconds", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "120"})
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "8 ranks, 3 reader processes" in out
    assert re.search(r"machine: cpu .+; nproc \d+; python 3\.\d+", out), out
    assert "read_all's changed-rank loop: C (loadsvc._shmfast)" in out, out
    for header in ("metric", "loadsvc", "baseline", "ratio", "target", "met?"):
        assert header in out, header
    rows = {
        "publish, uncontended (µs)": ">= 1.5x",
        "read_all, nothing changed (µs)": ">= 5x",
        "read_all, every rank changed (µs)": ">= 1x",
        "read_all, every rank changed, Python loop (µs)": None,  # the same without loadsvc._shmfast
        "publish p50, 3 readers (µs)": None,
        "publish p99, 3 readers (µs)": ">= 100x",
        "publish max, 3 readers (µs)": None,
    }
    for name, target in rows.items():
        line = next((ln for ln in out.splitlines() if name in ln), None)
        assert line is not None, f"no row {name!r} in:\n{out}"
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        assert cells[0] == name
        assert re.fullmatch(r"[\d,]+(\.\d+)?", cells[1]) and re.fullmatch(r"[\d,]+(\.\d+)?", cells[2]), cells
        assert re.fullmatch(r"[\d,]+(\.\d\d)?x", cells[3]), cells
        if target:
            assert cells[4] == target and cells[5] in ("yes", "no"), cells
    assert ("all four targets met" in out) or ("not every target met" in out)
    # The bench removes its region files.
    leftovers = list(default_path().parent.glob(f"loadsvc-bench-*{proc.pid}-*"))
    assert leftovers == []


def test_bench_grpc_runs_one_process_and_workers() -> None:
    """A short `loadsvc bench grpc`: both servers measured, every subscriber reaches the final state."""
    proc = subprocess.Popen([sys.executable, "-m", "loadsvc", "bench", "grpc", "--subscribers", "20",
                             "--seconds", "1", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "160"})
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err
    assert "judged: --grpc-workers 2" in out and "1 process" in out and "2 workers" in out, out

    def cells(name: str) -> list[str]:
        line = next((ln for ln in out.splitlines() if name in ln), None)
        assert line is not None, f"no row {name!r} in:\n{out}"
        return [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]

    reached = cells("subscribers ending on the final state")
    assert reached[1].startswith("20/20 (seq ") and reached[2].startswith("20/20 (seq "), reached
    assert cells("WatchLoads stream errors")[1:3] == ["0", "0"]
    assert cells("GetLoads errors, polling")[1:3] == ["0", "0"]
    assert cells("serve exit code after SIGTERM")[1:3] == ["0", "0"]
    p99 = cells("GetLoads p99, 32 callers polling")
    assert all(re.fullmatch(r"\d+\.\d{3} ms", c) for c in p99[1:3]), p99
    assert re.fullmatch(r"\d+\.\d{3} ms", p99[3]), p99  # the floor, polled in turn
    assert p99[-1] in ("met", "not met") and cells("publish-to-delivery p99")[-1] in ("met", "not met")
    each = cells("GetLoads p99, polling, each run")
    assert all(re.fullmatch(r"\d+\.\d\d / \d+\.\d\d / \d+\.\d\d", c) for c in each[1:4]), each
    assert re.fullmatch(r"\d+\.\d\dx", cells("judged server / floor")[1]), cells("judged server / floor")
    assert list(default_path().parent.glob(f"loadsvc-bench-grpc-{proc.pid}-*")) == []
