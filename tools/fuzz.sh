#!/usr/bin/env bash
# Builds the libFuzzer harnesses (tests/fuzz) with clang and
# -fsanitize=fuzzer,address,undefined, replays every committed seed and
# regression input, then fuzzes each harness for a fixed time. Exit status is
# non-zero when any harness crashes, leaks or reports undefined behaviour.
#
#   tools/fuzz.sh --seconds 30 --seed 1   CI (tools/test.sh): the same inputs on every run
#   tools/fuzz.sh --seconds 600 --parallel 2 --nice   long campaign, new inputs each time
#   tools/fuzz.sh fuzz_manifest ...     only these harnesses
# Options:
#   --seconds N    fuzzing time per harness (default 45; 0 replays seeds only)
#   --seed N       libFuzzer's random seed, and start from the committed seeds alone
#                  (the work corpus of earlier runs is emptied): a run explores the same
#                  inputs wherever it runs, a longer or faster one further along the same
#                  path. Without it every run explores new inputs (a campaign).
#   --parallel P   harnesses run at once (default: nproc)
#   --nice         run the fuzzers at nice 19 (shared machines)
#   --build DIR    build directory (default build-fuzz)
#   --no-build     use the harnesses already built in DIR
#   --make-seeds   regenerate tests/fuzz/corpus from real files first
# Findings (crash-*, leak-*, timeout-* inputs) land in DIR/fuzz-findings/<harness>/;
# copy a minimized one into tests/fuzz/regressions/<harness>/ once it is fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=45 parallel=$(nproc) nice_cmd=() build=build-fuzz do_build=1 make_seeds=0 selected=() seed=
while [[ $# -gt 0 ]]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --nice) nice_cmd=(nice -n 19); shift ;;
    --build) build=$2; shift 2 ;;
    --no-build) do_build=0; shift ;;
    --make-seeds) make_seeds=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    fuzz_*) selected+=("$1"); shift ;;
    *) echo "tools/fuzz.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
if [[ $do_build == 1 ]]; then
  sanitize="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
  # Debug keeps asserts (API misuse reached from outside bytes is a bug); -O1 keeps fuzzing fast.
  CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DLAYERPACK_CUDA=OFF -DLAYERPACK_FUZZ=ON \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS="-O1 $sanitize" -DCMAKE_CXX_FLAGS="-O1 $sanitize" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
  targets=(layerpack_fuzzers)
  [[ $make_seeds == 1 ]] && targets+=(layerpack-convert layerpack-pack)
  cmake --build "$build" --target "${targets[@]}" -j "$(nproc)"
fi
if [[ $make_seeds == 1 ]]; then
  python3 tests/fuzz/make_seeds.py --build "$build" --convert "$build/converter/layerpack-convert" \
    --pack-tool "$build/tools/pack/layerpack-pack"
fi
build_seconds=$(( $(date +%s) - start ))

if [[ ${#selected[@]} -eq 0 ]]; then
  for f in "$build"/tests/fuzz/fuzz_*; do [[ -x $f ]] && selected+=("$(basename "$f")"); done
fi
[[ ${#selected[@]} -gt 0 ]] || { echo "tools/fuzz.sh: no harnesses in $build/tests/fuzz" >&2; exit 1; }

results=$build/fuzz-results
rm -rf "$results"; mkdir -p "$results"
# Harness scratch files (a crashing harness cannot clean up after itself); /dev/shm keeps fsyncs cheap.
scratch=$(mktemp -d "$( [[ -d /dev/shm ]] && echo /dev/shm || echo /tmp )/layerpack_fuzz_run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export LAYERPACK_FUZZ_TMP=$scratch
# Leaks are reported by libFuzzer itself (-detect_leaks=1); abort on the first report.
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

run_one() {
  local h=$1 bin=$build/tests/fuzz/$1 log=$results/$1.log status=0
  local seeds=tests/fuzz/corpus/$h regress=tests/fuzz/regressions/$h
  local work=$build/fuzz-corpus/$h findings=$build/fuzz-findings/$h
  [[ -n $seed ]] && rm -rf "$work"
  mkdir -p "$work" "$findings"
  local t0=$(date +%s)
  # 1. Every committed regression and seed input, once each.
  local replay=()
  [[ -d $regress ]] && replay+=("$regress"/*)
  [[ -d $seeds ]] && replay+=("$seeds"/*)
  if [[ ${#replay[@]} -gt 0 ]]; then
    "${nice_cmd[@]}" "$bin" -rss_limit_mb=2048 -timeout=60 "${replay[@]}" >"$log" 2>&1 || status=$?
  fi
  # 2. Fuzz from the seeds plus what earlier runs found (the work corpus).
  if [[ $status == 0 && $seconds -gt 0 ]]; then
    "${nice_cmd[@]}" "$bin" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=60 -print_final_stats=1 \
      ${seed:+-seed="$seed"} -artifact_prefix="$findings/" "$work" "$seeds" >>"$log" 2>&1 || status=$?
  fi
  local execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  local corpus_size=$(ls "$work" | wc -l)
  echo "$h $status $(( $(date +%s) - t0 )) ${execs:-0} $corpus_size" >"$results/$h.summary"
}

running=0
for h in "${selected[@]}"; do
  run_one "$h" &
  running=$((running + 1))
  if [[ $running -ge $parallel ]]; then wait -n || true; running=$((running - 1)); fi
done
wait

failed=0
printf '\n%-26s %8s %12s %8s  %s\n' harness seconds execs corpus result
for h in "${selected[@]}"; do
  read -r name status secs execs corpus_size <"$results/$h.summary"
  if [[ $status == 0 ]]; then result=ok; else result="FAILED (exit $status, see $results/$h.log)"; failed=1; fi
  printf '%-26s %8s %12s %8s  %s\n' "$name" "$secs" "$execs" "$corpus_size" "$result"
done
echo "build ${build_seconds}s, total $(( $(date +%s) - start ))s"
if [[ $failed == 1 ]]; then
  for h in "${selected[@]}"; do
    read -r name status _ <"$results/$h.summary"
    [[ $status == 0 ]] || { echo "---- $h (last lines)"; tail -40 "$results/$h.log"; }
  done
  exit 1
fi
