// Convolutions (groups = 1) as implicit GEMMs on the fused GEMM of gemm_kernel.cuh: the
// loaders gather each operand's elements through one of the indices below, so nothing is
// unfolded in memory, and the rule's transform hook on B is the linear layer's.
//
//   forward      rows = output pixels (n, oh, ow)   cols = out channels   K = taps of x
//                A = im2col(x) (Im2colIndex), B = W as out_channels x K, bias / activation epilogue
//   grad_input   rows = input pixels (n, h, w)      cols = in channels    K = (oc, kh, kw)
//                A = delta read backwards through the taps (TransposedConvIndex; zero where a
//                stride skips the pixel), B = T(W) (FilterRowsIndex, keyed by W's logical index)
//   grad_weight  rows = out channels                cols = taps           K = output pixels
//                A = delta^T (OutputGradRowsIndex; its row sums are grad_b), B = im2col(x)^T,
//                split over K into fp32 slices the host adds (K is batch x pixels, long)
//
// Taps are ordered (c, kh, kw), or (kh, kw, c) for channels_last: then channels are the
// contiguous direction of every operand and, where the channel count is a whole number of
// 16-byte vectors, each thread's vector is one 16-byte load. Where, besides, K's channels are
// a whole number of k-tiles (the forward's and grad_input's operands), the loaders walk the
// taps (TapSteps here, TapWalk in gemm_kernel.cuh): the indexing is done once per thread in
// the prologue, and a k-tile only steps an offset. Otherwise each vector goes through the
// index, and elements are gathered one by one with coordinates stepped incrementally (no
// division per element; the first element's divisions are multiplies, see Divisor).
// Coordinates are 32-bit: the op sends larger problems to the aten path.
#pragma once

#include "gemm_kernel.cuh"

namespace fastfa {
namespace gemm {
namespace detail {

// n / d for 0 <= n < 2^31 with a fixed d >= 1, as a multiply-high, an add and a shift
// (Granlund & Montgomery 1994): the indices divide every gathered coordinate, and a 32-bit
// division is a long instruction sequence on the GPU.
struct Divisor {
  uint32_t value = 1, multiplier = 1, shift = 0;

  Divisor() = default;
  explicit Divisor(int64_t d) : value(static_cast<uint32_t>(d)) {
    while ((uint64_t(1) << shift) < value) {
      ++shift;  // ceil(log2 d)
    }
    multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - value)) / value + 1);
  }
  FASTFA_HOST_DEVICE int divide(int n) const {
    const uint32_t high = mulhi32(static_cast<uint32_t>(n), multiplier);
    return static_cast<int>((high + static_cast<uint32_t>(n)) >> shift);
  }
};

// A flat index over (outer, middle, inner) extents: the divisors of middle x inner and of
// inner, and the two extents for stepping.
struct Order3 {
  Divisor per_outer, per_middle;
  int middle_extent = 1, inner_extent = 1;

  Order3() = default;
  Order3(int64_t middle, int64_t inner)
      : per_outer(middle * inner), per_middle(inner), middle_extent(int(middle)), inner_extent(int(inner)) {}
};

// (outer, middle, inner) of a flat index, and the step to the next flat index.
struct Coordinates3 {
  int outer, middle, inner;

  FASTFA_HOST_DEVICE Coordinates3(int flat, const Order3& order) {
    outer = order.per_outer.divide(flat);
    const int rest = flat - outer * static_cast<int>(order.per_outer.value);
    middle = order.per_middle.divide(rest);
    inner = rest - middle * static_cast<int>(order.per_middle.value);
  }
  FASTFA_HOST_DEVICE void step(const Order3& order) {
    if (++inner == order.inner_extent) {
      inner = 0;
      if (++middle == order.middle_extent) {
        middle = 0;
        ++outer;
      }
    }
  }
};

// A convolution's extents, 32-bit, and the orders of its pixels and taps.
struct ConvGeometry {
  int batch, in_channels, in_h, in_w, out_channels, kernel_h, kernel_w, out_h, out_w;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool channels_last;
  Order3 out_pixel_order, in_pixel_order;  // (n, h, w)
  Order3 in_tap_order, out_tap_order;      // taps over in / out channels: (c, kh, kw) or (kh, kw, c)

