#include "layerpack/layer_scheduler.h"

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cstring>
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
  auto mib = [](uint64_t bytes) {
    std::ostringstream m;
    m.setf(std::ios::fixed);
    m.precision(1);
    m << bytes / 1048576.0 << " MiB";
    return m.str();
  };
  out << "layer plan: " << resident_count() << " resident (" << mib(resident_bytes) << "), " << streamed_count()
      << " streamed through " << ring_slots << " ring slots of " << mib(ring_slot_size) << " (" << mib(ring_bytes)
      << "); " << mib(streamed_bytes_per_pass) << " loaded per pass\n";
  if (slot_budget != UINT64_MAX) {
    out << "  layer memory budget " << mib(slot_budget) << ": resident " << mib(resident_bytes) << " + ring "
        << mib(ring_bytes) << " + unused " << mib(slot_budget - std::min(slot_budget, slot_bytes())) << "\n";
  }
  if (ring_slots) {
    out << "  ring depth " << ring_slots
        << (ring_slots >= 3 ? ": one slot computing, one filling over the link, one filled ahead"
                            : ": one slot computing while the other fills (budget allows no deeper ring)")
        << "\n";
  }
  // Runs of units with the same placement, so an 80-layer plan stays readable.
  size_t u = 0;
  while (u < placement.size()) {
    size_t v = u;
    while (v + 1 < last && u >= 1 && u < last && placement[v + 1] == placement[u]) ++v;
    const char* what = placement[u] == UnitPlacement::host       ? "host (rows gathered per token)"
                       : placement[u] == UnitPlacement::resident ? "resident"
                                                                 : "streamed";
    if (v == u) {
      out << "  " << unit_name(u) << ": " << what << "\n";
    } else {
      out << "  layers " << (u - 1) << "-" << (v - 1) << ": " << what << "\n";
    }
    u = v + 1;
  }
  return out.str();
}

namespace {

uint64_t round_up(uint64_t bytes, uint64_t granularity) {
  return granularity <= 1 ? bytes : (bytes + granularity - 1) / granularity * granularity;
}

// One candidate: ring slots of `slot_size`, `depth` of them, residents filled greedily
// in preference order from what is left. Returns false when even the ring does not fit.
// `sizes` are rounded to the allocation granularity (what slots take from the budget);
// `payload_sizes` are the bytes actually loaded per pass.
bool try_plan(const std::vector<uint64_t>& sizes, const std::vector<uint64_t>& payload_sizes, uint64_t budget,
              uint64_t slot_size, uint32_t depth, bool output_must_be_resident, SchedulePlan* plan) {
  const size_t units = sizes.size();
  const size_t output = units - 1;
  uint64_t need = uint64_t(depth) * slot_size;
  if (output_must_be_resident) need += sizes[output];
  if (need > budget) return false;
  plan->placement.assign(units, UnitPlacement::streamed);
  plan->placement[0] = UnitPlacement::host;
  plan->resident_bytes = 0;
  uint64_t left = budget - uint64_t(depth) * slot_size;
  std::vector<size_t> order;
  order.push_back(output);
  for (size_t u = 1; u < output; ++u) order.push_back(u);
  for (size_t u : order) {
    if (sizes[u] <= left) {
      plan->placement[u] = UnitPlacement::resident;
      left -= sizes[u];
      plan->resident_bytes += sizes[u];
    } else if (sizes[u] > slot_size) {
      return false;  // a streamed unit must fit a ring slot
    }
  }
  plan->streamed_bytes_per_pass = 0;
  uint64_t largest_streamed = 0;
  uint32_t streamed = 0;
  for (size_t u = 1; u < units; ++u) {
    if (plan->placement[u] != UnitPlacement::streamed) continue;
    plan->streamed_bytes_per_pass += payload_sizes[u];
    largest_streamed = std::max(largest_streamed, sizes[u]);
    ++streamed;
  }
  plan->ring_slots = streamed ? depth : 0;
  plan->ring_slot_size = streamed ? largest_streamed : 0;
  plan->ring_bytes = uint64_t(plan->ring_slots) * plan->ring_slot_size;
  return true;
}

}  // namespace

