#!/usr/bin/env bash
# The GPU campaign of llc_fast as one command: environment, kernel builds, the GPU tests, update
# bandwidth, end to end against devinterp, a >= 1B-parameter LM, per-step overhead, K restricted LLCs
# in one run. Every stage
# writes its raw output to its own file in one results folder and has its own time cap; a failing
# stage is reported and the others still run; a summary table is printed last (and written to
# summary.txt / summary.tsv). On one H200 the whole run stays under 9 minutes (the caps add up to
# 530 s and the suite never starts a stage past that budget). bench/README.md describes each stage.
#
#   bash bench/gpu_suite.sh [--dry-run] [--out DIR] [--archive FILE.tar.gz] [--only a,c,...]
#                           [--python PY] [--wheels DIR]
#
#   --dry-run   every stage at toy sizes on the CPU (CUDA hidden, Triton in its interpreter): a check
#               that the suite runs, in a minute or two; no figure it prints is a result. Exit code 0
#               when every stage passed or was skipped for want of a GPU.
#   --out DIR   results folder (default bench/results/gpu-<gpu name>-<date>/; with --dry-run
#               ${TMPDIR:-/tmp}/llc_fast-gpu-suite-dry-run-<date>/)
#   --archive F also pack the results folder into F (.tar.gz): the device machine returns at most 8
#               files, so run there  bash bench/gpu_suite.sh --archive "$OUT/gpu-suite.tar.gz"
#   --only L    run only these stages (letters, comma-separated)
#   --python PY the interpreter (default $PYTHON, else .venv/bin/python if it imports torch, else python3)
#   --wheels D  first install the wheels in D (pip --no-index --target a temporary folder put on
#               PYTHONPATH): packages the GPU machine lacks (devinterp and its dependencies). Default:
#               ./.whl if it holds wheels (never with --dry-run)
#   --fetch-wheels  (here, with a package index) download those wheels into --wheels D (default ./.whl,
#               ignored by git) for the GPU machine's Python 3.12 on x86-64, then exit; carry .whl there
#   GPU_SUITE_CAP_<X>=S in the environment overrides stage X's time cap (seconds), e.g. GPU_SUITE_CAP_C=200
#
# Exit code: 0 if no stage failed or timed out (and, unless --dry-run, none was skipped), else 1.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

DRY=0
OUT=""
ARCHIVE=""
ONLY=""
PY="${PYTHON:-}"
WHEELS=""
FETCH=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --archive) ARCHIVE="${2:?--archive needs a file name}"; shift ;;
        --only) ONLY="${2:?--only needs stage letters, e.g. a,c}"; shift ;;
        --python) PY="${2:?--python needs an interpreter}"; shift ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        --fetch-wheels) FETCH=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi

# What the GPU machine's image lacks (bench/README.md, GPU suite): devinterp 2.0.1 and the packages it
# needs that are not there, and arviz-stats (llc_fast's diagnostics). Pure-Python or manylinux wheels.
WHEEL_PINS=(devinterp==2.0.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 zarr==3.1.6 numcodecs==0.16.6
            donfig==0.8.1.post1 google-crc32c==1.9.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
            typing-inspection==0.4.5 arviz-stats==0.8.0)
