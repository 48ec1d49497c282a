// One parallel loop for every kernel here: tasks 0..count-1, taken from one atomic counter by the
// calling thread and by helper tasks on XLA's intra-op pool (ffi::ThreadPool).
//
// The caller works too and then waits only for tasks already taken, never for a helper still
// queued: several kernels running at once on the pool (XLA runs independent thunks concurrently)
// cannot deadlock, because a helper that starts late finds no task left and returns. Which thread
// runs which task varies from call to call, so a kernel whose result must not depend on scheduling
// gives each task its own output (or partial, merged afterwards in task order).

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace llmarch {

template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t count, Fn fn) {
  if (count <= 0) return;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  // Shared, not on the stack: a helper may start after this call has returned.
  auto state = std::make_shared<State>();
  auto run = [fn, count](State& st) {
    for (int64_t i; (i = st.next.fetch_add(1)) < count;) {
      fn(i);
      st.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, run] { run(*state); });
  run(*state);
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace llmarch
