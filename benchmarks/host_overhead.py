"""Host time of one forward + backward step on tiny shapes: fastfa's layers against torch's own.

One torch thread; the shapes are small enough that the kernels cost little next to the host's
per-call work (argument handling, autograd, dispatch), which is what this measures.
Usage: python benchmarks/host_overhead.py [--steps 2000]
"""

import argparse

import torch

from fastfa.bench.host import host_overhead_rows, print_host_overhead

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print_host_overhead(host_overhead_rows(steps=args.steps))
