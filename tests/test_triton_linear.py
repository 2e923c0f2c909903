"""The triton backend's Linear ops (fastfa::triton_linear / triton_linear_backward) against the oracle and aten.

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors, with
ragged shapes that are not multiples of the interpreter's blocks (16 x 32 x 16).
"""

import textwrap

import pytest
import torch

import fastfa
import oracle
import spec_options
from conftest import assert_close, away_from_relu_kink, forced_triton_draw
from fastfa.rules import Distribution, Rule

pytest.importorskip("triton")
# Registers fastfa::triton_linear(_backward); a broken module fails here, never skips.
from fastfa.triton_kernels import linear
import triton
import triton_sm90
pytestmark = pytest.mark.skipif(not fastfa.backends()["triton"].usable, reason="the triton backend is not usable here")

F64 = torch.float64
# CPU tensors under the interpreter; on a GPU machine the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_device_without_fallbacks():
    """Every tensor a test makes is on DEVICE; and no call fell back to aten unless a test expects
    it (a fallback would compare aten with itself)."""
    fastfa.clear_fallbacks()
    with torch.device(DEVICE):
        yield
    fallen = fastfa.last_fallbacks()
    fastfa.clear_fallbacks()
    assert not fallen, fallen

ALIGNMENT = dict(alpha=0.3, beta=0.7, gamma=0.2, sigma=1.3)
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
# (rule, options): fa both with a stored R and regenerating R from (seed, step).
CASES = [("bp", {}), ("fa", {"stored": True}), ("fa", {"seed": 11}), ("usf", {"scale": "kaiming"}),
         ("brsf", {"seed": 2**40 + 5, "step": 2**33 + 3}), ("frsf", {"stored": True}), ("kp", {}),
         ("wm", {"seed": 9, "step": 4}), ("sa", {}), ("aa", {}), ("ia", {}),
         ("usf", {"scale": "rms"})]  # s from W: a device scalar the kernel reads


def _options(rule, options):
    chosen = {key: value for key, value in ALIGNMENT.items() if key in spec_options.OPTIONS[rule]}
    chosen.update({key: value for key, value in options.items() if key != "stored"})
    return chosen


def expected_feedback_grad(rule, x, w, b_fb, grad_w, alignment, noise):
    """learning-rules.md's gradient of B (linear), in fp64; x is [rows, in]."""
    alpha, beta, gamma = alignment[:3]
    n = max(x.shape[0], 1)
    r = x @ w.t()
    if rule == "kp":
        return grad_w + alpha * 2 * b_fb
    if rule == "sa":
        return alpha * 2 * b_fb - beta * w
    if rule == "wm":
        return alpha * 2 * b_fb - beta / n * (noise @ w.t()).t() @ noise
    if rule == "aa":
        return alpha * (2 / n) * (x @ b_fb.t()).t() @ x - beta / n * r.t() @ x
    return -alpha / n * r.t() @ x + beta * (2 / n) * r.t() @ (r @ b_fb) + gamma * 2 * b_fb  # ia


