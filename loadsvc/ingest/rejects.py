"""Counting and rate-limited logging of what an intake refuses (a frame, a scrape, a rank)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

__all__ = ["Rejects", "LOG_EVERY"]

LOG_EVERY = 10.0  # seconds: at most one log line per reason in this interval


class Rejects:
    """``rejects(reason, detail)``: +1 on the counter's ``reason`` child and in ``counts``, one log line
    per reason per LOG_EVERY seconds (with how many were not logged since).

    counter: a prometheus_client Counter with a ``reason`` label (or ``label``); reasons: every reason it may
    see (their children exist from the start, so /metrics lists them at 0); what: the subject
    of the log line ("SGLang frame", "scrape", ...).
    """

    def __init__(self, counter: Any, reasons: dict[str, str], what: str, logger: logging.Logger, *,
                 label: str = "reason") -> None:
        self._children = {r: counter.labels(**{label: r}) for r in reasons}
        self.counts: dict[str, int] = dict.fromkeys(reasons, 0)
        self._what = what
        self._log = logger
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, reason: str, detail: str, exc_info: bool = False) -> None:
        self.counts[reason] += 1
        self._children[reason].inc()
        now = time.monotonic()
        if now - self._last_log.get(reason, -math.inf) >= LOG_EVERY:
            suppressed = self._suppressed.pop(reason, 0)
            more = f" (+{suppressed} more since the last line)" if suppressed else ""
            self._log.warning("refused a %s [%s]: %s%s", self._what, reason, detail, more, exc_info=exc_info)
            self._last_log[reason] = now
        else:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
