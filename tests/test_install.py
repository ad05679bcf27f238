"""`pip install -e .` and `pip install .` as a new user types them, in a fresh venv that has the pinned torch: both
build the extensions against that torch (through pip's build isolation), and a venv without torch gets one clear
line. Slow (a torch install and two builds): `make test-install`, one CI step; deselected from `make test`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.install
ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = os.environ.get("TORCH_PIN", "torch==2.14.1")
CHECK = ("import json, lldif, lldif_kernels; from lldif_kernels import _extension; "
         "print(lldif_kernels.dispatch.explain()); "
         "print('BUILD', json.dumps(_extension.read_build_info())); "
         "print('UNAVAILABLE', _extension.CPP_UNAVAILABLE, _extension.CUDA_UNAVAILABLE)")


def run(*command: str | Path, cwd: Path, check: bool = True, **variables: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"} | variables
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=environment, capture_output=True,
                            text=True)
    if check and result.returncode:
        pytest.fail(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """The files a clone of this checkout has (tracked and not ignored), without any build output."""
    clone = tmp_path_factory.mktemp("clone") / "lldif"
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=ROOT).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    return clone


def new_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def test_pip_install_without_torch_says_what_to_do(fresh_clone, tmp_path):
    python = new_venv(tmp_path / "venv")
    result = run(python, "-m", "pip", "install", "-e", ".", cwd=fresh_clone, check=False)
    assert result.returncode != 0
    assert "install a CUDA or CPU build of torch>=2.11 into this environment first" in result.stdout + result.stderr


def test_pip_install_editable_and_regular_build_against_the_venvs_torch(fresh_clone, tmp_path):
    python = new_venv(tmp_path / "venv")
    run(python, "-m", "pip", "install", "--quiet", TORCH_PIN, cwd=tmp_path)
    torch_version = run(python, "-c", "import torch; print(torch.__version__)", cwd=tmp_path).stdout.strip()

    run(python, "-m", "pip", "install", "-e", ".", cwd=fresh_clone)
    editable = run(python, "-c", CHECK, cwd=tmp_path).stdout
    assert f'"torch": "{torch_version}"' in editable and "UNAVAILABLE None" in editable
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if nvcc and "+cpu" not in torch_version:
        assert "lldif_kernels._C_cuda" in editable and "UNAVAILABLE None None" in editable

    # The regular install builds a wheel; the CPU extension alone keeps this second build short.
    run(python, "-m", "pip", "uninstall", "--yes", "lldif", cwd=tmp_path)
    run(python, "-m", "pip", "install", ".", cwd=fresh_clone, LLDIF_BUILD_CUDA="0")
    installed = run(python, "-c", CHECK + "; print('FROM', lldif_kernels.__file__)", cwd=tmp_path).stdout
    assert f'"torch": "{torch_version}"' in installed and "UNAVAILABLE None" in installed
    assert "site-packages" in installed.split("FROM", 1)[1]
