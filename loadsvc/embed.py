"""Serve loadsvc from an engine's own HTTP and gRPC servers, one line each.

    engine ranks --ShmPublisher--> region <--open_store()-- LoadStore (one per process)
                                                  |
               +----------------------------------+--------------------------------+
               v                                                                   v
    app.include_router(loads_router(store))              add_to_grpc_server(server, store)
    GET /v1/loads (as `loadsvc serve` serves it)         loadsvc.v1.LoadService, SGLang GetLoads,
                                                         ORCA OpenRcaService, health, reflection

Routers that poll the engine itself then see loadsvc's view: the SGLang gateway
polls each worker's ``/v1/loads``, vllm-router's ``power_of_two`` its
``/get_load`` (``loads_router(store, get_load=True)``), and gRPC
``weighted_round_robin`` clients (and Envoy) read ORCA on the very connection
they balance. The store reads the same region
as ``loadsvc serve`` would; nothing is published twice.

    store = open_store("/dev/shm/loadsvc-default.shm")
    app.include_router(loads_router(store))           # FastAPI
    add_to_grpc_server(server, store)                  # grpc.aio, before server.start()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loadsvc.core.region import (
    DEFAULT_STALE_AFTER,
    DEFAULT_UNREACHABLE_AFTER,
    default_path,
)
from loadsvc.core.store import LoadStore
from loadsvc.settings import StoreSettings
from loadsvc.surfaces.orca import MIN_REPORT_INTERVAL
from loadsvc.surfaces.services import GrpcSurfaces, add_grpc_surfaces

if TYPE_CHECKING:
    import grpc
    from fastapi import APIRouter
    from prometheus_client import CollectorRegistry

__all__ = ["open_store", "loads_router", "add_to_grpc_server", "GrpcSurfaces"]


def open_store(path: str | os.PathLike[str] | None = None, *, dp_size: int | None = None,
               stale_after: float = DEFAULT_STALE_AFTER,
               unreachable_after: float = DEFAULT_UNREACHABLE_AFTER,
               region_mode: int = 0o600, poll_interval: float = 0.001) -> LoadStore:
    """A LoadStore over the region at path (default ``/dev/shm/loadsvc-default.shm``).

    dp_size creates the region with that many ranks if it does not exist yet;
    without it the store reports no ranks until a publisher creates the region.
    The store refreshes on every read; ``await store.start()`` in the serving
    loop also runs its poll task (the gRPC surface starts it for WatchLoads).
    """
    if not stale_after > 0:
        raise ValueError(f"stale_after must be > 0 seconds, got {stale_after}")
    if not unreachable_after >= stale_after:
        raise ValueError(f"unreachable_after ({unreachable_after}) must be >= stale_after ({stale_after})")
    shm = default_path() if path is None else Path(path)
    return LoadStore(StoreSettings(shm=shm, dp_size=dp_size, stale_after=stale_after,
                                   unreachable_after=unreachable_after, region_mode=region_mode,
                                   poll_interval=poll_interval))


def loads_router(store: LoadStore, *, api_key: str | None = None, health: bool = False,
                 metrics: bool = False, registry: CollectorRegistry | None = None,
                 get_load: bool = False) -> APIRouter:
    """A FastAPI APIRouter serving ``GET /v1/loads`` over store, exactly as ``loadsvc serve`` does.

    ``app.include_router(loads_router(store))`` in the engine's FastAPI app. Only
    ``/v1/loads`` by default: an engine has its own ``/health`` (and often
    ``/metrics``); health=True / metrics=True add loadsvc's (registry: the
    prometheus_client CollectorRegistry /metrics exposes). get_load=True adds
    ``GET /get_load``, ``{"load": running + waiting}``: what vllm-router's
    ``power_of_two`` polls on each worker. api_key: when set, ``/v1/loads``,
    ``/get_load`` and ``/metrics`` need ``Authorization: Bearer <api_key>``.
    """
    from loadsvc.surfaces.rest import create_router

    return create_router(store, api_key=api_key, registry=registry, health=health, metrics=metrics,
                         get_load=get_load)


def add_to_grpc_server(server: grpc.aio.Server, store: LoadStore, *, sglang: bool = True,
                       orca: bool = True, orca_ranks: Sequence[int] | None = None,
                       health: bool = True, reflection: bool = True,
                       api_key: str | None = None,
                       orca_min_report_interval: float = MIN_REPORT_INTERVAL) -> GrpcSurfaces:
    """Add loadsvc's gRPC services over store to an engine's ``grpc.aio`` server (before it starts).

    Adds ``loadsvc.v1.LoadService``, the SGLang-compatible ``GetLoads`` (sglang=False
    for an engine that already serves ``SglangScheduler``), ORCA
    ``OpenRcaService`` (reporting for orca_ranks, default every rank), health and
    reflection. api_key guards every method but health and ORCA (see loadsvc.surfaces.orca).
    Call it from async code; ``await surfaces.aclose()`` before ``server.stop()``.
    """
    return add_grpc_surfaces(server, store, sglang=sglang, orca=orca, orca_ranks=orca_ranks,
                             health=health, reflection=reflection, api_key=api_key,
                             orca_min_report_interval=orca_min_report_interval)
