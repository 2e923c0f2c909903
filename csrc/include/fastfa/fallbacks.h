// The record of calls that a backend handed to another one (a fallback), shared by every
// backend: the cuda backend's ops record here from C++, the triton backend's through
// fastfa._backend.record_fallback; fastfa.last_fallbacks() reads it.
//
// Recording costs a mutex and a short scan, and happens only on the fallback path: an op
// that runs its own kernels never touches it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastfa {

struct Fallback {
  std::string op;       // the op that fell back, e.g. "cuda_linear_backward"
  std::string backend;  // the backend that ran instead, e.g. "aten"
  std::string reason;
  int64_t count;        // calls with this (op, backend, reason) since the last clear
};

// Thread-safe. Each distinct (op, backend, reason) is one record, counted.
void record_fallback(const std::string& op, const std::string& reason, const std::string& backend = "aten");
// The records since the last clear_fallbacks(), in the order first seen.
std::vector<Fallback> recorded_fallbacks();
void clear_fallbacks();

} // namespace fastfa
