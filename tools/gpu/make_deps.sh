#!/usr/bin/env bash
# On the Debian build machine: copies the headers, static libraries, CMake
# configs and flatc of layerpack's Debian dependencies into .gpu-deps/root, so
# tools/gpu/build.sh can build on a machine that lacks those packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu-deps && mkdir -p .gpu-deps/root
for p in libflatbuffers-dev libflatbuffers2 flatbuffers-compiler libzstd-dev libxxhash-dev libcli11-dev libgtest-dev \
         nlohmann-json3-dev libpcre2-dev libutf8proc-dev; do
  dpkg -L "$p" | while read -r f; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    case "$f" in /usr/share/doc/*|/usr/share/man/*) continue ;; esac
    mkdir -p ".gpu-deps/root$(dirname "$f")" && cp "$f" ".gpu-deps/root$f"
  done
done
du -sh .gpu-deps
