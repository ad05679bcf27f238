"""Build metadata: what was built is recorded, and a build for another torch is refused with a clear reason."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import lldif_kernels
from lldif_kernels import _extension


def test_build_is_recorded_for_this_torch():
    info = _extension.read_build_info()
    assert info is not None, "setup.py did not record the build"
    assert info["torch"] == torch.__version__
    assert "lldif_kernels._C" in info["extensions"]
    assert _extension.CPP_UNAVAILABLE is None


NVCC_FOUND = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


@pytest.mark.skipif(torch.version.cuda is None or not NVCC_FOUND, reason="needs a CUDA torch and nvcc")
def test_cuda_extension_is_built_where_it_can_be():
    assert "lldif_kernels._C_cuda" in _extension.read_build_info()["extensions"]
    assert _extension.CUDA_UNAVAILABLE is None


def test_build_for_another_torch_is_not_loaded(monkeypatch):
    info = dict(_extension.read_build_info(), torch="1.0.0")
    monkeypatch.setattr(_extension, "read_build_info", lambda: info)
    with pytest.warns(RuntimeWarning, match="built for torch 1.0.0"):
        reason = _extension._load("_C")
    assert "rebuild" in reason


def test_missing_build_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "read_build_info", lambda: None)
    assert "pip install -e ." in _extension._load("_C")


def test_explain_without_inputs_says_what_this_installation_runs():
    reasons = lldif_kernels.dispatch.explain()
    assert reasons["reference"] == [] and reasons["cpp"] == []
    if not torch.cuda.is_available():
        assert reasons["cuda"] and reasons["triton"] == lldif_kernels.dispatch.explain([torch.zeros(1)])["triton"]
