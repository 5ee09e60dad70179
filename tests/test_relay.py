"""The relay (loadsvc/relay/) on loopback: ZmqPublisher -> Collector -> region, bad frames, CURVE, keys.

Real ZMQ sockets on 127.0.0.1 (the collector binds an ephemeral port unless a
test needs to know the port before it binds), a real region per test, read back
with ShmReader.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import conftest
import msgspec
import pytest
import zmq
import zmq.auth
from conftest import free_port
from prometheus_client import CollectorRegistry

from loadsvc.core import writer as region_writer
from loadsvc.core.region import ShmPublisher, ShmReader, create_region
from loadsvc.core.schema import (
    SCHEMA_FINGERPRINT,
    DisaggregationMetrics,
    LoadSnapshot,
    MemoryMetrics,
    QueueMetrics,
    Status,
)
from loadsvc.relay import (
    FRAME_HEADER,
    Collector,
    ZmqPublisher,
    encode_frame,
    generate_keys,
)
from loadsvc.relay import collector as relay_collector
from loadsvc.relay import publisher as relay_publisher
from loadsvc.settings import CollectorSettings, CurveClientSettings, CurveServerSettings

DP = 4


# conftest's wait_for, polling every 5 ms (relay deliveries take milliseconds).
wait_for = functools.partial(conftest.wait_for, interval=0.005)


def snap(rank: int, running: int = 1, **kw: object) -> object:
    return LoadSnapshot(dp_rank=rank, num_running_reqs=running, **kw)


def settings_for(shm: Path, endpoint: str = "tcp://127.0.0.1:*", *, dp_size: int | None = DP,
                 curve: CurveServerSettings | None = None, max_frame_bytes: int = 4096,
                 stale_after: float = 3.0) -> CollectorSettings:
    return CollectorSettings(endpoint=endpoint, shm=shm, dp_size=dp_size, stale_after=stale_after,
                             curve=curve, max_frame_bytes=max_frame_bytes)


@pytest.fixture
def collector(shm_path: Path) -> Iterator[Callable[..., Collector]]:
    """Factory: collector(**settings_for kwargs) -> a started Collector, stopped afterwards."""
    started: list[Collector] = []

    def start(**kw: object) -> Collector:
        c = Collector(settings_for(shm_path, **kw), CollectorRegistry())  # type: ignore[arg-type]
        c.start_thread()
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop_thread()


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def reader_value(shm: Path, rank: int) -> object:
    """The rank's snapshot as the region has it now (None if never published or no region)."""
    try:
        with ShmReader(shm) as r:
            return r.read(rank)
    except Exception:
        return None


def read_when(shm: Path, rank: int, predicate: Callable[[object], bool], timeout: float = 5.0) -> object:
    return wait_for(lambda: (lambda s: s if s is not None and predicate(s) else None)(reader_value(shm, rank)),
                    timeout, f"dp_rank {rank} in {shm}")


def test_values_arrive_equal_and_age_comes_from_receive_time(collector, shm_path):
    c = collector()
    far_past = 1_000_000_000  # 1970 plus a second: the publisher's clock is irrelevant
    far_future = time.time_ns() + 10 * 3600 * 10**9
    sent = [
        snap(0, running=7, num_waiting_reqs=3, token_usage=0.25, gen_throughput=1234.5,
             memory=MemoryMetrics(weight_gb=15.5, kv_cache_gb=40.0, token_capacity=100000),
             publish_time_ns=far_past),
        snap(1, running=9, queues=QueueMetrics(waiting=2, grammar=1), publish_time_ns=far_future),
    ]
    pubs = [ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=r) for r in (0, 1)]
    try:
        before = time.time_ns()
        for pub, s in zip(pubs, sent):
            assert pub.publish(s) == 1
        got = [read_when(shm_path, r, lambda s: s.seq >= 1) for r in (0, 1)]
        after = time.time_ns()
    finally:
        for pub in pubs:
            pub.close()
    for s, g in zip(sent, got):
        for name in LoadSnapshot.__struct_fields__:
            if name not in ("publish_time_ns", "seq", "epoch"):
                assert getattr(g, name) == getattr(s, name), name
        assert before <= g.publish_time_ns <= after  # the collector's receive time
        status, age_ms = ShmReader.freshness(ShmReader(shm_path), g)
        assert status is Status.HEALTHY and age_ms < 3000
    assert got[0].epoch == pubs[0].epoch and got[1].epoch == pubs[1].epoch
    assert c.accepted == 2 and sum(c.rejected.values()) == 0
    assert c.registry.get_sample_value("loadsvc_relay_frames_accepted_total") == 2


