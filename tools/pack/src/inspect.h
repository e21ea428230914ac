#pragma once

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "layerpack/error.h"

namespace layerpack {
// Summary of a pack: model, quantization, tensors, files, provenance.
Result<nlohmann::json> inspect_pack(const std::string& pack_dir);
void print_inspect(const nlohmann::json& summary, std::FILE* out);
}  // namespace layerpack
