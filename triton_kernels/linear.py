"""Linear on Triton: fastfa::triton_linear and fastfa::triton_linear_backward.

The same arguments and results as the aten ops fastfa::linear / linear_backward
(python/fastfa/ops.py), with the rule fused into the GEMMs instead of a separate pass
that writes B. torch infers each op's schema from the op function's annotations (torch
2.11's triton_op ignores schema=), so it reads SymInt where the aten op's reads int, and
bool[] where it reads bool[4]; the same values pass (tests/test_triton_schema.py).

    forward         output = act(x W^T + b): one GEMM, bias and activation in its epilogue;
                    also activation_saved (the pre-activation, for gelu / silu) and
                    projection r = x W^T without bias (aa, ia), written from the same tile.
    delta           act'(grad_output), made once by an elementwise kernel where there is an
                    activation (activation_delta), so that both GEMMs below read it as it is.
    grad_input      delta B, with B = T(W) made tile by tile as W (or the stored R / B) loads
                    (triton_kernels/feedback.py), so B never exists in memory. It is computed
                    as grad_input^T = B^T delta^T: the transformed tile is the left operand,
                    which Hopper's wgmma can read from registers (issue 3). On sm_90 and newer
                    its operands load raw through tensor descriptors (TMA), pipelined, where
                    their layouts allow (_tensor_descriptors); pointer loads otherwise.
    grad_weight     delta^T x, with grad_bias (the column sums of delta) from the same tiles,
                    and kp's B gradient grad_W + 2 alpha B written from the same accumulator.
    B's gradient    for wm, aa, ia: the spec's primitives (learning-rules.md) from the same
                    three kernels (project = the forward GEMM, back = the grad_input GEMM,
                    outer = the grad_weight GEMM); sa is elementwise.

Operands are rounded to the input dtype before each GEMM and accumulated in fp32, as the
aten backend's GEMMs do. fp32 GEMMs use TF32 only where torch allows it
(torch.get_float32_matmul_precision() != "highest"). fp64 and tensors the Triton runtime
cannot reach fall back to the aten ops, recorded (fastfa.last_fallbacks()).

Block sizes are autotuned per GPU; every kernel is keyed by the layer's
(rows rounded up to a power of two, out_features, in_features), so a layer's forward and
backward tune once per shape, and a ragged last batch does not re-tune; grad_input also by
how it loads its operands (tensor descriptors or pointers, FASTFA_TRITON_TMA).
FASTFA_TRITON_AUTOTUNE=0, set before the first use of the triton backend, gives every GEMM
kernel one configuration instead (benchmarks/gpu_check.sh's correctness stage).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .. import _backend
from .. import ops as _ops
from . import feedback as fb
from . import cdiv, define_op, input_precision, launch, set_scratch_allocator, tma_ready, unsupported_reason

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
# The derivative of relu, tanh and sigmoid reads the output; of gelu and silu the pre-activation.
PREACTIVATION_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
_FA, _KP, _WM, _SA, _AA, _IA = 1, 5, 6, 7, 8, 9


def gemm_configs():
    if fb.INTERPRETED.value:  # one small configuration: the interpreter is slow and times nothing
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=1,
                              num_stages=1)]
    autotune = os.environ.get("FASTFA_TRITON_AUTOTUNE", "1")
    if autotune not in ("0", "1"):
        raise ValueError(f"FASTFA_TRITON_AUTOTUNE must be 1 (autotune over every configuration, the default) "
                         f"or 0 (one configuration), got {autotune!r}")
    if autotune == "0":
        # Each specialisation compiles every configuration on first use, so a correctness run over
        # many rules and dtypes spends most of its time compiling; one configuration (the one the
        # sm_90 compile checks in tests/test_triton_*.py verify: wgmma, no spills) compiles once.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                              num_stages=3)]
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (16, 64, 256, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


_KEY = ["rows_bucket", "out_features", "in_features"]


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M tile rows at a time, so that the programs
    running together share their operand tiles in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _tanh(z):
    # tanh from one exp of a non-positive argument: no overflow, and no libdevice (which the
    # interpreter lacks).
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def _gelu_tanh_inner(z):
    return 0.7978845608028654 * (z + 0.044715 * z * z * z)  # sqrt(2 / pi) (z + 0.044715 z^3)


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        y = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu
    elif ACTIVATION == "gelu":
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        y = 0.5 * z * (1.0 + _tanh(_gelu_tanh_inner(z)))
    elif ACTIVATION == "silu":
        y = z * tl.sigmoid(z)
    elif ACTIVATION == "tanh":
        y = _tanh(z)
    elif ACTIVATION == "sigmoid":
        y = tl.sigmoid(z)
    else:
        y = z
    return y


@triton.jit
def load_delta(grad_output_ptrs, saved_ptrs, mask, ACTIVATION: tl.constexpr):
    """delta = dL/dz from dL/dy, in fp32; ``saved`` is y (relu, tanh, sigmoid) or z (gelu, silu)."""
    grad = tl.load(grad_output_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "none":
        delta = grad
    else:
        saved = tl.load(saved_ptrs, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION == "relu":
            delta = tl.where(saved > 0.0, grad, 0.0)
        elif ACTIVATION == "tanh":
            delta = grad * (1.0 - saved * saved)
        elif ACTIVATION == "sigmoid":
            delta = grad * saved * (1.0 - saved)
        elif ACTIVATION == "gelu":
            cdf = 0.5 * (1.0 + tl.erf(saved * 0.7071067811865476))
            pdf = tl.exp(-0.5 * saved * saved) * 0.3989422804014327  # 1 / sqrt(2 pi)
            delta = grad * (cdf + saved * pdf)
        elif ACTIVATION == "gelu_tanh":
            t = _tanh(_gelu_tanh_inner(saved))
            inner_derivative = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * saved * saved)
            delta = grad * (0.5 * (1.0 + t) + 0.5 * saved * (1.0 - t * t) * inner_derivative)
        else:  # silu
            s = tl.sigmoid(saved)
            delta = grad * s * (1.0 + saved * (1.0 - s))
    return delta


@triton.autotune(configs=gemm_configs(), key=_KEY)
@triton.jit
def _forward_kernel(input_ptr, weight_ptr, bias_ptr, output_ptr, saved_ptr, projection_ptr, rows, out_features,
                    in_features, rows_bucket, stride_input_row, stride_input_col, stride_weight_out,
                    stride_weight_in, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                    SAVES_PREACTIVATION: tl.constexpr, SAVES_PROJECTION: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """output[rows, out] = act(input[rows, in] W[out, in]^T + bias)."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.cdiv(out_features, BLOCK_N), GROUP_M)
    row = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    out = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        k = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(input_ptr + row[:, None] * stride_input_row + k[None, :] * stride_input_col,
                    mask=(row[:, None] < rows) & (k[None, :] < in_features), other=0.0)
        w = tl.load(weight_ptr + k[:, None] * stride_weight_in + out[None, :] * stride_weight_out,
                    mask=(k[:, None] < in_features) & (out[None, :] < out_features), other=0.0)
        acc = fb.dot(x, w, acc, INPUT_PRECISION)
    dtype = output_ptr.dtype.element_ty
    mask = (row[:, None] < rows) & (out[None, :] < out_features)
    offsets = row[:, None] * out_features + out[None, :]
    if SAVES_PROJECTION:
        tl.store(projection_ptr + offsets, fb.round_to(acc, dtype), mask=mask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out, mask=out < out_features, other=0.0).to(tl.float32)[None, :]
    if SAVES_PREACTIVATION:
        tl.store(saved_ptr + offsets, fb.round_to(acc, dtype), mask=mask)
    tl.store(output_ptr + offsets, fb.round_to(apply_activation(acc, ACTIVATION), dtype), mask=mask)


