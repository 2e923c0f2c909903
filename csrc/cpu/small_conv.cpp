// Direct CPU loops for a small conv2d's three maps (fastfa/small_conv.h). One routine per map
// serves every estimated rule, any stride / padding / dilation / groups, and any input layout (the
// input is read through its strides; grad_output and the filter are made contiguous, a no-op for
// the B gradient's own intermediates).
// Each output element is one sum in the dtype's accumulation type (fp32 for fp16 / bf16, as
// ATen's CPU kernels, and as the aten path's fp32 widening of bf16), rounded once at the end.
#include "fastfa/small_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/SmallVector.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace fastfa {
namespace {

// Multiply-adds (per map) at and below which the direct loops run in place of ATen's calls: the
// crossover measured on this project's 2-core CPU at one torch thread, in fp32 and fp64, 3x3 and 1x1
// filters, groups 1 and 2 (benchmarks/small_conv_threshold.py; results in
// benchmarks/results/2026-12-01-cpu-host-smallconv.md). 3x3 filters break even at ~24k in fp64 and
// ~32k in fp32, 1x1 filters (one tap: the loops' least favourable case) at ~12k; fp32 at batch > 1,
// where ATen picks oneDNN (~45 us a call at these sizes), gains far above it.
constexpr int64_t kSmallConvMaxMacs = 12288;

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// [first, last): the output positions o in [0, outputs) whose input position o * stride + offset
// lies in [0, size), so that the inner loops run without a bounds test per element.
struct Span {
  int64_t first, last;
};

Span valid_outputs(int64_t offset, int64_t stride, int64_t size, int64_t outputs) {
  const auto ceil_div = [stride](int64_t a) { return a > 0 ? (a + stride - 1) / stride : 0; };
  const int64_t first = ceil_div(-offset);
  return {first, std::max(first, std::min(outputs, ceil_div(size - offset)))};
}

// One convolution's sizes: input (batch, channels, height, width), filter (out_channels,
// group_in, kernel_h, kernel_w), output (batch, out_channels, out_h, out_w).
struct Geometry {
  int64_t batch, channels, height, width;
  int64_t out_channels, group_in, kernel_h, kernel_w;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t group_out; // out_channels / groups

  Geometry(at::IntArrayRef input, at::IntArrayRef filter, at::IntArrayRef output, at::IntArrayRef stride,
           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups)
      : batch(input[0]), channels(input[1]), height(input[2]), width(input[3]), out_channels(filter[0]),
        group_in(filter[1]), kernel_h(filter[2]), kernel_w(filter[3]), out_h(output[2]), out_w(output[3]),
        stride_h(stride[0]), stride_w(stride[1]), pad_h(padding[0]), pad_w(padding[1]), dilation_h(dilation[0]),
        dilation_w(dilation[1]), group_out(filter[0] / groups) {
    for (int64_t kh = 0; kh < kernel_h; ++kh) {
      rows.push_back(valid_outputs(kh * dilation_h - pad_h, stride_h, height, out_h));
    }
    for (int64_t kw = 0; kw < kernel_w; ++kw) {
      columns.push_back(valid_outputs(kw * dilation_w - pad_w, stride_w, width, out_w));
    }
  }