def test_async_start_stop_and_bind_error(shm_path):
    import asyncio

    async def main() -> None:
        c = Collector(settings_for(shm_path), CollectorRegistry())
        await c.start()
        try:
            assert c.bound_endpoint and c.bound_endpoint.startswith("tcp://127.0.0.1:")
            with ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=3) as pub:
                pub.publish(snap(3, running=5))
                await asyncio.to_thread(read_when, shm_path, 3, lambda s: s.num_running_reqs == 5)
            # a second collector on the same port cannot bind: a clear error, not a hang
            other = Collector(settings_for(shm_path, c.bound_endpoint), CollectorRegistry())
            with pytest.raises(OSError, match="cannot bind"):
                await other.start()
        finally:
            await c.stop()

    asyncio.run(main())


class RawSender:
    """A plain PUSH socket for hand-made frames."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *parts: bytes) -> None:
        self.sock.send_multipart(list(parts))


def test_bad_frames_are_counted_per_reason_and_never_touch_the_region(collector, shm_path, zctx):
    c = collector(max_frame_bytes=4096)
    good = {r: snap(r, running=10 + r) for r in (0, 1)}
    pubs = {r: ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=r) for r in (0, 1)}
    for r, pub in pubs.items():
        pub.publish(good[r])
    for r in (0, 1):
        read_when(shm_path, r, lambda s: s.seq == 1)
    before = {r: reader_value(shm_path, r) for r in (0, 1)}
    enc = msgspec.msgpack.encode
    raw = RawSender(zctx, c.bound_endpoint)
    epoch0 = pubs[0].epoch
    payload0 = enc(snap(0, running=99))
    cases: list[tuple[str, list[bytes]]] = [
        ("short", [os.urandom(10)]),
        ("bad_magic", [os.urandom(200)]),
        ("short", [encode_frame(payload0, dp_rank=0, dp_size=DP, epoch=epoch0, seq=50)[:20]]),
        ("decode", [encode_frame(payload0, dp_rank=0, dp_size=DP, epoch=epoch0, seq=51)[:-3]]),
        ("decode", [encode_frame(os.urandom(64), dp_rank=0, dp_size=DP, epoch=epoch0, seq=52)]),
        ("bad_version", [b"LSR\x09" + encode_frame(payload0, dp_rank=0, dp_size=DP, epoch=epoch0,
                                                    seq=53)[4:]]),
        ("fingerprint", [encode_frame(payload0, dp_rank=0, dp_size=DP, epoch=epoch0, seq=54,
                                      fingerprint=SCHEMA_FINGERPRINT ^ 1)]),
        ("oversized", [encode_frame(enc(snap(0, running=99)) + b"\x00" * 5000, dp_rank=0, dp_size=DP,
                                    epoch=epoch0, seq=55)]),
        ("malformed", [b"part one", b"part two"]),
        ("bad_header", [encode_frame(payload0, dp_rank=0, dp_size=DP, epoch=0, seq=56)]),
        ("bad_header", [encode_frame(payload0, dp_rank=0, dp_size=DP, epoch=epoch0, seq=0)]),
        ("dp_size_mismatch", [encode_frame(payload0, dp_rank=0, dp_size=DP + 1, epoch=epoch0, seq=57)]),
        ("rank_out_of_range", [encode_frame(enc(snap(DP + 3)), dp_rank=DP + 3, dp_size=DP,
                                            epoch=epoch0, seq=58)]),
        # payload says rank 1 under rank 0's header: would overwrite another rank
        ("rank_mismatch", [encode_frame(enc(snap(1, running=99)), dp_rank=0, dp_size=DP,
                                        epoch=epoch0, seq=59)]),
        # the schema's value rule: an int32 field beyond int32, a negative count, NaN, inf
        ("bad_value", [encode_frame(enc(snap(0, running=2**40)), dp_rank=0, dp_size=DP,
                                    epoch=epoch0, seq=60)]),
        ("bad_value", [encode_frame(enc(snap(0, running=-5)), dp_rank=0, dp_size=DP,
                                    epoch=epoch0, seq=61)]),
        ("bad_value", [encode_frame(enc(snap(0, token_usage=float("nan"))), dp_rank=0, dp_size=DP,
                                    epoch=epoch0, seq=63)]),
        ("bad_value", [encode_frame(enc(snap(0, gen_throughput=float("inf"))), dp_rank=0, dp_size=DP,
                                    epoch=epoch0, seq=64)]),
        ("bad_value", [encode_frame(enc(snap(0, memory=MemoryMetrics(kv_cache_gb=-1.0))), dp_rank=0,
                                    dp_size=DP, epoch=epoch0, seq=65)]),
        # a string where a number belongs: malformed, not a bad value
        ("decode", [encode_frame(enc([0, "five"]), dp_rank=0, dp_size=DP, epoch=epoch0, seq=66)]),
        # replay of rank 0's accepted seq 1, and a frame older than it
        ("stale_seq", [encode_frame(payload0, dp_rank=0, dp_size=DP, epoch=epoch0, seq=1)]),
        # too big for the slot (2048 bytes) but under --max-frame-bytes
        ("slot_overflow", [encode_frame(enc(LoadSnapshot(dp_rank=1, disaggregation=DisaggregationMetrics(
            mode="x" * 3000))), dp_rank=1, dp_size=DP, epoch=pubs[1].epoch, seq=62)]),
    ]
    expected: dict[str, int] = {}
    for reason, parts in cases:
        raw.send(*parts)
        expected[reason] = expected.get(reason, 0) + 1
    wait_for(lambda: sum(c.rejected.values()) >= len(cases), 5, "every bad frame to be counted")
    time.sleep(0.05)
    assert {k: v for k, v in c.rejected.items() if v} == expected
    for reason, n in expected.items():
        assert c.registry.get_sample_value("loadsvc_relay_frames_rejected_total",
                                           {"reason": reason}) == n
    # the valid ranks are untouched: same sequence, same values
    for r in (0, 1):
        now = reader_value(shm_path, r)
        assert now.seq == before[r].seq == 1
        assert now == before[r]
    assert reader_value(shm_path, 2) is None and reader_value(shm_path, 3) is None
    # ... and still accept their publisher's next snapshot
    pubs[0].publish(snap(0, running=42))
    read_when(shm_path, 0, lambda s: s.num_running_reqs == 42 and s.seq == 2)
    for pub in pubs.values():
        pub.close()


def test_reordered_frames_cannot_move_a_rank_backwards(collector, shm_path, zctx):
    c = collector()
    raw = RawSender(zctx, c.bound_endpoint)
    enc = msgspec.msgpack.encode
    epoch = 0x1234
    raw.send(encode_frame(enc(snap(2, running=5)), dp_rank=2, dp_size=DP, epoch=epoch, seq=5))
    read_when(shm_path, 2, lambda s: s.num_running_reqs == 5)
    raw.send(encode_frame(enc(snap(2, running=3)), dp_rank=2, dp_size=DP, epoch=epoch, seq=3))
    raw.send(encode_frame(enc(snap(2, running=4)), dp_rank=2, dp_size=DP, epoch=epoch, seq=5))
    raw.send(encode_frame(enc(snap(2, running=6)), dp_rank=2, dp_size=DP, epoch=epoch, seq=6))
    read_when(shm_path, 2, lambda s: s.num_running_reqs == 6)
    assert c.rejected["stale_seq"] == 2 and c.accepted == 2


def test_restarted_publisher_is_accepted_and_a_delayed_old_frame_is_refused(collector, shm_path, zctx):
    c = collector()
    first = ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=1)
    for i in range(1, 6):
        first.publish(snap(1, running=i))
    read_when(shm_path, 1, lambda s: s.num_running_reqs == 5)
    old_epoch = first.epoch
    first.close()
    # the engine restarts: a new epoch whose seq starts again at 1
    second = ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=1)
    assert second.epoch != old_epoch
    assert second.publish(snap(1, running=100)) == 1
    got = read_when(shm_path, 1, lambda s: s.num_running_reqs == 100)
    assert got.epoch == second.epoch
    # a delayed frame of the replaced incarnation, even with a larger seq, is refused (the new one is live)
    raw = RawSender(zctx, c.bound_endpoint)
    raw.send(encode_frame(msgspec.msgpack.encode(snap(1, running=6)), dp_rank=1, dp_size=DP,
                          epoch=old_epoch, seq=6))
    wait_for(lambda: c.rejected["old_epoch"] == 1, 5, "old_epoch count")
    second.publish(snap(1, running=101))
    read_when(shm_path, 1, lambda s: s.num_running_reqs == 101)
    assert reader_value(shm_path, 1).epoch == second.epoch
    second.close()


# A ZmqPublisher in a process of its own: prints its epoch, publishes num_running_reqs =
# RUNNING every 10 ms for SECONDS (or until killed), then prints its last seq.
_PUBLISHER = textwrap.dedent("""
    import sys, time
    from loadsvc import LoadSnapshot, ZmqPublisher
    endpoint, rank, running, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    pub = ZmqPublisher(endpoint, dp_size=4, dp_rank=rank)
    print(pub.epoch, flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pub.publish(LoadSnapshot(dp_rank=rank, num_running_reqs=running))
        time.sleep(0.01)
    print(pub.seq, flush=True)
    pub.close()
""")


def publisher_process(endpoint: str, rank: int, running: int,
                      seconds: float) -> tuple[subprocess.Popen[str], int]:
    """(process, its publisher's epoch)."""
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, endpoint, str(rank), str(running),
                             str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.strip(), proc.communicate(timeout=10)[1]
    return proc, int(line)


@pytest.mark.integration
def test_an_extra_publisher_holds_a_rank_only_while_it_sends(collector, shm_path, zctx):
    c = collector(stale_after=0.5)
    live, live_epoch = publisher_process(c.bound_endpoint, 2, running=1, seconds=60)
    try:
        read_when(shm_path, 2, lambda s: s.num_running_reqs == 1 and s.epoch == live_epoch, 15)
        # Another (authorized) publisher for rank 2, for one second: a new epoch, accepted at once.
        extra, extra_epoch = publisher_process(c.bound_endpoint, 2, running=999, seconds=1.0)
        read_when(shm_path, 2, lambda s: s.num_running_reqs == 999 and s.epoch == extra_epoch, 15)
        out, err = extra.communicate(timeout=30)
        assert extra.returncode == 0, err
        extra_last = int(out.split()[-1])
        # Meanwhile the live publisher's frames were refused: its epoch was replaced ...
        assert c.rejected["old_epoch"] > 0
        # ... and once the extra one has been silent for stale_after, the live one has the rank again.
        got = read_when(shm_path, 2, lambda s: s.num_running_reqs == 1 and s.epoch == live_epoch, 15)
        read_when(shm_path, 2, lambda s: s.seq > got.seq + 5 and s.epoch == live_epoch)  # and keeps it
        # A delayed frame of the extra publisher, even with a newer seq, cannot flip it back now.
        old_epoch_before = c.rejected["old_epoch"]
        raw = RawSender(zctx, c.bound_endpoint)
        raw.send(encode_frame(msgspec.msgpack.encode(snap(2, running=666)), dp_rank=2, dp_size=DP,
                              epoch=extra_epoch, seq=extra_last + 1))
        wait_for(lambda: c.rejected["old_epoch"] == old_epoch_before + 1, 5, "the delayed frame refused")
        now = read_when(shm_path, 2, lambda s: s.seq > got.seq + 10)
        assert (now.num_running_reqs, now.epoch) == (1, live_epoch)
        assert c.rejected["stale_seq"] == 0 and c.rejected["seq_jump"] == 0
    finally:
        live.kill()
        live.communicate(timeout=10)


@pytest.mark.integration
def test_a_seq_jump_is_refused_not_adopted(collector, shm_path, zctx):
    c = collector()
    live, live_epoch = publisher_process(c.bound_endpoint, 1, running=1, seconds=60)
    try:
        before = read_when(shm_path, 1, lambda s: s.num_running_reqs == 1 and s.epoch == live_epoch, 15)
        raw = RawSender(zctx, c.bound_endpoint)
        enc = msgspec.msgpack.encode
        for seq in (2**64 - 1, 10**12):  # far past what the live publisher can have reached
            raw.send(encode_frame(enc(snap(1, running=777)), dp_rank=1, dp_size=DP, epoch=live_epoch,
                                  seq=seq))
        wait_for(lambda: c.rejected.get("seq_jump") == 2, 5, "both jumps refused")
        # The live publisher's next frames are still accepted: the jumps were not adopted.
        seen = []
        after = read_when(shm_path, 1, lambda s: seen.append(s.num_running_reqs) or s.seq > before.seq + 20)
        assert after.epoch == live_epoch and set(seen) == {1}
        assert c.rejected["stale_seq"] == 0 and c.rejected["old_epoch"] == 0
        assert c.registry.get_sample_value("loadsvc_relay_frames_rejected_total", {"reason": "seq_jump"}) == 2
    finally:
        live.kill()
        live.communicate(timeout=10)


def test_publisher_never_blocks_and_delivers_the_latest_when_the_collector_appears(shm_path, zctx):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    pub = ZmqPublisher(endpoint, dp_size=DP, dp_rank=2)
    try:
        t0 = time.perf_counter()
        for i in range(1, 10_001):
            pub.publish(snap(2, running=i))
        elapsed = time.perf_counter() - t0
        assert elapsed < 2.0, f"10k publishes without a collector took {elapsed:.2f} s"
        assert pub.seq == 10_000
        c = Collector(settings_for(shm_path, endpoint), CollectorRegistry())
        with c:
            got = read_when(shm_path, 2, lambda s: s.seq >= 1)
            time.sleep(0.2)
            # only the latest was kept while the collector was away
            assert got.num_running_reqs == 10_000 and c.accepted == 1
        # the collector goes away and comes back: ZMQ reconnects by itself
        pub.publish(snap(2, running=20_000))
        c2 = Collector(settings_for(shm_path, endpoint), CollectorRegistry())
        with c2:
            read_when(shm_path, 2, lambda s: s.num_running_reqs == 20_000)
            pub.publish(snap(2, running=20_001))
            read_when(shm_path, 2, lambda s: s.num_running_reqs == 20_001)
    finally:
        pub.close()


def test_publisher_api_checks(zctx):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="dp_rank must be in 0..3"):
        ZmqPublisher(endpoint, dp_size=4, dp_rank=4)
    with pytest.raises(ValueError, match="interval"):
        ZmqPublisher(endpoint, dp_size=4, dp_rank=0, interval=0)
    with pytest.raises(ValueError, match="endpoint"):
        ZmqPublisher("nonsense", dp_size=4, dp_rank=0)
    with ZmqPublisher(endpoint, dp_size=4, dp_rank=1, interval=3) as pub:
        with pytest.raises(ValueError, match="owns dp_rank 1"):
            pub.publish(snap(2))
        big = LoadSnapshot(dp_rank=1, disaggregation=DisaggregationMetrics(mode="x" * 4000))
        with pytest.raises(ValueError, match="payload capacity"):
            pub.publish(big)
        for field, value in (("token_usage", float("nan")), ("gen_throughput", float("inf")),
                             ("num_waiting_reqs", -5)):
            with pytest.raises(ValueError, match=f"dp_rank 1: snapshot field {field} = {value!r}: "
                                                 ".*nothing sent"):
                pub.publish(snap(1, **{field: value}))
        assert pub.seq == 0
        calls = [pub.maybe_publish(lambda: snap(1)) for _ in range(6)]
        assert calls == [False, False, True, False, False, True] and pub.seq == 2


def test_no_region_until_one_exists(collector, shm_path):
    c = collector(dp_size=None)
    with ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=0) as pub:
        pub.publish(snap(0, running=1))
        wait_for(lambda: c.rejected["no_region"] >= 1, 5, "no_region")
        assert not shm_path.exists()
        create_region(shm_path, DP)
        deadline = time.monotonic() + 5
        while reader_value(shm_path, 0) is None and time.monotonic() < deadline:
            pub.publish(snap(0, running=2))
            time.sleep(0.05)
        assert reader_value(shm_path, 0).num_running_reqs == 2


