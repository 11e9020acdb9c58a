#!/usr/bin/env bash
# The standard GPU runs, in one device call (about 9 minutes on an H200): the GPU tests, decode
# and mixed-step profiles (each with its stream timeline), the seed workload's overlap-on runs
# (large and small) and the cold-request benchmark. Into OUT (default: $OUT, as the device tool
# sets it): the result files to copy into benchmarks/results/ (seed-large-<commit>.json,
# seed-small-<commit>.json, cold-start-<commit>.json), battery.log, and raw-<commit>.tgz with
# everything else (test log, profiles, per-request JSON, traces), which is not committed.
#
#   LORASERVE_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_battery.sh
set -uo pipefail

out=${1:-${OUT:?set OUT or pass a directory}}
commit=${LORASERVE_COMMIT:?set LORASERVE_COMMIT to the commit under test}
export LORASERVE_COMMIT=$commit HF_HUB_OFFLINE=1
raw=$out/raw-$commit

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit into raw/NAME.txt, logging its exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name at $commit $(date -u +%H:%M:%S)" | tee -a "$out/battery.log"
    timeout "$limit" "$@" >"$raw/$name.txt" 2>&1
    echo "   exit $?" | tee -a "$out/battery.log"
}

seed_run() {  # seed_run SET: one overlap-on run; its result file to OUT, the rest to raw/
    local dir=$raw/seed-$1
    mkdir -p "$dir"
    step "seed-$1" 240 python3 -m benchmarks.seed_workload --out-dir "$dir" --sets "$1" --modes on
    mv "$dir/seed-$1-$commit.json" "$out/" 2>/dev/null
    rm -f "$dir"/*.png
    gzip -f "$dir"/*.trace.json 2>/dev/null
    for trace in "$dir"/*.trace.json.gz; do  # the forwards by kind, where a trace was kept
        [ -e "$trace" ] && python3 -m benchmarks.seed_steps "$trace" >"$dir/steps.txt" 2>&1
    done
}

profile() {  # profile NAME ARGS...: profile_decode, then where its median step waits (stream_timeline)
    local name=$1
    shift
    step "$name" 120 python3 -m benchmarks.profile_decode "$@" --trace "/tmp/$name.json.gz"
    python3 -m benchmarks.stream_timeline "/tmp/$name.json.gz" >>"$raw/$name.txt" 2>&1
}

mkdir -p "$raw"
step gpu_tests 300 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider
profile profile_decode_b16_a8 --batch 16 --adapters 8
profile profile_decode_b9_a8 --batch 9 --adapters 8
profile profile_mixed_b8_p400_a8 --batch 8 --adapters 8 --prefill 400
grep -h "wall clock\|step span" "$raw"/profile_*.txt
seed_run large
seed_run small
step cold_start 240 python3 -m benchmarks.cold_start --out "$out/cold-start-$commit.json" --repeats 3
tail -n 3 "$raw/gpu_tests.txt"
tar czf "$raw.tgz" -C "$out" "$(basename "$raw")" && rm -rf "$raw"
