"""The cuda backend's GEMM kernels, read as machine code: tensor cores and no register spills;
their shared-memory layout and wgmma descriptors against CuTe's definitions; and their data
path (loaders, implicit-GEMM indices, transforms, epilogues) run on the CPU against the
convolutions and matrix products they compute.

Runs without a GPU: `cuobjdump -sass` disassembles the CUDA-built extension
(FASTFA_SASS_LIB=path/to/_C*.so, else the imported fastfa._C when it was built with the
fused kernels). Every fused GEMM kernel whose body is compiled for a cubin must contain
the tensor-core instruction of that architecture (HGMMA from wgmma on sm_90a, HMMA from
mma.sync elsewhere) and no local-memory loads or stores (LDL / STL: spilled registers).
cuobjdump and nvdisasm come from `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import pytest

import fastfa

GEMM_KERNEL = "fused_gemm_kernel"  # csrc/cuda/gemm_kernel.cuh
# Per architecture, one body per (dtype, operand views, transform, epilogue): 3 dtypes x
# (linear: forward, identity, split-K identity, drawn fa, usf, brsf, frsf; conv: forward,
# grad_weight, grad_input identity, drawn fa, usf, brsf, frsf). A missing one means an
# instantiation was lost.
KERNELS_PER_CUBIN = 42
# A kernel compiled for the other architecture policy is an empty stub (its body is
# preprocessed out); anything longer than this would be a real body to check.
STUB_INSTRUCTIONS = 16

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][\w.]*)")
# The kernels' own MMA shapes. Shape matters: around wgmma.fence / commit without a real
# wgmma, ptxas emits a placeholder HGMMA.64x8x16, so "some HGMMA" would prove nothing.
TENSOR_CORE_SHAPES = {"HGMMA": ("HGMMA.64x128x",), "HMMA": ("HMMA.16816.F32", "HMMA.1688.F32")}


@dataclass
class Kernel:
    arch: str
    name: str
    opcodes: Counter = field(default_factory=Counter)  # base opcode: HGMMA, LDL, ...
    instructions: Counter = field(default_factory=Counter)  # with modifiers: HGMMA.64x128x16.F32.BF16

    def tensor_core_count(self, opcode: str) -> int:
        return sum(n for name, n in self.instructions.items() if name.startswith(TENSOR_CORE_SHAPES[opcode]))

    @property
    def policy(self) -> str:
        return "Sm90Gmma" if "Sm90Gmma" in self.name else "Sm80Mma" if "Sm80Mma" in self.name else "?"


def parse_sass(text: str) -> list[Kernel]:
    """Kernels of a `cuobjdump -sass` listing with their opcode counts (modifiers dropped)."""
    kernels, arch = [], None
    for line in text.splitlines():
        if match := re.search(r"code for (sm_\w+)", line):
            arch = match.group(1)
        elif match := re.search(r"Function : (\S+)", line):
            kernels.append(Kernel(arch, match.group(1)))
        elif kernels and (match := _INSTRUCTION.search(line)):
            kernels[-1].opcodes[match.group(1).split(".")[0]] += 1
            kernels[-1].instructions[match.group(1)] += 1
    return kernels


def expected_policy(arch: str) -> tuple[str, str]:
    """(the policy whose body a cubin of `arch` holds, its tensor-core opcode); below sm_80
    neither has a body (no bf16 / tf32 tensor cores there)."""
    if arch == "sm_90a":
        return "Sm90Gmma", "HGMMA"
    return ("Sm80Mma", "HMMA") if int(re.sub(r"\D", "", arch)) >= 80 else ("none", "HMMA")


def check_kernels(kernels: list[Kernel]) -> list[str]:
    """Everything wrong with the fused GEMM kernels of a listing, one line each."""
    problems = []
    gemms = [k for k in kernels if GEMM_KERNEL in k.name]
    if not gemms:
        return [f"no {GEMM_KERNEL} in the listing"]
    for arch in sorted({k.arch for k in gemms}):
        policy, opcode = expected_policy(arch)
        bodies = [k for k in gemms if k.arch == arch and k.policy == policy]
        if policy != "none" and len(bodies) != KERNELS_PER_CUBIN:
            problems.append(f"{arch}: {len(bodies)} {policy} kernels, expected {KERNELS_PER_CUBIN}")
        for kernel in gemms:
            if kernel.arch != arch:
                continue
            if kernel.policy == policy:
                if kernel.tensor_core_count(opcode) == 0:
                    problems.append(f"{arch} {kernel.name}: no {' / '.join(TENSOR_CORE_SHAPES[opcode])} "
                                    "(tensor cores unused)")
                spills = kernel.opcodes["LDL"] + kernel.opcodes["STL"]
                if spills:
                    problems.append(f"{arch} {kernel.name}: {spills} LDL/STL (registers spilled to local memory)")
            elif sum(kernel.opcodes.values()) > STUB_INSTRUCTIONS:
                problems.append(f"{arch} {kernel.name}: a {kernel.policy} body in a {arch} cubin "
                                f"({sum(kernel.opcodes.values())} instructions), where only {policy} runs")
    return problems


def test_checker_flags_kernels_without_tensor_cores_or_with_spills():
    """The checker itself fails a GEMM without its HGMMA (FFMA and ptxas's placeholder HGMMA only),
    one with STL, and a missing instantiation."""
    name = "_ZN6fastfa4gemm17fused_gemm_kernelINS0_8Sm90GmmaENS0_4Bf16E{}EEvNS0_7ProblemET1_T2_"
    listing = ["\tcode for sm_90a"]
    for index in range(KERNELS_PER_CUBIN):
        body = (["FFMA R1, R2, R3, R4 ;", "HGMMA.64x8x16.F16 R0, gdesc[UR4], RZ ;"] if index == 0
                else ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;"])
        if index == 1:
            body.append("STL [R1+0x10], R5 ;")
        listing.append(f"\t\tFunction : {name.format(index)}")
        listing += [f"        /*{16 * i:04x}*/                   {op}   /* 0x0 */" for i, op in enumerate(body)]
    problems = check_kernels(parse_sass("\n".join(listing)))
    assert any("no HGMMA.64x128x" in p and name.format(0) in p for p in problems), problems
    assert any("LDL/STL" in p and name.format(1) in p for p in problems), problems
    assert len(problems) == 2, problems
    problems = check_kernels(parse_sass("\n".join(listing[:-2])))  # one kernel fewer
    assert any("expected" in p for p in problems), problems


def _library() -> str | None:
    if os.environ.get("FASTFA_SASS_LIB"):
        return os.environ["FASTFA_SASS_LIB"]
    if fastfa._C.build_info().get("fused_cuda"):
        return fastfa._C.__file__
    return None


def _tool(name: str) -> str | None:
    """A CUDA binary tool: on PATH, in CUDA_HOME, or in pip's nvidia/*/bin (made executable)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    for site in sys.path:
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", name)))
    for candidate in candidates:
        if os.path.isfile(candidate):
            if not os.access(candidate, os.X_OK):
                try:
                    os.chmod(candidate, os.stat(candidate).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                except OSError:
                    continue
            return candidate
    return None


def _run(tool: str, *args: str) -> str:
    # cuobjdump calls nvdisasm for sm_90 code: both must be on PATH.
    nvdisasm = _tool("nvdisasm")
    env = dict(os.environ)
    if nvdisasm:
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True, env=env).stdout


def _registers(listing: str) -> dict:
    """{(arch, kernel): registers per thread} from `cuobjdump -res-usage`."""
    registers, arch, name = {}, None, None
    for line in listing.splitlines():
        if match := re.search(r"arch = (sm_\w+)", line):
            arch = match.group(1)
        elif match := re.search(r"Function (\S+):", line):
            name = match.group(1)
        elif name and (match := re.search(r"REG:(\d+)", line)):
            registers[(arch, name)] = int(match.group(1))
    return registers


def test_fused_gemm_kernels_use_tensor_cores_without_spills():
    library = _library()
    if library is None:
        pytest.skip("fastfa._C was built without the fused CUDA kernels and FASTFA_SASS_LIB is not set "
                    "(build with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a and nvidia-cutlass installed)")
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None or _tool("nvdisasm") is None:
        pytest.skip("cuobjdump / nvdisasm not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    kernels = parse_sass(_run(cuobjdump, "-sass", library))
    registers = _registers(_run(cuobjdump, "-res-usage", library))
    for kernel in kernels:
        if GEMM_KERNEL in kernel.name and kernel.policy == expected_policy(kernel.arch)[0]:
            opcode = expected_policy(kernel.arch)[1]
            used = registers.get((kernel.arch, kernel.name), "?")
            print(f"{kernel.arch} {opcode}={kernel.tensor_core_count(opcode)} REG={used} "
                  f"LDL={kernel.opcodes['LDL']} STL={kernel.opcodes['STL']} {kernel.name}")
    problems = check_kernels(kernels)
    assert not problems, "\n".join(problems)


def _nvcc() -> str | None:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), shutil.which("nvcc")]
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def _host_program(tmp_path, source: str, *flags: str) -> str:
    """tests/cuda/<source>, compiled by nvcc for the host with the CuTe headers; skips without them."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) found")
    try:
        import cutlass_library
    except ImportError:
        pytest.skip("the CUTLASS / CuTe headers are missing: pip install nvidia-cutlass==4.2.0.0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cutlass = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    program = str(tmp_path / os.path.splitext(source)[0])
    build = subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", *flags, "-I",
                            os.path.join(root, "csrc", "include"), "-I", cutlass, "-o", program,
                            os.path.join(root, "tests", "cuda", source)], capture_output=True, text=True)
    assert build.returncode == 0, f"nvcc failed on tests/cuda/{source}:\n{build.stderr}"
    return program


def test_fused_gemm_data_path_computes_convolutions_and_products(tmp_path):
    """tests/cuda/implicit_gemm_check.cu: the kernels' own loaders, indices, transforms, K split,
    row sums and epilogues, run thread by thread on the CPU (the tensor-core MMA replaced by a
    loop over the same swizzled tiles), against convolutions and products written from their
    definitions: conv forward / grad_input for every transform / split-K grad_weight and grad_bias
    in NCHW, channels_last and strided layouts, bf16, fp16 and tf32, and the linear GEMMs."""
    program = _host_program(tmp_path, "implicit_gemm_check.cu", "-O2")
    result = subprocess.run([program], capture_output=True, text=True)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wgmma_shared_layout_matches_cute(tmp_path):
    """tests/cuda/gemm_layout_check.cu, compiled for the host: the tile loaders' 128-byte swizzle
    and the kernel's wgmma descriptors equal CuTe's canonical K-major SW128 layout and the
    descriptors CuTe's TiledMMA builds for the same tile; the mma.sync path's ldmatrix
    addresses put in every register the element CuTe's MMA_Traits assign to it; and the
    accumulators' tile positions (both paths' epilogues) are CuTe's CLayout (the parts of the
    MMA that no SASS count, and no CPU run of the data path, can vouch for)."""
    program = _host_program(tmp_path, "gemm_layout_check.cu")
    result = subprocess.run([program], capture_output=True, text=True)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
