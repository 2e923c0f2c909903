// The fused GEMM's data path, run on the CPU (by tests/test_sass.py; no GPU needed): the tile
// loaders (indices, 16-byte and gathered loads, zero fill, the rule's transform and its
// Philox keys, operand rounding, the swizzled shared-memory stores), the K-slice split, the
// row sums and the epilogues (with the wgmma path's accumulator positions) are the kernel's
// own code, called for each of the 256 threads of each CTA in turn; only the tensor-core MMA
// is replaced by a plain loop over the same swizzled tiles. Checked against convolutions and
// matrix products written from their definitions in double precision: the conv implicit
// GEMMs (forward with bias and activation, grad_input for every transform, split-K
// grad_weight with grad_bias) in NCHW, channels_last and strided layouts, the linear
// layer's GEMMs as linear_cuda.cu builds them, and dfa's e B_l as direct_feedback_cuda.cu
// does. What the replaced MMA does with the tiles (ldmatrix fragments, wgmma descriptors,
// accumulator layout) gemm_layout_check.cu compares with CuTe; barriers and timing need a GPU
// (tests/test_cuda.py).
#include "../../csrc/cuda/implicit_gemm.cuh"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace fastfa;
using namespace fastfa::gemm;
using namespace fastfa::gemm::detail;

// ---- The kernel's body, one thread at a time -------------------------------------------

// Stages that changed while an MMA reading them was in flight, over every emulated GEMM.
int64_t overwritten = 0;
// CTAs whose operands walked their taps (TapWalk), over every emulated GEMM.
int64_t walked_ctas = 0;

// Arch picks B's shared layout as the kernel does (BLoaderFor): MN-major B stays MN-major for
// wgmma (16-bit), is stored element by element into the K-major tile for mma.sync.
template <class Element, class Arch = Sm90Gmma, class Gemm, class Transform, class Epilogue>
void emulate(const Gemm& problem, Transform transform, const Epilogue& epilogue) {
  using Bits = typename Traits<Element>::Bits;
  constexpr bool kRowSums = Epilogue::kRowSums && Transform::kIdentity;
  using ALoader = TileLoader<Element, IdentityTransform, decltype(problem.a_index), kRowSums>;
  using BLoader = BLoaderFor<Arch, Element, Transform, decltype(problem.b_index)>;
  constexpr int kTileK = ALoader::kTileK;
  if (problem.m == 0 || problem.n == 0) {
    return;
  }
  const int64_t k_tiles = (problem.k + kTileK - 1) / kTileK;
  const int64_t splits = problem.k_tiles_per_split > 0 && k_tiles > 0
                             ? (k_tiles + problem.k_tiles_per_split - 1) / problem.k_tiles_per_split
                             : 1;
  transform.prepare();
  const IdentityTransform identity;
  alignas(1024) static unsigned char stages[Arch::kStages * kStageBytes];
  std::vector<float> accumulator(kTileRows * kTileRows);
  // The CTAs in launch order, each at the tile of C that the kernel's raster gives it.
  const int64_t grid_m = (problem.m + kTileRows - 1) / kTileRows, grid_n = (problem.n + kTileRows - 1) / kTileRows;
  for (int64_t y = 0; y < grid_n; ++y) {
    for (int64_t x = 0; x < grid_m; ++x) {
      int64_t tile_m, tile_n;
      raster(x, y, grid_m, grid_n, tile_m, tile_n);
      const int64_t m0 = tile_m * kTileRows, n0 = tile_n * kTileRows;
      for (int64_t split = 0; split < splits; ++split) {
        std::vector<ALoader> a;
        std::vector<BLoader> b;
        for (int thread = 0; thread < kThreads; ++thread) {
          a.emplace_back(problem.a, nullptr, problem.a_index, thread);
          b.emplace_back(problem.b, transform.stored(), problem.b_index, thread);
        }
        std::fill(accumulator.begin(), accumulator.end(), 0.0f);
        int64_t first, end;
        split_tiles(k_tiles, problem.k_tiles_per_split, split, first, end);
        std::vector<int64_t> interior(kThreads);
        for (int thread = 0; thread < kThreads; ++thread) {
          interior[thread] = start_interior(a[thread], b[thread], problem.k, m0, n0, first, end);
        }
        walked_ctas += ALoader::kWalks && interior[0] > first;
        // The kernel's schedule (run_mainloop) over Arch::kStages stages, each step by every
        // thread in turn. An MMA reads its stage when issued (multiply) and may still read it
        // until retired: the model takes a copy at issue, multiplies when it retires, and fails
        // if the stage changed in between (a stage refilled under an MMA in flight); a retired
        // stage is poisoned, so an MMA of a stage no thread refilled shows as NaN.
        std::memset(stages, 0xFF, sizeof(stages));  // NaN in every dtype: a byte no thread wrote shows
        std::deque<std::pair<int, std::vector<unsigned char>>> in_flight;
        auto retire_all_but = [&](size_t keep) {
          while (in_flight.size() > keep) {
            const int stage = in_flight.front().first;
            const unsigned char* tiles = in_flight.front().second.data();
            if (std::memcmp(tiles, stages + stage * kStageBytes, kStageBytes) != 0) {
              ++overwritten;
            }
            for (int row = 0; row < kTileRows; ++row) {
              for (int col = 0; col < kTileRows; ++col) {
                float sum = 0.0f;
                for (int k = 0; k < kTileK; ++k) {
                  const Bits x = *reinterpret_cast<const Bits*>(tiles + swizzled(row, k * sizeof(Bits)));
                  const Bits y = *reinterpret_cast<const Bits*>(tiles + kTileBytes + b[0].tile_offset(col, k));
                  sum += Traits<Element>::to_float(x) * Traits<Element>::to_float(y);
                }
                accumulator[row * kTileRows + col] += sum;
              }
            }
            std::memset(stages + stage * kStageBytes, 0xFF, kStageBytes);
            in_flight.pop_front();
          }
        };
        run_mainloop<Arch>(
            first, end,
            [&](int64_t tile) {
              for (int thread = 0; thread < kThreads; ++thread) {
                fetch_tile(a[thread], b[thread], tile, interior[thread], m0, n0);
              }
            },
            [&](int stage, int64_t tile) {
              for (int thread = 0; thread < kThreads; ++thread) {
                a[thread].commit(stages + stage * kStageBytes, identity, m0, tile * kTileK);
                b[thread].commit(stages + stage * kStageBytes + kTileBytes, transform, n0, tile * kTileK);
              }
            },
            [] {}, [] {},
            [&](int stage) {
              in_flight.emplace_back(stage, std::vector<unsigned char>(stages + stage * kStageBytes,
                                                                       stages + (stage + 1) * kStageBytes));
            },
            [&] { retire_all_but(Arch::kMmasInFlight); });
        retire_all_but(0);
        if (kRowSums && epilogue.wants_row_sums() && n0 == 0) {
          float sums[kTileRows] = {};
          for (int thread = 0; thread < kThreads; ++thread) {
            a[thread].reduce_row_sums(sums);
          }
          for (int row = 0; row < kTileRows && m0 + row < problem.m; ++row) {
            epilogue.row_sum(m0 + row, split, sums[row]);
          }
        }
        // The wgmma path's store: each thread's accumulators, pairwise, where the kernel puts them.
        for (int thread = 0; thread < kThreads; ++thread) {
          for (int i = 0; i < 64; i += 2) {
            int row, col;
            Sm90Math<Element>::accumulator_position(thread, i, row, col);
            epilogue(m0 + row, n0 + col, split, accumulator[row * kTileRows + col],
                     accumulator[row * kTileRows + col + 1]);
          }
        }
      }
    }
  }
}

