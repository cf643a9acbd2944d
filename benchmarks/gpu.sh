#!/usr/bin/env bash
# Everything one lent-GPU call runs, from the repo root: build fastlm, then the cross-entropy benchmark, the GPU
# kernel tests, the attention and the training benchmarks. The call is one short lease, so every step runs under its own
# timeout (a hang costs that step, not the call) and all steps share one wall-clock deadline; the output that comes
# back is only the tail, so the tables are printed last.
#
#     bash benchmarks/gpu.sh                      # on the device machine, where $OUT is set
#     OUT=/tmp/gpu_dry SKIP="train_compiled" bash benchmarks/gpu.sh
#
# Environment (all optional):
#   OUT              where logs and JSON go (default /tmp/fastlm_gpu): build.log, tests.log, benchmarks.log and
#                    the benchmarks' JSON, 7 files (at most 8 come back from the device machine)
#   TOTAL            seconds for the whole script (default 540): a step gets min(its cap, time left - 10 s)
#   T_BUILD T_TESTS T_CE T_ATTN T_TRAIN T_HEAVY_TESTS T_TRAIN_COMPILED
#                    each step's cap in seconds (defaults 120 90 200 150 60 90 150)
#   TEST_FILES       the tests step's files (default: the CE, then the attention kernel tests)
#   HEAVY_TESTS      tests run apart, late (default: the attention hypothesis test of the Triton kernels: on a GPU
#                    each new shape autotunes, i.e. compiles and times every config, so it takes minutes);
#                    HEAVY_TESTS="" leaves them out
#   PYTEST_ARGS      (default "-v -rfE --durations=10": -v names the test in flight should a timeout stop pytest)
#   T_TEST_EACH      per-test timeout in seconds, where pytest-timeout is installed (default: none; it fails a
#                    hypothesis test mid-example, which hypothesis then reports as flaky)
#   CE_ARGS ATTN_ARGS TRAIN_ARGS    extra benchmark flags (defaults: "", "--quick", ""; ATTN_ARGS="" runs every
#                    attention case, in the budget's limits: each new head dim / mask kind autotunes ~15-22 configs
#                    and compiles FlexAttention; --quick starts with the head-dim-64 cases, forward+backward and
#                    decoding, so that the budget cuts d=128 first)
#   SKIP             steps not to run, space-separated: build tests cross_entropy attention train heavy_tests
#                    train_compiled
set -u
export PYTHONUNBUFFERED=1

OUT=${OUT:-/tmp/fastlm_gpu}
TOTAL=${TOTAL:-540}
T_BUILD=${T_BUILD:-120}
T_TESTS=${T_TESTS:-90}
T_CE=${T_CE:-200}
T_ATTN=${T_ATTN:-150}
T_TRAIN=${T_TRAIN:-60}
T_HEAVY_TESTS=${T_HEAVY_TESTS:-90}
T_TRAIN_COMPILED=${T_TRAIN_COMPILED:-150}
T_TEST_EACH=${T_TEST_EACH:-}
PYTEST_ARGS=${PYTEST_ARGS:--v -rfE --durations=10}
TEST_FILES=${TEST_FILES:-tests/kernels/test_cross_entropy.py tests/kernels/test_attention.py}
HEAVY_TESTS=${HEAVY_TESTS-tests/kernels/test_attention.py::test_triton_kernels_match_float64_reference}
CE_ARGS=${CE_ARGS:-}
ATTN_ARGS=${ATTN_ARGS---quick}
TRAIN_ARGS=${TRAIN_ARGS:-}
SKIP=${SKIP:-}

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
STARTED=$(date +%s)
DEADLINE=$((STARTED + TOTAL))
SCRATCH=$(mktemp -d)
SUMMARY=()   # one line per step: name, status, seconds
FAILED=()    # "name log" of each step that did not end well, to show its output's tail

elapsed() { echo $(($(date +%s) - STARTED)); }

# limit_for CAP: the seconds a step starting now may take: CAP, or less where the deadline is nearer.
limit_for() {
    local left=$((DEADLINE - $(date +%s) - 10))
    echo $(($1 < left ? $1 : left))
}

record() { SUMMARY+=("$(printf '%-16s %-14s %5ss' "$1" "$2" "$3")"); }

# step NAME CAP LOG COMMAND...: run COMMAND under limit_for CAP seconds, appending its output to LOG.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    if [[ " $SKIP " == *" $name "* ]]; then
        record "$name" skipped 0
        return 0
    fi
    local limit
    limit=$(limit_for "$cap")
    if ((limit < 20)); then
        echo "== $name: not run, only ${limit}s left"
        record "$name" no-time 0
        return 0
    fi
    echo "== $name: start $(date -u +%H:%M:%S), $(elapsed)s elapsed, limit ${limit}s: $*" | tee -a "$log"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    local rc=$? status
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL(rc=$rc)" ;;
    esac
    echo "== $name: $status after $(($(date +%s) - t0))s" | tee -a "$log"
    record "$name" "$status" $(($(date +%s) - t0))
    [[ $status == ok ]] || FAILED+=("$name $log")
}

