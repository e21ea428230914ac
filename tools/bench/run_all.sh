#!/usr/bin/env bash
# layerpack's benchmark suite (issue 8), on a GPU machine, in one invocation per
# part (each fits in about 8 minutes):
#   part 8b   machine limits; a Llama-3-8B-shaped random bf16 checkpoint; converter
#             throughput on it; our resident decode (batch 1/8/32), prefill and cold
#             start; our runtime streaming it under a 6 GiB cap; transformers +
#             accelerate offload (6 GiB cap) and fully resident on the same checkpoint
#   part 70b  machine limits; a Llama-3.1-70B-shaped synthetic NF4 pack streamed at
#             several --vram budgets (warm host cache, page cache only, cold), and
#             batched decode
# Every run appends one JSON object per scenario to $RESULTS (JSON lines);
# tools/bench/report.py turns them into BENCHMARKS.md's table and plots.
#   tools/bench/run_all.sh 8b|70b BUILD_DIR RESULTS TOKENIZER_DIR
set -uo pipefail
part=$1 build=$2 results=$3 tokenizer=$4
work=${LAYERPACK_BENCH_DIR:-/tmp/layerpack-bench}
mkdir -p "$work"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
run=$build/runtime/layerpack-run
convert=$build/converter/layerpack-convert
limits=$build/tools/bench/layerpack-bench-limits
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
today=$(date -u +%Y-%m-%d)

