#!/usr/bin/env bash
# Makes (once) the Python virtual environment the tests use to drive the server with real
# clients (tests/python/requirements.txt), in a per-user cache keyed by the pinned
# requirements and the Python version; prints its interpreter's path on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req="$here/tests/python/requirements.txt"
python=${PYTHON:-python3}
key=$( (cat "$req"; "$python" --version) | sha256sum | cut -c1-16)
cache_root="${SD35_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sd35-operator}"
venv="$cache_root/python/$key"

if [ ! -f "$venv/.complete" ]; then
  echo "[python-env] installing $(grep -cv '^#' "$req") pinned packages into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