// ---- Tensors: operand bits in memory, logical values in double ------------------------

std::mt19937_64 generator(20261128);

template <class Element>
struct Tensor4 {
  using Bits = typename Traits<Element>::Bits;
  int64_t size[4];
  ImageStrides strides;
  std::vector<Bits> memory;

  // Logical (N, C, H, W) in the given layout: "nchw", "channels_last", or "strided" (every
  // dimension padded, channels innermost-but-one, so no stride is the contiguous one).
  Tensor4(int64_t n, int64_t c, int64_t h, int64_t w, const std::string& layout) : size{n, c, h, w} {
    if (layout == "channels_last") {
      strides = {h * w * c, 1, w * c, c};
    } else if (layout == "strided") {
      strides = {(c + 1) * (h + 2) * (w + 3) * 2, (h + 2) * (w + 3) * 2, (w + 3) * 2, 2};
    } else {
      strides = {c * h * w, h * w, w, 1};
    }
    const int64_t extent = (n - 1) * strides.n + (c - 1) * strides.c + (h - 1) * strides.h + (w - 1) * strides.w + 1;
    memory.assign(static_cast<size_t>(extent), Traits<Element>::operand(std::nanf("")));
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (int64_t a = 0; a < n; ++a)
      for (int64_t b = 0; b < c; ++b)
        for (int64_t y = 0; y < h; ++y)
          for (int64_t x = 0; x < w; ++x) at(a, b, y, x) = Traits<Element>::operand(uniform(generator));
  }
  Bits& at(int64_t a, int64_t b, int64_t y, int64_t x) {
    return memory[a * strides.n + b * strides.c + y * strides.h + x * strides.w];
  }
  double value(int64_t a, int64_t b, int64_t y, int64_t x) {
    return Traits<Element>::to_float(at(a, b, y, x));
  }
};

// Compares got with want where |got - want| <= relative |want| + absolute (abs_sum: the sum of
// the magnitudes of the terms, the scale of the accumulation's own error).
struct Comparison {
  const char* what;
  double relative;
  int64_t checked = 0, failed = 0;
  double worst = 0.0;

  void operator()(double got, double want, double abs_sum) {
    const double bound = relative * std::fabs(want) + 1e-5 * abs_sum + 1e-30;
    const double error = std::fabs(got - want);
    ++checked;
    worst = std::max(worst, std::isnan(error) ? INFINITY : error / bound);
    if (!(error <= bound)) {
      if (failed++ < 3) std::printf("    %s: got %.6g, want %.6g (bound %.3g)\n", what, got, want, bound);
    }
  }
};

int report(const std::string& name, const Comparison& comparison) {
  std::printf("%-58s %-14s %7lld values, worst error / bound %.3f%s\n", name.c_str(), comparison.what,
              static_cast<long long>(comparison.checked), comparison.worst, comparison.failed ? "  FAILED" : "");
  return comparison.failed != 0 || comparison.checked == 0;
}

template <class Element>
double output_tolerance() {
  return std::is_same<Element, Tf32>::value ? 1e-6 : std::is_same<Element, Bf16>::value ? 1.0 / 256 : 1.0 / 2048;
}

template <class Element>
double round_operand(double v) {
  return Traits<Element>::to_float(Traits<Element>::operand(static_cast<float>(v)));
}

