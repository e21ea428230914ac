#!/usr/bin/env bash
# Sets up, builds and runs the test suite. GPU tests skip (ctest: "Skipped",
# with the reason) where no CUDA device is present.
#   LAYERPACK_CUDA_ARCHS   CUDA architectures for this build (default 90 here,
#                          to keep CI fast; the normal build covers 75..120)
#   LAYERPACK_TEST_LABELS  ctest label regex (default "cpu|gpu")
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PATH="/usr/local/cuda/bin:$PATH"
build=${LAYERPACK_BUILD_DIR:-build-test}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="${LAYERPACK_CUDA_ARCHS:-90}"
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" -L "${LAYERPACK_TEST_LABELS:-cpu|gpu}" --output-on-failure -j "$(nproc)"
