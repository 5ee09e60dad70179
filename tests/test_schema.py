"""The schema is declared once (proto/) and everything else follows it.

    generated code up to date  `python -m loadsvc._codegen --check`
    Structs == descriptor      names, field-number order, python types, sections
    loadsvc.v1 == SGLang       numbers, types and names of the GetLoads contract
    round trips                Struct <-> proto, loadsvc.v1 bytes <-> sglang bytes
"""

from __future__ import annotations

import importlib.resources
import re
import subprocess
import sys
import typing
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import loadsvc
from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.sglang.grpc.scheduler import sglang_scheduler_pb2 as sg
from loadsvc.core import schema

ROOT = Path(__file__).resolve().parent.parent

# The value rule: no number in a snapshot is negative (nor NaN or infinite, for floats).
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (0, 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (0, 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, None),
}
FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def full_snapshot(rank: int = 3) -> Any:
    """A snapshot with every field and every section set to a distinct value."""
    return schema.LoadSnapshot(
        dp_rank=rank, num_running_reqs=12, num_waiting_reqs=3, num_total_reqs=15,
        num_used_tokens=40_960, max_total_num_tokens=200_000, token_usage=0.2048,
        gen_throughput=1500.5, cache_hit_rate=0.4, utilization=0.7, max_running_requests=256,
        memory=schema.MemoryMetrics(weight_gb=15.25, kv_cache_gb=40.5, graph_gb=2.75,
                                    token_capacity=200_000),
        speculative=schema.SpeculativeMetrics(accept_length=2.5, accept_rate=0.625),
        lora=schema.LoRAMetrics(slots_used=3, slots_total=8, utilization=0.375),
        disaggregation=schema.DisaggregationMetrics(
            mode="decode", prefill_prealloc_queue_reqs=1, prefill_inflight_queue_reqs=2,
            decode_prealloc_queue_reqs=3, decode_transfer_queue_reqs=4,
            decode_retracted_queue_reqs=5, kv_transfer_speed_gb_s=12.5, kv_transfer_latency_ms=0.75),
        queues=schema.QueueMetrics(waiting=3, grammar=1, paused=2, retracted=4),
        num_waiting_uncached_tokens=777, num_total_tokens=41_000,
        publish_time_ns=1_764_000_000_123_456_789, seq=42, status=schema.Status.HEALTHY,
        age_ms=12.5, epoch=0x1234_5678_9ABC)


# --- generated code ------------------------------------------------------------------------


