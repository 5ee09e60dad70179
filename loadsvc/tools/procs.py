"""Processes and ports, for the tools, the benchmarks and the tests (one copy of each helper).

    loadsvc_command(...) / python_command(...)   argv to start loadsvc (or another Python tool)
    free_port() / port_in_use() / port_answers() a port to listen on; is one taken; does it answer
    wait_listening(port, proc)                   until a started server accepts connections
    stop_process(proc, timeout)                  SIGTERM, wait, then SIGKILL

`python -m loadsvc` puts the current directory first on sys.path, so a folder
named `loadsvc/` there (a clone of the repository, in the directory the demo is
started from) would be imported instead of the installed package. `-P` (Python
3.11's safe path, as PYTHONSAFEPATH) leaves the current directory out; the rest
of sys.path is the same, and multiprocessing passes -P on to its own children.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

__all__ = ["loadsvc_command", "python_command", "free_port", "port_in_use", "port_answers",
           "wait_listening", "stop_process"]


def python_command(*args: str) -> list[str]:
    """This interpreter with -P, then args: python_command("-m", "smg", ...), ("-c", code)."""
    return [sys.executable, "-P", *args]


def loadsvc_command(*args: str) -> list[str]:
    """The `loadsvc` command run by this interpreter, whatever the current directory holds."""
    return python_command("-m", "loadsvc", *args)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at host right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port (a plain bind with SO_REUSEADDR fails)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # a server started there reports an unresolvable host itself
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError:
            return True
    return False


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True when host:port accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0,
                   host: str = "127.0.0.1") -> None:
    """Until host:port accepts a connection; RuntimeError if proc exits first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not port_answers(port, host):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not listen on port {port} within {timeout} s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM proc if it still runs, wait up to timeout s, then SIGKILL; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
