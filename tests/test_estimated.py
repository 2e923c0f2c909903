"""Estimated feedback (kp, wm, sa, aa, ia): B's gradient against the spec, learning, metrics."""

import math

import pytest
import torch

import fastfa
import oracle
import spec_options
from fastfa.rules import Distribution, Rule

F64 = torch.float64
ESTIMATED = oracle.ESTIMATED
ALIGNMENT = dict(alpha=0.3, beta=0.7, gamma=0.2, sigma=1.3)


def _options(rule):
    return {key: value for key, value in ALIGNMENT.items() if key in spec_options.OPTIONS[rule]}


class Maps:
    """The spec's primitives for one layer kind, in plain PyTorch."""

    def __init__(self, layer, x):
        self.layer, self.x = layer, x
        self.conv = isinstance(layer, torch.nn.Conv2d)
        self.batch = x.shape[0] if self.conv else x.reshape(-1, x.shape[-1]).shape[0]

    def geometry(self):
        layer = self.layer
        return layer.stride, layer.padding, layer.dilation, layer.groups

    def project(self, x, m):  # x M^T, conv2d(x, M), no bias
        if self.conv:
            return torch.nn.functional.conv2d(x, m, None, *self.geometry())
        return x.reshape(-1, m.shape[1]) @ m.t()

    def outer(self, r, x):  # r^T x, conv2d_weight(x, W.shape, r)
        if self.conv:
            return torch.nn.grad.conv2d_weight(x, self.layer.weight.shape, r, *self.geometry())
        return r.t() @ x.reshape(r.shape[0], -1)

    def back(self, r, m):  # r B, the transposed convolution of r with B
        if self.conv:
            return torch.nn.grad.conv2d_input(self.x.shape, m, r, *self.geometry())
        return r @ m


def expected_feedback_grad(rule, layer, x, grad_weight, alignment, noise=None):
    """learning-rules.md's gradient of B for the rule, means over the batch only; alignment is
    (alpha, beta, gamma, sigma) from spec_options.alignment."""
    maps = Maps(layer, x)
    W, B = layer.weight.detach(), layer.feedback.detach()
    alpha, beta, gamma, _ = alignment
    n = maps.batch
    r = maps.project(x, W)
    if rule == "kp":
        return grad_weight + alpha * 2 * B
    if rule == "sa":
        return alpha * 2 * B - beta * W
    if rule == "wm":
        rn = maps.project(noise, W)
        return alpha * 2 * B + beta * (-(1 / n) * maps.outer(rn, noise))
    if rule == "aa":
        p = maps.project(x, B)
        return alpha * (2 / n) * maps.outer(p, x) + beta * (-(1 / n) * maps.outer(r, x))
    if rule == "ia":
        return (alpha * (-(1 / n) * maps.outer(r, x)) + beta * (2 / n) * maps.outer(r, maps.back(r, B))
                + gamma * 2 * B)
    raise ValueError(rule)


def _noise(layer, x, sigma, kernel: bool):
    """wm's noise for the coming step: from the oracle's generator, or from fastfa's kernel."""
    seed, step = (int(v) for v in layer.feedback_rng)
    if kernel:
        return torch.ops.fastfa.feedback_transform(x.contiguous(), None, layer.feedback_rng, int(Rule.FA), sigma,
                                                   int(Distribution.NORMAL))
    return oracle.draw(seed, step, x.shape, "normal", sigma, x.dtype)


def _layers(rule):
    """The spec's table: aa and ia with their layers' default switch off (test_pipeline tests it on)."""
    options = {**_options(rule), **spec_options.paper(rule)}
    return [
        (fastfa.nn.Linear(7, 5, rule=rule, dtype=F64, **options), (2, 6, 7)),
        (fastfa.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, rule=rule, dtype=F64, **options),
         (3, 4, 9, 8)),
    ]


@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("rule", ESTIMATED)
def test_feedback_gradient_matches_spec(rule, activation):
    alignment = spec_options.alignment(rule, **_options(rule))
    for layer, shape in _layers(rule):
        layer.activation = activation
        x = torch.randn(shape, dtype=F64)
        noise_oracle = _noise(layer, x, alignment[3], kernel=False) if rule == "wm" else None
        noise_kernel = _noise(layer, x, alignment[3], kernel=True) if rule == "wm" else None
        y = layer(x.clone().requires_grad_(True))
        y.backward(torch.randn_like(y))
        expected = expected_feedback_grad(rule, layer, x, layer.weight.grad, alignment, noise_kernel)
        torch.testing.assert_close(layer.feedback.grad, expected, atol=1e-10, rtol=1e-10)
        if rule == "wm":  # the oracle's own noise: equal up to libm's float32 log / cos
            torch.testing.assert_close(noise_kernel, noise_oracle, atol=1e-6, rtol=1e-5)
            expected = expected_feedback_grad(rule, layer, x, layer.weight.grad, alignment, noise_oracle)
            torch.testing.assert_close(layer.feedback.grad, expected, atol=1e-5, rtol=1e-5)


