"""`loadsvc get` and `loadsvc watch`: the per-rank table, read over gRPC.

    ClientSettings --channel (TLS CA, bearer key)--> loadsvc.v1.LoadService
        get:   GetLoads   -> one rich table (or the response as JSON with --json)
        watch: WatchLoads -> a rich.live.Live table redrawn on every message,
               reconnecting (with backoff) when the server restarts or goes away

Stale ranks are drawn yellow, unreachable ones red. The table fits the terminal
(short headers, then fewer columns; see _COLUMNS); a pipe gets every column in
plain text. Failures (server down, INVALID_ARGUMENT, UNAUTHENTICATED, a --grpc
without a port or aimed at an HTTP/1 port, ...) are one line on stderr and exit
code 1 (2 for a request or flag that cannot be right); never a traceback.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Generator
from datetime import datetime
from typing import Any

import grpc
from rich.cells import cell_len
from rich.console import Console, JustifyMethod
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loadsvc.settings import ClientSettings

__all__ = ["run_get", "run_watch", "loads_table"]

GET_TIMEOUT = 5.0  # seconds for GetLoads, connection included
WIDE = 200  # columns for a pipe without $COLUMNS (logs, grep): every column, never wrapped
REDRAW_HZ = 10  # watch: terminal redraws per second at most
RECONNECT_FIRST = 0.1  # watch: seconds before the first reconnect attempt, doubled per attempt
RECONNECT_MAX = 5.0  # watch: ... up to this many seconds between attempts
# watch: a stream silent for HEARTBEAT_MISSES heartbeats (--max-interval-ms; the server's default
# of 1 s when 0), and at least SILENCE_MIN seconds, is taken for a lost connection and reconnected.
# A silent partition (the server's host gone, no FIN) sends no error; only the missing
# heartbeats tell, and the table would otherwise show the last numbers as if current.
HEARTBEAT_MISSES = 3
SILENCE_MIN = 3.0
SERVER_DEFAULT_HEARTBEAT_MS = 1000
# watch: a stream that ends with one of these (server restarting or gone, stream limit) after
# it delivered is reconnected; others (UNAUTHENTICATED, INVALID_ARGUMENT, ...) end the command
_RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                              grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED})
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

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


# The table's columns: (name, short name, justify). On a console narrower than the table,
# the short names and compact cells come first, then whole columns go, in _DROP_ORDER, until
# it fits: a number is shown whole or not at all (never squeezed to an ellipsis).
_COLUMNS: tuple[tuple[str, str, JustifyMethod], ...] = (
    ("rank", "rank", "right"), ("status", "status", "left"), ("age", "age", "right"),
    ("running", "run", "right"), ("waiting", "wait", "right"), ("tokens used/max", "tokens", "right"),
    ("usage", "usage", "right"), ("throughput", "tok/s", "right"), ("cache hit", "hit", "right"),
    ("util", "util", "right"), ("sections", "sections", "left"))
_DROP_ORDER = ("sections", "tokens used/max", "age", "cache hit", "throughput")


def _cells(load: Any, compact: bool) -> dict[str, str | Text]:
    status = _status_name(load.status)
    tokens = (f"{_si(load.num_used_tokens)}/{_si(load.max_total_num_tokens)}" if compact
              else f"{load.num_used_tokens:,}/{load.max_total_num_tokens:,}")
    return {"rank": str(load.dp_rank), "status": Text(status, style=_STATUS_STYLE.get(status, "")),
            "age": _age(load.age_ms), "running": f"{load.num_running_reqs}/{load.max_running_requests}",
            "waiting": str(load.num_waiting_reqs), "tokens used/max": tokens,
            "usage": _pct(load.token_usage),
            "throughput": f"{load.gen_throughput:,.0f}" + ("" if compact else " tok/s"),
            "cache hit": _pct(load.cache_hit_rate), "util": _pct(load.utilization),
            "sections": _sections(load)}


def _si(n: int) -> str:
    """47031 -> '47k', 1_250_000 -> '1.2M': token counts in a narrow table."""
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            value = n / size
            return f"{value:.1f}{suffix}" if value < 10 and n % size else f"{value:.0f}{suffix}"
    return str(n)


def _table_width(columns: list[str], headers: dict[str, str], rows: list[dict[str, str | Text]]) -> int:
    """Columns a rich Table of these cells takes (the default box, padding 1, edges)."""
    widths = [max([cell_len(headers[c])] + [cell_len(str(row[c])) for row in rows]) for c in columns]
    return sum(widths) + 3 * len(columns) + 1


def loads_table(response: Any, source: str, *, note: str = "", all_ranks: bool = True,
                width: int | None = None) -> Table:
    """A rich Table of a GetLoadsResponse: one row per rank, the aggregate in the caption.

    all_ranks: also list the ranks of dp_rank_count that have not published.
    width: the console's columns; the table takes short headers and drops columns (sections
    first) to fit, and says which it left out. None: every column.
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
    by_rank: dict[int, Any] = {load.dp_rank: load for load in loads}
    ranks = sorted(by_rank)
    if all_ranks:
        ranks = sorted(set(ranks) | set(range(response.dp_rank_count)))
    names = [name for name, _, _ in _COLUMNS]
    if not any(_sections(load) for load in loads):
        names.remove("sections")  # nothing to list (e.g. --include core)

    def rows(compact: bool) -> list[dict[str, str | Text]]:
        out = []
        for rank in ranks:
            if rank in by_rank:
                out.append(_cells(by_rank[rank], compact))
            else:
                out.append({**{name: "-" for name in names}, "rank": str(rank), "sections": "",
                            "status": Text("not published", style="red")})
        return out

    headers = {name: name for name, _, _ in _COLUMNS}
    cells = rows(compact=False)
    hidden: list[str] = []
    if width is not None and _table_width(names, headers, cells) > width:
        headers = {name: short for name, short, _ in _COLUMNS}
        cells = rows(compact=True)
        for name in _DROP_ORDER:
            if _table_width(names, headers, cells) <= width:
                break
            if name in names:
                names.remove(name)
                hidden.append(name)
    table = Table(title=title, title_justify="left", caption_justify="left", header_style="bold")
    justify = {name: how for name, _, how in _COLUMNS}
    for name in names:
        # fold, not ellipsis: on a console too narrow even for the fewest columns a number
        # wraps onto a second line rather than losing digits
        table.add_column(headers[name], justify=justify[name], overflow="fold")
    for rank, row in zip(ranks, cells):
        load = by_rank.get(rank)
        style = _ROW_STYLE.get(_status_name(load.status)) if load is not None else "red"
        table.add_row(*[row[name] for name in names], style=style)
    a = response.aggregate
    if response.dp_rank_count == 0:
        table.caption = "no region attached yet: no ranks to show"
    else:
        table.caption = (f"aggregate: {a.total_running_reqs} running, {a.total_waiting_reqs} waiting, "
                         f"{a.total_reqs} total · avg token usage {_pct(a.avg_token_usage)} · "
                         f"avg throughput {a.avg_throughput:,.0f} tok/s · "
                         f"avg utilization {_pct(a.avg_utilization)}")
    if hidden:
        table.caption += f"\nnot shown at {width} columns: {', '.join(hidden)} (a wider terminal shows them)"
    return table


