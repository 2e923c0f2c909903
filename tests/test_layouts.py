"""dtypes, autocast, non-contiguous and channels_last inputs, zero-size batches."""

import copy

import pytest
import torch
from conftest import assert_close

import fastfa
import oracle
import spec_options
from test_estimated import ALIGNMENT, expected_feedback_grad

RULES = fastfa.rules.LAYER_RULES
F64 = torch.float64


def _step(layer, x, g):
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(g)
    return y, x.grad, layer.weight.grad, layer.bias.grad


def _expected(rule, layer, x, g, options):
    """The oracle's output and gradients (B's too, for the estimated rules) in fp64 from the layer's
    rounded inputs, parameters and B, for the step that is about to run."""
    B = spec_options.expected_feedback(rule, layer, **options)
    exact = copy.deepcopy(layer).to(F64)  # the same values, for the spec's maps in fp64
    weight, bias = exact.weight.detach(), exact.bias.detach()
    x, g = x.to(F64), g.to(F64)
    if isinstance(layer, torch.nn.Conv2d):
        y, gx, gw, gb = oracle.conv2d(x, weight, bias, B.to(F64), g, layer.stride, layer.padding, layer.dilation,
                                      layer.groups)
    else:
        y, gx, gw, gb = oracle.linear(x, weight, bias, B.to(F64), g)
    expected = {"output": y, "grad_input": gx, "grad_weight": gw, "grad_bias": gb}
    if rule in spec_options.ESTIMATED:
        alignment = spec_options.alignment(rule, **options)
        noise = None
        if rule == "wm":  # drawn in the layer's dtype, from the step about to run
            seed, step = (int(v) for v in layer.feedback_rng)
            noise = oracle.draw(seed, step, tuple(x.shape), "normal", alignment[3]).to(layer.weight.dtype).to(F64)
        expected["grad_feedback"] = expected_feedback_grad(rule, exact, x, gw, alignment, noise)
    return expected


def _alignment_options(rule):
    """Alignment coefficients large enough that B's gradient is not lost in a low precision's tolerance."""
    return {key: value for key, value in ALIGNMENT.items() if key in spec_options.OPTIONS[rule]}


@pytest.mark.parametrize("rule", RULES)
def test_fp16_on_cpu(rule):
    """fp16 Linear and Conv2d against the oracle at fp16's tolerance."""
    options = _alignment_options(rule)
    half = torch.float16
    paper = spec_options.paper(rule)  # the oracle's closed forms: aa's and ia's layer default off
    for layer, x_shape in ((fastfa.nn.Linear(12, 6, rule=rule, dtype=half, **options, **paper), (5, 12)),
                           (fastfa.nn.Conv2d(3, 4, 3, rule=rule, dtype=half, **options, **paper), (2, 3, 6, 6))):
        x = torch.randn(x_shape, dtype=half)
        with torch.no_grad():  # the output's shape, without a training step
            g = torch.randn(layer(x).shape, dtype=half)
        expected = _expected(rule, layer, x, g, options)
        actual = dict(zip(("output", "grad_input", "grad_weight", "grad_bias"), _step(layer, x, g)))
        if rule in spec_options.ESTIMATED:
            actual["grad_feedback"] = layer.feedback.grad
        assert actual.keys() == expected.keys()
        for name, value in actual.items():
            assert_close(value, expected[name].to(half), half, f"{type(layer).__name__} {name}")


