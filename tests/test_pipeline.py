"""The alignment pipeline's switches (learning-rules.md, "The alignment pipeline's options"):
B's gradient against the oracle's autograd of the losses as the spec writes them, fp64 (the aa / ia
layers' default also in fp32 and bf16)."""

import copy
import re

import pytest
import torch
from conftest import assert_close

import fastfa
import oracle
import spec_options
from fastfa.alignment import IA_SWITCHES, SWITCHES
from fastfa.rules import Distribution, Rule

F64 = torch.float64
COEFFICIENTS = dict(alpha=0.3, beta=0.7, gamma=0.2)
LOCAL = ("wm", "aa", "ia")


def _coefficients(rule):
    return {k: v for k, v in COEFFICIENTS.items() if k != "gamma" or rule == "ia"}


def _layer(kind, rule, activation="gelu", **switches):
    """A layer with exactly ``switches`` on: aa's and ia's layer default (normalize_input) is passed off."""
    switches = {**spec_options.paper(rule), **switches}
    if kind == "linear":
        return fastfa.nn.Linear(7, 5, rule=rule, dtype=F64, activation=activation, **_coefficients(rule), **switches)
    return fastfa.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, rule=rule, dtype=F64, activation=activation,
                            **_coefficients(rule), **switches)


SHAPES = {"linear": (6, 7), "conv": (3, 4, 9, 8)}


def _geometry(layer):
    if isinstance(layer, torch.nn.Conv2d):
        return (layer.stride, layer.padding, layer.dilation, layer.groups)
    return None


def _wm_noise(layer, x, distribution="normal", stddev=1.0, kernel=False):
    """wm's noise for the coming step, from the oracle's own generator (seed, step), or from fastfa's
    kernel (its generator is checked against the oracle's in test_estimated, to float32's libm)."""
    seed, step = (int(v) for v in layer.feedback_rng)
    scale = stddev if distribution == "normal" else stddev * 3 ** 0.5
    if kernel:
        unit = Distribution.NORMAL if distribution == "normal" else Distribution.UNIFORM
        return torch.ops.fastfa.feedback_transform(x.contiguous(), None, layer.feedback_rng.clone(), int(Rule.FA),
                                                   scale, int(unit))
    return oracle.draw(seed, step, x.shape, distribution, scale, x.dtype)


def _run(layer, x):
    """B's gradient, grad_input, W's and b's gradient after one forward and backward."""
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
    return layer.feedback.grad, xi.grad, layer.weight.grad, layer.bias.grad


def _expected(rule, layer, x, noise=None, **switches):
    return oracle.alignment_pipeline_gradient(
        rule, x, layer.weight, layer.bias, layer.feedback, activation=layer.activation, conv=_geometry(layer),
        noise=noise, **{**COEFFICIENTS, **switches})


