"""The cuda backend's GEMM kernels, read as machine code: tensor cores, no register spills and
registers within each family's ceiling; their shared-memory layout and wgmma descriptors against
CuTe's definitions; and their data path (loaders, implicit-GEMM indices, transforms, epilogues)
run on the CPU against the convolutions and matrix products they compute.

Runs without a GPU: `cuobjdump -sass` disassembles the CUDA-built extension
(FASTFA_SASS_LIB=path/to/_C*.so, else the imported fastfa._C when it was built with the
fused kernels). Every fused GEMM kernel whose body is compiled for a cubin must contain
the tensor-core instruction of that architecture (HGMMA from wgmma on sm_90a, HMMA from
mma.sync elsewhere), on sm_90a not every one of them waiting for the last (ptxas's serialised
wgmma, C7515), no local-memory loads or stores (LDL / STL: spilled registers), and use
no more registers per thread than REGISTER_CEILINGS allows. Without a build the test skips,
unless FASTFA_EXPECT_SM90A=1 (CI's SASS stage): then a missing build or tool, or a build
without sm_90a code, fails. The CPU checks of the data path skip without nvcc or the CUTLASS
headers (nvidia-cutlass, in the test extra), unless FASTFA_EXPECT_CUDA_TOOLKIT=1 (CI).
cuobjdump and nvdisasm come from `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import fastfa
from machine_code import Kernel, cuobjdump, find_tool, parse_registers, parse_sass

GEMM_KERNEL = "fused_gemm_kernel"  # csrc/cuda/gemm_kernel.cuh
# Per architecture, one body per (dtype, operand views, transform, epilogue): 3 dtypes x
# (linear: forward, identity, split-K identity, drawn fa, usf, brsf, frsf, and the four
# transforms split over K; conv: forward, grad_weight, grad_input identity, drawn fa, usf, brsf,
# frsf). A missing one means an instantiation was lost.
KERNELS_PER_CUBIN = 54
# A kernel compiled for the other architecture policy is an empty stub (its body is
# preprocessed out); anything longer than this would be a real body to check.
STUB_INSTRUCTIONS = 16

# The kernels' own MMA shapes. Shape matters: around wgmma.fence / commit without a real
# wgmma, ptxas emits a placeholder HGMMA.64x8x16, so "some HGMMA" would prove nothing.
TENSOR_CORE_SHAPES = {"HGMMA": ("HGMMA.64x128x",), "HMMA": ("HMMA.16816.F32", "HMMA.1688.F32")}


def tensor_core_count(kernel: Kernel, opcode: str, waiting: bool = False) -> int:
    """The kernel's own MMAs; with `waiting`, those that wait for the ones before them (gsb0)."""
    counts = kernel.waiting if waiting else kernel.instructions
    return sum(n for name, n in counts.items() if name.startswith(TENSOR_CORE_SHAPES[opcode]))


def policy(kernel: Kernel) -> str:
    return "Sm90Gmma" if "Sm90Gmma" in kernel.name else "Sm80Mma" if "Sm80Mma" in kernel.name else "?"


def expected_policy(arch: str) -> tuple[str, str]:
    """(the policy whose body a cubin of `arch` holds, its tensor-core opcode); below sm_80
    neither has a body (no bf16 / tf32 tensor cores there)."""
    if arch == "sm_90a":
        return "Sm90Gmma", "HGMMA"
    return ("Sm80Mma", "HMMA") if int(re.sub(r"\D", "", arch)) >= 80 else ("none", "HMMA")


