"""The read side shared by every surface: one region, freshness, aggregate, encode once per change.

    region --ShmReader.read_all()--> LoadStore.poll() --> View (immutable)
                                         |                  |-- snapshots with status and age_ms
                                         |                  |-- encoded(key, build): bytes memoized
                                         v                      per (view, filter, format)
                                  change_version  --> wakes WatchLoads subscribers

A View is rebuilt when a rank publishes (new sequence), when a rank's status
changes, and every TICK seconds so ages stay current. It is immutable: every
request served from one View sees the same numbers, and each distinct response
(per filter and format) is encoded once per View and its bytes shared.

``change_version`` moves only on a new sequence or a new status, which is what
WatchLoads subscribers wait for; the TICK rebuild refreshes ages for REST,
GetLoads and heartbeats without waking subscribers.

The store attaches to the region lazily: with ``dp_size`` it creates the region
if missing; without, it reports no ranks until a publisher creates it. It
detaches when the file is removed, replaced or truncated under it (a read of a
truncated file is a RegionError, never a SIGBUS: see loadsvc/core/region.py), and
re-attaches once a valid region is there again (``attached`` is False in
between, which health reports as NOT_SERVING). Detaches are counted per reason
(``detaches``); region events are logged at most once per kind per LOG_EVERY
(loadsvc/core/rejects.py) seconds, however fast a local process truncates and restores the file.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import msgspec

from loadsvc._exceptions import BadRequest
from loadsvc.core.region import RegionError, ShmReader, create_region, freshness
from loadsvc.core.rejects import LogLimiter
from loadsvc.core.schema import SECTIONS, AggregateMetrics, LoadSnapshot, Status
from loadsvc.settings import StoreSettings

__all__ = ["LoadStore", "View", "Selection", "parse_include", "BadRequest", "INCLUDE_TOKENS",
           "MAX_INCLUDE_VALUES", "MAX_INCLUDE_TOKENS", "MAX_INCLUDE_CHARS", "int32_total", "finite_mean"]

log = logging.getLogger("loadsvc.core.store")
_T = TypeVar("_T")

TICK = 0.1  # seconds between rebuilds for ages and status transitions
ATTACH_RETRY = 0.5  # seconds between attempts to attach / checks that the file is still there
# A region truncated again within STABLE_AFTER seconds of being attached doubles the wait
# before the next attach, up to MAX_ATTACH_RETRY: a file truncated and restored in a loop
# turns health over a few times, not twice a second.
STABLE_AFTER = 10.0
MAX_ATTACH_RETRY = 8.0
DETACH_REASONS = ("truncated", "removed")  # shrank under the reader; removed or replaced
INCLUDE_TOKENS = ("core", "all", *SECTIONS)
# A request's include list is parsed on every call and never kept: these bound what
# one request may cost (64 tokens at most). The real tokens are at most 6 characters,
# and 7 of them say everything a request can ask for. REST's OpenAPI states the same.
MAX_INCLUDE_VALUES = 8  # include values per request (repeated field entries, query parameters)
MAX_INCLUDE_TOKENS = 8  # comma-separated tokens per value, empty ones counted
MAX_INCLUDE_CHARS = 128  # characters per value
INT32_MAX = 2**31 - 1


def parse_include(tokens: Iterable[str]) -> frozenset[str]:
    """Include tokens -> the set of section field names selected.

    Tokens may also be comma-separated inside one string ("core,memory").
    No tokens, or "all", selects every section; "core" alone selects none.
    More than MAX_INCLUDE_VALUES values, a value longer than MAX_INCLUDE_CHARS,
    or one of more than MAX_INCLUDE_TOKENS tokens is a BadRequest: the work
    stops there, whatever the size of the rest.
    """
    selected: set[str] = set()
    everything = False
    seen_any = False
    for count, raw in enumerate(tokens, 1):
        if count > MAX_INCLUDE_VALUES:
            raise BadRequest("include", f"more than {MAX_INCLUDE_VALUES} values; name each section "
                                        "once (e.g. core,memory)", "too_many_values")
        if len(raw) > MAX_INCLUDE_CHARS:
            raise BadRequest("include", f"a value of {len(raw)} characters ({raw[:16]!r}...), longer "
                                        f"than {MAX_INCLUDE_CHARS}", "value_too_long")
        pieces = raw.split(",")
        if len(pieces) > MAX_INCLUDE_TOKENS:
            raise BadRequest("include", f"{len(pieces)} comma-separated tokens in one value "
                                        f"({raw[:16]!r}...), more than {MAX_INCLUDE_TOKENS}",
                             "too_many_tokens")
        for token in pieces:
            token = token.strip().lower()
            if not token:
                continue
            seen_any = True
            if token == "all":
                everything = True
            elif token == "core":
                pass
            elif token in SECTIONS:
                selected.add(SECTIONS[token])
            else:
                raise BadRequest("include", f"unknown token {token!r}; expected one of "
                                            f"{', '.join(INCLUDE_TOKENS)}")
    if everything or not seen_any:
        return frozenset(SECTIONS.values())
    return frozenset(selected)


@dataclass(frozen=True)
class Selection:
    """Which ranks and sections a request wants (hashable: a cache key)."""

    dp_rank: int | None = None
    sections: frozenset[str] = frozenset(SECTIONS.values())

    @classmethod
    def parse(cls, dp_rank: int | None, include: Iterable[str], dp_size: int | None) -> Selection:
        if dp_rank is not None:
            if dp_rank < 0:
                raise BadRequest("dp_rank", f"must be >= 0, got {dp_rank}")
            if dp_size is not None and dp_rank >= dp_size:
                raise BadRequest("dp_rank", f"{dp_rank} out of range; this deployment has ranks "
                                            f"0..{dp_size - 1}")
        return cls(dp_rank, parse_include(include))


_ISO = "%Y-%m-%dT%H:%M:%S.%f+00:00"


@dataclass
class View:
    """One immutable picture of every published rank, with encodings memoized per key."""

    version: int  # moves on every rebuild
    change_version: int  # moves only on a new sequence or status
    dp_size: int  # 0 while no region is attached
    snapshots: tuple[LoadSnapshot, ...]  # copies with status and age_ms filled, by rank
    built_ns: int
    timestamp: str
    _memo: dict[Hashable, Any] = field(default_factory=dict, repr=False)
    # rank -> ((seq, publish_time_ns), LoadSnapshot proto), shared by the views of one store:
    # a rank is converted to protobuf once per publish, not once per view (ages change every tick)
    proto_cache: dict[int, tuple[tuple[int, int], Any]] = field(default_factory=dict, repr=False)

    def select(self, sel: Selection) -> tuple[LoadSnapshot, ...]:
        if sel.dp_rank is None:
            return self.snapshots
        return tuple(s for s in self.snapshots if s.dp_rank == sel.dp_rank)

    def signature(self, sel: Selection) -> tuple[tuple[int, int, Status], ...]:
        """(rank, seq, status) of the selected ranks: what a watcher compares."""
        key = ("sig", sel.dp_rank)
        sig: tuple[tuple[int, int, Status], ...] | None = self._memo.get(key)
        if sig is None:
            sig = tuple((s.dp_rank, s.seq, s.status) for s in self.select(sel))
            self._memo[key] = sig
        return sig

    def aggregate(self, sel: Selection) -> AggregateMetrics:
        """Totals and averages over the selected ranks that are not unreachable."""
        key = ("agg", sel.dp_rank)
        agg: AggregateMetrics | None = self._memo.get(key)
        if agg is None:
            live = [s for s in self.select(sel) if s.status is not Status.UNREACHABLE]
            agg = AggregateMetrics(
                total_running_reqs=int32_total([s.num_running_reqs for s in live]),
                total_waiting_reqs=int32_total([s.num_waiting_reqs for s in live]),
                total_reqs=int32_total([s.num_total_reqs for s in live]),
                avg_token_usage=finite_mean([s.token_usage for s in live]),
                avg_throughput=finite_mean([s.gen_throughput for s in live]),
                avg_utilization=finite_mean([s.utilization for s in live]),
            )
            self._memo[key] = agg
        return agg

    def encoded(self, key: Hashable, build: Callable[[View], _T]) -> _T:
        """build(self), computed once per View and key; the same object for every caller."""
        try:
            return cast(_T, self._memo[key])  # a key is built by one build function
        except KeyError:
            value = self._memo[key] = build(self)
            return value


def int32_total(values: list[int]) -> int:
    """A sum reported in an int32 field: saturates at 2**31 - 1 (each rank's count is int32 already)."""
    return min(sum(values), INT32_MAX)


def finite_mean(values: list[float]) -> float:
    """The mean of finite numbers, finite itself (0.0 for none), even where their sum is not."""
    n = len(values) or 1
    total = sum(values)
    if total == math.inf:  # two numbers near the largest double: divide before adding
        return sum(v / n for v in values)
    return total / n


class LoadStore:
    """One region's read side. Create it, then ``await start()`` in the serving loop.

    ``view()`` is synchronous and cheap; it also refreshes on demand, so a store
    whose poll task is not running (an engine's own app) still serves fresh data.
    ``wait_change(after, timeout)`` is what streaming subscribers await.
    """

    def __init__(self, settings: StoreSettings, *, clock: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings
        self._clock = clock
        self._reader: ShmReader | None = None
        self._last_list: list[LoadSnapshot] | None = None
        self._statuses: tuple[tuple[int, Status], ...] = ()
        self._version = 0
        self._change_version = 0
        self._proto_cache: dict[int, tuple[tuple[int, int], Any]] = {}
        self._view = self._build([], 0, self._clock())
        self._next_tick = 0
        self._next_attach = 0.0
        self._attach_error: str | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._attach_listeners: list[Callable[[bool], None]] = []
        self.detaches: dict[str, int] = dict.fromkeys(DETACH_REASONS, 0)
        self._attach_retry = ATTACH_RETRY  # seconds between attach attempts while detached
        self._attached_ns = 0
        self._log_limited = LogLimiter(log)  # region events: one line per kind per LOG_EVERY
        self._try_attach()

    # -- region ------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._reader is not None

    @property
    def dp_size(self) -> int | None:
        return self._reader.dp_size if self._reader is not None else None

    @property
    def attach_error(self) -> str | None:
        """Why the region is not attached (None when attached)."""
        return self._attach_error

    def on_attach_change(self, callback: Callable[[bool], None]) -> None:
        """Call callback(attached) whenever the store attaches or loses the region."""
        self._attach_listeners.append(callback)

    def _set_reader(self, reader: ShmReader | None) -> None:
        was = self._reader is not None
        if self._reader is not None and reader is not self._reader:
            self._reader.close()
        self._reader = reader
        self._last_list = None
        if was != (reader is not None):
            for cb in self._attach_listeners:
                cb(reader is not None)

    def _try_attach(self) -> None:
        s = self.settings
        try:
            if s.dp_size is not None:
                create_region(s.shm, s.dp_size, mode=s.region_mode)
            reader = ShmReader(s.shm, stale_after=s.stale_after, unreachable_after=s.unreachable_after)
        except (RegionError, OSError) as e:
            if str(e) != self._attach_error:
                self._log_limited("not_attached", logging.WARNING, "region not attached: %s", e)
            self._attach_error = str(e)
            return
        self._log_limited("attached", logging.INFO, "attached region %s (%d ranks)", s.shm, reader.dp_size)
        self._attach_error = None
        self._attached_ns = self._clock()
        self._set_reader(reader)

    def _detach(self, reason: str, error: str) -> None:
        """Drop the reader (health NOT_SERVING until a re-attach), counted per reason."""
        self.detaches[reason] += 1
        self._log_limited("detached", logging.ERROR, "region %s %s under the server; detaching until "
                          "it is valid again", self.settings.shm,
                          "truncated" if reason == "truncated" else "removed or replaced")
        now = self._clock()
        if reason == "truncated" and now - self._attached_ns < STABLE_AFTER * 1e9:
            self._attach_retry = min(2 * self._attach_retry, MAX_ATTACH_RETRY)
        else:
            self._attach_retry = ATTACH_RETRY
        self._next_attach = now + int(self._attach_retry * 1e9)
        self._set_reader(None)
        self._attach_error = error

    def _check_region(self) -> None:
        """Periodic (not per read): re-attach when the file is gone, replaced or truncated."""
        if self._reader is None:
            self._try_attach()
            return
        if self._reader.region_replaced():
            if self._reader.mapping_intact():
                self._detach("removed", f"{self.settings.shm}: region file removed or replaced")
                self._try_attach()  # a new file may be there already
            else:
                self._detach("truncated", f"{self.settings.shm}: region file truncated")

    # -- views -------------------------------------------------------------

    def _build(self, snaps: list[LoadSnapshot], dp_size: int, now_ns: int) -> View:
        s = self.settings
        out = []
        statuses = []
        for snap in snaps:
            status, age_ms = freshness(snap.publish_time_ns, now_ns, s.stale_after, s.unreachable_after)
            out.append(msgspec.structs.replace(snap, status=status, age_ms=round(age_ms, 3)))
            statuses.append((snap.dp_rank, status))
        statuses_t = tuple(statuses)
        if statuses_t != self._statuses:
            self._change_version += 1
            self._statuses = statuses_t
        self._version += 1
        ts = datetime.fromtimestamp(now_ns / 1e9, UTC).strftime(_ISO)
        return View(self._version, self._change_version, dp_size, tuple(out), now_ns, ts,
                    proto_cache=self._proto_cache)

    def poll(self) -> bool:
        """Look at the region now; rebuild the view if anything changed. True on a change."""
        now = self._clock()
        if now >= self._next_attach:
            self._next_attach = now + int((ATTACH_RETRY if self._reader is not None else
                                           self._attach_retry) * 1e9)
            self._check_region()
        reader = self._reader
        if reader is None:
            if self._view.dp_size or self._view.snapshots:
                self._change_version += 1
                self._view = self._build([], 0, now)
                self._statuses = ()
                self._notify()
                return True
            return False
        try:
            snaps = reader.read_all()
        except (RegionError, OSError) as e:  # the file shrank under the reader (no SIGBUS: shm.py)
            self._detach("truncated", str(e))
            return self.poll()
        if snaps is self._last_list and now < self._next_tick:
            return False
        before = self._change_version
        if snaps is not self._last_list:
            self._change_version += 1  # a new sequence on some rank
            self._last_list = snaps
        self._next_tick = now + int(TICK * 1e9)
        self._view = self._build(snaps, reader.dp_size, now)
        if self._change_version != before:
            self._notify()
            return True
        return False

    def view(self) -> View:
        """The current view, refreshed on demand."""
        if self._task is None:
            self.poll()
        return self._view

    @property
    def change_version(self) -> int:
        return self._change_version

    @property
    def running(self) -> bool:
        """True between start() and stop(): the poll task keeps the view current."""
        return self._task is not None

    # -- async side ----------------------------------------------------------

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_change(self, after: int, timeout: float | None) -> bool:
        """Wait until change_version > after (True) or timeout seconds pass (False)."""
        while self._change_version <= after:
            if self._changed is None:
                self._changed = asyncio.Event()
            event = self._changed
            try:
                if timeout is None:
                    await event.wait()
                else:
                    await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                return self._change_version > after
            if self._closed:  # stop() woke us; nothing changes any more (and the event stays set)
                return self._change_version > after
        return True

    async def start(self) -> None:
        """Run the poll loop in the current event loop (idempotent)."""
        if self._task is None:
            self._changed = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loadsvc-store")

    async def _run(self) -> None:
        interval = self.settings.poll_interval
        while not self._closed:
            try:
                self.poll()
            except Exception:  # never let one bad poll kill serving; counted in the log
                log.exception("store poll failed; retrying")
                await asyncio.sleep(ATTACH_RETRY)
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._changed is not None:
            self._changed.set()

    def close(self) -> None:
        self._closed = True
        self._set_reader(None)

    # -- counters for /metrics -------------------------------------------------

    def reader_counters(self) -> dict[str, int]:
        r = self._reader
        if r is None:
            return {"torn_retries": 0, "unavailable": 0, "corrupt": 0}
        return {"torn_retries": r.torn_retries, "unavailable": r.unavailable, "corrupt": r.corrupt}

    def detach_counters(self) -> dict[str, int]:
        """Times the store detached from its region, per reason (DETACH_REASONS)."""
        return dict(self.detaches)
