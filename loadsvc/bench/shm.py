"""`loadsvc bench shm`: the shared-memory region against a flock baseline, in one run.

    phase                      what is timed (perf_counter_ns)
    uncontended publish        publish in a loop, one process
    read_all, nothing changed  read_all in a loop, one process
    read_all, all changed      publish every rank (not timed), then one read_all;
                               also with the Python loop (ShmReader(native=False)),
                               for comparison, when loadsvc.core._shmfast is built
    contended publish          a writer process publishes every 0.5 ms for --seconds,
                               timing each publish, while --readers processes call
                               read_all in a loop; loadsvc first, then the baseline,
                               same reader count

Uncontended figures are medians over repeats: of the mean per call for publish
and unchanged read_all (loops of many calls), of the median per call for
read_all after every rank changed (each call timed alone between publishes).
The designs alternate within a repeat, so both see the same machine.

The baseline models the reference design: one file with a fixed 16 KiB slot per
rank. Publish takes an exclusive flock on the whole file, writes a
length-prefixed msgpack MAP of the snapshot into the slot and zero-fills the
rest of the slot; read takes a shared flock and decodes every slot every time.
Its payload is exactly ``msgspec.msgpack.encode(loadsvc.core.schema.to_dict(snap))``
(checked at start-up), produced by encoding a dict-keyed Struct with the same
fields, and decoded into that Struct: both several times faster than going
through dicts, so the baseline is not flattered.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import platform
import secrets
import statistics
import struct
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from loadsvc.core.region import ShmPublisher, ShmReader, default_path, native_read_loop
from loadsvc.core.schema import LoadSnapshot, MemoryMetrics, QueueMetrics, to_dict

__all__ = ["run", "Baseline"]

SLOT_BYTES = 16 * 1024
_LEN = struct.Struct("<I")
REPEATS = 7
UNCONTENDED_CALLS = 20_000
ALL_CHANGED_ROUNDS = 2_000
VARIANTS = 64
PUBLISH_INTERVAL = 0.0005  # seconds between publishes in the contended phase

# Targets: loadsvc must be at least this many times better (baseline / loadsvc).
TARGET_CONTENDED_P99 = 100.0
TARGET_READ_UNCHANGED = 5.0
TARGET_READ_ALL_CHANGED = 1.0
TARGET_PUBLISH = 1.5


# --- the baseline -----------------------------------------------------------------------

_MAP_STRUCTS: dict[type, type] = {}


def _map_struct(cls: type) -> type:
    """A dict-keyed (msgpack map) twin of a derived, array-like Struct."""
    if cls in _MAP_STRUCTS:
        return _MAP_STRUCTS[cls]
    fields = []
    for f in msgspec.structs.fields(cls):
        ty = f.type
        if typing.get_origin(ty) in (typing.Union, types.UnionType):  # section | None
            (section,) = [a for a in typing.get_args(ty) if a is not type(None)]
            ty = _map_struct(section) | None
        fields.append((f.name, ty, f.default))
    out = msgspec.defstruct(f"Map{cls.__name__}", fields, kw_only=True, gc=False)
    _MAP_STRUCTS[cls] = out
    return out


MapSnapshot: Any = _map_struct(LoadSnapshot)


def to_map_struct(snap: Any) -> Any:
    """The baseline's form of a snapshot; its encoding equals encode(to_dict(snap))."""
    payload = msgspec.msgpack.encode(to_dict(snap))
    out = msgspec.msgpack.decode(payload, type=MapSnapshot)
    if msgspec.msgpack.encode(out) != payload:
        raise AssertionError("baseline payload differs from msgpack of to_dict(snapshot)")
    return out