  static ConvGeometry of(const ConvShape& s) {
    ConvGeometry g{int(s.batch),    int(s.in_channels), int(s.in_h),       int(s.in_w),       int(s.out_channels),
                   int(s.kernel_h), int(s.kernel_w),    int(s.out_h),      int(s.out_w),      int(s.stride_h),
                   int(s.stride_w), int(s.pad_h),       int(s.pad_w),      int(s.dilation_h), int(s.dilation_w),
                   s.channels_last, {},                 {},                {},                {}};
    g.out_pixel_order = Order3(s.out_h, s.out_w);
    g.in_pixel_order = Order3(s.in_h, s.in_w);
    g.in_tap_order = s.channels_last ? Order3(s.kernel_w, s.in_channels) : Order3(s.kernel_h, s.kernel_w);
    g.out_tap_order = s.channels_last ? Order3(s.kernel_w, s.out_channels) : Order3(s.kernel_h, s.kernel_w);
    return g;
  }
  FASTFA_HOST_DEVICE int64_t taps(int channels) const { return int64_t(channels) * kernel_h * kernel_w; }
  FASTFA_HOST_DEVICE int64_t out_pixels() const { return int64_t(batch) * out_h * out_w; }
  FASTFA_HOST_DEVICE int64_t in_pixels() const { return int64_t(batch) * in_h * in_w; }
};

// Tap t of a filter in the geometry's tap order (over in or out channels), and its steps.
struct Tap {
  Coordinates3 at;
  bool channels_last;

  FASTFA_HOST_DEVICE Tap(const ConvGeometry& g, int t, const Order3& order)
      : at(t, order), channels_last(g.channels_last) {}
  FASTFA_HOST_DEVICE int channel() const { return channels_last ? at.inner : at.outer; }
  FASTFA_HOST_DEVICE int kh() const { return channels_last ? at.outer : at.middle; }
  FASTFA_HOST_DEVICE int kw() const { return channels_last ? at.middle : at.inner; }
  FASTFA_HOST_DEVICE void step(const Order3& order) { at.step(order); }
};

// An image's strides in 32 bits: the op makes sure every element it reads or writes lies
// within 2^31 elements of the base, so offsets need no 64-bit arithmetic.
struct Strides32 {
  int n = 0, c = 0, h = 0, w = 0;
  Strides32() = default;
  Strides32(const ImageStrides& s) : n(int(s.n)), c(int(s.c)), h(int(s.h)), w(int(s.w)) {}
};

