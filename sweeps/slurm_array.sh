#!/usr/bin/env bash
# One SLURM array task = one line of a run list (sweeps/lists/*.txt), continued with --resume auto
# after a requeue.
#
#   sbatch --array=1-$(wc -l < sweeps/lists/procgen_fig3.txt)%32 --gres=gpu:1 --cpus-per-task=8 \
#       --time=2-00:00:00 sweeps/slurm_array.sh sweeps/lists/procgen_fig3.txt
#
# Submit from the repository root: the runs land in its runs/. The Python environment is $PYTHON
# when set (used as is), else $VENV (default .venv), installed once from requirements-lock.txt (the
# versions CI verified) and reinstalled when that file changes. Extra flags for every run:
# $EXTRA_ARGS (e.g. EXTRA_ARGS="--track --wandb-project-name mdr").
#SBATCH --job-name=ppo-mdr
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%A_%a.out
set -uo pipefail

usage="usage: sbatch --array=1-N sweeps/slurm_array.sh LIST (a file of run commands, one per line)"
list=${1:?$usage}
task=${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch --array=1-N}
line=$(sed -n "${task}p" "$list")
if [[ -z $line ]]; then
    echo "error: $list has no line $task; use --array=1-$(wc -l <"$list")" >&2
    exit 2
fi
read -r -a cmd <<<"$line"

if [[ -z ${PYTHON:-} ]]; then
    venv=${VENV:-.venv}
    lock=requirements-lock.txt
    stamp=$(sha256sum "$lock" | cut -d' ' -f1)
    # array tasks start together: one installs, the others wait for it on the lock
    flock "$venv.install-lock" bash -c '
        [[ $(cat "$1/.lock-sha256" 2>/dev/null) == "$3" ]] && exit 0
        { [[ -x $1/bin/python ]] || python3 -m venv "$1"; } &&
            "$1/bin/pip" install -q -r "$2" && echo "$3" >"$1/.lock-sha256"
    ' _ "$venv" "$lock" "$stamp" || {
        echo "error: installing $lock into $venv failed" >&2
        exit 1
    }
    PYTHON=$venv/bin/python
fi
[[ ${cmd[0]} == python ]] && cmd[0]=$PYTHON

# SLURM sends USR1 to this shell 120 s before the time limit (--signal=B:USR1@120): the run
# checkpoints and exits, then the task goes back to the queue. On preemption or scontrol requeue
# SLURM sends SIGTERM to every process of the job: the run handles it itself, and this shell must
# stay alive until the run has written its checkpoint.
requeue=0
trap 'requeue=1; echo "USR1: checkpointing, then requeueing"; kill -USR1 "$child"' USR1
trap 'echo "SIGTERM: waiting for the run to checkpoint"' TERM

echo "task $task (job ${SLURM_JOB_ID:-?}, restart ${SLURM_RESTART_COUNT:-0}):" \
    "${cmd[*]} --resume auto ${EXTRA_ARGS:-}"
read -r -a extra_args <<<"${EXTRA_ARGS:-}"  # a list of words
"${cmd[@]}" --resume auto "${extra_args[@]}" &
child=$!
wait "$child"
# a trapped signal ends `wait` early: wait for the run itself
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
done
wait "$child" # the run's own exit status (bash keeps it)
status=$?
echo "run exited with $status"
if ((requeue)); then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
