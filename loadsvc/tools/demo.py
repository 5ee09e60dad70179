"""`loadsvc demo`: the simulator and the server on loopback, one command, until Ctrl-C.

    loadsvc demo
      |-- python -P -m loadsvc simulate --shm REGION --dp-size 4   (load source)
      |-- python -P -m loadsvc serve    --shm REGION --dp-size 4   (gRPC :50051, REST :8000)
      |        REGION = a fresh /dev/shm/loadsvc-demo-<pid>-<random>.shm, removed at exit
      '-- waits for GET /health and every rank published, prints the addresses,
          then waits for Ctrl-C / SIGTERM / SIGHUP and stops what it started
          (SIGTERM, then SIGKILL after STOP_TIMEOUT seconds)

The children run in their own process group, so a Ctrl-C reaches only the demo,
which stops them in order (load source first, then the server). They also get
SIGKILL from the kernel if the demo itself dies (Linux PR_SET_PDEATHSIG). -P
keeps a `loadsvc/` folder in the current directory from shadowing the installed
package in them (see loadsvc/tools/procs.py).

``--engine`` runs real routing instead of the bare simulator: the toy
inference engine (loadsvc/tools/engine.py, --dp-size ranks, the last one at half
speed) publishes into the region, and the reference router (loadsvc/tools/router.py)
sits in front of it, picking a rank per request by power of two choices on the
loads it watches over the engine's WatchLoads stream:

      |-- python -P -m loadsvc engine --shm REGION --dp-size 4 --speeds 1,1,1,0.5
      |-- python -P -m loadsvc router --worker http://ENGINE=ENGINE_GRPC
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadsvc._exceptions import LoadsvcError
from loadsvc.core.region import default_path
from loadsvc.settings import DemoSettings
from loadsvc.tools.procs import free_port, loadsvc_command, port_in_use

__all__ = ["run_demo"]

READY_TIMEOUT = 60.0  # seconds for the server to answer and every rank to publish
STOP_TIMEOUT = 5.0  # seconds children get after SIGTERM before SIGKILL
# The ports the demo takes when they are free (so the README's examples paste as they are);
# one in use is replaced by a free port, and the demo says so. Ports given with a flag must be free.
DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8000
DEFAULT_ROUTER_PORT = 8080  # --engine: `loadsvc router`'s own default (the engine's ports are free ones)


class DemoError(LoadsvcError, RuntimeError):
    """The demo cannot start; the message says why and what to change. code: the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _say(text: str = "") -> None:
    print(text, flush=True)


