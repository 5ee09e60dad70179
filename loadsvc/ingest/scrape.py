"""Any engine's Prometheus /metrics into the region: scrape, parse, map, write.

    engine /metrics (vLLM, SGLang, another with a name map)
          ^  GET every --scrape-interval-ms (default 100, floor 20), --scrape-timeout-ms per request,
          |  at most --scrape-max-bytes (a larger page is refused before it is parsed)
    Scraper (a thread with its own event loop, one task and one kept-alive connection per URL,
          |  fetch.Connection: a small HTTP/1.1 GET, a tenth of httpx's CPU per request)
          |  keep the lines of the metrics a name set uses, parse them with prometheus_client's parser
          |  name set: vLLM, SGLang or --scrape-map FILE, whichever the page carries (first found)
          |  rank = the URL's first rank (URL=RANK, default 0) + the rank label's value (vLLM
          |  engine="N", SGLang dp_rank="N"; absent: + 0)
          v  check each rank's values (finite, >= 0, in range), derive what is missing
    RegionWriter.write(rank) -> region -> every surface

Freshness: each scrape that succeeds writes every rank it found, stamped with the
time the page arrived. A scrape that fails (connection refused, HTTP error, a
timeout, a page too large, nothing parseable) writes nothing, so the ranks keep
their last values and turn stale after ``--stale-after`` and unreachable after
``--unreachable-after``: a failing engine never reads as idle. A rank whose own
values are bad (NaN, negative, beyond range) is refused alone.

Name sets (``NameSet``): which metric fills which LoadSnapshot field.

- ``gauges``: the sample's value is the field (alternatives: the first present wins);
- ``rates``: a counter whose per-second rate over about the last second is the field;
- ``hit_rate``: (hits, queries) counters whose increase over about the last 10 s gives
  cache_hit_rate (0 when no query came in);
- ``labels``: a label's value on a sample (an info gauge) is the field;
- ``require``: labels that must have the given value where a sample has them (SGLang's
  tp_rank="0", pp_rank="0"), so one series per rank counts.

A metric may name labels the sample must have: ``vllm:num_requests_waiting_by_reason{reason="deferred"}``.
Missing fields are derived: num_total_reqs = running + waiting; token_usage = used /
max_total_num_tokens; num_used_tokens = round(token_usage x max_total_num_tokens);
utilization = running / max_running_requests. The vLLM and SGLang sets are below;
``load_name_set(path)`` reads another engine's from JSON (docs/engines.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadsvc.core.rejects import Rejects
from loadsvc.core.schema import LoadSnapshot
from loadsvc.core.writer import REGION_CHECK, WRITE_REASONS, RegionWriter, WriteRefused
from loadsvc.ingest.fetch import Connection, FetchError
from loadsvc.settings import StoreSettings

__all__ = [
    "Scraper",
    "ScrapeTarget",
    "NameSet",
    "MetricRef",
    "VLLM",
    "SGLANG",
    "BUILTIN",
    "load_name_set",
    "parse_target",
    "select_lines",
    "read_samples",
    "ScrapeFailed",
    "SCRAPE_RESULTS",
    "RANK_REASONS",
]

log = logging.getLogger("loadsvc.ingest.scrape")

DEFAULT_INTERVAL = 0.1  # seconds between scrapes of one URL
MIN_INTERVAL = 0.02  # the floor of --scrape-interval-ms
DEFAULT_TIMEOUT = 1.0  # seconds a scrape may take, the page included
DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # a larger page is refused, unparsed
RATE_WINDOW = 1.0  # seconds of counter history behind a rate
HIT_RATE_WINDOW = 10.0  # seconds of counter history behind cache_hit_rate
_HISTORY = 512  # counter samples kept per rank, at most
PARSE_CACHE_LINES = 4096  # parsed lines remembered per URL

_I32 = 2**31 - 1
_I64 = 2**63 - 1
# The fields a name set may fill, with their range: counts are int32 (num_total_tokens
# int64), ratios 0..1, gen_throughput any finite rate up to 1e12 tokens/s.
FIELDS: dict[str, tuple[str, float]] = {
    "num_running_reqs": ("int", _I32),
    "num_waiting_reqs": ("int", _I32),
    "num_total_reqs": ("int", _I32),
    "num_used_tokens": ("int", _I32),
    "max_total_num_tokens": ("int", _I32),
    "max_running_requests": ("int", _I32),
    "num_waiting_uncached_tokens": ("int", _I32),
    "num_total_tokens": ("int", _I64),
    "token_usage": ("ratio", 1.0),
    "cache_hit_rate": ("ratio", 1.0),
    "utilization": ("ratio", 1.0),
    "gen_throughput": ("rate", 1e12),
}

SCRAPE_RESULTS: dict[str, str] = {
    "ok": "the page was read and mapped",
    "timeout": "no complete page within --scrape-timeout-ms",
    "unreachable": "connection refused or broken, or not an HTTP/1.x answer",
    "http_status": "an HTTP status other than 200",
    "too_large": "a page larger than --scrape-max-bytes (refused unparsed)",
    "not_text": "the page is not UTF-8 text",
    "parse_error": "prometheus_client's parser refused the page",
    "unknown_names": "none of the name sets' metrics is on the page",
    "no_ranks": "a name set matched, but no rank had a usable value",
    "internal_error": "an unexpected error while scraping (logged with its traceback)",
}

RANK_REASONS: dict[str, str] = {
    "bad_value": "NaN, infinity or a negative number",
    "out_of_range": "beyond what the field holds (int32 counts, a ratio above 1, ...)",
    "bad_rank_label": "the rank label is not a whole number",
    **WRITE_REASONS,
}


class ScrapeFailed(Exception):
    """A scrape that wrote nothing; ``result`` is one of SCRAPE_RESULTS."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result


