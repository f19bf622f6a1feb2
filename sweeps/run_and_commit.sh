#!/usr/bin/env bash
# Run one line of a command list and commit what it wrote: the queue behind the committed probe
# studies.
#   xargs -P 2 -d '\n' -n 1 bash sweeps/run_and_commit.sh DEST < docs/collapse/study/stage_a.txt
# It runs in the current folder (the code that is run: e.g. a `git worktree` of a fixed commit, so
# that editing the checkout does not change a study under way) and commits into the git checkout
# that holds DEST.
# Each line must name its folder with --run-name. A line whose DEST/<run-name>/summary.json says
# "completed" is skipped, so the queue can be stopped at any time and restarted where it stopped.
# After a completed run, what analysis/ reads is copied to DEST/<run-name>/ (the probe's
# metrics.csv; a training script's args.json and TensorBoard events; summary.json and tasks.json of
# both, never a checkpoint) and committed (git commit of that folder only, under a lock, so two workers and a
# person working in the same checkout do not collide). Runs are niced: they take the idle CPU.
# Each start (a resumed run's too) appends the machine to logs/<run-name>.hosts.jsonl (not to the
# run folder: the script must find it empty or its own), committed as DEST/<run-name>/hosts.jsonl:
# the CPU's model name, family, model and stepping, and the SIMD level of torch's kernels. Runs of
# one seed on CPUs with other kernels differ from the first update on, and the scripts of commits
# before 2026-12-04 record only the model name ("AMD EPYC") in summary.json. study_queue.sh runs
# this copy (the checkout's) for every study, whatever commit the study's code is at.
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
log=logs/$(tr / _ <<<"$run_name")
python=${line%% *}  # the line's interpreter: the one whose torch the run uses
"$python" - >>"$log.hosts.jsonl" <<'EOF' || echo "warning: no machine record for $run_name"
import json, os, platform, time
import torch
with open("/proc/cpuinfo") as f:
    first_processor = f.read().split("\n\n")[0].splitlines()
fields = {}
for line in first_processor:
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
for key in ("model name", "cpu family", "model", "stepping"):
    record[key.replace(" ", "_")] = fields.get(key)
record["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
record.update(torch=torch.__version__, cpus=os.cpu_count(), python=platform.python_version())
print(json.dumps(record))
EOF
echo "start $run_name $(date -u +%FT%TZ)"
OMP_NUM_THREADS=1 nice -n 10 bash -c "$line" >"$log.log" 2>&1
rc=$?
if [[ $rc -ne 0 ]] || ! grep -qs '"status": "completed"' "runs/$run_name/summary.json"; then
    echo "FAILED $run_name (exit $rc, log: $log.log)"
    exit 0  # the other lines still run
fi
mkdir -p "$out"
for file in metrics.csv summary.json args.json tasks.json "runs/$run_name"/events.out.tfevents.*; do
    file=runs/$run_name/$(basename "$file")
    [[ -f $file ]] && cp "$file" "$out/"
done
[[ -f $log.hosts.jsonl ]] && cp "$log.hosts.jsonl" "$out/hosts.jsonl"
script=$(grep -o 'ppo_[a-z_]*\.py' <<<"$line" | head -n 1)
message="study: $run_name (${script:-run} at $(git rev-parse --short HEAD))"
for attempt in 1 2 3 4 5; do
    flock /tmp/ppo-mdr-git.lock git -C "$repo" add "$out" &&
        flock /tmp/ppo-mdr-git.lock git -C "$repo" commit -q -m "$message" -- "$out" && break
    sleep $((attempt * 3))
done
echo "done $run_name $(date -u +%FT%TZ)"