Result<SchedulePlan> plan_layers(const SchedulerInput& input) {
  const size_t units = input.payload_sizes.size();
  if (units < 2) return make_error(ErrorCode::invalid_argument, "layer plan needs an embedding and an output unit");
  std::vector<uint64_t> sizes(units);
  for (size_t u = 0; u < units; ++u) sizes[u] = round_up(input.payload_sizes[u], input.allocation_granularity);
  SchedulePlan plan;
  plan.slot_budget = input.slot_budget;
  plan.placement.assign(units, UnitPlacement::resident);
  plan.placement[0] = UnitPlacement::host;
  uint64_t total = 0, largest = 0, largest_decoder = 0;
  for (size_t u = 1; u < units; ++u) {
    total += sizes[u];
    largest = std::max(largest, sizes[u]);
    if (u + 1 < units) largest_decoder = std::max(largest_decoder, sizes[u]);
  }
  if (total <= input.slot_budget) {
    plan.resident_bytes = total;
    return plan;
  }
  const uint32_t min_slots = std::max<uint32_t>(2, input.min_ring_slots);
  const uint32_t max_slots = std::max(min_slots, input.max_ring_slots);
  const uint32_t preferred = std::min(max_slots, std::max(min_slots, input.preferred_ring_slots));
  const uint64_t output_size = sizes[units - 1];

  struct Candidate {
    uint64_t slot_size;
    bool output_resident;
  };
  std::vector<Candidate> candidates = {{largest, false}};
  if (output_size > largest_decoder && largest_decoder > 0) candidates.push_back({largest_decoder, true});

  bool found = false;
  SchedulePlan best;
  uint64_t minimum = UINT64_MAX;
  for (const Candidate& c : candidates) {
    minimum = std::min(minimum, uint64_t(min_slots) * c.slot_size + (c.output_resident ? output_size : 0));
    // The preferred depth when it fits, else the deepest ring down to the minimum.
    for (uint32_t depth = preferred; depth >= min_slots; --depth) {
      SchedulePlan candidate = plan;
      if (!try_plan(sizes, input.payload_sizes, input.slot_budget, c.slot_size, depth, c.output_resident,
                    &candidate)) {
        continue;
      }
      // A ring deeper than the streamed units would only idle: give the slots back to residents.
      const uint32_t streamed = candidate.streamed_count();
      if (streamed > 0 && streamed < depth && depth > min_slots) continue;
      if (!found || candidate.streamed_bytes_per_pass < best.streamed_bytes_per_pass ||
          (candidate.streamed_bytes_per_pass == best.streamed_bytes_per_pass &&
           candidate.ring_slots > best.ring_slots)) {
        best = candidate;
        found = true;
      }
      break;
    }
  }
  if (!found) {
    return make_error(ErrorCode::out_of_memory,
                      "layer memory budget of " + std::to_string(input.slot_budget) + " bytes cannot hold " +
                          std::to_string(min_slots) + " ring slots of the largest layer (" + std::to_string(largest) +
                          " bytes); the minimum is " + std::to_string(minimum) + " bytes");
  }
  return best;
}

// ---- LayerStreamer ------------------------------------------------------------------

LayerStreamer::LayerStreamer(const ModelPack& pack, Backend& backend, PayloadReader& reader, SchedulePlan plan,
                             StreamerOptions options)
    : pack_(pack), backend_(backend), reader_(reader), plan_(std::move(plan)), options_(options) {}

LayerStreamer::~LayerStreamer() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (loader_.joinable()) loader_.join();
}

namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