# -- name sets -------------------------------------------------------------------------------

_REF = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


@dataclass(frozen=True)
class MetricRef:
    """A metric name and the label values its sample must carry: ``name{label="value",...}``."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MetricRef:
        m = _REF.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not a metric name (optionally with {{label=\"value\"}})")
        labels: list[tuple[str, str]] = []
        rest = m.group(2) or ""
        pos = 0
        while pos < len(rest):
            lm = _LABEL.match(rest, pos)
            if not lm:
                raise ValueError(f"{text!r}: labels must look like {{name=\"value\",...}}")
            labels.append((lm.group(1), lm.group(2)))
            pos = lm.end()
        return cls(m.group(1), tuple(labels))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


def _refs(value: Any) -> tuple[MetricRef, ...]:
    """A metric, or a list of alternatives, as MetricRefs; ValueError for anything else."""
    items = [value] if isinstance(value, (str, MetricRef)) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"expected a metric name or a list of them, got {value!r}")
    refs = []
    for v in items:
        if isinstance(v, MetricRef):
            refs.append(v)
        elif isinstance(v, str):
            refs.append(MetricRef.parse(v))
        else:
            raise ValueError(f"expected a metric name, got {v!r}")
    return tuple(refs)


@dataclass(frozen=True)
class NameSet:
    """Which metrics of an engine's /metrics fill which LoadSnapshot field (see the module docstring)."""

    name: str
    rank_label: str | None = None
    gauges: Mapping[str, tuple[MetricRef, ...]] = field(default_factory=dict)
    rates: Mapping[str, tuple[MetricRef, ...]] = field(default_factory=dict)
    hit_rate: tuple[tuple[MetricRef, ...], tuple[MetricRef, ...]] | None = None
    labels: Mapping[str, tuple[MetricRef, str]] = field(default_factory=dict)
    require: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, name: str, *, rank_label: str | None = None,
              gauges: Mapping[str, Any] | None = None, rates: Mapping[str, Any] | None = None,
              hit_rate: Sequence[Any] | None = None, labels: Mapping[str, Sequence[str]] | None = None,
              require: Mapping[str, str] | None = None) -> NameSet:
        """A NameSet from plain strings; ValueError naming the field or metric that is wrong."""
        for what, mapping in (("gauges", gauges), ("rates", rates), ("labels", labels)):
            for f in mapping or {}:
                if f not in FIELDS:
                    raise ValueError(f"{what}: {f!r} is not a field a name set can fill; one of "
                                     f"{', '.join(FIELDS)}")
        if hit_rate is not None and len(hit_rate) != 2:
            raise ValueError("hit_rate: expected [hits counter, queries counter]")
        label_refs: dict[str, tuple[MetricRef, str]] = {}
        for f, spec in (labels or {}).items():
            if isinstance(spec, str) or len(spec) != 2:
                raise ValueError(f"labels: {f}: expected [metric, label name]")
            label_refs[f] = (MetricRef.parse(spec[0]), str(spec[1]))
        for f in ("num_running_reqs", "num_waiting_reqs"):
            if f not in (gauges or {}):
                raise ValueError(f"gauges: {f} is required (the name set is recognised by it)")
        return cls(name=name, rank_label=rank_label,
                   gauges={f: _refs(v) for f, v in (gauges or {}).items()},
                   rates={f: _refs(v) for f, v in (rates or {}).items()},
                   hit_rate=(_refs(hit_rate[0]), _refs(hit_rate[1])) if hit_rate else None,
                   labels=label_refs, require=dict(require or {}))

    def metric_names(self) -> set[str]:
        names = {r.name for refs in (*self.gauges.values(), *self.rates.values()) for r in refs}
        if self.hit_rate:
            names |= {r.name for refs in self.hit_rate for r in refs}
        names |= {ref.name for ref, _ in self.labels.values()}
        return names

    def recognises(self, present: set[str]) -> bool:
        """True when the page carries this set's running or waiting metric."""
        return any(r.name in present for f in ("num_running_reqs", "num_waiting_reqs")
                   for r in self.gauges[f])


