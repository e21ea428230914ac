// Tokenizer loaded from a pack's tokenizer.lpk (no JSON at run time).
// Families: byte-level BPE with regex pre-tokenization (Llama 3, GPT-2, SmolLM,
// Qwen2) and SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, Mistral).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "layerpack/error.h"

namespace layerpack {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

class Tokenizer {
 public:
  static Result<std::unique_ptr<Tokenizer>> load(const std::string& tokenizer_file_path);
  virtual ~Tokenizer() = default;

  // add_special: BOS/EOS as tokenizer_config says. Special/added tokens in text are matched.
  virtual std::vector<int32_t> encode(const std::string& text, bool add_special) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special) const = 0;
  // Raw bytes of the tokens, no UTF-8 repair (may end inside a character). continuation:
  // these ids follow earlier output, so no leading-space strip applies.
  virtual std::string decode_bytes(const std::vector<int32_t>& ids, bool skip_special, bool continuation) const = 0;
  // The token's stored text (byte-level: raw bytes; SentencePiece: the piece with U+2581); "" if out of range.
  virtual std::string token_text(int32_t id) const = 0;
  // Id of an added token or vocabulary entry with exactly this text, -1 if none.
  virtual int32_t token_id(const std::string& text) const = 0;
  virtual size_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual std::vector<int32_t> eos_ids() const = 0;
  virtual bool is_special(int32_t id) const = 0;

  // Renders the model's chat format; add_generation_prompt opens the assistant turn.
  virtual Result<std::string> apply_chat_template(const std::vector<ChatMessage>& messages,
                                                  bool add_generation_prompt) const = 0;
  // "chatml", "llama3", "llama2", "mistral", "zephyr", or "none" when chat is unavailable.
  virtual std::string chat_template_family() const = 0;
};

// Plain-prompt fallback for models without a recognised chat template: the user must ask
// for it explicitly. Messages become "role: content" lines, ending with "assistant: ".
std::string render_plain_prompt(const std::vector<ChatMessage>& messages, bool add_generation_prompt);

// Streaming-safe decoding: returns only complete UTF-8; holds back partial sequences.
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special = true);
  std::string push(int32_t id);  // text that became complete with this token
  std::string flush();           // whatever remains (invalid bytes as U+FFFD)

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::string pending_;     // decoded bytes not yet returned (an incomplete UTF-8 tail)
  bool produced_ = false;   // some text was decoded (no leading-space strip after that)
};

}  // namespace layerpack