struct Geometry {
  int64_t batch, in_channels, in_h, in_w, out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

ConvShape shape_of(const Geometry& g, bool channels_last) {
  ConvShape s;
  s.batch = g.batch;
  s.in_channels = g.in_channels;
  s.in_h = g.in_h;
  s.in_w = g.in_w;
  s.out_channels = g.out_channels;
  s.kernel_h = g.kernel_h;
  s.kernel_w = g.kernel_w;
  s.out_h = (g.in_h + 2 * g.pad_h - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  s.out_w = (g.in_w + 2 * g.pad_w - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  s.stride_h = g.stride_h;
  s.stride_w = g.stride_w;
  s.pad_h = g.pad_h;
  s.pad_w = g.pad_w;
  s.dilation_h = g.dilation_h;
  s.dilation_w = g.dilation_w;
  s.channels_last = channels_last;
  return s;
}

// The input position tap (kh, kw) of output pixel (oh, ow) reads, or false in the padding.
bool tap_position(const ConvShape& s, int64_t oh, int64_t ow, int64_t kh, int64_t kw, int64_t& h, int64_t& w) {
  h = oh * s.stride_h - s.pad_h + kh * s.dilation_h;
  w = ow * s.stride_w - s.pad_w + kw * s.dilation_w;
  return 0 <= h && h < s.in_h && 0 <= w && w < s.in_w;
}

// The flat tap index of (c, kh, kw) in the shape's order (the GEMM's K / column order).
int64_t tap_index(const ConvShape& s, int64_t channels, int64_t c, int64_t kh, int64_t kw) {
  return s.channels_last ? (kh * s.kernel_w + kw) * channels + c : (c * s.kernel_h + kh) * s.kernel_w + kw;
}

// ---- The convolution's three passes ------------------------------------------------------

template <class Element>
int check_conv(const Geometry& geometry, const std::string& layout) {
  using Bits = typename Traits<Element>::Bits;
  const bool channels_last = layout == "channels_last";
  const ConvShape s = shape_of(geometry, channels_last);
  const std::string name = std::string(std::is_same<Element, Bf16>::value   ? "bf16"
                                       : std::is_same<Element, Fp16>::value ? "fp16"
                                                                            : "tf32") +
                           " conv " + std::to_string(s.batch) + "x" + std::to_string(s.in_channels) + "x" +
                           std::to_string(s.in_h) + "x" + std::to_string(s.in_w) + " -> " +
                           std::to_string(s.out_channels) + " k" + std::to_string(s.kernel_h) + "x" +
                           std::to_string(s.kernel_w) + " s" + std::to_string(s.stride_h) + std::to_string(s.stride_w) +
                           " p" + std::to_string(s.pad_h) + std::to_string(s.pad_w) + " d" +
                           std::to_string(s.dilation_h) + std::to_string(s.dilation_w) + " " + layout;
  int failures = 0;
  Tensor4<Element> x(s.batch, s.in_channels, s.in_h, s.in_w, layout);
  Tensor4<Element> delta(s.batch, s.out_channels, s.out_h, s.out_w, layout);
  // The filter: logical (oc, c, kh, kw); the forward's B is its contiguous form in tap order.
  Tensor4<Element> weight(s.out_channels, s.in_channels, s.kernel_h, s.kernel_w, layout);
  Tensor4<Element> stored(s.out_channels, s.in_channels, s.kernel_h, s.kernel_w, layout);
  const int64_t taps = s.in_channels * s.kernel_h * s.kernel_w;
  std::vector<Bits> filter(static_cast<size_t>(s.out_channels * taps));
  for (int64_t oc = 0; oc < s.out_channels; ++oc)
    for (int64_t c = 0; c < s.in_channels; ++c)
      for (int64_t kh = 0; kh < s.kernel_h; ++kh)
        for (int64_t kw = 0; kw < s.kernel_w; ++kw)
          filter[oc * taps + tap_index(s, s.in_channels, c, kh, kw)] = weight.at(oc, c, kh, kw);
  std::vector<Bits> bias(static_cast<size_t>(s.out_channels));
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (auto& b : bias) b = Traits<Element>::operand(uniform(generator));

  // forward: y = silu(conv(x, W) + b), with z and r kept.
  {
    Tensor4<Element> y(s.batch, s.out_channels, s.out_h, s.out_w, layout), z = y, r = y;
    LinearEpilogueArgs args;
    args.bias = bias.data();
    args.saved = z.memory.data();
    args.projection = r.memory.data();
    args.activation = Activation::kSilu;
    const auto problem = conv_forward_problem<Element>(s, x.memory.data(), x.strides, filter.data());
    const BiasActivationEpilogue<Element, ImageOutput> store{
        y.memory.data(), ImageOutput{Order3(s.out_h, s.out_w), y.strides}, problem.m, problem.n, args};
    emulate<Element>(problem, IdentityTransform{}, store);
    Comparison out{"forward y", output_tolerance<Element>()}, pre{"forward z", output_tolerance<Element>()},
        projection{"forward r", output_tolerance<Element>()};
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t oc = 0; oc < s.out_channels; ++oc)
        for (int64_t oh = 0; oh < s.out_h; ++oh)
          for (int64_t ow = 0; ow < s.out_w; ++ow) {
            double sum = 0.0, abs_sum = 0.0;
            for (int64_t c = 0; c < s.in_channels; ++c)
              for (int64_t kh = 0; kh < s.kernel_h; ++kh)
                for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
                  int64_t h, w;
                  if (tap_position(s, oh, ow, kh, kw, h, w)) {
                    const double term = x.value(n, c, h, w) * weight.value(oc, c, kh, kw);
                    sum += term;
                    abs_sum += std::fabs(term);
                  }
                }
            const double zv = sum + Traits<Element>::to_float(bias[oc]);
            projection(r.value(n, oc, oh, ow), sum, abs_sum);
            pre(z.value(n, oc, oh, ow), zv, abs_sum);
            out(y.value(n, oc, oh, ow), zv / (1.0 + std::exp(-zv)), abs_sum);
          }
    failures += report(name, out) + report(name, pre) + report(name, projection);
  }

  // grad_input for every transform: grad_x = the transposed convolution of delta with T(W).
  const int64_t rng[2] = {0x5EED1234, 7};
  const float scale = 0.375f;
  // "usf rms" is usf's "rms" scale as the kernel gets it: sign(W) in the transform, and s read
  // from memory (the device scalar) by the epilogue, once per output element.
  const float rms_scale = 0.8125f;
  const Rule rules[] = {Rule::kBackprop, Rule::kFeedbackAlignment, Rule::kUniformSignSymmetry,
                        Rule::kBatchRandomSignFeedback, Rule::kFixedRandomSignFeedback, Rule::kUniformSignSymmetry};
  const char* rule_names[] = {"bp", "fa", "usf", "brsf", "frsf", "usf rms"};
  for (int which = 0; which < 6; ++which) {
    const Rule rule = rules[which];
    const bool scale_in_epilogue = which == 5;
    Tensor4<Element> grad_x(s.batch, s.in_channels, s.in_h, s.in_w, layout);
    FeedbackArgs feedback;
    feedback.stored = rule == Rule::kFixedRandomSignFeedback ? stored.memory.data() : nullptr;
    feedback.rng = rng;
    feedback.scale = scale_in_epilogue ? 1.0f : scale;
    feedback.output_scale = scale_in_epilogue ? &rms_scale : nullptr;
    const auto problem =
        conv_grad_input_problem<Element>(s, delta.memory.data(), delta.strides, weight.memory.data(), weight.strides);
    auto store = conv_grad_input_epilogue<Element>(s, grad_x.memory.data(), grad_x.strides);
    store.output_scale = feedback.output_scale;  // as transformed_gemm hands it on
    switch (rule) {
    case Rule::kBackprop:
      emulate<Element>(problem, IdentityTransform{}, store);
      break;
    case Rule::kFeedbackAlignment:
      emulate<Element>(problem, RuleTransform<Rule::kFeedbackAlignment>{feedback}, store);
      break;
    case Rule::kUniformSignSymmetry:
      emulate<Element>(problem, RuleTransform<Rule::kUniformSignSymmetry>{feedback}, store);
      break;
    case Rule::kBatchRandomSignFeedback:
      emulate<Element>(problem, RuleTransform<Rule::kBatchRandomSignFeedback>{feedback}, store);
      break;
    default:
      emulate<Element>(problem, RuleTransform<Rule::kFixedRandomSignFeedback>{feedback}, store);
      break;
    }
    // B = T(W) from learning-rules.md's formulas, each draw keyed by the element's row-major
    // index in W's logical shape, rounded to the operand type as the kernel rounds it.
    std::vector<double> feedback_weight(static_cast<size_t>(s.out_channels * taps));
    for (int64_t oc = 0; oc < s.out_channels; ++oc)
      for (int64_t c = 0; c < s.in_channels; ++c)
        for (int64_t kh = 0; kh < s.kernel_h; ++kh)
          for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
            const int64_t key = ((oc * s.in_channels + c) * s.kernel_h + kh) * s.kernel_w + kw;
            const float xi = unit_draw(rng[0], rng[1], key, Distribution::kUniform);
            const float w = static_cast<float>(weight.value(oc, c, kh, kw));
            const float r = rule == Rule::kFixedRandomSignFeedback ? static_cast<float>(stored.value(oc, c, kh, kw))
                                                                   : feedback.scale * xi;
            feedback_weight[key] = round_operand<Element>(feedback_transform<float>(rule, w, r, xi, feedback.scale));
          }
    // Scattered from every (output pixel, tap) to the input pixel the tap reads (the forward's
    // own definition, tap_position), so no inverse of the index is assumed.
    const int64_t pixels = s.batch * s.in_h * s.in_w;
    std::vector<double> sums(static_cast<size_t>(pixels * s.in_channels)), abs_sums(sums.size());
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t oh = 0; oh < s.out_h; ++oh)
        for (int64_t ow = 0; ow < s.out_w; ++ow)
          for (int64_t kh = 0; kh < s.kernel_h; ++kh)
            for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
              int64_t th, tw;
              if (!tap_position(s, oh, ow, kh, kw, th, tw)) {
                continue;
              }
              const int64_t at = ((n * s.in_h + th) * s.in_w + tw) * s.in_channels;
              for (int64_t oc = 0; oc < s.out_channels; ++oc) {
                const double d = delta.value(n, oc, oh, ow);
                for (int64_t c = 0; c < s.in_channels; ++c) {
                  const double b = feedback_weight[((oc * s.in_channels + c) * s.kernel_h + kh) * s.kernel_w + kw];
                  const double term = d * b;
                  sums[at + c] += term;
                  abs_sums[at + c] += std::fabs(term);
                }
              }
            }
    Comparison compare{"grad_input", output_tolerance<Element>()};
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t c = 0; c < s.in_channels; ++c)
        for (int64_t h = 0; h < s.in_h; ++h)
          for (int64_t w = 0; w < s.in_w; ++w) {
            const int64_t at = ((n * s.in_h + h) * s.in_w + w) * s.in_channels + c;
            const double factor = scale_in_epilogue ? rms_scale : 1.0;
            compare(grad_x.value(n, c, h, w), factor * sums[at], factor * abs_sums[at]);
          }
    failures += report(name + " " + rule_names[which], compare);
  }

  // grad_weight and grad_bias, split over K (the output pixels) into slices of one tile.
  for (int64_t per_split : {int64_t(0), int64_t(1)}) {
    const auto problem =
        conv_grad_weight_problem<Element>(s, delta.memory.data(), delta.strides, x.memory.data(), x.strides, per_split);
    const int64_t k_tiles = (problem.k + TileLoader<Element, IdentityTransform, MatrixIndex, false>::kTileK - 1) /
                            TileLoader<Element, IdentityTransform, MatrixIndex, false>::kTileK;
    const int64_t splits = per_split > 0 ? (k_tiles + per_split - 1) / per_split : 1;
    std::vector<float> partial(static_cast<size_t>(splits * problem.m * problem.n), NAN),
        partial_sums(static_cast<size_t>(splits * problem.m), NAN);
    emulate<Element>(problem, IdentityTransform{}, SplitEpilogue{partial.data(), partial_sums.data(), problem.m,
                                                                 problem.n});
    Comparison weights{"grad_weight", 1e-6}, sums{"grad_bias", 1e-6};
    for (int64_t oc = 0; oc < s.out_channels; ++oc) {
      double bias_sum = 0.0, bias_abs = 0.0, got_bias = 0.0;
      for (int64_t split = 0; split < splits; ++split) got_bias += partial_sums[split * problem.m + oc];
      for (int64_t n = 0; n < s.batch; ++n)
        for (int64_t oh = 0; oh < s.out_h; ++oh)
          for (int64_t ow = 0; ow < s.out_w; ++ow) {
            bias_sum += delta.value(n, oc, oh, ow);
            bias_abs += std::fabs(delta.value(n, oc, oh, ow));
          }
      sums(got_bias, bias_sum, bias_abs);
      for (int64_t c = 0; c < s.in_channels; ++c)
        for (int64_t kh = 0; kh < s.kernel_h; ++kh)
          for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
            double sum = 0.0, abs_sum = 0.0, got = 0.0;
            for (int64_t n = 0; n < s.batch; ++n)
              for (int64_t oh = 0; oh < s.out_h; ++oh)
                for (int64_t ow = 0; ow < s.out_w; ++ow) {
                  int64_t h, w;
                  if (tap_position(s, oh, ow, kh, kw, h, w)) {
                    const double term = delta.value(n, oc, oh, ow) * x.value(n, c, h, w);
                    sum += term;
                    abs_sum += std::fabs(term);
                  }
                }
            const int64_t column = tap_index(s, s.in_channels, c, kh, kw);
            for (int64_t split = 0; split < splits; ++split) {
              got += partial[(split * problem.m + oc) * problem.n + column];
            }
            weights(got, sum, abs_sum);
          }
    }
    const std::string slices = " in " + std::to_string(splits) + " K slice" + (splits > 1 ? "s" : "");
    failures += report(name + slices, weights) + report(name + slices, sums);
  }
  return failures;
}

