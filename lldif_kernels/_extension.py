"""Loads the compiled extensions and records, for the dispatcher, why one is unavailable."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch

BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")
REBUILD_HINT = "rebuild with `pip install -e . --no-build-isolation` (or `python setup.py build_ext --inplace`)"


def read_build_info() -> dict | None:
    """What setup.py recorded about the last build, or None when nothing was built."""
    try:
        return json.loads(BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return None


def _load(module: str) -> str | None:
    """Import ``lldif_kernels.<module>``; None when it loaded, else the reason it cannot be used."""
    info = read_build_info()
    if info is None:
        return f"the C++ extensions are not built: {REBUILD_HINT}"
    if f"lldif_kernels.{module}" not in info["extensions"]:
        return f"lldif_kernels.{module} was not built (see LLDIF_BUILD_CUDA in setup.py)"
    if info["torch"] != torch.__version__:
        # Importing a library built against another torch can fail on symbols or crash later.
        reason = f"the extensions were built for torch {info['torch']}, running {torch.__version__}: {REBUILD_HINT}"
        warnings.warn(f"lldif_kernels: {reason}", RuntimeWarning, stacklevel=3)
        return reason
    try:
        importlib.import_module(f"lldif_kernels.{module}")
    except ImportError as error:
        return f"lldif_kernels.{module} failed to import ({error}): {REBUILD_HINT}"
    return None


CPP_UNAVAILABLE = _load("_C")
# The CUDA library only adds implementations to the schemas that the CPU library defines.
CUDA_UNAVAILABLE = CPP_UNAVAILABLE or _load("_C_cuda")
