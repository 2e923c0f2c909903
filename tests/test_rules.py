"""Every rule x layer kind x dtype against the oracle written from learning-rules.md."""

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import assert_close

import fastfa
import oracle
import spec_options

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
RULES = fastfa.rules.LAYER_RULES


def run_layer(layer, x, grad_output):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(grad_output)
    return y, x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def check_against_oracle(rule, layer, x, grad_output, oracle_fn, dtype):
    B = spec_options.expected_feedback(rule, layer)
    y, grad_x, grad_w, grad_b = run_layer(layer, x, grad_output)
    ey, egx, egw, egb = oracle_fn(x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), B,
                                  grad_output)
    assert_close(y, ey, dtype, "output")
    assert_close(grad_x, egx, dtype, "grad_input")
    assert_close(grad_w, egw, dtype, "grad_weight")
    if egb is not None:
        assert_close(grad_b, egb, dtype, "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(7, 13, 5), (3, 4, 17, 11)], ids=["2d", "4d-leading"])
def test_linear_matches_oracle(rule, dtype, shape):
    *lead, in_features, out_features = shape
    layer = fastfa.nn.Linear(in_features, out_features, rule=rule, dtype=dtype)
    x = torch.randn(*lead, in_features, dtype=dtype)
    grad_output = torch.randn(*lead, out_features, dtype=dtype)
    check_against_oracle(rule, layer, x, grad_output, oracle.linear, dtype)


CONV_CASES = {
    "plain": dict(kernel_size=3),
    "stride2-pad1": dict(kernel_size=3, stride=2, padding=1),
    "dilation2": dict(kernel_size=3, padding=2, dilation=2),
    "groups": dict(kernel_size=3, padding=1, groups=2),
    "rect-kernel": dict(kernel_size=(1, 3), stride=(2, 1), padding=(0, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_matches_oracle(rule, dtype, case):
    geometry = CONV_CASES[case]
    layer = fastfa.nn.Conv2d(4, 6, rule=rule, dtype=dtype, **geometry)
    x = torch.randn(3, 4, 9, 11, dtype=dtype)
    with torch.no_grad():
        out_shape = torch.nn.functional.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation,
                                               layer.groups).shape
    grad_output = torch.randn(out_shape, dtype=dtype)

    def oracle_fn(x, w, b, B, g):
        return oracle.conv2d(x, w, b, B, g, layer.stride, layer.padding, layer.dilation, layer.groups)

    check_against_oracle(rule, layer, x, grad_output, oracle_fn, dtype)


# usf's rms scale s on the CPU goes into B, into Linear's GEMM as alpha, or onto a convolution's
# grad_input (where grad_input is the smaller by 16384 elements); the transform's pass runs on the
# calling thread below 131072 elements of W and in parallel above. Each way against the oracle.
USF_SCALE_CASES = {
    "conv-s-on-grad-input": (dict(in_channels=64, out_channels=128, kernel_size=3, padding=1), (1, 64, 3, 3)),
    "conv-s-on-grad-input-parallel": (dict(in_channels=128, out_channels=256, kernel_size=3), (1, 128, 4, 4)),
    "conv-s-in-b-parallel": (dict(in_channels=64, out_channels=256, kernel_size=3, padding=1), (1, 64, 48, 48)),
    "linear-alpha-parallel": (dict(in_features=512, out_features=300), (5, 512)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(USF_SCALE_CASES))
def test_usf_scale_placement_matches_oracle(case, dtype):
    options, input_shape = USF_SCALE_CASES[case]
    torch.manual_seed(0)
    x = torch.randn(*input_shape, dtype=dtype)
    if "in_features" in options:
        layer = fastfa.nn.Linear(**options, rule="usf", dtype=dtype)
        grad_output = torch.randn(input_shape[0], options["out_features"], dtype=dtype)
        check_against_oracle("usf", layer, x, grad_output, oracle.linear, dtype)
        return
    layer = fastfa.nn.Conv2d(**options, rule="usf", dtype=dtype)
    with torch.no_grad():
        out_shape = torch.nn.functional.conv2d(x, layer.weight, None, layer.stride, layer.padding).shape

    def oracle_fn(x, w, b, B, g):
        return oracle.conv2d(x, w, b, B, g, layer.stride, layer.padding)

    check_against_oracle("usf", layer, x, torch.randn(out_shape, dtype=dtype), oracle_fn, dtype)


# usf's grad_input where the filter dwarfs the output positions: M = N * Ho * Wo <= 64 rows against
# a filter of >= 2**20 elements (csrc/cpu/sign_conv_grad_input.cpp reads sign(W) in place, no B),
# and cases just outside either threshold (the general path). Odd batches, K-panel and column
# tails (301 output channels; 389 * 9 columns), against the fp64 oracle with B = s * sign(W).
SIGN_IN_PLACE_CASES = {
    # (in_channels, out_channels, options, input shape): rows M, weights
    "stride1-pad1": (512, 301, dict(kernel_size=3, padding=1), (3, 512, 2, 2)),  # 12, 1.39M
    "stride2-pad1": (512, 301, dict(kernel_size=3, stride=2, padding=1), (3, 512, 4, 3)),  # 12, 1.39M
    "dilation2-column-tail": (389, 301, dict(kernel_size=3, padding=2, dilation=2), (5, 389, 2, 3)),  # 30, 1.05M
    "rect-kernel-64-rows": (512, 301, dict(kernel_size=(2, 4), stride=(1, 2), padding=(1, 0)), (4, 512, 3, 10)),  # 64, 1.23M
    "general-65-rows": (512, 301, dict(kernel_size=3, padding=1), (13, 512, 5, 1)),  # 65, 1.39M
    "general-small-filter": (386, 301, dict(kernel_size=3, padding=1), (3, 386, 2, 2)),  # 12, 1045674
}


# The in-place kernel needs AVX2 (GCC on x86-64 Linux); without it, and with FASTFA_CPU_ISA=none (a child
# process below), the general path runs every case.
IN_PLACE_KERNEL = (sys.platform == "linux" and platform.machine() == "x86_64"
                   and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                   and os.environ.get("FASTFA_CPU_ISA") != "none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(SIGN_IN_PLACE_CASES))
def test_usf_weight_bound_conv_matches_fp64_oracle(case, dtype):
    in_channels, out_channels, options, input_shape = SIGN_IN_PLACE_CASES[case]
    torch.manual_seed(0)
    layer = fastfa.nn.Conv2d(in_channels, out_channels, **options, rule="usf", dtype=dtype)
    x = torch.randn(*input_shape, dtype=dtype)
    geometry = (layer.stride, layer.padding, layer.dilation)
    with torch.no_grad():
        out_shape = torch.nn.functional.conv2d(x, layer.weight, None, *geometry).shape
    g = torch.randn(out_shape, dtype=dtype)
    with torch.profiler.profile(record_shapes=True) as profile:
        y, grad_x, grad_w, grad_b = run_layer(layer, x, g)
    # The in-place path leaves grad_input out of convolution_backward's output_mask.
    masks = [str(e.concrete_inputs[-1]) for e in profile.events() if e.name == "aten::convolution_backward"]
    general = case.startswith("general") or not IN_PLACE_KERNEL
    assert masks == ["[True, True, True]" if general else "[False, True, True]"], masks
    w = layer.weight.detach().double()
    B = w.sign() * w.square().mean().sqrt()
    ey, egx, egw, egb = oracle.conv2d(x.double(), w, layer.bias.detach().double(), B, g.double(), *geometry)
    assert_close(y, ey.to(dtype), dtype, "output")
    assert_close(grad_x, egx.to(dtype), dtype, "grad_input")
    assert_close(grad_w, egw.to(dtype), dtype, "grad_weight")
    assert_close(grad_b, egb.to(dtype), dtype, "grad_bias")


@pytest.mark.parametrize("isa", ["avx2", "none"])
def test_usf_weight_bound_conv_narrower_kernels_match_fp64_oracle(isa):
    # The kernel is picked once per process, the widest the CPU runs (AVX-512, AVX2, else none: the
    # general path); FASTFA_CPU_ISA caps it, so the cases above run the AVX2 kernel and the general
    # path in a child process.
    if isa == "avx2" and not IN_PLACE_KERNEL:
        pytest.skip("no AVX2 kernel here")
    env = dict(os.environ, FASTFA_CPU_ISA=isa)
    test = f"{__file__}::test_usf_weight_bound_conv_matches_fp64_oracle"
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]


def test_cpu_isa_cap_is_checked():
    env = dict(os.environ, FASTFA_CPU_ISA="avx-512")
    code = ("import torch, fastfa; layer = fastfa.nn.Conv2d(512, 301, 3, padding=1, rule='usf'); "
            "layer(torch.randn(3, 512, 2, 2, requires_grad=True)).sum().backward()")
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "FASTFA_CPU_ISA must be avx2 or none, got 'avx-512'" in child.stderr, child.stderr[-3000:]


@pytest.mark.parametrize("activation", list(oracle.ACTIVATIONS))
@pytest.mark.parametrize("rule", ["bp", "usf", "brsf"])
def test_activation_derivative_is_fused(rule, activation):
    dtype = torch.float64
    layer = fastfa.nn.Linear(9, 5, rule=rule, activation=activation, dtype=dtype)
    x, g = torch.randn(6, 9, dtype=dtype), torch.randn(6, 5, dtype=dtype)

    def oracle_fn(x, w, b, B, g):
        return oracle.linear(x, w, b, B, g, activation)

    check_against_oracle(rule, layer, x, g, oracle_fn, dtype)
    conv = fastfa.nn.Conv2d(3, 4, 3, padding=1, rule=rule, activation=activation, dtype=dtype)
    x, g = torch.randn(2, 3, 5, 5, dtype=dtype), torch.randn(2, 4, 5, 5, dtype=dtype)

    def conv_oracle(x, w, b, B, g):
        return oracle.conv2d(x, w, b, B, g, 1, 1, 1, 1, activation)

    check_against_oracle(rule, conv, x, g, conv_oracle, dtype)


@pytest.mark.parametrize("rule", RULES)
def test_padding_same_even_kernel_and_padding_modes(rule):
    dtype = torch.float64
    for padding_mode in ("zeros", "reflect", "replicate", "circular"):
        layer = fastfa.nn.Conv2d(3, 4, (2, 4), padding="same", padding_mode=padding_mode, rule=rule, dtype=dtype)
        reference = torch.nn.Conv2d(3, 4, (2, 4), padding="same", padding_mode=padding_mode, dtype=dtype)
        reference.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
        B = spec_options.expected_feedback(rule, layer)
        # The oracle: torch's module, with B swapped in for W on the way back.
        reference_b = torch.nn.Conv2d(3, 4, (2, 4), padding="same", padding_mode=padding_mode, dtype=dtype)
        reference_b.load_state_dict({"weight": B, "bias": layer.bias.detach()})
        x = torch.randn(2, 3, 7, 6, dtype=dtype)
        g = torch.randn(2, 4, 7, 6, dtype=dtype)
        y, grad_x, grad_w, grad_b = run_layer(layer, x, g)
        xr = x.clone().requires_grad_(True)
        yr = reference(xr)
        yr.backward(g)
        xb = x.clone().requires_grad_(True)
        reference_b(xb).backward(g)
        assert_close(y, yr.detach(), dtype, f"{padding_mode} output")
        assert_close(grad_x, xb.grad, dtype, f"{padding_mode} grad_input")
        assert_close(grad_w, reference.weight.grad, dtype, f"{padding_mode} grad_weight")
        assert_close(grad_b, reference.bias.grad, dtype, f"{padding_mode} grad_bias")


@pytest.mark.parametrize("rule", RULES)
def test_functional_matches_module(rule):
    dtype = torch.float64
    layer = fastfa.nn.Linear(6, 4, rule=rule, dtype=dtype, seed=11 if rule in ("fa", "brsf", "frsf") else None)
    x = torch.randn(5, 6, dtype=dtype)
    g = torch.randn(5, 4, dtype=dtype)
    options = {}
    if rule in ("fa", "frsf") + oracle.ESTIMATED:
        options["feedback"] = layer.feedback.detach()
    if rule == "wm":
        options.update(seed=11, step=0)
    if rule == "brsf":
        options.update(seed=11, step=0)
    w = layer.weight.detach().clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    fastfa.functional.linear(xf, w, layer.bias.detach(), rule=rule, **options).backward(g)
    _, grad_x, grad_w, _ = run_layer(layer, x, g)
    assert torch.equal(xf.grad, grad_x)
    assert torch.equal(w.grad, grad_w)


def test_fa_regenerated_from_seed_matches_stored():
    """fa without a stored R regenerates R from (seed, step 0): the same R a layer stores."""
    layer = fastfa.nn.Conv2d(3, 5, 3, rule="fa", seed=5, init="xavier", dtype=torch.float64)
    distribution, scale = spec_options.init_distribution("xavier", tuple(layer.weight.shape))
    expected = oracle.draw(5, 0, layer.weight.shape, distribution, scale)
    assert torch.equal(layer.feedback, expected)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    fastfa.functional.conv2d(x, layer.weight.detach(), rule="fa", seed=5, init="xavier").sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    fastfa.functional.conv2d(x2, layer.weight.detach(), rule="fa", feedback=layer.feedback).sum().backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("init", ["kaiming", "xavier", "xiao"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_brsf_draw_distribution_follows_init(init, kind):
    """brsf's |R_t| has the init's scale, sign(W)'s signs, and changes every step."""
    layer = (fastfa.nn.Linear(256, 128, rule="brsf", init=init, seed=1) if kind == "linear"
             else fastfa.nn.Conv2d(64, 64, 3, rule="brsf", init=init, seed=1))
    distribution, scale = spec_options.init_distribution(init, tuple(layer.weight.shape))
    first = layer.feedback_weight()
    assert torch.equal(torch.sign(first), torch.sign(layer.weight.detach()))
    expected_mean_abs = scale * (0.5 if distribution == "uniform" else (2 / torch.pi) ** 0.5)
    assert abs(float(first.abs().mean()) / expected_mean_abs - 1) < 0.02
    # Normal draws use libm's log / cos: equal to the oracle to float32 rounding.
    expected = spec_options.expected_feedback("brsf", layer, init=init)
    torch.testing.assert_close(first, expected, atol=1e-6 * scale, rtol=1e-5)
    x = torch.randn(2, *((256,) if kind == "linear" else (64, 5, 5)))
    layer(x).sum().backward()  # one step
    second = layer.feedback_weight()
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, spec_options.expected_feedback("brsf", layer, init=init), atol=1e-6 * scale,
                               rtol=1e-5)


def test_sign_of_zero_is_zero_and_a_number_as_scale():
    layer = fastfa.nn.Linear(4, 3, rule="usf", scale=0.5, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.0, 0.0, -1.0, 1.0], [-0.5, 0.5, 0.0, -0.0]]))
    B = layer.feedback_weight()
    assert torch.equal(B, 0.5 * torch.sign(layer.weight.detach()))
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 3, dtype=torch.float64) @ B)
    assert fastfa.nn.Linear(100, 10, rule="sign_symmetry").rule == "usf"  # the scale options: test_spec_options.py