// ---- The linear layer's GEMMs, with the strides linear_cuda.cu gives them -----------------

template <class Element>
std::vector<typename Traits<Element>::Bits> random_matrix(int64_t count) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<typename Traits<Element>::Bits> out(static_cast<size_t>(count));
  for (auto& v : out) v = Traits<Element>::operand(uniform(generator));
  return out;
}

template <class Element, class Arch = Sm90Gmma>
int check_linear(int64_t rows, int64_t in_features, int64_t out_features) {
  using Bits = typename Traits<Element>::Bits;
  const auto f = [](Bits b) { return static_cast<double>(Traits<Element>::to_float(b)); };
  const std::string name = std::string(std::is_same<Element, Bf16>::value   ? "bf16"
                                       : std::is_same<Element, Fp16>::value ? "fp16"
                                                                            : "tf32") +
                           (std::is_same<Arch, Sm80Mma>::value ? " mma.sync" : "") + " linear " +
                           std::to_string(rows) + "x" + std::to_string(in_features) + " -> " +
                           std::to_string(out_features);
  int failures = 0;
  const auto x = random_matrix<Element>(rows * in_features), w = random_matrix<Element>(out_features * in_features);
  const auto delta = random_matrix<Element>(rows * out_features);
  const auto stored = random_matrix<Element>(out_features * in_features);
  // forward: y = gelu(x W^T + b), z and r kept (A and B K-contiguous).
  {
    const auto bias = random_matrix<Element>(out_features);
    Problem problem;
    problem.m = rows;
    problem.n = out_features;
    problem.k = in_features;
    problem.a = {x.data(), in_features, 1};
    problem.b = {w.data(), in_features, 1};
    std::vector<Bits> y(static_cast<size_t>(rows * out_features)), z = y, r = y;
    LinearEpilogueArgs args;
    args.bias = bias.data();
    args.saved = z.data();
    args.projection = r.data();
    args.activation = Activation::kGelu;
    const BiasActivationEpilogue<Element, MatrixOutput> store{y.data(), MatrixOutput{out_features}, rows,
                                                              out_features, args};
    emulate<Element, Arch>(matrix_problem(problem), IdentityTransform{}, store);
    Comparison out{"forward y", output_tolerance<Element>()}, pre{"forward z", output_tolerance<Element>()},
        projection{"forward r", output_tolerance<Element>()};
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t o = 0; o < out_features; ++o) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t k = 0; k < in_features; ++k) {
          sum += f(x[i * in_features + k]) * f(w[o * in_features + k]);
          abs_sum += std::fabs(f(x[i * in_features + k]) * f(w[o * in_features + k]));
        }
        const double zv = sum + f(bias[o]);
        projection(f(r[i * out_features + o]), sum, abs_sum);
        pre(f(z[i * out_features + o]), zv, abs_sum);
        out(f(y[i * out_features + o]), 0.5 * zv * (1.0 + std::erf(zv / std::sqrt(2.0))), abs_sum);
      }
    failures += report(name, out) + report(name, pre) + report(name, projection);
  }
  // grad_input = delta T(W): B[n][k] = W[k][n] (row stride 1), for brsf's draws keyed by W's index.
  const int64_t rng[2] = {99, 3};
  FeedbackArgs feedback;
  feedback.rng = rng;
  // usf here as its "rms" scale reaches the kernel (see check_conv): sign(W), s from memory in the epilogue.
  const float rms_scale = 1.375f;
  for (Rule rule : {Rule::kBatchRandomSignFeedback, Rule::kFeedbackAlignment, Rule::kFixedRandomSignFeedback,
                    Rule::kUniformSignSymmetry}) {
    const bool scale_in_epilogue = rule == Rule::kUniformSignSymmetry;
    feedback.scale = scale_in_epilogue ? 1.0f : 0.25f;
    feedback.output_scale = scale_in_epilogue ? &rms_scale : nullptr;
    feedback.stored = rule == Rule::kFixedRandomSignFeedback ? stored.data() : nullptr;
    Problem problem;
    problem.m = rows;
    problem.n = in_features;
    problem.k = out_features;
    problem.a = {delta.data(), out_features, 1};
    problem.b = {w.data(), 1, in_features};
    std::vector<Bits> grad_x(static_cast<size_t>(rows * in_features));
    problem.c = grad_x.data();
    problem.ldc = in_features;
    const auto gemm = matrix_problem(problem);
    auto store = matrix_store<Element>(problem);
    store.output_scale = feedback.output_scale;  // as transformed_gemm hands it on
    auto run = [&](const auto& problem_of, const auto& epilogue) {
      if (rule == Rule::kBatchRandomSignFeedback) {
        emulate<Element, Arch>(problem_of, RuleTransform<Rule::kBatchRandomSignFeedback>{feedback}, epilogue);
      } else if (rule == Rule::kFeedbackAlignment) {
        emulate<Element, Arch>(problem_of, RuleTransform<Rule::kFeedbackAlignment>{feedback}, epilogue);
      } else if (rule == Rule::kUniformSignSymmetry) {
        emulate<Element, Arch>(problem_of, RuleTransform<Rule::kUniformSignSymmetry>{feedback}, epilogue);
      } else {
        emulate<Element, Arch>(problem_of, RuleTransform<Rule::kFixedRandomSignFeedback>{feedback}, epilogue);
      }
    };
    run(gemm, store);
    // The same in K slices of two tiles (split_feedback_gemm, for few rows): fp32 partials, each
    // times C's factor, added here.
    auto sliced = gemm;
    sliced.k_tiles_per_split = 2;
    const int64_t tile_k = TileLoader<Element, IdentityTransform, MatrixIndex, false>::kTileK;
    const int64_t splits = ((out_features + tile_k - 1) / tile_k + 1) / 2;
    std::vector<float> partial(static_cast<size_t>(splits * rows * in_features), NAN);
    SplitEpilogue slices{partial.data(), nullptr, rows, in_features};
    slices.output_scale = feedback.output_scale;  // as transformed_gemm hands it on
    run(sliced, slices);
    Comparison compare{"grad_input", output_tolerance<Element>()}, split_compare{"grad_input", 1e-6};
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < in_features; ++i) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t o = 0; o < out_features; ++o) {
          const int64_t key = o * in_features + i;
          const float xi = unit_draw(rng[0], rng[1], key, Distribution::kUniform);
          const float stored_r =
              rule == Rule::kFixedRandomSignFeedback ? static_cast<float>(f(stored[key])) : feedback.scale * xi;
          const double b = round_operand<Element>(
              feedback_transform<float>(rule, static_cast<float>(f(w[key])), stored_r, xi, feedback.scale));
          sum += f(delta[r * out_features + o]) * b;
          abs_sum += std::fabs(f(delta[r * out_features + o]) * b);
        }
        const double factor = scale_in_epilogue ? rms_scale : 1.0;
        compare(f(grad_x[r * in_features + i]), factor * sum, factor * abs_sum);
        double got = 0.0;
        for (int64_t s = 0; s < splits; ++s) got += partial[(s * rows + r) * in_features + i];
        split_compare(got, factor * sum, factor * abs_sum);
      }
    const std::string rule_name = rule == Rule::kBatchRandomSignFeedback ? " brsf"
                                  : rule == Rule::kFeedbackAlignment    ? " fa"
                                  : rule == Rule::kUniformSignSymmetry  ? " usf rms"
                                                                        : " frsf";
    failures += report(name + rule_name, compare) +
                report(name + rule_name + " in " + std::to_string(splits) + " K slices", split_compare);
  }
  // grad_weight = delta^T x with grad_bias as A's row sums (A and B row-contiguous).
  {
    Problem problem;
    problem.m = out_features;
    problem.n = in_features;
    problem.k = rows;
    problem.a = {delta.data(), 1, out_features};
    problem.b = {x.data(), 1, in_features};
    std::vector<Bits> grad_w(static_cast<size_t>(out_features * in_features));
    std::vector<Bits> grad_b(static_cast<size_t>(out_features));
    problem.c = grad_w.data();
    problem.ldc = in_features;
    problem.a_row_sums = grad_b.data();
    emulate<Element, Arch>(matrix_problem(problem), IdentityTransform{}, matrix_store<Element>(problem));
    Comparison weights{"grad_weight", output_tolerance<Element>()}, sums{"grad_bias", output_tolerance<Element>()};
    for (int64_t o = 0; o < out_features; ++o) {
      double bias_sum = 0.0, bias_abs = 0.0;
      for (int64_t r = 0; r < rows; ++r) {
        bias_sum += f(delta[r * out_features + o]);
        bias_abs += std::fabs(f(delta[r * out_features + o]));
      }
      sums(f(grad_b[o]), bias_sum, bias_abs);
      for (int64_t i = 0; i < in_features; ++i) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t r = 0; r < rows; ++r) {
          sum += f(delta[r * out_features + o]) * f(x[r * in_features + i]);
          abs_sum += std::fabs(f(delta[r * out_features + o]) * f(x[r * in_features + i]));
        }
        weights(f(grad_w[o * in_features + i]), sum, abs_sum);
      }
    }
    failures += report(name, weights) + report(name, sums);
    // The same in K slices of one tile (split_gemm, for a long batch): fp32 partials added here.
    auto sliced = matrix_problem(problem);
    sliced.k_tiles_per_split = 1;
    const int64_t tile_k = TileLoader<Element, IdentityTransform, MatrixIndex, false>::kTileK;
    const int64_t splits = (rows + tile_k - 1) / tile_k;
    std::vector<float> partial(static_cast<size_t>(splits * out_features * in_features), NAN),
        partial_sums(static_cast<size_t>(splits * out_features), NAN);
    emulate<Element, Arch>(sliced, IdentityTransform{}, SplitEpilogue{partial.data(), partial_sums.data(), out_features,
                                                                in_features});
    Comparison split_weights{"grad_weight", 1e-6}, split_sums{"grad_bias", 1e-6};
    for (int64_t o = 0; o < out_features; ++o) {
      double bias_sum = 0.0, bias_abs = 0.0, got_bias = 0.0;
      for (int64_t r = 0; r < rows; ++r) {
        bias_sum += f(delta[r * out_features + o]);
        bias_abs += std::fabs(f(delta[r * out_features + o]));
      }
      for (int64_t s = 0; s < splits; ++s) got_bias += partial_sums[s * out_features + o];
      split_sums(got_bias, bias_sum, bias_abs);
      for (int64_t i = 0; i < in_features; ++i) {
        double sum = 0.0, abs_sum = 0.0, got = 0.0;
        for (int64_t r = 0; r < rows; ++r) {
          sum += f(delta[r * out_features + o]) * f(x[r * in_features + i]);
          abs_sum += std::fabs(f(delta[r * out_features + o]) * f(x[r * in_features + i]));
        }
        for (int64_t s = 0; s < splits; ++s) got += partial[(s * out_features + o) * in_features + i];
        split_weights(got, sum, abs_sum);
      }
    }
    const std::string slices = " in " + std::to_string(splits) + " K slices";
    failures += report(name + slices, split_weights) + report(name + slices, split_sums);
  }
  return failures;
}

