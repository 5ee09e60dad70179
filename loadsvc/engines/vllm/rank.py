"""One vLLM engine (one DP rank) publishing its load: vLLM's stats in, snapshots out.

    vLLM AsyncLLM output loop --record(scheduler_stats, iteration_stats)--> EngineRank
        counts changed?  publish now            (ShmPublisher, one rank's slot)
        else             at most every publish_interval (a timer flushes the last state)
        idle?            re-published every heartbeat (a timer on vLLM's event loop)

vLLM calls ``record()`` once per batch of engine outputs, so an idle engine
calls nothing at all. The rule that keeps an idle rank fresh without passing a
dead or hung one off as idle:

- a rank whose last stats showed no running and no waiting request is idle, and
  is re-published every heartbeat (default 1 s) by a timer on vLLM's own event
  loop: while the API server's loop runs, the rank stays healthy;
- a rank with requests reports on every engine step, so it is never
  re-published by the timer: an engine that hangs with work in hand stops
  reporting and its rank turns stale after ``stale_after``, then unreachable;
- a killed vLLM takes the timer with it; a blocked API-server loop stops it.

Nothing here imports vLLM: the stats are read by attribute name, and a missing
or renamed attribute reads as "not reported" (0, or no section) after one
warning. Nothing raises into vLLM: a failure is counted, logged once per
kind, and the engine keeps serving.

Mapping (vLLM 0.32 names; docs/vllm.md has the same table):

| LoadSnapshot field      | from vLLM |
|-------------------------|-----------|
| num_running_reqs        | SchedulerStats.num_running_reqs |
| num_waiting_reqs        | num_waiting_reqs + num_skipped_waiting_reqs (as vllm:num_requests_waiting) |
| num_total_reqs          | running + waiting |
| token_usage             | kv_cache_usage (0..1) |
| max_total_num_tokens    | cache_config.num_gpu_blocks x block_size, per engine |
| num_used_tokens         | round(token_usage x max_total_num_tokens) |
| max_running_requests    | scheduler_config.max_num_seqs |
| utilization             | running / max_num_seqs |
| cache_hit_rate          | prefix_cache_stats hits / queries over the last 1000 requests |
| gen_throughput          | IterationStats.num_generation_tokens over the last second |
| queues                  | waiting = num_waiting_reqs, paused = num_skipped_waiting_reqs (deferred) |
| speculative             | spec_decoding_stats: accepted / draft tokens, 1 + accepted / drafts |
| lora                    | running_lora_adapters in use of lora_config.max_loras |
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadsvc.core.schema import (
    LoadSnapshot,
    LoRAMetrics,
    QueueMetrics,
    SpeculativeMetrics,
)

__all__ = ["EngineLimits", "EngineRank", "RankCounters"]

log = logging.getLogger("loadsvc.vllm")

_INT32_MAX = 2**31 - 1
_THROUGHPUT_WINDOW = 1.0  # seconds of decoded tokens behind gen_throughput
_CACHE_WINDOW = 1000      # requests behind cache_hit_rate (as vLLM's own prefix-cache hit rate)
_SPEC_WINDOW = 10_000     # drafts behind the speculative section
_WINDOW_ITEMS = 4096      # stats batches kept per window, at most

# The SchedulerStats attributes read; one warning names any that a vLLM lacks.
SCHEDULER_FIELDS = ("num_running_reqs", "num_waiting_reqs", "num_skipped_waiting_reqs",
                    "kv_cache_usage", "prefix_cache_stats")


@dataclass(frozen=True)
class EngineLimits:
    """What one engine can hold, from vLLM's config (0: not known)."""

    dp_size: int
    max_num_seqs: int = 0
    kv_tokens: int = 0   # KV cache capacity of this engine, in tokens
    max_loras: int = 0   # 0: LoRA off


@dataclass
class RankCounters:
    """What one rank's publisher did; exported on vLLM's /metrics (see stat_logger)."""

    publishes: int = 0
    heartbeats: int = 0
    errors: int = 0


class _Window:
    """Sums of tuples added over the last `limit` units of their first element.

    At most _WINDOW_ITEMS tuples are kept, whatever their first elements say.
    """

    __slots__ = ("limit", "items", "sums")

    def __init__(self, limit: float, width: int) -> None:
        self.limit = limit
        self.items: deque[tuple[float, ...]] = deque()
        self.sums = [0.0] * width

    def add(self, item: tuple[float, ...]) -> None:
        self.items.append(item)
        sums = self.sums
        for i, v in enumerate(item):
            sums[i] += v
        while len(self.items) > 1 and (sums[0] - self.items[0][0] >= self.limit
                                       or len(self.items) > _WINDOW_ITEMS):
            old = self.items.popleft()
            for i, v in enumerate(old):
                sums[i] -= v

    def clear(self) -> None:
        self.items.clear()
        self.sums = [0.0] * len(self.sums)


