#!/usr/bin/env bash
# Coverage-guided fuzzing of request parsing and validation (inference/api/fuzz, target
# `request`) for FUZZ_SECONDS (default 60) with a fixed seed, starting from the committed
# corpus; new inputs go to a temporary folder, so the tree stays clean. Prints libFuzzer's
# final statistics (runs, executions per second, new units). A crash fails the run and leaves
# its input under inference/api/fuzz/artifacts/request/.
#
# Needs rustup's nightly toolchain and cargo-fuzz (`.ci/run` installs both). Outside CI a
# missing one is a skip with a message; under CI it is a failure.
#
#   tools/fuzz.sh            # bounded run
#   tools/fuzz.sh merge DIR  # fold the inputs in DIR into the committed corpus, minimised
set -euo pipefail
cd "$(dirname "$0")/../inference/api"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  msg="needs rustup's nightly toolchain and cargo-fuzz (rustup toolchain install nightly; cargo install cargo-fuzz --locked)"
  if [ -n "${CI:-}" ]; then echo "fuzz: $msg" >&2; exit 1; fi
  echo "SKIPPED: fuzz $msg"
  exit 0
fi

if [ "${1:-}" = merge ]; then
  exec cargo +nightly fuzz run request fuzz/corpus/request "$2" -- -merge=1
fi

seconds=${FUZZ_SECONDS:-60}
new=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$new" "$log"' EXIT
echo "[fuzz] building the request target (nightly, sanitizer coverage)" >&2
cargo +nightly fuzz build request >&2
echo "[fuzz] request: ${seconds} s from $(ls fuzz/corpus/request | wc -l) committed inputs, seed 1" >&2
if ! cargo +nightly fuzz run request "$new" fuzz/corpus/request -- \
    -dict=fuzz/request.dict -seed=1 -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "fuzz: the request target failed; the input is under inference/api/fuzz/artifacts/request/" >&2
  exit 1
fi
grep -E '^(Done|stat::)' "$log"
echo "[fuzz] $(ls "$new" | wc -l) new inputs this run (tools/fuzz.sh merge DIR keeps them)" >&2
