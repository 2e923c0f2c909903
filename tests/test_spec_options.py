"""fastfa's resolution of every rule's options against tests/spec_options.py (written from the spec).

usf's scale, R's init distribution (fa, brsf, frsf) and the estimated rules' starting B, the
estimated rules' alpha / beta / gamma / sigma: fastfa.rules, fastfa.functional.feedback_arguments
and the layers must agree with the spec's reading for every rule x option x layer kind; the
draws themselves must follow the spec's distributions (bounds, std, shape) on enough samples.
"""

import math

import pytest
import torch

import fastfa
import oracle
import spec_options
from fastfa.functional import feedback_arguments

# Weight shapes: linear, conv, grouped conv, a rectangular kernel.
SHAPES = {"linear": (10, 100), "conv": (16, 8, 3, 3), "conv-groups": (12, 3, 3, 3), "conv-rect": (6, 4, 1, 5)}


def make_layer(kind, rule, **options):
    """A fastfa layer whose weight has SHAPES[kind] (the conv layers' in_channels * groups)."""
    shape = SHAPES[kind]
    if kind == "linear":
        return fastfa.nn.Linear(shape[1], shape[0], rule=rule, dtype=torch.float64, **options)
    groups = 4 if kind == "conv-groups" else 1
    return fastfa.nn.Conv2d(shape[1] * groups, shape[0], tuple(shape[2:]), groups=groups, rule=rule,
                            dtype=torch.float64, **options)


def test_spec_values_by_hand():
    """The resolution's formulas on numbers worked out by hand from the spec."""
    linear, conv = (10, 100), (16, 8, 3, 3)  # conv: fan_in 72, fan_out 144
    assert spec_options.sign_scale(None, linear) == "rms"  # from W at each step
    assert spec_options.sign_scale("xiao", linear) == pytest.approx(0.1)  # 1/sqrt(in)
    assert spec_options.sign_scale("xiao", conv) == pytest.approx(1 / math.sqrt(72))  # sqrt(2/(3*3*16))
    assert spec_options.sign_scale("xavier", linear) == pytest.approx(math.sqrt(2 / 110))
    assert spec_options.sign_scale("kaiming", conv) == pytest.approx(1 / math.sqrt(216))
    assert spec_options.sign_scale(0.25, conv) == 0.25
    assert spec_options.init_distribution(None, linear) == ("uniform", pytest.approx(0.1))  # U(+-1/sqrt(fan_in))
    assert spec_options.init_distribution("xavier", conv) == ("uniform", pytest.approx(math.sqrt(6 / 216)))
    assert spec_options.init_distribution("xiao", conv) == ("normal", pytest.approx(1 / math.sqrt(72)))
    assert spec_options.init_distribution("xiao", linear) == ("uniform", pytest.approx(0.1))
    assert spec_options.alignment("ia") == (2e-3, 1e-3, 1e-3, 1.0)
    assert spec_options.alignment("wm", sigma=2) == (1e-3, 1e-3, 0.0, 2.0)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("scale", [None, *spec_options.SCALES, 0.37, 3])
@pytest.mark.parametrize("rule", ["usf", "sign_symmetry"])
def test_usf_scale(rule, scale, kind):
    layer = make_layer(kind, rule, scale=scale)
    shape = tuple(layer.weight.shape)
    expected = spec_options.sign_scale(scale, shape)
    # "rms" reaches the op as the contract's marker (the kernels take s from W themselves)
    contract = fastfa.rules.RMS_SCALE if expected == "rms" else pytest.approx(expected, rel=1e-12)
    if scale is not None:
        assert fastfa.rules.sign_scale(scale, shape) == contract
    _, resolved, _, _, _ = feedback_arguments(rule, shape, layer.weight.device, {"scale": scale})
    assert resolved == contract
    assert layer.feedback_scale == contract
    # and the layer's B is s * sign(W) with that s
    torch.testing.assert_close(layer.feedback_weight(), oracle.feedback_matrix("usf", layer.weight, scale=expected),
                               atol=0, rtol=1e-12)


@pytest.mark.parametrize("scale", [0, -0.5, math.inf, math.nan, True, "large"])
def test_usf_scale_outside_the_spec_is_refused(scale):
    with pytest.raises(ValueError):
        spec_options.sign_scale(scale, (4, 3))
    with pytest.raises((ValueError, TypeError), match="scale"):
        fastfa.nn.Linear(3, 4, rule="usf", scale=scale)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("init", [None, *spec_options.INITS])
