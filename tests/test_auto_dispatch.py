"""The "auto" cost model (fastfa._backend.auto_plan): it picks per pass as documented, and every
path it can pick for grad_input computes what the oracle does (on the CPU: aten, and Triton
under its interpreter; the cuda backend's data path is checked by tests/cuda/implicit_gemm_check.cu
through tests/test_sass.py)."""
from __future__ import annotations

import pytest
import torch

import fastfa
import oracle
import spec_options
from conftest import assert_close
from fastfa._backend import AUTO_COSTS, TRANSFORMED_RULES, auto_plan

F64 = torch.float64


def crossover_rows(rule, in_features, out_features, dtype, backend="cuda"):
    """The documented row count below which a fused grad_input is modelled faster (README)."""
    element = torch.finfo(dtype).bits // 8
    reads = 0 if rule == "fa" else (2 if rule == "frsf" else 1)
    transform_s = AUTO_COSTS.launch_us * 1e-6 + (reads + 1) * in_features * out_features * element / (
        AUTO_COSTS.bandwidth_tbs * 1e12)
    per_row_s = 2.0 * in_features * out_features / (AUTO_COSTS.peak_tflops[dtype] * 1e12)
    fraction = AUTO_COSTS.fused_fraction[(backend, rule)]
    return transform_s / per_row_s / (1 / fraction - 1)


@pytest.mark.parametrize("rule", TRANSFORMED_RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_grad_input_below_the_documented_row_count_vendor_above(rule, dtype):
    limit = crossover_rows(rule, 4096, 4096, dtype)
    below, above = int(limit * 0.9), int(limit * 1.1) + 1
    assert 1 <= below < above < 8192, limit  # the switch lies inside the bench's batch sweep
    assert auto_plan(rule, below, 4096, 4096, dtype, fused=("cuda",)).grad_input == "cuda"
    assert auto_plan(rule, above, 4096, 4096, dtype, fused=("cuda",)).grad_input == "aten"


@pytest.mark.parametrize("rule", ["bp", "kp", "wm", "sa", "aa", "ia"])
def test_grad_input_with_b_as_it_is_takes_the_vendor_gemm(rule):
    for rows in (1, 16, 8192):
        plan = auto_plan(rule, rows, 4096, 4096, torch.bfloat16)
        assert plan.grad_input == "aten" and set(plan.grad_input_ms) == {"aten"}, plan


def test_stored_fa_takes_the_vendor_gemm_drawn_fa_may_fuse():
    assert auto_plan("fa", 1, 4096, 4096, torch.bfloat16, drawn=False).grad_input == "aten"
    assert auto_plan("fa", 1, 4096, 4096, torch.bfloat16, drawn=True).grad_input != "aten"


def test_forward_and_grad_weight_take_the_vendor_gemm_and_only_usable_backends_are_picked():
    for rule in TRANSFORMED_RULES + ("bp",):
        for rows in (1, 64, 8192):
            plan = auto_plan(rule, rows, 1024, 2048, torch.bfloat16, fused=("triton",))
            assert plan.forward == "aten" and plan.grad_weight == "aten"
            assert plan.grad_input in ("aten", "triton"), plan
            assert auto_plan(rule, rows, 1024, 2048, torch.bfloat16, fused=()).grad_input == "aten"


def test_the_fastest_modelled_path_wins_and_ties_go_to_the_vendor_gemm():
    plan = auto_plan("usf", 16, 4096, 4096, torch.bfloat16)
    assert plan.grad_input == min(plan.grad_input_ms, key=plan.grad_input_ms.get)
    assert plan.grad_input == "triton"  # the estimates rank Triton's grad_input (40-60%) above cuda's (35-45%)
    assert auto_plan("usf", 0, 4096, 4096, torch.bfloat16, fused=()).grad_input == "aten"
    # No rows: the transform still costs its pass over W, the fused kernel nothing.
    assert auto_plan("usf", 0, 4096, 4096, torch.bfloat16).grad_input != "aten"


@pytest.mark.parametrize("argument, value, message", [
    ("rows", -1, "rows must be a non-negative int"), ("in_features", 2.0, "in_features must be"),
    ("out_features", True, "out_features must be"), ("dtype", torch.float64, "dtype must be one of")])
def test_bad_arguments_are_refused_by_name(argument, value, message):
    arguments = dict(rule="usf", rows=4, in_features=8, out_features=8, dtype=torch.bfloat16)
    arguments[argument] = value
    with pytest.raises(ValueError, match=message):
        auto_plan(**arguments)


def _grad_input(backend, rule, options, x, w, grad_output):
    x = x.detach().requires_grad_()
    y = fastfa.functional.linear(x, w, None, rule=rule, backend=backend, **options)
    (grad_x,) = torch.autograd.grad(y, x, grad_output)
    return grad_x


# (rule, options): each transformed rule, fa drawn from (seed, step).
PICKS = [("usf", {"scale": "kaiming"}), ("frsf", {}), ("brsf", {"seed": 5, "step": 3}), ("fa", {"seed": 11})]


@pytest.mark.parametrize("rule, options", PICKS, ids=[rule for rule, _ in PICKS])
def test_every_path_the_model_picks_matches_the_oracle(rule, options):
    """For a small batch (fused) and a large one (vendor) of a 4096x4096 layer, the path the
    model picks among those that run on this machine's CPU, run on a small ragged layer."""
    usable = tuple(b for b in ("triton",) if fastfa.backends()[b].usable)
    picked = {auto_plan(rule, rows, 4096, 4096, torch.bfloat16, fused=usable).grad_input for rows in (16, 8192)}
    assert "aten" in picked and (not usable or "triton" in picked), picked
    dtype, out_features, in_features = torch.float32, 19, 37
    x = torch.randn(5, in_features, dtype=dtype)
    w = torch.randn(out_features, in_features, dtype=dtype)
    w[0, :3] = 0  # sign(0) = 0
    feedback = None
    if rule == "frsf":
        feedback = torch.randn(out_features, in_features, dtype=dtype)
        options = dict(options, feedback=feedback)
    grad_output = torch.randn(5, out_features, dtype=dtype)
    resolved = spec_options.resolve(rule, tuple(w.shape), **{k: v for k, v in options.items() if k != "feedback"})
    big_b = resolved.feedback_matrix(w, feedback=feedback)
    _, expected, _, _ = oracle.linear(x.to(F64), w.to(F64), None, big_b.to(F64), grad_output.to(F64))
    for backend in sorted(picked):
        fastfa.clear_fallbacks()
        got = _grad_input(backend, rule, options, x, w, grad_output)
        assert not fastfa.last_fallbacks(), fastfa.last_fallbacks()
        assert_close(got, expected.to(dtype), dtype, f"{rule} grad_input on {backend}")
