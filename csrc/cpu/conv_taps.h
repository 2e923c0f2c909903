// The walk over a conv2d's filter taps that im2col (unfold) and col2im (fold) share: for each tap
// k = (c, kh, kw) and each output row oh, the run of output columns whose input element lies inside
// the input rather than in its padding. small_conv.cpp's unfold / fold and sign_conv_grad_input.cpp's
// col2im walk it; each says only what it does per element.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>

namespace fastfa {

// [first, last): the output positions o in [0, outputs) whose input position o * stride + offset
// lies in [0, size), so that the inner loops run without a bounds test per element.
struct Span {
  int64_t first, last;
};

inline Span valid_outputs(int64_t offset, int64_t stride, int64_t size, int64_t outputs) {
  const auto ceil_div = [stride](int64_t a) { return a > 0 ? (a + stride - 1) / stride : 0; };
  const int64_t first = ceil_div(-offset);
  return {first, std::max(first, std::min(outputs, ceil_div(size - offset)))};
}

// One input plane's geometry under one filter: input (height, width), output (out_h, out_w),
// filter (kernel_h, kernel_w), stride / padding / dilation (2 values each, checked by the caller).
struct ConvTaps {
  int64_t height, width, out_h, out_w, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  // Per filter row kh (column kw), the output rows (columns) that see the input, not its padding:
  // computed once, as their divisions would cost more than a small map's arithmetic in the loops.
  c10::SmallVector<Span, 8> rows, columns;

  ConvTaps(int64_t height, int64_t width, int64_t out_h, int64_t out_w, int64_t kernel_h, int64_t kernel_w,
           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation)
      : height(height), width(width), out_h(out_h), out_w(out_w), kernel_h(kernel_h), kernel_w(kernel_w),
        stride_h(stride[0]), stride_w(stride[1]), pad_h(padding[0]), pad_w(padding[1]), dilation_h(dilation[0]),
        dilation_w(dilation[1]) {
    for (int64_t kh = 0; kh < kernel_h; ++kh) {
      rows.push_back(valid_outputs(kh * dilation_h - pad_h, stride_h, height, out_h));
    }
    for (int64_t kw = 0; kw < kernel_w; ++kw) {
      columns.push_back(valid_outputs(kw * dilation_w - pad_w, stride_w, width, out_w));
    }
  }
};

// Calls visit(tap, c, oh, ih, columns, column_offset) for channels c in [c_begin, c_end), their taps
// tap = (c * kernel_h + kh) * kernel_w + kw, and each output row oh that sees input row ih: output
// columns ow in `columns` read input column ow * stride_w + column_offset.
template <typename Visit>
inline void for_each_tap_row(const ConvTaps& g, int64_t c_begin, int64_t c_end, Visit&& visit) {
  for (int64_t c = c_begin; c < c_end; ++c) {
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t row_offset = kh * g.dilation_h - g.pad_h;
      const Span rows = g.rows[kh];
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        const int64_t tap = (c * g.kernel_h + kh) * g.kernel_w + kw;
        const int64_t column_offset = kw * g.dilation_w - g.pad_w;
        const Span columns = g.columns[kw];
        for (int64_t oh = rows.first; oh < rows.last; ++oh) {
          visit(tap, c, oh, oh * g.stride_h + row_offset, columns, column_offset);
        }
      }
    }
  }
}

// col2im: planes[c, ih, iw] += cols[tap * tap_stride + p * position_stride] for channels c in
// [c_begin, c_end) (planes: NCHW-contiguous, planes + c * height * width is channel c's) and each
// output position p = oh * out_w + ow whose input element under the tap is (ih, iw).
template <typename T>
inline void fold_into(const ConvTaps& g, int64_t c_begin, int64_t c_end, const T* cols, int64_t tap_stride,
                      int64_t position_stride, T* planes) {
  for_each_tap_row(g, c_begin, c_end, [&](int64_t tap, int64_t c, int64_t oh, int64_t ih, Span columns,
                                          int64_t column_offset) {
    T* plane_row = planes + (c * g.height + ih) * g.width;
    const T* col = cols + tap * tap_stride + oh * g.out_w * position_stride;
    for (int64_t ow = columns.first; ow < columns.last; ++ow) {
      plane_row[ow * g.stride_w + column_offset] += col[ow * position_stride];
    }
  });
}

} // namespace fastfa
