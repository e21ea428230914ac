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
if command -v nvcc >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  cuda=ON
  archs="-DCMAKE_CUDA_ARCHITECTURES=native"  # this machine's GPU only: a faster build
fi
build=${LAYERPACK_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLAYERPACK_CUDA=$cuda $archs -DLAYERPACK_TESTS=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target layerpack-convert layerpack-run

checkpoint=$(bash tools/fetch_default_model.sh)
cache_dir="${LAYERPACK_CACHE:-$HOME/.cache/layerpack}"
pack="$cache_dir/packs/SmolLM2-135M-Instruct"
if [ ! -f "$pack/manifest.lpk" ]; then
  mkdir -p "$cache_dir/packs"
  "$build/converter/layerpack-convert" "$checkpoint" -o "$pack" --force
fi

backend=cpu
[ "$cuda" = ON ] && backend=cuda
echo "layerpack: running on the $backend backend" >&2
prompt=${LAYERPACK_PROMPT:-"What is the capital of France? Answer in one sentence, then name one famous landmark there."}
"$build/runtime/layerpack-run" "$pack" --chat -p "$prompt" -n 96 --backend "$backend"
