"""The static mainloop model: instructions per thread per k-tile of every fused GEMM kernel, read
from its sm_90a SASS, against the tensor cores' budget for its tile and warps.

    python benchmarks/sass_mainloop.py path/to/_C*.so|kernel.cubin ... [--path KERNEL]

For each fused_gemm_kernel body (the wgmma policy, Sm90Gmma) it finds the mainloop: the
innermost loop (a backward branch and the code between its target and it) holding the
kernel's HGMMAs. Inside it, the loop body without its back edge is a directed acyclic graph of
basic blocks; the steady-state path of an interior k-tile is the path from the loop's head to
its back edge that, in this order, issues the most tensor-core MMAs, loads the most global
bytes in vectors of at least 8 bytes (up to the operand tiles the kernel reads per k-tile),
stores the most bytes to shared memory (up to one A and one B tile per k-tile), and issues the
fewest instructions: every operand loaded as vectors, no gathers of single elements at an
edge, the next tile fetched and stored. The caps keep the search, which does not know that
two branches test one runtime value, from adding up loads or stores of exclusive paths.
Where the operands' layouts are runtime branches the cheapest layout wins ("min"); "max" is
the same search with the most instructions, so the spread shows what a runtime layout
branch can cost. Counts are divided by the k-tiles the path covers (its MMA work over one
tile's) and split by class.

The budget (benchmarks/README.md, "Static mainloop model"): a 128x128x64 bf16 k-tile is
128*128*64 MACs; an H100 / H200 SM's tensor cores do 2048 dense bf16 / fp16 MACs per cycle
(1024 tf32), so 512 cycles, in which its 4 schedulers issue 4 * 512 instructions, shared by the
CTA's 8 warps: 256 per thread per k-tile. More than that, and the schedulers, not the tensor
cores, set the pace.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from machine_code import cuobjdump, find_tool  # noqa: E402

GEMM_KERNEL = "fused_gemm_kernel"
SCHEDULERS_PER_SM = 4
# Dense tensor-core MACs per cycle per SM on sm_90 (H100 / H200: 989 bf16 TFLOP/s at
# 1.83 GHz over 132 SMs = 4096 FLOP, 2048 MAC; tf32 half of that).
MACS_PER_CYCLE = {"BF16": 2048, "F16": 2048, "TF32": 1024}

CLASSES = ("global load", "shared store", "shared load", "tensor core", "integer", "float", "branch", "other")
_GLOBAL_LOADS = {"LDG", "LDGSTS", "UTMALDG", "UBLKCP"}
_SHARED_STORES = {"STS", "ST", "STSM"}
_SHARED_LOADS = {"LDS", "LDSM"}
_TENSOR = {"HGMMA", "HMMA"}
_INTEGER = {"IMAD", "IADD3", "IADD", "VIADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "LEA", "IMNMX", "VIMNMX",
            "IABS", "POPC", "FLO", "BMSK", "SGXT", "PRMT", "BREV", "IMUL", "IDP", "SEL", "PLOP3", "ISCADD", "IMADSP",
            "VIMNMX3"}
_FLOAT = {"FADD", "FMUL", "FFMA", "FSETP", "FMNMX", "FSEL", "F2F", "F2FP", "F2I", "I2F", "I2FP", "FRND", "HADD2",
          "HMUL2", "HFMA2", "HSETP2", "HMNMX2", "MUFU", "FCHK", "FSWZADD", "DADD", "DMUL", "DFMA"}
_BRANCH = {"BRA", "BRX", "JMP", "JMX", "BSSY", "BSYNC", "EXIT", "RET", "CALL", "BREAK", "WARPSYNC", "BPT"}

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][\w.]*)([^;]*);")
# ptxas pads some sequences with instructions that never execute (`@!PT LDS RZ, [RZ]` before
# LDGSTS): they take issue slots, as padding ("other"), not as the access they spell.
_NEVER = "@!PT"


def opcode_class(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in _GLOBAL_LOADS:
        return "global load"
    if base in _SHARED_STORES:
        return "shared store"
    if base in _SHARED_LOADS:
        return "shared load"
    if base in _TENSOR:
        return "tensor core"
    # The uniform datapath's integer ops (UIADD3, ULOP3, ...) take issue slots too.
    if base in _INTEGER or (base.startswith("U") and base[1:] in _INTEGER):
        return "integer"
    if base in _FLOAT:
        return "float"
    if base in _BRANCH or (base.startswith("U") and base[1:] in _BRANCH):
        return "branch"
    return "other"


def instruction_class(instruction: "Instruction") -> str:
    return "other" if instruction.never else opcode_class(instruction.opcode)


def access_bytes(opcode: str) -> int:
    """Bytes per thread of a load or store, from its width suffix (32-bit without one)."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return size
    return 4