// dfa's grad_x = e B_l (direct_feedback_cuda.cu): drawn fa's GEMM over gemm.h's
// direct_feedback_problem, B_l (K x F) drawn in the loader from (seed, k * F + f) with no B
// in memory at all (a null operand), against the sum written from the spec's definition.
template <class Element, class Arch = Sm90Gmma>
int check_direct_feedback(int64_t rows, int64_t output_width, int64_t input_numel) {
  using Bits = typename Traits<Element>::Bits;
  const auto f = [](Bits b) { return static_cast<double>(Traits<Element>::to_float(b)); };
  const std::string name = std::string(std::is_same<Element, Bf16>::value   ? "bf16"
                                       : std::is_same<Element, Fp16>::value ? "fp16"
                                                                            : "tf32") +
                           (std::is_same<Arch, Sm80Mma>::value ? " mma.sync" : "") + " dfa e B_l " +
                           std::to_string(rows) + "x" + std::to_string(output_width) + " -> " +
                           std::to_string(input_numel);
  const auto error = random_matrix<Element>(rows * output_width);
  const int64_t rng[2] = {1234567, 0};
  FeedbackArgs feedback;
  feedback.rng = rng;
  feedback.scale = 0.125f;
  std::vector<Bits> grad_x(static_cast<size_t>(rows * input_numel), Traits<Element>::operand(std::nanf("")));
  const Problem problem = direct_feedback_problem(rows, output_width, input_numel, error.data(), grad_x.data());
  emulate<Element, Arch>(matrix_problem(problem), RuleTransform<Rule::kFeedbackAlignment>{feedback},
                         matrix_store<Element>(problem));
  Comparison compare{"grad_input", output_tolerance<Element>()};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < input_numel; ++i) {
      double sum = 0.0, abs_sum = 0.0;
      for (int64_t k = 0; k < output_width; ++k) {
        const float xi = unit_draw(rng[0], rng[1], static_cast<uint64_t>(k * input_numel + i), Distribution::kUniform);
        const double b = round_operand<Element>(feedback.scale * xi);
        sum += f(error[r * output_width + k]) * b;
        abs_sum += std::fabs(f(error[r * output_width + k]) * b);
      }
      compare(f(grad_x[r * input_numel + i]), sum, abs_sum);
    }
  return report(name, compare);
}

} // namespace

