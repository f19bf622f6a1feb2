#!/usr/bin/env bash
# The open studies' queue, in their plans' order, two runs side by side with no gap between lists:
#   bash sweeps/study_queue.sh WORKDIR            # run (or resume) it; stop it at any time
#   bash sweeps/study_queue.sh WORKDIR --dry-run  # print what it would run, one line a run
# Each study runs the code of the commit its plan fixed, from a `git worktree` of that commit at
# WORKDIR/study-<commit>, made here if missing (Stage C's also gets its photo folder, checked
# against the committed manifest). Each finished run is committed into this checkout by this
# checkout's sweeps/run_and_commit.sh (infrastructure, not the study's code: it also records the
# machine of each start); a finished run is skipped and a stopped one resumes from its checkpoint
# (kept in its worktree's runs/), so the same command continues a queue from where it stopped.
# Order: Stage C (docs/collapse/study_c/PLAN.md: the procedural list, then the photos), then the
# dropout study (docs/dropout/PLAN.md: Study 1 Step 1, Step 2, LayerNorm, Study 2). Step 2 runs
# because Step 1's report says it must (the plan's rule; decision in PLAN.md, 2026-12-04).
# Needs the project's Python environment active (README's install command).
set -uo pipefail
usage="usage: bash sweeps/study_queue.sh WORKDIR [--dry-run]"
[[ $# -ge 1 && $# -le 2 ]] || { echo "$usage" >&2; exit 2; }
workdir=$1
dry_run=${2:-}
[[ -z $dry_run || $dry_run == --dry-run ]] || { echo "$usage" >&2; exit 2; }
repo=$(git rev-parse --show-toplevel) || exit 2
worktrees=$workdir/study-  # + a commit: where that commit's runs are made

# commit | folder the runs are committed to (of this checkout) | command list
QUEUE=(
    "ec589f7|docs/collapse/study_c|docs/collapse/study_c/stage_c.txt"
    "ec589f7|docs/collapse/study_c|docs/collapse/study_c/stage_c_photos.txt"
    "cb2e6e5|docs/dropout|docs/dropout/stability_step1.txt"
    "cb2e6e5|docs/dropout|docs/dropout/stability_step2.txt"
    "cb2e6e5|docs/collapse/study|docs/dropout/ln.txt"
    "cb2e6e5|docs/dropout|docs/dropout/generalization.txt"
)

worktree() {  # COMMIT: make its worktree (with Stage C's photos) where missing
    local path=$worktrees$1
    if [[ ! -d $path ]]; then
        # a worktree folder deleted by hand is still registered: forget it before adding it again
        git -C "$repo" worktree prune
        git -C "$repo" worktree add --detach "$path" "$1" >&2 || return 1
    fi
    if [[ -f $path/docs/collapse/study_c/photos.json && ! -d $path/data/photos ]]; then
        (cd "$path" && python sweeps/make_photo_folder.py data/photos \
            --check docs/collapse/study_c/photos.json) >&2 || return 1
    fi
}

items() {  # every run of the queue: WORKTREE|DEST|COMMAND, in order
    local entry commit dest list
    for entry in "${QUEUE[@]}"; do
        IFS='|' read -r commit dest list <<<"$entry"
        grep -v '^#' "$repo/$list" | grep -v '^[[:space:]]*$' |
            sed "s#^#$worktrees$commit|$repo/$dest|#"
    done
}

if [[ -n $dry_run ]]; then
    items
    exit 0
fi
mkdir -p "$workdir" || exit 2
for commit in $(printf '%s\n' "${QUEUE[@]}" | cut -d '|' -f 1 | uniq); do
    worktree "$commit" || { echo "error: no worktree of $commit in $workdir" >&2; exit 2; }
done
export WANDB_MODE=${WANDB_MODE:-offline}
# one item: run it in its worktree with this checkout's run_and_commit.sh
export RUN_AND_COMMIT=$repo/sweeps/run_and_commit.sh
# shellcheck disable=SC2016
items | xargs -P 2 -d '\n' -n 1 bash -c \
    'IFS="|" read -r path dest line <<<"$1"; cd "$path" && bash "$RUN_AND_COMMIT" "$dest" "$line"' _
echo "queue finished $(date -u +%FT%TZ)"
