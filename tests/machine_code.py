"""Compiled GPU code read without a GPU: `cuobjdump -sass` listings and `-res-usage` register
counts, for the cuda backend's extension (tests/test_sass.py) and Triton's cubins
(tests/triton_sm90.py).

A register that does not fit the register file is spilled to local memory: LDL / STL in the
SASS. PTX cannot show it (its registers are virtual; ptxas allocates them), so every spill
check here reads the machine code.
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

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][\w.]*)")


@dataclass
class Kernel:
    arch: str
    name: str
    opcodes: Counter = field(default_factory=Counter)  # base opcode: HGMMA, LDL, ...
    instructions: Counter = field(default_factory=Counter)  # with modifiers: HGMMA.64x128x16.F32.BF16
    # Of those, the HGMMAs marked gsb0: they wait for the wgmmas issued before them to complete. A
    # pipelined k-tile marks only its last; every one marked is ptxas serialising them (C7515).
    waiting: Counter = field(default_factory=Counter)

    @property
    def local_memory_accesses(self) -> int:
        """LDL + STL: loads and stores of spilled registers (or of a local array)."""
        return self.opcodes["LDL"] + self.opcodes["STL"]


def parse_sass(text: str) -> list[Kernel]:
    """Kernels of a `cuobjdump -sass` listing with their opcode counts."""
    kernels, arch = [], None
    for line in text.splitlines():
        if match := re.search(r"code for (sm_\w+)", line):
            arch = match.group(1)
        elif match := re.search(r"Function : (\S+)", line):
            kernels.append(Kernel(arch, match.group(1)))
        elif kernels and (match := _INSTRUCTION.search(line)):
            kernels[-1].opcodes[match.group(1).split(".")[0]] += 1
            kernels[-1].instructions[match.group(1)] += 1
            if "gsb0" in line:
                kernels[-1].waiting[match.group(1)] += 1
    return kernels


def parse_registers(listing: str) -> dict:
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


def find_tool(name: str) -> str | None:
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


def cuobjdump(cuobjdump_path: str, nvdisasm_path: str, *args: str) -> str:
    """`cuobjdump *args`'s listing. It calls nvdisasm for sm_90 code, found on PATH only."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(nvdisasm_path) + os.pathsep + env.get("PATH", "")
    return subprocess.run([cuobjdump_path, *args], check=True, capture_output=True, text=True, env=env).stdout
