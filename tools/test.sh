#!/usr/bin/env bash
# Sets up, builds and runs the test suite. GPU tests skip (ctest: "Skipped",
# with the reason) where no CUDA device is present.
#   LAYERPACK_CUDA_ARCHS   CUDA architectures for this build (default 90a here,
#                          to keep CI fast; the normal build covers 75..120)
#   LAYERPACK_TEST_LABELS  ctest label regex (default "cpu|gpu")
#   LAYERPACK_TEST_HARDENING=0  skip the sanitizer build and the short fuzz runs
#   LAYERPACK_FUZZ_SECONDS fuzzing time per harness (default 30)
#   LAYERPACK_FUZZ_SEED    libFuzzer seed (default 1: the verdict is reproducible;
#                          new inputs come from campaigns, tools/fuzz.sh without --seed)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PATH="/usr/local/cuda/bin:$PATH"
build=${LAYERPACK_BUILD_DIR:-build-test}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="${LAYERPACK_CUDA_ARCHS:-90a}"
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" -L "${LAYERPACK_TEST_LABELS:-cpu|gpu}" --output-on-failure -j "$(nproc)"
if ! nvidia-smi -L >/dev/null 2>&1; then
  # ctest only says "Skipped"; print the GPU tests' own reason once.
  ctest --test-dir "$build" -L gpu -V 2>/dev/null | grep -m1 -o "SKIPPED: .*" || true
fi
if [ "${LAYERPACK_TEST_HARDENING:-1}" = 1 ]; then
  # The CPU suite again under AddressSanitizer + UndefinedBehaviorSanitizer, then a
  # short run of every libFuzzer harness (seeds and regressions replayed first).
  bash tools/sanitize.sh
  bash tools/fuzz.sh --seconds "${LAYERPACK_FUZZ_SECONDS:-30}" --seed "${LAYERPACK_FUZZ_SEED:-1}"
fi
