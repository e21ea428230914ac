#include "layerpack/layer_scheduler.h"

#include <algorithm>
#include <cassert>
#include <chrono>
#include <sstream>

namespace layerpack {

uint32_t SchedulePlan::resident_count() const {
  return static_cast<uint32_t>(std::count(placement.begin(), placement.end(), UnitPlacement::resident));
}
uint32_t SchedulePlan::streamed_count() const {
  return static_cast<uint32_t>(std::count(placement.begin(), placement.end(), UnitPlacement::streamed));
}

std::string SchedulePlan::explain() const {
  std::ostringstream out;
  const size_t last = placement.size() - 1;
  auto unit_name = [&](size_t u) {
    if (u == 0) return std::string("embedding");
    if (u == last) return std::string("output");
    return "layer " + std::to_string(u - 1);
  };
  out << "layer plan: " << resident_count() << " resident (" << resident_bytes << " bytes), " << streamed_count()
      << " streamed through " << ring_slots << " ring slots of " << ring_slot_size << " bytes (" << ring_bytes
      << " bytes), " << streamed_bytes_per_pass << " bytes loaded per pass\n";
  for (size_t u = 0; u < placement.size(); ++u) {
    const char* what = placement[u] == UnitPlacement::host ? "host (rows gathered per token)"
                       : placement[u] == UnitPlacement::resident ? "resident"
                                                                 : "streamed";
    out << "  " << unit_name(u) << ": " << what << "\n";
  }
  return out.str();
}

Result<SchedulePlan> plan_layers(const SchedulerInput& input) {
  const size_t units = input.payload_sizes.size();
  if (units < 2) return make_error(ErrorCode::invalid_argument, "layer plan needs an embedding and an output unit");
  SchedulePlan plan;
  plan.placement.assign(units, UnitPlacement::resident);
  plan.placement[0] = UnitPlacement::host;
  uint64_t total = 0, largest = 0;
  for (size_t u = 1; u < units; ++u) {
    total += input.payload_sizes[u];
    largest = std::max(largest, input.payload_sizes[u]);
  }
  if (total <= input.slot_budget) {
    plan.resident_bytes = total;
    return plan;
  }
  const uint32_t min_slots = std::max<uint32_t>(2, input.min_ring_slots);
  if (largest == 0 || input.slot_budget / largest < min_slots) {
    return make_error(ErrorCode::out_of_memory,
                      "layer memory budget of " + std::to_string(input.slot_budget) + " bytes cannot hold " +
                          std::to_string(min_slots) + " ring slots of the largest layer (" + std::to_string(largest) +
                          " bytes); the minimum is " + std::to_string(uint64_t(min_slots) * largest) + " bytes");
  }
  // Slots are sized to the largest payload so any layer fits any slot. As many slots
  // as the budget allows (up to max) deepen the prefetch; the rest holds residents.
  uint32_t slots = static_cast<uint32_t>(
      std::min<uint64_t>(std::max(min_slots, input.max_ring_slots), input.slot_budget / largest));
  slots = std::max(slots, min_slots);
  uint64_t left = input.slot_budget - uint64_t(slots) * largest;
  for (size_t u = 1; u < units; ++u) plan.placement[u] = UnitPlacement::streamed;
  // Residents: output first, then decoder layers in order.
  std::vector<size_t> order;
  order.push_back(units - 1);
  for (size_t u = 1; u + 1 < units; ++u) order.push_back(u);
  for (size_t u : order) {
    if (input.payload_sizes[u] <= left) {
      plan.placement[u] = UnitPlacement::resident;
      left -= input.payload_sizes[u];
      plan.resident_bytes += input.payload_sizes[u];
    }
  }
  for (size_t u = 1; u < units; ++u) {
    if (plan.placement[u] == UnitPlacement::streamed) plan.streamed_bytes_per_pass += input.payload_sizes[u];
  }
  if (plan.streamed_bytes_per_pass == 0) {  // everything fitted after all (only reachable by rounding)
    return plan;
  }
  // Fewer slots than streamed layers is the point of a ring; more would idle.
  plan.ring_slots = std::min<uint32_t>(slots, plan.streamed_count());
  plan.ring_slots = std::max(plan.ring_slots, std::min<uint32_t>(min_slots, plan.streamed_count()));
  plan.ring_slot_size = largest;
  plan.ring_bytes = uint64_t(plan.ring_slots) * largest;
  return plan;
}

// ---- LayerStreamer ------------------------------------------------------------------

LayerStreamer::LayerStreamer(const ModelPack& pack, Backend& backend, PayloadReader& reader, SchedulePlan plan)
    : pack_(pack), backend_(backend), reader_(reader), plan_(std::move(plan)) {}

LayerStreamer::~LayerStreamer() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (loader_.joinable()) loader_.join();
}

