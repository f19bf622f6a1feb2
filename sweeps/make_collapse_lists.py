"""The collapse study's run lists (issues 12 and 13), one probe command per line, each naming its
folder.

    # docs/collapse/study/stage_a.txt (regime)
    python sweeps/make_collapse_lists.py stage-a
    # the decision, in the regime Stage A picked
    python sweeps/make_collapse_lists.py stage-b --bn-momentum 0.01
    # every rival mode, paired seeds
    python sweeps/make_collapse_lists.py rivals --bn-momentum 0.01
    # issue 26: the confound, MDR(1,2), fresh seeds
    python sweeps/make_collapse_lists.py stage-c --bn-momentum 0.1
    # real photos
    python sweeps/make_collapse_lists.py stage-c-photos --bn-momentum 0.1 --image-source data/photos
    # issue 22 (docs/dropout/PLAN.md): dropout's stability, steps 1 and 2; LayerNorm by the rivals
    python sweeps/make_collapse_lists.py dropout-step1 --bn-momentum 0.1
    python sweeps/make_collapse_lists.py dropout-step2 --bn-momentum 0.1
    python sweeps/make_collapse_lists.py dropout-ln --bn-momentum 0.1

Run a list with sweeps/run_and_commit.sh (docs/collapse.md, "The study"): each finished run is
committed to docs/collapse/study/<stage>/<run>/. Paired seeds: the same seed gives the same tasks
and initial weights in every mode.
"""

import argparse
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "collapse" / "study"
OUT_C = OUT.parent / "study_c"  # Stage C (issue 26): its own plan, lists and runs
STAGE_A_SEEDS = (1, 2, 3)
# Stage C (docs/collapse/study_c/PLAN.md): arm -> the probe's flags; fresh seeds, 200 updates
STAGE_C_ARMS = {
    "bn": "--mode bn",
    "bn-e2": "--mode bn --update-epochs 2",
    "bn-mdr21": "--mode bn-mdr --alpha1 2 --alpha2 1",
    "bn-mdr12": "--mode bn-mdr --alpha1 1 --alpha2 2",
}
STAGE_C_PHOTO_ARMS = ("bn", "bn-mdr21")
STAGE_C_SEEDS = tuple(range(11, 27))
STAGE_C_PHOTO_SEEDS = tuple(range(11, 19))
STAGE_C_STEPS = 25_600  # 200 updates of 128 transitions
# real photos: 4 training tasks on 2 photos, the held-out task on a third
STAGE_C_TARGETS_PER_IMAGE = 2
# issue 22 (docs/dropout/PLAN.md): its plan and lists in docs/dropout/, the stability runs there too
OUT_DROPOUT = OUT.parent.parent / "dropout"
DROPOUT_SEEDS = tuple(range(31, 43))  # fresh: disjoint from Stages A-C's 1-26
# stage -> its arms, (mode, dropout p or None), in Stage C's regime and 200 updates
DROPOUT_STAGES = {
    "dropout-step1": [("none", None), ("dropout", "0.1"), ("dropout-mdr", "0.1")],
    "dropout-step2": [("dropout", "0.2"), ("dropout-mdr", "0.2")],
}
# the lists' files in docs/dropout/ (dropout-ln's runs go beside the rivals', docs/collapse/study/)
DROPOUT_LISTS = {
    "dropout-step1": "stability_step1.txt",
    "dropout-step2": "stability_step2.txt",
    "dropout-ln": "ln.txt",
}
RIVALS = ["bn-recal", "bn-train", "bn-oldtrain", "brn", "brn-mdr", "bn-wn", "gn", "none"]
# each list's header, one "# " line per line of text
HEADERS = {
    "stage-a": (
        "Stage A (regime): BN and BN+MDR(2,1), 3 paired seeds, views batched separately, "
        "BN momentum 0.01 and 0.1.\n"
        "Eval's committed runs serve here (its statistics are frozen: neither knob changes it)."
    ),
    "stage-b": (
        "Stage B (decision): BN, Eval and BN+MDR(2,1), paired seeds, clip 0.2, "
        "in the regime Stage A picked.\n"
        "BN and BN+MDR seeds 1-3 are Stage A's runs of that regime (the same commands): "
        "they join the cell, not rerun."
    ),
    "rivals": (
        "Rivals (issue 13): every rival mode, paired seeds, in the decisive regime; "
        "bn, eval, bn-mdr come from Stage B."
    ),
    "stage-c": (
        "Stage C (issue 26, docs/collapse/study_c/PLAN.md): bn, bn with 2 epochs, MDR(2,1), "
        "MDR(1,2); fresh paired\n"
        "seeds 11-26, 200 updates, procedural images, the decisive regime. "
        "Ordered by seed: a stopped queue leaves whole pairs."
    ),
    "stage-c-photos": (
        "Stage C on real photographs (issue 26, docs/collapse/study_c/PLAN.md): bn and MDR(2,1), "
        "paired seeds\n"
        "11-18, 200 updates, the folder written by sweeps/make_photo_folder.py, "
        "2 targets per photo."
    ),
    "dropout-step1": (
        "Dropout's stability, step 1 (issue 22, docs/dropout/PLAN.md): none, dropout and "
        "Dropout+MDR(2,1) at p 0.1;\n"
        "fresh paired seeds 31-42, 200 updates, procedural images, Stage C's decisive regime. "
        "Ordered by seed: a stopped queue leaves whole triples."
    ),
    "dropout-step2": (
        "Dropout's stability, step 2 (issue 22, docs/dropout/PLAN.md; only if step 1 leaves it "
        "open): dropout and\n"
        "Dropout+MDR(2,1) at p 0.2, step 1's seeds 31-42 and regime. "
        "Ordered by seed: a stopped queue leaves whole pairs."
    ),
    "dropout-ln": (
        "LayerNorm on the probe (issue 22, docs/dropout/PLAN.md): --mode ln on seeds 1-4 with "
        "the rivals' flags (rivals.txt),\n"
        "its runs beside the rivals' in docs/collapse/study/rivals/."
    ),
}


