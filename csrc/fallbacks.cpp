#include "fastfa/fallbacks.h"

#include <mutex>

namespace fastfa {
namespace {

// A vector, not a map: it keeps the order first seen, and a process meets a handful of
// distinct (op, backend, reason) triples, so a scan is as quick as a lookup.
struct Recorder {
  std::mutex mutex;
  std::vector<Fallback> records;
};

Recorder& recorder() {
  static Recorder* instance = new Recorder();  // never destroyed: ops may record during exit
  return *instance;
}

} // namespace

void record_fallback(const std::string& op, const std::string& reason, const std::string& backend) {
  Recorder& state = recorder();
  const std::lock_guard<std::mutex> lock(state.mutex);
  for (Fallback& record : state.records) {
    if (record.op == op && record.backend == backend && record.reason == reason) {
      ++record.count;
      return;
    }
  }
  state.records.push_back({op, backend, reason, 1});
}

std::vector<Fallback> recorded_fallbacks() {
  Recorder& state = recorder();
  const std::lock_guard<std::mutex> lock(state.mutex);
  return state.records;
}

void clear_fallbacks() {
  Recorder& state = recorder();
  const std::lock_guard<std::mutex> lock(state.mutex);
  state.records.clear();
}

} // namespace fastfa
