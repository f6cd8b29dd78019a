#!/usr/bin/env bash
# Makes (once) the Python environment `tools/device-bench.sh --dry-run` runs the device
# benchmark with on the CPU: the pinned packages of tools/device-bench-requirements.txt (torch
# with NVIDIA's CUDA wheels, transformers, accelerate, ...; what the GPU machines' image has), in
# a per-user cache keyed by the pins, this script and the Python version. Prints its
# interpreter's path on stdout; progress goes to stderr.
#
# The first install downloads about 4 GB (torch and its CUDA wheels) and takes minutes; later
# calls find the environment complete and return at once.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
req="$here/device-bench-requirements.txt"
python=${PYTHON:-python3}
key=$( (cat "$req" "${BASH_SOURCE[0]}"; "$python" --version) | sha256sum | cut -c1-16)
cache_root="${SD35_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sd35-operator}"
venv="$cache_root/device-bench-python/$key"

if [ ! -f "$venv/.complete" ]; then
  echo "[device-bench-env] installing $(grep -cEv '^(#|$)' "$req") pinned packages and their" \
    "dependencies (torch brings several GB of CUDA wheels) into $venv" >&2
  start=$(date +%s)
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir -r "$req" >&2
  touch "$venv/.complete"
  echo "[device-bench-env] installed in $(( $(date +%s) - start ))s ($(du -sh "$venv" | cut -f1))" >&2
fi
echo "$venv/bin/python"
