"""The routing benchmark's oracle: one router that sees all traffic and the engines' exact state.

    bench client --every request--> OracleRouter --routed: the best engine now--> engine i
                  (direct ones carry                \\--x-loadsvc-direct: j--> engine j (as sent)
                   x-loadsvc-direct: j)
    score(engine) = (1 + max(0, q + 1 - M) / M) * (1 + min(q + 1, M) / knee) / speed
                    q: requests in flight there now (exact), M: max_running_requests

It bounds what any router can do in `loadsvc bench routing`: the share of the
trace that bypasses the routers (--direct) still lands on the engine it was
sent to, but passes through the oracle, so its count of requests in flight on
every engine is exact at every decision (no publish period, no view lag, no
other router). Each routed request goes to the engine where it should finish
soonest, over every engine (not two drawn at random), by the toy engine's own
timing model (loadsvc/tools/engine.py): it joins the batch at once below M, else
waits for q + 1 - M of the M slots to turn over; every step takes
(1 + batch / knee) / speed. The speeds and knee are the engines' settings, not
estimates. Ties are broken at random (seeded).

    python -m loadsvc.bench.oracle --port 8099 --max-running 8 --batch-knee 32 \\
        --worker http://127.0.0.1:30000=1 --worker http://127.0.0.1:30010=0.5
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import random
import sys
from typing import TYPE_CHECKING, Any

from loadsvc._hosting import bind_tcp, run, serve_until_signal
from loadsvc.settings import RouterSettings, RouterWorker
from loadsvc.tools.router import Router

if TYPE_CHECKING:
    from loadsvc.tools.router import _Target, _Worker

__all__ = ["OracleRouter", "DIRECT_HEADER", "main"]

log = logging.getLogger("loadsvc.bench.oracle")

DIRECT_HEADER = "x-loadsvc-direct"  # its value: the index of the engine a direct request goes to
_DIRECT: contextvars.ContextVar[int | None] = contextvars.ContextVar("direct", default=None)


class OracleRouter(Router):
    """Router with exact in-flight counts and no loads stream: see the module docstring."""

    def __init__(self, urls: list[str], speeds: list[float], *, max_running: int, batch_knee: float,
                 seed: int = 0) -> None:
        if len(urls) != len(speeds) or not urls:
            raise ValueError(f"one speed per engine: {len(urls)} engines, {len(speeds)} speeds")
        if not all(s > 0 for s in speeds) or max_running < 1 or not batch_knee > 0:
            raise ValueError(f"speeds and batch_knee must be > 0, max_running >= 1; got {speeds}, "
                             f"{batch_knee}, {max_running}")
        # round_robin: the base class then opens no WatchLoads stream (the oracle needs none)
        super().__init__(RouterSettings(workers=tuple(RouterWorker(url=u, grpc="-:0") for u in urls),
                                        policy="round_robin"))
        self.speeds = speeds
        self.max_running = max_running
        self.batch_knee = batch_knee
        self._tie = random.Random(seed)

    def expected(self, i: int) -> float:
        """Time for a new request on engine i, in units of one idle step at speed 1."""
        q, m = self.workers[i].inflight, self.max_running
        return (1.0 + max(0, q + 1 - m) / m) * (1.0 + min(q + 1, m) / self.batch_knee) / self.speeds[i]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        direct = None
        if scope["type"] == "http":
            raw = dict(scope["headers"]).get(DIRECT_HEADER.encode())
            if raw is not None:
                direct = int(raw) if raw.isdigit() else -1
                if not 0 <= direct < len(self.workers):
                    body = json.dumps({"error": f"{DIRECT_HEADER}: expected an engine index in "
                                                f"0..{len(self.workers) - 1}, got {raw.decode()!r}"})
                    await send({"type": "http.response.start", "status": 400,
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": body.encode()})
                    return
        token = _DIRECT.set(direct)
        try:
            await super().__call__(scope, receive, send)
        finally:
            _DIRECT.reset(token)

    def pick(self) -> tuple[_Worker, _Target | None]:
        direct = _DIRECT.get()
        if direct is not None:
            return self.workers[direct], None
        best = min(range(len(self.workers)), key=lambda i: (self.expected(i), self._tie.random()))
        return self.workers[best], None


def _parse_worker(text: str) -> tuple[str, float]:
    url, sep, speed = text.rpartition("=")
    try:
        value = float(speed)
    except ValueError:
        value = 0.0
    if not sep or not url.startswith("http") or not value > 0:
        raise argparse.ArgumentTypeError(f"expected URL=SPEED (the engine's --speeds, > 0), got {text!r}")
    return url.rstrip("/"), value


async def _serve(args: argparse.Namespace) -> None:
    sock = bind_tcp(args.host, args.port, "the oracle's HTTP (--port)")
    urls = [u for u, _ in args.worker]
    router = OracleRouter(urls, [c for _, c in args.worker], max_running=args.max_running,
                          batch_knee=args.batch_knee, seed=args.seed)
    await router.start()
    try:
        await serve_until_signal(router, sock, args.host, args.port, what="oracle HTTP")
    finally:
        await router.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadsvc.bench.oracle",
                                     description="The routing benchmark's oracle router.")
    parser.add_argument("--worker", type=_parse_worker, action="append", required=True,
                        metavar="URL=SPEED",
                        help="an engine's HTTP URL and its speed (its --speeds) (repeat per engine)")
    parser.add_argument("--max-running", type=int, default=8,
                        help="the engines' max_running_requests (default %(default)s)")
    parser.add_argument("--batch-knee", type=float, default=32.0,
                        help="the engines' --batch-knee (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tie breaks (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8099, help="HTTP port (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run(_serve(args))
    except OSError as e:
        log.error("the oracle cannot start: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