# section NAME LOG: the output of step NAME, which shares LOG with other steps.
section() { awk -v start="== $1: start" -v end="== $1: " 'index($0, start) == 1 {on = 1} on {print}
    on && index($0, end) == 1 && index($0, start) != 1 {on = 0}' "$2"; }

# The checkout itself comes first on the path: every step imports this fastlm, installed or not.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# --- setup: carried peer wheels, the native build ------------------------------------------------------------------
BUILD_LOG=$OUT/build.log
{
    echo "== $(date -u) on $(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
} | tee -a "$BUILD_LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
    # Peers (Liger-Kernel, Cut-Cross-Entropy) travel as wheels: the device machine has no network.
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$BUILD_LOG" 2>&1; then
        export PYTHONPATH=$PYTHONPATH:/tmp/site
        echo "== wheels installed: $(cd .whl && ls *.whl | tr '\n' ' ')" | tee -a "$BUILD_LOG"
    else
        echo "== wheels FAILED to install (see build.log): peers will be missing" | tee -a "$BUILD_LOG"
    fi
fi

step build "$T_BUILD" "$BUILD_LOG" python3 -m pip install --no-index --no-build-isolation --no-deps -e .
if ! python3 -c "import fastlm._native" >>"$BUILD_LOG" 2>&1; then
    echo "== import fastlm._native failed after pip: building in place" | tee -a "$BUILD_LOG"
    # The developer recipe: CMake drops _native*.so straight into fastlm/.
    step build_in_place "$T_BUILD" "$BUILD_LOG" bash -c 'cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DFASTLM_BUILD_TESTS=OFF -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/fastlm" \
        -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
        && ninja -C build/gpu'
fi
if python3 -c "import fastlm._native" >>"$BUILD_LOG" 2>&1; then
    echo "== import fastlm._native: ok" | tee -a "$BUILD_LOG"
else
    echo "== import fastlm._native: FAILED (see build.log)" | tee -a "$BUILD_LOG"
fi

# --- the steps, most important first; the benchmarks share one log (their tables are also in the JSON)
BENCH_LOG=$OUT/benchmarks.log
PYTEST=(python3 -m pytest -p no:cacheprovider)
if [[ -n $T_TEST_EACH ]] && python3 -c "import pytest_timeout" 2>/dev/null; then
    PYTEST+=(--timeout "$T_TEST_EACH" --timeout-method signal)
fi
HEAVY_DESELECT=()
for test in $HEAVY_TESTS; do
    HEAVY_DESELECT+=(--deselect "$test")
done
# shellcheck disable=SC2086
step cross_entropy "$T_CE" "$BENCH_LOG" \
    python3 benchmarks/cross_entropy.py --json "$OUT/cross_entropy.json" $CE_ARGS

# shellcheck disable=SC2086  # the *_ARGS, *_FILES and *_TESTS are word lists on purpose
step tests "$T_TESTS" "$OUT/tests.log" "${PYTEST[@]}" $PYTEST_ARGS "${HEAVY_DESELECT[@]}" $TEST_FILES

# --budget: start no new case past 60% of the limit, so the case in flight can still finish and the table prints.
# shellcheck disable=SC2086
step attention "$T_ATTN" "$BENCH_LOG" python3 benchmarks/attention.py --json "$OUT/attention.json" \
    --budget $(($(limit_for "$T_ATTN") * 6 / 10)) $ATTN_ARGS

# Eager first, in its own process: torch.compile is slow the first time, and a timeout there must not lose it.
# shellcheck disable=SC2086
step train "$T_TRAIN" "$BENCH_LOG" python3 benchmarks/train.py --modes eager --json "$OUT/train.json" $TRAIN_ARGS
if [[ -n $HEAVY_TESTS ]]; then
    # Each example printed as it runs (-s: uncaptured), so a timeout still says how far it got.
    # shellcheck disable=SC2086
    step heavy_tests "$T_HEAVY_TESTS" "$OUT/tests.log" "${PYTEST[@]}" $PYTEST_ARGS -s --hypothesis-verbosity=verbose \
        $HEAVY_TESTS
fi
# A compiled case (two models' first compile) takes longer: none starts past 40% of the limit.
# shellcheck disable=SC2086
step train_compiled "$T_TRAIN_COMPILED" "$BENCH_LOG" python3 benchmarks/train.py --modes compiled \
    --budget $(($(limit_for "$T_TRAIN_COMPILED") * 4 / 10)) --json "$SCRATCH/train_compiled.json" $TRAIN_ARGS

# One train.json holding both runs' rows (the file count under $OUT is limited).
python3 - "$OUT/train.json" "$SCRATCH/train_compiled.json" <<'EOF'
import json, os, sys
records = [json.load(open(path)) for path in sys.argv[1:] if os.path.exists(path)]
if len(records) > 1:
    merged = dict(records[0], rows=[row for r in records for row in r["rows"]],
                  command=" ; ".join(r["command"] for r in records))
    json.dump(merged, open(sys.argv[1], "w"), indent=2)
elif records:
    json.dump(records[0], open(sys.argv[1], "w"), indent=2)
EOF

# --- summary, most important last (the reply carries only the output's tail): failed steps' tails, each step's
# status, pytest's verdicts, then the tables ---------------------------------------------------------------------------
for failed in "${FAILED[@]}"; do
    read -r name log <<<"$failed"
    echo
    echo "---- $name did not end well; the tail of its output in $(basename "$log"):"
    section "$name" "$log" | tail -n 25 | cut -c 1-300
done
echo
echo "==================== fastlm GPU run: $(elapsed)s of ${TOTAL}s; files in $OUT ===================="
printf '%s\n' "${SUMMARY[@]}"
if [[ -f $OUT/tests.log ]]; then
    echo "---- pytest's last words in tests.log (one line per run that finished):"
    grep -E '[0-9]+ (passed|failed|errors?)\b.* in [0-9.]+s' "$OUT/tests.log"
fi
ls -l "$OUT"
if [[ -f $BENCH_LOG ]]; then
    echo
    # Each report: from its table's title to the end of that run's output.
    awk '/^### /{show=1} /^== /{show=0} show' "$BENCH_LOG"
fi
rm -rf "$SCRATCH"
