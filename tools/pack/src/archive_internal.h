// Byte layout helpers shared by export and import (see ARCHIVE.md).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "layerpack/archive.h"

namespace layerpack::archive_detail {

// Fixed part of the archive header, read before anything version dependent.
constexpr size_t kFixedHeaderSize = 32;
constexpr uint32_t kRecordFile = 0x454C4946u;  // "FILE" little endian
constexpr uint32_t kRecordEnd = 0x00444E45u;   // "END\0"
constexpr size_t kEndRecordSize = 4 + 4 + 8 + 8;

inline void put_u16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v));
  out.push_back(static_cast<uint8_t>(v >> 8));
}
inline void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
inline void put_u64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
inline uint16_t get_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t get_u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}
inline uint64_t get_u64(const uint8_t* p) {
  return static_cast<uint64_t>(get_u32(p)) | (static_cast<uint64_t>(get_u32(p + 4)) << 32);
}

// One listing entry / record header body: u16 name length, name, u64 size, u64 hash.
inline void put_entry(std::vector<uint8_t>& out, const ArchiveFileRecord& f) {
  put_u16(out, static_cast<uint16_t>(f.name.size()));
  out.insert(out.end(), f.name.begin(), f.name.end());
  put_u64(out, f.size);
  put_u64(out, f.hash);
}

inline std::vector<uint8_t> listing_bytes(const std::vector<ArchiveFileRecord>& files) {
  std::vector<uint8_t> out;
  for (const auto& f : files) put_entry(out, f);
  return out;
}

inline std::vector<uint8_t> file_record_header(const ArchiveFileRecord& f) {
  std::vector<uint8_t> out;
  put_u32(out, kRecordFile);
  put_entry(out, f);
  return out;
}

std::string hex64(uint64_t v);

}  // namespace layerpack::archive_detail
