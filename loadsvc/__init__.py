"""loadsvc: per-rank load from LLM inference engines to the routers that pick a rank.

    from loadsvc import LoadSnapshot, ShmPublisher, ShmReader          # engines publish
    from loadsvc import open_store, loads_router, add_to_grpc_server   # engines serve loads
    from loadsvc import ZmqPublisher                                   # engines on other nodes

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

# The embedding API (loadsvc/embed.py) is imported on first use: publishing
# engines that only need ShmPublisher do not pay for importing grpc and FastAPI.
_EMBED = ("add_orca_service", "add_to_grpc_server", "loads_router", "open_store")
# The ZMQ relay (loadsvc/relay.py) likewise: pyzmq only for engines on other nodes.
_RELAY = ("Collector", "ZmqPublisher")


def __getattr__(name: str) -> object:
    if name in _EMBED:
        from loadsvc import embed, orca

        return getattr(orca if name == "add_orca_service" else embed, name)
    if name in _RELAY:
        from loadsvc import relay

        return getattr(relay, name)
    raise AttributeError(f"module 'loadsvc' has no attribute {name!r}")


__all__ = [
    "AggregateMetrics",
    "Collector",
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
    "ZmqPublisher",
    "__version__",
    "add_orca_service",
    "add_to_grpc_server",
    "default_path",
    "freshness",
    "loads_router",
    "open_store",
]
