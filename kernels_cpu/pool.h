// One parallel loop for every kernel here: tasks 0..count-1, taken from one atomic counter by the
// calling thread and by helpers.
//
// The helpers: this library's own warm threads (one per core beyond the first) for the kernels
// that ask (`warm`), else XLA's intra-op pool (ffi::ThreadPool). A decode step runs dozens of
// kernel calls of 20-80 µs each, one after another; a helper woken from sleep for each call
// arrives after the caller has done the work alone (measured: a chain of 1 MB weight products
// ran as fast with no helper as with XLA's pool), so the second core sat idle. The warm threads
// spin for a short while after each call (kSpin) and so are already running when the next call
// comes; then they sleep on a condition variable and cost nothing when no kernel runs
// (training, prefill).
//
// The caller works too and then waits only for tasks already taken, never for a helper still
// queued: several kernels running at once (XLA runs independent thunks concurrently) cannot
// deadlock. One call at a time has the warm threads (a slot taken with compare-and-swap); a
// concurrent call schedules XLA's pool instead. Which thread runs which task varies from call to
// call, so a kernel whose result must not depend on scheduling gives each task its own output (or
// partial, merged afterwards in task order).

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace llmarch {

// How a call's tasks are shared: the next task to take, and how many are finished.
struct Tasks {
  std::atomic<int64_t> next{0}, done{0};
  int64_t count = 0;
  const std::function<void(int64_t)>* fn = nullptr;

  void run() {
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      (*fn)(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// The warm threads. Never destroyed (a detached thread may outlive static destructors at exit).
class WarmPool {
 public:
  static constexpr auto kSpin = std::chrono::microseconds(100);  // spin this long after a call

  static WarmPool& get() {
    static WarmPool* pool = new WarmPool();
    return *pool;
  }

  // Runs `tasks` on the calling thread and the warm threads; false (nothing run) if another call
  // holds them.
  bool run(Tasks& tasks) {
    Tasks* none = nullptr;
    if (threads_ == 0 || !slot_.compare_exchange_strong(none, &tasks)) return false;
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    tasks.run();
    while (tasks.done.load(std::memory_order_acquire) < tasks.count) std::this_thread::yield();
    // Withdraw the tasks, then wait out any warm thread that may still hold their address (it
    // raised busy_ before reading the slot; sequentially consistent, so either it read the slot
    // empty or this load sees it busy).
    slot_.store(nullptr);
    while (busy_.load() > 0) std::this_thread::yield();
    return true;
  }

 private:
  WarmPool() {
    const char* off = std::getenv("LLMARCH_CPU_WARM_THREADS");  // "0": XLA's pool only
    const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
    threads_ = off != nullptr ? std::max(0, std::atoi(off)) : cores - 1;
    for (int64_t i = 0; i < threads_; ++i) std::thread([this] { loop(); }).detach();
    // A forked child has none of these threads (and perhaps a mutex copied locked): XLA's pool.
    pthread_atfork(nullptr, nullptr, [] { get().threads_ = 0; });
  }

  void loop() {
    auto idle_since = std::chrono::steady_clock::now();
    for (;;) {
      if (slot_.load(std::memory_order_relaxed) != nullptr) {
        busy_.fetch_add(1);
        if (Tasks* tasks = slot_.load()) tasks->run();
        busy_.fetch_sub(1);
        idle_since = std::chrono::steady_clock::now();
      } else if (std::chrono::steady_clock::now() - idle_since > kSpin) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [this] { return slot_.load() != nullptr; });
        sleeping_.fetch_sub(1);
        idle_since = std::chrono::steady_clock::now();
      } else {
        std::this_thread::yield();
      }
    }
  }

  int64_t threads_ = 0;
  std::atomic<Tasks*> slot_{nullptr};
  std::atomic<int64_t> busy_{0}, sleeping_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// `warm`: the call may take the warm threads. Only kernels that run one after another in a
// decode step ask (dense_matmul, quantized_matmul, paged_attention): in a program whose thunks
// run concurrently (an UltraMem layer's searches and reads) a spinning thread is one more thread
// than cores, and a task it took waits for its time slice (top_k inside experiment 07's layer
// ran 0.7 ms with XLA's pool, 1.9 ms with warm threads).
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t count, Fn fn, bool warm = false) {
  if (count <= 0) return;
  if (count == 1) return fn(0);
  if (warm) {
    const std::function<void(int64_t)> body = fn;
    Tasks local;
    local.count = count;
    local.fn = &body;
    if (WarmPool::get().run(local)) return;
  }
  // Not asked, or another call holds the warm threads: XLA's pool. Shared, not on the stack: a
  // helper may start after this call has returned.
  auto shared_fn = std::make_shared<const std::function<void(int64_t)>>(fn);
  auto tasks = std::make_shared<Tasks>();
  tasks->count = count;
  tasks->fn = shared_fn.get();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([tasks, shared_fn] { tasks->run(); });
  tasks->run();
  while (tasks->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace llmarch