@triton.jit
def _feedback_tile_t(weight_ptr, feedback_ptr, weight_tiles, feedback_tiles, first_col, col, start, out, in_features,
                     out_features, stride_weight_out, stride_weight_in, stride_feedback_out, stride_feedback_in, seed,
                     step, scale, RULE: tl.constexpr, HAS_FEEDBACK: tl.constexpr, DISTRIBUTION: tl.constexpr,
                     DRAWS: tl.constexpr, DRAWS_BY_FOUR: tl.constexpr, TENSOR_DESCRIPTORS: tl.constexpr):
    """B^T[col, out] as fp32 (B = T(W)): col = first_col + arange, a tile of in_features; out = start + arange,
    one of out_features. W and the stored tensor load through weight_ptr / feedback_ptr, or with
    TENSOR_DESCRIPTORS raw through weight_tiles / feedback_tiles ([BLOCK_K, BLOCK_N] tiles of [out, in]),
    transformed once loaded."""
    if DRAWS_BY_FOUR:
        # col starts at a multiple of 4 and in_features % 4 == 0: cols 4j..4j+3 of one row of W
        # are the four elements of one Philox block.
        quad = (first_col // 4 + tl.arange(0, col.shape[0] // 4)).to(tl.int64)
        xi = fb.unit_draw_quads(seed, step, out[None, :] * (in_features // 4) + quad[:, None], DISTRIBUTION)
    elif DRAWS:
        xi = fb.unit_draw(seed, step, out[None, :] * in_features + col[:, None], DISTRIBUTION)
    else:
        xi = 0.0
    if TENSOR_DESCRIPTORS:
        if fb.reads_weight(RULE):
            w = tl.trans(weight_tiles.load([start, first_col])).to(tl.float32)
        else:
            w = 0.0
        if fb.reads_feedback(RULE, HAS_FEEDBACK):
            stored = tl.trans(feedback_tiles.load([start, first_col])).to(tl.float32)
        else:
            stored = 0.0
        b_t = fb.transform_loaded(w, stored, xi, scale, RULE, HAS_FEEDBACK)
        if RULE == fb.FA and not HAS_FEEDBACK:
            # The descriptors fill out-of-bounds elements with 0, which every other rule maps to 0;
            # a drawn R has no W in it and must be cut to W's shape here.
            b_t = tl.where((col[:, None] < in_features) & (out[None, :] < out_features), b_t, 0.0)
    else:
        b_t = fb.transform_tile(weight_ptr + col[:, None] * stride_weight_in + out[None, :] * stride_weight_out,
                                feedback_ptr + col[:, None] * stride_feedback_in + out[None, :] * stride_feedback_out,
                                (col[:, None] < in_features) & (out[None, :] < out_features), xi, scale, RULE,
                                HAS_FEEDBACK)
    return b_t


# Keyed by the load path too: the two differ in registers and shared memory per stage, so each
# tunes its own configuration (an A/B of the two on one shape must not share one).
@triton.autotune(configs=gemm_configs(), key=[*_KEY, "TENSOR_DESCRIPTORS"])
@triton.jit
def _grad_input_kernel(delta_ptr, weight_ptr, feedback_ptr, rng_ptr, grad_input_ptr, rows, out_features,
                       in_features, rows_bucket, stride_delta_row, stride_delta_col, stride_weight_out,
                       stride_weight_in, stride_feedback_out, stride_feedback_in, scale, RULE: tl.constexpr,
                       HAS_FEEDBACK: tl.constexpr, DISTRIBUTION: tl.constexpr, DRAWS: tl.constexpr,
                       DRAWS_BY_FOUR: tl.constexpr, SCALE_FROM_WEIGHT: tl.constexpr,
                       TENSOR_DESCRIPTORS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """grad_input[rows, in] = delta[rows, out] B[out, in], computed transposed: B^T delta^T, so the
    transformed B tile is the left operand. BLOCK_M tiles rows, BLOCK_N in_features, BLOCK_K out_features.

    TENSOR_DESCRIPTORS (the launcher's choice, _tensor_descriptors): delta, W and the stored tensor
    load raw through tensor descriptors, which Hopper's TMA serves into shared memory and the
    pipeliner runs num_stages tiles ahead; only the B tile then passes through registers, for its
    transform. Their last stride is 1 and the others are multiples of 16 bytes (the launcher's
    check). Otherwise every operand loads through masked pointer loads. The descriptors are made
    here, from the configuration's block sizes (which is why the launcher provides scratch memory
    for them): a host-side TensorDescriptor argument would need its block shape set per autotune
    configuration by a Config pre_hook, which torch.compile refuses in user kernels."""
    tile_n, tile_m = grouped_tile(tl.program_id(0), tl.cdiv(in_features, BLOCK_N), tl.cdiv(rows, BLOCK_M), GROUP_M)
    row = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    seed, step = fb.load_draw_state(rng_ptr, RULE, HAS_FEEDBACK)
    scale = fb.load_scale(scale, SCALE_FROM_WEIGHT)
    dtype = grad_input_ptr.dtype.element_ty
    # Descriptors only for what the rule reads; the pointers stand in for the others, never loaded.
    weight_tiles = weight_ptr
    feedback_tiles = feedback_ptr
    if TENSOR_DESCRIPTORS:
        delta_tiles = tl.make_tensor_descriptor(delta_ptr, [rows, out_features], [stride_delta_row, 1],
                                                [BLOCK_M, BLOCK_K])
        if fb.reads_weight(RULE):
            weight_tiles = tl.make_tensor_descriptor(weight_ptr, [out_features, in_features], [stride_weight_out, 1],
                                                     [BLOCK_K, BLOCK_N])
        if fb.reads_feedback(RULE, HAS_FEEDBACK):
            feedback_tiles = tl.make_tensor_descriptor(feedback_ptr, [out_features, in_features],
                                                       [stride_feedback_out, 1], [BLOCK_K, BLOCK_N])
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for start in range(0, out_features, BLOCK_K):
        out = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        b_t = _feedback_tile_t(weight_ptr, feedback_ptr, weight_tiles, feedback_tiles, tile_n * BLOCK_N, col, start,
                               out, in_features, out_features, stride_weight_out, stride_weight_in,
                               stride_feedback_out, stride_feedback_in, seed, step, scale, RULE, HAS_FEEDBACK,
                               DISTRIBUTION, DRAWS, DRAWS_BY_FOUR, TENSOR_DESCRIPTORS)
        if TENSOR_DESCRIPTORS:
            delta_t = tl.trans(delta_tiles.load([tile_m * BLOCK_M, start]))
        else:
            delta_t = tl.load(delta_ptr + out[:, None] * stride_delta_col + row[None, :] * stride_delta_row,
                              mask=(out[:, None] < out_features) & (row[None, :] < rows), other=0.0)
        acc = fb.dot(fb.round_to(b_t, dtype), delta_t, acc, INPUT_PRECISION)
    tl.store(grad_input_ptr + row[None, :] * in_features + col[:, None], fb.round_to(acc, dtype),
             mask=(col[:, None] < in_features) & (row[None, :] < rows))


@triton.jit
def _delta_kernel(grad_output_ptr, saved_ptr, delta_ptr, numel, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """delta = act'(grad_output), rounded to its dtype, elementwise over contiguous tensors."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    delta = load_delta(grad_output_ptr + offsets, saved_ptr + offsets, mask, ACTIVATION)
    tl.store(delta_ptr + offsets, fb.round_to(delta, delta_ptr.dtype.element_ty), mask=mask)


def activation_delta(grad, saved, activation):
    """delta = dL/dz (like grad) from dL/dy and the saved y or z, made once for both backward
    GEMMs: the kernels would otherwise redo the derivative (erf, exp) for every tile column
    they read it in, and read two operands where they need one; made, delta is one raw operand
    (a tensor-descriptor / TMA load once the kernels take one). Rounded to the dtype as the
    GEMMs round it before their dots, so their results are the same bits."""
    if activation == "none":
        return grad
    # One memory order for all three, so the kernel runs over them flat: grad's own where it is
    # channels_last (a convolution's), else row-major.
    channels_last = grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last and not grad.is_contiguous() else torch.contiguous_format
    grad, saved = grad.contiguous(memory_format=memory_format), saved.contiguous(memory_format=memory_format)
    delta = torch.empty_like(grad, memory_format=memory_format)
    if delta.numel():
        block = 1024
        launch(_delta_kernel, (cdiv(delta.numel(), block),), grad, saved, delta, delta.numel(),
               ACTIVATION=activation, BLOCK=block)
    return delta


@triton.jit
def _materialise_kernel(weight_ptr, feedback_ptr, rng_ptr, out_ptr, out_features, in_features, stride_weight_out,
                        stride_weight_in, stride_feedback_out, stride_feedback_in, scale, RULE: tl.constexpr,
                        HAS_FEEDBACK: tl.constexpr, DISTRIBUTION: tl.constexpr, DRAWS: tl.constexpr,
                        DRAWS_BY_FOUR: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr):
    """B = T(W) written out [out, in] contiguous: the drawn rules at large batch (see _back)."""
    col = (tl.program_id(0) * BLOCK_IN + tl.arange(0, BLOCK_IN)).to(tl.int64)
    out = (tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)).to(tl.int64)
    seed, step = fb.load_draw_state(rng_ptr, RULE, HAS_FEEDBACK)
    b_t = _feedback_tile_t(weight_ptr, feedback_ptr, weight_ptr, feedback_ptr, tl.program_id(0) * BLOCK_IN, col,
                           tl.program_id(1) * BLOCK_OUT, out, in_features, out_features, stride_weight_out,
                           stride_weight_in, stride_feedback_out, stride_feedback_in, seed, step, scale, RULE,
                           HAS_FEEDBACK, DISTRIBUTION, DRAWS, DRAWS_BY_FOUR, False)
    tl.store(out_ptr + out[None, :] * in_features + col[:, None], fb.round_to(b_t, out_ptr.dtype.element_ty),
             mask=(col[:, None] < in_features) & (out[None, :] < out_features))


@triton.autotune(configs=gemm_configs(), key=_KEY)
@triton.jit
def _grad_weight_kernel(delta_ptr, input_ptr, addend_ptr, grad_weight_ptr, grad_bias_ptr, grad_feedback_ptr, rows,
                        out_features, in_features, rows_bucket, stride_delta_row, stride_delta_col,
                        stride_input_row, stride_input_col, stride_addend_out, stride_addend_in, outer_scale,
                        addend_scale, STORES_GRAD_WEIGHT: tl.constexpr, STORES_GRAD_BIAS: tl.constexpr,
                        STORES_GRAD_FEEDBACK: tl.constexpr, HAS_ADDEND: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """P[out, in] = delta[rows, out]^T input[rows, in], reducing over rows (BLOCK_K of them at a time);
    grad_weight = P, grad_bias = delta's column sums (tile column 0 stores them),
    grad_feedback = outer_scale * P + addend_scale * addend."""
    NEEDS_PRODUCT: tl.constexpr = STORES_GRAD_WEIGHT or STORES_GRAD_FEEDBACK
    # As the launcher's grid: one tile column when only grad_bias is asked or in_features is 0.
    if NEEDS_PRODUCT:
        tiles_n = tl.maximum(tl.cdiv(in_features, BLOCK_N), 1)
    else:
        tiles_n = 1
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(out_features, BLOCK_M), tiles_n, GROUP_M)
    out = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    dtype = input_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, rows, BLOCK_K):
        row = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        # delta comes in x's dtype (as do the projections that wm / aa / ia pass in its place).
        delta_t = tl.load(delta_ptr + out[:, None] * stride_delta_col + row[None, :] * stride_delta_row,
                          mask=(out[:, None] < out_features) & (row[None, :] < rows), other=0.0)
        if STORES_GRAD_BIAS:
            bias_acc += tl.sum(delta_t.to(tl.float32), axis=1)
        if NEEDS_PRODUCT:
            x = tl.load(input_ptr + row[:, None] * stride_input_row + col[None, :] * stride_input_col,
                        mask=(row[:, None] < rows) & (col[None, :] < in_features), other=0.0)
            acc = fb.dot(delta_t, x, acc, INPUT_PRECISION)
    mask = (out[:, None] < out_features) & (col[None, :] < in_features)
    offsets = out[:, None] * in_features + col[None, :]
    if STORES_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + offsets, fb.round_to(acc, dtype), mask=mask)
    if STORES_GRAD_BIAS:
        tl.store(grad_bias_ptr + out, fb.round_to(bias_acc, dtype), mask=(out < out_features) & (tile_n == 0))
    if STORES_GRAD_FEEDBACK:
        gradient = acc * outer_scale
        if HAS_ADDEND:
            addend = tl.load(addend_ptr + out[:, None] * stride_addend_out + col[None, :] * stride_addend_in,
                             mask=mask, other=0.0).to(tl.float32)
            gradient += addend_scale * addend
        tl.store(grad_feedback_ptr + offsets, fb.round_to(gradient, dtype), mask=mask)


@triton.jit
def _draw_kernel(rng_ptr, out_ptr, numel, scale, DISTRIBUTION: tl.constexpr, BLOCK: tl.constexpr):
    """out = scale * xi for elements 0..numel-1 (wm's noise, as the aten backend draws it)."""
    index = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    xi = fb.unit_draw(tl.load(rng_ptr), tl.load(rng_ptr + 1), index, DISTRIBUTION)
    tl.store(out_ptr + index, fb.round_to(scale * xi, out_ptr.dtype.element_ty), mask=index < numel)


def rows_bucket_of(rows: int) -> int:
    """rows rounded up to a power of two, the kernels' autotuning key: with int.bit_length, as
    triton.next_power_of_2 (a constexpr_function, whose wrapper costs microseconds a call)
    rounds it; a size torch.compile traces symbolically is rounded by Triton's own function."""
    if isinstance(rows, int):
        return 1 << (max(rows, 1) - 1).bit_length()
    return triton.next_power_of_2(max(rows, 1))


def _project(x, weight, bias=None, activation="none", saves_projection=False):
    """act(x W^T + b) and what the forward op returns with it: x [rows, in], W [out, in]."""
    rows, out_features, in_features = x.shape[0], weight.shape[0], weight.shape[1]
    output = x.new_empty(rows, out_features)
    saved = torch.empty_like(output) if activation in PREACTIVATION_ACTIVATIONS else output.new_empty(0)
    projection = torch.empty_like(output) if saves_projection else output.new_empty(0)
    if output.numel():
        launch(_forward_kernel,
                lambda meta: (cdiv(rows, meta["BLOCK_M"]) * cdiv(out_features, meta["BLOCK_N"]),),
                x, weight, bias if bias is not None else x, output, saved if saved.numel() else output,
                projection if saves_projection else output, rows, out_features, in_features, rows_bucket_of(rows),
                *x.stride(), *weight.stride(), HAS_BIAS=bias is not None, ACTIVATION=activation,
                SAVES_PREACTIVATION=activation in PREACTIVATION_ACTIVATIONS, SAVES_PROJECTION=saves_projection,
                INPUT_PRECISION=input_precision(x.dtype))
    return output, saved, projection


def draws_once(rule: int, has_feedback: bool, rows: int, weight: Tensor) -> bool:
    """Whether grad_input makes a drawn B (brsf, fa without R) once (materialise_feedback) and reads
    it back, rather than drawing it in the GEMM: every row tile draws it again there, a Philox call
    per four elements per tile, which outgrows one W-sized write and read as the rows grow; below
    that B never exists in memory. The cuda ops' cost model decides, on Triton's constants
    (csrc/dispatch.cpp; fastfa._backend.auto_plan's triton_draw, set_auto_costs to calibrate), which
    answers with the row count from which it draws once (asked once per layer shape and dtype,
    _backend.triton_draw_once_rows): compared here with rows, a size torch.compile traces
    symbolically records a guard on the comparison, not on the size (a yes / no from C++ would need
    int(rows) and fix the batch)."""
    if not fb.draws(rule, has_feedback):
        return False
    return rows >= _backend.triton_draw_once_rows(rule, int(weight.numel()), weight.dtype)


def _draw_arguments(rule, feedback, in_features):
    draws = fb.draws(rule, feedback is not None)
    return dict(DRAWS=draws, DRAWS_BY_FOUR=draws and in_features % 4 == 0)


def materialise_feedback(weight, feedback, rng, rule, scale, distribution):
    """B = T(W) [out, in], contiguous, in W's dtype."""
    out_features, in_features = weight.shape
    b = weight.new_empty(out_features, in_features)
    stored = feedback if feedback is not None else weight
    block_in, block_out = 64, 32
    launch(_materialise_kernel, (cdiv(in_features, block_in), cdiv(out_features, block_out)), weight,
            stored, rng, b, out_features, in_features, *weight.stride(), *stored.stride(), scale, RULE=rule,
            HAS_FEEDBACK=feedback is not None, DISTRIBUTION=distribution, BLOCK_IN=block_in, BLOCK_OUT=block_out,
            **_draw_arguments(rule, feedback, in_features))
    return b


_TMA = {}


def _has_tma(device) -> bool:
    """Whether a GPU has TMA (sm_90 and newer), asked once per device: torch.cuda's query costs
    microseconds of Python per call."""
    has = _TMA.get(device)
    if has is None:
        has = _TMA[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return has


def _tensor_descriptors(delta, weight, stored, rule, has_feedback) -> bool:
    """Whether _grad_input_kernel loads its operands through tensor descriptors (TMA), per
    FASTFA_TRITON_TMA, read at every call: "auto" (the default) on GPUs with TMA (sm_90 and newer),
    never under the interpreter; "1" under the interpreter too (its tests); "0" never. Either way
    only where delta and the operands the rule reads meet TMA's layout rules (tma_ready): the
    pointer loads take every other layout."""
    mode = os.environ.get("FASTFA_TRITON_TMA", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FASTFA_TRITON_TMA must be auto (tensor descriptors on GPUs with TMA, the default), "
                         f"1 (also under Triton's interpreter) or 0 (never), got {mode!r}")
    if mode == "0":
        return False
    if fb.INTERPRETED.value:
        if mode != "1":
            return False
    elif not (delta.is_cuda and _has_tma(delta.device)):
        return False
    operands = [delta]
    if fb.reads_weight(rule):
        operands.append(weight)
    if fb.reads_feedback(rule, has_feedback):
        operands.append(stored)
    return all(tma_ready(operand) for operand in operands)


def _back(delta, weight, feedback, rng, rule, scale, distribution):
    """delta B, B = T(W) made tile by tile: delta [rows, out] -> [rows, in]."""
    rows, out_features, in_features = delta.shape[0], weight.shape[0], weight.shape[1]
    grad_input = delta.new_empty(rows, in_features)
    if not grad_input.numel():
        return grad_input
    if draws_once(rule, feedback is not None, rows, weight):
        feedback, rule, rng = materialise_feedback(weight, feedback, rng, rule, scale, distribution), _FA, None
    stored = feedback if feedback is not None else weight
    scale, scale_from_weight = fb.scale_argument(weight, rule, scale)
    descriptors = _tensor_descriptors(delta, weight, stored, rule, feedback is not None)
    if descriptors and delta.is_cuda and not is_fake(delta):
        set_scratch_allocator()
    launch(_grad_input_kernel,
            lambda meta: (cdiv(in_features, meta["BLOCK_N"]) * cdiv(rows, meta["BLOCK_M"]),),
            delta, weight, stored, rng, grad_input, rows, out_features, in_features, rows_bucket_of(rows),
            *delta.stride(), *weight.stride(), *stored.stride(), scale, RULE=rule,
            HAS_FEEDBACK=feedback is not None, DISTRIBUTION=distribution, SCALE_FROM_WEIGHT=scale_from_weight,
            TENSOR_DESCRIPTORS=descriptors, INPUT_PRECISION=input_precision(delta.dtype),
            **_draw_arguments(rule, feedback, in_features))
    return grad_input


def _outer(delta, x, *, grad_weight=False, grad_bias=False, grad_feedback=False, outer_scale=1.0, addend=None,
           addend_scale=0.0):
    """delta^T x for delta [rows, out] and x [rows, in], with the epilogues the backward needs:
    returns (grad_weight, grad_bias, grad_feedback), None where not asked."""
    rows, out_features, in_features = delta.shape[0], delta.shape[1], x.shape[1]
    gw = x.new_empty(out_features, in_features) if grad_weight else None
    gb = x.new_empty(out_features) if grad_bias else None
    gf = x.new_empty(out_features, in_features) if grad_feedback else None
    needs_product = grad_weight or grad_feedback
    if out_features:
        addend_tensor = addend if addend is not None else x
        placeholder = gw if gw is not None else (gf if gf is not None else gb)
        # Only the bias: one tile column reads delta once and no GEMM runs. Column 0 also
        # exists (and stores grad_bias) when in_features is 0.
        launch(_grad_weight_kernel,
                lambda meta: (cdiv(out_features, meta["BLOCK_M"])
                              * (max(cdiv(in_features, meta["BLOCK_N"]), 1) if needs_product else 1),),
                delta, x, addend_tensor, gw if gw is not None else placeholder,
                gb if gb is not None else placeholder, gf if gf is not None else placeholder, rows, out_features,
                in_features, rows_bucket_of(rows), *delta.stride(), *x.stride(), *addend_tensor.stride(),
                outer_scale, addend_scale, STORES_GRAD_WEIGHT=grad_weight,
                STORES_GRAD_BIAS=grad_bias, STORES_GRAD_FEEDBACK=grad_feedback, HAS_ADDEND=addend is not None,
                INPUT_PRECISION=input_precision(x.dtype))
    return gw, gb, gf


def draw_noise(like, rng, scale, distribution):
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if out.numel():
        launch(_draw_kernel, lambda meta: (cdiv(out.numel(), meta["BLOCK"]),), rng, out, out.numel(),
                scale, DISTRIBUTION=distribution, BLOCK=256)
    return out


def _check_linear(input, weight, bias, alignment, activation) -> None:
    """The aten op's checks (csrc/aten_backend.cpp), with its messages, before any kernel runs."""
    # Each tensor property read once: every read is a call into C++ (0.1-0.2 µs), twice a step.
    shape, dtype, device = weight.shape, weight.dtype, weight.device
    if len(shape) != 2:
        raise RuntimeError(f"fastfa: linear weight must be 2-D (out_features, in_features), got {weight.dim()}-D")
    input_shape = input.shape
    if not input_shape or input_shape[-1] != shape[1]:
        raise RuntimeError(f"fastfa: input's last dimension must be in_features={shape[1]}, got shape "
                           f"{list(input_shape)}")
    check_operands(input, bias, shape[0], dtype, device, alignment, activation)


def check_operands(input, bias, out_features: int, dtype, device, alignment, activation) -> None:
    """The checks the Linear and Conv2d ops share, after their shape checks: dtypes, devices, the bias,
    the alignment options and the activation (the aten op's messages)."""
    if input.dtype != dtype:
        raise RuntimeError(f"fastfa: input and weight must share a dtype, got {input.dtype} and {dtype}")
    if input.device != device:
        raise RuntimeError(f"fastfa: input and weight must be on one device, got {input.device} and {device}")
    if bias is not None:
        bias_shape = bias.shape
        if len(bias_shape) != 1 or bias_shape[0] != out_features:
            raise RuntimeError(f"fastfa: bias must have shape [{out_features}], got {list(bias_shape)}")
        if bias.dtype != dtype or bias.device != device:
            raise RuntimeError("fastfa: bias must have weight's dtype and device")
    if len(alignment) != 4:
        raise RuntimeError(f"fastfa: alignment must be [alpha, beta, gamma, sigma], got {len(alignment)} values")
    if activation not in ACTIVATIONS:
        raise RuntimeError(f"fastfa: activation must be one of {', '.join(ACTIVATIONS)}; got '{activation}'")


def _rows(input, in_features: int) -> int:
    return input.numel() // in_features if in_features else math.prod(input.shape[:-1])


@define_op("triton_linear")
def triton_linear(input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None, rng: Tensor | None,
                  rule: int, scale: float, distribution: int, alignment: Sequence[float],
                  activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """fastfa::linear on Triton: (output, activation_saved, projection), see the module docstring.

    input (*, in), weight and feedback (out, in), bias (out,); output (*, out);
    activation_saved is z = x W^T + b for gelu / gelu_tanh / silu, else empty; projection
    is r = x W^T (no bias) for aa and ia, else empty.
    """
    _check_linear(input, weight, bias, alignment, activation)
    fb.check_feedback_arguments(weight, feedback, rng, rule, scale, distribution)
    reason = unsupported_reason(weight)
    if reason is not None:
        _backend.record_fallback("triton_linear", reason)
        return torch.ops.fastfa.linear.default(input, weight, bias, feedback, rng, rule, scale, distribution,
                                               alignment, activation)
    out_features, in_features = weight.shape
    x = input.reshape(_rows(input, in_features), in_features)
    output, saved, projection = _project(x, weight, bias, activation, saves_projection=rule in (_AA, _IA))
    shape = (*input.shape[:-1], out_features)
    return (output.view(shape), saved.view(shape) if saved.numel() else saved,
            projection.view(shape) if projection.numel() else projection)


def _feedback_gradient(rule, feedback, weight, delta, x, projection, rng, alignment, grad_weight, grad_bias):
    """The estimated rules' B gradient (learning-rules.md), with grad_weight / grad_bias when asked.
    Returns (grad_weight, grad_bias, grad_feedback)."""
    alpha, beta, gamma, sigma = alignment
    batch = max(x.shape[0], 1)
    if rule == _KP:  # grad_W + alpha * decay, from the grad_weight accumulator
        return _outer(delta, x, grad_weight=grad_weight, grad_bias=grad_bias, grad_feedback=True, addend=feedback,
                      addend_scale=2.0 * alpha)
    gw, gb, _ = _outer(delta, x, grad_weight=grad_weight, grad_bias=grad_bias)
    if rule == _SA:  # alpha * decay + beta * self
        gf = (feedback * (2.0 * alpha) - weight * beta).contiguous()
    elif rule == _WM:  # alpha * decay + beta * amp, with x replaced by noise ~ N(0, sigma^2)
        noise = draw_noise(x, rng, sigma, 1)
        noise_projection, _, _ = _project(noise, weight)
        _, _, gf = _outer(noise_projection, noise, grad_feedback=True, outer_scale=-beta / batch,
                          addend=feedback, addend_scale=2.0 * alpha)
    elif rule == _AA:  # alpha * sparse + beta * amp = (1/N) (2 alpha p - beta r)^T x, p = x B^T
        p, _, _ = _project(x, feedback)
        _, _, gf = _outer(p * (2.0 * alpha) - projection * beta, x, grad_feedback=True, outer_scale=1.0 / batch)
    else:  # ia: alpha * amp + beta * null + gamma * decay = r^T (-alpha/N x + 2 beta/N r B) + 2 gamma B
        r_b = _back(projection, feedback, feedback, None, _KP, 1.0, 0)
        _, _, gf = _outer(projection, x * (-alpha / batch) + r_b * (2.0 * beta / batch),
                          grad_feedback=True, addend=feedback, addend_scale=2.0 * gamma)
    return gw, gb, gf


@define_op("triton_linear_backward")
def triton_linear_backward(grad_output: Tensor, input: Tensor, weight: Tensor, feedback: Tensor | None,
                           rng: Tensor | None, activation_saved: Tensor, projection: Tensor, rule: int, scale: float,
                           distribution: int, alignment: Sequence[float], activation: str,
                           output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fastfa::linear_backward on Triton: (grad_input, grad_weight, grad_bias, grad_feedback).

    grad_input = delta B (B = T(W) per rule, fused), grad_weight = delta^T x, grad_bias = the
    sum of delta over rows, grad_feedback = the estimated rules' B gradient; delta =
    act'(grad_output). Masked-out (and non-estimated grad_feedback) outputs come back empty.
    """
    _check_linear(input, weight, None, alignment, activation)
    fb.check_feedback_arguments(weight, feedback, rng, rule, scale, distribution)
    out_features, in_features = weight.shape
    rows = _rows(input, in_features)
    if grad_output.numel() != rows * out_features:
        raise RuntimeError(f"fastfa: grad_output must have {rows * out_features} elements ({rows} rows of "
                           f"{out_features}), got shape {list(grad_output.shape)}")
    feedback_grad = output_mask[3] and rule >= _KP
    if feedback_grad and rule in (_AA, _IA) and projection.numel() != rows * out_features:
        raise RuntimeError(f"fastfa: rule {rule} needs projection = x W^T of shape {[*input.shape[:-1], out_features]}"
                           f" (the forward op's third output), got shape {list(projection.shape)}")
    reason = unsupported_reason(weight)
    if reason is not None:
        _backend.record_fallback("triton_linear_backward", reason)
        return torch.ops.fastfa.linear_backward.default(grad_output, input, weight, feedback, rng, activation_saved,
                                                        projection, rule, scale, distribution, alignment, activation,
                                                        output_mask)
    grad = grad_output.reshape(rows, out_features)
    # activation_saved is empty without an activation.
    saved = activation_saved.reshape(rows, out_features) if activation != "none" else grad
    delta = activation_delta(grad, saved, activation)
    x = input.reshape(rows, in_features)
    grad_input = grad_weight = grad_bias = grad_feedback = None
    if output_mask[0]:
        grad_input = _back(delta, weight, feedback, rng, rule, scale, distribution).view(input.shape)
    if feedback_grad:
        r = projection.reshape(rows, out_features) if rule in (_AA, _IA) else None
        grad_weight, grad_bias, grad_feedback = _feedback_gradient(
            rule, feedback, weight, delta, x, r, rng, alignment, output_mask[1], output_mask[2])
    elif output_mask[1] or output_mask[2]:
        grad_weight, grad_bias, _ = _outer(delta, x, grad_weight=output_mask[1], grad_bias=output_mask[2])
    return (grad_input if grad_input is not None else input.new_empty(0),
            grad_weight if grad_weight is not None else weight.new_empty(0),
            grad_bias if grad_bias is not None else weight.new_empty(0),
            grad_feedback if grad_feedback is not None else weight.new_empty(0))


_ops.register_linear_autograd("fastfa::triton_linear", torch.ops.fastfa.triton_linear_backward)
