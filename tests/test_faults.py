"""Faults with real processes: what breaks, what notices, what carries on.

    serve SIGKILLed, restarted        publishers never notice; the new server shows every rank at once
    region removed / truncated        serve detaches (/health 503, gRPC NOT_SERVING), stays up,
                                      re-attaches to a new region
    region truncated in a loop        by a local process, with a publisher and a relayed rank:
                                      serve never dies of SIGBUS, answers throughout, recovers
    publisher SIGKILLed mid-write     no torn read: readers keep its last complete publish; rank stale
    /dev/shm full or read-only        a RegionError naming the path and the reason (a small tmpfs)
    two publishers for one rank       the second is refused with a clear error; the first's death
                                      frees the rank
    a foreign writer's NaN / -5       never served: counted corrupt, the last good copy stays; sums
                                      and means of extreme (valid) values stay finite and in range

Truncating a region under a live *publisher* is not survivable by that publisher:
its next store into the mapping past the new end of file raises SIGBUS (as for any
mmap). The server never touches the mapping unguarded (reads are SIGBUS-guarded
copies or pread, the collector writes with pwrite) and detaches instead.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import conftest
import grpc
import httpx
import pytest
from conftest import ServeProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadsvc import LoadSnapshot, ShmPublisher, ShmReader
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc
from loadsvc.core.region import RegionError

pytestmark = pytest.mark.integration  # every test here starts, kills or races processes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTHY = pb.LoadStatus.Value("LOAD_STATUS_HEALTHY")
STALE = pb.LoadStatus.Value("LOAD_STATUS_STALE")


# conftest's wait_for, polling every 20 ms.
wait_for = functools.partial(conftest.wait_for, interval=0.02)


class Simulator:
    """`loadsvc simulate` as a subprocess, its output in a temp file."""

    def __init__(self, shm: Path, dp_size: int, ranks: str | None = None, rate: float = 50,
                 extra: tuple[str, ...] = ()) -> None:
        fd, name = tempfile.mkstemp(prefix="loadsvc-sim-", suffix=".log")
        self.log_path = Path(name)
        self._log = os.fdopen(fd, "wb")
        cmd = [sys.executable, "-m", "loadsvc", "simulate", "--shm", str(shm), "--dp-size", str(dp_size),
               "--rate", str(rate), "--seed", "7", *extra]
        if ranks is not None:
            cmd += ["--ranks", ranks]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        return self.proc.returncode

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        finally:
            self._log.close()
            self.log_path.unlink(missing_ok=True)


@pytest.fixture
def simulator() -> Iterator[Callable[..., Simulator]]:
    started: list[Simulator] = []

    def start(*args: Any, **kwargs: Any) -> Simulator:
        sim = Simulator(*args, **kwargs)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.close()


def published(shm: Path, ranks: int) -> list[int] | None:
    """Every rank's sequence word once all of them have published, else None."""
    try:
        with ShmReader(shm) as reader:
            seqs = reader.sequences()
    except RegionError:
        return None
    return seqs if len(seqs) == ranks and all(seqs) else None


def get_loads(server: ServeProcess, **request: Any) -> Any:
    with grpc.insecure_channel(server.grpc_target) as ch:
        return pb_grpc.LoadServiceStub(ch).GetLoads(pb.GetLoadsRequest(**request), timeout=5)


