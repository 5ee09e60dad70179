"""GetLoads callers and WatchLoads subscribers in Go, for `loadsvc bench grpc`: a router's view.

Routers are written in Rust, Go or Node; a Python grpc.aio client on the same two
vCPUs adds its own cost to everything it times (about 0.5 ms per GetLoads at p50,
and tens of ms of WatchLoads fan-out, on the development VM), so the targets are
judged with these clients.

The program is loadsvc/bench/gocaller/main.go, built against Debian's packaged
grpc-go in GOPATH mode (no module download: `apt-get install golang-go
golang-google-grpc-dev`, which `.ci/run` does). The binary is cached under
~/.cache/loadsvc, keyed by the source and the Go version, so a run after the
first skips the build.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "Watchers", "build", "poll"]

SOURCE = Path(__file__).with_name("gocaller") / "main.go"
GOPATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put Go sources
INSTALL_HINT = "apt-get install golang-go golang-google-grpc-dev"
BUILD_TIMEOUT = 300.0


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loadsvc"


def build() -> tuple[Path | None, str]:
    """(the caller binary, "") or (None, why it could not be built, with the install hint)."""
    go = shutil.which("go")
    if go is None:
        return None, f"no Go toolchain (`go` not on PATH); install: {INSTALL_HINT}"
    env = {**os.environ, "GO111MODULE": "off", "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "",
           "GOPATH": os.pathsep.join(p for p in (os.environ.get("GOPATH"), GOPATH) if p)}
    try:
        version = subprocess.run([go, "version"], capture_output=True, text=True, timeout=60, env=env).stdout
        source = SOURCE.read_bytes()
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot run `go version` or read {SOURCE}: {e}"
    key = hashlib.sha256(source + version.encode()).hexdigest()[:16]
    cache = _cache_dir()
    binary = cache / f"gocaller-{key}"
    if binary.exists():
        return binary, ""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / "gocaller"
            proc = subprocess.run([go, "build", "-o", str(out), str(SOURCE)], capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT, env={**env, "GOCACHE": str(cache / "go-build")})
            if proc.returncode != 0:
                return None, (f"`go build` of {SOURCE.name} failed (install: {INSTALL_HINT}):\n"
                              f"{proc.stderr.strip()[-1500:]}")
            out.replace(binary)  # atomic: a concurrent run sees the whole binary or none
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot build the Go caller in {cache}: {e}"
    return binary, ""


def poll(binary: Path, target: str, *, callers: int, period: float, seconds: float, warmup: float,
         request: bytes = b"", method: str = "/loadsvc.v1.LoadService/GetLoads") -> dict[str, Any]:
    """Run the callers once: {"lat": sorted seconds, "errors": n, "error_sample": str, "last": bytes}.

    Raises RuntimeError when the program fails (the message carries its stderr)."""
    proc = subprocess.run(
        [str(binary), "-target", target, "-method", method, "-request-hex", request.hex(),
         "-callers", str(callers), "-period", f"{period * 1e6:.0f}us", "-duration", f"{seconds * 1e3:.0f}ms",
         "-warmup", f"{warmup * 1e3:.0f}ms"],
        capture_output=True, text=True, timeout=seconds + warmup + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"Go caller exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    out = json.loads(proc.stdout)
    return {"lat": sorted(ns / 1e9 for ns in out["latencies_ns"]), "errors": out["errors"],
            "error_sample": out["error_sample"], "last": base64.b64decode(out["last"] or "")}


def _watch_fields() -> str:
    """The field numbers the Go watchers read, from the generated code (declared in proto/ only)."""
    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    snapshot = pb.LoadSnapshot.DESCRIPTOR.fields_by_name
    numbers = {"loads": pb.GetLoadsResponse.DESCRIPTOR.fields_by_name["loads"].number,
               **{name: snapshot[name].number for name in ("dp_rank", "seq", "publish_time_ns")}}
    return ",".join(f"{name}={number}" for name, number in numbers.items())


class Watchers:
    """WatchLoads streams in one Go process: start them, wait_ready(), then finish(final_seq).

    finish returns {"lat": sorted ms, "reached": n, "delivered": n, "errors": n, "error_sample": str};
    a latency is a new rank-0 sequence's receive time minus its publish_time_ns."""

    def __init__(self, binary: Path, target: str, subscribers: int, *, per_conn: int = 10,
                 settle: float = 5.0, request: bytes = b"") -> None:
        self.settle = settle
        self.proc = subprocess.Popen(
            [str(binary), "-target", target, "-watch", str(subscribers), "-per-conn", str(per_conn),
             "-settle", f"{settle * 1e3:.0f}ms", "-request-hex", request.hex(), "-fields", _watch_fields()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float) -> None:
        """Block until every stream has had its first message (RuntimeError past timeout or on exit)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if line.strip() != "ready":
            if ready:  # end of output: the program is exiting
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            why = self._stderr()
            self.close()
            raise RuntimeError(f"Go watchers not ready within {timeout:g} s: {why}")

    def finish(self, final_seq: int) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(f"{final_seq}\n", timeout=self.settle + 60)
        except subprocess.TimeoutExpired:
            self.close()
            raise RuntimeError("Go watchers did not finish") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"Go watchers exited {self.proc.returncode}: {err.strip()[-1500:]}")
        r = json.loads(out)
        return {"lat": sorted(ns / 1e6 for ns in r["latencies_ns"]), "reached": r["reached"],
                "delivered": r["delivered"], "errors": r["errors"], "error_sample": r["error_sample"]}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "still waiting for the first message of every stream"
        return (self.proc.stderr.read() if self.proc.stderr else "").strip()[-1500:]
