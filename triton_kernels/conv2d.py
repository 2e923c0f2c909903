"""Conv2d on Triton: fastfa::triton_conv2d and fastfa::triton_conv2d_backward.

The same arguments (schemas inferred as linear.py says) and results as the aten ops
fastfa::conv2d / conv2d_backward (python/fastfa/ops.py), as implicit GEMMs: no im2col
buffer, each tile's addresses come from the convolution's geometry (stride, zero padding,
dilation, groups), and every tensor is read through its own strides, so NCHW,
channels_last and other layouts run as they are.
Per group g (the grid's second axis), with rows the GEMM's M dimension:

    forward      rows = (n, oh, ow), columns = out channels of g, reduction = (c, kh, kw):
                 output = act(conv(x, W) + b), bias and activation in the epilogue; also
                 activation_saved (the pre-activation, gelu / silu) and projection r =
                 conv(x, W) without bias (aa, ia) from the same tile.
    grad_input   rows = (n, ih, iw), columns = in channels of g, reduction = (oc, kh, kw),
                 reading delta = act'(grad_output) (made once, in grad_output's layout, by
                 linear.activation_delta where there is an activation) at oh = (ih + pad - kh dil) / stride
                 where that divides; B = T(W) made as its filter tiles load
                 (triton_kernels/feedback.py), so B never exists in memory. Computed
                 transposed, grad_input^T = B^T delta^T, so the transformed tile is the
                 left operand (registers for Hopper's wgmma, issue 3).
    grad_weight  out channels of g x (c, kh, kw), reducing over (n, oh, ow): delta^T x, with
                 grad_bias (delta's sums) and kp's B gradient grad_W + 2 alpha B from the
                 same tiles.
    B's gradient for wm, aa, ia: the spec's primitives (learning-rules.md) from the same three
                 kernels (project = forward, back = grad_input, outer = grad_weight); sa is
                 elementwise.

Padding modes other than zeros never reach these ops: fastfa.functional pads the input
first. Outputs have the layouts the aten ops' (and the fake kernels') would have. fp64 and
tensors the Triton runtime cannot reach fall back to the aten ops, recorded
(fastfa.last_fallbacks()). Autotuning keys on the layer's GEMM shape with the row count
rounded up to a power of two, the same for a layer's forward and backward kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import is_fake

from .. import _backend
from .. import ops as _ops
from . import feedback as fb
from . import cdiv, define_op, input_precision, launch, unsupported_reason
from .linear import (PREACTIVATION_ACTIVATIONS, activation_delta, apply_activation, check_operands, draw_noise,
                     draws_once, gemm_configs, grouped_tile, materialise_feedback, rows_bucket_of)

_FA, _KP, _WM, _SA, _AA, _IA = 1, 5, 6, 7, 8, 9
_KEY = ["rows_bucket", "columns", "reduction"]


@triton.jit
def _spatial(index, height, width):
    """Flat (n, h, w) index -> (n, h, w)."""
    n = index // (height * width)
    rest = index % (height * width)
    return n, rest // width, rest % width


@triton.jit
def _filter_position(k, kernel_h, kernel_w):
    """Flat (channel, kh, kw) reduction / column index -> (channel, kh, kw)."""
    channel = k // (kernel_h * kernel_w)
    rest = k % (kernel_h * kernel_w)
    return channel, rest // kernel_w, rest % kernel_w


@triton.autotune(configs=gemm_configs(), key=_KEY)
@triton.jit
def _forward_kernel(input_ptr, weight_ptr, bias_ptr, output_ptr, saved_ptr, projection_ptr, batch, in_h, in_w,
                    out_h, out_w, in_per_group, out_per_group, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                    dilation_h, dilation_w, rows_bucket, columns, reduction, sx_n, sx_c, sx_h, sx_w, sw_o, sw_c,
                    sw_h, sw_w, so_n, so_c, so_h, so_w, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                    SAVES_PREACTIVATION: tl.constexpr, SAVES_PROJECTION: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """output[n, oc, oh, ow] = act(sum_(c, kh, kw) x[n, c, oh s - p + kh d, ...] W[oc, c, kh, kw] + b[oc]);
    saved and projection share output's strides."""
    group = tl.program_id(1)
    rows = batch * out_h * out_w
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.cdiv(out_per_group, BLOCK_N), GROUP_M)
    row = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n, oh, ow = _spatial(row, out_h, out_w)
    oc_in_group = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    oc = group * out_per_group + oc_in_group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, reduction, BLOCK_K):
        k = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        c, kh, kw = _filter_position(k, kernel_h, kernel_w)
        ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dilation_h
        iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dilation_w
        x_mask = ((row[:, None] < rows) & (k[None, :] < reduction) & (ih >= 0) & (ih < in_h) & (iw >= 0)
                  & (iw < in_w))
        x = tl.load(input_ptr + n[:, None] * sx_n + (group * in_per_group + c[None, :]) * sx_c + ih * sx_h
                    + iw * sx_w, mask=x_mask, other=0.0)
        w = tl.load(weight_ptr + oc[None, :] * sw_o + c[:, None] * sw_c + kh[:, None] * sw_h + kw[:, None] * sw_w,
                    mask=(k[:, None] < reduction) & (oc_in_group[None, :] < out_per_group), other=0.0)
        acc = fb.dot(x, w, acc, INPUT_PRECISION)
    dtype = output_ptr.dtype.element_ty
    mask = (row[:, None] < rows) & (oc_in_group[None, :] < out_per_group)
    offsets = n[:, None] * so_n + oc[None, :] * so_c + oh[:, None] * so_h + ow[:, None] * so_w
    if SAVES_PROJECTION:
        tl.store(projection_ptr + offsets, fb.round_to(acc, dtype), mask=mask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + oc, mask=oc_in_group < out_per_group, other=0.0).to(tl.float32)[None, :]
    if SAVES_PREACTIVATION:
        tl.store(saved_ptr + offsets, fb.round_to(acc, dtype), mask=mask)
    tl.store(output_ptr + offsets, fb.round_to(apply_activation(acc, ACTIVATION), dtype), mask=mask)


