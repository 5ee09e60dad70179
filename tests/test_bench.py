"""`loadsvc bench shm` runs end to end and prints its table (no timing assertions)."""

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
    for header in ("metric", "loadsvc", "baseline", "ratio", "target", "met?"):
        assert header in out, header
    rows = {
        "publish, uncontended (µs)": ">= 1.5x",
        "read_all, nothing changed (µs)": ">= 5x",
        "read_all, every rank changed (µs)": ">= 1x",
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
