"""Every non-protobuf form of a snapshot, derived from the protobuf descriptor.

    proto/loadsvc/v1/loads.proto --protoc--> loads_pb2 (descriptor)
                                               |
                     this module walks it at import time
                                               v
        msgspec Structs: LoadSnapshot, MemoryMetrics, ... (shared memory,
        ZMQ payloads, JSON), Status, field lists, schema fingerprint

No field is typed a second time here: adding a field to loads.proto and
regenerating is all it takes for the Structs, JSON, Prometheus and the region's
fingerprint to follow.
"""

from __future__ import annotations

import enum
import hashlib
import sys
from typing import Annotated, Any, Optional

import msgspec
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

__all__ = [
    "LoadSnapshot",
    "MemoryMetrics",
    "SpeculativeMetrics",
    "LoRAMetrics",
    "DisaggregationMetrics",
    "QueueMetrics",
    "AggregateMetrics",
    "Status",
    "SECTIONS",
    "CORE_FIELDS",
    "READER_FIELDS",
    "SCHEMA_FINGERPRINT",
    "to_dict",
    "to_proto",
    "value_error",
    "from_proto",
    "status_number",
]

# The value rule: every number in a snapshot is a count, a size, a rate, a ratio or a
# time, so none is negative and none is NaN or infinite. It lives in these types, and
# so in every Struct derived below: the region's reader and the relay's collector
# decode with them (a payload breaking the rule is refused like a corrupt one) and the
# publishers check their own payload with them (check_payload). No upper bound beyond
# the protobuf type's: engines differ on what a ratio such as token_usage may reach.
# For floats, ge=0 also refuses NaN (every comparison with NaN is false) and le=the
# largest double refuses +inf.
_I32 = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
_I64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
_U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgspec itself caps ints at 2**64 - 1
_F64 = Annotated[float, msgspec.Meta(ge=0.0, le=sys.float_info.max)]
_SCALAR_TYPES: dict[int, Any] = {
    FieldDescriptor.TYPE_INT32: _I32,
    FieldDescriptor.TYPE_INT64: _I64,
    FieldDescriptor.TYPE_UINT32: _U32,
    FieldDescriptor.TYPE_UINT64: _U64,
    FieldDescriptor.TYPE_SINT32: _I32,
    FieldDescriptor.TYPE_SINT64: _I64,
    FieldDescriptor.TYPE_DOUBLE: _F64,
    FieldDescriptor.TYPE_FLOAT: _F64,
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: bool,
}
# What each numeric type admits, in words (error messages name the field and this).
_RULE_TEXT: dict[Any, str] = {
    _I32: "an integer in 0..2147483647",
    _I64: "an integer in 0..9223372036854775807",
    _U32: "an integer in 0..4294967295",
    _U64: "an integer in 0..18446744073709551615",
    _F64: "a finite number >= 0",
}


def _status_enum() -> type[enum.Enum]:
    """`LOAD_STATUS_HEALTHY = 1` in proto becomes `Status.HEALTHY = "healthy"`."""
    prefix = "LOAD_STATUS_"
    members = {v.name.removeprefix(prefix): v.name.removeprefix(prefix).lower()
               for v in pb.DESCRIPTOR.enum_types_by_name["LoadStatus"].values}
    return enum.Enum("Status", members, type=str, module=__name__)


Status: Any = _status_enum()
_STATUS_BY_NUMBER = {v.number: Status[v.name.removeprefix("LOAD_STATUS_")]
                     for v in pb.DESCRIPTOR.enum_types_by_name["LoadStatus"].values}
_NUMBER_BY_STATUS = {s: n for n, s in _STATUS_BY_NUMBER.items()}

_STRUCTS: dict[str, type[msgspec.Struct]] = {}
# Per Struct, its fields in payload order: (name, type, the section's Struct or None).
_FIELDS: dict[type[msgspec.Struct], tuple[tuple[str, Any, Any], ...]] = {}


