"""The feedback rules as Triton functions: B = T(W) for one tile, applied as the tile is loaded.

The same table as csrc/include/fastfa/feedback.h (``feedback_transform``) and
python/fastfa/rules.py, so a fused kernel never materialises B:

    bp    B = W                       fa    B = R (stored), or scale * xi drawn from (seed, step, index)
    usf   B = scale * sign(W)         brsf  B = scale * |xi| * sign(W), xi drawn afresh every step
    frsf  B = |R| * sign(W)           kp, wm, sa, aa, ia   B = the stored, learned tensor

sign(0) = 0 and NaN stays NaN. The math runs in fp32 (the kernels' op-math type; fp64
falls back to the aten backend), and the caller rounds B to the GEMM's operand dtype,
so a bf16 B is rounded once, as the aten backend's transform kernel rounds it.

The draw xi is Philox-4x32-10 exactly as feedback.h defines it: key = seed, counter =
(block lo, block hi, step lo, step hi) with block = index // 4, and element ``index``
(its row-major index in W's logical shape, whatever W's memory layout) takes word
index % 4 of its block. Uniform: 2u - 1 with u = unit_uniform(word). Normal:
Box-Muller on the word pairs (0, 1) and (2, 3), cos for the even element, sin for the
odd. The uniform draw equals the C++ one bit for bit; the normal one to a few ulps
(log / sin / cos come from different math libraries).

Public @triton.jit functions (every argument after the tensors is a scalar or constexpr):

    load_scale(scale, SCALE_FROM_WEIGHT) -> the transform's scale: tl.load(scale) where the
        launcher passed usf's "rms" scale as a device tensor (scale_argument), else scale.
    load_draw_state(rng_ptr, RULE, HAS_FEEDBACK) -> (seed, step)
        Loads [seed, step] from the int64 rng tensor where the rule draws (brsf; fa
        without stored R), else returns (0, 0); call once per program, outside the K loop.
    unit_draw(seed, step, index, DISTRIBUTION) -> fp32 tile of xi, shaped like ``index``
        index: int64 tile of logical element indices.
    feedback_transform(w, stored, xi, scale, RULE) -> fp32 tile of B
        The formula alone, on already-loaded fp32 tiles (unused operands may be 0.0).
    load_feedback_tile(weight_ptrs, feedback_ptrs, mask, index, seed, step, scale,
                       RULE, HAS_FEEDBACK, DISTRIBUTION) -> fp32 tile of B, 0 where ~mask
        Loads only what the rule reads (W, the stored tensor, or neither) and applies
        the transform. weight_ptrs / feedback_ptrs: pointer tiles into W and the stored
        tensor (their own strides; feedback_ptrs is not read where the rule reads no
        stored tensor, so pass W's pointer there then); mask: the in-bounds tile; index:
        the logical row-major indices (int64) of the same elements, used by the draw.

    round_to(x, DTYPE) -> x (fp32) rounded to nearest even in DTYPE
        Use it (not x.to(DTYPE)) for every fp32 -> bf16 rounding: Triton's interpreter
        truncates there, which would make CPU tests disagree with the GPU and with aten.
    dot(a, b, acc, INPUT_PRECISION) -> acc + a @ b
        tl.dot, except under the interpreter, whose bf16 dot multiplies the raw bits:
        there the (exactly representable) operands go through fp32 first.

    unit_draw_quads(seed, step, block, DISTRIBUTION) -> fp32 [4R, C] tile of xi
        block: an [R, C] int64 tile of Philox block ids (element index // 4); row 4j + l of
        the result is element 4 * block[j, c] + l. One Philox call per four elements
        (unit_draw makes one per element): for tiles whose first axis runs along a row of W
        (in_features), with in_features % 4 == 0 and the tile starting at a multiple of 4.
    transform_tile(weight_ptrs, feedback_ptrs, mask, xi, scale, RULE, HAS_FEEDBACK) -> fp32 tile of B
        load_feedback_tile with the draw xi already made (0.0 where the rule draws nothing).
    transform_loaded(w, stored, xi, scale, RULE, HAS_FEEDBACK) -> fp32 tile of B
        The transform of tiles a kernel loaded itself (through tensor descriptors, say): w and
        stored fp32 tiles of W and the stored tensor (0.0 where the rule does not read them);
        makes fa's drawn R = scale * xi. No mask: out-of-bounds elements are the caller's.

Constexpr arguments: RULE is fastfa.rules.Rule's id (0..9), DISTRIBUTION 0 uniform /
1 normal, HAS_FEEDBACK whether a stored tensor was passed (fa: stored R versus drawn R).
Python helpers for launchers: ``reads_weight``, ``reads_feedback`` (which operands a rule
reads; constexpr functions, which the kernels call on their constexprs too), ``draws``,
``check_feedback_arguments`` (the C++ op's argument checks, raised before any launch).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# fastfa.rules.Rule ids, as constexpr globals so the jit functions can branch on them at compile time.
BP = tl.constexpr(0)
FA = tl.constexpr(1)
USF = tl.constexpr(2)
BRSF = tl.constexpr(3)
FRSF = tl.constexpr(4)
KP = tl.constexpr(5)  # the first estimated rule: kp, wm, sa, aa, ia all read their stored B
NUM_RULES = 10
#: Triton reads TRITON_INTERPRET when a kernel is defined; so does this module.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
UNIFORM = tl.constexpr(0)
NORMAL = tl.constexpr(1)


#: The op contract's ``scale`` for usf's "rms" (feedback.h's kRmsScale): s = ||W|| / sqrt(numel(W)).
RMS_SCALE = -1.0


def scale_argument(weight, rule: int, scale: float):
    """(scale, SCALE_FROM_WEIGHT) as the grad_input kernels take them: for usf's "rms", s as a
    one-element fp32 tensor on W's device, reduced from W before the GEMM (no host synchronisation,
    so a CUDA graph can capture it), which the kernel reads (load_scale); otherwise the float."""
    if rule == 2 and scale == RMS_SCALE:
        numel = max(weight.numel(), 1)
        return torch.linalg.vector_norm(weight, dtype=torch.float32).div_(math.sqrt(numel)).reshape(1), True
    return scale, False


def draws(rule: int, has_feedback: bool) -> bool:
    """The rule draws xi from (seed, step): brsf always, fa when no stored R is given."""
    return rule == 3 or (rule == 1 and not has_feedback)


# constexpr functions: the launchers call them on ints, the kernels on their RULE / HAS_FEEDBACK
# constexprs at compile time (triton.constexpr_function, Triton 3.6 and later), so which operands a
# rule reads is written once.
@triton.constexpr_function
def reads_weight(rule: int) -> bool:
    """B is made from W's values: bp, usf, brsf, frsf (fa's R and the estimated rules' B are not)."""
    return rule in (0, 2, 3, 4)