# vLLM 0.32's names (engine="N" per DP engine); gpu_* are the names of older releases.
VLLM = NameSet.build(
    "vllm", rank_label="engine",
    gauges={"num_running_reqs": "vllm:num_requests_running",
            "num_waiting_reqs": "vllm:num_requests_waiting",
            "token_usage": ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
            "cache_hit_rate": "vllm:gpu_prefix_cache_hit_rate"},
    rates={"gen_throughput": "vllm:generation_tokens_total"},
    hit_rate=(["vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"],
              ["vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"]),
    labels={"max_total_num_tokens": ["vllm:cache_config_info", "kv_cache_size_tokens"]},
)

# SGLang's scheduler gauges (sglang:..., dp_rank="N" under DP), and the sglang_... names of its
# /v1/loads?format=prometheus (LoadSnapshot's field names), which some releases expose.
SGLANG = NameSet.build(
    "sglang", rank_label="dp_rank",
    gauges={"num_running_reqs": ["sglang:num_running_reqs", "sglang_num_running_reqs"],
            "num_waiting_reqs": ["sglang:num_queue_reqs", "sglang_num_waiting_reqs"],
            "token_usage": ["sglang:token_usage", "sglang_token_usage"],
            "gen_throughput": ["sglang:gen_throughput", "sglang_gen_throughput"],
            "cache_hit_rate": ["sglang:cache_hit_rate", "sglang_cache_hit_rate"],
            "num_used_tokens": ["sglang:num_used_tokens", "sglang_num_used_tokens"],
            "max_total_num_tokens": ["sglang:max_total_num_tokens", "sglang_max_total_num_tokens"],
            "max_running_requests": "sglang_max_running_requests",
            "num_waiting_uncached_tokens": "sglang_num_waiting_uncached_tokens",
            "num_total_tokens": "sglang_num_total_tokens",
            "utilization": "sglang_utilization"},
    require={"tp_rank": "0", "pp_rank": "0"},
)

BUILTIN: tuple[NameSet, ...] = (VLLM, SGLANG)