emit() {  # emit SCENARIO JSON_OBJECT: tags it and appends it to $results
  python3 - "$1" "$2" "$gpu" "$today" "$part" >>"$results" <<'PY'
import json, sys
scenario, payload, gpu, date, part = sys.argv[1:6]
try:
    data = json.loads(payload)
except json.JSONDecodeError:
    data = {"error": payload[-2000:]}
print(json.dumps({"scenario": scenario, "gpu": gpu, "date": date, "part": part, "data": data}))
PY
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
random_ids() { python3 -c "import random; random.seed($2); print(','.join(str(random.randrange(1000, 120000)) for _ in range($1)))"; }
# Runs layerpack-run with --json, records scenario, wall seconds and the JSON.
ours() {
  local scenario=$1; shift
  local t0 t1 out
  t0=$(date +%s.%N)
  out=$("$run" "$@" --json 2>"$work/$scenario.stderr")
  local rc=$?
  t1=$(date +%s.%N)
  [ $rc -eq 0 ] || out="{\"error\": $(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()[-1500:]))' "$work/$scenario.stderr")}"
  emit "$scenario" "$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["wall_seconds"]=float(sys.argv[2]); d["command"]=sys.argv[3]; print(json.dumps(d))' \
    "$out" "$(python3 -c "print($t1 - $t0)")" "layerpack-run $*")"
  echo "  $scenario: rc=$rc"
}

warm_page_cache() {  # warm_page_cache PACK_DIR: every file read once, 8 at a time
  find "$1" -type f -print0 | xargs -0 -P 8 -n 8 cat >/dev/null
}

measure_limits() {  # measure_limits FILE
  echo "== limits ($1)"
  emit limits "$("$limits" --json --file "$1" --readers 8)"
}

if [ "$part" = 8b ]; then
  ckpt=$work/llama-3-8b-bf16 pack=$work/llama-3-8b.lpk
  rm -rf "$ckpt" "$pack"
  echo "== making the Llama-3-8B-shaped bf16 checkpoint"
  python3 tools/bench/transformers_baseline.py --make-checkpoint "$ckpt" --shape llama-3-8b >/dev/null
  cp "$tokenizer"/tokenizer.json "$tokenizer"/tokenizer_config.json "$ckpt"/
  measure_limits "$(ls -S "$ckpt"/*.safetensors | head -1)"
  echo "== converter"
  drop_caches
  t0=$(date +%s.%N)
  out=$("$convert" "$ckpt" -o "$pack" --force --json 2>"$work/convert.stderr")
  t1=$(date +%s.%N)
  emit convert_8b_cold "$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]) if sys.argv[1].strip() else {"error": "no output"}; d["wall_seconds"]=float(sys.argv[2]); d["command"]="layerpack-convert CKPT -o PACK --force --json (caches dropped)"; print(json.dumps(d))' "$out" "$(python3 -c "print($t1 - $t0)")")"
  prompt16=$(random_ids 16 1)
  prompt512=$(random_ids 512 2)
  echo "== ours, 8B"
  drop_caches
  ours cold_start_8b "$pack" --prompt-ids "$prompt16" -n 1 --temp 0 --backend cuda
  ours cold_start_8b_pagecache "$pack" --prompt-ids "$prompt16" -n 1 --temp 0 --backend cuda
  ours resident_8b_batch1 "$pack" --prompt-ids "$prompt16" -n 64 --temp 0 --ignore-eos --backend cuda
  export LAYERPACK_CUDA_GRAPHS=0
  ours resident_8b_batch1_no_graphs "$pack" --prompt-ids "$prompt16" -n 64 --temp 0 --ignore-eos --backend cuda
  unset LAYERPACK_CUDA_GRAPHS
  ours prefill_8b_512 "$pack" --prompt-ids "$prompt512" -n 2 --temp 0 --ignore-eos --backend cuda
  ours prefill_8b_512_rows512 "$pack" --prompt-ids "$prompt512" -n 2 --temp 0 --ignore-eos --backend cuda --max-batch-rows 512
  for b in 8 32; do
    python3 -c "
import random; random.seed($b)
words='the of and to in is was for on that with as by at from his her are be this had not but which'.split()
for i in range($b): print(' '.join(random.choice(words) for _ in range(12)))" >"$work/prompts$b.txt"
    ours resident_8b_batch$b "$pack" --batch-file "$work/prompts$b.txt" -n 32 --temp 0 --ignore-eos --backend cuda
  done
  ours stream_8b_vram6_hostcache "$pack" --prompt-ids "$prompt16" -n 16 --temp 0 --ignore-eos --backend cuda --vram 6GiB --host-cache 16GiB
  ours stream_8b_vram6_pagecache "$pack" --prompt-ids "$prompt16" -n 8 --temp 0 --ignore-eos --backend cuda --vram 6GiB
  echo "== transformers"
  emit transformers_offload_6gib "$(python3 tools/bench/transformers_baseline.py --checkpoint "$ckpt" --vram-gib 6 --tokens 8 2>"$work/hf1.stderr" | tail -1)"
  emit transformers_resident "$(python3 tools/bench/transformers_baseline.py --checkpoint "$ckpt" --resident --tokens 32 2>"$work/hf2.stderr" | tail -1)"
  rm -rf "$ckpt" "$pack"
elif [ "$part" = 70b ]; then
  pack=$work/llama-3.1-70b.lpk
  rm -rf "$pack"
  echo "== making the synthetic Llama-3.1-70B pack"
  t0=$(date +%s.%N)
  "$convert" --synthetic llama-3.1-70b --tokenizer "$tokenizer" -o "$pack" --force --quiet || exit 1
  t1=$(date +%s.%N)
  emit synthetic_70b "{\"wall_seconds\": $(python3 -c "print($t1 - $t0)"), \"pack_bytes\": $(du -sb "$pack" | cut -f1)}"
  measure_limits "$(ls -S "$pack"/*.lpk | head -1)"
  prompt16=$(random_ids 16 1)
  for vram in 8 16 32; do
    ours stream_70b_vram${vram}_hostcache "$pack" --prompt-ids "$prompt16" -n 6 --temp 0 --ignore-eos --backend cuda --vram ${vram}GiB --host-cache 64GiB
  done
  ours stream_70b_vram8_pagecache "$pack" --prompt-ids "$prompt16" -n 4 --temp 0 --ignore-eos --backend cuda --vram 8GiB
  python3 -c "
import random; random.seed(8)
words='the of and to in is was for on that with as by at from his her are be this had not but which'.split()
for i in range(8): print(' '.join(random.choice(words) for _ in range(12)))" >"$work/prompts8.txt"
  ours stream_70b_vram8_batch8_hostcache "$pack" --batch-file "$work/prompts8.txt" -n 4 --temp 0 --ignore-eos --backend cuda --vram 8GiB --host-cache 64GiB
  drop_caches
  ours stream_70b_vram8_cold_direct "$pack" --prompt-ids "$prompt16" -n 2 --temp 0 --ignore-eos --backend cuda --vram 8GiB --direct-io
  rm -rf "$pack"
elif [ "$part" = 70b-more ]; then
  # The rest of issue 7's 70B list, for a short lease: prefill of 512 tokens against
  # one stream of the weights from the same source (page cache), batch 32 and 64,
  # and the 4 and 24 GiB points of the budget curve. The limits come last: measuring
  # O_DIRECT drops the page cache, which would turn the prefill into a cold read.
  pack=$work/llama-3.1-70b.lpk
  rm -rf "$pack"
  "$convert" --synthetic llama-3.1-70b --tokenizer "$tokenizer" -o "$pack" --force --quiet || exit 1
  warm_page_cache "$pack"
  ours stream_70b_vram8_pagecache "$pack" --prompt-ids "$(random_ids 16 1)" -n 4 --temp 0 --ignore-eos --backend cuda --vram 8GiB
  ours prefill_70b_512_vram8_pagecache "$pack" --prompt-ids "$(random_ids 512 2)" -n 1 --temp 0 --ignore-eos --backend cuda --vram 8GiB
  ours prefill_70b_2048_vram8_pagecache "$pack" --prompt-ids "$(random_ids 2048 3)" -n 1 --temp 0 --ignore-eos --backend cuda --vram 8GiB
  for b in 32 64; do
    python3 -c "
import random; random.seed($b)
words='the of and to in is was for on that with as by at from his her are be this had not but which'.split()
for i in range($b): print(' '.join(random.choice(words) for _ in range(8)))" >"$work/prompts$b.txt"
    ours stream_70b_vram8_batch${b}_hostcache "$pack" --batch-file "$work/prompts$b.txt" -n 3 --temp 0 --ignore-eos --backend cuda --vram 8GiB --host-cache 64GiB
  done
  for vram in 4 24; do
    ours stream_70b_vram${vram}_hostcache "$pack" --prompt-ids "$(random_ids 16 1)" -n 4 --temp 0 --ignore-eos --backend cuda --vram ${vram}GiB --host-cache 64GiB
  done
  emit limits "$("$limits" --json --skip-gemm --copy-mib 256 --repeats 5 --file "$(ls -S "$pack"/*.lpk | head -1)" --readers 8)"
  rm -rf "$pack"
else
  echo "usage: tools/bench/run_all.sh 8b|70b|70b-more BUILD_DIR RESULTS TOKENIZER_DIR" >&2
  exit 2
fi
echo "== done: $(wc -l <"$results") results in $results"
