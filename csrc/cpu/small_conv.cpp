// Direct CPU loops for a small conv2d's three maps (fastfa/small_conv.h). One routine per map
// serves every estimated rule, any stride / padding / dilation / groups, and any input layout
// (the loops read through the tensors' strides, so nothing is copied to make it contiguous).
// Each output element is one sum in the dtype's accumulation type (fp32 for fp16 / bf16, as
// ATen's CPU kernels, and as the aten path's fp32 widening of bf16), rounded once at the end.
#include "fastfa/small_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/accumulate.h>

#include <array>
#include <cstdlib>

namespace fastfa {
namespace {

// Multiply-adds at and below which the direct loops run in place of ATen's calls: the crossover
// measured on this project's 2-core CPU at one torch thread (results file
// benchmarks/results/2026-12-01-cpu-host-smallconv.md), where an ATen call's ~8 us of overhead
// equals the loops' extra arithmetic time.
int64_t small_conv_max_macs() {
  static const int64_t limit = [] {
    const char* text = std::getenv("FASTFA_SMALL_CONV_MACS");
    return text != nullptr ? std::atoll(text) : int64_t{16384};
  }();
  return limit;
}

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

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
        dilation_w(dilation[1]), group_out(filter[0] / groups) {}
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

template <typename scalar_t>
void convolve(const Geometry& g, const scalar_t* x, Strides xs, const scalar_t* w, Strides ws, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o = 0; o < g.out_channels; ++o) {
      const scalar_t* x_group = x + n * xs.n + (o / g.group_out) * g.group_in * xs.c;
      const scalar_t* w_out = w + o * ws.n;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          acc_t sum = 0;
          for (int64_t c = 0; c < g.group_in; ++c) {
            for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
              const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
              if (ih < 0 || ih >= g.height) continue;
              for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
                const int64_t iw = ow * g.stride_w - g.pad_w + kw * g.dilation_w;
                if (iw < 0 || iw >= g.width) continue;
                sum += static_cast<acc_t>(x_group[c * xs.c + ih * xs.h + iw * xs.w]) *
                       static_cast<acc_t>(w_out[c * ws.c + kh * ws.h + kw * ws.w]);
              }
            }
          }
          *y++ = static_cast<scalar_t>(sum);
        }
      }
    }
  }
}

template <typename scalar_t>
void filter_gradient(const Geometry& g, const scalar_t* r, Strides rs, const scalar_t* x, Strides xs,
                     scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t o = 0; o < g.out_channels; ++o) {
    const int64_t c0 = (o / g.group_out) * g.group_in;
    for (int64_t c = 0; c < g.group_in; ++c) {
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          acc_t sum = 0;
          for (int64_t n = 0; n < g.batch; ++n) {
            const scalar_t* r_out = r + n * rs.n + o * rs.c;
            const scalar_t* x_in = x + n * xs.n + (c0 + c) * xs.c;
            for (int64_t oh = 0; oh < g.out_h; ++oh) {
              const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
              if (ih < 0 || ih >= g.height) continue;
              for (int64_t ow = 0; ow < g.out_w; ++ow) {
                const int64_t iw = ow * g.stride_w - g.pad_w + kw * g.dilation_w;
                if (iw < 0 || iw >= g.width) continue;
                sum += static_cast<acc_t>(r_out[oh * rs.h + ow * rs.w]) * static_cast<acc_t>(x_in[ih * xs.h + iw * xs.w]);
              }
            }
          }
          *grad++ = static_cast<scalar_t>(sum);
        }
      }
    }
  }
}

// Gathers each input element's sum (no scatter into a buffer): the output rows oh with
// oh * stride - pad + kh * dilation == ih.
template <typename scalar_t>
void transposed_convolve(const Geometry& g, const scalar_t* r, Strides rs, const scalar_t* w, Strides ws,
                         scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t ci = 0; ci < g.channels; ++ci) {
      const int64_t o0 = (ci / g.group_in) * g.group_out;
      const scalar_t* r_group = r + n * rs.n + o0 * rs.c;
      const scalar_t* w_group = w + o0 * ws.n + (ci % g.group_in) * ws.c;
      for (int64_t ih = 0; ih < g.height; ++ih) {
        for (int64_t iw = 0; iw < g.width; ++iw) {
          acc_t sum = 0;
          for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
            const int64_t th = ih + g.pad_h - kh * g.dilation_h;
            if (th < 0 || th % g.stride_h != 0 || th / g.stride_h >= g.out_h) continue;
            const int64_t oh = th / g.stride_h;
            for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
              const int64_t tw = iw + g.pad_w - kw * g.dilation_w;
              if (tw < 0 || tw % g.stride_w != 0 || tw / g.stride_w >= g.out_w) continue;
              const int64_t ow = tw / g.stride_w;
              for (int64_t o = 0; o < g.group_out; ++o) {
                sum += static_cast<acc_t>(r_group[o * rs.c + oh * rs.h + ow * rs.w]) *
                       static_cast<acc_t>(w_group[o * ws.n + kh * ws.h + kw * ws.w]);
              }
            }
          }
          *grad++ = static_cast<scalar_t>(sum);
        }
      }
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