@triton.constexpr_function
def reads_feedback(rule: int, has_feedback: bool) -> bool:
    """B is made from the stored tensor: frsf's R, a stored fa R, the estimated rules' B."""
    return rule == 4 or rule >= 5 or (rule == 1 and has_feedback)


def check_feedback_arguments(weight, feedback, rng, rule: int, scale: float, distribution: int) -> None:
    """The checks of csrc/feedback_checks.cpp, with the same messages, before any kernel runs."""
    if not (isinstance(rule, int) and 0 <= rule < NUM_RULES):
        raise RuntimeError(f"fastfa: rule must be an id in [0, {NUM_RULES}) (see fastfa.rules), got {rule}")
    if distribution not in (0, 1):
        raise RuntimeError(f"fastfa: distribution must be 0 (uniform) or 1 (normal), got {distribution}")
    if not math.isfinite(scale):
        raise RuntimeError(f"fastfa: scale must be finite, got {scale}")
    if not weight.is_floating_point():
        raise RuntimeError(f"fastfa: weight must be a floating-point tensor, got {weight.dtype}")
    has_feedback = feedback is not None
    if rule == 4 or rule >= 5:
        if not has_feedback:
            raise RuntimeError(f"fastfa: rule {rule} needs the stored feedback tensor (R for frsf, B for the "
                               "estimated rules)")
    if has_feedback and reads_feedback(rule, True):
        if feedback.shape != weight.shape:
            raise RuntimeError(f"fastfa: feedback must have weight's shape {list(weight.shape)}, "
                               f"got {list(feedback.shape)}")
        if feedback.dtype != weight.dtype:
            raise RuntimeError(f"fastfa: feedback must have weight's dtype {weight.dtype}, got {feedback.dtype}")
        if feedback.device != weight.device:
            raise RuntimeError(f"fastfa: feedback must be on weight's device {weight.device}, got {feedback.device}")
    if draws(rule, has_feedback) or rule == 6:  # wm draws its noise
        if rng is None:
            raise RuntimeError("fastfa: this rule draws its feedback and needs rng = int64 tensor [seed, step]")
        if rng.dtype != torch.int64 or rng.dim() != 1 or rng.numel() != 2:
            raise RuntimeError(f"fastfa: rng must be an int64 tensor of shape [2] holding [seed, step], got "
                               f"{rng.dtype} of shape {list(rng.shape)}")
        if rng.device != weight.device:
            raise RuntimeError(f"fastfa: rng must be on weight's device {weight.device}, got {rng.device}")


