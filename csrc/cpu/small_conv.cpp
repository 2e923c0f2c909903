// Direct CPU loops for a small conv2d's maps (fastfa/small_conv.h). One routine per map serves
// every estimated rule, any stride / padding / dilation / groups, and any input layout (the
// input is read through its strides; grad_output and the filter are made contiguous, a no-op for
// the B gradient's own intermediates).
// Each output element is one sum in the dtype's accumulation type (fp32 for fp16 / bf16, as
// ATen's CPU kernels, and as the aten path's fp32 widening of bf16), rounded once at the end.
#include "fastfa/small_conv.h"
#include "fastfa/ops.h"

#include "conv_taps.h"

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fastfa {
namespace {

// Multiply-adds (per map) at and below which the direct loops run in place of ATen's calls: the
// crossover measured on this project's 2-core CPU at one torch thread, in fp32 and fp64, 3x3 and 1x1
// filters, groups 1 and 2 (method and results: benchmarks/results/2026-12-01-cpu-host-smallconv.md).
// 3x3 filters break even at ~24k in fp64 and ~32k in fp32, 1x1 filters (one tap: the loops' least
// favourable case) at ~12k; fp32 at batch > 1, where ATen picks oneDNN (~45 us a call at these
// sizes), gains far above it.
constexpr int64_t kSmallConvMaxMacs = 12288;

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// One convolution's sizes: input (batch, channels, height, width), filter (out_channels,
// group_in, kernel_h, kernel_w), output (batch, out_channels, out_h, out_w); `taps` holds one
// plane's geometry and the tap walk (conv_taps.h).
struct Geometry {
  int64_t batch, channels, out_channels, group_in, group_out; // group_out: out_channels / groups
  int64_t positions, tap_count;                               // out_h * out_w, group_in * kernel_h * kernel_w
  ConvTaps taps;

  Geometry(at::IntArrayRef input, at::IntArrayRef filter, at::IntArrayRef output, at::IntArrayRef stride,
           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups)
      : batch(input[0]), channels(input[1]), out_channels(filter[0]), group_in(filter[1]),
        group_out(filter[0] / groups), positions(output[2] * output[3]), tap_count(filter[1] * filter[2] * filter[3]),
        taps(input[2], input[3], output[2], output[3], filter[2], filter[3], stride, padding, dilation) {}
};

void check_geometry(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fastfa: stride, padding and dilation must have 2 values each");
  TORCH_CHECK(groups >= 1, "fastfa: groups must be positive, got ", groups);
}

void check_operands(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4 && a.scalar_type() == b.scalar_type() && a.is_cpu() && b.is_cpu(),
              "fastfa: small conv2d operands must be 4-D CPU tensors of one dtype, got ", a.sizes(), " ",
              a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
}

at::Tensor new_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
}

// The input under each filter tap of one group of channels, zero in the padding, in opmath: column
// k = (c, kh, kw), position p = (oh, ow), at cols[k * positions + p]. The three maps are then
// products of dense matrices whose inner loops run over one contiguous row (independent sums the
// compiler vectorises), where loops over each tap's shifted rows would spend more on loop control
// than on a small map's few multiply-adds. The filter gradient's products read the transpose
// (by_position), so that one unfold's code serves every map: in a training step these routines run
// cold, and their instruction-cache misses and mispredicts, not their arithmetic, are most of what
// they cost (benchmarks/results/2026-12-02-cpu-host-estimated.md). ia's B gradient, the one that
// takes the copy where a second unfold wrote that order directly, timed the same either way.
template <typename scalar_t>
void unfold(const Geometry& g, const scalar_t* x_group, Strides xs, at::opmath_type<scalar_t>* cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = g.positions, taps = g.tap_count, out_w = g.taps.out_w, stride_w = g.taps.stride_w;
  std::fill(cols, cols + positions * taps, acc_t(0));
  for_each_tap_row(g.taps, 0, g.group_in, [&](int64_t k, int64_t c, int64_t oh, int64_t ih, Span columns,
                                              int64_t column_offset) {
    const scalar_t* x_row = x_group + c * xs.c + ih * xs.h;
    acc_t* tap = cols + k * positions + oh * out_w;
    for (int64_t ow = columns.first; ow < columns.last; ++ow) {
      tap[ow] = static_cast<acc_t>(x_row[(ow * stride_w + column_offset) * xs.w]);
    }
  });
}

// cols (taps x positions) as positions x taps, at by_position.
template <typename acc_t>
void by_position(const acc_t* cols, int64_t taps, int64_t positions, acc_t* transposed) {
  for (int64_t k = 0; k < taps; ++k) {
    for (int64_t p = 0; p < positions; ++p) transposed[p * taps + k] = cols[k * positions + p];
  }
}

// The unfold's buffer, kept per thread between calls (where small_conv2d_applies, at most three times
// kSmallConvMaxMacs values: a map's unfold has at most as many elements as it has multiply-adds).
// A fresh one per call is a heap request of a few KiB, and inside a training step, after the step's
// many small frees, glibc consolidates its fast bins before serving such a request: ~1 us a map.
template <typename acc_t>
acc_t* unfold_buffer(int64_t size) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// The sums run in opmath (acc_t): into the output itself for fp32 / fp64, else into `buffer`, whose
// values are rounded once into the output by the epilogue.
template <typename scalar_t>
using Accumulator = std::vector<at::opmath_type<scalar_t>>;

template <typename scalar_t>
at::opmath_type<scalar_t>* accumulator(Accumulator<scalar_t>& buffer, scalar_t* out, int64_t size) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::fill(out, out + size, acc_t(0));
    return out;
  } else {
    buffer.assign(size, acc_t(0));
    return buffer.data();
  }
}

