#!/usr/bin/env bash
# Real shapes on the CPU (`make check-full-size`, not part of `make test`): SD3.5 at its
# published sizes, with random bf16 weights, through the path a deployment takes. For each
# variant:
#   1. `sd35-fullsize write`: the diffusers repository (published configs, transformer and
#      T5-XXL sharded with their index; tokenizers copied from the tiny test model: only shapes
#      matter here, and its ids are valid ids of the real vocabularies), plus `sha256sums.txt`;
#   2. `sd35-fullsize mirror` serves it on loopback as an `http` mirror, and
#      `sd35-server fetch --http-url` fills a cache from it;
#   3. per precision (bf16, fp8): `sd35-server build-engine`, then `sd35-server serve --device
#      cpu` asked for one image of one step (Medium 512², Large 256²) over HTTP.
# It prints, per engine, the load time (start to /readyz), the server's peak RSS (VmHWM, which
# counts mapped weight files, and the peak of RssAnon sampled twice a second) beside the
# memory plan (`sd35-server plan --device cpu --json`) and the server's own `/v1/models`
# memory block. T5 is loaded where the plan's peak with T5 fits the memory budget (this
# machine's MemTotal unless FULL_SIZE_MEMORY_GIB says otherwise); otherwise the engine is
# served CLIP-only (--no-t5) and the table says so. A variant runs only when its largest
# planned peak fits in MemAvailable now and the disk holds two copies of its weights (the
# mirror and the cache, then the cache and an engine); otherwise it says why and skips.
# Big files are removed as soon as no later stage needs them.
#
#   tools/check-full-size.sh [medium] [large]     # default: both
#
# Environment: FULL_SIZE_DIR (working folder, default target/full-size; logs stay in its logs/),
# FULL_SIZE_MEMORY_GIB, FULL_SIZE_KEEP=1 (a failed run leaves its model files to look into).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(medium large)
for v in "${variants[@]}"; do
  case $v in medium | large) ;; *) echo "check-full-size: unknown variant '$v' (medium or large)" >&2; exit 2 ;; esac
done

work=${FULL_SIZE_DIR:-$repo/target/full-size}
mem_total_kib=$(awk '/^MemTotal:/{print $2}' /proc/meminfo)
budget_bytes=$(awk -v gib="${FULL_SIZE_MEMORY_GIB:-}" -v kib="$mem_total_kib" \
  'BEGIN { if (gib != "") printf "%.0f", gib * 2^30; else printf "%.0f", kib * 1024 }')
budget_label=${FULL_SIZE_MEMORY_GIB:+FULL_SIZE_MEMORY_GIB}
budget_label=${budget_label:-MemTotal}
cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
threads=$(nproc)
avx512=$(grep -q avx512f /proc/cpuinfo && echo "AVX-512" || echo "no AVX-512")

log() { printf '[check-full-size %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
gib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 2^30 }'; }
gb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e9 }'; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }

# The big files: only these folders of the working folder are ever removed.
remove_model_files() {
  rm -rf "$work/medium-mirror" "$work/medium-cache" "$work/large-mirror" "$work/large-cache"
}

# Processes this script started, stopped on exit (by their ids).
pids=()
stop_started() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
finish() {
  local rc=$?
  stop_started
  if [ "$rc" -ne 0 ]; then
    if [ "${FULL_SIZE_KEEP:-}" = 1 ]; then
      log "failed; the files are kept in $work (logs in $work/logs)"
    else
      log "failed; logs kept in $work/logs, the model files removed (FULL_SIZE_KEEP=1 keeps them)"
      remove_model_files
    fi
  fi
}
trap finish EXIT

log "building sd35-server (release) and sd35-fullsize"
"${CARGO:-cargo}" build --locked -q --release -p sd35-server --bin sd35-server
"${CARGO:-cargo}" build --locked -q -p sd35-e2e --bin sd35-fullsize
server=$repo/target/release/sd35-server
fullsize=$repo/target/debug/sd35-fullsize
tokenizers=$repo/inference/testdata/sd35-tiny-medium

logs=$work/logs
remove_model_files
rm -rf "$logs"
mkdir -p "$logs"

plan_json() { # variant precision size [--t5]
  "$server" plan --variant "$1" --precision "$2" --width "$3" --height "$3" --device cpu ${4:-} --json
}