FASTFA_HOST_DEVICE int64_t image_offset(const Strides32& s, int n, int c, int h, int w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

// A view's walk along K (TapWalk, gemm_kernel.cuh): where K is taps (kh, kw) x `channels` in
// the channels_last order, the channels in whole 16-byte vectors and whole k-tiles, and there
// are at most 32 taps (one bit each in a row's mask), a k-tile lies in one tap and steps by
// `step` elements; every tiles_per_tap tiles the tap moves on. tiles_per_tap = 0: no walk
// (NCHW, ragged or misaligned channels, larger filters), the loaders index every vector.
struct TapSteps {
  int channels = 1, tile_k = 1, tiles_per_tap = 0;
  int32_t channel_stride = 0, step = 0;

  static TapSteps of(const ConvGeometry& g, bool vectors, int64_t channels, int64_t channel_stride, int tile_k) {
    TapSteps s;
    if (vectors && g.channels_last && channels % tile_k == 0 && int64_t(g.kernel_h) * g.kernel_w <= 32) {
      s.channels = int(channels);
      s.tile_k = tile_k;
      s.tiles_per_tap = int(channels / tile_k);
      s.channel_stride = int32_t(channel_stride);
      s.step = int32_t(tile_k * channel_stride);
    }
    return s;
  }
};

// The walk's side of a view with a TapSteps member `walk` (the rest, walk_base and tap_offset,
// is the view's own).
#define FASTFA_TAP_WALK_STEPS                                                                            \
  FASTFA_HOST_DEVICE bool walks() const { return walk.tiles_per_tap > 0; }                              \
  FASTFA_HOST_DEVICE int walk_channels() const { return walk.channels; }                                \
  FASTFA_HOST_DEVICE int walk_tile_k() const { return walk.tile_k; }                                    \
  FASTFA_HOST_DEVICE int walk_tiles_per_tap() const { return walk.tiles_per_tap; }                      \
  FASTFA_HOST_DEVICE uint32_t walk_channel_stride() const { return uint32_t(walk.channel_stride); }     \
  FASTFA_HOST_DEVICE uint32_t walk_step() const { return uint32_t(walk.step); }

// x as the im2col matrix: element (output pixel p, tap t) is x where tap t of p's window
// lands, zero in the padding. kTransposed: rows are taps and K pixels (grad_weight's B).
// Vectors run along taps (channels) for channels_last, else along pixels.
template <bool kTransposed>
struct Im2colIndex {
  ConvGeometry g;
  Strides32 x;
  bool vectors;  // channels_last with whole vectors of channels: run() is one load
  TapSteps walk;  // the forward's A only (K is taps); grad_weight's B runs K over pixels

  FASTFA_TAP_WALK_STEPS
  // The forward's A: the vector at output pixel `row`, channel k of every tap: x at
  // (oh s - pad + kh dilation, ...), inside the image where its bit is set.
  FASTFA_HOST_DEVICE uint32_t walk_base(int64_t row, int k, uint32_t& mask) const {
    mask = 0;
    if (row >= g.out_pixels()) {
      return 0;
    }
    const Coordinates3 pixel(int(row), g.out_pixel_order);
    const int h0 = pixel.middle * g.stride_h - g.pad_h, w0 = pixel.inner * g.stride_w - g.pad_w;
    uint32_t columns = 0;
    for (int kw = 0; kw < g.kernel_w; ++kw) {
      const int w = w0 + kw * g.dilation_w;
      columns |= (0 <= w && w < g.in_w ? 1u : 0u) << kw;
    }
    for (int kh = 0; kh < g.kernel_h; ++kh) {
      const int h = h0 + kh * g.dilation_h;
      mask |= 0 <= h && h < g.in_h ? columns << (kh * g.kernel_w) : 0u;
    }
    return uint32_t(int64_t(pixel.outer) * x.n + int64_t(h0) * x.h + int64_t(w0) * x.w + int64_t(k) * x.c);
  }
  FASTFA_HOST_DEVICE uint32_t tap_offset(int kh, int kw) const {
    return uint32_t(kh * g.dilation_h) * uint32_t(x.h) + uint32_t(kw * g.dilation_w) * uint32_t(x.w);
  }

  FASTFA_HOST_DEVICE bool k_contiguous() const { return kTransposed != g.channels_last; }
  FASTFA_HOST_DEVICE int64_t at(const Coordinates3& pixel, const Tap& tap) const {
    const int h = pixel.middle * g.stride_h - g.pad_h + tap.kh() * g.dilation_h;
    const int w = pixel.inner * g.stride_w - g.pad_w + tap.kw() * g.dilation_w;
    const bool inside = 0 <= h && h < g.in_h && 0 <= w && w < g.in_w;
    return inside ? image_offset(x, pixel.outer, tap.channel(), h, w) : -1;
  }
  FASTFA_HOST_DEVICE int64_t offset(int64_t row, int64_t k) const {
    const int64_t p = kTransposed ? k : row, t = kTransposed ? row : k;
    if (p >= g.out_pixels() || t >= g.taps(g.in_channels)) {
      return -1;
    }
    return at(Coordinates3(int(p), g.out_pixel_order), Tap(g, int(t), g.in_tap_order));
  }
  FASTFA_HOST_DEVICE int64_t key(int64_t row, int64_t k) const { return offset(row, k); }
  FASTFA_HOST_DEVICE int64_t run(int64_t row, int64_t k, int) const { return vectors ? offset(row, k) : -1; }
  template <int kLength>
  FASTFA_HOST_DEVICE void gather(int64_t row, int64_t k, int64_t (&out)[kLength]) const {
    int64_t p = kTransposed ? k : row, t = kTransposed ? row : k;
    const int64_t pixels = g.out_pixels(), taps = g.taps(g.in_channels);
    Coordinates3 pixel(int(p < pixels ? p : 0), g.out_pixel_order);
    Tap tap(g, int(t < taps ? t : 0), g.in_tap_order);
#pragma unroll
    for (int i = 0; i < kLength; ++i) {
      out[i] = p < pixels && t < taps ? at(pixel, tap) : -1;
      if (g.channels_last) {
        tap.step(g.in_tap_order);
        ++t;
      } else {
        pixel.step(g.out_pixel_order);
        ++p;
      }
    }
  }
};

// delta as an out_channels x output-pixels matrix (grad_weight's A). Vectors run along
// channels for channels_last, else along pixels.
struct OutputGradRowsIndex {
  ConvGeometry g;
  Strides32 d;
  bool vectors;

  FASTFA_HOST_DEVICE bool k_contiguous() const { return !g.channels_last; }
  FASTFA_HOST_DEVICE int64_t offset(int64_t row, int64_t k) const {
    if (row >= g.out_channels || k >= g.out_pixels()) {
      return -1;
    }
    const Coordinates3 pixel(int(k), g.out_pixel_order);
    return image_offset(d, pixel.outer, int(row), pixel.middle, pixel.inner);
  }
  FASTFA_HOST_DEVICE int64_t key(int64_t row, int64_t k) const { return offset(row, k); }
  FASTFA_HOST_DEVICE int64_t run(int64_t row, int64_t k, int) const { return vectors ? offset(row, k) : -1; }
  template <int kLength>
  FASTFA_HOST_DEVICE void gather(int64_t row, int64_t k, int64_t (&out)[kLength]) const {
    const int64_t pixels = g.out_pixels();
    Coordinates3 pixel(int(k < pixels ? k : 0), g.out_pixel_order);
#pragma unroll
    for (int i = 0; i < kLength; ++i) {
      const int64_t channel = g.channels_last ? row + i : row, p = g.channels_last ? k : k + i;
      out[i] = channel < g.out_channels && p < pixels
                   ? image_offset(d, pixel.outer, int(channel), pixel.middle, pixel.inner)
                   : -1;
      if (!g.channels_last) {
        pixel.step(g.out_pixel_order);
      }
    }
  }
};

// delta as grad_input's A: element (input pixel (n, h, w), tap (oc, kh, kw)) is delta at the
// output pixel whose window puts tap (kh, kw) on (h, w), zero where none does (padding, or a
// stride that skips h or w). Vectors run along out channels for channels_last, else pixels.
struct TransposedConvIndex {
  ConvGeometry g;
  Strides32 d;
  bool vectors;
  TapSteps walk;

  FASTFA_TAP_WALK_STEPS
  // The vector at input pixel `row`, out channel k of every tap. With h + pad = q stride + r,
  // tap kh reaches h from output row (h + pad - kh dilation) / stride where that divides,
  // that is where kh dilation = j stride + r, and then the output row is q - j with
  // j = floor(kh dilation / stride): q (the row's) and j (the tap's) apart, so the base holds
  // q and tap_offset j, and the mask the divisibility and bounds.
  FASTFA_HOST_DEVICE uint32_t walk_base(int64_t row, int k, uint32_t& mask) const {
    mask = 0;
    if (row >= g.in_pixels()) {
      return 0;
    }
    const Coordinates3 pixel(int(row), g.in_pixel_order);
    const int hp = pixel.middle + g.pad_h, wp = pixel.inner + g.pad_w;
    uint32_t columns = 0;
    for (int kw = 0; kw < g.kernel_w; ++kw) {
      const int ws = wp - kw * g.dilation_w;
      columns |= (ws >= 0 && ws % g.stride_w == 0 && ws / g.stride_w < g.out_w ? 1u : 0u) << kw;
    }
    for (int kh = 0; kh < g.kernel_h; ++kh) {
      const int hs = hp - kh * g.dilation_h;
      mask |= hs >= 0 && hs % g.stride_h == 0 && hs / g.stride_h < g.out_h ? columns << (kh * g.kernel_w) : 0u;
    }
    return uint32_t(int64_t(pixel.outer) * d.n + int64_t(hp / g.stride_h) * d.h + int64_t(wp / g.stride_w) * d.w +
                    int64_t(k) * d.c);
  }
  FASTFA_HOST_DEVICE uint32_t tap_offset(int kh, int kw) const {
    return 0u - uint32_t((kh * g.dilation_h) / g.stride_h) * uint32_t(d.h) -
           uint32_t((kw * g.dilation_w) / g.stride_w) * uint32_t(d.w);
  }

  FASTFA_HOST_DEVICE bool k_contiguous() const { return g.channels_last; }
  FASTFA_HOST_DEVICE int64_t at(const Coordinates3& pixel, const Tap& tap) const {
    const int hs = pixel.middle + g.pad_h - tap.kh() * g.dilation_h;
    const int ws = pixel.inner + g.pad_w - tap.kw() * g.dilation_w;
    if (hs < 0 || ws < 0 || hs % g.stride_h != 0 || ws % g.stride_w != 0) {
      return -1;
    }
    const int oh = hs / g.stride_h, ow = ws / g.stride_w;
    return oh < g.out_h && ow < g.out_w ? image_offset(d, pixel.outer, tap.channel(), oh, ow) : -1;
  }
  FASTFA_HOST_DEVICE int64_t offset(int64_t row, int64_t k) const {
    if (row >= g.in_pixels() || k >= g.taps(g.out_channels)) {
      return -1;
    }
    return at(Coordinates3(int(row), g.in_pixel_order), Tap(g, int(k), g.out_tap_order));
  }
  FASTFA_HOST_DEVICE int64_t key(int64_t row, int64_t k) const { return offset(row, k); }
  FASTFA_HOST_DEVICE int64_t run(int64_t row, int64_t k, int) const { return vectors ? offset(row, k) : -1; }
  template <int kLength>
  FASTFA_HOST_DEVICE void gather(int64_t row, int64_t k, int64_t (&out)[kLength]) const {
    const int64_t pixels = g.in_pixels(), taps = g.taps(g.out_channels);
    Coordinates3 pixel(int(row < pixels ? row : 0), g.in_pixel_order);
    Tap tap(g, int(k < taps ? k : 0), g.out_tap_order);
#pragma unroll
    for (int i = 0; i < kLength; ++i) {
      out[i] = row < pixels && k < taps ? at(pixel, tap) : -1;
      if (g.channels_last) {
        tap.step(g.out_tap_order);
        ++k;
      } else {
        pixel.step(g.in_pixel_order);
        ++row;
      }
    }
  }
};

// W as grad_input's B: element (in channel c, tap (oc, kh, kw)) is W[oc][c][kh][kw], read
// through W's strides (w.n: out channel, w.c: in channel); its key is that element's
// row-major index in W's logical shape, as every backend's draws are keyed. Vectors run
// along in channels for channels_last, else along taps.
struct FilterRowsIndex {
  ConvGeometry g;
  Strides32 w;
  bool vectors;
  TapSteps walk;

  FASTFA_TAP_WALK_STEPS
  // The vector at in channel `row`, out channel k of every tap: every tap inside. A row past
  // the last in channel reads in channel 0's elements instead: B's row is C's column, and the
  // epilogue stores no column past n, so they reach no output (and the mask, a constant, takes
  // no registers).
  FASTFA_HOST_DEVICE uint32_t walk_base(int64_t row, int k, uint32_t& mask) const {
    mask = 0xFFFFFFFFu;
    return uint32_t(int64_t(row < g.in_channels ? row : 0) * w.c + int64_t(k) * w.n);
  }
  FASTFA_HOST_DEVICE uint32_t tap_offset(int kh, int kw) const {
    return uint32_t(kh) * uint32_t(w.h) + uint32_t(kw) * uint32_t(w.w);
  }

  FASTFA_HOST_DEVICE bool k_contiguous() const { return !g.channels_last; }
  FASTFA_HOST_DEVICE int64_t filter_offset(int c, const Tap& tap) const {
    return image_offset(w, tap.channel(), c, tap.kh(), tap.kw());
  }
  FASTFA_HOST_DEVICE int64_t filter_key(int c, const Tap& tap) const {
    return ((int64_t(tap.channel()) * g.in_channels + c) * g.kernel_h + tap.kh()) * g.kernel_w + tap.kw();
  }
  FASTFA_HOST_DEVICE int64_t offset(int64_t row, int64_t k) const {
    if (row >= g.in_channels || k >= g.taps(g.out_channels)) {
      return -1;
    }
    return filter_offset(int(row), Tap(g, int(k), g.out_tap_order));
  }
  FASTFA_HOST_DEVICE int64_t key(int64_t row, int64_t k) const {
    return filter_key(int(row), Tap(g, int(k), g.out_tap_order));
  }
  FASTFA_HOST_DEVICE int64_t run(int64_t row, int64_t k, int) const { return vectors ? offset(row, k) : -1; }
  template <int kLength>
  FASTFA_HOST_DEVICE void gather(int64_t row, int64_t k, int64_t (&out)[kLength]) const {
    const int64_t taps = g.taps(g.out_channels);
    Tap tap(g, int(k < taps ? k : 0), g.out_tap_order);
#pragma unroll
    for (int i = 0; i < kLength; ++i) {
      const int64_t c = g.channels_last ? row + i : row;
      out[i] = c < g.in_channels && k < taps ? filter_offset(int(c), tap) : -1;
      if (!g.channels_last) {
        tap.step(g.out_tap_order);
        ++k;
      }
    }
  }
};

#undef FASTFA_TAP_WALK_STEPS

} // namespace detail

