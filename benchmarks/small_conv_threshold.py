"""Time the estimated rules' conv2d B gradient (CPU, one thread) on both sides of the small-conv threshold.

csrc/cpu/small_conv.cpp's direct loops serve a layer's B gradient when its convolution takes at most
kSmallConvMaxMacs multiply-adds per map, and ATen's calls above. To find the crossover, make a
scratch build whose small_conv2d_applies reads the limit from the environment at each call
(`std::atoll(std::getenv("FASTFA_SMALL_CONV_MACS"))` in place of the constant) and run this script
with it: per (dtype, shape, rule) it alternates the limit between 0 (ATen) and 10^9 (the loops) in
blocks of calls in one process, so that both sides see the same load, and prints the 10th percentile
of the single-call times of fastfa::conv2d_backward with only B's gradient asked for (aa and ia with
their layers' default normalize_input), in microseconds, and their ratio (loops / ATen).

Usage: python benchmarks/small_conv_threshold.py [--blocks B] [--calls C] [SHAPE ...]
  SHAPE: batch,in,out,size[,kernel,stride,groups] (padding kernel // 2); default: the committed sweep
"""

import argparse
import os
import time

import torch

import fastfa  # noqa: F401  (registers torch.ops.fastfa)
from fastfa.rules import Rule

SHAPES = ["1,4,4,4", "2,4,4,4", "1,8,8,4", "2,8,8,4", "1,8,8,8", "2,8,8,8", "1,16,16,8", "4,16,16,4,1,1,1",
          "2,8,8,8,3,2,2", "4,8,8,8,3,2,2"]
RULES = {"wm": (Rule.WM, [0.0, 1.0, 0.0, 1.0]), "aa": (Rule.AA, [1.0, 1.0, 0.0, 0.0, 1.0]),
         "ia": (Rule.IA, [1.0, 1.0, 1.0, 0.0, 1.0])}
SIDES = {"aten": "0", "loops": "1000000000"}


def parse(text):
    values = [int(v) for v in text.split(",")]
    return tuple(values + [3, 1, 1][len(values) - 4:]) if len(values) < 7 else tuple(values)


def macs(batch, cin, cout, size, kernel, stride, groups):
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return batch * cout * out * out * (cin // groups) * kernel * kernel


def time_shape(shape, dtype, blocks, calls):
    batch, cin, cout, size, kernel, stride, groups = shape
    pad = kernel // 2
    out = (size + 2 * pad - kernel) // stride + 1
    x = torch.randn(batch, cin, size, size, dtype=dtype)
    w = torch.randn(cout, cin // groups, kernel, kernel, dtype=dtype)
    feedback, grad = torch.randn_like(w), torch.randn(batch, cout, out, out, dtype=dtype)
    row = {}
    for name, (rule, alignment) in RULES.items():
        args = (grad, x, w, feedback, torch.tensor([1, 0]), x.new_empty(0), x.new_empty(0), [stride] * 2, [pad] * 2,
                [1, 1], groups, int(rule), 1.0, 1, alignment, "none", [False, False, False, True])
        times = {side: [] for side in SIDES}
        for _ in range(blocks):
            for side, limit in SIDES.items():
                os.environ["FASTFA_SMALL_CONV_MACS"] = limit
                for _ in range(calls):
                    start = time.perf_counter()
                    torch.ops.fastfa.conv2d_backward(*args)
                    times[side].append(time.perf_counter() - start)
        row[name] = {side: sorted(t)[len(t) // 10] * 1e6 for side, t in times.items()}
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="*", default=SHAPES)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.float64):
        for shape in map(parse, args.shapes):
            row = time_shape(shape, dtype, args.blocks, args.calls)
            print(f"{str(dtype)[6:]:8s} {str(shape):26s} macs {macs(*shape):7d} | " + " | ".join(
                f"{name} aten {t['aten']:6.1f} loops {t['loops']:6.1f} ({t['loops'] / t['aten']:.2f})"
                for name, t in row.items()), flush=True)
