"""bf16 convolutions on the CPU whose input is narrower than the (dilated) kernel, so that only the
padding makes it fit, against the fp64 oracle.

torch 2.14.1's own CPU bf16 convolution (oneDNN) goes wrong there: aten.convolution_backward returns
a wrong grad_weight (it reads memory it never wrote: 0 to 40 of 40 calls, depending on what the
process freed before), and some forwards crash. fastfa's aten backend runs every CPU bf16
convolution in fp32, rounded to bf16 at the end (csrc/aten_backend.cpp, widens_to_fp32); these tests
hold it to the oracle, run in fp64 on the same bf16 values (fp64 does not go through oneDNN).
"""

import copy

import pytest
import torch
from conftest import assert_close
from test_estimated import _options, expected_feedback_grad

import fastfa
import oracle
import spec_options

BF16, F64 = torch.bfloat16, torch.float64

# The geometry the wrong grad_weight was found with: a (12, 1, 2, 3) filter, groups 3, over a
# 3x3x6x1 input (width 1 < 3 taps, padding 1).
WRONG_GRAD_WEIGHT = dict(in_channels=3, out_channels=12, kernel_size=(2, 3), stride=(3, 2), padding=(0, 1),
                         groups=3, input_shape=(3, 3, 6, 1))
# Height 1 with a dilated 2-tap kernel and padding 1: the taps straddle the only row, so every
# output is the bias alone. torch's own bf16 forward crashes here.
CRASHING_FORWARD = dict(in_channels=3, out_channels=4, kernel_size=2, stride=(3, 1), padding=(1, 2), dilation=2,
                        input_shape=(3, 3, 1, 4))
CALLS = 20


def _poison_freed_memory():
    """Leave huge values in memory the allocator hands out next: torch's own wrong grad_weight reads
    memory it never wrote, and after this it shows in nearly every call (without it, 0 to 40 of 40)."""
    torch.full((1 << 16,), 1e30).sum()


def _layer(geometry, rule, **options):
    arguments = {key: value for key, value in geometry.items() if key != "input_shape"}
    return fastfa.nn.Conv2d(**arguments, rule=rule, dtype=BF16, **options)


def _geometry(layer):
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def _expected_feedback(layer, rule):
    if rule == "fa":
        return oracle.feedback_matrix("fa", layer.weight.detach(), feedback=layer.feedback.detach())
    return oracle.feedback_matrix(rule, layer.weight.detach())


@pytest.mark.parametrize("geometry", [WRONG_GRAD_WEIGHT, CRASHING_FORWARD], ids=["grad_weight", "forward"])
@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_bf16_conv2d_with_an_input_narrower_than_the_kernel(geometry, rule):
    torch.manual_seed(0)
    layer = _layer(geometry, rule)
    B = _expected_feedback(layer, rule).to(F64)
    weight, bias = layer.weight.detach().to(F64), layer.bias.detach().to(F64)
    for _ in range(CALLS):
        x = torch.randn(geometry["input_shape"], dtype=BF16, requires_grad=True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        g = torch.randn(y.shape, dtype=BF16)
        _poison_freed_memory()
        y.backward(g)
        expected = oracle.conv2d(x.detach().to(F64), weight, bias, B, g.to(F64), **_geometry(layer))
        for what, actual, wanted in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                        (y, x.grad, layer.weight.grad, layer.bias.grad), expected):
            assert_close(actual, wanted.to(BF16), BF16, what)


@pytest.mark.parametrize("rule", ["kp", "aa"])
def test_bf16_feedback_gradient_with_an_input_narrower_than_the_kernel(rule):
    """kp's B gradient holds grad_W; aa's takes filter gradients of the input (outer(r, x))."""
    torch.manual_seed(0)
    layer = _layer(WRONG_GRAD_WEIGHT, rule, **_options(rule), **spec_options.paper(rule))  # the closed form
    alignment = spec_options.alignment(rule, **_options(rule))
    exact = copy.deepcopy(layer).to(F64)
    for _ in range(CALLS):
        x = torch.randn(WRONG_GRAD_WEIGHT["input_shape"], dtype=BF16)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        g = torch.randn(y.shape, dtype=BF16)
        _poison_freed_memory()
        y.backward(g)
        grad_weight = oracle.conv2d(x.to(F64), exact.weight.detach(), None, exact.feedback.detach(), g.to(F64),
                                    **_geometry(layer))[2]
        expected = expected_feedback_grad(rule, exact, x.to(F64), grad_weight, alignment)
        assert_close(layer.feedback.grad, expected.to(BF16), BF16, "grad_feedback")
