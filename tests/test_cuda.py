"""The CUDA twins: the transform kernel and the aten backend on a GPU against the CPU and the
oracle; the cuda backend's fused kernels against the oracle.

Every cuda-backend call is checked for the path it took (fallback_paths.expect_fallbacks):
the fused kernels where they cover the call, the aten path, recorded with its reason, where
they do not. So a run with every call forced onto the aten path must fail:

    FASTFA_CUDA_FORCE_ATEN=1 python -m pytest -q tests/test_cuda.py   # fails: "fell back where ..."
    python -m pytest -q tests/test_cuda.py                            # passes

Skipped without a CUDA device. On a GPU machine: bash benchmarks/gpu_check.sh OUTDIR (and
gpu_extra.sh for compute-sanitizer; benchmarks/README.md, "GPU check").
"""

import contextlib
import copy

import pytest
import torch
from conftest import assert_close, away_from_relu_kink
from fallback_paths import expect_fallbacks
from test_estimated import expected_feedback_grad

import fastfa
import oracle
import spec_options
from fastfa.rules import Distribution, Rule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _restores_global_state_and_expects_no_fallback():
    """Each test runs the cuda backend's every pass on its fused kernels (fastfa.set_cuda_fused:
    by default its forward and grad_weight take the vendor calls, tested in test_auto_dispatch.py)
    and "auto" as aten (the tests that name no backend compare the aten path on the GPU), and leaves torch's tf32 switches, the default dtype, fastfa's backend and that switch as it
    found them (a test that turned tf32 off would send every later fp32 cuda-backend call to the
    aten path); and a cuda-backend call that fell back fails the test unless the test expected it."""
    state = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_default_dtype(),
             fastfa.get_backend(), fastfa.cuda_fused())
    fastfa.clear_fallbacks()
    fastfa.set_cuda_fused(True)
    fastfa.set_backend("aten")
    try:
        yield
        fallen = fastfa.last_fallbacks()
        assert not fallen, f"calls fell back to aten that the test did not expect: {fallen}"
    finally:
        fastfa.clear_fallbacks()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state[:2]
        torch.set_default_dtype(state[2])
        fastfa.set_backend(state[3])
        fastfa.set_cuda_fused(state[4])


# What the cuda backend's fused kernels cover (README, "cuda"): fp16, bf16, and fp32 through
# tf32 while torch.backends.cuda.matmul.allow_tf32 allows it, on compute capability 8.0 or
# later; conv2d with groups = 1, its grad_input at stride 1. B's gradient for wm, aa and ia
# runs on aten. Anything else must be a recorded fallback.
FEEDBACK_GRADIENT_ON_ATEN = ("wm", "aa", "ia")
# A fragment of each reason the cuda backend records (test_cuda_contract checks them against
# csrc/cuda on the CPU, so that rewording a reason fails there, not first on a GPU).
REASONS = {"capability": "compute capability 8.0", "fp64": "fp64", "no tf32": "allow_tf32 is False",
           "groups": "groups > 1", "strided grad_input": "grad_input of a strided conv2d",
           "feedback gradient": "B's gradient"}


def _cuda_fallbacks(op, dtype, rule="usf", *, groups=1, stride=1, forward=True, backward=True, grad_input=True):
    """The (op, reason fragment) records that one call of the cuda backend's ``op`` ("linear" or
    "conv2d", with ``forward``) and of its backward (with ``backward``) must leave; [] where the
    fused kernels ran it all. Derived from the call, not from the backend."""
    ops = [f"cuda_{op}"] * forward + [f"cuda_{op}_backward"] * backward
    whole = None
    if torch.cuda.get_device_capability() < (8, 0):
        whole = REASONS["capability"]
    elif dtype == torch.float64:
        whole = REASONS["fp64"]
    elif dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        whole = REASONS["no tf32"]
    elif groups != 1:
        whole = REASONS["groups"]
    if whole is not None:
        return [(name, whole) for name in ops]
    expected = []
    strided = any(s > 1 for s in ((stride, stride) if isinstance(stride, int) else stride))
    if backward and grad_input and strided:
        expected.append((f"cuda_{op}_backward", REASONS["strided grad_input"]))
    if backward and rule in FEEDBACK_GRADIENT_ON_ATEN:
        expected.append((f"cuda_{op}_backward", REASONS["feedback gradient"]))
    return expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", list(Rule))
