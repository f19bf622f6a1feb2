"""Learning curve of a ppo_patchloc_mdr.py run: train and held-out normalized reward vs global step.

Reads the TensorBoard event file(s) of one run folder and saves a PNG:

    python analysis/plot_learning.py runs/<run_name> --out docs/patchloc_learning.png \
        --random-reference -14.2

The normalized reward is the return as a percentage of each task's exact optimal return (envs/); the
optional --random-reference draws a uniformly random policy's value as a dashed line.
"""

import argparse
import math
import os

import numpy as np
from cli import ArgumentParser
from matplotlib.figure import Figure  # no pyplot: no display backend, no global figure state
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CURVES = {
    "charts/normalized_reward": "training episodes during collection (sampled actions)",
    "charts/test_normalized_reward": "held-out tasks (greedy policy, each task once)",
    "charts/generalization_gap": "training tasks (greedy policy) = held-out + generalization gap",
}


def read_scalars(run_dir):
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    return {
        tag: np.array([(e.step, e.value) for e in accumulator.Scalars(tag)])
        for tag in CURVES
        if tag in tags
    }


def smooth(values, window):
    """Trailing moving average over `window` points (shorter at the start)."""
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (cumsum[1:] - cumsum[starts]) / (np.arange(1, len(values) + 1) - starts)


def window(text: str) -> int:
    """An argparse type: a whole number of points >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def finite(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="runs/<run_name> of a ppo_patchloc_mdr.py run")
    parser.add_argument("--out", required=True, help="PNG to write (its folder is created)")
    parser.add_argument(
        "--smooth",
        type=window,
        default=10,
        help="moving-average window of the training curve (points)",
    )
    parser.add_argument(
        "--random-reference",
        type=finite,
        default=None,
        help="a random policy's normalized reward (%%)",
    )
    parser.add_argument("--title", default="PPO + MDR on patch localization (CPU-sized run)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        raise SystemExit(f"error: {args.run_dir}: no such folder (a ppo_patchloc_mdr.py run)")

    scalars = read_scalars(args.run_dir)
    if not scalars:
        raise SystemExit(f"error: no normalized-reward scalars in {args.run_dir}")
    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.subplots()
    train = scalars.get("charts/normalized_reward")
    if train is not None:
        ax.plot(train[:, 0], train[:, 1], color="tab:blue", alpha=0.25, linewidth=1)
        label = CURVES["charts/normalized_reward"] + f", moving average of {args.smooth}"
        ax.plot(
            train[:, 0],
            smooth(train[:, 1], args.smooth),
            color="tab:blue",
            linewidth=2,
            label=label,
        )
    test = scalars.get("charts/test_normalized_reward")
    if test is not None:
        ax.plot(
            test[:, 0],
            test[:, 1],
            "o-",
            color="tab:orange",
            linewidth=2,
            label=CURVES["charts/test_normalized_reward"],
        )
    gap = scalars.get("charts/generalization_gap")
    if test is not None and gap is not None and np.array_equal(test[:, 0], gap[:, 0]):
        label = CURVES["charts/generalization_gap"]
        ax.plot(
            test[:, 0], test[:, 1] + gap[:, 1], "s--", color="tab:green", linewidth=1.5, label=label
        )
    if args.random_reference is not None:
        label = f"uniformly random policy ({args.random_reference:.1f}%)"
        ax.axhline(args.random_reference, color="gray", linestyle="--", label=label)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("global step (environment steps)")
    ax.set_ylabel("normalized reward (% of the optimal return)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 0.2), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