// The Epilogue for the loops: out = scale * sum + addend_scale * addend, computed in opmath and
// rounded once, so that the rules' scale and add cost no ATen op: one more pass over the output,
// in cache, by the routine that wrote it (none for fp32 / fp64 without an epilogue).
template <typename scalar_t>
struct Finish {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t scale, addend_scale;
  const scalar_t* addend; // dense, the output's shape; nullptr: none

  // out[i] for i < size from sum[i] (out itself for fp32 / fp64) and addend[offset + i].
  void operator()(const acc_t* sum, scalar_t* out, int64_t offset, int64_t size) const {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      if (scale == acc_t(1) && addend == nullptr) return; // the sums are the output already
    }
    if (addend == nullptr) {
      for (int64_t i = 0; i < size; ++i) out[i] = static_cast<scalar_t>(scale * sum[i]);
      return;
    }
    const scalar_t* a = addend + offset;
    for (int64_t i = 0; i < size; ++i) {
      out[i] = static_cast<scalar_t>(scale * sum[i] + addend_scale * static_cast<acc_t>(a[i]));
    }
  }

  // sum[i] for i < size as the map's output holds it (the same values as operator()), back in opmath,
  // in place: what a following product reads where the output is never stored.
  void round(acc_t* sum, int64_t offset, int64_t size) const {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      (*this)(sum, sum, offset, size);
    } else if (addend == nullptr) {
      for (int64_t i = 0; i < size; ++i) sum[i] = static_cast<acc_t>(static_cast<scalar_t>(scale * sum[i]));
    } else {
      const scalar_t* a = addend + offset;
      for (int64_t i = 0; i < size; ++i) {
        sum[i] = static_cast<acc_t>(static_cast<scalar_t>(scale * sum[i] + addend_scale * static_cast<acc_t>(a[i])));
      }
    }
  }
};

// out[j] += sum over i < count of coefficient(i) * row(i)[j], for j < width, i ascending: each map's
// products are this one sum. Its sums stay in registers kBlock columns at a time (with them in memory,
// a loop over i stores and reloads each one every i: a store-to-load latency per step that is most
// of a small map's time); the last width % kBlock columns sum in memory.
constexpr int64_t kBlock = 16;

