"""loadsvc/tools/procs.py: a child started by module name imports the installed loadsvc, whatever
folder the current directory holds (here a decoy `loadsvc/` that raises on import)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

import loadsvc
from loadsvc.tools.procs import loadsvc_command, python_command

pytestmark = pytest.mark.integration  # every test here starts loadsvc processes


@pytest.fixture
def decoy_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory holds a `loadsvc/` package that is not the installed one."""
    (tmp_path / "loadsvc").mkdir()
    (tmp_path / "loadsvc" / "__init__.py").write_text(
        "raise ImportError('imported the loadsvc/ folder of the current directory')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)  # conftest sets it for the tests' own children
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return tmp_path


def test_the_decoy_shadows_a_plain_python_m(decoy_cwd: Path) -> None:
    """What -P prevents: `python -m loadsvc` in that directory imports the decoy."""
    import sys

    result = subprocess.run([sys.executable, "-m", "loadsvc", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "imported the loadsvc/ folder" in result.stderr


def test_loadsvc_command_runs_the_installed_package(decoy_cwd: Path) -> None:
    result = subprocess.run(loadsvc_command("--version"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"loadsvc {loadsvc.__version__}"
    where = subprocess.run(python_command("-c", "import loadsvc; print(loadsvc.__file__)"),
                           capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == loadsvc.__file__


def test_fleet_starts_engines_and_routers_from_that_directory(decoy_cwd: Path) -> None:
    from loadsvc.tools.fleet import Fleet

    with Fleet() as fleet:
        engine = fleet.engine(dp_size=1)
        router = fleet.router([engine])
        with httpx.Client(trust_env=False, timeout=30) as http:
            r = http.post(f"{router.url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
    assert os.getcwd() == str(decoy_cwd)
