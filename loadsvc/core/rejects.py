"""Counting and rate-limited logging of what an intake refuses: a relay frame, an SGLang frame, a scrape.

    LogLimiter   at most one log line per key per LOG_EVERY seconds, saying how many were held back
    Rejects      rejects(reason, detail): +1 on a Prometheus counter's reason child and in counts,
                 then a line through a LogLimiter keyed on the reason

Every intake (loadsvc.relay.collector, loadsvc.ingest.sglang, loadsvc.ingest.scrape) counts
its refusals here, so a flood of bad input costs a counter increment, never a log line each.
LogLimiter alone also holds down the lines of the HTTP limits (connections closed), the gRPC
stream limit and the store's region events: whatever a client or a local process can repeat.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["LogLimiter", "Rejects", "LOG_EVERY"]

LOG_EVERY = 10.0  # seconds: at most one log line per key (a reject reason) in this interval


class LogLimiter:
    """``limiter(key, level, msg, *args)``: logs at most once per key per LOG_EVERY seconds; the next
    line that goes out ends with how many were held back since the last one."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < LOG_EVERY:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._log.log(level, msg + "%s", *args, f" (+{held} more since the last line)" if held else "",
                      exc_info=exc_info)
        self._last[key] = now


class Rejects:
    """``rejects(reason, detail)``: +1 on the counter's ``reason`` child and in ``counts``, one log line
    per reason per LOG_EVERY seconds ("refused a {what} [{reason}]: {detail}").

    counter: a prometheus_client Counter with a ``reason`` label (or ``label``); reasons: every reason it may
    see (their children exist from the start, so /metrics lists them at 0); what: the subject
    of the log line ("relay frame", "SGLang frame", "scrape", ...).
    """

    def __init__(self, counter: Any, reasons: Iterable[str], what: str, logger: logging.Logger, *,
                 label: str = "reason") -> None:
        self._children = {r: counter.labels(**{label: r}) for r in reasons}
        self.counts: dict[str, int] = dict.fromkeys(self._children, 0)
        self._what = what
        self._limiter = LogLimiter(logger)

    def __call__(self, reason: str, detail: str, exc_info: bool = False, level: int = logging.WARNING) -> None:
        self.counts[reason] += 1
        self._children[reason].inc()
        self._limiter(reason, level, "refused a %s [%s]: %s", self._what, reason, detail, exc_info=exc_info)
