"""Shared fixtures: free loopback ports, unique region files, a `loadsvc serve` subprocess.

    free_port()                        a TCP port free on 127.0.0.1 right now
    shm_path (fixture)                 a unique /dev/shm/loadsvc-test-*.shm path, removed afterwards
    start_serve(shm, ...)              `python -m loadsvc serve` on free ports, returned once both
                                       ports accept connections (ServeProcess)
    serve_process (fixture)            a factory around start_serve that stops what it started
    fleet (fixture)                    a loadsvc.tools.fleet.Fleet (toy engines, routers, smg), stopped after
    wait_for(predicate, timeout, what) poll until predicate() is truthy; return its value
    forge_publish(shm, rank, n, payload) write payload as publish n of rank with a valid checksum,
                                       as a foreign writer bypassing ShmPublisher would
    drive(url, n, concurrency, ...)    n POST /generate through url, at most concurrency at once
    vllm_python, tiny_model (fixtures) the vLLM venv's python, a tiny Llama built here (session-wide)
    Burst(url, model, ...)             completions kept in flight on a vLLM until the test saw enough

A test that starts another process is marked `integration` (pyproject.toml), so that
`pytest -m "not integration"` is a fast inner loop: per module with `pytestmark`, per test
with `@pytest.mark.integration`, and here for every test taking serve_process or fleet.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadsvc import default_path
from loadsvc.tools.procs import free_port, port_answers, port_in_use  # noqa: F401  (tests import them from here)

# Every Python the tests start (`python -m loadsvc ...`, `python -c ...`) imports the installed
# loadsvc, never a `loadsvc/` folder of the current directory (as loadsvc/tools/procs.py does for the
# processes loadsvc itself starts).
os.environ.setdefault("PYTHONSAFEPATH", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"serve_process", "fleet"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def shm_path() -> Iterator[Path]:
    """A region path unique to this test; the file is removed afterwards."""
    path = default_path(f"test-{os.getpid()}-{uuid.uuid4().hex[:10]}")
    yield path
    path.unlink(missing_ok=True)


@dataclass
class ServeProcess:
    """A running `loadsvc serve` subprocess; its output goes to a log file (see log())."""

    proc: subprocess.Popen[bytes]
    shm: Path
    grpc_port: int
    http_port: int
    log_path: Path
    host: str = "127.0.0.1"
    _log_file: object = field(default=None, repr=False)

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def loads(self) -> dict[int, dict[str, Any]]:
        """GET /v1/loads: each rank's entry by dp_rank."""
        body = httpx.get(self.http_url + "/v1/loads", timeout=5).json()
        return {ld["dp_rank"]: ld for ld in body["loads"]}

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on serve's /metrics (labels exactly as given, in order)."""
        text = httpx.get(self.http_url + "/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        m = re.search(rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$", text, re.M)
        assert m, f"{name} {labels} not on /metrics"
        return float(m.group(1))

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """The log once it contains text (lines may follow the ports by a moment)."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log of loadsvc serve within {timeout} s:\n{log}")
            time.sleep(0.02)
        return log

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to timeout; returns the exit code (kills and fails past the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"loadsvc serve did not stop within {timeout} s of SIGTERM; "
                                     f"log:\n{self.log()}") from None
        return self.proc.returncode

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.stop()
        finally:
            if self._log_file is not None:
                self._log_file.close()  # type: ignore[attr-defined]
            self.log_path.unlink(missing_ok=True)


def start_serve(shm: Path, *, dp_size: int | None = None, args: Sequence[str] = (),
                env: dict[str, str] | None = None, grpc_port: int | None = None,
                http_port: int | None = None, host: str = "127.0.0.1", timeout: float = 20.0) -> ServeProcess:
    """Start `python -m loadsvc serve --shm shm` on free ports and wait until both answer.

    host: 127.0.0.1, or an address of a network namespace bridge the test made (--host).
    """
    grpc_port = grpc_port or free_port()
    http_port = http_port or free_port()
    while http_port == grpc_port:
        http_port = free_port()
    cmd = [sys.executable, "-m", "loadsvc", "serve", "--shm", str(shm),
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), *args]
    if host != "127.0.0.1":
        cmd += ["--host", host]
    if dp_size is not None:
        cmd += ["--dp-size", str(dp_size)]
    fd, log_name = tempfile.mkstemp(prefix="loadsvc-serve-", suffix=".log")
    log_file = os.fdopen(fd, "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    server = ServeProcess(proc, shm, grpc_port, http_port, Path(log_name), host=host, _log_file=log_file)
    deadline = time.monotonic() + timeout
    while not (port_answers(grpc_port, host) and port_answers(http_port, host)):
        if proc.poll() is not None:
            text = server.log()
            server.close()
            raise AssertionError(f"loadsvc serve exited with {proc.returncode} before listening:\n{text}")
        if time.monotonic() > deadline:
            text = server.log()
            server.close()
            raise AssertionError(f"loadsvc serve did not listen within {timeout} s:\n{text}")
        time.sleep(0.05)
    return server


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """Factory: serve_process(shm, dp_size=..., args=...) -> ServeProcess, stopped after the test."""
    started: list[ServeProcess] = []

    def start(shm: Path, **kwargs: object) -> ServeProcess:
        server = start_serve(shm, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def fleet() -> Iterator[Any]:
    """A loadsvc.tools.fleet.Fleet: every engine, router and gateway it started is stopped afterwards."""
    from loadsvc.tools.fleet import Fleet

    with Fleet() as f:
        yield f


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call predicate until it returns something truthy (returned); AssertionError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def forge_publish(shm: Path, rank: int, n: int, payload: bytes) -> None:
    """Write payload as publish n of rank, valid checksum and all, then point rank's seq at it.

    What a foreign or buggy writer could do: everything ShmPublisher.publish does except
    its checks. The layout is the one in loadsvc/core/region.py's docstring.
    """
    import struct
    import zlib

    from loadsvc.core import region as shm_mod

    with open(shm, "r+b") as f:
        header = f.read(shm_mod.HEADER_SIZE)
        (_, _, _, _, slot_count, slot_size, capacity, _, _) = shm_mod._HEADER.unpack_from(header, 0)
        seq_off, slots_off, _ = shm_mod._layout(slot_count, capacity)
        base = slots_off + rank * slot_size + (n & 1) * (slot_size // 2)
        t = time.time_ns()
        crc = zlib.crc32(payload, (n * shm_mod._CRC_MUL ^ t) & 0xFFFFFFFF)
        f.seek(base)
        f.write(shm_mod._BUFFER_HEADER.pack(2 * n, t, len(payload) << 32 | crc, 0) + payload)
        f.seek(seq_off + 8 * rank)
        f.write(struct.pack("<Q", n))


async def drive(url: str, n: int, concurrency: int, max_new: int = 32,
                extra: dict[str, Any] | None = None) -> list[int]:
    """n `POST /generate` requests through url, at most concurrency at once; their status codes."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int) -> int:
            async with sem:
                r = await client.post(url + "/generate", json={
                    "text": f"request {i}", "sampling_params": {"max_new_tokens": max_new}, **(extra or {})})
                return r.status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