# Rows of the summary: variant engine t5 load weights-load image vmhwm anon plan_peak
# plan_weights server_weights server_peak note
rows=()
# Rows of the stage timings: variant stage seconds
stages=()
skipped=()
disk=()

stage_done() {
  local seconds
  seconds=$(since "$3")
  stages+=("$1|$2|$seconds")
  log "$1: $2 done in $seconds s"
}

free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

# serve_once variant precision size t5(yes|no) model engine
serve_once() {
  local variant=$1 precision=$2 size=$3 t5=$4 model=$5 engine=$6
  local port out=$logs/$variant-$precision
  port=$(free_port)
  local args=(serve --model "$model" --engine "$engine" --device cpu --host 127.0.0.1 --port "$port"
    --default-width "$size" --default-height "$size" --default-steps 1 --request-timeout-seconds 7200)
  [ "$t5" = yes ] || args+=(--no-t5)
  local started pid sampler
  started=$(now)
  "$server" "${args[@]}" >"$out.serve.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  # RssAnon (memory the process owns, without mapped files) sampled twice a second, and the
  # latest VmHWM (kept should the process die before it is read at the end).
  (
    max=0
    while [ -r "/proc/$pid/status" ]; do
      read -r kib hwm < <(awk '/^RssAnon:/{a=$2} /^VmHWM:/{h=$2} END {print a+0, h+0}' "/proc/$pid/status" 2>/dev/null || echo "0 0")
      [ "$kib" -le "$max" ] || max=$kib
      [ "$hwm" -eq 0 ] || echo "$max $hwm" >"$out.memory"
      sleep 0.5
    done
  ) &
  sampler=$!
  pids+=("$sampler")
  log "$variant $precision: serving (T5 $t5), waiting for /readyz"
  until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$out.serve.log" >&2
      echo "check-full-size: $variant $precision: the server exited while loading (log: $out.serve.log)" >&2
      return 1
    fi
    sleep 0.5
  done
  local load_s weights_s
  load_s=$(since "$started")
  # The server's own "model loaded" time: the weights alone, before the engine's smoke check
  # and the warm-up image that /readyz also waits for.
  weights_s=$(sed 's/\x1b\[[0-9;]*m//g' "$out.serve.log" | sed -n 's/.*model loaded seconds=\([0-9]*\).*/\1/p' | head -n 1)
  log "$variant $precision: ready after $load_s s; requesting one ${size}x${size} image, 1 step"
  curl -sf "http://127.0.0.1:$port/v1/models" >"$out.models.json"
  local image_started code
  image_started=$(now)
  code=$(curl -s -o "$out.png" -w '%{http_code}' -H 'content-type: application/json' \
    -d "{\"prompt\": \"a lighthouse on a cliff at dawn\", \"width\": $size, \"height\": $size, \"steps\": 1, \"seed\": 7}" \
    "http://127.0.0.1:$port/v1/txt2img" || true)
  local image_s
  image_s=$(since "$image_started")
  local hwm_kib anon_kib alive=yes
  hwm_kib=$(awk '/^VmHWM:/{print $2}' "/proc/$pid/status" 2>/dev/null || true)
  kill -0 "$pid" 2>/dev/null || alive=no
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  pids=()
  read -r anon_kib last_hwm_kib < <(cat "$out.memory" 2>/dev/null || echo "0 0")
  hwm_kib=${hwm_kib:-$last_hwm_kib}
  local note=ok
  if [ "$alive" = no ]; then
    tail -n 30 "$out.serve.log" >&2
    note="the server exited during the request (log: $out.serve.log)"
    log "$variant $precision: $note"
  elif [ "$code" != 200 ] || [ "$(head -c 4 "$out.png" | od -An -tx1 | tr -d ' ')" != 89504e47 ]; then
    note="image request answered HTTP $code: $(head -c 300 "$out.png" | tr -d '\n')"
    log "$variant $precision: $note"
  else
    log "$variant $precision: image in $image_s s ($(stat -c %s "$out.png") bytes of PNG)"
  fi
  local t5_loaded
  t5_loaded=$(jq -r '.data[0].t5_loaded' "$out.models.json")
  if [ "$t5_loaded" != "$([ "$t5" = yes ] && echo true || echo false)" ]; then
    note="$note; /v1/models says t5_loaded=$t5_loaded, expected T5 $t5"
  fi
  local plan_args=""
  [ "$t5" = no ] || plan_args=--t5
  local plan
  plan=$(plan_json "$variant" "$precision" "$size" $plan_args)
  local m='.data[0].memory'
  rows+=("$variant|$precision|$t5|$load_s|${weights_s:-?}|$image_s|$((hwm_kib * 1024))|$((anon_kib * 1024))|$(jq .peak_bytes <<<"$plan")|$(jq .weights_bytes <<<"$plan")|$(jq "$m.weights_bytes // 0" "$out.models.json")|$(jq "$m.default_request.peak_bytes // 0" "$out.models.json")|$note")
}

run_variant() {
  local variant=$1 size
  case $variant in medium) size=512 ;; large) size=256 ;; esac
  # Which engines run, and whether with T5: the plan decides.
  local precisions=() t5s=() largest=0
  for precision in bf16 fp8; do
    local with without
    with=$(plan_json "$variant" "$precision" "$size" --t5 | jq .peak_bytes)
    without=$(plan_json "$variant" "$precision" "$size" | jq .peak_bytes)
    if [ "$with" -le "$budget_bytes" ]; then
      precisions+=("$precision"); t5s+=(yes); largest=$((with > largest ? with : largest))
      log "$variant $precision: plan $(gib "$with") GiB with T5 fits $(gib "$budget_bytes") GiB ($budget_label): T5 loaded"
    elif [ "$without" -le "$budget_bytes" ]; then
      precisions+=("$precision"); t5s+=(no); largest=$((without > largest ? without : largest))
      log "$variant $precision: plan $(gib "$with") GiB with T5 exceeds $(gib "$budget_bytes") GiB ($budget_label); CLIP-only plans $(gib "$without") GiB: served without T5"
    else
      skipped+=("$variant $precision: the plan needs $(gib "$without") GiB even CLIP-only, over $(gib "$budget_bytes") GiB ($budget_label)")
      log "${skipped[-1]}"
    fi
  done
  if [ ${#precisions[@]} -eq 0 ]; then return 0; fi
  local available
  available=$(($(awk '/^MemAvailable:/{print $2}' /proc/meminfo) * 1024))
  if [ "$available" -lt "$largest" ]; then
    skipped+=("$variant: its largest planned peak is $(gib "$largest") GiB and only $(gib "$available") GiB is available now; run it again when the machine is quieter")
    log "${skipped[-1]}"
    return 0
  fi
  local weights need free
  weights=$("$fullsize" size --variant "$variant" | jq .total_bytes)
  need=$((2 * weights + (2 << 30)))
  mkdir -p "$work"
  free=$(($(df -Pk "$work" | awk 'NR==2 {print $4}') * 1024))
  if [ "$free" -lt "$need" ]; then
    skipped+=("$variant: needs $(gb "$need") GB free in $work (two copies of its $(gb "$weights") GB of weights, plus 2 GiB), has $(gb "$free") GB")
    log "${skipped[-1]}"
    return 0
  fi
  log "$variant: $(gb "$weights") GB of weights; disk needed at most $(gb "$need") GB, $(gb "$free") GB free"
  disk+=("$variant: $(gb "$weights") GB of weights, at most $(gb "$need") GB of disk (mirror and cache, then cache and the bf16 engine, plus 2 GiB)")

  local mirror=$work/$variant-mirror cache=$work/$variant-cache key=full-size-$variant t
  t=$(now)
  log "$variant: writing the repository"
  "$fullsize" write --variant "$variant" --out "$mirror" --tokenizers "$tokenizers" | tee "$logs/$variant-write.log" >&2
  stage_done "$variant" write "$t"
  t=$(now)
  log "$variant: sha256sums.txt"
  (cd "$mirror" && find . -type f -printf '%P\n' | sort | xargs -d '\n' -n 4 -P "$threads" sha256sum | sort -k 2 >"$work/sha256sums.txt")
  mv "$work/sha256sums.txt" "$mirror/sha256sums.txt"
  stage_done "$variant" sha256 "$t"

  t=$(now)
  "$fullsize" mirror --root "$mirror" >"$logs/$variant-mirror.url" 2>"$logs/$variant-mirror.log" &
  local mirror_pid=$!
  pids+=("$mirror_pid")
  local url=""
  for _ in $(seq 100); do
    url=$(head -n 1 "$logs/$variant-mirror.url" 2>/dev/null || true)
    [ -z "$url" ] || break
    sleep 0.1
  done
  [ -n "$url" ] || { echo "check-full-size: the mirror did not start (log: $logs/$variant-mirror.log)" >&2; return 1; }
  log "$variant: fetching from the mirror at $url"
  "$server" fetch --http-url "$url" --variant "$variant" --cache-root "$cache" --cache-key "$key" \
    >"$logs/$variant-fetch.log" 2>&1 || { tail -n 30 "$logs/$variant-fetch.log" >&2; return 1; }
  kill "$mirror_pid" 2>/dev/null || true
  wait "$mirror_pid" 2>/dev/null || true
  pids=()
  rm -rf "$mirror"
  stage_done "$variant" fetch "$t"

  local i
  for i in "${!precisions[@]}"; do
    local precision=${precisions[$i]} engine_key=$key-${precisions[$i]}
    t=$(now)
    log "$variant: building the $precision engine"
    "$server" build-engine --cache-root "$cache" --cache-key "$key" --engine-key "$engine_key" \
      --precision "$precision" >"$logs/$variant-build-$precision.log" 2>&1 ||
      { tail -n 30 "$logs/$variant-build-$precision.log" >&2; return 1; }
    log "$variant: $precision engine $(du -sh "$cache/engines/$engine_key" | cut -f1)"
    stage_done "$variant" "build $precision" "$t"
    t=$(now)
    serve_once "$variant" "$precision" "$size" "${t5s[$i]}" "$cache/models/$key" "$cache/engines/$engine_key"
    stage_done "$variant" "serve $precision" "$t"
    rm -rf "$cache/engines/$engine_key"
  done
  rm -rf "$cache"
}

started=$(now)
for v in "${variants[@]}"; do
  run_variant "$v"
done

echo
echo "SD3.5 at full size on the CPU: $cpu ($avx512), $threads threads; random bf16 weights"
echo "Budget for T5: $(gib "$budget_bytes") GiB ($budget_label). Sizes: Medium 512x512, Large 256x256; 1 step, guidance as the model card (CFG: batch 2)."
echo "load = start to /readyz (weights, the engine's smoke image, a warm-up image); weights = the server's own 'model loaded' time."
echo "peak RSS = VmHWM (includes pages of the mapped weight files); anon = peak RssAnon, sampled every 0.5 s."
echo "plan = sd35-server plan --device cpu (computed); server = /v1/models memory block (its weights, its plan for this size)."
echo
header=(variant engine T5 "load s" "weights s" "image s" "peak RSS GiB" "anon GiB" "plan peak GiB"
  "plan weights GiB" "server weights GiB" "server plan GiB" result)
format='%-7s  %-6s  %-9s  %6s  %9s  %7s  %12s  %8s  %13s  %16s  %18s  %15s  %s\n'
# shellcheck disable=SC2059
printf "$format" "${header[@]}"
for row in "${rows[@]}"; do
  IFS='|' read -r variant precision t5 load weights image hwm anon plan_peak plan_weights server_weights server_peak note <<<"$row"
  t5_word=$([ "$t5" = yes ] && echo loaded || echo "CLIP-only")
  # shellcheck disable=SC2059
  printf "$format" "$variant" "$precision" "$t5_word" "$load" "$weights" "$image" "$(gib "$hwm")" "$(gib "$anon")" \
    "$(gib "$plan_peak")" "$(gib "$plan_weights")" "$(gib "$server_weights")" "$(gib "$server_peak")" "$note"
done
for s in "${skipped[@]}"; do echo "skipped: $s"; done
for d in "${disk[@]}"; do echo "disk: $d"; done
echo
echo "Stage wall times:"
for s in "${stages[@]}"; do
  IFS='|' read -r variant stage seconds <<<"$s"
  printf '  %-7s %-12s %6s s\n' "$variant" "$stage" "$seconds"
done
echo "  total             $(since "$started") s"
[ "${FULL_SIZE_KEEP:-}" = 1 ] || remove_model_files
for row in "${rows[@]}"; do
  case $row in *"|ok") ;; *) exit 1 ;; esac
done
