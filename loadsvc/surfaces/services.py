"""Every loadsvc gRPC service on one grpc.aio server: what `loadsvc serve` and engines both call.

    add_grpc_surfaces(server, store)
        +-- loadsvc.v1.LoadService, SGLang GetLoads, health, reflection   (surfaces/grpc.py)
        +-- ORCA OpenRcaService                                          (surfaces/orca.py)
    -> GrpcSurfaces: await surfaces.aclose() before server.stop(grace)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loadsvc.core.store import LoadStore
from loadsvc.surfaces.grpc import DEFAULT_MAX_STREAMS, LoadServices, add_load_services
from loadsvc.surfaces.orca import (
    MIN_REPORT_INTERVAL,
    ORCA_SERVICE,
    OrcaService,
    add_orca_service,
)

if TYPE_CHECKING:
    import grpc

__all__ = ["GrpcSurfaces", "add_grpc_surfaces"]


@dataclass(frozen=True)
class GrpcSurfaces:
    """What add_grpc_surfaces added: the load services and the ORCA service (None if off)."""

    load: LoadServices
    orca: OrcaService | None

    async def aclose(self) -> None:
        """Health NOT_SERVING, end WatchLoads and ORCA streams; call before ``server.stop(grace)``."""
        if self.orca is not None:
            self.orca.close()
        await self.load.aclose()


def add_grpc_surfaces(server: grpc.aio.Server, store: LoadStore, *, sglang: bool = True,
                      orca: bool = True, orca_ranks: Sequence[int] | None = None,
                      health: bool = True, reflection: bool = True, api_key: str | None = None,
                      orca_min_report_interval: float = MIN_REPORT_INTERVAL,
                      max_streams: int = DEFAULT_MAX_STREAMS) -> GrpcSurfaces:
    """Add loadsvc's gRPC services over store to a ``grpc.aio`` server (from async code, before it starts).

    ``loadsvc.v1.LoadService``, the SGLang-compatible ``GetLoads`` (sglang=False for
    an engine that already serves ``SglangScheduler``), ORCA ``OpenRcaService``
    (reporting for orca_ranks, default every rank), health and reflection.
    api_key guards every method but health and ORCA (see loadsvc.surfaces.orca).
    max_streams: WatchLoads streams, and ORCA streams, open at once (each kind).
    """
    load = add_load_services(server, store, sglang=sglang, health=health, reflection=reflection,
                             api_key=api_key, extra_services=(ORCA_SERVICE,) if orca else (),
                             max_streams=max_streams)
    orca_service = None
    if orca:
        orca_service = add_orca_service(server, store, ranks=orca_ranks,
                                        min_report_interval=orca_min_report_interval,
                                        max_streams=max_streams)
    return GrpcSurfaces(load, orca_service)