@pytest.mark.parametrize("rule", spec_options.DRAWN)
def test_init_distribution_and_the_draw_it_gives(rule, init, kind):
    """fastfa's (distribution, scale) for R, and the R (or starting B) a layer stores, or brsf's
    first draw, is the oracle's draw from (seed, step 0) with the spec's distribution and scale."""
    layer = make_layer(kind, rule, init=init, seed=5)
    shape = tuple(layer.weight.shape)
    distribution, scale = spec_options.init_distribution(init, shape)
    if init is not None:
        theirs, their_scale = fastfa.rules.init_distribution(init, shape)
        assert (theirs.name.lower(), their_scale) == (distribution, pytest.approx(scale, rel=1e-12))
    _, their_scale, theirs, _, _ = feedback_arguments(rule, shape, layer.weight.device, {"init": init})
    assert (fastfa.rules.Distribution(theirs).name.lower(), their_scale) == (distribution,
                                                                            pytest.approx(scale, rel=1e-12))
    drawn = oracle.draw(5, 0, shape, distribution, scale)
    if rule == "brsf":
        actual, expected = layer.feedback_weight(), drawn.abs() * torch.sign(layer.weight.detach())
    else:
        actual, expected = layer.feedback.detach(), drawn
    # Normal draws take log / cos from libm: equal to float32 rounding.
    torch.testing.assert_close(actual, expected, atol=1e-6 * scale, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("init", spec_options.INITS)
@pytest.mark.parametrize("rule", spec_options.DRAWN)
def test_draws_follow_the_spec_distribution(rule, init, kind):
    """On 131072 (linear) or 36864 (conv) elements: a uniform R stays within its bound and reaches
    it; R's std (brsf: the rms of |R_t| * sign(W)) is the spec's within 2%; a normal R has 68.3% of
    its mass within one std and tails past 3 std, which no uniform of that std has."""
    layer = (fastfa.nn.Linear(512, 256, rule=rule, init=init, seed=3) if kind == "linear"
             else fastfa.nn.Conv2d(64, 64, 3, rule=rule, init=init, seed=3))
    distribution, scale = spec_options.init_distribution(init, tuple(layer.weight.shape))
    std = spec_options.distribution_std(distribution, scale)
    r = (layer.feedback_weight() if rule == "brsf" else layer.feedback.detach()).double().flatten()
    magnitude = r.abs()
    assert abs(float(r.square().mean().sqrt()) / std - 1) < 0.02
    if rule != "brsf":  # |R_t| * sign(W) has W's mean, not R's
        assert abs(float(r.mean())) < 0.02 * std
    if distribution == "uniform":
        assert float(magnitude.max()) <= scale * (1 + 1e-6)
        assert float(magnitude.max()) > 0.99 * scale
    else:
        assert abs(float((magnitude < std).double().mean()) - math.erf(1 / math.sqrt(2))) < 0.01
        assert float(magnitude.max()) > 3.5 * std


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("given", [{}, {"alpha": 0.3}, {"beta": 0.7}, {"gamma": 0.2}, {"sigma": 1.3},
                                   {"alpha": 0.3, "beta": 0.7, "gamma": 0.2, "sigma": 1.3}],
                         ids=["defaults", "alpha", "beta", "gamma", "sigma", "all"])
@pytest.mark.parametrize("rule", spec_options.ESTIMATED)
def test_alignment_coefficients(rule, given, kind):
    """Each estimated rule takes its own coefficients (the spec's table), defaults filled in; the
    others are refused."""
    taken = {key: value for key, value in given.items() if key in spec_options.OPTIONS[rule]}
    refused = set(given) - set(taken)
    expected = list(spec_options.alignment(rule, **taken))
    layer = make_layer(kind, rule, **taken)
    assert layer.alignment_options == pytest.approx(expected, rel=1e-12)
    _, _, _, resolved, _ = feedback_arguments(rule, tuple(layer.weight.shape), layer.weight.device, dict(taken))
    assert resolved == pytest.approx(expected, rel=1e-12)
    if refused:
        with pytest.raises(ValueError, match=f"option '{sorted(refused)[0]}' applies to rule"):
            make_layer(kind, rule, **given)


@pytest.mark.parametrize("rule", fastfa.RULES)
def test_each_rule_takes_the_options_of_the_spec(rule):
    assert set(fastfa.rules.rule_spec(rule).options) == set(spec_options.OPTIONS[rule])


@pytest.mark.parametrize("sigma", [None, 1.3])
def test_wm_noise_has_std_sigma(sigma):
    """With W = I, alpha = 0 and beta = 1, wm's B gradient is -(1/N) xi^T xi: its diagonal's mean is
    -sigma^2 (N = 8192 rows of 8 noise features: the estimate's rms error is about 0.6%)."""
    expected = spec_options.alignment("wm", sigma=sigma, alpha=0, beta=1)
    layer = fastfa.nn.Linear(8, 8, rule="wm", bias=False, seed=7, sigma=sigma, alpha=0.0, beta=1.0,
                             dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(8, dtype=torch.float64))
    layer(torch.randn(8192, 8, dtype=torch.float64)).sum().backward()
    variance = -float(layer.feedback.grad.diagonal().mean())
    assert abs(variance / expected[3] ** 2 - 1) < 0.03