def test_generated_code_is_not_stale() -> None:
    proc = subprocess.run([sys.executable, "-m", "loadsvc._codegen", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"regenerate with `python -m loadsvc._codegen`:\n{proc.stdout}{proc.stderr}"
    assert "stale" not in proc.stdout


# --- Structs derived from the descriptor -------------------------------------------------


def _struct_messages() -> list[tuple[type, Descriptor]]:
    """(Struct, descriptor) for LoadSnapshot, every section, and AggregateMetrics."""
    pairs = [(schema.LoadSnapshot, pb.LoadSnapshot.DESCRIPTOR),
             (schema.AggregateMetrics, pb.AggregateMetrics.DESCRIPTOR)]
    for f in pb.LoadSnapshot.DESCRIPTOR.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            pairs.append((getattr(schema, f.message_type.name), f.message_type))
    return pairs


def test_every_section_has_a_public_struct() -> None:
    sections = {f.message_type.name for f in pb.LoadSnapshot.DESCRIPTOR.fields
                if f.type == FieldDescriptor.TYPE_MESSAGE}
    assert sections == {"MemoryMetrics", "SpeculativeMetrics", "LoRAMetrics",
                        "DisaggregationMetrics", "QueueMetrics"}
    for name in sections:
        assert getattr(loadsvc, name) is getattr(schema, name)
    assert schema.SECTIONS == {"memory": "memory", "spec": "speculative", "lora": "lora",
                               "disagg": "disaggregation", "queues": "queues"}


@pytest.mark.parametrize("cls,desc", _struct_messages(), ids=lambda x: getattr(x, "__name__", ""))
def test_struct_matches_descriptor_field_by_field(cls: type, desc: Descriptor) -> None:
    proto_fields = sorted(desc.fields, key=lambda f: f.number)
    struct_fields = msgspec.structs.fields(cls)
    assert [f.name for f in struct_fields] == [f.name for f in proto_fields]
    assert cls.__name__ == desc.name
    for sf, pf in zip(struct_fields, proto_fields):
        where = f"{desc.name}.{pf.name} (#{pf.number})"
        if pf.type == FieldDescriptor.TYPE_MESSAGE:
            assert pf.has_presence, where
            assert sf.type == typing.Optional[getattr(schema, pf.message_type.name)], where
            assert sf.default is None, where
        elif pf.type == FieldDescriptor.TYPE_ENUM:
            assert sf.type is schema.Status, where
            assert sf.default is schema.Status.UNSPECIFIED, where
        elif pf.type in INT_RANGES:
            assert typing.get_origin(sf.type) is typing.Annotated, where
            base, meta = typing.get_args(sf.type)
            assert base is int, where
            lo, hi = INT_RANGES[pf.type]
            assert (meta.ge, meta.le) == (lo, hi), where
            assert sf.default == 0 and type(sf.default) is int, where
        elif pf.type in FLOAT_TYPES:
            assert typing.get_origin(sf.type) is typing.Annotated, where
            base, meta = typing.get_args(sf.type)
            assert base is float and (meta.ge, meta.le) == (0.0, sys.float_info.max), where
            assert sf.default == 0.0 and type(sf.default) is float, where
        elif pf.type == FieldDescriptor.TYPE_STRING:
            assert sf.type is str and sf.default == "", where
        else:
            pytest.fail(f"{where}: proto type {pf.type} has no parity check here")


def test_status_enum_follows_proto() -> None:
    values = pb.DESCRIPTOR.enum_types_by_name["LoadStatus"].values
    assert [(v.number, v.name) for v in values] == [
        (0, "LOAD_STATUS_UNSPECIFIED"), (1, "LOAD_STATUS_HEALTHY"),
        (2, "LOAD_STATUS_STALE"), (3, "LOAD_STATUS_UNREACHABLE")]
    assert [s.value for s in schema.Status] == ["unspecified", "healthy", "stale", "unreachable"]


def test_core_and_reader_fields() -> None:
    assert schema.CORE_FIELDS[:11] == (
        "dp_rank", "num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
        "max_total_num_tokens", "token_usage", "gen_throughput", "cache_hit_rate", "utilization",
        "max_running_requests")
    assert "num_waiting_uncached_tokens" in schema.CORE_FIELDS
    assert "num_total_tokens" in schema.CORE_FIELDS
    assert not set(schema.CORE_FIELDS) & {"status", "age_ms", "seq", "publish_time_ns", "memory"}
    assert schema.READER_FIELDS == ("status", "age_ms")


def test_fingerprint_is_64_bit_and_stable_in_a_new_process() -> None:
    assert 0 < schema.SCHEMA_FINGERPRINT < 2**64
    out = subprocess.run([sys.executable, "-c",
                          "from loadsvc.core import schema; print(schema.SCHEMA_FINGERPRINT)"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert int(out) == schema.SCHEMA_FINGERPRINT


# --- wire compatibility with the SGLang contract -----------------------------------------


def _assert_wire_identical(ours: Descriptor, theirs: Descriptor, only: set[int] | None = None) -> None:
    """Every field of theirs (or only those numbers) exists in ours with the same number,
    type, name and presence; message fields recursively."""
    mine = {f.number: f for f in ours.fields}
    for tf in theirs.fields:
        if only is not None and tf.number not in only:
            continue
        where = f"{theirs.full_name}.{tf.name} (#{tf.number}) vs {ours.full_name}"
        assert tf.number in mine, where
        of = mine[tf.number]
        assert (of.name, of.type, of.has_presence, of.is_repeated) == \
            (tf.name, tf.type, tf.has_presence, tf.is_repeated), where
        if tf.type == FieldDescriptor.TYPE_MESSAGE:
            _assert_wire_identical(of.message_type, tf.message_type)
            # and no extra field in a shared message
            assert {f.number for f in of.message_type.fields} == {
                f.number for f in tf.message_type.fields}, where


def test_load_snapshot_fields_1_to_17_match_scheduler_load() -> None:
    ours, theirs = pb.LoadSnapshot.DESCRIPTOR, sg.SchedulerLoad.DESCRIPTOR
    assert sorted(f.number for f in theirs.fields) == list(range(1, 18))
    _assert_wire_identical(ours, theirs)
    extra = [f for f in ours.fields if f.number not in range(1, 18)]
    assert {f.name for f in extra} >= {"num_total_tokens", "publish_time_ns", "seq", "status", "age_ms"}
    assert all(f.number >= 100 for f in extra), [(f.name, f.number) for f in extra]
    # The exact SGLang contract (docs/architecture.md, "Wire compatibility"), numbers and types.
    t = FieldDescriptor
    expected = {1: t.TYPE_INT32, 2: t.TYPE_INT32, 3: t.TYPE_INT32, 4: t.TYPE_INT32, 5: t.TYPE_INT32,
                6: t.TYPE_INT32, 7: t.TYPE_DOUBLE, 8: t.TYPE_DOUBLE, 9: t.TYPE_DOUBLE,
                10: t.TYPE_DOUBLE, 11: t.TYPE_INT32, 12: t.TYPE_MESSAGE, 13: t.TYPE_MESSAGE,
                14: t.TYPE_MESSAGE, 15: t.TYPE_MESSAGE, 16: t.TYPE_MESSAGE, 17: t.TYPE_INT32}
    assert {f.number: f.type for f in ours.fields if f.number <= 17} == expected


@pytest.mark.parametrize("name", ["MemoryMetrics", "SpeculativeMetrics", "LoRAMetrics",
                                  "DisaggregationMetrics", "QueueMetrics", "AggregateMetrics",
                                  "GetLoadsRequest"])
def test_shared_messages_match(name: str) -> None:
    ours = pb.DESCRIPTOR.message_types_by_name[name]
    theirs = sg.DESCRIPTOR.message_types_by_name[name]
    _assert_wire_identical(ours, theirs)
    assert [(f.number, f.name, f.type) for f in sorted(ours.fields, key=lambda f: f.number)] == \
        [(f.number, f.name, f.type) for f in sorted(theirs.fields, key=lambda f: f.number)]


def test_get_loads_response_matches() -> None:
    ours, theirs = pb.GetLoadsResponse.DESCRIPTOR, sg.GetLoadsResponse.DESCRIPTOR
    assert [(f.number, f.name, f.type) for f in ours.fields] == \
        [(f.number, f.name, f.type) for f in theirs.fields]
    loads = ours.fields_by_name["loads"]
    assert loads.message_type.full_name == "loadsvc.v1.LoadSnapshot"
    assert theirs.fields_by_name["loads"].message_type.full_name == "sglang.grpc.scheduler.SchedulerLoad"
    _assert_wire_identical(loads.message_type, theirs.fields_by_name["loads"].message_type)
    _assert_wire_identical(ours.fields_by_name["aggregate"].message_type,
                           theirs.fields_by_name["aggregate"].message_type)


# --- round trips ---------------------------------------------------------------------------


def test_struct_proto_round_trip() -> None:
    snap = full_snapshot()
    msg = schema.to_proto(snap)
    assert isinstance(msg, pb.LoadSnapshot)
    assert msg.memory.kv_cache_gb == 40.5 and msg.disaggregation.mode == "decode"
    assert msg.status == pb.LOAD_STATUS_HEALTHY and msg.epoch == 0x1234_5678_9ABC
    back = schema.from_proto(pb.LoadSnapshot.FromString(msg.SerializeToString()))
    assert back == snap
    assert schema.to_dict(back) == schema.to_dict(snap)


def test_absent_sections_stay_absent() -> None:
    snap = schema.LoadSnapshot(dp_rank=1, num_running_reqs=2)
    msg = schema.to_proto(snap)
    assert not msg.HasField("memory") and not msg.HasField("queues")
    back = schema.from_proto(msg)
    assert back.memory is None and back.queues is None and back == snap
    # A present but all-default section survives too (presence, not value, decides).
    snap = schema.LoadSnapshot(dp_rank=1, queues=schema.QueueMetrics())
    msg = pb.LoadSnapshot.FromString(schema.to_proto(snap).SerializeToString())
    assert msg.HasField("queues")
    assert schema.from_proto(msg).queues == schema.QueueMetrics()


def test_msgpack_round_trip() -> None:
    snap = full_snapshot()
    data = msgspec.msgpack.encode(snap)
    assert msgspec.msgpack.decode(data, type=schema.LoadSnapshot) == snap
    assert schema.to_dict(snap)["memory"]["weight_gb"] == 15.25
    assert schema.to_dict(snap)["status"] == "healthy"


def test_loadsvc_response_bytes_parse_as_sglang() -> None:
    snaps = [full_snapshot(0), schema.LoadSnapshot(dp_rank=1, num_running_reqs=7, token_usage=0.5)]
    resp = pb.GetLoadsResponse(timestamp="2026-11-24T10:00:00.123456+00:00", version="0.1.0",
                               dp_rank_count=2)
    for s in snaps:
        schema.to_proto(s, resp.loads.add())
    schema.to_proto(schema.AggregateMetrics(total_running_reqs=19, total_waiting_reqs=3,
                                            total_reqs=22, avg_token_usage=0.35,
                                            avg_throughput=750.25, avg_utilization=0.35),
                    resp.aggregate)
    theirs = sg.GetLoadsResponse.FromString(resp.SerializeToString())
    assert theirs.timestamp == resp.timestamp and theirs.version == "0.1.0"
    assert theirs.dp_rank_count == 2 and len(theirs.loads) == 2
    assert theirs.aggregate.total_reqs == 22 and theirs.aggregate.avg_throughput == 750.25
    for mine, load in zip(snaps, theirs.loads):
        got = schema.from_proto(load)  # SchedulerLoad maps onto LoadSnapshot
        assert isinstance(got, schema.LoadSnapshot)
        for f in sg.SchedulerLoad.DESCRIPTOR.fields:
            assert getattr(got, f.name) == getattr(mine, f.name), f.name
        # Fields only loadsvc has (>= 100) are unknown to SGLang and not seen there.
        assert got.seq == 0 and got.publish_time_ns == 0
    assert not theirs.loads[1].HasField("memory")
    assert theirs.loads[0].disaggregation.kv_transfer_latency_ms == 0.75
    # And back: sglang bytes parse as loadsvc.v1 with the same values.
    again = pb.GetLoadsResponse.FromString(theirs.SerializeToString())
    assert schema.from_proto(again.loads[1]) == snaps[1]


def test_sglang_request_parses_as_loadsvc() -> None:
    req = sg.GetLoadsRequest(dp_rank=0, include=["core", "memory"])
    mine = pb.GetLoadsRequest.FromString(req.SerializeToString())
    assert mine.HasField("dp_rank") and mine.dp_rank == 0 and list(mine.include) == ["core", "memory"]
    assert not pb.GetLoadsRequest.FromString(sg.GetLoadsRequest().SerializeToString()).HasField("dp_rank")


# --- public names, typing ------------------------------------------------------------------


def test_public_names() -> None:
    from loadsvc import (  # noqa: F401
        DisaggregationMetrics,
        LoadSnapshot,
        LoRAMetrics,
        MemoryMetrics,
        QueueMetrics,
        ShmPublisher,
        ShmReader,
        SpeculativeMetrics,
    )

    for name in ("LoadSnapshot", "ShmPublisher", "ShmReader", "MemoryMetrics", "SpeculativeMetrics",
                 "LoRAMetrics", "DisaggregationMetrics", "QueueMetrics", "RegionError", "Status"):
        assert name in loadsvc.__all__, name
    assert LoadSnapshot is schema.LoadSnapshot and ShmReader.__module__ == "loadsvc.core.region"


def test_py_typed_is_installed() -> None:
    marker = importlib.resources.files("loadsvc") / "py.typed"
    assert marker.is_file()
    # Also shipped by a non-editable build: pyproject lists it as package data.
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()


# --- values protobuf cannot carry ----------------------------------------------------------


@pytest.mark.parametrize("field,value", [("num_running_reqs", 2**31), ("dp_rank", -1),
                                         ("num_waiting_uncached_tokens", 2**40)])
def test_int32_out_of_range_fails_decode(field: str, value: int) -> None:
    snap = schema.LoadSnapshot(dp_rank=0)
    setattr(snap, field, value)  # Structs do not validate on assignment
    data = msgspec.msgpack.encode(snap)
    index = schema.LoadSnapshot.__struct_fields__.index(field)  # payloads are arrays
    bound = "<= 2147483647" if value > 0 else ">= 0"
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"{bound} - at `$[{index}]`")):
        msgspec.msgpack.decode(data, type=schema.LoadSnapshot)
    # In range at the edge is fine.
    setattr(snap, field, 2**31 - 1)
    assert getattr(msgspec.msgpack.decode(msgspec.msgpack.encode(snap), type=schema.LoadSnapshot),
                   field) == 2**31 - 1


# --- the value rule: no number negative, NaN or infinite ---------------------------------

NAN, INF = float("nan"), float("inf")
BAD_VALUES = [("num_running_reqs", -5), ("dp_rank", -1), ("num_total_tokens", -1),
              ("token_usage", NAN), ("gen_throughput", INF), ("utilization", -INF),
              ("cache_hit_rate", -0.5), ("age_ms", NAN), ("memory.kv_cache_gb", NAN),
              ("speculative.accept_rate", INF), ("queues.waiting", -1),
              ("disaggregation.kv_transfer_latency_ms", -1.0), ("num_running_reqs", 2**31)]


def _with(path: str, value: Any) -> Any:
    snap = full_snapshot(0)
    target = snap
    *sections, name = path.split(".")
    for section in sections:
        target = getattr(target, section)
    setattr(target, name, value)  # Structs do not validate on assignment
    return snap


@pytest.mark.parametrize("path,value", BAD_VALUES, ids=[f"{p}={v}" for p, v in BAD_VALUES])
def test_value_rule_refuses_negative_and_non_finite_numbers(path: str, value: Any) -> None:
    payload = msgspec.msgpack.encode(_with(path, value))
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(payload, type=schema.LoadSnapshot)
    problem = schema.value_error(payload)
    assert problem is not None and problem.startswith(f"{path} = {value!r}: expected "), problem
    assert ("finite number >= 0" if isinstance(value, float) else "an integer in 0..") in problem


def test_value_rule_admits_the_edges() -> None:
    snap = full_snapshot(0)
    for name in ("token_usage", "gen_throughput", "cache_hit_rate"):
        setattr(snap, name, 0.0)
    snap.utilization = sys.float_info.max  # no upper bound but the double's: engines differ on ratios
    snap.num_running_reqs, snap.num_waiting_reqs = 0, 2**31 - 1
    snap.memory.kv_cache_gb = -0.0  # compares equal to 0
    payload = msgspec.msgpack.encode(snap)
    assert msgspec.msgpack.decode(payload, type=schema.LoadSnapshot) == snap
    assert schema.value_error(payload) is None
    assert schema.value_error(b"\xc1 not msgpack") is None  # malformed is not a bad value


@pytest.mark.parametrize("path,value", [("token_usage", NAN), ("num_running_reqs", -5),
                                        ("memory.weight_gb", INF), ("num_running_reqs", 2**31)])
def test_publisher_refuses_a_bad_value_and_leaves_the_slot_alone(path: str, value: Any) -> None:
    region = Path(f"/dev/shm/loadsvc-test-schema-{uuid.uuid4().hex}.shm")
    try:
        with loadsvc.ShmPublisher(region, dp_size=2, dp_rank=0) as pub, loadsvc.ShmReader(region) as reader:
            pub.publish(full_snapshot(0))
            before = region.read_bytes()
            with pytest.raises(ValueError, match=re.escape(f"dp_rank 0: snapshot field {path} = {value!r}: "
                                                           "expected ")) as err:
                pub.publish(_with(path, value))
            assert "nothing written" in str(err.value) and str(region) in str(err.value)
            assert region.read_bytes() == before and pub.seq == 1
            assert reader.read(0).seq == 1 and reader.corrupt == 0
    finally:
        region.unlink(missing_ok=True)