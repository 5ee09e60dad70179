"""The engine simulator: believable per-rank load, published at a steady rate.

    arrivals (Poisson, slowly drifting rate, bursts)
        |
        v
    waiting queue --admit (running cap, KV-token budget, prefill budget)--> running batch
        |                                                                        |
        |  num_waiting_reqs, num_waiting_uncached_tokens                         |  decode: every running
        |                                                                        |  request gains tokens;
        v                                                                        v  finished ones leave
    EngineSimulator.step(dt) -> LoadSnapshot --ShmPublisher / ZmqPublisher--> region / collector

One EngineSimulator models one data-parallel rank. Requests have a prompt and
an output length; a running request holds its prompt plus the tokens decoded
so far (``num_used_tokens``) and is admitted only when its prompt and whole
output fit in the rank's KV-token budget, so usage never exceeds
``max_total_num_tokens``. Every running request decodes at the same speed
(one batch), which falls as the batch grows; ``gen_throughput`` is the tokens
decoded per second. Requests share prompt prefixes at a per-rank rate, which
gives ``cache_hit_rate`` and makes part of a waiting prompt cheap to prefill.

Because the batch advances in lockstep, a request is tracked by the batch's
decode clock at which it finishes: one heap, and num_used_tokens in O(1).

``run_simulate(settings)`` (``loadsvc simulate``) runs one loop for every rank
of the process on a fixed schedule (tick k at start + k / rate, no drift; a
late tick is skipped, not bunched) until SIGTERM/SIGINT or ``--duration``.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

from loadsvc.core.schema import (
    DisaggregationMetrics,
    LoadSnapshot,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    SpeculativeMetrics,
)
from loadsvc.settings import SimulateSettings

__all__ = ["EngineProfile", "EngineSimulator", "run_simulate", "sections_for"]

log = logging.getLogger("loadsvc.tools.simulate")

SUMMARY_EVERY = 10.0  # seconds between progress lines in the log
MAX_STEP = 1.0  # seconds one step may simulate at most
WARMUP = 20.0  # simulated seconds run before the first publish, so ranks start busy
KV_BYTES_PER_TOKEN = 131072  # an 8B model in bf16: 2 x 32 layers x 8 KV heads x 128 dims x 2 bytes


def sections_for(dp_rank: int) -> frozenset[str]:
    """The optional sections a simulated rank publishes.

    memory and queues on every rank, speculative on odd ranks, lora on rank 0,
    disaggregation on ranks 2 and 3 of every four (prefill on 2, decode on 3).
    """
    names = {"memory", "queues"}
    if dp_rank % 2 == 1:
        names.add("speculative")
    if dp_rank == 0:
        names.add("lora")
    if dp_rank % 4 in (2, 3):
        names.add("disaggregation")
    return frozenset(names)


@dataclass(frozen=True)
class EngineProfile:
    """The fixed characteristics of one simulated rank."""

    max_running_requests: int = 128
    max_total_num_tokens: int = 160_000
    decode_speed: float = 80.0  # tokens/s of one request decoding alone
    batch_knee: float = 64.0  # batch size at which each request decodes at half speed
    prefill_speed: float = 40_000.0  # uncached prompt tokens prefilled per second
    prompt_median: float = 600.0
    output_median: float = 200.0
    prefix_share: float = 0.4  # mean fraction of a prompt found in the prefix cache
    load: float = 0.65  # mean arrival rate as a fraction of the rank's capacity
    max_waiting: int = 4000  # arrivals beyond this are rejected (the engine sheds load)

    @classmethod
    def for_rank(cls, dp_rank: int, rng: random.Random) -> EngineProfile:
        """A profile that varies a little from rank to rank (not every GPU is equally busy)."""
        return cls(
            max_running_requests=rng.choice((64, 128, 128, 256)),
            max_total_num_tokens=rng.choice((120_000, 160_000, 200_000)),
            decode_speed=rng.uniform(60.0, 100.0),
            prefix_share=rng.uniform(0.2, 0.7),
            load=rng.uniform(0.4, 0.65),
        )

    def capacity(self) -> float:
        """Requests per second the rank completes with a full batch.

        The batch is full at max_running_requests or when the KV budget is
        reserved (each request reserves its prompt and its whole output),
        whichever comes first.
        """
        mean_prompt = self.prompt_median * math.exp(_PROMPT_SIGMA ** 2 / 2)
        mean_output = self.output_median * math.exp(_OUTPUT_SIGMA ** 2 / 2)
        n = min(self.max_running_requests, self.max_total_num_tokens / (mean_prompt + mean_output))
        batch_tokens_per_s = n * self.decode_speed / (1.0 + n / self.batch_knee)
        return batch_tokens_per_s / mean_output


_PROMPT_SIGMA = 0.8
_OUTPUT_SIGMA = 0.6
_MAX_PROMPT = 16_000
_MAX_OUTPUT = 4_000


class _Request:
    __slots__ = ("prompt", "output", "cached", "adapter", "start_clock")

    def __init__(self, prompt: int, output: int, cached: int, adapter: int) -> None:
        self.prompt = prompt
        self.output = output
        self.cached = cached  # prompt tokens found in the prefix cache
        self.adapter = adapter  # LoRA adapter id, -1 = base model
        self.start_clock = 0.0


def _poisson(rng: random.Random, lam: float) -> int:
    """A Poisson variate (Knuth for small means, a rounded normal for large ones)."""
    if lam <= 0.0:
        return 0
    if lam > 30.0:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit = math.exp(-lam)
    k, p = 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


class EngineSimulator:
    """One simulated data-parallel rank. ``step(dt)`` advances it and returns its snapshot.

    Deterministic for a given rng: ``EngineSimulator(0, random.Random(7))``
    produces the same sequence of snapshots for the same sequence of dt.
    """

    def __init__(self, dp_rank: int, rng: random.Random, profile: EngineProfile | None = None,
                 sections: frozenset[str] | None = None) -> None:
        self.dp_rank = dp_rank
        self.rng = rng
        self.profile = profile if profile is not None else EngineProfile.for_rank(dp_rank, rng)
        self.sections = sections if sections is not None else sections_for(dp_rank)
        p = self.profile
        self.base_rate = p.load * p.capacity()  # requests/s around which arrivals drift
        self.time = 0.0
        self._log_rate = 0.0  # Ornstein-Uhlenbeck drift of log(arrival rate)
        self._burst_left = 0.0  # seconds of the current burst
        self._burst_factor = 1.0
        self.waiting: list[_Request] = []  # FIFO; admitted from the front
        self._waiting_head = 0
        self._waiting_prompt = 0  # sum of prompt tokens of waiting requests
        self._waiting_uncached = 0
        self.running: list[tuple[float, int, _Request]] = []  # heap of (finish clock, id, request)
        self._next_id = 0
        self._clock = 0.0  # tokens decoded by every running request since the rank started
        self._running_prompt = 0  # sum of prompts of running requests
        self._running_start = 0.0  # sum of start clocks of running requests
        self._reserved = 0  # prompt + output of running requests: the KV budget they may reach
        self._adapters: dict[int, int] = {}  # adapter id -> running requests using it
        self.throughput = 0.0  # tokens/s, smoothed
        self.utilization = 0.0  # busy fraction, smoothed
        self.cache_hit_rate = 0.0  # prefix-cache hit fraction of admitted prompts, smoothed
        self.rejected = 0
        self.retracted = 0
        self._spec_accept = rng.uniform(2.2, 3.2)
        self._kv_speed = rng.uniform(18.0, 35.0)

    # -- state ----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) - self._waiting_head

    @property
    def num_used_tokens(self) -> int:
        n = len(self.running)
        return int(self._running_prompt + n * self._clock - self._running_start)

    @property
    def arrival_rate(self) -> float:
        """Current mean arrivals per second."""
        return self.base_rate * math.exp(self._log_rate) * self._burst_factor

    # -- dynamics -------------------------------------------------------------

    def step(self, dt: float) -> Any:
        """Advance dt seconds (arrivals, admissions, decoding) and return the snapshot."""
        if dt < 0:
            raise ValueError(f"dt must be >= 0, got {dt}")
        self.time += dt
        self._drift(dt)
        self._arrive(dt)
        prefilled = self._admit(dt)
        decoded = self._decode(dt)
        self._smooth(dt, decoded, prefilled)
        return self.snapshot()

    def _drift(self, dt: float) -> None:
        rng = self.rng
        # log-rate relaxes to 0 over ~20 s with a standard deviation of ~0.3.
        theta, sigma = 0.05, 0.3
        self._log_rate += -theta * self._log_rate * dt + sigma * math.sqrt(2 * theta * dt) * rng.gauss(0, 1)
        if self._burst_left > 0:
            self._burst_left -= dt
            if self._burst_left <= 0:
                self._burst_factor = 1.0
        elif rng.random() < dt / 30.0:  # a burst every ~30 s, lasting 2-8 s at 2-3.5x
            self._burst_left = rng.uniform(2.0, 8.0)
            self._burst_factor = rng.uniform(2.0, 3.5)

    def _arrive(self, dt: float) -> None:
        rng, p = self.rng, self.profile
        for _ in range(_poisson(rng, self.arrival_rate * dt)):
            if self.num_waiting >= p.max_waiting:
                self.rejected += 1
                continue
            prompt = min(_MAX_PROMPT, max(16, int(rng.lognormvariate(math.log(p.prompt_median), _PROMPT_SIGMA))))
            output = min(_MAX_OUTPUT, max(1, int(rng.lognormvariate(math.log(p.output_median), _OUTPUT_SIGMA))))
            share = min(0.95, max(0.0, rng.betavariate(2.0, 2.0 * (1 - p.prefix_share) / p.prefix_share)))
            cached = int(prompt * share) if rng.random() < 0.8 else 0
            adapter = rng.randrange(12) if "lora" in self.sections and rng.random() < 0.5 else -1
            self.waiting.append(_Request(prompt, output, cached, adapter))
            self._waiting_prompt += prompt
            self._waiting_uncached += prompt - cached

    def _admit(self, dt: float) -> int:
        """Move requests from the front of the queue into the batch; return tokens prefilled."""
        p = self.profile
        budget = p.prefill_speed * dt  # uncached prompt tokens this step can prefill
        prefilled = 0
        hit = total = 0
        while self._waiting_head < len(self.waiting) and len(self.running) < p.max_running_requests:
            req = self.waiting[self._waiting_head]
            uncached = req.prompt - req.cached
            if self._reserved + req.prompt + req.output > p.max_total_num_tokens:
                break  # KV budget full: wait for running requests to finish
            if prefilled and prefilled + uncached > budget:
                break  # this step's prefill time is spent (a long prompt still goes alone)
            self._waiting_head += 1
            self._waiting_prompt -= req.prompt
            self._waiting_uncached -= uncached
            prefilled += uncached
            hit += req.cached
            total += req.prompt
            req.start_clock = self._clock
            heapq.heappush(self.running, (self._clock + req.output, self._next_id, req))
            self._next_id += 1
            self._running_prompt += req.prompt
            self._running_start += req.start_clock
            self._reserved += req.prompt + req.output
            if req.adapter >= 0:
                self._adapters[req.adapter] = self._adapters.get(req.adapter, 0) + 1
        if self._waiting_head > 1024 and self._waiting_head * 2 > len(self.waiting):
            del self.waiting[:self._waiting_head]  # compact the queue now and then
            self._waiting_head = 0
        if total:
            weight = min(1.0, total / 20_000)  # more admitted tokens, more weight
            self.cache_hit_rate += weight * (hit / total - self.cache_hit_rate)
        return prefilled

    def _decode(self, dt: float) -> int:
        """Every running request decodes the same number of tokens; return the tokens decoded."""
        p = self.profile
        n = len(self.running)
        if n == 0:
            return 0
        speed = p.decode_speed / (1.0 + n / p.batch_knee)
        target = self._clock + speed * dt
        decoded = 0.0
        while self.running and self.running[0][0] <= target:
            finish, _, req = heapq.heappop(self.running)
            decoded += finish - max(self._clock, req.start_clock)
            self._running_prompt -= req.prompt
            self._running_start -= req.start_clock
            self._reserved -= req.prompt + req.output
            if req.adapter >= 0:
                left = self._adapters[req.adapter] - 1
                if left:
                    self._adapters[req.adapter] = left
                else:
                    del self._adapters[req.adapter]
        decoded += len(self.running) * (target - self._clock)
        self._clock = target
        if not self.running:  # keep the sums exact when the batch empties
            self._running_prompt = 0
            self._running_start = 0.0
            self._reserved = 0
        return int(decoded)

    def _smooth(self, dt: float, decoded: int, prefilled: int) -> None:
        p = self.profile
        a = 1.0 - math.exp(-dt / 1.0) if dt > 0 else 0.0  # ~1 s time constant
        if dt > 0:
            self.throughput += a * (decoded / dt - self.throughput)
        busy = min(1.0, len(self.running) / p.max_running_requests * 1.5
                   + prefilled / max(1.0, p.prefill_speed * dt))
        self.utilization += a * (busy - self.utilization)
        self._spec_accept += a * 0.05 * (2.7 - self._spec_accept) + 0.02 * self.rng.gauss(0, 1) * math.sqrt(dt)
        self._kv_speed = max(5.0, self._kv_speed + 0.5 * self.rng.gauss(0, 1) * math.sqrt(dt))

    # -- snapshot -------------------------------------------------------------

    def snapshot(self) -> Any:
        """The rank's current LoadSnapshot (publish_time_ns and seq are the publisher's)."""
        p = self.profile
        running, waiting = self.num_running, self.num_waiting
        used = self.num_used_tokens
        snap = LoadSnapshot(
            dp_rank=self.dp_rank,
            num_running_reqs=running,
            num_waiting_reqs=waiting,
            num_total_reqs=running + waiting,
            num_used_tokens=used,
            max_total_num_tokens=p.max_total_num_tokens,
            token_usage=used / p.max_total_num_tokens,
            gen_throughput=round(self.throughput, 2),
            cache_hit_rate=round(self.cache_hit_rate, 4),
            utilization=round(self.utilization, 4),
            max_running_requests=p.max_running_requests,
            num_waiting_uncached_tokens=self._waiting_uncached,
            num_total_tokens=used + self._waiting_prompt,
        )
        s = self.sections
        if "memory" in s:
            snap.memory = MemoryMetrics(
                weight_gb=15.2, kv_cache_gb=round(p.max_total_num_tokens * KV_BYTES_PER_TOKEN / 2**30, 2),
                graph_gb=1.4, token_capacity=p.max_total_num_tokens)
        if "queues" in s:
            snap.queues = QueueMetrics(waiting=waiting, grammar=min(waiting, waiting // 20),
                                       paused=0, retracted=self.retracted)
        if "speculative" in s:
            accept_length = max(1.0, self._spec_accept)
            snap.speculative = SpeculativeMetrics(accept_length=round(accept_length, 3),
                                                  accept_rate=round(min(1.0, (accept_length - 1) / 3), 4))
        if "lora" in s:
            total = 8
            used_slots = min(total, len(self._adapters))
            snap.lora = LoRAMetrics(slots_used=used_slots, slots_total=total, utilization=used_slots / total)
        if "disaggregation" in s:
            kv_gb = KV_BYTES_PER_TOKEN * 600 / 2**30  # a typical prompt's KV cache
            latency = round(kv_gb / self._kv_speed * 1000 + 2.0, 3)
            if self.dp_rank % 4 == 2:
                snap.disaggregation = DisaggregationMetrics(
                    mode="prefill", prefill_prealloc_queue_reqs=waiting,
                    prefill_inflight_queue_reqs=min(running, 8 + running // 16),
                    kv_transfer_speed_gb_s=round(self._kv_speed, 3), kv_transfer_latency_ms=latency)
            else:
                snap.disaggregation = DisaggregationMetrics(
                    mode="decode", decode_prealloc_queue_reqs=min(waiting, 32),
                    decode_transfer_queue_reqs=max(0, waiting - 32) // 4,
                    decode_retracted_queue_reqs=0,
                    kv_transfer_speed_gb_s=round(self._kv_speed, 3), kv_transfer_latency_ms=latency)
        return snap


# -- the process ----------------------------------------------------------------


def _ranks_text(ranks: tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 6) -> '0-3,6'."""
    parts: list[str] = []
    start = prev = ranks[0]
    for r in (*ranks[1:], None):
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _open_publishers(settings: SimulateSettings) -> tuple[list[Any], str]:
    """One publisher per rank and a description of where they publish."""
    pubs: list[Any] = []
    try:
        if settings.zmq is not None:
            from loadsvc.relay import ZmqPublisher  # pyzmq only when asked for

            for r in settings.ranks:
                pubs.append(ZmqPublisher(settings.zmq, dp_size=settings.dp_size, dp_rank=r,
                                         curve=settings.curve))
            where = f"collector {settings.zmq}" + (" (CURVE)" if settings.curve else "")
        else:
            from loadsvc.core.region import ShmPublisher, default_path

            path = settings.shm if settings.shm is not None else default_path()
            for r in settings.ranks:
                pubs.append(ShmPublisher(path, dp_size=settings.dp_size, dp_rank=r))
            where = f"region {path}"
    except BaseException:
        for pub in pubs:
            pub.close()
        raise
    return pubs, where


