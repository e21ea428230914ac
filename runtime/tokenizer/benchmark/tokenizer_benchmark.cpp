// Encode throughput, single thread (issue 4 asks for >= 20 MB/s on English text).
// Usage: layerpack-tokenizer-bench <tokenizer.lpk | checkpoint dir> [english.txt] [--seconds N]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "layerpack/tokenizer.h"
#include "layerpack/tokenizer_import.h"

namespace {

// Varied English prose (no repetition inside a paragraph); repeated to the benchmark size.
const char* kEnglish =
    "The history of computing is a story of abstractions stacked on one another. Early machines were programmed "
    "by rewiring plugboards; later, stored programs let the same hardware run anything a person could describe. "
    "Compilers turned readable source code into machine instructions, and operating systems shared one computer "
    "among many users. Networks joined those computers, and the web made documents, images and video available "
    "to billions of people within a few decades.\n\nLanguage models learn the statistics of text. Before a model "
    "sees a sentence, a tokenizer splits it into pieces drawn from a fixed vocabulary: common words become a single "
    "token, rare words are spelled out from smaller fragments, and any byte sequence at all can still be written. "
    "A fast tokenizer matters more than one might think, because every prompt and every generated answer passes "
    "through it, and long documents can run to hundreds of thousands of characters.\n\nShe opened the window, "
    "looked at the grey sky over the harbour, and decided that the walk to the market could wait until the rain "
    "had stopped. Her brother, who had promised to repair the bicycle on Tuesday, was still asleep; the kettle "
    "whistled; somewhere a dog barked twice and then fell silent. It's going to be one of those days, she thought, "
    "and smiled anyway.\n\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <tokenizer.lpk | checkpoint dir> [english.txt] [--seconds N]\n", argv[0]);
    return 2;
  }
  std::string source = argv[1];
  std::string text_file;
  double seconds = 2.0;
  for (int i = 2; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = std::atof(argv[++i]);
    else text_file = argv[i];
  }
  std::string lpk = source;
  if (std::filesystem::is_directory(source)) {
    lpk = (std::filesystem::temp_directory_path() / "layerpack-tokenizer-bench.lpk").string();
    auto imported = layerpack::import_tokenizer(source, lpk);
    if (!imported.ok()) {
      std::fprintf(stderr, "error: %s\n", imported.error().to_string().c_str());
      return 1;
    }
  }
  auto start = std::chrono::steady_clock::now();
  auto tokenizer = layerpack::Tokenizer::load(lpk);
  double load_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "error: %s\n", tokenizer.error().to_string().c_str());
    return 1;
  }
  std::string text;
  if (!text_file.empty()) {
    std::ifstream in(text_file, std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "error: %s: cannot open\n", text_file.c_str());
      return 1;
    }
    std::ostringstream s;
    s << in.rdbuf();
    text = s.str();
  } else {
    while (text.size() < (1u << 20)) text += kEnglish;
  }
  size_t bytes = 0, tokens = 0;
  int rounds = 0;
  start = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < seconds || rounds == 0) {
    tokens += tokenizer.value()->encode(text, false).size();
    bytes += text.size();
    ++rounds;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  std::printf("tokenizer %s: load %.2f ms, vocabulary %zu\n", lpk.c_str(), load_ms, tokenizer.value()->vocab_size());
  std::printf("encode: %.1f MB/s single thread (%zu bytes x %d rounds, %.2f bytes/token, %.2f s)\n",
              bytes / elapsed / 1e6, text.size(), rounds, static_cast<double>(bytes) / tokens, elapsed);
  return 0;
}
