#!/usr/bin/env bash
# What a LoRA adds to a request, on the CPU, side by side in one run (`make bench-adapters`,
# not part of `make test`): SD3.5 Medium at its published shapes (`sd35-fullsize write`,
# random bf16 weights, served CLIP-only so T5-XXL's files are removed at once), a random
# rank-16 LoRA on every attention and MLP linear of its transformer (`sd35-fullsize lora`),
# and `sd35-server generate` (release build, f32 on the CPU) at 512x512 for a few steps,
# without and with `--lora`, alternating, RUNS times each. It prints the seconds per sampling
# step (the steps' own times from the log) and per image (start to PNG written) of every run,
# then the ratios of the medians: with the adapter over without.
#
#   tools/bench-adapters.sh
#
# Environment: BENCH_DIR (working folder, default target/bench-adapters; removed at the end),
# RUNS (default 2), STEPS (default 2), SIZE (default 512), RANK (default 16),
# BENCH_THREADS (rayon threads; default: every core).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=${BENCH_DIR:-$repo/target/bench-adapters}
runs=${RUNS:-2}
steps=${STEPS:-2}
size=${SIZE:-512}
rank=${RANK:-16}
[ -n "${BENCH_THREADS:-}" ] && export RAYON_NUM_THREADS=$BENCH_THREADS

log() { printf '[bench-adapters %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
cleanup() { rm -rf "$work/medium" "$work/lora.safetensors" "$work"/*.png; }
trap cleanup EXIT

log "building sd35-server (release) and sd35-fullsize"
"${CARGO:-cargo}" build --locked -q --release -p sd35-server --bin sd35-server
"${CARGO:-cargo}" build --locked -q -p sd35-e2e --bin sd35-fullsize
server=$repo/target/release/sd35-server
fullsize=$repo/target/debug/sd35-fullsize

mkdir -p "$work"
need=$("$fullsize" size --variant medium | python3 -c 'import json, sys; print(json.load(sys.stdin)["total_bytes"])')
free=$(df --output=avail -B1 "$work" | tail -1)
if [ "$free" -lt $((need + (1 << 30))) ]; then
  log "skipped: the Medium model takes $((need >> 30)) GiB while it is written, $((free >> 30)) GiB are free under $work"
  exit 1
fi
rm -rf "$work/medium"
"$fullsize" write --variant medium --out "$work/medium" --tokenizers inference/testdata/sd35-tiny-medium >&2
rm -rf "$work/medium/text_encoder_3"
"$fullsize" lora --variant medium --rank "$rank" --out "$work/lora.safetensors"

# One image; prints "<seconds per step> <seconds in all>".
run() {
  local out=$work/$1.png started ended
  shift
  started=$(date +%s.%N)
  "$server" generate --model "$work/medium" --device cpu --no-t5 --prompt "a lighthouse at dusk" \
    --width "$size" --height "$size" --steps "$steps" --seed 1 --out "$out" "$@" 2>"$work/run.log"
  ended=$(date +%s.%N)
  # The log's "step done" lines carry each step's seconds.
  awk -v all="$(awk -v a="$started" -v b="$ended" 'BEGIN { print b - a }')" '
    /step done/ { for (i = 1; i <= NF; i++) if ($i ~ /^seconds=/) { split($i, kv, "="); s += kv[2]; n++ } }
    END { printf "%.2f %.2f\n", s / n, all }' "$work/run.log"
}

cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
log "Medium ${size}x${size}, $steps steps, f32 on the CPU ($cpu, $(nproc) threads), rank-$rank LoRA, $runs runs each"
base=() adapted=()
for i in $(seq "$runs"); do
  read -r step all < <(run base)
  base+=("$step $all")
  log "run $i without --lora: $step s per step, $all s in all"
  read -r step all < <(run lora --lora "$work/lora.safetensors")
  adapted+=("$step $all")
  log "run $i with --lora:    $step s per step, $all s in all"
done

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
column_of() { local c=$1; shift; printf '%s\n' "$@" | awk -v c="$c" '{ print $c }'; }
b_step=$(column_of 1 "${base[@]}" | median)
b_all=$(column_of 2 "${base[@]}" | median)
a_step=$(column_of 1 "${adapted[@]}" | median)
a_all=$(column_of 2 "${adapted[@]}" | median)
printf 'CPU: %s, %s threads\n' "$cpu" "$(nproc)"
printf 'SD3.5 Medium (published shapes, random weights, CLIP only), %sx%s, %s steps, f32\n' "$size" "$size" "$steps"
printf '%-22s %14s %14s\n' "" "s per step" "s per image"
printf '%-22s %14s %14s\n' "without --lora" "$b_step" "$b_all"
printf '%-22s %14s %14s\n' "with a rank-$rank LoRA" "$a_step" "$a_all"
awk -v bs="$b_step" -v ba="$b_all" -v as="$a_step" -v aa="$a_all" \
  'BEGIN { printf "%-22s %14.3f %14.3f\n", "ratio (with/without)", as / bs, aa / ba }'