# A conv2d's B gradient runs as direct loops (csrc/cpu/small_conv.cpp) up to a few thousand
# multiply-adds per map and through ATen's calls above: SMALL_CONV takes 2376 per sample, so batch 1
# is on the loops' side of the threshold (12288) and batch 48 (114048) on ATen's. Odd stride, padding and
# dilation per axis, groups 2, and a channels_last input the loops read through its strides.
# STRIDED_CONV's stride is wider than its filter, so its taps skip input rows and columns (the loops'
# span walk: 432 multiply-adds per sample, batch 48 on ATen's side).
SMALL_CONV = dict(kernel_size=(3, 2), stride=(3, 1), padding=(1, 2), dilation=(2, 1), groups=2)
STRIDED_CONV = dict(kernel_size=(1, 2), stride=(2, 3), padding=(1, 0), dilation=1, groups=2)
SMALL_CONV_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("geometry", [SMALL_CONV, STRIDED_CONV], ids=["dilated", "strided"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 48])
@pytest.mark.parametrize("rule", ["wm", "aa", "ia"])
def test_conv_feedback_gradient_both_sides_of_the_small_conv_threshold(rule, batch, dtype, channels_last, geometry):
    torch.manual_seed(batch)
    alignment = spec_options.alignment(rule, **_options(rule))
    layer = fastfa.nn.Conv2d(4, 6, **geometry, rule=rule, dtype=dtype, **_options(rule), **spec_options.paper(rule))
    x = torch.randn(batch, 4, 9, 8, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    noise = _noise(layer, x, alignment[3], kernel=True).double() if rule == "wm" else None
    y = layer(x.clone().requires_grad_(True))
    y.backward(torch.randn_like(y))
    # The spec in fp64 on the same rounded values; fp32 / bf16 B gradients round each intermediate map.
    reference = fastfa.nn.Conv2d(4, 6, **geometry, rule=rule, dtype=F64, **_options(rule), **spec_options.paper(rule))
    reference.load_state_dict(layer.state_dict())
    expected = expected_feedback_grad(rule, reference, x.double(), layer.weight.grad.double(), alignment, noise)
    tolerance = SMALL_CONV_TOLERANCE[dtype]
    torch.testing.assert_close(layer.feedback.grad.double(), expected, rtol=tolerance,
                               atol=tolerance * float(expected.abs().max()))


# sa's B gradient, 2 alpha B - beta W, and kp's, grad_W + 2 alpha B, are one CPU loop for dense filters up to
# 4096 elements (aten_backend.cpp's axpby) and ATen's ops above or for another layout: 4 x 6 x 3 x 3 = 216,
# 64 x 64 = 4096 and 65 x 64 on either side; a channels_last filter takes the ops.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", ["conv", "conv_channels_last", "linear_4096", "linear_4160"])
@pytest.mark.parametrize("rule", ["sa", "kp"])
def test_sa_and_kp_feedback_gradients_both_sides_of_the_one_pass_limit(rule, layer, dtype):
    torch.manual_seed(0)
    options = dict(rule=rule, dtype=dtype, **_options(rule))
    if layer.startswith("conv"):
        module, x = fastfa.nn.Conv2d(4, 6, 3, padding=1, **options), torch.randn(2, 4, 5, 5, dtype=dtype)
        if layer == "conv_channels_last":
            module = module.to(memory_format=torch.channels_last)
    else:
        module = fastfa.nn.Linear(64 if layer == "linear_4096" else 65, 64, **options)
        x = torch.randn(3, module.in_features, dtype=dtype)
    module(x).sum().backward()
    alpha, beta, _, _ = spec_options.alignment(rule, **_options(rule))
    W, B = module.weight.detach().double(), module.feedback.detach().double()
    expected = alpha * 2 * B + (module.weight.grad.double() if rule == "kp" else -beta * W)
    tolerance = SMALL_CONV_TOLERANCE[dtype]
    torch.testing.assert_close(module.feedback.grad.double(), expected, rtol=tolerance,
                               atol=tolerance * float(expected.abs().max()))
    assert module.feedback.grad.dtype == dtype
    assert module.feedback.grad.is_contiguous(memory_format=torch.channels_last if layer == "conv_channels_last"
                                              else torch.contiguous_format)


@pytest.mark.parametrize("rule", ESTIMATED)
def test_task_gradients_are_those_of_fa_with_the_same_B(rule):
    """The alignment terms touch only B.grad: grad_input, W.grad, b.grad are fa's with R = B."""
    for layer, shape in _layers(rule):
        if isinstance(layer, torch.nn.Linear):
            twin = fastfa.nn.Linear(7, 5, rule="fa", dtype=F64)
        else:
            twin = fastfa.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, rule="fa", dtype=F64)
        twin.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach(),
                              "feedback": layer.feedback.detach()})
        x = torch.randn(shape, dtype=F64)
        grads = []
        for module in (layer, twin):
            xi = x.clone().requires_grad_(True)
            y = module(xi)
            y.backward(torch.ones_like(y))
            grads.append((xi.grad, module.weight.grad, module.bias.grad))
        for ours, theirs in zip(*grads):
            assert torch.equal(ours, theirs)