# -- plumbing --------------------------------------------------------------------


def _check_target(target: str) -> None:
    """_Usage unless target is HOST:PORT (or a gRPC URI such as unix:/path): without a port,
    gRPC would quietly dial 443."""
    if target.startswith(_TARGET_SCHEMES):
        return
    example = "e.g. 127.0.0.1:50051"
    host, sep, port = target.rpartition(":")
    if not sep:
        raise _Usage(f"--grpc {target} has no port (gRPC would dial 443): give --grpc HOST:PORT, {example}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise _Usage(f"--grpc {target}: an IPv6 address goes in brackets, e.g. [::1]:50051")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _Usage(f"--grpc {target}: the port must be a number 1..65535: give --grpc HOST:PORT, {example}")


def _channel(settings: ClientSettings) -> grpc.Channel:
    _check_target(settings.grpc)
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

    # (grpcio-tools writes the stub classes without annotations)
    return loads_pb2_grpc.LoadServiceStub(channel)  # type: ignore[no-untyped-call]


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _speaks_http1(details: str) -> bool:
    """gRPC's words for a peer that answered an HTTP/1 response (a REST port, say)."""
    return "http1.x server" in details or "Failed parsing HTTP/2" in details


def _rpc_error(command: str, settings: ClientSettings, err: grpc.RpcError) -> int:
    """Print one line for a failed call; return the exit code."""
    code = err.code() if hasattr(err, "code") else None
    details = _one_line(err.details() if hasattr(err, "details") else str(err))
    where = settings.grpc
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        print(f"loadsvc {command}: invalid request: {details}", file=sys.stderr)
        return 2
    if _speaks_http1(details):
        msg = (f"{where} answers HTTP/1, not gRPC: is it the REST port (--http-port)? point --grpc at "
               "the gRPC port (--grpc-port of serve and demo), e.g. --grpc 127.0.0.1:50051")
    elif code == grpc.StatusCode.UNAVAILABLE:
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
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


class _Console(Console):
    def on_broken_pipe(self) -> None:
        raise BrokenPipeError  # handled by the command (exit 0), not rich's SystemExit(1)


def _console() -> tuple[Console, bool]:
    """(console, fit): fit means tables are cut to console.width (a terminal, or $COLUMNS set);
    a pipe without $COLUMNS gets every column, up to WIDE columns wide, in plain text."""
    console = _Console()
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console, True
    return _Console(width=WIDE), False


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
            console, fit = _console()
            console.print(loads_table(response, settings.grpc, all_ranks=settings.dp_rank is None,
                                      width=console.width if fit else None))
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_gone()
    return 0


class _Watch:
    """WatchLoads across reconnects: stream() yields the responses; status says what it is doing.

    A stream that ends (or fails with one of _RECONNECT_CODES) after it delivered is opened
    again on a new channel, RECONNECT_FIRST seconds later, doubling up to RECONNECT_MAX; so is
    one that stays silent for `silence` seconds (missed heartbeats: a lost connection). A
    failure before the first message (wrong address, no server) raises grpc.RpcError.
    """

    def __init__(self, settings: ClientSettings, request: Any,
                 on_status: Callable[[str], None]) -> None:
        self.settings, self.request, self.on_status = settings, request, on_status
        self.received = 0
        self.status = ""  # "" while streaming; else the reconnect line
        heartbeat = (request.max_interval_ms or SERVER_DEFAULT_HEARTBEAT_MS) / 1000
        self.silence = max(HEARTBEAT_MISSES * heartbeat, SILENCE_MIN)

    def stream(self) -> Generator[Any, None, None]:
        delay, attempt = RECONNECT_FIRST, 0
        while True:
            channel = _channel(self.settings)
            call = _stub(channel).WatchLoads(self.request, metadata=_metadata(self.settings))
            watchdog = _Watchdog(call, self.silence)
            responses = iter(call)
            try:
                while True:
                    watchdog.waiting()
                    try:
                        response = next(responses)
                    except StopIteration:
                        break
                    watchdog.fed()
                    if attempt:
                        delay, attempt = RECONNECT_FIRST, 0
                        self.status = ""
                        self.on_status(f"reconnected to {self.settings.grpc}")
                    self.received += 1
                    yield response
                why = "the server ended the stream"
                if not self.received:
                    raise _StreamEnded
            except grpc.RpcError as e:
                if watchdog.fired and not self.received:
                    raise _Silent(self.silence) from None
                if watchdog.fired:
                    why = f"no message for {self.silence:g} s (heartbeats missed)"
                elif not self.received or e.code() not in _RECONNECT_CODES:
                    raise
                else:
                    why = _one_line(e.details()) or e.code().name
            finally:
                watchdog.stop()
                call.cancel()
                channel.close()
            attempt += 1
            self.status = f"reconnecting (attempt {attempt}, next in {delay:g} s): {why}"
            self.on_status(f"{why}; reconnecting to {self.settings.grpc} in {delay:g} s (attempt {attempt})")
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)


