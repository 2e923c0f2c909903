"""A user's state is never lost: save, load into a fresh model, identical next backward."""

import io

import pytest
import torch

import fastfa


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


@pytest.mark.parametrize("rule", fastfa.RULES)
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


def test_state_dict_keys():
    assert set(fastfa.nn.Linear(3, 2, rule="bp").state_dict()) == {"weight", "bias"}
    assert set(fastfa.nn.Linear(3, 2, rule="usf").state_dict()) == {"weight", "bias"}
    assert set(fastfa.nn.Linear(3, 2, rule="fa").state_dict()) == {"weight", "bias", "feedback"}
    assert set(fastfa.nn.Linear(3, 2, rule="frsf").state_dict()) == {"weight", "bias", "feedback"}
    assert set(fastfa.nn.Conv2d(3, 2, 1, rule="brsf").state_dict()) == {"weight", "bias", "feedback_rng"}


def test_brsf_counter_advances_only_with_grad_and_same_seed_same_draws():
    a = fastfa.nn.Linear(5, 4, rule="brsf", seed=123)
    b = fastfa.nn.Linear(5, 4, rule="brsf", seed=123)
    assert torch.equal(a.feedback_rng, torch.tensor([123, 0]))
    with torch.no_grad():
        a(torch.randn(2, 5))
    assert int(a.feedback_rng[1]) == 0
    a(torch.randn(2, 5)).sum().backward()
    assert int(a.feedback_rng[1]) == 1
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.feedback_weight(), b.feedback_weight())


def test_seeded_layers_reproduce_and_torch_manual_seed_controls_unseeded():
    assert torch.equal(fastfa.nn.Linear(5, 4, rule="fa", seed=7).feedback,
                       fastfa.nn.Linear(5, 4, rule="fa", seed=7).feedback)
    torch.manual_seed(0)
    first = fastfa.nn.Conv2d(3, 4, 3, rule="frsf").feedback
    torch.manual_seed(0)
    assert torch.equal(first, fastfa.nn.Conv2d(3, 4, 3, rule="frsf").feedback)


def test_module_to_moves_and_casts_state():
    layer = fastfa.nn.Linear(5, 4, rule="fa").to(torch.float64)
    assert layer.feedback.dtype == torch.float64
    brsf = fastfa.nn.Linear(5, 4, rule="brsf").to(torch.float64)
    assert brsf.feedback_rng.dtype == torch.int64  # integer state is not cast
    brsf(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
