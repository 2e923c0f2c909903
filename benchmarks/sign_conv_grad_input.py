"""Time usf's weight-bound CPU conv grad_input (csrc/cpu/sign_conv_grad_input.cpp) per shape, W cold.

Each round writes 48 MiB (evicting the filters from the caches, as the rest of a training step
does), then runs `fastfa::conv2d_backward` with only grad_input asked for on three filters of the
shape in a row; the time per conv is the round's over three, and the script prints one JSON object
of the minimum over the rounds per shape, in milliseconds. To compare two builds, run it in
alternating fresh processes (PYTHONPATH naming a copy of python/fastfa with the other build's _C).
`--clock thread` times the calling thread's CPU time: at one thread, on a shared machine, it leaves
out the time the process waited for a core. The kernel is the widest the CPU runs (AVX-512, AVX2);
FASTFA_CPU_ISA=avx2 in the environment caps it, =none times the general path instead.

Usage: python benchmarks/sign_conv_grad_input.py [--threads N] [--rounds R] [--dtype float32|float64]
                                                 [--clock wall|thread]
Shapes (batch 4, 2x2 output, M = 16 rows): resnet18's layer4 512 -> 512 3x3 and its first conv,
256 -> 512 3x3 at stride 2, both in whole micro-tiles, and 389 -> 512 3x3 (3501 columns: tile tails).
"""

import argparse
import json
import time

import torch

import fastfa  # noqa: F401  (registers torch.ops.fastfa)
from fastfa.rules import RMS_SCALE, Rule

# name: (in channels, input height = width, stride), 512 output channels, 3x3, padding 1
SHAPES = {"layer4 512x512": (512, 2, 1), "layer4.0.conv1 256->512": (256, 4, 2), "tails 389->512": (389, 2, 1)}


def time_shapes(rounds: int, dtype: torch.dtype, clock) -> dict:
    torch.manual_seed(0)
    evict = torch.empty(48 * 2**20 // 4)
    best = {}
    for name, (in_channels, size, stride) in SHAPES.items():
        x = torch.randn(4, in_channels, size, size, dtype=dtype)
        filters = [torch.randn(512, in_channels, 3, 3, dtype=dtype) * 0.02 for _ in range(3)]
        out = (size + 2 - 3) // stride + 1
        g = torch.randn(4, 512, out, out, dtype=dtype)
        empty = x.new_empty(0)
        for r in range(rounds):
            evict.fill_(r)
            start = clock()
            for w in filters:
                torch.ops.fastfa.conv2d_backward(g, x, w, None, None, empty, empty, [stride] * 2, [1, 1], [1, 1], 1,
                                                 int(Rule.USF), RMS_SCALE, 0, [0.0] * 4, "none",
                                                 [True, False, False, False])
            elapsed = (clock() - start) / len(filters) * 1e3
            best[name] = min(best.get(name, float("inf")), elapsed)
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    best = time_shapes(args.rounds, getattr(torch, args.dtype), clock)
    print(json.dumps({name: round(ms, 3) for name, ms in best.items()}))
