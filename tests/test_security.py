"""Security of `loadsvc serve`: region file mode, TLS and mutual TLS, the API key, where it listens.

    region file        0600 (serve --group-readable: 0660)
    --tls-cert/--tls-key            gRPC and REST over TLS only (plaintext clients fail)
    --tls-client-ca                 mutual TLS: clients without a certificate from that CA fail
    --api-key / $LOADSVC_API_KEY    `Authorization: Bearer KEY` (REST header, gRPC metadata) on every
                                    endpoint but health (and ORCA, see loadsvc/surfaces/orca.py), compared with
                                    hmac.compare_digest
    --host                          127.0.0.1 by default; beyond loopback without TLS or a key: a warning
    loadsvc get/watch --tls-ca --api-key   work against such a server

Certificates are made here with `cryptography` (a throwaway CA, a server certificate
for 127.0.0.1/localhost, a client certificate). Every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import ServeProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loadsvc import LoadSnapshot, ShmPublisher
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc
from loadsvc._proto.sglang.grpc.scheduler import sglang_scheduler_pb2 as sg
from loadsvc._proto.sglang.grpc.scheduler import sglang_scheduler_pb2_grpc as sg_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
KEY = "k3y-for-tests-only"
WARNING = "without TLS or an API key"


# -- certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path  # from a CA the server does not trust
    other_client_key: Path


def _write_certs(directory: Path) -> Certs:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def make_ca(cn: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(ca_key: Any, ca_cert: Any, cn: str, usage: Any, sans: list[Any]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("loadsvc test CA")
    server_key, server_cert = leaf(ca_key, ca_cert, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                                   [x509.DNSName("localhost"),
                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key, client_cert = leaf(ca_key, ca_cert, "router-1", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    other_ca_key, other_ca_cert = make_ca("someone else's CA")
    other_key, other_cert = leaf(other_ca_key, other_ca_cert, "intruder", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def write(file: str, data: bytes) -> Path:
        path = directory / file
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    pem = serialization.Encoding.PEM
    return Certs(
        ca=write("ca.pem", ca_cert.public_bytes(pem)),
        server_cert=write("server.pem", server_cert.public_bytes(pem)),
        server_key=write("server.key", pem_key(server_key)),
        client_cert=write("client.pem", client_cert.public_bytes(pem)),
        client_key=write("client.key", pem_key(client_key)),
        other_client_cert=write("other.pem", other_cert.public_bytes(pem)),
        other_client_key=write("other.key", pem_key(other_key)),
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return _write_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def region(shm_path: Path) -> Iterator[Path]:
    """A 2-rank region with both ranks published (the publishers stay open during the test)."""
    pubs = [ShmPublisher(shm_path, dp_size=2, dp_rank=r) for r in range(2)]
    for r, pub in enumerate(pubs):
        pub.publish(LoadSnapshot(dp_rank=r, num_running_reqs=10 + r))
    yield shm_path
    for pub in pubs:
        pub.close()


def _grpc_creds(certs: Certs, client: bool = False, other: bool = False) -> grpc.ChannelCredentials:
    kwargs: dict[str, bytes] = {}
    if client:
        kwargs = {"private_key": certs.client_key.read_bytes(), "certificate_chain": certs.client_cert.read_bytes()}
    if other:
        kwargs = {"private_key": certs.other_client_key.read_bytes(),
                  "certificate_chain": certs.other_client_cert.read_bytes()}
    return grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes(), **kwargs)


def _get(channel: grpc.Channel, **kw: Any) -> Any:
    return pb_grpc.LoadServiceStub(channel).GetLoads(pb.GetLoadsRequest(), timeout=5, **kw)


def _grpc_code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) with a listening socket on port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # TCP_LISTEN
                found.add(addr)
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as ::ffff:127.0.0.1
ANY_V4 = "00000000"
ANY_V6 = "0" * 32


# -- the region file -----------------------------------------------------------------------


@pytest.mark.parametrize("flags, mode", [((), 0o600), (("--group-readable",), 0o660)])
def test_region_file_mode(shm_path: Path, serve_process: Any, flags: tuple[str, ...], mode: int) -> None:
    old = os.umask(0)  # a permissive umask must not widen the file (nor a strict one narrow it)
    try:
        server = serve_process(shm_path, dp_size=2, args=list(flags))
    finally:
        os.umask(old)
    assert shm_path.stat().st_mode & 0o777 == mode
    assert server.stop() == 0


@pytest.mark.integration
def test_region_created_by_a_publisher_is_0600(shm_path: Path) -> None:
    old = os.umask(0)
    try:
        subprocess.run([sys.executable, "-m", "loadsvc", "simulate", "--shm", str(shm_path), "--dp-size", "1",
                        "--duration", "0.2"], check=True, capture_output=True, timeout=60)
    finally:
        os.umask(old)
    assert shm_path.stat().st_mode & 0o777 == 0o600


# -- where it listens -----------------------------------------------------------------------------


def test_listens_on_loopback_by_default(region: Path, serve_process: Any) -> None:
    server = serve_process(region)
    for port in (server.grpc_port, server.http_port):
        assert _listening(port) and _listening(port) <= LOOPBACK, (port, _listening(port))
    assert WARNING not in server.wait_for_log("REST listening")
    assert server.stop() == 0


def test_warns_when_listening_beyond_loopback_unprotected(region: Path, serve_process: Any) -> None:
    server = serve_process(region, args=["--host", "0.0.0.0"])  # the test itself only uses 127.0.0.1
    for port in (server.grpc_port, server.http_port):
        assert _listening(port) & {ANY_V4, ANY_V6}, (port, _listening(port))
    server.wait_for_log("listening on 0.0.0.0 without TLS or an API key")
    with grpc.insecure_channel(server.grpc_target) as ch:
        assert len(_get(ch).loads) == 2
    assert server.stop() == 0


def test_no_warning_beyond_loopback_with_a_key(region: Path, serve_process: Any) -> None:
    server = serve_process(region, args=["--host", "0.0.0.0", "--api-key", KEY])
    assert httpx.get(f"{server.http_url}/health", timeout=5).status_code == 200
    assert WARNING not in server.wait_for_log("REST listening")
    assert server.stop() == 0


# -- TLS -------------------------------------------------------------------------------------------------


def _tls_args(certs: Certs, client_ca: bool = False) -> list[str]:
    args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    return args + (["--tls-client-ca", str(certs.ca)] if client_ca else [])


def test_tls_for_grpc_and_rest(region: Path, serve_process: Any, certs: Certs) -> None:
    server = serve_process(region, args=["--host", "0.0.0.0", *_tls_args(certs)])
    log = server.wait_for_log(f"REST listening on https://0.0.0.0:{server.http_port}")
    assert WARNING not in log and "(TLS" in log

    with grpc.secure_channel(server.grpc_target, _grpc_creds(certs)) as ch:
        assert [x.num_running_reqs for x in _get(ch).loads] == [10, 11]
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == SERVING
    with grpc.insecure_channel(server.grpc_target) as ch:  # plaintext is refused
        assert _grpc_code(lambda: _get(ch)) == grpc.StatusCode.UNAVAILABLE

    https = f"https://127.0.0.1:{server.http_port}"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca)), timeout=5) as client:
        body = client.get(f"{https}/v1/loads").json()
        assert [x["num_running_reqs"] for x in body["loads"]] == [10, 11]
        assert client.get(f"{https}/health").status_code == 200
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP on the TLS port
        httpx.get(f"http://127.0.0.1:{server.http_port}/v1/loads", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
        httpx.get(f"{https}/v1/loads", timeout=5)
    assert server.stop() == 0


def test_mutual_tls(region: Path, serve_process: Any, certs: Certs) -> None:
    server = serve_process(region, args=_tls_args(certs, client_ca=True))

    with grpc.secure_channel(server.grpc_target, _grpc_creds(certs, client=True)) as ch:
        assert len(_get(ch).loads) == 2
    for creds in (_grpc_creds(certs), _grpc_creds(certs, other=True)):  # no certificate / untrusted one
        with grpc.secure_channel(server.grpc_target, creds) as ch:
            assert _grpc_code(lambda: _get(ch)) == grpc.StatusCode.UNAVAILABLE

    # loadsvc get with and without a client certificate
    get = [sys.executable, "-m", "loadsvc", "get", "--json", "--grpc", server.grpc_target,
           "--tls-ca", str(certs.ca)]
    ok = subprocess.run([*get, "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["loads"]) == 2
    refused = subprocess.run(get, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr

    https = f"https://127.0.0.1:{server.http_port}"

    def context(cert: Path | None, key: Path | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    with httpx.Client(verify=context(certs.client_cert, certs.client_key), timeout=5) as client:
        assert len(client.get(f"{https}/v1/loads").json()["loads"]) == 2
    for cert, key in ((None, None), (certs.other_client_cert, certs.other_client_key)):
        with httpx.Client(verify=context(cert, key), timeout=5) as client:
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                client.get(f"{https}/v1/loads")
    assert server.stop() == 0


@pytest.mark.integration
def test_tls_files_missing_fail_at_start(region: Path, certs: Certs, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "loadsvc", "serve", "--shm", str(region), "--grpc-port", "0",
                           "--http-port", "0", "--tls-cert", str(tmp_path / "missing.pem"),
                           "--tls-key", str(certs.server_key)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"cannot read TLS file {tmp_path / 'missing.pem'}" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "loadsvc", "serve", "--shm", str(region),
                           "--tls-cert", str(certs.server_cert)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--tls-cert and --tls-key go together" in proc.stderr


# -- the API key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_api_key_on_every_endpoint_but_health(region: Path, serve_process: Any, how: str) -> None:
    if how == "flag":
        server = serve_process(region, args=["--api-key", KEY])
    else:
        server = serve_process(region, env={"LOADSVC_API_KEY": KEY})
    good = {"authorization": f"Bearer {KEY}"}
    bad_headers = [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"},
                   {"authorization": f"Bearer {KEY}x"}, {"authorization": KEY}]

    for path in ("/v1/loads", "/v1/loads?format=prometheus", "/metrics"):
        url = f"{server.http_url}{path}"
        for headers in bad_headers:
            r = httpx.get(url, headers=headers, timeout=5)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["field"] == "authorization"
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url, headers=good, timeout=5).status_code == 200
    assert httpx.get(f"{server.http_url}/health", timeout=5).status_code == 200  # open

    good_md = (("authorization", f"Bearer {KEY}"),)
    bad_mds = [(), (("authorization", "Bearer nope"),), (("authorization", f"basic {KEY}"),)]
    with grpc.insecure_channel(server.grpc_target) as ch:
        load = pb_grpc.LoadServiceStub(ch)
        sglang = sg_grpc.SglangSchedulerStub(ch)
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        calls = {
            "GetLoads": lambda md: load.GetLoads(pb.GetLoadsRequest(), metadata=md, timeout=5),
            "WatchLoads": lambda md: next(load.WatchLoads(pb.WatchLoadsRequest(), metadata=md, timeout=5)),
            "SGLang GetLoads": lambda md: sglang.GetLoads(sg.GetLoadsRequest(), metadata=md, timeout=5),
            "reflection": lambda md: next(reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md, timeout=5)),
        }
        for name, call in calls.items():
            for md in bad_mds:
                assert _grpc_code(lambda call=call, md=md: call(md)) == grpc.StatusCode.UNAUTHENTICATED, (name, md)
            assert _grpc_code(lambda call=call: call(good_md)) == grpc.StatusCode.OK, name
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == SERVING  # open
    assert KEY not in server.log()  # the key is never logged
    assert server.stop() == 0


@pytest.mark.integration
@pytest.mark.parametrize("command", ["serve", "get", "watch"])
@pytest.mark.parametrize(("how", "key"), [("flag", ""), ("flag", "   "), ("flag", " k3y"), ("env", ""),
                                          ("env", "k3y\n")])
def test_an_empty_or_blank_api_key_is_refused(shm_path: Path, command: str, how: str, key: str) -> None:
    """Refused before anything starts, in one line (exit 2): an empty key would turn auth off."""
    from conftest import free_port

    args = (["--shm", str(shm_path), "--grpc-port", str(free_port()), "--http-port", str(free_port())]
            if command == "serve" else ["--grpc", f"127.0.0.1:{free_port()}"])
    env = {k: v for k, v in os.environ.items() if k != "LOADSVC_API_KEY"}
    if how == "flag":
        args += ["--api-key", key]
    else:
        env["LOADSVC_API_KEY"] = key
    try:
        done = subprocess.run([sys.executable, "-m", "loadsvc", command, *args], capture_output=True,
                              text=True, timeout=20, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"loadsvc {command} ran with the API key {key!r}") from None
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ("--api-key" if how == "flag" else "$LOADSVC_API_KEY") in lines[0], lines
    assert not shm_path.exists()  # serve never got as far as the region


async def test_an_empty_api_key_is_refused_from_python(shm_path: Path) -> None:
    from loadsvc.core.store import LoadStore
    from loadsvc.server import ServeError, serve
    from loadsvc.settings import ServeSettings, StoreSettings
    from loadsvc.surfaces.rest import create_app

    with pytest.raises(ServeError, match="empty"):
        await serve(ServeSettings(StoreSettings(shm=shm_path), api_key=" "))
    store = LoadStore(StoreSettings(shm=shm_path))
    try:
        with pytest.raises(ValueError, match="api_key is empty"):
            create_app(store, api_key="")
    finally:
        store.close()


async def test_api_key_is_compared_in_constant_time(shm_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both surfaces check the key with hmac.compare_digest (a spy sees every comparison)."""
    from loadsvc.core.store import LoadStore
    from loadsvc.settings import StoreSettings
    from loadsvc.surfaces.grpc import add_load_services
    from loadsvc.surfaces.rest import create_app

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    store = LoadStore(StoreSettings(shm=shm_path, dp_size=1))
    try:
        transport = httpx.ASGITransport(app=create_app(store, api_key=KEY))
        async with httpx.AsyncClient(transport=transport, base_url="http://loadsvc") as client:
            assert (await client.get("/v1/loads", headers={"authorization": "Bearer guess"})).status_code == 401
            assert (await client.get("/metrics", headers={"authorization": f"Bearer {KEY}"})).status_code == 200
        assert compared == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]

        compared.clear()
        server = grpc.aio.server()
        add_load_services(server, store, api_key=KEY)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.LoadServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetLoads(pb.GetLoadsRequest(), metadata=(("authorization", "Bearer guess"),))
                await stub.GetLoads(pb.GetLoadsRequest(), metadata=(("authorization", f"Bearer {KEY}"),))
        finally:
            await server.stop(None)
        assert compared == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]
    finally:
        store.close()