  // Per filter row kh (column kw), the output rows (columns) that see the input, not its padding:
  // computed once, as their divisions would cost more than a small map's arithmetic in the loops.
  c10::SmallVector<Span, 8> rows, columns;
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
// k = (c, kh, kw), position p = (oh, ow); at cols[k * positions + p] (by_tap), else at
// cols[p * taps + k]. The three maps are then products of dense matrices whose inner loops run over
// one contiguous row (independent sums the compiler vectorises), where loops over each tap's shifted
// rows would spend more on loop control than on a small map's few multiply-adds.
template <bool by_tap, typename scalar_t>
void unfold(const Geometry& g, const scalar_t* x_group, Strides xs, at::opmath_type<scalar_t>* cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = g.out_h * g.out_w, taps = g.group_in * g.kernel_h * g.kernel_w;
  std::fill(cols, cols + positions * taps, acc_t(0));
  for (int64_t c = 0, k = 0; c < g.group_in; ++c) {
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t row_offset = kh * g.dilation_h - g.pad_h;
      for (int64_t kw = 0; kw < g.kernel_w; ++kw, ++k) {
        const int64_t column_offset = kw * g.dilation_w - g.pad_w;
        const Span rows = g.rows[kh], columns = g.columns[kw];
        for (int64_t oh = rows.first; oh < rows.last; ++oh) {
          const scalar_t* x_row = x_group + c * xs.c + (oh * g.stride_h + row_offset) * xs.h;
          for (int64_t ow = columns.first; ow < columns.last; ++ow) {
            const int64_t p = oh * g.out_w + ow;
            cols[by_tap ? k * positions + p : p * taps + k] =
                static_cast<acc_t>(x_row[(ow * g.stride_w + column_offset) * xs.w]);
          }
        }
      }
    }
  }
}

// unfold's adjoint: adds column k's values at each position p to the input element under tap k there.
template <typename acc_t>
void fold_into(const Geometry& g, const acc_t* cols, acc_t* group_planes) {
  const int64_t positions = g.out_h * g.out_w;
  for (int64_t c = 0, k = 0; c < g.group_in; ++c) {
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t row_offset = kh * g.dilation_h - g.pad_h;
      for (int64_t kw = 0; kw < g.kernel_w; ++kw, ++k) {
        const int64_t column_offset = kw * g.dilation_w - g.pad_w;
        const Span rows = g.rows[kh], columns = g.columns[kw];
        for (int64_t oh = rows.first; oh < rows.last; ++oh) {
          acc_t* plane_row = group_planes + (c * g.height + oh * g.stride_h + row_offset) * g.width;
          const acc_t* col = cols + k * positions + oh * g.out_w;
          for (int64_t ow = columns.first; ow < columns.last; ++ow) {
            plane_row[ow * g.stride_w + column_offset] += col[ow];
          }
        }
      }
    }
  }
}

// The sums run in opmath (acc_t): into the output itself for fp32 / fp64, else into `buffer`, whose
// values are rounded once into the output.
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

template <typename scalar_t>
void round_into(const Accumulator<scalar_t>& buffer, scalar_t* out) {
  if constexpr (!std::is_same_v<at::opmath_type<scalar_t>, scalar_t>) {
    std::copy(buffer.begin(), buffer.end(), out);
  }
}

// y[n, o, p] = sum over k of w[o, k] * cols[k, p]. w: the filter, contiguous.
template <typename scalar_t>
void convolve(const Geometry& g, const scalar_t* x, Strides xs, const scalar_t* w, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = g.out_h * g.out_w, taps = g.group_in * g.kernel_h * g.kernel_w;
  std::vector<acc_t> cols(positions * taps);
  Accumulator<scalar_t> buffer;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o0 = 0; o0 < g.out_channels; o0 += g.group_out) {
      unfold<true>(g, x + n * xs.n + (o0 / g.group_out) * g.group_in * xs.c, xs, cols.data());
      for (int64_t o = o0; o < o0 + g.group_out; ++o) {
        scalar_t* y_plane = y + (n * g.out_channels + o) * positions;
        acc_t* sum = accumulator<scalar_t>(buffer, y_plane, positions);
        for (int64_t k = 0; k < taps; ++k) {
          const acc_t tap = static_cast<acc_t>(w[o * taps + k]);
          const acc_t* col = cols.data() + k * positions;
          for (int64_t p = 0; p < positions; ++p) {
            sum[p] += tap * col[p];
          }
        }
        round_into<scalar_t>(buffer, y_plane);
      }
    }
  }
}

// grad[o, k] = sum over (n, p) of r[n, o, p] * cols_n[p, k]. r: contiguous.
template <typename scalar_t>
void filter_gradient(const Geometry& g, const scalar_t* r, const scalar_t* x, Strides xs, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = g.out_h * g.out_w, taps = g.group_in * g.kernel_h * g.kernel_w;
  std::vector<acc_t> cols(positions * taps);
  Accumulator<scalar_t> buffer;
  acc_t* sum = accumulator<scalar_t>(buffer, grad, g.out_channels * taps);
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o0 = 0; o0 < g.out_channels; o0 += g.group_out) {
      unfold<false>(g, x + n * xs.n + (o0 / g.group_out) * g.group_in * xs.c, xs, cols.data());
      for (int64_t o = o0; o < o0 + g.group_out; ++o) {
        const scalar_t* r_plane = r + (n * g.out_channels + o) * positions;
        acc_t* sum_row = sum + o * taps;
        for (int64_t p = 0; p < positions; ++p) {
          const acc_t value = static_cast<acc_t>(r_plane[p]);
          const acc_t* col = cols.data() + p * taps;
          for (int64_t k = 0; k < taps; ++k) {
            sum_row[k] += value * col[k];
          }
        }
      }
    }
  }
  round_into<scalar_t>(buffer, grad);
}