def test_rank_owned_by_a_local_publisher_is_not_taken(collector, shm_path, monkeypatch):
    monkeypatch.setattr(region_writer, "CLAIM_RETRY", 0.1)
    c = collector()
    local = ShmPublisher(shm_path, dp_size=DP, dp_rank=3)
    local.publish(snap(3, running=77))
    with ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=3) as pub:
        pub.publish(snap(3, running=1))
        wait_for(lambda: c.rejected["rank_owned"] >= 1, 5, "rank_owned")
        assert reader_value(shm_path, 3).num_running_reqs == 77
        local.close()  # the local engine goes away: the relay may take the rank over
        deadline = time.monotonic() + 5
        while reader_value(shm_path, 3).num_running_reqs != 2 and time.monotonic() < deadline:
            pub.publish(snap(3, running=2))
            time.sleep(0.05)
        assert reader_value(shm_path, 3).num_running_reqs == 2


def test_freshness_of_relayed_ranks(collector, shm_path):
    c = collector()
    with ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=0) as pub:
        pub.publish(snap(0, running=1))
        got = read_when(shm_path, 0, lambda s: s.seq == 1)
    # windows of a second: a test process delayed a few hundred ms still lands in each
    with ShmReader(shm_path, stale_after=1.0, unreachable_after=2.0) as reader:
        assert reader.freshness(got)[0] is Status.HEALTHY
        time.sleep(1.3)
        assert reader.freshness(reader.read(0))[0] is Status.STALE
        time.sleep(1.0)
        assert reader.freshness(reader.read(0))[0] is Status.UNREACHABLE
        with ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=0) as pub:  # the node comes back
            pub.publish(snap(0, running=2))
            read_when(shm_path, 0, lambda s: s.num_running_reqs == 2)
        assert reader.freshness(reader.read(0))[0] is Status.HEALTHY