class Baseline:
    """The reference design: flock around every write and read, every slot decoded every read."""

    def __init__(self, path: Path, ranks: int, *, create: bool = False) -> None:
        self.path = path
        self.ranks = ranks
        self.fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        if create:
            os.ftruncate(self.fd, ranks * SLOT_BYTES)
        import mmap

        self.mm = mmap.mmap(self.fd, ranks * SLOT_BYTES)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(MapSnapshot).decode
        self._zeros = memoryview(bytes(SLOT_BYTES))

    def publish(self, rank: int, snap: Any) -> None:
        payload = self._encode(snap)
        size = len(payload)
        if size + _LEN.size > SLOT_BYTES:
            raise ValueError(f"snapshot encodes to {size} bytes, more than a {SLOT_BYTES}-byte slot")
        off = rank * SLOT_BYTES
        start = off + _LEN.size
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            mm = self.mm
            _LEN.pack_into(mm, off, size)
            mm[start:start + size] = payload
            mm[start + size:off + SLOT_BYTES] = self._zeros[:SLOT_BYTES - _LEN.size - size]
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def read_all(self) -> list[Any]:
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        try:
            mm, decode, out = self.mm, self._decode, []
            for rank in range(self.ranks):
                off = rank * SLOT_BYTES
                (size,) = _LEN.unpack_from(mm, off)
                if size:
                    out.append(decode(mm[off + _LEN.size:off + _LEN.size + size]))
            return out
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


# --- workload ---------------------------------------------------------------------------


def snapshot(rank: int, i: int = 0) -> Any:
    """A realistic snapshot: the core fields plus the memory and queue sections."""
    running, waiting = 12 + i % 7, 3 + i % 5
    used = 40_960 + 16 * (i % 1000)
    return LoadSnapshot(
        dp_rank=rank, num_running_reqs=running, num_waiting_reqs=waiting,
        num_total_reqs=running + waiting, num_used_tokens=used, max_total_num_tokens=200_000,
        token_usage=used / 200_000, gen_throughput=1500.0 + i % 100, cache_hit_rate=0.4,
        utilization=0.7, max_running_requests=256, num_total_tokens=used + 40,
        memory=MemoryMetrics(weight_gb=15.2, kv_cache_gb=40.0, graph_gb=2.5, token_capacity=200_000),
        queues=QueueMetrics(waiting=waiting, grammar=0, paused=0, retracted=0))


def _mean_us(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t0) / calls / 1000.0


def _read_all_changed_us(publish_all: Callable[[], Any], read_all: Callable[[], Any], rounds: int) -> float:
    """Median over rounds of one read_all timed right after every rank published."""
    clock = time.perf_counter_ns
    times = []
    for _ in range(rounds):
        publish_all()
        t0 = clock()
        read_all()
        times.append(clock() - t0)
    return statistics.median(times) / 1000.0


# --- contended phase (child processes) --------------------------------------------------


def _reader_main(design: str, path: str, ranks: int, ready: Any, go: Any, seconds: float,
                 results: Any) -> None:
    if design == "loadsvc":
        reader: Any = ShmReader(path)
    else:
        reader = Baseline(Path(path), ranks)
    read_all = reader.read_all
    ready.put("reader")
    go.wait()
    deadline = time.monotonic() + seconds
    reads = 0
    while True:
        for _ in range(64):
            read_all()
        reads += 64
        if time.monotonic() >= deadline:
            break
    reader.close()
    results.put(("reader", reads))