def run_simulate(settings: SimulateSettings) -> int:
    """`loadsvc simulate`: publish every rank of settings.ranks until stopped; 0 on a clean stop."""
    from loadsvc.core.region import RegionError

    if not settings.ranks or max(settings.ranks) >= settings.dp_size or min(settings.ranks) < 0:
        log.error("ranks %s are outside dp_size %d", settings.ranks, settings.dp_size)
        return 2
    seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**32)
    master = random.Random(seed)
    sims = [EngineSimulator(r, random.Random(master.getrandbits(64))) for r in settings.ranks]
    for sim in sims:  # an engine that has been serving for a while, not one just started
        for _ in range(int(WARMUP / 0.1)):
            sim.step(0.1)
    try:
        pubs, where = _open_publishers(settings)
    except (RegionError, ValueError, OSError) as e:
        log.error("cannot publish: %s", e)
        return 1

    stop = False
    stopped_by = ""

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stop, stopped_by
        stop = True
        stopped_by = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    period = 1.0 / settings.rate
    log.info("simulating ranks %s of dp_size %d, publishing each at %g Hz into %s (seed %d)%s",
             _ranks_text(settings.ranks), settings.dp_size, settings.rate, where, seed,
             f" for {settings.duration:g} s" if settings.duration else "")
    start = time.monotonic()
    end = start + settings.duration if settings.duration else math.inf
    last = start
    tick = 0
    published = 0
    skipped = 0
    next_summary = start + SUMMARY_EVERY
    try:
        while not stop:
            now = time.monotonic()
            dt = min(now - last, MAX_STEP)  # after a stall (SIGSTOP, a swapped-out host), no leap
            last = now
            for sim, pub in zip(sims, pubs):
                pub.publish(sim.step(dt))
            published += 1
            if now >= next_summary:
                next_summary = now + SUMMARY_EVERY
                log.info("%d publishes per rank so far; %s", published,
                         "; ".join(f"rank {s.dp_rank}: {s.num_running} running, {s.num_waiting} waiting, "
                                   f"usage {s.num_used_tokens / s.profile.max_total_num_tokens:.0%}"
                                   for s in sims[:4]) + (" ..." if len(sims) > 4 else ""))
            tick += 1
            due = start + tick * period
            now = time.monotonic()
            if now - due > period:  # fell more than a tick behind: skip, never bunch up
                late = int((now - due) / period)
                tick += late
                skipped += late
                due = start + tick * period
                if skipped == late or skipped % 100 < late:  # rate-limited
                    log.warning("publishing fell behind; %d ticks skipped so far", skipped)
            if due >= end:
                break
            while not stop:
                wait = due - time.monotonic()
                if wait <= 0:
                    break
                time.sleep(min(wait, 0.1))  # short naps, so a signal is acted on quickly
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pub in pubs:
            pub.close()
    log.info("stopped%s after %.1f s: %d publishes per rank (%d ticks skipped)",
             f" by {stopped_by}" if stopped_by else "", time.monotonic() - start, published, skipped)
    return 0