template <typename acc_t, typename Coefficient, typename Row>
inline void add_products(acc_t* out, int64_t width, int64_t count, Coefficient coefficient, Row row) {
  int64_t j0 = 0;
  for (; j0 + kBlock <= width; j0 += kBlock) {
    acc_t sums[kBlock];
    for (int64_t j = 0; j < kBlock; ++j) sums[j] = out[j0 + j];
    for (int64_t i = 0; i < count; ++i) {
      const acc_t c = coefficient(i);
      const auto* values = row(i) + j0;
      for (int64_t j = 0; j < kBlock; ++j) sums[j] += c * static_cast<acc_t>(values[j]);
    }
    for (int64_t j = 0; j < kBlock; ++j) out[j0 + j] = sums[j];
  }
  for (int64_t i = 0; j0 < width && i < count; ++i) {
    const acc_t c = coefficient(i);
    const auto* values = row(i);
    for (int64_t j = j0; j < width; ++j) out[j] += c * static_cast<acc_t>(values[j]);
  }
}

// sum[p] += sum over k of filter_row[k] * cols[k, p]: one output channel of a convolution.
template <typename scalar_t, typename acc_t>
inline void project_row(const Geometry& g, const scalar_t* filter_row, const acc_t* cols, acc_t* sum) {
  add_products(sum, g.positions, g.tap_count, [&](int64_t k) { return static_cast<acc_t>(filter_row[k]); },
               [&](int64_t k) { return cols + k * g.positions; });
}

// y[n, o, p] = sum over k of w[o, k] * cols[k, p]. w: the filter, contiguous.
template <typename scalar_t>
void convolve(const Geometry& g, const scalar_t* x, Strides xs, const scalar_t* w, scalar_t* y,
              const Finish<scalar_t>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = g.positions, taps = g.tap_count;
  acc_t* cols = unfold_buffer<acc_t>(positions * taps);
  Accumulator<scalar_t> buffer;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o0 = 0; o0 < g.out_channels; o0 += g.group_out) {
      unfold(g, x + n * xs.n + (o0 / g.group_out) * g.group_in * xs.c, xs, cols);
      for (int64_t o = o0; o < o0 + g.group_out; ++o) {
        const int64_t offset = (n * g.out_channels + o) * positions;
        acc_t* sum = accumulator<scalar_t>(buffer, y + offset, positions);
        project_row(g, w + o * taps, cols, sum);
        finish(sum, y + offset, offset, positions);
      }
    }
  }
}

// grad[o, k] = sum over (n, p) of plane(n, o)[p] * cols_n[p, k] (then the epilogue): a filter gradient
// against input x, whose planes r[n, o] the caller gives: plane(n, o, cols_n, scratch) returns a pointer
// to positions values (scalar_t or opmath), and may compute them from x's unfold cols_n (by tap) into
// `scratch`, scratch_size opmath values kept per thread with the unfold.
template <typename scalar_t, typename Plane>
void outer_with_input(const Geometry& g, const scalar_t* x, Strides xs, int64_t scratch_size, scalar_t* grad,
                      const Finish<scalar_t>& finish, Plane plane) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = g.positions, taps = g.tap_count;
  acc_t* cols = unfold_buffer<acc_t>(2 * positions * taps + scratch_size);
  acc_t* transposed = cols + positions * taps;
  acc_t* scratch = transposed + positions * taps;
  Accumulator<scalar_t> buffer;
  acc_t* sum = accumulator<scalar_t>(buffer, grad, g.out_channels * taps);
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o0 = 0; o0 < g.out_channels; o0 += g.group_out) {
      unfold(g, x + n * xs.n + (o0 / g.group_out) * g.group_in * xs.c, xs, cols);
      by_position(cols, taps, positions, transposed);
      for (int64_t o = o0; o < o0 + g.group_out; ++o) {
        const auto* r = plane(n, o, cols, scratch);
        add_products(sum + o * taps, taps, positions, [&](int64_t p) { return static_cast<acc_t>(r[p]); },
                     [&](int64_t p) { return transposed + p * taps; });
      }
    }
  }
  finish(sum, grad, 0, g.out_channels * taps);
}

// grad[o, k] = sum over (n, p) of r[n, o, p] * cols_n[p, k]. r: contiguous.
template <typename scalar_t>
void filter_gradient(const Geometry& g, const scalar_t* r, const scalar_t* x, Strides xs, scalar_t* grad,
                     const Finish<scalar_t>& finish) {
  outer_with_input(g, x, xs, 0, grad, finish, [&](int64_t n, int64_t o, const auto*, auto*) {
    return r + (n * g.out_channels + o) * g.positions;
  });
}

