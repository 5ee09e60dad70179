"""`loadsvc get` and `loadsvc watch`: the per-rank table, read over gRPC.

    ClientSettings --channel (TLS CA, bearer key)--> loadsvc.v1.LoadService
        get:   GetLoads   -> one rich table (or the response as JSON with --json)
        watch: WatchLoads -> a rich.live.Live table redrawn on every message

Stale ranks are drawn yellow, unreachable ones red. Failures (server down,
INVALID_ARGUMENT, UNAUTHENTICATED, ...) are one line on stderr and exit code 1
(2 for a request the server calls invalid); never a traceback.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loadsvc.settings import ClientSettings

__all__ = ["run_get", "run_watch", "loads_table"]

GET_TIMEOUT = 5.0  # seconds for GetLoads, connection included
WIDE = 140  # columns when stdout is not a terminal (pipes, logs): never wrap the table
REDRAW_HZ = 10  # watch: terminal redraws per second at most

_STATUS_STYLE = {"healthy": "green", "stale": "yellow", "unreachable": "red"}
_ROW_STYLE = {"stale": "yellow", "unreachable": "red"}


class _Usage(Exception):
    """A flag value the request cannot carry; exit code 2."""


def _status_name(value: int) -> str:
    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    return pb.LoadStatus.Name(value).removeprefix("LOAD_STATUS_").lower()


def _age(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(int(ms / 1000), 60)
    return f"{minutes}m {seconds:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def _sections(load: Any) -> str:
    short = (("memory", "mem"), ("speculative", "spec"), ("lora", "lora"),
             ("disaggregation", "disagg"), ("queues", "queues"))
    names = [label for field, label in short if load.HasField(field)]
    if load.HasField("disaggregation") and load.disaggregation.mode in ("prefill", "decode"):
        names[names.index("disagg")] = f"disagg:{load.disaggregation.mode}"
    return " ".join(names)


def loads_table(response: Any, source: str, *, note: str = "", all_ranks: bool = True) -> Table:
    """A rich Table of a GetLoadsResponse: one row per rank, the aggregate in the caption.

    all_ranks: also list the ranks of dp_rank_count that have not published.
    """
    loads = list(response.loads)
    when = response.timestamp
    try:
        when = datetime.fromisoformat(response.timestamp).astimezone().strftime("%H:%M:%S.%f")[:-3]
    except ValueError:
        pass
    healthy = sum(1 for load in loads if _status_name(load.status) == "healthy")
    shown = response.dp_rank_count if all_ranks else len(loads)
    title = f"loadsvc {source} · {healthy}/{shown} {'rank' if shown == 1 else 'ranks'} healthy · {when}"
    if note:
        title += f" · {note}"
    table = Table(title=title, title_justify="left", caption_justify="left", header_style="bold")
    for name, justify in (("rank", "right"), ("status", "left"), ("age", "right"),
                          ("running", "right"), ("waiting", "right"), ("tokens used/max", "right"),
                          ("usage", "right"), ("throughput", "right"), ("cache hit", "right"),
                          ("util", "right"), ("sections", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    show_sections = any(_sections(load) for load in loads)
    if not show_sections:
        table.columns.pop()  # nothing to list (e.g. --include core)
    by_rank: dict[int, Any] = {load.dp_rank: load for load in loads}
    ranks = sorted(by_rank)
    if all_ranks:
        ranks = sorted(set(ranks) | set(range(response.dp_rank_count)))
    for rank in ranks:
        load = by_rank.get(rank)
        if load is None:
            cells = [str(rank), Text("not published", style="red"), *["-"] * 8]
            table.add_row(*cells, *[""] * show_sections, style="red")
            continue
        status = _status_name(load.status)
        table.add_row(
            str(rank),
            Text(status, style=_STATUS_STYLE.get(status, "")),
            _age(load.age_ms),
            f"{load.num_running_reqs}/{load.max_running_requests}",
            str(load.num_waiting_reqs),
            f"{load.num_used_tokens:,}/{load.max_total_num_tokens:,}",
            _pct(load.token_usage),
            f"{load.gen_throughput:,.0f} tok/s",
            _pct(load.cache_hit_rate),
            _pct(load.utilization),
            *[_sections(load)] * show_sections,
            style=_ROW_STYLE.get(status),
        )
    a = response.aggregate
    if response.dp_rank_count == 0:
        table.caption = "no region attached yet: no ranks to show"
    else:
        table.caption = (f"aggregate: {a.total_running_reqs} running, {a.total_waiting_reqs} waiting, "
                         f"{a.total_reqs} total · avg token usage {_pct(a.avg_token_usage)} · "
                         f"avg throughput {a.avg_throughput:,.0f} tok/s · "
                         f"avg utilization {_pct(a.avg_utilization)}")
    return table


# -- plumbing --------------------------------------------------------------------


def _channel(settings: ClientSettings) -> grpc.Channel:
    if settings.tls_ca is None:
        return grpc.insecure_channel(settings.grpc)
    files: dict[str, bytes | None] = {}
    for flag, path in (("--tls-ca", settings.tls_ca), ("--tls-cert", settings.tls_cert),
                       ("--tls-key", settings.tls_key)):
        try:
            files[flag] = path.read_bytes() if path is not None else None
        except OSError as e:
            raise _Usage(f"cannot read {flag} {path}: {e.strerror}") from None
    creds = grpc.ssl_channel_credentials(root_certificates=files["--tls-ca"],
                                         private_key=files["--tls-key"],
                                         certificate_chain=files["--tls-cert"])
    return grpc.secure_channel(settings.grpc, creds)


def _metadata(settings: ClientSettings) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {settings.api_key}"),) if settings.api_key else ()


def _stub(channel: grpc.Channel) -> Any:
    from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc

    return loads_pb2_grpc.LoadServiceStub(channel)


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _rpc_error(command: str, settings: ClientSettings, err: grpc.RpcError) -> int:
    """Print one line for a failed call; return the exit code."""
    code = err.code() if hasattr(err, "code") else None
    details = _one_line(err.details() if hasattr(err, "details") else str(err))
    where = settings.grpc
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        print(f"loadsvc {command}: invalid request: {details}", file=sys.stderr)
        return 2
    if code == grpc.StatusCode.UNAVAILABLE:
        msg = (f"cannot reach loadsvc at {where} ({details}); is `loadsvc serve` or `loadsvc demo` "
               "running? (--grpc HOST:PORT picks another address)")
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        msg = f"no answer from {where} within {GET_TIMEOUT:g} s ({details})"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        msg = (f"{where} rejected the request: {details}; pass --api-key KEY "
               "(or set $LOADSVC_API_KEY)")
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        msg = f"{where} does not serve loadsvc.v1.LoadService ({details}); is it a loadsvc server?"
    else:
        name = code.name if code is not None else "error"
        msg = f"{where}: {name}: {details}"
    print(f"loadsvc {command}: {msg}", file=sys.stderr)
    return 1


def _stdout_gone() -> int:
    """stdout was closed early (`loadsvc get | head`): not an error; keep Python quiet at exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