# -- CURVE ---------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    authorized = tmp_path / "authorized"
    elsewhere = tmp_path / "elsewhere"
    server_pub, server_sec = generate_keys(tmp_path, "server")
    good_pub, good_sec = generate_keys(authorized, "good")
    bad_pub, bad_sec = generate_keys(elsewhere, "intruder")
    return {"server_pub": server_pub, "server_sec": server_sec, "authorized": authorized,
            "good_sec": good_sec, "bad_sec": bad_sec, "tmp": tmp_path}


def test_curve_admits_authorized_keys_only(collector, shm_path, keys):
    c = collector(curve=CurveServerSettings(keys["server_sec"], keys["authorized"]))
    good = ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=0,
                        curve=CurveClientSettings(keys["server_pub"], keys["good_sec"]))
    bad = ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=1,
                       curve=CurveClientSettings(keys["server_pub"], keys["bad_sec"]))
    # no CURVE at all, and CURVE with the wrong server key
    plain = ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=2)
    wrong_server = ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=3,
                                curve=CurveClientSettings(keys["good_sec"].with_suffix(".key"),
                                                          keys["good_sec"]))
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            good.publish(snap(0, running=11))
            bad.publish(snap(1, running=666))
            plain.publish(snap(2, running=666))
            wrong_server.publish(snap(3, running=666))
            time.sleep(0.02)
        read_when(shm_path, 0, lambda s: s.num_running_reqs == 11)
        wait_for(lambda: c.rejected["unauthorized"] >= 1, 5, "unauthorized count")
        for r in (1, 2, 3):
            assert reader_value(shm_path, r) is None
        assert c.rejected["handshake_failed"] >= 1
        assert c.registry.get_sample_value("loadsvc_relay_frames_rejected_total",
                                           {"reason": "unauthorized"}) >= 1
    finally:
        for p in (good, bad, plain, wrong_server):
            p.close()


