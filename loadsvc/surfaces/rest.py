"""The REST surface: GET /v1/loads (JSON or Prometheus), /health and /metrics as a FastAPI router.

    request --query string--> Selection, format  (parsed once per distinct query string)
        |
    LoadStore.view() --> View --encoded(("json", sel))--> body bytes, built once per view
                              --encoded(("prometheus", sel))--> exposition text, once per view
        |
    Response(those bytes)      every request on an unchanged view gets the same bytes

``create_router(store)`` is the component: mount it in any FastAPI app (an
engine's own HTTP server does ``app.include_router(create_router(store))``).
``create_app(store)`` is a FastAPI app holding only that router, which is what
``loadsvc serve`` runs. The router's lifespan starts the store's poll task
unless something else already did, and stops it only if it started it.

The routes use a route class whose endpoint receives the bare Request: no
dependency solving, no validation layer, no re-serialization. Query values are
parsed and checked here, so every bad value is a 400 with a JSON error naming
the field (never FastAPI's 422), and counted. OpenAPI describes the same
contract (parameters, patterns, the response shapes, 400 and 401).

Prometheus names (``format=prometheus``), one gauge family per numeric field,
label ``dp_rank``:

    loadsvc_<core field>                 e.g. loadsvc_num_running_reqs, loadsvc_token_usage
    loadsvc_<section>_<field>            e.g. loadsvc_memory_weight_gb, loadsvc_queues_waiting
    loadsvc_disaggregation_mode{mode=}   1 for the mode the rank reports
    loadsvc_age_ms, loadsvc_seq          age of the last publish, its sequence number
    loadsvc_rank_status{status=}         1 for the rank's status, 0 for the other two
                                         (healthy, stale, unreachable)
    loadsvc_aggregate_<field>            the response's aggregate (no dp_rank label)
    loadsvc_dp_rank_count                ranks in the region
"""

from __future__ import annotations

import hmac
import logging
import re
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import prometheus_client
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from google.protobuf.descriptor import FieldDescriptor
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._version import __version__
from loadsvc.core import schema
from loadsvc.core.schema import SECTIONS, Status
from loadsvc.core.store import (
    INCLUDE_TOKENS,
    MAX_INCLUDE_CHARS,
    MAX_INCLUDE_TOKENS,
    MAX_INCLUDE_VALUES,
    BadRequest,
    LoadStore,
    Selection,
    View,
)
from loadsvc.surfaces.encode import response_dict

__all__ = ["create_router", "create_app", "PROMETHEUS_CONTENT_TYPE"]

log = logging.getLogger("loadsvc.surfaces.rest")

JSON_CONTENT_TYPE = "application/json"
PROMETHEUS_CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
FORMATS = ("json", "prometheus")
INT32_MAX = 2**31 - 1

# One include value as store.parse_include (the one parser, shared with gRPC) reads it:
# comma-separated tokens in any case, whitespace around them. OpenAPI publishes it as this
# pattern (JSON Schema patterns have no flags: each letter is a class of both cases).
_TOKENS_RE = "|".join("".join(f"[{c.lower()}{c.upper()}]" for c in t) for t in INCLUDE_TOKENS)
INCLUDE_PATTERN = rf"^\s*(?:(?:{_TOKENS_RE})\s*)?(?:,\s*(?:(?:{_TOKENS_RE})\s*)?)*$"
# OpenAPI also states parse_include's bounds (values, characters, tokens per value),
# so a request valid by the schema is never refused; the server checks them there,
# each with its own reason.
_INCLUDE_SCHEMA = {
    "type": "array", "maxItems": MAX_INCLUDE_VALUES,
    "items": {"type": "string", "maxLength": MAX_INCLUDE_CHARS,
              "pattern": INCLUDE_PATTERN.replace(")*$", f"){{0,{MAX_INCLUDE_TOKENS - 1}}}$")}}