class _Watchdog:
    """Cancels call when a wait for its next message (waiting() .. fed()) lasts silence seconds.

    Only the waits count: a reader that stops reading for a while (stdout paused in a pager)
    is not taken for a silent server. A thread, polling.
    """

    def __init__(self, call: Any, silence: float) -> None:
        self.fired = False
        self._call, self._silence = call, silence
        self._waiting_since: float | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, name="loadsvc-watch-watchdog", daemon=True).start()

    def waiting(self) -> None:
        self._waiting_since = time.monotonic()

    def fed(self) -> None:
        self._waiting_since = None

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(min(0.25, self._silence / 4)):
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self._silence:
                self.fired = True
                self._call.cancel()
                return


class _StreamEnded(Exception):
    """The server ended the stream before its first message."""


class _Silent(Exception):
    """No first message within the silence limit (seconds: args[0])."""


def run_watch(settings: ClientSettings) -> int:
    """`loadsvc watch`: a live table from WatchLoads until Ctrl-C (0) or settings.count messages.

    It reconnects when the server restarts or goes away (see _Watch), saying so on the table's
    title line (a terminal) or on stderr (a pipe)."""
    from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb

    try:
        for flag, value in (("--min-interval-ms", settings.min_interval_ms),
                            ("--max-interval-ms", settings.max_interval_ms)):
            if not 0 <= value < 2**32:
                raise _Usage(f"{flag} must be 0..{2**32 - 1} milliseconds, got {value}")
        _channel(settings).close()  # the address and the TLS files, checked before anything else
        request = pb.WatchLoadsRequest(min_interval_ms=settings.min_interval_ms,
                                       max_interval_ms=settings.max_interval_ms,
                                       **_request_args(settings))
    except (_Usage, ValueError) as e:
        print(f"loadsvc watch: {e}", file=sys.stderr)
        return 2
    console, fit = _console()
    all_ranks = settings.dp_rank is None
    live: list[Live] = []

    def on_status(line: str) -> None:
        if live:
            live[0].refresh()  # the title line carries watch.status
        else:
            print(f"loadsvc watch: {line}", file=sys.stderr, flush=True)

    watch = _Watch(settings, request, on_status)

    def table(response: Any) -> Table:
        note = f"message {watch.received}" + (f" of {settings.count}" if settings.count else "")
        if watch.status:
            note += f" · {watch.status}"
        elif console.is_terminal:
            note += " · Ctrl-C quits"
        return loads_table(response, settings.grpc, note=note, all_ranks=all_ranks,
                           width=console.width if fit else None)

    messages = watch.stream()
    try:
        if console.is_terminal:
            # Messages can come at hundreds per second (every publish of every rank); the
            # terminal is redrawn at most REDRAW_HZ times a second with the latest one.
            latest: list[Any] = []

            def render() -> Any:
                return table(latest[-1]) if latest else Text(f"waiting for {settings.grpc} ...")

            with Live(console=console, get_renderable=render, auto_refresh=True,
                      refresh_per_second=REDRAW_HZ, transient=False) as live_view:
                live.append(live_view)
                for response in messages:
                    latest[:] = [response]
                    if watch.received == 1:
                        live_view.refresh()
                    if settings.count is not None and watch.received >= settings.count:
                        live_view.refresh()
                        return 0
        else:  # a pipe or a log: one table per message
            for response in messages:
                console.print(table(response))
                if settings.count is not None and watch.received >= settings.count:
                    return 0
        raise AssertionError("_Watch.stream() ends only by raising")
    except _StreamEnded:
        print(f"loadsvc watch: {settings.grpc} ended the stream before its first message",
              file=sys.stderr)
        return 1
    except _Silent as e:
        print(f"loadsvc watch: no message from {settings.grpc} within {e.args[0]:g} s "
              "(is it a loadsvc gRPC port, and reachable?)", file=sys.stderr)
        return 1
    except _Usage as e:  # a TLS file that went away between reconnects
        print(f"loadsvc watch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return _stdout_gone()
    except grpc.RpcError as e:
        return _rpc_error("watch", settings, e)
    finally:
        messages.close()  # ends the call and closes the channel