def _struct_for(desc: Descriptor) -> type[msgspec.Struct]:
    """A msgspec Struct with one attribute per proto field, in field-number order."""
    if desc.full_name in _STRUCTS:
        return _STRUCTS[desc.full_name]
    fields: list[tuple[str, Any, Any]] = []
    walk: list[tuple[str, Any, Any]] = []
    for f in sorted(desc.fields, key=lambda f: f.number):
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            section = _struct_for(f.message_type)
            fields.append((f.name, Optional[section], None))
            walk.append((f.name, None, section))
        elif f.type == FieldDescriptor.TYPE_ENUM:
            fields.append((f.name, Status, _STATUS_BY_NUMBER[0]))
            walk.append((f.name, Status, None))
        else:
            py = _SCALAR_TYPES[f.type]
            default = {_F64: 0.0, str: "", bool: False}.get(py, 0)
            fields.append((f.name, py, default))
            walk.append((f.name, py, None))
    # array_like: payloads are msgpack arrays in field-number order (77 bytes for
    # a core snapshot instead of ~450, and about half the decode time). The
    # region's schema fingerprint guards the order. JSON is built by to_dict().
    cls = msgspec.defstruct(desc.name, fields, kw_only=True, module="loadsvc", gc=False,
                            array_like=True)
    cls.__doc__ = f"Derived from protobuf message {desc.full_name} (see proto/)."
    _STRUCTS[desc.full_name] = cls
    _FIELDS[cls] = tuple(walk)
    return cls


LoadSnapshot: Any = _struct_for(pb.LoadSnapshot.DESCRIPTOR)
AggregateMetrics: Any = _struct_for(pb.AggregateMetrics.DESCRIPTOR)
MemoryMetrics: Any = _STRUCTS["loadsvc.v1.MemoryMetrics"]
SpeculativeMetrics: Any = _STRUCTS["loadsvc.v1.SpeculativeMetrics"]
LoRAMetrics: Any = _STRUCTS["loadsvc.v1.LoRAMetrics"]
DisaggregationMetrics: Any = _STRUCTS["loadsvc.v1.DisaggregationMetrics"]
QueueMetrics: Any = _STRUCTS["loadsvc.v1.QueueMetrics"]

_SNAP = pb.LoadSnapshot.DESCRIPTOR

# Section fields of LoadSnapshot, keyed by their `include` token.
_INCLUDE_TOKEN = {"memory": "memory", "speculative": "spec", "lora": "lora",
                  "disaggregation": "disagg", "queues": "queues"}
SECTIONS: dict[str, str] = {_INCLUDE_TOKEN[f.name]: f.name for f in _SNAP.fields
                            if f.type == FieldDescriptor.TYPE_MESSAGE}
# Fields filled by the reader, never carried in a payload.
READER_FIELDS: tuple[str, ...] = ("status", "age_ms")
# Bookkeeping fields carried by the region or the relay rather than by the engine.
META_FIELDS: tuple[str, ...] = ("publish_time_ns", "seq", "epoch")
# The scalar load fields a client can count on ("core"), in field-number order.
CORE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in sorted(_SNAP.fields, key=lambda f: f.number)
    if f.type != FieldDescriptor.TYPE_MESSAGE
    and f.name not in READER_FIELDS and f.name not in META_FIELDS)


def _fingerprint() -> int:
    """64-bit hash of every field's (message, number, name, type) reachable from LoadSnapshot."""
    parts: list[str] = []
    seen: set[str] = set()

    def walk(desc: Descriptor) -> None:
        if desc.full_name in seen:
            return
        seen.add(desc.full_name)
        for f in sorted(desc.fields, key=lambda f: f.number):
            parts.append(f"{desc.full_name}.{f.number}:{f.name}:{f.type}")
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                walk(f.message_type)

    walk(_SNAP)
    return int.from_bytes(hashlib.sha256("\n".join(parts).encode()).digest()[:8], "little")