def load_name_set(path: str | Path) -> NameSet:
    """Another engine's NameSet from a JSON file (docs/engines.md); ValueError naming the problem."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"--scrape-map {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"--scrape-map {path}: not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--scrape-map {path}: expected a JSON object")
    known = {"name", "rank_label", "gauges", "rates", "hit_rate", "labels", "require"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"--scrape-map {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"expected {', '.join(sorted(known))}")
    try:
        return NameSet.build(str(spec.get("name") or path.stem), rank_label=spec.get("rank_label"),
                             gauges=spec.get("gauges"), rates=spec.get("rates"),
                             hit_rate=spec.get("hit_rate"), labels=spec.get("labels"),
                             require=spec.get("require"))
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"--scrape-map {path}: {e}") from None


# -- parsing ---------------------------------------------------------------------------------


def select_lines(text: str, names: Iterable[str]) -> list[str]:
    """The sample lines of text whose metric is one of names (comments and the rest dropped).

    The parse then costs what the wanted metrics cost, not the whole page (a vLLM
    page is mostly histogram buckets nobody here reads).
    """
    prefixes = tuple(names)
    out = []
    for line in text.splitlines():
        if line.startswith(prefixes):
            for p in prefixes:
                if line.startswith(p) and len(line) > len(p) and line[len(p)] in "{ \t":
                    out.append(line)
                    break
    return out


Sample = tuple[str, dict[str, str], float]


def read_samples(text: str, names: Iterable[str], cache: dict[str, Sample] | None = None) -> list[Sample]:
    """(name, labels, value) of every sample of names on the page, parsed by prometheus_client.

    cache: lines parsed before (one dict per scraped URL), so a line that did not change
    since the last page (an info gauge's forty labels, an idle gauge) is not parsed again;
    it holds at most PARSE_CACHE_LINES lines. The labels dicts are shared: do not change them.
    ScrapeFailed("parse_error") when the parser refuses a selected line.
    """
    from prometheus_client.parser import text_string_to_metric_families

    lines = select_lines(text, names)
    if cache is None:
        cache = {}
    todo = [line for line in dict.fromkeys(lines) if line not in cache]
    if len(cache) + len(todo) > PARSE_CACHE_LINES:
        cache.clear()
        todo = list(dict.fromkeys(lines))
    if todo:
        try:
            parsed = [(s.name, s.labels, s.value) for family in text_string_to_metric_families("\n".join(todo) + "\n")
                      for s in family.samples]
        except (ValueError, TypeError, IndexError) as e:
            raise ScrapeFailed("parse_error", f"prometheus_client's parser refused the page: {e}") from None
        if len(parsed) != len(todo):  # every selected line is one sample
            raise ScrapeFailed("parse_error", f"{len(todo)} sample lines parsed into {len(parsed)} samples")
        cache.update(zip(todo, parsed))
    return [cache[line] for line in lines]


# -- one target's state -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScrapeTarget:
    """A /metrics URL and the region rank of its rank 0 (rank label N -> first_rank + N)."""

    url: str
    first_rank: int = 0


def parse_target(text: str) -> ScrapeTarget:
    """'URL[=RANK]' -> ScrapeTarget; a URL without a path gets /metrics. ValueError when not a URL."""
    url, rank = text, 0
    head, sep, tail = text.rpartition("=")
    if sep and tail.strip().isdigit():
        url, rank = head, int(tail)
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r}: expected http(s)://HOST:PORT[/PATH][=RANK], e.g. "
                         "http://10.0.0.5:8000/metrics=2")
    if parts.path in ("", "/"):
        url = url.strip().rstrip("/") + "/metrics"
    return ScrapeTarget(url.strip(), rank)


class _Counters:
    """Counter history of one rank: rates and the hit rate over their windows."""

    __slots__ = ("history",)

    def __init__(self) -> None:
        self.history: deque[tuple[float, dict[str, float]]] = deque(maxlen=_HISTORY)

    def add(self, t: float, values: dict[str, float]) -> None:
        h = self.history
        if h:
            last = h[-1][1]
            if any(values.get(k, 0.0) < v for k, v in last.items() if k in values):
                h.clear()  # a counter went back: the engine restarted
        h.append((t, values))
        while len(h) > 1 and t - h[1][0] >= HIT_RATE_WINDOW:
            h.popleft()

    def rate(self, key: str) -> float:
        """Per-second increase over the newest RATE_WINDOW (0 until two samples)."""
        h = self.history
        t, now = h[-1]
        old = None
        for ts, values in reversed(h):
            old = (ts, values)
            if t - ts >= RATE_WINDOW:
                break
        if old is None or old[0] >= t or key not in now or key not in old[1]:
            return 0.0
        return max(0.0, (now[key] - old[1][key]) / (t - old[0]))

    def increase(self, key: str) -> float:
        """Increase over the whole window (HIT_RATE_WINDOW)."""
        h = self.history
        first, last = h[0][1], h[-1][1]
        if key not in first or key not in last:
            return 0.0
        return max(0.0, last[key] - first[key])


class _TargetState:
    def __init__(self, target: ScrapeTarget) -> None:
        self.target = target
        self.names: NameSet | None = None
        self.counters: dict[int, _Counters] = {}
        self.epoch = secrets.randbits(63) | 1
        self.parsed: dict[str, Sample] = {}  # read_samples' cache
        self.connection = Connection(target.url)
        self.ok = False  # the last scrape succeeded (to log recovery once)


class Scraper:
    """Scrapes every target on a thread of its own and writes each rank it finds into the region.

    ``Scraper(store_settings, targets, registry=...)``; ``start()`` / ``stop()`` (or as a
    context manager). Counters (prometheus_client, in ``registry``):
    ``loadsvc_scrapes_total{result}``, ``loadsvc_scrape_ranks_written_total``,
    ``loadsvc_scrape_ranks_rejected_total{reason}``. ``on_write`` is called from the thread
    after each scrape that wrote a rank (serve passes one that wakes its store).
    """

    def __init__(self, store: StoreSettings, targets: Sequence[ScrapeTarget], *, registry: Any = None,
                 interval: float = DEFAULT_INTERVAL, timeout: float = DEFAULT_TIMEOUT,
                 max_bytes: int = DEFAULT_MAX_BYTES, name_sets: Sequence[NameSet] = BUILTIN,
                 on_write: Callable[[], object] | None = None,
                 clock: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        from prometheus_client import CollectorRegistry, Counter

        if interval < MIN_INTERVAL:
            raise ValueError(f"scrape interval {interval * 1000:g} ms is below the floor of "
                             f"{MIN_INTERVAL * 1000:g} ms")
        if not timeout > 0:
            raise ValueError(f"scrape timeout must be > 0, got {timeout}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.writer = RegionWriter(store.shm, dp_size=store.dp_size, mode=store.region_mode)
        self.targets = list(targets)
        self.interval = interval
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.name_sets = tuple(name_sets)
        self._names = sorted(set().union(*(n.metric_names() for n in self.name_sets)),
                             key=len, reverse=True)  # longest first: a prefix never hides a longer name
        self._on_write = on_write
        self._clock = clock  # publish times (Unix ns)
        self._monotonic = monotonic  # the counters' rates
        results = Counter("loadsvc_scrapes", "Scrapes of engines' /metrics, per result", ["result"],
                          registry=self.registry)
        self._ok = results.labels(result="ok")
        self.failed = Rejects(results, {k: v for k, v in SCRAPE_RESULTS.items() if k != "ok"}, "scrape",
                              log, label="result")
        self._written_metric = Counter("loadsvc_scrape_ranks_written",
                                       "Ranks written into the region from scraped pages",
                                       registry=self.registry)
        self.reject = Rejects(Counter("loadsvc_scrape_ranks_rejected",
                                      "Ranks of scraped pages not written, per reason", ["reason"],
                                      registry=self.registry),
                              RANK_REASONS, "scraped rank", log)
        self.scrapes_ok = 0
        self.written = 0
        self._states = [_TargetState(t) for t in self.targets]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._started.clear()
        self._thread = threading.Thread(target=self._thread_main, name="loadsvc-scrape", daemon=True)
        self._thread.start()
        self._started.wait(5)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("scrape thread did not stop within %.1f s", timeout)
        self._thread = None

    def __enter__(self) -> Scraper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self.writer.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._started.set()
        tasks = [asyncio.create_task(self._scrape_loop(s), name=f"loadsvc-scrape-{s.target.url}")
                 for s in self._states]
        tasks.append(asyncio.create_task(self._region_checks()))
        try:
            await self._stop_event.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in self._states:
                s.connection.close()

    async def _region_checks(self) -> None:
        while True:
            await asyncio.sleep(REGION_CHECK)
            self.writer.check_region()

    async def _scrape_loop(self, state: _TargetState) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.scrape_once(state)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug, not a bad page: counted, logged, the loop goes on
                self.failed("internal_error", f"{state.target.url}: {type(e).__name__}: {e}", exc_info=True)
            next_at += self.interval
            now = loop.time()
            if next_at < now:  # fell behind (a slow page, a busy machine): no burst to catch up
                next_at = now
            await asyncio.sleep(next_at - now)

    # -- one scrape -----------------------------------------------------------------------

    async def scrape_once(self, state: _TargetState) -> bool:
        """GET the page, map and write its ranks; False (counted and logged) when nothing was written."""
        url = state.target.url
        try:
            text = await self._fetch(state)
            received_ns = self._clock()
            wrote = self.ingest_page(state, text, received_ns)
        except ScrapeFailed as f:
            self.failed(f.result, f"{url}: {f}; its ranks age and turn stale")
            state.ok = False
            return False
        self._ok.inc()
        self.scrapes_ok += 1
        if not state.ok:
            state.ok = True
            log.info("scraping %s: %s names", url, state.names.name if state.names else "?")
        if wrote and self._on_write is not None:
            self._on_write()
        return wrote

    async def _fetch(self, state: _TargetState) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                body = await state.connection.get(self.max_bytes)
        except TimeoutError:
            raise ScrapeFailed("timeout", f"no complete page within {self.timeout * 1000:g} ms "
                                          "(--scrape-timeout-ms)") from None
        except FetchError as e:
            limit = " (--scrape-max-bytes)" if e.result == "too_large" else ""
            raise ScrapeFailed(e.result, f"{e}{limit}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ScrapeFailed("not_text", f"the page is not UTF-8: {e}") from None

    def ingest_page(self, state: _TargetState, text: str, received_ns: int) -> bool:
        """Map one page of state's target and write its ranks; True if any was written.

        ScrapeFailed when the page as a whole is unusable. Public for the benchmark and tests.
        """
        by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
        for name, labels, value in read_samples(text, self._names, state.parsed):
            by_name.setdefault(name, []).append((labels, value))
        names = state.names
        if names is None or not names.recognises(set(by_name)):
            present = set(by_name)
            names = next((n for n in self.name_sets if n.recognises(present)), None)
            if names is None:
                raise ScrapeFailed("unknown_names", "none of the known metrics is on the page (vLLM's "
                                   "vllm:num_requests_running, SGLang's sglang:num_running_reqs, or "
                                   "--scrape-map's); give a --scrape-map for this engine")
            state.names = names
        ranks = self._ranks(names, by_name)
        if not ranks:
            raise ScrapeFailed("no_ranks", f"{names.name} names found but no rank with a usable value")
        now = self._monotonic()
        wrote = False
        for label_rank in sorted(ranks):
            rank = state.target.first_rank + label_rank
            snapshot = self._snapshot(state, names, by_name, label_rank, rank, now)
            if snapshot is None:
                continue
            try:
                self.writer.write(rank, snapshot, received_ns)
            except WriteRefused as r:
                self.reject(r.reason, f"{state.target.url} rank {label_rank}: {r}")
                continue
            self.written += 1
            self._written_metric.inc()
            wrote = True
        return wrote

    def _ranks(self, names: NameSet, by_name: dict[str, list[tuple[dict[str, str], float]]]) -> set[int]:
        ranks: set[int] = set()
        for f in ("num_running_reqs", "num_waiting_reqs"):
            for ref in names.gauges[f]:
                for labels, _ in by_name.get(ref.name, ()):
                    if not self._counts(names, labels) or not ref.matches(labels):
                        continue
                    value = labels.get(names.rank_label, "0") if names.rank_label else "0"
                    if value.isdigit() and len(value) <= 6:
                        ranks.add(int(value))
                    else:
                        self.reject("bad_rank_label", f"{ref.name}: rank label {names.rank_label}="
                                                      f"{value!r:.40} is not a whole number")
        return ranks

    @staticmethod
    def _counts(names: NameSet, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k, v) == v for k, v in names.require.items())

    def _value(self, names: NameSet, by_name: dict[str, list[tuple[dict[str, str], float]]],
               refs: Sequence[MetricRef], rank: str) -> float | None:
        for ref in refs:
            for labels, value in by_name.get(ref.name, ()):
                if (ref.matches(labels) and self._counts(names, labels)
                        and (names.rank_label is None or labels.get(names.rank_label, "0") == rank)):
                    return value
        return None

    def _snapshot(self, state: _TargetState, names: NameSet,
                  by_name: dict[str, list[tuple[dict[str, str], float]]], label_rank: int, rank: int,
                  now: float) -> Any:
        """The rank's LoadSnapshot, or None (counted) when one of its values is bad."""
        key = str(label_rank)
        raw: dict[str, float] = {}
        for f, refs in names.gauges.items():
            v = self._value(names, by_name, refs, key)
            if v is not None:
                raw[f] = v
        for f, (ref, label) in names.labels.items():
            for labels, _ in by_name.get(ref.name, ()):
                if ref.matches(labels) and self._counts(names, labels) and (
                        names.rank_label is None or labels.get(names.rank_label, "0") == key):
                    try:
                        raw[f] = float(labels.get(label, ""))
                    except ValueError:
                        pass  # "None" and the like: not reported
                    break
        counters: dict[str, float] = {}
        for f, refs in names.rates.items():
            v = self._value(names, by_name, refs, key)
            if v is not None:
                counters[f] = v
        if names.hit_rate is not None:
            for k, refs in zip(("hits", "queries"), names.hit_rate):
                v = self._value(names, by_name, refs, key)
                if v is not None:
                    counters[k] = v
        where = f"{state.target.url} rank {label_rank} (dp_rank {rank})"
        for f, v in (*raw.items(), *counters.items()):
            if not math.isfinite(v) or v < 0:
                self.reject("bad_value", f"{where}: {f} is {v}")
                return None
        if counters:
            history = state.counters.setdefault(label_rank, _Counters())
            history.add(now, counters)
            for f in names.rates:
                if f in counters:
                    raw[f] = history.rate(f)
            if "cache_hit_rate" not in raw and "queries" in counters:
                queries = history.increase("queries")
                raw["cache_hit_rate"] = min(1.0, history.increase("hits") / queries) if queries else 0.0
        values: dict[str, Any] = {}
        for f, v in raw.items():
            kind, limit = FIELDS[f]
            if v > (limit + 1e-9 if kind == "ratio" else limit):  # a ratio may round a hair past 1
                self.reject("out_of_range", f"{where}: {f} is {v:g}, above {limit:g}")
                return None
            values[f] = min(round(v), int(limit)) if kind == "int" else min(float(v), limit)
        running = values.get("num_running_reqs", 0)
        waiting = values.get("num_waiting_reqs", 0)
        values.setdefault("num_total_reqs", min(_I32, running + waiting))
        capacity = values.get("max_total_num_tokens", 0)
        if "token_usage" not in values and capacity and "num_used_tokens" in values:
            values["token_usage"] = min(1.0, values["num_used_tokens"] / capacity)
        if "num_used_tokens" not in values and capacity and "token_usage" in values:
            values["num_used_tokens"] = min(_I32, round(values["token_usage"] * capacity))
        if "utilization" not in values and values.get("max_running_requests"):
            values["utilization"] = min(1.0, running / values["max_running_requests"])
        return LoadSnapshot(dp_rank=rank, epoch=state.epoch, **values)
