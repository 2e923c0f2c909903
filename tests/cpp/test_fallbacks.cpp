// The fallback record (csrc/fallbacks.cpp) from C++, as the cuda backend's ops write it:
// counts per (op, backend, reason), the order first seen, clear, and exact counts when
// threads record at once (autograd runs backward ops on its own threads). Run by ctest;
// the exit status is 0 only when every check passes.
#include "fastfa/fallbacks.h"

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  failures += ok ? 0 : 1;
}

std::string describe(const std::vector<fastfa::Fallback>& records) {
  std::string text;
  for (const fastfa::Fallback& r : records) {
    text += "(" + r.op + ", " + r.backend + ", " + r.reason + ", " + std::to_string(r.count) + ") ";
  }
  return text;
}

} // namespace

int main() {
  fastfa::clear_fallbacks();
  fastfa::record_fallback("cuda_linear", "fp64");
  fastfa::record_fallback("cuda_linear_backward", "fp64");
  fastfa::record_fallback("cuda_linear", "fp64");
  fastfa::record_fallback("cuda_linear", "groups > 1", "other");
  std::vector<fastfa::Fallback> records = fastfa::recorded_fallbacks();
  expect(records.size() == 3 && records[0].op == "cuda_linear" && records[0].count == 2 &&
             records[0].backend == "aten" && records[1].op == "cuda_linear_backward" && records[1].count == 1 &&
             records[2].backend == "other" && records[2].reason == "groups > 1",
         "one record per (op, backend, reason), counted, in the order first seen: " + describe(records));

  fastfa::clear_fallbacks();
  expect(fastfa::recorded_fallbacks().empty(), "clear_fallbacks empties the record");

  constexpr int kThreads = 8, kCalls = 100000;
  std::atomic<bool> go{false};  // all threads start at once, so that they contend
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t, &go] {
      while (!go.load()) {
      }
      const char* op = t % 2 == 0 ? "cuda_conv2d" : "cuda_conv2d_backward";
      for (int call = 0; call < kCalls; ++call) {
        fastfa::record_fallback(op, "reason " + std::to_string(call % 3));
      }
    });
  }
  go.store(true);
  for (std::thread& thread : threads) {
    thread.join();
  }
  records = fastfa::recorded_fallbacks();
  bool exact = records.size() == 6;
  int64_t total = 0;
  for (const fastfa::Fallback& r : records) {
    total += r.count;
    // Each of the 4 threads per op records each reason for every third call.
    const int64_t expected = (kThreads / 2) * ((kCalls - std::stoi(r.reason.substr(7)) + 2) / 3);
    exact = exact && r.count == expected;
  }
  expect(exact && total == int64_t{kThreads} * kCalls,
         "threads recording at once lose no count: " + describe(records));
  fastfa::clear_fallbacks();

  std::printf("%s\n", failures == 0 ? "all passed" : (std::to_string(failures) + " failed").c_str());
  return failures == 0 ? 0 : 1;
}