def _error(text: str) -> None:
    print(f"loadsvc demo: {text}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the demo dies, however it dies (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the demo's own shutdown still applies
        pass


@dataclass
class _Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, process_group=0,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None


@dataclass(frozen=True)
class _Ports:
    grpc: int
    http: int
    router: int = 0  # the --engine ones
    engine_http: int = 0
    engine_grpc: int = 0


def _resolve_ports(settings: DemoSettings) -> tuple[_Ports, list[str]]:
    """The ports to use, and a note per default port that was in use and replaced by a free one.

    DemoError (exit code 2) for a port given twice or 0, (exit code 1) for a given port in use."""
    host = settings.host
    wanted = [("grpc", settings.grpc_port, DEFAULT_GRPC_PORT, "--grpc-port", "gRPC"),
              ("http", settings.http_port, DEFAULT_HTTP_PORT, "--http-port", "REST")]
    if settings.engine:
        wanted.append(("router", settings.router_port, DEFAULT_ROUTER_PORT, "--router-port", "router HTTP"))
    given: dict[int, str] = {}
    for _, port, _, flag, _ in wanted:
        if port is None:
            continue
        if port == 0:
            raise DemoError(f"{flag} 0 is not supported by the demo; give a port number", code=2)
        if port in given:
            raise DemoError(f"{given[port]} and {flag} are both {port}; give them different ports", code=2)
        given[port] = flag
    for _, port, _, flag, what in wanted:
        if port is not None and port_in_use(port, host):
            raise DemoError(f"port {port} on {host} ({what}) is already in use, perhaps by "
                            f"another loadsvc demo or serve; pick another with {flag} PORT")
    taken, chosen, notes = set(given), dict[str, int](), list[str]()

    def untaken_port() -> int:
        port = free_port(host)
        while port in taken:
            port = free_port(host)
        return port

    for key, port, default, flag, what in wanted:
        if port is None:
            port = default
            if port in taken or port_in_use(port, host):
                port = untaken_port()
                notes.append(f"port {default} ({what}) is in use; using {port} instead ({flag} PORT "
                             "picks one)")
        taken.add(port)
        chosen[key] = port
    if settings.engine:  # only the router's URL is in the examples: the engine takes free ports
        for key in ("engine_http", "engine_grpc"):
            chosen[key] = untaken_port()
            taken.add(chosen[key])
    return _Ports(**chosen), notes


@dataclass
class _Demo:
    settings: DemoSettings
    region: Path
    ports: _Ports
    children: list[_Child] = field(default_factory=list)
    stop_signal: str = ""

    # -- signals -------------------------------------------------------------------

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signal.Signals(signum).name

    def nap(self, seconds: float) -> None:
        """Sleep, but return early once a stop signal arrived."""
        end = time.monotonic() + seconds
        while not self.stop_signal:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    # -- children ------------------------------------------------------------------

    def start(self) -> None:
        s, ports = self.settings, self.ports
        py = loadsvc_command("--log-level", "WARNING")
        server = _Child("server", [*py, "serve", "--shm", str(self.region), "--dp-size", str(s.dp_size),
                                   "--host", s.host, "--grpc-port", str(ports.grpc),
                                   "--http-port", str(ports.http)])
        extra: list[_Child] = []
        if s.engine:
            speeds = ",".join("0.5" if s.dp_size > 1 and i == s.dp_size - 1 else "1" for i in range(s.dp_size))
            source = _Child("engine", [*py, "engine", "--dp-size", str(s.dp_size), "--speeds", speeds,
                                       "--shm", str(self.region), "--host", s.host, "--port",
                                       str(ports.engine_http), "--grpc-port", str(ports.engine_grpc)])
            worker = f"http://{s.host}:{ports.engine_http}={s.host}:{ports.engine_grpc}"
            extra = [_Child("router", [*py, "router", "--host", s.host, "--port", str(ports.router),
                                       "--worker", worker])]
        else:
            source = _Child("simulator", [*py, "simulate", "--shm", str(self.region),
                                          "--dp-size", str(s.dp_size)])
        # Stopped in reverse order: the router and the load source first, then the server.
        self.children = [server, source, *extra]
        for child in self.children:
            child.start()

    def failed_child(self) -> _Child | None:
        for child in self.children:
            if child.exited() is not None:
                return child
        return None

    def wait_ready(self) -> bool:
        """True once /health answers and every rank has published; False on a stop signal."""
        import json
        import urllib.error
        import urllib.request

        s = self.settings
        url = f"http://{s.host}:{self.ports.http}/health"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        while not self.stop_signal:
            child = self.failed_child()
            if child is not None:
                raise DemoError(f"the {child.name} exited with code {child.exited()} before the demo "
                                "was ready (its messages are above)")
            try:
                with opener.open(url, timeout=1.0) as r:
                    health = json.loads(r.read())
                if health.get("published", 0) >= s.dp_size:
                    if not s.engine:
                        return True
                    router = f"http://{s.host}:{self.ports.router}/health"
                    with opener.open(router, timeout=1.0):  # 200 once it watches the engine's loads
                        return True
                last = f"{health.get('published', 0)} of {s.dp_size} ranks published"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (OSError, ValueError) as e:  # refused, reset, timed out, not JSON yet
                last = str(e) or type(e).__name__
            if time.monotonic() > deadline:
                raise DemoError(f"the server was not ready within {READY_TIMEOUT:g} s (GET {url}: {last})")
            self.nap(0.1)
        return False

    def stop(self) -> list[str]:
        """SIGTERM every live child (load source first), SIGKILL what is left after STOP_TIMEOUT."""
        notes = []
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
                    notes.append(f"the {child.name} did not stop within {STOP_TIMEOUT:g} s; killed it")
        return notes

    # -- output ----------------------------------------------------------------------

    def banner(self) -> None:
        s, ports = self.settings, self.ports
        ranks = "rank" if s.dp_size == 1 else "ranks"
        what = f"a toy engine with {s.dp_size} {ranks}" if s.engine else f"{s.dp_size} simulated {ranks}"
        grpc_flag = "" if ports.grpc == DEFAULT_GRPC_PORT and s.host == "127.0.0.1" \
            else f" --grpc {s.host}:{ports.grpc}"
        rest = f"http://{s.host}:{ports.http}"
        router = f"http://{s.host}:{ports.router}"
        _say(f"loadsvc demo: {what} publishing into {self.region}")
        _say(f"  gRPC  {s.host}:{ports.grpc}    loadsvc.v1.LoadService (GetLoads, WatchLoads), "
             "SGLang GetLoads, health, reflection")
        _say(f"  REST  {rest}/v1/loads    (also /health, /metrics)")
        if s.engine:
            _say(f"  engine HTTP  http://{s.host}:{ports.engine_http}    "
                 "(SGLang-like /generate, /v1/completions)")
            _say(f"  router HTTP  {router}    "
                 "(reference P2C router over WatchLoads; its view: /router/workers)")
        _say()
        _say("Try, in another terminal:")
        _say(f"  curl -s '{rest}/v1/loads?include=all'")
        _say(f"  loadsvc get{grpc_flag}")
        _say(f"  loadsvc watch{grpc_flag}        # live table; Ctrl-C leaves it")
        if s.engine:
            _say(f"  curl -s {router}/generate "
                 "-d '{\"text\": \"hello\", \"sampling_params\": {\"max_new_tokens\": 64}}'")
            _say(f"  curl -s {router}/router/workers")
        _say()
        _say("Ctrl-C stops the demo.")


def _check(settings: DemoSettings) -> None:
    if settings.engine and importlib.util.find_spec("loadsvc.tools.engine") is None:
        raise DemoError("--engine (toy inference engines and the reference router) is not available "
                        "yet in this loadsvc; run `loadsvc demo` without --engine for the simulator",
                        code=2)


def run_demo(settings: DemoSettings) -> int:
    """`loadsvc demo`: 0 after a clean Ctrl-C/SIGTERM, 1 when it could not start or a child failed."""
    try:
        _check(settings)
        ports, notes = _resolve_ports(settings)
    except DemoError as e:
        _error(str(e))
        return e.code
    for note in notes:
        _say(f"loadsvc demo: {note}")
    region = settings.shm or default_path(f"demo-{os.getpid()}-{secrets.token_hex(3)}")
    owns_region = not region.exists()
    demo = _Demo(settings, region, ports)
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, demo.on_signal) for sig in stop_signals}
    code = 0
    try:
        demo.start()
        if demo.wait_ready():
            demo.banner()
            while not demo.stop_signal:
                child = demo.failed_child()
                if child is not None:
                    _error(f"the {child.name} exited with code {child.exited()} (its messages are above); "
                           "stopping")
                    code = 1
                    break
                demo.nap(0.2)
    except DemoError as e:
        _error(str(e))
        code = 1
    finally:
        for note in demo.stop():
            _error(note)
        if owns_region:
            region.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        _say(f"loadsvc demo: stopped ({demo.stop_signal or 'done'}); "
             + ("removed " + str(region) if owns_region else f"kept {region}"))
    return code
