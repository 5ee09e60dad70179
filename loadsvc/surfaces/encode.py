"""A store's view as the surfaces send it: the JSON body of GET /v1/loads and GetLoadsResponse.

    View (loadsvc.core.store) + Selection --snapshot_dict / response_dict--> JSON (REST)
                                          --response_proto-------------> protobuf (gRPC)

Both carry the same fields (SGLang-compatible: docs/rest.md, docs/grpc.md); the
surfaces cache the encoded bytes per view, so each is built once per change.
"""

from __future__ import annotations

from typing import Any

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._version import __version__
from loadsvc.core import schema
from loadsvc.core.schema import SECTIONS
from loadsvc.core.store import Selection, View

__all__ = ["snapshot_dict", "response_dict", "response_proto"]


def snapshot_dict(snap: Any, sections: frozenset[str]) -> dict[str, Any]:
    """The JSON shape of one rank (docs/rest.md): core keys, selected sections present, status, age."""
    out = {name: getattr(snap, name) for name in schema.CORE_FIELDS}
    for name in SECTIONS.values():
        if name in sections:
            value = getattr(snap, name)
            if value is not None:
                out[name] = schema.to_dict(value)
    out["status"] = snap.status.value
    out["age_ms"] = snap.age_ms
    out["seq"] = snap.seq
    return out


def response_dict(view: View, sel: Selection) -> dict[str, Any]:
    """The JSON body of GET /v1/loads (SGLang-compatible)."""
    return {
        "timestamp": view.timestamp,
        "version": __version__,
        "dp_rank_count": view.dp_size,
        "loads": [snapshot_dict(s, sel.sections) for s in view.select(sel)],
        "aggregate": schema.to_dict(view.aggregate(sel)),
    }


def response_proto(view: View, sel: Selection) -> Any:
    """GetLoadsResponse (loadsvc.v1; wire-identical to SGLang's) for a selection."""
    resp = pb.GetLoadsResponse(timestamp=view.timestamp, version=__version__, dp_rank_count=view.dp_size)
    cache = view.proto_cache
    for snap in view.select(sel):
        key = (snap.seq, snap.publish_time_ns)
        hit = cache.get(snap.dp_rank)
        if hit is None or hit[0] != key:
            hit = cache[snap.dp_rank] = (key, schema.to_proto(snap))
        msg = resp.loads.add()
        msg.CopyFrom(hit[1])  # a copy in C; only the reader-filled fields differ per view
        msg.status = schema.status_number(snap.status)
        msg.age_ms = snap.age_ms
        for name in SECTIONS.values():
            if name not in sel.sections:
                msg.ClearField(name)
    schema.to_proto(view.aggregate(sel), resp.aggregate)
    return resp
