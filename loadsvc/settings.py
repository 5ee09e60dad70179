"""Typed settings, one class per role, built once from the command line in cli.py.

Nothing below cli.py reads flags or environment variables: each component takes
the settings object (or plain arguments) it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loadsvc.core.region import DEFAULT_STALE_AFTER, DEFAULT_UNREACHABLE_AFTER


@dataclass(frozen=True)
class StoreSettings:
    """The read side of one region."""

    shm: Path
    dp_size: int | None = None  # create the region with this many ranks if missing
    stale_after: float = DEFAULT_STALE_AFTER
    unreachable_after: float = DEFAULT_UNREACHABLE_AFTER
    region_mode: int = 0o600
    poll_interval: float = 0.001  # how often the store looks for changed ranks


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mutual TLS when set


@dataclass(frozen=True)
class CurveServerSettings:
    secret_key: Path  # the collector's secret certificate (pyzmq format)
    authorized_dir: Path  # public certificates of the publishers allowed in


@dataclass(frozen=True)
class CurveClientSettings:
    server_key: Path  # the collector's public certificate
    secret_key: Path  # this publisher's secret certificate


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP client may hold of a server (REST of serve, the engine, the router).

    Enforced by loadsvc/surfaces/limits.py on uvicorn's httptools protocol and as ASGI middleware.
    """

    max_header_bytes: int = 32 * 1024  # request line + headers; more: 431 and the connection closed
    header_timeout: float = 10.0  # seconds from connect (or the previous response) to a complete header block
    idle_timeout: float = 5.0  # seconds a keep-alive connection may sit idle between requests
    max_connections: int = 256  # open at once; at the cap the oldest connection without a request goes
    tls_handshake_timeout: float = 10.0  # seconds for a TLS handshake
    max_body_bytes: int = 16 * 1024 * 1024  # request body (engine and router; serve reads none): 413


@dataclass(frozen=True)
class GrpcLimits:
    """gRPC server options of serve (and the engine's gRPC server): see GRPC_OPTIONS in server.py."""

    max_connections: int = 512  # grpc.max_allowed_incoming_connections
    max_streams_per_connection: int = 100  # grpc.max_concurrent_streams
    idle_timeout: float = 60.0  # grpc.max_connection_idle_ms: a connection with no call this long gets GOAWAY
    handshake_timeout: float = 10.0  # grpc.server_handshake_timeout_ms: TLS and HTTP/2 settings exchange
    # grpc.keepalive_time_ms: a connection with calls open is pinged after this long without a frame from
    # the client; no answer within keepalive_timeout (or keepalive, if shorter) closes it. Frees the
    # stream slots of a WatchLoads subscriber whose host vanished while its stream was quiet (a filter
    # that rarely changes, a heartbeat of up to an hour); while messages flow, gRPC's 20 s
    # TCP_USER_TIMEOUT on unacked data does it.
    keepalive: float = 60.0
    keepalive_timeout: float = 20.0  # grpc.keepalive_timeout_ms


@dataclass(frozen=True)
class CollectorSettings:
    """The relay collector's own settings (loadsvc.relay.collector)."""

    endpoint: str  # ZMQ endpoint to bind, e.g. tcp://0.0.0.0:5557
    shm: Path  # the region it writes remote ranks into
    dp_size: int | None = None  # create the region with this many ranks if missing
    stale_after: float = DEFAULT_STALE_AFTER  # silence after which a replaced epoch may return
    region_mode: int = 0o600
    max_frame_bytes: int = 64 * 1024
    curve: CurveServerSettings | None = None


@dataclass(frozen=True)
class IngestSettings:
    """What `loadsvc serve` ingests from engines that run none of loadsvc's code (loadsvc/ingest/)."""

    sglang_endpoints: tuple[tuple[str, int], ...] = ()  # (tcp://HOST:PORT, region rank)
    sglang_servers: tuple[tuple[str, int], ...] = ()  # (SGLang URL, region rank of its rank 0)
    sglang_max_rate: float = 200.0  # writes per second per SGLang endpoint
    sglang_max_frame_bytes: int = 4096  # per message part
    scrape: tuple[tuple[str, int], ...] = ()  # (/metrics URL, region rank of its rank 0)
    scrape_interval: float = 0.1  # seconds
    scrape_timeout: float = 1.0  # seconds per scrape, the page included
    scrape_max_bytes: int = 4 * 1024 * 1024
    scrape_map: Path | None = None  # another engine's name set (JSON)
    max_endpoints: int = 256  # SGLang endpoints (explicit and discovered) plus scrape URLs


