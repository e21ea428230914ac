// verify_pack: whole-pack verification (being written).
#include "pack_internal.h"

namespace layerpack {

VerifyReport verify_pack(const std::string& pack_dir, const VerifyOptions& options) {
  (void)options;
  VerifyReport report;
  auto manifest = read_manifest(pack_dir);
  if (!manifest) report.problems.push_back({kManifestFileName, manifest.error()});
  return report;
}

}  // namespace layerpack
