// dfa's grad_x = e B_l on the aten backend (learning-rules.md, "Direct feedback alignment"):
// B_l (K x F) drawn a block of columns at a time on e's device (direct_feedback_cpu / _cuda)
// and multiplied by ATen's GEMM, so memory holds at most block_elements of B_l whatever K x F
// is (3.2 GB in fp32 for one ResNet layer at ImageNet sizes). One C++ call per layer and
// backward: the loop in Python cost more than the product itself for small layers.
#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace fastfa {

void check_direct_feedback_product_arguments(const at::Tensor& error, const at::Tensor& rng, int64_t columns,
                                             double scale, int64_t distribution) {
  TORCH_CHECK(error.dim() == 2, "fastfa: error must be e as a (rows, K) matrix, got shape ", error.sizes());
  TORCH_CHECK(at::isFloatingType(error.scalar_type()), "fastfa: error must be floating-point, got ",
              error.scalar_type());
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.dim() == 1 && rng.numel() == 2,
              "fastfa: rng must be an int64 tensor [seed, step], got ", rng.scalar_type(), " of shape ", rng.sizes());
  TORCH_CHECK(columns >= 0, "fastfa: columns (F, B_l's width) must be non-negative, got ", columns);
  TORCH_CHECK(distribution == static_cast<int64_t>(Distribution::kUniform) ||
                  distribution == static_cast<int64_t>(Distribution::kNormal),
              "fastfa: distribution must be 0 (uniform) or 1 (normal), got ", distribution);
  TORCH_CHECK(std::isfinite(scale), "fastfa: scale must be finite, got ", scale);
}

// The draws' own checks (direct_feedback_cpu / _cuda check their rng's device first), one place for both.
void check_direct_feedback_draw_arguments(const at::Tensor& rng, int64_t rows, int64_t columns, int64_t column_begin,
                                          int64_t column_count, double scale, int64_t distribution,
                                          at::ScalarType dtype) {
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.dim() == 1 && rng.numel() == 2,
              "fastfa: rng must be an int64 tensor [seed, step], got ", rng.scalar_type(), " of shape ", rng.sizes());
  TORCH_CHECK(rows >= 0 && columns >= 0, "fastfa: B_l's shape (rows, columns) must be non-negative, got (", rows,
              ", ", columns, ")");
  TORCH_CHECK(column_begin >= 0 && column_count >= 0 && column_begin + column_count <= columns,
              "fastfa: the column block [", column_begin, ", ", column_begin + column_count,
              ") must lie in B_l's ", columns, " columns");
  TORCH_CHECK(distribution == static_cast<int64_t>(Distribution::kUniform) ||
                  distribution == static_cast<int64_t>(Distribution::kNormal),
              "fastfa: distribution must be 0 (uniform) or 1 (normal), got ", distribution);
  TORCH_CHECK(std::isfinite(scale), "fastfa: scale must be finite, got ", scale);
  TORCH_CHECK(at::isFloatingType(dtype), "fastfa: dtype must be floating-point, got ", dtype);
}

namespace {

at::Tensor draw_block(const at::Tensor& rng, int64_t rows, int64_t columns, int64_t begin, int64_t count,
                      double scale, int64_t distribution, at::ScalarType dtype) {
#ifdef FASTFA_WITH_CUDA
  if (rng.is_cuda()) {
    return direct_feedback_cuda(rng, rows, columns, begin, count, scale, distribution, dtype);
  }
#endif
  TORCH_CHECK(rng.is_cpu(), "fastfa: dfa's B_l is drawn on the CPU or a CUDA device, got rng on ", rng.device());
  return direct_feedback_cpu(rng, rows, columns, begin, count, scale, distribution, dtype);
}

} // namespace

at::Tensor direct_feedback_product(const at::Tensor& error, const at::Tensor& rng, int64_t columns, double scale,
                                   int64_t distribution, int64_t block_elements) {
  check_direct_feedback_product_arguments(error, rng, columns, scale, distribution);
  TORCH_CHECK(block_elements > 0, "fastfa: block_elements must be positive, got ", block_elements);
  TORCH_CHECK(rng.device() == error.device(), "fastfa: rng must be on error's device (", error.device(), "), got ",
              rng.device());
  const int64_t rows = error.size(0), width = error.size(1);
  const auto dtype = error.scalar_type();
  const int64_t per_block = std::max<int64_t>(1, block_elements / std::max<int64_t>(width, 1));
  if (per_block >= columns) {
    return at::mm(error, draw_block(rng, width, columns, 0, columns, scale, distribution, dtype));
  }
  at::Tensor grad_input = at::empty({rows, columns}, error.options());
  for (int64_t begin = 0; begin < columns; begin += per_block) {
    const int64_t count = std::min(per_block, columns - begin);
    at::Tensor columns_out = grad_input.narrow(1, begin, count);  // a strided view: the GEMM writes in place
    at::mm_out(columns_out, error, draw_block(rng, width, columns, begin, count, scale, distribution, dtype));
  }
  return grad_input;
}

} // namespace fastfa