def test_feedback_is_a_parameter_and_options_reach_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fastfa.convert(model, "ia", alpha=0.5, beta=0.25, gamma=0.125)
    layer = model[0]
    assert isinstance(layer.feedback, torch.nn.Parameter) and layer.feedback.requires_grad
    assert layer.alignment_options == [0.5, 0.25, 0.125, 1.0]
    names = {name for name, _ in model.named_parameters()}
    assert {"0.feedback", "2.feedback"} <= names  # optimizers see B like W
    assert fastfa.nn.Linear(3, 2, rule="wm").alignment_options == [1e-3, 1e-3, 0.0, 1.0]
    with pytest.raises(ValueError, match="option 'gamma' applies to rule.s. ia, not 'sa'"):
        fastfa.nn.Linear(3, 2, rule="sa", gamma=0.1)
    with pytest.raises(ValueError, match="sigma must be positive and finite"):
        fastfa.nn.Linear(3, 2, rule="wm", sigma=0.0)
    with pytest.raises(ValueError, match="alpha must be non-negative and finite"):
        fastfa.nn.Linear(3, 2, rule="kp", alpha=float("inf"))


def test_wm_noise_changes_every_step_and_is_reproducible():
    torch.manual_seed(0)
    a = fastfa.nn.Linear(6, 4, rule="wm", seed=9, beta=1.0)
    b = fastfa.nn.Linear(6, 4, rule="wm", seed=9, beta=1.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 6)
    grads = []
    for module in (a, a, b):
        module.zero_grad()
        module(x).sum().backward()
        grads.append(module.feedback.grad.clone())
    assert not torch.equal(grads[0], grads[1])  # a fresh noise draw at step 1
    assert torch.equal(grads[0], grads[2])  # b at step 0 draws a's step-0 noise


def _angles(model):
    return list(fastfa.metrics.weight_alignment(model).values())


