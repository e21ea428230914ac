#!/usr/bin/env bash
# compute-sanitizer over the GPU tests and a short decode, on the GPU machine, after
# tools/gpu/build.sh BUILD. One log per run in OUT_DIR; a line per run on stdout.
#   tools/gpu/sanitize.sh BUILD OUT_DIR [PACK]
# PACK: a small pack for the decode runs (e.g. `layerpack-convert --synthetic <SmolLM2
# config.json> --tokenizer <its dir> --blocksize 32 -o PACK`); without it they are skipped.
# Exit status: non-zero when any run but racecheck reports an error or times out.
# Measured (H200, twenty-fifth session, the same commands from the session's call scripts,
# not yet as this script): memcheck 0 errors on the chain, attention, sampling and
# elementwise tests, runtime_cuda_test and a decode; synccheck 0 errors on the matvec,
# chain, attention and sampling tests; initcheck 0 errors on the decode; racecheck reports hazards in nf4_chain_kernel between
# the scale warp's scale stores and the consumers' scale loads (ordered by the slot's full
# mbarrier, which the scale warp's lane 0 arrives on after __syncwarp) and between a
# norm op's x stores and the x column loads (ordered by the consumers' named barrier).
# The first kind is the tool's: racecheck_patterns' race-free one_lane_arrives kernel
# (the scale warp's pattern) draws the same reports (H200, twenty-seventh session); the
# second is not explained yet (kernels/NOTES.md, twenty-fifth and twenty-seventh sessions).
set -uo pipefail
build=$1 out=$2 pack=${3:-}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
[ -x "$sanitizer" ] || { echo "sanitize.sh: compute-sanitizer not found" >&2; exit 1; }
tests=$build/tests/kernels
failures=0
run() {  # run NAME SECONDS TOOL COMMAND...
  local name=$1 seconds=$2 tool=$3; shift 3
  timeout "$seconds" "$sanitizer" --tool "$tool" --error-exitcode 9 --print-limit 50 "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  # racecheck's chain reports are expected (above): shown, not counted.
  [ $rc -eq 0 ] || [ "$tool" = racecheck ] || failures=$((failures + 1))
  echo "$name ($tool): rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$name.txt" | tail -1)"
}
for t in matvec chain elementwise attention sampling; do
  filter=()
  # The chain's full suite runs minutes under the sanitizer: its small cases.
  [ $t = chain ] && filter=(--gtest_filter='NF4Chain.MatchesReferenceAndLaunches:NF4Chain.Blocksize32:NF4Chain.LogitsInFp32AfterAFoldedNorm:NF4Chain.RowsEndingInsideAChunk:NF4Chain.RefusesWhatItCannotRun')
  run "memcheck_$t" 240 memcheck "$tests/test_kernels_$t" "${filter[@]}"
  run "synccheck_$t" 240 synccheck "$tests/test_kernels_$t" "${filter[@]}"
done
run memcheck_runtime 300 memcheck "$build/tests/runtime/runtime_cuda_test"
# First the race-free patterns the chain uses (tools/gpu/racecheck_patterns.cu): a hazard
# reported there is the tool's, which tells the chain's reports apart.
patterns=$out/racecheck_patterns
if nvcc -O2 -arch=sm_90a -lineinfo -I"$(dirname "$0")/../.." "$(dirname "$0")/racecheck_patterns.cu" -o "$patterns" \
  >"$out/racecheck_patterns_build.txt" 2>&1; then
  run racecheck_patterns 60 racecheck --racecheck-report all "$patterns"
else
  echo "racecheck_patterns: build failed ($out/racecheck_patterns_build.txt)"; failures=$((failures + 1))
fi
run racecheck_chain 240 racecheck "$tests/test_kernels_chain" --gtest_filter='NF4Chain.MatchesReferenceAndLaunches'
if [ -n "$pack" ]; then
  ids=$(python3 -c "import random; random.seed(1); print(','.join(str(random.randrange(100, 49000)) for _ in range(16)))")
  for tool in memcheck initcheck; do
    run "${tool}_decode" 240 $tool "$build/runtime/layerpack-run" "$pack" --prompt-ids "$ids" -n 8 --temp 0 --ignore-eos --backend cuda --json
  done
fi
echo "sanitize.sh: $failures run(s) with findings or errors; logs in $out"
[ $failures -eq 0 ]