def test_curve_picks_up_newly_authorized_keys(collector, shm_path, keys, monkeypatch):
    monkeypatch.setattr(relay_collector, "AUTH_RELOAD", 0.1)
    monkeypatch.setattr(relay_publisher, "HANDSHAKE_RETRY", 0.2)
    c = collector(curve=CurveServerSettings(keys["server_sec"], keys["authorized"]))
    late_pub, late_sec = generate_keys(keys["tmp"] / "late", "late")
    with ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=2,
                      curve=CurveClientSettings(keys["server_pub"], late_sec)) as pub:
        pub.publish(snap(2, running=5))
        wait_for(lambda: c.rejected["unauthorized"] >= 1, 5, "unauthorized count")
        assert reader_value(shm_path, 2) is None
        (keys["authorized"] / "late.key").write_bytes(late_pub.read_bytes())
        deadline = time.monotonic() + 8
        while (reader_value(shm_path, 2) is None) and time.monotonic() < deadline:
            pub.publish(snap(2, running=5))
            time.sleep(0.05)
        assert reader_value(shm_path, 2).num_running_reqs == 5
        assert pub.handshake_failures >= 1  # it was refused, then retried by itself


@pytest.mark.parametrize("with_curve", [False, True], ids=["open", "curve"])
def test_plain_tcp_connects_are_no_handshake_not_handshake_failed(collector, shm_path, keys,
                                                                  with_curve, caplog):
    """A port scan or a TCP health check is not a publisher with a wrong key: counted apart, not warned."""
    c = collector(curve=CurveServerSettings(keys["server_sec"], keys["authorized"]) if with_curve else None)
    host, port = c.bound_endpoint.removeprefix("tcp://").rsplit(":", 1)
    with caplog.at_level("WARNING", logger="loadsvc.relay"):
        for i in range(5):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                if i % 2:
                    s.sendall(b"\xff" + b"\x00" * 8)  # a partial ZMTP greeting, then gone
        wait_for(lambda: c.rejected["no_handshake"] >= 5, 5, "five no_handshake counts")
    assert c.rejected["handshake_failed"] == 0 and c.rejected["unauthorized"] == 0
    assert c.registry.get_sample_value("loadsvc_relay_frames_rejected_total",
                                       {"reason": "no_handshake"}) >= 5
    assert "no_handshake" not in caplog.text
    # ... and a publisher with CURVE on one side only is still handshake_failed (libzmq reports some
    # of its attempts without detail, when the publisher's side sees the mismatch first: it retries)
    one_sided = None if with_curve else CurveClientSettings(keys["server_pub"], keys["good_sec"])
    plain = ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=0, curve=one_sided)
    try:
        wait_for(lambda: plain.publish(snap(0)) and c.rejected["handshake_failed"] >= 1, 15,
                 "handshake_failed for a one-sided publisher")
    finally:
        plain.close()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


