// The layer scheduler decides which layers stay resident and which stream through a
// ring of reusable slots, and the LayerStreamer carries that plan out: it loads
// payloads in compute order, ahead of compute by up to ring_slots - 1 layers, on a
// loader thread, while the backend computes. Both are backend-agnostic: the CPU backend
// uses them with host slots; the CUDA backend with VRAM slots, pinned staging buffers
// and asynchronous uploads (issue 7), under a VRAM budget.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "layerpack/backend.h"
#include "layerpack/model_pack.h"
#include "layerpack/payload_reader.h"

namespace layerpack {

enum class UnitPlacement : uint8_t {
  host,      // embedding: loaded once into host memory, rows gathered per token
  resident,  // loaded once into its own slot
  streamed,  // loaded every pass into a ring slot
};

struct SchedulerInput {
  // Padded payload size of every unit (index = UnitIndex; unit 0 is the embedding).
  std::vector<uint64_t> payload_sizes;
  // Bytes the layer slots may use (resident + ring); UINT64_MAX: no limit.
  uint64_t slot_budget = UINT64_MAX;
  uint32_t min_ring_slots = 2;  // >= 2 so one slot loads while another computes
  uint32_t max_ring_slots = 4;  // deeper prefetch when the budget allows
};

struct SchedulePlan {
  std::vector<UnitPlacement> placement;  // per unit
  uint32_t ring_slots = 0;               // 0 when everything is resident
  uint64_t ring_slot_size = 0;           // largest streamed payload
  uint64_t resident_bytes = 0;
  uint64_t ring_bytes = 0;
  uint64_t streamed_bytes_per_pass = 0;  // payload bytes loaded per forward pass
  uint32_t resident_count() const;
  uint32_t streamed_count() const;
  std::string explain() const;  // one line per decision, for --verbose
};

// All resident when everything fits. Otherwise a ring of slots sized to the largest
// streamed payload (as many as the budget allows, min..max), and the remaining budget
// filled with resident layers, the output layer first (it is read every pass and is
// usually the largest), then decoder layers from the first. Error when the budget
// cannot hold min_ring_slots slots; the message gives the minimum.
Result<SchedulePlan> plan_layers(const SchedulerInput& input);

struct StreamerStats {
  uint64_t loads = 0;
  uint64_t bytes_loaded = 0;
  double wait_seconds = 0;  // compute thread waiting for a load
};

// Owns the slots of a plan and keeps them filled. Units are requested in compute
// order (decoder layers then output, every pass); a streamed unit's slot is released
// back to the ring by release() once compute has been issued on it.
class LayerStreamer {
 public:
  LayerStreamer(const ModelPack& pack, Backend& backend, PayloadReader& reader, SchedulePlan plan);
  ~LayerStreamer();
  // Allocates slots and staging, loads the resident units, starts the loader thread.
  Status start();
  // Slot holding `unit`, waiting for its load (and surfacing its error) if needed.
  // Streamed units must be acquired in the cyclic order of the plan.
  Result<SlotId> acquire(UnitIndex unit);
  // Compute on the unit has been issued; its ring slot may be refilled once the
  // backend says the slot is idle.
  void release(UnitIndex unit);
  // Host copy of a unit placed on the host (the embedding).
  const uint8_t* host_payload(UnitIndex unit) const;
  const SchedulePlan& plan() const { return plan_; }
  StreamerStats stats() const;

 private:
  struct RingEntry {
    UnitIndex unit = 0;
    SlotId slot = 0;
    bool loaded = false;
    bool released = false;
    Status status;
  };
  Status load_into(UnitIndex unit, SlotId slot, size_t staging_index);
  void loader_loop();

  const ModelPack& pack_;
  Backend& backend_;
  PayloadReader& reader_;
  SchedulePlan plan_;
  std::vector<SlotId> resident_slot_;      // per unit, valid when resident
  std::vector<AlignedBuffer> host_units_;  // per unit, non-empty when placed on the host
  std::vector<UnitIndex> stream_order_;    // streamed units in compute order
  std::vector<SlotId> ring_;               // ring slots
  std::vector<std::unique_ptr<HostBuffer>> staging_;  // only when slots are not host-writable
  std::vector<UploadTicket> staging_ticket_;
  // Loads in flight or done, oldest first; entry k of the global load sequence uses
  // ring slot k % ring_slots and streams unit stream_order_[k % stream_order_.size()].
  std::deque<RingEntry> window_;
  uint64_t next_load_ = 0;     // global index of the next load the loader issues
  uint64_t next_acquire_ = 0;  // global index of the next streamed acquire
  uint64_t first_in_window_ = 0;  // global index of window_.front()
  bool loader_failed_ = false;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::thread loader_;
  bool stopping_ = false;
  StreamerStats stats_;
};

}  // namespace layerpack
