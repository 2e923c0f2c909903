"""triton_kernels/feedback.py: the rule transform as Triton functions, against the aten transform and the oracle.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it without a GPU).
"""

import pytest
import torch

import oracle
from fastfa.rules import Distribution, Rule

triton = pytest.importorskip("triton")
tl = triton.language
from fastfa.triton_kernels import feedback  # a broken module fails here, never skips

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors under the interpreter
BLOCK_OUT, BLOCK_IN = 16, 32
# Normal draws agree to a few fp32 ulps; rounded to bf16 that can be one bf16 ulp.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


@triton.jit
def _materialise_kernel(weight_ptr, feedback_ptr, rng_ptr, out_ptr, out_features, in_features, stride_w_out,
                        stride_w_in, stride_f_out, stride_f_in, scale, RULE: tl.constexpr, HAS_FEEDBACK: tl.constexpr,
                        DISTRIBUTION: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)).to(tl.int64)
    mask = (rows[:, None] < out_features) & (cols[None, :] < in_features)
    index = rows[:, None] * in_features + cols[None, :]
    seed, step = feedback.load_draw_state(rng_ptr, RULE, HAS_FEEDBACK)
    b = feedback.load_feedback_tile(weight_ptr + rows[:, None] * stride_w_out + cols[None, :] * stride_w_in,
                                    feedback_ptr + rows[:, None] * stride_f_out + cols[None, :] * stride_f_in,
                                    mask, index, seed, step, scale, RULE, HAS_FEEDBACK, DISTRIBUTION)
    tl.store(out_ptr + index, feedback.round_to(b, out_ptr.dtype.element_ty), mask=mask)


def _materialise(weight, stored, rng, rule, scale, distribution):
    out = torch.full(weight.shape, float("nan"), dtype=weight.dtype, device=weight.device)  # poisoned: an unwritten element shows
    grid = (triton.cdiv(weight.shape[0], BLOCK_OUT), triton.cdiv(weight.shape[1], BLOCK_IN))
    f = stored if stored is not None else weight
    _materialise_kernel[grid](weight, f, rng, out, weight.shape[0], weight.shape[1], *weight.stride(),
                              *f.stride(), scale, RULE=rule, HAS_FEEDBACK=stored is not None,
                              DISTRIBUTION=distribution, BLOCK_OUT=BLOCK_OUT, BLOCK_IN=BLOCK_IN)
    return out


CASES = [("bp", False), ("fa", True), ("fa", False), ("usf", False), ("brsf", False), ("frsf", False), ("kp", True),
         ("ia", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distribution", [Distribution.UNIFORM, Distribution.NORMAL])
@pytest.mark.parametrize("rule,stored", CASES)
def test_transform_tile_equals_aten_transform(rule, stored, distribution, dtype):
    """B from load_feedback_tile equals fastfa's C++ transform (uniform draws bitwise) on a ragged,
    transposed (non-contiguous) W with zeros in it (sign(0) = 0)."""
    weight = torch.randn(41, 37, dtype=dtype, device=DEVICE).t()  # 37 x 41, column-major
    weight[3, :5] = 0
    needs_stored = stored or rule == "frsf"
    r = torch.randn(37, 41, dtype=dtype, device=DEVICE) if needs_stored else None
    rng = torch.tensor([2**40 + 321, 2**33 + 17], device=DEVICE)
    rule_id, scale = int(Rule[rule.upper()]), 0.37
    actual = _materialise(weight, r, rng, rule_id, scale, int(distribution))
    expected = torch.ops.fastfa.feedback_transform(weight, r, rng, rule_id, scale, int(distribution))
    if distribution == Distribution.NORMAL and feedback.draws(rule_id, r is not None):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=RTOL[dtype])
    else:
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    # and the oracle's B, written from the spec (not only fastfa's transform), for every rule
    name = "uniform" if distribution == Distribution.UNIFORM else "normal"
    b = oracle.feedback_matrix(rule, weight.cpu(), feedback=None if r is None else r.cpu(), seed=int(rng[0]),
                               step=int(rng[1]), scale=scale, distribution=name)
    torch.testing.assert_close(actual.cpu(), b, atol=1e-6, rtol=RTOL[dtype])
