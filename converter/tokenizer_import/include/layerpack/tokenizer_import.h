// Imports a checkpoint's tokenizer into a pack's tokenizer.lpk.
// Sources, first found wins: tokenizer.json (+ tokenizer_config.json),
// tokenizer.model as SentencePiece protobuf, tokenizer.model as tiktoken ranks.
#pragma once

#include <string>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack {

struct TokenizerImportSummary {
  std::string source_file;  // which file was used
  std::string kind;         // "byte_level_bpe", "sentencepiece_bpe"
  size_t vocab_size = 0;
  WrittenFile written;      // the tokenizer.lpk written (name, size, hash)
};

// Writes <output_path> atomically. Errors name the offending source file.
Result<TokenizerImportSummary> import_tokenizer(const std::string& checkpoint_dir, const std::string& output_path);

}  // namespace layerpack
