"""The GPU check's "auto" stage: "auto" against each forced path, and the passes the cost model
is made of, timed so that benchmarks/fit_auto_costs.py can calibrate fastfa._backend.AUTO_COSTS.

Linear layers in bf16 (fp16 and fp32 through tf32 with --dtypes), usf / frsf / brsf / drawn fa,
rows on both sides of the modelled crossover. Rows of the results file (design/gpu.md's shape):

  op "linear"              one forward + backward step, backend "auto" (the cuda backend: vendor
                           forward and grad_weight, grad_input by the model), "aten" (transform
                           kernel + cuBLAS everywhere) or "cuda-fused" (every pass on the fused
                           kernels, fastfa.set_cuda_fused(True)); bp_ms: torch's nn.Linear step
  op "pass:vendor_gemm"    grad_input's cuBLAS GEMM alone (delta B)
  op "pass:transform"      fastfa's transform kernel alone (B = T(W))
  op "pass:fused_grad_input"  the cuda backend's fused grad_input alone (brsf / drawn fa: B drawn in
                           the GEMM, by every CTA along M)
  op "pass:fused_grad_input_draw_once"  brsf / drawn fa: the transform kernel draws B once, then the
                           fused identity kernel reads it (the model's other way for a drawn B)
  op "pass:triton_grad_input", "pass:triton_grad_input_draw_once"  with --triton, where the triton
                           backend is usable: the same two for the Triton backend's grad_input (its
                           own transform kernel draws B once); fit_auto_costs.py fits Triton's
                           constants on them. Opt-in: each new row count autotunes (and compiles)
                           the Triton kernel, which would spend the GPU check's budget

Usage: python benchmarks/auto_dispatch.py --out FILE.json [--budget 80] [--dtypes bf16] [--triton]
Without a GPU and a usable cuda (or, with --triton, triton) backend it says why and exits 0
(nothing to time); the passes of a backend that is not usable are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

import fastfa
from fastfa._backend import auto_costs, auto_plan, set_auto_costs
from fastfa.bench.machine import command_line, device_name, git_commit, versions
from fastfa.rules import Distribution, Rule

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RULES = ("usf", "frsf", "brsf", "fa")
SHAPES = ((4096, 4096), (1024, 4096))  # (in_features, out_features)
ROWS = (16, 64, 256, 1024, 4096, 16384)


def _median_ms(step, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def _draw(backend: str, rule: str, way: str):
    """A fused kernel's drawn B one way ("in_gemm" or "once") whatever the rows: the model decides
    the draw (for cuda and triton alike), so a zero fraction for the other way's kernel leaves this
    way the only one."""
    previous = auto_costs()
    other = (backend, "bp") if way == "in_gemm" else (backend, rule)
    set_auto_costs(previous._replace(fused_fraction={**previous.fused_fraction, other: 0.0}))
    try:
        yield
    finally:
        set_auto_costs(previous)


def _feedback_arguments(rule: str, weight: torch.Tensor):
    """(feedback, rng, rule id, scale, distribution) as the ops take them."""
    scale = weight.shape[1] ** -0.5
    rng = torch.tensor([7, 3], dtype=torch.int64, device=weight.device)
    if rule == "frsf":
        return torch.randn_like(weight), None, int(Rule.FRSF), 1.0, int(Distribution.UNIFORM)
    if rule in ("brsf", "fa"):
        return None, rng, int(Rule[rule.upper()]), scale, int(Distribution.UNIFORM)
    return None, None, int(Rule.USF), scale, int(Distribution.UNIFORM)


def _layer_options(rule: str, weight: torch.Tensor) -> dict:
    if rule == "frsf":
        return {"feedback": torch.randn_like(weight)}
    return {"seed": 7} if rule in ("brsf", "fa") else {}


def time_case(rule, rows, in_features, out_features, dtype, repeats, usable) -> list:
    device = torch.device("cuda")
    x = torch.randn(rows, in_features, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(out_features, device=device, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(rows, out_features, device=device, dtype=dtype)
    reference = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)

    def bp_step():
        reference(x).backward(grad_output)

    bp_ms = _median_ms(bp_step, repeats)
    shape = f"{rows}x{in_features}x{out_features}"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    plan = auto_plan(rule, rows, in_features, out_features, dtype, fused=("cuda",))
    rows_out = []

    def row(op, backend, ms, **extra):
        rows_out.append(dict(op=op, shape=shape, dtype=name, rule=rule, backend=backend, ms=ms, bp_ms=bp_ms,
                             ratio=ms / bp_ms, **extra))

    options = _layer_options(rule, weight)
    steps = (("auto", "auto", False), ("aten", "aten", False)) + ((("cuda-fused", "cuda", True),) if "cuda" in usable
                                                                 else ())
    for label, backend, fused in steps:
        fastfa.set_cuda_fused(fused)

        def step():
            with fastfa.use_backend(backend):
                fastfa.functional.linear(x, weight, bias, rule=rule, **options).backward(grad_output)

        row("linear", label, _median_ms(step, repeats), modelled_grad_input=plan.grad_input,
            modelled_draw=plan.cuda_draw)
    fastfa.set_cuda_fused(False)

    feedback, rng, rule_id, scale, distribution = _feedback_arguments(rule, weight)
    w = weight.detach()
    big_b = torch.ops.fastfa.feedback_transform(w, feedback, rng, rule_id, scale, distribution)
    delta = grad_output
    row("pass:vendor_gemm", "aten", _median_ms(lambda: torch.mm(delta, big_b), repeats))
    row("pass:transform", "aten",
        _median_ms(lambda: torch.ops.fastfa.feedback_transform(w, feedback, rng, rule_id, scale, distribution),
                   repeats), weight_bytes=w.numel() * w.element_size())
    fastfa.set_cuda_fused(True)
    alignment = [0.0, 0.0, 0.0, 1.0]
    empty = x.new_empty(0)
    for backend, prefix in (("cuda", "pass:fused_grad_input"), ("triton", "pass:triton_grad_input")):
        if backend not in usable:
            continue
        backward = getattr(torch.ops.fastfa, f"{backend}_linear_backward")

        def fused_grad_input():
            backward(delta, x.detach(), w, feedback, rng, empty, empty, rule_id, scale, distribution, alignment,
                     "none", [True, False, False, False])

        if plan.cuda_draw is None:  # B is not drawn (the same for either backend)
            row(prefix, backend, _median_ms(fused_grad_input, repeats))
        else:
            for op, way in ((prefix, "in_gemm"), (prefix + "_draw_once", "once")):
                with _draw(backend, rule, way):
                    row(op, backend, _median_ms(fused_grad_input, repeats))
    fastfa.set_cuda_fused(False)
    return rows_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=80.0, help="seconds; cases past it are left out")
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--triton", action="store_true", help="also time the Triton grad_input's passes")
    args = parser.parse_args()
    statuses = fastfa.backends()
    usable = tuple(name for name in ("cuda", "triton")[:2 if args.triton else 1] if statuses[name].usable)
    if not torch.cuda.is_available() or not usable:
        print(f"auto_dispatch: nothing to time: {statuses['cuda'].reason}"
              + (f"; {statuses['triton'].reason}" if args.triton else ""))
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs through tf32 on every path compared
    start = time.monotonic()
    results = {"commit": git_commit(), "command": command_line(sys.argv), "device": device_name(torch.device("cuda")),
               "versions": versions(), "rows": []}
    done = True
    for dtype in (DTYPES[name] for name in args.dtypes.split(",")):
        for in_features, out_features in SHAPES:
            for rule in RULES:
                for rows in ROWS:
                    if time.monotonic() - start > args.budget:
                        done = False
                        break
                    results["rows"] += time_case(rule, rows, in_features, out_features, dtype, args.repeats,
                                                 usable)
                    with open(args.out, "w") as f:  # as it goes: a run cut short keeps what it timed
                        json.dump(results, f, indent=1)
    for row in results["rows"]:
        if row["op"] == "linear":
            print(f"{row['rule']:5} {row['shape']:>18} {row['backend']:10} {row['ms']:8.3f} ms  "
                  f"{row['ratio']:5.2f}x bp  (model: grad_input on {row['modelled_grad_input']}"
                  + (f", cuda draws B {row['modelled_draw']}" if row.get("modelled_draw") else "") + ")")
    print(f"auto_dispatch: {len(results['rows'])} rows in {time.monotonic() - start:.0f} s"
          + ("" if done else f" (budget {args.budget:.0f} s reached: the rest left out)") + f"; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
