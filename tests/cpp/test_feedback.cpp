// C++ tests of fastfa's kernels, run by ctest (CMakeLists.txt). No test framework: each
// check prints one line, then a summary; the exit status is 0 only when every check passes.
// Checks are explicit comparisons, not assert(), so they also run in Release (NDEBUG).
#include "fastfa/feedback.h"
#include "fastfa/ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace {

// A check returns "" when it passes, otherwise what went wrong.
using Check = std::function<std::string()>;

std::string hex4(const uint32_t (&v)[4]) {
  char text[64];
  std::snprintf(text, sizeof(text), "%08x %08x %08x %08x", v[0], v[1], v[2], v[3]);
  return text;
}

// (a) Random123's known-answer vectors for philox4x32_10 (kat_vectors).
std::string check_philox_known_answers() {
  struct Vector {
    uint32_t counter[4];
    uint32_t key[2];
    uint32_t expected[4];
  };
  const Vector vectors[] = {
      {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
       {0x00000000u, 0x00000000u},
       {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  std::string failures;
  int index = 0;
  for (const Vector& v : vectors) {
    const fastfa::Philox4x32 out = fastfa::philox4x32_10(v.counter[0], v.counter[1], v.counter[2],
                                                         v.counter[3], v.key[0], v.key[1]);
    const uint32_t got[4] = {out.x0, out.x1, out.x2, out.x3};
    bool same = true;
    for (int i = 0; i < 4; ++i) same = same && got[i] == v.expected[i];
    if (!same) {
      failures += "vector " + std::to_string(index) + ": counter " + hex4(v.counter) + " gave " +
                  hex4(got) + ", expected " + hex4(v.expected) + "; ";
    }
    ++index;
  }
  return failures;
}

std::string compare(const char* what, const at::Tensor& got, const at::Tensor& expected) {
  if (got.sizes() != expected.sizes() || got.scalar_type() != expected.scalar_type() ||
      !at::allclose(got, expected, /*rtol=*/1e-12, /*atol=*/1e-12)) {
    std::ostringstream text;
    text << what << ": got\n" << got << "\nexpected\n" << expected << "\n";
    return text.str();
  }
  return "";
}

// (b) feedback_transform through the dispatcher (so loading fastfa_ops registered it) for
// usf (rule 2: B = scale * sign(W), sign(0) = 0) and frsf (rule 4: B = |R| * sign(W)).
std::string check_feedback_transform() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("fastfa::feedback_transform", "")
                      .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                        const std::optional<at::Tensor>&, int64_t, double, int64_t)>();
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor weight = at::tensor({0.5, -2.0, 0.0, 3.0, -0.25, 1e-3}, options).view({2, 3});
  const at::Tensor stored = at::tensor({-1.5, 2.0, 0.3, -0.7, -4.0, 0.0}, options).view({2, 3});
  const double scale = 0.125;
  std::string failures;

  const at::Tensor usf = op.call(weight, std::nullopt, std::nullopt,
                                 static_cast<int64_t>(fastfa::Rule::kUniformSignSymmetry), scale, 0);
  const at::Tensor usf_expected =
      at::tensor({0.125, -0.125, 0.0, 0.125, -0.125, 0.125}, options).view({2, 3});
  failures += compare("usf (rule 2)", usf, usf_expected);

  const at::Tensor frsf = op.call(weight, stored, std::nullopt,
                                  static_cast<int64_t>(fastfa::Rule::kFixedRandomSignFeedback), scale, 0);
  const at::Tensor frsf_expected = at::tensor({1.5, -2.0, 0.0, 0.7, -4.0, 0.0}, options).view({2, 3});
  failures += compare("frsf (rule 4)", frsf, frsf_expected);

  // The declared C++ kernel gives the same as the dispatcher.
  failures += compare("usf via feedback_transform_cpu",
                      fastfa::feedback_transform_cpu(weight, std::nullopt, std::nullopt, 2, scale, 0),
                      usf_expected);
  return failures;
}

// (c) linear_backward for bp (rule 0): grad_input = grad_output W, grad_weight =
// grad_output^T x, grad_bias = sum of grad_output's rows.
std::string check_linear_backward_bp() {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor weight = at::arange(1, 9, options).view({2, 4}) / 8.0 - 0.3; // out=2, in=4
  const at::Tensor input = at::arange(0, 12, options).view({3, 4}) * 0.25 - 1.0;
  const at::Tensor grad_output = at::tensor({1.0, -2.0, 0.5, 0.25, -1.5, 3.0}, options).view({3, 2});
  const std::vector<double> alignment{0.0, 0.0, 0.0, 1.0};
  const auto [grad_input, grad_weight, grad_bias, grad_feedback] = fastfa::linear_backward(
      grad_output, input, weight, std::nullopt, std::nullopt, at::empty({0}, options), at::empty({0}, options),
      static_cast<int64_t>(fastfa::Rule::kBackprop), 1.0, 0, alignment, "none", {true, true, true, false});
  std::string failures;
  failures += compare("grad_input", grad_input, grad_output.mm(weight));
  failures += compare("grad_weight", grad_weight, grad_output.t().mm(input));
  failures += compare("grad_bias", grad_bias, grad_output.sum(0));
  return failures;
}

} // namespace

int main() {
  const std::vector<std::pair<const char*, Check>> checks = {
      {"philox4x32_10 matches Random123's known-answer vectors", check_philox_known_answers},
      {"feedback_transform (dispatcher, CPU): usf and frsf", check_feedback_transform},
      {"linear_backward bp: grad_input == grad_output.mm(W)", check_linear_backward_bp},
  };
  int passed = 0, failed = 0;
  for (const auto& [name, check] : checks) {
    std::string failure;
    try {
      failure = check();
    } catch (const std::exception& error) {
      failure = std::string("exception: ") + error.what();
    }
    if (failure.empty()) {
      ++passed;
      std::printf("PASS %s\n", name);
    } else {
      ++failed;
      std::printf("FAIL %s: %s\n", name, failure.c_str());
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
