// Progress reporting for long jobs (converter, pack tools, runtime loading):
// a one-line bar on a terminal (items done, GB, GB/s, ETA), nothing while
// running otherwise, and a final summary line. Thread-safe: workers call
// advance() concurrently; the bar redraws at most every 100 ms.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>

namespace layerpack {

std::string format_bytes(uint64_t bytes);       // "1.23 GB" (decimal units), "512 B"
std::string format_duration(double seconds);    // "0.8s", "12.3s", "4m05s", "1h02m"
std::string format_rate(double bytes_per_second);  // "1.23 GB/s"

class ProgressReporter {
 public:
  enum class Mode {
    automatic,  // bar when the stream is a terminal, otherwise summary only
    bar,        // always draw the bar
    summary,    // no bar, summary line only
    quiet,      // nothing at all
  };

  // `unit` names the items ("layers"); totals may be 0 when unknown.
  ProgressReporter(std::string label, std::string unit, uint64_t total_items, uint64_t total_bytes,
                   Mode mode = Mode::automatic, std::FILE* stream = stderr);
  ~ProgressReporter();
  ProgressReporter(const ProgressReporter&) = delete;
  ProgressReporter& operator=(const ProgressReporter&) = delete;

  void set_totals(uint64_t total_items, uint64_t total_bytes);
  void advance(uint64_t items, uint64_t bytes);
  void add_bytes(uint64_t bytes) { advance(0, bytes); }
  // Prints a line above the bar (warnings) without breaking it.
  void message(const std::string& line);
  // Clears the bar and prints `summary` (unless quiet). Idempotent.
  void finish(const std::string& summary);

  uint64_t items_done() const { return items_done_.load(); }
  uint64_t bytes_done() const { return bytes_done_.load(); }
  double elapsed_seconds() const;
  bool draws_bar() const { return draw_bar_; }
  // The bar text as it would be drawn now (exposed for tests).
  std::string render_line() const;

 private:
  void redraw(bool force);
  void clear_line();

  std::string label_, unit_;
  std::atomic<uint64_t> total_items_{0}, total_bytes_{0};
  std::atomic<uint64_t> items_done_{0}, bytes_done_{0};
  Mode mode_;
  std::FILE* stream_;
  bool draw_bar_ = false;
  bool finished_ = false;
  bool line_drawn_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
  mutable std::mutex mutex_;
};

}  // namespace layerpack
