#!/usr/bin/env bash
# Installs NVRTC 13.0 and the CUDA headers it needs from PyPI into a private directory, so that
# twilight can compile kernels (for example in CI, or to fill a cache for a GPU) on a machine
# without a CUDA toolkit. Prints the directory to export as TWILIGHT_NVRTC_DIR.
#
#   eval "$(scripts/install-nvrtc.sh --export)"    # sets TWILIGHT_NVRTC_DIR for this shell
#
# 13.0.x is pinned on purpose: newer NVRTC wheels emit PTX that a CUDA 13.0 driver cannot load.
set -euo pipefail
root="${NVRTC_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/twilight-nvrtc-13.0.88}"
lib="$root/nvidia/cu13/lib"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
  echo "installing NVRTC 13.0.88 into $root" >&2
  # Every wheel in one pip call into an empty directory: a second call into it silently adds nothing.
  rm -rf "$root"
  python3 -m pip install -q --no-cache-dir --disable-pip-version-check --target "$root" \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 >&2
fi
[ -e "$lib/libnvrtc.so.13" ] || { echo "NVRTC install failed: $lib/libnvrtc.so.13 missing" >&2; exit 1; }
if [ "${1:-}" = "--export" ]; then
  echo "export TWILIGHT_NVRTC_DIR='$lib'"
else
  echo "$lib"
fi
