#!/usr/bin/env bash
# The GPU benchmark (tools/device_bench.py) and what it carries. The GPU machine has CUDA 13,
# PyTorch and no Rust toolchain, and reaches no network; what it needs from here is packed into
# target/device-bench/ (the bundle) on a machine with Rust, then carried with the working tree:
#
#   tools/device-bench.sh --prepare     # here: the CUDA build (tools/cuda/build.sh, into
#                                       # target/cuda/), packed; the carried wheels
#                                       # (tools/device-bench-wheels.txt)
#   tools/device-bench.sh [ARGS...]     # there: ARGS go to tools/device_bench.py, e.g.
#                                       # --out "$OUT/device-bench.json" --skip-fp8-build
#   tools/device-bench.sh --dry-run [ARGS...]
#                                       # here, on the CPU: the same script and bundle, small
#                                       # shapes, in the Python environment of
#                                       # tools/device-bench-env.sh (made once per user).
#                                       # `make device-bench-dry-run`.
#
# The bundle: sd35-server.xz (the stripped CUDA build, about 5 MiB instead of 26: the working
# tree and the bundle together must fit the 64 MiB a GPU machine is sent, and --prepare and
# --dry-run check that they do), its sha256, and wheels/. Packed and unpacked with Python's
# lzma, which every Python has.
#
# The binary's CUDA libraries (cuBLAS, cuBLASLt, cuRAND) are taken from the Python environment's
# NVIDIA wheels (what PyTorch itself loads), else from /usr/local/cuda; the driver's libcuda from
# the system. A dry run puts the build's driver stub on the library path (no driver here: the
# binary must start, and `--device cpu` never asks the driver).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="$repo/target/cuda"
bundle="$repo/target/device-bench"
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

# Packs target/cuda/sd35-server into the bundle, unless the packed one is that binary already.
pack_binary() {
  local sum
  sum=$(sha256sum "$build/sd35-server" | cut -d' ' -f1)
  if [ -f "$bundle/sd35-server.xz" ] && [ "$(cat "$bundle/sd35-server.sha256" 2>/dev/null)" = "$sum" ]; then
    return 0
  fi
  mkdir -p "$bundle"
  rm -f "$bundle/sd35-server.sha256"
  nice "${PYTHON:-python3}" -c 'import lzma, shutil, sys
with open(sys.argv[1], "rb") as src, lzma.open(sys.argv[2], "wb", preset=6) as dst:
    shutil.copyfileobj(src, dst, 1 << 20)' "$build/sd35-server" "$bundle/sd35-server.xz.tmp"
  mv "$bundle/sd35-server.xz.tmp" "$bundle/sd35-server.xz"
  echo "$sum" >"$bundle/sd35-server.sha256"
  log "packed $build/sd35-server ($(stat -c %s "$build/sd35-server") bytes) into" \
    "$bundle/sd35-server.xz ($(stat -c %s "$bundle/sd35-server.xz") bytes)"
}

# Unpacks the bundle's binary into the folder $2 with the Python $1; prints its path.
unpack_binary() {
  "$1" - "$bundle" "$2" <<'PY'
import hashlib, lzma, os, shutil, sys
bundle, dest = sys.argv[1:3]
out = os.path.join(dest, "sd35-server")
with lzma.open(os.path.join(bundle, "sd35-server.xz")) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
want = open(os.path.join(bundle, "sd35-server.sha256")).read().split()[0]
with open(out, "rb") as f:
    got = hashlib.sha256(f.read()).hexdigest()
if got != want:
    sys.exit(f"{out}: sha256 {got}, the bundle says {want}: run tools/device-bench.sh --prepare again")
os.chmod(out, 0o755)
print(out)
PY
}

# Whether what a GPU machine is sent fits its 64 MiB: the working tree (tracked and untracked
# files that git does not ignore) plus the bundle. Prints the sizes; fails when over.
check_carried_size() {
  local tree bundle_bytes total
  tree=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
  bundle_bytes=$(find "$bundle" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}')
  total=$((tree + bundle_bytes))
  log "carried: working tree $((tree / 1024 / 1024)) MiB + target/device-bench" \
    "$((bundle_bytes / 1024 / 1024)) MiB ($(cd "$bundle" 2>/dev/null && find . -type f -printf '%P %s B; ' 2>/dev/null))" \
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
  SD35_CUDA_OUT="$build" bash "$repo/tools/cuda/build.sh" >/dev/null
  pack_binary
  prepare_wheels
  check_carried_size
  log "bundle ready: carry target/device-bench; on the GPU machine run" \
    "tools/device-bench.sh --out \"\$OUT/device-bench.json\""
  ;;
--dry-run)
  shift
  started=$(date +%s)
  python=$(bash "$repo/tools/device-bench-env.sh")
  prepare_wheels
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/sd35-device-bench-dry-run.XXXXXX")
  trap 'rm -rf "$scratch"' EXIT
  stub=""
  if [ -x "$build/sd35-server" ]; then
    pack_binary
    check_carried_size
    mkdir "$scratch/bin"
    bin=$(unpack_binary "$python" "$scratch/bin")
    log "binary: the CUDA build, unpacked from the bundle ($bin), run with --device cpu and the driver stub"
    stub="$build/driver-stub"
    [ -e "$stub/libcuda.so.1" ] || { log "$stub/libcuda.so.1 missing: run make cuda"; exit 1; }
  else
    log "no CUDA build in $build (make cuda makes it): the dry run uses target/debug/sd35-server," \
      "and the bundle's size is checked without the binary"
    (cd "$repo" && nice cargo build --locked -q -p sd35-server --bin sd35-server)
    bin="$repo/target/debug/sd35-server"
    check_carried_size
  fi
  LD_LIBRARY_PATH="$(cuda_library_path "$python")${stub:+:$stub}"
  export LD_LIBRARY_PATH
  check_links "$bin"
  out="$repo/target/device-bench-dry-run/result.json"
  rc=0
  PYTHONUNBUFFERED=1 nice "$python" "$repo/tools/device_bench.py" --dry-run --binary "$bin" \
    --wheels "$bundle/wheels" --work "$scratch/work" --out "$out" "$@" || rc=$?
  log "dry run: exit $rc in $(($(date +%s) - started)) s; summary in ${out%.json}.md"
  exit "$rc"
  ;;
*)
  python=${PYTHON:-python3}
  if [ -n "${SD35_SERVER_BIN:-}" ]; then
    bin=$SD35_SERVER_BIN
  elif [ -f "$bundle/sd35-server.xz" ]; then
    # A bundle that does not unpack is reported by the preflight; the parts without it still run.
    bin=$(unpack_binary "$python" "$(mktemp -d "${TMPDIR:-/tmp}/sd35-device-bench-bin.XXXXXX")") ||
      bin="$bundle/sd35-server (not unpacked)"
  else
    log "$bundle/sd35-server.xz not found: run tools/device-bench.sh --prepare first (where Rust is)" \
      "and carry target/device-bench"
    exit 1
  fi
  LD_LIBRARY_PATH=$(cuda_library_path "$python")
  export LD_LIBRARY_PATH
  check_links "$bin"
  export PYTHONUNBUFFERED=1
  exec "$python" "$repo/tools/device_bench.py" --binary "$bin" --wheels "$bundle/wheels" "$@"
  ;;
esac
