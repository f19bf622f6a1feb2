#!/usr/bin/env bash
# Does this checkout train like an earlier commit? Runs the same tiny configuration of each script
# in a worktree of COMMIT and in this checkout, then compares every logged value
# (analysis/compare_runs.py: SAME / DIFF per tag).
#   bash benchmarks/compare_with_commit.sh 7fb6a75   # the commit before issue 24 (line shape)
#   bash benchmarks/compare_with_commit.sh bae95b5   # the commit before the issue-11 restructure
# NEW_FLAGS adds flags on this checkout's side only, e.g. for a default that changed on purpose:
#   NEW_FLAGS_PATCHLOC="--view-batching joint" NEW_FLAGS_PROBE="--view-batching joint" \
#       bash benchmarks/compare_with_commit.sh bae95b5
# Exit status: 0 when no shared tag differs in any script. CPU only, about 2 minutes on 2 cores
# (15 with a long job beside it).
set -uo pipefail
commit=${1:?usage: compare_with_commit.sh COMMIT}
repo=$(git rev-parse --show-toplevel)
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$repo" worktree add --detach "$work/old" "$commit" >/dev/null 2>&1 \
    || { echo "error: cannot check out $commit"; exit 2; }
procgen="--env-id coinrun --num-envs 4 --num-steps 32 --minibatch-size 32 --total-timesteps 512"
procgen+=" --num-eval-envs 2 --no-pretrained --no-cuda --eval-interval 2 --mdr-rounds 2"
procgen+=" --diag-minibatches 0 --diag-ratio-every 1"
patchloc="--num-tasks 4 --num-test-tasks 4 --view-size 16 --image-size 64 --num-envs 2"
patchloc+=" --num-steps 16 --minibatch-size 12 --total-timesteps 96 --eval-interval 2"
patchloc+=" --num-eval-envs 2 --hidden-size 32 --no-pretrained --no-cuda"
patchloc+=" --num-render-episodes 1 --diag-minibatches 0 --diag-ratio-every 1"
probe="--num-envs 4 --num-steps 16 --minibatch-size 16 --total-timesteps 320 --view-size 16"
probe+=" --image-size 64 --hidden-size 32"
status=0
for script in procgen patchloc probe; do
    case $script in
        procgen) file=ppo_procgen_mdr.py flags=$procgen extra=${NEW_FLAGS_PROCGEN:-} ;;
        patchloc) file=ppo_patchloc_mdr.py flags=$patchloc extra=${NEW_FLAGS_PATCHLOC:-} ;;
        probe) file=ppo_collapse_probe.py flags="$probe --mode bn-mdr" extra=${NEW_FLAGS_PROBE:-} ;;
    esac
    for side in old new; do
        src=$([[ $side == old ]] && echo "$work/old" || echo "$repo")
        mkdir -p "$work/$script-$side"
        # shellcheck disable=SC2086
        (cd "$work/$script-$side" && OMP_NUM_THREADS=1 PYTHONPATH="$src" WANDB_MODE=disabled \
            "$python" "$src/$file" $flags $([[ $side == new ]] && echo "$extra") >log.txt 2>&1) \
            || { echo "error: $side $file failed, see $work/$script-$side/log.txt"; exit 2; }
    done
    echo "== $file (new side: $extra)"
    "$python" "$repo/analysis/compare_runs.py" "$work/$script-old"/runs/* \
        "$work/$script-new"/runs/* || status=1
done
exit $status
