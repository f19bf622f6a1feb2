"""The collapse study's run lists (issues 12 and 13), one probe command per line, each naming its folder.

    python sweeps/make_collapse_lists.py stage-a                        # docs/collapse/study/stage_a.txt (regime)
    python sweeps/make_collapse_lists.py stage-b --bn-momentum 0.01     # the decision, in the regime Stage A picked
    python sweeps/make_collapse_lists.py rivals --bn-momentum 0.01      # every rival mode, paired seeds

Run a list with sweeps/run_and_commit.sh (docs/collapse.md, "The study"): each finished run is committed to
docs/collapse/study/<stage>/<run>/. Paired seeds: the same seed gives the same tasks and initial weights in every mode.
"""

import argparse
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "collapse" / "study"
STAGE_A_SEEDS = (1, 2, 3)
RIVALS = ["bn-recal", "bn-train", "bn-oldtrain", "brn", "brn-mdr", "bn-wn", "gn", "none"]
HEADERS = {
    "stage-a": "Stage A (regime): BN and BN+MDR(2,1), 3 paired seeds, views batched separately, BN momentum 0.01 and 0.1.\n"
    "Eval's committed runs serve here (its statistics are frozen: neither knob changes it).",
    "stage-b": "Stage B (decision): BN, Eval and BN+MDR(2,1), paired seeds, clip 0.2, in the regime Stage A picked.\n"
    "BN and BN+MDR seeds 1-3 are Stage A's runs of that regime (the same commands): they join the cell, not rerun.",
    "rivals": "Rivals (issue 13): every rival mode, paired seeds, in the decisive regime; bn, eval, bn-mdr come from Stage B.",
}


def line(mode: str, momentum: str, seed: int, stage: str) -> str:
    folder = stage.replace("-", "_")
    return (
        f"python ppo_collapse_probe.py --mode {mode} --bn-momentum {momentum} --view-batching separate --seed {seed} "
        f"--run-name {folder}/{mode}_bnm{momentum}_s{seed}"
    )


def run_list(stage: str, momentum: str, seeds: list) -> list:
    if stage == "stage-a":
        return [line(mode, m, seed, stage) for seed in STAGE_A_SEEDS for m in ("0.01", "0.1") for mode in ("bn", "bn-mdr")]
    if stage == "rivals":
        return [line(mode, momentum, seed, stage) for seed in seeds for mode in RIVALS]
    ran_in_stage_a = {(mode, seed) for mode in ("bn", "bn-mdr") for seed in STAGE_A_SEEDS}
    runs = [(seed, mode) for seed in seeds for mode in ("bn", "bn-mdr", "eval") if (mode, seed) not in ran_in_stage_a]
    runs.sort(key=lambda run: run[0] in STAGE_A_SEEDS)  # new BN/BN+MDR pairs first: a queue stopped early still tests
    return [line(mode, momentum, seed, stage) for seed, mode in runs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(HEADERS))
    parser.add_argument("--bn-momentum", default="0.01", help="the regime's BN momentum (stage-b, rivals)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 1-10 (stage-b), 1-4 (rivals)")
    parser.add_argument("--out", type=Path, help=f"the list's file (default: {OUT}/<stage>.txt)")
    args = parser.parse_args(argv)
    seeds = args.seeds or list(range(1, 11 if args.stage == "stage-b" else 5))
    out = args.out or OUT / f"{args.stage.replace('-', '_')}.txt"
    lines = run_list(args.stage, args.bn_momentum, seeds)
    listed = out.relative_to(OUT.parent.parent.parent) if out.is_relative_to(OUT) else out
    run = f"xargs -P 2 -d '\\n' -n 1 bash sweeps/run_and_commit.sh $CHECKOUT/docs/collapse/study < {listed}"
    header = [f"# {text}" for text in HEADERS[args.stage].splitlines()]
    header[-1] += " Run with:"
    header.append(f"#   (in a worktree of the commit to run; CHECKOUT = your checkout) {run}")
    out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {out}: {len(lines)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
