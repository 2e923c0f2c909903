"""The CUDA twins: the transform kernel and the aten backend on a GPU against the CPU and the
oracle; the cuda backend's fused kernels against the oracle.

Skipped without a CUDA device. On a GPU machine: bash benchmarks/gpu_check.sh OUTDIR (and
gpu_extra.sh for compute-sanitizer; benchmarks/README.md, "GPU check").
"""

import contextlib

import pytest
import torch
from conftest import assert_close, away_from_relu_kink

import fastfa
import oracle
from fastfa.functional import feedback_arguments
from fastfa.rules import Distribution, Rule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


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
@pytest.mark.parametrize("rule", fastfa.RULES)
def test_cuda_layers_match_cpu(rule, dtype):
    """The same layers on the GPU (cuBLAS / cuDNN) give the CPU's gradients up to rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for layer, shape in ((fastfa.nn.Linear(257, 129, rule=rule, seed=1), (33, 257)),
                         (fastfa.nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=2, rule=rule, seed=1),
                          (5, 16, 19, 17))):
        layer = layer.double()
        x = torch.randn(shape, dtype=torch.float64)
        reference = _grads(layer, x)
        cuda_layer = _copy(layer).to(device="cuda", dtype=dtype)
        ours = _grads(cuda_layer, x.to(device="cuda", dtype=dtype))
        for a, b in zip(ours, reference):
            assert_close(a.double().cpu(), b, torch.bfloat16 if dtype != torch.float32 else torch.float32)


def _copy(layer):
    import copy

    return copy.deepcopy(layer)


def _grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    g = torch.ones_like(y)
    y.backward(g)
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]


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
# The last one: a long batch over one output tile, so grad_weight runs split over K.
LINEAR_SHAPES = [((37,), 67, 129), ((5, 7), 200, 75), ((1,), 3, 131), ((300,), 257, 130), ((129,), 64, 256),
                 ((4099,), 64, 96)]
# fp32 goes through tf32 (10 mantissa bits, like fp16), so it gets fp16's tolerance.
TOLERANCE_AS = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float16, torch.float32: torch.float16}


def _require_cuda_backend():
    status = fastfa.backends()["cuda"]
    if not status.usable:
        pytest.fail(f"a GPU is visible but the cuda backend is not usable: {status.reason}")


@contextlib.contextmanager
def _tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _oracle_feedback(rule, w, feedback, options):
    """The oracle's B for a layer called with `options`, and the rule's alignment options."""
    rule_options = {key: value for key, value in options.items() if key != "feedback"}
    spec, scale, distribution, alignment, rng = feedback_arguments(rule, tuple(w.shape), w.device, rule_options)
    stored = feedback.detach().cpu() if feedback is not None else None
    seed, step = (int(rng[0]), int(rng[1])) if rng is not None else (None, None)
    B = oracle.feedback_matrix(spec.name, w.detach().cpu(), feedback=stored, seed=seed, step=step, scale=scale,
                               distribution=Distribution(distribution).name.lower())
    return B, alignment


def _rule_inputs(rule, weight, fan_in):
    """Options for functional.linear / conv2d, and the stored R or B (shaped and laid out like W)."""
    options, feedback = {}, None
    if rule in ("fa", "frsf") or rule in oracle.ESTIMATED:
        feedback = (torch.randn_like(weight) / fan_in**0.5).requires_grad_(rule in oracle.ESTIMATED)
        options["feedback"] = feedback
    if rule in ("brsf", "wm"):
        options.update(seed=2**35 + 17, step=2**33 + 5)
    return options, feedback


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rule", fastfa.RULES)
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
    with _tf32(True):
        y = fastfa.functional.linear(x, w, b, rule=rule, activation=activation, backend="cuda", **options)
        y.backward(g)
    B, alignment = _oracle_feedback(rule, w, feedback, options)
    expected = oracle.linear(x.detach().cpu().double(), w.detach().cpu().double(), b.detach().cpu().double(),
                             B.double(), g.cpu().double(), activation)
    like = TOLERANCE_AS[dtype]
    for name, ours, theirs in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                  (y, x.grad, w.grad, b.grad), expected):
        assert ours.dtype == dtype and ours.is_cuda, name
        assert_close(ours.detach().cpu().double(), theirs, like, f"{rule} {dtype} {name}")
    if rule in oracle.ESTIMATED:
        # kp and sa are summed from tensors the op has; wm, aa, ia reuse the aten backend's terms.
        alpha, beta = alignment[0], alignment[1]
        if rule == "kp":
            expected_feedback = expected[2] + 2 * alpha * feedback.detach().cpu().double()
        elif rule == "sa":
            expected_feedback = 2 * alpha * feedback.detach().cpu().double() - beta * w.detach().cpu().double()
        else:
            aten_feedback = feedback.detach().clone().requires_grad_(True)
            aten_options = dict(options, feedback=aten_feedback)
            with _tf32(True):
                fastfa.functional.linear(x.detach(), w.detach(), b.detach(), rule=rule, activation=activation,
                                         backend="aten", **aten_options).backward(g)
            expected_feedback = aten_feedback.grad.cpu().double()
        assert_close(feedback.grad.cpu().double(), expected_feedback, like, f"{rule} {dtype} grad_feedback")


# (batch, in channels, height, width, out channels, kernel, stride, padding, dilation): whole and
# ragged vectors of channels, two tiles of out channels, stride 2 (grad_input on the aten
# path), 1x1, dilation, and one long enough in K for grad_weight's split.
CONV_SHAPES = [(2, 8, 9, 9, 16, 3, 1, 1, 1), (3, 5, 7, 6, 6, 3, 1, 1, 1), (1, 24, 5, 5, 130, 3, 1, 1, 1),
               (2, 16, 11, 10, 24, 3, 2, 1, 1), (4, 3, 8, 8, 8, 1, 1, 0, 1), (2, 8, 9, 9, 8, 3, 1, 2, 2),
               (16, 64, 14, 14, 64, 3, 1, 1, 1)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rule", fastfa.RULES)
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
    with _tf32(True):
        y = fastfa.functional.conv2d(x, w, b, stride, padding, dilation, rule=rule, activation="gelu",
                                     backend="cuda", **options)
        g = torch.randn_like(y)
        y.backward(g)
    B, alignment = _oracle_feedback(rule, w, feedback, options)
    expected = oracle.conv2d(x.detach().cpu().double(), w.detach().cpu().double(), b.detach().cpu().double(),
                             B.double(), g.cpu().double(), stride, padding, dilation, activation="gelu")
    like = TOLERANCE_AS[dtype]
    for name, ours, theirs in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                  (y, x.grad, w.grad, b.grad), expected):
        assert ours.dtype == dtype and ours.is_cuda, name
        assert_close(ours.detach().cpu().double(), theirs, like, f"{rule} {dtype} {name}")
    if rule in ("kp", "sa"):
        alpha, beta = alignment[0], alignment[1]
        expected_feedback = (expected[2] + 2 * alpha * feedback.detach().cpu().double() if rule == "kp" else
                             2 * alpha * feedback.detach().cpu().double() - beta * w.detach().cpu().double())
        assert_close(feedback.grad.cpu().double(), expected_feedback, like, f"{rule} {dtype} grad_feedback")


def test_cuda_backend_conv2d_says_what_takes_the_aten_path():
    """groups > 1 and a strided grad_input are not implicit GEMMs here: they run on the aten path,
    with a warning that names the reason, and give the aten backend's results."""
    _require_cuda_backend()
    x = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    for groups, stride, reason in ((2, 1, "groups > 1"), (1, 2, "strided conv2d")):
        w = torch.randn(8, 8 // groups, 3, 3, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        results = []
        for backend in ("cuda", "aten"):
            x.grad = w.grad = None
            with pytest.warns(UserWarning, match=reason) if backend == "cuda" else contextlib.nullcontext():
                y = fastfa.functional.conv2d(x, w, None, stride, 1, 1, groups, rule="usf", backend=backend)
                y.backward(torch.ones_like(y))
            results.append((y.detach(), x.grad.clone(), w.grad.clone()))
        torch.testing.assert_close(results[0][0], results[1][0])
        torch.testing.assert_close(results[0][1], results[1][1])


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
    grad_input = torch.ops.fastfa.cuda_linear_backward(
        identity, x, w, feedback, rng, x.new_empty(0), x.new_empty(0), int(rule), 0.37, distribution,
        [0.0, 0.0, 0.0, 1.0], "none", [True, False, False, False])[0]
    expected = torch.ops.fastfa.feedback_transform(w, feedback, rng, int(rule), 0.37, distribution)
    assert torch.equal(grad_input, expected)


def test_cuda_backend_fp32_without_tf32_is_the_aten_path():
    _require_cuda_backend()
    x = torch.randn(33, 70, device="cuda", requires_grad=True)
    w = torch.randn(20, 70, device="cuda", requires_grad=True)
    results = []
    with _tf32(False):
        for backend in ("cuda", "aten"):
            x.grad = w.grad = None
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
    _require_cuda_backend()
    model = torch.nn.Sequential(fastfa.nn.Linear(40, 24, rule="brsf", seed=1, activation="relu"),
                                fastfa.nn.Linear(24, 5, rule="usf")).cuda().to(torch.bfloat16)
    x = torch.randn(7, 40, device="cuda", dtype=torch.bfloat16)
    with fastfa.use_backend("cuda"):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        compiled.float().sum().backward()
    torch.testing.assert_close(compiled, eager)
