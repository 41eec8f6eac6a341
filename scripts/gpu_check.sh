#!/usr/bin/env bash
# GPU check (issue 9): the test suite on CUDA in float32 and float64, then the speed benchmark on
# CUDA, each written to a results folder. Sized for 5-8 minutes on one GPU: every phase has
# its own time limit, so a hang costs one phase, not the run.
#
#   scripts/gpu_check.sh [OUT_DIR]          # default: gpu_check_results/
#
# Then commit OUT_DIR/speed-cuda.md as benchmarks/results/speed-cuda.md (with summary.txt's
# verdict in the commit message).
#
# Overrides (environment), e.g. to dry-run the logic on a machine without a GPU:
#   DEVICE=cpu TEST_PATHS="tests/test_speed_paths.py" SPEED_ARGS="--items 1 --sizes D=8 \
#     --rounds 1 --steps 2 --warmup 1" scripts/gpu_check.sh /tmp/gpu_check_dry
#   DEVICE       device under test (default cuda)
#   TEST_PATHS   what pytest runs (default: tests/ without the notebooks, which run on the CPU
#                whatever --device says; 3 min per dtype on the shared 2-core CPU)
#   TEST_LIMIT   seconds per pytest run (default 180)
#   SPEED_ARGS   extra benchmark options (default: shortened rounds, see below)
#   SPEED_LIMIT  seconds for the benchmark (default 120)
set -u -o pipefail

cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
OUT="${1:-gpu_check_results}"
TEST_PATHS="${TEST_PATHS:-tests/ --ignore=tests/test_tutorials.py}"
TEST_LIMIT="${TEST_LIMIT:-180}"
SPEED_LIMIT="${SPEED_LIMIT:-120}"
# fewer rounds than the CPU table: on a dedicated GPU the rounds barely differ
SPEED_ARGS="${SPEED_ARGS:---rounds 5 --steps 20 --warmup 5 --slow-rounds 2}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
status=0

log() { echo "$*" | tee -a "$summary"; }

python - > "$OUT/environment.txt" 2>&1 <<EOF
import platform, torch
print("torch", torch.__version__, "python", platform.python_version())
device = torch.device("$DEVICE")
if device.type == "cuda":
    if not torch.cuda.is_available():
        raise SystemExit("CUDA requested but torch.cuda.is_available() is False")
    print(torch.cuda.get_device_name(device), "capability", torch.cuda.get_device_capability(device))
    print("CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
else:
    print("device", device)
EOF
rc=$?
cat "$OUT/environment.txt"
if [ $rc -ne 0 ]; then
    log "environment: FAILED (see environment.txt)"
    exit 2
fi

# run_phase LABEL LIMIT LOG CMD...: run CMD under a time limit with its output in LOG, and
# record "passed"/"FAILED (why)" for it in the summary.
run_phase() {
    local label=$1 limit=$2 logfile=$3 begin=$SECONDS rc why
    shift 3
    timeout "$limit" "$@" > "$logfile" 2>&1
    rc=$?
    tail -n 1 "$logfile"
    if [ $rc -eq 0 ]; then
        log "$label: passed in $((SECONDS - begin)) s"
    else
        [ $rc -eq 124 ] && why="timed out after ${limit} s" || why="exit $rc"
        log "$label: FAILED ($why), see $logfile"
        status=1
    fi
}

for dtype in float32 float64; do
    # shellcheck disable=SC2086 # TEST_PATHS is a list of paths
    run_phase "pytest --device $DEVICE --dtype $dtype" "$TEST_LIMIT" "$OUT/pytest-$dtype.txt" \
        python -m pytest -q -p no:cacheprovider --device "$DEVICE" --dtype "$dtype" $TEST_PATHS
done

# The table (stdout) goes to speed-$DEVICE.md, progress and errors to speed-$DEVICE.stderr.
# shellcheck disable=SC2016,SC2086 # $0/$@ belong to the inner sh; SPEED_ARGS is a list of options
run_phase "benchmarks.speed --device $DEVICE (errors: speed-$DEVICE.stderr)" "$SPEED_LIMIT" \
    "$OUT/speed-$DEVICE.md" \
    sh -c 'exec python -m benchmarks.speed "$@" 2> "$0"' "$OUT/speed-$DEVICE.stderr" \
    --device "$DEVICE" $SPEED_ARGS
log "overall: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