// grad[n] = fold(cols) with cols[k, p] = sum over o of w[o, k] * r[n, o, p]. r, w: contiguous.
template <typename scalar_t>
void transposed_convolve(const Geometry& g, const scalar_t* r, const scalar_t* w, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = g.out_h * g.out_w, taps = g.group_in * g.kernel_h * g.kernel_w;
  std::vector<acc_t> cols(positions * taps);
  Accumulator<scalar_t> buffer;
  acc_t* sum = accumulator<scalar_t>(buffer, grad, g.batch * g.channels * g.height * g.width);
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o0 = 0; o0 < g.out_channels; o0 += g.group_out) {
      std::fill(cols.begin(), cols.end(), acc_t(0));
      for (int64_t o = o0; o < o0 + g.group_out; ++o) {
        const scalar_t* r_plane = r + (n * g.out_channels + o) * positions;
        for (int64_t k = 0; k < taps; ++k) {
          const acc_t tap = static_cast<acc_t>(w[o * taps + k]);
          acc_t* col = cols.data() + k * positions;
          for (int64_t p = 0; p < positions; ++p) {
            col[p] += tap * static_cast<acc_t>(r_plane[p]);
          }
        }
      }
      fold_into(g, cols.data(), sum + (n * g.channels + (o0 / g.group_out) * g.group_in) * g.height * g.width);
    }
  }
  round_into<scalar_t>(buffer, grad);
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
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_operands(input, filter);
  check_geometry(stride, padding, dilation, groups);
  std::array<int64_t, 4> output{input.size(0), filter.size(0), 0, 0};
  for (int axis = 0; axis < 2; ++axis) {
    output[2 + axis] = (input.size(2 + axis) + 2 * padding[axis] - dilation[axis] * (filter.size(2 + axis) - 1) - 1) /
                           stride[axis] + 1;
  }
  const Geometry g(input.sizes(), filter.sizes(), output, stride, padding, dilation, groups);
  at::Tensor y = new_output(output, input.scalar_type());
  const at::Tensor dense_filter = filter.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastfa_small_conv2d", [&] {
    convolve<scalar_t>(g, input.const_data_ptr<scalar_t>(), strides_of(input), dense_filter.const_data_ptr<scalar_t>(),
                       y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor small_conv2d_weight(const at::Tensor& grad_output, const at::Tensor& input,
                               at::IntArrayRef weight_sizes, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  check_operands(grad_output, input);
  check_geometry(stride, padding, dilation, groups);
  const Geometry g(input.sizes(), weight_sizes, grad_output.sizes(), stride, padding, dilation, groups);
  at::Tensor grad = new_output(weight_sizes, input.scalar_type());
  const at::Tensor dense_grad_output = grad_output.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastfa_small_conv2d_weight", [&] {
    filter_gradient<scalar_t>(g, dense_grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                              strides_of(input), grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

at::Tensor small_conv2d_input(const at::Tensor& grad_output, const at::Tensor& filter, at::IntArrayRef input_sizes,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  check_operands(grad_output, filter);
  check_geometry(stride, padding, dilation, groups);
  const Geometry g(input_sizes, filter.sizes(), grad_output.sizes(), stride, padding, dilation, groups);
  at::Tensor grad = new_output(input_sizes, grad_output.scalar_type());
  const at::Tensor dense_grad_output = grad_output.contiguous(), dense_filter = filter.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "fastfa_small_conv2d_input", [&] {
    transposed_convolve<scalar_t>(g, dense_grad_output.const_data_ptr<scalar_t>(), dense_filter.const_data_ptr<scalar_t>(),
                                  grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

} // namespace fastfa
