"""Fuzzing the inputs loadsvc takes from outside: region bytes, relay frames, REST queries, gRPC requests.

    garbage header bytes ---> ShmReader(path)        RegionError naming the file, or a reader that
                                                     reads only checksum-valid snapshots
    garbage slot bytes -----> reader.read/read_all   None, the previous good snapshot, or one whose
                                                     checksum really matches the bytes in the file
    garbage ZMQ frames -----> Collector              counted per reason and dropped; valid ranks untouched
    schemathesis -----------> REST OpenAPI (ASGI)    no 5xx, responses match the schema
    random requests/bytes --> gRPC (a real serve)    only OK or INVALID_ARGUMENT

Every hypothesis test has a bounded max_examples; the whole file runs well under a minute.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
import zmq
from conftest import ServeProcess, start_serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadsvc import (
    LoadSnapshot,
    MemoryMetrics,
    QueueMetrics,
    ShmPublisher,
    ShmReader,
    default_path,
)
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc.core import region as shm_mod
from loadsvc.core.region import RegionError
from loadsvc.relay import FRAME_HEADER, REJECT_REASONS, Collector, encode_frame
from loadsvc.settings import CollectorSettings, StoreSettings

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ_SLOW = settings(FUZZ, max_examples=60)  # examples that cross a socket


def _region_path() -> Path:
    return default_path(f"fuzz-{os.getpid()}-{uuid.uuid4().hex[:10]}")


def _snapshot(rank: int, k: int) -> Any:
    """A snapshot whose fields all derive from k: a torn or foreign one does not look like this."""
    return LoadSnapshot(dp_rank=rank, num_running_reqs=k, num_waiting_reqs=k + 1, num_total_reqs=2 * k + 1,
                        num_used_tokens=10 * k, max_total_num_tokens=1000 + k, token_usage=k / 1000,
                        memory=MemoryMetrics(weight_gb=float(k), token_capacity=k),
                        queues=QueueMetrics(waiting=k + 1))


def _same_values(a: Any, b: Any) -> bool:
    """Equal as published (seq and publish time are filled in by the reader)."""
    clear = {"seq": 0, "publish_time_ns": 0, "epoch": 0}
    return msgspec.structs.replace(a, **clear) == msgspec.structs.replace(b, **clear)


def _checksum_matches(path: Path, rank: int, snap: Any) -> bool:
    """Independently of ShmReader: does the file hold snap at snap.seq with a matching checksum?"""
    data = path.read_bytes()
    (_, _, _, _, slot_count, slot_size, capacity, _, _) = shm_mod._HEADER.unpack_from(data, 0)
    _, slots_off, _ = shm_mod._layout(slot_count, capacity)
    n = snap.seq
    base = slots_off + rank * slot_size + (n & 1) * (slot_size // 2)
    state, t, lc, _ = shm_mod._BUFFER_HEADER.unpack_from(data, base)
    size = lc >> 32
    payload = data[base + shm_mod.BUFFER_HEADER:base + shm_mod.BUFFER_HEADER + size]
    if state != 2 * n or t != snap.publish_time_ns or size > capacity:
        return False
    if zlib.crc32(payload, (n * shm_mod._CRC_MUL ^ t) & 0xFFFFFFFF) != lc & 0xFFFFFFFF:
        return False
    decoded = msgspec.msgpack.decode(payload, type=LoadSnapshot)
    return decoded.dp_rank == rank and _same_values(decoded, snap)


# -- the region header ---------------------------------------------------------------

DP_SIZE = 3


@FUZZ
@given(data=st.data())
def test_fuzzed_header_is_a_clear_region_error_or_a_sound_reader(data: st.DataObject) -> None:
    path = _region_path()
    try:
        with ShmPublisher(path, dp_size=DP_SIZE, dp_rank=0) as pub:
            pub.publish(_snapshot(0, 5))
        raw = bytearray(path.read_bytes())
        how = data.draw(st.sampled_from(["splice", "word", "whole", "resize"]), label="how")
        if how == "splice":  # random bytes at a random place in the 256-byte header
            at = data.draw(st.integers(0, shm_mod.HEADER_SIZE - 1), label="at")
            junk = data.draw(st.binary(min_size=1, max_size=shm_mod.HEADER_SIZE - at), label="junk")
            raw[at:at + len(junk)] = junk
        elif how == "word":  # one header field set to an extreme or random value
            at = data.draw(st.sampled_from([8, 12, 16, 24, 28, 32, 36, 40]), label="at")
            value = data.draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1]) | st.integers(0, 2**32 - 1),
                              label="value")
            raw[at:at + 4] = struct.pack("<I", value)
        elif how == "whole":  # a file of random bytes, any length
            raw = bytearray(data.draw(st.binary(max_size=4096), label="file"))
        else:  # the right header, the wrong size
            size = data.draw(st.integers(0, len(raw) + 4096), label="size")
            raw = raw[:size] + bytes(max(0, size - len(raw)))
        path.write_bytes(bytes(raw))
        try:
            reader = ShmReader(path)
        except RegionError as e:
            message = str(e)
            assert str(path) in message, message
            assert len(message) > len(str(path)) + 20, message  # says what is wrong, not just where
            return
        # It opened: what it shows must still be backed by a checksum-valid slot.
        with reader:
            for snap in reader.read_all():
                assert snap.dp_rank < reader.dp_size
                assert _checksum_matches(path, snap.dp_rank, snap)
    finally:
        path.unlink(missing_ok=True)


# -- slots and sequence words ---------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzzed_slot_never_yields_a_wrong_snapshot(data: st.DataObject) -> None:
    path = _region_path()
    try:
        with ShmPublisher(path, dp_size=DP_SIZE, dp_rank=0) as p0, \
                ShmPublisher(path, dp_size=DP_SIZE, dp_rank=1) as p1:
            for k in range(data.draw(st.integers(1, 3), label="publishes")):
                p0.publish(_snapshot(0, k))
            p1.publish(_snapshot(1, 77))
            warm = ShmReader(path)  # has read rank 0 intact: its last good copy
            good0 = warm.read(0)
            good1 = warm.read(1)
            assert good0 is not None and good1 is not None
            region = p0._region
            rank = data.draw(st.sampled_from([0, 2]), label="rank")  # published, and never published
            slot = region.slots_off + rank * region.slot_size
            with open(path, "r+b") as f:
                for _ in range(data.draw(st.integers(1, 4), label="writes")):
                    target = data.draw(st.sampled_from(["slot", "seq", "state"]), label="target")
                    if target == "slot":
                        at = slot + data.draw(st.integers(0, region.slot_size - 1), label="at")
                        junk = data.draw(st.binary(min_size=1, max_size=64), label="junk")
                        junk = junk[:slot + region.slot_size - at]
                    elif target == "seq":  # the rank's sequence word: any value, e.g. a jump ahead
                        at = region.seq_off + 8 * rank
                        junk = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1), label="seq"))
                    else:  # a buffer's state word (odd = being written, or a plausible even value)
                        at = slot + data.draw(st.sampled_from([0, region.slot_size // 2]), label="buf")
                        junk = struct.pack("<Q", data.draw(st.integers(0, 64), label="state"))
                    f.seek(at)
                    f.write(junk)
            fresh = ShmReader(path)  # no last good copy
            fresh_py = ShmReader(path, native=False)  # read_all's loop in Python, not C
            with warm, fresh, fresh_py:
                for reader, before in ((warm, good0 if rank == 0 else None), (fresh, None), (fresh_py, None)):
                    # read_all first: its own changed-rank loop, not the copy read() cached
                    for snap in (*[s for s in reader.read_all() if s.dp_rank == rank], reader.read(rank)):
                        if snap is None or snap is before:
                            continue
                        assert snap.dp_rank == rank
                        assert _checksum_matches(path, rank, snap), snap
                    assert reader.read(1) is not None and _same_values(reader.read(1), good1)
                    assert reader.freshness(reader.read(1))[0].value == "healthy"
                # The publisher carries on after the damage and readers follow it again.
                if rank == 0:
                    n = p0.publish(_snapshot(0, 1234))
                    for reader in (warm, fresh, fresh_py):
                        now = reader.read(0)
                        assert now.seq == n and _same_values(now, _snapshot(0, 1234))
    finally:
        path.unlink(missing_ok=True)


def _forge(path: Path, rank: int, n: int, payload: bytes) -> None:
    """Write payload as publish n of rank with a *valid* checksum: a writer that lies, or a bug."""
    data = path.read_bytes()
    (_, _, _, _, slot_count, slot_size, capacity, _, _) = shm_mod._HEADER.unpack_from(data, 0)
    seq_off, slots_off, _ = shm_mod._layout(slot_count, capacity)
    base = slots_off + rank * slot_size + (n & 1) * (slot_size // 2)
    t = time.time_ns()
    crc = zlib.crc32(payload, (n * shm_mod._CRC_MUL ^ t) & 0xFFFFFFFF)
    with open(path, "r+b") as f:
        f.seek(base)
        f.write(shm_mod._BUFFER_HEADER.pack(2 * n, t, len(payload) << 32 | crc, 0) + payload)
        f.seek(seq_off + 8 * rank)
        f.write(struct.pack("<Q", n))


_GOOD_PAYLOAD = msgspec.msgpack.encode(_snapshot(0, 9))


@FUZZ
@given(payload=st.binary(max_size=300) | st.builds(
    lambda junk, at: _GOOD_PAYLOAD[:at] + junk + _GOOD_PAYLOAD[at + len(junk):],
    st.binary(min_size=1, max_size=6), st.integers(0, len(_GOOD_PAYLOAD) - 1)))
def test_checksum_valid_garbage_is_never_served_and_never_raises(payload: bytes) -> None:
    """Past the checksum (forged): the payload must decode as this rank's LoadSnapshot or be dropped
    (counted as corrupt, last good copy kept); a reader never raises for what a slot holds."""
    path = _region_path()
    try:
        with ShmPublisher(path, dp_size=DP_SIZE, dp_rank=0) as pub:
            pub.publish(_snapshot(0, 1))
            warm = ShmReader(path)
            good = warm.read(0)
            _forge(path, 0, 2, payload)
            try:
                decoded = msgspec.msgpack.decode(payload, type=LoadSnapshot)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                decoded = None
            acceptable = decoded is not None and decoded.dp_rank == 0
            fresh = ShmReader(path)
            fresh_py = ShmReader(path, native=False)  # read_all's loop in Python, not C
            with warm, fresh, fresh_py:
                for reader, before in ((warm, good), (fresh, None), (fresh_py, None)):
                    for snap in (*reader.read_all(), reader.read(0)):  # read_all's own loop first
                        if acceptable:
                            assert snap.seq == 2 and _same_values(snap, decoded)
                        else:
                            assert snap is before
                    if not acceptable:
                        assert reader.corrupt >= 1
    finally:
        path.unlink(missing_ok=True)


# -- relay frames ----------------------------------------------------------------------------


def _collector(path: Path, dp_size: int, endpoint: str = "tcp://127.0.0.1:0") -> Collector:
    return Collector(CollectorSettings(endpoint=endpoint, shm=path, dp_size=dp_size))


_VALID_PAYLOAD = msgspec.msgpack.encode(_snapshot(0, 3))

# Frames that are nearly right: a real header with one thing wrong, or a real payload damaged.
_frames = st.one_of(
    st.binary(max_size=256),
    st.binary(max_size=128).map(lambda b: b"LSR\x01" + b),
    st.builds(lambda rank, size, fp, epoch, seq, payload: encode_frame(
        payload, dp_rank=rank, dp_size=size, epoch=epoch, seq=seq, fingerprint=fp),
        rank=st.integers(0, 2**32 - 1) | st.just(0), size=st.integers(0, 2**32 - 1) | st.just(DP_SIZE),
        fp=st.integers(0, 2**64 - 1) | st.just(shm_mod.schema.SCHEMA_FINGERPRINT),
        epoch=st.integers(0, 2**64 - 1), seq=st.integers(0, 2**64 - 1),
        payload=st.binary(max_size=200) | st.just(_VALID_PAYLOAD).map(lambda p: p[:len(p) // 2])),
    st.builds(lambda payload: encode_frame(payload, dp_rank=0, dp_size=DP_SIZE, epoch=99, seq=1),
              st.binary(min_size=1, max_size=3000)),
    st.builds(lambda b, at: _VALID_PAYLOAD[:at] + b + _VALID_PAYLOAD[at + len(b):],
              st.binary(min_size=1, max_size=8), st.integers(0, len(_VALID_PAYLOAD) - 1)).map(
        lambda p: encode_frame(p, dp_rank=0, dp_size=DP_SIZE, epoch=7, seq=2**40)),
)


@FUZZ
@given(frames=st.lists(st.lists(_frames, min_size=1, max_size=3), min_size=1, max_size=8))
def test_collector_counts_and_drops_garbage(frames: list[list[bytes]]) -> None:
    path = _region_path()
    try:
        collector = _collector(path, DP_SIZE)
        good = encode_frame(msgspec.msgpack.encode(_snapshot(1, 42)), dp_rank=1, dp_size=DP_SIZE,
                            epoch=5, seq=1)
        assert collector.handle([good], time.time_ns())
        reader = ShmReader(path)
        with reader:
            rank1 = reader.read(1)
            for parts in frames:
                before = reader.sequences()
                accepted = collector.handle(parts, time.time_ns())  # never raises
                after = reader.sequences()
                if not accepted:
                    assert after == before, "a rejected frame moved a rank"
                    assert reader.read(1) is rank1
                    continue
                # Accepted means a well-formed frame (hypothesis can build one, e.g. a new
                # epoch for a rank): exactly that rank moved, to exactly what the frame holds.
                (frame,) = parts
                _, rank, _, _, _, _ = FRAME_HEADER.unpack_from(frame)
                expect = msgspec.msgpack.decode(frame[FRAME_HEADER.size:], type=LoadSnapshot)
                assert after == [n + 1 if r == rank else n for r, n in enumerate(before)]
                assert _same_values(reader.read(rank), expect)
                if rank == 1:
                    rank1 = reader.read(1)
            total = len(frames) + 1
            assert collector.accepted + sum(collector.rejected.values()) == total
            assert set(collector.rejected) == set(REJECT_REASONS)
        collector._writer.close()  # handle() was driven without the thread, which would close it
    finally:
        path.unlink(missing_ok=True)


def test_garbage_over_a_real_socket_is_counted_and_valid_ranks_flow() -> None:
    """The collector thread on loopback: garbage, multipart and oversize frames between valid ones."""
    import random

    path = _region_path()
    rng = random.Random(1234)
    ctx = zmq.Context()
    try:
        with _collector(path, DP_SIZE) as collector:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(collector.bound_endpoint)
            garbage = 0
            for seq in range(1, 21):
                push.send(encode_frame(msgspec.msgpack.encode(_snapshot(2, seq)), dp_rank=2,
                                       dp_size=DP_SIZE, epoch=11, seq=seq))
                for _ in range(5):
                    kind = rng.randrange(3)
                    if kind == 0:
                        push.send(rng.randbytes(rng.randrange(0, 300)))
                    elif kind == 1:
                        push.send_multipart([b"LSR\x01", rng.randbytes(40)])
                    else:
                        push.send(b"LSR\x01" + rng.randbytes(FRAME_HEADER.size + rng.randrange(200)))
                    garbage += 1
            push.send(b"x" * (collector.max_frame_bytes + 1))  # oversized (ZMQ still delivers it)
            garbage += 1
            deadline = time.monotonic() + 10
            while collector.accepted + sum(collector.rejected.values()) < 20 + garbage:
                assert time.monotonic() < deadline, (collector.accepted, collector.rejected)
                time.sleep(0.01)
            assert collector.accepted == 20
            assert sum(collector.rejected.values()) == garbage
            assert collector.rejected["oversized"] == 1 and collector.rejected["malformed"] > 0
            with ShmReader(path) as reader:
                snap = reader.read(2)
                assert _same_values(snap, _snapshot(2, 20)) and snap.seq == 20
                assert reader.sequences() == [0, 0, 20]
            push.close()
    finally:
        ctx.term()
        path.unlink(missing_ok=True)


# -- REST: schemathesis against the OpenAPI schema --------------------------------------------

import schemathesis  # noqa: E402
import schemathesis.pytest  # noqa: E402

SCHEMA_DP_SIZE = 4


@pytest.fixture(scope="module")
def rest_schema() -> Iterator[Any]:
    """The standalone app (rest.create_app) over a region with 3 of 4 ranks published, as ASGI."""
    from loadsvc.core.store import LoadStore
    from loadsvc.surfaces.rest import create_app

    path = _region_path()
    pubs = [ShmPublisher(path, dp_size=SCHEMA_DP_SIZE, dp_rank=r) for r in range(3)]
    for r, pub in enumerate(pubs):
        pub.publish(_snapshot(r, 10 + r))
    store = LoadStore(StoreSettings(shm=path))
    app = create_app(store)
    try:
        api = schemathesis.openapi.from_asgi("/openapi.json", app)
        # Valid requests and invalid ones (values outside the schema: 400, never a 5xx).
        api.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                            schemathesis.GenerationMode.NEGATIVE])
        yield api
    finally:
        store.close()
        for pub in pubs:
            pub.close()
        path.unlink(missing_ok=True)


schema = schemathesis.pytest.from_fixture("rest_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_rest_openapi_no_server_errors(case: Any) -> None:
    """Every generated request (valid and invalid) gets a documented status and body; never a 5xx
    (503 is /health's documented answer while no region is attached, which is not the case here)."""
    response = case.call_and_validate()
    assert response.status_code < 500, response.text


# -- gRPC: random requests and raw bytes into a real `loadsvc serve` ---------------------------

GRPC_DP_SIZE = 4
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
METHODS = ("/loadsvc.v1.LoadService/GetLoads", "/sglang.grpc.scheduler.SglangScheduler/GetLoads")
WATCH = "/loadsvc.v1.LoadService/WatchLoads"


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[tuple[ServeProcess, grpc.Channel]]:
    path = _region_path()
    pubs = [ShmPublisher(path, dp_size=GRPC_DP_SIZE, dp_rank=r) for r in range(GRPC_DP_SIZE)]
    for r, pub in enumerate(pubs):
        pub.publish(_snapshot(r, r))
    server = start_serve(path)
    channel = grpc.insecure_channel(server.grpc_target)
    try:
        yield server, channel
    finally:
        channel.close()
        log = server.log()
        code = server.stop()
        server.close()
        for pub in pubs:
            pub.close()
        path.unlink(missing_ok=True)
        assert code == 0, log
        assert "Traceback" not in log, log


def _unary(channel: grpc.Channel, method: str, body: bytes) -> tuple[grpc.StatusCode, bytes | None]:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        return grpc.StatusCode.OK, call(body, timeout=5)
    except grpc.RpcError as e:
        return e.code(), None


def _first_of_stream(channel: grpc.Channel, body: bytes) -> tuple[grpc.StatusCode, bytes | None]:
    call = channel.unary_stream(WATCH, request_serializer=None, response_deserializer=None)(body, timeout=5)
    try:
        return grpc.StatusCode.OK, next(call)
    except grpc.RpcError as e:
        return e.code(), None
    finally:
        call.cancel()


_include = st.lists(st.sampled_from(["core", "memory", "spec", "lora", "disagg", "queues", "all",
                                     "ALL", "core,memory", " queues ", "", ","]) | st.text(max_size=12),
                    max_size=4)
_rank = st.none() | st.integers(-2**31, 2**31 - 1) | st.integers(-1, GRPC_DP_SIZE)
_interval = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 1000, 3_600_000, 3_600_001])