@pytest.mark.parametrize("rule", RULES)
def test_autocast_bf16(rule):
    """Under autocast the layer runs in bf16 like torch's own (x, W, b and B rounded to bf16), and
    the gradients come back in the leaves' fp32: all equal to the oracle on those rounded values."""
    bf16 = torch.bfloat16
    options = _alignment_options(rule)
    paper = spec_options.paper(rule)  # the oracle's closed forms: aa's and ia's layer default off
    for layer, x_shape in ((fastfa.nn.Linear(16, 8, rule=rule, **options, **paper), (4, 16)),
                           (fastfa.nn.Conv2d(3, 8, 3, padding=1, rule=rule, **options, **paper), (2, 3, 5, 5))):
        x = torch.randn(x_shape, requires_grad=True)
        with torch.no_grad():
            g = torch.randn(layer(x).shape)
        rounded = copy.deepcopy(layer).to(bf16)  # what autocast hands the op
        expected = _expected(rule, rounded, x.detach().to(bf16), g.to(bf16), options)
        with torch.autocast("cpu", dtype=bf16):
            y = layer(x)
        y.backward(g.to(bf16))
        name = type(layer).__name__
        assert_close(y, expected.pop("output").to(bf16), bf16, f"{name} output")
        actual = {"grad_input": x.grad, "grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad}
        if rule in spec_options.ESTIMATED:
            actual["grad_feedback"] = layer.feedback.grad
        assert actual.keys() == expected.keys()
        for what, value in actual.items():
            assert value.dtype == torch.float32, f"{name} {what}"
            assert_close(value, expected[what].to(bf16).float(), bf16, f"{name} {what}")


@pytest.mark.parametrize("rule", RULES)
def test_non_contiguous_inputs(rule):
    dtype = torch.float64
    layer = fastfa.nn.Linear(6, 5, rule=rule, dtype=dtype, seed=4)
    base = torch.randn(6, 9, dtype=dtype)
    x = base.t()[::2]  # transposed and sliced
    assert not x.is_contiguous()
    g = torch.randn(5, 5, dtype=dtype).t()
    twin = fastfa.nn.Linear(6, 5, rule=rule, dtype=dtype, seed=4)
    twin.load_state_dict(layer.state_dict())
    ours = _step(layer, x, g)
    theirs = _step(twin, x.contiguous(), g.contiguous())
    for a, b in zip(ours, theirs):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("rule", RULES)
def test_channels_last(rule):
    dtype = torch.float32
    layer = fastfa.nn.Conv2d(8, 6, 3, padding=1, rule=rule, seed=2)
    twin = fastfa.nn.Conv2d(8, 6, 3, padding=1, rule=rule, seed=2)
    twin.load_state_dict(layer.state_dict())
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 7, 5)
    g = torch.randn(2, 6, 7, 5)
    ours = _step(layer, x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last))
    theirs = _step(twin, x, g)
    for a, b in zip(ours, theirs):
        assert_close(a, b.to(a.dtype), dtype)
    # The draw is keyed by the logical index: B does not depend on W's layout. usf's "rms" scale is a
    # sum over W, whose order follows the layout: equal up to float32 rounding there.
    if rule == "usf" and layer.feedback_scale == fastfa.rules.RMS_SCALE:
        torch.testing.assert_close(layer.feedback_weight(), twin.feedback_weight(), rtol=1e-6, atol=0)
    else:
        assert torch.equal(layer.feedback_weight(), twin.feedback_weight())


@pytest.mark.parametrize("rule", RULES)
def test_zero_size_batch(rule):
    layer = fastfa.nn.Linear(4, 3, rule=rule)
    y, gx, gw, gb = _step(layer, torch.randn(0, 4), torch.randn(0, 3))
    assert y.shape == (0, 3) and gx.shape == (0, 4)
    assert torch.equal(gw, torch.zeros(3, 4)) and torch.equal(gb, torch.zeros(3))
    conv = fastfa.nn.Conv2d(2, 3, 3, padding=1, rule=rule)
    y, gx, gw, gb = _step(conv, torch.randn(0, 2, 5, 5), torch.randn(0, 3, 5, 5))
    assert y.shape == (0, 3, 5, 5) and gx.shape == (0, 2, 5, 5)
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros(3))


@pytest.mark.parametrize("rule", ["usf", "brsf"])
def test_unbatched_conv_input(rule):
    """(C, H, W) is a batch of one, as in torch: output and gradients are the oracle's on x[None]."""
    conv = fastfa.nn.Conv2d(2, 3, 3, rule=rule, dtype=F64)
    x, g = torch.randn(2, 6, 6, dtype=F64), torch.randn(3, 4, 4, dtype=F64)
    expected = _expected(rule, conv, x[None], g[None], {})
    y, gx, gw, gb = _step(conv, x, g)
    for name, value in (("output", y), ("grad_input", gx)):
        assert_close(value, expected[name][0], F64, name)
    assert_close(gw, expected["grad_weight"], F64, "grad_weight")
    assert_close(gb, expected["grad_bias"], F64, "grad_bias")


def test_input_grad_not_needed_skips_it():
    """A first layer (input without grad) gets the oracle's weight and bias gradients, and brsf's
    step counter moves on as after any training step."""
    layer = fastfa.nn.Linear(4, 3, rule="brsf", dtype=F64)
    x, g = torch.randn(2, 4, dtype=F64), torch.randn(2, 3, dtype=F64)
    expected = _expected("brsf", layer, x, g, {})
    step = int(layer.feedback_rng[1])
    layer(x).backward(g)
    assert_close(layer.weight.grad, expected["grad_weight"], F64, "grad_weight")
    assert_close(layer.bias.grad, expected["grad_bias"], F64, "grad_bias")
    assert int(layer.feedback_rng[1]) == step + 1