FLOODER = """
import sys, time, zmq
ctx = zmq.Context()
socks = [ctx.socket(zmq.PUSH) for _ in range(int(sys.argv[2]))]
for s in socks:
    s.setsockopt(zmq.SNDHWM, 1)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(sys.argv[1])
frame, sent, end = b"x" * int(sys.argv[3]), 0, time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    moved = False
    for s in socks:
        try:
            s.send(frame, zmq.NOBLOCK)
            sent, moved = sent + 1, True
        except zmq.Again:
            pass
    if not moved:
        time.sleep(0.01)
print(sent, flush=True)
"""


@pytest.mark.integration
def test_a_flood_queues_a_bounded_number_of_frames_per_connection(collector, shm_path, monkeypatch):
    """8 connections push 100 kB frames while the collector thread is held: what the collector's
    process buffers is bounded by RCVHWM per connection (ZMQ's default parked ~37 MB each)."""
    c = collector(max_frame_bytes=64 * 1024)
    held = threading.Event()
    handle = c.handle
    monkeypatch.setattr(c, "handle", lambda parts, now: held.wait(30) and handle(parts, now))
    before = _rss_kib()
    flood = subprocess.run([sys.executable, "-c", FLOODER, c.bound_endpoint, "8", "100000", "3"],
                           capture_output=True, text=True, timeout=60)
    grown = _rss_kib() - before
    held.set()
    assert flood.returncode == 0, flood.stderr
    # 8 x RCVHWM (16) frames of 100 kB, and ZMQ's read buffers: ~16 MB measured
    assert grown < 48 * 1024, f"the collector's process grew by {grown} KiB ({flood.stdout.strip()} sent)"
    wait_for(lambda: c.rejected["oversized"] >= 8 * relay_collector.RCVHWM, 10, "the queued frames counted")
    pub = ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=2)
    try:
        pub.publish(snap(2, running=9))
        read_when(shm_path, 2, lambda s: s.num_running_reqs == 9)  # and valid ranks still flow
    finally:
        pub.close()