# -- the CLI clients against a protected server -----------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadsvc", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_get_and_watch_with_tls_ca_and_api_key(region: Path, serve_process: Any, certs: Certs) -> None:
    server: ServeProcess = serve_process(region, args=[*_tls_args(certs), "--api-key", KEY,
                                                       "--stale-after", "300", "--unreachable-after", "600"])
    target = ["--grpc", server.grpc_target, "--tls-ca", str(certs.ca)]

    ok = _cli("get", *target, "--api-key", KEY, "--json")
    assert ok.returncode == 0, ok.stderr
    assert [x["num_running_reqs"] for x in json.loads(ok.stdout)["loads"]] == [10, 11]

    env = _cli("get", *target, env={"LOADSVC_API_KEY": KEY})
    assert env.returncode == 0, env.stderr
    assert "2/2 ranks healthy" in env.stdout

    watch = _cli("watch", *target, "--api-key", KEY, "--count", "2", "--max-interval-ms", "100")
    assert watch.returncode == 0, watch.stderr
    assert watch.stdout.count("2/2 ranks healthy") == 2

    no_key = _cli("get", *target)
    assert no_key.returncode == 1
    assert "rejected the request" in no_key.stderr and "--api-key" in no_key.stderr, no_key.stderr
    no_ca = _cli("get", "--grpc", server.grpc_target, "--api-key", KEY)  # plaintext to a TLS port
    assert no_ca.returncode == 1 and "cannot reach loadsvc" in no_ca.stderr, no_ca.stderr
    missing_ca = _cli("get", "--grpc", server.grpc_target, "--tls-ca", "/nonexistent/ca.pem")
    assert missing_ca.returncode == 2 and "cannot read --tls-ca /nonexistent/ca.pem" in missing_ca.stderr
    assert server.stop() == 0
