"""The "auto" cost model (csrc/dispatch.cpp, asked by fastfa._backend.auto_plan and by the cuda
ops): it picks per pass as documented, draws a drawn B (brsf, drawn fa) in the cuda GEMM or once
as documented, the cuda ops' questions get the plan's answers, "auto" on a GPU resolves to the
cuda backend whose passes follow it, and every path it can pick for grad_input computes what the
oracle does (on the CPU: aten, and Triton under its interpreter; the cuda backend's data path is
checked by tests/cuda/implicit_gemm_check.cu through tests/test_sass.py, and on a GPU below)."""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fastfa
import oracle
import spec_options
from conftest import assert_close, away_from_relu_kink
from fastfa import _C, _backend
from fastfa._backend import AUTO_COSTS, TRANSFORMED_RULES, BackendStatus, auto_plan
from fastfa.rules import Rule

F64 = torch.float64


def _transform_and_per_row_s(rule, in_features, out_features, dtype):
    element = torch.finfo(dtype).bits // 8
    reads = 0 if rule == "fa" else (2 if rule == "frsf" else 1)
    transform_s = AUTO_COSTS.launch_us * 1e-6 + (reads + 1) * in_features * out_features * element / (
        AUTO_COSTS.bandwidth_tbs * 1e12)
    per_row_s = 2.0 * in_features * out_features / (AUTO_COSTS.peak_tflops[dtype] * 1e12)
    return transform_s, per_row_s


def crossover_rows(rule, in_features, out_features, dtype, backend="cuda"):
    """The documented row count below which a fused grad_input is modelled faster (README)."""
    transform_s, per_row_s = _transform_and_per_row_s(rule, in_features, out_features, dtype)
    fraction = AUTO_COSTS.fused_fraction[(backend, rule)]
    return transform_s / per_row_s / (1 / fraction - 1)


def draw_crossover_rows(rule, in_features, out_features, dtype, backend="cuda"):
    """The documented row count above which a fused kernel (cuda or triton) draws B once (README):
    one transform pass against the draw every CTA along M redoes in the GEMM."""
    transform_s, per_row_s = _transform_and_per_row_s(rule, in_features, out_features, dtype)
    fraction = AUTO_COSTS.fused_fraction
    return transform_s / per_row_s / (1 / fraction[(backend, rule)] - 1 / fraction[(backend, "bp")])


def _draws_once(backend, rule, rows, numel, dtype, **options):
    """The question each backend's ops ask the model (fused_ops.h; triton_kernels/linear.py)."""
    if backend == "cuda":
        return _C._draws_feedback_once(int(Rule[rule.upper()]), rows, numel, dtype, **options)
    return rows >= _C._triton_draw_once_rows(int(Rule[rule.upper()]), numel, dtype)


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
    ("out_features", True, "out_features must be"), ("dtype", torch.float64, "dtype must be one of"),
    ("rule", "xyz", "rule must be one of"), ("fused", ("cuda", "cutlass"), "fused must be a tuple"),
    ("fused", "cuda", "fused must be a tuple"), ("distribution", "gamma", "distribution must be")])
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


# ---- a drawn B on a fused kernel (cuda, triton): in the GEMM or once, by the same model ----

DRAWN = ("brsf", "fa")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", DRAWN)
def test_the_default_constants_draw_once_above_256_rows_of_a_4096_layer(rule, dtype, backend):
    """The threshold the kernels had before the model decided it (cuda's kDrawInGemmMaxRows, the
    Triton Linear's and Conv2d's DRAW_IN_GEMM_MAX_ROWS, both 256) falls out of the default
    constants for the 16-bit types (README); tf32 draws once a little earlier, its slower GEMM per
    row making the transform's launch a smaller share."""
    assert 256 < draw_crossover_rows(rule, 4096, 4096, dtype, backend) < 257
    assert 200 < draw_crossover_rows(rule, 4096, 4096, torch.float32, backend) < 256
    for rows, way in ((1, "in_gemm"), (255, "in_gemm"), (256, "in_gemm"), (257, "once"), (8192, "once")):
        plan = auto_plan(rule, rows, 4096, 4096, dtype, fused=(backend,))
        assert getattr(plan, backend + "_draw") == way, (rows, plan)
        assert _draws_once(backend, rule, rows, 4096 * 4096, dtype) == (way == "once")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("nchw", [False, True], ids=["linear-or-nhwc", "nchw-conv2d"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (3 * 3 * 256, 256), (64, 64)])
