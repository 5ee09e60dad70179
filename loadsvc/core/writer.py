"""RegionWriter: writes ranks that arrive from outside the process into the node's region.

    relay collector, SGLang subscriber, scraper (each its own thread)
        --write(rank, snapshot, t)--> RegionWriter
        region dp_size: --dp-size, else the existing file's        |
        one ShmPublisher per rank, claimed on its first write      v
        (a rank a live local publisher owns is refused and   slot r of the region
         retried every CLAIM_RETRY s)                        (publish time = t)

The one home of the rules every writer inside `loadsvc serve` follows: one
writer per rank; a rank owned by another live publisher (an engine on this
node, the collector, another intake) is refused rather than overwritten and
retried every CLAIM_RETRY s; slots are written with pwrite (PwritePublisher),
never through the mapping, so a file truncated under serve cannot kill it with
SIGBUS, and a truncated file is noticed before a write and reopened later; a
removed or replaced region file (``check_region``, about once a second) is
reopened on a later write.

Each writer of serve (the relay collector, each intake) owns one RegionWriter
and calls it from its own thread only. Refusals are ``WriteRefused`` with a
reason of ``WRITE_REASONS``, which the caller counts and logs like its own
rejects.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from loadsvc.core.region import PwritePublisher, RegionError, ShmPublisher, ShmReader

__all__ = ["RegionWriter", "WriteRefused", "WRITE_REASONS", "CLAIM_RETRY", "REGION_CHECK"]

log = logging.getLogger("loadsvc.region")

CLAIM_RETRY = 2.0  # seconds before retrying a rank another live publisher owns
REGION_CHECK = 1.0  # seconds between checks that the region file is still the same

WRITE_REASONS: dict[str, str] = {
    "no_region": "no region yet and no --dp-size to create one",
    "rank_out_of_range": "the rank is outside the region's dp_size",
    "rank_owned": "another live publisher owns that rank (an engine, the relay, another intake)",
    "slot_overflow": "snapshot larger than the region's slot",
    "region_error": "the region could not be opened for writing (or was truncated)",
}


class WriteRefused(Exception):
    """A write the region would not take; ``reason`` is one of WRITE_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class RegionWriter:
    """Writes snapshots of any rank into the region at path (one PwritePublisher per rank).

    dp_size: create the region with that many ranks if missing (serve's --dp-size);
    without it the existing file's is used. mode: a created region's file mode.
    """

    def __init__(self, path: str | os.PathLike[str], *, dp_size: int | None = None,
                 mode: int = 0o600) -> None:
        self.path = Path(path)
        self._given_dp_size = dp_size
        self._mode = mode
        self._pubs: dict[int, ShmPublisher] = {}
        self._claim_retry_at: dict[int, float] = {}
        self._region_identity: tuple[int, int] | None = None
        self._dp_size: int | None = None
        self._dp_size_checked = -math.inf

    def dp_size(self) -> int | None:
        """dp_size of the region: --dp-size, else the existing file's (None: no region yet)."""
        if self._dp_size is not None:
            return self._dp_size
        if self._given_dp_size is not None:
            self._dp_size = self._given_dp_size
            return self._dp_size
        now = time.monotonic()
        if now - self._dp_size_checked < 0.5:  # do not open the file for every write
            return None
        self._dp_size_checked = now
        try:
            with ShmReader(self.path) as reader:
                self._dp_size = reader.dp_size
        except RegionError:
            return None
        return self._dp_size

    def write(self, rank: int, snapshot: Any, received_ns: int) -> None:
        """Publish snapshot as rank's, stamped received_ns; WriteRefused when it cannot be."""
        size = self.dp_size()
        if size is None:
            raise WriteRefused("no_region", f"no region at {self.path} and no --dp-size to create it; "
                                            "start serve with --dp-size N")
        if not 0 <= rank < size:
            raise WriteRefused("rank_out_of_range", f"dp_rank {rank} outside the region's 0..{size - 1} "
                                                    "(--dp-size)")
        pub = self._pubs.get(rank)
        if pub is None:
            pub = self._claim(rank, size)
        if not pub.mapping_intact():
            # A truncated file: the write would not fault (pwrite) but land in a broken region.
            self.close()
            raise WriteRefused("region_error", f"dp_rank {rank}: region {self.path} was truncated under "
                                               "serve; reopening it on a later write")
        snapshot.dp_rank = rank
        try:
            pub.publish(snapshot, publish_time_ns=received_ns)
        except ValueError as e:
            raise WriteRefused("slot_overflow", f"dp_rank {rank}: {e}") from None
        except OSError as e:  # pwrite into a file truncated since the check (ENOSPC, EFBIG)
            self.close()
            raise WriteRefused("region_error", f"dp_rank {rank}: cannot write {self.path}: "
                                               f"{e.strerror}") from None

    def _claim(self, rank: int, size: int) -> ShmPublisher:
        now = time.monotonic()
        if self._claim_retry_at.get(rank, 0.0) > now:
            raise WriteRefused("rank_owned", f"dp_rank {rank} is owned by another publisher of {self.path}")
        try:
            # pwrite, not stores into the mapping: a file truncated under serve must not kill it
            pub = PwritePublisher(self.path, dp_size=size, dp_rank=rank, mode=self._mode)
        except RegionError as e:
            # ShmPublisher says "already" only when another live writer holds the rank.
            if "already" in str(e):
                self._claim_retry_at[rank] = now + CLAIM_RETRY
                raise WriteRefused("rank_owned", f"dp_rank {rank}: {e}") from None
            self._dp_size = None
            self._dp_size_checked = -math.inf  # look at the region again
            raise WriteRefused("region_error", f"dp_rank {rank}: {e}") from None
        except (OSError, ValueError) as e:
            raise WriteRefused("region_error", f"dp_rank {rank}: cannot open {self.path}: {e}") from None
        self._claim_retry_at.pop(rank, None)
        if self._region_identity is None:
            try:
                st = os.stat(self.path)
                self._region_identity = (st.st_dev, st.st_ino)
            except OSError:
                pass  # removed already: the next check starts afresh
        self._pubs[rank] = pub
        return pub

    def check_region(self) -> None:
        """Start afresh when the region file was removed or replaced (call about once a second)."""
        if self._region_identity is None:
            return
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._region_identity
        except OSError:
            same = False
        if not same:
            log.warning("region %s was removed or replaced; reopening on the next write", self.path)
            self.close()

    def close(self) -> None:
        """Release every rank (their slots keep the last write, which then ages)."""
        for pub in self._pubs.values():
            pub.close()
        self._pubs.clear()
        self._region_identity = None
        if self._given_dp_size is None:
            self._dp_size = None
            self._dp_size_checked = -math.inf