// usf's packed bit operations against the float path, on every 16-bit W in both halves of a
// word (the other half a random W), for scales that round up, down, to subnormal and to
// infinity: the bits must be identical.
template <class Element>
int check_packed_sign() {
  using Bits = typename Traits<Element>::Bits;
  int64_t failed = 0, checked = 0;
  std::uniform_int_distribution<uint32_t> any_bits(0, 0xFFFF);
  for (float scale : {0.25f, 0.0123456789f, 1.0f / 3.0f, 3.0e-39f, 1.0e-41f, 7.0e4f, 3.4e38f}) {
    const PackedSignOfWeight<Element> packed(scale);
    for (uint32_t w = 0; w <= 0xFFFF; ++w) {
      const uint32_t other = any_bits(generator);
      for (const uint32_t word : {w | (other << 16), other | (w << 16)}) {
        const uint32_t got = packed(word);
        for (int half = 0; half < 2; ++half) {
          const Bits in = static_cast<Bits>(word >> (16 * half)), out = static_cast<Bits>(got >> (16 * half));
          const Bits want = Traits<Element>::operand(feedback_transform<float>(
              Rule::kUniformSignSymmetry, Traits<Element>::to_float(in), 0.0f, 0.0f, scale));
          ++checked;
          if (out != want && failed++ < 3) {
            std::printf("    scale %g, W bits 0x%04x: got 0x%04x, want 0x%04x\n", scale, in, out, want);
          }
        }
      }
    }
  }
  std::printf("%-58s %-14s %7lld values, %lld wrong%s\n",
              std::is_same<Element, Bf16>::value ? "bf16 usf packed" : "fp16 usf packed", "bits",
              static_cast<long long>(checked), static_cast<long long>(failed), failed ? "  FAILED" : "");
  return failed != 0;
}