@dataclass(frozen=True)
class ServeSettings:
    store: StoreSettings
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    collect: str | None = None  # ZMQ endpoint the collector binds, e.g. tcp://0.0.0.0:5557
    curve: CurveServerSettings | None = None
    tls: TlsSettings | None = None
    api_key: str | None = None
    orca_ranks: tuple[int, ...] | None = None  # None: aggregate of every rank
    max_frame_bytes: int = 64 * 1024
    grpc_workers: int = 1  # gRPC server processes sharing grpc_port (SO_REUSEPORT) when > 1
    # WatchLoads streams, and ORCA streams, open at once per gRPC process (each kind);
    # the same default as loadsvc.surfaces.grpc.DEFAULT_MAX_STREAMS.
    max_streams: int = 4096
    http_limits: HttpLimits = HttpLimits()
    grpc_limits: GrpcLimits = GrpcLimits()
    ingest: IngestSettings | None = None  # SGLang load streams and /metrics scrapes into the region

    @property
    def collector(self) -> CollectorSettings | None:
        """The collector's settings, when serve collects (--collect)."""
        if self.collect is None:
            return None
        return CollectorSettings(endpoint=self.collect, shm=self.store.shm, dp_size=self.store.dp_size,
                                 stale_after=self.store.stale_after, region_mode=self.store.region_mode,
                                 max_frame_bytes=self.max_frame_bytes, curve=self.curve)


@dataclass(frozen=True)
class SimulateSettings:
    dp_size: int
    ranks: tuple[int, ...]
    rate: float = 20.0
    shm: Path | None = None
    zmq: str | None = None
    curve: CurveClientSettings | None = None
    seed: int | None = None
    duration: float | None = None  # seconds; None = until stopped


@dataclass(frozen=True)
class DemoSettings:
    host: str = "127.0.0.1"
    # None: the usual port (gRPC 50051, REST 8000, router 8080) when it is free, else a free one
    grpc_port: int | None = None
    http_port: int | None = None
    router_port: int | None = None  # --engine only
    dp_size: int = 4
    engine: bool = False
    shm: Path | None = None


@dataclass(frozen=True)
class ClientSettings:
    """`loadsvc get` and `loadsvc watch`."""

    grpc: str = "127.0.0.1:50051"
    dp_rank: int | None = None
    include: tuple[str, ...] = ()
    min_interval_ms: int = 0
    max_interval_ms: int = 1000
    json: bool = False
    api_key: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # client certificate for mutual TLS
    tls_key: Path | None = None
    count: int | None = None  # watch: stop after this many messages


@dataclass(frozen=True)
class EngineSettings:
    dp_size: int = 2
    speeds: tuple[float, ...] = ()
    max_running_requests: int = 32
    max_total_tokens: int = 65536
    host: str = "127.0.0.1"
    http_port: int = 30000
    grpc_port: int = 30001
    shm: Path | None = None
    publish_rate: float = 50.0
    model: str = "loadsvc-toy"
    stale_after: float = DEFAULT_STALE_AFTER
    extra: dict[str, str] = field(default_factory=dict)
    # The toy timing model (loadsvc/tools/engine.py): one decode step per running
    # request every step_ms * (1 + batch / batch_knee) / speed milliseconds;
    # prefill_tokens_per_step prompt tokens cost one step.
    step_ms: float = 10.0
    batch_knee: float = 32.0
    prefill_tokens_per_step: int = 16
    http_limits: HttpLimits = HttpLimits()


@dataclass(frozen=True)
class RouterWorker:
    """One engine behind the reference router: where to send requests, where to watch loads."""

    url: str  # the engine's HTTP base URL, e.g. http://127.0.0.1:30000
    grpc: str  # the engine's gRPC address for WatchLoads, e.g. 127.0.0.1:30001


@dataclass(frozen=True)
class RouterSettings:
    """The reference router (loadsvc/tools/router.py)."""

    workers: tuple[RouterWorker, ...]
    policy: str = "p2c"  # "p2c" (power of two choices on WatchLoads) or "round_robin"
    host: str = "127.0.0.1"
    port: int = 8080
    stale_after: float = 1.0  # seconds without a WatchLoads message before a worker is skipped
    seed: int | None = None
    request_timeout: float = 600.0
    http_limits: HttpLimits = HttpLimits()
