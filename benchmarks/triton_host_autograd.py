"""Host time of the Triton ops' autograd: a forward + backward step through autograd against the
same two op calls made directly (forward under no_grad, then the backward op), on tiny shapes.

The difference is what autograd adds per step around the Triton kernels (issue 14): the node, the
saved tensors, the engine, and (before csrc/autograd.cpp served the Triton ops) torch.library's
Python wrapper. The aten ops' rows (--backends) are the reference: the same C++ node. Run under TRITON_INTERPRET=1 on a CPU, the kernels themselves run in numpy (tens
of ms a step, which hides the host's µs), so --dtype float64 is the measure there: the Triton ops
take fp64 through their whole Python path and autograd, and hand the arithmetic to the aten ops
(their recorded fallback), which take µs. --no-launch measures the other path, the one a GPU runs:
fp32 with every Triton kernel launch replaced by the grid's evaluation alone (as Triton's launcher
evaluates it, once per launch, on the interpreter's configuration; outputs left unwritten), so what
remains is the ops' own Python up to their launches (not Triton's launcher, nor any kernel). Each variant's
time is its minimum over rounds of the timing thread's CPU time (noise only ever adds), rounds
interleaved.
Usage: TRITON_INTERPRET=1 python benchmarks/triton_host_autograd.py [--dtype float64] [--steps 200]
       [--no-launch]
"""

import argparse
import time

import torch

import fastfa  # noqa: F401  (registers torch.ops.fastfa)
from fastfa import ops


def _cases(dtype, backend):
    linear, conv2d = ops.linear_op(backend), ops.conv2d_op(backend)
    prefix = "triton_" if backend == "triton" else ""
    linear_bw = getattr(torch.ops.fastfa, f"{prefix}linear_backward").default
    conv2d_bw = getattr(torch.ops.fastfa, f"{prefix}conv2d_backward").default
    tail = (1.0, 0, [0.0, 0.0, 0.0, 0.0], "none")
    x, w, b = (torch.randn(shape, dtype=dtype) for shape in ((1, 16), (16, 16), (16,)))
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    cx, cw, cb = (torch.randn(shape, dtype=dtype) for shape in ((1, 4, 4, 4), (4, 4, 3, 3), (4,)))
    rng = torch.tensor([1234, 0], dtype=torch.int64)
    for rule, name in ((0, "bp"), (2, "usf")):
        r = rng if rule == 2 else None
        yield (f"{backend}: Linear(16,16) batch 1, {name}", lambda a: linear(a[0], a[1], a[2], None, r, rule, *tail),
               lambda a, out, g: linear_bw(g, a[0], a[1], None, r, out[1], out[2], rule, *tail, [True] * 3 + [False]),
               (x, w, b))
        yield (f"{backend}: Conv2d(4,4,3,padding=1) on 1x4x4x4, {name}",
               lambda a: conv2d(a[0], a[1], a[2], None, r, *geometry, rule, *tail),
               lambda a, out, g: conv2d_bw(g, a[0], a[1], None, r, out[1], out[2], *geometry, rule, *tail,
                                           [True] * 3 + [False]),
               (cx, cw, cb))


def _time(step, steps):
    start = time.thread_time()
    for _ in range(steps):
        step()
    return (time.thread_time() - start) / steps * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--backends", nargs="+", choices=("triton", "aten"), default=["triton", "aten"],
                        help="aten: the aten ops through their C++ node, for reference")
    parser.add_argument("--no-launch", action="store_true",
                        help="fp32, the Triton kernels' launches replaced by nothing: the ops' Python on the path "
                             "a GPU runs (the triton backend only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.no_launch:
        if args.dtype != "float32" or args.backends != ["triton"]:
            parser.error("--no-launch measures the Triton ops' fp32 path: pass --dtype float32 --backends triton")
        from fastfa.triton_kernels import conv2d, linear  # each module calls the launch it imported

        def grid_only(kernel, grid, *args, **kwargs):
            if callable(grid):  # the meta-parameters: the configuration's, then the launch's constexprs
                grid({**linear.gemm_configs()[0].kwargs, **kwargs})

        for module in (linear, conv2d):
            module.launch = grid_only
    print(f"torch {torch.__version__}, {args.dtype}{', no launches' if args.no_launch else ''}; µs per step, "
          f"minimum over {args.rounds} rounds of {args.steps} steps")
    print("| case | autograd step | direct op calls | autograd's share |")
    print("|---|---|---|---|")
    for name, forward, backward, tensors in (case for backend in args.backends for case in _cases(getattr(torch, args.dtype), backend)):
        leaves = [t.clone().requires_grad_() for t in tensors]
        grad = torch.ones_like(forward(tensors)[0])

        def through_autograd():
            forward(leaves)[0].backward(grad)

        def direct():
            with torch.no_grad():
                out = forward(tensors)
            backward(tensors, out, grad)

        for step in (through_autograd, direct):  # warm-up: the kernels' first calls compile / trace
            step()
        times = {through_autograd: [], direct: []}
        for _ in range(args.rounds):
            for step in times:
                times[step].append(_time(step, args.steps))
        with_autograd, without = min(times[through_autograd]), min(times[direct])
        print(f"| {name} | {with_autograd:.0f} | {without:.0f} | {with_autograd - without:.0f} |")


if __name__ == "__main__":
    main()