@triton.autotune(configs=gemm_configs(), key=_KEY)
@triton.jit
def _grad_input_kernel(delta_ptr, weight_ptr, feedback_ptr, rng_ptr, taps_h_ptr, taps_w_ptr, grad_input_ptr, batch,
                       in_h, in_w, out_h, out_w, in_per_group, out_per_group, kernel_h, kernel_w, stride_h,
                       stride_w, pad_h, pad_w, dilation_h, dilation_w, rows_bucket, columns, reduction, sg_n, sg_c,
                       sg_h, sg_w, sw_o, sw_c, sw_h, sw_w, sf_o, sf_c, sf_h, sf_w, si_n, si_c, si_h, si_w, scale,
                       RULE: tl.constexpr, HAS_FEEDBACK: tl.constexpr, DISTRIBUTION: tl.constexpr,
                       SCALE_FROM_WEIGHT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """grad_input[n, c, ih, iw] = sum_(oc, kh, kw) delta[n, oc, oh, ow] B[oc, c, kh, kw] over the (kh, kw)
    with ih = oh s - p + kh d (and the same for w), as B^T [c, (oc, kh, kw)] times delta^T [(oc, kh, kw), (n, ih, iw)].

    With stride s > 1 only the taps kh with s | ih + p - kh d reach a given ih, and which they are
    depends only on ih mod s: each program takes the input positions of one residue class
    (rh, rw) (grid axis 1 = group * s_h s_w + class) and reduces over that class's taps alone
    (taps_h[rh] = [count, kh...], from the launcher), so no MMA is spent on taps that read nothing.
    BLOCK_M tiles the class's (n, ih, iw), BLOCK_N the group's in channels, BLOCK_K (oc, tap h, tap w);
    ``reduction`` (out_per_group kh kw) is the autotuning key only."""
    classes = stride_h * stride_w
    group = tl.program_id(1) // classes
    residue_h = (tl.program_id(1) % classes) // stride_w
    residue_w = tl.program_id(1) % stride_w
    taps_h = tl.load(taps_h_ptr + residue_h * (kernel_h + 1))
    taps_w = tl.load(taps_w_ptr + residue_w * (kernel_w + 1))
    class_h, class_w = tl.cdiv(in_h, stride_h), tl.cdiv(in_w, stride_w)
    rows = batch * class_h * class_w
    tile_n, tile_m = grouped_tile(tl.program_id(0), tl.cdiv(in_per_group, BLOCK_N), tl.cdiv(rows, BLOCK_M), GROUP_M)
    row = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n, ih, iw = _spatial(row, class_h, class_w)
    ih = residue_h + ih * stride_h
    iw = residue_w + iw * stride_w
    row_mask = (row < rows) & (ih < in_h) & (iw < in_w)
    c = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    seed, step = fb.load_draw_state(rng_ptr, RULE, HAS_FEEDBACK)
    scale = fb.load_scale(scale, SCALE_FROM_WEIGHT)
    dtype = grad_input_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    class_reduction = out_per_group * taps_h * taps_w  # 0 where the class has no taps: grad_input is 0 there
    for start in range(0, class_reduction, BLOCK_K):
        k = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        in_reduction = k < class_reduction
        oc_in_group, tap_h, tap_w = _filter_position(k, taps_h, taps_w)
        kh = tl.load(taps_h_ptr + residue_h * (kernel_h + 1) + 1 + tap_h, mask=in_reduction, other=0).to(tl.int64)
        kw = tl.load(taps_w_ptr + residue_w * (kernel_w + 1) + 1 + tap_w, mask=in_reduction, other=0).to(tl.int64)
        oc = group * out_per_group + oc_in_group
        # B^T[c, (oc, kh, kw)]; the draw's index is the element's row-major index in W's shape.
        b_t = fb.load_feedback_tile(
            weight_ptr + oc[None, :] * sw_o + c[:, None] * sw_c + kh[None, :] * sw_h + kw[None, :] * sw_w,
            feedback_ptr + oc[None, :] * sf_o + c[:, None] * sf_c + kh[None, :] * sf_h + kw[None, :] * sf_w,
            (c[:, None] < in_per_group) & in_reduction[None, :],
            ((oc[None, :] * in_per_group + c[:, None]) * kernel_h + kh[None, :]) * kernel_w + kw[None, :],
            seed, step, scale, RULE, HAS_FEEDBACK, DISTRIBUTION)
        # The output position each tap reads: oh = (ih + p - kh d) / s, exact for the class's taps.
        th = ih[None, :] + pad_h - kh[:, None] * dilation_h
        tw = iw[None, :] + pad_w - kw[:, None] * dilation_w
        oh = tl.maximum(th, 0) // stride_h
        ow = tl.maximum(tw, 0) // stride_w
        delta_mask = (in_reduction[:, None] & row_mask[None, :] & (th >= 0) & (tw >= 0) & (oh < out_h)
                      & (ow < out_w))
        delta_t = tl.load(delta_ptr + n[None, :] * sg_n + oc[:, None] * sg_c + oh * sg_h + ow * sg_w,
                          mask=delta_mask, other=0.0)
        acc = fb.dot(fb.round_to(b_t, dtype), delta_t, acc, INPUT_PRECISION)
    tl.store(grad_input_ptr + n[None, :] * si_n + (group * in_per_group + c[:, None]) * si_c + ih[None, :] * si_h
             + iw[None, :] * si_w, fb.round_to(acc, dtype), mask=(c[:, None] < in_per_group) & row_mask[None, :])


@triton.autotune(configs=gemm_configs(), key=_KEY)
@triton.jit
def _grad_weight_kernel(delta_ptr, input_ptr, addend_ptr, grad_weight_ptr, grad_bias_ptr, grad_feedback_ptr, batch,
                        in_h, in_w, out_h, out_w, in_per_group, out_per_group, kernel_h, kernel_w, stride_h,
                        stride_w, pad_h, pad_w, dilation_h, dilation_w, rows_bucket, columns, reduction, sg_n, sg_c,
                        sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sa_o, sa_c, sa_h, sa_w, sgw_o, sgw_c, sgw_h, sgw_w,
                        sgf_o, sgf_c, sgf_h, sgf_w, outer_scale, addend_scale, STORES_GRAD_WEIGHT: tl.constexpr,
                        STORES_GRAD_BIAS: tl.constexpr, STORES_GRAD_FEEDBACK: tl.constexpr,
                        HAS_ADDEND: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """P[oc, (c, kh, kw)] = sum_(n, oh, ow) delta[n, oc, oh, ow] x[n, c, oh s - p + kh d, ...] (columns =
    in_per_group kh kw, reduction = the output positions); grad_weight = P, grad_bias = delta's sums
    (tile column 0 stores them), grad_feedback = outer_scale * P + addend_scale * addend."""
    NEEDS_PRODUCT: tl.constexpr = STORES_GRAD_WEIGHT or STORES_GRAD_FEEDBACK
    group = tl.program_id(1)
    # As the launcher's grid: one tile column when only grad_bias is asked or there are no columns.
    if NEEDS_PRODUCT:
        tiles_n = tl.maximum(tl.cdiv(columns, BLOCK_N), 1)
    else:
        tiles_n = 1
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(out_per_group, BLOCK_M), tiles_n, GROUP_M)
    oc_in_group = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    oc = group * out_per_group + oc_in_group
    col = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c, kh, kw = _filter_position(col, kernel_h, kernel_w)
    dtype = input_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, reduction, BLOCK_K):
        r = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        n, oh, ow = _spatial(r, out_h, out_w)
        delta_mask = (oc_in_group[:, None] < out_per_group) & (r[None, :] < reduction)
        # delta comes in x's dtype (as do the projections that wm / aa / ia pass in its place).
        delta_t = tl.load(delta_ptr + n[None, :] * sg_n + oc[:, None] * sg_c + oh[None, :] * sg_h + ow[None, :] * sg_w,
                          mask=delta_mask, other=0.0)
        if STORES_GRAD_BIAS:
            bias_acc += tl.sum(delta_t.to(tl.float32), axis=1)
        if NEEDS_PRODUCT:
            ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dilation_h
            iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dilation_w
            x_mask = ((r[:, None] < reduction) & (col[None, :] < columns) & (ih >= 0) & (ih < in_h) & (iw >= 0)
                      & (iw < in_w))
            x = tl.load(input_ptr + n[:, None] * sx_n + (group * in_per_group + c[None, :]) * sx_c + ih * sx_h
                        + iw * sx_w, mask=x_mask, other=0.0)
            acc = fb.dot(delta_t, x, acc, INPUT_PRECISION)
    mask = (oc_in_group[:, None] < out_per_group) & (col[None, :] < columns)
    if STORES_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + oc[:, None] * sgw_o + c[None, :] * sgw_c + kh[None, :] * sgw_h
                 + kw[None, :] * sgw_w, fb.round_to(acc, dtype), mask=mask)
    if STORES_GRAD_BIAS:
        tl.store(grad_bias_ptr + oc, fb.round_to(bias_acc, dtype), mask=(oc_in_group < out_per_group) & (tile_n == 0))
    if STORES_GRAD_FEEDBACK:
        gradient = acc * outer_scale
        if HAS_ADDEND:
            addend = tl.load(addend_ptr + oc[:, None] * sa_o + c[None, :] * sa_c + kh[None, :] * sa_h
                             + kw[None, :] * sa_w, mask=mask, other=0.0).to(tl.float32)
            gradient += addend_scale * addend
        tl.store(grad_feedback_ptr + oc[:, None] * sgf_o + c[None, :] * sgf_c + kh[None, :] * sgf_h
                 + kw[None, :] * sgf_w, fb.round_to(gradient, dtype), mask=mask)


