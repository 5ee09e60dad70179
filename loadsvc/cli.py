"""The `loadsvc` command: parses flags once into settings and hands them to a component.

    loadsvc demo                      simulator + server on 127.0.0.1, until Ctrl-C
    loadsvc serve --shm PATH          gRPC + REST over a region (a ZMQ collector, SGLang streams, scrapes)
    loadsvc simulate --shm PATH ...   an engine simulator publishing load
    loadsvc get / watch               read the loads over gRPC
    loadsvc keys gen DIR NAME         CURVE key pair for the relay
    loadsvc engine                    a toy inference engine serving loads itself
    loadsvc router --worker URL=GRPC  the reference P2C router in front of engines
    loadsvc bench shm|rest|grpc|relay|routing|soak|vllm|ingest
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from loadsvc._version import __version__
from loadsvc.core.region import (
    DEFAULT_STALE_AFTER,
    DEFAULT_UNREACHABLE_AFTER,
    default_path,
)
from loadsvc.settings import (
    ClientSettings,
    CurveClientSettings,
    CurveServerSettings,
    DemoSettings,
    EngineSettings,
    GrpcLimits,
    HttpLimits,
    IngestSettings,
    RouterSettings,
    ServeSettings,
    SimulateSettings,
    StoreSettings,
    TlsSettings,
)

API_KEY_ENV = "LOADSVC_API_KEY"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _SubcommandParser(argparse.ArgumentParser):
    """The parser of one subcommand (`loadsvc get`, `loadsvc keys gen`, ...).

    A flag it does not know is reported with its own usage (argparse would hand it up to the
    top-level parser, whose usage lists only the commands), and it takes --log-level too, so
    `loadsvc get --log-level DEBUG` works as `loadsvc --log-level DEBUG get` does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                          help="logging level, here or before the command (default INFO)")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def parse_ranks(text: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6)."""
    ranks: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ValueError
                ranks.extend(range(int(lo), int(hi) + 1))
            elif part:
                ranks.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks must look like 0-3 or 0,2,5 (got {text!r})") from None
    if not ranks or min(ranks) < 0:
        raise argparse.ArgumentTypeError(f"ranks must be non-negative integers (got {text!r})")
    return tuple(sorted(set(ranks)))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _fractions(text: str) -> tuple[float, ...]:
    """'0.7,0.9' -> (0.7, 0.9); each in (0, 2]."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.7,0.9, got {text!r}") from None
    if not values or not all(0 < v <= 2 for v in values):
        raise argparse.ArgumentTypeError(f"each value must be in (0, 2], got {text!r}")
    return values


def _unit_fraction(text: str) -> float:
    """'0.3' -> 0.3; in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0.3, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _router_kinds(text: str) -> tuple[str, ...]:
    """'loadsvc P2C,oracle' -> the router kinds of `loadsvc bench routing`, each checked."""
    from loadsvc.bench.routing import KINDS

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown router kind {', '.join(map(repr, unknown)) or text!r}; "
                                         f"expected some of: {', '.join(KINDS)}")
    return kinds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {text!r}")
    return value


def _speeds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"speeds must look like 1,1,0.5 (got {text!r})") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"speeds must be numbers > 0 (got {text!r})")
    return values


def _add_store_args(p: argparse.ArgumentParser, shm_required: bool = True) -> None:
    p.add_argument("--shm", type=Path, required=shm_required, default=None if shm_required else default_path(),
                   help="the shared-memory region file (e.g. /dev/shm/loadsvc-default.shm)")
    p.add_argument("--dp-size", type=_positive_int, default=None,
                   help="create the region with this many ranks if it does not exist; without it, "
                        "wait for a publisher to create it")
    p.add_argument("--stale-after", type=_positive_float, default=DEFAULT_STALE_AFTER,
                   help="seconds without a publish before a rank is reported stale (default %(default)s)")
    p.add_argument("--unreachable-after", type=_positive_float, default=DEFAULT_UNREACHABLE_AFTER,
                   help="seconds without a publish before a rank is reported unreachable "
                        "(default %(default)s)")
    p.add_argument("--group-readable", action="store_true",
                   help="create the region 0660 instead of 0600 (share it with the file's group)")


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="loadsvc gRPC address (default %(default)s)")
    p.add_argument("--dp-rank", type=int, default=None, help="only this rank (default: every rank)")
    p.add_argument("--include", default="", metavar="SECTIONS",
                   help="comma-separated sections: core,memory,spec,lora,disagg,queues,all "
                        "(default: all)")
    p.add_argument("--api-key", default=None,
                   help=f"bearer token for a server started with --api-key (or ${API_KEY_ENV})")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate to verify a TLS server")
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="client certificate (PEM) for a server started with --tls-client-ca")
    p.add_argument("--tls-key", type=Path, default=None, help="the client certificate's private key (PEM)")


def _add_http_limit_args(p: argparse.ArgumentParser, *, body: bool) -> None:
    """The HTTP server's limits (loadsvc/surfaces/limits.py); body: also --http-max-body-bytes."""
    d = HttpLimits()
    p.add_argument("--http-max-header-bytes", type=_positive_int, default=d.max_header_bytes, metavar="N",
                   help="request line and headers larger than this: 431, connection closed "
                        "(default %(default)s)")
    p.add_argument("--http-header-timeout", type=_positive_float, default=d.header_timeout, metavar="S",
                   help="a connection must send a complete request header within this many seconds of "
                        "connecting or of its previous response, else it is closed (default %(default)s)")
    p.add_argument("--http-idle-timeout", type=_positive_float, default=d.idle_timeout, metavar="S",
                   help="close a keep-alive connection idle this long (default %(default)s)")
    p.add_argument("--http-max-connections", type=_positive_int, default=d.max_connections, metavar="N",
                   help="HTTP connections open at once; at the cap the one waiting longest for a request "
                        "is closed (default %(default)s)")
    if body:
        p.add_argument("--http-max-body-bytes", type=_positive_int, default=d.max_body_bytes, metavar="N",
                       help="request bodies larger than this: 413, never buffered (default %(default)s)")


