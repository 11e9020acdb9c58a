#!/usr/bin/env bash
# A change against an earlier tree on one GPU, in one device call: each run alternates
# before (BASE, an unpacked earlier commit) and after (this tree), so both meet the same machine.
# Runs, by name: profiles (profile_decode at batch 9 and a mixed step), step-times (the mixed
# step with and without adapters and the decode step, timed in one engine a side; STEP_RANK),
# seed-large and seed-small (seed_workload; SEED_MODES, default "on", and SEED_MODES_BEFORE for
# an older tree that lacks a mode), gpu-tests (this tree only). Into OUT: one log per run and
# side, and each side's seed result file. SIDE_TIMEOUT bounds one benchmark run (seconds,
# default 300).
#
#   git archive OLD | tar x -C .baseline
#   LORASERVE_COMMIT=$(git rev-parse --short HEAD) BASE_COMMIT=OLD \
#       bash scripts/gpu_before_after.sh .baseline profiles seed-large gpu-tests
set -uo pipefail

base=$(cd "${1:?usage: gpu_before_after.sh BASE_DIR RUN...}" && pwd)
shift
out=${OUT:?set OUT}
after=$(pwd)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

module() {  # module DIR NAME: how DIR runs benchmark NAME (a package, or scripts by path in older trees)
    if [ -e "$1/benchmarks/__init__.py" ]; then echo "-m benchmarks.$2"; else echo "benchmarks/$2.py"; fi
}

side() {  # side before|after LOG ARGS...: one benchmark run in that side's tree, with its own imports
    local which=$1 log=$2
    shift 2
    local dir=$after commit=${LORASERVE_COMMIT:-unknown}
    [ "$which" = before ] && dir=$base commit=${BASE_COMMIT:-unknown}
    echo "== $which $commit: $* ($(date -u +%H:%M:%S))" | tee -a "$out/before_after.log"
    (cd "$dir" && LORASERVE_COMMIT=$commit PYTHONPATH=$dir:${PYTHONPATH:-} timeout "${SIDE_TIMEOUT:-300}" python3 "$@") >"$out/$log" 2>&1
    echo "   exit $?" | tee -a "$out/before_after.log"
}

both() {  # both NAME BENCHMARK ARGS...: before, then after
    local name=$1 benchmark=$2
    shift 2
    for which in before after; do
        local dir=$after
        [ "$which" = before ] && dir=$base
        # shellcheck disable=SC2046  # the module's words are meant to split
        side "$which" "$name-$which.txt" $(module "$dir" "$benchmark") "$@"
    done
}

seed() {  # seed SET: both sides' result files into OUT, traces and pictures left behind
    local after_modes=${SEED_MODES:-on}
    for which in before after; do
        local dir=$after modes=$after_modes
        [ "$which" = before ] && dir=$base modes=${SEED_MODES_BEFORE:-$after_modes}
        # shellcheck disable=SC2046,SC2086  # the module's words and the modes are meant to split
        side "$which" "seed-$1-$which.txt" $(module "$dir" seed_workload) --out-dir "/tmp/seed-$1-$which" \
            --sets "$1" --modes $modes
        mkdir -p "$out/$which" && cp /tmp/seed-"$1"-"$which"/seed-*.json "$out/$which/" 2>/dev/null
    done
}

for run in "$@"; do
    case $run in
        profiles)
            both profile-b9 profile_decode --batch 9 --adapters 8
            both profile-mixed profile_decode --batch 8 --adapters 8 --prefill 400
            grep -H "wall clock" "$out"/profile-*.txt ;;
        step-times)  # this tree's script on both sides' code: one engine per side times all three steps
            for which in before after; do
                side "$which" "step-times-$which.txt" "$after/benchmarks/step_times.py" --rank "${STEP_RANK:-16}"
            done
            grep -H "ms\|against" "$out"/step-times-*.txt ;;
        seed-large | seed-small) seed "${run#seed-}" ;;
        gpu-tests)
            echo "== gpu tests ($(date -u +%H:%M:%S))" | tee -a "$out/before_after.log"
            timeout "${GPU_TESTS_TIMEOUT:-280}" python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider >"$out/gpu-tests-after.txt" 2>&1
            tail -n 3 "$out/gpu-tests-after.txt" ;;
        *) echo "unknown run: $run" >&2; exit 2 ;;
    esac
done
