#!/usr/bin/env bash
# Run one line of a command list and commit what it wrote: the queue behind the committed probe
# studies.
#   xargs -P 2 -d '\n' -n 1 bash sweeps/run_and_commit.sh DEST < docs/collapse/study/stage_a.txt
# It runs in the current folder (the code that is run: e.g. a `git worktree` of a fixed commit, so
# that editing the checkout does not change a study under way) and commits into the git checkout
# that holds DEST.
# Each line must name its folder with --run-name. A line whose DEST/<run-name>/summary.json says
# "completed" is skipped, so the queue can be stopped at any time and restarted where it stopped.
# After a completed run, what analysis/ reads is copied to DEST/<run-name>/ (the probe's metrics.csv;
# a training script's args.json and TensorBoard events; summary.json and tasks.json of both, never a
# checkpoint) and committed (git commit of that folder only, under a lock, so two workers and a person working in
# the same checkout do not collide). Runs are niced: they take the idle CPU.
set -uo pipefail
dest=$(realpath -m "$1")
repo=$(git -C "$(dirname "$dest")" rev-parse --show-toplevel) || exit 2
line=$2
[[ -z "${line// }" || $line == \#* ]] && exit 0
run_name=$(sed -n 's/.*--run-name[ =]\([^ ]*\).*/\1/p' <<<"$line")
[[ -n $run_name ]] || { echo "error: no --run-name in: $line" >&2; exit 2; }
out="$dest/$run_name"
if grep -qs '"status": "completed"' "$out/summary.json"; then
    echo "skip $run_name (done)"
    exit 0
fi
# a run killed earlier continues from its last checkpoint
[[ $line == *--resume* ]] || line+=" --resume auto"
mkdir -p logs
echo "start $run_name $(date -u +%FT%TZ)"
OMP_NUM_THREADS=1 nice -n 10 bash -c "$line" >"logs/$(tr / _ <<<"$run_name").log" 2>&1
rc=$?
if [[ $rc -ne 0 ]] || ! grep -qs '"status": "completed"' "runs/$run_name/summary.json"; then
    echo "FAILED $run_name (exit $rc, log: logs/$(tr / _ <<<"$run_name").log)"
    exit 0  # the other lines still run
fi
mkdir -p "$out"
for file in metrics.csv summary.json args.json tasks.json "runs/$run_name"/events.out.tfevents.*; do
    file=runs/$run_name/$(basename "$file")
    [[ -f $file ]] && cp "$file" "$out/"
done
script=$(grep -o 'ppo_[a-z_]*\.py' <<<"$line" | head -n 1)
message="study: $run_name (${script:-run} at $(git rev-parse --short HEAD))"
for attempt in 1 2 3 4 5; do
    flock /tmp/ppo-mdr-git.lock git -C "$repo" add "$out" &&
        flock /tmp/ppo-mdr-git.lock git -C "$repo" commit -q -m "$message" -- "$out" && break
    sleep $((attempt * 3))
done
echo "done $run_name $(date -u +%FT%TZ)"
