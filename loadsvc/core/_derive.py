"""How a proto message becomes a msgspec Struct: the rules, in one place.

    proto/loadsvc/v1/loads.proto --python -m loadsvc._codegen--> core/_structs.py
                                   (writes classes by these rules)      |
    loads_pb2 (descriptor) --core/schema.py checks at import, by these rules

Both the code generator and schema.py read this module, so the classes it
writes and the check that guards them cannot disagree. It imports neither of
them (nor the generated protobuf code), so the generated module can take its
types from here.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, TypedDict

import msgspec
from google.protobuf.descriptor import FieldDescriptor

# The value rule: every number in a snapshot is a count, a size, a rate, a ratio or a
# time, so none is negative and none is NaN or infinite. It lives in these types, and
# so in every generated Struct: the region's reader and the relay's collector decode
# with them (a payload breaking the rule is refused like a corrupt one) and the
# publishers check their own payload with them (check_payload). No upper bound beyond
# the protobuf type's: engines differ on what a ratio such as token_usage may reach.
# For floats, ge=0 also refuses NaN (every comparison with NaN is false) and le=the
# largest double refuses +inf.
Int32 = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Int64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
UInt32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
UInt64 = Annotated[int, msgspec.Meta(ge=0)]  # msgspec itself caps ints at 2**64 - 1
Float64 = Annotated[float, msgspec.Meta(ge=0.0, le=sys.float_info.max)]

# The Python type of each protobuf scalar type (the generated code names it).
SCALAR_TYPES: dict[int, Any] = {
    FieldDescriptor.TYPE_INT32: Int32,
    FieldDescriptor.TYPE_INT64: Int64,
    FieldDescriptor.TYPE_UINT32: UInt32,
    FieldDescriptor.TYPE_UINT64: UInt64,
    FieldDescriptor.TYPE_SINT32: Int32,
    FieldDescriptor.TYPE_SINT64: Int64,
    FieldDescriptor.TYPE_DOUBLE: Float64,
    FieldDescriptor.TYPE_FLOAT: Float64,
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: bool,
}
# Their names in this module, for the generated code's annotations.
TYPE_NAMES: dict[Any, str] = {Int32: "Int32", Int64: "Int64", UInt32: "UInt32", UInt64: "UInt64",
                              Float64: "Float64", str: "str", bool: "bool"}
# What each numeric type admits, in words (error messages name the field and this).
RULE_TEXT: dict[Any, str] = {
    Int32: "an integer in 0..2147483647",
    Int64: "an integer in 0..9223372036854775807",
    UInt32: "an integer in 0..4294967295",
    UInt64: "an integer in 0..18446744073709551615",
    Float64: "a finite number >= 0",
}

# The messages that get a Struct, with every message they hold (sections).
ROOT_MESSAGES = ("loadsvc.v1.LoadSnapshot", "loadsvc.v1.AggregateMetrics")
# The Python name of each proto enum a Struct holds, and the prefix its values drop:
# `LOAD_STATUS_HEALTHY = 1` becomes `Status.HEALTHY = "healthy"`.
ENUMS: dict[str, tuple[str, str]] = {"loadsvc.v1.LoadStatus": ("Status", "LOAD_STATUS_")}

# Struct options. array_like: payloads are msgpack arrays in field-number order (77
# bytes for a core snapshot instead of ~450, and about half the decode time); the
# region's schema fingerprint guards the order. JSON is built by schema.to_dict().
class StructOptions(TypedDict):
    kw_only: bool
    gc: bool
    array_like: bool


STRUCT_OPTIONS = StructOptions(kw_only=True, gc=False, array_like=True)
# The module the classes show (their repr, pickling): the public one.
PUBLIC_MODULE = "loadsvc"


def default_of(py_type: Any) -> Any:
    """The proto3 default of a scalar field of this Python type (0, 0.0, "" or False)."""
    base = getattr(py_type, "__origin__", py_type)  # Annotated[int, ...] -> int
    return {int: 0, float: 0.0, str: "", bool: False}[base]


def enum_member(value_name: str, prefix: str) -> tuple[str, str]:
    """(member name, value) of a proto enum value: LOAD_STATUS_STALE -> ("STALE", "stale")."""
    name = value_name.removeprefix(prefix)
    return name, name.lower()
