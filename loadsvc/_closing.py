"""Closing: how an object that owns an OS resource (a mapping, a file, a ZMQ socket) is released.

    class ShmReader(Closing):
        def close(self) -> None: ...      # idempotent
    with ShmReader(path) as r: ...        # closed at the end of the block
                                          # and, failing that, when collected

Used by ShmPublisher, ShmReader (loadsvc/core/region.py) and ZmqPublisher
(loadsvc/relay/publisher.py).
"""

from __future__ import annotations

from typing import Self

__all__ = ["Closing"]


class Closing:
    """A context manager whose exit calls close(); close() must be idempotent, since it also
    runs from __del__ (after an explicit close, or on an object whose __init__ failed)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # a half-built object, or interpreter shutdown: nothing sensible left to do
            pass
