"""loadsvc/ingest/sglang.py: SGLang's per-scheduler load stream into the region.

The wire format followed is SGLang 0.5.23's
(python/sglang/srt/managers/scheduler_components/load_publisher.py, LoadStat and
SchedulerLoadPublisher.publish_load_stat; the socket came with SGLang PR #34608).

- Golden bytes: frames SGLang 0.5.23's own LoadStat encoder produced (captured
  by running that module), compared byte for byte with loadsvc's encode_frame,
  and decoded back.
- SGLang's own publisher code: tests/sglang_publisher.py --impl sglang runs
  SchedulerLoadPublisher from the unpacked 0.5.23 wheel (loadsvc.bench.sglang_env,
  built by .ci/run; its modules import without CUDA once the package __init__
  files, which import torch, are bypassed). The same tests run with --impl wire,
  a publisher written from the wire shape, so they also run where that
  environment is missing (then the sglang case skips, and fails under CI=true).
- Garbage, appended fields, ordering and the rate limit against a subscriber
  in-process, with raw ZMQ sockets on 127.0.0.1 and a real region.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conftest
import grpc
import msgspec
import pytest
import zmq
from conftest import free_port, wait_for
from prometheus_client import CollectorRegistry

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc
from loadsvc.bench import sglang_env
from loadsvc.core.region import RegionError, ShmReader
from loadsvc.ingest.sglang import (
    REJECT_REASONS,
    Rejected,
    SglangEndpoint,
    SglangSubscriber,
    decode_frame,
    encode_frame,
    parse_server_info,
    to_snapshot,
)
from loadsvc.settings import StoreSettings

HERE = Path(__file__).resolve().parent
STALE_AFTER = 2.5  # above SGLang's 1 s heartbeat, with room for a publisher starved a moment
UNREACHABLE_AFTER = 5.0

# (LoadStat fields, SGLang 0.5.23's msgpack encoding of LoadStat(**fields)), captured from
# sglang/srt/managers/scheduler_components/load_publisher.py's _encoder; the sequence part of
# seq 12345 is 0000000000003039.
GOLDEN = [
    ((3, 4, 100, 1000, 1, 5, 6, 7, 8, 9), "9ba84c6f616453746174030464cd03e8010506070809"),
    ((0, 0, 0, 0, None), "9ba84c6f61645374617400000000c00000000000"),  # defaults: attn_dp_rank nil
    ((2**31 - 1, 65536, 70000, 2**31 - 1, 7, 300, 2**40, 256, 2**50, 2**62),
     "9ba84c6f616453746174ce7fffffffce00010000ce00011170ce7fffffff07cd012ccf0000010000000000cd0100"
     "cf0004000000000000cf4000000000000000"),
]
# The first release's LoadStat (PR #34608): the tag and five fields, attn_dp_rank nil.
GOLDEN_PREFIX = ((1, 2, 3, 4, None), "96a84c6f61645374617401020304c0")


# -- the wire ------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, payload", GOLDEN)
def test_encode_frame_is_sglangs_encoding_byte_for_byte(fields: tuple[Any, ...], payload: str) -> None:
    parts = encode_frame(12345, *fields)
    assert parts == [b"load", bytes.fromhex("0000000000003039"), bytes.fromhex(payload)]
    seq, values = decode_frame(parts)
    assert seq == 12345
    expect = [v if v is not None else -1 for v in fields] + [0] * (10 - len(fields))
    assert list(values) == expect


def test_the_first_releases_six_positions_are_read() -> None:
    fields, payload = GOLDEN_PREFIX
    parts = encode_frame(0, *fields, prefix_only=True)
    assert parts[2] == bytes.fromhex(payload)
    seq, values = decode_frame(parts)
    assert (seq, values) == (0, (1, 2, 3, 4, -1, 0, 0, 0, 0, 0))
    snap = to_snapshot(5, values)
    assert (snap.dp_rank, snap.num_running_reqs, snap.num_waiting_reqs, snap.num_used_tokens,
            snap.max_total_num_tokens, snap.token_usage, snap.max_running_requests) == (5, 1, 2, 3, 4, 0.75, 0)


def test_appended_fields_are_accepted_and_ignored() -> None:
    payload = msgspec.msgpack.encode(["LoadStat", 1, 2, 3, 4, 0, 5, 6, 7, 8, 9, 10, "a future field", [1.5]])
    seq, values = decode_frame([b"load", (7).to_bytes(8, "big"), payload])
    assert (seq, values) == (7, (1, 2, 3, 4, 0, 5, 6, 7, 8, 9))


def test_mapping() -> None:
    snap = to_snapshot(3, (6, 2, 250, 1000, 0, 40, 900, 8, 1, 1), epoch=11)
    assert (snap.dp_rank, snap.num_running_reqs, snap.num_waiting_reqs, snap.num_total_reqs) == (3, 6, 2, 8)
    assert (snap.num_used_tokens, snap.max_total_num_tokens, snap.token_usage) == (250, 1000, 0.25)
    assert (snap.num_waiting_uncached_tokens, snap.num_total_tokens, snap.max_running_requests) == (40, 900, 8)
    assert (snap.utilization, snap.gen_throughput, snap.cache_hit_rate, snap.epoch) == (0.75, 0.0, 0.0, 11)


def _seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _stat(*values: Any) -> bytes:
    return msgspec.msgpack.encode(["LoadStat", *values])


GOOD = _stat(1, 2, 3, 4, 0)
BAD_FRAMES = {
    "malformed": [b"load", _seq(1)],
    "oversized": [b"load", _seq(1), GOOD + b"\x00" * 5000],
    "bad_topic": [b"load-v2", _seq(1), GOOD],  # passes the SUB filter (a prefix), not the check
    "bad_seq": [b"load", b"\x00\x01", GOOD],
    "decode": [b"load", _seq(1), b"\xc1\xc1 not msgpack"],
    "bad_shape": [b"load", _seq(1), _stat(1, 2, 3)],
    "bad_type": [b"load", _seq(1), _stat(1, "2", 3, 4, 0)],
    "non_finite": [b"load", _seq(1), _stat(1, 2, float("nan"), 4, 0)],
    "out_of_range": [b"load", _seq(1), _stat(1, -2, 3, 4, 0)],
}
MORE_BAD = [
    ("bad_topic", [b"lo", _seq(1), GOOD]),  # ZMQ's subscription filter drops this one before serve sees it
    ("bad_seq", [b"load", (2**64 - 1).to_bytes(8, "big"), GOOD]),  # a negative int64
    ("bad_shape", [b"load", _seq(1), msgspec.msgpack.encode({"LoadStat": [1, 2, 3, 4, 0]})]),
    ("bad_shape", [b"load", _seq(1), msgspec.msgpack.encode(["KVEvents", 1, 2, 3, 4, 0])]),
    ("bad_type", [b"load", _seq(1), _stat(True, 2, 3, 4, 0)]),
    ("bad_type", [b"load", _seq(1), _stat(1, 2, 3, 4, 1.5)]),
    ("non_finite", [b"load", _seq(1), _stat(float("inf"), 2, 3, 4, 0)]),
    ("out_of_range", [b"load", _seq(1), _stat(2**31, 2, 3, 4, 0)]),
    ("out_of_range", [b"load", _seq(1), _stat(1, 2, 3, 4, 0, 5, 2**63, 7)]),
    ("bad_type", [b"load", _seq(1), _stat(1, 2, 3, 4, 0, None)]),  # only attn_dp_rank may be nil
]


@pytest.mark.parametrize("reason, parts", [*BAD_FRAMES.items(), *MORE_BAD])
def test_decode_frame_refuses_with_a_reason(reason: str, parts: list[bytes]) -> None:
    with pytest.raises(Rejected) as info:
        decode_frame(parts, 4096)
    assert info.value.reason == reason, str(info.value)
    assert reason in REJECT_REASONS


# -- a subscriber in-process ------------------------------------------------------------------


class RawPublisher:
    """A bound PUB socket on 127.0.0.1 sending whatever the test gives it."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"

    def send(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def raw_publishers() -> Iterator[list[RawPublisher]]:
    pubs = [RawPublisher(), RawPublisher()]
    yield pubs
    for p in pubs:
        p.close()


def _read(shm: Path, rank: int) -> Any:
    try:
        with ShmReader(shm) as reader:
            return reader.read(rank)
    except RegionError:  # not created yet: the subscriber creates it with its first write
        return None


def _connect(sub: SglangSubscriber, pub: RawPublisher, shm: Path, rank: int, first_seq: int) -> int:
    """Send probe frames until the subscriber took one (PUB drops what is sent before SUB joins),
    then one last frame (running 77) and wait for it: ZMQ keeps order on a connection, so every
    probe still in flight has been handled by then. The next sequence to send."""
    seq = first_seq

    def arrived(running: int, again: bool) -> bool:
        nonlocal seq
        if again:
            pub.send(encode_frame(seq, running, 0, 10, 100, rank))
            seq += 1
        snap = _read(shm, rank)
        return snap is not None and snap.num_running_reqs == running

    wait_for(lambda: arrived(1, True), 5, f"rank {rank}'s first frame", interval=0.02)
    arrived(77, True)
    wait_for(lambda: arrived(77, False), 5, f"rank {rank}'s last connecting frame", interval=0.02)
    return seq


def test_garbage_is_counted_per_reason_and_changes_nothing(shm_path: Path,
                                                           raw_publishers: list[RawPublisher]) -> None:
    good, bad = raw_publishers
    registry = CollectorRegistry()
    sub = SglangSubscriber(StoreSettings(shm=shm_path, dp_size=2),
                           [SglangEndpoint(good.address, 0), SglangEndpoint(bad.address, 1)],
                           registry=registry, max_rate=1000.0, max_frame_bytes=4096)
    with sub:
        _connect(sub, good, shm_path, 0, 0)
        seq = _connect(sub, bad, shm_path, 1, 0)
        before = [_read(shm_path, r) for r in (0, 1)]
        accepted = sub.accepted
        garbage = [(r, p) for r, p in [*BAD_FRAMES.items(), *MORE_BAD] if p[0].startswith(b"load")]
        for _, parts in garbage:
            bad.send(parts)
        expected = {reason: 0 for reason in REJECT_REASONS}
        for reason, _ in garbage:
            expected[reason] += 1
        wait_for(lambda: sub.reject.counts == expected, 5, f"every bad frame counted: {sub.reject.counts}")
        # Nothing else changed: both ranks as they were, nothing written.
        assert sub.accepted == accepted
        after = [_read(shm_path, r) for r in (0, 1)]
        assert [(s.seq, s.num_running_reqs) for s in after] == [(s.seq, s.num_running_reqs) for s in before]
        for reason, count in expected.items():
            assert registry.get_sample_value("loadsvc_sglang_frames_rejected_total",
                                             {"reason": reason}) == count, reason

        # Appended fields are accepted; the payload's attn_dp_rank does not move the rank.
        bad.send([b"load", _seq(seq), _stat(7, 1, 50, 100, 3, 0, 0, 0, 0, 0, 99, "future")])
        wait_for(lambda: _read(shm_path, 1).num_running_reqs == 7, 5, "the appended-fields frame")
        # A sequence not after the last on the same connection: refused.
        bad.send(encode_frame(seq - 1, 9, 9, 9, 9, 1))
        wait_for(lambda: sub.reject.counts["stale_seq"] == 1, 5, "the stale sequence counted")
        assert _read(shm_path, 1).num_running_reqs == 7
        # A gap is counted as lost (the publisher's high-water mark dropped frames), the frame taken.
        bad.send(encode_frame(seq + 10, 8, 0, 50, 100, 1))
        wait_for(lambda: _read(shm_path, 1).num_running_reqs == 8, 5, "the frame after a gap")
        assert sub.lost == 9
        # Back to 0 on the same connection: a restarted scheduler, a new incarnation.
        epoch = _read(shm_path, 1).epoch
        bad.send(encode_frame(0, 5, 0, 50, 100, 1))
        wait_for(lambda: _read(shm_path, 1).num_running_reqs == 5, 5, "the restarted sequence")
        assert _read(shm_path, 1).epoch != epoch
        assert registry.get_sample_value("loadsvc_sglang_incarnations_total") == 3


def test_a_burst_is_written_at_most_max_rate_and_the_last_frame_wins(
        shm_path: Path, raw_publishers: list[RawPublisher]) -> None:
    pub, rate = raw_publishers[0], 2.0
    sub = SglangSubscriber(StoreSettings(shm=shm_path, dp_size=1), [SglangEndpoint(pub.address, 0)],
                           registry=CollectorRegistry(), max_rate=rate)
    with sub:
        seq = _connect(sub, pub, shm_path, 0, 0)
        written, limited = _read(shm_path, 0).seq, sub.reject.counts["rate_limited"]
        started = time.monotonic()
        for i in range(40):
            pub.send(encode_frame(seq + i, 100 + i, 0, 10, 100, 0))
        wait_for(lambda: _read(shm_path, 0).num_running_reqs == 139, 5, "the burst's last frame")
        elapsed = time.monotonic() - started
        writes = _read(shm_path, 0).seq - written
        replaced = sub.reject.counts["rate_limited"] - limited
        # Every frame is written or replaced by a newer one before its turn; at most one write
        # per 1/rate s after the first, and the last frame is written.
        assert writes + replaced == 40
        assert 1 <= writes <= 2 + elapsed * rate, (writes, elapsed)


def test_discovery_reads_sglangs_server_info() -> None:
    info = {"kv_events": {"publisher": "zmq", "endpoint_host": "*", "endpoint_port_base": 5557, "topic": "",
                          "block_size": 64, "dp_size": 2, "load_endpoint_port_base": 5561,
                          "load_topic": "load", "replay_endpoint_port_base": 5558}}
    assert parse_server_info("http://10.0.0.5:30000", info, first_rank=4) == [
        SglangEndpoint("tcp://10.0.0.5:5561", 4), SglangEndpoint("tcp://10.0.0.5:5562", 5)]
    assert parse_server_info("http://[::1]:30000", info)[0].address == "tcp://[::1]:5561"
    from loadsvc.ingest.sglang import DiscoveryError

    for body, reason in (({"kv_events": None}, "no_load_publisher"),
                         ({"kv_events": {"endpoint_port_base": 5557}}, "no_load_publisher"),
                         ({"kv_events": {"load_endpoint_port_base": "5561", "dp_size": 2}}, "bad_response"),
                         ({"kv_events": {"load_endpoint_port_base": 65535, "dp_size": 2}}, "bad_response"),
                         ({"kv_events": {"load_endpoint_port_base": 5561, "dp_size": 0}}, "bad_response"),
                         ({"kv_events": {"load_endpoint_port_base": 5561, "load_topic": "x"}}, "bad_response"),
                         ([1, 2], "bad_response")):
        with pytest.raises(DiscoveryError) as e:
            parse_server_info("http://h:1", body)
        assert e.value.reason == reason, body


# -- serve with a publisher process -------------------------------------------------------------


def _consecutive_ports(n: int) -> int:
    """A base port with n free ports from it on 127.0.0.1."""
    for _ in range(100):
        base = free_port()
        if base + n <= 65535 and all((not conftest.port_in_use(base + i)) for i in range(n)):
            return base
    raise AssertionError(f"no {n} consecutive free ports")


class PublisherProcess:
    """tests/sglang_publisher.py: SGLang's own publisher (impl "sglang") or the wire-shape one."""

    def __init__(self, impl: str, base: int, dp_size: int) -> None:
        if impl == "sglang":
            cmd = [str(sglang_env.env_python()), "-P"]
            env = {**os.environ, "PYTHONPATH": str(sglang_env.source_dir())}
        else:
            cmd, env = [sys.executable], dict(os.environ)
        self.proc = subprocess.Popen([*cmd, str(HERE / "sglang_publisher.py"), "--impl", impl, "--base", str(base),
                                      "--dp-size", str(dp_size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd="/")
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"publisher did not start: {line!r} {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def set(self, rank: int, **fields: int) -> None:
        self.proc.stdin.write(json.dumps({"rank": rank, **fields}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(params=["sglang", "wire"])
def publisher_impl(request: pytest.FixtureRequest) -> str:
    if request.param == "sglang":
        why = sglang_env.missing()
        if why:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI must run SGLang's own publisher: {why}")
            pytest.skip(why)
    return request.param


@pytest.fixture
def publishers() -> Iterator[list[PublisherProcess]]:
    started: list[PublisherProcess] = []
    yield started
    for p in started:
        p.kill()


class Watch:
    """A WatchLoads stream read on a thread."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.messages: list[Any] = []
        self.call = pb_grpc.LoadServiceStub(self.channel).WatchLoads(pb.WatchLoadsRequest(include=["core"]))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.messages.append(msg)
        except grpc.RpcError:
            pass

    def ranks(self) -> dict[int, Any]:
        return {ld.dp_rank: ld for ld in self.messages[-1].loads} if self.messages else {}

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


def test_sglang_stream_reaches_rest_watchloads_and_get(publisher_impl: str, shm_path: Path, serve_process: Any,
                                                       publishers: list[PublisherProcess]) -> None:
    base = _consecutive_ports(2)
    serve = serve_process(shm_path, dp_size=2, args=[
        "--sglang-endpoint", f"tcp://127.0.0.1:{base}=0", "--sglang-endpoint", f"tcp://127.0.0.1:{base + 1}=1",
        "--stale-after", str(STALE_AFTER), "--unreachable-after", str(UNREACHABLE_AFTER)])
    pub = PublisherProcess(publisher_impl, base, 2)
    publishers.append(pub)
    pub.set(0, num_running_reqs=3, num_waiting_reqs=2, num_used_tokens=500, max_total_num_tokens=2000,
            num_waiting_uncached_tokens=40, num_total_tokens=700, max_running_requests=6)
    pub.set(1, num_running_reqs=1, num_waiting_reqs=0, num_used_tokens=100, max_total_num_tokens=2000,
            max_running_requests=6)
    watch = Watch(serve.grpc_target)
    try:
        def rest_has_both() -> bool:
            loads = serve.loads()
            return loads.get(0, {}).get("num_running_reqs") == 3 and loads.get(1, {}).get("num_running_reqs") == 1

        wait_for(rest_has_both, 10, "both ranks on REST")
        loads = serve.loads()
        assert {k: loads[0][k] for k in ("num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
                                         "max_total_num_tokens", "token_usage", "num_waiting_uncached_tokens",
                                         "num_total_tokens", "max_running_requests", "utilization", "status")} == {
            "num_running_reqs": 3, "num_waiting_reqs": 2, "num_total_reqs": 5, "num_used_tokens": 500,
            "max_total_num_tokens": 2000, "token_usage": 0.25, "num_waiting_uncached_tokens": 40,
            "num_total_tokens": 700, "max_running_requests": 6, "utilization": 0.5, "status": "healthy"}
        assert loads[1]["status"] == "healthy" and loads[1]["num_used_tokens"] == 100

        # A change goes out at once and reaches WatchLoads.
        pub.set(1, num_running_reqs=4, num_waiting_reqs=7)
        wait_for(lambda: (r := watch.ranks()) and r.get(1) is not None and (r[1].num_running_reqs,
                                                                            r[1].num_waiting_reqs) == (4, 7),
                 5, "the change on WatchLoads")
        # Idle for 2 x stale_after: SGLang's 1 s heartbeat keeps both ranks healthy.
        until = time.monotonic() + 2 * STALE_AFTER
        while time.monotonic() < until:
            assert {ld["status"] for ld in serve.loads().values()} == {"healthy"}
            time.sleep(0.2)
        # `loadsvc get` shows them as healthy ranks.
        out = subprocess.run([sys.executable, "-m", "loadsvc", "get", "--grpc", serve.grpc_target],
                             capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
        assert out.returncode == 0, out.stderr
        rows = [line for line in out.stdout.splitlines() if re.match(r"^\s*│?\s*[01]\s", line)]
        assert len(rows) == 2 and all("healthy" in row for row in rows), out.stdout

        # A restarted scheduler: a new process, sequence back at 0, accepted with its new values.
        incarnations = serve.metric("loadsvc_sglang_incarnations_total")
        pub.kill()
        pub = PublisherProcess(publisher_impl, base, 2)
        publishers.append(pub)
        pub.set(0, num_running_reqs=9, max_total_num_tokens=2000)
        wait_for(lambda: serve.loads()[0]["num_running_reqs"] == 9, 10, "the restarted publisher's rank 0")
        wait_for(lambda: serve.metric("loadsvc_sglang_incarnations_total") >= incarnations + 2, 5,
                 "two new incarnations")
        assert serve.metric("loadsvc_sglang_frames_rejected_total", reason="stale_seq") == 0

        # It stops: stale after stale_after, then unreachable, with its last values (never zero).
        pub.kill()
        stopped = time.monotonic()
        wait_for(lambda: {ld["status"] for ld in serve.loads().values()} == {"stale"}, STALE_AFTER + 3,
                 "both ranks stale")
        assert time.monotonic() - stopped > STALE_AFTER - 1.5  # not before: the last heartbeat <= ~1 s old
        wait_for(lambda: {ld["status"] for ld in serve.loads().values()} == {"unreachable"},
                 UNREACHABLE_AFTER + 3, "both ranks unreachable")
        assert serve.loads()[0]["num_running_reqs"] == 9
        assert serve.metric("loadsvc_sglang_frames_rejected_total", reason="decode") == 0
    finally:
        watch.close()


class _ServerInfo(http.server.BaseHTTPRequestHandler):
    """/server_info as SGLang answers it (only the kv_events block matters), per path prefix."""

    bodies: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        prefix = self.path.split("/")[1]
        body = self.bodies.get(prefix)
        if body is None or not self.path.endswith("/server_info"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_discovery_from_server_info_subscribes_every_rank(shm_path: Path, serve_process: Any,
                                                          publishers: list[PublisherProcess]) -> None:
    base = _consecutive_ports(2)
    _ServerInfo.bodies = {
        "good": json.dumps({"model_path": "m", "kv_events": {
            "publisher": "zmq", "endpoint_host": "*", "endpoint_port_base": base + 2, "topic": "",
            "block_size": 64, "dp_size": 2, "load_endpoint_port_base": base, "load_topic": "load"}}).encode(),
        "nokv": json.dumps({"model_path": "m", "kv_events": None}).encode(),
        "huge": b'{"pad": "' + b"x" * (2 << 20) + b'"}',
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ServerInfo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        serve = serve_process(shm_path, dp_size=3, args=[
            "--sglang-server", f"{url}/good=1", "--sglang-server", f"{url}/nokv",
            "--sglang-server", f"{url}/huge"])
        pub = PublisherProcess("wire", base, 2)
        publishers.append(pub)
        pub.set(0, num_running_reqs=2)
        pub.set(1, num_running_reqs=5)
        wait_for(lambda: {r: ld["num_running_reqs"] for r, ld in serve.loads().items()} == {1: 2, 2: 5}, 10,
                 "the discovered server's ranks 0, 1 as region ranks 1, 2")
        assert serve.metric("loadsvc_sglang_discoveries_total", result="ok") >= 1
        assert serve.metric("loadsvc_sglang_discoveries_total", result="no_load_publisher") >= 1
        assert serve.metric("loadsvc_sglang_discoveries_total", result="too_large") >= 1
        assert serve.metric("loadsvc_sglang_endpoints", state="configured") == 2
        log = serve.log()
        assert "start SGLang with --kv-events-config" in log
        assert log.count("/nokv/server_info has no kv_events") == 1  # once per distinct problem
    finally:
        httpd.shutdown()
        httpd.server_close()
