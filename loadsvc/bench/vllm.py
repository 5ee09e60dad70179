"""`loadsvc bench vllm`: what loadsvc's vLLM plugin costs vLLM, and how fast its numbers arrive.

    1. capture: an in-process vLLM (AsyncLLM, the tiny Llama of bench/tiny_llama.py on
       the CPU backend) runs a burst of completions with a stat logger that keeps every
       record() call's (scheduler_stats, iteration_stats)
    2. cost:    those calls replayed at their captured pace, in an event loop, through
               loadsvc's LoadsvcStatLogger (publishing into a region) and through a
               no-op StatLoggerBase; each call timed; median and p99 of each
    3. lag:     `loadsvc serve` over that region, a WatchLoads stream on a thread, and
               record() calls that change num_running_reqs: the time from record() to
               the change arriving on the stream; median and p99

Targets: at most 10 µs added per record() call at the median; lag p99 under 5 ms.
Needs vLLM: run it where vLLM is installed, or let it re-run itself in the venv of
loadsvc.bench.vllm_env (built by .ci/run).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadsvc.bench import (
    free_port,
    machine_summary,
    percentile,
    stop_process,
    wait_listening,
)
from loadsvc.tools.procs import loadsvc_command, python_command

TARGET_ADDED_US = 10.0
TARGET_LAG_P99_MS = 5.0


def _reexec_in_venv(argv: list[str]) -> int:
    """Run this bench again with the vLLM venv's python (installing this loadsvc into it)."""
    from loadsvc.bench import vllm_env

    why = vllm_env.missing()
    if why:
        print(f"loadsvc bench vllm: vLLM is not installed here, and {why}", file=sys.stderr)
        return 2
    source = Path(__file__).resolve().parents[2]
    if (source / "pyproject.toml").exists():
        vllm_env.install_loadsvc(source)
    print(f"loadsvc bench vllm: running in {vllm_env.venv_dir()} (vLLM is not installed here)", flush=True)
    return subprocess.run([str(vllm_env.venv_python()), "-P", "-m", "loadsvc", "bench", "vllm", *argv],
                          cwd="/").returncode


# --- 1. capture -------------------------------------------------------------------------


