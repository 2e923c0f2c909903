"""Time usf's CPU conv backward (grad_input only) per shape around its two size thresholds.

The thresholds are compile-time constants: kDeferMin in csrc/aten_backend.cpp conv2d_backward (usf's
rms scale on grad_input, one more op, instead of on B in the transform's pass) and kParallelMin in
csrc/cpu/feedback_transform.cpp rms_sign_kernel (the pass on the calling thread, instead of an
OpenMP region). To compare two settings, build each (or a scratch build reading them from the
environment) and run this script in alternating fresh processes; it prints one JSON object of the
minimum time per shape, in seconds, over the rounds, each round after a 48 MiB write that evicts
W from the caches as the rest of a training step does.

Usage: python benchmarks/usf_thresholds.py {defer,parallel} [--threads N] [--rounds R]
  defer:    one thread, 3x3 convolutions whose input is from 1/72 to 2x the filter's size
  parallel: (default two threads) filters of 32K to 590K elements on a small input
"""

import argparse
import json
import time

import torch

import fastfa  # noqa: F401  (registers torch.ops.fastfa)
from fastfa.rules import RMS_SCALE, Rule

# (batch, in channels, out channels, height = width, kernel), stride 1, padding 1
DEFER_SHAPES = ([(4, 32, 32, h, 3) for h in (2, 4, 8)] + [(4, 64, 64, h, 3) for h in (2, 4, 6, 8)]
                + [(1, 64, 64, 16, 3), (2, 64, 64, 16, 3)] + [(4, 128, 128, h, 3) for h in (4, 8, 12, 16)]
                + [(4, 256, 256, h, 3) for h in (2, 4, 8, 12)] + [(4, 512, 512, 2, 3)])
PARALLEL_SHAPES = ([(4, 64, c, 2, 3) for c in (57, 64, 114, 171, 228, 256, 284, 341, 398, 455, 512, 683, 910)]
                   + [(4, 64, 64, 16, 3), (4, 128, 128, 8, 3), (4, 256, 256, 4, 3)])


def time_shapes(shapes, rounds: int) -> dict:
    torch.manual_seed(0)
    cases = []
    for n, cin, cout, size, kernel in shapes:
        cases.append(((n, cin, cout, size, kernel), torch.randn(n, cin, size, size),
                      torch.randn(cout, cin, kernel, kernel) * 0.05, torch.randn(n, cout, size, size)))
    evict = torch.empty(48 * 2**20 // 4)
    best = {}
    for r in range(rounds):
        for key, x, w, g in cases:
            evict.fill_(r)
            start = time.perf_counter()
            torch.ops.fastfa.conv2d_backward(g, x, w, None, None, x.new_empty(0), x.new_empty(0), [1, 1], [1, 1],
                                             [1, 1], 1, int(Rule.USF), RMS_SCALE, 0, [0.0] * 4, "none",
                                             [True, False, False, False])
            elapsed = time.perf_counter() - start
            best[str(key)] = min(best.get(str(key), float("inf")), elapsed)
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("defer", "parallel"))
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 for defer, 2 for parallel)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or (1 if args.which == "defer" else 2))
    print(json.dumps(time_shapes(DEFER_SHAPES if args.which == "defer" else PARALLEL_SHAPES, args.rounds)))