def grpc_health(server: ServeProcess) -> int:
    with grpc.insecure_channel(server.grpc_target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def rest_health(server: ServeProcess) -> httpx.Response:
    return httpx.get(f"{server.http_url}/health", timeout=5)


def assert_detached(server: ServeProcess, reason: str) -> None:
    """/health 503 naming why, gRPC health NOT_SERVING, no ranks; the process is still up."""
    wait_for(lambda: rest_health(server).status_code == 503, 10, "/health to turn 503")
    body = rest_health(server).json()
    assert body["status"] == "unavailable" and reason in body["reason"], body
    assert str(server.shm) in body["reason"], body
    assert grpc_health(server) == NOT_SERVING
    assert get_loads(server).dp_rank_count == 0
    assert server.proc.poll() is None, server.log()


def assert_all_healthy(server: ServeProcess, ranks: int) -> Any:
    resp = get_loads(server)
    assert resp.dp_rank_count == ranks
    assert [x.dp_rank for x in resp.loads] == list(range(ranks))
    assert all(x.status == HEALTHY for x in resp.loads), resp
    return resp


# -- serve killed and restarted ---------------------------------------------------------


def test_serve_sigkill_and_restart_while_publishing(shm_path: Path, serve_process: Any,
                                                    simulator: Any) -> None:
    sim = simulator(shm_path, 4)
    wait_for(lambda: published(shm_path, 4), 20, "the simulator to publish every rank")
    server = serve_process(shm_path)
    assert_all_healthy(server, 4)

    before = published(shm_path, 4)
    server.proc.kill()  # SIGKILL: no shutdown, no cleanup
    assert server.proc.wait(10) == -signal.SIGKILL
    time.sleep(0.5)
    during = published(shm_path, 4)
    assert all(b < d for b, d in zip(before, during)), (before, during)  # publishing went on

    again = serve_process(shm_path, grpc_port=server.grpc_port, http_port=server.http_port)
    # The first answer of the new process already has every rank, healthy (no warm-up).
    first = assert_all_healthy(again, 4)
    assert all(x.seq >= d for x, d in zip(first.loads, during))
    body = httpx.get(f"{again.http_url}/v1/loads", timeout=5).json()
    assert [(x["dp_rank"], x["status"]) for x in body["loads"]] == [(r, "healthy") for r in range(4)]
    assert grpc_health(again) == SERVING

    after = published(shm_path, 4)
    assert all(d < a for d, a in zip(during, after))
    assert sim.proc.poll() is None, sim.log()  # never noticed
    assert sim.stop() == 0
    assert "Traceback" not in sim.log() and "ERROR" not in sim.log(), sim.log()
    assert again.stop() == 0


# -- the region removed or truncated under the server -------------------------------------------


def test_region_removed_under_serve_and_a_reader(shm_path: Path, serve_process: Any, simulator: Any) -> None:
    sim = simulator(shm_path, 2)
    wait_for(lambda: published(shm_path, 2), 20, "the simulator to publish")
    server = serve_process(shm_path)
    assert_all_healthy(server, 2)
    reader = ShmReader(shm_path)

    shm_path.unlink()
    assert_detached(server, "no region file")
    # A reader holding the mapping still reads the old (now nameless) file safely and can tell.
    assert reader.region_replaced() and reader.mapping_intact()
    assert len(reader.read_all()) == 2
    reader.close()
    with pytest.raises(RegionError, match="no region file"):
        ShmReader(shm_path)
    assert sim.proc.poll() is None  # the publisher writes into the removed file, unaware

    # A restarted publisher creates a new region; the server attaches to it by itself.
    assert sim.stop() == 0
    simulator(shm_path, 2)
    wait_for(lambda: grpc_health(server) == SERVING, 10, "gRPC health SERVING again")
    wait_for(lambda: rest_health(server).status_code == 200, 10, "/health 200 again")
    wait_for(lambda: len(get_loads(server).loads) == 2, 10, "both ranks again")
    assert_all_healthy(server, 2)
    assert "Traceback" not in server.log()
    assert server.stop() == 0


def test_region_truncated_under_serve_and_a_reader(shm_path: Path, serve_process: Any,
                                                   simulator: Any) -> None:
    sim = simulator(shm_path, 4)
    wait_for(lambda: published(shm_path, 4), 20, "the simulator to publish")
    server = serve_process(shm_path)
    assert_all_healthy(server, 4)
    assert sim.stop() == 0  # a live publisher would die of SIGBUS (see the module docstring)
    reader = ShmReader(shm_path)
    full_size = shm_path.stat().st_size

    os.truncate(shm_path, 100)
    assert_detached(server, "")
    assert "truncated" in server.log()
    assert not reader.mapping_intact()  # what a long-running reader checks before reading
    reader.close()
    with pytest.raises(RegionError, match="smaller than the 256-byte header") as err:
        ShmReader(shm_path)
    assert str(shm_path) in str(err.value)
    wait_for(lambda: "smaller than the 256-byte header" in (rest_health(server).json()["reason"] or ""),
             10, "/health to give the reader's reason")

    # Grown back to its size: the header (first 48 bytes) survived, every slot reads as zeros,
    # so it is a valid region again, with no rank published. The server re-attaches by itself.
    os.truncate(shm_path, full_size)
    wait_for(lambda: grpc_health(server) == SERVING, 10, "gRPC health SERVING after the file grew back")
    assert rest_health(server).status_code == 200
    resp = get_loads(server)
    assert resp.dp_rank_count == 4 and not resp.loads

    # Publishers restarted on it: the ranks come back.
    simulator(shm_path, 4)
    wait_for(lambda: grpc_health(server) == SERVING, 10, "gRPC health SERVING again")
    wait_for(lambda: len(get_loads(server).loads) == 4, 10, "every rank again")
    assert_all_healthy(server, 4)
    assert server.proc.poll() is None and "Traceback" not in server.log()
    assert server.stop() == 0


def test_region_truncated_under_serve_with_collector(shm_path: Path, serve_process: Any) -> None:
    """The collector writes into the region inside serve: a truncation must not SIGBUS serve."""
    from conftest import free_port

    from loadsvc import ZmqPublisher

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = serve_process(shm_path, dp_size=2, args=["--collect", endpoint])
    full_size = shm_path.stat().st_size
    with ZmqPublisher(endpoint, dp_size=2, dp_rank=1) as pub:
        def push(k: int) -> None:
            pub.publish(LoadSnapshot(dp_rank=1, num_running_reqs=k))

        wait_for(lambda: push(1) or [s.num_running_reqs for s in get_loads(server).loads] == [1], 15,
                 "the relayed rank on node 0")
        os.truncate(shm_path, 100)
        deadline = time.monotonic() + 1.5
        k = 2
        while time.monotonic() < deadline:  # frames keep arriving while the file is short
            push(k)
            k += 1
            time.sleep(0.01)
        assert server.proc.poll() is None, server.log()  # alive: no SIGBUS
        assert_detached(server, "")
        assert "truncated" in server.log()

        os.truncate(shm_path, full_size)  # a valid (empty) region again: relaying resumes
        wait_for(lambda: grpc_health(server) == SERVING, 10, "gRPC health SERVING after the file grew back")
        wait_for(lambda: push(1000) or [s.num_running_reqs for s in get_loads(server).loads] == [1000], 15,
                 "the relayed rank after the region came back")
    assert server.proc.poll() is None and "Traceback" not in server.log()
    assert server.stop() == 0


# A local process that may write the region (same user, or its group with --group-readable)
# truncates it in a loop: ftruncate(0), ftruncate(size), and every other cycle the saved
# contents back, so serve sees a valid region come and go. Bounded in cycles and seconds;
# leaves a valid region behind.
_TRUNCATE_LOOP = textwrap.dedent("""
    import os, sys, time
    path, seconds, cycles = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    saved = os.pread(fd, size, 0)
    deadline = time.monotonic() + seconds
    done = 0
    while done < cycles and time.monotonic() < deadline:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        if done % 2:
            os.pwrite(fd, saved, 0)
        done += 1
    os.pwrite(fd, saved, 0)
    print(done, flush=True)
""")


def test_serve_survives_a_process_truncating_the_region_in_a_loop(shm_path: Path, serve_process: Any,
                                                                  simulator: Any) -> None:
    from conftest import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = serve_process(shm_path, dp_size=4, args=["--collect", endpoint])
    local = simulator(shm_path, 4, ranks="0-1")
    remote = subprocess.Popen([sys.executable, "-m", "loadsvc", "simulate", "--zmq", endpoint,
                               "--dp-size", "4", "--ranks", "3", "--rate", "100", "--seed", "7",
                               "--duration", "120"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: [x.dp_rank for x in get_loads(server).loads] == [0, 1, 3], 20,
                 "ranks 0, 1 (local) and 3 (relayed)")
        attacker = subprocess.Popen([sys.executable, "-c", _TRUNCATE_LOOP, str(shm_path), "5", "5000000"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        answers: dict[str, set[Any]] = {"rest": set(), "grpc_health": set(), "get_loads": set()}
        while attacker.poll() is None:  # serve answers on both surfaces all along
            answers["rest"].add(rest_health(server).status_code)
            answers["grpc_health"].add(grpc_health(server))
            answers["get_loads"].add(get_loads(server).dp_rank_count)
            time.sleep(0.05)
        out, err = attacker.communicate(timeout=30)
        assert attacker.returncode == 0, err.decode()
        assert int(out) > 0
        assert server.proc.poll() is None, server.log()  # alive: no SIGBUS
        assert answers["rest"] <= {200, 503} and answers["grpc_health"] <= {SERVING, NOT_SERVING}, answers
        assert answers["get_loads"] <= {0, 4}, answers

        metrics = httpx.get(f"{server.http_url}/metrics", timeout=5).text
        detached = [line for line in metrics.splitlines()
                    if line.startswith("loadsvc_region_detached_total") and 'reason="truncated"' in line]
        assert len(detached) == 1 and float(detached[0].split()[-1]) >= 1, detached

        # The local publisher may have died of SIGBUS (an engine writes through the mapping);
        # restarted, it and the relayed rank are served again, without restarting serve.
        local.close()
        simulator(shm_path, 4, ranks="0-1")
        wait_for(lambda: grpc_health(server) == SERVING, 30, "gRPC health SERVING after the attack")
        wait_for(lambda: [(x.dp_rank, x.status) for x in get_loads(server).loads]
                 == [(0, HEALTHY), (1, HEALTHY), (3, HEALTHY)], 30, "ranks 0, 1, 3 healthy again")
        assert rest_health(server).status_code == 200
        assert remote.poll() is None  # the relayed publisher never noticed
    finally:
        remote.kill()
        remote.wait()
    log = server.log()
    assert "Traceback" not in log and "ValueError" not in log, log
    # One line per LOG_EVERY (10 s) however often the file flipped in those 5 s.
    assert 1 <= log.count("truncated under the server; detaching") <= 2, log
    assert server.stop() == 0


# -- a publisher killed in the middle of a publish -------------------------------------------

_MID_WRITE_CHILD = textwrap.dedent("""
    import os, signal, sys
    from loadsvc import LoadSnapshot, ShmPublisher
    pub = ShmPublisher(sys.argv[1], dp_size=2, dp_rank=1)
    for k in range(1, 6):
        pub.publish(LoadSnapshot(dp_rank=1, num_running_reqs=k, num_waiting_reqs=k, num_used_tokens=k))

    class DiesHalfway:  # the payload copy: half of it lands, then the process is killed
        def __init__(self, mm):
            self.mm = mm

        def __setitem__(self, where, payload):
            half = len(payload) // 2
            self.mm[where.start:where.start + half] = payload[:half]
            os.kill(os.getpid(), signal.SIGKILL)

    pub._mm = DiesHalfway(pub._mm)
    pub.publish(LoadSnapshot(dp_rank=1, num_running_reqs=666, num_waiting_reqs=666, num_used_tokens=666))
""")

_LOOP_CHILD = textwrap.dedent("""
    import sys
    from loadsvc import LoadSnapshot, ShmPublisher

    pub = ShmPublisher(sys.argv[1], dp_size=2, dp_rank=0)
    k = pub.seq
    print("ready", flush=True)
    while True:
        k += 1
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=k % 1000, num_waiting_reqs=k % 1000,
                                 num_total_reqs=2 * (k % 1000), num_used_tokens=k, token_usage=k / 1e9))
""")


def test_publisher_killed_mid_write(shm_path: Path, serve_process: Any) -> None:
    server = serve_process(shm_path, dp_size=2, args=["--stale-after", "0.5"])
    child = subprocess.run([sys.executable, "-c", _MID_WRITE_CHILD, str(shm_path)], capture_output=True,
                           timeout=30)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()

    with ShmReader(shm_path) as reader:
        assert reader.sequences() == [0, 5]  # publish 6 never completed
        snap = reader.read(1)
        assert (snap.seq, snap.num_running_reqs, snap.num_waiting_reqs, snap.num_used_tokens) == (5, 5, 5, 5)
        # It really died mid-write: publish 6's buffer is marked "being written" (2n + 1).
        region = reader._region
        base = region.buffer_offset(1, 6)
        assert region.q[base // 8] == 2 * 6 + 1
        assert reader.unavailable == 0

    load = get_loads(server, dp_rank=1).loads[0]
    assert (load.seq, load.num_running_reqs) == (5, 5)
    wait_for(lambda: get_loads(server, dp_rank=1).loads[0].status == STALE, 5, "rank 1 to turn stale")
    assert get_loads(server, dp_rank=1).loads[0].num_running_reqs == 5

    # The kernel dropped the dead owner's lock: a restarted engine takes the rank over.
    with ShmPublisher(shm_path, dp_size=2, dp_rank=1) as pub:
        assert pub.publish(LoadSnapshot(dp_rank=1, num_running_reqs=7)) == 6
        wait_for(lambda: get_loads(server, dp_rank=1).loads[0].status == HEALTHY, 5, "healthy again")
        assert get_loads(server, dp_rank=1).loads[0].num_running_reqs == 7
    assert server.stop() == 0


def test_publisher_killed_at_random_moments_never_tears(shm_path: Path) -> None:
    import random

    rng = random.Random(5)
    reader = None
    try:
        for _ in range(8):
            child = subprocess.Popen([sys.executable, "-c", _LOOP_CHILD, str(shm_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert child.stdout.readline() == b"ready\n", child.stderr.read().decode()
            time.sleep(rng.uniform(0.01, 0.1))
            child.kill()
            assert child.wait(10) == -signal.SIGKILL
            child.stdout.close()
            child.stderr.close()
            reader = reader or ShmReader(shm_path)
            for r in (reader, ShmReader(shm_path)):
                snap = r.read(0)
                assert snap is not None
                k = snap.num_used_tokens
                assert (snap.num_running_reqs, snap.num_waiting_reqs, snap.num_total_reqs) == \
                    (k % 1000, k % 1000, 2 * (k % 1000)), snap  # one publish, not a mix of two
                assert snap.seq == r.sequences()[0]
    finally:
        if reader is not None:
            reader.close()


# -- /dev/shm full or read-only ---------------------------------------------------------------------


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 64 KiB tmpfs mounted in a temp dir (root only; skipped where mount is not permitted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="loadsvc-tmpfs-"))
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "loadsvc-test", str(mnt)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def test_region_on_a_full_tmpfs(small_tmpfs: Path, serve_process: Any) -> None:
    big = small_tmpfs / "loadsvc-big.shm"  # 64 ranks need ~270 KiB: more than there is
    with pytest.raises(RegionError) as err:
        ShmPublisher(big, dp_size=64, dp_rank=0)
    message = str(err.value)
    assert str(big) in message and "No space left on device" in message, message
    assert sorted(small_tmpfs.iterdir()) == []  # no half-made file, no temp file left behind

    sim = subprocess.run([sys.executable, "-m", "loadsvc", "simulate", "--shm", str(big), "--dp-size", "64",
                          "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert sim.returncode == 1
    assert str(big) in sim.stderr and "No space left on device" in sim.stderr, sim.stderr
    assert "Traceback" not in sim.stderr

    server = serve_process(big, dp_size=64)  # serve keeps running and says why it has no region
    body = rest_health(server).json()
    assert rest_health(server).status_code == 503
    assert str(big) in body["reason"] and "No space left on device" in body["reason"], body
    assert grpc_health(server) == NOT_SERVING
    assert "No space left on device" in server.log()
    assert server.stop() == 0

    fits = small_tmpfs / "loadsvc-small.shm"  # 2 ranks fit
    with ShmPublisher(fits, dp_size=2, dp_rank=0) as pub:
        pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=1))
        filler = small_tmpfs / "filler"  # fill the rest: what exists keeps working
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert pub.publish(LoadSnapshot(dp_rank=0, num_running_reqs=2)) == 2
        with ShmReader(fits) as reader:
            assert reader.read(0).num_running_reqs == 2
        with pytest.raises(RegionError, match="No space left on device"):
            ShmPublisher(small_tmpfs / "loadsvc-another.shm", dp_size=1, dp_rank=0)


def test_region_on_a_read_only_tmpfs(small_tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    path = small_tmpfs / "loadsvc-ro.shm"
    with pytest.raises(RegionError) as err:
        ShmPublisher(path, dp_size=2, dp_rank=0)
    assert str(path) in str(err.value) and "Read-only file system" in str(err.value), str(err.value)
    sim = subprocess.run([sys.executable, "-m", "loadsvc", "simulate", "--shm", str(path), "--dp-size", "2",
                          "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert sim.returncode == 1 and str(path) in sim.stderr and "Read-only" in sim.stderr, sim.stderr


# -- two publishers for one rank ---------------------------------------------------------------------


def test_two_publishers_for_one_rank_across_processes(shm_path: Path, simulator: Any) -> None:
    first = simulator(shm_path, 2, ranks="0")
    wait_for(lambda: shm_path.exists() and ShmReader(shm_path).sequences()[0] > 0, 20, "rank 0 published")

    second = subprocess.run([sys.executable, "-m", "loadsvc", "simulate", "--shm", str(shm_path),
                             "--dp-size", "2", "--ranks", "0", "--duration", "1"],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"{shm_path}: dp_rank 0 is already published by another live process" in second.stderr, \
        second.stderr
    assert "Traceback" not in second.stderr
    with pytest.raises(RegionError, match="dp_rank 0 is already published by another live process"):
        ShmPublisher(shm_path, dp_size=2, dp_rank=0)
    with ShmPublisher(shm_path, dp_size=2, dp_rank=1) as other:  # another rank is fine
        other.publish(LoadSnapshot(dp_rank=1))

    first.proc.kill()
    first.proc.wait(10)
    with ShmReader(shm_path) as reader:
        last = reader.sequences()[0]
    with ShmPublisher(shm_path, dp_size=2, dp_rank=0) as taker:  # the dead owner's rank is free
        assert taker.publish(LoadSnapshot(dp_rank=0, num_running_reqs=3)) == last + 1


# -- values that must never be served ------------------------------------------------------------


def _numbers(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every leaf of a decoded JSON body (None included: it must not be there)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")
    elif not isinstance(value, str):
        yield where, value


def test_a_foreign_writers_bad_values_are_never_served(shm_path: Path, serve_process: Any) -> None:
    """A raw writer (valid checksum) puts NaN, inf and -5 in rank 0; ranks 1-2 publish extreme but
    valid values. REST JSON, Prometheus, gRPC and ORCA carry only finite, non-negative numbers."""
    import asyncio
    import math

    import msgspec
    from xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport
    from xds.service.orca.v3.orca_pb2 import OrcaLoadReportRequest

    from loadsvc.surfaces.orca import ORCA_SERVICE

    big = 2**31 - 1
    pubs = [ShmPublisher(shm_path, dp_size=3, dp_rank=r) for r in range(3)]
    try:
        pubs[0].publish(LoadSnapshot(dp_rank=0, num_running_reqs=7, token_usage=0.5, gen_throughput=100.0))
        for r in (1, 2):  # their totals overflow int32 and their sum overflows a double
            pubs[r].publish(LoadSnapshot(dp_rank=r, num_running_reqs=big, num_waiting_reqs=big,
                                         num_total_reqs=big, gen_throughput=1.5e308, token_usage=1e308))
        server = serve_process(shm_path, args=["--stale-after", "60", "--unreachable-after", "120"])
        wait_for(lambda: len(get_loads(server).loads) == 3, 10, "three ranks on gRPC")
        bad = LoadSnapshot(dp_rank=0, num_running_reqs=7, token_usage=0.5, gen_throughput=100.0)
        bad.token_usage, bad.gen_throughput, bad.num_waiting_reqs = math.nan, math.inf, -5
        conftest.forge_publish(shm_path, 0, 2, msgspec.msgpack.encode(bad))
        corrupt = f'loadsvc_shm_reader_corrupt_total{{region="{shm_path}"}}'
        wait_for(lambda: any(line.startswith(corrupt) and float(line.split()[-1]) >= 1
                             for line in httpx.get(f"{server.http_url}/metrics", timeout=5).text.splitlines()),
                 10, "the forged publish to be counted as corrupt")

        body = httpx.get(f"{server.http_url}/v1/loads", timeout=5).json()
        assert [(x["dp_rank"], x["seq"], x["num_running_reqs"]) for x in body["loads"]] == \
            [(0, 1, 7), (1, 1, big), (2, 1, big)]
        for where, value in _numbers(body):
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (where, value)
        agg = body["aggregate"]
        assert agg["total_running_reqs"] == agg["total_waiting_reqs"] == agg["total_reqs"] == big
        assert agg["avg_throughput"] == pytest.approx(100.0 / 3 + 2 * (1.5e308 / 3), rel=1e-9)

        text = httpx.get(f"{server.http_url}/v1/loads?format=prometheus", timeout=5).text
        assert "NaN" not in text and "Inf" not in text and "-" not in "".join(
            line.rsplit(" ", 1)[-1] for line in text.splitlines() if not line.startswith("#"))

        resp = get_loads(server)  # gRPC: encodes (an int32 total past 2**31 - 1 would fail here)
        assert [(x.dp_rank, x.seq) for x in resp.loads] == [(0, 1), (1, 1), (2, 1)]
        assert resp.loads[0].token_usage == 0.5 and resp.loads[0].gen_throughput == 100.0
        assert resp.aggregate.total_running_reqs == big and math.isfinite(resp.aggregate.avg_token_usage)

        async def first_report() -> Any:
            async with grpc.aio.insecure_channel(server.grpc_target) as ch:
                stream = ch.unary_stream(f"/{ORCA_SERVICE}/StreamCoreMetrics",
                                         request_serializer=OrcaLoadReportRequest.SerializeToString,
                                         response_deserializer=OrcaLoadReport.FromString)
                call = stream(OrcaLoadReportRequest())
                report = await asyncio.wait_for(call.read(), 10)
                call.cancel()
                return report

        report = asyncio.run(first_report())
        numbers = [report.application_utilization, report.cpu_utilization, report.mem_utilization,
                   report.rps_fractional, *report.utilization.values(), *report.named_metrics.values()]
        assert all(math.isfinite(v) and v >= 0 for v in numbers), report
        assert report.named_metrics["ranks_healthy"] == 3 and report.rps_fractional > 1e300

        pubs[0].publish(LoadSnapshot(dp_rank=0, num_running_reqs=8))  # its own next publish: served
        wait_for(lambda: get_loads(server).loads[0].num_running_reqs == 8, 10, "rank 0's next publish")
    finally:
        for pub in pubs:
            pub.close()
