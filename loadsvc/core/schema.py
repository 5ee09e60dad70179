"""Every non-protobuf form of a snapshot, following the protobuf descriptor.

    proto/loadsvc/v1/loads.proto --python -m loadsvc._codegen--> loads_pb2 (descriptor)
                                   |                                   |
                                   v                                   v
    core/_structs.py: LoadSnapshot, MemoryMetrics, ..., Status   this module checks the
    (msgspec Structs for shared memory, ZMQ payloads, JSON)      classes at import, then
                                                                 derives field lists,
                                                                 the fingerprint, to_dict,
                                                                 to_proto, from_proto

No field is typed a second time here: adding a field to loads.proto and
regenerating is all it takes for the Structs, JSON, Prometheus and the region's
fingerprint to follow. The Structs are generated classes (not built at import)
so that type checkers and editors see them; the rules that shape them, the
value rule among them, live in core/_derive.py.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
from typing import Any, cast, overload

import msgspec
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc.core import _derive, _structs
from loadsvc.core._structs import (
    AggregateMetrics,
    DisaggregationMetrics,
    LoadSnapshot,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    SpeculativeMetrics,
    Status,
)

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

_REGENERATE = ("loadsvc/core/_structs.py does not match loadsvc/_proto (both generated from proto/): "
               "{problem}. Regenerate them with `python -m loadsvc._codegen` (if that fails with this "
               "same error, first restore the generated files: `git checkout loadsvc/_proto "
               "loadsvc/core/_structs.py`)")


def _stale(problem: str) -> ImportError:
    return ImportError(_REGENERATE.format(problem=problem))


def _message(name: str) -> Descriptor:
    return pb.DESCRIPTOR.message_types_by_name[name]


def _section(f: FieldDescriptor) -> Descriptor:
    """The message of a message-typed field (protobuf types it optional: None for scalars)."""
    if f.message_type is None:
        raise TypeError(f"{f.full_name} is not a message field")
    return f.message_type


def _check_status() -> dict[int, Status]:
    """Status against the proto enum it is generated from; its members by enum number."""
    desc = pb.DESCRIPTOR.enum_types_by_name["LoadStatus"]
    py_name, prefix = _derive.ENUMS[desc.full_name]
    want = [_derive.enum_member(v.name, prefix) for v in desc.values]
    got = [(s.name, s.value) for s in Status]
    if Status.__name__ != py_name or got != want or not issubclass(Status, str):
        raise _stale(f"enum {py_name} has members {got}, {desc.full_name} gives {want}")
    return {v.number: Status(_derive.enum_member(v.name, prefix)[1]) for v in desc.values}


_STATUS_BY_NUMBER = _check_status()
# The numbers are LoadStatus values by construction (the descriptor lists them).
_NUMBER_BY_STATUS = {s: cast(pb.LoadStatus, n) for n, s in _STATUS_BY_NUMBER.items()}

_STRUCTS: dict[str, type[msgspec.Struct]] = {}
# Per Struct, its fields in payload order: (name, type, the section's Struct or None).
_FIELDS: dict[type[msgspec.Struct], tuple[tuple[str, Any, Any], ...]] = {}
_OPTIONS = msgspec.defstruct("Options", [], **_derive.STRUCT_OPTIONS).__struct_config__


def _struct_for(desc: Descriptor) -> type[msgspec.Struct]:
    """The generated Struct of a message, checked field by field against its descriptor:
    one attribute per proto field, in field-number order, typed and defaulted by _derive."""
    if desc.full_name in _STRUCTS:
        return _STRUCTS[desc.full_name]
    cls = getattr(_structs, desc.name, None)
    if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
        raise _stale(f"no Struct {desc.name} for message {desc.full_name}")
    want: list[tuple[str, Any, Any]] = []
    walk: list[tuple[str, Any, Any]] = []
    for f in sorted(desc.fields, key=lambda f: f.number):
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            section = _struct_for(_section(f))
            want.append((f.name, section | None, None))
            walk.append((f.name, None, section))
        elif f.type == FieldDescriptor.TYPE_ENUM:
            want.append((f.name, Status, _STATUS_BY_NUMBER[0]))
            walk.append((f.name, Status, None))
        else:
            py = _derive.SCALAR_TYPES[f.type]
            want.append((f.name, py, _derive.default_of(py)))
            walk.append((f.name, py, None))
    got = [(f.name, f.type, f.default) for f in msgspec.structs.fields(cls)]
    for (name, typ, default), have in zip(want, got):
        if (name, typ, default, type(default)) != (*have, type(have[2])):
            raise _stale(f"{desc.name}.{name}: proto gives {typ} = {default!r}, the class has "
                         f"{have[0]}: {have[1]} = {have[2]!r}")
    if len(want) != len(got):
        raise _stale(f"{desc.name} has fields {[g[0] for g in got]}, "
                     f"{desc.full_name} {[w[0] for w in want]}")
    options = {k for k in dir(_OPTIONS) if not k.startswith("_")
               if getattr(cls.__struct_config__, k) != getattr(_OPTIONS, k)}
    kinds = {p.kind for p in inspect.signature(cls).parameters.values()}
    if options or kinds - {inspect.Parameter.KEYWORD_ONLY} or cls.__module__ != _derive.PUBLIC_MODULE:
        raise _stale(f"{desc.name} has options other than {_derive.STRUCT_OPTIONS} "
                     f"(differ: {sorted(options)}) or module {cls.__module__!r}")
    _STRUCTS[desc.full_name] = cls
    _FIELDS[cls] = tuple(walk)
    return cls


for _name in _derive.ROOT_MESSAGES:
    _struct_for(_message(_name.rpartition(".")[2]))
_RULE_TEXT = _derive.RULE_TEXT

_SNAP = _message("LoadSnapshot")

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
                walk(_section(f))

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


def _first_bad_value(values: Any, cls: type[msgspec.Struct], prefix: str) -> str | None:
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


def status_number(status: Status) -> pb.LoadStatus:
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


@overload
def to_proto(obj: LoadSnapshot, message: pb.LoadSnapshot | None = None) -> pb.LoadSnapshot: ...
@overload
def to_proto(obj: AggregateMetrics, message: pb.AggregateMetrics | None = None) -> pb.AggregateMetrics: ...
@overload
def to_proto(obj: msgspec.Struct, message: Message | None = None) -> Message: ...
def to_proto(obj: msgspec.Struct, message: Message | None = None) -> Message:
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


def from_proto(msg: Message) -> msgspec.Struct:
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


_PROTO_CLASS: dict[str, type[Message]] = {
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