@pytest.mark.parametrize("distribution", list(Distribution))
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_transform_equals_cpu(rule, dtype, distribution, channels_last):
    if not fastfa._C.build_info()["cuda"]:
        pytest.fail("a GPU is visible but fastfa._C was built without CUDA: reinstall on this machine")
    weight = torch.randn(67, 33, 3, 5, dtype=dtype)
    weight[0, :4] = 0  # sign(0) = 0
    feedback = torch.randn_like(weight) if rule in (Rule.FA, Rule.FRSF) or rule >= Rule.KP else None
    rng = torch.tensor([2**40 + 3, 2**33 + 11])
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    cpu = torch.ops.fastfa.feedback_transform(weight, feedback, rng, int(rule), 0.37, int(distribution))
    gpu = torch.ops.fastfa.feedback_transform(weight.cuda(), None if feedback is None else feedback.cuda(),
                                              rng.cuda(), int(rule), 0.37, int(distribution))
    if distribution == Distribution.NORMAL and rule == Rule.BRSF:
        # logf / cosf differ by an ulp between glibc and CUDA's libdevice.
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=1e-5 if dtype != torch.bfloat16 else 1e-2)
    else:
        assert torch.equal(gpu.cpu(), cpu)
    # Drawn fa without stored R: the same generator, element for element.
    drawn_cpu = torch.ops.fastfa.feedback_transform(weight, None, rng, int(Rule.FA), 0.5, 0)
    drawn_gpu = torch.ops.fastfa.feedback_transform(weight.cuda(), None, rng.cuda(), int(Rule.FA), 0.5, 0)
    assert torch.equal(drawn_gpu.cpu(), drawn_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
def test_cuda_layers_match_cpu(rule, dtype):
    """The same layers on the GPU (cuBLAS / cuDNN, full fp32) give the CPU's fp64 results from
    the same (rounded) parameters and inputs, at the GPU dtype's tolerance."""
    for layer, shape in ((fastfa.nn.Linear(257, 129, rule=rule, seed=1), (33, 257)),
                         (fastfa.nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=2, rule=rule, seed=1),
                          (5, 16, 19, 17))):
        layer = layer.to(dtype)
        x = torch.randn(shape, dtype=dtype)
        reference = _grads(copy.deepcopy(layer).double(), x.double())
        with _tf32(False):
            ours = _grads(copy.deepcopy(layer).cuda(), x.cuda())
        for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias", "grad_feedback"), ours, reference):
            assert_close(a.double().cpu(), b, dtype, f"{rule} {dtype} {type(layer).__name__} {name}")


def _grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    g = torch.ones_like(y)
    y.backward(g)
    learned = [layer.feedback.grad] if isinstance(layer.feedback, torch.nn.Parameter) else []
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad] + learned


def test_cuda_compile_fullgraph():
    model = torch.nn.Sequential(fastfa.nn.Conv2d(3, 8, 3, rule="brsf"), torch.nn.Flatten(),
                                fastfa.nn.Linear(8 * 6 * 6, 4, rule="usf")).cuda()
    compiled = torch.compile(model, fullgraph=True)
    compiled(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
    assert int(model[0].feedback_rng[1]) == 1


# ---- The cuda backend: fused tensor-core GEMMs (csrc/cuda/gemm_kernel.cuh) ----------------

# (rows as the input's leading dims, in_features, out_features): ragged against the 128 x 128
# tiles and the 64 (16-bit) / 32 (tf32) element K tiles, K tails of one element, odd strides
# that refuse the vector loads, and several tiles in every dimension.
# The last two: a long batch over one output tile, so grad_weight runs split over K; few rows
# over a long out_features, so grad_input does.
LINEAR_SHAPES = [((37,), 67, 129), ((5, 7), 200, 75), ((1,), 3, 131), ((300,), 257, 130), ((129,), 64, 256),
                 ((4099,), 64, 96), ((3, 5), 96, 1031)]
# fp32 goes through tf32 (10 mantissa bits, like fp16), so it gets fp16's tolerance.
TOLERANCE_AS = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float16, torch.float32: torch.float16}


