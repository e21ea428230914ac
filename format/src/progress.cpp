#include "layerpack/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

namespace layerpack {

std::string format_bytes(uint64_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  if (bytes < 1000) {
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  } else if (b < 1e6) {
    std::snprintf(buf, sizeof buf, "%.1f kB", b / 1e3);
  } else if (b < 1e9) {
    std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  }
  return buf;
}

std::string format_duration(double seconds) {
  char buf[32];
  if (!std::isfinite(seconds) || seconds < 0) return "--";
  if (seconds < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  } else if (seconds < 3600) {
    const long s = std::lround(seconds);
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  } else {
    const long m = std::lround(seconds / 60);
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", m / 60, m % 60);
  }
  return buf;
}

std::string format_rate(double bytes_per_second) {
  char buf[32];
  if (!std::isfinite(bytes_per_second) || bytes_per_second < 0) bytes_per_second = 0;
  if (bytes_per_second >= 1e9) {
    std::snprintf(buf, sizeof buf, "%.2f GB/s", bytes_per_second / 1e9);
  } else {
    std::snprintf(buf, sizeof buf, "%.0f MB/s", bytes_per_second / 1e6);
  }
  return buf;
}

ProgressReporter::ProgressReporter(std::string label, std::string unit, uint64_t total_items, uint64_t total_bytes,
                                   Mode mode, std::FILE* stream)
    : label_(std::move(label)), unit_(std::move(unit)), mode_(mode), stream_(stream) {
  total_items_ = total_items;
  total_bytes_ = total_bytes;
  if (mode_ == Mode::bar) {
    draw_bar_ = true;
  } else if (mode_ == Mode::automatic) {
    draw_bar_ = stream_ != nullptr && isatty(fileno(stream_)) != 0;
  }
  start_ = std::chrono::steady_clock::now();
  last_draw_ = start_ - std::chrono::seconds(1);
}

ProgressReporter::~ProgressReporter() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (line_drawn_) clear_line();
}

void ProgressReporter::set_totals(uint64_t total_items, uint64_t total_bytes) {
  total_items_ = total_items;
  total_bytes_ = total_bytes;
  redraw(true);
}

double ProgressReporter::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void ProgressReporter::advance(uint64_t items, uint64_t bytes) {
  items_done_ += items;
  bytes_done_ += bytes;
  redraw(items != 0);
}

std::string ProgressReporter::render_line() const {
  const uint64_t items = items_done_.load(), total_items = total_items_.load();
  const uint64_t bytes = bytes_done_.load(), total_bytes = total_bytes_.load();
  const double elapsed = elapsed_seconds();
  const double rate = elapsed > 0 ? bytes / elapsed : 0;
  double fraction = 0;
  if (total_bytes > 0) {
    fraction = static_cast<double>(bytes) / total_bytes;
  } else if (total_items > 0) {
    fraction = static_cast<double>(items) / total_items;
  }
  if (fraction > 1) fraction = 1;
  constexpr int kBarWidth = 24;
  const int filled = static_cast<int>(fraction * kBarWidth);
  std::string bar = "[";
  for (int i = 0; i < kBarWidth; ++i) bar += i < filled ? '=' : (i == filled ? '>' : ' ');
  bar += "]";
  char buf[256];
  std::string eta = "--";
  if (fraction > 0 && fraction < 1 && elapsed > 0.5) eta = format_duration(elapsed * (1 - fraction) / fraction);
  if (fraction >= 1) eta = "0s";
  std::snprintf(buf, sizeof buf, "%s %s %3.0f%% %llu/%llu %s  %s/%s  %s  ETA %s", label_.c_str(), bar.c_str(),
                fraction * 100, static_cast<unsigned long long>(items), static_cast<unsigned long long>(total_items),
                unit_.c_str(), format_bytes(bytes).c_str(), format_bytes(total_bytes).c_str(),
                format_rate(rate).c_str(), eta.c_str());
  return buf;
}

void ProgressReporter::clear_line() {
  std::fputs("\r\033[K", stream_);
  std::fflush(stream_);
  line_drawn_ = false;
}

void ProgressReporter::redraw(bool force) {
  if (!draw_bar_) return;
  std::lock_guard<std::mutex> lock(mutex_);
  if (finished_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!force && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  const std::string line = render_line();
  std::fprintf(stream_, "\r\033[K%s", line.c_str());
  std::fflush(stream_);
  line_drawn_ = true;
}

void ProgressReporter::message(const std::string& line) {
  if (mode_ == Mode::quiet || stream_ == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (line_drawn_) clear_line();
    std::fprintf(stream_, "%s\n", line.c_str());
    std::fflush(stream_);
  }
  redraw(true);
}

void ProgressReporter::finish(const std::string& summary) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (finished_) return;
  finished_ = true;
  if (stream_ == nullptr) return;
  if (line_drawn_) clear_line();
  if (mode_ != Mode::quiet && !summary.empty()) {
    std::fprintf(stream_, "%s\n", summary.c_str());
    std::fflush(stream_);
  }
}

}  // namespace layerpack
