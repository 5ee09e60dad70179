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
package in them (see loadsvc/_spawn.py).

``--engine`` runs real routing instead of the bare simulator: the toy
inference engine (loadsvc/engine.py, --dp-size ranks, the last one at half
speed) publishes into the region, and the reference router (loadsvc/router.py)
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
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadsvc._spawn import loadsvc_command
from loadsvc.settings import DemoSettings
from loadsvc.shm import default_path

__all__ = ["run_demo"]

READY_TIMEOUT = 60.0  # seconds for the server to answer and every rank to publish
STOP_TIMEOUT = 5.0  # seconds children get after SIGTERM before SIGKILL
DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8000


class DemoError(RuntimeError):
    """The demo cannot start; the message says why and what to change. code: the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _say(text: str = "") -> None:
    print(text, flush=True)


def _error(text: str) -> None:
    print(f"loadsvc demo: {text}", file=sys.stderr, flush=True)


def _port_in_use(host: str, port: int) -> bool:
    """True when something listens on host:port (a plain bind with SO_REUSEADDR fails)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the server reports an unresolvable host itself
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError:
            return True
    return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


@dataclass
class _Demo:
    settings: DemoSettings
    region: Path
    children: list[_Child] = field(default_factory=list)
    stop_signal: str = ""
    engine_port: int = 0
    router_port: int = 0

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
        s = self.settings
        py = loadsvc_command("--log-level", "WARNING")
        server = _Child("server", [*py, "serve", "--shm", str(self.region), "--dp-size", str(s.dp_size),
                                   "--host", s.host, "--grpc-port", str(s.grpc_port),
                                   "--http-port", str(s.http_port)])
        extra: list[_Child] = []
        if s.engine:
            self.engine_port, engine_grpc = _free_port(s.host), _free_port(s.host)
            self.router_port = _free_port(s.host)
            speeds = ",".join("0.5" if s.dp_size > 1 and i == s.dp_size - 1 else "1" for i in range(s.dp_size))
            source = _Child("engine", [*py, "engine", "--dp-size", str(s.dp_size), "--speeds", speeds,
                                       "--shm", str(self.region), "--host", s.host,
                                       "--port", str(self.engine_port), "--grpc-port", str(engine_grpc)])
            extra = [_Child("router", [*py, "router", "--host", s.host, "--port", str(self.router_port),
                                       "--worker", f"http://{s.host}:{self.engine_port}={s.host}:{engine_grpc}"])]
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
        url = f"http://{s.host}:{s.http_port}/health"
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
                    router = f"http://{s.host}:{self.router_port}/health"
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
        s = self.settings
        what = (f"{s.dp_size} toy engine ranks" if s.engine else f"{s.dp_size} simulated ranks")
        grpc_flag = "" if s.grpc_port == DEFAULT_GRPC_PORT and s.host == "127.0.0.1" \
            else f" --grpc {s.host}:{s.grpc_port}"
        rest = f"http://{s.host}:{s.http_port}"
        _say(f"loadsvc demo: {what} publishing into {self.region}")
        _say(f"  gRPC  {s.host}:{s.grpc_port}    loadsvc.v1.LoadService (GetLoads, WatchLoads), "
             "SGLang GetLoads, health, reflection")
        _say(f"  REST  {rest}/v1/loads    (also /health, /metrics)")
        if s.engine:
            _say(f"  engine HTTP  http://{s.host}:{self.engine_port}    (SGLang-like /generate, /v1/completions)")
            _say(f"  router HTTP  http://{s.host}:{self.router_port}    (reference P2C router over "
                 "WatchLoads; its view: /router/workers)")
        _say()
        _say("Try, in another terminal:")
        _say(f"  curl -s '{rest}/v1/loads?include=all'")
        _say(f"  loadsvc get{grpc_flag}")
        _say(f"  loadsvc watch{grpc_flag}        # live table; Ctrl-C leaves it")
        if s.engine:
            _say(f"  curl -s http://{s.host}:{self.router_port}/generate "
                 "-d '{\"text\": \"hello\", \"sampling_params\": {\"max_new_tokens\": 64}}'")
            _say(f"  curl -s http://{s.host}:{self.router_port}/router/workers")
        _say()
        _say("Ctrl-C stops the demo.")


def _check(settings: DemoSettings) -> None:
    if settings.engine and importlib.util.find_spec("loadsvc.engine") is None:
        raise DemoError("--engine (toy inference engines and the reference router) is not available "
                        "yet in this loadsvc; run `loadsvc demo` without --engine for the simulator",
                        code=2)
    if settings.grpc_port == settings.http_port:
        raise DemoError(f"--grpc-port and --http-port are both {settings.grpc_port}; give them "
                        "different ports", code=2)
    for port, flag, what in ((settings.grpc_port, "--grpc-port", "gRPC"),
                             (settings.http_port, "--http-port", "REST")):
        if port == 0:
            raise DemoError(f"{flag} 0 is not supported by the demo; give a port number", code=2)
        if _port_in_use(settings.host, port):
            raise DemoError(f"port {port} on {settings.host} ({what}) is already in use, perhaps by "
                            f"another loadsvc demo or serve; pick another with {flag} PORT")


def run_demo(settings: DemoSettings) -> int:
    """`loadsvc demo`: 0 after a clean Ctrl-C/SIGTERM, 1 when it could not start or a child failed."""
    try:
        _check(settings)
    except DemoError as e:
        _error(str(e))
        return e.code
    region = settings.shm or default_path(f"demo-{os.getpid()}-{secrets.token_hex(3)}")
    owns_region = not region.exists()
    demo = _Demo(settings, region)
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