Status LayerStreamer::load_into(UnitIndex unit, SlotId slot, size_t staging_index) {
  const LayerFileInfo& file = pack_.unit(unit);
  if (uint8_t* direct = backend_.slot_host_pointer(slot)) {
    LAYERPACK_TRY(backend_.wait_slot_idle(slot));
    return reader_.read(file, direct);
  }
  HostBuffer& staging = *staging_[staging_index];
  LAYERPACK_TRY(backend_.wait_upload(staging_ticket_[staging_index]));
  LAYERPACK_TRY(reader_.read(file, staging.data()));
  auto ticket = backend_.upload(slot, staging, file.payload_size);
  if (!ticket) return ticket.error();
  staging_ticket_[staging_index] = ticket.value();
  return Status::success();
}

Status LayerStreamer::start() {
  const uint32_t units = pack_.unit_count();
  resident_slot_.assign(units, 0);
  host_units_.resize(units);
  bool need_staging = false;
  for (UnitIndex u = 0; u < units; ++u) {
    if (plan_.placement[u] == UnitPlacement::host) {
      auto buffer = AlignedBuffer::allocate(pack_.payload_size(u), pack_.unit(u).path);
      if (!buffer) return buffer.error();
      host_units_[u] = std::move(buffer.value());
      LAYERPACK_TRY(reader_.read(pack_.unit(u), host_units_[u].data()));
    } else if (plan_.placement[u] == UnitPlacement::resident) {
      auto slot = backend_.allocate_slot(pack_.payload_size(u));
      if (!slot) return slot.error();
      resident_slot_[u] = slot.value();
      if (!backend_.slot_host_pointer(slot.value())) need_staging = true;
    } else {
      stream_order_.push_back(u);
    }
  }
  for (uint32_t i = 0; i < plan_.ring_slots; ++i) {
    auto slot = backend_.allocate_slot(plan_.ring_slot_size);
    if (!slot) return slot.error();
    ring_.push_back(slot.value());
    if (!backend_.slot_host_pointer(slot.value())) need_staging = true;
  }
  if (need_staging) {
    // One staging buffer per ring slot (at least one), each the largest slot payload.
    uint64_t largest = plan_.ring_slot_size;
    for (UnitIndex u = 0; u < units; ++u) {
      if (plan_.placement[u] == UnitPlacement::resident) largest = std::max(largest, pack_.payload_size(u));
    }
    size_t count = std::max<size_t>(1, ring_.size());
    for (size_t i = 0; i < count; ++i) {
      auto staging = backend_.allocate_staging(largest);
      if (!staging) return staging.error();
      staging_.push_back(std::move(staging.value()));
      staging_ticket_.push_back(0);
    }
  }
  // Resident loads, in unit order, through staging buffer 0 when needed.
  for (UnitIndex u = 0; u < units; ++u) {
    if (plan_.placement[u] == UnitPlacement::resident) LAYERPACK_TRY(load_into(u, resident_slot_[u], 0));
  }
  if (!stream_order_.empty()) loader_ = std::thread([this] { loader_loop(); });
  return Status::success();
}

void LayerStreamer::loader_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  const size_t ring = ring_.size();
  while (true) {
    changed_.wait(lock, [&] { return stopping_ || (!loader_failed_ && window_.size() < ring); });
    if (stopping_) return;
    const uint64_t k = next_load_++;
    RingEntry entry;
    entry.unit = stream_order_[k % stream_order_.size()];
    entry.slot = ring_[k % ring];
    window_.push_back(entry);
    lock.unlock();
    Status status = load_into(entry.unit, entry.slot, k % std::max<size_t>(1, staging_.size()));
    lock.lock();
    RingEntry& done = window_[k - first_in_window_];
    done.loaded = true;
    done.status = status;
    if (status.ok()) {
      stats_.loads += 1;
      stats_.bytes_loaded += pack_.payload_size(entry.unit);
    } else {
      loader_failed_ = true;
    }
    changed_.notify_all();
  }
}

Result<SlotId> LayerStreamer::acquire(UnitIndex unit) {
  if (plan_.placement[unit] == UnitPlacement::resident) return resident_slot_[unit];
  assert(plan_.placement[unit] == UnitPlacement::streamed);
  std::unique_lock<std::mutex> lock(mutex_);
  const uint64_t k = next_acquire_;
  assert(stream_order_[k % stream_order_.size()] == unit && "streamed units must be acquired in compute order");
  auto ready = [&] { return next_load_ > k && window_[k - first_in_window_].loaded; };
  if (!ready()) {
    auto start = std::chrono::steady_clock::now();
    changed_.wait(lock, ready);
    stats_.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const RingEntry& entry = window_[k - first_in_window_];
  if (!entry.status.ok()) return entry.status.error();
  ++next_acquire_;
  return entry.slot;
}

void LayerStreamer::release(UnitIndex unit) {
  if (plan_.placement[unit] != UnitPlacement::streamed) return;
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& entry : window_) {
    if (!entry.released && entry.unit == unit) {
      entry.released = true;
      break;
    }
  }
  while (!window_.empty() && window_.front().released) {
    window_.pop_front();
    ++first_in_window_;
  }
  changed_.notify_all();
}

const uint8_t* LayerStreamer::host_payload(UnitIndex unit) const { return host_units_[unit].data(); }

StreamerStats LayerStreamer::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace layerpack
