"""The shared-memory region (loadsvc/core/region.py), with real processes and real /dev/shm files.

    basics            publish / read / read_all, sequences, publish times, modes, default_path
    reader cache      an unchanged read_all is the same list; one decode per (rank, seq)
    stress            4 writer processes, 3 reader processes checking an invariant on every
                      snapshot they read: zero violations
    SIGKILL           a writer killed mid-stream: other ranks move on, its rank keeps its
                      last good snapshot and turns stale; a new publisher takes over
    paused writer     state 2n+1 in the idle buffer: readers still return publish n
    corrupt buffers   bad checksum, garbage payload, another rank's payload: never returned
    creation race     8 processes creating or attaching one path at once
    truncated         a file shrinking under a reader: RegionError, never SIGBUS, also while
                      another process truncates it in a loop (opening and reading)
    errors            every RegionError / ValueError path, naming the file and what differs

Writers put the sequence number they publish into `num_total_tokens`, and derive
every other field (sections included) from it, so a reader can check a snapshot
on its own: a torn or mixed-up read cannot pass.
"""

from __future__ import annotations

import gc
import mmap
import multiprocessing as mp
import os
import shutil
import signal
import struct
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from loadsvc import (
    DisaggregationMetrics,
    LoadSnapshot,
    MemoryMetrics,
    QueueMetrics,
    RegionError,
    ShmPublisher,
    ShmReader,
    Status,
    default_path,
    freshness,
)
from loadsvc.core import region as shm
from loadsvc.core.region import create_region

SPAWN = mp.get_context("spawn")