def _http_limits(args: argparse.Namespace) -> HttpLimits:
    d = HttpLimits()
    return HttpLimits(max_header_bytes=args.http_max_header_bytes, header_timeout=args.http_header_timeout,
                      idle_timeout=args.http_idle_timeout, max_connections=args.http_max_connections,
                      tls_handshake_timeout=getattr(args, "handshake_timeout", d.tls_handshake_timeout),
                      max_body_bytes=getattr(args, "http_max_body_bytes", d.max_body_bytes))


def _add_ingest_args(p: argparse.ArgumentParser) -> None:
    """serve's flags for engines that run none of loadsvc's code (loadsvc/ingest/, docs/engines.md)."""
    g = p.add_argument_group("ingest: SGLang load streams and Prometheus /metrics into the region")
    g.add_argument("--sglang-endpoint", action="append", metavar="ENDPOINT=RANK",
                   help="an SGLang scheduler's load PUB socket (--load-publish-endpoint) and the region "
                        "rank it fills, e.g. tcp://10.0.0.5:5559=0 (repeat per rank)")
    g.add_argument("--sglang-server", action="append", metavar="URL[=RANK]",
                   help="an SGLang server whose /server_info names its load sockets; its rank r fills "
                        "region rank RANK + r (RANK default 0; repeat per server)")
    g.add_argument("--sglang-max-rate", type=_positive_float, default=200.0, metavar="HZ",
                   help="writes per second per SGLang endpoint at most; a frame arriving sooner waits "
                        "for its turn and a newer one replaces it (default %(default)s)")
    g.add_argument("--sglang-max-frame-bytes", type=_positive_int, default=4096, metavar="BYTES",
                   help="refuse SGLang frames with a part larger than this many bytes (default %(default)s)")
    g.add_argument("--scrape", action="append", metavar="URL[=RANK]",
                   help="an engine's Prometheus /metrics (vLLM, SGLang, or --scrape-map's names); rank "
                        "label N fills region rank RANK + N (RANK default 0; repeat per URL)")
    g.add_argument("--scrape-interval-ms", type=_scrape_interval_ms, default=100, metavar="MS",
                   help="milliseconds between two scrapes of one URL, at least 20 (default %(default)s)")
    g.add_argument("--scrape-timeout-ms", type=_positive_int, default=1000, metavar="MS",
                   help="milliseconds one scrape may take, the page included; a late one fails and "
                        "the rank ages (default %(default)s)")
    g.add_argument("--scrape-max-bytes", type=_positive_int, default=4 * 1024 * 1024, metavar="BYTES",
                   help="refuse a /metrics page larger than this many bytes, unparsed (default %(default)s)")
    g.add_argument("--scrape-map", type=Path, default=None, metavar="FILE",
                   help="JSON name set for an engine that is neither vLLM nor SGLang (docs/engines.md)")
    g.add_argument("--ingest-max-endpoints", type=_positive_int, default=256, metavar="N",
                   help="SGLang endpoints (given and discovered) plus scrape URLs, at most "
                        "(default %(default)s)")