Status LayerStreamer::load_into(UnitIndex unit, SlotId slot, size_t staging_index, StreamerStats* stats) {
  const LayerFileInfo& file = pack_.unit(unit);
  const uint64_t bytes = file.payload_size;
  uint8_t* direct = backend_.slot_host_pointer(slot);
  const bool streamed = plan_.placement[unit] == UnitPlacement::streamed;

  // Host cache: payloads of streamed units kept in pinned memory after the first read.
  if (streamed && options_.host_cache_bytes > 0) {
    if (!host_cache_[unit] && !host_cache_failed_ && host_cache_used_ + bytes <= options_.host_cache_bytes) {
      auto buffer = backend_.allocate_staging(bytes);
      if (buffer) {
        const auto start = std::chrono::steady_clock::now();
        Status read = reader_.read(file, buffer.value()->data(), pack_.file_hash(unit));
        stats->read_seconds += seconds_since(start);
        if (!read.ok()) return read;
        stats->bytes_from_file += bytes;
        host_cache_[unit] = std::move(buffer.value());
        host_cache_used_ += bytes;
        std::lock_guard<std::mutex> lock(mutex_);
        stats_.host_cache_bytes = host_cache_used_;
        stats_.host_cache_units += 1;
      } else {
        // Out of pinned memory: keep what is cached, stream the rest from the files.
        host_cache_failed_ = true;
        std::lock_guard<std::mutex> lock(mutex_);
        stats_.host_cache_note = "host cache stopped at " + std::to_string(host_cache_used_) + " bytes: " +
                                 buffer.error().message + "; the remaining layers are read from the files";
      }
    } else if (host_cache_[unit]) {
      stats->bytes_from_host_cache += bytes;
    }
    if (host_cache_[unit]) {
      HostBuffer& cached = *host_cache_[unit];
      if (direct) {
        LAYERPACK_TRY(backend_.wait_slot_idle(slot));
        std::memcpy(direct, cached.data(), bytes);
        return Status::success();
      }
      // One DMA straight from the cached pinned copy; it is never rewritten, so there
      // is no ticket to wait for.
      auto ticket = backend_.upload(slot, 0, cached, bytes);
      if (!ticket) return ticket.error();
      stats->bytes_uploaded += bytes;
      return Status::success();
    }
  }

  if (direct) {
    LAYERPACK_TRY(backend_.wait_slot_idle(slot));
    const auto start = std::chrono::steady_clock::now();
    Status read = reader_.read(file, direct, pack_.file_hash(unit));
    stats->read_seconds += seconds_since(start);
    if (read.ok()) stats->bytes_from_file += bytes;
    return read;
  }
  HostBuffer& staging = *staging_[staging_index];
  LAYERPACK_TRY(backend_.wait_upload(staging_ticket_[staging_index]));
  const auto start = std::chrono::steady_clock::now();
  LAYERPACK_TRY(reader_.read(file, staging.data(), pack_.file_hash(unit)));
  stats->read_seconds += seconds_since(start);
  stats->bytes_from_file += bytes;
  auto ticket = backend_.upload(slot, 0, staging, bytes);
  if (!ticket) return ticket.error();
  staging_ticket_[staging_index] = ticket.value();
  stats->bytes_uploaded += bytes;
  return Status::success();
}

void LayerStreamer::provide_host_unit(UnitIndex unit, AlignedBuffer payload) {
  assert(unit < pack_.unit_count() && payload.size() == pack_.payload_size(unit));
  host_units_.resize(pack_.unit_count());
  host_units_[unit] = std::move(payload);
}

