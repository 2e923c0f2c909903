"""Fit the "auto" cost model's constants (fastfa._backend.AutoCosts) to a GPU run of
benchmarks/auto_dispatch.py, and say how often the fitted model picks the path that was fastest.

  peak_tflops[dtype]     median FLOP rate of grad_input's cuBLAS GEMM at 1024 rows or more
  launch_us, bandwidth   least squares of the transform kernel's time on the bytes it moves
                         ((reads + 1) x W's bytes: W, and R for frsf, read; B written)
  fused_fraction         per rule, least squares through the origin of vendor GEMM time on the
                         fused grad_input's time (fused = vendor / fraction; brsf / drawn fa: B
                         drawn in the GEMM); (cuda, bp), the identity kernel, the same on the
                         draw-once passes less the transform kernel's time (draw once = transform +
                         vendor / fraction(bp)); with brsf's and fa's it sets where B is drawn once
                         (triton, rule), (triton, bp): the same on the Triton grad_input's passes
                         (pass:triton_grad_input[_draw_once]) where the run has them (the draw-once
                         pass less the transform kernel's time: Triton's own transform kernel is
                         taken to cost what fastfa's does); where it has none, the estimate is kept
                         and the fit says so
  nchw_factor            not measured here (linear layers only): kept

Usage: python benchmarks/fit_auto_costs.py RESULTS.json   (prints the AutoCosts to pass to
fastfa._backend.set_auto_costs, and the same as the defaults of csrc/include/fastfa/dispatch.h's
AutoCosts, where the model's constants live)
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from fastfa._backend import AUTO_COSTS, _to_fields, auto_plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
READS = {"usf": 1, "brsf": 1, "frsf": 2, "fa": 0}  # as auto_plan models the transform pass
#: Each fused backend's grad_input pass in benchmarks/auto_dispatch.py (brsf / drawn fa: drawn in the
#: GEMM; the same name + "_draw_once": drawn once, then the identity kernel).
PASSES = {"cuda": "pass:fused_grad_input", "triton": "pass:triton_grad_input"}


def _dims(row):
    return [int(part) for part in row["shape"].split("x")]  # rows, in_features, out_features


def fit(results: dict):
    rows = results["rows"]
    passes = {}
    for row in rows:
        passes.setdefault((row["shape"], row["dtype"], row["rule"]), {})[row["op"]] = row["ms"]
    peaks = {}
    for name, dtype in DTYPES.items():
        rates = [2.0 * r * i * o / (row["ms"] * 1e-3) / 1e12 for row in rows
                 if row["op"] == "pass:vendor_gemm" and row["dtype"] == name
                 for r, i, o in [_dims(row)] if r >= 1024]
        peaks[dtype] = statistics.median(rates) if rates else AUTO_COSTS.peak_tflops[dtype]
    points = [((READS[row["rule"]] + 1) * _dims(row)[1] * _dims(row)[2] * torch.finfo(DTYPES[row["dtype"]]).bits // 8,
               row["ms"] * 1e-3) for row in rows if row["op"] == "pass:transform"]
    launch_us, bandwidth_tbs = AUTO_COSTS.launch_us, AUTO_COSTS.bandwidth_tbs
    if len({b for b, _ in points}) >= 2:
        mean_b = statistics.fmean(b for b, _ in points)
        mean_t = statistics.fmean(t for _, t in points)
        slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / sum((b - mean_b) ** 2 for b, _ in points)
        if slope > 0:
            bandwidth_tbs = 1.0 / slope / 1e12
            launch_us = max(0.0, (mean_t - slope * mean_b) * 1e6)
    fractions = dict(AUTO_COSTS.fused_fraction)

    def through_origin(pairs):  # vendor = fraction x fused, least squares
        return sum(v * f for v, f in pairs) / sum(f * f for _, f in pairs)

    kept = []
    for backend, op in PASSES.items():
        for rule in READS:
            pairs = [(p["pass:vendor_gemm"], p[op]) for (_, _, r), p in passes.items()
                     if r == rule and "pass:vendor_gemm" in p and op in p]
            if pairs:
                fractions[(backend, rule)] = through_origin(pairs)
            else:
                kept.append((backend, rule))
        identity = [(p["pass:vendor_gemm"], p[op + "_draw_once"] - p["pass:transform"]) for p in passes.values()
                    if {"pass:vendor_gemm", "pass:transform", op + "_draw_once"} <= set(p)]
        if identity:
            fractions[(backend, "bp")] = through_origin(identity)
        else:
            kept.append((backend, "bp"))
    costs = AUTO_COSTS._replace(peak_tflops=peaks, launch_us=launch_us, bandwidth_tbs=bandwidth_tbs,
                                fused_fraction=fractions)
    return costs, kept


def agreement(results: dict, costs) -> tuple:
    """(decisions where the model picks what measured faster, decisions): per case and fused backend
    timed, grad_input's path (the fused kernel, or the transform kernel + cuBLAS) and, for brsf /
    drawn fa, the fused kernel's draw (in the GEMM, or once by the transform kernel)."""
    passes = {}
    for row in results["rows"]:
        passes.setdefault((row["shape"], row["dtype"], row["rule"]), {})[row["op"]] = row["ms"]
    right = total = 0
    for (shape, dtype, rule), times in passes.items():
        r, i, o = (int(part) for part in shape.split("x"))
        for backend, op in PASSES.items():
            if not {"pass:vendor_gemm", "pass:transform", op} <= set(times):
                continue
            plan = auto_plan(rule, r, i, o, DTYPES[dtype], fused=(backend,), costs=costs)
            fused = times[op]
            if op + "_draw_once" in times:
                once_faster = times[op + "_draw_once"] < fused
                right += once_faster == (getattr(plan, backend + "_draw") == "once")
                total += 1
                fused = min(fused, times[op + "_draw_once"])
            right += (fused < times["pass:vendor_gemm"] + times["pass:transform"]) == (plan.grad_input == backend)
            total += 1
    return right, total


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    results = json.load(open(sys.argv[1]))
    costs, kept = fit(results)
    print("AUTO_COSTS = AutoCosts(")
    print("    peak_tflops={" + ", ".join(f"torch.{str(d).split('.')[1]}: {v:.1f}" for d, v in costs.peak_tflops.items())
          + "},")
    print(f"    bandwidth_tbs={costs.bandwidth_tbs:.2f},\n    launch_us={costs.launch_us:.1f},")
    print("    fused_fraction={" + ", ".join(f"{k!r}: {v:.4g}" for k, v in costs.fused_fraction.items()) + "},")
    print(f"    nchw_factor={costs.nchw_factor},\n)")
    fields = _to_fields(costs)
    print("// csrc/include/fastfa/dispatch.h, AutoCosts:\n" + "\n".join(f"//   {name} = {value:.4g}"
                                                                     for name, value in fields.items()))
    if kept:
        print("kept the estimate (no timing of it in this run): " + ", ".join("_".join(key) for key in kept))
    for label, model in (("estimates", AUTO_COSTS), ("fitted", costs)):
        right, total = agreement(results, model)
        print(f"{label}: the model's grad_input path (and brsf's / fa's draw) agrees with the measured faster one in "
              f"{right} of {total} decisions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
