#!/bin/bash
# Runs on the GPU machine (device tool), from the repository root, with the
# build directory carried: kernel tests, the NF4 matvec benchmark, an Nsight
# Compute look at one gate_proj launch per kernel variant, and the SASS.
# Usage: kernels/run_on_gpu.sh <build dir> <output dir> [tests...]
set -u
B=${1:-build-kernels}
OUT=${2:-/tmp/out}
shift 2 || true
TESTS=${*:-test_kernels_references test_kernels_elementwise test_kernels_attention test_kernels_sampling test_kernels_matvec}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
for t in $TESTS; do
  echo "=== $t"
  timeout 180 "$B/tests/kernels/$t"
  echo "$t rc=$?"
done > "$OUT/tests.log" 2>&1
grep -E "rc=|FAILED|Failure" "$OUT/tests.log" | head -30
timeout 120 "$B/tools/layerpack-kernel-bench" 15 > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"
{
  for p in ${NCU_PATHS:-pl8x2 pl8x2xf}; do
    echo "##### path $p"
    timeout 60 ncu --clock-control none --kernel-name regex:nf4_matvec --launch-skip 20 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section InstructionStats \
      "$B/tools/layerpack-kernel-bench" 3 gate_proj "$p"
    timeout 60 ncu --clock-control none --kernel-name regex:nf4_matvec --launch-skip 20 --launch-count 1 \
      --metrics smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,smsp__inst_executed_op_shared_ld.sum,dram__bytes_read.sum \
      "$B/tools/layerpack-kernel-bench" 3 gate_proj "$p"
  done
} > "$OUT/ncu.txt" 2>&1
grep -E "#####|DRAM Throughput|Duration|Compute \(SM\) Throughput|Achieved Occupancy|Issued Warp|Registers Per|stalled|inst_executed|hmma|dram__bytes" "$OUT/ncu.txt" | head -60
{
  timeout 150 compute-sanitizer --tool memcheck "$B/tests/kernels/test_kernels_matvec" --gtest_filter='NF4Matvec.EveryPathAgrees:NF4Matvec.OtherBlocksizes:NF4Matvec.PairLutBlockSizesAndManyTiles:NF4Dequantize.*'
  # Shared-memory races in the pair-LUT kernel (table fill, per-tile partial sums by parity).
  timeout 150 compute-sanitizer --tool racecheck "$B/tests/kernels/test_kernels_matvec" --gtest_filter='NF4Matvec.PairLutBlockSizesAndManyTiles'
  timeout 60 compute-sanitizer --tool memcheck "$B/tests/kernels/test_kernels_elementwise"
  timeout 60 compute-sanitizer --tool memcheck "$B/tests/kernels/test_kernels_sampling" --gtest_filter='Argmax.*:Sampling.*'
} > "$OUT/sanitizer.log" 2>&1
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/sanitizer.log"
cuobjdump --dump-sass "$B/kernels/CMakeFiles/layerpack_kernels.dir/nf4_matvec.cu.o" > "$OUT/sass.txt" 2>&1
tail -30 "$OUT/bench.txt"
