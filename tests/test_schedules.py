"""Schedules of alpha, beta, gamma over steps: values, B's gradient at each step, no recompilation."""

import math

import pytest
import torch

import fastfa
import oracle
import spec_options
from fastfa.schedules import AlignmentSchedule, CoefficientSchedule

F64 = torch.float64


def test_schedule_values():
    assert [CoefficientSchedule("constant", 0.5)(t) for t in (0, 7)] == [0.5, 0.5]
    linear = CoefficientSchedule("linear", 1.0, 0.0, 4)
    assert [linear(t) for t in (0, 1, 4, 9)] == [1.0, 0.75, 0.0, 0.0]
    cosine = CoefficientSchedule("cosine", 1.0, 0.2, 10)
    assert [cosine(t) for t in (0, 10, 20)] == pytest.approx([1.0, 0.2, 0.2])
    assert cosine(5) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 2)) / 2)
    step = CoefficientSchedule("step", 2.0, milestones=(3, 6), factor=0.5)
    assert [step(t) for t in (0, 2, 3, 5, 6, 100)] == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="kind must be one of constant, linear, cosine, step"):
        CoefficientSchedule("exponential", 1.0)
    with pytest.raises(ValueError, match="needs end="):
        CoefficientSchedule("linear", 1.0, steps=3)
    with pytest.raises(ValueError, match="needs steps= a positive int"):
        CoefficientSchedule("cosine", 1.0, 0.0)
    with pytest.raises(ValueError, match="negative coefficient"):
        CoefficientSchedule("linear", 1.0, -1.0, 3)
    with pytest.raises(ValueError, match="no layer of an estimated rule"):
        AlignmentSchedule(fastfa.nn.Linear(3, 2, rule="usf"), alpha=1.0)


def _closed_form(rule, W, B, x, grad_weight, alpha, beta, gamma):
    n = x.shape[0]
    r = x @ W.t()
    if rule == "kp":
        return grad_weight + 2 * alpha * B
    if rule == "sa":
        return 2 * alpha * B - beta * W
    if rule == "aa":
        return (2 * alpha * (x @ B.t()) - beta * r).t() @ x / n
    if rule == "ia":
        return -alpha / n * r.t() @ x + 2 * beta / n * r.t() @ (r @ B) + 2 * gamma * B
    raise ValueError(rule)


@pytest.mark.parametrize("rule", ["kp", "sa", "aa", "ia", "wm"])
def test_scheduled_layer_gets_each_step_coefficients(rule):
    torch.manual_seed(0)
    # The closed forms: aa's and ia's layer default (normalize_input) off.
    layer = fastfa.nn.Linear(6, 4, rule=rule, dtype=F64, **spec_options.paper(rule))
    schedule = AlignmentSchedule(layer, alpha=CoefficientSchedule("linear", 0.4, 0.1, 3),
                                 beta=CoefficientSchedule("step", 0.8, milestones=(2,), factor=0.25),
                                 gamma=CoefficientSchedule("cosine", 0.3, 0.0, 3))
    for step in range(4):
        alpha, beta, gamma = 0.4 - 0.1 * min(step, 3), 0.8 * (0.25 if step >= 2 else 1.0), \
            0.15 * (1 + math.cos(math.pi * min(step, 3) / 3))
        x = torch.randn(5, 6, dtype=F64)
        seed, counter = (int(v) for v in layer.feedback_rng) if rule == "wm" else (0, 0)
        B = layer.feedback.detach().clone()
        layer.zero_grad()
        y = layer(x)
        y.backward(torch.randn_like(y))
        if rule == "wm":
            noise = oracle.draw(seed, counter, x.shape, "normal", 1.0, F64)
            expected = oracle.alignment_pipeline_gradient("wm", x, layer.weight, None, B, alpha=alpha, beta=beta,
                                                          noise=noise)
            tolerance = 1e-5  # the oracle's generator against the kernel's: libm's float32 log / cos
        else:
            expected = _closed_form(rule, layer.weight.detach(), B, x, layer.weight.grad, alpha, beta, gamma)
            tolerance = 1e-10
        torch.testing.assert_close(layer.feedback.grad, expected, atol=tolerance, rtol=tolerance)
        schedule.step()
    schedule.detach()
    assert layer.alignment_coefficients is None


def test_schedule_state_round_trips():
    layer = fastfa.nn.Linear(6, 4, rule="ia")
    schedule = AlignmentSchedule(layer, alpha=CoefficientSchedule("linear", 1.0, 0.0, 10))
    for _ in range(3):
        schedule.step()
    other = AlignmentSchedule(fastfa.nn.Linear(6, 4, rule="ia"), alpha=CoefficientSchedule("linear", 1.0, 0.0, 10))
    other.load_state_dict(schedule.state_dict())
    assert other.current() == schedule.current() == {"alpha": pytest.approx(0.7)}
    assert float(other.layers[0].alignment_coefficients[0]) == pytest.approx(0.7)


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is handed (each compilation or recompilation)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def _compiled_steps(model, change, steps=3):
    backend = _CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch._dynamo.reset()
    for step in range(steps):
        x = torch.randn(8, 6)
        compiled(x).sum().backward()
        change(step)
    return backend.graphs


def test_schedule_changes_recompile_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastfa.nn.Linear(6, 5, rule="ia"), torch.nn.ReLU(), fastfa.nn.Linear(5, 3, rule="ia"))
    schedule = AlignmentSchedule(model, alpha=CoefficientSchedule("linear", 1e-2, 0.0, 3),
                                 beta=CoefficientSchedule("cosine", 1e-2, 0.0, 3), gamma=1e-3)
    graphs = _compiled_steps(model, lambda step: schedule.step())
    assert graphs == 1
    assert float(model[0].alignment_coefficients[0]) == pytest.approx(0.0)


def test_changing_a_fixed_coefficient_does_recompile():
    """What the schedule avoids: alpha as the op's float argument is a constant of the compiled graph."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastfa.nn.Linear(6, 5, rule="ia"), torch.nn.ReLU(), fastfa.nn.Linear(5, 3, rule="ia"))

    def change(step):
        for layer in (model[0], model[2]):
            layer.alignment_options = [1e-3 * (step + 2), *layer.alignment_options[1:]]

    assert _compiled_steps(model, change) > 1
