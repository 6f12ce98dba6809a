"""Builds cnnviz_fast and its extension cnnviz_fast._C (torch.ops.cnnviz.*).

    pip install --no-build-isolation -e .        # CPU kernels (+ CUDA when a GPU is visible)
    FORCE_CUDA=1 pip install --no-build-isolation -e .   # CUDA kernels without a GPU
    scripts/build_extension.sh                   # the CUDA recipe for this machine

CUDA sources are built when torch.cuda.is_available(), FORCE_CUDA=1, or
TORCH_CUDA_ARCH_LIST is set (torchvision's rule). DEBUG=1 builds with -O0 -g.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def get_extensions():
    debug = _flag("DEBUG")
    with_cuda = (
        torch.cuda.is_available() or _flag("FORCE_CUDA") or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    ) and CUDA_HOME is not None

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "ops", "cuda", "*.cu")))

    opt = ["-O0", "-g"] if debug else ["-O3"]
    extra_compile_args = {"cxx": opt + ["-fopenmp"]}
    extra_link_args = ["-fopenmp"] + (["-O0", "-g"] if debug else [])
    define_macros = []

    ext_cls = CppExtension
    if with_cuda:
        ext_cls = CUDAExtension
        sources += cuda_sources
        extra_compile_args["nvcc"] = opt + (["-lineinfo"] if not debug else ["-G"])
        define_macros.append(("WITH_CUDA", None))

    stems = [os.path.splitext(os.path.basename(s))[0] for s in sources]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise RuntimeError(f"source files share a stem (ninja needs one object per stem): {sorted(dup)}")

    print(
        f"cnnviz_fast: building cnnviz_fast._C with {'CPU + CUDA' if with_cuda else 'CPU only'} kernels"
        f" ({'DEBUG -O0 -g' if debug else '-O3'}); "
        f"CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')}"
    )
    for s in sources:
        print(f"  {s}")
    return [
        ext_cls(
            "cnnviz_fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