@triton.jit
def unit_uniform(bits):
    """[0, 1) from 32 bits: the signed value folded to non-negative (~x for x < 0), times 2^-31
    rounded down (feedback.h's unit_uniform, Triton's uint_to_uniform_float)."""
    value = bits.to(tl.int32, bitcast=True)
    value = tl.where(value < 0, ~value, value)
    return value.to(tl.float32) * 4.6566127342e-10


@triton.jit
def unit_draw(seed, step, index, DISTRIBUTION: tl.constexpr):
    block = index >> 2
    lane = index & 3
    zero = tl.zeros_like(block).to(tl.uint32)
    x0, x1, x2, x3 = tl.philox(seed, (block & 0xFFFFFFFF).to(tl.uint32), (block >> 32).to(tl.uint32),
                               zero + (step & 0xFFFFFFFF).to(tl.uint32), zero + (step >> 32).to(tl.uint32))
    if DISTRIBUTION == UNIFORM:
        word = tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))
        xi = 2.0 * unit_uniform(word) - 1.0
    else:
        first_pair = lane < 2
        u1 = tl.maximum(unit_uniform(tl.where(first_pair, x0, x2)), 1.0e-7)
        u2 = unit_uniform(tl.where(first_pair, x1, x3))
        radius = tl.sqrt_rn(-2.0 * tl.log(u1))
        angle = 6.283185307179586 * u2
        xi = tl.where((lane & 1) == 1, radius * tl.sin(angle), radius * tl.cos(angle))
    return xi


@triton.jit
def sign_of(w):
    sign = tl.where(w > 0.0, 1.0, tl.where(w < 0.0, -1.0, 0.0))
    return tl.where(w != w, w, sign)


@triton.jit
def feedback_transform(w, stored, xi, scale, RULE: tl.constexpr):
    if RULE == BP:
        b = w
    elif RULE == FA:
        b = stored
    elif RULE == USF:
        b = scale * sign_of(w)
    elif RULE == BRSF:
        b = scale * tl.abs(xi) * sign_of(w)
    elif RULE == FRSF:
        b = tl.abs(stored) * sign_of(w)
    else:  # the estimated rules send the error back through their stored B
        b = stored
    return b


@triton.jit
def load_scale(scale, SCALE_FROM_WEIGHT: tl.constexpr):
    """The transform's scale: read from the device where scale_argument made it a tensor (usf's "rms")."""
    if SCALE_FROM_WEIGHT:
        value = tl.load(scale)
    else:
        value = scale
    return value


