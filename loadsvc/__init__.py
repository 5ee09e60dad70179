"""loadsvc: per-rank load from LLM inference engines to the routers that pick a rank.

    from loadsvc import LoadSnapshot, ShmPublisher, ShmReader

See README.md for the whole picture; proto/loadsvc/v1/loads.proto is the schema.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from loadsvc.schema import (
    AggregateMetrics,
    DisaggregationMetrics,
    LoadSnapshot,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    SpeculativeMetrics,
    Status,
)
from loadsvc.shm import RegionError, ShmPublisher, ShmReader, default_path, freshness

try:
    __version__ = _version("loadsvc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AggregateMetrics",
    "DisaggregationMetrics",
    "LoRAMetrics",
    "LoadSnapshot",
    "MemoryMetrics",
    "QueueMetrics",
    "RegionError",
    "ShmPublisher",
    "ShmReader",
    "SpeculativeMetrics",
    "Status",
    "__version__",
    "default_path",
    "freshness",
]
