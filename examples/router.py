"""A toy router: watches loadsvc's WatchLoads stream and prints the rank it would pick.

    loadsvc serve (node0) --WatchLoads (gRPC stream)--> this router
                                                          keeps the latest loads,
                                                          picks with power of two choices

Power of two choices: sample two distinct healthy ranks at random and route to
the less loaded one (running + waiting requests, then token usage). It needs no
global sort and avoids the herd effect of always picking the single least
loaded rank from a view that is a few milliseconds old.

    python examples/router.py --grpc 127.0.0.1:50051            # until Ctrl-C
    python examples/router.py --grpc node0:50051 --count 5      # five picks, then exit

One line per stream message (at most --picks-per-second; a heartbeat at least
every second). When the server is unreachable it says so and reconnects.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
from typing import Any

import grpc

from loadsvc._proto.loadsvc.v1 import loads_pb2 as pb
from loadsvc._proto.loadsvc.v1 import loads_pb2_grpc as pb_grpc

HEALTHY = pb.LOAD_STATUS_HEALTHY
RECONNECT = 1.0  # seconds between attempts while the server is unreachable


def load_score(load: Any) -> tuple[int, float]:
    """What the router minimises: queued work first, then KV-cache pressure."""
    return (load.num_running_reqs + load.num_waiting_reqs, load.token_usage)


def pick_p2c(loads: list[Any], rng: random.Random) -> tuple[Any, Any | None] | None:
    """(chosen, the other candidate) among healthy ranks; None when no rank is healthy."""
    healthy = [load for load in loads if load.status == HEALTHY]
    if not healthy:
        return None
    if len(healthy) == 1:
        return healthy[0], None
    a, b = rng.sample(healthy, 2)
    return (a, b) if load_score(a) <= load_score(b) else (b, a)


def describe(choice: tuple[Any, Any | None] | None, loads: list[Any]) -> str:
    healthy = sum(1 for load in loads if load.status == HEALTHY)
    if choice is None:
        return f"no healthy rank (of {len(loads)} published): would hold the request"
    chosen, other = choice
    running, waiting = chosen.num_running_reqs, chosen.num_waiting_reqs
    text = (f"pick rank {chosen.dp_rank} (running {running} + waiting {waiting}, "
            f"token usage {chosen.token_usage:.0%})")
    if other is not None:
        text += f" over rank {other.dp_rank} ({other.num_running_reqs} + {other.num_waiting_reqs})"
    return f"{text}  [{healthy}/{len(loads)} healthy]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Print the rank a power-of-two-choices router would pick "
                                            "from loadsvc's live WatchLoads stream.")
    p.add_argument("--grpc", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="loadsvc gRPC address (default %(default)s)")
    p.add_argument("--picks-per-second", type=float, default=2.0,
                   help="at most this many picks (stream messages) per second (default %(default)s)")
    p.add_argument("--count", type=int, default=None, help="exit after this many picks")
    p.add_argument("--seed", type=int, default=None, help="random seed for the two choices")
    p.add_argument("--api-key", default=None, help="bearer token for a server started with --api-key")
    return p


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    min_interval_ms = int(1000 / args.picks_per_second) if args.picks_per_second > 0 else 0
    request = pb.WatchLoadsRequest(min_interval_ms=min_interval_ms, max_interval_ms=1000,
                                   include=["core"])
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    picks = 0
    print(f"router: watching {args.grpc} (power of two choices)", flush=True)
    while True:
        channel = grpc.insecure_channel(args.grpc)
        try:
            stream = pb_grpc.LoadServiceStub(channel).WatchLoads(request, metadata=metadata)
            for response in stream:
                loads = list(response.loads)
                print(f"{time.strftime('%H:%M:%S')} {describe(pick_p2c(loads, rng), loads)}", flush=True)
                picks += 1
                if args.count is not None and picks >= args.count:
                    stream.cancel()
                    return 0
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code == grpc.StatusCode.CANCELLED:
                return 0
            print(f"router: {args.grpc} {code.name if code else 'error'}: "
                  f"{e.details() if hasattr(e, 'details') else e}; retrying in {RECONNECT:.0f} s",
                  flush=True)
        finally:
            channel.close()
        time.sleep(RECONNECT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `docker compose stop`
    try:
        return run(args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