class _Console(Console):
    def on_broken_pipe(self) -> None:
        raise BrokenPipeError  # handled by the command (exit 0), not rich's SystemExit(1)


def _console() -> Console:
    console = _Console()
    if not console.is_terminal:
        console = _Console(width=max(console.width, WIDE))
    return console


def _request_args(settings: ClientSettings) -> dict[str, Any]:
    args: dict[str, Any] = {"include": list(settings.include)}
    if settings.dp_rank is not None:
        args["dp_rank"] = settings.dp_rank
    return args


# -- commands ----------------------------------------------------------------------


def run_get(settings: ClientSettings) -> int:
    """`loadsvc get`: print the per-rank table (or JSON) once; 0, or 1/2 with a line on stderr."""
    from google.protobuf import json_format

    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    try:
        channel = _channel(settings)
        request = pb.GetLoadsRequest(**_request_args(settings))
    except (_Usage, ValueError) as e:
        print(f"loadsvc get: {e}", file=sys.stderr)
        return 2
    try:
        with channel:
            response = _stub(channel).GetLoads(request, timeout=GET_TIMEOUT, metadata=_metadata(settings))
    except grpc.RpcError as e:
        return _rpc_error("get", settings, e)
    except KeyboardInterrupt:
        return 130
    try:
        if settings.json:
            print(json_format.MessageToJson(response, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True, indent=2))
        else:
            _console().print(loads_table(response, settings.grpc, all_ranks=settings.dp_rank is None))
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_gone()
    return 0


def run_watch(settings: ClientSettings) -> int:
    """`loadsvc watch`: a live table from WatchLoads until Ctrl-C (0) or settings.count messages."""
    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    try:
        for flag, value in (("--min-interval-ms", settings.min_interval_ms),
                            ("--max-interval-ms", settings.max_interval_ms)):
            if not 0 <= value < 2**32:
                raise _Usage(f"{flag} must be 0..{2**32 - 1} milliseconds, got {value}")
        channel = _channel(settings)
        request = pb.WatchLoadsRequest(min_interval_ms=settings.min_interval_ms,
                                       max_interval_ms=settings.max_interval_ms,
                                       **_request_args(settings))
    except (_Usage, ValueError) as e:
        print(f"loadsvc watch: {e}", file=sys.stderr)
        return 2
    console = _console()
    all_ranks = settings.dp_rank is None
    call = _stub(channel).WatchLoads(request, metadata=_metadata(settings))
    received = 0

    def table(response: Any) -> Table:
        note = f"message {received}" + (f" of {settings.count}" if settings.count else "")
        if console.is_terminal:
            note += " · Ctrl-C quits"
        return loads_table(response, settings.grpc, note=note, all_ranks=all_ranks)

    try:
        if console.is_terminal:
            # Messages can come at hundreds per second (every publish of every rank); the
            # terminal is redrawn at most REDRAW_HZ times a second with the latest one.
            latest: list[Any] = []

            def render() -> Any:
                return table(latest[-1]) if latest else Text(f"waiting for {settings.grpc} ...")

            with Live(console=console, get_renderable=render, auto_refresh=True,
                      refresh_per_second=REDRAW_HZ, transient=False) as live:
                for response in call:
                    received += 1
                    latest[:] = [response]
                    if received == 1:
                        live.refresh()
                    if settings.count is not None and received >= settings.count:
                        live.refresh()
                        return 0
        else:  # a pipe or a log: one table per message
            for response in call:
                received += 1
                console.print(table(response))
                if settings.count is not None and received >= settings.count:
                    return 0
        print(f"loadsvc watch: {settings.grpc} ended the stream after {received} messages",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return _stdout_gone()
    except grpc.RpcError as e:
        return _rpc_error("watch", settings, e)
    finally:
        call.cancel()
        channel.close()
