"""fastfa.nn.Conv1d: bp equals torch's Conv1d for every option; every rule against the oracle."""

import pytest
import torch

import fastfa
import spec_options
from test_estimated import _options as alignment_options

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)

CASES = {
    "plain": dict(kernel_size=3),
    "stride2-pad1": dict(kernel_size=3, stride=2, padding=1),
    "dilation2": dict(kernel_size=3, padding=2, dilation=2),
    "groups": dict(kernel_size=3, padding=1, groups=2),
    "same-even": dict(kernel_size=4, padding="same", dilation=2),
    "valid": dict(kernel_size=5, padding="valid", stride=3),
    "no-bias": dict(kernel_size=2, bias=False),
    "reflect": dict(kernel_size=3, padding=2, padding_mode="reflect"),
    "replicate": dict(kernel_size=4, padding="same", padding_mode="replicate"),
    "circular": dict(kernel_size=3, padding=1, stride=2, padding_mode="circular"),
}


def _pair(case, rule, **options):
    layer = fastfa.nn.Conv1d(4, 6, rule=rule, dtype=F64, **CASES[case], **options)
    reference = torch.nn.Conv1d(4, 6, dtype=F64, **CASES[case])
    reference.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias}
                              if layer.bias is not None else {"weight": layer.weight.detach()})
    return layer, reference


def _run(module, x, grad_output):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_output)
    return y.detach(), x.grad, module.weight.grad, None if module.bias is None else module.bias.grad


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("case", list(CASES))
def test_bp_equals_torch_conv1d(case, batched):
    layer, reference = _pair(case, "bp")
    x = torch.randn((3, 4, 13) if batched else (4, 13), dtype=F64)
    grad_output = torch.randn_like(reference(x))
    for got, expected in zip(_run(layer, x, grad_output), _run(reference, x, grad_output)):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
@pytest.mark.parametrize("case", ["stride2-pad1", "groups", "same-even", "reflect", "circular"])
def test_every_rule_against_the_oracle(rule, case):
    """The oracle: torch's Conv1d with B in W's place carries grad_input (padding modes included);
    the forward, grad_weight and grad_bias are the unchanged ones."""
    layer, reference = _pair(case, rule, **alignment_options(rule))
    B = spec_options.expected_feedback(rule, layer)
    carrier = torch.nn.Conv1d(4, 6, dtype=F64, **CASES[case])
    carrier.weight.data.copy_(B)
    x = torch.randn(3, 4, 13, dtype=F64)
    grad_output = torch.randn_like(reference(x))
    y, grad_x, grad_w, grad_b = _run(layer, x, grad_output)
    ey, _, egw, egb = _run(reference, x, grad_output)
    _, egx, _, _ = _run(carrier, x, grad_output)
    torch.testing.assert_close(y, ey, **TOL)
    torch.testing.assert_close(grad_x, egx, **TOL)
    torch.testing.assert_close(grad_w, egw, **TOL)
    torch.testing.assert_close(grad_b, egb, **TOL)


def test_conv_scale_and_init_take_the_conv_formulas():
    """usf's "xiao" scale sqrt(2 / (k * out)) and "xiao" init's normal R, as for a conv2d."""
    usf = fastfa.nn.Conv1d(4, 6, 5, rule="usf", scale="xiao", dtype=F64)
    assert usf.feedback_scale == pytest.approx(spec_options.sign_scale("xiao", (6, 4, 5)))
    assert usf.feedback_scale == pytest.approx((2.0 / (6 * 5)) ** 0.5)
    frsf = fastfa.nn.Conv1d(4, 6, 5, rule="frsf", init="xiao", dtype=F64)
    assert int(frsf.feedback_distribution) == int(fastfa.rules.Distribution.NORMAL)


@pytest.mark.parametrize("rule", ["kp", "ia", "wm"])
def test_estimated_feedback_gradient_is_the_unit_height_conv2d(rule):
    """B's alignment gradient: the same as a Conv2d over a unit height with the same W, B and seed
    (test_estimated checks the Conv2d's against the spec)."""
    options = alignment_options(rule)
    layer = fastfa.nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, rule=rule, dtype=F64, seed=3, **options)
    twin = fastfa.nn.Conv2d(4, 6, (1, 3), stride=(1, 2), padding=(0, 1), groups=2, rule=rule, dtype=F64, seed=3,
                            **options)
    twin.load_state_dict({name: value.unsqueeze(2) if value.dim() == 3 else value
                          for name, value in layer.state_dict().items()})
    x = torch.randn(3, 4, 13, dtype=F64)
    grad_output = torch.randn(3, 6, 7, dtype=F64)
    layer(x).backward(grad_output)
    twin(x.unsqueeze(2)).backward(grad_output.unsqueeze(2))
    assert layer.feedback.grad.shape == layer.weight.shape
    torch.testing.assert_close(layer.feedback.grad.unsqueeze(2), twin.feedback.grad, **TOL)
    torch.testing.assert_close(layer.weight.grad.unsqueeze(2), twin.weight.grad, **TOL)


def test_state_dict_round_trip_reproduces_brsf():
    layer = fastfa.nn.Conv1d(3, 5, 3, rule="brsf", dtype=F64)
    x = torch.randn(2, 3, 9, dtype=F64)
    layer(x).sum().backward()
    twin = fastfa.nn.Conv1d(3, 5, 3, rule="brsf", dtype=F64)
    twin.load_state_dict(layer.state_dict())
    assert torch.equal(twin.feedback_rng, layer.feedback_rng)
    grads = []
    for module in (layer, twin):
        xg = x.clone().requires_grad_(True)
        module(xg).sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_bad_input_names_the_expected_shape():
    layer = fastfa.nn.Conv1d(4, 6, 3)
    with pytest.raises(ValueError, match=r"\(N, C_in, L\) or \(C_in, L\)"):
        layer(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="in_channels=4"):
        layer(torch.randn(2, 3, 9))


def test_dfa_runs_on_conv1d_only_inside_a_converted_model():
    """dfa's grad_input needs the converted model's output error (tests/test_dfa.py checks Conv1d
    against the oracle): a dfa Conv1d alone is refused when it runs, not silently bp."""
    layer = fastfa.nn.Conv1d(2, 3, 3, rule="dfa")
    with pytest.raises(RuntimeError, match="ran outside a converted model's call"):
        layer(torch.randn(1, 2, 5))
