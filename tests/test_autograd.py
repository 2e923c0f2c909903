"""bp against torch's own autograd, gradcheck, and torch.library.opcheck on every op."""

import pytest
import torch

import fastfa
from fastfa.rules import Distribution, Rule

F64 = torch.float64


def _grads(module, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return [y, x.grad, module.weight.grad, module.bias.grad]


@pytest.mark.parametrize("shape", [(8, 16), (3, 5, 16), (16,)], ids=["2d", "3d", "1d"])
def test_bp_linear_equals_torch_autograd_bit_for_bit(shape):
    layer = fastfa.nn.Linear(16, 7, rule="bp", dtype=F64)
    reference = torch.nn.Linear(16, 7, dtype=F64)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(*shape, dtype=F64)
    g = torch.randn(*shape[:-1], 7, dtype=F64)
    for ours, theirs in zip(_grads(layer, x, g), _grads(reference, x, g)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("geometry", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2, groups=3),
                                      dict(padding="same")])
def test_bp_conv2d_equals_torch_autograd_bit_for_bit(geometry):
    layer = fastfa.nn.Conv2d(6, 9, 3, rule="bp", dtype=F64, **geometry)
    reference = torch.nn.Conv2d(6, 9, 3, dtype=F64, **geometry)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 10, 9, dtype=F64)
    g = torch.randn_like(reference(x))
    for ours, theirs in zip(_grads(layer, x, g), _grads(reference, x, g)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu", "tanh", "sigmoid"])
def test_gradcheck_bp_all_inputs(activation):
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    w = torch.randn(3, 5, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fastfa.functional.linear(x, w, b, rule="bp", activation=activation), (x, w, b))
    xc = torch.randn(2, 4, 6, 5, dtype=F64, requires_grad=True)
    wc = torch.randn(6, 2, 3, 3, dtype=F64, requires_grad=True)
    bc = torch.randn(6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fastfa.functional.conv2d(x, w, b, 2, 1, 1, 2, rule="bp", activation=activation),
        (xc, wc, bc))


@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
def test_gradcheck_weight_and_bias_for_every_rule(rule):
    """Every rule keeps the true weight and bias gradients: gradcheck holds for W and b."""
    stored = rule in ("fa", "frsf", "kp", "wm", "sa", "aa", "ia")
    options = {"feedback": torch.randn(3, 5, dtype=F64)} if stored else {}
    if rule in ("brsf", "wm"):
        options.update(seed=3, step=7)
    x = torch.randn(4, 5, dtype=F64)
    w = torch.randn(3, 5, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w, b: fastfa.functional.linear(x, w, b, rule=rule, activation="tanh", **options), (w, b))
    conv_options = dict(options)
    if stored:
        conv_options["feedback"] = torch.randn(4, 3, 2, 2, dtype=F64)
    xc = torch.randn(2, 3, 5, 5, dtype=F64)
    wc = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    bc = torch.randn(4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w, b: fastfa.functional.conv2d(xc, w, b, 1, 1, rule=rule, **conv_options), (wc, bc))


ALIGNMENT = [0.3, 0.2, 0.1, 1.5]
STORED = (Rule.FA, Rule.FRSF, Rule.KP, Rule.WM, Rule.SA, Rule.AA, Rule.IA)
DRAWS = (Rule.BRSF, Rule.WM)


def _alignments(rule):
    """aa and ia also with the aten op's fifth value, normalize_input, whose forward keeps no projection."""
    return (ALIGNMENT, ALIGNMENT + [1.0]) if rule in (Rule.AA, Rule.IA) else (ALIGNMENT,)


def _linear_samples():
    for rule in Rule:
        for activation in ("none", "relu", "gelu"):
            x = torch.randn(5, 7, requires_grad=True)
            w = torch.randn(4, 7, requires_grad=True)
            b = torch.randn(4, requires_grad=True)
            feedback = torch.randn(4, 7, requires_grad=rule >= Rule.KP) if rule in STORED else None
            rng = torch.tensor([3, 9]) if rule in DRAWS else None
            for alignment in _alignments(rule):
                yield (x, w, b, feedback, rng, int(rule), 0.25, int(Distribution.UNIFORM), alignment, activation)


def _conv_samples():
    for rule in Rule:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 4, 7, 6).to(memory_format=memory_format).requires_grad_(True)
            w = torch.randn(6, 2, 3, 3).to(memory_format=memory_format).requires_grad_(True)
            b = torch.randn(6, requires_grad=True)
            feedback = torch.randn(6, 2, 3, 3, requires_grad=rule >= Rule.KP) if rule in STORED else None
            rng = torch.tensor([3, 9]) if rule in DRAWS else None
            for alignment in _alignments(rule):
                yield (x, w, b, feedback, rng, [2, 1], [1, 1], [1, 2], 2, int(rule), 0.25,
                       int(Distribution.NORMAL), alignment, "silu")


def _detached(t):
    return None if t is None else t.detach()


def test_opcheck_forward_ops():
    for args in _linear_samples():
        torch.library.opcheck(torch.ops.fastfa.linear.default, args)
    for args in _conv_samples():
        torch.library.opcheck(torch.ops.fastfa.conv2d.default, args)


def test_opcheck_backward_ops_and_transform():
    masks = ([True, True, True, True], [False, True, False, True], [True, False, True, False])
    for (x, w, b, feedback, rng, rule, scale, distribution, alignment, activation) in _linear_samples():
        x, w, feedback = x.detach(), w.detach(), _detached(feedback)
        out, saved, projection = torch.ops.fastfa.linear(x, w, b.detach(), feedback, rng, rule, scale, distribution,
                                                         alignment, activation)
        saved = out if activation == "relu" else saved
        for mask in masks:
            torch.library.opcheck(torch.ops.fastfa.linear_backward.default,
                                  (torch.randn_like(out), x, w, feedback, rng, saved, projection, rule, scale,
                                   distribution, alignment, activation, mask))
        torch.library.opcheck(torch.ops.fastfa.feedback_transform.default, (w, feedback, rng, rule, scale, distribution))
    for (x, w, b, feedback, rng, stride, padding, dilation, groups, rule, scale, distribution, alignment,
         activation) in _conv_samples():
        x, w, feedback = x.detach(), w.detach(), _detached(feedback)
        out, saved, projection = torch.ops.fastfa.conv2d(x, w, None, feedback, rng, stride, padding, dilation,
                                                         groups, rule, scale, distribution, alignment, activation)
        for mask in masks[:2]:
            torch.library.opcheck(torch.ops.fastfa.conv2d_backward.default,
                                  (torch.randn_like(out), x, w, feedback, rng, saved, projection, stride, padding,
                                   dilation, groups, rule, scale, distribution, alignment, activation, mask))
        torch.library.opcheck(torch.ops.fastfa.feedback_transform.default, (w, feedback, rng, rule, scale, distribution))