def _run(backend, x, w, b, feedback, rule, options, activation, grad_output):
    """Forward and every gradient through fastfa.functional.linear on one backend."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    estimated = rule in oracle.ESTIMATED
    feedback = feedback.detach().requires_grad_(estimated) if feedback is not None else None
    y = fastfa.functional.linear(x, w, b, rule=rule, feedback=feedback, activation=activation, backend=backend,
                                 **options)
    leaves = [t for t in (x, w, b, feedback if estimated else None) if t is not None]
    return (y, *torch.autograd.grad(y, leaves, grad_output))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{r}-{'-'.join(o)}" for r, o in CASES])
def test_linear_matches_oracle_and_aten(index, dtype):
    rule, given = CASES[index]
    activation = ACTIVATIONS[index % len(ACTIVATIONS)]
    bias = index % 2 == 0
    out_features, in_features = 21, 37
    x = torch.randn(3, 11, 2 * in_features, dtype=dtype)[..., ::2]  # strided rows and columns
    w = torch.randn(in_features, out_features, dtype=dtype).t()  # a transposed (non-contiguous) weight
    w[0, :3] = 0  # sign(0) = 0
    b = torch.randn(out_features, dtype=dtype) if bias else None
    stored = given.get("stored") or rule in oracle.ESTIMATED
    feedback = torch.randn(out_features, in_features, dtype=dtype) * 0.5 if stored else None
    options = _options(rule, given)
    resolved = spec_options.resolve(rule, tuple(w.shape), **options)  # the spec's reading, not fastfa's
    grad_output = torch.randn(3, 11, out_features, dtype=dtype)
    preactivation = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    grad_output = away_from_relu_kink(grad_output, preactivation, activation)

    triton_results = _run("triton", x, w, b, feedback, rule, options, activation, grad_output)
    aten_results = _run("aten", x, w, b, feedback, rule, options, activation, grad_output)
    names = ["output", "grad_input", "grad_weight", "grad_bias", "grad_feedback"]
    names = [n for n in names if n != "grad_bias" or bias][:len(triton_results)]
    for name, t, a in zip(names, triton_results, aten_results):
        assert_close(t, a, dtype, f"{rule} {activation} {name} vs aten")

    # The oracle, in fp64 on the CPU from the same (rounded) inputs and the same rounded B.
    x, w, b, feedback, grad_output = (t.cpu() if t is not None else None for t in (x, w, b, feedback, grad_output))
    triton_results = [t.cpu() for t in triton_results]
    big_b = resolved.feedback_matrix(w, feedback=feedback)
    y, gx, gw, gb = oracle.linear(x.to(F64), w.to(F64), b.to(F64) if bias else None, big_b.to(F64),
                                  grad_output.to(F64), activation)
    expected = [y, gx, gw] + ([gb] if bias else [])
    if rule in oracle.ESTIMATED:
        x2 = x.reshape(-1, in_features).to(F64)
        noise = None
        if rule == "wm":
            noise = oracle.draw(resolved.seed, resolved.step, tuple(x2.shape), "normal", resolved.alignment[3],
                                dtype).to(dtype).to(F64)
        expected.append(expected_feedback_grad(rule, x2, w.to(F64), feedback.to(F64), gw, resolved.alignment, noise))
    for name, t, e in zip(names, triton_results, expected):
        assert_close(t, e.to(dtype), dtype, f"{rule} {activation} {name} vs oracle")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need the compiled kernels on a GPU")
@pytest.mark.parametrize("rows", [16, 8192])
@pytest.mark.parametrize("rule", sorted({rule for rule, _ in CASES}))
def test_real_sizes_on_gpu(rule, rows):
    """4096 x 4096 in bf16 at batch 16 (B made inside the GEMM) and 8192 (drawn B made once):
    the triton backend against the aten backend on fresh inputs."""
    x = torch.randn(rows, 4096, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16) / 64
    b = torch.randn(4096, dtype=torch.bfloat16)
    feedback = torch.randn(4096, 4096, dtype=torch.bfloat16) / 64 if rule in ("frsf", *oracle.ESTIMATED) else None
    options = _options(rule, dict(CASES)[rule])
    grad_output = torch.randn(rows, 4096, dtype=torch.bfloat16)
    for name, t, a in zip(("output", "grad_input", "grad_weight", "grad_bias", "grad_feedback"),
                          _run("triton", x, w, b, feedback, rule, options, "gelu", grad_output),
                          _run("aten", x, w, b, feedback, rule, options, "gelu", grad_output)):
        assert_close(t, a, torch.bfloat16, f"{rule} {rows} {name}")


@pytest.mark.parametrize("rule", ["bp", "usf", "brsf", "ia"])
def test_linear_fp16(rule):
    given = dict(CASES)[rule]
    x, w = torch.randn(2, 19, 24, dtype=torch.float16), torch.randn(13, 24, dtype=torch.float16)
    b = torch.randn(13, dtype=torch.float16)
    feedback = torch.randn(13, 24, dtype=torch.float16) if rule in oracle.ESTIMATED else None
    options = _options(rule, given)
    grad_output = torch.randn(2, 19, 13, dtype=torch.float16)
    for t, a in zip(_run("triton", x, w, b, feedback, rule, options, "gelu", grad_output),
                    _run("aten", x, w, b, feedback, rule, options, "gelu", grad_output)):
        assert_close(t, a, torch.float16, rule)


GRAD_INPUT_PATHS = [("brsf", 0, 35, "fused"), ("brsf", 0, 36, "fused"), ("brsf", 0, 36, "materialised"),
                    ("brsf", 0, 35, "materialised"), ("fa", 0, 35, "fused"), ("fa", 1, 35, "fused"),
                    ("fa", 1, 36, "fused"), ("fa", 1, 36, "materialised"), ("usf", 0, 35, "fused"),
                    ("frsf", 0, 36, "fused")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule,distribution,in_features,path", GRAD_INPUT_PATHS)
def test_grad_input_uses_the_aten_feedback_element_for_element(rule, distribution, in_features, path, dtype,
                                                               monkeypatch):
    """With delta = I (out x out), grad_input = I B = B exactly: the B the fused kernel made
    tile by tile is the aten transform's B (uniform draws bitwise, normal to a few ulps); with
    in_features % 4 == 0 one Philox call serves four elements; at large batch a drawn B is
    made once and read back (the "materialised" path, forced here through the cost model)."""
    out_features = 23
    w = torch.randn(out_features, in_features, dtype=dtype)
    w[1, :4] = 0
    feedback = torch.randn(out_features, in_features, dtype=dtype) if rule == "frsf" else None
    rng = torch.tensor([2**41 + 7, 2**32 + 9])
    rule_id, scale = int(Rule[rule.upper()]), 0.21
    identity = torch.eye(out_features, dtype=dtype)
    args = (identity, torch.randn(out_features, in_features, dtype=dtype), w, feedback, rng, torch.empty(0),
            torch.empty(0), rule_id, scale, distribution, [0.0, 0.0, 0.0, 1.0], "none", [True, False, False, False])
    with forced_triton_draw(path, linear, monkeypatch) as made:
        grad_input = torch.ops.fastfa.triton_linear_backward(*args)[0]
    assert made == ([(out_features, in_features)] if path == "materialised" else []), path
    expected = torch.ops.fastfa.feedback_transform(w, feedback, rng, rule_id, scale, distribution)
    if distribution == Distribution.NORMAL:
        torch.testing.assert_close(grad_input, expected, atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 8e-3)
    else:
        assert torch.equal(grad_input, expected)


@pytest.mark.parametrize("rule", ["brsf", "wm"])
def test_step_counters_advance_as_on_aten(rule):
    """A layer's [seed, step] moves on once per forward with grad on either backend, and two
    training steps give the same gradients (the draws follow the counter)."""
    torch.manual_seed(0)
    layers = {name: fastfa.nn.Linear(19, 13, rule=rule, seed=5) for name in ("aten", "triton")}
    layers["triton"].load_state_dict(layers["aten"].state_dict())
    batches = [torch.randn(7, 19) for _ in range(2)]
    for x in batches:
        grads = {}
        for name, layer in layers.items():
            layer.zero_grad()
            with fastfa.use_backend(name):
                layer(x).square().sum().backward()
            grads[name] = [p.grad for p in layer.parameters()]
        for t, a in zip(grads["triton"], grads["aten"]):
            assert_close(t, a, torch.float32, rule)
        assert torch.equal(layers["triton"].feedback_rng, layers["aten"].feedback_rng)
    assert int(layers["triton"].feedback_rng[1]) == 2


def test_zero_rows_and_no_gradient_requests():
    w, b = torch.randn(5, 7), torch.randn(5)
    out = torch.ops.fastfa.triton_linear(torch.empty(0, 7), w, b, None, None, 2, 0.5, 0, [0.0] * 3 + [1.0], "relu")
    assert out[0].shape == (0, 5)
    grads = torch.ops.fastfa.triton_linear_backward(torch.empty(0, 5), torch.empty(0, 7), w, None, None,
                                                    torch.empty(0, 5), torch.empty(0), 2, 0.5, 0, [0.0] * 3 + [1.0],
                                                    "relu", [True, True, True, False])
    assert grads[0].shape == (0, 7)
    assert torch.equal(grads[1], torch.zeros(5, 7)) and torch.equal(grads[2], torch.zeros(5))
    # Only grad_bias asked: no GEMM runs (one tile column), the sums of every tile row still come out.
    g = torch.randn(9, 70)
    only_bias = torch.ops.fastfa.triton_linear_backward(g, torch.randn(9, 40), torch.randn(70, 40), None, None,
                                                        torch.empty(0), torch.empty(0), 0, 1.0, 0, [0.0] * 3 + [1.0],
                                                        "none", [False, False, True, False])
    assert only_bias[0].numel() == 0 and only_bias[1].numel() == 0
    assert_close(only_bias[2], g.sum(0), torch.float32, "grad_bias")
    g = g[:, :5]
    # No input features: the output is act(bias), grad_weight is empty, grad_bias still sums delta.
    empty_w = torch.empty(5, 0)
    args = (torch.empty(4, 0), empty_w, b, None, None, 0, 1.0, 0, [0.0] * 3 + [1.0], "tanh")
    for t, a in zip(torch.ops.fastfa.triton_linear(*args), torch.ops.fastfa.linear(*args)):
        assert_close(t, a, torch.float32, "in_features=0 forward")
    y = torch.ops.fastfa.linear(*args)[0]
    backward_args = (g[:4], torch.empty(4, 0), empty_w, None, None, y, torch.empty(0), 0, 1.0, 0,
                     [0.0] * 3 + [1.0], "tanh", [True, True, True, False])
    for t, a in zip(torch.ops.fastfa.triton_linear_backward(*backward_args),
                    torch.ops.fastfa.linear_backward(*backward_args)):
        assert_close(t, a, torch.float32, "in_features=0 backward")


def test_fp64_falls_back_to_aten_visibly():
    fastfa.clear_fallbacks()
    x, w = torch.randn(4, 6, dtype=F64, requires_grad=True), torch.randn(3, 6, dtype=F64, requires_grad=True)
    y = fastfa.functional.linear(x, w, rule="usf", backend="triton")
    y.sum().backward()
    expected = fastfa.functional.linear(x, w, rule="usf", backend="aten")
    assert torch.equal(y, expected)
    records = fastfa.last_fallbacks()
    assert [(r.op, r.backend) for r in records] == [("triton_linear", "aten"), ("triton_linear_backward", "aten")]
    assert all("fp64" in r.reason and r.count == 1 for r in records)
    assert "fell back to aten" in fastfa.backends()["triton"].reason
    fastfa.clear_fallbacks()
    assert fastfa.last_fallbacks() == []


def test_a_backend_without_an_op_falls_back_visibly():
    fastfa.clear_fallbacks()
    table = {"aten": lambda: torch.ops.fastfa.linear}
    assert fastfa.ops._op_for(table, "linear", "triton") is torch.ops.fastfa.linear
    assert fastfa.last_fallbacks() == [fastfa.Fallback("linear", "aten", "the triton backend has no linear op in this "
                                                       "version", 1)]
    fastfa.clear_fallbacks()


def test_backend_status_and_selection():
    status = fastfa.backends()["triton"]
    assert status.usable
    with fastfa.use_backend("triton"):
        assert fastfa.get_backend() == "triton"
        assert fastfa.ops.linear_op(fastfa._backend.resolve(None, torch.device(DEVICE))) is torch.ops.fastfa.triton_linear
    # "auto": aten on the CPU; on a GPU the cuda backend where usable (README, "auto" on a GPU), never triton.
    on_gpu = "cuda" if DEVICE == "cuda" and fastfa.backends()["cuda"].usable else "aten"
    assert fastfa._backend.resolve(None, torch.device(DEVICE)) == on_gpu


def test_bad_arguments_are_refused_as_by_aten():
    w = torch.randn(5, 7)
    good = dict(input=torch.randn(3, 7), weight=w, bias=None, feedback=None, rng=None, rule=2, scale=1.0,
                distribution=0, alignment=[0.0, 0.0, 0.0, 1.0], activation="none")
    for change, message in [(dict(input=torch.randn(3, 6)), "input's last dimension must be in_features=7"),
                            (dict(activation="swish"), "activation must be one of"),
                            (dict(rule=3), "needs rng"),
                            (dict(rule=4), "needs the stored feedback"),
                            (dict(bias=torch.randn(4)), r"bias must have shape \[5\]"),
                            (dict(alignment=[0.0]), "alignment must be")]:
        arguments = {**good, **change}
        for op in (torch.ops.fastfa.linear, torch.ops.fastfa.triton_linear):
            with pytest.raises(RuntimeError, match=message):
                op(*arguments.values())


def test_opcheck():
    x, w, b = torch.randn(6, 9), torch.randn(5, 9), torch.randn(5)
    feedback = torch.randn(5, 9)
    args = (x, w, b, feedback, None, int(Rule.IA), 1.0, 0, [0.3, 0.7, 0.2, 1.0], "silu")
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastfa.triton_linear.default, args, test_utils=utils)
    _, saved, projection = torch.ops.fastfa.triton_linear(*args)
    backward_args = (torch.randn(6, 5), x, w, feedback, None, saved, projection, int(Rule.IA), 1.0, 0,
                     [0.3, 0.7, 0.2, 1.0], "silu", [True, True, True, True])
    torch.library.opcheck(torch.ops.fastfa.triton_linear_backward.default, backward_args, test_utils=utils)
    rng = torch.tensor([3, 8])  # brsf draws from [seed, step] inside the kernel
    backward_args = (torch.randn(6, 5), x, w, None, rng, torch.empty(0), torch.empty(0), int(Rule.BRSF), 0.4, 0,
                     [0.0, 0.0, 0.0, 1.0], "none", [True, True, False, False])
    torch.library.opcheck(torch.ops.fastfa.triton_linear_backward.default, backward_args, test_utils=utils)


SM90_SCRIPT = textwrap.dedent(r"""
    import re
    import fastfa.triton_kernels.linear as L
    from triton_sm90 import SpillRecord, autotuned_config, compile_for_sm90

    record = SpillRecord()
    TILE = autotuned_config(L._grad_input_kernel, 64, 128)  # compiled as the autotuner compiles it on a GPU

    # bp; brsf drawn in the kernel four elements per Philox call, and one per element; frsf, kp stored.
    for rule, by_four in ((0, False), (3, True), (3, False), (4, False), (5, False)):
        kernel = compile_for_sm90(L._grad_input_kernel, "bf16",
                                  dict(RULE=rule, HAS_FEEDBACK=rule in (4, 5), DISTRIBUTION=0, SCALE_FROM_WEIGHT=False, DRAWS=rule == 3,
                                       DRAWS_BY_FOUR=by_four, TENSOR_DESCRIPTORS=False, INPUT_PRECISION="ieee"),
                                  floats=("scale",), config=TILE)
        mma = re.findall(r"wgmma\.mma_async[^;]*;", kernel.asm["ptx"])
        # The register form lists A's registers after the accumulator's: "{d...}, {a...}, descB".
        assert mma and all(re.search(r"\}\s*,\s*\{", m) for m in mma), (rule, mma[:1])
        record.add(f"grad_input, rule {rule}{' by four' if by_four else ''}", kernel)
    kernel = compile_for_sm90(L._forward_kernel, "fp32", dict(HAS_BIAS=True, ACTIVATION="gelu_tanh",
                              SAVES_PREACTIVATION=True, SAVES_PROJECTION=True, INPUT_PRECISION="tf32"), config=TILE)
    assert "wgmma.mma_async" in kernel.asm["ptx"] and ".tf32" in kernel.asm["ptx"]
    record.add("forward", kernel)
    kernel = compile_for_sm90(L._grad_weight_kernel, "bf16", dict(STORES_GRAD_WEIGHT=True,
                              STORES_GRAD_BIAS=True, STORES_GRAD_FEEDBACK=True, HAS_ADDEND=True,
                              INPUT_PRECISION="ieee"), floats=("outer_scale", "addend_scale"), config=TILE)
    assert "wgmma.mma_async" in kernel.asm["ptx"]
    record.add("grad_weight", kernel)
    # Compiled only: their local memory is the sin / cos range reduction's table of the normal
    # draw (a local array, not a spill), which LDL / STL cannot tell apart.
    compile_for_sm90(L._draw_kernel, "bf16", dict(DISTRIBUTION=1, BLOCK=256), floats=("scale",))
    compile_for_sm90(L._materialise_kernel, "bf16", dict(RULE=1, HAS_FEEDBACK=False, DISTRIBUTION=1, DRAWS=True,
                     DRAWS_BY_FOUR=True, BLOCK_IN=64, BLOCK_OUT=32), floats=("scale",))
    record.print()