class _Geometry:
    """The convolution's sizes and hyper-parameters, as the kernels take them."""

    def __init__(self, input_shape, weight_shape, stride, padding, dilation, groups):
        self.batch, _, in_h, in_w = input_shape
        out_channels, self.in_per_group, kernel_h, kernel_w = weight_shape
        self.in_h, self.in_w, self.kernel_h, self.kernel_w = in_h, in_w, kernel_h, kernel_w
        self.groups, self.out_per_group = groups, out_channels // groups
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        # Written out per axis: a generator over zip costs a microsecond more, per op call.
        self.out_h = (in_h + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
        self.out_w = (in_w + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1

    def arguments(self):
        return (self.batch, self.in_h, self.in_w, self.out_h, self.out_w, self.in_per_group, self.out_per_group,
                self.kernel_h, self.kernel_w, *self.stride, *self.padding, *self.dilation)

    def aten(self):
        """(stride, padding, dilation, transposed, output_padding, groups) for aten's convolution ops."""
        return list(self.stride), list(self.padding), list(self.dilation), False, [0, 0], self.groups


def _memory_format(input, weight, geometry, bias=None, bias_sizes=None):
    """The layout aten's convolution gives its results here (as torch's fake convolution decides it,
    so the real and the fake kernels agree): channels_last or contiguous, from the backend ATen picks."""
    backend = torch._C._select_conv_backend(input, weight, bias, *geometry.aten(), bias_sizes)
    return torch._C._conv_determine_backend_memory_format(input, weight, backend)


def _empty(shape, like, memory_format):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _convolve(x, weight, bias, geometry, activation="none", saves_projection=False):
    """act(conv(x, W) + b) and what the forward op returns with it."""
    # As torch's convolution: an input without channels gives an output without channels.
    shape = (geometry.batch, weight.shape[0] if x.shape[1] else 0, geometry.out_h, geometry.out_w)
    output = _empty(shape, x, _memory_format(x, weight, geometry, bias=bias))
    saved = torch.empty_like(output) if activation in PREACTIVATION_ACTIVATIONS else output.new_empty(0)
    projection = torch.empty_like(output) if saves_projection else output.new_empty(0)
    if output.numel():
        rows = geometry.batch * geometry.out_h * geometry.out_w
        columns, reduction = geometry.out_per_group, geometry.in_per_group * geometry.kernel_h * geometry.kernel_w
        launch(_forward_kernel,
               lambda meta: (cdiv(rows, meta["BLOCK_M"]) * cdiv(columns, meta["BLOCK_N"]),
                             geometry.groups),
               x, weight, bias if bias is not None else x, output, saved if saved.numel() else output,
               projection if saves_projection else output, *geometry.arguments(), rows_bucket_of(rows), columns, reduction,
               *x.stride(), *weight.stride(), *output.stride(), HAS_BIAS=bias is not None, ACTIVATION=activation,
               SAVES_PREACTIVATION=activation in PREACTIVATION_ACTIVATIONS, SAVES_PROJECTION=saves_projection,
               INPUT_PRECISION=input_precision(x.dtype))
    return output, saved, projection


#: _taps's tables per (stride, padding, dilation, kernel size, device): made once, as a fresh
#: host-to-device copy in every backward would wait for the GPU.
_TAPS: dict = {}


def _taps(stride, padding, dilation, kernel, device):
    """int32 [stride, kernel + 1] on device: row r = [count, the taps k with stride | r + padding -
    k dilation...], the taps that reach input positions r mod stride (the grad_input kernel's residue classes)."""
    table = []
    for residue in range(stride):
        taps = [k for k in range(kernel) if (residue + padding - k * dilation) % stride == 0]
        table.append([len(taps), *taps, *[0] * (kernel - len(taps))])
    return torch.tensor(table, dtype=torch.int32, device=device)


def _taps_tables(geometry, like):
    """(_taps along H, along W) on like's device: one cache lookup per backward."""
    # Shapes may be symbolic while tracing: hashing them would fail.
    key = None if is_fake(like) else (geometry.stride, geometry.padding, geometry.dilation, geometry.kernel_h,
                                      geometry.kernel_w, like.device)
    tables = None if key is None else _TAPS.get(key)
    if tables is None:
        tables = tuple(_taps(s, p, d, k, like.device) for s, p, d, k in
                       zip(geometry.stride, geometry.padding, geometry.dilation, (geometry.kernel_h, geometry.kernel_w)))
        if key is not None:
            _TAPS[key] = tables
    return tables


def _back(delta, weight, feedback, rng, rule, scale, distribution, input, geometry, memory_format):
    """delta B as a transposed convolution, B = T(W) made tile by tile; grad_input shaped like input."""
    grad_input = _empty(input.shape, delta, memory_format)
    if not grad_input.numel():
        return grad_input
    rows = geometry.batch * geometry.in_h * geometry.in_w
    # The cost model per call, as for Linear (linear.draws_once), on grad_input's rows (N H W): every
    # row tile would otherwise draw the whole filter again.
    if draws_once(rule, feedback is not None, rows, weight):
        # W's row-major element indices are those of its [out, in/groups * kh * kw] view: the same draws.
        b = materialise_feedback(weight.reshape(weight.shape[0], -1), None, rng, rule, scale, distribution)
        feedback, rule, rng = b.view(weight.shape), _FA, None
    stored = feedback if feedback is not None else weight
    columns, reduction = geometry.in_per_group, geometry.out_per_group * geometry.kernel_h * geometry.kernel_w
    class_rows = geometry.batch * cdiv(geometry.in_h, geometry.stride[0]) * cdiv(geometry.in_w,
                                                                                             geometry.stride[1])
    taps_h, taps_w = _taps_tables(geometry, delta)
    scale, scale_from_weight = fb.scale_argument(weight, rule, scale)
    launch(_grad_input_kernel,
           lambda meta: (cdiv(columns, meta["BLOCK_N"]) * cdiv(class_rows, meta["BLOCK_M"]),
                         geometry.groups * geometry.stride[0] * geometry.stride[1]),
           delta, weight, stored, rng, taps_h, taps_w, grad_input, *geometry.arguments(), rows_bucket_of(class_rows),
           columns, reduction, *delta.stride(), *weight.stride(), *stored.stride(), *grad_input.stride(), scale,
           RULE=rule, HAS_FEEDBACK=feedback is not None, DISTRIBUTION=distribution,
           SCALE_FROM_WEIGHT=scale_from_weight, INPUT_PRECISION=input_precision(delta.dtype))
    return grad_input


def _outer(delta, x, weight, geometry, *, grad_weight=None, grad_bias=False, grad_feedback=None, outer_scale=1.0,
           addend=None, addend_scale=0.0):
    """The filter gradient delta^T x and its epilogues: returns (grad_weight,
    grad_bias, grad_feedback), None where not asked; grad_weight is the memory format to make it in,
    grad_feedback the tensor to fill (B's layout)."""
    gw = _empty(weight.shape, x, grad_weight) if grad_weight is not None else None
    gb = None
    if grad_bias:
        gb = x.new_empty(weight.shape[0])
    gf = grad_feedback
    if weight.shape[0] and (gw is not None or gb is not None or gf is not None):
        addend_tensor = addend if addend is not None else weight
        placeholder = next(t for t in (gw, gf, gb) if t is not None)
        filter_like = gw if gw is not None else (gf if gf is not None else weight)
        needs_product = gw is not None or gf is not None
        rows = geometry.batch * geometry.out_h * geometry.out_w
        columns = geometry.in_per_group * geometry.kernel_h * geometry.kernel_w
        launch(_grad_weight_kernel,
               lambda meta: (cdiv(geometry.out_per_group, meta["BLOCK_M"])
                             * (max(cdiv(columns, meta["BLOCK_N"]), 1) if needs_product else 1), geometry.groups),
               delta, x, addend_tensor, gw if gw is not None else placeholder,
               gb if gb is not None else placeholder, gf if gf is not None else placeholder, *geometry.arguments(),
               rows_bucket_of(rows), columns, rows, *delta.stride(), *x.stride(), *addend_tensor.stride(),
               *filter_like.stride(), *(gf if gf is not None else filter_like).stride(), outer_scale, addend_scale,
               STORES_GRAD_WEIGHT=gw is not None, STORES_GRAD_BIAS=gb is not None,
               STORES_GRAD_FEEDBACK=gf is not None, HAS_ADDEND=addend is not None,
               INPUT_PRECISION=input_precision(x.dtype))
    return gw, gb, gf


def _check_conv2d(input, weight, bias, stride, padding, dilation, groups, alignment, activation) -> None:
    """The aten op's checks (csrc/aten_backend.cpp), with its messages, before any kernel runs."""
    # Each tensor property read once: every read is a call into C++ (0.1-0.2 µs), twice a step.
    shape, input_shape, dtype, device = weight.shape, input.shape, weight.dtype, weight.device
    if len(shape) != 4:
        raise RuntimeError(f"fastfa: conv2d weight must be 4-D (out, in/groups, kh, kw), got {weight.dim()}-D")
    if len(input_shape) != 4:
        raise RuntimeError(f"fastfa: conv2d input must be 4-D (N, C, H, W), got shape {list(input_shape)}")
    if not (groups >= 1 and shape[0] % groups == 0 and input_shape[1] == shape[1] * groups):
        raise RuntimeError(f"fastfa: conv2d input must have in_channels={shape[1] * groups} (groups={groups}), "
                           f"got shape {list(input_shape)}")
    check_operands(input, bias, shape[0], dtype, device, alignment, activation)
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise RuntimeError("fastfa: stride, padding and dilation must have 2 values each")
    if stride[0] < 1 or stride[1] < 1 or dilation[0] < 1 or dilation[1] < 1 or padding[0] < 0 or padding[1] < 0:
        raise RuntimeError(f"fastfa: conv2d needs stride >= 1, dilation >= 1 and padding >= 0, got stride={stride}, "
                           f"padding={padding}, dilation={dilation}")


@define_op("triton_conv2d")
def triton_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None, rng: Tensor | None,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, rule: int,
                  scale: float, distribution: int, alignment: Sequence[float],
                  activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """fastfa::conv2d on Triton: (output, activation_saved, projection), see the module docstring.

    input (N, C, H, W), weight and feedback (C_out, C/groups, kh, kw), bias (C_out,);
    activation_saved is z = conv(x, W) + b for gelu / gelu_tanh / silu, else empty;
    projection is r = conv(x, W) (no bias) for aa and ia, else empty.
    """
    _check_conv2d(input, weight, bias, stride, padding, dilation, groups, alignment, activation)
    fb.check_feedback_arguments(weight, feedback, rng, rule, scale, distribution)
    reason = unsupported_reason(weight)
    if reason is not None:
        _backend.record_fallback("triton_conv2d", reason)
        return torch.ops.fastfa.conv2d.default(input, weight, bias, feedback, rng, stride, padding, dilation, groups,
                                               rule, scale, distribution, alignment, activation)
    geometry = _Geometry(input.shape, weight.shape, stride, padding, dilation, groups)
    return _convolve(input, weight, bias, geometry, activation, saves_projection=rule in (_AA, _IA))


def _feedback_gradient(rule, feedback, weight, delta, x, projection, rng, alignment, geometry, grad_weight,
                       grad_bias):
    """The estimated rules' B gradient (learning-rules.md, conv primitives as conv2d_backward in C++),
    with grad_weight / grad_bias when asked. Returns (grad_weight, grad_bias, grad_feedback)."""
    alpha, beta, gamma, sigma = alignment
    batch = max(geometry.batch, 1)
    gf = feedback.new_empty(feedback.shape).contiguous(memory_format=suggest_memory_format(feedback))
    if rule == _KP:  # grad_W + alpha * decay, from the grad_weight accumulator
        return _outer(delta, x, weight, geometry, grad_weight=grad_weight, grad_bias=grad_bias, grad_feedback=gf,
                      addend=feedback, addend_scale=2.0 * alpha)
    gw, gb, _ = _outer(delta, x, weight, geometry, grad_weight=grad_weight, grad_bias=grad_bias)
    if rule == _SA:  # alpha * decay + beta * self
        gf.copy_(feedback * (2.0 * alpha) - weight * beta)
    elif rule == _WM:  # alpha * decay + beta * amp, with x replaced by noise ~ N(0, sigma^2)
        noise = draw_noise(x, rng, sigma, 1)
        noise_projection, _, _ = _convolve(noise, weight, None, geometry)
        _outer(noise_projection, noise, weight, geometry, grad_feedback=gf, outer_scale=-beta / batch,
               addend=feedback, addend_scale=2.0 * alpha)
    elif rule == _AA:  # alpha * sparse + beta * amp = (1/N) (2 alpha p - beta r)^T x, p = conv(x, B)
        p, _, _ = _convolve(x, feedback, None, geometry)
        _outer(p * (2.0 * alpha) - projection * beta, x, weight, geometry, grad_feedback=gf,
               outer_scale=1.0 / batch)
    else:  # ia: alpha * amp + beta * null + gamma * decay, linear in outer's x
        r_b = _back(projection, feedback, feedback, None, _KP, 1.0, 0, x, geometry, suggest_memory_format(x))
        _outer(projection, x * (-alpha / batch) + r_b * (2.0 * beta / batch), weight, geometry,
               grad_feedback=gf, addend=feedback, addend_scale=2.0 * gamma)
    return gw, gb, gf


@define_op("triton_conv2d_backward")
def triton_conv2d_backward(grad_output: Tensor, input: Tensor, weight: Tensor, feedback: Tensor | None,
                           rng: Tensor | None, activation_saved: Tensor, projection: Tensor, stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], groups: int, rule: int, scale: float,
                           distribution: int, alignment: Sequence[float], activation: str,
                           output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fastfa::conv2d_backward on Triton: (grad_input, grad_weight, grad_bias, grad_feedback).

    grad_input = the transposed convolution of delta with B (B = T(W) per rule, fused),
    grad_weight = conv2d_weight(x, W.shape, delta), grad_bias = delta summed over (N, H, W),
    grad_feedback = the estimated rules' B gradient; delta = act'(grad_output). Masked-out
    (and non-estimated grad_feedback) outputs come back empty.
    """
    _check_conv2d(input, weight, None, stride, padding, dilation, groups, alignment, activation)
    fb.check_feedback_arguments(weight, feedback, rng, rule, scale, distribution)
    geometry = _Geometry(input.shape, weight.shape, stride, padding, dilation, groups)
    expected = [geometry.batch, weight.shape[0], geometry.out_h, geometry.out_w]
    if list(grad_output.shape) != expected:
        raise RuntimeError(f"fastfa: grad_output must have the output's shape {expected}, got "
                           f"{list(grad_output.shape)}")
    feedback_grad = output_mask[3] and rule >= _KP
    if feedback_grad and rule in (_AA, _IA) and list(projection.shape) != expected:
        raise RuntimeError(f"fastfa: rule {rule} needs projection = conv2d(x, W) of shape {expected} (the forward "
                           f"op's third output), got shape {list(projection.shape)}")
    reason = unsupported_reason(weight)
    if reason is not None:
        _backend.record_fallback("triton_conv2d_backward", reason)
        return torch.ops.fastfa.conv2d_backward.default(grad_output, input, weight, feedback, rng, activation_saved,
                                                        projection, stride, padding, dilation, groups, rule, scale,
                                                        distribution, alignment, activation, output_mask)
    delta = activation_delta(grad_output, activation_saved, activation)
    # The aten op hands B (a stored one as it is) to convolution_backward in W's place.
    filter = feedback if output_mask[0] and feedback is not None and (rule == _FA or rule >= _KP) else weight
    memory_format = _memory_format(input, filter, geometry, bias_sizes=[weight.shape[0]] if output_mask[2] else None)
    grad_weight_format = memory_format if output_mask[1] else None
    grad_input = grad_weight = grad_bias = grad_feedback = None
    if output_mask[0]:
        grad_input = _back(delta, weight, feedback, rng, rule, scale, distribution, input, geometry, memory_format)
    if feedback_grad:
        grad_weight, grad_bias, grad_feedback = _feedback_gradient(
            rule, feedback, weight, delta, input, projection, rng, alignment, geometry, grad_weight_format,
            output_mask[2])
    elif output_mask[1] or output_mask[2]:
        grad_weight, grad_bias, _ = _outer(delta, input, weight, geometry, grad_weight=grad_weight_format,
                                           grad_bias=output_mask[2])
    return (grad_input if grad_input is not None else input.new_empty(0),
            grad_weight if grad_weight is not None else weight.new_empty(0),
            grad_bias if grad_bias is not None else weight.new_empty(0),
            grad_feedback if grad_feedback is not None else weight.new_empty(0))


_ops.register_conv2d_autograd("fastfa::triton_conv2d", torch.ops.fastfa.triton_conv2d_backward)