def test_a_connection_without_a_handshake_is_dropped(collector, monkeypatch):
    monkeypatch.setattr(relay_collector, "HANDSHAKE_IVL_MS", 300)  # read when the collector opens its socket
    c = collector()
    host, port = c.bound_endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as idle:
        assert idle.recv(64)  # the collector's greeting; then nothing from us
        idle.settimeout(10)  # ZMQ's own default would hold it for 30 s: recv times out, the test fails
        while idle.recv(64):  # the rest of the greeting, then EOF when it drops us
            pass
    wait_for(lambda: c.rejected["no_handshake"] >= 1, 5, "the dropped connection counted")


def test_curve_configuration_errors_name_the_file(shm_path, keys):
    bad = Collector(settings_for(shm_path, curve=CurveServerSettings(keys["server_pub"],
                                                                     keys["authorized"])),
                    CollectorRegistry())
    with pytest.raises(ValueError, match="public certificate; pass the NAME.key_secret"):
        bad.start_thread()
    missing = Collector(settings_for(shm_path, curve=CurveServerSettings(keys["server_sec"],
                                                                         keys["tmp"] / "nope")),
                        CollectorRegistry())
    with pytest.raises(ValueError, match="nope: not a directory"):
        missing.start_thread()
    with pytest.raises(ValueError, match="no-such.key_secret"):
        ZmqPublisher("tcp://127.0.0.1:1", dp_size=2, dp_rank=0,
                     curve=CurveClientSettings(keys["server_pub"], keys["tmp"] / "no-such.key_secret"))


