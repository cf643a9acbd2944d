#!/usr/bin/env bash
# The ko->en comparison at --preset small in one lent-GPU call (issue #20, item 1): the char level's pre-trainings
# and its four starts (Rnd2Rnd, Enc2Rnd, Rnd2Dec, Enc2Dec) at seed 0, with the second seeds of Rnd2Rnd and Enc2Dec
# where they fit, sized by a probe to end within TOTAL seconds, then their results page.
#
# Once, in the checkout the device tool sends (the session's own), where ../shared is: copy the corpus into the
# git-ignored .ko_en_data/ (../shared does not travel; a carried folder does; the page's "Data" names this copy):
#
#     bash experiments/gpu.sh --stage-data
#
# Then one call of the device tool's `run`:
#
#     command:   bash experiments/gpu.sh
#     carry:     [".ko_en_data"]
#     timeout_s: 540
#
# TOTAL (500 s) leaves 40 s of the 9 minutes for a step's kill to land. Every step runs under its own timeout (a hang
# costs that step, not the call) and all steps share one deadline. What it does, in order:
#   build      pip install -e . (the native tokenizer), else CMake in place, as benchmarks/gpu.sh does
#   probe      in its own --out (runs/gpu-small/probe): every job the plan may choose, a few dozen steps long (the
#              carve, tokenizer and corpora made on the way): the two pre-trainings at once, the translation runs at
#              once (--train-only), then SCORE_WINDOW seconds of their scoring (test translations)
#   plan       experiments/budget.py: pre-training steps, fine-tuning epochs and evaluation interval that fill the
#              seconds left, from the probe's step times, fixed costs per job and scoring pace; the second seeds
#              where the fine-tunings still get 2 epochs with them
#   pretrain   the two pre-trainings at once (the probe's data, tokenizer and corpora copied over: the same jobs)
#   finetune   the translation runs at once, one process each (--train-only), their epochs planned again from the
#              seconds the pre-trainings left
#   score      SCORE_PROCS processes share the trained runs' scoring (test translations, source use) through the
#              grid's job locks
#   report     ko_en.py --report of the planned jobs, at the --scale that ran, into $OUT/RESULTS-small.md
# The processes of a step share the grid through its job locks: small models leave an H200 mostly idle, so running
# them at once is the throughput.
#
# What comes back in $OUT (at most 8 files, 2 folders down):
#   RESULTS-small.md         the page: its own page, not docs/RESULTS.md. The session that runs this pastes it into
#                            docs/RESULTS.md as a section of its own (its title a "##" heading; its sections one level
#                            down), and copies results/small/*.png to docs/results/small/ (the page's links already
#                            point there). The page names the GPU and the --scale that ran.
#   results/small/*.png      its plots (pre-training curves, translation curves, BLEU)
#   gpu-small.log            everything this script printed
#   ko_en-small.tar.gz       results/ and translations/ of the runs (what `ko_en.py --report` reads: the page can be
#                            written again from them), the held-out pairs, the probe's results and every process's log
#
# Dry run on a CPU, the plumbing end to end in minutes (the --quick grid, tiny preset, no build):
#
#     DRY=1 PYTHON=.venv/bin/python OMP_NUM_THREADS=1 bash experiments/gpu.sh
#
# Environment (all optional):
#   TOTAL          seconds for the whole script (default 500; DRY 420)
#   OUT            where the page, plots, log and archive go (default /tmp/ko_en_gpu; DRY /tmp/ko_en_gpu_dry/out)
#   RUNS           the runs' folder: probe/, small/, logs/ (default runs/gpu-small; DRY /tmp/ko_en_gpu_dry/runs)
#   DATA           train/valid/test .ko/.en (default .ko_en_data, what --stage-data made)
#   PYTHON         (default python3)
#   PROBE_STEPS    the probe's steps per job (default 40; DRY 20)
#   SCORE_WINDOW   seconds of the probe's scoring (default 30; DRY 20)
#   SCORE_PROCS    processes of the scoring (default 8; DRY 2)
#   JOB_THREADS    OMP_NUM_THREADS of each process (default 2; DRY 1): many processes share 16 cores
#   REPORT_RESERVE seconds kept for the report and the archive (default 45; DRY 40)
#   T_BUILD T_PROBE  caps of the build and of each probe step (defaults 150 150)
set -u
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.." || exit 1
STAGED=.ko_en_data

