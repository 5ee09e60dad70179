"""RegionWriter (loadsvc/core/writer.py): how serve's own writers (the relay collector, the intakes) write ranks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loadsvc import LoadSnapshot, ShmPublisher, ShmReader
from loadsvc.core import writer as region_writer
from loadsvc.core.writer import RegionWriter, WriteRefused


def refused(w: RegionWriter, rank: int, running: int = 1) -> str:
    with pytest.raises(WriteRefused) as e:
        w.write(rank, LoadSnapshot(num_running_reqs=running), 123)
    return e.value.reason


def test_writes_ranks_with_the_given_time_and_refuses_what_the_region_cannot_take(shm_path: Path) -> None:
    w = RegionWriter(shm_path)
    assert refused(w, 0) == "no_region"  # no file and no dp_size
    w = RegionWriter(shm_path, dp_size=2, mode=0o640)
    w.write(1, LoadSnapshot(num_running_reqs=7), 1_000_000_000)
    assert oct(os.stat(shm_path).st_mode & 0o777) == "0o640"
    with ShmReader(shm_path) as reader:
        snap = reader.read(1)
        assert (snap.dp_rank, snap.num_running_reqs, snap.publish_time_ns) == (1, 7, 1_000_000_000)
    assert refused(w, 2) == "rank_out_of_range"
    w.close()
    assert RegionWriter(shm_path).dp_size() == 2  # without --dp-size: the file's


def test_a_rank_a_live_publisher_owns_is_refused_then_taken_once_free(shm_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(region_writer, "CLAIM_RETRY", 0.0)
    local = ShmPublisher(shm_path, dp_size=2, dp_rank=0)
    w = RegionWriter(shm_path)
    assert refused(w, 0) == "rank_owned"
    w.write(1, LoadSnapshot(num_running_reqs=3), 5)  # another rank is fine
    local.close()
    w.write(0, LoadSnapshot(num_running_reqs=4), 6)
    with ShmReader(shm_path) as reader:
        assert [s.num_running_reqs for s in reader.read_all()] == [4, 3]
    w.close()


def test_a_truncated_region_is_refused_never_a_sigbus_and_a_new_one_is_taken(shm_path: Path) -> None:
    w = RegionWriter(shm_path, dp_size=2)
    w.write(0, LoadSnapshot(num_running_reqs=1), 1)
    size = os.stat(shm_path).st_size
    os.truncate(shm_path, 0)  # what a hostile local process can do to serve's writers
    assert refused(w, 0) == "region_error"  # this process is still alive: no write went through the mapping
    shm_path.unlink()
    w.check_region()
    w.write(0, LoadSnapshot(num_running_reqs=2), 2)  # a fresh region, created with dp_size 2
    assert os.stat(shm_path).st_size == size
    with ShmReader(shm_path) as reader:
        assert reader.read(0).num_running_reqs == 2
    w.close()
