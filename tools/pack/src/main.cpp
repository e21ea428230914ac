// layerpack-pack: hand packs around.
//   export  PACK -o ARCHIVE|-          pack -> one zstd archive stream
//   import  ARCHIVE|- -o PACK [--resume]  archive -> pack, hashes checked as it streams
//   verify  PACK [--json]              whole-pack check; exit 0 only when all is well
//   inspect PACK [--json]              model, quantization, files, provenance
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "inspect.h"
#include "layerpack/archive.h"
#include "layerpack/format.h"
#include "layerpack/progress.h"

namespace {

using json = nlohmann::json;
using namespace layerpack;

int fail(const Error& error) {
  std::fprintf(stderr, "layerpack-pack: %s\n", error.to_string().c_str());
  return 1;
}

// Adapts the archive callback (bytes so far, current file) to ProgressReporter.
struct ProgressBridge {
  ProgressReporter& reporter;
  uint64_t last_bytes = 0;
  std::string last_file;
  void operator()(uint64_t done, uint64_t, const std::string& file) {
    uint64_t items = 0;
    if (file != last_file) {
      if (!last_file.empty()) items = 1;
      last_file = file;
    }
    reporter.advance(items, done - last_bytes);
    last_bytes = done;
  }
};

double ratio(uint64_t a, uint64_t b) { return b ? static_cast<double>(a) / static_cast<double>(b) : 0.0; }
double megabytes_per_second(uint64_t bytes, double seconds) { return seconds > 0 ? bytes / 1e6 / seconds : 0.0; }

int run_export(const std::string& pack, const std::string& out, ExportOptions options, bool as_json, bool quiet) {
  auto manifest = read_manifest(pack);
  if (!manifest) return fail(manifest.error());
  uint64_t total = 0;
  for (const auto& f : manifest->files) total += f.size;
  ProgressReporter progress("export", "files", manifest->files.size() + 1, total,
                            quiet ? ProgressReporter::Mode::quiet : ProgressReporter::Mode::automatic);
  ProgressBridge bridge{progress, 0, {}};
  options.progress = [&](uint64_t d, uint64_t t, const std::string& f) { bridge(d, t, f); };
  bool to_stdout = out == "-";
  if (to_stdout && isatty(STDOUT_FILENO))
    return fail(make_error(ErrorCode::invalid_argument, "refusing to write a binary archive to a terminal; "
                                                         "redirect stdout or use -o FILE"));
  auto result = to_stdout ? export_pack_to_fd(pack, STDOUT_FILENO, "<stdout>", options)
                          : export_pack(pack, out, options);
  if (!result) {
    progress.finish("");
    return fail(result.error());
  }
  const ExportSummary& s = *result;
  char line[512];
  std::snprintf(line, sizeof line, "exported %zu files, %s -> %s (%.3fx smaller), %s in %s, %s (zstd level %d)",
                s.files.size(), format_bytes(s.file_bytes).c_str(), format_bytes(s.archive_bytes).c_str(),
                ratio(s.file_bytes, s.archive_bytes), to_stdout ? "<stdout>" : out.c_str(),
                format_duration(s.seconds).c_str(), format_rate(s.file_bytes / std::max(s.seconds, 1e-9)).c_str(),
                options.level);
  progress.finish(line);
  if (as_json) {
    json j{{"pack", pack},
           {"archive", to_stdout ? "-" : out},
           {"files", s.files.size()},
           {"file_bytes", s.file_bytes},
           {"archive_bytes", s.archive_bytes},
           {"compression_ratio", ratio(s.file_bytes, s.archive_bytes)},
           {"seconds", s.seconds},
           {"megabytes_per_second", megabytes_per_second(s.file_bytes, s.seconds)},
           {"level", options.level}};
    std::fprintf(to_stdout ? stderr : stdout, "%s\n", j.dump(2).c_str());
  }
  return 0;
}

int run_import(const std::string& archive, const std::string& pack, ImportOptions options, bool as_json,
               bool quiet) {
  ProgressReporter progress("import", "files", 0, 0,
                            quiet ? ProgressReporter::Mode::quiet : ProgressReporter::Mode::automatic);
  ProgressBridge bridge{progress, 0, {}};
  options.on_listing = [&](const std::vector<ArchiveFileRecord>& files) {
    uint64_t total = 0;
    for (const auto& f : files) total += f.size;
    progress.set_totals(files.size(), total);
  };
  options.progress = [&](uint64_t d, uint64_t t, const std::string& f) { bridge(d, t, f); };
  if (archive == "-" && isatty(STDIN_FILENO))
    return fail(make_error(ErrorCode::invalid_argument, "standard input is a terminal, not an archive; pipe one in "
                                                         "(… | layerpack-pack import - -o PACK) or name the file"));
  auto result = import_archive(archive, pack, options);
  if (!result) {
    progress.finish("");
    int rc = fail(result.error());
    std::error_code ec;
    bool has_files = std::filesystem::is_directory(pack, ec) && !std::filesystem::is_empty(pack, ec);
    if (has_files && result.error().code != ErrorCode::invalid_argument)
      std::fprintf(stderr,
                   "layerpack-pack: %s holds no manifest, so it is not a pack; files that arrived intact are kept: "
                   "import again with --resume to continue\n",
                   pack.c_str());
    return rc;
  }
  const ImportSummary& s = *result;
  char line[512];
  std::snprintf(line, sizeof line, "imported %zu files (%s) into %s%s in %s, %s; every XXH3-64 checked", s.files.size(),
                format_bytes(s.file_bytes).c_str(), pack.c_str(),
                s.files_skipped ? (", " + std::to_string(s.files_skipped) + " kept from before (resume)").c_str() : "",
                format_duration(s.seconds).c_str(), format_rate(s.file_bytes / std::max(s.seconds, 1e-9)).c_str());
  progress.finish(line);
  if (as_json) {
    json j{{"archive", archive},
           {"pack", pack},
           {"files", s.files.size()},
           {"files_skipped", s.files_skipped},
           {"file_bytes", s.file_bytes},
           {"bytes_written", s.bytes_written},
           {"archive_bytes", s.archive_bytes},
           {"pack_format_version", std::to_string(s.pack_version_major) + "." + std::to_string(s.pack_version_minor)},
           {"seconds", s.seconds},
           {"megabytes_per_second", megabytes_per_second(s.file_bytes, s.seconds)}};
    std::printf("%s\n", j.dump(2).c_str());
  }
  return 0;
}

int run_verify(const std::string& pack, bool as_json, bool check_hashes) {
  VerifyOptions options;
  options.check_hashes = check_hashes;
  VerifyReport report = verify_pack(pack, options);
  if (as_json) {
    json problems = json::array();
    for (const auto& p : report.problems)
      problems.push_back({{"file", p.file}, {"code", error_code_name(p.error.code)}, {"message", p.error.message}});
    json j{{"pack", pack},
           {"ok", report.ok()},
           {"files_checked", report.files_checked},
           {"bytes_hashed", report.bytes_hashed},
           {"problems", problems}};
    std::printf("%s\n", j.dump(2).c_str());
  } else if (report.ok()) {
    std::printf("%s: OK, %llu files checked, %s hashed\n", pack.c_str(),
                static_cast<unsigned long long>(report.files_checked), format_bytes(report.bytes_hashed).c_str());
  } else {
    std::printf("%s: %zu problem(s) (%llu files checked):\n", pack.c_str(), report.problems.size(),
                static_cast<unsigned long long>(report.files_checked));
    for (const auto& p : report.problems)
      std::printf("  %s: %s\n", p.file.c_str(), p.error.to_string().c_str());
  }
  return report.ok() ? 0 : 1;
}

int run_inspect(const std::string& pack, bool as_json) {
  auto summary = inspect_pack(pack);
  if (!summary) return fail(summary.error());
  if (as_json)
    std::printf("%s\n", summary->dump(2).c_str());
  else
    print_inspect(*summary, stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A closed pipe (`export -o - | head`) becomes a write error, not a silent death.
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"layerpack-pack: export, import, verify and inspect layerpack packs"};
  app.require_subcommand(1);

  std::string pack, archive, out;
  bool as_json = false, quiet = false, resume = false, no_hashes = false;
  ExportOptions export_options;

  auto* exp = app.add_subcommand("export", "Write a pack as one zstd-compressed archive stream");
  exp->add_option("PACK", pack, "Pack directory")->required();
  exp->add_option("-o,--output", out, "Archive file, or - for standard output")->required();
  exp->add_option("-l,--level", export_options.level, "zstd level (default 1; NF4 data barely compresses)")
      ->capture_default_str();
  exp->add_option("-t,--threads", export_options.threads, "zstd worker threads (0: one per core)")
      ->capture_default_str();
  bool no_check = false;
  exp->add_flag("--no-check", no_check, "Skip the structural verify_pack before exporting (hashes are still checked)");
  exp->add_flag("--json", as_json, "Print a JSON summary (to stderr when the archive goes to stdout)");
  exp->add_flag("-q,--quiet", quiet, "No progress or summary line");

  auto* imp = app.add_subcommand("import", "Unpack an archive into a pack directory, checking every hash");
  imp->add_option("ARCHIVE", archive, "Archive file, or - for standard input")->required();
  imp->add_option("-o,--output", out, "Pack directory to create (new or empty, unless --resume)")->required();
  imp->add_flag("--resume", resume, "Keep files of an interrupted import whose hashes match");
  imp->add_flag("--json", as_json, "Print a JSON summary");
  imp->add_flag("-q,--quiet", quiet, "No progress or summary line");

  auto* ver = app.add_subcommand("verify", "Check a whole pack: headers, bounds, consistency, every hash");
  ver->add_option("PACK", pack, "Pack directory")->required();
  ver->add_flag("--json", as_json, "Print the report as JSON");
  ver->add_flag("--no-hashes", no_hashes, "Skip hashing (structure only)");

  auto* ins = app.add_subcommand("inspect", "Show model, quantization, files and provenance of a pack");
  ins->add_option("PACK", pack, "Pack directory")->required();
  ins->add_flag("--json", as_json, "Print as JSON");

  CLI11_PARSE(app, argc, argv);

  if (exp->parsed()) {
    export_options.check_pack = !no_check;
    return run_export(pack, out, export_options, as_json, quiet);
  }
  if (imp->parsed()) {
    ImportOptions options;
    options.resume = resume;
    return run_import(archive, out, options, as_json, quiet);
  }
  if (ver->parsed()) return run_verify(pack, as_json, !no_hashes);
  return run_inspect(pack, as_json);
}