""")
# What SM90_SCRIPT compiles and reads for spills.
SM90_GEMMS = 7


@pytest.fixture(scope="module")
def sm90_spills():
    return triton_sm90.compile_and_read_spills(SM90_SCRIPT)


def test_sm90_grad_input_keeps_the_transformed_tile_in_registers_for_wgmma(sm90_spills):
    """Compiled for Hopper (no GPU needed), the bf16 grad_input GEMM is wgmma with the transformed
    B^T tile as its register operand (issue 3); every kernel compiles for sm_90 outside the interpreter."""
    assert len(sm90_spills) == SM90_GEMMS, sorted(sm90_spills)


# Measured with triton 3.8 (ptxas 12.9) at the autotuner's 64x128x64 tile (4 warps, 4 stages):
# every GEMM here reaches 255 registers per thread and spills (LDL + STL: grad_input 228-2217 by
# rule, forward 51, grad_weight 355). The PTX check that stood here could not see it (issue 19).
@pytest.mark.xfail(raises=triton_sm90.Spilled, strict=triton.__version__.startswith("3.8."),
                   reason="the sm_90 GEMM kernels spill registers (measured with triton 3.8)")
def test_sm90_gemm_kernels_keep_their_registers(sm90_spills):
    """No sm_90 GEMM spills registers to local memory (LDL / STL in the cubin's SASS)."""
    triton_sm90.assert_no_spills(sm90_spills)
