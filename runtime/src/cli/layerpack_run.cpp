// layerpack-run: generate text from a pack.
//   layerpack-run PACK -p "..." [-n 128] [--chat] [--system "..."] [sampling] [--backend cpu|cuda]
//                 [--vram 8GiB] [--host-cache 48GiB] [--batch-file prompts.txt] [-v] [--json]
// Text streams to stdout; statistics go to stderr at the end (--json: one JSON object
// on stdout instead). Without -p on a terminal: an interactive chat that keeps the KV
// cache between turns. Without -p and stdin not a terminal: the prompt is read from stdin.
// --batch-file: one prompt per line, all decoded together (one pass over the weights
// per step serves every sequence); the output is given per prompt.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "layerpack/engine.h"
#include "layerpack/tokenizer.h"

using namespace layerpack;

namespace {

struct Arguments {
  std::string pack;
  std::optional<std::string> prompt;
  std::string prompt_ids;
  uint32_t max_new_tokens = 128;
  bool chat = false;
  std::optional<std::string> system;
  std::optional<float> temperature, top_p, min_p, repeat_penalty;
  std::optional<uint32_t> top_k;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  std::string backend = "cpu";
  uint32_t threads = 0;
  uint32_t context = 0;
  std::string layer_budget;
  std::string vram;
  std::string host_cache;
  std::string batch_file;
  uint32_t read_threads = 8;
  uint32_t ring_slots = 0;
  uint32_t max_batch_rows = 0;  // automatic (EngineOptions::max_batch_rows)
  bool direct_io = false;
  bool json = false;
  bool verify_hashes = false;
  bool verbose = false;
};

int fail(const std::string& message) {
  std::fflush(stdout);
  std::fprintf(stderr, "layerpack-run: error: %s\n", message.c_str());
  return 1;
}
int fail(const Error& error) { return fail(error.message); }

Result<uint64_t> parse_size(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (...) {
    return make_error(ErrorCode::invalid_argument, "cannot read size \"" + text + "\" (e.g. 512MiB, 8GiB)");
  }
  std::string unit = text.substr(used);
  static const std::pair<const char*, double> units[] = {
      {"", 1},           {"B", 1},          {"K", 1e3},         {"KB", 1e3},        {"KiB", 1024.0},
      {"M", 1e6},        {"MB", 1e6},       {"MiB", 1048576.0}, {"G", 1e9},         {"GB", 1e9},
      {"GiB", 1073741824.0}, {"T", 1e12},   {"TB", 1e12},       {"TiB", 1099511627776.0}};
  for (const auto& [name, factor] : units) {
    // Converting a double at or past 2^64 (or inf) to uint64_t is undefined: refuse it.
    if (unit == name && value >= 0 && value * factor < 18446744073709551616.0)
      return static_cast<uint64_t>(value * factor);
  }
  return make_error(ErrorCode::invalid_argument, "cannot read size \"" + text + "\" (e.g. 512MiB, 8GiB)");
}

Result<std::vector<int32_t>> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::string item;
  std::istringstream in(text);
  while (std::getline(in, item, ',')) {
    item.erase(std::remove_if(item.begin(), item.end(), ::isspace), item.end());
    if (item.empty()) continue;
    try {
      size_t used = 0;
      long v = std::stol(item, &used);
      if (used != item.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(item);
      ids.push_back(static_cast<int32_t>(v));
    } catch (...) {
      return make_error(ErrorCode::invalid_argument, "--prompt-ids: \"" + item + "\" is not a token id");
    }
  }
  if (ids.empty()) return make_error(ErrorCode::invalid_argument, "--prompt-ids is empty");
  return ids;
}

SamplingParams sampling_from(const Arguments& a, const GenerationDefaults& defaults) {
  SamplingParams p;
  // The pack's generation_config defaults, overridden by flags.
  p.temperature = defaults.do_sample ? defaults.temperature : 0.0f;
  p.top_k = defaults.do_sample ? defaults.top_k : 0;
  p.top_p = defaults.do_sample ? defaults.top_p : 1.0f;
  p.min_p = defaults.do_sample ? defaults.min_p : 0.0f;
  p.repetition_penalty = defaults.repetition_penalty > 0 ? defaults.repetition_penalty : 1.0f;
  if (a.temperature) p.temperature = *a.temperature;
  if (a.top_k) p.top_k = *a.top_k;
  if (a.top_p) p.top_p = *a.top_p;
  if (a.min_p) p.min_p = *a.min_p;
  if (a.repeat_penalty) p.repetition_penalty = *a.repeat_penalty;
  p.seed = a.seed ? *a.seed : std::random_device{}();
  return p;
}

std::vector<int32_t> eos_ids_for(const Engine& engine, const Tokenizer* tokenizer) {
  std::vector<int32_t> ids = engine.config().eos_token_ids;
  const auto& g = engine.pack().manifest().generation.eos_token_ids;
  ids.insert(ids.end(), g.begin(), g.end());
  if (tokenizer) {
    auto t = tokenizer->eos_ids();
    ids.insert(ids.end(), t.begin(), t.end());
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

nlohmann::json memory_json(const Engine& engine) {
  const MemoryReport m = engine.memory();
  const SchedulePlan& plan = engine.streamer().plan();
  const StreamerStats streamer = engine.streamer().stats();
  nlohmann::json j = {{"resident_layers", plan.resident_count()},
                      {"streamed_layers", plan.streamed_count()},
                      {"ring_slots", plan.ring_slots},
                      {"ring_slot_bytes", plan.ring_slot_size},
                      {"resident_bytes", plan.resident_bytes},
                      {"ring_bytes", plan.ring_bytes},
                      {"streamed_bytes_per_pass", plan.streamed_bytes_per_pass},
                      {"kv_cache_bytes", m.kv_cache_bytes},
                      {"host_cache_bytes", streamer.host_cache_bytes},
                      {"host_cache_units", streamer.host_cache_units}};
  if (!streamer.host_cache_note.empty()) j["host_cache_note"] = streamer.host_cache_note;
  if (m.device) {
    j["vram_budget_bytes"] = m.budget;
    j["vram_budget_from_option"] = m.budget_from_option;
    j["backend_bytes"] = m.backend_bytes;
    j["code_reserve_bytes"] = m.code_reserve_bytes;
    j["slot_bytes"] = m.slot_bytes;
    j["accounted_bytes"] = m.accounted_bytes();
    j["device_total_bytes"] = m.device_total;
    j["device_free_at_open_bytes"] = m.device_free_at_open;
    j["device_in_use_bytes"] = m.measured_in_use;
    j["device_peak_bytes"] = m.measured_peak;
  }
  return j;
}

// Per decode pass: bytes read from the pack files, taken from the host cache, sent over the link.
void print_traffic(uint32_t passes, uint64_t from_file, uint64_t from_cache, uint64_t uploaded, const Engine& engine) {
  if (!passes) return;
  const MemoryReport m = engine.memory();
  std::fprintf(stderr, "[layerpack-run] per decode pass: %.1f MiB from the pack files, %.1f MiB from the host cache, "
                       "%.1f MiB over the link",
               from_file / 1048576.0 / passes, from_cache / 1048576.0 / passes, uploaded / 1048576.0 / passes);
  if (m.device) {
    std::fprintf(stderr, "; GPU memory peak %.1f MiB of the %.1f MiB budget (accounted %.1f MiB)",
                 m.measured_peak / 1048576.0, m.budget / 1048576.0, m.accounted_bytes() / 1048576.0);
  }
  const StreamerStats s = engine.streamer().stats();
  std::fprintf(stderr, "; compute waited %.3f s for loads\n", s.wait_seconds);
  if (!s.host_cache_note.empty()) std::fprintf(stderr, "[layerpack-run] note: %s\n", s.host_cache_note.c_str());
}

void print_stats(const GenerationResult& r, const Engine& engine, const SamplingParams& sampling) {
  const GenerationStats& s = r.stats;
  std::fprintf(stderr,
               "\n[layerpack-run] %u prompt tokens, prefill %.2f tok/s (%.3f s); %u generated, decode %.2f tok/s "
               "(%.4f s/token); %.0f bytes read per token; peak RSS %.1f MiB; stop: %s; seed %llu; backend %s\n",
               s.prompt_tokens, s.prefill_tokens_per_second(), s.prefill_seconds, s.generated_tokens,
               s.decode_tokens_per_second(), s.decode_seconds_per_token(), s.decode_bytes_per_token(),
               peak_rss_bytes() / 1048576.0, stop_reason_name(r.stop_reason),
               static_cast<unsigned long long>(sampling.seed), engine.backend().name().c_str());
}

// Seconds since this process started: the kernel's start time of the process
// (/proc/self/stat, clock ticks of 10 ms) against CLOCK_BOOTTIME, so library loading
// before main() counts; 0 where /proc cannot be read.
double seconds_since_process_start() {
  std::ifstream in("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t close = stat.rfind(')');  // the command name may hold spaces
  if (close == std::string::npos) return 0;
  // Fields 3.. follow the name; starttime is field 22.
  std::istringstream fields(stat.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22; ++i) {
    if (!(fields >> field)) return 0;
  }
  timespec now{};
  if (clock_gettime(CLOCK_BOOTTIME, &now) != 0) return 0;
  const double start = std::stod(field) / static_cast<double>(sysconf(_SC_CLK_TCK));
  return std::max(0.0, now.tv_sec + now.tv_nsec * 1e-9 - start);
}

// Time to first token and where Engine::open spent its part of it.
nlohmann::json startup_json(const Engine& engine, double generate_start, double prefill_seconds) {
  const OpenTimings& t = engine.open_timings();
  return {{"time_to_first_token_seconds", generate_start + prefill_seconds},
          {"open_seconds", t.total},
          {"open_pack_seconds", t.pack},
          {"open_device_seconds", t.device},
          {"open_backend_seconds", t.backend},
          {"open_embedding_wait_seconds", t.embedding_wait},
          {"open_host_units_seconds", t.host_units},
          {"open_slots_seconds", t.slots},
          {"open_resident_seconds", t.resident},
          {"bytes_read_at_open", engine.streamer().stats().startup_bytes_read},
          {"prefill_seconds", prefill_seconds}};
}

nlohmann::json stats_json(const GenerationResult& r) {
  const GenerationStats& s = r.stats;
  return {{"prompt_tokens", s.prompt_tokens},
          {"generated_tokens", s.generated_tokens},
          {"prefill_seconds", s.prefill_seconds},
          {"prefill_tokens_per_second", s.prefill_tokens_per_second()},
          {"decode_passes", s.decode_passes},
          {"decode_seconds", s.decode_seconds},
          {"decode_tokens_per_second", s.decode_tokens_per_second()},
          {"decode_seconds_per_token", s.decode_seconds_per_token()},
          {"prefill_bytes_read", s.prefill_bytes_read},
          {"decode_bytes_read", s.decode_bytes_read},
          {"decode_bytes_per_token", s.decode_bytes_per_token()},
          {"decode_bytes_from_host_cache", s.decode_bytes_from_host_cache},
          {"decode_bytes_uploaded", s.decode_bytes_uploaded},
          {"decode_bytes_uploaded_per_token",
           s.decode_passes ? static_cast<double>(s.decode_bytes_uploaded) / s.decode_passes : 0.0},
          {"peak_rss_bytes", peak_rss_bytes()}};
}

Result<std::vector<std::string>> read_prompt_lines(const std::string& path) {
  std::ifstream in(path);
  if (!in) return make_error(ErrorCode::not_found, path + ": cannot open the batch file");
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) lines.push_back(line);
  }
  if (lines.empty()) return make_error(ErrorCode::invalid_argument, path + ": no prompts (one per line)");
  return lines;
}

int interactive_chat(const Arguments& a, Engine& engine, Generator& generator, const Tokenizer& tokenizer,
                     GenerationOptions options) {
  std::vector<ChatMessage> messages;
  if (a.system) messages.push_back({"system", *a.system});
  std::fprintf(stderr, "layerpack-run: chat with %s (%s). Empty line or Ctrl-D ends; /reset starts over.\n",
               engine.pack().directory().c_str(), engine.backend().description().c_str());
  auto opened = engine.kv().open_sequence();
  if (!opened) return fail(opened.error());
  const uint32_t sequence = opened.value();
  while (true) {
    std::fprintf(stderr, "\n> ");
    std::fflush(stderr);
    std::string line;
    if (!std::getline(std::cin, line) || line.empty()) break;
    if (line == "/reset") {
      messages.erase(std::remove_if(messages.begin(), messages.end(),
                                    [](const ChatMessage& m) { return m.role != "system"; }),
                     messages.end());
      generator.truncate(sequence, 0);
      continue;
    }
    messages.push_back({"user", line});
    auto rendered = tokenizer.apply_chat_template(messages, true);
    if (!rendered) return fail(rendered.error());
    std::vector<int32_t> ids = tokenizer.encode(rendered.value(), false);
    // Keep the cached prefix this rendering shares with what the cache holds.
    const auto& cached = generator.history(sequence);
    size_t common = 0;
    while (common < cached.size() && common < ids.size() && cached[common] == ids[common]) ++common;
    if (common == ids.size()) --common;  // at least one new token to continue from
    generator.truncate(sequence, static_cast<uint32_t>(common));
    std::vector<int32_t> fresh(ids.begin() + common, ids.end());
    options.sampling.seed += 1;  // a different draw per turn, still reproducible from --seed
    auto result = generator.generate(sequence, fresh, options);
    if (!result) {
      std::fprintf(stderr, "\nlayerpack-run: %s\n", result.error().message.c_str());
      if (result.error().code != ErrorCode::invalid_argument) return 1;
      messages.pop_back();  // context full: drop the turn, keep going
      continue;
    }
    std::fflush(stdout);
    messages.push_back({"assistant", result->text});
    print_stats(result.value(), engine, options.sampling);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Arguments a;
  CLI::App app{"layerpack-run: generate text from a layerpack pack"};
  app.add_option("pack", a.pack, "pack directory")->required();
  app.add_option("-p,--prompt", a.prompt, "prompt text (without it: chat on a terminal, else stdin)");
  app.add_option("--prompt-ids", a.prompt_ids, "prompt as comma-separated token ids (no tokenizer needed)");
  app.add_option("-n,--max-tokens", a.max_new_tokens, "most tokens to generate")->check(CLI::PositiveNumber);
  app.add_flag("--chat", a.chat, "wrap the prompt in the model's chat template");
  app.add_option("--system", a.system, "system message (chat)");
  app.add_option("--temp,--temperature", a.temperature, "sampling temperature; 0 is greedy")->check(CLI::NonNegativeNumber);
  app.add_option("--top-k", a.top_k, "keep the k most likely tokens (0: off)");
  app.add_option("--top-p", a.top_p, "nucleus sampling mass (1: off)")->check(CLI::Range(0.0f, 1.0f));
  app.add_option("--min-p", a.min_p, "drop tokens below min-p x the top probability (0: off)")
      ->check(CLI::Range(0.0f, 1.0f));
  app.add_option("--repeat-penalty", a.repeat_penalty, "repetition penalty (1: off)")->check(CLI::PositiveNumber);
  app.add_option("--seed", a.seed, "random seed (same seed, same output)");
  app.add_option("--stop", a.stop, "stop when the text contains this string (repeatable)");
  app.add_flag("--ignore-eos", a.ignore_eos, "keep generating past end-of-sequence tokens");
  app.add_option("--backend", a.backend, "cpu, cuda or auto")->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  app.add_option("--threads", a.threads, "CPU threads (0: all cores)");
  app.add_option("--context", a.context, "context length in tokens (default: model maximum, at most 4096)");
  app.add_option("--layer-budget", a.layer_budget,
                 "memory for layer buffers, e.g. 2GiB; smaller than the model streams layers through a ring");
  app.add_option("--vram", a.vram,
                 "cap on GPU memory for everything the runtime allocates, e.g. 8GiB (default: free memory minus a "
                 "margin); layers that do not fit stream through a ring of slots");
  app.add_option("--host-cache", a.host_cache,
                 "pinned host memory keeping streamed layers after their first read, e.g. 48GiB (later passes: one "
                 "DMA per layer, no file read)");
  app.add_option("--batch-file", a.batch_file, "file with one prompt per line, decoded together");
  app.add_option("--read-threads", a.read_threads, "reads in flight per layer payload")->check(CLI::Range(1, 64));
  app.add_option("--ring-slots", a.ring_slots, "ring slots for streamed layers (0: automatic)")
      ->check(CLI::Range(0, 16));
  app.add_option(
         "--max-batch-rows", a.max_batch_rows,
         "most token rows a layer computes at once (prefill chunk; 0: automatic, up to 2048 on a GPU that "
         "holds every layer, else 256); a prompt of one sequence still streams each layer once per pass of up to 4096 "
         "rows on CUDA")
      ->check(CLI::Range(0, 4096));
  app.add_flag("--direct-io", a.direct_io, "read layer payloads with O_DIRECT (bypass the page cache)");
  app.add_flag("--json", a.json, "print one JSON object (text, ids, statistics) instead of streaming text");
  app.add_flag("--verify-hashes", a.verify_hashes, "check every payload's XXH3-64 as it is read");
  app.add_flag("-v,--verbose", a.verbose, "print the model, backend and layer plan");
  CLI11_PARSE(app, argc, argv);

  EngineOptions options;
  options.backend = a.backend;
  options.backend_options.threads = a.threads;
  options.verify_hashes = a.verify_hashes;
  options.direct_io = a.direct_io;
  options.context_length = a.context;
  options.read_threads = a.read_threads;
  options.ring_slots = a.ring_slots;
  options.max_batch_rows = a.max_batch_rows;
  if (!a.layer_budget.empty()) {
    auto budget = parse_size(a.layer_budget);
    if (!budget) return fail(budget.error());
    options.slot_budget = budget.value();
  }
  if (!a.vram.empty()) {
    auto budget = parse_size(a.vram);
    if (!budget) return fail(budget.error());
    if (budget.value() == 0) return fail("--vram must be more than 0");
    options.vram_budget = budget.value();
  }
  if (!a.host_cache.empty()) {
    auto bytes = parse_size(a.host_cache);
    if (!bytes) return fail(bytes.error());
    options.host_cache_bytes = bytes.value();
  }

  // Tokenizer first: a pack whose tokenizer is unusable is rejected before the weights load.
  auto pack_check = ModelPack::open(a.pack);
  if (!pack_check) return fail(pack_check.error());
  std::unique_ptr<Tokenizer> tokenizer;
  const std::string tokenizer_path = pack_check->tokenizer_path();
  if (!tokenizer_path.empty()) {
    auto loaded = Tokenizer::load(tokenizer_path);
    if (!loaded) {
      const std::string& m = loaded.error().message;
      return fail(m.find(tokenizer_path) == std::string::npos ? tokenizer_path + ": " + m : m);
    }
    tokenizer = std::move(loaded.value());
    if (tokenizer->vocab_size() > pack_check->config().vocab_size) {
      return fail(tokenizer_path + ": tokenizer has " + std::to_string(tokenizer->vocab_size()) +
                  " tokens, more than the model's vocabulary of " + std::to_string(pack_check->config().vocab_size));
    }
  }

  if (!a.batch_file.empty()) {
    if (a.prompt || !a.prompt_ids.empty()) return fail("--batch-file replaces -p and --prompt-ids");
    if (!tokenizer) return fail(a.pack + ": --batch-file needs the pack's tokenizer.lpk");
    auto lines = read_prompt_lines(a.batch_file);
    if (!lines) return fail(lines.error());
    std::vector<std::vector<int32_t>> prompts;
    size_t longest = 0;
    for (const std::string& line : lines.value()) {
      std::vector<int32_t> ids;
      if (a.chat || a.system) {
        std::vector<ChatMessage> messages;
        if (a.system) messages.push_back({"system", *a.system});
        messages.push_back({"user", line});
        auto rendered = tokenizer->apply_chat_template(messages, true);
        if (!rendered) return fail(tokenizer_path + ": " + rendered.error().message);
        ids = tokenizer->encode(rendered.value(), false);
      } else {
        ids = tokenizer->encode(line, true);
      }
      longest = std::max(longest, ids.size());
      prompts.push_back(std::move(ids));
    }
    options.max_sequences = static_cast<uint32_t>(prompts.size());
    if (options.context_length == 0) {
      // Every sequence holds its prompt and its tokens; no more, so the KV cache of
      // the whole batch stays small enough for the budget.
      const uint64_t model_max = pack_check->config().max_position_embeddings
                                     ? pack_check->config().max_position_embeddings
                                     : 4096;
      const uint64_t needed = (longest + a.max_new_tokens + 63) / 64 * 64;
      options.context_length = static_cast<uint32_t>(std::min<uint64_t>(model_max, needed));
    }
    auto engine_result = Engine::open(a.pack, options);
    if (!engine_result) return fail(engine_result.error());
    Engine& engine = *engine_result.value();
    if (a.verbose) std::fprintf(stderr, "%s", engine.describe().c_str());
    GenerationOptions generation;
    generation.max_new_tokens = a.max_new_tokens;
    generation.sampling = sampling_from(a, engine.pack().manifest().generation);
    if (!a.ignore_eos) generation.eos_ids = eos_ids_for(engine, tokenizer.get());
    generation.stop_strings = a.stop;
    BatchGenerationStats stats;
    const double generate_start = seconds_since_process_start();
    auto results = generate_batch(engine, tokenizer.get(), prompts, generation, &stats);
    if (!results) return fail(results.error());
    if (a.json) {
      nlohmann::json list = nlohmann::json::array();
      for (size_t i = 0; i < results->size(); ++i) {
        const GenerationResult& r = (*results)[i];
        list.push_back({{"prompt", lines.value()[i]},
                        {"prompt_ids", prompts[i]},
                        {"generated_ids", r.tokens},
                        {"text", r.text},
                        {"stop_reason", stop_reason_name(r.stop_reason)}});
      }
      nlohmann::json out = {{"pack", a.pack},
                            {"backend", engine.backend().name()},
                            {"backend_description", engine.backend().description()},
                            {"seed", generation.sampling.seed},
                            {"results", list},
                            {"stats",
                             {{"sequences", stats.sequences},
                              {"prompt_tokens", stats.prompt_tokens},
                              {"generated_tokens", stats.generated_tokens},
                              {"prefill_seconds", stats.prefill_seconds},
                              {"decode_passes", stats.decode_passes},
                              {"decode_tokens", stats.decode_tokens},
                              {"decode_seconds", stats.decode_seconds},
                              {"decode_tokens_per_second", stats.decode_tokens_per_second()},
                              {"decode_seconds_per_pass", stats.decode_seconds_per_pass()},
                              {"decode_bytes_read", stats.decode_bytes_read},
                              {"decode_bytes_from_host_cache", stats.decode_bytes_from_host_cache},
                              {"decode_bytes_uploaded", stats.decode_bytes_uploaded},
                              {"peak_rss_bytes", peak_rss_bytes()}}},
                            {"startup", startup_json(engine, generate_start, stats.prefill_seconds)},
                            {"memory", memory_json(engine)}};
      std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
      for (size_t i = 0; i < results->size(); ++i) {
        std::printf("=== prompt %zu: %s\n%s\n", i + 1, lines.value()[i].c_str(), (*results)[i].text.c_str());
      }
      std::fflush(stdout);
      std::fprintf(stderr,
                   "\n[layerpack-run] batch of %u: %u prompt tokens prefilled in %.3f s; %u tokens in %u decode passes "
                   "(%.3f s): %.2f tokens/s over all sequences, %.4f s per pass; peak RSS %.1f MiB; backend %s\n",
                   stats.sequences, stats.prompt_tokens, stats.prefill_seconds, stats.decode_tokens, stats.decode_passes,
                   stats.decode_seconds, stats.decode_tokens_per_second(), stats.decode_seconds_per_pass(),
                   peak_rss_bytes() / 1048576.0, engine.backend().name().c_str());
    }
    if (a.verbose || !a.json) {
      print_traffic(stats.decode_passes, stats.decode_bytes_read, stats.decode_bytes_from_host_cache,
                    stats.decode_bytes_uploaded, engine);
    }
    return 0;
  }

  auto engine_result = Engine::open(a.pack, options);
  if (!engine_result) return fail(engine_result.error());
  Engine& engine = *engine_result.value();
  if (a.verbose) std::fprintf(stderr, "%s", engine.describe().c_str());
  Generator generator(engine, tokenizer.get());

  GenerationOptions generation;
  generation.max_new_tokens = a.max_new_tokens;
  generation.sampling = sampling_from(a, engine.pack().manifest().generation);
  if (!a.ignore_eos) generation.eos_ids = eos_ids_for(engine, tokenizer.get());
  generation.stop_strings = a.stop;
  if (!generation.stop_strings.empty() && !tokenizer) return fail(a.pack + ": --stop needs a tokenizer.lpk");

  const bool have_prompt = a.prompt.has_value() || !a.prompt_ids.empty();
  if (!have_prompt && isatty(STDIN_FILENO)) {
    if (!tokenizer) return fail(a.pack + ": interactive chat needs the pack's tokenizer.lpk");
    if (a.json) return fail("--json needs a prompt (-p or --prompt-ids)");
    generation.on_text = [](const std::string& piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    };
    return interactive_chat(a, engine, generator, *tokenizer, generation);
  }

  std::vector<int32_t> prompt_ids;
  if (!a.prompt_ids.empty()) {
    auto ids = parse_ids(a.prompt_ids);
    if (!ids) return fail(ids.error());
    prompt_ids = ids.value();
  } else {
    std::string text;
    if (a.prompt) {
      text = *a.prompt;
    } else {
      text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    }
    if (!tokenizer) return fail(a.pack + ": the pack has no tokenizer.lpk; give the prompt with --prompt-ids");
    if (a.chat || a.system) {
      std::vector<ChatMessage> messages;
      if (a.system) messages.push_back({"system", *a.system});
      messages.push_back({"user", text});
      auto rendered = tokenizer->apply_chat_template(messages, true);
      if (!rendered) return fail(tokenizer_path + ": " + rendered.error().message);
      prompt_ids = tokenizer->encode(rendered.value(), false);
    } else {
      prompt_ids = tokenizer->encode(text, true);
    }
    if (prompt_ids.empty()) return fail("the prompt encodes to no tokens");
  }
  if (prompt_ids.size() >= engine.context_length()) {
    return fail("prompt of " + std::to_string(prompt_ids.size()) + " tokens does not fit the context of " +
                std::to_string(engine.context_length()) + " tokens (--context, up to the model's " +
                std::to_string(engine.config().max_position_embeddings) + ")");
  }

  if (!a.json) {
    if (tokenizer) {
      generation.on_text = [](const std::string& piece) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
      };
    } else {
      generation.on_token = [](int32_t id) {
        std::printf("%d ", id);
        std::fflush(stdout);
      };
    }
  }
  auto sequence = engine.kv().open_sequence();
  if (!sequence) return fail(sequence.error());
  const double generate_start = seconds_since_process_start();
  auto result = generator.generate(sequence.value(), prompt_ids, generation);
  if (!result) return fail(result.error());
  if (a.json) {
    nlohmann::json out = {{"pack", a.pack},
                          {"backend", engine.backend().name()},
                          {"backend_description", engine.backend().description()},
                          {"seed", generation.sampling.seed},
                          {"prompt_ids", prompt_ids},
                          {"generated_ids", result->tokens},
                          {"text", result->text},
                          {"stop_reason", stop_reason_name(result->stop_reason)},
                          {"stats", stats_json(result.value())},
                          {"startup", startup_json(engine, generate_start, result->stats.prefill_seconds)},
                          {"memory", memory_json(engine)}};
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
    print_stats(result.value(), engine, generation.sampling);
    const OpenTimings& t = engine.open_timings();
    std::fprintf(stderr,
                 "[layerpack-run] first token %.3f s after process start; open %.3f s (pack %.3f, device %.3f, "
                 "backend %.3f, waiting for the embedding %.3f, slots %.3f, resident layers %.3f)\n",
                 generate_start + result->stats.prefill_seconds, t.total, t.pack, t.device, t.backend,
                 t.embedding_wait + t.host_units, t.slots, t.resident);
  }
  if (a.verbose || !a.json) {
    const GenerationStats& s = result->stats;
    print_traffic(s.decode_passes, s.decode_bytes_read, s.decode_bytes_from_host_cache, s.decode_bytes_uploaded,
                  engine);
  }
  return 0;
}
