// layerpack-convert: Hugging Face checkpoint (or synthetic model) -> pack.
// Exit status: 0 success, 1 conversion failed (message names file and
// problem), 2 bad command line.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "layerpack/converter.h"
#include "layerpack/progress.h"

namespace {

std::string split_list_item(std::string s) {
  while (!s.empty() && s.front() == ' ') s.erase(s.begin());
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

std::string human_summary(const layerpack::ConvertSummary& s, bool synthetic) {
  using layerpack::format_bytes;
  std::ostringstream out;
  const auto& c = s.manifest.config;
  char line[512];
  std::snprintf(line, sizeof line, "wrote %s: %s, %u layers, %.2f B parameters\n", s.output_dir.c_str(),
                c.architecture.c_str(), c.num_layers, s.parameter_count / 1e9);
  out << line;
  std::snprintf(line, sizeof line, "  pack %s (%.2f bits/parameter overall; linear weights %.3f bits/parameter)\n",
                format_bytes(s.output_bytes).c_str(), s.bits_per_parameter, s.matrix_bits_per_parameter);
  out << line;
  if (synthetic) {
    std::snprintf(line, sizeof line, "  synthetic weights, %s written in %s (%s)\n",
                  format_bytes(s.output_bytes).c_str(), layerpack::format_duration(s.seconds).c_str(),
                  layerpack::format_rate(s.output_gb_per_s * 1e9).c_str());
  } else {
    std::snprintf(line, sizeof line, "  read %s in %s (%s input), wrote %s\n", format_bytes(s.input_bytes).c_str(),
                  layerpack::format_duration(s.seconds).c_str(),
                  layerpack::format_rate(s.input_gb_per_s * 1e9).c_str(),
                  layerpack::format_rate(s.output_gb_per_s * 1e9).c_str());
  }
  out << line;
  if (s.files_resumed > 0) out << "  resumed: kept " << s.files_resumed << " layer files that verified\n";
  std::string text = out.str();
  if (!text.empty() && text.back() == '\n') text.pop_back();
  return text;
}

nlohmann::json summary_json(const layerpack::ConvertSummary& s) {
  const auto& c = s.manifest.config;
  nlohmann::json files = nlohmann::json::array();
  for (const auto& f : s.manifest.files) files.push_back({{"name", f.name}, {"size", f.size}});
  return {{"ok", true},
          {"output", s.output_dir},
          {"architecture", c.architecture},
          {"layers", c.num_layers},
          {"parameters", s.parameter_count},
          {"linear_parameters", s.matrix_parameter_count},
          {"input_bytes", s.input_bytes},
          {"output_bytes", s.output_bytes},
          {"bits_per_parameter", s.bits_per_parameter},
          {"linear_bits_per_parameter", s.matrix_bits_per_parameter},
          {"seconds", s.seconds},
          {"input_gb_per_s", s.input_gb_per_s},
          {"output_gb_per_s", s.output_gb_per_s},
          {"files_written", s.files_written},
          {"files_resumed", s.files_resumed},
          {"prequantized", s.manifest.quantization.prequantized},
          {"warnings", s.warnings},
          {"files", files}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Convert a Hugging Face checkpoint (safetensors, Llama/Mistral/Qwen2/Qwen3) into a layerpack pack"};
  app.footer(
      "Exit status: 0 success, 1 conversion failed, 2 bad command line.\n"
      "Examples:\n"
      "  layerpack-convert ~/models/Llama-3.2-1B -o llama-3.2-1b.pack\n"
      "  layerpack-convert --synthetic llama-3.1-70b --tokenizer tokenizers/llama3 -o synth-70b.pack");
  layerpack::ConvertOptions options;
  std::string keep;
  bool no_double_quant = false, quiet = false, json_output = false;
  app.add_option("source", options.source, "checkpoint directory (config.json + *.safetensors)");
  app.add_option("-o,--output", options.output_dir, "pack directory to write")->required();
  app.add_option("--blocksize", options.blocksize, "NF4 block size (power of two, 32..4096)")
      ->default_val(64);
  app.add_flag("--no-double-quant", no_double_quant, "store absmax as f32 instead of 8-bit double quantization");
  app.add_option("--keep", keep, "comma-separated matrix roles kept in bf16, e.g. lm_head,down_proj");
  app.add_option("--threads", options.threads, "quantization threads (default: all cores)");
  app.add_flag("--resume", options.resume, "finish an interrupted conversion, keeping layer files that verify");
  app.add_flag("--force", options.force, "replace an existing pack in the output directory");
  app.add_flag("-q,--quiet", quiet, "no progress bar and no summary");
  app.add_flag("--json", json_output, "print the summary (or the error) as JSON on stdout");
  app.add_option("--synthetic", options.synthetic,
                 "write random weights instead of converting: preset (llama-3.1-70b, llama-3-8b, tiny) or config.json");
  app.add_option("--tokenizer", options.tokenizer_dir, "directory with tokenizer.json / tokenizer.model to use");
  app.add_option("--seed", options.synthetic_seed, "random seed for --synthetic");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  if (options.source.empty() == options.synthetic.empty()) {
    std::fprintf(stderr, "layerpack-convert: give either a checkpoint directory or --synthetic, not %s\n",
                 options.source.empty() ? "neither" : "both");
    return 2;
  }
  if (options.resume && options.force) {
    std::fprintf(stderr, "layerpack-convert: --resume and --force exclude each other\n");
    return 2;
  }
  options.double_quant = !no_double_quant;
  std::stringstream keep_list(keep);
  for (std::string item; std::getline(keep_list, item, ',');) {
    item = split_list_item(item);
    if (!item.empty()) options.keep_roles.push_back(item);
  }
  // Reproducible output: SOURCE_DATE_EPOCH fixes the manifest's timestamp.
  if (const char* epoch = std::getenv("SOURCE_DATE_EPOCH")) {
    std::time_t t = static_cast<std::time_t>(std::strtoll(epoch, nullptr, 10));
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    options.created_utc = buf;
  }

  using Mode = layerpack::ProgressReporter::Mode;
  layerpack::ProgressReporter progress("converting", "layers", 0, 0, quiet ? Mode::quiet : Mode::automatic);
  options.progress = &progress;
  auto result = layerpack::convert_checkpoint(options);
  if (!result.ok()) {
    progress.finish("");
    const layerpack::Error& e = result.error();
    std::fprintf(stderr, "layerpack-convert: error: %s\n", e.to_string().c_str());
    if (json_output) {
      nlohmann::json j = {{"ok", false},
                          {"error", {{"code", layerpack::error_code_name(e.code)}, {"message", e.message}}}};
      std::cout << j.dump(2) << std::endl;
    }
    return 1;
  }
  progress.finish(human_summary(result.value(), !options.synthetic.empty()));
  if (json_output) std::cout << summary_json(result.value()).dump(2) << std::endl;
  return 0;
}
