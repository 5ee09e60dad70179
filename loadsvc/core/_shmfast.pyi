# The C module loadsvc/core/_shmfast.c, typed for mypy and editors (the docstrings there say more).
from collections.abc import Callable, Sequence
from typing import Any

from loadsvc.core._structs import LoadSnapshot

def copy(region: Any, length: int, offset: int, /) -> bytes: ...
def install_guard() -> None: ...
def read_changed(
    region: Any,
    seqs: tuple[int, ...],
    cache: list[LoadSnapshot | None],
    cache_seq: list[int],
    buffers: Sequence[int],
    capacity: int,
    decode: Callable[[bytes], LoadSnapshot],
    /,
) -> list[int] | None: ...
