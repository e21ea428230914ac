#include "pre_tokenizer.h"

namespace layerpack {
namespace {

// GPT-2's pattern, used by the ByteLevel pre-tokenizer when use_regex is set.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

void apply_behavior(const std::vector<std::pair<PieceRange, bool>>& matches, fb::SplitBehavior behavior,
                    std::vector<PieceRange>& out) {
  using B = fb::SplitBehavior;
  switch (behavior) {
    case B::removed:
      for (const auto& [range, is_match] : matches)
        if (!is_match) out.push_back(range);
      break;
    case B::isolated:
      for (const auto& m : matches) out.push_back(m.first);
      break;
    case B::merged_with_previous: {
      bool previous_match = false;
      size_t first = out.size();
      for (const auto& [range, is_match] : matches) {
        if (is_match && !previous_match && out.size() > first)
          out.back().length = range.start + range.length - out.back().start;
        else
          out.push_back(range);
        previous_match = is_match;
      }
      break;
    }
    case B::merged_with_next: {
      std::vector<PieceRange> reversed;
      bool previous_match = false;
      for (auto it = matches.rbegin(); it != matches.rend(); ++it) {
        const auto& [range, is_match] = *it;
        if (is_match && !previous_match && !reversed.empty()) {
          size_t end = reversed.back().start + reversed.back().length;
          reversed.back().start = range.start;
          reversed.back().length = end - range.start;
        } else {
          reversed.push_back(range);
        }
        previous_match = is_match;
      }
      out.insert(out.end(), reversed.rbegin(), reversed.rend());
      break;
    }
    case B::contiguous: {
      bool previous_match = false;
      size_t first = out.size();
      for (const auto& [range, is_match] : matches) {
        if (is_match && previous_match && out.size() > first)
          out.back().length = range.start + range.length - out.back().start;
        else
          out.push_back(range);
        previous_match = is_match;
      }
      break;
    }
  }
}

}  // namespace

Result<std::shared_ptr<CompiledRegex>> CompiledRegex::compile(const std::string& pattern, bool literal) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK;
  if (literal) options = PCRE2_LITERAL | PCRE2_UTF | PCRE2_NO_UTF_CHECK;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   options & ~uint32_t{PCRE2_NO_UTF_CHECK}, &error_code, &error_offset, nullptr);
  if (!code) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof(message));
    return make_error(ErrorCode::unsupported, "pre-tokenizer regex does not compile at offset " +
                                                  std::to_string(error_offset) + ": " +
                                                  reinterpret_cast<const char*>(message) + " (pattern " + pattern + ")");
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  auto regex = std::make_shared<CompiledRegex>();
  regex->code_ = code;
  return regex;
}

CompiledRegex::~CompiledRegex() {
  if (code_) pcre2_code_free(code_);
}

void CompiledRegex::find_matches(std::string_view subject, std::vector<std::pair<PieceRange, bool>>& out) const {
  // One match-data block per thread: encode() is const and may run on several threads.
  thread_local std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match_data(
      pcre2_match_data_create(4, nullptr), &pcre2_match_data_free);
  auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data());
  size_t previous = 0, offset = 0;
  // Subjects are checked for valid UTF-8 by the caller's encode path? No: raw user text may be ill-formed,
  // so the first match checks validity and an ill-formed subject becomes one piece.
  uint32_t options = 0;
  while (offset <= subject.size()) {
    int rc = pcre2_match(code_, data, subject.size(), offset, options, match_data.get(), nullptr);
    if (rc < 0) {
      if (rc != PCRE2_ERROR_NOMATCH && previous == 0 && offset == 0) {
        out.push_back({{0, subject.size()}, false});
        return;
      }
      break;
    }
    options = PCRE2_NO_UTF_CHECK;
    PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match_data.get());
    size_t start = ovector[0], end = ovector[1];
    if (end == start) {  // empty match: step one character forward
      offset = end + 1;
      while (offset < subject.size() && (static_cast<unsigned char>(subject[offset]) & 0xC0) == 0x80) ++offset;
      continue;
    }
    if (start > previous) out.push_back({{previous, start - previous}, false});
    out.push_back({{start, end - start}, true});
    previous = end;
    offset = end;
  }
  if (previous < subject.size()) out.push_back({{previous, subject.size() - previous}, false});
}

