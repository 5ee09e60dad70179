"""loadsvc/tools/simulate.py: the dynamics in-process, the `loadsvc simulate` process over a real region."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from loadsvc import ShmReader, default_path
from loadsvc.tools.simulate import EngineProfile, EngineSimulator, sections_for

SECTION_NAMES = ("memory", "speculative", "lora", "disaggregation", "queues")


@pytest.fixture
def region() -> Path:
    path = default_path(f"test-simulate-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    yield path
    path.unlink(missing_ok=True)


def simulate(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "loadsvc", "simulate", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_published(path: Path, ranks: list[int], timeout: float = 10.0) -> ShmReader:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                reader = ShmReader(path)
            except Exception:  # header still being linked in; retry
                reader = None
            if reader is not None:
                seqs = reader.sequences()
                if all(seqs[r] > 0 for r in ranks):
                    return reader
                reader.close()
        time.sleep(0.02)
    raise AssertionError(f"ranks {ranks} never published into {path}")


def check_invariants(snap) -> None:
    assert snap.token_usage == snap.num_used_tokens / snap.max_total_num_tokens
    assert snap.num_total_reqs == snap.num_running_reqs + snap.num_waiting_reqs
    assert 0 <= snap.num_running_reqs <= snap.max_running_requests
    assert 0 <= snap.num_used_tokens <= snap.max_total_num_tokens
    assert snap.num_total_tokens >= snap.num_used_tokens
    assert 0.0 <= snap.cache_hit_rate <= 1.0
    assert 0.0 <= snap.utilization <= 1.0
    assert snap.gen_throughput >= 0.0
    assert snap.num_waiting_uncached_tokens >= 0
    if snap.num_waiting_reqs == 0:
        assert snap.num_waiting_uncached_tokens == 0
        assert snap.num_total_tokens == snap.num_used_tokens
    else:
        assert snap.num_total_tokens > snap.num_used_tokens


def check_sections(snap) -> None:
    expected = sections_for(snap.dp_rank)
    present = {name for name in SECTION_NAMES if getattr(snap, name) is not None}
    assert present == expected, snap.dp_rank


# -- dynamics, in-process ----------------------------------------------------------


def test_sections_rule():
    assert sections_for(0) == {"memory", "queues", "lora"}
    assert sections_for(1) == {"memory", "queues", "speculative"}
    assert sections_for(2) == {"memory", "queues", "disaggregation"}
    assert sections_for(3) == {"memory", "queues", "speculative", "disaggregation"}
    assert sections_for(5) == {"memory", "queues", "speculative"}


def test_dynamics_invariants_and_movement():
    for rank in range(4):
        sim = EngineSimulator(rank, random.Random(100 + rank))
        seen = []
        for _ in range(1200):  # a simulated minute at 20 Hz
            snap = sim.step(0.05)
            check_invariants(snap)
            check_sections(snap)
            assert snap.dp_rank == rank
            seen.append(snap)
        assert max(s.num_running_reqs for s in seen) > 10
        assert len({s.num_used_tokens for s in seen}) > 100  # moves, not a constant
        assert len({s.num_running_reqs for s in seen}) > 10
        late = seen[-200:]
        assert min(s.gen_throughput for s in late) > 100.0  # a busy rank decodes
        assert max(s.cache_hit_rate for s in late) > 0.05
        assert max(s.token_usage for s in late) > 0.05


def test_sections_values():
    sims = [EngineSimulator(r, random.Random(r)) for r in range(4)]
    for _ in range(400):
        snaps = [s.step(0.05) for s in sims]
    assert snaps[0].lora.slots_total == 8 and 0 < snaps[0].lora.slots_used <= 8
    assert snaps[0].lora.utilization == snaps[0].lora.slots_used / 8
    assert snaps[1].speculative.accept_length >= 1.0
    assert 0.0 <= snaps[1].speculative.accept_rate <= 1.0
    assert snaps[2].disaggregation.mode == "prefill"
    assert snaps[3].disaggregation.mode == "decode"
    for s in snaps:
        assert s.memory.token_capacity == s.max_total_num_tokens
        assert s.memory.kv_cache_gb > 0
        assert s.queues.waiting == s.num_waiting_reqs


def test_queue_builds_under_overload_and_drains():
    profile = EngineProfile(max_running_requests=32, max_total_num_tokens=100_000, load=2.0)
    sim = EngineSimulator(0, random.Random(3), profile)
    for _ in range(400):  # 20 s at twice the capacity
        snap = sim.step(0.05)
        check_invariants(snap)
    assert snap.num_running_reqs == 32  # the cap holds
    assert snap.num_waiting_reqs > 50
    assert snap.num_waiting_uncached_tokens > 0
    built = snap.num_waiting_reqs
    sim.base_rate = 0.0  # traffic stops: the queue drains, then the batch empties
    drained_at = None
    for i in range(4000):
        snap = sim.step(0.05)
        check_invariants(snap)
        if drained_at is None and snap.num_waiting_reqs == 0:
            drained_at = i
        if snap.num_running_reqs == 0:
            break
    assert drained_at is not None, f"queue of {built} never drained"
    assert snap.num_running_reqs == 0 and snap.num_used_tokens == 0
    assert snap.num_total_tokens == 0


def test_same_seed_same_snapshots():
    a = EngineSimulator(1, random.Random(42))
    b = EngineSimulator(1, random.Random(42))
    for _ in range(200):
        assert a.step(0.05) == b.step(0.05)


# -- the process ---------------------------------------------------------------------


@pytest.mark.integration
def test_publishes_at_rate_then_stops_on_sigterm(region):
    proc = simulate("--shm", str(region), "--dp-size", "4", "--rate", "50", "--seed", "7")
    try:
        reader = wait_published(region, [0, 1, 2, 3])
        snaps_before = reader.read_all()
        before, t0 = reader.sequences(), time.monotonic()
        time.sleep(2.0)  # it skips the ticks a stall costs: two seconds let a stall of 0.8 s pass
        after, t1 = reader.sequences(), time.monotonic()
        for rank in range(4):
            rate = (after[rank] - before[rank]) / (t1 - t0)
            assert 30 <= rate <= 70, f"rank {rank} published at {rate:.1f}/s, expected ~50"
        snaps = reader.read_all()
        assert [s.dp_rank for s in snaps] == [0, 1, 2, 3]
        for s in snaps:
            check_invariants(s)
            check_sections(s)
        # the load moves between reads
        assert [s.num_used_tokens for s in snaps] != [s.num_used_tokens for s in snaps_before]
        reader.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        assert "stopped by SIGTERM" in err
        assert f"into region {region}" in err and "ranks 0-3 of dp_size 4" in err
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration
def test_ranks_subset_and_duration(region):
    start = time.monotonic()
    proc = simulate("--shm", str(region), "--dp-size", "4", "--ranks", "1,3", "--rate", "40",
                    "--duration", "1")
    try:
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - start < 8
    with ShmReader(region) as reader:
        seqs = reader.sequences()
        assert seqs[0] == 0 and seqs[2] == 0
        for rank in (1, 3):
            assert 30 <= seqs[rank] <= 45, seqs  # 40 Hz for one second (tick 0 included)
        assert [s.dp_rank for s in reader.read_all()] == [1, 3]


@pytest.mark.integration
def test_stops_on_sigint(region):
    proc = simulate("--shm", str(region), "--dp-size", "2")
    try:
        wait_published(region, [0, 1]).close()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped by SIGINT" in err


@pytest.mark.parametrize("args, message", [
    (["--dp-size", "4", "--ranks", "2-4"], "--ranks 4 is outside --dp-size 4"),
    (["--dp-size", "2", "--rate", "0"], "expected a number > 0"),
    (["--dp-size", "2", "--ranks", "x"], "ranks must look like"),
])
@pytest.mark.integration
def test_bad_flags_exit_2(region, args, message):
    proc = simulate("--shm", str(region), *args)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert message in err
    assert "Traceback" not in err
    assert not region.exists()


@pytest.mark.integration
def test_rank_already_published_is_a_clear_error(region):
    first = simulate("--shm", str(region), "--dp-size", "2", "--ranks", "0")
    try:
        wait_published(region, [0]).close()
        second = simulate("--shm", str(region), "--dp-size", "2", "--ranks", "0")
        _, err = second.communicate(timeout=10)
        assert second.returncode == 1
        assert "already published by another live process" in err and "Traceback" not in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=5)


@pytest.mark.integration
def test_publishes_through_the_zmq_relay(region):
    from conftest import free_port, start_serve

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = start_serve(region, dp_size=4, args=["--collect", endpoint])
    proc = simulate("--zmq", endpoint, "--dp-size", "4", "--ranks", "2-3", "--rate", "20")
    try:
        reader = wait_published(region, [2, 3], timeout=20)
        before = reader.sequences()
        time.sleep(0.5)
        after = reader.sequences()
        assert after[0] == after[1] == 0
        assert after[2] > before[2] and after[3] > before[3]
        snaps = reader.read_all()
        assert [s.dp_rank for s in snaps] == [2, 3]
        for s in snaps:
            check_invariants(s)
            check_sections(s)
        reader.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        assert f"into collector {endpoint}" in err
    finally:
        proc.kill()
        proc.wait()
        server.close()
