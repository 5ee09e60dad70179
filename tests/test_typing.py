"""The public API as a type checker sees it: real types, not Any.

A user's code calling LoadSnapshot, ShmPublisher, ShmReader, open_store, loads_router and
add_to_grpc_server is checked with `mypy --strict` (in process, with the project's
[tool.mypy] settings): what it reveals is asserted, and mistakes a user would make are
errors. The library's own `mypy` run is in .ci/run.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = """
    from pathlib import Path

    import grpc

    from loadsvc import (
        AggregateMetrics,
        LoadSnapshot,
        MemoryMetrics,
        ShmPublisher,
        ShmReader,
        Status,
        add_to_grpc_server,
        loads_router,
        open_store,
    )

    snap = LoadSnapshot(dp_rank=0, num_running_reqs=3, memory=MemoryMetrics(kv_cache_gb=1.5))
    reveal_type(snap.num_running_reqs)
    reveal_type(snap.token_usage)
    reveal_type(snap.memory)
    reveal_type(snap.status)
    with ShmPublisher(Path("/dev/shm/x.shm"), dp_size=1, dp_rank=0) as pub:
        reveal_type(pub)
        reveal_type(pub.publish(snap))
    with ShmReader(Path("/dev/shm/x.shm")) as reader:
        reveal_type(reader.read(0))
        reveal_type(reader.read_all())
        reveal_type(reader.freshness(snap))
    store = open_store("/dev/shm/x.shm")
    reveal_type(store.view().snapshots)
    reveal_type(store.view().aggregate)
    reveal_type(loads_router(store))
    reveal_type(add_to_grpc_server(grpc.aio.server(), store))
    healthy: bool = snap.status is Status.HEALTHY
    total: AggregateMetrics = AggregateMetrics(total_reqs=1)
"""

REVEALED = [
    "int",
    "float",
    "loadsvc.core._structs.MemoryMetrics | None",
    "loadsvc.core._structs.Status",
    "loadsvc.core.region.ShmPublisher",
    "int",
    "loadsvc.core._structs.LoadSnapshot | None",
    "builtins.list[loadsvc.core._structs.LoadSnapshot]",
    "tuple[loadsvc.core._structs.Status, builtins.float]",
    "builtins.tuple[loadsvc.core._structs.LoadSnapshot, ...]",
    "def (sel: loadsvc.core.store.Selection) -> loadsvc.core._structs.AggregateMetrics",
    "fastapi.routing.APIRouter",
    "loadsvc.surfaces.services.GrpcSurfaces",
]

MISTAKES = """
    from pathlib import Path

    from loadsvc import LoadSnapshot, ShmReader

    LoadSnapshot(dp_rank="0")
    LoadSnapshot(0)
    snap = LoadSnapshot()
    snap.num_runing_reqs
    ShmReader(Path("/dev/shm/x.shm")).read(0).seq
"""


def _mypy(code: str, tmp_path: Path) -> tuple[int, list[str]]:
    path = tmp_path / "user_code.py"
    path.write_text(textwrap.dedent(code))
    # cwd is the repository (pytest's rootdir): mypy finds loadsvc there and reads pyproject.toml
    out, err, status = mypy_api.run(["--strict", "--no-error-summary", "--cache-dir",
                                     str(tmp_path / "cache"), "--config-file",
                                     str(ROOT / "pyproject.toml"), str(path)])
    assert not err, err
    return status, out.splitlines()


def _revealed(lines: list[str]) -> list[str]:
    # mypy prints builtins without their module in some versions: compare without it
    return [re.sub(r"\bbuiltins\.", "", m.group(1)) for line in lines
            if (m := re.search(r'note: Revealed type is "(.*)"', line))]


def test_public_api_has_real_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    status, lines = _mypy(USER_CODE, tmp_path)
    errors = [line for line in lines if ": error:" in line]
    assert not errors, "\n".join(errors)
    assert _revealed(lines) == [re.sub(r"\bbuiltins\.", "", r) for r in REVEALED]


def test_mistakes_are_type_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    status, lines = _mypy(MISTAKES, tmp_path)
    assert status == 1
    errors = {(int(m.group(1)), m.group(2)) for line in lines
              if (m := re.search(r"user_code\.py:(\d+): error: .*\[([a-z-]+)\]$", line))}
    assert errors == {
        (6, "arg-type"),  # dp_rank="0": an int field
        (7, "call-arg"),  # positional: the Structs are keyword-only
        (9, "attr-defined"),  # a misspelled field
        (10, "union-attr"),  # read() is None for a rank never published
    }, "\n".join(lines)