def line(mode: str, momentum: str, seed: int, stage: str) -> str:
    folder = stage.replace("-", "_")
    return (
        f"python ppo_collapse_probe.py --mode {mode} --bn-momentum {momentum} "
        f"--view-batching separate --seed {seed} --run-name {folder}/{mode}_bnm{momentum}_s{seed}"
    )


def stage_c_line(arm: str, momentum: str, seed: int, image_source: str) -> str:
    """One Stage C run: the decisive regime (views separate, clip 0.2), the arm's flags, 200
    updates; its folder is procedural/<arm>_s<seed> or photos/<arm>_s<seed> under
    docs/collapse/study_c/."""
    folder, photos = "procedural", ""
    if image_source != "procedural":
        folder = "photos"
        photos = f" --image-source {image_source} --targets-per-image {STAGE_C_TARGETS_PER_IMAGE}"
    return (
        f"python ppo_collapse_probe.py {STAGE_C_ARMS[arm]} --bn-momentum {momentum} "
        f"--view-batching separate --total-timesteps {STAGE_C_STEPS}{photos} --seed {seed} "
        f"--run-name {folder}/{arm}_bnm{momentum}_s{seed}"
    )


def dropout_line(mode: str, p, momentum: str, seed: int) -> str:
    """One run of the dropout stability study: Stage C's flags (views separate, clip 0.2, 200
    updates, procedural images), the arm's mode and p; its folder is stability/<mode>[_p<p>]_s<seed>
    under docs/dropout/."""
    dropout = f" --dropout-p {p}" if p else ""
    arm = f"{mode}_p{p}" if p else mode
    return (
        f"python ppo_collapse_probe.py --mode {mode}{dropout} --bn-momentum {momentum} "
        f"--view-batching separate --total-timesteps {STAGE_C_STEPS} --seed {seed} "
        f"--run-name stability/{arm}_s{seed}"
    )