if [ "$FETCH" = 1 ]; then
    dest="${WHEELS:-.whl}"
    mkdir -p "$dest"
    for pin in "${WHEEL_PINS[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$pin" \
            || { echo "gpu_suite.sh: could not download $pin" >&2; exit 1; }
    done
    ls -l "$dest"/*.whl
    echo "# $(ls "$dest"/*.whl | wc -l) wheels in $dest ($(du -sh "$dest" | cut -f1)): name it in the device call's carry"
    exit 0
fi

now() { if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME/,/.}"; else date +%s; fi; }
T_START="$(now)"
elapsed() { awk -v a="$T_START" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }

BUDGET=530  # seconds: no stage starts, and none runs, past this (9 minutes with margin)
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the rehearsal never uses a GPU, even where there is one
    export TRITON_INTERPRET=1
else
    if [ "${TRITON_INTERPRET:-}" = 1 ]; then
        echo "gpu_suite.sh: TRITON_INTERPRET=1 would run Triton in its interpreter; unsetting it" >&2
    fi
    unset TRITON_INTERPRET
fi
export PYTHONUNBUFFERED=1
export LLC_FAST_GPU_SUITE=1  # tests/test_gpu_suite.py does not start the suite from inside it

# --- wheels for packages the GPU machine lacks -------------------------------------------------
if [ -z "$WHEELS" ] && [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    WHEELS=.whl
fi
WHEEL_LOG=""
if [ -n "$WHEELS" ]; then
    SITE="${TMPDIR:-/tmp}/llc_fast-gpu-suite-site"
    WHEEL_LOG="$(mktemp)"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl >"$WHEEL_LOG" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "# installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (on PYTHONPATH)" >>"$WHEEL_LOG"
    else
        echo "# installing the wheels of $WHEELS FAILED (the stages that need them will fail)" >>"$WHEEL_LOG"
    fi
fi

# --- is there a GPU, and the results folder ------------------------------------------------------
GPU_NAME="$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
    2>/dev/null)"
HAVE_GPU=0
[ -n "$GPU_NAME" ] && HAVE_GPU=1
STAMP="$(date +%Y%m%d-%H%M%S)"
if [ -z "$OUT" ]; then
    if [ "$DRY" = 1 ]; then
        OUT="${TMPDIR:-/tmp}/llc_fast-gpu-suite-dry-run-$STAMP"
    else
        SAFE="$(printf '%s' "${GPU_NAME:-no-gpu}" | tr -c 'A-Za-z0-9._-' '-' | tr -s '-')"
        OUT="bench/results/gpu-${SAFE%-}-$STAMP"
    fi
fi
mkdir -p "$OUT" || { echo "gpu_suite.sh: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
[ -n "$WHEEL_LOG" ] && mv "$WHEEL_LOG" "$OUT/wheels.txt"

MODE="GPU run"
[ "$DRY" = 1 ] && MODE="DRY RUN (CPU, toy sizes: no figure is a result)"
echo "# llc_fast GPU suite: $MODE; GPU: ${GPU_NAME:-none}; python: $PY; results: $OUT"

# --- the stages ------------------------------------------------------------------------------------
IDS=() NAMES=() STATUS=() SECS=() CAPS=() FILES=() NOTES=()

selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

note_of() {  # the stage's one-line result: its SUMMARY/SKIPPED line, pytest's last count line, or its last line
    local f="$1" line
    line="$(grep -E '^(SUMMARY|SKIPPED): ' "$f" | tail -n 1 | sed -E 's/^(SUMMARY|SKIPPED): //')"
    if [ -z "$line" ]; then
        line="$(grep -E '([0-9]+ (passed|failed|skipped|deselected|errors?))|no tests ran' "$f" | tail -n 1 \
            | sed -E 's/^=+ *//; s/ *=+$//')"
    fi
    [ -z "$line" ] && line="$(grep -v '^[[:space:]]*$' "$f" | tail -n 1)"
    printf '%s' "${line:0:200}" | tr '\t' ' '
}

record() {  # id name status seconds cap file note
    IDS+=("$1"); NAMES+=("$2"); STATUS+=("$3"); SECS+=("$4"); CAPS+=("$5"); FILES+=("$6"); NOTES+=("$7")
    printf '[%s] %-12s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4" "$7"
}

run_stage() {  # id name cap file needs_gpu -- command...
    local id="$1" name="$2" cap="$3" file="$4" needs_gpu="$5"
    shift 6
    selected "$id" || return 0
    if [ "$needs_gpu" = 1 ] && [ "$HAVE_GPU" = 0 ] && [ "$DRY" = 0 ]; then
        record "$id" "$name" skipped 0 "$cap" "-" "no CUDA GPU visible (use --dry-run for the CPU rehearsal)"
        return 0
    fi
    local override="GPU_SUITE_CAP_${id^^}"
    [ -n "${!override:-}" ] && cap="${!override}"  # e.g. GPU_SUITE_CAP_C=200 for one rerun of a stage
    local left=$((BUDGET - $(elapsed)))
    if [ "$left" -lt 10 ]; then
        record "$id" "$name" not-run 0 "$cap" "-" "the suite's ${BUDGET} s budget was spent before this stage"
        return 0
    fi
    [ "$cap" -gt "$left" ] && cap="$left"
    {
        echo "\$ $*"
        echo "# stage $id ($name), time cap ${cap} s, started $(date -Iseconds)"
        echo
    } >"$OUT/$file"
    local t0 rc secs status note
    t0="$(now)"
    timeout --kill-after=10 "$cap" "$@" >>"$OUT/$file" 2>&1
    rc=$?
    secs="$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%d", b - a + 0.5 }')"
    note="$(note_of "$OUT/$file")"
    echo >>"$OUT/$file"
    echo "# exit code $rc after $secs s" >>"$OUT/$file"
    case "$rc" in
        0) status=ok ;;
        77) status=skipped ;;
        124|137) status=TIMEOUT; note="stopped at its ${cap} s cap; last: $note" ;;
        *) status=FAILED; note="exit code $rc: $note" ;;
    esac
    record "$id" "$name" "$status" "$secs" "$cap" "$file" "$note"
}

if [ "$DRY" = 1 ]; then
    # toy sizes on the CPU
    UPDATE_ARGS=(--device cpu --sizes 2^12 2^14 --copy-size 2^20 --repeats 1 --target-s 0.01 --max-repeats 3
                 --retry-busy 0)
    E2E_ARGS=(--device cpu --quick --cases gpu)
    LM_ARGS=(--device cpu --quick --parts lm)
    OVERHEAD_ARGS=(--device cpu --quick --threads 1 --mlp-widths 64,128,10 --samples 512 --batch-size 64)
    RESTRICTED_ARGS=(--device cpu --quick --case gpt2-4l --parts a,f)  # devinterp's part: tests/test_bench_restricted.py
    CAP_A=30 CAP_B=60 CAP_C=120 CAP_D=60 CAP_E=90 CAP_F=60 CAP_G=60 CAP_H=150  # h: devinterp's per-head loop is slow on a busy CPU