template <>
struct HasTapWalk<detail::Im2colIndex<false>> : std::true_type {};
template <>
struct HasTapWalk<detail::TransposedConvIndex> : std::true_type {};
template <>
struct HasTapWalk<detail::FilterRowsIndex> : std::true_type {};

namespace detail {

// C's rows as pixels (n, h, w) of an image of height x width, columns as its channels.
struct ImageOutput {
  Order3 pixels;
  Strides32 s;
  FASTFA_HOST_DEVICE int64_t offset(int64_t row, int64_t col) const {
    const Coordinates3 pixel(int(row), pixels);
    return image_offset(s, pixel.outer, int(col), pixel.middle, pixel.inner);
  }
};

// Whether a channels_last tensor's channels come in whole, aligned 16-byte vectors: unit
// channel stride, and every other stride and the channel count multiples of the vector.
inline bool channel_vectors(bool channels_last, const ImageStrides& s, int64_t channels, int vector) {
  return channels_last && s.c == 1 && channels % vector == 0 && s.n % vector == 0 && s.h % vector == 0 &&
         s.w % vector == 0;
}

// Whether an NCHW tensor's pixels of one channel come in whole 16-byte vectors.
inline bool pixel_vectors(const ImageStrides& s, int64_t height, int64_t width, int vector) {
  return s.w == 1 && s.h == width && (height * width) % vector == 0 && s.c % vector == 0 && s.n % vector == 0;
}

template <class Element>
constexpr int vector_elements() {
  return 16 / int(sizeof(typename Traits<Element>::Bits));
}
template <class Element>
constexpr int tile_k() {
  return kRowBytes / int(sizeof(typename Traits<Element>::Bits));
}

// The problems of the three passes (the ops and tests/cuda/implicit_gemm_check.cu build them
// with these).
using ConvForwardProblem = GemmProblem<Im2colIndex<false>, MatrixIndex>;
using ConvGradInputProblem = GemmProblem<TransposedConvIndex, FilterRowsIndex>;
using ConvGradWeightProblem = GemmProblem<OutputGradRowsIndex, Im2colIndex<true>>;

template <class Element>
ConvForwardProblem conv_forward_problem(const ConvShape& shape, const void* x, const ImageStrides& x_strides,
                                        const void* weight) {
  const ConvGeometry g = ConvGeometry::of(shape);
  ConvForwardProblem problem;
  problem.m = g.out_pixels();
  problem.n = g.out_channels;
  problem.k = g.taps(g.in_channels);
  problem.a = x;
  const bool vectors = channel_vectors(g.channels_last, x_strides, g.in_channels, vector_elements<Element>());
  problem.a_index = {g, x_strides, vectors,
                     TapSteps::of(g, vectors, g.in_channels, x_strides.c, tile_k<Element>())};
  problem.b = weight;
  problem.b_index = {problem.n, problem.k, problem.k, 1};
  return problem;
}

template <class Element>
ConvGradInputProblem conv_grad_input_problem(const ConvShape& shape, const void* delta,
                                             const ImageStrides& delta_strides, const void* weight,
                                             const ImageStrides& weight_strides) {
  const ConvGeometry g = ConvGeometry::of(shape);
  constexpr int kVector = vector_elements<Element>();
  ConvGradInputProblem problem;
  problem.m = g.in_pixels();
  problem.n = g.in_channels;
  problem.k = g.taps(g.out_channels);
  problem.a = delta;
  const bool delta_vectors = channel_vectors(g.channels_last, delta_strides, g.out_channels, kVector);
  problem.a_index = {g, delta_strides, delta_vectors,
                     TapSteps::of(g, delta_vectors, g.out_channels, delta_strides.c, tile_k<Element>())};
  problem.b = weight;
  // W's in channels are its "c" stride; as an image of (oc, c, kh, kw) its n stride is oc's.
  // Both operands walk their taps, or neither (the loaders' interior path takes both).
  const bool weight_vectors = channel_vectors(g.channels_last, weight_strides, g.in_channels, kVector);
  problem.b_index = {g, weight_strides, weight_vectors,
                     TapSteps::of(g, weight_vectors, g.out_channels, weight_strides.n, tile_k<Element>())};
  return problem;
}

template <class Element>
ConvGradWeightProblem conv_grad_weight_problem(const ConvShape& shape, const void* delta,
                                               const ImageStrides& delta_strides, const void* x,
                                               const ImageStrides& x_strides, int64_t k_tiles_per_split) {
  const ConvGeometry g = ConvGeometry::of(shape);
  constexpr int kVector = vector_elements<Element>();
  ConvGradWeightProblem problem;
  problem.m = g.out_channels;
  problem.n = g.taps(g.in_channels);
  problem.k = g.out_pixels();
  problem.a = delta;
  problem.a_index = {g, delta_strides,
                     g.channels_last ? channel_vectors(true, delta_strides, g.out_channels, kVector)
                                     : pixel_vectors(delta_strides, g.out_h, g.out_w, kVector)};
  problem.b = x;
  problem.b_index = {g, x_strides, channel_vectors(g.channels_last, x_strides, g.in_channels, kVector)};
  problem.k_tiles_per_split = k_tiles_per_split;
  return problem;
}

// grad_input's store into the image. It takes no row sums (grad_bias is grad_weight's), so that
// the identity kernel (bp) copies delta's tiles by cp.async instead of summing them in registers.
template <class Element>
struct ConvGradInputEpilogue : StoreEpilogue<Element, ImageOutput> {
  static constexpr bool kRowSums = false;
};

template <class Element>
ConvGradInputEpilogue<Element> conv_grad_input_epilogue(const ConvShape& shape, void* grad_x,
                                                        const ImageStrides& strides) {
  ConvGradInputEpilogue<Element> store;
  store.c = grad_x;
  store.output = ImageOutput{Order3(shape.in_h, shape.in_w), strides};
  store.m = shape.batch * shape.in_h * shape.in_w;
  store.n = shape.in_channels;
  return store;
}

// grad_input with B used as it is (bp, a stored R or B): instantiated with the identity kernels.
template <class Element>
cudaError_t conv_grad_input_identity(Arch arch, const ConvGradInputProblem& problem,
                                     const ConvGradInputEpilogue<Element>& epilogue, cudaStream_t stream) {
  return launch_for<Element>(arch, problem, IdentityTransform{}, epilogue, stream);
}

} // namespace detail