def test_feedback_can_be_overwritten_in_place():
    layer = fastfa.nn.Linear(5, 3, rule="fa", dtype=torch.float64)
    R = torch.randn(3, 5, dtype=torch.float64)
    layer.feedback.copy_(R)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 3, dtype=torch.float64) @ R)
    assert torch.equal(layer.feedback_weight(), R)


def test_alignment_angles():
    layer = fastfa.nn.Linear(64, 32, rule="bp")
    assert layer.alignment() == pytest.approx(0.0, abs=1e-5)
    usf = fastfa.nn.Linear(64, 32, rule="usf")
    assert 0 < usf.alignment() < 45  # sign(W) is well aligned with W
    fa = fastfa.nn.Linear(256, 256, rule="fa")
    assert 80 < fa.alignment() < 100  # an independent R is nearly orthogonal to W


def test_alignment_of_a_diverged_layer_is_nan():
    """A NaN in W has no angle: reporting 0 degrees would call a diverged layer perfectly aligned."""
    layer = fastfa.nn.Linear(8, 4, rule="fa")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    assert math.isnan(layer.alignment())
    zero = fastfa.nn.Linear(8, 4, rule="usf")
    with torch.no_grad():
        zero.weight.zero_()
    assert math.isnan(zero.alignment())  # B = sign(0) = 0 and W = 0: no angle either
