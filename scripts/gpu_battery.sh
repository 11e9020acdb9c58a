#!/usr/bin/env bash
# The standard GPU runs of the performance work, in one device call (about 9 minutes on an H200,
# close to the device tool's 10-minute limit for one command): the GPU tests (3 minutes), decode
# and mixed-step profiles (each with its stream timeline), the seed workload's overlap-on runs
# (large and small) and the cold-request benchmark. Everything lands in OUT (default: $OUT, as the device
# tool sets it) as files under the names benchmarks/results/ uses, traces gzipped and plots
# dropped (the device tool returns at most 8 files: the profiles and each seed run are tarred).
#
#   LORASERVE_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_battery.sh
set -uo pipefail

out=${1:-${OUT:?set OUT or pass a directory}}
commit=${LORASERVE_COMMIT:?set LORASERVE_COMMIT to the commit under test}
export HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logging its exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name at $commit $(date -u +%H:%M:%S)" | tee -a "$out/battery.log"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "   exit $?" | tee -a "$out/battery.log"
}

seed_run() {  # seed_run SET: one overlap-on run, tarred
    local dir=$out/h200-seed-$1-$commit
    mkdir -p "$dir"
    step "seed-$1" 240 python3 benchmarks/seed_workload.py --out-dir "$dir" --sets "$1" --modes on
    mv "$out/seed-$1.txt" "$dir/stdout.txt"
    rm -f "$dir"/*.png
    gzip -f "$dir"/*.trace.json 2>/dev/null
    for trace in "$dir"/*.trace.json.gz; do  # the forwards by kind (seed_steps.py), where a trace was kept
        [ -e "$trace" ] && python3 benchmarks/seed_steps.py "$trace" >"$dir/steps.txt" 2>&1
    done
    tar czf "$dir.tgz" -C "$out" "$(basename "$dir")" && rm -rf "$dir"
}

profile() {  # profile NAME ARGS...: profile_decode.py, then where its median step waits (stream_timeline.py)
    local name=$1
    shift
    step "$name" 120 python3 benchmarks/profile_decode.py "$@" --trace "/tmp/$name.json.gz"
    python3 benchmarks/stream_timeline.py "/tmp/$name.json.gz" >>"$out/$name.txt" 2>&1
}

mkdir -p "$out"
step gpu_tests 300 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider
profile "profile_decode_b16_a8_$commit" --batch 16 --adapters 8
profile "profile_decode_b9_a8_$commit" --batch 9 --adapters 8
profile "profile_mixed_b8_p400_a8_$commit" --batch 8 --adapters 8 --prefill 400
grep -h "wall clock" "$out"/profile_*.txt
tar czf "$out/profiles-$commit.tgz" -C "$out" $(cd "$out" && ls profile_*.txt) && rm -f "$out"/profile_*.txt
seed_run large
seed_run small
step "cold_start_h200_${commit}_stdout" 240 python3 benchmarks/cold_start.py --out "$out/cold_start_h200.json" --repeats 3
tail -n 3 "$out/gpu_tests.txt"