// The same with r = conv2d(x, w) (then `projected`, rounded to the dtype as the convolution's output would
// be): the filter gradient against the convolution of the same input, the same sums as convolve then
// filter_gradient with one unfold for both products and no r tensor between them (wm's noise, aa's input).
// w: the filter, contiguous.
template <typename scalar_t>
void projection_outer(const Geometry& g, const scalar_t* x, Strides xs, const scalar_t* w,
                      const Finish<scalar_t>& projected, scalar_t* grad, const Finish<scalar_t>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  outer_with_input(g, x, xs, g.positions, grad, finish, [&](int64_t n, int64_t o, const acc_t* cols, acc_t* r) {
    std::fill(r, r + g.positions, acc_t(0));
    project_row(g, w + o * g.tap_count, cols, r);
    projected.round(r, (n * g.out_channels + o) * g.positions, g.positions);
    return static_cast<const acc_t*>(r);
  });
}

// grad[n] = fold(cols) with cols[k, p] = sum over o of w[o, k] * r[n, o, p]. r, w: contiguous.
template <typename scalar_t>
void transposed_convolve(const Geometry& g, const scalar_t* r, const scalar_t* w, scalar_t* grad,
                         const Finish<scalar_t>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = g.positions, taps = g.tap_count, plane = g.taps.height * g.taps.width;
  acc_t* cols = unfold_buffer<acc_t>(positions * taps);
  Accumulator<scalar_t> buffer;
  acc_t* sum = accumulator<scalar_t>(buffer, grad, g.batch * g.channels * plane);
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o0 = 0; o0 < g.out_channels; o0 += g.group_out) {
      std::fill(cols, cols + positions * taps, acc_t(0));
      const scalar_t* r_planes = r + (n * g.out_channels + o0) * positions;
      for (int64_t k = 0; k < taps; ++k) {
        add_products(cols + k * positions, positions, g.group_out,
                     [&](int64_t i) { return static_cast<acc_t>(w[(o0 + i) * taps + k]); },
                     [&](int64_t i) { return r_planes + i * positions; });
      }
      fold_into(g.taps, 0, g.group_in, cols, /*tap_stride=*/positions, /*position_stride=*/1,
                sum + (n * g.channels + (o0 / g.group_out) * g.group_in) * plane);
    }
  }
  finish(sum, grad, 0, g.batch * g.channels * plane);
}

// The epilogue's addend, dense, checked against the map's output (the caller's tensors: B, x or r).
at::Tensor dense_addend(const Epilogue& epilogue, at::IntArrayRef output_sizes, at::ScalarType dtype) {
  if (epilogue.addend == nullptr) return at::Tensor();
  const at::Tensor& addend = *epilogue.addend;
  TORCH_CHECK(addend.sizes() == output_sizes && addend.scalar_type() == dtype && addend.is_cpu(),
              "fastfa: a small conv2d map's addend must be a CPU tensor of shape ", output_sizes, " and dtype ", dtype,
              ", got ", addend.sizes(), " ", addend.scalar_type(), " on ", addend.device());
  return addend.contiguous();
}

template <typename scalar_t>
Finish<scalar_t> finish_of(const Epilogue& epilogue, const at::Tensor& addend) {
  using acc_t = at::opmath_type<scalar_t>;
  return {static_cast<acc_t>(epilogue.scale), static_cast<acc_t>(epilogue.addend_scale),
          addend.defined() ? addend.const_data_ptr<scalar_t>() : nullptr};
}

} // namespace

bool small_conv2d_applies(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef output_sizes,
                          int64_t groups) {
  const auto dtype = input.scalar_type();
  if (!input.is_cpu() || !weight.is_cpu() || weight.scalar_type() != dtype || input.dim() != 4 ||
      weight.dim() != 4 || output_sizes.size() != 4 || groups < 1 ||
      !(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16)) {
    return false;
  }
  // Each factor is checked before the product, so that no huge layer overflows it.
  const int64_t limit = kSmallConvMaxMacs;
  const int64_t outputs = c10::multiply_integers(output_sizes);
  const int64_t per_output = weight.size(1) * weight.size(2) * weight.size(3);
  return outputs <= limit && per_output <= limit && outputs * per_output <= limit;
}

