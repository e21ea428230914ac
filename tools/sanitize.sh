#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer build of the whole CPU test
# suite (LAYERPACK_SANITIZE=ON, no CUDA), then ctest -L cpu. Any sanitizer
# report fails the test that triggered it (UBSan does not recover; leaks are
# checked at exit), so a clean run means no report anywhere.
#   LAYERPACK_SANITIZE_BUILD_DIR   build directory (default build-asan)
#   LAYERPACK_SANITIZE_LABELS      ctest label regex (default cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LAYERPACK_SANITIZE_BUILD_DIR:-build-asan}
start=$(date +%s)
# -O1 -g1: the usual sanitizer setting (fast enough for the numeric tests, line numbers in
# reports; gcc at -O2 -g with ASan takes minutes per nlohmann-json file on 2 cores).
# No -DNDEBUG: asserts guard API misuse, and a sanitizer build should trip them too.
cmake -S . -B "$build" -G Ninja -DLAYERPACK_CUDA=OFF -DLAYERPACK_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g1" >/dev/null
cmake --build "$build" -j "$(nproc)"
built=$(date +%s)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
ctest --test-dir "$build" -L "${LAYERPACK_SANITIZE_LABELS:-cpu}" --output-on-failure -j "$(nproc)" || status=$?
end=$(date +%s)
# A test can pass while a sanitizer printed to its output in a child process; look for that too.
if grep -lE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:" "$build"/Testing/Temporary/LastTest*.log >/dev/null 2>&1; then
  echo "tools/sanitize.sh: sanitizer report in $(grep -lE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$build"/Testing/Temporary/LastTest*.log)"
  grep -nE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:" "$build"/Testing/Temporary/LastTest*.log | head -20
  status=1
fi
echo "sanitize: build $((built - start))s, tests $((end - built))s, total $((end - start))s, ctest exit $status"
exit $status