@pytest.mark.parametrize("rule", DRAWN)
def test_the_draw_moves_out_of_the_gemm_at_the_documented_row_count(rule, shape, nchw, backend):
    # NCHW scales both cuda kernels' fractions: the in-GEMM draw's cost per row grows by
    # 1 / nchw_factor. The Triton conv2d has no NCHW gathers: its draw does not move.
    scaled = nchw and backend == "cuda"
    limit = draw_crossover_rows(rule, *shape, torch.bfloat16, backend) * (AUTO_COSTS.nchw_factor if scaled else 1.0)
    below, above = int(limit * 0.99), int(limit * 1.01) + 1
    way = {rows: getattr(auto_plan(rule, rows, *shape, torch.bfloat16, fused=(backend,), nchw=nchw),
                         backend + "_draw") for rows in (0, below, above)}
    assert way == {0: "in_gemm", below: "in_gemm", above: "once"}, (limit, way)
    plan = auto_plan(rule, above, *shape, torch.bfloat16, fused=(backend,), nchw=nchw)
    assert plan.grad_input_ms[backend] == min(getattr(plan, backend + "_draw_ms").values())
    if backend == "triton":
        for rows in (below, above):
            assert _draws_once("triton", rule, rows, shape[0] * shape[1], torch.bfloat16) == (rows == above)
    # A smaller W draws in the GEMM longer: the transform's launch is a larger share of its pass.
    assert draw_crossover_rows(rule, 64, 64, torch.bfloat16, backend) > 10 * draw_crossover_rows(
        rule, 4096, 4096, torch.bfloat16, backend)


def test_drawing_once_never_makes_the_fused_kernel_beat_the_vendor_gemm_by_default():
    """Draw once = transform + the identity kernel, slower than transform + cuBLAS while the
    identity kernel's fraction is below 1: "auto" leaves the fused kernel where the in-GEMM draw
    stops paying, and the draw decision matters to forced fused passes (FASTFA_CUDA_FUSED)."""
    for rule in DRAWN:
        for rows in (1, 100, 256, 257, 1000, 100_000):
            plan = auto_plan(rule, rows, 4096, 4096, torch.bfloat16, fused=("cuda",))
            assert plan.grad_input_ms["aten"] < plan.cuda_draw_ms["once"]
            assert (plan.grad_input == "cuda") == (plan.cuda_draw_ms["in_gemm"] < plan.grad_input_ms["aten"])


def test_a_normal_draw_is_drawn_once_and_takes_the_vendor_gemm():
    """The cuda kernels draw only uniformly in the GEMM (README: a normal draw takes cuBLAS); the
    Triton kernels draw either distribution, so their draw is the uniform one's."""
    for rule in DRAWN:
        plan = auto_plan(rule, 1, 4096, 4096, torch.bfloat16, fused=("cuda",), distribution="normal")
        assert plan.cuda_draw == "once" and set(plan.cuda_draw_ms) == {"once"} and plan.grad_input == "aten", plan
        for rows in (1, 256, 257):
            normal = auto_plan(rule, rows, 4096, 4096, torch.bfloat16, fused=("triton",), distribution="normal")
            uniform = auto_plan(rule, rows, 4096, 4096, torch.bfloat16, fused=("triton",))
            assert (normal.triton_draw, normal.triton_draw_ms) == (uniform.triton_draw, uniform.triton_draw_ms)
        rule_id = int(Rule[rule.upper()])
        assert _C._draws_feedback_once(rule_id, 1, 4096 * 4096, torch.bfloat16, uniform=False)
        assert not _C._fused_grad_input_pays(rule_id, 1, 4096 * 4096, torch.bfloat16, uniform=False)


def test_b_that_is_not_drawn_has_no_draw():
    for rule, drawn in (("usf", True), ("frsf", True), ("bp", True), ("fa", False), ("kp", True)):
        plan = auto_plan(rule, 300, 4096, 4096, torch.bfloat16, drawn=drawn)
        assert plan.cuda_draw is None and plan.cuda_draw_ms == {}, (rule, plan)
        assert plan.triton_draw is None and plan.triton_draw_ms == {}, (rule, plan)
    for rule in ("usf", "frsf", "bp", "kp"):
        assert not _draws_once("triton", rule, 10**6, 4096 * 4096, torch.bfloat16)


