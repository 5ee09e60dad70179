"""loadsvc: per-rank load from LLM inference engines to the routers that pick a rank.

    from loadsvc import LoadSnapshot, ShmPublisher, ShmReader          # engines publish
    from loadsvc import open_store, loads_router, add_to_grpc_server   # engines serve loads
    from loadsvc import ZmqPublisher                                   # engines on other nodes
    from loadsvc import LoadsvcError                                   # every error loadsvc raises

    publisher --> region (core.region) --> store (core.store) --> surfaces (gRPC, ORCA, REST)

README.md is the front door, docs/ the rest; proto/loadsvc/v1/loads.proto is the schema.
"""

from typing import TYPE_CHECKING, Any

from loadsvc._exceptions import (
    BadRequest,
    LoadsvcError,
    RegionError,
    ServeError,
    SettingsError,
)
from loadsvc._version import __version__
from loadsvc.core.region import ShmPublisher, ShmReader, default_path, freshness
from loadsvc.core.schema import (
    AggregateMetrics,
    DisaggregationMetrics,
    LoadSnapshot,
    LoRAMetrics,
    MemoryMetrics,
    QueueMetrics,
    SpeculativeMetrics,
    Status,
)

if TYPE_CHECKING:
    from loadsvc.embed import add_to_grpc_server, loads_router, open_store
    from loadsvc.relay import Collector, ZmqPublisher
    from loadsvc.surfaces.orca import add_orca_service

# Imported on first use, so that an engine that only publishes does not pay for
# grpc and FastAPI (the embedding API) or pyzmq (the relay).
_LAZY = {
    "add_orca_service": "loadsvc.surfaces.orca",
    "add_to_grpc_server": "loadsvc.embed",
    "loads_router": "loadsvc.embed",
    "open_store": "loadsvc.embed",
    "Collector": "loadsvc.relay",
    "ZmqPublisher": "loadsvc.relay",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loadsvc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AggregateMetrics",
    "BadRequest",
    "Collector",
    "DisaggregationMetrics",
    "LoRAMetrics",
    "LoadSnapshot",
    "LoadsvcError",
    "MemoryMetrics",
    "QueueMetrics",
    "RegionError",
    "ServeError",
    "SettingsError",
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