def _scrape_interval_ms(text: str) -> int:
    value = _positive_int(text)
    if value < 20:
        raise argparse.ArgumentTypeError(f"the scrape interval's floor is 20 ms, got {text!r}")
    return value


def _rank_pairs(values: list[str] | None, flag: str, *, rank_required: bool) -> tuple[tuple[str, int], ...]:
    """['tcp://h:5559=0', ...] -> (('tcp://h:5559', 0), ...); SystemExit naming the flag and value."""
    pairs = []
    for text in values or ():
        head, sep, tail = text.rpartition("=")
        if sep and tail.strip().isdigit():
            pairs.append((head.strip(), int(tail)))
        elif rank_required:
            raise SystemExit(f"loadsvc serve: {flag} {text!r}: expected ENDPOINT=RANK, e.g. tcp://10.0.0.5:5559=0")
        else:
            pairs.append((text.strip(), 0))
    return tuple(pairs)


def _ingest_settings(args: argparse.Namespace) -> IngestSettings | None:
    endpoints = _rank_pairs(args.sglang_endpoint, "--sglang-endpoint", rank_required=True)
    servers = _rank_pairs(args.sglang_server, "--sglang-server", rank_required=False)
    if not (endpoints or servers or args.scrape):
        return None
    from loadsvc.ingest.scrape import load_name_set, parse_target

    for address, _ in endpoints:
        if not address.startswith(("tcp://", "ipc://")):
            raise SystemExit(f"loadsvc serve: --sglang-endpoint {address!r}: expected tcp://HOST:PORT=RANK")
    for url, _ in servers:
        if not url.startswith(("http://", "https://")):
            raise SystemExit(f"loadsvc serve: --sglang-server {url!r}: expected http(s)://HOST:PORT[=RANK]")
    try:
        targets = [parse_target(text) for text in args.scrape or ()]
        if args.scrape_map is not None:
            load_name_set(args.scrape_map)
    except ValueError as e:
        raise SystemExit(f"loadsvc serve: {e}") from None
    if len(endpoints) + len(targets) > args.ingest_max_endpoints:
        raise SystemExit(f"loadsvc serve: {len(endpoints)} --sglang-endpoint and {len(targets)} --scrape, "
                         f"more than --ingest-max-endpoints {args.ingest_max_endpoints}")
    if args.dp_size is not None:
        for flag, rank in [("--sglang-endpoint", r) for _, r in endpoints]:
            if rank >= args.dp_size:
                raise SystemExit(f"loadsvc serve: {flag} rank {rank} is outside --dp-size {args.dp_size}")
    return IngestSettings(
        sglang_endpoints=endpoints, sglang_servers=servers, sglang_max_rate=args.sglang_max_rate,
        sglang_max_frame_bytes=args.sglang_max_frame_bytes,
        scrape=tuple((t.url, t.first_rank) for t in targets),
        scrape_interval=args.scrape_interval_ms / 1000, scrape_timeout=args.scrape_timeout_ms / 1000,
        scrape_max_bytes=args.scrape_max_bytes, scrape_map=args.scrape_map,
        max_endpoints=args.ingest_max_endpoints)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadsvc",
        description="Carry per-rank load from LLM inference engines to routers "
                    "(shared memory, ZMQ relay, gRPC and REST).",
        epilog="Start with `loadsvc demo`, then `loadsvc watch` in another terminal.",
    )
    parser.add_argument("--version", action="version", version=f"loadsvc {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="logging level (default %(default)s); also accepted after the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_SubcommandParser)

    p = sub.add_parser("demo", help="run a simulated 4-rank engine and the server on 127.0.0.1",
                       description="Start the engine simulator (4 ranks) and the server on 127.0.0.1 "
                                   "(gRPC 50051, REST 8000); stop everything with Ctrl-C. A default "
                                   "port that is in use is replaced by a free one (the demo says so); "
                                   "a port given with a flag must be free.")
    p.add_argument("--grpc-port", type=_port, default=None,
                   help="gRPC port (default: 50051, or a free port when 50051 is in use)")
    p.add_argument("--http-port", type=_port, default=None,
                   help="REST port (default: 8000, or a free port when 8000 is in use)")
    p.add_argument("--dp-size", type=_positive_int, default=4, help="simulated ranks (default %(default)s)")
    p.add_argument("--engine", action="store_true",
                   help="run toy inference engines and the reference router instead of the simulator")
    p.add_argument("--router-port", type=_port, default=None,
                   help="with --engine: the router's HTTP port (default: 8080, or a free port when "
                        "8080 is in use)")
    p.add_argument("--shm", type=Path, default=None, help="region file (default: a fresh one per run)")

    p = sub.add_parser("serve", help="serve a region over gRPC and REST",
                       description="Serve the loads of a shared-memory region over gRPC "
                                   "(loadsvc.v1.LoadService, SGLang GetLoads, health, reflection, ORCA) "
                                   "and REST (GET /v1/loads, /health, /metrics).")
    _add_store_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s; anything beyond loopback wants "
                        "--tls-cert/--tls-key or --api-key)")
    p.add_argument("--grpc-port", type=_port, default=50051, help="gRPC port (default %(default)s)")
    p.add_argument("--http-port", type=_port, default=8000, help="REST port (default %(default)s)")
    p.add_argument("--collect", default=None, metavar="tcp://HOST:PORT",
                   help="also run the ZMQ collector bound here, relaying remote ranks into the region")
    p.add_argument("--curve-secret-key", type=Path, default=None,
                   help="collector's secret certificate (from `loadsvc keys gen`); enables CURVE")
    p.add_argument("--curve-authorized-dir", type=Path, default=None,
                   help="directory of publishers' public certificates allowed to push")
    p.add_argument("--max-frame-bytes", type=_positive_int, default=64 * 1024,
                   help="collector: reject frames larger than this (default %(default)s)")
    p.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate (PEM) for gRPC and REST")
    p.add_argument("--tls-key", type=Path, default=None, help="TLS private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, default=None,
                   help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on REST and gRPC (or ${API_KEY_ENV}); "
                        "health stays open")
    p.add_argument("--orca-ranks", type=parse_ranks, default=None,
                   help="ranks whose aggregate ORCA reports describe (default: all)")
    p.add_argument("--grpc-workers", type=_positive_int, default=1, metavar="N",
                   help="gRPC server processes sharing --grpc-port through SO_REUSEPORT, each reading "
                        "the region itself; the kernel spreads connections (not calls) over them. "
                        "Use about one per core for hundreds of WatchLoads subscribers. REST and the "
                        "collector stay in the first process (default %(default)s)")
    p.add_argument("--max-streams", type=_positive_int, default=4096, metavar="N",
                   help="WatchLoads streams, and ORCA streams, open at once per gRPC process; one "
                        "more is refused with RESOURCE_EXHAUSTED (default %(default)s)")
    _add_http_limit_args(p, body=False)
    grpc_limits = GrpcLimits()
    p.add_argument("--handshake-timeout", type=_positive_float, default=grpc_limits.handshake_timeout, metavar="S",
                   help="seconds a new connection gets for its TLS handshake (REST and gRPC) and, on gRPC, "
                        "its HTTP/2 settings exchange (default %(default)s)")
    p.add_argument("--grpc-max-connections", type=_positive_int, default=grpc_limits.max_connections, metavar="N",
                   help="gRPC connections open at once, per server process (default %(default)s)")
    p.add_argument("--grpc-max-streams", type=_positive_int, default=grpc_limits.max_streams_per_connection,
                   metavar="N", help="concurrent calls (e.g. WatchLoads streams) per gRPC connection "
                                     "(default %(default)s)")
    p.add_argument("--grpc-idle-timeout", type=_positive_float, default=grpc_limits.idle_timeout, metavar="S",
                   help="a gRPC connection without a call this long is closed (GOAWAY; clients "
                        "reconnect) (default %(default)s)")
    p.add_argument("--grpc-keepalive", type=_positive_float, default=grpc_limits.keepalive, metavar="S",
                   help="a gRPC connection with calls open (e.g. a quiet WatchLoads stream) is pinged after "
                        "S seconds without a frame from its client, and closed when the ping is not "
                        f"answered within S or {grpc_limits.keepalive_timeout:g} s, whichever is less: a vanished "
                        "subscriber's streams are freed (default %(default)s)")
    _add_ingest_args(p)

    p = sub.add_parser("simulate", help="publish simulated engine load",
                       description="An engine simulator: arrivals, queues that build and drain, token "
                                   "usage, throughput and cache hits, published per rank at --rate Hz "
                                   "into a region (--shm) or to a collector (--zmq).")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--shm", type=Path, help="region file to publish into")
    dest.add_argument("--zmq", metavar="tcp://HOST:PORT", help="collector endpoint to push to")
    p.add_argument("--dp-size", type=_positive_int, required=True, help="total ranks of the deployment")
    p.add_argument("--ranks", type=parse_ranks, default=None,
                   help="ranks this process publishes, e.g. 0-3 (default: all of --dp-size)")
    p.add_argument("--rate", type=_positive_float, default=20.0, metavar="HZ",
                   help="publishes per second per rank (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--duration", type=_positive_float, default=None,
                   help="stop after this many seconds (default: run until SIGTERM or Ctrl-C)")
    p.add_argument("--curve-server-key", type=Path, default=None, help="collector's public certificate")
    p.add_argument("--curve-secret-key", type=Path, default=None, help="this publisher's secret certificate")

    for name, text in (("get", "print the per-rank table once"),
                       ("watch", "live per-rank table from the WatchLoads stream")):
        p = sub.add_parser(name, help=text, description=text)
        _add_client_args(p)
        if name == "get":
            p.add_argument("--json", action="store_true", help="print the response as JSON")
        else:
            p.add_argument("--min-interval-ms", type=int, default=0, metavar="MS",
                           help="milliseconds between two messages at least (default %(default)s: "
                                "every change)")
            p.add_argument("--max-interval-ms", type=int, default=1000, metavar="MS",
                           help="heartbeat: a message at least every this many milliseconds even "
                                "without change; 3 missed heartbeats (at least 3 s) are taken for a "
                                "lost connection and watch reconnects (default %(default)s)")
            p.add_argument("--count", type=_positive_int, default=None,
                           help="exit after this many messages, counted across reconnects "
                                "(default: run until Ctrl-C)")

    p = sub.add_parser("keys", help="CURVE keys for the ZMQ relay")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    g = ksub.add_parser("gen", help="write DIR/NAME.key and DIR/NAME.key_secret (pyzmq format)",
                        description="Write a CURVE key pair for the ZMQ relay: DIR/NAME.key (public: "
                                    "give it to the other side) and DIR/NAME.key_secret (keep it).")
    g.add_argument("dir", type=Path, help="directory to write the two files into (created if missing)")
    g.add_argument("name", help="file name of the pair, e.g. the node's name (node1 -> node1.key)")

    p = sub.add_parser("engine", help="a toy inference engine that serves its own loads",
                       description="A toy inference engine (not a model) with an SGLang-like HTTP "
                                   "surface and a gRPC surface, publishing each rank's real state.")
    p.add_argument("--dp-size", type=_positive_int, default=2,
                   help="data-parallel ranks, each a scheduler of its own (default %(default)s)")
    p.add_argument("--speeds", type=_speeds, default=None,
                   help="per-rank speed factors, e.g. 1,0.5 (default: 1 for every rank)")
    p.add_argument("--max-running-requests", type=_positive_int, default=32,
                   help="requests a rank decodes at once; more wait in its queue (default %(default)s)")
    p.add_argument("--max-total-tokens", type=_positive_int, default=65536,
                   help="KV-cache budget per rank, in tokens (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP and gRPC servers listen on (default %(default)s)")
    p.add_argument("--port", type=_port, default=30000, help="HTTP port (default %(default)s)")
    p.add_argument("--grpc-port", type=_port, default=30001, help="gRPC port (default %(default)s)")
    p.add_argument("--shm", type=Path, default=None, help="region file (default: one per engine port)")
    p.add_argument("--publish-rate", type=_positive_float, default=50.0, metavar="HZ",
                   help="publishes per second per rank (default %(default)s)")
    p.add_argument("--model", default="loadsvc-toy", help="model name to report (default %(default)s)")
    p.add_argument("--step-ms", type=_positive_float, default=10.0,
                   help="milliseconds of one decode step at batch 1, speed 1 (default %(default)s)")
    p.add_argument("--batch-knee", type=_positive_float, default=32.0,
                   help="the batch size (requests) at which a step takes twice as long "
                        "(default %(default)s)")
    p.add_argument("--prefill-tokens-per-step", type=_positive_int, default=16,
                   help="prompt tokens that cost one step (default %(default)s)")
    p.add_argument("--stale-after", type=_positive_float, default=DEFAULT_STALE_AFTER,
                   help="seconds without a publish before /v1/loads calls a rank stale "
                        "(default %(default)s)")
    _add_http_limit_args(p, body=True)

    p = sub.add_parser("router", help="the reference P2C router in front of engines",
                       description="An HTTP proxy in front of `loadsvc engine` workers that routes by "
                                   "power of two choices on loads pushed over WatchLoads (or round "
                                   "robin).")
    p.add_argument("--worker", action="append", required=True, metavar="URL=GRPC",
                   help="an engine: HTTP URL = gRPC address, e.g. "
                        "http://127.0.0.1:30000=127.0.0.1:30001 (repeat per engine)")
    p.add_argument("--policy", choices=["p2c", "round_robin"], default="p2c",
                   help="routing policy (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the router's HTTP server listens on (default %(default)s)")
    p.add_argument("--port", type=_port, default=8080, help="HTTP port (default %(default)s)")
    p.add_argument("--stale-after", type=_positive_float, default=1.0,
                   help="skip an engine after this many seconds without a WatchLoads message "
                        "(default %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed of the power of two choices (default: random)")
    _add_http_limit_args(p, body=True)

    p = sub.add_parser("bench", help="benchmarks (print figures and ratios against a baseline)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    b = bsub.add_parser("shm", help="shared-memory publish/read against a flock baseline")
    b.add_argument("--ranks", type=_positive_int, default=8, help="ranks in the region (default %(default)s)")
    b.add_argument("--seconds", type=_positive_float, default=5.0,
                   help="length of the contended phase per design, in seconds (default %(default)s)")
    b.add_argument("--readers", type=_positive_int, default=3,
                   help="reader processes in the contended phase (default %(default)s)")
    b = bsub.add_parser("rest", help="REST /v1/loads under wrk against a baseline endpoint")
    b.add_argument("--seconds", type=_positive_int, default=10,
                   help="length of each measured run, in whole seconds (default %(default)s)")
    b.add_argument("--connections", type=_positive_int, default=32,
                   help="open HTTP connections of the load generator (default %(default)s)")
    b = bsub.add_parser("grpc", help="GetLoads latency and WatchLoads fan-out",
                        description="GetLoads latency (32 callers polling; judged with Go callers built from "
                                    "Debian's golang-go and golang-google-grpc-dev, or Python ones without "
                                    "them) and WatchLoads fan-out, against `loadsvc serve` as one process and "
                                    "with --grpc-workers.")
    b.add_argument("--subscribers", type=_positive_int, default=500, help="WatchLoads streams (default %(default)s)")
    b.add_argument("--seconds", type=_positive_float, default=10.0, help="length of each measured phase "
                                                                         "(default %(default)s)")
    b.add_argument("--workers", type=_positive_int, default=None,
                   help="--grpc-workers of the second server measured (default: one per core)")
    b = bsub.add_parser("relay", help="ZMQ publish to WatchLoads delivery across network namespaces")
    b.add_argument("--seconds", type=_positive_float, default=10.0,
                   help="length of the measured phase, in seconds (default %(default)s)")
    b = bsub.add_parser("routing", help="routing quality: round robin, smg, vllm-router, loadsvc P2C, "
                                        "an oracle")
    b.add_argument("--requests", type=_positive_int, default=400, help="requests per run (default %(default)s)")
    b.add_argument("--seed", type=int, default=1, help="seed of the trace (default %(default)s)")
    b.add_argument("--loads", type=_fractions, default=(0.7, 0.9),
                   help="arrival rates as fractions of the calibrated capacity (default 0.7,0.9)")
    b.add_argument("--routers", type=_positive_int, default=1,
                   help="replicas of each router kind, the trace split between them round robin "
                        "as an L4 balancer would (the oracle is always one) (default %(default)s)")
    b.add_argument("--kinds", type=_router_kinds, default=None,
                   help="router kinds to run, comma-separated, from: round robin, smg power_of_two, "
                        "vllm-router power_of_two, loadsvc P2C, oracle (default: every one installed)")
    b.add_argument("--repeats", type=_positive_int, default=1,
                   help="runs of every router kind at each load, in rotating order; the table shows "
                        "medians and the targets the median of the ratios within each repeat "
                        "(default %(default)s)")
    b.add_argument("--direct", type=_unit_fraction, default=0.0,
                   help="fraction of the trace, in [0, 1), sent straight to the engines and "
                        "bypassing every router, the same requests for every kind "
                        "(default %(default)s)")
    b = bsub.add_parser("vllm", help="the vLLM plugin's cost per record() call and its lag to WatchLoads",
                        description="Captures a real vLLM's stats (CPU, a tiny Llama built here), replays "
                                    "them through loadsvc's stat logger and a no-op one, and times record() "
                                    "to a WatchLoads stream. Runs in the vLLM venv of "
                                    "`python -m loadsvc.bench.vllm_env` where vLLM is not installed.")
    b.add_argument("--requests", type=_positive_int, default=32,
                   help="completions in the captured burst (default %(default)s)")
    b.add_argument("--max-tokens", type=_positive_int, default=128,
                   help="tokens per completion (default %(default)s)")
    b.add_argument("--repeats", type=_positive_int, default=3,
                   help="replays of the captured calls per logger (default %(default)s)")
    b.add_argument("--probes", type=_positive_int, default=300,
                   help="record() -> WatchLoads lag samples (default %(default)s)")
    b.add_argument("--model", type=Path, default=None,
                   help="a model directory (default: a tiny random Llama built for the run)")
    b = bsub.add_parser("ingest", help="SGLang streams and /metrics scrapes into serve, beside the relay",
                        description="Frames/s and CPU per frame one serve takes from 64 SGLang-style PUB sockets "
                                    "and, in the same run, from 64 relay publishers; CPU per scrape of a real "
                                    "vLLM /metrics page (captured once where the vLLM venv exists, else "
                                    "`loadsvc engine`'s).")
    b.add_argument("--seconds", type=_positive_float, default=3.0,
                   help="length of each measured round, in seconds (default %(default)s)")
    b.add_argument("--rounds", type=_positive_int, default=3,
                   help="rounds per intake; the table shows medians (default %(default)s)")
    b.add_argument("--endpoints", type=_positive_int, default=16,
                   help="HTTP endpoints serving the page that serve scrapes every 100 ms (default %(default)s)")
    b.add_argument("--page", default="auto", metavar="auto|engine|FILE",
                   help="the /metrics page: auto (a real vLLM's, captured once and cached, else "
                        "`loadsvc engine`'s), engine, or a file (default %(default)s)")
    b = bsub.add_parser("soak", help="long run: 8 ranks at 100 Hz, 200 watchers, REST load")
    b.add_argument("--minutes", type=_positive_float, default=10.0,
                   help="length of the run, in minutes (default %(default)s)")
    return parser


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $LOADSVC_API_KEY, else None; an empty or blank key is a usage error (exit 2).

    An empty key would switch authentication off without a word (serve) or send an
    empty bearer token (clients); one with spaces around it could never match.
    """
    where, key = ("--api-key", args.api_key) if args.api_key is not None else \
        (f"${API_KEY_ENV}", os.environ.get(API_KEY_ENV))
    if key is None:
        return None
    problem = ("is empty" if not key.strip() else
               "has spaces or line breaks around it" if key != key.strip() else None)
    if problem is not None:
        print(f"loadsvc {args.command}: {where} {problem}; give the key itself, or leave "
              f"{where} unset for no key", file=sys.stderr)
        raise SystemExit(2)
    return key


def _serve_settings(args: argparse.Namespace) -> ServeSettings:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("loadsvc serve: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("loadsvc serve: --tls-client-ca needs --tls-cert and --tls-key")
    if (args.curve_secret_key is None) != (args.curve_authorized_dir is None):
        raise SystemExit("loadsvc serve: --curve-secret-key and --curve-authorized-dir go together")
    if args.curve_secret_key and not args.collect:
        raise SystemExit("loadsvc serve: CURVE flags need --collect")
    return ServeSettings(
        store=_store_settings(args),
        host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
        collect=args.collect,
        curve=CurveServerSettings(args.curve_secret_key, args.curve_authorized_dir)
        if args.curve_secret_key else None,
        tls=TlsSettings(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        api_key=_api_key(args),
        orca_ranks=args.orca_ranks,
        max_frame_bytes=args.max_frame_bytes,
        grpc_workers=args.grpc_workers,
        max_streams=args.max_streams,
        ingest=_ingest_settings(args),
        http_limits=_http_limits(args),
        grpc_limits=GrpcLimits(max_connections=args.grpc_max_connections,
                               max_streams_per_connection=args.grpc_max_streams,
                               idle_timeout=args.grpc_idle_timeout, handshake_timeout=args.handshake_timeout,
                               keepalive=args.grpc_keepalive),
    )


def _store_settings(args: argparse.Namespace) -> StoreSettings:
    if args.unreachable_after < args.stale_after:
        raise SystemExit(f"--unreachable-after ({args.unreachable_after}) must be >= --stale-after "
                         f"({args.stale_after})")
    return StoreSettings(shm=args.shm, dp_size=args.dp_size, stale_after=args.stale_after,
                         unreachable_after=args.unreachable_after,
                         region_mode=0o660 if args.group_readable else 0o600)


def _simulate_settings(args: argparse.Namespace) -> SimulateSettings:
    ranks = args.ranks if args.ranks is not None else tuple(range(args.dp_size))
    if max(ranks) >= args.dp_size:
        raise SystemExit(f"loadsvc simulate: --ranks {max(ranks)} is outside --dp-size {args.dp_size}")
    if (args.curve_server_key is None) != (args.curve_secret_key is None):
        raise SystemExit("loadsvc simulate: --curve-server-key and --curve-secret-key go together")
    if args.curve_server_key and not args.zmq:
        raise SystemExit("loadsvc simulate: CURVE flags need --zmq")
    return SimulateSettings(
        dp_size=args.dp_size, ranks=ranks, rate=args.rate, shm=args.shm, zmq=args.zmq,
        curve=CurveClientSettings(args.curve_server_key, args.curve_secret_key)
        if args.curve_server_key else None,
        seed=args.seed, duration=args.duration)


def _client_settings(args: argparse.Namespace) -> ClientSettings:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit(f"loadsvc {args.command}: --tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        raise SystemExit(f"loadsvc {args.command}: --tls-cert needs --tls-ca (the server's CA)")
    include = tuple(t.strip() for t in args.include.split(",") if t.strip())
    return ClientSettings(
        grpc=args.grpc, dp_rank=args.dp_rank, include=include,
        min_interval_ms=getattr(args, "min_interval_ms", 0),
        max_interval_ms=getattr(args, "max_interval_ms", 1000),
        json=getattr(args, "json", False),
        api_key=_api_key(args),
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        count=getattr(args, "count", None))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cmd = args.command
    if cmd == "serve":
        from loadsvc.server import run_serve

        return run_serve(_serve_settings(args))
    if cmd == "simulate":
        from loadsvc.tools.simulate import run_simulate

        try:
            simulate_settings = _simulate_settings(args)
        except SystemExit as e:  # flags that do not fit together: a usage error, exit 2
            print(e.code, file=sys.stderr)
            return 2
        return run_simulate(simulate_settings)
    if cmd == "demo":
        from loadsvc.tools.demo import run_demo

        return run_demo(DemoSettings(grpc_port=args.grpc_port, http_port=args.http_port,
                                     router_port=args.router_port, dp_size=args.dp_size,
                                     engine=args.engine, shm=args.shm))
    if cmd == "get":
        from loadsvc.client import run_get

        return run_get(_client_settings(args))
    if cmd == "watch":
        from loadsvc.client import run_watch

        return run_watch(_client_settings(args))
    if cmd == "keys":
        from loadsvc.relay import generate_keys

        public, secret = generate_keys(args.dir, args.name)
        print(f"wrote {public}\nwrote {secret}")
        return 0
    if cmd == "engine":
        from loadsvc.tools.engine import run_engine

        speeds = args.speeds or (1.0,) * args.dp_size
        if len(speeds) != args.dp_size:
            raise SystemExit(f"loadsvc engine: --speeds has {len(speeds)} values for --dp-size {args.dp_size}")
        return run_engine(EngineSettings(
            dp_size=args.dp_size, speeds=speeds, max_running_requests=args.max_running_requests,
            max_total_tokens=args.max_total_tokens, host=args.host, http_port=args.port,
            grpc_port=args.grpc_port, shm=args.shm, publish_rate=args.publish_rate, model=args.model,
            stale_after=args.stale_after, step_ms=args.step_ms, batch_knee=args.batch_knee,
            prefill_tokens_per_step=args.prefill_tokens_per_step, http_limits=_http_limits(args)))
    if cmd == "router":
        from loadsvc.tools.router import parse_worker, run_router

        try:
            workers = tuple(parse_worker(w) for w in args.worker)
        except ValueError as e:
            raise SystemExit(f"loadsvc router: --worker: {e}") from None
        return run_router(RouterSettings(workers=workers, policy=args.policy, host=args.host,
                                         port=args.port, stale_after=args.stale_after, seed=args.seed,
                                         http_limits=_http_limits(args)))
    if cmd == "bench":
        import importlib

        module = importlib.import_module(f"loadsvc.bench.{args.bench}")
        code: int = module.run(args)
        return code
    raise AssertionError(cmd)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