# ---- the cuda ops ask the same model ----


@pytest.mark.parametrize("nchw", [False, True], ids=["linear-or-nhwc", "nchw-conv2d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rule", TRANSFORMED_RULES)
def test_the_cuda_ops_questions_get_auto_plans_answers(rule, dtype, nchw):
    """What fused_ops.h asks (dispatch.h's fused_grad_input_pays, draws_feedback_once) against
    auto_plan's plan: one model, so any difference is in how each side poses the case."""
    shapes = [(4096, 4096), (1024, 4096), (64, 64), (3 * 3 * 256, 256), (13, 7)]
    rule_id = int(Rule[rule.upper()])
    for in_features, out_features in shapes:
        for rows in (1, 7, 64, 100, 256, 257, 300, 1000, 3000, 10_000, 100_000, 10_000_000):
            plan = auto_plan(rule, rows, in_features, out_features, dtype, fused=("cuda",), nchw=nchw)
            pays = _C._fused_grad_input_pays(rule_id, rows, in_features * out_features, dtype, nchw)
            assert pays == (plan.grad_input == "cuda"), (rule, rows, in_features, out_features, plan)
            if rule in DRAWN:
                once = _C._draws_feedback_once(rule_id, rows, in_features * out_features, dtype, nchw)
                assert once == (plan.cuda_draw == "once"), (rule, rows, in_features, out_features, plan)


def test_the_cuda_ops_model_never_fuses_b_as_it_is_nor_fp64():
    for transform in (Rule.BP, Rule.KP, Rule.WM, Rule.SA, Rule.AA, Rule.IA):
        assert not _C._fused_grad_input_pays(int(transform), 1, 4096 * 4096, torch.bfloat16, False)
    assert not _C._fused_grad_input_pays(int(Rule.FA), 1, 4096 * 4096, torch.bfloat16, stored_feedback=True)
    assert not _C._fused_grad_input_pays(int(Rule.USF), 1, 4096 * 4096, torch.float64, False)


def test_an_nchw_conv2d_fuses_below_half_the_rows_of_channels_last():
    """NCHW's element gathers halve the implicit GEMM's modelled speed (issue 18's estimate)."""
    def crossover(nchw):
        rows = 1
        while auto_plan("usf", rows, 3 * 3 * 256, 256, torch.bfloat16, fused=("cuda",), nchw=nchw).grad_input == "cuda":
            rows += 1
        return rows
    assert 0 < crossover(True) < crossover(False) / 2


@contextlib.contextmanager
def _costs(costs):
    previous = _backend.auto_costs()
    _backend.set_auto_costs(costs)
    try:
        yield
    finally:
        _backend.set_auto_costs(previous)


def test_the_constants_live_in_cpp_and_a_calibration_reaches_auto_plan_and_the_cuda_ops_alike():
    fast = AUTO_COSTS._replace(fused_fraction={key: 0.99 for key in AUTO_COSTS.fused_fraction})
    rows, size = 10_000, 4096 * 4096
    assert not _C._fused_grad_input_pays(int(Rule.USF), rows, size, torch.bfloat16, False)
    with _costs(fast):
        assert _backend.auto_costs() is fast
        assert auto_plan("usf", rows, 4096, 4096, torch.bfloat16, fused=("cuda",)).grad_input == "cuda"
        assert _C._fused_grad_input_pays(int(Rule.USF), rows, size, torch.bfloat16, False)
    assert not _C._fused_grad_input_pays(int(Rule.USF), rows, size, torch.bfloat16, False)
    with pytest.raises(TypeError, match="costs must be"):
        _backend.set_auto_costs({"launch_us": 1.0})
    with pytest.raises(ValueError, match="does not use"):
        _backend.set_auto_costs(AUTO_COSTS._replace(fused_fraction={("cuda", "kp"): 0.5}))
    # AUTO_COSTS is read from the C++ defaults (fastfa/dispatch.h), the constants in use back from C++.
    assert _backend._to_fields(AUTO_COSTS) == _C._auto_costs(defaults=True) == _C._auto_costs()
    with _costs(fast):
        assert _C._auto_costs() == _backend._to_fields(fast)
    # costs= asks the model on other constants without setting them.
    assert auto_plan("usf", rows, 4096, 4096, torch.bfloat16, fused=("cuda",), costs=fast).grad_input == "cuda"
    assert _C._auto_costs() == _backend._to_fields(AUTO_COSTS)


def test_a_calibration_moves_the_draw():
    """The draw decision is calibrated by the same constants (fit_auto_costs.py fits (cuda, bp))."""
    size = 4096 * 4096
    no_identity = AUTO_COSTS._replace(fused_fraction={**AUTO_COSTS.fused_fraction, ("cuda", "bp"): 0.0})
    slow_draw = AUTO_COSTS._replace(fused_fraction={**AUTO_COSTS.fused_fraction, ("cuda", "brsf"): 0.01})
    assert _C._draws_feedback_once(int(Rule.BRSF), 10_000, size, torch.bfloat16)
    with _costs(no_identity):
        assert auto_plan("brsf", 10_000, 4096, 4096, torch.bfloat16).cuda_draw == "in_gemm"
        assert not _C._draws_feedback_once(int(Rule.BRSF), 10_000, size, torch.bfloat16)
    with _costs(slow_draw):
        assert auto_plan("brsf", 100, 4096, 4096, torch.bfloat16).cuda_draw == "once"
        assert _C._draws_feedback_once(int(Rule.BRSF), 100, size, torch.bfloat16)
    assert not _C._draws_feedback_once(int(Rule.BRSF), 100, size, torch.bfloat16)


def test_a_calibration_moves_the_triton_draw_and_the_triton_ops_follow():
    """Triton's draw is calibrated by its own constants ((triton, bp), (triton, brsf), ...), not
    cuda's; linear.draws_once, what the Triton Linear and Conv2d ask per call, follows."""
    pytest.importorskip("triton")
    from fastfa.triton_kernels import linear
    size = 4096 * 4096
    weight = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    no_identity = AUTO_COSTS._replace(fused_fraction={**AUTO_COSTS.fused_fraction, ("triton", "bp"): 0.0})
    slow_draw = AUTO_COSTS._replace(fused_fraction={**AUTO_COSTS.fused_fraction, ("triton", "brsf"): 0.01})
    cuda_only = AUTO_COSTS._replace(fused_fraction={**AUTO_COSTS.fused_fraction, ("cuda", "bp"): 0.0})
    assert linear.draws_once(int(Rule.BRSF), False, 10_000, weight)
    assert not linear.draws_once(int(Rule.BRSF), False, 100, weight)
    assert not linear.draws_once(int(Rule.USF), False, 10_000, weight)  # nothing drawn
    assert not linear.draws_once(int(Rule.FA), True, 10_000, weight)  # a stored R
    with _costs(no_identity):
        assert auto_plan("brsf", 10_000, 4096, 4096, torch.bfloat16).triton_draw == "in_gemm"
        assert not _draws_once("triton", "brsf", 10_000, size, torch.bfloat16)
        assert not linear.draws_once(int(Rule.BRSF), False, 10_000, weight)
    with _costs(slow_draw):
        assert auto_plan("brsf", 100, 4096, 4096, torch.bfloat16).triton_draw == "once"
        assert linear.draws_once(int(Rule.BRSF), False, 100, weight)
    with _costs(cuda_only):  # cuda's identity kernel is not Triton's
        assert linear.draws_once(int(Rule.BRSF), False, 10_000, weight)
    assert linear.draws_once(int(Rule.BRSF), False, 10_000, weight)


def test_the_fused_switch_round_trips_and_refuses_a_non_bool():
    before = fastfa.cuda_fused()
    try:
        fastfa.set_cuda_fused(True)
        assert fastfa.cuda_fused() is True
        fastfa.set_cuda_fused(False)
        assert fastfa.cuda_fused() is False
        with pytest.raises(TypeError, match="fused must be a bool"):
            fastfa.set_cuda_fused(1)
    finally:
        fastfa.set_cuda_fused(before)


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False)])
def test_fastfa_cuda_fused_in_the_environment_sets_the_switch(value, expected):
    env = dict(os.environ, FASTFA_CUDA_FUSED=value)
    result = subprocess.run([sys.executable, "-c", "import fastfa; print(fastfa.cuda_fused())"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)


@pytest.mark.parametrize("usable", [True, False])
def test_auto_on_a_gpu_is_the_cuda_backend_where_usable_else_aten(monkeypatch, usable):
    """Faked device: "auto" resolves per device, once, to the cuda backend (vendor forward and
    grad_weight, grad_input by the model) or to aten; a forced backend stays forced."""
    monkeypatch.setattr(_backend, "_BUILT_WITH_CUDA", True)
    monkeypatch.setattr(_backend, "_cuda_status", lambda: BackendStatus(usable, "faked"))
    monkeypatch.setattr(_backend, "_auto_gpu_backend", {})
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu = torch.device("cuda", 0)
    with fastfa.use_backend("auto"):
        assert _backend.resolve(None, gpu) == ("cuda" if usable else "aten")
        assert _backend.resolve(None, torch.device("cuda")) == ("cuda" if usable else "aten")
        assert _backend.resolve(None, torch.device("cpu")) == "aten"
    assert _backend._auto_gpu_backend == {0: "cuda" if usable else "aten"}
    assert _backend.resolve("aten", gpu) == "aten"


def test_the_fit_recovers_the_constants_of_a_run_made_from_the_model():
    """benchmarks/fit_auto_costs.py on a synthetic auto_dispatch.py file whose pass times follow the
    model with known constants gives those constants back, and picks as the 'measured' times do."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import fit_auto_costs
    finally:
        sys.path.pop(0)
    truth = {"usf": 0.3, "frsf": 0.35, "brsf": 0.2, "fa": 0.25}
    identity = 0.45  # the draw-once passes: transform + vendor / identity
    triton_truth, triton_identity = {"usf": 0.55, "frsf": 0.5, "brsf": 0.3, "fa": 0.35}, 0.6
    peak, launch_s, bandwidth = 700e12, 5e-6, 4e12
    rows = []
    for rule, fraction in truth.items():
        for in_features, out_features in ((4096, 4096), (1024, 4096)):
            for batch in (16, 64, 256, 1024, 4096, 16384):
                vendor = 2 * batch * in_features * out_features / peak * 1e3
                transform = (launch_s + (fit_auto_costs.READS[rule] + 1) * in_features * out_features * 2 /
                             bandwidth) * 1e3
                passes = [("pass:vendor_gemm", vendor), ("pass:transform", transform),
                          ("pass:fused_grad_input", vendor / fraction)]
                if rule in ("brsf", "fa"):
                    passes.append(("pass:fused_grad_input_draw_once", transform + vendor / identity))
                passes.append(("pass:triton_grad_input", vendor / triton_truth[rule]))
                if rule in ("brsf", "fa"):
                    passes.append(("pass:triton_grad_input_draw_once", transform + vendor / triton_identity))
                for op, ms in passes:
                    rows.append(dict(op=op, shape=f"{batch}x{in_features}x{out_features}", dtype="bf16", rule=rule,
                                     backend="cuda", ms=ms, bp_ms=1.0, ratio=ms))
    costs, kept = fit_auto_costs.fit({"rows": rows})
    assert kept == []
    assert costs.peak_tflops[torch.bfloat16] == pytest.approx(700.0)
    assert costs.launch_us == pytest.approx(5.0) and costs.bandwidth_tbs == pytest.approx(4.0)
    for rule, fraction in truth.items():
        assert costs.fused_fraction[("cuda", rule)] == pytest.approx(fraction)
        assert costs.fused_fraction[("triton", rule)] == pytest.approx(triton_truth[rule])
    assert costs.fused_fraction[("cuda", "bp")] == pytest.approx(identity)
    assert costs.fused_fraction[("triton", "bp")] == pytest.approx(triton_identity)
    right, total = fit_auto_costs.agreement({"rows": rows}, costs)
    assert right == total == 2 * (48 + 24)  # per backend: every case's grad_input path, and brsf's and fa's draw
    # A run without the Triton passes (no usable triton backend) keeps Triton's estimates and says so.
    cuda_rows = [row for row in rows if not row["op"].startswith("pass:triton")]
    costs, kept = fit_auto_costs.fit({"rows": cuda_rows})
    assert kept == [("triton", rule) for rule in fit_auto_costs.READS] + [("triton", "bp")]
    for key in kept:
        assert costs.fused_fraction[key] == AUTO_COSTS.fused_fraction[key]
    assert fit_auto_costs.agreement({"rows": cuda_rows}, costs) == (48 + 24, 48 + 24)


# ---- on a GPU: the cuda backend's default passes (vendor, grad_input by the model) ----

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rows_either_side(rule, in_features, out_features, dtype):
    crossover = crossover_rows(rule, in_features, out_features, dtype)
    return [max(1, int(crossover * 0.5)), int(crossover * 2) + 1]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("rule, options", PICKS + [("kp", {}), ("bp", {})], ids=[r for r, _ in PICKS] + ["kp", "bp"])
def test_cuda_backend_linear_either_side_of_the_crossover_matches_the_oracle(rule, options, activation, fused):
    if not fastfa.backends()["cuda"].usable:
        pytest.skip(fastfa.backends()["cuda"].reason)
    dtype, out_features, in_features = torch.bfloat16, 512, 384
    before = fastfa.cuda_fused()
    fastfa.set_cuda_fused(fused)
    try:
        for rows in _rows_either_side("usf", in_features, out_features, dtype):
            torch.manual_seed(rows)
            weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype, requires_grad=True)
            bias = torch.randn(out_features, device="cuda", dtype=dtype, requires_grad=True)
            x = torch.randn(rows, in_features, device="cuda", dtype=dtype, requires_grad=True)
            preactivation = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
            grad_output = away_from_relu_kink(torch.randn(rows, out_features, device="cuda", dtype=dtype),
                                              preactivation, activation)
            call = dict(options, rule=rule, activation=activation)
            if rule in ("frsf", "kp"):
                call["feedback"] = torch.randn(out_features, in_features, device="cuda", dtype=dtype)
            results = {}
            for backend in ("aten", "auto"):
                with fastfa.use_backend(backend):
                    y = fastfa.functional.linear(x, weight, bias, **call)
                    results[backend] = (y, *torch.autograd.grad(y, [x, weight, bias], grad_output))
            for name, got, expected in zip(("output", "grad_input", "grad_weight", "grad_bias"), results["auto"],
                                           results["aten"]):
                assert_close(got, expected, dtype, f"{rule} {name}, {rows} rows")
    finally:
        fastfa.set_cuda_fused(before)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rule, options", [p for p in PICKS if p[0] in DRAWN], ids=list(DRAWN))
def test_cuda_fused_drawn_b_either_side_of_the_draw_crossover_matches_aten(rule, options):
    """The fused kernel's two ways with a drawn B (in the GEMM, once by the transform kernel), each
    where the model picks it, give what aten's draw gives (the same (seed, step) stream)."""
    if not fastfa.backends()["cuda"].usable:
        pytest.skip(fastfa.backends()["cuda"].reason)
    dtype, out_features, in_features = torch.bfloat16, 512, 384
    crossover = draw_crossover_rows(rule, in_features, out_features, dtype)
    before = fastfa.cuda_fused()
    fastfa.set_cuda_fused(True)
    try:
        for rows, way in ((int(crossover * 0.5), "in_gemm"), (int(crossover * 1.5) + 1, "once")):
            assert auto_plan(rule, rows, in_features, out_features, dtype, fused=("cuda",)).cuda_draw == way
            torch.manual_seed(rows)
            weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype)
            x = torch.randn(rows, in_features, device="cuda", dtype=dtype)
            grad_output = torch.randn(rows, out_features, device="cuda", dtype=dtype)
            expected = _grad_input("aten", rule, options, x, weight, grad_output)
            fastfa.clear_fallbacks()
            got = _grad_input("cuda", rule, options, x, weight, grad_output)
            assert not fastfa.last_fallbacks(), fastfa.last_fallbacks()
            assert_close(got, expected, dtype, f"{rule} grad_input drawn {way}, {rows} rows")
    finally:
        fastfa.set_cuda_fused(before)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("rule", ["usf", "frsf", "kp"])
def test_cuda_backend_conv2d_default_passes_match_aten(rule, stride, channels_last):
    if not fastfa.backends()["cuda"].usable:
        pytest.skip(fastfa.backends()["cuda"].reason)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    for batch in (1, 64):  # modelled fused and vendor grad_input at stride 1
        layer = fastfa.nn.Conv2d(64, 96, 3, stride=stride, padding=1, rule=rule).cuda().to(dtype)
        x = torch.randn(batch, 64, 14, 14, device="cuda", dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        grad_output = torch.randn_like(layer(x))
        with fastfa.use_backend("aten"):
            expected = torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], grad_output)
        fastfa.clear_fallbacks()
        with fastfa.use_backend("cuda"):
            got = torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], grad_output)
        assert not fastfa.last_fallbacks(), fastfa.last_fallbacks()
        for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), got, expected):
            assert_close(g, e, dtype, f"{rule} conv2d {name}, batch {batch}")