def _switch_cases():
    cases = [(rule, {name: True}) for rule in LOCAL for name in SWITCHES]
    cases += [("ia", {name: True}) for name in IA_SWITCHES]
    cases += [("ia", {"reconstruction_amp": True, "reconstruction_reversal": True}),
              ("ia", {"reconstruction_amp": True, "reconstruction_reversal": True, "use_sparse": True,
                      "normalize_forward_output": True, "normalize_backward_output": True})]
    every = {name: True for name in SWITCHES if not name.startswith("center_")}  # normalize centres anyway
    cases += [(rule, every) for rule in LOCAL]
    cases += [("ia", {**every, "reconstruction_amp": True, "use_sparse": True})]
    return cases


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("rule,switches", _switch_cases(),
                         ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_switch_matches_oracle(kind, rule, switches):
    torch.manual_seed(1)
    layer = _layer(kind, rule, **switches)
    x = torch.randn(SHAPES[kind], dtype=F64)
    noise = _wm_noise(layer, x, kernel=True) if rule == "wm" else None
    oracle_noise = _wm_noise(layer, x) if rule == "wm" else None
    grad_feedback, grad_input, grad_weight, grad_bias = _run(layer, x)
    torch.testing.assert_close(grad_feedback, _expected(rule, layer, x, noise, **switches), atol=1e-10, rtol=1e-10)
    if rule == "wm":  # the oracle's own draw: equal up to libm's float32 log / cos
        torch.testing.assert_close(grad_feedback, _expected(rule, layer, x, oracle_noise, **switches), atol=1e-5,
                                   rtol=1e-4)
    # The task gradients are untouched by the switches: fa's with R = B.
    conv = _geometry(layer)
    reference = (oracle.linear if conv is None else oracle.conv2d)
    extra = {} if conv is None else dict(zip(("stride", "padding", "dilation", "groups"), conv))
    y = (torch.nn.functional.linear(x, layer.weight, layer.bias) if conv is None
         else torch.nn.functional.conv2d(x, layer.weight, layer.bias, *conv))
    g = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
    _, ex_input, ex_weight, ex_bias = reference(x, layer.weight.detach(), layer.bias.detach(),
                                                layer.feedback.detach(), g, activation="gelu", **extra)
    for ours, theirs in ((grad_input, ex_input), (grad_weight, ex_weight), (grad_bias, ex_bias)):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("rule", LOCAL)
def test_oracle_with_switches_off_is_the_rule_table(kind, rule):
    """The oracle's pipeline, every switch off, gives learning-rules.md's closed forms (wm, aa, ia)."""
    torch.manual_seed(2)
    layer = _layer(kind, rule, activation="none")
    x = torch.randn(SHAPES[kind], dtype=F64)
    W, B = layer.weight.detach(), layer.feedback.detach()
    conv = _geometry(layer)
    n = x.shape[0]
    project = (lambda t, m: t @ m.t()) if conv is None else (
        lambda t, m: torch.nn.functional.conv2d(t, m, None, *conv))
    outer = (lambda r, t: r.t() @ t) if conv is None else (
        lambda r, t: torch.nn.grad.conv2d_weight(t, W.shape, r, *conv))
    back = (lambda r, m: r @ m) if conv is None else (
        lambda r, m: torch.nn.grad.conv2d_input(x.shape, m, r, *conv))
    a, b, g = COEFFICIENTS["alpha"], COEFFICIENTS["beta"], COEFFICIENTS["gamma"]
    noise = _wm_noise(layer, x) if rule == "wm" else None
    if rule == "wm":
        closed = 2 * a * B - b / n * outer(project(noise, W), noise)
    elif rule == "aa":
        closed = outer(2 * a * project(x, B) - b * project(x, W), x) / n
    else:
        r = project(x, W)
        closed = -a / n * outer(r, x) + 2 * b / n * outer(r, back(r, B)) + 2 * g * B
    torch.testing.assert_close(_expected(rule, layer, x, noise), closed, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("rule", LOCAL)
def test_switches_off_change_nothing_bit_for_bit(kind, rule):
    """Every switch given as False is no switch: the op's own path, the same bits as no option."""
    off = {name: False for name in SWITCHES + (IA_SWITCHES if rule == "ia" else ())}
    torch.manual_seed(3)
    plain = _layer(kind, rule)
    torch.manual_seed(3)
    switched_off = _layer(kind, rule, input_distribution=None, **off)
    assert switched_off.alignment_pipeline is None
    x = torch.randn(SHAPES[kind], dtype=F64)
    for ours, theirs in zip(_run(plain, x), _run(switched_off, x)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_wm_input_distribution_draws_from_its_seed_and_step(distribution):
    torch.manual_seed(4)
    layer = _layer("linear", "wm", input_distribution=distribution, input_stddev=0.7, center_input=True)
    x = torch.randn(SHAPES["linear"], dtype=F64)
    noise = _wm_noise(layer, x, distribution, 0.7)
    kernel_noise = _wm_noise(layer, x, distribution, 0.7, kernel=True)
    grad_feedback = _run(layer, x)[0]
    torch.testing.assert_close(grad_feedback, _expected("wm", layer, x, kernel_noise, center_input=True),
                               atol=1e-10, rtol=1e-10)
    # The oracle's generator matches the kernel's up to libm's float32 log / cos (test_estimated).
    torch.testing.assert_close(grad_feedback, _expected("wm", layer, x, noise, center_input=True), atol=1e-5,
                               rtol=1e-4)
    assert float(noise.std()) == pytest.approx(0.7, rel=0.5)


@pytest.mark.parametrize("rule", ["aa", "ia"])
def test_noise_input_for_aa_and_ia_comes_from_torch_generator(rule):
    """aa and ia keep no (seed, step) counter: their noise is torch's draw, so manual_seed repeats it."""
    layer = _layer("conv", rule, input_distribution="normal", input_stddev=2.0)
    x = torch.randn(SHAPES["conv"], dtype=F64)
    torch.manual_seed(5)
    grad_feedback = _run(layer, x)[0]
    torch.manual_seed(5)
    noise = torch.randn_like(x) * 2.0
    torch.testing.assert_close(grad_feedback, _expected(rule, layer, x, noise), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(grad_feedback, _expected(rule, layer, x))


def test_switches_reach_layers_through_convert_and_functional():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    fastfa.convert(model, "ia", normalize_input=True, reconstruction_amp=True, seed=0)
    assert all(layer.alignment_pipeline.on() == {"normalize_input": True, "reconstruction_amp": True}
               for layer in (model[0], model[2]))
    assert "normalize_input=True" in repr(model[0])
    x = torch.randn(6, 7, dtype=F64)
    W, B = torch.randn(5, 7, dtype=F64), torch.randn(5, 7, dtype=F64, requires_grad=True)
    y = fastfa.functional.linear(x, W, None, rule="aa", feedback=B, alpha=0.3, beta=0.7, batch_center_backward_input=True)
    y.backward(torch.ones_like(y))
    expected = oracle.alignment_pipeline_gradient("aa", x, W, None, B, alpha=0.3, beta=0.7,
                                                  batch_center_backward_input=True)
    torch.testing.assert_close(B.grad, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rule,option,error", [
    ("kp", "center_input", "applies to rule(s) wm, aa, ia, not 'kp'"),
    ("sa", "normalize_input", "applies to rule(s) wm, aa, ia, not 'sa'"),
    ("usf", "use_bias_forward", "not 'usf'"),
    ("aa", "reconstruction_amp", "applies to rule 'ia', not 'aa'"),
])
def test_switch_on_a_rule_without_it_is_refused(rule, option, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        fastfa.nn.Linear(4, 3, rule=rule, **{option: True})


def test_bad_switch_values_are_refused():
    with pytest.raises(TypeError, match="center_input must be a bool"):
        fastfa.nn.Linear(4, 3, rule="ia", center_input=1)
    with pytest.raises(ValueError, match="input_distribution must be one of normal, uniform"):
        fastfa.nn.Linear(4, 3, rule="ia", input_distribution="laplace")
    with pytest.raises(ValueError, match="input_stddev must be a positive finite number"):
        fastfa.nn.Linear(4, 3, rule="wm", input_stddev=0.0)
    with pytest.raises(ValueError, match="needs input_distribution"):
        fastfa.nn.Linear(4, 3, rule="aa", input_stddev=2.0)
    with pytest.raises(ValueError, match="either sigma or input_stddev"):
        fastfa.nn.Linear(4, 3, rule="wm", sigma=1.0, input_stddev=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'centre_input'"):
        fastfa.nn.Linear(4, 3, rule="ia", centre_input=True)
    with pytest.raises(TypeError, match="unknown option.s. centre_input"):
        fastfa.functional.linear(torch.randn(2, 4), torch.randn(3, 4), rule="ia", feedback=torch.randn(3, 4),
                                 centre_input=True)


def test_fused_backend_runs_a_switched_layer_on_aten_and_says_so():
    from fallback_paths import expect_fallbacks

    layer = _layer("linear", "ia", activation="none", normalize_input=True)
    x = torch.randn(SHAPES["linear"], dtype=F64)
    expected = _run(layer, x)
    layer.zero_grad()
    with fastfa.use_backend("triton"), expect_fallbacks(("linear", "has no alignment pipeline switch")):
        ours = _run(layer, x)
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)


# --- the layers' defaults (README's Rules section, spec_options.LAYER_SWITCHES) ---------------------


def _default_layer(kind, rule):
    """An aa or ia layer of ``kind`` built without any switch: its default ones."""
    torch.manual_seed(6)
    if kind == "linear":
        return fastfa.nn.Linear(7, 5, rule=rule, dtype=F64, **_coefficients(rule))
    if kind == "conv":
        return fastfa.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, rule=rule, dtype=F64, **_coefficients(rule))
    return fastfa.nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, rule=rule, dtype=F64, **_coefficients(rule))


@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
@pytest.mark.parametrize("rule", ["aa", "ia"])
def test_aa_and_ia_layers_normalise_their_input_by_default(kind, rule):
    """B's gradient of a layer built with no switch is the oracle's with the default switches on;
    normalize_input=False gives the spec's table again (test_estimated checks that one)."""
    layer = _default_layer(kind, rule)
    assert layer.alignment_pipeline.on() == spec_options.LAYER_SWITCHES[rule]
    assert "normalize_input=True" in repr(layer)
    x = torch.randn(SHAPES[kind] if kind != "conv1d" else (3, 4, 9), dtype=F64)
    grad_feedback = _run(layer, x)[0]
    if kind == "conv1d":  # a Conv2d over a unit height (fastfa.nn.Conv1d's own reading)
        geometry = ((1, layer.stride[0]), (0, layer.padding[0]), (1, layer.dilation[0]), layer.groups)
        expected = oracle.alignment_pipeline_gradient(
            rule, x.unsqueeze(2), layer.weight.unsqueeze(2), layer.bias, layer.feedback.unsqueeze(2), conv=geometry,
            **{**COEFFICIENTS, **spec_options.LAYER_SWITCHES[rule]}).squeeze(2)
    else:
        expected = _expected(rule, layer, x, **spec_options.LAYER_SWITCHES[rule])
    torch.testing.assert_close(grad_feedback, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rule", ["aa", "ia"])
def test_attention_projections_take_the_default_and_match_the_oracle(rule):
    """fastfa.nn.MultiheadAttention's packed in_proj and its out_proj run the pipeline like a Linear."""
    torch.manual_seed(7)
    attention = fastfa.nn.MultiheadAttention(8, 2, rule=rule, dtype=F64, **_coefficients(rule))
    seen = {}
    attention.out_proj.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach()))
    query = torch.randn(5, 3, 8, dtype=F64)
    output, _ = attention(query, query, query, need_weights=False)
    output.backward(torch.linspace(-1, 1, output.numel(), dtype=F64).reshape(output.shape))
    switches = {**COEFFICIENTS, **spec_options.LAYER_SWITCHES[rule]}
    for projection, x in ((attention.in_proj, query.reshape(-1, 8)), (attention.out_proj, seen["x"])):
        assert projection.alignment_pipeline.on() == spec_options.LAYER_SWITCHES[rule]
        bias = attention.in_proj_bias if projection is attention.in_proj else attention.out_proj.bias
        expected = oracle.alignment_pipeline_gradient(rule, x.reshape(-1, 8), projection.weight, bias,
                                                      projection.feedback, **switches)
        torch.testing.assert_close(projection.feedback.grad, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rule", ["aa", "ia", "wm", "fa"])
def test_convert_gives_every_layer_kind_the_default_and_the_paper_one_option_away(rule):
    model = torch.nn.ModuleList([torch.nn.Linear(4, 3), torch.nn.Conv2d(2, 3, 3), torch.nn.Conv1d(2, 3, 3),
                                 torch.nn.MultiheadAttention(4, 2)])
    layers = lambda m: [layer for layer in m.modules() if isinstance(layer, fastfa.nn.FeedbackLayer)]  # noqa: E731
    default = fastfa.convert(copy.deepcopy(model), rule)
    assert len(layers(default)) == 5  # Linear, Conv2d, Conv1d, in_proj, out_proj
    expected = spec_options.LAYER_SWITCHES.get(rule)
    assert all((layer.alignment_pipeline.on() if layer.alignment_pipeline else None) == expected
               for layer in layers(default))
    paper = fastfa.convert(copy.deepcopy(model), rule, **spec_options.paper(rule))
    assert all(layer.alignment_pipeline is None for layer in layers(paper))
    # The functional API keeps the table's closed form: the ops have no default to change.
    x, W = torch.randn(6, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    if rule in ("aa", "ia"):
        B = torch.randn(3, 4, dtype=F64, requires_grad=True)
        y = fastfa.functional.linear(x, W, rule=rule, feedback=B, **_coefficients(rule))
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(B.grad, oracle.alignment_pipeline_gradient(rule, x, W, None, B, **COEFFICIENTS),
                                   atol=1e-10, rtol=1e-10)


def test_a_zero_sample_stays_zero_when_normalised_in_half_precision():
    """A sample of zeros (a dead ReLU layer's output) has norm 0: it must give B no NaN, in fp16 too."""
    torch.manual_seed(8)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        layer = fastfa.nn.Linear(6, 4, rule="aa", dtype=dtype)
        x = torch.randn(3, 6, dtype=dtype)
        x[1] = 0
        layer(x).sum().backward()
        assert torch.isfinite(layer.feedback.grad).all(), dtype


@pytest.mark.parametrize("rule", ["aa", "ia"])
def test_default_layers_under_autocast_and_with_an_empty_batch(rule):
    """The default's pipeline path under bf16 autocast (B stays fp32, its gradient too) and on a zero-size batch."""
    torch.manual_seed(9)
    layer = fastfa.nn.Conv2d(3, 4, 3, padding=1, rule=rule)
    x = torch.randn(2, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.feedback.grad.dtype == torch.float32
    expected = oracle.alignment_pipeline_gradient(rule, x.bfloat16().float(), layer.weight.bfloat16().float(), None,
                                                  layer.feedback, conv=_geometry(layer),
                                                  **{**spec_options.ALIGNMENT_DEFAULTS[rule],
                                                     **spec_options.LAYER_SWITCHES[rule]}).float()
    torch.testing.assert_close(layer.feedback.grad, expected, atol=2e-2 * float(expected.abs().max()), rtol=5e-2)
    layer.zero_grad()
    empty = layer(torch.randn(0, 3, 5, 5))
    empty.sum().backward()
    assert empty.shape == (0, 4, 5, 5) and torch.isfinite(layer.feedback.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("rule", ["aa", "ia"])
def test_default_layers_closed_form_in_low_precision(kind, rule, dtype):
    """The default's closed form computes from sqrt(F) x_hat with 1 / F in the coefficients (one scale
    fewer); in fp32 and bf16 it stays within the dtype's tolerance of the fp64 oracle."""
    low = _default_layer(kind, rule).to(dtype)
    x = torch.randn(SHAPES[kind], dtype=dtype)
    # The oracle in fp64 on the values the low-precision layer holds.
    expected = _expected(rule, copy.deepcopy(low).double(), x.double(), **spec_options.LAYER_SWITCHES[rule])
    grad_feedback = _run(low, x)[0]
    assert grad_feedback.dtype == dtype
    assert_close(grad_feedback.double(), expected, dtype, "grad_feedback")


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("rule", ["aa", "ia"])
def test_default_layers_closed_form_matches_the_oracle_on_every_call(kind, rule):
    """The default (normalize_input) is the aten op's closed form: on the checked first call and on the
    resolved LayerCall of the next ones. An all-zero sample stays zero (never NaN), as in the
    pipeline's own loss (the oracle divides by its zero norm)."""
    from fastfa import alignment

    layer = _default_layer(kind, rule)
    x = torch.randn(SHAPES[kind], dtype=F64)
    expected = _expected(rule, layer, x, **spec_options.LAYER_SWITCHES[rule])
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        torch.testing.assert_close(_run(layer, x)[0], expected, atol=1e-10, rtol=1e-10)
    assert "_resolved_call" in layer.__dict__
    x[1] = 0.0
    layer.zero_grad(set_to_none=True)
    feedback = layer.feedback.detach().clone().requires_grad_(True)
    flat = x if kind == "conv" else x.reshape(-1, x.shape[-1])
    maps = alignment._Maps(flat.shape, _geometry(layer))
    alignment.pipeline_loss(Rule[rule.upper()], layer.alignment_pipeline, flat, layer.weight, layer.bias, feedback,
                            layer.alignment_options[:3], layer.activation, maps).backward()
    grad_feedback = _run(layer, x)[0]
    assert torch.isfinite(grad_feedback).all()
    torch.testing.assert_close(grad_feedback, feedback.grad, atol=1e-10, rtol=1e-10)
