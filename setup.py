"""Builds fastfa and its extension fastfa._C.

C++ CPU kernels are always built. The CUDA sources are built when a GPU is visible,
or FORCE_CUDA=1, or TORCH_CUDA_ARCH_LIST is set (the rule that works on build machines
without a GPU). CUDA_HOME and the CUDA headers that pip's nvidia-* packages carry are
found here, since torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _has_cudart(home: Path) -> bool:
    patterns = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*")
    return any(glob.glob(str(home / p)) for p in patterns)


def find_cuda_home():
    """The toolkit folder holding bin/nvcc and the CUDA runtime, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        # A wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) names the real one.
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for token in text.split():
                token = token.strip("\"'")
                if token.endswith("/bin/nvcc"):
                    candidates.append(str(Path(token).parent.parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").exists() and _has_cudart(Path(candidate)):
            return str(Path(candidate).resolve())
    return None


def pip_cuda_include_dirs():
    """Include folders of pip's nvidia-* packages (cublas_v2.h, cusparse.h: ATen's CUDA headers need them)."""
    dirs = []
    for site in sys.path:
        for include in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            if include not in dirs:
                dirs.append(include)
    return dirs


def cutlass_include_dirs():
    """CUTLASS / CuTe headers from the nvidia-cutlass wheel (or CUTLASS_INCLUDE_DIR), or []."""
    candidates = []
    if os.environ.get("CUTLASS_INCLUDE_DIR"):
        candidates.append([os.environ["CUTLASS_INCLUDE_DIR"]])
    try:
        import cutlass_library

        source = Path(cutlass_library.__file__).resolve().parent / "source"
        candidates.append([str(source / "include"), str(source / "tools" / "util" / "include")])
    except ImportError:
        pass
    for dirs in candidates:
        if (Path(dirs[0]) / "cute" / "arch" / "mma_sm90_gmma.hpp").exists():
            return [d for d in dirs if Path(d).is_dir()]
    return []


def default_cuda_arch_list(torch):
    """The visible GPUs' architectures (sm_90 as 9.0a, the only target with wgmma), else 8.0 and 9.0a."""
    if not torch.cuda.is_available():
        return "8.0;9.0a"
    arches = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        arch = f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")
        if arch not in arches:
            arches.append(arch)
    return ";".join(arches)


def wants_cuda(torch):
    if torch.version.cuda is None:
        return False, "this torch has no CUDA support"
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, "TORCH_CUDA_ARCH_LIST is set"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    return False, "no GPU visible and neither FORCE_CUDA=1 nor TORCH_CUDA_ARCH_LIST set"


def extension_modules():
    import torch

    with_cuda, reason = wants_cuda(torch)
    cuda_home = find_cuda_home() if with_cuda else None
    if with_cuda and cuda_home is None:
        if os.environ.get("FORCE_CUDA", "0") == "1":
            raise RuntimeError(
                "fastfa: FORCE_CUDA=1 but no CUDA toolkit was found (need bin/nvcc and libcudart); "
                "set CUDA_HOME to the toolkit folder")
        print(f"fastfa: CUDA wanted ({reason}) but no CUDA toolkit found; building CPU kernels only",
              file=sys.stderr)
        with_cuda = False
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(torch)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("pybind_src/*.cpp"))
    cxx_flags = ["-O3"]  # torch.utils.cpp_extension adds the -std its headers need
    include_dirs = [str(ROOT / "csrc" / "include")]
    if not with_cuda:
        print(f"fastfa: building CPU kernels only ({reason})", file=sys.stderr)
        return [CppExtension("fastfa._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx_flags})]
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"fastfa: building CPU and CUDA kernels ({reason}; CUDA_HOME={cuda_home}; "
          f"architectures {arch_list})", file=sys.stderr)
    # No quotes or ';' on a compiler command line (ninja runs it through a shell):
    # module.cpp stringifies the token, and Python turns '_' back into ';'.
    arches = arch_list.replace(";", " ").split()
    arch_token = "_".join(arches)
    defines = ["-DFASTFA_WITH_CUDA", f"-DFASTFA_CUDA_ARCH_LIST={arch_token}"]
    # The cuda backend's fused GEMMs (csrc/cuda/gemm_*.cu; the ops in linear_cuda.cu and
    # conv_cuda.cu): one small file per group of instantiations, so MAX_JOBS compiles them in
    # parallel.
    cuda_sources = ["csrc/cuda/feedback_transform.cu", "csrc/cuda/direct_feedback_cuda.cu"]
    cutlass = cutlass_include_dirs()
    if cutlass:
        cuda_sources += sorted(glob.glob("csrc/cuda/gemm_*.cu")) + ["csrc/cuda/linear_cuda.cu", "csrc/cuda/conv_cuda.cu"]
        defines.append("-DFASTFA_WITH_FUSED_CUDA")
        if any(arch.split("+")[0] == "9.0a" for arch in arches):
            defines.append("-DFASTFA_HAS_SM90A")  # wgmma kernels exist only in sm_90a code
    else:
        print("fastfa: the CUTLASS / CuTe headers were not found (pip install nvidia-cutlass==4.2.0.0, "
              "or set CUTLASS_INCLUDE_DIR): building without the cuda backend's fused kernels; "
              "the aten backend still runs on GPUs", file=sys.stderr)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines
    return [CUDAExtension(
        "fastfa._C",
        sources + cuda_sources,
        include_dirs=include_dirs + cutlass + pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
    )]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    # ninja parallelises the compile over MAX_JOBS cores where it is installed.
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    name="fastfa",
    version="0.1.0",
    description="Fused GPU kernels for training neural networks without weight transport",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    package_dir={"": "python", "fastfa.triton_kernels": "triton_kernels"},
    packages=find_packages("python") + ["fastfa.triton_kernels"],
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    extras_require={
        # nvidia-cutlass: tests/test_sass.py's CPU checks of the cuda kernels' data path compile
        # against its CuTe headers (with nvcc; without the toolkit they skip).
        "test": ["pytest", "hypothesis", "numpy", "torchvision", "pytest-benchmark", "scikit-learn",
                 "nvidia-cutlass==4.2.0.0"],
        # fastfa bench: the plot needs matplotlib; its default times torchvision's resnet18.
        "bench": ["numpy", "matplotlib", "torchvision"],
        # fastfa train: digits ships inside scikit-learn; the plot needs matplotlib; torchvision for
        # the ResNet / AlexNet models and ImageFolder data.
        "train": ["scikit-learn", "matplotlib", "torchvision"],
        # Build-time headers of the cuda backend's fused kernels (pip install --no-build-isolation).
        "cuda": ["nvidia-cutlass==4.2.0.0"],
        # tests/test_sass.py reads the compiled kernels' machine code with these.
        "sass": ["nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm"],
    },
    entry_points={"console_scripts": ["fastfa = fastfa.cli:main"]},
)