SCHEMA_FINGERPRINT: int = _fingerprint()


def value_error(payload: bytes) -> str | None:
    """The first number of an encoded LoadSnapshot that breaks the value rule, in words.

    ``"token_usage = nan: expected a finite number >= 0"`` (sections as
    ``memory.kv_cache_gb``); None when every number is allowed, or when the
    payload is not a snapshot at all. The slow path after a decode with the
    derived Structs failed: it tells a bad value from a malformed payload.
    """
    try:
        values = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return None
    return _first_bad_value(values, LoadSnapshot, "")


def _first_bad_value(values: Any, cls: Any, prefix: str) -> str | None:
    if not isinstance(values, list):
        return None
    for (name, typ, section), value in zip(_FIELDS[cls], values):
        if section is not None:
            found = _first_bad_value(value, section, f"{prefix}{name}.")
            if found is not None:
                return found
        elif typ in _RULE_TEXT and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                msgspec.convert(value, typ)
            except msgspec.ValidationError:
                return f"{prefix}{name} = {value!r}: expected {_RULE_TEXT[typ]}"
    return None


def status_number(status: Any) -> int:
    """The LoadStatus enum number of a Status."""
    return _NUMBER_BY_STATUS[status]


def to_dict(obj: msgspec.Struct) -> dict[str, Any]:
    """A derived Struct as a plain dict, sections as nested dicts, status as its string."""
    out: dict[str, Any] = {}
    for name in obj.__struct_fields__:
        value = getattr(obj, name)
        if isinstance(value, msgspec.Struct):
            value = to_dict(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        out[name] = value
    return out


def to_proto(obj: msgspec.Struct, message: Any = None) -> Any:
    """Copy a derived Struct into its protobuf message (a new one unless given)."""
    desc = _PROTO_BY_STRUCT[type(obj)]
    msg = message if message is not None else _PROTO_CLASS[desc.full_name]()
    for f in desc.fields:
        value = getattr(obj, f.name)
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if value is not None:
                to_proto(value, getattr(msg, f.name))
        elif f.type == FieldDescriptor.TYPE_ENUM:
            setattr(msg, f.name, _NUMBER_BY_STATUS[value])
        else:
            setattr(msg, f.name, value)
    return msg


def from_proto(msg: Any) -> msgspec.Struct:
    """Build the derived Struct from a protobuf message (any wire-identical message)."""
    desc = msg.DESCRIPTOR
    cls = _STRUCTS[_CANONICAL.get(desc.full_name, desc.full_name)]
    kwargs: dict[str, Any] = {}
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if msg.HasField(f.name):
                kwargs[f.name] = from_proto(getattr(msg, f.name))
        elif f.type == FieldDescriptor.TYPE_ENUM:
            kwargs[f.name] = _STATUS_BY_NUMBER.get(getattr(msg, f.name), _STATUS_BY_NUMBER[0])
        else:
            kwargs[f.name] = getattr(msg, f.name)
    return cls(**kwargs)


_PROTO_CLASS = {
    m.DESCRIPTOR.full_name: m
    for m in (pb.LoadSnapshot, pb.AggregateMetrics, pb.MemoryMetrics, pb.SpeculativeMetrics,
              pb.LoRAMetrics, pb.DisaggregationMetrics, pb.QueueMetrics)
}
_PROTO_BY_STRUCT = {cls: _PROTO_CLASS[name].DESCRIPTOR for name, cls in _STRUCTS.items()}
# The SGLang contract's message names map onto loadsvc's wire-identical ones.
_CANONICAL = {"sglang.grpc.scheduler.SchedulerLoad": "loadsvc.v1.LoadSnapshot"} | {
    f"sglang.grpc.scheduler.{n}": f"loadsvc.v1.{n}"
    for n in ("MemoryMetrics", "SpeculativeMetrics", "LoRAMetrics", "DisaggregationMetrics",
              "QueueMetrics", "AggregateMetrics")}
