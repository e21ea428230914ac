// Hugging Face pre-tokenizer steps (Split, ByteLevel, Digits, Metaspace) on top
// of PCRE2 in UTF + UCP mode, compiled once when the tokenizer is loaded.
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/tokenizer_generated.h"

namespace layerpack {

struct PieceRange {
  size_t start;
  size_t length;
};

class CompiledRegex {
 public:
  static Result<std::shared_ptr<CompiledRegex>> compile(const std::string& pattern, bool literal);
  ~CompiledRegex();
  // Appends (start, end, is_match) triples covering subject, skipping empty matches.
  void find_matches(std::string_view subject, std::vector<std::pair<PieceRange, bool>>& out) const;

 private:
  pcre2_code* code_ = nullptr;
};

class PreTokenizer {
 public:
  Status add_step(const fb::PreTokenizerStep& step);
  bool empty() const { return steps_.empty(); }
  // Splits text into pieces. Returns the buffer the ranges refer to (text itself, or storage when a step
  // rewrote the text). at_text_start: text begins the whole input (Metaspace prepend_scheme "first").
  std::string_view run(std::string_view text, bool at_text_start, std::string& storage,
                       std::vector<PieceRange>& pieces) const;

 private:
  struct Step {
    fb::PreTokenizerKind kind;
    std::shared_ptr<CompiledRegex> regex;
    fb::SplitBehavior behavior = fb::SplitBehavior::isolated;
    bool invert = false;
    bool add_prefix_space = false;
    std::string replacement;  // metaspace
    uint8_t prepend_scheme = 0;
    bool split = true;
  };
  std::vector<Step> steps_;
};

}  // namespace layerpack
