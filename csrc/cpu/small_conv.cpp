// Direct CPU loops for a small conv2d's three maps (fastfa/small_conv.h). One routine per map
// serves every estimated rule, any stride / padding / dilation / groups, and any input layout
// (the loops read through the tensors' strides, so nothing is copied to make it contiguous).
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
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace fastfa {
namespace {

// Multiply-adds at and below which the direct loops run in place of ATen's calls: the crossover
// measured on this project's 2-core CPU at one torch thread (results file
// benchmarks/results/2026-12-01-cpu-host-smallconv.md), where an ATen call's ~8 us of overhead
// equals the loops' extra arithmetic time.
int64_t small_conv_max_macs() {
    const char* text = std::getenv("FASTFA_SMALL_CONV_MACS");
    return text != nullptr ? std::atoll(text) : int64_t{6144};
}

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

// y[n, o] = sum over (c, kh, kw) of w[o, c, kh, kw] * (x[n, c] shifted by (kh, kw)): one plane of
// y at a time, each filter tap adding a strided row of x to each row of it.
template <typename scalar_t>
void convolve(const Geometry& g, const scalar_t* x, Strides xs, const scalar_t* w, Strides ws, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.out_h * g.out_w;
  Accumulator<scalar_t> buffer;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o = 0; o < g.out_channels; ++o, y += plane) {
      acc_t* sum = accumulator<scalar_t>(buffer, y, plane);
      const scalar_t* x_group = x + n * xs.n + (o / g.group_out) * g.group_in * xs.c;
      for (int64_t c = 0; c < g.group_in; ++c) {
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
          const int64_t row_offset = kh * g.dilation_h - g.pad_h;
          const Span rows = g.rows[kh];
          for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
            const int64_t column_offset = kw * g.dilation_w - g.pad_w;
            const Span columns = g.columns[kw];
            const acc_t tap = static_cast<acc_t>(w[o * ws.n + c * ws.c + kh * ws.h + kw * ws.w]);
            for (int64_t oh = rows.first; oh < rows.last; ++oh) {
              const scalar_t* x_row = x_group + c * xs.c + (oh * g.stride_h + row_offset) * xs.h +
                                      (columns.first * g.stride_w + column_offset) * xs.w;
              const int64_t step = g.stride_w * xs.w;
              acc_t* sum_row = sum + oh * g.out_w;
              for (int64_t ow = columns.first; ow < columns.last; ++ow, x_row += step) {
                sum_row[ow] += tap * static_cast<acc_t>(*x_row);
              }
            }
          }
        }
      }
      round_into<scalar_t>(buffer, y);
    }
  }
}

// grad[o, c, kh, kw] = sum over (n, oh, ow) of r[n, o, oh, ow] * x[n, c, ih, iw]. Each r element
// adds to every filter tap that sees the input there (taps_of_rows / taps_of_columns): the taps'
// sums are independent, where one dot product per tap would wait on its one sum at every step.
template <typename scalar_t>
void filter_gradient(const Geometry& g, const scalar_t* r, Strides rs, const scalar_t* x, Strides xs,
                     scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  c10::SmallVector<Span, 16> taps_of_rows, taps_of_columns;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    taps_of_rows.push_back(valid_outputs(oh * g.stride_h - g.pad_h, g.dilation_h, g.height, g.kernel_h));
  }
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    taps_of_columns.push_back(valid_outputs(ow * g.stride_w - g.pad_w, g.dilation_w, g.width, g.kernel_w));
  }
  const int64_t taps = g.kernel_h * g.kernel_w;
  Accumulator<scalar_t> buffer;
  for (int64_t o = 0; o < g.out_channels; ++o) {
    const int64_t c0 = (o / g.group_out) * g.group_in;
    for (int64_t c = 0; c < g.group_in; ++c, grad += taps) {
      acc_t* sum = accumulator<scalar_t>(buffer, grad, taps);
      for (int64_t n = 0; n < g.batch; ++n) {
        const scalar_t* r_plane = r + n * rs.n + o * rs.c;
        const scalar_t* x_plane = x + n * xs.n + (c0 + c) * xs.c;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const Span rows = taps_of_rows[oh];
          for (int64_t ow = 0; ow < g.out_w; ++ow) {
            const Span columns = taps_of_columns[ow];
            const acc_t value = static_cast<acc_t>(r_plane[oh * rs.h + ow * rs.w]);
            const scalar_t* x_corner = x_plane + (oh * g.stride_h - g.pad_h) * xs.h + (ow * g.stride_w - g.pad_w) * xs.w;
            for (int64_t kh = rows.first; kh < rows.last; ++kh) {
              const scalar_t* x_row = x_corner + kh * g.dilation_h * xs.h;
              acc_t* sum_row = sum + kh * g.kernel_w;
              for (int64_t kw = columns.first; kw < columns.last; ++kw) {
                sum_row[kw] += value * static_cast<acc_t>(x_row[kw * g.dilation_w * xs.w]);
              }
            }
          }
        }
      }
      round_into<scalar_t>(buffer, grad);
    }
  }
}

// grad[n, c] = sum over (o, kh, kw) of w[o, c, kh, kw] * r[n, o] scattered to the input positions
// (oh * stride + kh * dilation - pad, ...): one plane of grad at a time, in opmath.
template <typename scalar_t>
void transposed_convolve(const Geometry& g, const scalar_t* r, Strides rs, const scalar_t* w, Strides ws,
                         scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.height * g.width;
  Accumulator<scalar_t> buffer;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t ci = 0; ci < g.channels; ++ci, grad += plane) {
      acc_t* sum = accumulator<scalar_t>(buffer, grad, plane);
      const int64_t o0 = (ci / g.group_in) * g.group_out;
      const scalar_t* r_group = r + n * rs.n + o0 * rs.c;
      const scalar_t* w_group = w + o0 * ws.n + (ci % g.group_in) * ws.c;
      for (int64_t o = 0; o < g.group_out; ++o) {
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
          const int64_t row_offset = kh * g.dilation_h - g.pad_h;
          const Span rows = g.rows[kh];
          for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
            const int64_t column_offset = kw * g.dilation_w - g.pad_w;
            const Span columns = g.columns[kw];
            const acc_t tap = static_cast<acc_t>(w_group[o * ws.n + kh * ws.h + kw * ws.w]);
            for (int64_t oh = rows.first; oh < rows.last; ++oh) {
              const scalar_t* r_row = r_group + o * rs.c + oh * rs.h;
              acc_t* sum_row = sum + (oh * g.stride_h + row_offset) * g.width;
              for (int64_t ow = columns.first; ow < columns.last; ++ow) {
                sum_row[ow * g.stride_w + column_offset] += tap * static_cast<acc_t>(r_row[ow * rs.w]);
              }
            }
          }
        }
      }
      round_into<scalar_t>(buffer, grad);
    }
  }
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
  const int64_t limit = small_conv_max_macs();
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastfa_small_conv2d", [&] {
    convolve<scalar_t>(g, input.const_data_ptr<scalar_t>(), strides_of(input), filter.const_data_ptr<scalar_t>(),
                       strides_of(filter), y.mutable_data_ptr<scalar_t>());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastfa_small_conv2d_weight", [&] {
    filter_gradient<scalar_t>(g, grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output),
                              input.const_data_ptr<scalar_t>(), strides_of(input), grad.mutable_data_ptr<scalar_t>());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "fastfa_small_conv2d_input", [&] {
    transposed_convolve<scalar_t>(g, grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output),
                                  filter.const_data_ptr<scalar_t>(), strides_of(filter),
                                  grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

} // namespace fastfa