@dataclass
class Instruction:
    address: int
    opcode: str
    predicated: bool
    operands: str
    never: bool = False

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def target(self) -> int | None:
        if self.base in ("BRA", "JMP") and (match := re.search(r"0x([0-9a-f]+)", self.operands)):
            return int(match.group(1), 16)
        return None


@dataclass
class Function:
    arch: str
    name: str
    code: list[Instruction] = field(default_factory=list)


def parse_functions(listing: str) -> list[Function]:
    functions, arch = [], None
    for line in listing.splitlines():
        if match := re.search(r"code for (sm_\w+)", line):
            arch = match.group(1)
        elif match := re.search(r"Function : (\S+)", line):
            functions.append(Function(arch, match.group(1)))
        elif functions and (match := _LINE.search(line)):
            predicate = (match.group(2) or "").strip()
            functions[-1].code.append(Instruction(int(match.group(1), 16), match.group(3), bool(predicate),
                                                  match.group(4), predicate == _NEVER))
    return functions


@dataclass
class PathCount:
    k_tiles: float
    classes: Counter
    total: int
    code: list = field(default_factory=list)  # the path's instructions, in order


@dataclass
class Mainloop:
    kernel: str
    dtype: str
    instructions: int  # every instruction of the loop, all paths
    k_tiles: float  # k-tiles one iteration covers
    cheapest: PathCount
    dearest: PathCount
    budget: float

    def per_tile(self, path: PathCount) -> float:
        return path.total / path.k_tiles


def _mma_macs(opcode: str) -> tuple[int, str]:
    """(MACs per warpgroup, input type) of one HGMMA, e.g. HGMMA.64x128x16.F32.BF16."""
    match = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32(?:\.(\w+))?", opcode)
    if not match:
        return 0, ""
    m, n, k = (int(match.group(i)) for i in (1, 2, 3))
    return m * n * k, match.group(4) or ""


