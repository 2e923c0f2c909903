"""Time the estimated rules' conv2d B gradient (CPU, one thread) around the small-conv threshold.

The direct loops of csrc/cpu/small_conv.cpp serve a layer's B gradient when its convolution takes at
most FASTFA_SMALL_CONV_MACS multiply-adds (read once per process; the default is the constant in that
file). To find the crossover, run this script in alternating fresh processes with the variable at 0
(ATen's calls everywhere) and at a large value (the loops everywhere): it prints one JSON object of
the minimum time, in seconds, of fastfa::conv2d_backward with only B's gradient asked for, per
(rule, dtype, shape), over the rounds. Each shape names its multiply-adds per map.

Usage: FASTFA_SMALL_CONV_MACS=0 python benchmarks/small_conv_threshold.py [--rounds R] [--calls C]
"""

import argparse
import json
import time

import torch

import fastfa  # noqa: F401  (registers torch.ops.fastfa)
from fastfa.rules import Rule

# (batch, in channels, out channels, height = width, kernel, stride, groups), padding kernel // 2
SHAPES = [(1, 4, 4, 4, 3, 1, 1), (2, 4, 4, 4, 3, 1, 1), (1, 8, 8, 4, 3, 1, 1), (2, 8, 8, 4, 3, 1, 1),
          (3, 8, 8, 4, 3, 1, 1), (1, 8, 8, 8, 3, 1, 1), (2, 8, 8, 8, 3, 1, 1), (4, 8, 8, 8, 3, 1, 1),
          (1, 16, 16, 8, 3, 1, 1), (4, 16, 16, 4, 1, 1, 1), (4, 32, 32, 4, 1, 1, 1),
          (2, 8, 8, 8, 3, 2, 2), (4, 8, 8, 8, 3, 2, 2)]
RULES = {"wm": (Rule.WM, [0.0, 1.0, 0.0, 1.0]), "aa": (Rule.AA, [1.0, 1.0, 0.0, 0.0, 1.0]),
         "ia": (Rule.IA, [1.0, 1.0, 1.0, 0.0, 1.0])}


def macs(n, cin, cout, size, kernel, stride, groups):
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return n * cout * out * out * (cin // groups) * kernel * kernel


def time_cases(rounds: int, calls: int) -> dict:
    torch.manual_seed(0)
    best = {}
    for dtype in (torch.float32, torch.float64):
        for name, (rule, alignment) in RULES.items():
            for shape in SHAPES:
                n, cin, cout, size, kernel, stride, groups = shape
                x = torch.randn(n, cin, size, size, dtype=dtype)
                w = torch.randn(cout, cin // groups, kernel, kernel, dtype=dtype)
                b = torch.randn_like(w)
                pad = kernel // 2
                out = (size + 2 * pad - kernel) // stride + 1
                g = torch.randn(n, cout, out, out, dtype=dtype)
                rng = torch.tensor([1, 0])
                args = (g, x, w, b, rng, x.new_empty(0), x.new_empty(0), [stride] * 2, [pad] * 2, [1, 1], groups,
                        int(rule), 1.0, 1, alignment, "none", [False, False, False, True])
                key = f"{name} {str(dtype)[6:]} {shape} macs={macs(*shape)}"
                for _ in range(rounds):
                    start = time.perf_counter()
                    for _ in range(calls):
                        torch.ops.fastfa.conv2d_backward(*args)
                    best[key] = min(best.get(key, float("inf")), (time.perf_counter() - start) / calls)
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(time_cases(args.rounds, args.calls)))