def _count(value: Any) -> int:
    """A request or token count as a non-negative int32 (0 for anything else)."""
    if isinstance(value, int) and value > 0:
        return value if value <= _INT32_MAX else _INT32_MAX
    return 0


def _fraction(value: Any) -> float:
    """A 0..1 ratio (0.0 for NaN or anything not a number)."""
    if isinstance(value, (int, float)) and value > 0:
        return 1.0 if value >= 1 else float(value)
    return 0.0


class EngineRank:
    """Turns one engine's vLLM stats into snapshots of one rank and publishes them.

    publish: called with each LoadSnapshot (``ShmPublisher.publish``); clock: a
    monotonic clock in seconds. ``record()`` is what vLLM calls; it never raises.
    """

    def __init__(self, rank: int, limits: EngineLimits, publish: Callable[[Any], object], *,
                 publish_interval: float = 0.020, heartbeat: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rank = rank
        self.limits = limits
        self.counters = RankCounters()
        self._publish_fn = publish
        self._interval = publish_interval
        self._heartbeat = heartbeat
        self._clock = clock
        # the last stats, as published fields
        self._running = 0
        self._waiting = 0
        self._waiting_capacity = 0
        self._deferred = 0
        self._kv = 0.0
        self._lora_used = 0
        self._tokens: deque[tuple[float, int]] = deque()
        self._tokens_sum = 0
        self._cache = _Window(_CACHE_WINDOW, 3)   # (requests, hits, queries)
        self._spec = _Window(_SPEC_WINDOW, 3)     # (drafts, accepted, draft tokens)
        # publishing state
        self._published_counts = (-1, -1)
        self._published_at = -math.inf
        self._dirty = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._beat_handle: asyncio.TimerHandle | None = None
        self._checked_fields = False
        self._failed: set[str] = set()
        self._closed = False

    # -- what vLLM calls ------------------------------------------------------------

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """Take one batch's stats; publish at once if running or waiting changed."""
        try:
            now = self._clock()
            if iteration_stats is not None:
                self._add_tokens(iteration_stats, now)
            if scheduler_stats is not None:
                self._read(scheduler_stats)
            if self._loop is None:
                self._start_timers()
            if ((self._running, self._waiting) != self._published_counts
                    or now - self._published_at >= self._interval):
                self._publish(now)
            else:
                self._dirty = True
                if self._flush_handle is None and self._loop is not None:
                    self._flush_handle = self._loop.call_later(
                        self._published_at + self._interval - now, self._flush)
        except Exception as e:  # never into vLLM's output loop
            self._fail("record", e)

    def start(self) -> None:
        """Publish the idle state and start the heartbeat (vLLM: once its engines are up)."""
        try:
            if self._loop is None:
                self._start_timers()
            self._publish(self._clock())
        except Exception as e:
            self._fail("start", e)

    def close(self) -> None:
        """Stop the timers (the region slot keeps the last publish)."""
        self._closed = True
        for handle in (self._flush_handle, self._beat_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._beat_handle = None

    # -- reading vLLM's stats ---------------------------------------------------------

    def _read(self, s: Any) -> None:
        if not self._checked_fields:
            self._checked_fields = True
            missing = [name for name in SCHEDULER_FIELDS if not hasattr(s, name)]
            if missing:
                log.warning("loadsvc: vLLM's SchedulerStats has no %s; reported as 0 (rank %d). "
                            "This vLLM is newer or older than the versions loadsvc knows.",
                            ", ".join(missing), self.rank)
        self._running = _count(getattr(s, "num_running_reqs", 0))
        self._waiting_capacity = _count(getattr(s, "num_waiting_reqs", 0))
        self._deferred = _count(getattr(s, "num_skipped_waiting_reqs", 0))
        self._waiting = min(_INT32_MAX, self._waiting_capacity + self._deferred)
        self._kv = _fraction(getattr(s, "kv_cache_usage", 0.0))
        prefix = getattr(s, "prefix_cache_stats", None)
        if prefix is not None:
            if getattr(prefix, "reset", False):
                self._cache.clear()
            queries = _count(getattr(prefix, "queries", 0))
            if queries:
                self._cache.add((_count(getattr(prefix, "requests", 0)),
                                 min(_count(getattr(prefix, "hits", 0)), queries), queries))
        spec = getattr(s, "spec_decoding_stats", None)
        if spec is not None:
            drafts = _count(getattr(spec, "num_drafts", 0))
            draft_tokens = _count(getattr(spec, "num_draft_tokens", 0))
            if drafts and draft_tokens:
                self._spec.add((drafts, min(_count(getattr(spec, "num_accepted_tokens", 0)),
                                            draft_tokens), draft_tokens))
        if self.limits.max_loras:
            running_loras = getattr(s, "running_lora_adapters", None)
            self._lora_used = len(running_loras) if isinstance(running_loras, dict) else 0

    def _add_tokens(self, it: Any, now: float) -> None:
        n = _count(getattr(it, "num_generation_tokens", 0))
        tokens = self._tokens
        if n:
            tokens.append((now, n))
            self._tokens_sum += n
        while tokens and now - tokens[0][0] > _THROUGHPUT_WINDOW:
            self._tokens_sum -= tokens.popleft()[1]

    # -- the snapshot -----------------------------------------------------------------

    def snapshot(self, now: float) -> Any:
        """The rank's LoadSnapshot from the last stats, as of now (monotonic seconds)."""
        self._add_tokens(None, now)  # drop tokens older than the window
        limits = self.limits
        running, waiting = self._running, self._waiting
        kv_tokens = min(limits.kv_tokens, _INT32_MAX)
        max_seqs = limits.max_num_seqs
        _, hits, queries = self._cache.sums
        spec = None
        drafts, accepted, draft_tokens = self._spec.sums
        if drafts:
            spec = SpeculativeMetrics(accept_length=1.0 + accepted / drafts,
                                      accept_rate=accepted / draft_tokens)
        lora = None
        if limits.max_loras:
            lora = LoRAMetrics(slots_used=self._lora_used, slots_total=limits.max_loras,
                               utilization=min(1.0, self._lora_used / limits.max_loras))
        return LoadSnapshot(
            dp_rank=self.rank,
            num_running_reqs=running,
            num_waiting_reqs=waiting,
            num_total_reqs=min(_INT32_MAX, running + waiting),
            num_used_tokens=round(self._kv * kv_tokens),
            max_total_num_tokens=kv_tokens,
            token_usage=self._kv,
            gen_throughput=self._tokens_sum / _THROUGHPUT_WINDOW,
            cache_hit_rate=hits / queries if queries else 0.0,
            utilization=min(1.0, running / max_seqs) if max_seqs else 0.0,
            max_running_requests=min(max_seqs, _INT32_MAX),
            queues=QueueMetrics(waiting=self._waiting_capacity, paused=self._deferred),
            speculative=spec,
            lora=lora,
        )

    # -- publishing -------------------------------------------------------------------

    def _publish(self, now: float) -> None:
        self._dirty = False
        snap = self.snapshot(now)
        try:
            self._publish_fn(snap)
        except Exception as e:
            self._fail("publish", e)
            return
        self._published_counts = (self._running, self._waiting)
        self._published_at = now
        self.counters.publishes += 1

    def _flush(self) -> None:
        self._flush_handle = None
        if self._dirty and not self._closed:
            try:
                self._publish(self._clock())
            except Exception as e:
                self._fail("record", e)

    def _start_timers(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # vLLM's offline LLM class: no loop, no timers (nobody routes to it)
            return
        self._beat_handle = self._loop.call_later(self._heartbeat, self._beat)

    def _beat(self) -> None:
        if self._closed or self._loop is None:
            return
        try:
            now = self._clock()
            idle = self._running == 0 and self._waiting == 0
            if self._dirty or (idle and now - self._published_at >= self._heartbeat * 0.9):
                self._publish(now)
                self.counters.heartbeats += 1
        except Exception as e:
            self._fail("heartbeat", e)
        finally:
            if not self._closed:
                self._beat_handle = self._loop.call_later(self._heartbeat, self._beat)

    def _fail(self, where: str, error: Exception) -> None:
        self.counters.errors += 1
        kind = f"{where}:{type(error).__name__}"
        if kind not in self._failed:
            self._failed.add(kind)
            log.error("loadsvc: rank %d could not %s its load (%s: %s); vLLM keeps serving, the "
                      "rank turns stale for routers until this is fixed. Logged once; counted in "
                      "loadsvc_vllm_errors_total.", self.rank, where, type(error).__name__, error)
