"""`loadsvc bench grpc`: GetLoads latency and WatchLoads fan-out against a real `loadsvc serve`.

    publisher process --ShmPublisher x 8--> fresh region --> `loadsvc serve` subprocess
                                                               |  free loopback ports
    (a) unary:  CALLER_PROCS processes, 32 grpc.aio callers in all, closed loop,
                GetLoads (8 ranks, every section) for --seconds; per-call latency
    (b) watch:  WATCH_PROCS processes, --subscribers WatchLoads streams in all, over
                several channels; rank 0 publishes every 100 ms for --seconds;
                latency = receive time - publish_time_ns in the message (same clock)

Every subscriber must end on the last published sequence of rank 0 (a slow
subscriber may skip intermediate states by design; the share delivered is shown).
Targets (issue 3): GetLoads p99 < 2 ms; WatchLoads p99 < 100 ms and every
subscriber sees the final state.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from loadsvc.bench import cpu_model, cpu_seconds, free_port, percentile
from loadsvc.shm import default_path

__all__ = ["run"]

RANKS = 8
CALLERS = 32
CALLER_PROCS = 2
WATCH_PROCS = 2
STREAMS_PER_CHANNEL = 50
PUBLISH_PERIOD = 0.1  # rank 0 changes every 100 ms
WARMUP = 1.0  # seconds of unary calls not counted
SETTLE = 5.0  # seconds subscribers get to reach the final state after the last publish
POLL_PERIOD = 0.05  # s between two GetLoads of one polling caller (a router polling at 20 Hz)
TARGET_UNARY_P99_MS = 2.0
TARGET_WATCH_P99_MS = 100.0


# -- helpers ----------------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"loadsvc serve exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"loadsvc serve did not listen on {port} within {timeout} s")
        time.sleep(0.05)


def _snapshot(rank: int, i: int) -> Any:
    from loadsvc.schema import LoadSnapshot, MemoryMetrics, QueueMetrics

    return LoadSnapshot(dp_rank=rank, num_running_reqs=10 + i % 50, num_waiting_reqs=i % 7,
                        num_total_reqs=10 + i % 50 + i % 7, num_used_tokens=4096 + i, max_total_num_tokens=200000,
                        token_usage=0.3, gen_throughput=1500.0, cache_hit_rate=0.4, utilization=0.6,
                        max_running_requests=256,
                        memory=MemoryMetrics(weight_gb=15.2, kv_cache_gb=40.0, token_capacity=200000),
                        queues=QueueMetrics(waiting=i % 7))


# -- child processes ------------------------------------------------------------------------------


def _publisher(shm: str, start: Any, stop: Any, result: Any) -> None:
    """Publish every rank once; after `start`, rank 0 every PUBLISH_PERIOD until `stop`."""
    from loadsvc.shm import ShmPublisher

    pubs = [ShmPublisher(shm, dp_size=RANKS, dp_rank=r) for r in range(RANKS)]
    for r, pub in enumerate(pubs):
        pub.publish(_snapshot(r, 0))
    result.put(("published", pubs[0].seq))
    start.wait()
    i = 0
    next_at = time.monotonic()
    while not stop.is_set():
        i += 1
        pubs[0].publish(_snapshot(0, i))
        next_at += PUBLISH_PERIOD
        time.sleep(max(0.0, next_at - time.monotonic()))
    result.put(("final", pubs[0].seq))
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
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LoadServiceStub(channel)
        request = pb.GetLoadsRequest()
        await stub.GetLoads(request)
        t_start = time.perf_counter()
        t_measure = t_start + WARMUP
        t_end = t_measure + seconds

        async def caller(k: int) -> None:
            nonlocal errors
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
    result.put({"latencies": latencies, "errors": errors, "seconds": seconds})


def _watch_client(target: str, subscribers: int, ready: Any, final: Any, result: Any) -> None:
    asyncio.run(_watch_main(target, subscribers, ready, final, result))


async def _watch_main(target: str, subscribers: int, ready: Any, final: Any, result: Any) -> None:
    import grpc

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
    from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc

    n_channels = max(1, -(-subscribers // STREAMS_PER_CHANNEL))
    channels = [grpc.aio.insecure_channel(target) for _ in range(n_channels)]
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
    except asyncio.TimeoutError:
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


def _unary_phase(ctx: Any, target: str, seconds: float, cpu_pid: int | None,
                 period: float | None = None) -> dict[str, Any]:
    """CALLERS callers (closed loop, or polling every period s) over CALLER_PROCS processes; merged."""
    results_q = ctx.Queue()
    share = [CALLERS // CALLER_PROCS + (1 if i < CALLERS % CALLER_PROCS else 0) for i in range(CALLER_PROCS)]
    cpu0 = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    procs = [ctx.Process(target=_unary_client, args=(target, n, seconds, results_q, period), daemon=True)
             for n in share]
    for p in procs:
        p.start()
    try:
        results = [results_q.get(timeout=seconds + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    cpu = (cpu_seconds(cpu_pid) - cpu0) / (seconds + WARMUP) if cpu_pid else float("nan")
    lat = sorted(x for r in results for x in r["latencies"])
    return {"lat": lat, "errors": sum(r["errors"] for r in results), "rps": len(lat) / seconds, "cpu": cpu}


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
    ctx = mp.get_context("spawn")
    shm = default_path(f"bench-grpc-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    grpc_port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    procs: list[Any] = []
    log = tempfile.TemporaryFile()
    server: subprocess.Popen[bytes] | None = None
    console.print(f"machine: {machine()}")
    console.print(f"load average before the run: {_loadavg()}")
    try:
        start, stop, pub_result = ctx.Event(), ctx.Event(), ctx.Queue()
        publisher = ctx.Process(target=_publisher, args=(str(shm), start, stop, pub_result), daemon=True)
        publisher.start()
        procs.append(publisher)
        assert pub_result.get(timeout=30)[0] == "published"
        server = subprocess.Popen(
            [sys.executable, "-m", "loadsvc", "--log-level", "WARNING", "serve", "--shm", str(shm),
             "--dp-size", str(RANKS), "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(grpc_port, server)
        _wait_port(http_port, server)

        # (a) GetLoads, 32 concurrent callers: loadsvc, then the gRPC-Python floor, same client
        console.print(f"(a) GetLoads: {CALLERS} concurrent callers in {CALLER_PROCS} processes, closed loop, "
                      f"{seconds:g} s (+{WARMUP:g} s warm-up) each against loadsvc and the floor ...")
        unary = _unary_phase(ctx, target, seconds, server.pid)
        console.print(f"    and {CALLERS} callers each polling every {POLL_PERIOD * 1000:g} ms (open loop, "
                      "how routers call it) ...")
        polling = _unary_phase(ctx, target, seconds, server.pid, period=POLL_PERIOD)
        payload = _raw_get_loads(target)
        floor_port = free_port()
        floor_ready, floor_stop = ctx.Event(), ctx.Event()
        floor = ctx.Process(target=_floor_server, args=(floor_port, payload, floor_ready, floor_stop), daemon=True)
        floor.start()
        procs.append(floor)
        if not floor_ready.wait(30):
            raise RuntimeError("the floor gRPC server did not start")
        floor_unary = _unary_phase(ctx, f"127.0.0.1:{floor_port}", seconds, floor.pid)
        floor_stop.set()
        floor.join(10)

        # (b) WatchLoads fan-out
        console.print(f"(b) WatchLoads: {subscribers} subscribers in {WATCH_PROCS} processes, rank 0 "
                      f"every {PUBLISH_PERIOD * 1000:g} ms for {seconds:g} s ...")
        ready_q, watch_q = ctx.Queue(), ctx.Queue()
        finals = [ctx.Queue() for _ in range(WATCH_PROCS)]
        share = [subscribers // WATCH_PROCS + (1 if i < subscribers % WATCH_PROCS else 0)
                 for i in range(WATCH_PROCS)]
        watchers = [ctx.Process(target=_watch_client, args=(target, n, ready_q, fq, watch_q), daemon=True)
                    for n, fq in zip(share, finals) if n]
        for p in watchers:
            p.start()
        procs += watchers
        for _ in watchers:
            ready_q.get(timeout=120)
        cpu0 = cpu_seconds(server.pid)
        start.set()
        time.sleep(seconds)
        stop.set()
        kind, final_seq = pub_result.get(timeout=10)
        watch_cpu = (cpu_seconds(server.pid) - cpu0) / seconds
        for fq in finals[:len(watchers)]:
            fq.put(final_seq)
        watch = [watch_q.get(timeout=SETTLE + 60) for _ in watchers]
        for p in watchers:
            p.join(10)
    except (RuntimeError, AssertionError, queue.Empty) as e:
        console.print(f"[red]loadsvc bench grpc failed:[/red] {e or 'a step timed out'}")
        log.seek(0)
        console.print(log.read().decode(errors="replace")[-3000:], markup=False)
        return 1
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        shm.unlink(missing_ok=True)

    lat, unary_errors, rps, unary_cpu = unary["lat"], unary["errors"], unary["rps"], unary["cpu"]
    wlat = sorted(x / 1e6 for r in watch for x in r["latencies"])
    reached = sum(r["reached"] for r in watch)
    expected_updates = (final_seq - 1) * subscribers
    delivered = sum(r["delivered"] for r in watch)
    n_errors = sum(r["n_errors"] for r in watch)
    stop_rc = server.returncode if server is not None else None

    def ms(x: float) -> str:
        return f"{x * 1e3:.3f} ms"

    def verdict(ok: bool) -> str:
        return "[green]met[/green]" if ok else "[red]not met[/red]"

    table = Table(title=f"loadsvc bench grpc: {RANKS} ranks, every section, one `loadsvc serve`")
    for col in ("measure", "loadsvc", "floor", "target", "result"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    flat = floor_unary["lat"]
    p99 = percentile(lat, 99)
    plat = polling["lat"]
    pp99 = percentile(plat, 99)
    table.add_row(f"GetLoads p50, {CALLERS} callers polling every {POLL_PERIOD * 1000:g} ms",
                  ms(percentile(plat, 50)), "", "", "")
    table.add_row(f"GetLoads p99, {CALLERS} callers polling ({polling['rps']:,.0f} calls/s)", ms(pp99), "",
                  f"< {TARGET_UNARY_P99_MS:g} ms", verdict(pp99 * 1e3 < TARGET_UNARY_P99_MS))
    table.add_row("GetLoads errors, polling", str(polling["errors"]), "", "0", verdict(polling["errors"] == 0))
    table.add_row(f"GetLoads p50, {CALLERS} callers closed loop (saturated)", ms(percentile(lat, 50)),
                  ms(percentile(flat, 50)), "", "")
    table.add_row("GetLoads p99, closed loop (saturated: queueing, see below)", ms(p99),
                  ms(percentile(flat, 99)), "", "")
    table.add_row("GetLoads max", ms(lat[-1] if lat else float("nan")),
                  ms(flat[-1] if flat else float("nan")), "", "")
    table.add_row("GetLoads calls/s (closed loop)", f"{rps:,.0f}", f"{floor_unary['rps']:,.0f}", "", "")
    table.add_row("GetLoads errors", str(unary_errors), str(floor_unary["errors"]), "0",
                  verdict(unary_errors == 0))
    table.add_row("server CPU during GetLoads", f"{unary_cpu * 100:.0f} %", f"{floor_unary['cpu'] * 100:.0f} %",
                  "", "")
    wp99 = percentile(wlat, 99)
    table.add_row(f"WatchLoads: subscribers ending on the final state (seq {final_seq})",
                  f"{reached}/{subscribers}", "", "all", verdict(reached == subscribers))
    table.add_row("WatchLoads publish-to-delivery p50", f"{percentile(wlat, 50):.2f} ms", "", "", "")
    table.add_row("WatchLoads publish-to-delivery p99", f"{wp99:.2f} ms", "", f"< {TARGET_WATCH_P99_MS:g} ms",
                  verdict(wp99 < TARGET_WATCH_P99_MS))
    table.add_row("WatchLoads publish-to-delivery max", f"{wlat[-1] if wlat else float('nan'):.2f} ms", "", "", "")
    table.add_row("WatchLoads updates delivered (others skipped to a later state)",
                  f"{delivered}/{expected_updates}", "", "", "")
    table.add_row("WatchLoads stream errors", str(n_errors), "", "0", verdict(n_errors == 0))
    table.add_row("server CPU during WatchLoads", f"{watch_cpu * 100:.0f} %", "", "", "")
    table.add_row("subscriber processes' CPU during WatchLoads",
                  " + ".join(f"{r['cpu'] * 100:.0f} %" for r in watch), "", "", "")
    table.add_row("serve exit code after SIGTERM", str(stop_rc), "", "0", verdict(stop_rc == 0))
    console.print(table)
    console.print(f"closed loop: {CALLERS} callers each send the next call as soon as the last returns, so "
                  "the server runs flat out and latency is queueing (callers / calls per second); the floor "
                  "shows gRPC Python itself saturates there. The < 2 ms target is judged on the polling row.")
    console.print(f"floor: the same {CALLERS} callers against a grpc.aio server whose GetLoads returns the "
                  "same bytes and does nothing else (what gRPC Python costs on this machine).")
    console.print(f"load average after the run: {_loadavg()} (other processes on the machine skew every figure)")
    for r in watch:
        for e in r["errors"]:
            console.print(f"[red]stream error[/red]: {e}")
    if stop_rc != 0:
        log.seek(0)
        console.print(log.read().decode(errors="replace")[-3000:])
    log.close()
    return 0