def _request(cls: Any, rank: int | None, include: list[str], **kw: int) -> bytes:
    msg = cls(include=include, **kw)
    if rank is not None:
        msg.dp_rank = rank
    return msg.SerializeToString()


@pytest.mark.integration
@FUZZ_SLOW
@given(rank=_rank, include=_include, method=st.sampled_from(METHODS))
def test_grpc_get_loads_random_requests(grpc_server: Any, rank: int | None, include: list[str],
                                        method: str) -> None:
    server, channel = grpc_server
    code, body = _unary(channel, method, _request(pb.GetLoadsRequest, rank, include))
    assert code in ALLOWED, code
    if code == grpc.StatusCode.OK:
        resp = pb.GetLoadsResponse.FromString(body)
        assert resp.dp_rank_count == GRPC_DP_SIZE, server.log()[-4000:]
        assert [x.dp_rank for x in resp.loads] == ([rank] if rank is not None else list(range(GRPC_DP_SIZE)))
    else:  # only a bad rank or an unknown token are refused
        assert (rank is not None and not 0 <= rank < GRPC_DP_SIZE) or any(
            t.strip().lower() not in ("core", "memory", "spec", "lora", "disagg", "queues", "all", "")
            for i in include for t in i.split(","))


@pytest.mark.integration
@FUZZ_SLOW
@given(rank=_rank, include=_include, lo=_interval, hi=_interval)
def test_grpc_watch_loads_random_requests(grpc_server: Any, rank: int | None, include: list[str],
                                          lo: int, hi: int) -> None:
    server, channel = grpc_server
    code, body = _first_of_stream(channel, _request(pb.WatchLoadsRequest, rank, include,
                                                    min_interval_ms=lo, max_interval_ms=hi))
    assert code in ALLOWED, code
    if code == grpc.StatusCode.OK:
        assert pb.GetLoadsResponse.FromString(body).dp_rank_count == GRPC_DP_SIZE, server.log()[-4000:]


@pytest.mark.integration
@FUZZ_SLOW
@given(body=st.binary(max_size=200) | st.builds(lambda a, b: a + b, st.sampled_from([
    _request(pb.GetLoadsRequest, 1, ["memory"]), _request(pb.WatchLoadsRequest, None, ["all"], max_interval_ms=5)]),
    st.binary(min_size=1, max_size=20)), method=st.sampled_from((*METHODS, WATCH)))
def test_grpc_raw_bytes(grpc_server: Any, body: bytes, method: str) -> None:
    """Any bytes as the request message: parsed (OK), or refused as INVALID_ARGUMENT; nothing else."""
    _, channel = grpc_server
    code, _ = (_first_of_stream(channel, body) if method == WATCH else _unary(channel, method, body))
    assert code in ALLOWED, (code, body)


@pytest.mark.integration
def test_grpc_server_still_serves_after_the_fuzz(grpc_server: Any) -> None:
    server, channel = grpc_server
    code, body = _unary(channel, METHODS[0], b"")
    assert code == grpc.StatusCode.OK, server.log()[-4000:]
    assert [x.num_running_reqs for x in pb.GetLoadsResponse.FromString(body).loads] == [0, 1, 2, 3]
