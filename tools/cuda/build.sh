#!/usr/bin/env bash
# Builds `sd35-server --features cuda` (release, stripped) on a machine without a GPU, a driver
# or a system CUDA toolkit, with the pinned CUDA 13.0 toolchain of toolkit.sh, then checks it:
# it is at most 64 MiB, prints --help, asking it for CUDA where no driver answers ends in an
# error message, not a panic, and every CUDA kernel the pipeline can request is defined in the
# PTX it ships (the kernel inventory test, inference/pipeline/tests/cuda_kernels.rs).
#
# Kernels: candle's kernels are PTX, compiled for CUDA_COMPUTE_CAP (default 80) and
# JIT-compiled by the driver for the GPU it finds, so the default binary runs on compute
# capability 8.0 and later (A100 80, L4/L40S 89, H100/H200 90, and newer). Its few static
# kernels carry sm_CAP code and the same PTX. A cap of 90 or more selects the arch-specific
# `sm_90a`-style target and runs on that architecture only.
#
# The cargo target directory lives in the per-user cache, keyed by toolkit and cap, so a fresh
# clone builds incrementally. Prints the binary's path on stdout; progress goes to stderr.
#
#   tools/cuda/build.sh                 # or: make cuda
#   CUDA_COMPUTE_CAP=90 tools/cuda/build.sh
#   SD35_CUDA_OUT=dist tools/cuda/build.sh   # where the binary is copied (default target/cuda)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cap=${CUDA_COMPUTE_CAP:-80}
max_bytes=$((64 * 1024 * 1024))
log() { printf '[cuda-build] %s\n' "$*" >&2; }

toolkit=$(bash "$here/toolkit.sh")
cache_root="${SD35_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sd35-operator}"
target_dir=${SD35_CUDA_TARGET_DIR:-$cache_root/cuda/target-$(basename "$toolkit")-cap$cap}
out_dir=${SD35_CUDA_OUT:-$repo/target/cuda}
mkdir -p "$out_dir"

export CUDA_HOME="$toolkit" CUDA_PATH="$toolkit" CUDA_COMPUTE_CAP="$cap"
export NVCC="$toolkit/bin/sd35-nvcc" PATH="$toolkit/bin:$PATH"
export CARGO_TARGET_DIR="$target_dir"
# Link against the stub driver and the wheels' libraries; load the real driver at run time.
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$toolkit/lib/stubs -L native=$toolkit/lib"

start=$(date +%s)
log "building sd35-server --features cuda (compute capability $cap) in $target_dir"
(cd "$repo" && cargo build --release --locked -p sd35-server --bin sd35-server --features cuda)
log "built in $(( $(date +%s) - start ))s"

bin="$out_dir/sd35-server"
strip --strip-all -o "$bin.tmp" "$target_dir/release/sd35-server"
mv "$bin.tmp" "$bin"
size=$(stat -c %s "$bin")
if [ "$size" -gt "$max_bytes" ]; then
  echo "$bin is $size bytes, over the 64 MiB limit" >&2
  exit 1
fi
log "$bin: $((size / 1024 / 1024)) MiB ($size bytes)"

# The driver stub, for images that must also start on machines without a driver (see
# tools/cuda/README.md): never on a library path where a driver is installed.
mkdir -p "$out_dir/driver-stub"
cp "$toolkit/lib/stubs/libcuda.so" "$out_dir/driver-stub/libcuda.so.1"

# Run it here: the wheels' libraries and the stub driver stand in for an installed driver.
run_here() {
  RUST_BACKTRACE=0 LD_LIBRARY_PATH="$toolkit/lib/stubs:$toolkit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin" "$@"
}
run_here --help >/dev/null
tiny="$repo/inference/testdata/sd35-tiny-large"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
if run_here generate --cuda --model "$tiny" --prompt "a lighthouse" --out "$scratch/x.png" \
  --steps 1 --width 64 --height 64 >"$scratch/out" 2>&1; then
  echo "generate --cuda succeeded against the stub driver:" >&2
  cat "$scratch/out" >&2
  exit 1
fi
if grep -q "panicked" "$scratch/out" || ! grep -qi "cuda" "$scratch/out"; then
  echo "generate --cuda without a driver should fail with a CUDA error message, got:" >&2
  cat "$scratch/out" >&2
  exit 1
fi
log "no driver: $(grep -m1 -A3 '^Error' "$scratch/out" | tr -s ' \n' ' ')"

# The kernel inventory: candle loads its CUDA kernels by name at run time, so a name its PTX
# lacks (the F8E4M3 casts) would only fail on a GPU. The test reads the PTX of the same
# candle-kernels build the binary embeds, in the same target directory. sd35-server is selected
# beside sd35-pipeline so that cargo resolves the features the binary's build did and reuses
# its dependencies (the pipeline alone resolves serde, rand and others differently and would
# compile candle a second time). Like the binary, the test links the driver; the stub lets it
# start here.
start=$(date +%s)
log "checking the pipeline's CUDA kernel inventory against the shipped PTX"
(cd "$repo" && RUST_BACKTRACE=0 \
  LD_LIBRARY_PATH="$toolkit/lib/stubs:$toolkit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --release --locked -p sd35-pipeline -p sd35-server --features sd35-server/cuda \
    --test cuda_kernels) >&2
log "kernel inventory checked in $(( $(date +%s) - start ))s"
echo "$bin"
