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
    # Only what the build uses: no docs, no 16/32-bit PCRE2, no pcre2-config tooling.
    case "$f" in /usr/share/doc/*|/usr/share/man/*|*pcre2-16*|*pcre2-32*|*pcre2-posix*|*/bin/pcre2*) continue ;; esac
    mkdir -p ".gpu-deps/root$(dirname "$f")" && cp "$f" ".gpu-deps/root$f"
  done
done
# One compressed file travels (the transfer to the GPU machine is size-limited).
tar -C .gpu-deps -cJf .gpu-deps/root.tar.xz root && rm -rf .gpu-deps/root
du -sh .gpu-deps
