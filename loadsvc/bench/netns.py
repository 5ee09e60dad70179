"""Network-namespace "hosts" on one bridge, for running a compose topology without Docker.

    root namespace: bridge lsb<tag> 10.77.N.1/24
        |-- veth -- netns ls<tag>-node0   eth0 10.77.N.2   /etc/netns/ls<tag>-node0/hosts
        |-- veth -- netns ls<tag>-node1   eth0 10.77.N.3   (every service name -> its address)
        ...

`ip netns exec NS cmd` bind-mounts /etc/netns/NS/hosts over /etc/hosts (and
resolv.conf, pointing at no server) for cmd, so service names resolve as
Docker's embedded DNS would resolve them. Names carry a random
tag and the subnet is one not already routed here, so parallel runs do not
clash. Topology.close() removes every namespace, the bridge and the hosts files,
and kills what it started; it runs even when a test fails.

Used by `loadsvc bench relay` and tests/test_netns.py. Needs root and iproute2.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

NETNS_ETC = Path("/etc/netns")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`, no CAP_SYS_ADMIN ...)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def check_available() -> None:
    """Raise NetnsUnavailable with the reason when this machine cannot host the topology."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CI runs this test as root)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
    name = f"lsprobe{secrets.token_hex(3)}"
    result = _ip("netns", "add", name, check=False)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` failed: {result.stderr.strip()}")
    _ip("netns", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.77.N.0/24 that no interface or route here uses yet."""
    used = _ip("-4", "route", "show").stdout + _ip("-4", "addr", "show").stdout
    candidates = list(range(1, 255))
    secrets.SystemRandom().shuffle(candidates)
    for n in candidates:
        if f"10.77.{n}." not in used:
            return ipaddress.ip_network(f"10.77.{n}.0/24")
    raise NetnsUnavailable("no free 10.77.N.0/24 subnet")


class Topology:
    """One bridge and one namespace per host name; processes started in them are tracked."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.tag = secrets.token_hex(3)
        self.bridge = f"lsb{self.tag}"
        self.subnet = _free_subnet()
        addrs = list(self.subnet.hosts())
        self.gateway = str(addrs[0])  # the bridge: the test process reaches the hosts through it
        self.addr = {h: str(addrs[i + 1]) for i, h in enumerate(hosts)}
        self.ns = {h: f"ls{self.tag}-{h}" for h in hosts}
        self._procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self._made_ns: list[str] = []
        self._made_bridge = False

    # -- lifecycle -------------------------------------------------------------------

    def up(self) -> Topology:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made_bridge = True
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            hosts_text = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
                f"{addr} {host}\n" for host, addr in self.addr.items())
            for i, (host, ns) in enumerate(self.ns.items()):
                _ip("netns", "add", ns)
                self._made_ns.append(ns)
                outer, inner = f"lv{self.tag}{i}", f"lp{self.tag}{i}"
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", inner, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{self.addr[host]}/{self.subnet.prefixlen}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "route", "add", "default", "via", self.gateway)
                etc = NETNS_ETC / ns
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(hosts_text)
                # No DNS server is reachable from the namespaces; a refused query on
                # loopback lets resolvers that try DNS first (gRPC's c-ares) move on
                # to the hosts file at once instead of timing out for seconds.
                (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for proc, _log in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc, log in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            log.close()
        self._procs.clear()
        for ns in self._made_ns:
            _ip("netns", "del", ns, check=False)  # its veth ends go with it
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._made_ns.clear()
        try:
            NETNS_ETC.rmdir()  # only when nobody else keeps files there
        except OSError:
            pass
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
            self._made_bridge = False

    def __enter__(self) -> Topology:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes ---------------------------------------------------------------------

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def start(self, host: str, argv: Sequence[str], log_path: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Run argv inside host's namespace, output to log_path; killed by close()."""
        log = open(log_path, "ab")
        proc = subprocess.Popen([*self.prefix(host), *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        self._procs.append((proc, log))
        return proc

    def run(self, host: str, argv: Sequence[str], timeout: float = 30.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(host), *argv], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode


def wait_until(predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str],
               interval: float = 0.1) -> Any:
    """Call predicate until it returns something truthy; AssertionError after timeout seconds.

    what: a description, or a callable giving one (evaluated only on failure, e.g. logs).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the service is not up yet: keep trying, report the last error
            last_error = e
        time.sleep(interval)
    if callable(what):
        what = what()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))
