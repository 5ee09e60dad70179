"""Load from engines that run none of loadsvc's code, ingested by `loadsvc serve` into its region.

    SGLang schedulers                         any engine with Prometheus /metrics
    PUB [b"load", seq, LoadStat] per rank     (vLLM, SGLang, others through --scrape-map)
          | SUB, one per endpoint                   | GET every 100 ms, bounded in time and size
          v                                         v
    sglang.SglangSubscriber (thread)          scrape.Scraper (thread, own event loop)
      --sglang-endpoint ENDPOINT=RANK           --scrape URL[=RANK]
      --sglang-server URL[=RANK] (discovery:    parse (prometheus_client), name set, map,
      sglang.SglangDiscovery, serve's loop)     check each rank
      check, order per rank, map                      |
          \\                                          /
           loadsvc.core.writer.RegionWriter: one writer per rank (the relay collector's rules:
           a rank another live publisher owns is refused, the region's size checked)
                                   v
                 region -> LoadStore -> gRPC / REST / Prometheus (as local ranks)

Everything refused (a malformed frame, a failed scrape, a bad value) is counted
per reason on serve's /metrics and logged at most once per reason per 10 s; no
input stops an intake. A source that goes quiet leaves its ranks to age: stale
after --stale-after, unreachable after --unreachable-after, never zero.

``Ingest(serve_settings, registry=..., on_write=...)`` starts and stops what
``ServeSettings.ingest`` asks for; serve owns one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from loadsvc.settings import ServeSettings

__all__ = ["Ingest"]

log = logging.getLogger("loadsvc.ingest")


class Ingest:
    """The SGLang subscriber, its discovery and the scraper of one serve."""

    def __init__(self, settings: ServeSettings, *, registry: Any,
                 on_write: Callable[[], object] | None = None) -> None:
        if settings.ingest is None:
            raise ValueError("Ingest needs ServeSettings.ingest")
        self.settings = settings
        self.registry = registry
        self.on_write = on_write
        self.subscriber: Any = None
        self.discovery: Any = None
        self.scraper: Any = None

    async def start(self) -> None:
        """Start every intake asked for; ValueError when the settings do not fit together."""
        ing = self.settings.ingest
        assert ing is not None
        store = self.settings.store
        if ing.sglang_endpoints or ing.sglang_servers:
            from loadsvc.ingest.sglang import SglangDiscovery, SglangEndpoint, SglangSubscriber

            self.subscriber = SglangSubscriber(
                store, [SglangEndpoint(address, rank) for address, rank in ing.sglang_endpoints],
                registry=self.registry, max_rate=ing.sglang_max_rate,
                max_frame_bytes=ing.sglang_max_frame_bytes,
                max_endpoints=ing.max_endpoints - len(ing.scrape), on_write=self.on_write)
            await asyncio.to_thread(self.subscriber.start)
            if ing.sglang_servers:
                self.discovery = SglangDiscovery(self.subscriber, ing.sglang_servers, registry=self.registry)
                await self.discovery.start()
        if ing.scrape:
            from loadsvc.ingest.scrape import BUILTIN, Scraper, ScrapeTarget, load_name_set

            name_sets = (load_name_set(ing.scrape_map), *BUILTIN) if ing.scrape_map else BUILTIN
            self.scraper = Scraper(store, [ScrapeTarget(url, rank) for url, rank in ing.scrape],
                                   registry=self.registry, interval=ing.scrape_interval,
                                   timeout=ing.scrape_timeout, max_bytes=ing.scrape_max_bytes,
                                   name_sets=name_sets, on_write=self.on_write)
            await asyncio.to_thread(self.scraper.start)
            log.info("scraping %s every %g ms", ", ".join(url for url, _ in ing.scrape),
                     ing.scrape_interval * 1000)

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if self.subscriber is not None:
            await asyncio.to_thread(self.subscriber.stop)
        if self.scraper is not None:
            await asyncio.to_thread(self.scraper.stop)