def _require_cuda_backend():
    status = fastfa.backends()["cuda"]
    if not status.usable:
        pytest.fail(f"a GPU is visible but the cuda backend is not usable: {status.reason}")


@contextlib.contextmanager
def _tf32(enabled: bool):
    """cuBLAS' and cuDNN's tf32 switches for a block (the cuda backend reads cuBLAS')."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _resolved_scale_and_distribution(rule, w, options):
    """The draw's scale and distribution that a call with `options` resolves to, read from the
    spec (tests/spec_options.py), not from fastfa's own resolution."""
    rule_options = {key: value for key, value in options.items() if key != "feedback"}
    resolved = spec_options.resolve(rule, tuple(w.shape), **rule_options)
    return resolved.scale, resolved.distribution


def _oracle_feedback(rule, w, feedback, options):
    """The oracle's B for a layer called with `options`."""
    scale, distribution = _resolved_scale_and_distribution(rule, w, options)
    stored = feedback.detach().cpu() if feedback is not None else None
    return oracle.feedback_matrix(rule, w.detach().cpu(), feedback=stored, seed=options.get("seed"),
                                  step=options.get("step"), scale=scale, distribution=distribution)


# Alignment coefficients far above the defaults (1e-3), so that B's gradient stands well out of
# the dtype's tolerance; each rule is given those it takes (learning-rules.md's table).
ALIGNMENT = dict(alpha=0.3, beta=0.7, gamma=0.2, sigma=1.3)
ALIGNMENT_TAKEN = {"kp": ("alpha",), "wm": ("alpha", "beta", "sigma"), "sa": ("alpha", "beta"),
                   "aa": ("alpha", "beta"), "ia": ("alpha", "beta", "gamma")}
WM_SEED, WM_STEP = 2**35 + 17, 2**33 + 5


def _rule_inputs(rule, weight, fan_in):
    """Options for functional.linear / conv2d, and the stored R or B (shaped and laid out like W)."""
    options, feedback = {}, None
    if rule in ("fa", "frsf") or rule in oracle.ESTIMATED:
        feedback = (torch.randn_like(weight) / fan_in**0.5).requires_grad_(rule in oracle.ESTIMATED)
        options["feedback"] = feedback
    if rule in ("brsf", "wm"):
        options.update(seed=WM_SEED, step=WM_STEP)
    options.update({name: ALIGNMENT[name] for name in ALIGNMENT_TAKEN.get(rule, ())})
    return options, feedback


def _expected_feedback_gradient(rule, x, w, feedback, grad_weight, conv_geometry=None):
    """learning-rules.md's gradient of B (test_estimated's spec implementation) in fp64 on the
    CPU, for the options _rule_inputs gives; wm's noise from the oracle's generator."""
    w, feedback, x = (t.detach().cpu().double() for t in (w, feedback, x))
    if conv_geometry is None:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
    else:
        layer = torch.nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), *conv_geometry, bias=False,
                                dtype=torch.float64)
    layer.weight.data = w
    layer.feedback = feedback
    alignment = tuple(ALIGNMENT[name] for name in ("alpha", "beta", "gamma", "sigma"))
    noise = oracle.draw(WM_SEED, WM_STEP, x.shape, "normal", ALIGNMENT["sigma"]).double() if rule == "wm" else None
    return expected_feedback_grad(rule, layer, x, grad_weight, alignment, noise)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