template <typename Element>
cudaError_t conv_forward_gemm(Arch arch, const ConvShape& shape, const void* x, const ImageStrides& x_strides,
                              const void* weight, void* y, const ImageStrides& y_strides,
                              const LinearEpilogueArgs& epilogue, cudaStream_t stream) {
  const auto problem = detail::conv_forward_problem<Element>(shape, x, x_strides, weight);
  const BiasActivationEpilogue<Element, detail::ImageOutput> store{
      y, detail::ImageOutput{detail::Order3(shape.out_h, shape.out_w), y_strides}, problem.m, problem.n, epilogue};
  return detail::launch_for<Element>(arch, problem, IdentityTransform{}, store, stream);
}

template <typename Element>
cudaError_t conv_grad_input_gemm(Arch arch, Rule rule, const ConvShape& shape, const void* delta,
                                 const ImageStrides& delta_strides, const void* weight,
                                 const ImageStrides& weight_strides, const FeedbackArgs& feedback, void* grad_x,
                                 const ImageStrides& grad_x_strides, cudaStream_t stream) {
  const auto problem = detail::conv_grad_input_problem<Element>(shape, delta, delta_strides, weight, weight_strides);
  const auto store = detail::conv_grad_input_epilogue<Element>(shape, grad_x, grad_x_strides);
  if (rule == Rule::kBackprop) {
    return detail::conv_grad_input_identity<Element>(arch, problem, store, stream);
  }
  return detail::transformed_gemm<Element>(arch, rule, problem, feedback, store, stream);
}

