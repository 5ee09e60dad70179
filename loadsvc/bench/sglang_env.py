"""SGLang's own load publisher, runnable on a machine without CUDA, for tests/test_ingest_sglang.py.

SGLang itself cannot run here (its package needs torch with CUDA), but the
modules that build and send its load frames do not: they import msgspec, pyzmq,
pydantic and psutil. So the tests run SGLang's real ``SchedulerLoadPublisher``
from the unpacked wheel, in a small venv of their own, cached by version:

    ~/.cache/loadsvc/sglang-0.5.23/       (LOADSVC_SGLANG_ENV overrides the path)
        venv/   msgspec, pyzmq, pydantic, psutil
        src/    sglang-0.5.23's wheel, unpacked (``pip download sglang==0.5.23 --no-deps``)

    python -m loadsvc.bench.sglang_env             # build it if missing (about 40 MB); print its python
    python -m loadsvc.bench.sglang_env --check     # print its python, or why there is none (exit 1)

sglang is never installed, nor a dependency of loadsvc: tests/sglang_publisher.py
puts src/ on the path and imports the publisher's modules without running the
package ``__init__`` files (those are what import torch). """

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loadsvc.bench.cached_env import CachedEnv

__all__ = ["SGLANG_VERSION", "env_dir", "env_python", "source_dir", "ensure", "missing"]

SGLANG_VERSION = "0.5.23"
PUBLISHER_MODULE = "sglang/srt/managers/scheduler_components/load_publisher.py"
_REQUIREMENTS = ("msgspec", "pyzmq", "pydantic", "psutil")


def _build(root: Path) -> None:
    flags = ["--disable-pip-version-check", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", *flags, "install", *_REQUIREMENTS],
                   check=True)
    with tempfile.TemporaryDirectory(prefix="loadsvc-sglang-wheel-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", *flags, "download", "--no-deps", "--only-binary", ":all:",
                        "-d", tmp, f"sglang=={SGLANG_VERSION}"], check=True)
        wheels = list(Path(tmp).glob("sglang-*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one sglang wheel in {tmp}, found {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(root / "src")
    if not (root / "src" / PUBLISHER_MODULE).exists():
        raise RuntimeError(f"sglang {SGLANG_VERSION}'s wheel has no {PUBLISHER_MODULE}")


ENV = CachedEnv(f"sglang-{SGLANG_VERSION}", "LOADSVC_SGLANG_ENV", "venv/bin/python", "loadsvc.bench.sglang_env",
                "SGLang publisher environment", _build)


def env_dir() -> Path:
    return ENV.root


def env_python() -> Path:
    return ENV.python


def source_dir() -> Path:
    """Where the wheel is unpacked (put it on PYTHONPATH)."""
    return ENV.root / "src"


def missing() -> str | None:
    """None when the environment is built, else why SGLang's own publisher cannot run here."""
    return ENV.missing()


def ensure() -> Path:
    """Build the environment if it is not complete; its python."""
    return ENV.ensure()


def main() -> None:
    ENV.main("Build (if missing) the environment that runs SGLang's own load publisher; print its python.")


if __name__ == "__main__":
    main()