if [[ ${1:-} == --stage-data ]]; then
    mkdir -p "$STAGED" || exit 1
    for split in train valid test; do
        for lang in ko en; do
            cp ../shared/data/ko-en/$split.$lang "$STAGED/" || exit 1
        done
    done
    chmod u+w "$STAGED"/*  # copies of read-only files: writable, so that staging again replaces them
    du -sh "$STAGED"
    exit 0
fi

DRY=${DRY:-0}
if [[ $DRY == 1 ]]; then
    GRID=(--quick)
    TOTAL=${TOTAL:-420}
    OUT=${OUT:-/tmp/ko_en_gpu_dry/out}
    RUNS=${RUNS:-/tmp/ko_en_gpu_dry/runs}
    PROBE_STEPS=${PROBE_STEPS:-20}
    SCORE_WINDOW=${SCORE_WINDOW:-20}
    SCORE_PROCS=${SCORE_PROCS:-2}
    JOB_THREADS=${JOB_THREADS:-1}
    REPORT_RESERVE=${REPORT_RESERVE:-40}
else
    GRID=(--preset small)
    TOTAL=${TOTAL:-500}
    OUT=${OUT:-/tmp/ko_en_gpu}
    RUNS=${RUNS:-runs/gpu-small}
    PROBE_STEPS=${PROBE_STEPS:-40}
    SCORE_WINDOW=${SCORE_WINDOW:-30}
    SCORE_PROCS=${SCORE_PROCS:-8}
    JOB_THREADS=${JOB_THREADS:-2}
    REPORT_RESERVE=${REPORT_RESERVE:-45}
fi
DATA=${DATA:-$PWD/$STAGED}
PYTHON=${PYTHON:-python3}
T_BUILD=${T_BUILD:-150}
T_PROBE=${T_PROBE:-150}

STARTED=$(date +%s)
DEADLINE=$((STARTED + TOTAL))
mkdir -p "$OUT" "$RUNS" || exit 1
OUT=$(cd "$OUT" && pwd)
RUNS=$(cd "$RUNS" && pwd)
PROBE=$RUNS/probe
MAIN=$RUNS/small
LOGS=$RUNS/logs
PAGE=$OUT/RESULTS-small.md
SUMMARY=()  # one line per step: name, status, seconds, expected seconds
PLAN=""     # budget.py's plans, in words

elapsed() { echo $(($(date +%s) - STARTED)); }
seconds_left() { echo $((DEADLINE - $(date +%s))); }

# limit_for CAP: the seconds a step starting now may take: CAP, or less where the deadline is nearer.
limit_for() {
    local left=$((DEADLINE - $(date +%s) - 10))
    echo $(($1 < left ? $1 : left))
}

# together NAME CAP COUNT COMMAND...: COUNT copies of COMMAND at once, each under the same limit and logging to
# $LOGS/NAME-I.log; sets STATUS (ok, TIMEOUT, FAIL(rc=N) or no-time) and SECONDS_TAKEN.
together() {
    local name=$1 cap=$2 count=$3
    shift 3
    local limit i pids=() rc status=ok started
    limit=$(limit_for "$cap")
    SECONDS_TAKEN=0
    if ((limit < 20)); then
        echo "== $name: not run, only ${limit}s left"
        STATUS=no-time
        return
    fi
    echo "== $name: $count at once from $(elapsed)s, limit ${limit}s: $*"
    started=$(date +%s)
    for ((i = 1; i <= count; i++)); do
        timeout -k 10 "$limit" "$@" >"$LOGS/$name-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        rc=$?
        case $rc in
            0) ;;
            124 | 137) status=TIMEOUT ;;
            *)
                [[ $status == ok ]] && status="FAIL(rc=$rc)"
                echo "   $name-$((i + 1)) exited with $rc; the tail of $LOGS/$name-$((i + 1)).log:"
                tail -n 5 "$LOGS/$name-$((i + 1)).log" | cut -c 1-300 | sed 's/^/     /'
                ;;
        esac
    done
    SECONDS_TAKEN=$(($(date +%s) - started))
    STATUS=$status
    echo "== $name: $STATUS after ${SECONDS_TAKEN}s"
}

# record NAME EXPECTED: the last step's line of the summary.
record() { SUMMARY+=("$(printf '%-15s %-14s %5ss  %s' "$1" "$STATUS" "$SECONDS_TAKEN" "${2:+expected ${2}s}")"); }

# plan ARGS...: experiments/budget.py's settings into the shell, and its plan in words printed and added to PLAN;
# false where it failed.
plan() {
    local settings rc
    settings=$("$PYTHON" experiments/budget.py --probe "$PROBE" --data "$DATA" "${GRID[@]}" \
        --score-processes "$SCORE_PROCS" "$@" 2>"$LOGS/plan.txt")
    rc=$?
    cat "$LOGS/plan.txt"
    PLAN+=$(cat "$LOGS/plan.txt")$'\n'
    ((rc == 0)) && eval "$settings"
}

summary() {
    echo
    echo "================ ko->en ${GRID[*]} on ${GPU}: $(elapsed)s of ${TOTAL}s; files in $OUT ================"
    printf '%s' "$PLAN"
    printf '%s\n' "${SUMMARY[@]}"
    ls -lR "$OUT"
    if [[ -f $PAGE ]]; then
        echo
        grep -m 1 '^Scale:' "$PAGE"
        # The tables of the pre-trainings, the translation runs and the main comparison, with their headings.
        awk '/^## 3\./ {on = 1} /^### Significance/ {on = 0} on && (/^\|/ || /^##/)' "$PAGE"
    fi
}

# run: every step, printing as it goes (the caller keeps a copy in gpu-small.log).
run() {
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    GPU=${GPU:-no GPU}
    echo "== $(date -u) on $(hostname): ${GPU}; TOTAL ${TOTAL}s; DATA $DATA; runs in $RUNS"
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
    if [[ $DRY != 1 ]]; then
        together build "$T_BUILD" 1 "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
        record build
        if ! "$PYTHON" -c "import fastlm._native" 2>/dev/null; then
            # As benchmarks/gpu.sh: the checkout comes first on PYTHONPATH, so the extension must be in fastlm/.
            together build_in_place "$T_BUILD" 1 bash -c 'cmake -S . -B build/gpu -G Ninja \
                -DCMAKE_BUILD_TYPE=Release -DFASTLM_BUILD_TESTS=OFF -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/fastlm" \
                -DPython_EXECUTABLE="$(command -v "$0")" -Dpybind11_DIR="$("$0" -m pybind11 --cmakedir)" \
                && ninja -C build/gpu' "$PYTHON"
            record build_in_place
        fi
    fi
    if ! "$PYTHON" -c "import fastlm._native"; then
        echo "== import fastlm._native failed: nothing can run (see $LOGS/build-1.log)"
        summary
        return 1
    fi

    # --- the probe --------------------------------------------------------------------------------------------------
    KO_EN=(env OMP_NUM_THREADS="$JOB_THREADS" "$PYTHON" experiments/ko_en.py --data "$DATA" "${GRID[@]}")
    plan --probe-steps "$PROBE_STEPS" || { summary; return 1; }
    local probe_scale probe_only scale only trained=() result path archived=()
    read -ra probe_scale <<<"$PROBE_SCALE"  # read, not $VAR: the --only globs must reach ko_en.py unexpanded
    read -ra probe_only <<<"$PROBE_ONLY"
    together probe_pretrain "$T_PROBE" 2 "${KO_EN[@]}" --out "$PROBE" --scale "${probe_scale[@]}" \
        --stages pretrain --only "${probe_only[@]}"
    record probe_pretrain
    together probe_finetune "$T_PROBE" "$PROBE_MODELS" "${KO_EN[@]}" --out "$PROBE" --scale "${probe_scale[@]}" \
        --stages finetune --train-only --only "${probe_only[@]}"
    record probe_finetune
    # Stopped at its window on purpose: what it translated by then is the scoring's pace.
    together probe_score "$SCORE_WINDOW" "$SCORE_PROCS" "${KO_EN[@]}" --out "$PROBE" --scale "${probe_scale[@]}" \
        --stages finetune --only "${probe_only[@]}"
    record probe_score
    SCORE_SECONDS=$SECONDS_TAKEN
    plan --seconds $(($(seconds_left) - REPORT_RESERVE)) --score-window "$SCORE_SECONDS" || { summary; return 1; }

    # --- the runs ---------------------------------------------------------------------------------------------------
    # The probe's carve, tokenizer and corpora are the runs' too (their keys name $OUT, not the folder).
    mkdir -p "$MAIN/results"
    cp -r "$PROBE/data" "$PROBE/tokenizers" "$PROBE/corpora" "$MAIN/"
    cp -r "$PROBE/results/tokenizers" "$MAIN/results/"
    read -ra only <<<"$ONLY"
    scale=(pretrain="$PRETRAIN_STEPS" eval_interval="$EVAL_INTERVAL" finetune_epochs="$FINETUNE_EPOCHS")
    together pretrain $((T_PRETRAIN * 5 / 4 + 30)) 2 "${KO_EN[@]}" --out "$MAIN" --scale "${scale[@]}" \
        --stages pretrain --only "${only[@]}"
    record pretrain "$T_PRETRAIN"

    # The fine-tunings get what the pre-trainings left; the pre-trainings' steps and evaluation interval stay (they
    # are part of the pre-trainings' commands, which the fine-tunings' keys include).
    plan --pretrained --eval-interval "$EVAL_INTERVAL" --seconds $(($(seconds_left) - REPORT_RESERVE)) \
        --score-window "$SCORE_SECONDS"
    read -ra only <<<"$ONLY"
    scale=(pretrain="$PRETRAIN_STEPS" eval_interval="$EVAL_INTERVAL" finetune_epochs="$FINETUNE_EPOCHS")
    together finetune $((T_FINETUNE * 5 / 4 + 30)) "$MODELS" "${KO_EN[@]}" --out "$MAIN" --scale "${scale[@]}" \
        --stages finetune --train-only --only "${only[@]}"
    record finetune "$T_FINETUNE"

    # Only the runs that finished training: an unfinished one would resume training here, in the scoring's time.
    for result in "$MAIN"/results/finetune/*.json; do
        [[ -f $result ]] && trained+=("finetune/$(basename "$result" .json)")
    done
    if ((${#trained[@]})); then
        # Stopped 10 s before the report's reserve: a stopped process may take that long to end.
        together score $(($(seconds_left) - REPORT_RESERVE - 10)) "$SCORE_PROCS" "${KO_EN[@]}" --out "$MAIN" \
            --scale "${scale[@]}" --stages finetune --only "${trained[@]}"
        record score "$T_SCORE"
    fi

    # --- the page and the archive -----------------------------------------------------------------------------------
    together report $((REPORT_RESERVE - 10)) 1 "${KO_EN[@]}" --out "$MAIN" --scale "${scale[@]}" \
        --only "${only[@]}" --report --report-to "$PAGE"
    record report
    for path in results translations data/heldout.ko data/heldout.en; do
        [[ -e $MAIN/$path ]] && archived+=("small/$path")
    done
    tar -czf "$OUT/ko_en-small.tar.gz" -C "$RUNS" "${archived[@]}" logs probe/results
    summary
}

rm -rf "${RUNS:?}"/{probe,small,logs} "$PAGE"  # a rerun starts over: its plan is made for its own seconds
mkdir -p "$OUT" "$LOGS" || exit 1
run 2>&1 | tee "$OUT/gpu-small.log"