// The sign rules' fast path (PackedSignFastPath): wherever its key test calls a word ordinary,
// its one bit operation gives the float path's bits, for every 16-bit W in either half of a
// word (usf: at each scale; frsf: against R of every sign, zero, subnormal, infinity and NaN
// and random R, and every 16-bit R against such W); and the test calls ordinary every word
// with no +-0 or NaN half, so only those take the general path.
template <class Element>
int check_packed_fast_path() {
  using Bits = typename Traits<Element>::Bits;
  using Fast = PackedSignFastPath<Element>;
  int64_t failed = 0, checked = 0;
  auto special = [](uint32_t half) {
    const float x = Traits<Element>::to_float(static_cast<Bits>(half));
    return x == 0.0f || x != x;
  };
  auto expect_ordinary = [&](uint32_t word) { return !special(word & 0xFFFFu) && !special(word >> 16); };
  auto ordinary = [](uint32_t a, uint32_t b) { return Fast::ordinary(min_halves(0xFFFFFFFFu, Fast::key(a), Fast::key(b))); };
  auto report_wrong = [&](const char* what, uint32_t w, uint32_t r, uint32_t got, uint32_t want) {
    if (failed++ < 3) {
      std::printf("    %s W 0x%08x R 0x%08x: got 0x%08x, want 0x%08x\n", what, w, r, got, want);
    }
  };
  std::uniform_int_distribution<uint32_t> any_bits(0, 0xFFFF);
  for (float scale : {0.25f, 0.0123456789f, 1.0f / 3.0f, 3.0e-39f, 1.0e-41f, 7.0e4f, 3.4e38f}) {
    const PackedSignOfWeight<Element> sign(scale);
    if (!Fast::symmetric(sign)) {
      report_wrong("usf scale not symmetric", 0, 0, sign.negative, sign.positive ^ Fast::kSignBits);
    }
    for (uint32_t w = 0; w <= 0xFFFF; ++w) {
      const uint32_t other = any_bits(generator);
      for (const uint32_t word : {w | (other << 16), other | (w << 16)}) {
        ++checked;
        const bool is_ordinary = ordinary(word, word);
        if (is_ordinary != expect_ordinary(word)) {
          report_wrong("usf key test", word, 0, is_ordinary, expect_ordinary(word));
        }
        if (is_ordinary && Fast::sign_of_weight(word, sign.positive) != sign(word)) {
          report_wrong("usf", word, 0, Fast::sign_of_weight(word, sign.positive), sign(word));
        }
      }
    }
  }
  // Bits of every kind of operand: +-0, subnormals, +-1, the largest finite, +-inf, NaNs.
  const uint32_t inf = Traits<Element>::operand(INFINITY);
  std::vector<uint32_t> kinds = {0x0000u, 0x8000u, 0x0001u, 0x8001u, inf - 1, inf, inf | 0x8000u, inf + 1,
                                 0x7FFFu, 0xFFFFu, (inf + 1) | 0x8000u, Traits<Element>::operand(1.0f),
                                 Traits<Element>::operand(-1.0f)};
  for (int i = 0; i < 243; ++i) kinds.push_back(any_bits(generator));
  auto frsf = [](uint32_t w, uint32_t r) {
    uint32_t out = 0;
    for (int half = 0; half < 2; ++half) {
      const float b = feedback_transform<float>(Rule::kFixedRandomSignFeedback,
                                                Traits<Element>::to_float(static_cast<Bits>(w >> (16 * half))),
                                                Traits<Element>::to_float(static_cast<Bits>(r >> (16 * half))), 0.0f, 0.0f);
      out |= uint32_t(Traits<Element>::operand(b)) << (16 * half);
    }
    return out;
  };
  for (uint32_t x = 0; x <= 0xFFFF; ++x) {
    for (const uint32_t kind : kinds) {
      const uint32_t other = any_bits(generator), other_kind = kinds[any_bits(generator) % kinds.size()];
      // x as W against R of each kind, and x as R against W of each kind, in either half.
      const uint32_t pairs[4][2] = {{x | (other << 16), kind | (other_kind << 16)},
                                    {other | (x << 16), other_kind | (kind << 16)},
                                    {kind | (other_kind << 16), x | (other << 16)},
                                    {other_kind | (kind << 16), other | (x << 16)}};
      for (const auto& pair : pairs) {
        ++checked;
        const bool is_ordinary = ordinary(pair[0], pair[1]);
        if (is_ordinary != (expect_ordinary(pair[0]) && expect_ordinary(pair[1]))) {
          report_wrong("frsf key test", pair[0], pair[1], is_ordinary, !is_ordinary);
        }
        if (is_ordinary && Fast::magnitude_times_sign(pair[0], pair[1]) != frsf(pair[0], pair[1])) {
          report_wrong("frsf", pair[0], pair[1], Fast::magnitude_times_sign(pair[0], pair[1]), frsf(pair[0], pair[1]));
        }
      }
    }
  }
  std::printf("%-58s %-14s %7lld words, %lld wrong%s\n",
              std::is_same<Element, Bf16>::value ? "bf16 usf / frsf fast path" : "fp16 usf / frsf fast path", "bits",
              static_cast<long long>(checked), static_cast<long long>(failed), failed ? "  FAILED" : "");
  return failed != 0;
}

// The kernel's raster: every CTA of a grid at a tile of C inside it, each tile once.
int check_raster() {
  int64_t failed = 0, grids = 0;
  for (int64_t grid_m = 1; grid_m <= 40; ++grid_m) {
    for (int64_t grid_n = 1; grid_n <= 40; ++grid_n) {
      ++grids;
      std::vector<int> hits(grid_m * grid_n, 0);
      bool wrong = false;
      for (int64_t y = 0; y < grid_n; ++y) {
        for (int64_t x = 0; x < grid_m; ++x) {
          int64_t tile_m, tile_n;
          raster(x, y, grid_m, grid_n, tile_m, tile_n);
          if (tile_m < 0 || tile_m >= grid_m || tile_n < 0 || tile_n >= grid_n) {
            wrong = true;
          } else {
            ++hits[tile_n * grid_m + tile_m];
          }
        }
      }
      for (int h : hits) wrong |= h != 1;
      failed += wrong;
    }
  }
  std::printf("%-58s %-14s %7lld grids, %lld wrong%s\n", "raster", "a bijection", static_cast<long long>(grids),
              static_cast<long long>(failed), failed ? "  FAILED" : "");
  return failed != 0;
}

