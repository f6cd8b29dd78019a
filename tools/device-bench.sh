#!/usr/bin/env bash
# The GPU benchmark (tools/device_bench.py): one command on a CUDA 13 machine with PyTorch and no
# Rust toolchain. What it needs from this repository is prepared beforehand, on any Linux
# machine with Rust, into target/cuda/ (about 40 MiB; carry that folder to the GPU machine):
#
#   tools/device-bench.sh --prepare     # the CUDA build (tools/cuda/build.sh) + the diffusers wheel
#   tools/device-bench.sh [ARGS...]     # on the GPU machine; ARGS go to tools/device_bench.py
#
# The binary's CUDA libraries (cuBLAS, cuBLASLt, cuRAND, NVRTC, the CUDA runtime) are taken from
# the Python environment's NVIDIA wheels (what PyTorch itself loads), else from /usr/local/cuda;
# the driver's libcuda from the system. diffusers is installed from the carried wheel into a
# scratch directory when the environment lacks it.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle="$repo/target/cuda"
diffusers_version=0.42.1
python=${PYTHON:-python3}

if [ "${1:-}" = --prepare ]; then
  SD35_CUDA_OUT="$bundle" bash "$repo/tools/cuda/build.sh" >/dev/null
  rm -rf "$bundle/wheels"
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$bundle/wheels" "diffusers==$diffusers_version"
  du -sh "$bundle"
  exit 0
fi

bin=${SD35_SERVER_BIN:-$bundle/sd35-server}
[ -x "$bin" ] || { echo "$bin not found: run tools/device-bench.sh --prepare first (where Rust is)" >&2; exit 1; }

if ! "$python" -c 'import diffusers' 2>/dev/null; then
  wheel=$(ls "$bundle"/wheels/diffusers-*.whl 2>/dev/null | head -n1 || true)
  [ -n "$wheel" ] || { echo "diffusers is not installed and no wheel is in $bundle/wheels" >&2; exit 1; }
  site=$(mktemp -d)
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$wheel"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# CUDA libraries: the directories of the NVIDIA wheels, the toolkit, the driver.
libs=$("$python" - <<'PY'
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
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if missing=$(ldd "$bin" | grep 'not found'); then
  echo "$bin cannot find these libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
  echo "$missing" >&2
  exit 1
fi

export PYTHONUNBUFFERED=1
exec "$python" "$repo/tools/device_bench.py" --binary "$bin" "$@"
