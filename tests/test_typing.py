"""The public API as a type checker sees it: real types, not Any.

A user's code calling LoadSnapshot, ShmPublisher, ShmReader, open_store, loads_router and
add_to_grpc_server is checked with `mypy --strict` (in process, with the project's
[tool.mypy] settings): what it reveals is asserted, and mistakes a user would make are
errors. The library's own `mypy` run is in .ci/run.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One mypy run over both snippets (a run costs seconds): its lines, by snippet file name."""
    tmp = tmp_path_factory.mktemp("typing")
    (tmp / "user_code.py").write_text(textwrap.dedent(USER_CODE))
    (tmp / "mistakes.py").write_text(textwrap.dedent(MISTAKES))
    # The repository's loadsvc (mypy looks in the current directory) and its pyproject.toml settings.
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        out, err, _ = mypy_api.run(["--strict", "--no-error-summary", "--cache-dir", str(tmp / "cache"),
                                    "--config-file", str(ROOT / "pyproject.toml"),
                                    str(tmp / "user_code.py"), str(tmp / "mistakes.py")])
    finally:
        os.chdir(cwd)
    assert not err, err
    by_file: dict[str, list[str]] = {"user_code.py": [], "mistakes.py": []}
    for line in out.splitlines():
        for name, lines in by_file.items():
            if f"{name}:" in line:
                lines.append(line)
    return by_file


def _plain(type_text: str) -> str:
    return re.sub(r"\bbuiltins\.", "", type_text)  # mypy versions differ on showing builtins.


def test_public_api_has_real_types(mypy_output: dict[str, list[str]]) -> None:
    lines = mypy_output["user_code.py"]
    errors = [line for line in lines if ": error:" in line]
    assert not errors, "\n".join(errors)
    revealed = [m.group(1) for line in lines if (m := re.search(r'note: Revealed type is "(.*)"', line))]
    assert [_plain(r) for r in revealed] == [_plain(r) for r in REVEALED]


def test_mistakes_are_type_errors(mypy_output: dict[str, list[str]]) -> None:
    lines = mypy_output["mistakes.py"]
    errors = {(int(m.group(1)), m.group(2)) for line in lines
              if (m := re.search(r"mistakes\.py:(\d+): error: .*\[([a-z-]+)\]$", line))}
    assert errors == {
        (6, "arg-type"),  # dp_rank="0": an int field
        (7, "call-arg"),  # positional: the Structs are keyword-only
        (9, "attr-defined"),  # a misspelled field
        (10, "union-attr"),  # read() is None for a rank never published
    }, "\n".join(lines)