# Registers per thread that each family of sm_90a kernel bodies may use: the build of 79451c5
# (nvcc 13.0, the setup.py flags) measured, with a margin below. 255 is the hardware's limit;
# a kernel that reaches it has most likely spilled or is about to, whatever LDL / STL show.
# Measured: forward (bias / activation epilogue) 151-162; the GEMMs that use B unchanged
# (grad_input of bp / stored fa / the estimated rules, grad_weight, split or not) 182-222;
# grad_input through a drawn transform (fa drawn, brsf) 188-213; through a sign transform of
# W (usf, frsf) 200-248, which leaves no margin below the limit itself.
# Issue 18's loaders (cp.async, fixed-distance interior tiles, both wgmma variants for B's
# layout; sm_90a cubins of each gemm_*.cu, nvcc 13.0) measured: forward 157-197, unchanged B
# 168-228, drawn B 178-244, sign of W 159-226 (benchmarks/results/2026-12-01-sass-mainloop-after.md).
# The pipeline (4 stages, wait<1>, the next tile's loads in flight across the barrier) and split
# grad_input measured: forward 166-208, unchanged B 179-248 (bf16 / fp16 linear grad_weight and
# identity: both operands' next vectors live across the barrier), drawn B 198-238, sign of W
# 160-234 (benchmarks/results/2026-12-01-sass-mainloop-after3.md); still no LDL / STL.
REGISTER_CEILINGS = {"forward": 216, "unchanged B": 250, "drawn B": 248, "sign of W": 254}
HARDWARE_REGISTERS = 255
_RULE_TRANSFORM = re.compile(r"RuleTransformILN\w*?RuleE(\d+)E")
DRAWN_RULES = {1, 3}  # fa drawn from (seed, step), brsf (csrc/include/fastfa/feedback.h)


def register_family(kernel: Kernel) -> str:
    """The REGISTER_CEILINGS family of a fused GEMM, from its mangled name."""
    if "BiasActivationEpilogue" in kernel.name:
        return "forward"
    if rule := _RULE_TRANSFORM.search(kernel.name):
        return "drawn B" if int(rule.group(1)) in DRAWN_RULES else "sign of W"
    return "unchanged B"


def register_ceiling(kernel: Kernel) -> int:
    # Only sm_90a's counts were measured; other architectures must stay below the hardware limit.
    return REGISTER_CEILINGS[register_family(kernel)] if kernel.arch == "sm_90a" else HARDWARE_REGISTERS - 1


def check_kernels(kernels: list[Kernel], registers: dict) -> list[str]:
    """Everything wrong with the fused GEMM kernels of a listing, one line each; `registers` is
    parse_registers' {(arch, name): registers per thread}."""
    problems = []
    gemms = [k for k in kernels if GEMM_KERNEL in k.name]
    if not gemms:
        return [f"no {GEMM_KERNEL} in the listing"]
    for arch in sorted({k.arch for k in gemms}):
        expected, opcode = expected_policy(arch)
        bodies = [k for k in gemms if k.arch == arch and policy(k) == expected]
        if expected != "none" and len(bodies) != KERNELS_PER_CUBIN:
            problems.append(f"{arch}: {len(bodies)} {expected} kernels, expected {KERNELS_PER_CUBIN}")
        for kernel in gemms:
            if kernel.arch != arch:
                continue
            if policy(kernel) == expected:
                mmas = tensor_core_count(kernel, opcode)
                if mmas == 0:
                    problems.append(f"{arch} {kernel.name}: no {' / '.join(TENSOR_CORE_SHAPES[opcode])} "
                                    "(tensor cores unused)")
                elif opcode == "HGMMA" and mmas > 1 and tensor_core_count(kernel, opcode, waiting=True) == mmas:
                    # ptxas C7515: each wgmma waits for the last (2026-12-01-tf32-wgmma-serialised.md)
                    problems.append(f"{arch} {kernel.name}: every HGMMA waits for the one before it (gsb0): "
                                    "wgmma serialised")
                if kernel.local_memory_accesses:
                    problems.append(f"{arch} {kernel.name}: {kernel.local_memory_accesses} LDL/STL "
                                    "(registers spilled to local memory)")
                used, ceiling = registers.get((arch, kernel.name)), register_ceiling(kernel)
                if used is None:
                    problems.append(f"{arch} {kernel.name}: no register count in the resource listing")
                elif used > ceiling:
                    problems.append(f"{arch} {kernel.name}: {used} registers per thread, above the "
                                    f"{register_family(kernel)!r} ceiling of {ceiling}")
            elif sum(kernel.opcodes.values()) > STUB_INSTRUCTIONS:
                problems.append(f"{arch} {kernel.name}: a {policy(kernel)} body in a {arch} cubin "
                                f"({sum(kernel.opcodes.values())} instructions), where only {expected} runs")
    return problems


