#!/usr/bin/env bash
# Builds twilight-candle's GPU test binary in release mode on a machine without a GPU (nvcc and
# the CUDA libraries from scripts/install-cuda-build.sh), stripped, into .gpu/bin/, where
# `bash .gpu/run.sh` runs its ignored GPU tests. The same binary prints the decode loop's figures
# (the decode_loop example's report) as its `decode_loop_report` test:
#
#   bash .gpu/run.sh --nocapture                              # every GPU test, with output
#   LD_LIBRARY_PATH=/usr/local/cuda/lib64 .gpu/bin/gpu_candle-* --ignored --nocapture \
#       --exact decode_loop::decode_loop_report                # the figures alone
#
# Only one binary is staged: each binary that builds candle's CUDA backend carries candle's
# kernels (about 45 MiB stripped). It links CUDA dynamically: on the GPU host it finds the driver
# and /usr/local/cuda/lib64's cuBLAS, cuRAND, NVRTC and runtime through the loader.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
eval "$(scripts/install-cuda-build.sh --export)"
mkdir -p .gpu/bin
rm -f .gpu/bin/gpu_candle-*
cd twilight-candle
tests="$(mktemp)"
trap 'rm -f "$tests"' EXIT
cargo test --release --no-run --message-format=json >"$tests"
exe="$(python3 - "$tests" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu_candle":
        print(m["executable"])
PY
)"
[ -n "$exe" ] || { echo "no gpu_candle test binary was built" >&2; exit 1; }
dst="$root/.gpu/bin/$(basename "$exe")"
cp "$exe" "$dst"
strip "$dst"
echo "staged $dst"
size=$(du -sm "$root/.gpu" | cut -f1)
echo ".gpu holds ${size} MiB"
if [ "$size" -gt 64 ]; then
  echo "warning: .gpu holds more than 64 MiB" >&2
fi