at::Tensor small_conv2d(const at::Tensor& input, const at::Tensor& filter, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const Epilogue& epilogue) {
  check_operands(input, filter);
  check_geometry(stride, padding, dilation, groups);
  const std::vector<int64_t> output = conv2d_output_shape(input, filter, stride, padding, dilation);
  const Geometry g(input.sizes(), filter.sizes(), output, stride, padding, dilation, groups);
  at::Tensor y = new_output(output, input.scalar_type());
  const at::Tensor dense_filter = filter.contiguous(), addend = dense_addend(epilogue, output, input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastfa_small_conv2d", [&] {
    convolve<scalar_t>(g, input.const_data_ptr<scalar_t>(), strides_of(input), dense_filter.const_data_ptr<scalar_t>(),
                       y.mutable_data_ptr<scalar_t>(), finish_of<scalar_t>(epilogue, addend));
  });
  return y;
}

at::Tensor small_conv2d_weight(const at::Tensor& grad_output, const at::Tensor& input,
                               at::IntArrayRef weight_sizes, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, const Epilogue& epilogue) {
  check_operands(grad_output, input);
  check_geometry(stride, padding, dilation, groups);
  const Geometry g(input.sizes(), weight_sizes, grad_output.sizes(), stride, padding, dilation, groups);
  at::Tensor grad = new_output(weight_sizes, input.scalar_type());
  const at::Tensor dense_grad_output = grad_output.contiguous(),
                   addend = dense_addend(epilogue, weight_sizes, input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastfa_small_conv2d_weight", [&] {
    filter_gradient<scalar_t>(g, dense_grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                              strides_of(input), grad.mutable_data_ptr<scalar_t>(),
                              finish_of<scalar_t>(epilogue, addend));
  });
  return grad;
}

at::Tensor small_conv2d_projection_outer(const at::Tensor& input, const at::Tensor& filter, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        const Epilogue& projected, const Epilogue& epilogue) {
  check_operands(input, filter);
  check_geometry(stride, padding, dilation, groups);
  const std::vector<int64_t> output = conv2d_output_shape(input, filter, stride, padding, dilation);
  const Geometry g(input.sizes(), filter.sizes(), output, stride, padding, dilation, groups);
  at::Tensor grad = new_output(filter.sizes(), input.scalar_type());
  const at::Tensor dense_filter = filter.contiguous(),
                   projection_addend = dense_addend(projected, output, input.scalar_type()),
                   addend = dense_addend(epilogue, filter.sizes(), input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastfa_small_conv2d_outer", [&] {
    projection_outer<scalar_t>(g, input.const_data_ptr<scalar_t>(), strides_of(input),
                               dense_filter.const_data_ptr<scalar_t>(),
                               finish_of<scalar_t>(projected, projection_addend), grad.mutable_data_ptr<scalar_t>(),
                               finish_of<scalar_t>(epilogue, addend));
  });
  return grad;
}

at::Tensor small_conv2d_input(const at::Tensor& grad_output, const at::Tensor& filter, at::IntArrayRef input_sizes,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, const Epilogue& epilogue) {
  check_operands(grad_output, filter);
  check_geometry(stride, padding, dilation, groups);
  const Geometry g(input_sizes, filter.sizes(), grad_output.sizes(), stride, padding, dilation, groups);
  at::Tensor grad = new_output(input_sizes, grad_output.scalar_type());
  const at::Tensor dense_grad_output = grad_output.contiguous(), dense_filter = filter.contiguous(),
                   addend = dense_addend(epilogue, input_sizes, grad_output.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "fastfa_small_conv2d_input", [&] {
    transposed_convolve<scalar_t>(g, dense_grad_output.const_data_ptr<scalar_t>(), dense_filter.const_data_ptr<scalar_t>(),
                                  grad.mutable_data_ptr<scalar_t>(), finish_of<scalar_t>(epilogue, addend));
  });
  return grad;
}

} // namespace fastfa