template <typename Element>
cudaError_t conv_grad_weight_gemm(Arch arch, const ConvShape& shape, const void* delta,
                                  const ImageStrides& delta_strides, const void* x, const ImageStrides& x_strides,
                                  float* partial, float* partial_row_sums, int64_t k_tiles_per_split,
                                  cudaStream_t stream) {
  const auto problem =
      detail::conv_grad_weight_problem<Element>(shape, delta, delta_strides, x, x_strides, k_tiles_per_split);
  const SplitEpilogue store{partial, partial_row_sums, problem.m, problem.n};
  return detail::launch_for<Element>(arch, problem, IdentityTransform{}, store, stream);
}

// The conv instantiations of one element type, split like the linear ones.
#define FASTFA_CONV_EXTERN_IDENTITY(Element)                                                                     \
  extern template cudaError_t detail::conv_grad_input_identity<Element>(                                         \
      Arch, const detail::ConvGradInputProblem&, const detail::ConvGradInputEpilogue<Element>&, cudaStream_t);
#define FASTFA_CONV_INSTANTIATE_IDENTITY(Element)                                                                \
  template cudaError_t conv_forward_gemm<Element>(Arch, const ConvShape&, const void*, const ImageStrides&,     \
                                                  const void*, void*, const ImageStrides&,                      \
                                                  const LinearEpilogueArgs&, cudaStream_t);                     \
  template cudaError_t conv_grad_weight_gemm<Element>(Arch, const ConvShape&, const void*, const ImageStrides&, \
                                                      const void*, const ImageStrides&, float*, float*, int64_t, \
                                                      cudaStream_t);                                            \
  template cudaError_t detail::conv_grad_input_identity<Element>(                                                \
      Arch, const detail::ConvGradInputProblem&, const detail::ConvGradInputEpilogue<Element>&, cudaStream_t);
#define FASTFA_CONV_INSTANTIATE_FEEDBACK(Element)                                                                \
  FASTFA_CONV_EXTERN_IDENTITY(Element)                                                                           \
  template cudaError_t conv_grad_input_gemm<Element>(Arch, Rule, const ConvShape&, const void*,                 \
                                                     const ImageStrides&, const void*, const ImageStrides&,     \
                                                     const FeedbackArgs&, void*, const ImageStrides&, cudaStream_t);

} // namespace gemm
} // namespace fastfa
