#include "layerpack/thread_pool.h"

#include <algorithm>

namespace layerpack {

ThreadPool::ThreadPool(size_t thread_count) {
  if (thread_count == 0) thread_count = std::max(1u, std::thread::hardware_concurrency());
  for (size_t i = 1; i < thread_count; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::run_chunks() {
  // Called with mutex_ held; returns with it held.
  while (next_ < count_) {
    size_t begin = next_;
    size_t end = std::min(count_, begin + chunk_);
    next_ = end;
    ++active_;
    const auto* body = body_;
    mutex_.unlock();
    (*body)(begin, end);
    mutex_.lock();
    --active_;
  }
}

void ThreadPool::worker_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  unsigned long long seen = generation_;
  while (true) {
    work_ready_.wait(lock, [&] { return stopping_ || generation_ != seen; });
    if (stopping_) return;
    seen = generation_;
    run_chunks();
    if (active_ == 0 && next_ >= count_) work_done_.notify_all();
  }
}

void ThreadPool::parallel_for(size_t count, size_t min_chunk, const std::function<void(size_t, size_t)>& body) {
  if (count == 0) return;
  size_t threads = thread_count();
  min_chunk = std::max<size_t>(1, min_chunk);
  if (threads == 1 || count <= min_chunk) {
    body(0, count);
    return;
  }
  // About four chunks per thread evens out uneven rows without much locking.
  size_t chunk = std::max(min_chunk, (count + threads * 4 - 1) / (threads * 4));
  std::unique_lock<std::mutex> lock(mutex_);
  body_ = &body;
  count_ = count;
  chunk_ = chunk;
  next_ = 0;
  ++generation_;
  work_ready_.notify_all();
  run_chunks();
  work_done_.wait(lock, [&] { return active_ == 0 && next_ >= count_; });
  body_ = nullptr;
}

}  // namespace layerpack
