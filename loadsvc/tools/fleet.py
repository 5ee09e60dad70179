"""Local fleets for demos, tests and benchmarks: toy engines, a router, smg and vllm-router.

    with Fleet() as fleet:
        a = fleet.engine(speeds=(1.0,))                  # `loadsvc engine` on free loopback ports
        b = fleet.engine(speeds=(0.25,))
        r = fleet.router([a, b], policy="p2c")           # `loadsvc router` in front of them
        g = fleet.smg([a, b], policy="power_of_two")     # the SGLang gateway (pip install smg)
        v = fleet.vllm_router([a, b])                    # vLLM's router (pip install vllm-router)
        ...                                              # every process gets SIGTERM at exit

Each process runs in its own process group with its output in a log file, and
is returned once it answers over HTTP (the gateway: once it has registered
every worker as healthy). A process that exits or does not answer in time is
a FleetError carrying the end of its log.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from loadsvc._exceptions import LoadsvcError
from loadsvc.tools.procs import free_port, loadsvc_command, python_command

__all__ = ["Fleet", "FleetError", "Proc", "EngineProc", "VllmProc", "free_port", "smg_available",
           "vllm_router_available"]

HOST = "127.0.0.1"


class FleetError(LoadsvcError, RuntimeError):
    """A fleet process did not start; the message ends with its log."""


def smg_available() -> str | None:
    """None when the smg gateway can run here, else why not."""
    if importlib.util.find_spec("smg") is None:
        return "the smg gateway is not installed (pip install 'smg==1.13.0', part of the test extra)"
    return None


def vllm_router_available() -> str | None:
    """None when vllm-router can run here, else why not."""
    if importlib.util.find_spec("vllm_router") is None:
        return "vllm-router is not installed (pip install 'vllm-router==0.1.17', part of the test extra)"
    return None


@dataclass
class Proc:
    """One fleet process: its command, HTTP URL and log."""

    name: str
    cmd: list[str]
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log_file: Any = field(default=None, repr=False)
    _ready: tuple[str, Any] = field(default=("/health", None), repr=False)  # path, check(response)

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to timeout (then SIGKILL); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode


P = TypeVar("P", bound=Proc)


@dataclass
class EngineProc(Proc):
    grpc_port: int = 0

    @property
    def grpc(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def server_info(self) -> dict[str, Any]:
        info: dict[str, Any] = httpx.get(self.url + "/get_server_info", timeout=5).json()
        return info

    def completed(self) -> int:
        """Requests this engine finished (its own counter)."""
        return int(self.server_info()["loadsvc_engine"]["completed"])


@dataclass
class VllmProc(Proc):
    """A real vLLM server (``Fleet.vllm``); killing its process group ends its engine cores too."""

    model: str = ""

    def kill(self) -> None:
        """SIGKILL to the API server and its engine processes, as a crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Fleet:
    """Starts processes on loopback and stops every one of them on exit (or stop_all())."""

    def __init__(self, *, log_dir: str | os.PathLike[str] | None = None, keep_logs: bool = False) -> None:
        self.procs: list[Proc] = []
        self._log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="loadsvc-fleet-"))
        self._keep_logs = keep_logs or log_dir is not None

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop(self, p: Proc) -> int:
        """Stop one process of the fleet before the others; its exit code."""
        code = p.stop()
        self.procs.remove(p)
        if not self._keep_logs:
            p.log_path.unlink(missing_ok=True)
        return code

    def stop_all(self) -> None:
        for p in reversed(self.procs):  # gateways and routers first, then the engines
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            p.stop()
            if not self._keep_logs:
                p.log_path.unlink(missing_ok=True)
        self.procs = []
        if not self._keep_logs:
            try:
                self._log_dir.rmdir()
            except OSError:
                pass

    def _spawn(self, cls: type[P], name: str, cmd: list[str], url: str, *,
               env: dict[str, str] | None = None, **extra: Any) -> P:
        log_path = self._log_dir / f"{name}.log"
        log_file = open(log_path, "wb")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **env} if env else None)
        p = cls(name=name, cmd=cmd, url=url, proc=proc, log_path=log_path, _log_file=log_file, **extra)
        self.procs.append(p)
        return p

    def wait(self, *procs: Proc, timeout: float = 30.0) -> None:
        """Return once every process answers its readiness check (see engine(wait=False))."""
        for p in procs:
            self._wait(p, timeout)

    def _wait(self, p: Proc, timeout: float) -> None:
        path, ready = p._ready
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                if p.proc.poll() is not None:
                    raise FleetError(f"{p.name} exited with {p.proc.returncode} before it was ready "
                                     f"({' '.join(p.cmd)}); its log:\n{p.log()}")
                try:
                    r = client.get(p.url + path)
                    if r.status_code == 200 and (ready is None or ready(r)):
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise FleetError(f"{p.name} was not ready within {timeout:.0f} s "
                                     f"({' '.join(p.cmd)}); its log:\n{p.log()}")
                time.sleep(0.05)

    def engine(self, *, dp_size: int = 1, speeds: Sequence[float] | None = None,
               max_running_requests: int | None = None, max_total_tokens: int | None = None,
               step_ms: float | None = None, batch_knee: float | None = None,
               stale_after: float | None = None, model: str | None = None,
               shm: str | os.PathLike[str] | None = None, args: Sequence[str] = (),
               timeout: float = 30.0, wait: bool = True) -> EngineProc:
        """`loadsvc engine` on free ports, returned once /health answers.

        wait=False returns at once: start several, then ``fleet.wait(*engines)``.
        """
        http_port, grpc_port = free_port(), free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        cmd = [*loadsvc_command("--log-level", "WARNING"), "engine",
               "--dp-size", str(dp_size), "--port", str(http_port), "--grpc-port", str(grpc_port)]
        options = {"--speeds": ",".join(f"{s:g}" for s in speeds) if speeds else None,
                   "--max-running-requests": max_running_requests, "--max-total-tokens": max_total_tokens,
                   "--step-ms": step_ms, "--batch-knee": batch_knee, "--stale-after": stale_after,
                   "--model": model, "--shm": shm}
        for flag, value in options.items():
            if value is not None:
                cmd += [flag, str(value)]
        cmd += list(args)
        n = sum(isinstance(p, EngineProc) for p in self.procs)
        p = self._spawn(EngineProc, f"engine{n}", cmd, f"http://{HOST}:{http_port}", grpc_port=grpc_port)
        if wait:
            self._wait(p, timeout)
        return p

    def router(self, engines: Sequence[EngineProc], *, policy: str = "p2c", seed: int | None = None,
               args: Sequence[str] = (), timeout: float = 30.0) -> Proc:
        """`loadsvc router` in front of engines, returned once it sees every engine's loads."""
        port = free_port()
        cmd = [*loadsvc_command("--log-level", "WARNING"), "router", "--port", str(port),
               "--policy", policy]
        for e in engines:
            cmd += ["--worker", f"{e.url}={e.grpc}"]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        cmd += list(args)
        def all_watched(r: httpx.Response) -> bool:
            return policy != "p2c" or all(w["connected"] and w["ranks"] for w in r.json()["workers"])

        p = self._spawn(Proc, f"router-{policy}", cmd, f"http://{HOST}:{port}",
                        _ready=("/router/workers", all_watched))
        self._wait(p, timeout)
        return p

    def vllm(self, model: str | os.PathLike[str], *, python: str | os.PathLike[str],
             shm: str | os.PathLike[str], dp_size: int = 1, max_num_seqs: int | None = None,
             kv_cache_gib: int = 1, middleware: bool = True, env: dict[str, str] | None = None,
             args: Sequence[str] = (), timeout: float = 240.0, wait: bool = True) -> VllmProc:
        """A real vLLM OpenAI server (CPU) on a free port, publishing into shm through loadsvc's plugin.

        python: the interpreter of a venv with vLLM and loadsvc (loadsvc.bench.vllm_env);
        middleware: serve /v1/loads from vLLM's port (loadsvc.engines.vllm.middleware);
        env: more LOADSVC_* variables. Returned once /health answers (vLLM's, 200 when ready).
        """
        port = free_port()
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", HOST, "--port", str(port), "--max-model-len", "256", "--dtype", "float32",
               "--enforce-eager", "--data-parallel-size", str(dp_size), "--disable-log-stats",
               "--uvicorn-log-level", "warning"]
        if max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(max_num_seqs)]
        if middleware:
            cmd += ["--middleware", "loadsvc.engines.vllm.middleware.LoadsMiddleware"]
        cmd += list(args)
        variables = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                     "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "LOADSVC_SHM": str(shm),
                     **(env or {})}
        n = sum(isinstance(p, VllmProc) for p in self.procs)
        p = self._spawn(VllmProc, f"vllm{n}", cmd, f"http://{HOST}:{port}", env=variables,
                        model=str(model))
        if wait:
            self._wait(p, timeout)
        return p

    def smg(self, engines: Sequence[EngineProc], *, policy: str = "power_of_two",
            load_monitor_interval: float = 1, args: Sequence[str] = (), timeout: float = 60.0) -> Proc:
        """The smg gateway in front of engines, returned once it lists all of them healthy."""
        why = smg_available()
        if why:
            raise FleetError(why)
        port = free_port()
        cmd = [*python_command("-m", "smg"), "launch", "--host", HOST, "--port", str(port),
               "--policy", policy, "--load-monitor-interval", f"{load_monitor_interval:g}",
               "--prometheus-host", HOST, "--prometheus-port", str(free_port()),
               "--log-level", "warn", "--shutdown-grace-period-secs", "1",
               "--worker-urls", *[e.url for e in engines], *args]
        def all_healthy(r: httpx.Response) -> bool:
            workers = r.json().get("workers", [])
            return sum(bool(w.get("is_healthy")) for w in workers) == len(engines)

        p = self._spawn(Proc, f"smg-{policy}", cmd, f"http://{HOST}:{port}", _ready=("/workers", all_healthy))
        self._wait(p, timeout)
        return p

    def vllm_router(self, engines: Sequence[EngineProc], *, policy: str = "power_of_two",
                    load_interval: int = 1, args: Sequence[str] = (), timeout: float = 60.0) -> Proc:
        """vllm-router in front of engines, returned once it answers /readiness.

        load_interval: seconds between its polls of each worker's GET /get_load (whole
        seconds: vllm-router takes them from --worker-startup-check-interval, which
        power_of_two also uses as its load poll period; its default is 30).
        """
        why = vllm_router_available()
        if why:
            raise FleetError(why)
        port = free_port()
        cmd = [*python_command("-m", "vllm_router.launch_router"), "--host", HOST, "--port", str(port),
               "--policy", policy, "--worker-startup-check-interval", str(int(load_interval)),
               "--prometheus-host", HOST, "--prometheus-port", str(free_port()),
               "--log-level", "warning", "--worker-urls", *[e.url for e in engines], *args]
        # RUST_LOG: its --log-level leaves one INFO line per routed request on
        p = self._spawn(Proc, f"vllm-router-{policy}", cmd, f"http://{HOST}:{port}",
                        env={"RUST_LOG": os.environ.get("RUST_LOG", "warn")}, _ready=("/readiness", None))
        self._wait(p, timeout)
        return p

    def oracle(self, engines: Sequence[EngineProc], speeds: Sequence[float], *, max_running: int,
               batch_knee: float = 32.0, seed: int = 0, timeout: float = 30.0) -> Proc:
        """The routing benchmark's oracle (loadsvc.bench.oracle) in front of engines.

        speeds, max_running, batch_knee: the engines' own settings (its timing model).
        """
        port = free_port()
        cmd = [*python_command("-m", "loadsvc.bench.oracle"), "--port", str(port),
               "--max-running", str(max_running), "--batch-knee", f"{batch_knee:g}", "--seed", str(seed)]
        for e, speed in zip(engines, speeds, strict=True):
            cmd += ["--worker", f"{e.url}={speed:g}"]
        p = self._spawn(Proc, "oracle", cmd, f"http://{HOST}:{port}", _ready=("/router/workers", None))
        self._wait(p, timeout)
        return p
