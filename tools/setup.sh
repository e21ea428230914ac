#!/usr/bin/env bash
# Installs layerpack's build dependencies from Debian 12 packages. Idempotent;
# run as root or through sudo. The CUDA toolkit (nvcc, cudart, cuBLAS) is
# expected under /usr/local/cuda; without it the CPU-only parts still build.
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config
  libflatbuffers-dev flatbuffers-compiler libzstd-dev libxxhash-dev libcli11-dev
  libgtest-dev nlohmann-json3-dev libpcre2-dev libutf8proc-dev python3
  clang libclang-rt-14-dev)  # clang + its sanitizer runtimes: the libFuzzer harnesses
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
else
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then
  echo "setup: nvcc found at /usr/local/cuda/bin (add it to PATH, or the build does so itself)"
fi
