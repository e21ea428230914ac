#!/usr/bin/env bash
# All fault injection, with sanitizer-built tools: kill -9 during conversion
# (+ --resume), disk full during conversion and import (tmpfs, needs root),
# single-bit flips caught by verify and the runtime. Builds layerpack-convert,
# layerpack-pack and layerpack-run in the ASan+UBSan build (build-asan, the
# directory tools/sanitize.sh uses) if needed. Non-zero exit on any failure.
#   LAYERPACK_FAULT_BUILD_DIR   build directory (default build-asan)
#   KILL_TRIALS (50 per source, 2 sources), FLIP_TRIALS (1000), FILL_TRIALS (40)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LAYERPACK_FAULT_BUILD_DIR:-build-asan}
if [[ ! -f $build/build.ninja ]]; then
  cmake -S . -B "$build" -G Ninja -DLAYERPACK_CUDA=OFF -DLAYERPACK_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g1" >/dev/null
fi
cmake --build "$build" --target layerpack-convert layerpack-pack layerpack-run -j "$(nproc)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
status=0 summary=()
run() {
  local name=$1; shift
  local t0=$(date +%s) rc=0
  python3 "$@" >"$build/fault-$name.log" 2>&1 || rc=$?
  summary+=("$(printf '%-12s %5ss  %s' "$name" $(( $(date +%s) - t0 )) "$(grep '^RESULT' "$build/fault-$name.log" || echo "exit $rc")")")
  if [[ $rc != 0 ]]; then status=1; grep -E '^FAIL|Error|error' "$build/fault-$name.log" | head -20 || true; fi
}
run kill tools/fault_injection/kill_during_convert.py --build "$build" --trials "${KILL_TRIALS:-50}"
if [[ $(id -u) == 0 ]]; then
  run disk_full tools/fault_injection/disk_full.py --build "$build" --filling "${FILL_TRIALS:-40}"
else
  summary+=("disk_full    skipped: needs root to mount a tmpfs"); status=1
fi
run bit_flip tools/fault_injection/bit_flip.py --build "$build" --trials "${FLIP_TRIALS:-1000}"
printf '%s\n' "${summary[@]}"
exit $status
