#!/usr/bin/env bash
# Installs the CUDA 13.0 toolchain the `cuda` build needs (nvcc, ptxas, cicc, headers, cudart,
# cuBLAS, cuBLASLt, cuRAND, NVRTC) from the pinned NVIDIA wheels in requirements.txt beside this
# script, into a per-user cache directory keyed by those pins. No GPU, driver or system CUDA
# toolkit is needed. The tree gets what a toolkit install has and the wheels lack:
#   lib/libNAME.so        unversioned links, so `-lNAME` finds the libraries;
#   lib/stubs/libcuda.so  a driver stub (soname libcuda.so.1) that exports every function of
#                         cuda.h and answers CUDA_ERROR_STUB_LIBRARY, like the toolkit's own
#                         lib/stubs: binaries link against it and load the real driver at run
#                         time. It never belongs on a library path where a driver is installed;
#   bin/sd35-nvcc         nvcc that also embeds PTX in every object it compiles for one
#                         architecture, so static kernels run (JIT-compiled) on newer GPUs.
#
# Prints the toolkit root on stdout; progress goes to stderr. A complete tree is reused as is.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cuda_release=13.0
key=$( (cat "$here/toolkit.sh" "$here/requirements.txt"; uname -m) | sha256sum | cut -c1-16)
cache_root="${SD35_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sd35-operator}"
root="$cache_root/cuda/toolkit-$cuda_release-$key"

if [ -f "$root/.complete" ]; then
  echo "$root"
  exit 0
fi

log() { printf '[cuda-toolkit] %s\n' "$*" >&2; }
python=${PYTHON:-python3}
if ! "$python" -m pip --version >/dev/null 2>&1; then
  echo "tools/cuda/toolkit.sh needs Python 3 with pip (set PYTHON=...): apt-get install python3-pip" >&2
  exit 1
fi
for tool in gcc sha256sum; do
  command -v "$tool" >/dev/null || { echo "tools/cuda/toolkit.sh needs $tool" >&2; exit 1; }
done

mkdir -p "$cache_root/cuda"
tmp=$(mktemp -d "$cache_root/cuda/.toolkit-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

log "downloading the pinned CUDA $cuda_release wheels"
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
  --only-binary=:all: -r "$here/requirements.txt" -d "$tmp/wheels"

# Wheels are zip files; Python's zipfile keeps no file modes, so they are restored by hand.
log "unpacking"
"$python" - "$tmp/wheels" "$tmp/unpacked" <<'PY'
import os, sys, zipfile
src, dst = sys.argv[1:3]
for name in sorted(os.listdir(src)):
    with zipfile.ZipFile(os.path.join(src, name)) as z:
        for info in z.infolist():
            if not info.filename.startswith("nvidia/cu13/") or info.is_dir():
                continue
            out = os.path.join(dst, info.filename[len("nvidia/cu13/"):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(info) as f, open(out, "wb") as o:
                while chunk := f.read(1 << 20):
                    o.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(out, mode or 0o644)
PY
rm -rf "$tmp/wheels"
tree="$tmp/unpacked"

# What a toolkit install has beyond the wheels' files.
ln -s lib "$tree/lib64"
for lib in "$tree"/lib/lib*.so.*; do
  base=$(basename "$lib")
  case "$base" in *.alt.so.*|libnvrtc-builtins*) continue ;; esac
  ln -sf "$base" "$tree/lib/${base%%.so.*}.so"
done

log "making the driver stub"
mkdir -p "$tree/lib/stubs"
{
  cat <<'C'
/* Driver stub: every function answers CUDA_ERROR_STUB_LIBRARY (34); generated from cuda.h. */
typedef int CUresult;
static const char stub_message[] =
    "the CUDA driver library is a build stub: no NVIDIA driver is installed";
CUresult cuGetErrorString(CUresult error, const char **message) {
  (void)error;
  if (message) *message = stub_message;
  return 0;
}
CUresult cuGetErrorName(CUresult error, const char **name) {
  if (name) *name = error == 34 ? "CUDA_ERROR_STUB_LIBRARY" : "CUDA_ERROR_UNKNOWN";
  return 0;
}
C
  for defs in "" "-DCUDA_API_PER_THREAD_DEFAULT_STREAM=1"; do
    # shellcheck disable=SC2086
    gcc -E -P -x c $defs -I"$tree/include" "$tree/include/cuda.h"
  done | grep -oE 'CUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' \
    | sed -E 's/^CUresult[[:space:]]+//; s/[[:space:]]*\($//' | sort -u \
    | grep -vxE 'cuGetErrorString|cuGetErrorName' \
    | sed 's/.*/CUresult &(void) { return 34; }/'
} >"$tmp/libcuda-stub.c"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$tree/lib/stubs/libcuda.so" "$tmp/libcuda-stub.c"
ln -s libcuda.so "$tree/lib/stubs/libcuda.so.1"

cat >"$tree/bin/sd35-nvcc" <<'SH'
#!/usr/bin/env bash
# nvcc that turns `-gencode=arch=compute_NN,code=sm_NN` of an object compile (`-c`) into
# `code=[sm_NN,compute_NN]`: the object keeps its SASS and carries the PTX too, which the driver
# JIT-compiles on newer GPUs. PTX-only compiles (`--ptx`) and everything else pass unchanged.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
compile=0
for a in "$@"; do [ "$a" = -c ] && compile=1; done
args=()
for a in "$@"; do
  if [ "$compile" = 1 ] && [[ $a =~ ^-gencode=arch=(compute_[0-9]+[af]?),code=(sm_[0-9]+[af]?)$ ]]; then
    a="-gencode=arch=${BASH_REMATCH[1]},code=[${BASH_REMATCH[2]},${BASH_REMATCH[1]}]"
  fi
  args+=("$a")
done
exec "$here/nvcc" "${args[@]}"
SH
chmod 0755 "$tree/bin/sd35-nvcc"

version=$("$tree/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
if [ "$version" != "$cuda_release" ]; then
  echo "nvcc reports release '$version', expected $cuda_release" >&2
  exit 1
fi

touch "$tree/.complete"
rm -rf "$root"
mv "$tree" "$root"
log "installed CUDA $cuda_release ($(du -sh "$root" | cut -f1)) in $(( $(date +%s) - start ))s into $root"
echo "$root"
