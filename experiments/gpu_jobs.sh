#!/usr/bin/env bash
# Runs a list of GPU jobs one after another, each under its own timeout and all within a total
# deadline, so that one slow or crashing job costs only its own slot.
#
#   experiments/gpu_jobs.sh JOBFILE OUTDIR TOTAL_SECONDS
#   e.g. experiments/gpu_jobs.sh experiments/jobs/small-b64-train-variants.txt /tmp/out 1500
#
# JOBFILE (experiments/jobs/ holds the lists in use): one job per line, "NAME TIMEOUT_S COMMAND..."
# ('#' starts a comment), run from the repository root. COMMAND runs
# through bash with JOB_OUT set to its own folder OUTDIR/work/NAME; stdout+stderr go to
# JOB_OUT/log.txt (PYTHONUNBUFFERED is set, so a killed job keeps what it printed). A job is
# skipped when less than its timeout is left of the deadline. After every job, OUTDIR/summary.txt
# gets a line (name, exit code, seconds) and OUTDIR/results.tar.gz is rewritten with all the job
# folders, so what finished is kept in one file even when the whole run is cut off.
set -u
jobfile=$1 outdir=$2 total=$3
start=$(date +%s)
mkdir -p "$outdir/work"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$outdir/work/gpu.txt" 2>&1
while read -r name limit cmd; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  left=$(( total - ($(date +%s) - start) ))
  if (( left < limit )); then
    echo "$name SKIPPED (needs ${limit}s, ${left}s left)" | tee -a "$outdir/summary.txt"
    continue
  fi
  export JOB_OUT="$outdir/work/$name"
  mkdir -p "$JOB_OUT"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >"$JOB_OUT/log.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$outdir/summary.txt"
  tail -n 4 "$JOB_OUT/log.txt"
  tar czf "$outdir/.results.tmp" -C "$outdir/work" . && mv "$outdir/.results.tmp" "$outdir/results.tar.gz"
done <"$jobfile"
