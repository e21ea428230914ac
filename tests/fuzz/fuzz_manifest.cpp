// libFuzzer harness: the pack manifest reader (format/src/manifest.cpp) and
// verify_pack on a directory holding only that manifest (its file list is then
// checked against missing files, which exercises every cross-check path).
// The preamble's header hash is recomputed so mutations reach the FlatBuffer
// verifier and the manifest's semantic checks.
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "layerpack/format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerpack;
  const std::string dir = fuzz::fresh_dir("pack");
  std::vector<uint8_t> bytes = fuzz::with_fixed_header_hash(data, size);
  fuzz::write_file(dir + "/" + kManifestFileName, bytes.data(), bytes.size());
  auto manifest = read_manifest(dir);
  VerifyReport report = verify_pack(dir);
  if (!manifest.ok()) {
    if (manifest.error().message.find(dir) == std::string::npos) __builtin_trap();
    if (report.ok()) __builtin_trap();  // verify must not pass what read_manifest refuses
    return 0;
  }
  for (const FileEntry& entry : manifest->files)
    if (manifest->find_file(entry.name) == nullptr) __builtin_trap();
  // A manifest listing files that are absent cannot verify as a complete pack.
  if (!manifest->files.empty() && report.ok()) __builtin_trap();
  for (const VerifyProblem& problem : report.problems)
    if (problem.error.message.empty()) __builtin_trap();
  return 0;
}