def test_checker_flags_kernels_without_tensor_cores_with_spills_or_too_many_registers():
    """The checker itself fails a GEMM without its HGMMA (FFMA and ptxas's placeholder HGMMA only),
    one with STL, one above its family's register ceiling, one without a register count, one whose
    wgmmas are serialised (every HGMMA gsb0), and a missing instantiation."""
    name = "_ZN6fastfa4gemm17fused_gemm_kernelINS0_8Sm90GmmaENS0_4Bf16E{}EEvNS0_7ProblemET1_T2_"
    usf = "NS0_13RuleTransformILNS_4RuleE2EEENS0_13StoreEpilogueIS3_NS0_12MatrixOutputEEE{}"
    forward = "NS0_17IdentityTransformENS0_22BiasActivationEpilogueIS3_NS5_11ImageOutputEEE{}"
    names = [name.format(usf.format(0) if index == 2 else forward.format(3) if index == 3 else index)
             for index in range(KERNELS_PER_CUBIN)]
    listing = ["\tcode for sm_90a"]
    registers = {("sm_90a", kernel): 160 for kernel in names}
    registers[("sm_90a", names[2])] = 255  # usf: the hardware's limit, above its ceiling
    registers[("sm_90a", names[3])] = REGISTER_CEILINGS["forward"] + 1
    del registers[("sm_90a", names[4])]
    for index, kernel in enumerate(names):
        mma = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24"
        body = (["FFMA R1, R2, R3, R4 ;", "HGMMA.64x8x16.F16 R0, gdesc[UR4], RZ ;"] if index == 0
                else [f"{mma}, gsb0 ;"] * 2 if index == 5 else [f"{mma} ;", f"{mma}, gsb0 ;"])
        if index == 1:
            body.append("STL [R1+0x10], R5 ;")
        listing.append(f"\t\tFunction : {kernel}")
        listing += [f"        /*{16 * i:04x}*/                   {op}   /* 0x0 */" for i, op in enumerate(body)]
    problems = check_kernels(parse_sass("\n".join(listing)), registers)
    assert any("no HGMMA.64x128x" in p and names[0] in p for p in problems), problems
    assert any("LDL/STL" in p and names[1] in p for p in problems), problems
    assert any("255 registers" in p and "'sign of W' ceiling of 254" in p and names[2] in p for p in problems), problems
    assert any(f"{REGISTER_CEILINGS['forward'] + 1} registers" in p and "'forward'" in p and names[3] in p
               for p in problems), problems
    assert any("no register count" in p and names[4] in p for p in problems), problems
    assert any("wgmma serialised" in p and names[5] in p for p in problems), problems
    assert len(problems) == 6, problems
    last = max(i for i, line in enumerate(listing) if "Function :" in line)
    problems = check_kernels(parse_sass("\n".join(listing[:last])), registers)  # one kernel fewer
    assert any("expected" in p for p in problems), problems


def test_register_families_name_every_sm90a_body():
    """Each transform and epilogue the build instantiates falls in the family it was measured in."""
    prefix = "_ZN6fastfa4gemm17fused_gemm_kernelINS0_8Sm90GmmaENS0_4Bf16ENS0_11GemmProblemINS0_11MatrixIndexES5_EENS0_"
    cases = {"13RuleTransformILNS_4RuleE1EEENS0_13StoreEpilogue": "drawn B",
             "13RuleTransformILNS_4RuleE2EEENS0_13StoreEpilogue": "sign of W",
             "13RuleTransformILNS_4RuleE3EEENS0_13StoreEpilogue": "drawn B",
             "13RuleTransformILNS_4RuleE4EEENS0_13StoreEpilogue": "sign of W",
             "17IdentityTransformENS0_13SplitEpilogueEEEvT1_T2_T3_": "unchanged B",
             "17IdentityTransformENS0_13StoreEpilogueIS3_NS0_12MatrixOutputEEEEEvT1_T2_T3_": "unchanged B",
             "17IdentityTransformENS0_22BiasActivationEpilogueIS3_NS0_12MatrixOutputEEEEEvT1_T2_T3_": "forward"}
    for suffix, family in cases.items():
        assert register_family(Kernel("sm_90a", prefix + suffix)) == family, suffix


# Set where a skip would hide a check that must run: FASTFA_EXPECT_SM90A=1 (CI's SASS stage) says
# a CUDA build for sm_90a is here to read; FASTFA_EXPECT_CUDA_TOOLKIT=1 (CI) that nvcc and the
# CUTLASS headers are, for the CPU checks of the data path.
EXPECT_SM90A, EXPECT_CUDA_TOOLKIT = "FASTFA_EXPECT_SM90A", "FASTFA_EXPECT_CUDA_TOOLKIT"


