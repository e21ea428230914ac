// libFuzzer harness: the runtime's tokenizer.lpk loader (runtime/tokenizer).
// The input is a whole tokenizer.lpk; its header hash is recomputed so that
// mutations reach the FlatBuffer verifier and the table checks behind it.
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "layerpack/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerpack;
  static const std::string path = fuzz::scratch_dir() + "/tokenizer.lpk";
  std::vector<uint8_t> bytes = fuzz::with_fixed_header_hash(data, size);
  fuzz::write_file(path, bytes.data(), bytes.size());
  auto tokenizer = Tokenizer::load(path);
  if (!tokenizer.ok()) {
    if (tokenizer.error().message.find(path) == std::string::npos) __builtin_trap();
    return 0;
  }
  const Tokenizer& t = **tokenizer;
  const std::string samples[] = {"Hello world! It's 2024, naïve café 😀 <|eot_id|> <s> [INST]",
                                 std::string("\0\xff\xfe bytes \xe2\x82", 12), "   \n\n\t  tabs"};
  for (const std::string& text : samples) {
    std::vector<int32_t> ids = t.encode(text, true);
    for (int32_t id : ids)
      if (id < 0 || static_cast<size_t>(id) >= t.vocab_size()) __builtin_trap();
    (void)t.decode(ids, false);
    (void)t.decode_bytes(ids, true, true);
    StreamingDecoder streaming(t);
    for (int32_t id : ids) (void)streaming.push(id);
    (void)streaming.flush();
  }
  (void)t.decode({-1, 0, 1, static_cast<int32_t>(t.vocab_size()), 0x7fffffff}, false);
  (void)t.token_text(static_cast<int32_t>(t.vocab_size()));
  (void)t.token_id("<s>");
  (void)t.bos_id();
  (void)t.eos_ids();
  (void)t.apply_chat_template({{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "?"}}, true);
  return 0;
}
