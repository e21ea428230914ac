#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, fetch the default model
# (SmolLM2-135M-Instruct, cached), convert it to a pack (cached), and answer a
# chat prompt, printing the answer and the stats. Uses the GPU when one is
# present (and the CUDA toolkit is installed), the CPU backend otherwise.
#   LAYERPACK_CACHE    cache directory (default ~/.cache/layerpack)
#   LAYERPACK_PROMPT   the prompt (default below)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PATH="/usr/local/cuda/bin:$PATH"

cuda=OFF
archs=""
compute_cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)
if command -v nvcc >/dev/null && [ -n "$compute_cap" ] && [ "${compute_cap%%.*}" -lt 8 ]; then
  echo "run-default: the GPU is compute capability $compute_cap; layerpack's CUDA kernels need 8.0 or newer: CPU build" >&2
elif command -v nvcc >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  cuda=ON
  archs="-DCMAKE_CUDA_ARCHITECTURES=native"  # this machine's GPU only: a faster build
  # Hopper: its arch-specific target (native would build plain sm_90, without setmaxnreg).
  if [ "$compute_cap" = "9.0" ]; then
    archs="-DCMAKE_CUDA_ARCHITECTURES=90a"
  fi
fi
build=${LAYERPACK_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLAYERPACK_CUDA=$cuda $archs -DLAYERPACK_TESTS=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target layerpack-convert layerpack-run

# NF4 with blocksize 32 instead of the converter's default 64. NF4 is lossy on a
# model this small (and its weights come from a 4-bit Q4_1 GGUF with 32-element
# blocks, so they are quantized twice); blocksize 32 measurably helps, for 0.125
# more bits per parameter. Measured with tools/make_default_model_fixture.py
# --compare-quantization (transformers, float32, NF4-dequantized weights; 8 chat
# prompts, 274 bf16 answer tokens; perplexity of 4 English paragraphs):
#                        perplexity  KL(bf16||NF4)/token  top-1 agreement
#   bf16 checkpoint        8.14        0                    1
#   blocksize 64 (default) 9.93        0.309                0.748
#   blocksize 64, no DQ    9.92        0.309                0.737
#   blocksize 32           9.80        0.272                0.741
#   blocksize 128          11.48       0.410                0.708
# Double quantization costs nothing measurable, so it stays on. The prompt below
# gets a coherent greedy answer at blocksize 32 ("Paris, France, is the capital
# of France, with the Eiffel Tower as its iconic landmark."; bf16: "The capital
# of France is Paris, a city steeped in history and culture."), while blocksize
# 64 garbles it ("Le Grand Paris is la Capital is la Marseillaun, France."): no
# runtime bug, transformers with the same NF4 weights says exactly the same
# (tests/default_model compares the tokens). Keep the prompt and blocksize in
# sync with tools/make_default_model_fixture.py (MAIN_JOB_*).
convert_options=(--blocksize 32)
checkpoint=$(bash tools/fetch_default_model.sh)
cache_dir="${LAYERPACK_CACHE:-$HOME/.cache/layerpack}"
pack="$cache_dir/packs/SmolLM2-135M-Instruct-nf4-blocksize32"
# Converted again when missing or older than the checkpoint (a re-fetched model).
if [ ! -f "$pack/manifest.lpk" ] || [ "$checkpoint/.layerpack-complete" -nt "$pack/manifest.lpk" ]; then
  mkdir -p "$cache_dir/packs"
  "$build/converter/layerpack-convert" "$checkpoint" -o "$pack" --force "${convert_options[@]}"
fi

backend=cpu
[ "$cuda" = ON ] && backend=cuda
echo "layerpack: running on the $backend backend" >&2
prompt=${LAYERPACK_PROMPT:-"What is the capital of France? Answer in one sentence, then name one famous landmark there."}
"$build/runtime/layerpack-run" "$pack" --chat -p "$prompt" -n 96 --backend "$backend"
