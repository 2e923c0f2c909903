"""Triton Linear grad_input through tensor descriptors (TMA) against its pointer loads, and backprop's.

Times fastfa::triton_linear_backward's grad_input alone (output_mask [True, False, False, False]:
the activation "none", so delta is grad_output) with FASTFA_TRITON_TMA=auto (tensor descriptors
on sm_90 and newer) and =0 (pointer loads), and backprop's grad_input (grad_output @ W, torch's
matmul) in the same run, bf16, W 4096 x 4096 by default, over batch sizes; every timing is the
median of triton.testing.do_bench over a rotation of input sets larger than the L2 cache.
Results in design/gpu.md's shape ("op": "linear_grad_input", "backend": "triton-tma" or
"triton-pointers"), with the largest error against the fp32 product of the same B.

    python benchmarks/triton_tma.py --out benchmarks/results/<date>-<gpu>-triton-tma.json
    FASTFA_TRITON_AUTOTUNE=0 python benchmarks/triton_tma.py ...   # one configuration: compiles in about a minute

Without a GPU it runs a rehearsal at toy sizes under Triton's interpreter (FASTFA_TRITON_TMA=1
there; times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

import fastfa  # noqa: E402
from fastfa.rules import Rule  # noqa: E402
from fastfa.triton_kernels import linear  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# Inputs rotated through per timing, so that no call finds its operands in the L2 cache (50 MB on an H200).
ROTATION = 4


def _versions() -> dict:
    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "fastfa": getattr(fastfa, "__version__", None)}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _median_ms(fn, budget_ms: int) -> float | None:
    if GPU:
        return float(triton.testing.do_bench(fn, warmup=max(budget_ms // 4, 5), rep=budget_ms, return_mode="median"))
    fn()  # the interpreter: run once, time nothing
    return None


def measure(rule: str, rows: int, out_features: int, in_features: int, budget_ms: int) -> list[dict]:
    rule_id = int(Rule[rule.upper()])
    reads_r = rule == "frsf"
    sets = []
    for _ in range(ROTATION if GPU else 1):
        w = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=DEVICE) / out_features ** 0.5
        r = torch.randn_like(w) if reads_r else None
        sets.append((torch.randn(rows, out_features, dtype=w.dtype, device=DEVICE),
                     torch.empty(rows, in_features, dtype=w.dtype, device=DEVICE), w, r))
    rng = torch.tensor([5, 1], device=DEVICE)
    scale = 1.0 / in_features ** 0.5 if rule in ("usf", "brsf") else 1.0
    turn = [0]

    def next_set():
        turn[0] = (turn[0] + 1) % len(sets)
        return sets[turn[0]]

    def triton_grad_input():
        delta, x, w, r = next_set()
        return torch.ops.fastfa.triton_linear_backward(delta, x, w, r, rng, torch.empty(0), torch.empty(0), rule_id,
                                                       scale, 0, [0.0, 0.0, 0.0, 1.0], "none",
                                                       [True, False, False, False])[0]

    def backprop_grad_input():
        delta, _, w, _ = next_set()
        return delta @ w

    bp_ms = _median_ms(backprop_grad_input, budget_ms)
    delta, x, w, r = sets[0]
    b = torch.ops.fastfa.feedback_transform(w, r, rng, rule_id, scale, 0)
    expected = (delta.float() @ b.float())
    results = []
    for backend, mode in (("triton-tma", "auto" if GPU else "1"), ("triton-pointers", "0")):
        os.environ["FASTFA_TRITON_TMA"] = mode
        turn[0] = len(sets) - 1
        error = float(((triton_grad_input().float() - expected).abs().max() / expected.abs().max()).item())
        ms = _median_ms(triton_grad_input, budget_ms)
        results.append({"op": "linear_grad_input", "shape": f"{rows}x{out_features}x{in_features}", "dtype": "bf16",
                        "rule": rule, "backend": backend, "ms": ms, "bp_ms": bp_ms,
                        "ratio": ms / bp_ms if ms is not None else None, "peak_bytes": 0, "bp_peak_bytes": 0,
                        "max_rel_err": error,
                        # the path the kernel took (a layout TMA cannot read would have taken the pointers)
                        "descriptors": linear._tensor_descriptors(delta, w, r if reads_r else w, rule_id, reads_r)})
        print(json.dumps(results[-1]), flush=True)
    os.environ.pop("FASTFA_TRITON_TMA")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="bp,usf,frsf,brsf")
    parser.add_argument("--rows", default="16,256,2048,8192" if GPU else "21")
    parser.add_argument("--features", default="4096x4096" if GPU else "24x40", help="out_features x in_features")
    parser.add_argument("--budget-ms", type=int, default=100, help="do_bench's rep per timing")
    parser.add_argument("--out", help="results JSON (design/gpu.md's shape)")
    args = parser.parse_args()
    out_features, in_features = (int(n) for n in args.features.split("x"))
    rows = [row for rule in args.rules.split(",") for n in args.rows.split(",")
            for row in measure(rule, int(n), out_features, in_features, args.budget_ms)]
    device = torch.cuda.get_device_name() if GPU else f"cpu: {platform.processor() or platform.machine()}"
    results = {"commit": _commit(), "command": " ".join([f"FASTFA_TRITON_AUTOTUNE="
                                                         f"{os.environ.get('FASTFA_TRITON_AUTOTUNE', '1')}",
                                                         "python", *sys.argv]),
               "device": device, "versions": _versions(), "rows": rows}
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