_DP_RANK_RE = re.compile(r"-?[0-9]+")
_DP_RANK_DIGITS = len(str(INT32_MAX))  # more digits than this: out of range, whatever they are
_QUERY_MEMO_MAX = 512  # distinct query strings remembered (fuzzers send endless new ones)
# Longer query strings are a 400 (field "query"), neither parsed nor remembered: the
# memo above holds at most 512 x 4 KiB of keys (and of messages quoting them).
MAX_QUERY_BYTES = 4096


# -- query parsing -------------------------------------------------------------


class _Invalid(Exception):
    """A bad query value: which field, a short reason (metric label) and a message."""

    def __init__(self, field_name: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.reason = reason
        self.message = message


def _parse_query(query_string: bytes, dp_size: int | None) -> tuple[Selection, str]:
    """(Selection, format) from a raw query string; raises _Invalid naming the field."""
    dp_rank_raw: str | None = None
    fmt = "json"
    include: list[str] = []
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == "dp_rank":
            dp_rank_raw = value
        elif key == "include":
            include.append(value)
        elif key == "format":
            fmt = value
    if fmt not in FORMATS:
        raise _Invalid("format", "unknown_format",
                       f"unknown format {_shown(fmt)}; expected one of {', '.join(FORMATS)}")
    dp_rank: int | None = None
    if dp_rank_raw is not None:
        if not _DP_RANK_RE.fullmatch(dp_rank_raw):
            raise _Invalid("dp_rank", "not_an_integer",
                           f"expected a non-negative integer, got {_shown(dp_rank_raw)}")
        if len(dp_rank_raw.lstrip("-").lstrip("0")) > _DP_RANK_DIGITS:  # never int() on 5,000 digits
            raise _Invalid("dp_rank", "negative" if dp_rank_raw.startswith("-") else "out_of_range",
                           f"{_shown(dp_rank_raw)} is beyond the int32 range")
        dp_rank = int(dp_rank_raw)
        if dp_rank > INT32_MAX:
            raise _Invalid("dp_rank", "out_of_range", f"{dp_rank} is beyond the int32 range")
    try:
        sel = Selection.parse(dp_rank, include, dp_size)
    except BadRequest as e:
        reason = "negative" if dp_rank is not None and dp_rank < 0 else "out_of_range"
        if e.field != "dp_rank":
            reason = e.reason or "unknown_token"
        raise _Invalid(e.field, reason, str(e).removeprefix(f"{e.field}: ")) from None
    return sel, fmt


def _too_long(query: bytes) -> _Invalid:
    """The error for a query string past MAX_QUERY_BYTES, naming its longest parameter if known.

    Only split on "&", never decoded or parsed (the request line's own limit bounds
    the scan): a 5,000-digit dp_rank is named as dp_rank, padding as the query.
    """
    name, _, value = max(query.split(b"&"), key=len).partition(b"=")
    field_name = name.decode("latin-1") if name in (b"dp_rank", b"include", b"format") else "query"
    return _Invalid(field_name, "too_long",
                    f"query string of {len(query)} bytes, longer than {MAX_QUERY_BYTES}"
                    + (f" ({field_name} alone is {len(value)} bytes)" if field_name != "query" else "")
                    + "; a valid one needs well under 200")


def _shown(value: str, limit: int = 40) -> str:
    """value for an error message: repr, cut to about limit characters."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


# -- bodies ----------------------------------------------------------------------

_encode_json = msgspec.json.Encoder().encode


def _error_body(field_name: str, message: str) -> bytes:
    return _encode_json({"error": {"field": field_name, "message": message}})


def _json_body(view: View, sel: Selection) -> bytes:
    return _encode_json(response_dict(view, sel))


def _is_number(f: FieldDescriptor) -> bool:
    return f.type not in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM,
                          FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


_SNAPSHOT = pb.DESCRIPTOR.message_types_by_name["LoadSnapshot"]
# (attribute, metric name, help) of the numeric per-rank core fields; dp_rank is the label.
_CORE_GAUGES = tuple(
    (name, f"loadsvc_{name}", f"LoadSnapshot.{name} from the rank's last publish")
    for name in schema.CORE_FIELDS if name != "dp_rank")
# section attribute -> ((field, metric name, help), ...) for numeric fields, and string fields.
_SECTION_GAUGES: dict[str, tuple[tuple[str, str, str], ...]] = {}
_SECTION_LABELS: dict[str, tuple[tuple[str, str, str], ...]] = {}
for _f in sorted(_SNAPSHOT.fields, key=lambda f: f.number):
    if (_msg := _f.message_type) is not None:  # a section
        _SECTION_GAUGES[_f.name] = tuple(
            (g.name, f"loadsvc_{_f.name}_{g.name}", f"{_msg.name}.{g.name} from the rank's last publish")
            for g in sorted(_msg.fields, key=lambda g: g.number) if _is_number(g))
        _SECTION_LABELS[_f.name] = tuple(
            (g.name, f"loadsvc_{_f.name}_{g.name}",
             f"{_msg.name}.{g.name} reported by the rank, as label {g.name!r} (value 1)")
            for g in sorted(_msg.fields, key=lambda g: g.number)
            if g.type == FieldDescriptor.TYPE_STRING)
_AGGREGATE_GAUGES = tuple(
    (f.name, f"loadsvc_aggregate_{f.name}", f"AggregateMetrics.{f.name} over the selected ranks "
                                            "that are not unreachable")
    for f in sorted(pb.DESCRIPTOR.message_types_by_name["AggregateMetrics"].fields, key=lambda f: f.number))
_STATUSES = tuple(s for s in Status if s is not Status.UNSPECIFIED)


class _ViewCollector:
    """A prometheus_client collector over one View and Selection (see the module docstring)."""

    def __init__(self, view: View, sel: Selection) -> None:
        self.view = view
        self.sel = sel

    def collect(self) -> Iterator[Any]:
        view, sel = self.view, self.sel
        snaps = view.select(sel)
        ranks = [str(s.dp_rank) for s in snaps]
        fam = GaugeMetricFamily("loadsvc_dp_rank_count", "Ranks (slots) in the shared-memory region")
        fam.add_metric([], view.dp_size)
        yield fam
        for attr, name, help_text in _CORE_GAUGES:
            fam = GaugeMetricFamily(name, help_text, labels=["dp_rank"])
            for rank, snap in zip(ranks, snaps):
                fam.add_metric([rank], getattr(snap, attr))
            yield fam
        for section, gauges in _SECTION_GAUGES.items():
            if section not in sel.sections:
                continue
            present = [(rank, getattr(snap, section)) for rank, snap in zip(ranks, snaps)
                       if getattr(snap, section) is not None]
            if not present:
                continue
            for attr, name, help_text in gauges:
                fam = GaugeMetricFamily(name, help_text, labels=["dp_rank"])
                for rank, value in present:
                    fam.add_metric([rank], getattr(value, attr))
                yield fam
            for attr, name, help_text in _SECTION_LABELS[section]:
                fam = GaugeMetricFamily(name, help_text, labels=["dp_rank", attr])
                for rank, value in present:
                    fam.add_metric([rank, getattr(value, attr)], 1)
                yield fam
        fam = GaugeMetricFamily("loadsvc_age_ms", "Milliseconds since the rank's last publish",
                                labels=["dp_rank"])
        for rank, snap in zip(ranks, snaps):
            fam.add_metric([rank], snap.age_ms)
        yield fam
        fam = GaugeMetricFamily("loadsvc_seq", "Sequence number of the rank's last publish",
                                labels=["dp_rank"])
        for rank, snap in zip(ranks, snaps):
            fam.add_metric([rank], snap.seq)
        yield fam
        fam = GaugeMetricFamily("loadsvc_rank_status", "1 for the rank's freshness status "
                                "(healthy, stale, unreachable), 0 for the others",
                                labels=["dp_rank", "status"])
        for rank, snap in zip(ranks, snaps):
            for status in _STATUSES:
                fam.add_metric([rank, status.value], 1 if snap.status is status else 0)
        yield fam
        agg = view.aggregate(sel)
        for attr, name, help_text in _AGGREGATE_GAUGES:
            fam = GaugeMetricFamily(name, help_text)
            fam.add_metric([], getattr(agg, attr))
            yield fam


def _prometheus_body(view: View, sel: Selection) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ViewCollector(view, sel))
    return prometheus_client.generate_latest(registry)


# -- server metrics (/metrics) -------------------------------------------------------


class _ReaderCollector:
    """Shared-memory reader counters of every store served through one registry."""

    def __init__(self) -> None:
        self.stores: weakref.WeakSet[LoadStore] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        stores = sorted(self.stores, key=lambda s: str(s.settings.shm))
        counters = [(str(s.settings.shm), s.reader_counters()) for s in stores]
        for key, help_text in (
                ("torn_retries", "Slot copies retried because a publish was in progress"),
                ("unavailable", "Reads that gave up after the retry bound (last good copy served)"),
                ("corrupt", "Reads of a checksum-valid payload that failed to decode or broke the value "
                            "rule (counted on every read until the slot is rewritten)")):
            fam = CounterMetricFamily(f"loadsvc_shm_reader_{key}", help_text, labels=["region"])
            for region, values in counters:
                fam.add_metric([region], values[key])
            yield fam
        attached = GaugeMetricFamily("loadsvc_region_attached", "1 while the region is attached",
                                     labels=["region"])
        for s in stores:
            attached.add_metric([str(s.settings.shm)], 1 if s.attached else 0)
        yield attached
        fam = CounterMetricFamily("loadsvc_region_detached", "Times the server detached from the region "
                                  "(truncated: it shrank under the reader; removed: removed or replaced)",
                                  labels=["region", "reason"])
        for s in stores:
            for reason, count in s.detach_counters().items():
                fam.add_metric([str(s.settings.shm), reason], count)
        yield fam


class _Metrics:
    """The REST counters of one registry (shared by every router built on it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("loadsvc_rest_requests", "REST requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=registry)
        self.bad_requests = Counter("loadsvc_rest_bad_requests",
                                    "REST requests rejected with 400, by query field and reason",
                                    ["field", "reason"], registry=registry)
        self.readers = _ReaderCollector()
        registry.register(self.readers)
        self._children: dict[tuple[str, int], Any] = {}

    def count(self, endpoint: str, status: int) -> None:
        child = self._children.get((endpoint, status))
        if child is None:
            child = self._children[(endpoint, status)] = self.requests.labels(endpoint, str(status))
        child.inc()


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = _Metrics(registry)
    return metrics


# -- OpenAPI ------------------------------------------------------------------------------

_JSON_TYPES: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "integer", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "integer", "format": "int64"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_UINT64: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
}


def _object_schema(desc: Any) -> dict[str, Any]:
    props = {f.name: dict(_JSON_TYPES[f.type]) for f in sorted(desc.fields, key=lambda f: f.number)}
    return {"type": "object", "title": desc.name, "properties": props, "required": list(props)}


def _loads_schema() -> dict[str, Any]:
    fields = {f.name: f for f in _SNAPSHOT.fields}
    props: dict[str, Any] = {name: dict(_JSON_TYPES[fields[name].type]) for name in schema.CORE_FIELDS}
    for section in SECTIONS.values():
        props[section] = _object_schema(fields[section].message_type)
    props["status"] = {"type": "string", "enum": [s.value for s in Status],
                       "description": "healthy, stale (no publish for stale_after seconds) or "
                                      "unreachable"}
    props["age_ms"] = {"type": "number", "description": "milliseconds since the rank's last publish"}
    props["seq"] = {"type": "integer", "minimum": 0, "description": "sequence of that publish"}
    rank = {"type": "object", "title": "LoadSnapshot", "properties": props,
            "required": [*schema.CORE_FIELDS, "status", "age_ms"]}
    return {
        "type": "object", "title": "GetLoadsResponse",
        "properties": {
            "timestamp": {"type": "string", "format": "date-time"},
            "version": {"type": "string"},
            "dp_rank_count": {"type": "integer", "minimum": 0},
            "loads": {"type": "array", "items": rank},
            "aggregate": _object_schema(pb.AggregateMetrics.DESCRIPTOR),
        },
        "required": ["timestamp", "version", "dp_rank_count", "loads", "aggregate"],
    }


_ERROR_SCHEMA = {
    "type": "object", "title": "Error",
    "properties": {"error": {"type": "object", "properties": {
        "field": {"type": "string", "description": "the query field (or authorization)"},
        "message": {"type": "string"}}, "required": ["field", "message"]}},
    "required": ["error"],
}
_ERROR_400 = {"description": "A bad query value (the field is named in the body)",
              "content": {JSON_CONTENT_TYPE: {"schema": _ERROR_SCHEMA}}}
_ERROR_401 = {"description": "Missing or wrong `Authorization: Bearer` key (servers with an API key)",
              "content": {JSON_CONTENT_TYPE: {"schema": _ERROR_SCHEMA}}}

_LOADS_PARAMETERS = [
    {"name": "dp_rank", "in": "query", "required": False,
     "description": "Only this data-parallel rank (0 .. dp_rank_count - 1); all ranks when absent.",
     "schema": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}},
    {"name": "include", "in": "query", "required": False, "style": "form", "explode": True,
     "description": "Sections to include: " + ", ".join(INCLUDE_TOKENS) + ". Repeat the parameter "
                    "or separate tokens with commas. Absent, empty or `all`: every section the "
                    "rank published; `core`: none.",
     "schema": _INCLUDE_SCHEMA},
    {"name": "format", "in": "query", "required": False,
     "description": "`json` (SGLang-compatible body) or `prometheus` (text exposition format).",
     "schema": {"type": "string", "enum": list(FORMATS), "default": "json"}},
]


# -- the router ----------------------------------------------------------------------


class _DirectRoute(APIRoute):
    """An APIRoute whose endpoint takes the bare Request and returns a Response itself.

    FastAPI still describes the route in OpenAPI (from the decorator's
    ``responses`` and ``openapi_extra``) but never solves dependencies,
    validates or serializes for it: the endpoint does its own parsing.
    """

    def get_route_handler(self) -> Callable[[Request], Any]:
        return self.endpoint


class _Loads:
    """GET /v1/loads itself: auth, query, view, cached body. Shared by the route and the fast path."""

    def __init__(self, store: LoadStore, metrics: _Metrics, api_key: str | None) -> None:
        self.store = store
        self.metrics = metrics
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty: it would switch authentication off; pass a key or None")
        self.expected = api_key.encode() if api_key else None
        self._memo: dict[tuple[bytes, int | None], tuple[Selection, str] | _Invalid] = {}

    def authorized(self, scope: Scope) -> bool:
        if self.expected is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)
        return False

    def unauthorized(self, endpoint: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        self.metrics.count(endpoint, 401)
        body = _error_body("authorization", "this server needs `Authorization: Bearer <api key>`")
        return 401, body, [(b"content-type", _JSON_CT), (b"content-length", b"%d" % len(body)),
                           (b"www-authenticate", b"Bearer")]

    def respond(self, scope: Scope) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, body, raw headers) for one GET /v1/loads."""
        if self.expected is not None and not self.authorized(scope):
            return self.unauthorized("/v1/loads")
        store = self.store
        view = store.view()
        key = (scope["query_string"], store.dp_size)
        parsed = self._memo.get(key)
        if parsed is None:
            if len(key[0]) > MAX_QUERY_BYTES:  # never parsed, never memoized
                parsed = _too_long(key[0])
            else:
                try:
                    parsed = _parse_query(key[0], key[1])
                except _Invalid as e:
                    parsed = e
                if len(self._memo) >= _QUERY_MEMO_MAX:
                    self._memo.clear()
                self._memo[key] = parsed
        if isinstance(parsed, _Invalid):
            self.metrics.bad_requests.labels(parsed.field, parsed.reason).inc()
            self.metrics.count("/v1/loads", 400)
            body = _error_body(parsed.field, parsed.message)
            return 400, body, [(b"content-type", _JSON_CT), (b"content-length", b"%d" % len(body))]
        sel, fmt = parsed
        self.metrics.count("/v1/loads", 200)
        if fmt == "json":
            body = view.encoded(("json", sel), lambda v: _json_body(v, sel))
            return 200, body, [(b"content-type", _JSON_CT), (b"content-length", b"%d" % len(body))]
        body = view.encoded(("prometheus", sel), lambda v: _prometheus_body(v, sel))
        return 200, body, [(b"content-type", _PROM_CT), (b"content-length", b"%d" % len(body))]

    def respond_get_load(self, scope: Scope) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, body, raw headers) for one GET /get_load: vllm-router's ``{"load": N}``."""
        if self.expected is not None and not self.authorized(scope):
            return self.unauthorized("/get_load")
        self.metrics.count("/get_load", 200)
        body = self.store.view().encoded("get_load", _get_load_body)
        return 200, body, [(b"content-type", _JSON_CT), (b"content-length", b"%d" % len(body))]


