// The layer scheduler decides which layers stay resident and which stream through a
// ring of reusable slots, and the LayerStreamer carries that plan out: it loads
// payloads in compute order, ahead of compute by up to ring_slots layers, on a loader
// thread, while the backend computes. Both are backend-agnostic: the CPU backend uses
// them with host slots; the CUDA backend with VRAM slots, pinned staging buffers and
// asynchronous uploads, under a VRAM budget.
//
// Where a streamed payload comes from, per load:
//   host cache  pinned host memory kept from an earlier pass: one DMA, no read
//   file        parallel chunked read (payload_reader.h) into a pinned staging buffer
//               (or into the host cache on first use), then one DMA
// On the CPU (host-writable slots) the file is read straight into the slot.
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
  // Ring depth wanted when the budget allows it. Three: one slot being computed, one
  // being filled over the link, one already filled, so a slow read or a long compute
  // (prefill) never stalls the other side; each further slot costs a resident layer.
  uint32_t preferred_ring_slots = 3;
  uint32_t max_ring_slots = 4;
  // Device allocations are rounded up to this (CUDA: 2 MiB pages), so the plan's
  // bytes are what the allocator really takes from the budget.
  uint64_t allocation_granularity = 1;
};

struct SchedulePlan {
  std::vector<UnitPlacement> placement;  // per unit
  uint32_t ring_slots = 0;               // 0 when everything is resident
  uint64_t ring_slot_size = 0;           // largest streamed payload (rounded to the granularity)
  uint64_t resident_bytes = 0;           // allocated, rounded to the granularity
  uint64_t ring_bytes = 0;
  uint64_t slot_budget = UINT64_MAX;     // what the plan had to fit in
  uint64_t streamed_bytes_per_pass = 0;  // payload bytes loaded per forward pass
  uint64_t slot_bytes() const { return resident_bytes + ring_bytes; }
  uint32_t resident_count() const;
  uint32_t streamed_count() const;
  std::string explain() const;  // one line per decision, for --verbose
};

// All resident when everything fits. Otherwise a ring of slots sized to the largest
// streamed payload (preferred_ring_slots deep when the budget allows, else fewer, never
// under min_ring_slots), and the remaining budget filled with resident layers, the
// output layer first (it is read every pass and is usually the largest, so keeping it
// resident also shrinks the ring slots to the decoder layer size), then decoder layers
// from the first. Of the two slot sizes (largest unit, or largest decoder layer with
// the output resident) the plan that streams fewer bytes per pass wins. Error when
// the budget cannot hold min_ring_slots slots; the message gives the minimum.
Result<SchedulePlan> plan_layers(const SchedulerInput& input);

struct StreamerOptions {
  // Pinned host memory for payloads kept after their first read (--host-cache).
  // Streamed units are cached in compute order until it is full.
  uint64_t host_cache_bytes = 0;
  uint32_t staging_buffers = 2;  // read one payload while the previous one is in DMA
  // When every layer is resident (and hashes are not checked), payloads go to their
  // slots in pieces of this many bytes (a multiple of 4096) through two staging
  // buffers, so reads overlap the copies.
  uint64_t startup_piece_bytes = uint64_t(64) << 20;
};

struct StreamerStats {
  uint64_t loads = 0;                  // streamed loads (not the resident loads at start)
  uint64_t bytes_loaded = 0;           // payload bytes of those loads
  uint64_t bytes_from_file = 0;        // ... read from the pack files
  uint64_t bytes_from_host_cache = 0;  // ... taken from the host cache
  uint64_t bytes_uploaded = 0;         // ... copied over the host-device link
  uint64_t startup_bytes_read = 0;     // resident units and host units at start()
  double startup_host_seconds = 0;     // start(): host units read
  double startup_slot_seconds = 0;     // start(): slots and staging allocated
  double startup_resident_seconds = 0;  // start(): resident units read and uploaded
  double wait_seconds = 0;             // compute thread waiting for a load
  double read_seconds = 0;             // loader reading files
  uint64_t host_cache_bytes = 0;       // pinned bytes held by the host cache
  uint32_t host_cache_units = 0;
  std::string host_cache_note;         // why the host cache holds less than asked, if it does
};

// Owns the slots of a plan and keeps them filled. Units are requested in compute
// order (decoder layers then output, every pass); a streamed unit's slot is released
// back to the ring by release() once compute has been issued on it.
class LayerStreamer {
 public:
  LayerStreamer(const ModelPack& pack, Backend& backend, PayloadReader& reader, SchedulePlan plan,
                StreamerOptions options = {});
  ~LayerStreamer();
  // A host-placed unit already read (Engine::open reads the embedding while the GPU
  // context starts); start() then keeps it instead of reading the file. Before start().
  void provide_host_unit(UnitIndex unit, AlignedBuffer payload);
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
  // `stats` (under mutex_) receives the byte counts of a streamed load.
  Status load_into(UnitIndex unit, SlotId slot, size_t staging_index, StreamerStats* stats);
  void loader_loop();

  const ModelPack& pack_;
  Backend& backend_;
  PayloadReader& reader_;
  SchedulePlan plan_;
  StreamerOptions options_;
  std::vector<std::unique_ptr<HostBuffer>> host_cache_;  // per unit, set once cached (loader thread only)
  uint64_t host_cache_used_ = 0;
  bool host_cache_failed_ = false;
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