def mainloop(function: Function, tile: tuple[int, int, int], warps: int) -> Mainloop | None:
    """The model of `function`'s mainloop for a CTA tile (m, n, k bytes) computed by `warps` warps,
    or None without a loop holding HGMMAs."""
    code = function.code
    if not code:
        return None
    index = {ins.address: i for i, ins in enumerate(code)}
    loops = []
    for i, ins in enumerate(code):
        target = ins.target()
        if target is not None and target <= ins.address and target in index:
            first, last = index[target], i
            if any(c.base == "HGMMA" and _mma_macs(c.opcode)[0] for c in code[first:last + 1]):
                loops.append((last - first, first, last))
    if not loops:
        return None
    _, first, last = min(loops)
    body = code[first:last + 1]
    # Basic blocks: leaders at the head, at branch targets and after branches / exits.
    leaders = {0}
    for j, ins in enumerate(body):
        target = ins.target()
        if target is not None and target in index and first <= index[target] <= last:
            leaders.add(index[target] - first)
        if ins.base in ("BRA", "JMP", "EXIT", "RET", "BRX", "JMX") and j + 1 < len(body):
            leaders.add(j + 1)
    starts = sorted(leaders)
    blocks = [(s, (starts[b + 1] if b + 1 < len(starts) else len(body))) for b, s in enumerate(starts)]
    block_of = {s: b for b, (s, _) in enumerate(blocks)}
    dtype = ""
    for ins in body:
        dtype = dtype or _mma_macs(ins.opcode)[1]
    tile_m, tile_n, tile_k_bytes = tile
    element_bytes = 4 if dtype == "TF32" else 2
    tile_macs = tile_m * tile_n * (tile_k_bytes // element_bytes)
    budget = tile_macs / MACS_PER_CYCLE.get(dtype, 2048) * SCHEDULERS_PER_SM / warps

    def block_key(b):
        s, e = blocks[b]
        tc = global_bytes = shared_bytes = 0
        for ins in body[s:e]:
            cls = instruction_class(ins)
            if cls == "tensor core":
                tc += _mma_macs(ins.opcode)[0]
            elif cls == "global load":
                global_bytes += access_bytes(ins.opcode) if access_bytes(ins.opcode) >= 8 or ins.base != "LDG" else 0
            # LDGSTS (cp.async) fills shared memory as STS does, without registers.
            if cls == "shared store" or ins.base == "LDGSTS":
                shared_bytes += access_bytes(ins.opcode)
        return tc, global_bytes, shared_bytes, e - s

    def successors(b):
        s, e = blocks[b]
        tail = body[e - 1]
        result = []
        target = tail.target()
        back_edge = first + e - 1 == last
        if target is not None and not back_edge:
            t = index.get(target)
            if t is not None and first <= t <= last and t - first > s:  # forward edges only (inner loops once)
                result.append(block_of[t - first])
        unconditional = tail.base in ("BRA", "JMP", "EXIT", "RET") and not tail.predicated
        if not unconditional and not back_edge and b + 1 < len(blocks):
            result.append(b + 1)
        return result

    # Every k-tile stores one A and one B tile into shared memory: its share per thread caps the
    # shared bytes a path may count, so that the search cannot add a tile copied by cp.async in
    # the fetch to the same tile stored from registers in the commit (branches on one runtime
    # flag, which a search over the graph alone takes for independent).
    # Likewise the global bytes: each operand tile the kernel reads once per k-tile (A, and B
    # or the stored R as its rule reads them), so that loads of two exclusive branches (an
    # interior and an edge fetch) do not add up either.
    tile_share = tile_m * tile_k_bytes // (32 * warps)
    shared_per_tile, global_per_tile = 2 * tile_share, operand_tiles(function.name) * tile_share

    def best_path(sign, k_tiles):
        # Longest path over the DAG in address order, the state being the capped global and
        # shared bytes so far; lexicographic on (MMA work, global bytes, shared bytes,
        # sign * instructions).
        global_cap, shared_cap = global_per_tile * k_tiles, shared_per_tile * k_tiles
        states = [dict() for _ in blocks]  # block -> {(global, shared bytes): ((tc, sign n), previous)}
        states[0][(0, 0)] = ((0, 0), None)
        end = None
        for b in range(len(blocks)):
            tc, gb, sb, n = block_key(b)
            for held_bytes, (value, _) in list(states[b].items()):
                reached = (value[0] + tc, value[1] + sign * n)
                after = (min(global_cap, held_bytes[0] + gb), min(shared_cap, held_bytes[1] + sb))
                if first + blocks[b][1] - 1 == last:
                    option = ((reached[0], after[0], after[1], reached[1]), (b, held_bytes))
                    end = option if end is None or option[0] > end[0] else end
                    continue
                for c in successors(b):
                    held = states[c].get(after)
                    if held is None or reached > held[0]:
                        states[c][after] = (reached, (b, held_bytes))
        if end is None:
            return PathCount(0.0, Counter(), 0), 0
        path, at = [], end[1]
        while at is not None:
            path.append(at[0])
            at = states[at[0]][at[1]][1]
        code = [ins for b in reversed(path) for ins in body[blocks[b][0]:blocks[b][1]]]
        classes = Counter(instruction_class(ins) for ins in code)
        k_tiles = end[0][0] / tile_macs * (warps // 4)
        return PathCount(k_tiles, classes, len(code), code), end[0][0]

    # The caps count the k-tiles of an iteration: its MMA work, found without them first.
    _, macs = best_path(-1, 0)
    k_tiles = macs * (warps // 4) // tile_macs
    (cheapest, _), (dearest, _) = best_path(-1, k_tiles), best_path(+1, k_tiles)
    return Mainloop(function.name, dtype, len(body), cheapest.k_tiles, cheapest, dearest, budget)


def operand_tiles(name: str) -> int:
    """Operand tiles a kernel reads from global memory per k-tile: A, and B unless drawn (fa
    regenerates R), and the stored R for frsf (the RuleTransform numbers of feedback.h)."""
    rule = re.search(r"RuleTransformILNS_4RuleE(\d+)E", name)
    if rule is None:
        return 2
    return {"1": 1, "4": 3}.get(rule.group(1), 2)


def tile_geometry(root: str) -> tuple[tuple[int, int, int], int]:
    """((tile m, tile n, tile k bytes), warps) from csrc/cuda/gemm_kernel.cuh's constants."""
    text = open(os.path.join(root, "csrc", "cuda", "gemm_kernel.cuh")).read()

    def constant(name):
        return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))

    rows = constant("kTileRows")
    return (rows, rows, constant("kRowBytes")), constant("kThreads") // 32


# Readable names from the mangled ones: the views, the transform (rule) and the epilogue.
_RULES = {"1": "fa drawn", "2": "usf", "3": "brsf", "4": "frsf"}


def short_name(name: str) -> str:
    dtype = re.search(r"NS0_(?:\d+)?(Bf16|Fp16|Tf32)E", name)
    parts = [dtype.group(1).lower() if dtype else "?"]
    # The convolutions' implicit-GEMM views (implicit_gemm.cuh) name themselves in the type.
    views = ("Conv", "Image", "Im2col", "OutputGradRows", "FilterRows")
    parts.append("conv" if any(view in name for view in views) else "linear")
    if rule := re.search(r"RuleTransformILNS_4RuleE(\d+)E", name):
        parts.append(f"grad_input {_RULES.get(rule.group(1), rule.group(1))}")
        if "SplitEpilogue" in name:
            parts.append("(split-K)")
    elif "BiasActivationEpilogue" in name:
        parts.append("forward")
    elif "SplitEpilogue" in name:
        parts.append("grad_weight (split-K)")
    else:
        parts.append("identity (grad_input of bp / stored B; grad_weight)")
    return " ".join(parts)


def models(listing: str, root: str) -> list[Mainloop]:
    tile, warps = tile_geometry(root)
    found = []
    for function in parse_functions(listing):
        if GEMM_KERNEL in function.name and "Sm90Gmma" in function.name and function.arch == "sm_90a":
            model = mainloop(function, tile, warps)
            if model is not None:
                found.append(model)
    return found


def table(loops: list[Mainloop]) -> str:
    header = ("| kernel | loop instr. | k-tiles / iter. | per k-tile (min) | per k-tile (max) | budget | min / budget | "
              + " | ".join(CLASSES) + " |")
    lines = [header, "|" + "---|" * (7 + len(CLASSES))]
    for loop in sorted(loops, key=lambda l: short_name(l.kernel)):
        low, high = loop.per_tile(loop.cheapest), loop.per_tile(loop.dearest)
        per_class = " | ".join(f"{loop.cheapest.classes[c] / loop.cheapest.k_tiles:.0f}" for c in CLASSES)
        lines.append(f"| {short_name(loop.kernel)} | {loop.instructions} | {loop.k_tiles:g} | {low:.0f} | "
                     f"{high:.0f} | {loop.budget:.0f} | {low / loop.budget:.2f} | {per_class} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binaries", nargs="+", help="the built extension (_C*.so) or sm_90a cubins")
    parser.add_argument("--path", metavar="KERNEL", help="also print the instructions of the cheapest path of the "
                        "kernels whose short name (first column) contains KERNEL")
    args = parser.parse_args(argv)
    tools = find_tool("cuobjdump"), find_tool("nvdisasm")
    if None in tools:
        print("cuobjdump / nvdisasm not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm", file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    loops = []
    for binary in args.binaries:
        loops += models(cuobjdump(*tools, "-sass", binary), root)
    if not loops:
        print("no sm_90a fused GEMM mainloop found", file=sys.stderr)
        return 1
    print(table(loops))
    for loop in loops:
        if args.path and args.path in short_name(loop.kernel):
            print(f"\n{short_name(loop.kernel)}: {loop.cheapest.total} instructions")
            for ins in loop.cheapest.code:
                print(f"  {ins.address:6x}  {instruction_class(ins):12}  {ins.opcode} {ins.operands.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
