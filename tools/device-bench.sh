#!/usr/bin/env bash
# The GPU benchmark (tools/device_bench.py) and what it carries. The GPU machine has CUDA 13,
# PyTorch and no Rust toolchain, and reaches no network; what it needs from here is prepared
# into target/cuda/ (the bundle) on a machine with Rust, then carried with the working tree:
#
#   tools/device-bench.sh --prepare     # here: the CUDA build (tools/cuda/build.sh) and the
#                                       # carried wheels (tools/device-bench-wheels.txt)
#   tools/device-bench.sh [ARGS...]     # there: ARGS go to tools/device_bench.py, e.g.
#                                       # --out "$OUT/device-bench.json" --skip-fp8-build
#   tools/device-bench.sh --dry-run [ARGS...]
#                                       # here, on the CPU: the same script and bundle, small
#                                       # shapes, in the Python environment of
#                                       # tools/device-bench-env.sh (made once per user); checks
#                                       # that the working tree and the bundle fit the 64 MiB a
#                                       # GPU machine is sent. `make device-bench-dry-run`.
#
# The binary's CUDA libraries (cuBLAS, cuBLASLt, cuRAND, NVRTC, the CUDA runtime) are taken from
# the Python environment's NVIDIA wheels (what PyTorch itself loads), else from /usr/local/cuda;
# the driver's libcuda from the system. A dry run puts the build's driver stub on the library
# path (no driver here: the binary must start, and `--device cpu` never asks the driver).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle="$repo/target/cuda"
wheels_req="$repo/tools/device-bench-wheels.txt"
limit_bytes=$((64 * 1024 * 1024))
log() { printf '[device-bench] %s\n' "$*" >&2; }

# The carried wheels, downloaded once (pinned with their hashes).
prepare_wheels() {
  local want have=1 python=${PYTHON:-python3}
  for want in $(sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^ ]*\).*/\1-\2-/p' "$wheels_req"); do
    compgen -G "$bundle/wheels/${want}*.whl" >/dev/null || have=0
  done
  [ "$have" = 1 ] && return 0
  rm -rf "$bundle/wheels"
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -d "$bundle/wheels" -r "$wheels_req" >&2
  log "wheels: $(cd "$bundle/wheels" && echo *.whl)"
}

# Whether what a GPU machine is sent fits its 64 MiB: the working tree (tracked and untracked
# files that git does not ignore) plus the bundle. Prints the sizes; fails when over.
check_carried_size() {
  local tree bundle_bytes total
  tree=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
  bundle_bytes=$(find "$bundle" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}')
  total=$((tree + bundle_bytes))
  log "carried: working tree $((tree / 1024 / 1024)) MiB + target/cuda $((bundle_bytes / 1024 / 1024)) MiB" \
    "($(cd "$bundle" 2>/dev/null && find . -type f -printf '%P %s B; ' 2>/dev/null))" \
    "= $((total / 1024 / 1024)) MiB ($total bytes) of 64 MiB"
  if [ "$total" -gt "$limit_bytes" ]; then
    log "over the 64 MiB a GPU machine is sent: carry less (see tools/device-bench.sh)"
    return 1
  fi
}

# LD_LIBRARY_PATH with the CUDA libraries of `$1`'s NVIDIA wheels, the toolkit, the driver.
cuda_library_path() {
  local libs d
  libs=$("$1" - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
seen = []
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "*", "lib")):
        if os.path.isdir(d) and d not in seen:
            seen.append(d)
print(":".join(seen))
PY
)
  for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && libs="${libs:+$libs:}$d"
  done
  echo "${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# Says which libraries the binary links and cannot find. Only a warning: the benchmark still
# runs, its preflight reports the binary's failure, and the parts without it go on.
check_links() {
  local missing
  if missing=$(ldd "$1" | grep 'not found'); then
    log "warning: $1 cannot find these libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):"
    echo "$missing" >&2
  fi
}

case "${1:-}" in
--prepare)
  SD35_CUDA_OUT="$bundle" bash "$repo/tools/cuda/build.sh" >/dev/null
  prepare_wheels
  check_carried_size
  log "bundle ready: carry target/cuda; on the GPU machine run tools/device-bench.sh --out \"\$OUT/device-bench.json\""
  ;;
--dry-run)
  shift
  started=$(date +%s)
  python=$(bash "$repo/tools/device-bench-env.sh")
  prepare_wheels
  if [ -x "$bundle/sd35-server" ]; then
    bin="$bundle/sd35-server"
    log "binary: the CUDA build $bin, run with --device cpu and the driver stub"
    check_carried_size
    stub="$bundle/driver-stub"
    [ -e "$stub/libcuda.so.1" ] || { log "$stub/libcuda.so.1 missing: run make cuda"; exit 1; }
  else
    log "no CUDA build in $bundle (make cuda makes it): the dry run uses target/debug/sd35-server," \
      "and the bundle's size is checked without the binary"
    (cd "$repo" && nice cargo build --locked -q -p sd35-server --bin sd35-server)
    bin="$repo/target/debug/sd35-server"
    stub=""
    check_carried_size
  fi
  LD_LIBRARY_PATH="$(cuda_library_path "$python")${stub:+:$stub}"
  export LD_LIBRARY_PATH
  check_links "$bin"
  work=$(mktemp -d "${TMPDIR:-/tmp}/sd35-device-bench-dry-run.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  out="$repo/target/device-bench-dry-run/result.json"
  rc=0
  PYTHONUNBUFFERED=1 nice "$python" "$repo/tools/device_bench.py" --dry-run --binary "$bin" \
    --wheels "$bundle/wheels" --work "$work" --out "$out" "$@" || rc=$?
  log "dry run: exit $rc in $(( $(date +%s) - started )) s; summary in ${out%.json}.md"
  exit "$rc"
  ;;
*)
  python=${PYTHON:-python3}
  bin=${SD35_SERVER_BIN:-$bundle/sd35-server}
  [ -x "$bin" ] || { log "$bin not found: run tools/device-bench.sh --prepare first (where Rust is)"; exit 1; }
  LD_LIBRARY_PATH=$(cuda_library_path "$python")
  export LD_LIBRARY_PATH
  check_links "$bin"
  export PYTHONUNBUFFERED=1
  exec "$python" "$repo/tools/device_bench.py" --binary "$bin" --wheels "$bundle/wheels" "$@"
  ;;
esac