def _train_mlp(rule, steps, lr=0.05, **options):
    """A 3-layer MLP on a fixed synthetic regression task; returns the per-layer angle history."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = teacher(x)
    model = torch.nn.Sequential(
        fastfa.nn.Linear(16, 32, rule=rule, activation="tanh", seed=1, **options),
        fastfa.nn.Linear(32, 32, rule=rule, activation="tanh", seed=2, **options),
        fastfa.nn.Linear(32, 4, rule=rule, seed=3, **options))
    # W decays with 2*alpha as B does, so that kp's B - W shrinks (Akrout et al. 2019).
    decay = 2 * options.get("alpha", 0.0) if rule == "kp" else 0.0
    weights = [p for n, p in model.named_parameters() if not n.endswith("feedback")]
    feedbacks = [p for n, p in model.named_parameters() if n.endswith("feedback")]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": decay}, {"params": feedbacks}], lr=lr)
    history = [_angles(model)]
    for step in range(steps):
        batch = torch.randint(0, 256, (64,))
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
        optimizer.step()
        history.append(_angles(model))
    return history


# Measured on the CPU (torch 2.14.1): steps until every layer's angle between B and W is
# under 10 degrees: kp 419, sa 38, wm 44 with these settings; each bound is about 2x that.
# kp needs the task gradient to outgrow the random start (B - W shrinks by 1 - 2*lr*alpha
# per step, but so does W itself), hence its larger learning rate and more steps.
LEARNING = {"kp": (dict(alpha=0.02, lr=0.2), 850), "sa": (dict(alpha=0.5, beta=1.0), 80),
            "wm": (dict(alpha=0.5, beta=1.0), 90)}


@pytest.mark.parametrize("rule", list(LEARNING))
def test_estimated_rules_align_B_with_W(rule):
    options, bound = LEARNING[rule]
    history = _train_mlp(rule, bound, **options)
    assert min(history[0]) > 60  # B starts as an independent random matrix
    first = next((i for i, angles in enumerate(history) if max(angles) < 10), None)
    assert first is not None, f"{rule}: angles after {bound} steps: {history[-1]}"


def test_fa_stays_far_from_W():
    history = _train_mlp("fa", 200)
    assert min(history[-1]) > 60


def test_gradient_alignment_leaves_state_untouched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastfa.nn.Conv2d(3, 4, 3, rule="brsf", activation="relu"), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), fastfa.nn.Linear(4 * 4 * 4, 3, rule="kp"))
    batch = (torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    angles = fastfa.metrics.gradient_alignment(model, torch.nn.functional.cross_entropy, batch)
    assert set(angles) == {"0", "3"}
    assert all(0 <= a <= 180 for a in angles.values())
    assert angles["3"] > 1  # kp's random B is not W yet
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    bp = torch.nn.Sequential(fastfa.nn.Linear(5, 4, rule="bp", activation="tanh"), fastfa.nn.Linear(4, 2, rule="bp"))
    bp_angles = fastfa.metrics.gradient_alignment(bp, torch.nn.functional.mse_loss,
                                                  (torch.randn(6, 5), torch.randn(6, 2)))
    assert all(a < 1e-3 or math.isnan(a) for a in bp_angles.values())
    weights = fastfa.metrics.weight_alignment(model)
    assert set(weights) == {"0", "3"} and all(0 <= a <= 180 for a in weights.values())


def test_gradient_norm_ratio_is_the_rule_grad_input_over_backprop():
    """Per layer, ||grad_input through B|| / ||through W|| on the same batch: for one usf layer with a
    fixed scale it is ||delta s sign(W)|| / ||delta W|| (from the oracle), 1 for bp, and it is given
    beside the angle by gradient_measures."""
    torch.manual_seed(0)
    layer = fastfa.nn.Linear(6, 3, rule="usf", scale=0.75, dtype=torch.float64)
    model = torch.nn.Sequential(layer)
    x, target = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    delta = 2 * (layer(x).detach() - target) / target.numel()  # mse_loss's gradient at the output
    w = layer.weight.detach()
    through_b, through_w = delta @ oracle.feedback_matrix("usf", w, scale=0.75), delta @ w
    expected = float(through_b.norm() / through_w.norm())
    # (the first layer's input is the batch itself: each pass must start from a fresh gradient)
    cosine = float((through_b * through_w).sum() / (through_b.norm() * through_w.norm()))
    expected_angle = math.degrees(math.acos(cosine))
    ratios = fastfa.metrics.gradient_norm_ratio(model, torch.nn.functional.mse_loss, (x, target))
    assert ratios == {"0": pytest.approx(expected, rel=1e-12)}
    assert abs(expected - 1) > 0.1  # a ratio of 1 would not tell a wrong ratio from a right one
    measures = fastfa.metrics.gradient_measures(model, torch.nn.functional.mse_loss, (x, target))
    angles = fastfa.metrics.gradient_alignment(model, torch.nn.functional.mse_loss, (x, target))
    assert angles == {"0": pytest.approx(expected_angle, rel=1e-9)}
    assert measures == {"0": (pytest.approx(expected_angle, rel=1e-9), pytest.approx(expected, rel=1e-12))}
    bp = torch.nn.Sequential(fastfa.nn.Linear(5, 4, rule="bp", activation="tanh"), fastfa.nn.Linear(4, 2, rule="bp"))
    bp_ratios = fastfa.metrics.gradient_norm_ratio(bp, torch.nn.functional.mse_loss,
                                                   (torch.randn(6, 5), torch.randn(6, 2)))
    assert bp_ratios and all(ratio == pytest.approx(1.0, rel=1e-6) for ratio in bp_ratios.values())
