#!/usr/bin/env bash
# Builds layerpack on the GPU machine (Ubuntu 24.04 without Debian's -dev
# packages). The headers, static libraries and flatc of the Debian packages
# travel in .gpu-deps/root (made by tools/gpu/make_deps.sh on the Debian machine).
#   tools/gpu/build.sh [build dir]
set -euo pipefail
build=${1:-build-remote}
deps="$PWD/.gpu-deps/root"
[ -d "$deps" ] || [ ! -f .gpu-deps/root.tar.xz ] || tar -C .gpu-deps -xJf .gpu-deps/root.tar.xz
[ -x "$deps/usr/bin/flatc" ] || { echo "tools/gpu/build.sh: $deps is missing; run tools/gpu/make_deps.sh and carry .gpu-deps" >&2; exit 1; }
export PATH="/opt/torch/.venv/bin:/usr/local/cuda/bin:$PATH"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLAYERPACK_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${LAYERPACK_CUDA_ARCHS:-90a}" \
  -DCMAKE_PREFIX_PATH="$deps/usr" -DLAYERPACK_FLATC="$deps/usr/bin/flatc" \
  -DCMAKE_CXX_FLAGS="-isystem $deps/usr/include" -DCMAKE_CUDA_FLAGS="-isystem $deps/usr/include" >/dev/null
cmake --build "$build" -j "$(nproc)" "${@:2}"
