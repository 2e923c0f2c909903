"""fastfa's Triton kernels compiled for Hopper (sm_90) without a GPU, and their machine code read.

Triton's NVIDIA backend ships ptxas, cuobjdump and nvdisasm (triton/backends/nvidia/bin), so
`triton.compile` for an sm_90 target runs the whole pipeline to a cubin on any machine. Whether
registers spilled is known only after ptxas (PTX registers are virtual): the spill check reads
the cubin's SASS for local-memory loads and stores (LDL / STL).

The compiles run in a child process (`run_without_interpreter`): the test process sets
TRITON_INTERPRET=1 on a machine without a GPU, and Triton then defines every kernel as an
interpreted function, which cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from machine_code import Kernel, cuobjdump, parse_registers, parse_sass

HOPPER = dict(backend="cuda", arch=90, warp_size=32)
# fastfa's kernels' pointers that do not point at the data's dtype.
INDEX_POINTERS = {"rng_ptr": "*i64", "taps_h_ptr": "*i32", "taps_w_ptr": "*i32"}
TOOLS = ("ptxas", "cuobjdump", "nvdisasm")
# The child's last line: {what was compiled: what spilled in it, or null}.
SPILL_REPORT = "spills: "


class Spilled(AssertionError):
    """Registers of a compiled kernel spilled to local memory."""


def missing_toolchain() -> str | None:
    """Why this triton cannot compile for sm_90 and read the result, or None when it can.

    Only a missing NVIDIA backend or a missing tool is a reason; anything else (a changed
    Triton API, a failing compile) is left to raise, so that a test fails instead of skipping.
    """
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"this triton ({triton.__version__}) has no NVIDIA backend"
    missing = []
    for tool in TOOLS:
        try:
            getattr(triton.knobs.nvidia, tool)
        except RuntimeError as error:  # knobs' "Cannot find <tool>": neither TRITON_<TOOL>_PATH nor the bundled one
            missing.append(f"{tool} ({error})")
    return f"this triton ({triton.__version__}) lacks {', '.join(missing)}" if missing else None


def run_without_interpreter(script: str, timeout: int = 600) -> str:
    """Runs `script` in a child Python without TRITON_INTERPRET (fastfa and this folder importable)
    and returns its stdout; skips only when the toolchain is missing, and fails on any error."""
    reason = missing_toolchain()
    if reason:
        pytest.skip(reason)
    import fastfa

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(fastfa.__file__)),
                                                      os.path.dirname(os.path.abspath(__file__)),
                                                      env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def autotuned_config(kernel, block_m: int, block_n: int):
    """The autotuner's configuration of `kernel` with that output tile, as it compiles it on a GPU."""
    return next(config for config in kernel.configs
                if (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) == (block_m, block_n))


def compile_for_sm90(kernel, dtype: str, constexprs: dict, floats=(), config=None, types=None):
    """`kernel` (a triton.jit function or an autotuner over one) compiled for sm_90: pointers to
    `dtype` (index pointers as INDEX_POINTERS), `floats` fp32 scalars, other scalars i32, and
    `types` {argument: Triton type} where it says otherwise (a scale passed as "*fp32"); with a
    triton.Config's block sizes, warps and stages (else 4 warps, 3 stages)."""
    if config is not None:
        constexprs = {**constexprs, **config.kwargs}
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif types and name in types:
            signature[name] = types[name]
        elif name.endswith("_ptr"):
            signature[name] = INDEX_POINTERS.get(name, f"*{dtype}")
        else:
            signature[name] = "fp32" if name in floats else "i32"
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget(**HOPPER),
                          options=dict(num_warps=config.num_warps if config else 4,
                                       num_stages=config.num_stages if config else 3))


def machine_code(compiled) -> tuple[Kernel, int]:
    """(the compiled kernel's SASS opcode counts, its registers per thread), read from its cubin."""
    cuobjdump_path, nvdisasm_path = triton.knobs.nvidia.cuobjdump.path, triton.knobs.nvidia.nvdisasm.path
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as file:
            file.write(compiled.asm["cubin"])
        kernels = parse_sass(cuobjdump(cuobjdump_path, nvdisasm_path, "-sass", cubin))
        registers = parse_registers(cuobjdump(cuobjdump_path, nvdisasm_path, "-res-usage", cubin))
    assert len(kernels) == 1 and kernels[0].opcodes, f"expected one kernel's SASS in the cubin, got {kernels}"
    kernel = kernels[0]
    # A lone cubin's resource listing names no architecture.
    return kernel, registers[(None, kernel.name)]


def spills(compiled) -> str | None:
    """What spilled in the compiled kernel, or None."""
    kernel, registers = machine_code(compiled)
    if kernel.local_memory_accesses:
        return (f"{kernel.name}: {kernel.opcodes['LDL']} LDL + {kernel.opcodes['STL']} STL "
                f"(registers spilled to local memory) at {registers} registers per thread")
    return None


class SpillRecord:
    """In the child process: what spilled in each compiled kernel, printed for the parent."""

    def __init__(self):
        self.spills = {}

    def add(self, what: str, compiled) -> None:
        self.spills[what] = spills(compiled)

    def print(self) -> None:
        print(SPILL_REPORT + json.dumps(self.spills))


def compile_and_read_spills(script: str) -> dict:
    """Runs `script` (which ends with a SpillRecord's print) without the interpreter and returns
    {what was compiled: what spilled in it, or None}."""
    last = run_without_interpreter(script).strip().splitlines()[-1]
    assert last.startswith(SPILL_REPORT), f"the script printed no spill report: {last!r}"
    return json.loads(last[len(SPILL_REPORT):])


def assert_no_spills(spill_report: dict) -> None:
    spilled = [f"{what}: {text}" for what, text in spill_report.items() if text]
    if spilled:
        raise Spilled("\n".join(spilled))


@triton.jit
def register_hungry_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """Test-only: each thread holds BLOCK / (32 * num_warps) values, all live until their sum is
    known. Past 255 registers' worth they must spill: the spill check's positive control."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    tl.store(y_ptr + offsets, x * tl.sum(x * x, axis=0))