def _get_load_body(view: View) -> bytes:
    """Requests in the engine: running + waiting over every rank that is not unreachable.

    vllm-router's power_of_two reads the integer ``load`` of each worker's
    GET /get_load and sends to the lower of two; a stale rank still counts with
    its last published numbers (left out, it would make a silent engine look idle).
    """
    live = [s for s in view.snapshots if s.status is not Status.UNREACHABLE]
    running = sum(s.num_running_reqs for s in live)
    waiting = sum(s.num_waiting_reqs for s in live)
    return _encode_json({"load": running + waiting, "num_running_reqs": running,
                         "num_waiting_reqs": waiting, "ranks": len(live)})


_JSON_CT = JSON_CONTENT_TYPE.encode()
_PROM_CT = PROMETHEUS_CONTENT_TYPE.encode()
_GET_HEAD = ("GET", "HEAD")


class _RawResponse(Response):
    """A Response whose status, body and raw headers are already final."""

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status
        self.body = body
        self.raw_headers = headers
        self.background = None


class _App(FastAPI):
    """create_app's FastAPI: GET /v1/loads answered before FastAPI's own request handling.

    The same _Loads logic as the route, minus FastAPI's per-request telemetry
    check, middleware, router, exception layers, AsyncExitStacks and Request
    objects (together several times the cost of the answer itself). Every other
    request goes through FastAPI as usual. Once middleware is added to the app
    (CORS, GZip, ...), /v1/loads takes the ordinary route so that middleware
    sees it. FastAPI's native OpenTelemetry instrumentation does not see the
    fast path; /metrics counts it. OpenAPI states the attached region's ranks.
    """

    _loads: _Loads

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in _GET_HEAD and not self.user_middleware:
            path = scope["path"]
            root = scope.get("root_path") or self.root_path
            if root and path.startswith(root):
                path = path[len(root):]
            if path == "/v1/loads":
                status, body, headers = self._loads.respond(scope)
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
                return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema, with dp_rank's maximum set to the attached region's last rank."""
        spec = super().openapi()
        dp_size = self._loads.store.dp_size
        for param in spec["paths"]["/v1/loads"]["get"]["parameters"]:
            if param["name"] == "dp_rank":
                param["schema"]["maximum"] = dp_size - 1 if dp_size else INT32_MAX
        return spec


def create_router(store: LoadStore, *, api_key: str | None = None,
                  registry: CollectorRegistry | None = None, health: bool = True,
                  metrics: bool = True, get_load: bool = False) -> APIRouter:
    """GET /v1/loads, /health and /metrics over store, as a router to mount in any FastAPI app.

    api_key: when set, /v1/loads and /metrics need ``Authorization: Bearer <api_key>``
    (/health stays open). registry: where the REST counters and the region's
    reader counters are registered and what /metrics exposes (a new one if None).
    health=False / metrics=False leave those paths to an engine that has its own.
    get_load=True adds GET /get_load, the ``{"load": N}`` vllm-router's power_of_two
    polls on each worker (behind api_key too).
    """
    return _build(store, api_key, registry, health=health, metrics=metrics, get_load=get_load)[0]


def loads_responder(store: LoadStore, *, api_key: str | None = None,
                    registry: CollectorRegistry | None = None,
                    ) -> Callable[[dict[str, Any]], tuple[int, bytes, list[tuple[bytes, bytes]]]]:
    """GET /v1/loads as a function of an ASGI scope: (status, body, raw headers).

    For an ASGI middleware (loadsvc.engines.vllm.middleware) that answers before
    its app; the counters go to registry (a new one if None).
    """
    return _new_loads(store, api_key, registry if registry is not None else CollectorRegistry()).respond


def get_load_responder(store: LoadStore, *, api_key: str | None = None,
                       registry: CollectorRegistry | None = None,
                       ) -> Callable[[dict[str, Any]], tuple[int, bytes, list[tuple[bytes, bytes]]]]:
    """GET /get_load (vllm-router's ``{"load": N}``) as a function of an ASGI scope, as loads_responder."""
    registry = registry if registry is not None else CollectorRegistry()
    return _new_loads(store, api_key, registry).respond_get_load


def _new_loads(store: LoadStore, api_key: str | None, registry: CollectorRegistry) -> _Loads:
    counters = _metrics_for(registry)
    counters.readers.stores.add(store)
    return _Loads(store, counters, api_key)


def _build(store: LoadStore, api_key: str | None, registry: CollectorRegistry | None, *,
           health: bool = True, metrics: bool = True,
           get_load: bool = False) -> tuple[APIRouter, _Loads]:
    registry = registry if registry is not None else CollectorRegistry()
    loads = _new_loads(store, api_key, registry)
    counters = loads.metrics

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        started = not store.running
        if started:
            await store.start()
        try:
            yield
        finally:
            if started:
                await store.stop()

    router = APIRouter(route_class=_DirectRoute, lifespan=lifespan)

    @router.get(
        "/v1/loads", summary="Per-rank load (SGLang-compatible)", operation_id="get_loads",
        description="Every rank's last published load with freshness `status` and `age_ms`, and an "
                    "aggregate. JSON by default; `format=prometheus` gives gauges labelled "
                    "`dp_rank`. The body of an unchanged state is encoded once and reused.",
        responses={200: {"description": "The loads",
                         "content": {JSON_CONTENT_TYPE: {"schema": _loads_schema()},
                                     "text/plain": {"schema": {"type": "string"}}}},
                   400: _ERROR_400, 401: _ERROR_401},
        openapi_extra={"parameters": _LOADS_PARAMETERS})
    async def get_loads(request: Request) -> Response:
        return _RawResponse(*loads.respond(request.scope))

    async def head_loads(request: Request) -> Response:
        """HEAD: GET's status and headers (its Content-Length too), no body."""
        status, _, headers = loads.respond(request.scope)
        return _RawResponse(status, b"", headers)

    router.add_api_route("/v1/loads", head_loads, methods=["HEAD"], include_in_schema=False)

    if health:
        _add_health(router, store, counters)
    if metrics:
        _add_metrics(router, loads, counters, registry)
    if get_load:
        _add_get_load(router, loads)
    return router, loads


def _add_get_load(router: APIRouter, loads: _Loads) -> None:
    @router.get(
        "/get_load", summary="Requests in the engine (vllm-router's power_of_two)",
        operation_id="get_load",
        description="`load`: running + waiting requests over every rank that is not unreachable, "
                    "the integer vllm-router's `power_of_two` polls on each worker and compares. "
                    "Needs the API key when the server has one.",
        responses={200: {"description": "The engine's load", "content": {JSON_CONTENT_TYPE: {"schema": {
                       "type": "object", "title": "GetLoad", "properties": {
                           "load": {"type": "integer", "minimum": 0},
                           "num_running_reqs": {"type": "integer", "minimum": 0},
                           "num_waiting_reqs": {"type": "integer", "minimum": 0},
                           "ranks": {"type": "integer", "minimum": 0,
                                     "description": "ranks counted (healthy or stale)"}},
                       "required": ["load", "num_running_reqs", "num_waiting_reqs", "ranks"]}}}},
                   401: _ERROR_401})
    async def get_load(request: Request) -> Response:
        return _RawResponse(*loads.respond_get_load(request.scope))


def _add_health(router: APIRouter, store: LoadStore, counters: _Metrics) -> None:
    @router.get(
        "/health", summary="Is the region attached", operation_id="health",
        description="200 while the shared-memory region is attached, else 503 with the reason. "
                    "Never needs the API key.",
        responses={200: {"description": "Attached", "content": {JSON_CONTENT_TYPE: {"schema": {
                       "type": "object", "properties": {
                           "status": {"type": "string", "enum": ["ok"]},
                           "attached": {"type": "boolean"},
                           "ranks": {"type": "integer", "description": "ranks (slots) in the region"},
                           "published": {"type": "integer",
                                         "description": "ranks that have published"}},
                       "required": ["status", "attached", "ranks"]}}}},
                   503: {"description": "Not attached", "content": {JSON_CONTENT_TYPE: {"schema": {
                       "type": "object", "properties": {
                           "status": {"type": "string", "enum": ["unavailable"]},
                           "attached": {"type": "boolean"},
                           "reason": {"type": ["string", "null"]}},
                       "required": ["status", "reason"]}}}}})
    async def health(request: Request) -> Response:
        view = store.view()
        if store.attached:
            counters.count("/health", 200)
            body = {"status": "ok", "attached": True, "ranks": store.dp_size or 0,
                    "published": len(view.snapshots)}
            return Response(_encode_json(body), 200, media_type=JSON_CONTENT_TYPE)
        counters.count("/health", 503)
        body = {"status": "unavailable", "attached": False, "reason": store.attach_error}
        return Response(_encode_json(body), 503, media_type=JSON_CONTENT_TYPE)



def _add_metrics(router: APIRouter, loads: _Loads, counters: _Metrics,
                 registry: CollectorRegistry) -> None:
    @router.get(
        "/metrics", summary="Server metrics (Prometheus)", operation_id="metrics",
        description="Request counters, 400s by field and reason, and shared-memory reader counters.",
        responses={200: {"description": "Prometheus text exposition format",
                         "content": {"text/plain": {"schema": {"type": "string"}}}},
                   401: _ERROR_401})
    async def server_metrics(request: Request) -> Response:
        if not loads.authorized(request.scope):
            return _RawResponse(*loads.unauthorized("/metrics"))
        counters.count("/metrics", 200)
        return Response(prometheus_client.generate_latest(registry),
                        media_type=PROMETHEUS_CONTENT_TYPE)


def create_app(store: LoadStore, *, api_key: str | None = None,
               registry: CollectorRegistry | None = None) -> FastAPI:
    """A FastAPI app serving create_router(store); its lifespan starts the store's poll task."""
    app = _App(title="loadsvc", version=__version__,
               description="Per-rank load of LLM inference engines (see loadsvc's docs/rest.md).")
    router, app._loads = _build(store, api_key, registry)
    app.include_router(router)
    return app