@pytest.fixture
def region() -> Iterator[Path]:
    """A unique region path under /dev/shm (or the temp dir); removed afterwards."""
    path = default_path(f"test-{uuid.uuid4().hex}")
    yield path
    path.unlink(missing_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink()


@pytest.fixture(params=["native", "python"])
def native(request: pytest.FixtureRequest) -> bool:
    """Both read_all loops: loadsvc.core._shmfast (C) and the Python one (ShmReader(native=False))."""
    return bool(request.param == "native")


# --- snapshots that can be checked on their own ------------------------------------------


def checkable(rank: int, k: int) -> Any:
    """The snapshot a writer publishes as its k-th publish (k = the sequence it gets)."""
    running, waiting = k % 97, (k * 7) % 89
    max_tokens = 100_000 + rank
    used = (k * 13) % max_tokens
    return LoadSnapshot(
        dp_rank=rank, num_running_reqs=running, num_waiting_reqs=waiting,
        num_total_reqs=running + waiting, num_used_tokens=used, max_total_num_tokens=max_tokens,
        token_usage=used / max_tokens, gen_throughput=k * 0.5, num_total_tokens=k,
        memory=MemoryMetrics(weight_gb=k / 8, token_capacity=k % 2**31),
        queues=QueueMetrics(waiting=waiting, grammar=k % 5, paused=k % 3, retracted=k % 2),
        # Present on odd k only, with a length that varies: payload sizes move around.
        disaggregation=DisaggregationMetrics(mode="x" * (k % 40), decode_transfer_queue_reqs=k % 40)
        if k % 2 else None)


def violation(snap: Any, rank: int) -> str | None:
    """Why snap cannot be rank's checkable() snapshot with its own seq, or None."""
    k = snap.num_total_tokens
    max_tokens = 100_000 + rank
    used = (k * 13) % max_tokens
    running, waiting = k % 97, (k * 7) % 89
    checks = {
        "dp_rank": snap.dp_rank == rank,
        "seq": snap.seq == k and k > 0,
        "publish_time_ns": snap.publish_time_ns > 0,
        "running": snap.num_running_reqs == running,
        "waiting": snap.num_waiting_reqs == waiting,
        "total": snap.num_total_reqs == snap.num_running_reqs + snap.num_waiting_reqs,
        "max_tokens": snap.max_total_num_tokens == max_tokens,
        "used": snap.num_used_tokens == used,
        "token_usage": snap.token_usage == snap.num_used_tokens / snap.max_total_num_tokens,
        "throughput": snap.gen_throughput == k * 0.5,
        "memory": snap.memory == MemoryMetrics(weight_gb=k / 8, token_capacity=k % 2**31),
        "queues": snap.queues == QueueMetrics(waiting=waiting, grammar=k % 5, paused=k % 3,
                                              retracted=k % 2),
        "disaggregation": (snap.disaggregation is None) if k % 2 == 0 else (
            snap.disaggregation is not None and len(snap.disaggregation.mode) == k % 40
            and snap.disaggregation.decode_transfer_queue_reqs == k % 40),
        "status": snap.status is Status.UNSPECIFIED and snap.speculative is None,
    }
    bad = [name for name, ok in checks.items() if not ok]
    return f"rank {rank} seq {snap.seq}: {', '.join(bad)} wrong ({snap!r})" if bad else None


# --- raw access to a region, to play a broken writer ---------------------------------------


class Raw:
    """A writable mapping of a region file, addressed by the layout in shm.py's docstring."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR)
        size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, size - size % 8)
        self.q = memoryview(self.mm).cast("Q")
        fields = shm._HEADER.unpack_from(self.mm, 0)
        self.slot_count, self.capacity = fields[4], fields[6]
        self.seq_off, self.slots_off, self.slot_size = shm._layout(self.slot_count, self.capacity)

    def buffer(self, rank: int, n: int) -> int:
        """Offset of the buffer that holds publish n of rank."""
        return self.slots_off + rank * self.slot_size + (n & 1) * (self.slot_size // 2)

    def slot_bytes(self, rank: int) -> bytes:
        start = self.slots_off + rank * self.slot_size
        return self.mm[start:start + self.slot_size]

    def set_seq(self, rank: int, n: int) -> None:
        self.q[self.seq_off // 8 + rank] = n

    def write(self, rank: int, n: int, payload: Any, *, state: int | None = None,
              t: int | None = None, crc: int | None = None, length: int | None = None) -> None:
        """Write publish n of rank the way the publisher does, unless told otherwise.

        payload: a snapshot (encoded with seq n and the publish time, as the
        publisher does) or raw bytes.
        """
        base = self.buffer(rank, n)
        t = time.time_ns() if t is None else t
        if not isinstance(payload, bytes):
            payload = msgspec.msgpack.encode(msgspec.structs.replace(payload, seq=n, publish_time_ns=t))
        if crc is None:
            crc = zlib.crc32(payload, (n * shm._CRC_MUL ^ t) & 0xFFFFFFFF)
        w = base // 8
        self.q[w] = 2 * n + 1
        self.mm[base + shm.BUFFER_HEADER:base + shm.BUFFER_HEADER + len(payload)] = payload
        self.q[w + 1] = t
        self.q[w + 2] = (len(payload) if length is None else length) << 32 | crc
        self.q[w] = 2 * n if state is None else state

    def close(self) -> None:
        self.q.release()
        self.mm.close()
        os.close(self.fd)


# --- basics ------------------------------------------------------------------------------


def test_native_read_loop_is_built() -> None:
    assert shm._native_read_changed is not None, (
        "loadsvc.core._shmfast was not built: `pip install -e .` compiles it when gcc and the Python "
        "headers are there (reinstall to see the compiler's error)")


def test_native_read_loop_rejects_bad_arguments(region: Path) -> None:
    read_changed = shm._native_read_changed
    assert read_changed is not None
    with ShmPublisher(region, dp_size=2, dp_rank=0) as pub, ShmReader(region) as reader:
        pub.publish(checkable(0, 1))
        args = (reader._mm, (1, 0), [None, None], [0, 0], reader._buffers, reader.payload_capacity,
                reader._decode)
        with pytest.raises(ValueError, match="disagree on the rank count"):
            read_changed(args[0], (1, 0, 0), *args[2:])
        with pytest.raises(TypeError, match="seqs must be a tuple"):
            read_changed(args[0], [1, 0], *args[2:])
        with pytest.raises(TypeError, match=r"read_changed\(region, seqs"):
            read_changed(*args[:6])
        cache: list[Any] = [None, None]
        assert read_changed(args[0], args[1], cache, [0, 0], *args[4:]) == []  # rank 0 read, rank 1 unchanged
        assert cache[0].seq == 1 and violation(cache[0], 0) is None and cache[1] is None


def test_publish_read_read_all(region: Path, native: bool) -> None:
    before = time.time_ns()
    with ShmPublisher(region, dp_size=4, dp_rank=2) as p2, \
            ShmPublisher(region, dp_size=4, dp_rank=0) as p0, ShmReader(region, native=native) as reader:
        assert reader.native is native
        assert reader.dp_size == 4 and reader.path == region
        assert reader.read_all() == [] and reader.read(1) is None
        assert p2.seq == 0
        assert p2.publish(checkable(2, 1)) == 1
        assert p0.publish(checkable(0, 1)) == 1
        assert p0.publish(checkable(0, 2)) == 2 and p0.seq == 2
        after = time.time_ns()
        snaps = reader.read_all()
        assert [s.dp_rank for s in snaps] == [0, 2]  # ascending, unpublished ranks left out
        assert [s.seq for s in snaps] == [2, 1]
        for s in snaps:
            assert violation(s, s.dp_rank) is None
            assert before <= s.publish_time_ns <= after
        assert reader.read(1) is None and reader.read(3) is None
        assert reader.read(0) is snaps[0]
        assert reader.sequences() == [2, 0, 1, 0]
        # publish_time_ns given by the caller (the relay passes its receive time)
        assert p2.publish(checkable(2, 2), publish_time_ns=123_456_789) == 2
        assert reader.read(2).publish_time_ns == 123_456_789
        for bad in (4, 5, -1):
            with pytest.raises(IndexError, match=rf"dp_rank {bad} out of range 0\.\.3"):
                reader.read(bad)
        status, age_ms = reader.freshness(reader.read(0))
        assert status is Status.HEALTHY and 0 <= age_ms < 60_000
        assert reader.freshness(None) == (Status.UNREACHABLE, 0.0)
        assert reader.freshness(reader.read(2))[0] is Status.UNREACHABLE  # published in 1970
    assert reader._region is None  # closed by the with block; closing again is harmless
    reader.close()
    p0.close()


def test_publish_leaves_the_callers_snapshot_alone(region: Path) -> None:
    with ShmPublisher(region, dp_size=1, dp_rank=0) as pub, ShmReader(region) as reader:
        snap = checkable(0, 1)
        snap.seq, snap.publish_time_ns = 77, 88
        before = msgspec.structs.replace(snap)
        assert pub.publish(snap, publish_time_ns=1_700_000_000_000_000_000) == 1
        assert snap == before  # the reader, not the publisher, fills in seq and time
        got = reader.read(0)
        assert got is not snap and (got.seq, got.publish_time_ns) == (1, 1_700_000_000_000_000_000)
        too_big = checkable(0, 2)
        too_big.disaggregation = DisaggregationMetrics(mode="x" * 5000)
        with pytest.raises(ValueError):
            pub.publish(too_big)
        assert (too_big.seq, too_big.publish_time_ns) == (0, 0)


def test_a_second_reader_and_a_reopened_publisher_continue(region: Path) -> None:
    with ShmPublisher(region, dp_size=2, dp_rank=1) as pub:
        for k in range(1, 6):
            pub.publish(checkable(1, k))
    with ShmPublisher(region, dp_size=2, dp_rank=1) as pub:
        assert pub.seq == 5  # continues after the previous owner
        assert pub.publish(checkable(1, 6)) == 6
    with ShmReader(region) as reader:
        (snap,) = reader.read_all()
        assert snap.seq == 6 and violation(snap, 1) is None


def test_maybe_publish_every_interval(region: Path) -> None:
    calls = []

    def build() -> Any:
        calls.append(1)
        return checkable(0, len(calls))

    with ShmPublisher(region, dp_size=1, dp_rank=0, interval=3) as pub, ShmReader(region) as reader:
        results = [pub.maybe_publish(build) for _ in range(7)]
        assert results == [False, False, True, False, False, True, False]
        assert len(calls) == 2 and pub.seq == 2
        assert reader.read(0).num_total_tokens == 2
    with pytest.raises(ValueError, match="interval must be >= 1"):
        ShmPublisher(region, dp_size=1, dp_rank=0, interval=0)


def test_file_mode(region: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with ShmPublisher(region, dp_size=2, dp_rank=0):
            assert region.stat().st_mode & 0o777 == 0o600
        shared = default_path(f"test-{uuid.uuid4().hex}")
        os.umask(0o077)  # the umask must not narrow what was asked for
        try:
            with ShmPublisher(shared, dp_size=2, dp_rank=0, mode=0o660):
                assert shared.stat().st_mode & 0o777 == 0o660
            other = tmp_path / "r.shm"
            create_region(other, 3, mode=0o640)
            assert other.stat().st_mode & 0o777 == 0o640
            assert ShmReader(other).dp_size == 3
        finally:
            shared.unlink(missing_ok=True)
    finally:
        os.umask(old)


def test_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path("/dev/shm").is_dir()  # this machine has it
    assert default_path() == Path("/dev/shm/loadsvc-default.shm")
    assert default_path("engine-7") == Path("/dev/shm/loadsvc-engine-7.shm")
    real_path = Path
    monkeypatch.setattr(shm, "Path", lambda p: real_path("/nonexistent-loadsvc-shm")
                        if p == "/dev/shm" else real_path(p))
    assert shm.default_path("x") == real_path(tempfile.gettempdir()) / "loadsvc-x.shm"


def test_freshness_bounds() -> None:
    now = 1_000_000_000_000
    assert freshness(now - 2_000_000_000, now, 3.0, 30.0) == (Status.HEALTHY, 2000.0)
    assert freshness(now - 3_000_000_000, now, 3.0, 30.0) == (Status.HEALTHY, 3000.0)
    assert freshness(now - 3_000_001_000, now, 3.0, 30.0)[0] is Status.STALE
    assert freshness(now - 31_000_000_000, now, 3.0, 30.0) == (Status.UNREACHABLE, 31000.0)
    assert freshness(0, now) == (Status.UNREACHABLE, 0.0)
    assert freshness(now + 5_000_000, now) == (Status.HEALTHY, 0.0)  # another clock, ahead


# --- the reader's cache ------------------------------------------------------------------


def test_unchanged_read_all_returns_the_same_list(region: Path, native: bool) -> None:
    with ShmPublisher(region, dp_size=3, dp_rank=0) as p0, \
            ShmPublisher(region, dp_size=3, dp_rank=1) as p1, ShmReader(region, native=native) as reader:
        p0.publish(checkable(0, 1))
        p1.publish(checkable(1, 1))
        first = reader.read_all()
        assert reader.read_all() is first and reader.read_all() is first
        p1.publish(checkable(1, 2))
        second = reader.read_all()
        assert second is not first
        assert second[0] is first[0]  # rank 0 did not change: same object
        assert second[1].seq == 2 and first[1].seq == 1  # handed-out snapshots never change
        assert reader.read_all() is second


def test_each_change_is_decoded_once(region: Path, native: bool) -> None:
    with ShmPublisher(region, dp_size=3, dp_rank=0) as p0, \
            ShmPublisher(region, dp_size=3, dp_rank=2) as p2, ShmReader(region, native=native) as reader:
        decoded: list[bytes] = []
        real = reader._decode

        def counting(data: Any) -> Any:
            decoded.append(bytes(data))
            return real(data)

        reader._decode = counting
        p0.publish(checkable(0, 1))
        p2.publish(checkable(2, 1))
        for _ in range(3):
            assert [s.seq for s in reader.read_all()] == [1, 1]
        assert reader.read(0).seq == 1 and reader.read(2).seq == 1
        assert len(decoded) == 2
        p2.publish(checkable(2, 2))
        for _ in range(3):
            reader.read_all()
            reader.read(2)
        assert len(decoded) == 3
        p0.publish(checkable(0, 2))  # read() first, then read_all: still one decode
        assert reader.read(0).seq == 2
        assert reader.read_all()[0].seq == 2
        assert len(decoded) == 4
        assert reader.torn_retries == 0 and reader.unavailable == 0 and reader.corrupt == 0


# --- many processes at once -----------------------------------------------------------------


def _stress_writer(path: str, rank: int, dp_size: int, ready: Any, go: Any, stop: Any,
                   seconds: float, limit: int, results: Any, pace: float) -> None:
    pub = ShmPublisher(path, dp_size=dp_size, dp_rank=rank)
    ready.put(rank)
    go.wait(60)
    deadline = time.monotonic() + seconds
    count = 0
    while count < limit and time.monotonic() < deadline and not stop.is_set():
        pub.publish(checkable(rank, pub.seq + 1))
        count += 1
        if pace:
            time.sleep(pace)
    results.put(("writer", rank, pub.seq, count))
    pub.close()


def _stress_reader(path: str, ready: Any, go: Any, seconds: float, results: Any,
                   native: bool = True) -> None:
    reader = ShmReader(path, native=native)
    ready.put("reader")
    go.wait(60)
    last = [0] * reader.dp_size
    distinct = 0
    reads = 0
    problems: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        snaps = reader.read_all()
        reads += 1
        ranks = [s.dp_rank for s in snaps]
        if ranks != sorted(set(ranks)):
            problems.append(f"read_all ranks {ranks}: not ascending and unique")
        for s in snaps:
            rank = s.dp_rank
            if s.seq < last[rank]:
                problems.append(f"rank {rank} went back from seq {last[rank]} to {s.seq}")
            elif s.seq > last[rank]:
                distinct += 1
                last[rank] = s.seq
                why = violation(s, rank)
                if why:
                    problems.append(why)
        if reads % 16 == 0:  # read() goes through the same checks
            rank = reads // 16 % reader.dp_size
            s = reader.read(rank)
            if s is not None and violation(s, rank):
                problems.append(f"read({rank}): {violation(s, rank)}")
    results.put(("reader", distinct, reads, problems[:5], len(problems), reader.torn_retries,
                 reader.unavailable, reader.corrupt, last))
    reader.close()


def _run(procs: list[Any], ready: Any, go: Any) -> None:
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()


def _join(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)


@pytest.mark.integration
def test_stress_writers_and_readers_see_no_torn_snapshot(region: Path) -> None:
    writers, readers, seconds = 4, 3, 3.0
    create_region(region, writers)
    ready, results, go, stop = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event(), SPAWN.Event()
    procs = [SPAWN.Process(target=_stress_writer,
                           args=(str(region), r, writers, ready, go, stop, seconds, 2_000_000, results, 0.0))
             for r in range(writers)]
    # Readers 0 and 2 read_all in C (loadsvc.core._shmfast), reader 1 in Python.
    procs += [SPAWN.Process(target=_stress_reader,
                            args=(str(region), ready, go, seconds + 0.3, results, i % 2 == 0))
              for i in range(readers)]
    _run(procs, ready, go)
    got = [results.get(timeout=seconds + 60) for _ in procs]
    _join(procs)
    final = {r: seq for kind, r, seq, _count in (g for g in got if g[0] == "writer")}
    counts = [g[3] for g in got if g[0] == "writer"]
    assert sorted(final) == list(range(writers))
    assert all(c >= 200 for c in counts), counts
    for _kind, distinct, reads, problems, n_problems, _torn, _unavailable, corrupt, last in \
            (g for g in got if g[0] == "reader"):
        assert n_problems == 0, problems
        assert corrupt == 0
        assert distinct >= 50, (distinct, reads, counts)  # saw many distinct publishes
        assert all(0 < last[r] <= final[r] for r in range(writers)), (last, final)
    # Afterwards every rank reads back at its writer's last sequence.
    with ShmReader(region) as reader:
        snaps = reader.read_all()
        assert [s.seq for s in snaps] == [final[r] for r in range(writers)]
        assert all(violation(s, s.dp_rank) is None for s in snaps)


@pytest.mark.integration
def test_writer_killed_mid_stream(region: Path) -> None:
    dp = 3
    create_region(region, dp)
    ready, results, go, stop = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event(), SPAWN.Event()
    # The victim gets an Event of its own: Event.is_set() takes a lock shared between processes,
    # and a process killed while holding it would block every other user of that Event.
    victim_stop = SPAWN.Event()  # kept referenced until the child has unpickled it
    victim = SPAWN.Process(target=_stress_writer,  # publishes flat out: mostly inside publish()
                           args=(str(region), 1, dp, ready, go, victim_stop, 30.0, 10**9, results, 0.0))
    others = [SPAWN.Process(target=_stress_writer,
                            args=(str(region), r, dp, ready, go, stop, 30.0, 10**9, results, 0.001))
              for r in (0, 2)]
    watcher = SPAWN.Process(target=_stress_reader, args=(str(region), ready, go, 2.5, results))
    procs = [victim, *others, watcher]
    try:
        _run(procs, ready, go)
        reader = ShmReader(region, stale_after=0.3, unreachable_after=10.0)
        deadline = time.monotonic() + 20
        while min(reader.sequences()) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert min(reader.sequences()) >= 50
        with pytest.raises(RegionError, match="already published by another live process"):
            ShmPublisher(region, dp_size=dp, dp_rank=1)
        time.sleep(0.2)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        assert victim.exitcode == -signal.SIGKILL
        killed_at = reader.sequences()
        last = reader.read(1)
        assert last is not None and violation(last, 1) is None

        time.sleep(0.5)  # past stale_after
        seqs = reader.sequences()
        assert seqs[1] == killed_at[1]  # nobody writes rank 1 any more
        assert seqs[0] > killed_at[0] and seqs[2] > killed_at[2]  # the others move on
        snaps = {s.dp_rank: s for s in reader.read_all()}
        assert sorted(snaps) == [0, 1, 2]
        assert snaps[1].seq == killed_at[1] == last.seq  # its last complete publish
        assert violation(snaps[1], 1) is None
        assert reader.freshness(snaps[1])[0] is Status.STALE
        assert reader.freshness(snaps[1])[1] > 300
        assert reader.freshness(snaps[0])[0] is Status.HEALTHY
        assert reader.freshness(snaps[2])[0] is Status.HEALTHY

        # The kernel dropped the dead writer's lock: a new one takes over and continues.
        with ShmPublisher(region, dp_size=dp, dp_rank=1) as successor:
            assert successor.seq == seqs[1]
            n = successor.publish(checkable(1, successor.seq + 1))
            assert n == seqs[1] + 1
            snap = reader.read(1)
            assert snap.seq == n and violation(snap, 1) is None
            assert reader.freshness(snap)[0] is Status.HEALTHY
        reader.close()
    finally:
        stop.set()
    got = [results.get(timeout=60) for _ in range(len(procs) - 1)]  # the victim reports nothing
    _join([*others, watcher])
    (watched,) = [g for g in got if g[0] == "reader"]
    _, distinct, reads, problems, n_problems, _torn, _unavailable, corrupt, _last = watched
    assert n_problems == 0, problems
    assert corrupt == 0 and distinct >= 50


# --- broken writers --------------------------------------------------------------------------


def test_writer_paused_mid_write_does_not_stop_readers(region: Path, native: bool) -> None:
    with ShmPublisher(region, dp_size=2, dp_rank=0) as pub, ShmReader(region, native=native) as warm:
        pub.publish(checkable(0, 1))
        pub.publish(checkable(0, 2))
        assert warm.read(0).seq == 2
        raw = Raw(region)
        try:
            # Publish 3 stalls after its first store and part of its payload: buffer 1
            # (publish 1's) now says "being written" and holds half new bytes.
            base = raw.buffer(0, 3)
            assert base != raw.buffer(0, 2)
            raw.q[base // 8] = 2 * 3 + 1
            raw.mm[base + shm.BUFFER_HEADER:base + shm.BUFFER_HEADER + 40] = b"\xc1" * 40
            for reader in (warm, ShmReader(region, native=native)):
                snaps = reader.read_all()
                assert [s.seq for s in snaps] == [2] and violation(snaps[0], 0) is None
                assert reader.read(0).seq == 2
                assert reader.torn_retries == 0 and reader.unavailable == 0
            # The writer resumes: publish 3 completes and readers move on.
            assert pub.publish(checkable(0, 3)) == 3
            fresh = ShmReader(region, native=native)
            assert warm.read(0).seq == 3 and fresh.read_all()[0].seq == 3
            assert violation(fresh.read(0), 0) is None
            fresh.close()
        finally:
            raw.close()


def test_corrupt_buffers_are_never_returned(region: Path) -> None:
    with ShmPublisher(region, dp_size=2, dp_rank=0) as pub, ShmReader(region) as reader:
        pub.publish(checkable(0, 1))
        assert reader.read(0).seq == 1
        raw = Raw(region)
        try:
            # 1. A publish 2 whose checksum does not match its bytes.
            raw.write(0, 2, checkable(0, 2), crc=12345)
            raw.set_seq(0, 2)
            got = reader.read(0)
            assert got.seq == 1 and violation(got, 0) is None  # the last good one
            assert reader.unavailable == 1 and reader.torn_retries == shm.READ_RETRIES
            assert [s.seq for s in reader.read_all()] == [1]
            assert reader.corrupt == 0
            cold = ShmReader(region)  # never had a good copy: nothing to return
            assert cold.read(0) is None and cold.read_all() == []
            assert cold.unavailable >= 2
            cold.close()

            # 2. Garbage with a valid checksum: decodes to nothing, counted as corrupt.
            raw.write(0, 2, b"\xc1\xc1\xc1 not msgpack")
            assert reader.read(0).seq == 1 and reader.corrupt == 1
            # 3. A valid snapshot of another rank in rank 0's slot.
            raw.write(0, 2, checkable(1, 2))
            assert reader.read(0).seq == 1 and reader.corrupt == 2
            # 4. A length beyond the slot's capacity.
            raw.write(0, 2, checkable(0, 2), length=raw.capacity + 1)
            before = reader.unavailable
            assert reader.read(0).seq == 1 and reader.unavailable == before + 1
            # 5. The payload of publish 2 filed as publish 4 (same buffer, stale bytes):
            #    the checksum is seeded with the sequence, so it cannot pass for 4.
            raw.write(0, 2, checkable(0, 2))
            good = raw.mm[raw.buffer(0, 2):raw.buffer(0, 2) + raw.slot_size // 2]
            raw.q[raw.buffer(0, 4) // 8] = 8  # state says "publish 4 complete"
            raw.set_seq(0, 4)
            assert reader.read(0).seq == 1
            raw.mm[raw.buffer(0, 2):raw.buffer(0, 2) + len(good)] = good
            raw.set_seq(0, 2)
            assert reader.read(0).seq == 2  # intact publish 2 is accepted

            # A real publish afterwards is read normally.
            assert pub.publish(checkable(0, 2)) == 2
            assert pub.publish(checkable(0, 3)) == 3
            assert reader.read(0).seq == 3 and violation(reader.read(0), 0) is None
        finally:
            raw.close()


def test_read_all_never_returns_corrupt_buffers(region: Path, native: bool) -> None:
    """The cases above through read_all (its changed-rank loop, in C or Python), never read() first."""
    with ShmPublisher(region, dp_size=2, dp_rank=0) as pub, \
            ShmPublisher(region, dp_size=2, dp_rank=1) as pub1, ShmReader(region, native=native) as reader:
        pub.publish(checkable(0, 1))
        pub1.publish(checkable(1, 1))
        assert [s.seq for s in reader.read_all()] == [1, 1]
        raw = Raw(region)
        cases = [  # (what, write it, counter that must grow)
            ("bad checksum", lambda: raw.write(0, 2, checkable(0, 2), crc=12345), "unavailable"),
            ("garbage, valid checksum", lambda: raw.write(0, 2, b"\xc1\xc1 not msgpack"), "corrupt"),
            ("another rank's snapshot", lambda: raw.write(0, 2, checkable(1, 2)), "corrupt"),
            ("length past capacity", lambda: raw.write(0, 2, checkable(0, 2), length=raw.capacity + 1),
             "unavailable"),
            ("state odd (being written)", lambda: raw.write(0, 2, checkable(0, 2), state=5), "unavailable"),
        ]
        try:
            for what, damage, counter in cases:
                damage()
                raw.set_seq(0, 2)
                pub1.publish(checkable(1, pub1.seq + 1))  # rank 1 changes too, and is read
                cold = ShmReader(region, native=native)  # never had a good copy of rank 0
                for r, last_good in ((reader, [1]), (cold, [])):
                    before = getattr(r, counter)
                    snaps = r.read_all()
                    assert [s.seq for s in snaps if s.dp_rank == 0] == last_good, what
                    assert [s.seq for s in snaps if s.dp_rank == 1] == [pub1.seq], what
                    assert all(violation(s, s.dp_rank) is None for s in snaps), what
                    assert getattr(r, counter) > before, what
                    before = getattr(r, counter)
                    r.read_all()  # rank 0 is tried again on the next read_all, not taken as read
                    assert getattr(r, counter) > before, what
                cold.close()
            raw.write(0, 2, checkable(0, 2))  # intact at last: read normally
            assert [s.seq for s in reader.read_all()] == [2, pub1.seq]
            assert violation(reader.read_all()[0], 0) is None
        finally:
            raw.close()


@pytest.mark.parametrize("field,value", [("token_usage", float("nan")), ("gen_throughput", float("inf")),
                                         ("num_running_reqs", -5), ("num_running_reqs", 2**31)])
def test_a_foreign_writers_bad_value_is_corrupt_never_served(region: Path, native: bool, field: str,
                                                             value: Any) -> None:
    """A raw writer bypassing ShmPublisher, valid checksum: the value rule makes it a corrupt read."""
    with ShmPublisher(region, dp_size=2, dp_rank=0) as pub, ShmReader(region, native=native) as reader:
        pub.publish(checkable(0, 1))
        assert [s.seq for s in reader.read_all()] == [1]
        bad = checkable(0, 2)
        setattr(bad, field, value)  # Structs do not validate on assignment
        raw = Raw(region)
        try:
            raw.write(0, 2, bad)
            raw.set_seq(0, 2)
            cold = ShmReader(region, native=native)  # never had a good copy of rank 0
            with cold:
                for r, last_good in ((reader, [1]), (cold, [])):
                    snaps = r.read_all()
                    assert [s.seq for s in snaps] == last_good
                    assert r.read(0) is (snaps[0] if snaps else None)
                    assert r.corrupt >= 2 and r.unavailable == 0
            assert violation(reader.read(0), 0) is None
            raw.write(0, 2, checkable(0, 2))  # the same publish, now within the rule: read
            assert [s.seq for s in reader.read_all()] == [2]
        finally:
            raw.close()


# --- creation by many processes at once ------------------------------------------------------


def _creator(paths: list[str], role: str, rank: int, barrier: Any, results: Any) -> None:
    out = []
    for i, path in enumerate(paths):
        barrier.wait(60)
        try:
            if role == "publisher":
                pub = ShmPublisher(path, dp_size=4, dp_rank=rank)
                ino = os.stat(path).st_ino
                pub.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=100 * i + rank))
                barrier.wait(60)  # everyone published
                barrier.wait(60)  # readers done
                pub.close()
                out.append(("ok", ino, None))
            else:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        reader = ShmReader(path)
                        break
                    except RegionError as e:
                        if "no region file" not in str(e) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.0005)
                ino = os.stat(path).st_ino
                dp = reader.dp_size
                barrier.wait(60)
                seen = [(s.dp_rank, s.num_running_reqs) for s in reader.read_all()]
                barrier.wait(60)
                reader.close()
                out.append(("ok", ino, (dp, seen)))
        except Exception as e:  # reported to the test, which fails on it
            out.append(("error", 0, f"{type(e).__name__}: {e}"))
            barrier.abort()
            break
    results.put((role, rank, out))


@pytest.mark.integration
def test_concurrent_creation_is_safe(tmp_path: Path) -> None:
    rounds = 4
    paths = [default_path(f"test-{uuid.uuid4().hex}") for _ in range(rounds)]
    roles = [("publisher", r) for r in range(4)] + [("reader", r) for r in range(4)]
    barrier = SPAWN.Barrier(len(roles))
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=_creator, args=([str(p) for p in paths], role, rank, barrier, results))
             for role, rank in roles]
    try:
        for p in procs:
            p.start()
        got = [results.get(timeout=120) for _ in procs]
        _join(procs)
        for i, path in enumerate(paths):
            outcomes = [(role, rank, out[i]) for role, rank, out in got]
            errors = [o for o in outcomes if o[2][0] != "ok"]
            assert not errors, errors
            assert len({o[2][1] for o in outcomes}) == 1  # one file, same inode for everyone
            expected = [(r, 100 * i + r) for r in range(4)]
            for role, _rank, (_, _ino, info) in outcomes:
                if role == "reader":
                    assert info == (4, expected)
            assert sorted(p.name for p in path.parent.glob(f"*{path.name}*")) == [path.name]
            with ShmReader(path) as reader:
                assert reader.dp_size == 4
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


# --- a file truncated under its readers ----------------------------------------------------
#
# Any process that may write the region file can truncate it at any moment. Reading a
# mapping past the end of its file raises SIGBUS, so each of these runs the reader in a
# child process: without the guard the child dies of SIGBUS (exit code -7) instead of
# reporting what it saw.


def _read_after_truncation(path: str, native: bool, results: Any) -> None:
    outcomes: list[tuple[str, str]] = []

    def attempt(name: str, call: Any) -> None:
        try:
            outcomes.append((name, f"returned {call()!r}"))
        except RegionError as e:
            outcomes.append((name, str(e)))

    with ShmPublisher(path, dp_size=2, dp_rank=0) as p0, ShmPublisher(path, dp_size=2, dp_rank=1) as p1:
        p0.publish(checkable(0, 1))
        p1.publish(checkable(1, 1))
        reader = ShmReader(path, native=native)
        outcomes.append(("before", repr([s.seq for s in reader.read_all()])))
        p1.publish(checkable(1, 2))  # rank 1 changed: its buffer must be read again
        # The sequence words are still in the file, the slots are not.
        os.truncate(path, reader._slots_off)
        attempt("read_all, slots cut", reader.read_all)
        attempt("read(1), slots cut", lambda: reader.read(1))
        os.truncate(path, 0)
        attempt("read_all, empty", reader.read_all)
        attempt("read(0), empty", lambda: reader.read(0))
        attempt("sequences, empty", reader.sequences)
        reader.close()
    results.put(outcomes)


@pytest.mark.integration
def test_reads_of_a_truncated_file_raise_region_error(region: Path, native: bool) -> None:
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_read_after_truncation, args=(str(region), native, results))
    child.start()
    child.join(60)
    assert child.exitcode == 0, f"reader child exited with {child.exitcode} (-7: killed by SIGBUS)"
    outcomes = dict(results.get(timeout=10))
    assert outcomes.pop("before") == "[1, 1]"
    assert list(outcomes) == ["read_all, slots cut", "read(1), slots cut", "read_all, empty",
                              "read(0), empty", "sequences, empty"]
    for name, outcome in outcomes.items():
        assert outcome == (f"{region}: region file truncated under this reader (it shrank below the "
                           "size its header describes); open a new reader once it is valid again"), name


def _truncate_in_a_loop(path: str, cycles: int, seconds: float, stop: Any, results: Any) -> None:
    """ftruncate(0), ftruncate(size), then the saved contents back: a valid region again, briefly."""
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    saved = os.pread(fd, size, 0)
    deadline = time.monotonic() + seconds
    done = 0
    while done < cycles and time.monotonic() < deadline and not stop.is_set():
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        os.pwrite(fd, saved, 0)
        done += 1
    os.close(fd)
    results.put(("attacker", done))


def _open_and_read_while_truncated(path: str, native: bool, seconds: float, results: Any) -> None:
    """Open readers and read until a refusal and a read of both ranks were seen (or seconds pass).

    refused counts RegionErrors, from opening or from reading a reader opened before.
    """
    opened = refused = 0
    seen: set[tuple[int, ...]] = set()
    problems: list[str] = []
    deadline = time.monotonic() + seconds
    while (not refused or (0, 1) not in seen) and time.monotonic() < deadline:
        try:
            reader = ShmReader(path, native=native)
        except RegionError:
            refused += 1
            continue
        opened += 1
        try:
            for _ in range(50):
                snaps = reader.read_all()
                seen.add(tuple(s.dp_rank for s in snaps))
                problems += [why for s in snaps if (why := violation(s, s.dp_rank)) or s.seq != 1]
        except RegionError:
            refused += 1
        except Exception as e:  # anything else is a bug: report it
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            reader.close()
    results.put(("reader", opened, refused, sorted(seen), problems[:5]))


@pytest.mark.integration
def test_open_and_read_race_a_process_truncating_the_file(region: Path, native: bool) -> None:
    with ShmPublisher(region, dp_size=2, dp_rank=0) as p0, ShmPublisher(region, dp_size=2, dp_rank=1) as p1:
        p0.publish(checkable(0, 1))
        p1.publish(checkable(1, 1))
    results, stop = SPAWN.Queue(), SPAWN.Event()
    attacker = SPAWN.Process(target=_truncate_in_a_loop, args=(str(region), 2_000_000, 20.0, stop, results))
    reader = SPAWN.Process(target=_open_and_read_while_truncated, args=(str(region), native, 15.0, results))
    attacker.start()
    reader.start()
    try:
        reader.join(60)
        assert reader.exitcode == 0, f"reader child exited with {reader.exitcode} (-7: killed by SIGBUS)"
        kind, opened, refused, seen, problems = results.get(timeout=10)
        assert kind == "reader"
        assert not problems, problems
        # Both outcomes happened: the race was real. Every intact read returned the
        # published snapshots (or, between ftruncate and the restore, none yet).
        assert opened > 0 and refused > 0, (opened, refused)
        assert (0, 1) in seen and set(seen) <= {(), (0,), (1,), (0, 1)}, seen
    finally:
        stop.set()
        attacker.join(30)
    assert attacker.exitcode == 0
    assert results.get(timeout=10)[0] == "attacker"


# --- every error path ---------------------------------------------------------------------


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _both_fail(path: Path, match: str) -> None:
    """Reader and publisher refuse the file with a RegionError naming it."""
    for attempt in (lambda: ShmReader(path), lambda: ShmPublisher(path, dp_size=4, dp_rank=0)):
        with pytest.raises(RegionError, match=match) as info:
            attempt()
        assert str(path) in str(info.value)


def test_mismatched_dp_size(region: Path) -> None:
    with ShmPublisher(region, dp_size=4, dp_rank=0):
        with pytest.raises(RegionError, match=r"region has dp_size 4, this publisher expects dp_size 8") as e:
            ShmPublisher(region, dp_size=8, dp_rank=5)
        assert str(region) in str(e.value)
        with pytest.raises(RegionError, match=r"region has dp_size 4, expected dp_size 2"):
            create_region(region, 2)
        create_region(region, 4)  # same size: fine
        # The failed attempts left nothing behind: rank 0's owner still publishes.
        assert ShmReader(region).dp_size == 4


def test_bad_magic(region: Path) -> None:
    create_region(region, 4)
    _patch(region, 0, b"NOTLOADS")
    _both_fail(region, r"bad magic b'NOTLOADS', expected b'LOADSVC\\x00'")


def test_wrong_layout_version(region: Path) -> None:
    create_region(region, 4)
    _patch(region, 8, struct.pack("<I", shm.LAYOUT_VERSION + 1))
    _both_fail(region, rf"layout version {shm.LAYOUT_VERSION + 1}, this loadsvc reads version "
                       rf"{shm.LAYOUT_VERSION}")


def test_wrong_fingerprint(region: Path) -> None:
    create_region(region, 4)
    from loadsvc.core import schema

    other = schema.SCHEMA_FINGERPRINT ^ 0xFF
    _patch(region, 16, struct.pack("<Q", other))
    _both_fail(region, rf"schema fingerprint {other:#018x} differs from this loadsvc's "
                       rf"{schema.SCHEMA_FINGERPRINT:#018x}")


def test_corrupt_slot_count(region: Path) -> None:
    create_region(region, 4)
    _patch(region, 24, struct.pack("<I", 0))
    _both_fail(region, "corrupt header .*slot count 0")


def test_truncated_file(region: Path) -> None:
    create_region(region, 4)
    size = region.stat().st_size
    os.truncate(region, size - 4096)
    _both_fail(region, rf"file is {size - 4096} bytes, the header describes {size} \(4 slots\); truncated")


def test_file_smaller_than_header(region: Path) -> None:
    region.write_bytes(b"LOADSVC\x00" + bytes(92))
    _both_fail(region, r"file is 100 bytes, smaller than the 256-byte header")
    region.write_bytes(b"")
    _both_fail(region, r"file is 0 bytes")


def test_missing_file_for_a_reader(region: Path) -> None:
    with pytest.raises(RegionError, match="no region file") as e:
        ShmReader(region)
    assert str(region) in str(e.value)
    assert not region.exists()


def test_oversized_payload_leaves_the_slot_untouched(region: Path) -> None:
    with ShmPublisher(region, dp_size=2, dp_rank=1, payload_capacity=256) as pub, \
            ShmReader(region) as reader:
        assert reader.payload_capacity == 256
        pub.publish(checkable(1, 1))
        raw = Raw(region)
        try:
            before = raw.slot_bytes(1), raw.mm[:]
            big = checkable(1, 2)
            big.disaggregation = DisaggregationMetrics(mode="x" * 300)
            size = len(msgspec.msgpack.encode(big))
            with pytest.raises(ValueError, match=rf"encodes to {size} bytes, more than the slot's "
                                                 rf"payload capacity of 256 bytes") as e:
                pub.publish(big)
            assert str(region) in str(e.value)
            assert raw.slot_bytes(1) == before[0] and raw.mm[:] == before[1]  # nothing written
            assert pub.seq == 1 and reader.read(1).seq == 1
            assert violation(reader.read(1), 1) is None
            assert pub.publish(checkable(1, 2)) == 2 and reader.read(1).seq == 2
        finally:
            raw.close()


def test_wrong_dp_rank_in_snapshot(region: Path) -> None:
    with ShmPublisher(region, dp_size=4, dp_rank=2) as pub:
        pub.publish(checkable(2, 1))
        raw = Raw(region)
        try:
            before = raw.mm[:]
            with pytest.raises(ValueError, match="snapshot.dp_rank=3 but this publisher owns dp_rank 2"):
                pub.publish(checkable(3, 2))
            assert raw.mm[:] == before and pub.seq == 1
        finally:
            raw.close()


def test_a_refused_publisher_closes_its_descriptor_once(region: Path) -> None:
    first = ShmPublisher(region, dp_size=2, dp_rank=0)
    for attempt in (lambda: ShmPublisher(region, dp_size=2, dp_rank=0),   # rank taken
                    lambda: ShmPublisher(region, dp_size=3, dp_rank=0)):  # dp_size differs
        with pytest.raises(RegionError) as info:  # info keeps the refused object alive
            attempt()
        # The refused publisher's descriptor number is free again and goes to the
        # next open; collecting the refused object must not close it a second time.
        r, w = os.pipe()
        del info
        gc.collect()
        try:
            assert os.write(w, b"x") == 1 and os.read(r, 1) == b"x"
        finally:
            for fd in (r, w):
                try:
                    os.close(fd)
                except OSError:
                    pass
    first.close()


def test_dp_rank_out_of_range(region: Path) -> None:
    for rank in (4, -1, 100):
        with pytest.raises(ValueError, match=rf"dp_rank must be in 0\.\.3 for dp_size=4, got {rank}"):
            ShmPublisher(region, dp_size=4, dp_rank=rank)
    assert not region.exists()  # refused before creating anything
    with pytest.raises(ValueError, match="dp_size must be 1..65536"):
        create_region(region, 0)


def _second_publisher(path: str, results: Any) -> None:
    try:
        ShmPublisher(path, dp_size=2, dp_rank=0)
        results.put("no error")
    except RegionError as e:
        results.put(str(e))


@pytest.mark.integration
def test_second_publisher_for_a_rank(region: Path) -> None:
    first = ShmPublisher(region, dp_size=2, dp_rank=0)
    with pytest.raises(RegionError, match="dp_rank 0 already has a publisher in this process") as e:
        ShmPublisher(region, dp_size=2, dp_rank=0)
    assert str(region) in str(e.value)
    # Another rank's publisher, a reader and create_region open and close the same
    # file in this process: none of that may release rank 0 (a POSIX record lock
    # would be gone after the first close).
    with ShmPublisher(region, dp_size=2, dp_rank=1):
        pass
    ShmReader(region).close()
    create_region(region, 2)
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_second_publisher, args=(str(region), results))
    child.start()
    message = results.get(timeout=60)
    child.join(timeout=30)
    assert "dp_rank 0 is already published by another live process" in message
    assert str(region) in message
    first.close()
    with ShmPublisher(region, dp_size=2, dp_rank=0) as again:  # released by close()
        assert again.publish(LoadSnapshot(dp_rank=0)) == 1


def test_unusable_directory(tmp_path: Path) -> None:
    # A directory that does not exist.
    missing = tmp_path / "no-such-dir" / "r.shm"
    with pytest.raises(RegionError, match="cannot create region") as e:
        ShmPublisher(missing, dp_size=2, dp_rank=0)
    assert str(missing) in str(e.value) and "No such file or directory" in str(e.value)
    # A file where the directory should be.
    (tmp_path / "plain-file").write_text("")
    under_file = tmp_path / "plain-file" / "r.shm"
    for attempt in (lambda: ShmPublisher(under_file, dp_size=2, dp_rank=0),
                    lambda: create_region(under_file, 2), lambda: ShmReader(under_file)):
        with pytest.raises(RegionError, match="Not a directory") as e:
            attempt()
        assert str(under_file) in str(e.value)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unwritable_directory_and_unreadable_file() -> None:
    """Permission checks do not apply to root, so a forked child drops to nobody first.

    (pytest's tmp_path sits in a 0700 directory nobody cannot even search, so this
    test makes its own directory in /tmp.)
    """
    top = Path(tempfile.mkdtemp(prefix="loadsvc-test-"))
    try:
        _unwritable_directory_and_unreadable_file(top)
    finally:
        shutil.rmtree(top)


def _unwritable_directory_and_unreadable_file(top: Path) -> None:
    top.chmod(0o755)
    locked = top / "locked"
    locked.mkdir()
    create_region(locked / "root-only.shm", 2)  # mode 0600, owned by root
    locked.chmod(0o555)  # searchable, not writable
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            lines = []
            for attempt in (lambda: ShmPublisher(locked / "new.shm", dp_size=2, dp_rank=0),
                            lambda: ShmPublisher(locked / "root-only.shm", dp_size=2, dp_rank=0),
                            lambda: ShmReader(locked / "root-only.shm")):
                try:
                    attempt()
                    lines.append("no error")
                except RegionError as e:
                    lines.append(f"RegionError: {e}")
                except Exception as e:
                    lines.append(f"{type(e).__name__}: {e}")
            os.write(w, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        lines = f.read().splitlines()
    os.waitpid(pid, 0)
    assert len(lines) == 3, lines
    assert lines[0].startswith("RegionError: cannot create region") and "Permission denied" in lines[0]
    assert str(locked / "new.shm") in lines[0]
    for line in lines[1:]:
        assert line.startswith("RegionError: cannot open region") and "Permission denied" in line
        assert str(locked / "root-only.shm") in line
    assert sorted(p.name for p in locked.iterdir()) == ["root-only.shm"]