def test_keys_gen_writes_a_pyzmq_key_pair(tmp_path, capsys):
    from loadsvc.cli import main

    target = tmp_path / "keys"
    assert main(["keys", "gen", str(target), "node1"]) == 0
    public, secret = target / "node1.key", target / "node1.key_secret"
    assert f"wrote {public}" in capsys.readouterr().out
    pub_key, no_secret = zmq.auth.load_certificate(public)
    pub_again, sec_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and pub_key == pub_again and len(pub_key) == 40 and len(sec_key) == 40
    assert zmq.curve_public(sec_key) == pub_key  # a real pair
    assert "public-key" in public.read_text() and "secret-key" in secret.read_text()
    assert secret.stat().st_mode & 0o777 == 0o600
    # running it again keeps the pair (start-up scripts call it every time)
    assert generate_keys(target, "node1") == (public, secret)
    assert zmq.auth.load_certificate(secret)[1] == sec_key
    with pytest.raises(ValueError, match="plain file name"):
        generate_keys(target, "../x")


def test_collector_counts_and_rate_limits_its_log(shm_path, caplog):
    c = Collector(settings_for(shm_path), CollectorRegistry())
    with caplog.at_level("WARNING", logger="loadsvc.relay"):
        for _ in range(500):
            assert c.handle([b"junk"], time.time_ns()) is False
    assert c.rejected["short"] == 500
    lines = [r for r in caplog.records if "[short]" in r.getMessage()]
    assert len(lines) == 1
    assert FRAME_HEADER.size == 36


def test_random_input_never_raises_and_never_reaches_the_region(shm_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    c = Collector(settings_for(shm_path), CollectorRegistry())
    enc = msgspec.msgpack.encode
    valid_header = encode_frame(b"", dp_rank=1, dp_size=DP, epoch=5, seq=1)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(
        st.lists(st.binary(max_size=300), min_size=1, max_size=3),  # anything at all
        st.binary(max_size=400).map(lambda b: [valid_header + b]),  # a good header, junk payload
        st.lists(st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=5),
                           st.none(), st.binary(max_size=5)), max_size=25)
        .map(lambda fields: [valid_header + enc([1, *fields])]),  # array-shaped, wrong types
    ))
    def feed(parts: list[bytes]) -> None:
        c.handle(parts, time.time_ns())

    feed()
    assert c.rejected["internal_error"] == 0
    # whatever was accepted is a valid rank-1 snapshot; nothing else was written
    for rank in (0, 2, 3):
        assert reader_value(shm_path, rank) is None
    if c.accepted:
        assert reader_value(shm_path, 1).dp_rank == 1


def test_on_write_is_called_after_frames_are_written(shm_path, zctx):
    import threading

    calls = []
    event = threading.Event()

    def on_write() -> None:
        calls.append(reader_value(shm_path, 1))  # already in the region when called
        event.set()

    c = Collector(settings_for(shm_path), CollectorRegistry(), on_write=on_write)
    with c, ZmqPublisher(c.bound_endpoint, dp_size=DP, dp_rank=1) as pub:
        pub.publish(snap(1, running=31))
        assert event.wait(5)
        assert calls[0].num_running_reqs == 31
        n = len(calls)
        raw = RawSender(zctx, c.bound_endpoint)
        raw.send(b"junk")  # rejected: no call
        wait_for(lambda: c.rejected["short"] == 1, 5, "the junk frame")
        time.sleep(0.05)
        assert len(calls) == n
