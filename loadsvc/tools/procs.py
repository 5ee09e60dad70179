"""The command line with which one loadsvc process starts another (or another Python tool).

`python -m loadsvc` puts the current directory first on sys.path, so a folder
named `loadsvc/` there (a clone of the repository, in the directory the demo is
started from) would be imported instead of the installed package. `-P` (Python
3.11's safe path, as PYTHONSAFEPATH) leaves the current directory out; the rest
of sys.path is the same, and multiprocessing passes -P on to its own children.
"""

from __future__ import annotations

import sys

__all__ = ["loadsvc_command", "python_command"]


def python_command(*args: str) -> list[str]:
    """This interpreter with -P, then args: python_command("-m", "smg", ...), ("-c", code)."""
    return [sys.executable, "-P", *args]


def loadsvc_command(*args: str) -> list[str]:
    """The `loadsvc` command run by this interpreter, whatever the current directory holds."""
    return python_command("-m", "loadsvc", *args)
