"""An SGLang-style load publisher process for tests/test_ingest_sglang.py (not a test module).

    python sglang_publisher.py --impl sglang|wire --base PORT --dp-size N

--impl sglang runs SGLang's own code: ``SchedulerLoadPublisher`` of SGLang 0.5.23
(sglang/srt/managers/scheduler_components/load_publisher.py), imported from the
unpacked wheel of loadsvc.bench.sglang_env (PYTHONPATH=its src/) without the
package __init__ files, which import torch. It is configured as SGLang's
scheduler does (``--kv-events-config`` with a tcp endpoint,
``--load-publish-endpoint tcp://*:BASE``: rank r binds BASE + r); only its one
side effect, ``_open_pub_socket``, is wrapped to bind 127.0.0.1 instead of every
interface (SGLang's own tests stub the same function).

--impl wire is a publisher written from the wire shape (loadsvc.ingest.sglang.encode_frame),
with SGLang's rules: sequence 0, 1, ... per process, a changed stat at once, an
unchanged one every second, PUB high-water mark 8.

Both emulate a scheduler's idle loop: every 20 ms each rank's current load is
offered (force=True, as SGLang's on_idle does). stdin takes one JSON object per
line, {"rank": R, "num_running_reqs": ..., ...} (LoadSnapshot field names; missing
ones stay as they were), or "quit". "ready" is printed once every socket is bound.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

FIELDS = ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "max_total_num_tokens",
          "num_waiting_uncached_tokens", "num_total_tokens", "max_running_requests",
          "total_prefill_uncached_tokens", "total_prefill_busy_us")


def sglang_publishers(base: int, dp_size: int) -> list[Any]:
    """One SGLang SchedulerLoadPublisher per rank, built as SGLang's scheduler builds it."""
    src = next(Path(p) for p in sys.path if (Path(p) / "sglang" / "srt").is_dir())
    for name in ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.managers",
                 "sglang.srt.managers.scheduler_components", "sglang.srt.arg_groups",
                 "sglang.srt.disaggregation"):
        package = types.ModuleType(name)
        package.__path__ = [str(src / name.replace(".", "/"))]  # the directory, not its __init__
        sys.modules[name] = package
    kv_events = importlib.import_module("sglang.srt.disaggregation.kv_events")
    load_publisher = importlib.import_module("sglang.srt.managers.scheduler_components.load_publisher")
    assert "torch" not in sys.modules

    rank = [0]

    def parallel() -> SimpleNamespace:  # what SGLang's runtime context says for pure DP rank r
        return SimpleNamespace(pp_rank=0, attn_tp_rank=0, attn_cp_rank=0, num_dp_ranks=dp_size,
                               attn_dp_size=1, attn_dp_rank=0, dp_rank=rank[0])

    kv_events.get_parallel = parallel
    load_publisher.get_parallel = parallel
    bind = load_publisher._open_pub_socket
    load_publisher._open_pub_socket = lambda endpoint: bind(endpoint.replace("tcp://*:", "tcp://127.0.0.1:"))
    kv_config = json.dumps({"publisher": "zmq", "endpoint": f"tcp://*:{base + dp_size}"})  # never bound here
    pubs = []
    for r in range(dp_size):
        rank[0] = r
        pub = load_publisher.SchedulerLoadPublisher(kv_events_config=kv_config,
                                                    load_publish_endpoint=f"tcp://*:{base}")
        if not pub.enable:
            raise SystemExit(f"SGLang's publisher for rank {r} did not bind (see its warning above)")
        pubs.append(pub)
    return [lambda load, p=p: p.publish_load_stat(lambda: load, force=True) for p in pubs]


def wire_publishers(base: int, dp_size: int) -> list[Any]:
    """The same rules, written from the wire shape with loadsvc's encode_frame."""
    import zmq

    from loadsvc.ingest.sglang import encode_frame

    ctx = zmq.Context.instance()
    out = []
    for r in range(dp_size):
        sock = ctx.socket(zmq.PUB)
        sock.set_hwm(8)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{base + r}")
        state = {"seq": 0, "last": None, "at": 0.0}

        def publish(load: SimpleNamespace, sock: Any = sock, state: dict[str, Any] = state, r: int = r) -> None:
            counts = tuple(getattr(load, f) for f in FIELDS)
            now = time.monotonic()
            if counts == state["last"] and now - state["at"] < 1.0:
                return
            c = counts
            sock.send_multipart(encode_frame(state["seq"], c[0], c[1], c[2], c[3], r, *c[4:]))
            state.update(seq=state["seq"] + 1, last=counts, at=now)

        out.append(publish)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["sglang", "wire"], required=True)
    parser.add_argument("--base", type=int, required=True)
    parser.add_argument("--dp-size", type=int, default=1)
    args = parser.parse_args()
    make = sglang_publishers if args.impl == "sglang" else wire_publishers
    publish = make(args.base, args.dp_size)
    loads = [SimpleNamespace(**dict.fromkeys(FIELDS, 0)) for _ in range(args.dp_size)]
    lock = threading.Lock()
    done = threading.Event()

    def apply(line: str) -> None:
        command = json.loads(line)
        r = command.pop("rank")
        with lock:
            loads[r] = SimpleNamespace(**{**vars(loads[r]), **command})

    def reader() -> None:
        for line in sys.stdin:
            line = line.strip()
            if line == "quit":
                break
            if line:
                apply(line)
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    print("ready", flush=True)
    while not done.is_set():
        with lock:
            current = list(loads)
        for r, load in enumerate(current):
            publish[r](load)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
