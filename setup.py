"""Builds the kernel extensions: `lldif_kernels._C` (CPU, always) and `lldif_kernels._C_cuda` (CUDA).

Environment:
  LLDIF_BUILD_CUDA=auto (default) build the CUDA extension when torch is a CUDA build and nvcc exists;
                   =1 require it (fail loudly), =0 never.
  LLDIF_CPU_ARCH   value for -march (default "native": the extension is built where it runs);
                   set it empty for a portable build.
  LLDIF_DEBUG=1    -O0 -g.
  MAX_JOBS         parallel compile jobs (torch's ninja builder honours it).
Install with `pip install -e . --no-build-isolation`; rebuild in place with `python setup.py build_ext --inplace`.
"""

import glob
import json
import os
import platform
import sysconfig

# torch takes CUDA_HOME from `which nvcc` when unset; here that is a wrapper in /usr/local/bin, which
# would point the build at /usr/local and fail on crt/host_config.h.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch
from setuptools import setup
from torch.utils import cpp_extension

DEBUG = os.environ.get("LLDIF_DEBUG") == "1"
CPU_ARCH = os.environ.get("LLDIF_CPU_ARCH", "native")
# -g0 undoes the -g in Python's CFLAGS, which costs about a third of the compile time.
OPT_FLAGS = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
# at::parallel_for is OpenMP inlined into our code: without -fopenmp it silently runs on one thread.
CXX_FLAGS = [*OPT_FLAGS, "-fopenmp"] + ([f"-march={CPU_ARCH}"] if CPU_ARCH else [])
DEFAULT_CUDA_ARCHS = "8.0;9.0"
HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join("lldif_kernels", "_build_info.json")


def cuda_build_wanted() -> bool:
    mode = os.environ.get("LLDIF_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"LLDIF_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        print("[lldif] LLDIF_BUILD_CUDA=0: not building the CUDA extension")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    if not os.path.exists(nvcc):
        reasons.append(f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME})")
    if reasons and mode == "1":
        raise SystemExit("[lldif] LLDIF_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(reasons))
    if reasons:
        print("[lldif] skipping the CUDA extension: " + "; ".join(reasons))
    return not reasons


def nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """Headers and libraries of the nvidia-* wheels a CUDA torch pulls in; a minimal toolkit lacks them."""
    site = sysconfig.get_paths()["purelib"]
    return (sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))),
            sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib"))))


ext_modules = [
    cpp_extension.CppExtension(
        "lldif_kernels._C",
        sorted(glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )
]
BUILD_CUDA = cuda_build_wanted()
if BUILD_CUDA:
    # torch asks the GPU for its architecture when the list is unset; without a GPU that raises.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    include_dirs, library_dirs = nvidia_wheel_dirs()
    ext_modules.append(
        cpp_extension.CUDAExtension(
            "lldif_kernels._C_cuda",
            sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            extra_compile_args={"cxx": OPT_FLAGS, "nvcc": ["-O3", "-lineinfo"]},
        )
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's builder, plus a record of what was built, checked by `lldif_kernels` at import."""

    def run(self) -> None:
        super().run()
        info = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda if BUILD_CUDA else None,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if BUILD_CUDA else None,
            "cpu_arch": CPU_ARCH or "portable",
            "machine": platform.machine(),
            "extensions": [ext.name for ext in self.extensions],
        }
        for root in {HERE, self.build_lib}:
            path = os.path.join(root, BUILD_INFO)
            if os.path.isdir(os.path.dirname(path)):
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    json.dump(info, f, indent=2)
                os.replace(tmp, path)


setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    package_data={"lldif_kernels": ["_build_info.json"]},
)
