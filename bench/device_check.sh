#!/usr/bin/env bash
# Device check (issue 18, item 8): one prepared run of at most 8 minutes on a lent GPU machine.
#
#   bash bench/device_check.sh              # on the GPU machine, wheels carried in .whl/
#   bash bench/device_check.sh --dry-run    # anywhere: every step on the CPU at toy sizes
#   bash bench/device_check.sh --steps env,encode,search
#
# From a session with a lent machine (bench/device_wheels.sh first, here, to fill .whl/):
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
#
# Steps: wheels (pip installs .whl/*.whl into the working folder, put on PYTHONPATH), then
# bench/device_check.py's env, ceilings, encode, world, train, index, load, search. Every step is
# time-boxed (`timeout`) within a total budget; a step that fails or runs out of time is recorded and
# the next one runs. The results go to $OUT (default runs/device_check/): device_check.json,
# device_check.md (tables ready for bench/RESULTS.md) and device_check.log (everything printed).
# Exit code 1 if a step failed or ran out of time.
#
# Environment: OUT (results folder), PYTHON (default python3, as on a lent machine; with --dry-run the
# repository's .venv/bin/python where `make install` made one), DEVICE_CHECK_BUDGET_S (seconds for
# the whole run; default 470, 300 with --dry-run), KEEP_WORK=1 keeps the working folder.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ALL_STEPS="env ceilings encode world train index load search"
# the most seconds each step may take; the budget can leave it less
declare -A CAP=([wheels]=60 [env]=30 [ceilings]=30 [encode]=90 [world]=60 [train]=90 [index]=100
                [load]=110 [search]=80)
RESERVE_PER_STEP=10   # kept for every step still to come, so one slow step cannot starve the rest

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

DRY=0
STEPS=$ALL_STEPS
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --steps) [[ $# -ge 2 ]] || { echo "device_check.sh: --steps needs a list" >&2; exit 2; }
                 STEPS=${2//,/ }; shift ;;
        --steps=*) STEPS=${1#--steps=}; STEPS=${STEPS//,/ } ;;
        -h|--help) usage; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
# a dry run on a development machine: the project's .venv (a CPU torch there would skip every GPU step of a real run)
[[ -z ${PYTHON:-} ]] && ((DRY)) && [[ -x $REPO/.venv/bin/python ]] && PY=$REPO/.venv/bin/python
OUT=${OUT:-$REPO/runs/device_check}
BUDGET=${DEVICE_CHECK_BUDGET_S:-$((DRY ? 300 : 470))}
MODE=()
((DRY)) && MODE=(--dry-run)
export PYTHONUNBUFFERED=1
# The toy sizes of a dry run gain nothing from threads, and on a busy CI machine a second OpenMP
# thread stalls at every barrier (a micro training step: 1 s with two threads, 75 ms with one).
((DRY)) && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
START=$(date +%s)

say() { printf '[%s +%3ds] %s\n' "$(date -u +%H:%M:%S)" $(($(date +%s) - START)) "$*"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# record NAME RC SECONDS LIMIT: the shell's line about a step, read by the report
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/status.tsv"; }

# time_box NAME LATER: seconds NAME may run, with LATER steps still to come; 0 if too few are left
time_box() {
    local limit=$(($(left) - RESERVE_PER_STEP * ($2 + 1)))
    ((limit > ${CAP[$1]:-60})) && limit=${CAP[$1]:-60}
    ((limit < 10)) && limit=0
    echo "$limit"
}

install_wheels() {
    # inside the working folder, so that nothing outlives the run (on a machine without a GPU too)
    local site=$WORK/site wheels=() failed=() installed=0 status=ok reason="" errors="" t0 limit
    t0=$(date +%s)
    limit=$(time_box wheels 8)
    shopt -s nullglob
    wheels=("$REPO"/.whl/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]} == 0)); then
        status=skipped
        reason="no wheels in .whl/: the steps that need faiss or the service's packages check for them"
    elif ((DRY)); then
        status=skipped
        reason="dry run: ${#wheels[@]} carried wheels, none installed"
    else
        say "wheels: installing ${#wheels[@]} into $site"
        if timeout "$limit" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$site" "${wheels[@]}"; then
            installed=${#wheels[@]}
        else
            # one bad wheel must not keep the others out
            say "wheels: the joint install failed; one wheel at a time"
            for w in "${wheels[@]}"; do
                if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                        --target "$site" "$w"; then
                    installed=$((installed + 1))
                else
                    failed+=("$(basename "$w")")
                    status=partial
                    errors="\"pip could not install ${failed[*]} (see the log)\""
                fi
            done
        fi
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # wheel file names hold only letters, digits and . _ - +, so they need no JSON escaping
    printf '{"step": "wheels", "status": "%s", "reason": "%s", "results": %s, "errors": [%s]}\n' \
        "$status" "$reason" "{\"wheels\": ${#wheels[@]}, \"installed\": $installed, \"failed\": \"${failed[*]}\"}" \
        "$errors" >"$WORK/wheels.json"
    record wheels 0 $(($(date +%s) - t0)) "$limit"
    say "wheels: ${reason:-$installed of ${#wheels[@]} installed${failed[*]:+; failed: ${failed[*]}}}"
}

run_step() {
    local name=$1 later=$2 limit t0 rc
    limit=$(time_box "$name" "$later")
    if ((limit == 0)); then
        say "step $name: not started, $(left) s of the budget left"
        record "$name" not-started 0 0
        return
    fi
    say "step $name: start (time box ${limit} s)"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$PY" "$REPO/bench/device_check.py" "$name" --work "$WORK" "${MODE[@]}" 2>&1 \
        | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $(($(date +%s) - t0)) "$limit"
    case $rc in
        0) say "step $name: done in $(($(date +%s) - t0)) s" ;;
        124|137) say "step $name: stopped at its time box of ${limit} s" ;;
        *) say "step $name: FAILED (exit code $rc); going on" ;;
    esac
}

main() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
    if [[ ${KEEP_WORK:-0} == 1 ]]; then say "working folder $WORK (kept)"; else trap 'rm -rf "$WORK"' EXIT; fi
    say "device check$( ((DRY)) && echo ' (dry run: CPU, toy sizes)'): budget ${BUDGET} s, results to $OUT, python $PY"
    cd "$REPO" || exit 1
    install_wheels
    local steps=($STEPS) i
    for i in "${!steps[@]}"; do
        run_step "${steps[$i]}" $((${#steps[@]} - i - 1))
    done
    "$PY" "$REPO/bench/device_check.py" report --work "$WORK" --out "$OUT" "${MODE[@]}" \
        --budget "$BUDGET" --total $(($(date +%s) - START))
    local rc=$?
    say "device check finished: exit code $rc; results in $OUT"
    return $rc
}

mkdir -p "$OUT" || exit 1
rm -f "$OUT/device_check.json" "$OUT/device_check.md" "$OUT/device_check.log"
main 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