Status PreTokenizer::add_step(const fb::PreTokenizerStep& step) {
  Step s;
  s.kind = step.kind();
  switch (step.kind()) {
    case fb::PreTokenizerKind::split: {
      if (!step.pattern()) return make_error(ErrorCode::corrupt, "a Split pre-tokenizer step has no pattern");
      auto regex = CompiledRegex::compile(step.pattern()->str(), !step.pattern_is_regex());
      if (!regex.ok()) return regex.error();
      s.regex = regex.value();
      s.behavior = step.behavior();
      if (s.behavior > fb::SplitBehavior::MAX) return make_error(ErrorCode::corrupt, "unknown split behaviour");
      s.invert = step.invert();
      break;
    }
    case fb::PreTokenizerKind::byte_level: {
      s.add_prefix_space = step.flag_a();
      if (step.flag_b()) {
        auto regex = CompiledRegex::compile(kGpt2Pattern, false);
        if (!regex.ok()) return regex.error();
        s.regex = regex.value();
      }
      break;
    }
    case fb::PreTokenizerKind::digits: {
      auto regex = CompiledRegex::compile("\\p{N}", false);
      if (!regex.ok()) return regex.error();
      s.regex = regex.value();
      s.behavior = step.flag_a() ? fb::SplitBehavior::isolated : fb::SplitBehavior::contiguous;
      break;
    }
    case fb::PreTokenizerKind::metaspace: {
      s.replacement = step.text() ? step.text()->str() : "\xE2\x96\x81";
      if (s.replacement.empty()) return make_error(ErrorCode::corrupt, "Metaspace has an empty replacement");
      s.prepend_scheme = step.prepend_scheme();
      if (s.prepend_scheme > 2) return make_error(ErrorCode::corrupt, "unknown Metaspace prepend scheme");
      s.split = step.flag_a();
      auto regex = CompiledRegex::compile(s.replacement, true);
      if (!regex.ok()) return regex.error();
      s.regex = regex.value();
      s.behavior = fb::SplitBehavior::merged_with_next;
      break;
    }
    default:
      return make_error(ErrorCode::corrupt, "unknown pre-tokenizer step kind");
  }
  steps_.push_back(std::move(s));
  return Status::success();
}

std::string_view PreTokenizer::run(std::string_view text, bool at_text_start, std::string& storage,
                                   std::vector<PieceRange>& pieces) const {
  pieces.clear();
  pieces.push_back({0, text.size()});
  std::string_view buffer = text;
  std::vector<PieceRange> next;
  std::vector<std::pair<PieceRange, bool>> matches;
  std::string rewritten;
  for (const Step& step : steps_) {
    next.clear();
    // Steps that rewrite text build a new buffer from the rewritten pieces.
    bool rewrites = (step.kind == fb::PreTokenizerKind::byte_level && step.add_prefix_space) ||
                    step.kind == fb::PreTokenizerKind::metaspace;
    std::vector<PieceRange> rewritten_pieces;
    if (rewrites) {
      rewritten.clear();
      bool first_piece = true;
      for (const auto& piece : pieces) {
        std::string_view p = buffer.substr(piece.start, piece.length);
        size_t start = rewritten.size();
        if (step.kind == fb::PreTokenizerKind::byte_level) {
          if (p.empty() || p[0] != ' ') rewritten += ' ';
          rewritten += p;
        } else {
          std::string replaced;
          for (char c : p) {
            if (c == ' ')
              replaced += step.replacement;
            else
              replaced += c;
          }
          bool starts = replaced.compare(0, step.replacement.size(), step.replacement) == 0;
          bool prepend = !starts && (step.prepend_scheme == 0 ||
                                     (step.prepend_scheme == 1 && at_text_start && first_piece && piece.start == 0));
          if (prepend) rewritten += step.replacement;
          rewritten += replaced;
        }
        rewritten_pieces.push_back({start, rewritten.size() - start});
        first_piece = false;
      }
      storage.swap(rewritten);
      buffer = storage;
      pieces.swap(rewritten_pieces);
    }
    if (!step.regex || (step.kind == fb::PreTokenizerKind::metaspace && !step.split)) continue;
    for (const auto& piece : pieces) {
      matches.clear();
      step.regex->find_matches(buffer.substr(piece.start, piece.length), matches);
      for (auto& m : matches) {
        m.first.start += piece.start;
        if (step.invert) m.second = !m.second;
      }
      apply_behavior(matches, step.behavior, next);
    }
    pieces.swap(next);
  }
  return buffer;
}

}  // namespace layerpack