def test_cuda_backend_linear_matches_oracle(shape, rule, dtype, activation):
    _require_cuda_backend()
    leading, in_features, out_features = shape
    x = torch.randn(*leading, in_features, dtype=dtype, device="cuda", requires_grad=True)
    w = (torch.randn(out_features, in_features, dtype=dtype, device="cuda") / in_features**0.5).requires_grad_(True)
    b = torch.randn(out_features, dtype=dtype, device="cuda", requires_grad=True)
    w.data[0, : min(3, in_features)] = 0  # sign(0) = 0 inside the transform
    options, feedback = _rule_inputs(rule, w, in_features)
    g = torch.randn(*leading, out_features, dtype=dtype, device="cuda")
    preactivation = x.detach().double() @ w.detach().double().t() + b.detach().double()
    g = away_from_relu_kink(g, preactivation, activation)
    with _tf32(True), expect_fallbacks(*_cuda_fallbacks("linear", dtype, rule)):
        y = fastfa.functional.linear(x, w, b, rule=rule, activation=activation, backend="cuda", **options)
        y.backward(g)
    B = _oracle_feedback(rule, w, feedback, options)
    expected = oracle.linear(x.detach().cpu().double(), w.detach().cpu().double(), b.detach().cpu().double(),
                             B.double(), g.cpu().double(), activation)
    like = TOLERANCE_AS[dtype]
    for name, ours, theirs in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                  (y, x.grad, w.grad, b.grad), expected):
        assert ours.dtype == dtype and ours.is_cuda, name
        assert_close(ours.detach().cpu().double(), theirs, like, f"{rule} {dtype} {name}")
    if rule in oracle.ESTIMATED:
        expected_feedback = _expected_feedback_gradient(rule, x, w, feedback, expected[2])
        assert_close(feedback.grad.cpu().double(), expected_feedback, like, f"{rule} {dtype} grad_feedback")


# (batch, in channels, height, width, out channels, kernel, stride, padding, dilation): whole and
# ragged vectors of channels, two tiles of out channels, stride 2 (grad_input on the aten
# path), 1x1, dilation, and one long enough in K for grad_weight's split.
CONV_SHAPES = [(2, 8, 9, 9, 16, 3, 1, 1, 1), (3, 5, 7, 6, 6, 3, 1, 1, 1), (1, 24, 5, 5, 130, 3, 1, 1, 1),
               (2, 16, 11, 10, 24, 3, 2, 1, 1), (4, 3, 8, 8, 8, 1, 1, 0, 1), (2, 8, 9, 9, 8, 3, 1, 2, 2),
               (16, 64, 14, 14, 64, 3, 1, 1, 1)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_cuda_backend_conv2d_matches_oracle(shape, rule, dtype, channels_last):
    """The implicit-GEMM conv2d (forward with bias and gelu, grad_input through the rule's
    transform, split-K grad_weight and grad_bias) against the oracle in fp64."""
    _require_cuda_backend()
    batch, channels, height, width, out_channels, kernel, stride, padding, dilation = shape
    fan_in = channels * kernel * kernel
    format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, height, width, dtype=dtype, device="cuda").to(memory_format=format)
    x.requires_grad_(True)
    w = torch.randn(out_channels, channels, kernel, kernel, dtype=dtype, device="cuda") / fan_in**0.5
    w[0, 0] = 0  # sign(0) = 0 inside the transform
    w = w.to(memory_format=format).requires_grad_(True)
    b = torch.randn(out_channels, dtype=dtype, device="cuda", requires_grad=True)
    options, feedback = _rule_inputs(rule, w, fan_in)
    with _tf32(True), expect_fallbacks(*_cuda_fallbacks("conv2d", dtype, rule, stride=stride)):
        y = fastfa.functional.conv2d(x, w, b, stride, padding, dilation, rule=rule, activation="gelu",
                                     backend="cuda", **options)
        g = torch.randn_like(y)
        y.backward(g)
    B = _oracle_feedback(rule, w, feedback, options)
    expected = oracle.conv2d(x.detach().cpu().double(), w.detach().cpu().double(), b.detach().cpu().double(),
                             B.double(), g.cpu().double(), stride, padding, dilation, activation="gelu")
    like = TOLERANCE_AS[dtype]
    for name, ours, theirs in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                  (y, x.grad, w.grad, b.grad), expected):
        assert ours.dtype == dtype and ours.is_cuda, name
        assert_close(ours.detach().cpu().double(), theirs, like, f"{rule} {dtype} {name}")
    if rule in oracle.ESTIMATED:
        expected_feedback = _expected_feedback_gradient(rule, x, w, feedback, expected[2],
                                                        (stride, padding, dilation))
        assert_close(feedback.grad.cpu().double(), expected_feedback, like, f"{rule} {dtype} grad_feedback")


