"""A user's state is never lost: save, load into a fresh model, identical next backward."""

import io

import pytest
import torch

import fastfa
import oracle
import spec_options


def _model(rule):
    return torch.nn.Sequential(
        fastfa.nn.Conv2d(3, 6, 3, padding=1, rule=rule),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        fastfa.nn.Linear(6 * 5 * 5, 4, rule=rule),
    )


def _gradients(model, x, g):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    model(x).backward(g)
    return [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
def test_state_dict_round_trip_gives_identical_next_backward(rule):
    model = _model(rule)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, g = torch.randn(2, 3, 5, 5), torch.randn(2, 4)
    for _ in range(3):  # advance brsf's counters, move W
        _gradients(model, x, g)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _model(rule)  # different random W, R and seeds
    fresh.load_state_dict(torch.load(buffer))
    for ours, theirs in zip(_gradients(model, x, g), _gradients(fresh, x, g)):
        assert torch.equal(ours, theirs)
    # And the step after that too (brsf draws afresh, identically in both).
    for ours, theirs in zip(_gradients(model, x, g), _gradients(fresh, x, g)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
def test_state_dict_keys(rule):
    """A stored R or learned B is `feedback`; a draw keyed by (seed, step) keeps `feedback_rng`."""
    expected = {"weight", "bias"}
    if rule in ("fa", "frsf") + spec_options.ESTIMATED:
        expected.add("feedback")
    if rule in ("brsf", "wm"):
        expected.add("feedback_rng")
    assert set(fastfa.nn.Linear(3, 2, rule=rule).state_dict()) == expected
    assert set(fastfa.nn.Conv2d(3, 2, 1, rule=rule).state_dict()) == expected


def test_brsf_counter_advances_only_with_grad_and_same_seed_same_draws():
    a = fastfa.nn.Linear(5, 4, rule="brsf", seed=123, dtype=torch.float64)
    b = fastfa.nn.Linear(5, 4, rule="brsf", seed=123, dtype=torch.float64)
    assert torch.equal(a.feedback_rng, torch.tensor([123, 0]))
    with torch.no_grad():
        a(torch.randn(2, 5, dtype=torch.float64))
    assert int(a.feedback_rng[1]) == 0
    a(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    assert int(a.feedback_rng[1]) == 1
    b.load_state_dict(a.state_dict())
    # b's next backward is a's, bit for bit, and uses the spec's draw at (seed 123, step 1).
    expected_B = spec_options.resolve("brsf", (4, 5), seed=123, step=1).feedback_matrix(a.weight)
    x, g = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for layer in (a, b):
        torch.testing.assert_close(layer.feedback_weight(), expected_B, atol=1e-12, rtol=1e-12)
        xi = x.clone().requires_grad_(True)
        layer(xi).backward(g)
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(grads[0], g @ expected_B, atol=1e-12, rtol=1e-12)


def test_seeded_layers_reproduce_and_torch_manual_seed_controls_unseeded():
    assert torch.equal(fastfa.nn.Linear(5, 4, rule="fa", seed=7).feedback,
                       fastfa.nn.Linear(5, 4, rule="fa", seed=7).feedback)
    torch.manual_seed(0)
    first = fastfa.nn.Conv2d(3, 4, 3, rule="frsf").feedback
    torch.manual_seed(0)
    assert torch.equal(first, fastfa.nn.Conv2d(3, 4, 3, rule="frsf").feedback)


@pytest.mark.parametrize("rule", ["fa", "brsf"])
def test_module_to_moves_and_casts_state(rule):
    """.to(float64) casts R (the same values) and leaves brsf's integer [seed, step] alone; the next
    backward is the oracle's in fp64."""
    layer = fastfa.nn.Linear(5, 4, rule=rule)
    state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    layer = layer.to(torch.float64)
    for name, tensor in layer.state_dict().items():
        assert tensor.dtype == (torch.int64 if name == "feedback_rng" else torch.float64), name
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name
    x, g = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    B = spec_options.expected_feedback(rule, layer)
    _, grad_x, grad_w, grad_b = oracle.linear(x, layer.weight.detach(), layer.bias.detach(), B, g)
    xi = x.clone().requires_grad_(True)
    layer(xi).backward(g)
    for name, actual, expected in (("grad_input", xi.grad, grad_x), ("grad_weight", layer.weight.grad, grad_w),
                                   ("grad_bias", layer.bias.grad, grad_b)):
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12, msg=name)