# -- a real vLLM (tests/test_vllm.py, tests/test_ingest_scrape.py) -------------------------------


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of the vLLM venv (loadsvc.bench.vllm_env) with this tree's loadsvc installed.

    Missing: the test skips, except under CI (CI=true), where a skip would hide a broken install.
    """
    from loadsvc.bench import vllm_env

    why = vllm_env.missing()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the vLLM tests: {why}")
        pytest.skip(why)
    vllm_env.install_loadsvc(Path(__file__).resolve().parent.parent)
    return vllm_env.venv_python()


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (loadsvc.bench.tiny_llama), built once per session."""
    out = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([str(vllm_python), "-m", "loadsvc.bench.tiny_llama", str(out)], check=True,
                   capture_output=True, cwd="/", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


class Burst:
    """Completions kept in flight against a vLLM server, on a thread, until the with block ends (or a time limit).

    The real-vLLM tests sample loads while vLLM is busy. On 2 CPUs under a full suite a
    one-shot burst can end before a sampler saw it: vLLM's API server (detokenizing every
    step's output) starves, and each sample takes seconds. So the burst lasts until the test
    has what it samples for, bounded by limit seconds; requests still running then are dropped.
        with Burst(url, model, in_flight=48, max_tokens=240) as burst:
            wait_for(seen, 150, "...")
        assert set(burst.codes) <= {200} and not burst.errors
    """

    def __init__(self, url: str, model: str, *, in_flight: int, max_tokens: int, limit: float = 150.0) -> None:
        self.url, self.model, self.in_flight, self.max_tokens, self.limit = url, model, in_flight, max_tokens, limit
        self.codes: list[int] = []  # of the completions that finished
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        # A new connection per request: a starved API server may sit past vLLM's 5 s keep-alive, and
        # uvloop runs that timer before it reads a request waiting on the idle connection.
        limits = httpx.Limits(max_connections=self.in_flight, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def worker(i: int) -> None:
                for n in itertools.count():
                    r = await client.post(self.url + "/v1/completions", json={
                        "model": self.model, "prompt": f"request {i}.{n}", "max_tokens": self.max_tokens,
                        "ignore_eos": True})
                    self.codes.append(r.status_code)

            workers = [asyncio.create_task(worker(i)) for i in range(self.in_flight)]
            await asyncio.to_thread(self._stop.wait, self.limit)
            for w in workers:  # requests still running are dropped: vLLM aborts them
                w.cancel()
            for result in await asyncio.gather(*workers, return_exceptions=True):
                if not isinstance(result, asyncio.CancelledError):
                    self.errors.append(result)

    def __enter__(self) -> Burst:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the burst did not stop in 30 s"