def _expected(variable: str) -> bool:
    return os.environ.get(variable, "0") not in ("", "0")


def _skip_unless_expected(variable: str, reason: str):
    if _expected(variable):
        pytest.fail(f"{variable}=1, but {reason}")
    pytest.skip(reason)


def _library() -> str | None:
    if os.environ.get("FASTFA_SASS_LIB"):
        library = os.environ["FASTFA_SASS_LIB"]
        assert os.path.isfile(library), f"FASTFA_SASS_LIB={library!r} is not a file"
        return library
    if fastfa._C.build_info().get("fused_cuda"):
        return fastfa._C.__file__
    return None


def test_fused_gemm_kernels_use_tensor_cores_without_spills():
    library = _library()
    if library is None:
        _skip_unless_expected(EXPECT_SM90A, "fastfa._C was built without the fused CUDA kernels and FASTFA_SASS_LIB "
                                            "is not set (build with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a and "
                                            "nvidia-cutlass installed)")
    tools = find_tool("cuobjdump"), find_tool("nvdisasm")
    if None in tools:
        _skip_unless_expected(EXPECT_SM90A, "cuobjdump / nvdisasm not found: "
                                            "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    kernels = parse_sass(cuobjdump(*tools, "-sass", library))
    registers = parse_registers(cuobjdump(*tools, "-res-usage", library))
    arches = sorted({kernel.arch for kernel in kernels if GEMM_KERNEL in kernel.name})
    if _expected(EXPECT_SM90A):
        assert "sm_90a" in arches, f"{EXPECT_SM90A}=1, but {library} holds fused GEMMs for {arches} only"
    for kernel in kernels:
        if GEMM_KERNEL in kernel.name and policy(kernel) == expected_policy(kernel.arch)[0]:
            opcode = expected_policy(kernel.arch)[1]
            print(f"{kernel.arch} {opcode}={tensor_core_count(kernel, opcode)} "
                  f"REG={registers.get((kernel.arch, kernel.name), '?')}/{register_ceiling(kernel)} "
                  f"LDL={kernel.opcodes['LDL']} STL={kernel.opcodes['STL']} {kernel.name}")
    problems = check_kernels(kernels, registers)
    assert not problems, "\n".join(problems)


def _mainloop_model():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "sass_mainloop.py")
    spec = importlib.util.spec_from_file_location("sass_mainloop", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mainloop_model_counts_the_interior_path_of_the_loop_with_the_mmas():
    """benchmarks/sass_mainloop.py on a made-up listing: a set-up loop without MMAs, then the
    mainloop with an element-by-element edge path beside the vector path, a layout branch, the
    four HGMMAs and the back edge. The model takes the vector path, the cheaper layout for "min"
    and the dearer for "max", one k-tile per iteration, and classes each instruction."""
    model = _mainloop_model()
    # The gather loads as many bytes as the vector load, in eight instructions.
    body = ["S2R R0, SR_TID.X", "MOV R1, RZ",
            "IADD3 R1, R1, 0x1, RZ", "ISETP.NE.AND P0, PT, R1, 0x4, PT", "@P0 BRA {setup}",  # set-up loop
            "IMAD R2, R1, 0x2, RZ",  # mainloop head
            "ISETP.GE.AND P1, PT, R2, R3, PT", "@P1 BRA {gather}",
            "LDG.E.128 R4, desc[UR4][R6.64]", "BRA {layout}",
            "LDG.E.U16 R4, desc[UR4][R6.64]", "LDG.E.U16 R5, desc[UR4][R6.64+0x2]",  # gather
            "LDG.E.U16 R8, desc[UR4][R6.64+0x4]", "LDG.E.U16 R9, desc[UR4][R6.64+0x6]",
            "LDG.E.U16 R12, desc[UR4][R6.64+0x8]", "LDG.E.U16 R13, desc[UR4][R6.64+0xa]",
            "LDG.E.U16 R14, desc[UR4][R6.64+0xc]", "LDG.E.U16 R15, desc[UR4][R6.64+0xe]",
            "ISETP.NE.AND P2, PT, R10, RZ, PT", "@P2 BRA {mn_major}",  # layout
            "STS.128 [R11], R4", "BRA {mma}",
            "STS.U16 [R11], R4", "STS.U16 [R11+0x80], R5", "STS.U16 [R11+0x100], R8",  # MN-major
            "STS.U16 [R11+0x180], R9", "STS.U16 [R11+0x200], R4", "STS.U16 [R11+0x280], R5",
            "STS.U16 [R11+0x300], R8", "STS.U16 [R11+0x380], R9",
            "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",  # mma
            "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",
            "FADD R12, R12, 1", "BAR.SYNC.DEFER_BLOCKING 0x0", "@!P3 BRA {head}", "EXIT"]
    labels = {"setup": 2, "head": 5, "gather": 10, "layout": 18, "mn_major": 22, "mma": 30}
    addresses = {name: f"0x{16 * i:x}" for name, i in labels.items()}
    name = "_ZN6fastfa4gemm17fused_gemm_kernelINS0_8Sm90GmmaENS0_4Bf16EusfRuleTransformILNS_4RuleE2EE"
    listing = ["\tcode for sm_90a", f"\t\tFunction : {name}"]
    listing += [f"        /*{16 * i:04x}*/                   {op.format(**addresses)} ;   /* 0x0 */"
                for i, op in enumerate(body)]
    (loop,) = model.models("\n".join(listing), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert loop.k_tiles == 1 and loop.budget == 256 and loop.instructions == 37 - 5
    # head 3, vector load + branch 2, layout test 2, STS.128 + branch 2, MMAs 4, FADD, BAR, back edge
    assert loop.cheapest.total == 16, loop.cheapest
    assert loop.cheapest.classes == {"integer": 3, "branch": 5, "global load": 1, "shared store": 1,
                                     "tensor core": 4, "float": 1, "other": 1}, loop.cheapest.classes
    assert loop.dearest.total == 16 - 2 + 8, loop.dearest  # the MN-major stores, still no gather
    assert model.short_name(name) == "bf16 linear grad_input usf"
    # The sign rules' fast path folds its keys with the 16-bit-pair minimum (VIMNMX3): integer.
    assert model.opcode_class("VIMNMX3.U16x2") == "integer"


# Today's figures with a margin, as multiples of the budget: a change that makes a grad_input
# mainloop issue more fails here. usf and frsf (173 and 211 of 256 on bf16's ordinary tiles,
# benchmarks/results/2026-12-01-sass-mainloop-after4.md) are held within the budget, issue 18's
# target; the drawn rules (2026-12-01-sass-mainloop-after.md) draw B once above 256 rows instead.
MAINLOOP_LIMITS = {"usf": 0.80, "frsf": 0.95, "brsf": 4.95, "fa drawn": 4.0}
# The conv grad_input kernels (implicit GEMM, channels_last walking its taps): usf 195, frsf 242
# of 256 (2026-12-01-sass-mainloop-after5.md), held within the budget; the drawn rules as they are.
CONV_MAINLOOP_LIMITS = {"usf": 0.85, "frsf": 1.0, "brsf": 6.5, "fa drawn": 4.7}


def _compiled_mainloops(tmp_path, source: str) -> list:
    """csrc/cuda/<source> compiled by nvcc for sm_90a (setup.py's flags), its mainloops read by
    benchmarks/sass_mainloop.py; skips without the toolkit (fails under FASTFA_EXPECT_CUDA_TOOLKIT=1)."""
    nvcc = _nvcc()
    tools = find_tool("cuobjdump"), find_tool("nvdisasm")
    if nvcc is None or None in tools:
        _skip_unless_expected(EXPECT_CUDA_TOOLKIT, "nvcc, cuobjdump or nvdisasm not found")
    try:
        import cutlass_library
    except ImportError:
        _skip_unless_expected(EXPECT_CUDA_TOOLKIT, "the CUTLASS / CuTe headers are missing: pip install "
                                                   "nvidia-cutlass==4.2.0.0 (in the test extra)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cutlass = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    cubin = str(tmp_path / (os.path.splitext(source)[0] + ".cubin"))
    build = subprocess.run([nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DFASTFA_WITH_CUDA",
                            "-DFASTFA_WITH_FUSED_CUDA", "-DFASTFA_HAS_SM90A", "-gencode=arch=compute_90a,code=sm_90a",
                            "-cubin", "-I", os.path.join(root, "csrc", "include"), "-I", cutlass, "-o", cubin,
                            os.path.join(root, "csrc", "cuda", source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    model = _mainloop_model()
    loops = model.models(cuobjdump(*tools, "-sass", cubin), root)
    print(model.table(loops))
    return loops


def test_mainloop_model_of_the_compiled_bf16_grad_input_kernels(tmp_path):
    """csrc/cuda/gemm_bf16_feedback.cu compiled by nvcc for sm_90a (setup.py's flags), read by
    benchmarks/sass_mainloop.py: each of its eight wgmma bodies has a mainloop, and issues per
    k-tile no more than MAINLOOP_LIMITS times the tensor cores' budget."""
    loops = _compiled_mainloops(tmp_path, "gemm_bf16_feedback.cu")
    model = _mainloop_model()
    # Each rule twice: C stored, and C's K slices (split_feedback_gemm), the same mainloop.
    found = {model.short_name(loop.kernel).split("grad_input ")[-1]: loop for loop in loops}
    assert set(found) == set(MAINLOOP_LIMITS) | {f"{rule} (split-K)" for rule in MAINLOOP_LIMITS}, sorted(found)
    for name, loop in found.items():
        rule = name.removesuffix(" (split-K)")
        assert loop.per_tile(loop.cheapest) <= MAINLOOP_LIMITS[rule] * loop.budget, (name, loop.per_tile(loop.cheapest))


def test_mainloop_model_of_the_compiled_bf16_conv_grad_input_kernels(tmp_path):
    """csrc/cuda/gemm_bf16_conv_feedback.cu, likewise: each of its four conv grad_input mainloops
    issues per k-tile no more than CONV_MAINLOOP_LIMITS times the tensor cores' budget."""
    loops = _compiled_mainloops(tmp_path, "gemm_bf16_conv_feedback.cu")
    model = _mainloop_model()
    found = {model.short_name(loop.kernel).split("conv grad_input ")[-1]: loop for loop in loops}
    assert set(found) == set(CONV_MAINLOOP_LIMITS), sorted(found)
    for rule, loop in found.items():
        per_tile = loop.per_tile(loop.cheapest)
        assert per_tile <= CONV_MAINLOOP_LIMITS[rule] * loop.budget, (rule, per_tile)


# The positive control of the Triton kernels' spill check (tests/triton_sm90.py): one warp
# holding 32 values per thread fits its registers; 256 per thread cannot (255 is the limit).
SPILL_CONTROL_SCRIPT = textwrap.dedent(r"""
    import triton
    from triton_sm90 import SpillRecord, compile_for_sm90, register_hungry_kernel

    record = SpillRecord()
    one_warp = triton.Config({}, num_warps=1, num_stages=1)
    for per_thread in (32, 256):
        record.add(f"{per_thread} per thread", compile_for_sm90(register_hungry_kernel, "fp32",
                                                                 dict(BLOCK=32 * per_thread), config=one_warp))
    record.print()
""")


def test_triton_spill_check_sees_a_kernel_that_spills():
    """The check the Triton tests run on their sm_90 cubins reports a kernel made to spill, and
    passes the same kernel with a working set that fits."""
    pytest.importorskip("triton")
    import triton_sm90

    spills = triton_sm90.compile_and_read_spills(SPILL_CONTROL_SCRIPT)
    assert spills["32 per thread"] is None, spills
    assert spills["256 per thread"] and "STL" in spills["256 per thread"], spills
    with pytest.raises(triton_sm90.Spilled, match="256 per thread"):
        triton_sm90.assert_no_spills(spills)


def _nvcc() -> str | None:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), shutil.which("nvcc")]
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def _host_program(tmp_path, source: str, *flags: str) -> str:
    """tests/cuda/<source>, compiled by nvcc for the host with the CuTe headers; skips without them
    (fails under FASTFA_EXPECT_CUDA_TOOLKIT=1)."""
    nvcc = _nvcc()
    if nvcc is None:
        _skip_unless_expected(EXPECT_CUDA_TOOLKIT, "no nvcc (CUDA toolkit) found")
    try:
        import cutlass_library
    except ImportError:
        _skip_unless_expected(EXPECT_CUDA_TOOLKIT, "the CUTLASS / CuTe headers are missing: pip install "
                                                   "nvidia-cutlass==4.2.0.0 (in the test extra)")
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
