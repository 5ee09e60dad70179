"""`loadsvc bench grpc`: GetLoads latency and WatchLoads fan-out against a real `loadsvc serve`.

    publisher process --ShmPublisher x 8--> fresh region --> `loadsvc serve` subprocess(es)
                                                               |  free loopback ports
    (a) unary:  32 callers, each on its own connection, GetLoads (8 ranks, every
                section) for --seconds, polling every 50 ms (POLL_REPEATS runs; on
                the judged server each run alternates with one against the floor,
                a bare grpc.aio server returning the same bytes); per-call latency.
                Python callers (CALLER_PROCS processes) also run a closed loop.
    (b) watch:  --subscribers WatchLoads streams over connections of
                STREAMS_PER_CHANNEL streams; rank 0 publishes every 100 ms for
                --seconds; latency = receive time - publish_time_ns in the message
                (same clock)

Both run with Go clients (gocall.py: grpc-go in one process, how a Go router
sees the server) and with Python grpc.aio clients (WATCH_PROCS / CALLER_PROCS
processes), whose own cost on the same two vCPUs is in everything they time.
The targets are judged with the Go clients (the Python ones when Go is missing)
on `loadsvc serve` as it starts by default, one process; the same run measures
--grpc-workers W (default: one per core) to show what workers change.

Every subscriber must end on the last published sequence of rank 0 (a slow
subscriber may skip intermediate states by design; the share delivered is shown).
Targets (docs/benchmarks/grpc.md): GetLoads p99 < 2 ms; WatchLoads p99 < 100 ms and every
subscriber sees the final state.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import queue
import statistics
import subprocess
import tempfile
import time
import uuid
from typing import Any

from loadsvc.bench import (
    cpu_model,
    cpu_seconds,
    free_port,
    gocall,
    percentile,
    process_tree,
    reap,
    stop_process,
    wait_listening,
)
from loadsvc.core.region import default_path
from loadsvc.tools.procs import loadsvc_command

__all__ = ["run"]

RANKS = 8
CALLERS = 32
CALLER_PROCS = 2
WATCH_PROCS = 2
STREAMS_PER_CHANNEL = 10  # 500 subscribers = 50 connections, as from many routers
# Each client channel gets its own connection: channels of one process otherwise
# share one (gRPC's global subchannel pool), and with --grpc-workers the kernel
# spreads connections, not calls, over the servers.
CLIENT_NAME = {"go": "Go callers", "python": "Python callers"}  # grpc-go / grpc.aio
WATCHER_NAME = {"go": "Go subscribers", "python": "Python subscribers"}
CLIENT_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)
PUBLISH_PERIOD = 0.1  # rank 0 changes every 100 ms
WARMUP = 1.0  # seconds of unary calls not counted
SETTLE = 5.0  # seconds subscribers get to reach the final state after the last publish
POLL_PERIOD = 0.05  # s between two GetLoads of one polling caller (a router polling at 20 Hz)
# The polling phase runs this many times per server (each --seconds long); on the
# judged server each run alternates with one against the floor. Rows give medians
# over the runs, and every run's p99 is shown: the machine is shared and noisy.
POLL_REPEATS = 3
TARGET_UNARY_P99_MS = 2.0
TARGET_WATCH_P99_MS = 100.0


# -- helpers ----------------------------------------------------------------------------------


def _snapshot(rank: int, i: int) -> Any:
    from loadsvc.core.schema import LoadSnapshot, MemoryMetrics, QueueMetrics

    return LoadSnapshot(dp_rank=rank, num_running_reqs=10 + i % 50, num_waiting_reqs=i % 7,
                        num_total_reqs=10 + i % 50 + i % 7, num_used_tokens=4096 + i, max_total_num_tokens=200000,
                        token_usage=0.3, gen_throughput=1500.0, cache_hit_rate=0.4, utilization=0.6,
                        max_running_requests=256,
                        memory=MemoryMetrics(weight_gb=15.2, kv_cache_gb=40.0, token_capacity=200000),
                        queues=QueueMetrics(waiting=i % 7))


# -- child processes ------------------------------------------------------------------------------


def _publisher(shm: str, commands: Any, result: Any) -> None:
    """Publish every rank once; then, per ("run", seconds) command, rank 0 every PUBLISH_PERIOD
    for that long, answering ("final", last sequence, publishes in this run); ("quit",) ends it."""
    from loadsvc.core.region import ShmPublisher

    pubs = [ShmPublisher(shm, dp_size=RANKS, dp_rank=r) for r in range(RANKS)]
    for r, pub in enumerate(pubs):
        pub.publish(_snapshot(r, 0))
    result.put(("published", pubs[0].seq))
    i = 0
    while (command := commands.get())[0] == "run":
        next_at = time.monotonic()
        end = next_at + command[1]
        first = pubs[0].seq
        while next_at < end:
            i += 1
            pubs[0].publish(_snapshot(0, i))
            next_at += PUBLISH_PERIOD
            time.sleep(max(0.0, next_at - time.monotonic()))
        result.put(("final", pubs[0].seq, pubs[0].seq - first))
    for pub in pubs:
        pub.close()


def _floor_server(port: int, payload: bytes, ready: Any, stop: Any) -> None:
    """The gRPC-Python floor: a grpc.aio server whose GetLoads returns fixed bytes, nothing else."""
    import grpc

    async def get_loads(request: bytes, context: Any) -> bytes:
        return payload

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.unary_unary_rpc_method_handler(get_loads)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "loadsvc.v1.LoadService", {"GetLoads": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop(0.5)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def _unary_client(target: str, callers: int, seconds: float, result: Any, period: float | None = None) -> None:
    asyncio.run(_unary_main(target, callers, seconds, result, period))


async def _unary_main(target: str, callers: int, seconds: float, result: Any,
                      period: float | None = None) -> None:
    """Closed loop (period None: the next call as soon as the last returns) or polling every period s."""
    import grpc

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
    from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc

    latencies: list[float] = []
    errors = 0
    channels = [grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS) for _ in range(callers)]
    try:
        stubs = [pb_grpc.LoadServiceStub(channel) for channel in channels]
        request = pb.GetLoadsRequest()
        for stub in stubs:
            await stub.GetLoads(request)
        t_start = time.perf_counter()
        t_measure = t_start + WARMUP
        t_end = t_measure + seconds

        async def caller(k: int) -> None:
            nonlocal errors
            stub = stubs[k]
            clock = time.perf_counter
            tick = t_start + (k / callers) * (period or 0.0)  # polling callers spread over one period
            while True:
                if period is not None:
                    tick += period
                    delay = tick - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t0 = clock()
                if t0 >= t_end:
                    return
                try:
                    resp = await stub.GetLoads(request)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                t1 = clock()
                if t0 >= t_measure:
                    latencies.append(t1 - t0)
                if len(resp.loads) != RANKS:
                    errors += 1

        await asyncio.gather(*(caller(k) for k in range(callers)))
    finally:
        for channel in channels:
            await channel.close()
    result.put({"latencies": latencies, "errors": errors, "seconds": seconds})


def _watch_client(target: str, subscribers: int, ready: Any, final: Any, result: Any) -> None:
    asyncio.run(_watch_main(target, subscribers, ready, final, result))


async def _watch_main(target: str, subscribers: int, ready: Any, final: Any, result: Any) -> None:
    import grpc

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
    from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc

    n_channels = max(1, -(-subscribers // STREAMS_PER_CHANNEL))
    channels = [grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS) for _ in range(n_channels)]
    latencies: list[int] = []  # ns, first delivery of each rank-0 sequence to each subscriber
    last_seq = [0] * subscribers
    delivered = [0] * subscribers
    errors: list[str] = []
    started = asyncio.Event()
    first = [0]
    final_seq = [0]
    done = asyncio.Event()

    async def subscriber(k: int) -> None:
        stub = pb_grpc.LoadServiceStub(channels[k % n_channels])
        call = stub.WatchLoads(pb.WatchLoadsRequest())
        try:
            async for raw in call:
                now = time.time_ns()
                load = raw.loads[0]
                if load.seq > last_seq[k]:
                    if last_seq[k]:
                        latencies.append(now - load.publish_time_ns)
                        delivered[k] += 1
                    else:
                        first[0] += 1
                        if first[0] == subscribers:
                            started.set()
                    last_seq[k] = load.seq
                    if final_seq[0] and load.seq >= final_seq[0] and min(last_seq) >= final_seq[0]:
                        done.set()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"{e.code().name}: {e.details()}")

    tasks = [asyncio.ensure_future(subscriber(k)) for k in range(subscribers)]
    await asyncio.wait_for(started.wait(), 60)
    ready.put(os.getpid())
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    t0 = time.monotonic()
    final_seq[0] = await loop.run_in_executor(None, final.get)
    cpu = (time.process_time() - cpu0) / (time.monotonic() - t0)
    if all(s >= final_seq[0] for s in last_seq):
        done.set()
    try:
        await asyncio.wait_for(done.wait(), SETTLE)
    except TimeoutError:
        pass
    reached = sum(1 for s in last_seq if s >= final_seq[0])
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    result.put({"latencies": latencies, "reached": reached, "subscribers": subscribers,
                "delivered": sum(delivered), "errors": errors[:5], "n_errors": len(errors), "cpu": cpu})


# -- the run ----------------------------------------------------------------------------------------


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    cpu = cpu_model()
    import grpc

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, grpcio {grpc.__version__}, server loop {loop}")


def _split(total: int, parts: int) -> list[int]:
    """total spread over parts as evenly as integers allow, empty parts left out."""
    return [n for n in (total // parts + (1 if i < total % parts else 0) for i in range(parts)) if n]


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids) if pids else float("nan")


def _unary_phase(ctx: Any, target: str, seconds: float, cpu_pids: list[int],
                 period: float | None = None) -> dict[str, Any]:
    """CALLERS callers (closed loop, or polling every period s) over CALLER_PROCS processes; merged."""
    results_q = ctx.Queue()
    cpu0 = _cpu(cpu_pids)
    procs = [ctx.Process(target=_unary_client, args=(target, n, seconds, results_q, period), daemon=True)
             for n in _split(CALLERS, CALLER_PROCS)]
    for p in procs:
        p.start()
    try:
        results = [results_q.get(timeout=seconds + 120) for _ in procs]
    finally:
        reap(procs)
    cpu = (_cpu(cpu_pids) - cpu0) / (seconds + WARMUP)
    lat = sorted(x for r in results for x in r["latencies"])
    return {"lat": lat, "errors": sum(r["errors"] for r in results), "rps": len(lat) / seconds, "cpu": cpu}


def _go_phase(binary: Any, target: str, seconds: float, cpu_pids: list[int], period: float) -> dict[str, Any]:
    """CALLERS Go callers polling every period s (one process, a connection each); the same shape as
    _unary_phase. The last response must decode to RANKS ranks, or it counts as an error."""
    from google.protobuf.message import DecodeError

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    cpu0 = _cpu(cpu_pids)
    r = gocall.poll(binary, target, callers=CALLERS, period=period, seconds=seconds, warmup=WARMUP)
    cpu = (_cpu(cpu_pids) - cpu0) / (seconds + WARMUP)
    errors = r["errors"]
    try:
        ranks = len(pb.GetLoadsResponse.FromString(r["last"]).loads)
    except DecodeError:
        ranks = -1
    if ranks != RANKS:
        errors += 1
        r["error_sample"] = f"the last response held {ranks} ranks, not {RANKS}"
    return {"lat": r["lat"], "errors": errors, "rps": len(r["lat"]) / seconds, "cpu": cpu,
            "error_sample": r["error_sample"]}


def _publishing(seconds: float, cpu_pids: list[int], client_pids: list[int], commands: Any,
                pub_result: Any) -> tuple[int, int, float, float]:
    """Rank 0 publishes every PUBLISH_PERIOD for seconds (the publisher process); (its last sequence,
    publishes, CPU share of cpu_pids, CPU share of client_pids) over that time."""
    cpu0, client0 = _cpu(cpu_pids), _cpu(client_pids)
    t0 = time.monotonic()
    commands.put(("run", seconds))
    _, final_seq, published = pub_result.get(timeout=seconds + 30)
    elapsed = time.monotonic() - t0
    return final_seq, published, (_cpu(cpu_pids) - cpu0) / elapsed, (_cpu(client_pids) - client0) / elapsed


def _watch_phase(ctx: Any, target: str, subscribers: int, seconds: float, cpu_pids: list[int],
                 commands: Any, pub_result: Any) -> dict[str, Any]:
    """subscribers WatchLoads streams over WATCH_PROCS processes while rank 0 publishes for seconds."""
    ready_q, watch_q = ctx.Queue(), ctx.Queue()
    share = _split(subscribers, WATCH_PROCS)
    finals = [ctx.Queue() for _ in share]
    watchers = [ctx.Process(target=_watch_client, args=(target, n, ready_q, fq, watch_q), daemon=True)
                for n, fq in zip(share, finals)]
    for p in watchers:
        p.start()
    try:
        for _ in watchers:
            ready_q.get(timeout=120)
        final_seq, published, cpu, _ = _publishing(seconds, cpu_pids, [], commands, pub_result)
        for fq in finals:
            fq.put(final_seq)
        results = [watch_q.get(timeout=SETTLE + 60) for _ in watchers]
    finally:
        reap(watchers)
    return {"lat": sorted(x / 1e6 for r in results for x in r["latencies"]),
            "reached": sum(r["reached"] for r in results), "final_seq": final_seq, "published": published,
            "delivered": sum(r["delivered"] for r in results),
            "n_errors": sum(r["n_errors"] for r in results),
            "errors": [e for r in results for e in r["errors"]],
            "cpu": cpu, "client_cpu": [r["cpu"] for r in results]}


def _go_watch_phase(binary: Any, target: str, subscribers: int, seconds: float, cpu_pids: list[int],
                    commands: Any, pub_result: Any) -> dict[str, Any]:
    """_watch_phase with the subscribers in one Go process (STREAMS_PER_CHANNEL per connection)."""
    watchers = gocall.Watchers(binary, target, subscribers, per_conn=STREAMS_PER_CHANNEL, settle=SETTLE)
    try:
        watchers.wait_ready(120)
        final_seq, published, cpu, client_cpu = _publishing(seconds, cpu_pids, [watchers.proc.pid], commands,
                                                            pub_result)
        r = watchers.finish(final_seq)
    finally:
        watchers.close()
    return {"lat": r["lat"], "reached": r["reached"], "final_seq": final_seq, "published": published,
            "delivered": r["delivered"], "n_errors": r["errors"],
            "errors": [r["error_sample"]] if r["error_sample"] else [], "cpu": cpu, "client_cpu": [client_cpu]}


class _Server:
    """`loadsvc serve` as a subprocess on free ports, with --grpc-workers workers."""

    def __init__(self, shm: str, workers: int) -> None:
        self.workers = workers
        self.grpc_port, http_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [*loadsvc_command("--log-level", "INFO"), "serve", "--shm", shm,
             "--dp-size", str(RANKS), "--grpc-port", str(self.grpc_port), "--http-port", str(http_port),
             "--grpc-workers", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_listening(self.grpc_port, self.proc)
        wait_listening(http_port, self.proc)
        deadline = time.monotonic() + 60
        while b"REST listening" not in self.text().encode():  # logged once every worker listens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"loadsvc serve --grpc-workers {workers} did not start")
            time.sleep(0.05)
        self.pids = process_tree(self.proc.pid)  # serve, its workers (and multiprocessing's helper)
        self.returncode: int | None = None

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> int:
        self.returncode = stop_process(self.proc, 15)
        return self.returncode


def _raw_get_loads(target: str) -> bytes:
    import grpc

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/loadsvc.v1.LoadService/GetLoads")
        return call(pb.GetLoadsRequest().SerializeToString(), timeout=10)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, Console().width))
    subscribers = int(getattr(args, "subscribers", 500))
    seconds = float(getattr(args, "seconds", 10.0))
    workers = int(getattr(args, "workers", None) or os.cpu_count() or 1)
    ctx = mp.get_context("spawn")
    shm = default_path(f"bench-grpc-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    procs: list[Any] = []
    servers: list[_Server] = []
    console.print(f"machine: {machine()}")
    console.print(f"load average before the run: {_loadavg()}")
    commands, pub_result = ctx.Queue(), ctx.Queue()
    try:
        publisher = ctx.Process(target=_publisher, args=(str(shm), commands, pub_result), daemon=True)
        publisher.start()
        procs.append(publisher)
        assert pub_result.get(timeout=30)[0] == "published"
        configs = [1] + ([workers] if workers > 1 else [])
        judged = 1  # the targets are judged on `loadsvc serve` as it starts by default, one process
        go_binary, go_missing = gocall.build()
        if go_binary is None:
            console.print(f"[yellow]no Go callers[/yellow]: {go_missing}\n"
                          "the targets are judged with the Python clients instead")
        clients = (["go"] if go_binary is not None else []) + ["python"]
        judged_client = clients[0]

        def poll(client: str, target: str, pids: list[int]) -> dict[str, Any]:
            if client == "go":
                return _go_phase(go_binary, target, seconds, pids, POLL_PERIOD)
            return _unary_phase(ctx, target, seconds, pids, period=POLL_PERIOD)

        def watch(client: str, server: _Server) -> dict[str, Any]:
            if client == "go":
                return _go_watch_phase(go_binary, server.target, subscribers, seconds, server.pids, commands,
                                       pub_result)
            return _watch_phase(ctx, server.target, subscribers, seconds, server.pids, commands, pub_result)

        res: dict[int, dict[str, Any]] = {}
        floor_polls: dict[str, list[dict[str, Any]]] = {c: [] for c in clients}
        floor: Any = None
        for n in configs:
            server = _Server(str(shm), n)
            servers.append(server)
            label = "one process" if n == 1 else f"--grpc-workers {n}"
            r = res[n] = {}
            if floor is None:  # the floor answers with loadsvc's own GetLoads bytes
                floor_target = f"127.0.0.1:{free_port()}"
                floor_ready, floor_stop = ctx.Event(), ctx.Event()
                floor = ctx.Process(target=_floor_server, daemon=True, args=(
                    int(floor_target.rsplit(":", 1)[1]), _raw_get_loads(server.target), floor_ready, floor_stop))
                floor.start()
                procs.append(floor)
                if not floor_ready.wait(30):
                    raise RuntimeError("the floor gRPC server did not start")
            console.print(f"[bold]loadsvc serve, {label}[/bold]")
            if n == 1:
                console.print(f"(a) GetLoads: {CALLERS} callers in {CALLER_PROCS} processes, closed loop, "
                              f"{seconds:g} s (+{WARMUP:g} s warm-up) ...")
                r["closed"] = _unary_phase(ctx, server.target, seconds, server.pids)
            with_floor = " and the floor, in turn" if n == judged else ""
            console.print(f"(a) GetLoads: {CALLERS} callers each polling every {POLL_PERIOD * 1000:g} ms "
                          f"(open loop, how routers call it), {' and '.join(CLIENT_NAME[c] for c in clients)}, "
                          f"{POLL_REPEATS} x {seconds:g} s each{with_floor} ...")
            r["polling"] = {c: [] for c in clients}
            for _ in range(POLL_REPEATS):
                for c in clients:
                    r["polling"][c].append(poll(c, server.target, server.pids))
                    if n == judged:
                        floor_polls[c].append(poll(c, floor_target, [floor.pid]))
            console.print(f"(b) WatchLoads: {subscribers} subscribers, rank 0 every {PUBLISH_PERIOD * 1000:g} ms "
                          f"for {seconds:g} s, {' and '.join(WATCHER_NAME[c] for c in clients)} ...")
            r["watch"] = {c: watch(c, server) for c in clients}
            r["stop_rc"] = server.stop()

        console.print(f"the gRPC-Python floor: {CALLERS} callers, closed loop ...")
        floor_unary = _unary_phase(ctx, floor_target, seconds, [floor.pid])
        floor_stop.set()
        floor.join(10)
        commands.put(("quit",))
    except (RuntimeError, AssertionError, queue.Empty) as e:
        console.print(f"[red]loadsvc bench grpc failed:[/red] {e or 'a step timed out'}")
        for server in servers:
            console.print(server.text()[-3000:], markup=False)
        return 1
    finally:
        for server in servers:
            server.stop()
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        shm.unlink(missing_ok=True)

    def ms(x: float) -> str:
        return f"{x * 1e3:.3f} ms"

    def verdict(ok: bool) -> str:
        return "[green]met[/green]" if ok else "[red]not met[/red]"

    table = Table(title=f"loadsvc bench grpc: {RANKS} ranks, every section, one `loadsvc serve` "
                        f"(judged: {'one process' if judged == 1 else f'--grpc-workers {judged}'}, "
                        f"{CLIENT_NAME[judged_client]})")
    table.add_column("measure", justify="left")
    for n in configs:
        table.add_column("1 process" if n == 1 else f"{n} workers", justify="right")
    for col in ("floor", "target", "result"):
        table.add_column(col, justify="right")

    def row(measure: str, values: list[str], floor_value: str = "", target: str = "", result: str = "") -> None:
        table.add_row(measure, *values, floor_value, target, result)

    def median_of(runs: list[dict[str, Any]], q: float) -> float:
        return statistics.median(percentile(x["lat"], q) for x in runs)

    for c in clients:
        polls = [res[n]["polling"][c] for n in configs]
        fpolls = floor_polls[c]
        pp99 = median_of(res[judged]["polling"][c], 99)
        fp99 = median_of(fpolls, 99)
        rps = statistics.median(x["rps"] for x in res[judged]["polling"][c])
        judged_here = c == judged_client
        who = f"{CALLERS} {CLIENT_NAME[c]}"
        row(f"GetLoads p50, {who} polling every {POLL_PERIOD * 1000:g} ms (median of {POLL_REPEATS} runs)",
            [ms(median_of(p, 50)) for p in polls], ms(median_of(fpolls, 50)))
        row(f"GetLoads p99, {who} polling ({rps:,.0f} calls/s; median of {POLL_REPEATS} runs)"
            + ("" if judged_here else ", not judged"),
            [ms(median_of(p, 99)) for p in polls], ms(fp99),
            f"< {TARGET_UNARY_P99_MS:g} ms" if judged_here else "",
            verdict(pp99 * 1e3 < TARGET_UNARY_P99_MS) if judged_here else "")
        row(f"GetLoads p99, {CLIENT_NAME[c]}, each run (ms)",
            [" / ".join(f"{percentile(x['lat'], 99) * 1e3:.2f}" for x in p) for p in polls],
            " / ".join(f"{percentile(x['lat'], 99) * 1e3:.2f}" for x in fpolls))
        row(f"GetLoads p99, {CLIENT_NAME[c]}, judged server / floor (same run, in turn)",
            [(f"{pp99 / fp99:.2f}x" if fp99 > 0 else "n/a") if n == judged else "" for n in configs])
        row(f"GetLoads max, {CLIENT_NAME[c]}", [ms(max((x["lat"][-1] for x in p if x["lat"]), default=float("nan")))
                                                for p in polls])
        row(f"GetLoads errors, {CLIENT_NAME[c]}", [str(sum(x["errors"] for x in p)) for p in polls],
            str(sum(x["errors"] for x in fpolls)), "0",
            verdict(all(x["errors"] == 0 for p in polls for x in p)))
        row(f"server CPU while {CLIENT_NAME[c]} poll",
            [f"{statistics.median(x['cpu'] for x in p) * 100:.0f} %" for p in polls],
            f"{statistics.median(x['cpu'] for x in fpolls) * 100:.0f} %")
    if go_binary is None:
        row("GetLoads, Go callers", ["not run" for _ in configs], "", "", "see below")
    closed, flat = res[1]["closed"], floor_unary["lat"]
    blank = [""] * (len(configs) - 1)
    row(f"GetLoads p50, {CALLERS} {CLIENT_NAME['python']} closed loop (saturated)",
        [ms(percentile(closed["lat"], 50)), *blank], ms(percentile(flat, 50)))
    row("GetLoads p99, closed loop (saturated: queueing, see below)", [ms(percentile(closed["lat"], 99)), *blank],
        ms(percentile(flat, 99)))
    row("GetLoads calls/s, closed loop", [f"{closed['rps']:,.0f}", *blank], f"{floor_unary['rps']:,.0f}")
    row("GetLoads errors, closed loop", [str(closed["errors"]), *blank], str(floor_unary["errors"]), "0",
        verdict(closed["errors"] == 0))
    row("server CPU, closed loop", [f"{closed['cpu'] * 100:.0f} %", *blank], f"{floor_unary['cpu'] * 100:.0f} %")
    for c in clients:
        watches = [res[n]["watch"][c] for n in configs]
        wp99 = percentile(res[judged]["watch"][c]["lat"], 99)
        judged_here = c == judged_client
        who = WATCHER_NAME[c]
        row(f"WatchLoads, {subscribers} {who}: ending on the final state",
            [f"{x['reached']}/{subscribers} (seq {x['final_seq']})" for x in watches], "", "all",
            verdict(all(x["reached"] == subscribers for x in watches)))
        row(f"WatchLoads publish-to-delivery p50, {who}", [f"{percentile(x['lat'], 50):.2f} ms" for x in watches])
        row(f"WatchLoads publish-to-delivery p99, {who}" + ("" if judged_here else ", not judged"),
            [f"{percentile(x['lat'], 99):.2f} ms" for x in watches], "",
            f"< {TARGET_WATCH_P99_MS:g} ms" if judged_here else "",
            verdict(wp99 < TARGET_WATCH_P99_MS) if judged_here else "")
        row(f"WatchLoads publish-to-delivery max, {who}",
            [f"{x['lat'][-1] if x['lat'] else float('nan'):.2f} ms" for x in watches])
        row(f"WatchLoads updates delivered, {who} (others skipped to a later state)",
            [f"{x['delivered']}/{x['published'] * subscribers}" for x in watches])
        row(f"WatchLoads stream errors, {who}", [str(x["n_errors"]) for x in watches], "", "0",
            verdict(all(x["n_errors"] == 0 for x in watches)))
        row(f"server CPU during WatchLoads, {who} (all its processes)",
            [f"{x['cpu'] * 100:.0f} %" for x in watches])
        row(f"{who}' CPU during WatchLoads", [" + ".join(f"{u * 100:.0f} %" for u in x["client_cpu"])
                                               for x in watches])
    rcs = [res[n]["stop_rc"] for n in configs]
    row("serve exit code after SIGTERM", [str(rc) for rc in rcs], "", "0", verdict(all(rc == 0 for rc in rcs)))
    console.print(table)
    console.print(f"workers: `loadsvc serve --grpc-workers N` runs N gRPC processes on one port "
                  f"(SO_REUSEPORT), each reading the region; this run used {workers} (`--workers`, default "
                  "one per core). Every caller and every 10 subscribers have their own connection.")
    console.print(f"closed loop: {CALLERS} callers each send the next call as soon as the last returns, so "
                  "the server runs flat out and latency is queueing (callers / calls per second); the floor "
                  "shows gRPC Python itself saturates there. The < 2 ms target is judged on the polling row.")
    console.print(f"floor: the same {CALLERS} callers against a grpc.aio server whose GetLoads returns the "
                  "same bytes and does nothing else (what gRPC Python costs on this machine); polled in turn "
                  f"with the judged server, {POLL_REPEATS} runs each.")
    console.print(f"clients: the targets are judged on `loadsvc serve` as it starts by default (one process) "
                  f"with {CLIENT_NAME[judged_client]} and {WATCHER_NAME[judged_client]}. Go clients "
                  "(loadsvc/bench/gocaller: grpc-go, one process) time the calls and streams as a Go router "
                  f"would; Python clients (grpc.aio, {CALLER_PROCS} processes) add their own cost on the same "
                  "CPUs to everything they time, and are shown for comparison.")
    if go_binary is None:
        console.print(f"[yellow]Go callers not run[/yellow]: {go_missing}")
    for c in clients:
        for x in [*(res[n]["polling"][c] for n in configs), floor_polls[c]]:
            for run_ in x:
                if run_.get("error_sample"):
                    console.print(f"[red]{CLIENT_NAME[c]} error[/red]: {run_['error_sample']}")
    console.print(f"load average after the run: {_loadavg()} (other processes on the machine skew every figure)")
    for x in (res[n]["watch"][c] for n in configs for c in clients):
        for e in x["errors"][:5]:
            console.print(f"[red]stream error[/red]: {e}")
    for server in servers:
        if server.returncode != 0:
            console.print(server.text()[-3000:], markup=False)
    return 0