def _writer_main(design: str, path: str, ranks: int, ready: Any, go: Any, seconds: float,
                 results: Any) -> None:
    snaps = [snapshot(0, i) for i in range(VARIANTS)]
    if design == "loadsvc":
        pub = ShmPublisher(path, dp_size=ranks, dp_rank=0)
        publish: Callable[[Any], Any] = pub.publish
        close = pub.close
    else:
        base = Baseline(Path(path), ranks)
        snaps = [to_map_struct(s) for s in snaps]

        def publish(s: Any) -> None:
            base.publish(0, s)

        close = base.close
    ready.put("writer")
    go.wait()
    clock = time.perf_counter_ns
    lat: list[int] = []
    append = lat.append
    deadline = time.monotonic() + seconds
    i = 0
    # One publish every PUBLISH_INTERVAL (sleeping in between, as an engine does
    # between scheduler steps), so each publish meets the readers afresh. Back
    # to back, a flock writer that got the lock keeps it for a burst of fast
    # publishes and the starvation shows only in the few samples that waited.
    sleep = time.sleep
    while time.monotonic() < deadline:
        s = snaps[i % VARIANTS]
        t0 = clock()
        publish(s)
        append(clock() - t0)
        i += 1
        sleep(PUBLISH_INTERVAL)
    close()
    lat.sort()
    n = len(lat)
    results.put(("writer", {"count": n, "p50": lat[n // 2] / 1000.0,
                            "p99": lat[min(n - 1, (99 * n) // 100)] / 1000.0,
                            "max": lat[-1] / 1000.0}))


def _contended(design: str, path: Path, ranks: int, readers: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    # Readers run a little longer than the writer, so every publish is contended.
    procs = [ctx.Process(target=_reader_main, daemon=True,
                         args=(design, str(path), ranks, ready, go, seconds + 0.3, results))
             for _ in range(readers)]
    procs.append(ctx.Process(target=_writer_main, daemon=True,
                             args=(design, str(path), ranks, ready, go, seconds, results)))
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        go.set()
        writer: dict[str, Any] = {}
        reads = 0
        for _ in procs:
            kind, value = results.get(timeout=seconds + 60)
            if kind == "writer":
                writer = value
            else:
                reads += value
        writer["reads_per_s"] = reads / (seconds + 0.3)
        return writer
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# --- report -----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"cpu": model, "nproc": str(usable), "python": platform.python_version(),
            "kernel": f"{platform.system()} {platform.release()}", "load average": load}


def _fmt(us: float) -> str:
    return f"{us:,.2f}" if us < 100 else f"{us:,.0f}"


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:,.2f}x" if ratio < 10 else f"{ratio:,.0f}x"


def _uncontended(ours_path: Path, base_path: Path, ranks: int) -> dict[str, tuple[float, float]]:
    """Medians over REPEATS of the mean per call, (loadsvc, baseline), for the three in-process rows."""
    pubs = [ShmPublisher(ours_path, dp_size=ranks, dp_rank=r) for r in range(ranks)]
    reader = ShmReader(ours_path)
    python_reader = ShmReader(ours_path, native=False)
    base = Baseline(base_path, ranks, create=True)
    base_reader = Baseline(base_path, ranks)
    try:
        # Different snapshots published in turn: the load changes between
        # publishes, as it does in an engine, and every publish encodes anew.
        snaps = [[snapshot(r, i) for r in range(ranks)] for i in range(VARIANTS)]
        base_snaps = [[to_map_struct(s) for s in row] for row in snaps]
        turn = [0]

        def ours_publish_all() -> None:
            turn[0] += 1
            for p, s in zip(pubs, snaps[turn[0] % VARIANTS]):
                p.publish(s)

        def base_publish_all() -> None:
            turn[0] += 1
            for r, s in enumerate(base_snaps[turn[0] % VARIANTS]):
                base.publish(r, s)

        def ours_publish() -> None:
            turn[0] += 1
            pubs[0].publish(snaps[turn[0] % VARIANTS][0])

        def base_publish() -> None:
            turn[0] += 1
            base.publish(0, base_snaps[turn[0] % VARIANTS][0])

        ours_publish_all()
        base_publish_all()
        if len(reader.read_all()) != ranks or len(base_reader.read_all()) != ranks:
            raise RuntimeError("bench set-up: not every rank reads back")
        if python_reader.read_all() != reader.read_all():
            raise RuntimeError("bench set-up: read_all in C and in Python differ")
        samples: dict[str, list[float]] = {k: [] for k in ("pub", "bpub", "ru", "bru", "rc", "brc", "rcp")}
        for _ in range(REPEATS):
            samples["pub"].append(_mean_us(ours_publish, UNCONTENDED_CALLS))
            samples["bpub"].append(_mean_us(base_publish, UNCONTENDED_CALLS))
            reader.read_all()
            samples["ru"].append(_mean_us(reader.read_all, UNCONTENDED_CALLS))
            samples["bru"].append(_mean_us(base_reader.read_all, UNCONTENDED_CALLS // 10))
            samples["rc"].append(_read_all_changed_us(ours_publish_all, reader.read_all, ALL_CHANGED_ROUNDS))
            samples["brc"].append(_read_all_changed_us(base_publish_all, base_reader.read_all,
                                                       ALL_CHANGED_ROUNDS))
            if reader.native:  # else reader already is the Python loop
                samples["rcp"].append(_read_all_changed_us(ours_publish_all, python_reader.read_all,
                                                           ALL_CHANGED_ROUNDS))
        med = {k: statistics.median(v) for k, v in samples.items() if v}
        out = {"publish, uncontended (µs)": (med["pub"], med["bpub"]),
               "read_all, nothing changed (µs)": (med["ru"], med["bru"]),
               "read_all, every rank changed (µs)": (med["rc"], med["brc"])}
        if reader.native:  # the same row without loadsvc.core._shmfast, for comparison (no target)
            out["read_all, every rank changed, Python loop (µs)"] = (med["rcp"], med["brc"])
        return out
    finally:
        for pub in pubs:
            pub.close()
        reader.close()
        python_reader.close()
        base.close()
        base_reader.close()


def run(args: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    ranks, readers, seconds = args.ranks, args.readers, args.seconds
    console = Console(width=max(100, Console().width))
    info = machine()
    console.print(f"[bold]loadsvc bench shm[/]: {ranks} ranks, {readers} reader processes, "
                  f"{seconds:g} s contended per design")
    console.print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    sample = snapshot(0)
    console.print(f"payload: loadsvc {len(msgspec.msgpack.encode(sample))} B (msgpack array), "
                  f"baseline {len(msgspec.msgpack.encode(to_map_struct(sample)))} B (msgpack map)")
    console.print("read_all's changed-rank loop: " + (
        "C (loadsvc.core._shmfast)" if native_read_loop() else
        "[yellow]Python (loadsvc.core._shmfast was not built: no C compiler at install?)[/]"))

    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    base_dir = default_path().parent
    ours_path = base_dir / f"loadsvc-bench-{tag}.shm"
    base_path = base_dir / f"loadsvc-bench-baseline-{tag}.shm"
    label = f"{readers} readers"
    try:
        with console.status("uncontended phases ..."):
            results = _uncontended(ours_path, base_path, ranks)
        # Ranks 1.. keep their last publish; the writer process publishes rank 0.
        with console.status(f"contended publish, loadsvc ({seconds:g} s) ..."):
            ours = _contended("loadsvc", ours_path, ranks, readers, seconds)
        with console.status(f"contended publish, baseline ({seconds:g} s) ..."):
            theirs = _contended("baseline", base_path, ranks, readers, seconds)
    finally:
        for path in (ours_path, base_path):
            path.unlink(missing_ok=True)
    for stat in ("p50", "p99", "max"):
        results[f"publish {stat}, {label} (µs)"] = (ours[stat], theirs[stat])

    targets = {
        "publish, uncontended (µs)": TARGET_PUBLISH,
        "read_all, nothing changed (µs)": TARGET_READ_UNCHANGED,
        "read_all, every rank changed (µs)": TARGET_READ_ALL_CHANGED,
        f"publish p99, {label} (µs)": TARGET_CONTENDED_P99,
    }
    table = Table(title=f"loadsvc bench shm ({ranks} ranks; ratio = baseline / loadsvc)")
    for col, justify in (("metric", "left"), ("loadsvc", "right"), ("baseline", "right"),
                         ("ratio", "right"), ("target", "right"), ("met?", "center")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    met_all = True
    for name, (ours_v, base_v) in results.items():
        ratio = base_v / ours_v if ours_v > 0 else float("inf")
        target = targets.get(name)
        if target is None:
            table.add_row(name, _fmt(ours_v), _fmt(base_v), _fmt_ratio(ratio), "", "")
            continue
        met = ratio >= target
        met_all &= met
        table.add_row(name, _fmt(ours_v), _fmt(base_v), _fmt_ratio(ratio), f">= {target:g}x",
                      "[green]yes[/]" if met else "[red]no[/]")
    table.add_row("publishes during contended phase", f"{ours['count']:,}", f"{theirs['count']:,}",
                  "", "", "")
    table.add_row("reader read_all calls/s (all readers)", f"{ours['reads_per_s']:,.0f}",
                  f"{theirs['reads_per_s']:,.0f}", "", "", "")
    console.print(table)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    console.print(("all four targets met" if met_all else "[red]not every target met[/]")
                  + f" (load average after the run: {load})")
    return 0
