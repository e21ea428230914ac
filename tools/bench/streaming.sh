#!/usr/bin/env bash
# Streaming-engine benchmark (issue 7), on the GPU machine, every figure next to its
# floor measured in the same run:
#   part 8b   Llama-3-8B-shaped synthetic pack, resident decode, s/token against
#             (weight bytes per token / measured device-memory bandwidth)
#   part 70b  Llama-3.1-70B-shaped synthetic pack (~40 GB; deleted at the end) at
#             --vram 8GiB: warm host cache, page cache only, cold (caches dropped,
#             O_DIRECT); s/token against (bytes over the link per token / measured
#             pinned host->device bandwidth), and the file-read figures against the
#             measured page-cache / O_DIRECT read bandwidth
#   all       both (about 8 minutes on an H200)
# Usage: tools/bench/streaming.sh 8b|70b|all BUILD_DIR TOKENIZER_DIR OUT_DIR
# Needs root for `echo 3 > /proc/sys/vm/drop_caches` (cold figure).
set -uo pipefail
part=$1 build=$2 tokenizer=$3 out=$4
work=${LAYERPACK_BENCH_DIR:-/tmp/layerpack-stream-bench}
mkdir -p "$work" "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
run=$build/runtime/layerpack-run
convert=$build/converter/layerpack-convert
limits=$build/tools/bench/layerpack-bench-limits
for tool in "$run" "$convert" "$limits"; do [ -x "$tool" ] || { echo "streaming.sh: $tool missing" >&2; exit 1; }; done
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
summary=$out/streaming-summary.txt
echo "GPU: $gpu, $(date -u +%Y-%m-%dT%H:%MZ)" | tee -a "$summary"
prompt16=$(python3 -c "import random; random.seed(7); print(','.join(str(random.randrange(1000, 120000)) for _ in range(16)))")

# ours NAME ARGS...: layerpack-run --json -v, JSON to $out/NAME.json, stderr to $out/NAME.log.
ours() {
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$run" "$@" --json -v >"$out/$name.json" 2>"$out/$name.log"
  local rc=$?
  echo "  $name: rc=$rc, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s wall" | tee -a "$summary"
  [ $rc -eq 0 ] || tail -5 "$out/$name.log"
}

# report NAME LIMITS_JSON KIND: one line, s/token next to its floors.
report() {
  python3 - "$out/$1.json" "$2" "$3" "$1" <<'PY' | tee -a "$summary"
import json, sys
path, limits_path, kind, name = sys.argv[1:5]
try:
    run = json.load(open(path))
except Exception as e:
    print(f"{name}: no result ({e})"); sys.exit(0)
lim = json.load(open(limits_path))
s = run["stats"]; m = run.get("memory", {})
spt = s["decode_seconds_per_token"]
passes = max(1, s["decode_passes"])
link = s.get("decode_bytes_uploaded", 0) / passes
read = s["decode_bytes_read"] / passes
line = f"{name}: {spt:.3f} s/token over {s['decode_passes']} decode passes"
if kind == "resident":
    weights = m.get("resident_bytes", 0)
    bw = lim["device_copy_read_plus_write"] * 1e9
    floor = weights / bw
    line += f"; weights {weights/1e9:.2f} GB/token / device memory {bw/1e9:.0f} GB/s = floor {floor*1e3:.2f} ms, ratio {spt/floor:.2f}"
else:
    h2d = lim["h2d_pinned"] * 1e9
    floor = link / h2d
    line += (f"; link {link/1e9:.2f} GB/token / pinned H2D {h2d/1e9:.1f} GB/s = floor {floor:.3f} s, "
             f"ratio {spt/floor:.2f}" if floor > 0 else "; nothing over the link")
    line += f"; from files {read/1e9:.2f} GB/token, from host cache {s.get('decode_bytes_from_host_cache',0)/passes/1e9:.2f} GB/token"
    key = {"pagecache": "page_cache_read_8", "cold": "o_direct_read_8"}.get(kind)
    if key and key in lim and read > 0:
        rfloor = read / (lim[key] * 1e9)
        line += f"; read floor {rfloor:.3f} s at {key} {lim[key]:.1f} GB/s, ratio {spt/rfloor:.2f}"
    line += (f"; {m.get('resident_layers')} resident, {m.get('streamed_layers')} streamed, "
             f"{m.get('ring_slots')} slots; GPU peak {m.get('device_peak_bytes',0)/2**30:.2f} GiB of "
             f"{m.get('vram_budget_bytes',0)/2**30:.2f} GiB budget")
print(line)
PY
}

if [ "$part" = 8b ] || [ "$part" = all ]; then
  echo "== limits (device)" | tee -a "$summary"
  "$limits" --json --repeats 10 >"$out/limits-device.json" 2>>"$out/limits.log"
  cat "$out/limits-device.json" | tee -a "$summary"
  pack=$work/llama-3-8b.lpk
  t0=$(date +%s)
  "$convert" --synthetic llama-3-8b --tokenizer "$tokenizer" -o "$pack" --force --quiet >"$out/convert-8b.log" 2>&1 ||
    { echo "8B conversion failed"; tail "$out/convert-8b.log"; }
  echo "8B synthetic pack: $(du -sh "$pack" | cut -f1) in $(($(date +%s) - t0)) s" | tee -a "$summary"
  ours resident_8b "$pack" --prompt-ids "$prompt16" -n 64 --temp 0 --ignore-eos --backend cuda
  report resident_8b "$out/limits-device.json" resident
  rm -rf "$pack"
fi

if [ "$part" = 70b ] || [ "$part" = all ]; then
  pack=$work/llama-3.1-70b.lpk
  t0=$(date +%s)
  "$convert" --synthetic llama-3.1-70b --tokenizer "$tokenizer" -o "$pack" --force --quiet >"$out/convert-70b.log" 2>&1 ||
    { echo "70B conversion failed"; tail "$out/convert-70b.log"; exit 1; }
  echo "70B synthetic pack: $(du -sh "$pack" | cut -f1) in $(($(date +%s) - t0)) s" | tee -a "$summary"
  # Page cache warm (the pack was just written), no host cache.
  ours stream_70b_vram8_pagecache "$pack" --prompt-ids "$prompt16" -n 4 --temp 0 --ignore-eos --backend cuda --vram 8GiB
  # Host cache: the prefill pass fills it, decode passes are one DMA per layer.
  ours stream_70b_vram8_hostcache "$pack" --prompt-ids "$prompt16" -n 6 --temp 0 --ignore-eos --backend cuda --vram 8GiB --host-cache 48GiB
  # Limits in the same run (this drops the page cache).
  echo "== limits (link, page cache, O_DIRECT on embedding.lpk)" | tee -a "$summary"
  "$limits" --json --skip-gemm --repeats 10 --file "$pack/embedding.lpk" --readers 8 >"$out/limits-link.json" 2>>"$out/limits.log"
  cat "$out/limits-link.json" | tee -a "$summary"
  sync; echo 3 >/proc/sys/vm/drop_caches || echo "cannot drop caches: cold figure is not cold" | tee -a "$summary"
  ours stream_70b_vram8_cold "$pack" --prompt-ids "$prompt16" -n 2 --temp 0 --ignore-eos --backend cuda --vram 8GiB --direct-io
  echo "== 70B at --vram 8GiB, figures against floors measured above" | tee -a "$summary"
  report stream_70b_vram8_hostcache "$out/limits-link.json" hostcache
  report stream_70b_vram8_pagecache "$out/limits-link.json" pagecache
  report stream_70b_vram8_cold "$out/limits-link.json" cold
  rm -rf "$pack"
fi