else
    UPDATE_ARGS=(--device cuda --min-size 2^20 --max-size 2^28 --target-s 0.2 --max-repeats 30)
    E2E_ARGS=(--device cuda --cases gpu --budget-s 65)
    LM_ARGS=(--device cuda --parts lm)
    OVERHEAD_ARGS=(--device cuda --rounds 3)
    RESTRICTED_ARGS=(--device cuda --rounds 2 --case gpt2-4l --parts a,f,d)
    CAP_A=15 CAP_B=60 CAP_C=100 CAP_D=75 CAP_E=90 CAP_F=70 CAP_G=60 CAP_H=90
fi
# the test files that mark GPU tests (collecting only these: the others may import what the GPU machine lacks)
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
PYTEST_ARGS=(-m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" "${GPU_TEST_FILES[@]}")
if [ "$HAVE_GPU" = 1 ] && [ "$DRY" = 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    PYTEST_ARGS+=(-n 8)  # Triton compiles each specialisation once per process: 8 workers share the work
fi

run_stage a environment "$CAP_A" env.txt 0 -- "$PY" bench/gpu_build.py --env --output "$OUT/env.json"
run_stage b build "$CAP_B" build.txt 1 -- "$PY" bench/gpu_build.py --output "$OUT/build.json"
run_stage c gpu-tests "$CAP_C" pytest-gpu.txt 1 -- "$PY" -m pytest "${PYTEST_ARGS[@]}"
# d, e, f: the CPU benchmarks themselves with --device cuda (e: bench_e2e's GPU grid; f: bench_overhead's LM part)
run_stage d bench_update "$CAP_D" bench_update.txt 1 -- "$PY" bench/bench_update.py "${UPDATE_ARGS[@]}" \
    --output "$OUT/bench_update.json"
run_stage e e2e-devinterp "$CAP_E" e2e.txt 1 -- "$PY" bench/bench_e2e.py "${E2E_ARGS[@]}" --output "$OUT/e2e.json"
run_stage f lm-1b "$CAP_F" lm.txt 1 -- "$PY" bench/bench_overhead.py "${LM_ARGS[@]}" --output "$OUT/lm.json"
# g: eager, then the DLN part again with the batched pass through torch.compile (compile_step=True)
run_stage g overhead "$CAP_G" overhead.txt 1 -- bash -c '"$0" bench/bench_overhead.py "${@:2}" --output "$1/overhead.json" \
    && "$0" bench/bench_overhead.py "${@:2}" --parts dln --compile --output "$1/overhead-compiled.json"' \
    "$PY" "$OUT" "${OVERHEAD_ARGS[@]}"
# h: all 16 heads x 4 chains of a 4-layer GPT-2 in one batched run (sparse rows) against one full-model estimate_llc
# and devinterp's per-head loop
run_stage h restricted "$CAP_H" restricted.txt 1 -- "$PY" bench/bench_restricted.py "${RESTRICTED_ARGS[@]}" \
    --output "$OUT/restricted.json"

# --- summary ---------------------------------------------------------------------------------------
TOTAL="$(elapsed)"
BAD=0
for i in "${!IDS[@]}"; do
    case "${STATUS[$i]}" in
        ok) ;;
        skipped) [ "$DRY" = 1 ] || BAD=1 ;;
        *) BAD=1 ;;
    esac
done
[ "${#IDS[@]}" -eq 0 ] && BAD=1
{
    printf 'id\tstage\tstatus\tseconds\tcap\tfile\tnote\n'
    for i in "${!IDS[@]}"; do
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${IDS[$i]}" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${CAPS[$i]}" \
            "${FILES[$i]}" "${NOTES[$i]}"
    done
} >"$OUT/summary.tsv"
{
    echo
    echo "== llc_fast GPU suite summary: $MODE =="
    echo "# GPU: ${GPU_NAME:-none}; date: $(date -Iseconds); git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- llc_fast csrc bench 2>/dev/null || echo ' + uncommitted changes')"
    echo "# results: $OUT"
    printf '%-2s %-14s %-8s %5s %5s  %-18s %s\n' id stage status time cap output note
    for i in "${!IDS[@]}"; do
        printf '%-2s %-14s %-8s %4ss %4ss  %-18s %s\n' "${IDS[$i]}" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" \
            "${CAPS[$i]}" "${FILES[$i]}" "${NOTES[$i]}"
    done
    echo "# total ${TOTAL} s (budget ${BUDGET} s); exit code $BAD"
} | tee "$OUT/summary.txt"

if [ -n "$ARCHIVE" ]; then
    case "$(cd "$(dirname "$ARCHIVE")" 2>/dev/null && pwd)/" in
        "$OUT"/*) echo "gpu_suite.sh: --archive must lie outside the results folder" >&2; BAD=1 ;;
        *) mkdir -p "$(dirname "$ARCHIVE")" && tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" \
               && echo "# archived $OUT into $ARCHIVE" || BAD=1 ;;
    esac
fi
exit "$BAD"
