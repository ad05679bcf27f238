"""setuptools' PEP 517 backend, run where the target environment's torch can be imported.

The extensions must be compiled against the torch that will import them. pip's build isolation runs this
backend in a fresh environment with only the build requirements, which hides the target environment's torch;
listing torch as a build requirement instead would download a second multi-gigabyte torch, possibly another
version than the one installed. The build still runs with the target environment's interpreter, so its
site-packages are known here: they are appended to ``sys.path`` (after the isolated build requirements, which
keep precedence) before setuptools runs ``setup.py``. Builds without isolation (``--no-build-isolation``, the
Makefile's) already see torch and are left alone.
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig

MINIMUM_TORCH = (2, 11)
HINT = ("install a CUDA or CPU build of torch>=2.11 into this environment first (pip install 'torch>=2.11'), "
        "then install lldif again")


def _expose_target_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        for key in ("purelib", "platlib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(f"lldif builds its C++/CUDA extensions against the installed torch, and none was found "
                         f"in {sys.prefix}: {HINT}")
    import torch

    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MINIMUM_TORCH:
        raise SystemExit(f"lldif needs torch>=2.11 to build its extensions, found {torch.__version__} in "
                         f"{sys.prefix}: {HINT}")


_expose_target_torch()

from setuptools.build_meta import *  # noqa: E402, F403  (the PEP 517 hooks, unchanged)