// Divisor's multiply-and-shift against the division, for divisors and dividends up to 2^31 - 1.
int check_divisor() {
  std::uniform_int_distribution<int64_t> any(0, (int64_t(1) << 31) - 1), small(1, 1 << 12);
  int64_t failed = 0, checked = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    const int64_t d = trial < 4096 ? trial + 1 : trial % 2 ? small(generator) : any(generator) + 1 - (trial % 3);
    if (d < 1) continue;
    const Divisor divisor(d);
    const int64_t edges[] = {0, 1, d - 1, d, d + 1, 2 * d - 1, (int64_t(1) << 31) - 1, (int64_t(1) << 31) - 2};
    for (int64_t n : edges) {
      if (n < 0 || n > (int64_t(1) << 31) - 1) continue;
      ++checked;
      failed += divisor.divide(int(n)) != n / d;
    }
    for (int i = 0; i < 64; ++i) {
      const int64_t n = any(generator);
      ++checked;
      failed += divisor.divide(int(n)) != n / d;
    }
  }
  std::printf("%-58s %-14s %7lld values, %lld wrong%s\n", "Divisor", "n / d", static_cast<long long>(checked),
              static_cast<long long>(failed), failed ? "  FAILED" : "");
  return failed != 0;
}

int main() {
  int failures = check_divisor() + check_raster();
  // batch, in channels, in h, in w, out channels, kernel h, w, stride h, w, pad h, w, dilation h, w
  const Geometry geometries[] = {
      {2, 8, 9, 9, 16, 3, 3, 1, 1, 1, 1, 1, 1},     // whole vectors of channels
      {2, 5, 7, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1},      // ragged channels and pixels
      {1, 16, 11, 10, 24, 3, 3, 2, 2, 1, 1, 1, 1},  // stride 2: grad_input skips pixels
      {3, 3, 8, 8, 8, 1, 1, 1, 1, 0, 0, 1, 1},      // 1x1
      {2, 8, 9, 9, 8, 3, 3, 1, 1, 2, 2, 2, 2},      // dilation 2
      {2, 4, 6, 7, 4, 2, 3, 1, 2, 0, 1, 1, 1},      // 2x3 kernel, mixed stride and padding
      {1, 24, 5, 5, 130, 3, 3, 1, 1, 1, 1, 1, 1},   // two tiles of out channels
      {4, 16, 12, 12, 16, 3, 3, 1, 1, 1, 1, 1, 1},  // several tiles of pixels
  };
  for (const auto& geometry : geometries) {
    for (const char* layout : {"nchw", "channels_last"}) {
      failures += check_conv<Bf16>(geometry, layout);
    }
  }
  failures += check_conv<Bf16>(geometries[1], "strided");
  failures += check_conv<Fp16>(geometries[0], "channels_last");
  failures += check_conv<Fp16>(geometries[2], "nchw");
  for (int g : {0, 1, 2}) {
    for (const char* layout : {"nchw", "channels_last"}) {
      failures += check_conv<Tf32>(geometries[g], layout);
    }
  }
  // Channels in whole k-tiles (64 bf16 / fp16, 32 tf32): channels_last walks its taps (TapWalk),
  // masks and all, next to NCHW on the same shapes; ragged pixels and in channels at the edges.
  const Geometry walked[] = {
      {3, 64, 7, 7, 64, 3, 3, 1, 1, 1, 1, 1, 1},     // 3x3, two tiles of pixels (the second ragged)
      {1, 64, 6, 7, 128, 3, 3, 1, 1, 1, 1, 1, 1},    // two k-tiles per tap; the forward's B inside
      {2, 64, 9, 8, 64, 3, 3, 2, 2, 1, 1, 1, 1},     // stride 2: grad_input's taps skip pixels
      {1, 72, 9, 9, 64, 3, 3, 1, 1, 2, 2, 2, 2},     // dilation 2; 72 in channels: ragged B rows
      {2, 64, 6, 7, 64, 2, 3, 1, 2, 0, 1, 1, 1},     // 2x3 kernel, mixed stride and padding
      {1, 136, 5, 5, 64, 1, 1, 1, 1, 0, 0, 1, 1},    // 1x1; two tiles of in channels
      {1, 64, 4, 5, 128, 3, 2, 2, 1, 2, 0, 1, 3},    // stride 2 x 1, dilation 1 x 3, uneven padding
  };
  for (const auto& geometry : walked) {
    for (const char* layout : {"nchw", "channels_last"}) {
      failures += check_conv<Bf16>(geometry, layout);
    }
  }
  failures += check_conv<Fp16>(walked[1], "channels_last");
  failures += check_conv<Fp16>(walked[2], "channels_last");
  failures += check_conv<Tf32>(Geometry{2, 32, 6, 5, 32, 3, 3, 1, 1, 1, 1, 1, 1}, "channels_last");
  failures += check_conv<Tf32>(Geometry{1, 40, 7, 7, 96, 3, 3, 2, 2, 1, 1, 1, 1}, "channels_last");
  std::printf("%-58s %-14s %7lld CTAs%s\n", "tap walks", "CTAs walked", static_cast<long long>(walked_ctas),
              walked_ctas == 0 ? "  FAILED (no CTA took the walk)" : "");
  failures += walked_ctas == 0;
  failures += check_packed_sign<Bf16>() + check_packed_sign<Fp16>();
  failures += check_packed_fast_path<Bf16>() + check_packed_fast_path<Fp16>();
  failures += check_linear<Bf16>(37, 70, 130);
  // Interior tiles (the loaders' fixed-distance and cp.async paths) next to ragged edges.
  failures += check_linear<Bf16>(150, 260, 140);
  failures += check_linear<Bf16, Sm80Mma>(150, 260, 140);
  // Long K on both sides (9 and 10 k-tiles): the stage ring wraps twice, with interior tiles.
  failures += check_linear<Bf16>(96, 520, 600);
  failures += check_linear<Bf16, Sm80Mma>(96, 520, 600);
  failures += check_linear<Fp16>(130, 136, 72);
  failures += check_linear<Bf16>(200, 64, 16);
  failures += check_linear<Tf32>(19, 33, 45);
  // dfa: a classifier's K = 10 (one ragged K tile), a wide F over several tiles, and K over two tiles.
  failures += check_direct_feedback<Bf16>(37, 10, 300);
  failures += check_direct_feedback<Bf16, Sm80Mma>(37, 10, 300);
  failures += check_direct_feedback<Fp16>(130, 70, 136);
  failures += check_direct_feedback<Tf32>(19, 45, 33);
  std::printf("%-58s %-14s %7s, %lld wrong%s\n", "pipeline", "stages in use", "", static_cast<long long>(overwritten),
              overwritten ? "  FAILED (a stage refilled under an MMA in flight)" : "");
  failures += overwritten != 0;
  std::printf("%s\n", failures ? "MISMATCH" : "every pass matches its definition");
  return failures != 0;
}