Status LayerStreamer::start() {
  const uint32_t units = pack_.unit_count();
  resident_slot_.assign(units, 0);
  host_units_.resize(units);
  host_cache_.resize(units);
  bool need_staging = false;
  StreamerStats startup;
  auto phase_start = std::chrono::steady_clock::now();
  for (UnitIndex u = 0; u < units; ++u) {
    if (plan_.placement[u] != UnitPlacement::host) continue;
    startup.bytes_from_file += pack_.payload_size(u);
    if (host_units_[u]) continue;  // provide_host_unit
    auto buffer = AlignedBuffer::allocate_for_read(pack_.payload_size(u), pack_.unit(u).path);
    if (!buffer) return buffer.error();
    host_units_[u] = std::move(buffer.value());
    LAYERPACK_TRY(reader_.read(pack_.unit(u), host_units_[u].data(), pack_.file_hash(u)));
  }
  startup.startup_host_seconds = seconds_since(phase_start);
  phase_start = std::chrono::steady_clock::now();
  for (UnitIndex u = 0; u < units; ++u) {
    if (plan_.placement[u] == UnitPlacement::resident) {
      auto slot = backend_.allocate_slot(pack_.payload_size(u));
      if (!slot) return slot.error();
      resident_slot_[u] = slot.value();
      if (!backend_.slot_host_pointer(slot.value())) need_staging = true;
    } else if (plan_.placement[u] == UnitPlacement::streamed) {
      stream_order_.push_back(u);
    }
  }
  for (uint32_t i = 0; i < plan_.ring_slots; ++i) {
    auto slot = backend_.allocate_slot(plan_.ring_slot_size);
    if (!slot) return slot.error();
    ring_.push_back(slot.value());
    if (!backend_.slot_host_pointer(slot.value())) need_staging = true;
  }
  uint64_t piece_bytes = 0;  // all-resident start through staging: pieces of this size (0: whole payloads)
  if (need_staging) {
    // Double-buffered staging, each the largest payload that goes through it (a
    // streamed layer is one read and one DMA). When everything is resident, two pieces
    // of options_.startup_piece_bytes instead: each payload goes up piece by piece, the next
    // piece read while the previous one is copied (one payload-sized buffer made the
    // read and the copy take turns: 12.5 GB/s at start on an H200, and pinning a
    // second 263 MB buffer cost 0.09 s). Whole payloads with check_hash (the hash
    // covers the payload).
    uint64_t largest = 0;
    for (UnitIndex u = 1; u < units; ++u) {
      if (plan_.placement[u] != UnitPlacement::host) largest = std::max(largest, pack_.payload_size(u));
    }
    if (ring_.empty() && !reader_.options().check_hash && options_.startup_piece_bytes % kPayloadAlignment == 0 &&
        options_.startup_piece_bytes > 0)
      piece_bytes = std::min(largest, options_.startup_piece_bytes);
    const uint64_t staging_bytes = piece_bytes ? piece_bytes : largest;
    const size_t count = ring_.empty() && !piece_bytes ? 1 : std::max<uint32_t>(1, options_.staging_buffers);
    for (size_t i = 0; i < count; ++i) {
      auto staging = backend_.allocate_staging(staging_bytes);
      if (!staging) return staging.error();
      staging_.push_back(std::move(staging.value()));
      staging_ticket_.push_back(0);
    }
  }
  startup.startup_slot_seconds = seconds_since(phase_start);
  phase_start = std::chrono::steady_clock::now();
  // Resident loads, in unit order, alternating staging buffers so a read overlaps
  // the previous upload.
  size_t resident_index = 0;
  for (UnitIndex u = 0; u < units; ++u) {
    if (plan_.placement[u] != UnitPlacement::resident) continue;
    startup.bytes_from_file += pack_.payload_size(u);
    if (piece_bytes && !backend_.slot_host_pointer(resident_slot_[u])) {
      const LayerFileInfo& file = pack_.unit(u);
      for (uint64_t offset = 0; offset < file.payload_size; offset += piece_bytes) {
        const uint64_t length = std::min(piece_bytes, file.payload_size - offset);
        const size_t k = resident_index++ % staging_.size();
        LAYERPACK_TRY(backend_.wait_upload(staging_ticket_[k]));
        LAYERPACK_TRY(reader_.read_range(file, offset, length, staging_[k]->data()));
        auto ticket = backend_.upload(resident_slot_[u], offset, *staging_[k], length);
        if (!ticket) return ticket.error();
        staging_ticket_[k] = ticket.value();
      }
      continue;
    }
    StreamerStats ignored;
    LAYERPACK_TRY(load_into(u, resident_slot_[u], staging_.empty() ? 0 : resident_index++ % staging_.size(), &ignored));
  }
  // Resident uploads complete before start() returns, so a later failure cannot
  // leave a copy in flight into a slot being freed.
  for (UploadTicket ticket : staging_ticket_) LAYERPACK_TRY(backend_.wait_upload(ticket));
  if (stream_order_.empty()) {  // nothing streams: the pinned staging is not needed again
    staging_.clear();
    staging_ticket_.clear();
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.startup_bytes_read = startup.bytes_from_file;
    stats_.startup_host_seconds = startup.startup_host_seconds;
    stats_.startup_slot_seconds = startup.startup_slot_seconds;
    stats_.startup_resident_seconds = seconds_since(phase_start);
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
    StreamerStats load;
    Status status = load_into(entry.unit, entry.slot, k % std::max<size_t>(1, staging_.size()), &load);
    lock.lock();
    RingEntry& done = window_[k - first_in_window_];
    done.loaded = true;
    done.status = status;
    if (status.ok()) {
      stats_.loads += 1;
      stats_.bytes_loaded += pack_.payload_size(entry.unit);
      stats_.bytes_from_file += load.bytes_from_file;
      stats_.bytes_from_host_cache += load.bytes_from_host_cache;
      stats_.bytes_uploaded += load.bytes_uploaded;
      stats_.read_seconds += load.read_seconds;
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
