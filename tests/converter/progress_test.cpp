// ProgressReporter: formatting, the bar text, and silence off a terminal.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "layerpack/progress.h"

namespace layerpack {
namespace {

TEST(Progress, FormatsBytesDurationsAndRates) {
  EXPECT_EQ(format_bytes(512), "512 B");
  EXPECT_EQ(format_bytes(1500), "1.5 kB");
  EXPECT_EQ(format_bytes(2500000), "2.5 MB");
  EXPECT_EQ(format_bytes(39870000000ull), "39.87 GB");
  EXPECT_EQ(format_duration(0.84), "0.8s");
  EXPECT_EQ(format_duration(245), "4m05s");
  EXPECT_EQ(format_duration(3720), "1h02m");
  EXPECT_EQ(format_rate(1.234e9), "1.23 GB/s");
  EXPECT_EQ(format_rate(5e6), "5 MB/s");
}

std::string captured(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string out;
  char buf[256];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) out.append(buf, n);
  return out;
}

TEST(Progress, BarShowsItemsBytesRateAndEta) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    ProgressReporter p("converting", "layers", 82, 4000000000ull, ProgressReporter::Mode::bar, f);
    p.advance(41, 2000000000ull);
    const std::string line = p.render_line();
    EXPECT_NE(line.find("41/82 layers"), std::string::npos) << line;
    EXPECT_NE(line.find("2.00 GB/4.00 GB"), std::string::npos) << line;
    EXPECT_NE(line.find(" 50%"), std::string::npos) << line;
    EXPECT_NE(line.find("/s"), std::string::npos) << line;
    EXPECT_NE(line.find("ETA"), std::string::npos) << line;
    p.message("warning: something");
    p.finish("done: summary");
  }
  const std::string out = captured(f);
  std::fclose(f);
  EXPECT_NE(out.find("\r"), std::string::npos) << "bar not drawn";
  EXPECT_NE(out.find("warning: something\n"), std::string::npos);
  EXPECT_NE(out.find("done: summary\n"), std::string::npos);
}

TEST(Progress, NoBarOffATerminalAndNothingWhenQuiet) {
  std::FILE* f = std::tmpfile();  // not a terminal
  {
    ProgressReporter p("converting", "layers", 2, 100, ProgressReporter::Mode::automatic, f);
    EXPECT_FALSE(p.draws_bar());
    p.advance(2, 100);
    p.finish("summary line");
  }
  EXPECT_EQ(captured(f), "summary line\n");
  std::fclose(f);
  std::FILE* q = std::tmpfile();
  {
    ProgressReporter p("converting", "layers", 2, 100, ProgressReporter::Mode::quiet, q);
    p.advance(2, 100);
    p.message("warning");
    p.finish("summary line");
  }
  EXPECT_EQ(captured(q), "");
  std::fclose(q);
}

}  // namespace
}  // namespace layerpack
