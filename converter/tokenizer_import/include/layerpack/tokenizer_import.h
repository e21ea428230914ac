// Imports a checkpoint's tokenizer into a pack's tokenizer.lpk.
// Sources, first found wins: tokenizer.json (+ tokenizer_config.json),
// tokenizer.model as SentencePiece protobuf, tokenizer.model as tiktoken ranks.
#pragma once

#include <string>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/format.h"

namespace layerpack {

struct TokenizerImportSummary {
  std::string source_file;  // which file was used
  std::string kind;         // "byte_level_bpe", "sentencepiece_bpe"
  size_t vocab_size = 0;
  WrittenFile written;      // the tokenizer.lpk written (name, size, hash)
  std::string chat_template_family;    // "chatml", "llama3", ... or "none"
  std::vector<std::string> warnings;   // e.g. an unrecognised chat template (import still succeeds)
};

// Which source file to import; automatic follows the order above.
enum class TokenizerSource { automatic, hugging_face_json, sentencepiece_model, tiktoken_ranks };

// Writes <output_path> atomically. Errors name the offending source file.
Result<TokenizerImportSummary> import_tokenizer(const std::string& checkpoint_dir, const std::string& output_path);
// The same with an explicit source (tokenizer_config.json is still read from checkpoint_dir when present).
Result<TokenizerImportSummary> import_tokenizer(const std::string& checkpoint_dir, const std::string& output_path,
                                                TokenizerSource source);

}  // namespace layerpack