async def _capture(model: Path, requests: int, max_tokens: int) -> tuple[Any, list[tuple[float, Any, Any]]]:
    """(vllm_config, [(monotonic time, scheduler_stats, iteration_stats)]) of a burst."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    calls: list[tuple[float, Any, Any]] = []

    class Capture(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            calls.append((time.monotonic(), scheduler_stats, iteration_stats))

        def log_engine_initialized(self) -> None:
            pass

    args = AsyncEngineArgs(model=str(model), max_model_len=256, dtype="float32", enforce_eager=True,
                           max_num_seqs=8, disable_log_stats=True)
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[Capture])
    try:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

        async def one(i: int) -> None:
            async for _ in engine.generate(f"request {i}", params, request_id=f"bench-{i}"):
                pass

        await asyncio.gather(*(one(i) for i in range(requests)))
        return engine.vllm_config, calls
    finally:
        engine.shutdown()


# --- 2. cost per record() ---------------------------------------------------------------


async def _replay(logger: Any, calls: list[tuple[float, Any, Any]]) -> list[float]:
    """Each call's duration (µs), replayed at the captured pace."""
    out = []
    start, first = time.monotonic(), calls[0][0]
    perf = time.perf_counter_ns
    for t, sched, it in calls:
        delay = (t - first) - (time.monotonic() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = perf()
        logger.record(sched, it, None, 0)
        out.append((perf() - t0) / 1000)
    return out


def _noop_logger() -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Noop(StatLoggerBase):
        def __init__(self, vllm_config: Any = None, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

    return Noop()


# --- 3. lag to WatchLoads ---------------------------------------------------------------


class _Arrivals:
    """A WatchLoads subscriber in its own process, as a router is: when each running count arrived.

    The child (``python -m loadsvc.bench.vllm TARGET``) stamps every message with
    CLOCK_MONOTONIC, the clock record() is timed with here, and prints
    ``running ns`` lines; a thread here collects the first arrival of each count.
    """

    def __init__(self, target: str) -> None:
        self.proc = subprocess.Popen(python_command("-m", "loadsvc.bench.vllm", target),
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd="/")
        self.seen: dict[int, int] = {}
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            running, ns = (int(x) for x in line.split())
            with self.cond:
                self.seen.setdefault(running, ns)
                self.cond.notify_all()

    def wait(self, running: int, timeout: float) -> int | None:
        with self.cond:
            self.cond.wait_for(lambda: running in self.seen, timeout)
            return self.seen.get(running)

    def close(self) -> None:
        stop_process(self.proc, 5)  # type: ignore[arg-type]
        self.thread.join(5)


def _watch(target: str) -> None:
    """The subscriber process of _Arrivals: rank 0's num_running_reqs per message, with its arrival."""
    import grpc

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
    from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.LoadServiceStub(channel).WatchLoads(pb.WatchLoadsRequest(dp_rank=0, include=["core"]))
        try:
            for msg in call:
                now = time.monotonic_ns()
                for load in msg.loads:
                    print(load.num_running_reqs, now, flush=True)
        except (grpc.RpcError, BrokenPipeError, KeyboardInterrupt):
            pass


async def _lag(logger: Any, shm: Path, probes: int) -> list[float]:
    """ms from record() to the change on a WatchLoads stream, for probes distinct running counts."""
    from vllm.v1.metrics.stats import SchedulerStats

    port = free_port()
    serve = subprocess.Popen(loadsvc_command("--log-level", "WARNING", "serve", "--shm", str(shm),
                                             "--grpc-port", str(port), "--http-port", str(free_port())),
                             stdin=subprocess.DEVNULL, cwd="/")
    try:
        wait_listening(port, serve)
        arrivals = _Arrivals(f"127.0.0.1:{port}")
        try:
            if arrivals.wait(0, 10) is None:
                raise RuntimeError("the WatchLoads stream sent nothing within 10 s")
            rng = random.Random(1)
            lags = []
            for k in range(1, probes + 1):
                await asyncio.sleep(rng.uniform(0.01, 0.03))  # between engine steps
                t0 = time.monotonic_ns()
                logger.record(SchedulerStats(num_running_reqs=k), None, None, 0)
                arrived = await asyncio.to_thread(arrivals.wait, k, 5.0)
                if arrived is None:
                    raise RuntimeError(f"running={k} did not arrive on the WatchLoads stream within 5 s")
                lags.append((arrived - t0) / 1e6)
            return lags
        finally:
            arrivals.close()
    finally:
        stop_process(serve, 10)


# --- report -----------------------------------------------------------------------------


async def _main(args: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from loadsvc.bench import tiny_llama

    console = Console(width=max(100, Console().width))
    import vllm

    console.print(f"[bold]loadsvc bench vllm[/]: vLLM {vllm.__version__} (CPU), {args.requests} requests "
                  f"x {args.max_tokens} tokens captured, {args.repeats} replays, {args.probes} lag probes")
    console.print("machine: " + machine_summary() + "; load average "
                  + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    work = Path(tempfile.mkdtemp(prefix="loadsvc-bench-vllm-"))
    shm = Path("/dev/shm") / f"loadsvc-bench-vllm-{os.getpid()}.shm"
    # The plugin is this environment's entry point too: keep it out of the captured engine.
    os.environ.update({"LOADSVC_VLLM_PUBLISH": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                       "VLLM_NO_USAGE_STATS": "1"})
    try:
        model = args.model or tiny_llama.build(work / "model")
        with console.status("capturing vLLM's stats during a burst ..."):
            vllm_config, calls = await _capture(Path(model), args.requests, args.max_tokens)
            gc.collect()  # the engine, shut down, goes now rather than at interpreter exit
        busy = sum(1 for _, s, _ in calls if s is not None and s.num_running_reqs)
        console.print(f"captured {len(calls)} record() calls ({busy} with requests running) over "
                      f"{calls[-1][0] - calls[0][0]:.1f} s")

        os.environ.update({"LOADSVC_VLLM_PUBLISH": "1", "LOADSVC_SHM": str(shm)})
        from loadsvc.engines.vllm.stat_logger import LoadsvcStatLogger

        plugin = LoadsvcStatLogger(vllm_config, 0)
        plugin.log_engine_initialized()
        noop = _noop_logger()
        ours: list[list[float]] = []
        base: list[list[float]] = []
        with console.status("replaying the captured calls ..."):
            for _ in range(args.repeats):  # alternating, so drift hits both alike
                base.append(sorted(await _replay(noop, calls)))
                ours.append(sorted(await _replay(plugin, calls)))
        with console.status("timing record() -> WatchLoads ..."):
            lags = sorted(await _lag(plugin, shm, args.probes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shm.unlink(missing_ok=True)

    med = statistics.median
    ours_p50, base_p50 = med(percentile(r, 50) for r in ours), med(percentile(r, 50) for r in base)
    ours_p99, base_p99 = med(percentile(r, 99) for r in ours), med(percentile(r, 99) for r in base)
    added = ours_p50 - base_p50
    lag_p50, lag_p99 = percentile(lags, 50), percentile(lags, 99)
    table = Table(title="loadsvc bench vllm (medians over the replays)")
    for col, justify in (("metric", "left"), ("loadsvc plugin", "right"), ("no-op logger", "right"),
                         ("added", "right"), ("target", "right"), ("met?", "center")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    met_cost, met_lag = added <= TARGET_ADDED_US, lag_p99 < TARGET_LAG_P99_MS
    yes, no = "[green]yes[/]", "[red]no[/]"
    table.add_row("record() per call, median (µs)", f"{ours_p50:.2f}", f"{base_p50:.2f}", f"{added:.2f}",
                  f"<= {TARGET_ADDED_US:g}", yes if met_cost else no)
    table.add_row("record() per call, p99 (µs)", f"{ours_p99:.2f}", f"{base_p99:.2f}",
                  f"{ours_p99 - base_p99:.2f}", "", "")
    table.add_row("record() -> WatchLoads, median (ms)", f"{lag_p50:.2f}", "", "", "", "")
    table.add_row("record() -> WatchLoads, p99 (ms)", f"{lag_p99:.2f}", "", "",
                  f"< {TARGET_LAG_P99_MS:g}", yes if met_lag else no)
    console.print(table)
    counters = plugin.rank.counters if plugin.rank is not None else None
    console.print(f"plugin counters: {counters}")
    console.print("both targets met" if met_cost and met_lag else "[red]not every target met[/]")
    return 0


def run(args: Any) -> int:
    """`loadsvc bench vllm` (cli.py parses the flags)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return _reexec_in_venv(sys.argv[sys.argv.index("vllm") + 1:] if "vllm" in sys.argv else [])
    return asyncio.run(_main(args))


if __name__ == "__main__":
    _watch(sys.argv[1])
