"""``GET /v1/loads`` (and ``/get_load``) from vLLM's own HTTP server: a plain ASGI middleware.

    vllm ... --middleware loadsvc.engines.vllm.middleware.LoadsMiddleware

    request --> LoadsMiddleware --GET|HEAD /v1/loads--> the same answer as `loadsvc serve`
                      |                                  (store over LOADSVC_SHM, JSON or
                      |                                  Prometheus, dp_rank/include, API key)
                      +--GET|HEAD /get_load--> {"load": running + waiting} (vllm-router)
                      +--every other request--> vLLM

vLLM adds a middleware class with ``app.add_middleware(cls)``, no arguments, so
this one reads its settings from the environment (LOADSVC_SHM, LOADSVC_API_KEY,
LOADSVC_STALE_AFTER, LOADSVC_UNREACHABLE_AFTER: loadsvc/engines/vllm/settings.py).
A router that only knows the worker's URL (the SGLang gateway polls
``/v1/loads`` first, vllm-router's ``power_of_two`` polls ``/get_load``, which
stock vLLM does not serve) then reads loadsvc's numbers from vLLM itself. Nothing in
it is specific to vLLM: ``LoadsMiddleware(app, store=..., api_key=...)`` wraps
any ASGI app.

vLLM's ``--api-key`` guards vLLM's routes, not these (the middleware answers
before vLLM's own): set ``LOADSVC_API_KEY`` to guard ``/v1/loads`` and
``/get_load`` (vllm-router sends no key when it polls ``/get_load``).
"""

from __future__ import annotations

from typing import Any

from loadsvc.core.store import LoadStore
from loadsvc.embed import open_store
from loadsvc.engines.vllm.settings import VllmSettings
from loadsvc.surfaces.rest import get_load_responder, loads_responder

__all__ = ["LoadsMiddleware"]


class LoadsMiddleware:
    """Answers GET and HEAD ``/v1/loads`` and ``/get_load`` over a loadsvc store; the rest goes to app."""

    def __init__(self, app: Any, *, store: LoadStore | None = None, api_key: str | None = None,
                 registry: Any = None) -> None:
        self.app = app
        if store is None:
            settings = VllmSettings.from_env()
            store = open_store(settings.shm, stale_after=settings.stale_after,
                               unreachable_after=settings.unreachable_after)
            api_key = api_key if api_key is not None else settings.api_key
        if registry is None:
            from prometheus_client import (
                REGISTRY as registry,  # the host's /metrics shows the counters
            )
        self.store = store
        self._routes = {"/v1/loads": loads_responder(store, api_key=api_key, registry=registry),
                        "/get_load": get_load_responder(store, api_key=api_key, registry=registry)}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        respond = self._routes.get(scope["path"]) if scope["type"] == "http" else None
        if respond is not None and scope["method"] in ("GET", "HEAD"):
            status, body, headers = respond(scope)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body",
                        "body": b"" if scope["method"] == "HEAD" else body})
            return
        await self.app(scope, receive, send)