@pytest.mark.parametrize("groups,stride,warning", [(2, 1, "groups > 1"), (1, 2, "strided conv2d")])
def test_cuda_backend_conv2d_says_what_takes_the_aten_path(groups, stride, warning):
    """groups > 1 and a strided grad_input are not implicit GEMMs here: they run on the aten path,
    warned and recorded with the reason; every result matches the oracle, and what ran on the
    aten path gives the aten backend's results."""
    _require_cuda_backend()
    x = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.randn(8, 8 // groups, 3, 3, dtype=torch.bfloat16, device="cuda", requires_grad=True)

    def run(backend):
        x.grad = w.grad = None
        y = fastfa.functional.conv2d(x, w, None, stride, 1, 1, groups, rule="usf", backend=backend)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad.clone(), w.grad.clone()

    results = {}
    with expect_fallbacks(*_cuda_fallbacks("conv2d", x.dtype, groups=groups, stride=stride)), \
            pytest.warns(UserWarning, match=warning):
        results["cuda"] = run("cuda")
    results["aten"] = run("aten")
    B = _oracle_feedback("usf", w, None, {})
    expected = oracle.conv2d(x.detach().cpu().double(), w.detach().cpu().double(), None, B.double(),
                             torch.ones_like(results["cuda"][0]).cpu().double(), stride, 1, 1, groups)
    for name, ours, theirs in zip(("output", "grad_input", "grad_weight"), results["cuda"], expected):
        assert_close(ours.cpu().double(), theirs, torch.bfloat16, f"groups={groups} stride={stride} {name}")
    on_aten = ("output", "grad_input", "grad_weight") if groups > 1 else ("grad_input",)
    for name, ours, theirs in zip(("output", "grad_input", "grad_weight"), results["cuda"], results["aten"]):
        if name in on_aten:
            torch.testing.assert_close(ours, theirs, msg=lambda m: f"{name} on the aten path: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule,distribution", [(Rule.BP, 0), (Rule.USF, 0), (Rule.FRSF, 0), (Rule.FA, 0),
                                               (Rule.FA, 1), (Rule.BRSF, 0), (Rule.BRSF, 1)])
@pytest.mark.parametrize("in_features", [131, 136])  # the scalar and the vector load path
def test_cuda_backend_transform_is_the_transform_kernel_exactly(rule, distribution, dtype, in_features):
    """grad_input with delta = I is B itself, so the B made inside the GEMM's tiles must equal,
    element for element, the B of the transform kernel that the aten backend uses."""
    _require_cuda_backend()
    out_features = 70
    w = torch.randn(out_features, in_features, dtype=dtype, device="cuda")
    w[1, :5] = 0
    feedback = torch.randn_like(w) if rule == Rule.FRSF else None
    rng = torch.tensor([2**40 + 3, 2**33 + 11], device="cuda")
    identity = torch.eye(out_features, dtype=dtype, device="cuda")
    x = torch.randn(out_features, in_features, dtype=dtype, device="cuda")
    with expect_fallbacks(*_cuda_fallbacks("linear", dtype, forward=False)):
        grad_input = torch.ops.fastfa.cuda_linear_backward(
            identity, x, w, feedback, rng, x.new_empty(0), x.new_empty(0), int(rule), 0.37, distribution,
            [0.0, 0.0, 0.0, 1.0], "none", [True, False, False, False])[0]
    expected = torch.ops.fastfa.feedback_transform(w, feedback, rng, int(rule), 0.37, distribution)
    assert torch.equal(grad_input, expected)


@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float64, True)], ids=["fp32-no-tf32", "fp64"])
def test_cuda_backend_fp32_without_tf32_and_fp64_are_the_aten_path(dtype, tf32):
    _require_cuda_backend()
    x = torch.randn(33, 70, dtype=dtype, device="cuda", requires_grad=True)
    w = torch.randn(20, 70, dtype=dtype, device="cuda", requires_grad=True)
    results = []
    with _tf32(tf32):
        for backend in ("cuda", "aten"):
            x.grad = w.grad = None
            paths = expect_fallbacks(*_cuda_fallbacks("linear", dtype)) if backend == "cuda" else \
                contextlib.nullcontext()
            with paths:
                y = fastfa.functional.linear(x, w, rule="usf", backend=backend)
                y.backward(torch.ones_like(y))
            results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_cuda_backend_opcheck():
    _require_cuda_backend()
    x = torch.randn(9, 37, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.randn(11, 37, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    b = torch.randn(11, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    rng = torch.tensor([5, 6], device="cuda")
    torch.library.opcheck(torch.ops.fastfa.cuda_linear,
                          (x, w, b, None, rng, int(Rule.BRSF), 0.5, 0, [0.0, 0.0, 0.0, 1.0], "gelu"))
    grad = torch.randn(9, 11, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.fastfa.cuda_linear_backward,
                          (grad, x.detach(), w.detach(), None, rng, x.new_empty(0), x.new_empty(0), int(Rule.BRSF),
                           0.5, 0, [0.0, 0.0, 0.0, 1.0], "none", [True, True, True, False]))


def test_cuda_backend_compile_fullgraph():
    """A compiled model on the cuda backend gives eager's output and gradients, and both are the
    oracle's (two layers chained in fp64; gelu, without relu's kink, so rounding cannot flip a
    derivative)."""
    _require_cuda_backend()
    model = torch.nn.Sequential(fastfa.nn.Linear(40, 24, rule="brsf", seed=1, activation="gelu"),
                                fastfa.nn.Linear(24, 5, rule="usf")).cuda().to(torch.bfloat16)
    x = torch.randn(7, 40, device="cuda", dtype=torch.bfloat16)
    first, second = model[0], model[1]
    rng = first.feedback_rng.clone()  # the [seed, step] this first step's backward reads
    results = {}
    with fastfa.use_backend("cuda"), expect_fallbacks():
        for name, run in (("eager", copy.deepcopy(model)), ("compiled", None)):
            run = torch.compile(model, fullgraph=True) if run is None else run
            y = run(x)
            y.float().sum().backward()
            layers = model if name == "compiled" else run
            results[name] = [y.detach()] + [p.grad for layer in layers for p in (layer.weight, layer.bias)]
    for eager, compiled in zip(results["eager"], results["compiled"]):
        torch.testing.assert_close(compiled, eager)

    def f64(t):
        return t.detach().cpu().double()

    B1 = _oracle_feedback("brsf", first.weight, None, {"seed": int(rng[0]), "step": int(rng[1])})
    B2 = _oracle_feedback("usf", second.weight, None, {})
    h = oracle.linear(f64(x), f64(first.weight), f64(first.bias), B1.double(), torch.zeros(7, 24, dtype=torch.float64),
                      "gelu")[0]
    y, grad_h, grad_w2, grad_b2 = oracle.linear(h, f64(second.weight), f64(second.bias), B2.double(),
                                                torch.ones(7, 5, dtype=torch.float64))
    _, _, grad_w1, grad_b1 = oracle.linear(f64(x), f64(first.weight), f64(first.bias), B1.double(), grad_h, "gelu")
    for name, ours, theirs in zip(("output", "grad_weight 1", "grad_bias 1", "grad_weight 2", "grad_bias 2"),
                                  results["compiled"], (y, grad_w1, grad_b1, grad_w2, grad_b2)):
        assert_close(f64(ours), theirs, torch.bfloat16, f"compiled {name}")