@triton.jit
def load_draw_state(rng_ptr, RULE: tl.constexpr, HAS_FEEDBACK: tl.constexpr):
    if RULE == BRSF or (RULE == FA and not HAS_FEEDBACK):
        seed = tl.load(rng_ptr)
        step = tl.load(rng_ptr + 1)
    else:
        seed = 0
        step = 0
    return seed, step


@triton.jit
def transform_loaded(w, stored, xi, scale, RULE: tl.constexpr, HAS_FEEDBACK: tl.constexpr):
    if RULE == FA and not HAS_FEEDBACK:  # fa regenerating R = scale * xi
        stored = scale * xi
    return feedback_transform(w, stored, xi, scale, RULE)


@triton.jit
def transform_tile(weight_ptrs, feedback_ptrs, mask, xi, scale, RULE: tl.constexpr, HAS_FEEDBACK: tl.constexpr):
    if reads_weight(RULE):
        w = tl.load(weight_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        w = 0.0
    if reads_feedback(RULE, HAS_FEEDBACK):
        stored = tl.load(feedback_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        stored = 0.0
    # Out-of-bounds elements must be 0 in the GEMM's padding, and a drawn R is not.
    return tl.where(mask, transform_loaded(w, stored, xi, scale, RULE, HAS_FEEDBACK), 0.0)


@triton.jit
def load_feedback_tile(weight_ptrs, feedback_ptrs, mask, index, seed, step, scale, RULE: tl.constexpr,
                       HAS_FEEDBACK: tl.constexpr, DISTRIBUTION: tl.constexpr):
    if RULE == BRSF or (RULE == FA and not HAS_FEEDBACK):
        xi = unit_draw(seed, step, index, DISTRIBUTION)
    else:
        xi = 0.0
    return transform_tile(weight_ptrs, feedback_ptrs, mask, xi, scale, RULE, HAS_FEEDBACK)


@triton.jit
def _interleave4(a0, a1, a2, a3):
    """Four [R, C] tiles -> one [4R, C] tile whose row 4j + l is a_l's row j."""
    pairs = tl.join(tl.join(a0, a1), tl.join(a2, a3))  # [R, C, p, q] holds a_(2q + p)
    return tl.reshape(tl.permute(pairs, (0, 3, 2, 1)), (4 * a0.shape[0], a0.shape[1]))


@triton.jit
def unit_draw_quads(seed, step, block, DISTRIBUTION: tl.constexpr):
    # One Philox call gives the draws of four consecutive elements: a quarter of unit_draw's work.
    zero = tl.zeros_like(block).to(tl.uint32)
    x0, x1, x2, x3 = tl.philox(seed, (block & 0xFFFFFFFF).to(tl.uint32), (block >> 32).to(tl.uint32),
                               zero + (step & 0xFFFFFFFF).to(tl.uint32), zero + (step >> 32).to(tl.uint32))
    if DISTRIBUTION == UNIFORM:
        xi = _interleave4(2.0 * unit_uniform(x0) - 1.0, 2.0 * unit_uniform(x1) - 1.0, 2.0 * unit_uniform(x2) - 1.0,
                          2.0 * unit_uniform(x3) - 1.0)
    else:
        radius01 = tl.sqrt_rn(-2.0 * tl.log(tl.maximum(unit_uniform(x0), 1.0e-7)))
        angle01 = 6.283185307179586 * unit_uniform(x1)
        radius23 = tl.sqrt_rn(-2.0 * tl.log(tl.maximum(unit_uniform(x2), 1.0e-7)))
        angle23 = 6.283185307179586 * unit_uniform(x3)
        xi = _interleave4(radius01 * tl.cos(angle01), radius01 * tl.sin(angle01), radius23 * tl.cos(angle23),
                          radius23 * tl.sin(angle23))
    return xi


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    if INTERPRETED and DTYPE == tl.bfloat16:
        # Round to nearest even on the fp32 bits (what the GPU's cvt.rn.bf16 does); NaN stays NaN.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    if INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
