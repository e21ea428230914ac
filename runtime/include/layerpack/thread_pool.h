// A fixed pool of worker threads for the CPU backend's data-parallel loops.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace layerpack {

class ThreadPool {
 public:
  // thread_count 0: std::thread::hardware_concurrency(). The calling thread works too,
  // so thread_count - 1 workers are started.
  explicit ThreadPool(size_t thread_count = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t thread_count() const { return workers_.size() + 1; }

  // Calls body(begin, end) on disjoint chunks covering [0, count), at least
  // min_chunk items per chunk, and returns when all are done. Not reentrant.
  void parallel_for(size_t count, size_t min_chunk, const std::function<void(size_t, size_t)>& body);

 private:
  void worker_loop();
  void run_chunks();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_, work_done_;
  const std::function<void(size_t, size_t)>* body_ = nullptr;
  size_t count_ = 0, chunk_ = 1, next_ = 0, active_ = 0;
  unsigned long long generation_ = 0;
  bool stopping_ = false;
};

}  // namespace layerpack