def run_list(stage: str, momentum: str, seeds: list, image_source: str = "procedural") -> list:
    if stage in DROPOUT_STAGES:
        arms = DROPOUT_STAGES[stage]
        return [dropout_line(mode, p, momentum, seed) for seed in seeds for mode, p in arms]
    if stage == "dropout-ln":  # the rivals' lines, one more mode
        return [line("ln", momentum, seed, "rivals") for seed in seeds]
    if stage == "stage-c":
        return [
            stage_c_line(arm, momentum, seed, "procedural")
            for seed in seeds
            for arm in STAGE_C_ARMS
        ]
    if stage == "stage-c-photos":
        return [
            stage_c_line(arm, momentum, seed, image_source)
            for seed in seeds
            for arm in STAGE_C_PHOTO_ARMS
        ]
    if stage == "stage-a":
        return [
            line(mode, m, seed, stage)
            for seed in STAGE_A_SEEDS
            for m in ("0.01", "0.1")
            for mode in ("bn", "bn-mdr")
        ]
    if stage == "rivals":
        return [line(mode, momentum, seed, stage) for seed in seeds for mode in RIVALS]
    ran_in_stage_a = {(mode, seed) for mode in ("bn", "bn-mdr") for seed in STAGE_A_SEEDS}
    runs = [
        (seed, mode)
        for seed in seeds
        for mode in ("bn", "bn-mdr", "eval")
        if (mode, seed) not in ran_in_stage_a
    ]
    # new BN/BN+MDR pairs first: a queue stopped early still tests
    runs.sort(key=lambda run: run[0] in STAGE_A_SEEDS)
    return [line(mode, momentum, seed, stage) for seed, mode in runs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(HEADERS))
    parser.add_argument(
        "--bn-momentum", default="0.01", help="the regime's BN momentum (stage-b, rivals)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="default: 1-10 (stage-b), 1-4 (rivals, dropout-ln), 11-26 / 11-18 (stage-c), 31-42 "
        "(dropout-step1/2)",
    )
    parser.add_argument(
        "--image-source",
        default="data/photos",
        help="stage-c-photos: the photo folder, as the runs see it",
    )
    parser.add_argument("--out", type=Path, help=f"the list's file (default: {OUT}/<stage>.txt)")
    args = parser.parse_args(argv)
    default_seeds = {
        "stage-b": range(1, 11),
        "stage-c": STAGE_C_SEEDS,
        "stage-c-photos": STAGE_C_PHOTO_SEEDS,
        **{stage: DROPOUT_SEEDS for stage in DROPOUT_STAGES},
    }
    seeds = args.seeds or list(default_seeds.get(args.stage, range(1, 5)))
    runs_dir = OUT_C if args.stage.startswith("stage-c") else OUT
    runs_dir = OUT_DROPOUT if args.stage in DROPOUT_STAGES else runs_dir
    out = args.out or runs_dir / f"{args.stage.replace('-', '_')}.txt"
    if args.stage in DROPOUT_LISTS:
        out = args.out or OUT_DROPOUT / DROPOUT_LISTS[args.stage]
    lines = run_list(args.stage, args.bn_momentum, seeds, args.image_source)
    repo = OUT.parent.parent.parent
    listed = out.relative_to(repo) if out.is_relative_to(repo) else out
    dest = runs_dir.relative_to(repo)
    run = f"xargs -P 2 -d '\\n' -n 1 bash sweeps/run_and_commit.sh $CHECKOUT/{dest} < {listed}"
    header = [f"# {text}" for text in HEADERS[args.stage].splitlines()]
    header[-1] += " Run with:"
    header.append(f"#   (in a worktree of the commit to run; CHECKOUT = your checkout) {run}")
    out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {out}: {len(lines)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
