"""Figures of the reward-collapse probe's runs (ppo_collapse_probe.py): the paper's Fig. 6 layout,
the App. B entropy comparison, and the figures of analysis/collapse_stats.py (reward quartiles and
Kaplan-Meier curves per arm, the paired differences of Stage C). Reads every metrics.csv (+
summary.json) under a folder, old runs (with the retired collapse_flag column, no acting_entropy)
and new ones alike; runs that did not finish are named, not drawn.

    python analysis/collapse_figures.py --runs-dir docs/collapse --cell views=joint --out-dir docs
    # writes docs/collapse_fig6.png and docs/collapse_entropy.png from the first 16 runs

x marks the collapse onset of the definition in analysis/collapse_runs.py (--definition: old, the
first study's, by default; docs/collapse.md, "Collapse definition").
"""

import argparse
import math
import os
import sys
import textwrap

import numpy as np
from cli import ArgumentParser, run_command
from collapse_runs import (
    DEFINITIONS,
    ConfigError,
    cell_key,
    cell_label,
    finished,
    group_runs,
    mark_collapses,
    mode_label,
    read_runs,
    select_cells,
    select_modes,
    varying_settings,
)

# normalized reward, percent of the optimal return (stopping at once: about -12)
REWARD_YLIM = (-20.0, 100.0)
DELTA_YLIM = (1e-5, 1.0)  # JS divergence in nats, <= ln 2


def per_iteration(runs: list, column: str, statistic):
    """statistic(values of the runs that reached it) per iteration, NaN values left out;
    (iterations, steps, values)."""
    by_iteration = {}
    for run in runs:
        for iteration, step, value in zip(run["iteration"], run["global_step"], run[column]):
            if math.isfinite(value):
                by_iteration.setdefault(int(iteration), (step, []))[1].append(value)
    iterations = sorted(by_iteration)
    steps = np.array([by_iteration[i][0] for i in iterations])
    return (
        np.array(iterations),
        steps,
        np.array([statistic(by_iteration[i][1]) for i in iterations]),
    )


def mean_curve(runs: list, column: str):
    """Mean over runs per iteration (runs of different lengths: the mean of those that reached it);
    (steps, mean)."""
    _, steps, mean = per_iteration(runs, column, np.mean)
    return steps, mean


def fluctuation(run) -> float:
    """Std of the update-to-update change of the smoothed reward (App. B picks the most fluctuating
    seeds)."""
    values = run["smoothed_reward"][np.isfinite(run["smoothed_reward"])]
    return float(np.std(np.diff(values))) if len(values) > 2 else 0.0


def draw_panel(ax, runs: list, title: str, aggregate: str = "mean"):
    """Reward (left axis) and Delta pi minus (right axis, log) of `runs`: seeds thin, aggregate
    thick, collapse onsets x. aggregate: 'mean' over seeds (Fig. 6) or 'min' over the two most
    fluctuating seeds (App. B)."""
    ax.set_title(f"{title} ({len(runs)} seed{'s' * (len(runs) != 1)})", fontsize=9)
    if not runs:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    delta_ax = ax.twinx()
    delta_x, delta = mean_curve(runs, "delta_pi_minus")
    show_delta = bool(
        np.any(delta > DELTA_YLIM[0])
    )  # eval mode: 0 by definition (rounding leaves ~1e-8)
    for run in runs:
        ax.plot(run["global_step"], run["smoothed_reward"], color="tab:blue", lw=0.7, alpha=0.5)
        onset = [] if run["collapse_index"] is None else [run["collapse_index"]]
        ax.plot(run["global_step"][onset], run["smoothed_reward"][onset], "kx", ms=6, mew=1.5)
        positive = run["delta_pi_minus"] > 0
        if show_delta:
            delta_ax.plot(
                run["global_step"][positive],
                run["delta_pi_minus"][positive],
                color="tab:red",
                lw=0.7,
                alpha=0.4,
            )
    if aggregate == "min":
        worst = sorted(runs, key=fluctuation, reverse=True)[:2]
        length = min(len(run["smoothed_reward"]) for run in worst)
        worst_reward = np.min([run["smoothed_reward"][:length] for run in worst], axis=0)
        ax.plot(worst[0]["global_step"][:length], worst_reward, color="tab:blue", lw=2.2)
    else:
        reward_x, reward = mean_curve(runs, "smoothed_reward")
        ax.plot(reward_x, reward, color="tab:blue", lw=2.2)
    ax.set_ylim(*REWARD_YLIM)  # every panel on the same scales, as in the paper's figure
    if show_delta:
        delta_ax.plot(delta_x[delta > 0], delta[delta > 0], color="tab:red", lw=2.0)
        delta_ax.set_yscale("log")
        delta_ax.set_ylim(*DELTA_YLIM)
    else:
        delta_ax.text(
            0.98,
            0.04,
            "Δπ⁻ ≈ 0",
            ha="right",
            va="bottom",
            transform=ax.transAxes,
            color="tab:red",
            fontsize=8,
        )
        delta_ax.set_yticks([])
    ax.set_ylabel("reward (% of optimum)", color="tab:blue", fontsize=8)
    delta_ax.set_ylabel("Δπ⁻ (JS, nats)", color="tab:red", fontsize=8)
    ax.tick_params(labelsize=7)
    delta_ax.tick_params(labelsize=7)
    ax.set_xlabel("environment steps", fontsize=8)


def new_figure(rows: int, cols: int, size: tuple, **grid):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False, gridspec_kw=grid or None)


def save_figure(fig, title, path):
    """Title, tight layout, PNG at `path` (folders created), figure closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(
        textwrap.fill(title, width=int(fig.get_figwidth() * 15)), fontsize=9
    )  # ~15 characters per inch
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def clip_column(run) -> str:
    return f"clip {run['clip_coef']:g}"


def draw_fig6(runs: list, path: str, note: str = "", column=clip_column):
    """The paper's Fig. 6 layout: one row per arm (and per other setting that varies), one column
    per value of column(run) (default: the clip; columns in the order of the runs' values, the
    clips from the largest)."""
    # a row: the cell without its clip
    rows = group_runs(runs, key=lambda run: cell_key(run)[:1] + cell_key(run)[2:])
    by_clip = sorted(runs, key=lambda run: -run["clip_coef"])
    columns = list(dict.fromkeys(column(run) for run in by_clip))
    shown = [setting for setting in varying_settings(runs) if setting != "clip_coef"]
    fig, axes = new_figure(len(rows), len(columns), (5.5 * len(columns), 2.9 * len(rows)))
    for row, (key, row_runs) in enumerate(rows.items()):
        label = cell_label(key[:1] + (None,) + key[1:], shown)
        for col, name in enumerate(columns):
            panel_runs = [run for run in row_runs if column(run) == name]
            draw_panel(axes[row][col], panel_runs, f"{label}, {name}")
    title = (
        "Reward (blue, moving average) and Δπ⁻ (red, log) per update; "
        "thin: seeds, thick: mean, x: collapse onset"
    )
    save_figure(fig, title + (f"; {note}" if note else ""), path)


def draw_entropy_comparison(runs: list, path: str, clip: float):
    """App. B layout: one row per arm that has runs at two or more entropy coefficients (at
    `clip`), one column per coefficient; thick line: the minimum over the two most fluctuating
    seeds. An arm, not a mode: two dropout probabilities or epoch splits are never one row."""
    at_clip = [run for run in runs if math.isclose(run["clip_coef"], clip)]
    ent_coefs = sorted({run["ent_coef"] for run in at_clip}, reverse=True)
    by_mode = group_runs(at_clip, key=lambda run: (run["arm"],))
    modes = [
        key[0]
        for key, mode_runs in by_mode.items()
        if len({run["ent_coef"] for run in mode_runs}) > 1
    ]
    if not modes:
        return False
    fig, axes = new_figure(len(modes), len(ent_coefs), (5.5 * len(ent_coefs), 3 * len(modes)))
    for row, mode in enumerate(modes):
        for col, ent in enumerate(ent_coefs):
            panel_runs = [run for run in by_mode[(mode,)] if math.isclose(run["ent_coef"], ent)]
            draw_panel(
                axes[row][col], panel_runs, f"{mode_label(mode)}, entropy {ent:g}", aggregate="min"
            )
    title = (
        f"App. B: entropy coefficient, clip {clip:g}; "
        "thick: min over the two most fluctuating seeds, x: collapse onset"
    )
    save_figure(fig, title, path)
    return True


def draw_summary(rows: list, path: str, note: str = ""):
    """collapse_stats.png: two panels per entry (title, cells) of rows, a cell being (label, runs,
    curves) and curves [(km_times, km_survival, definition)] (the first solid, any other dotted).
    Left: median and interquartile band of the smoothed reward over the cell's runs per update;
    right: Kaplan-Meier curves of the time to collapse."""
    fig, axes = new_figure(len(rows), 2, (13, 5 * len(rows)))
    for (title, cells), (reward_ax, km_ax) in zip(rows, axes):
        for index, (label, runs, curves) in enumerate(cells):
            # the 11th cell on: dashed, not a reused colour
            color, style = f"C{index % 10}", ("-", "--", ":")[index // 10 % 3]
            iterations, _, quartiles = per_iteration(
                runs, "smoothed_reward", lambda v: np.percentile(v, [25, 50, 75])
            )
            if len(iterations):
                reward_ax.fill_between(
                    iterations, quartiles[:, 0], quartiles[:, 2], color=color, alpha=0.2, lw=0
                )
                reward_ax.plot(
                    iterations,
                    quartiles[:, 1],
                    color=color,
                    ls=style,
                    lw=1.8,
                    label=f"{label} (n={len(runs)})",
                )
            for number, (km_times, km_survival, definition) in enumerate(curves):
                km_ax.step(
                    km_times,
                    km_survival,
                    where="post",
                    color=color,
                    ls=style if number == 0 else ":",
                    lw=1.8 if number == 0 else 1.2,
                    label=f"{label} (n={len(runs)})"
                    + (f", {definition} definition" if len(curves) > 1 else ""),
                )
        prefix = f"{title}: " if title else ""
        km_title = "Kaplan-Meier: time to collapse (runs without one censored at their last update)"
        reward_ax.set(xlabel="update", ylabel="smoothed reward (% of optimum)", ylim=REWARD_YLIM)
        reward_ax.set_title(prefix + "median and interquartile range over seeds", fontsize=9)
        km_ax.set(xlabel="update", ylabel="P(no collapse yet)", ylim=(-0.03, 1.03))
        km_ax.set_title(textwrap.fill(prefix + km_title, 90), fontsize=9)
        for ax in (reward_ax, km_ax):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    save_figure(fig, "Collapse statistics" + (f"; {note}" if note else ""), path)


PAIRED_YLABEL = "ΔAUC (points of optimal), paired by seed"
PAIRED_TITLE = (
    "Paired differences of the area under the reward curve: a dot per seed; "
    "bar: mean; line: 95 % paired bootstrap interval"
)


def draw_paired_differences(
    panels: list, path: str, note: str = "", ylabel=PAIRED_YLABEL, title=PAIRED_TITLE
):
    """collapse_paired.png: one panel per entry (title, comparisons) of panels, a comparison being
    (label, its differences, one per seed, and (mean, low, high)): a dot per seed, the mean as a
    bar and its interval (NaN: none) as a line beside it. With another ylabel and title, any
    values per seed (the dropout study's fluctuation per run)."""
    widths = [max(len(comparisons), 1) for _, comparisons in panels]
    size = (1.2 * len(panels) + 1.6 * sum(widths), 4.8)
    fig, axes = new_figure(1, len(panels), size, width_ratios=widths)
    for ax, (panel_title, comparisons) in zip(axes[0], panels):
        ax.axhline(0.0, color="grey", lw=0.8)
        for x, (label, differences, (mean, low, high)) in enumerate(comparisons):
            differences = np.asarray(differences, dtype=float)
            # the seeds side by side, so that equal differences stay visible
            spread = np.linspace(-0.15, 0.15, len(differences)) if len(differences) > 1 else 0.0
            ax.plot(x + spread + 0 * differences, differences, "o", color=f"C{x}", alpha=0.7, ms=5)
            if math.isfinite(mean):
                ax.plot([x - 0.25, x + 0.25], [mean, mean], color="black", lw=2)
            if math.isfinite(low):
                ax.vlines(x + 0.32, low, high, color="black", lw=1.5)
        ax.set_xticks(range(len(comparisons)))
        ax.set_xticklabels([label for label, *_ in comparisons], fontsize=8)
        ax.set_xlim(-0.6, max(len(comparisons), 1) - 0.4)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, title + (f"; {note}" if note else ""), path)


def draw_train_vs_heldout(panels: list, path: str, note: str = ""):
    """The dropout study's generalization figure: one panel per entry (arm label, runs) of panels,
    a run being (steps, train, held_out) of its held-out evaluations (train: the greedy policy on
    as many training tasks): seeds thin, the mean over seeds (at the steps every seed reached)
    thick; training tasks solid, held-out tasks dashed."""
    fig, axes = new_figure(1, len(panels), (4.6 * len(panels), 3.8))
    for ax, (label, runs) in zip(axes[0], panels):
        for column, (name, style) in enumerate((("training tasks", "-"), ("held-out", "--"))):
            color = f"C{column}"
            for steps, *curves in runs:
                ax.plot(steps, curves[column], color=color, ls=style, lw=0.7, alpha=0.4)
            if runs:
                length = min(len(steps) for steps, *_ in runs)
                mean = np.mean([curves[column][:length] for _, *curves in runs], axis=0)
                ax.plot(runs[0][0][:length], mean, color=color, ls=style, lw=2.2, label=name)
        ax.set_title(f"{label} ({len(runs)} seed{'s' * (len(runs) != 1)})", fontsize=9)
        ax.set(xlabel="environment steps", ylim=REWARD_YLIM)
        ax.set_ylabel("normalized reward (% of optimal)", fontsize=8)
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=7)
    title = (
        "Greedy eval-mode policy on the training tasks (solid) and the held-out tasks (dashed); "
        "thin: seeds, thick: mean"
    )
    save_figure(fig, title + (f"; {note}" if note else ""), path)


def finite_float(minimum: float, inclusive: bool):
    """An argparse type: a finite number >= minimum (> minimum unless inclusive)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            bound = f"{'>=' if inclusive else '>'} {minimum:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number {bound}")
        return value

    return parse


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs-dir", default="docs/collapse", help="folder searched (recursively) for metrics.csv"
    )
    parser.add_argument(
        "--out-dir",
        required=True,
        help="folder for collapse_fig6.png (rows: arm, columns: clip) and collapse_entropy.png",
    )
    parser.add_argument(
        "--cell",
        default="",
        help="only cells matching key=value[,key=value] (mode, clip, ent, bnm, views, p)",
    )
    parser.add_argument(
        "--modes", default="", help="only these modes (arms), comma-separated (default: all)"
    )
    parser.add_argument(
        "--definition",
        choices=DEFINITIONS,
        default="old",
        help="collapse definition of the x marks (default: old, the first study's)",
    )
    parser.add_argument(
        "--ent-coef",
        type=finite_float(0.0, inclusive=True),
        default=None,
        help="Fig. 6's entropy coefficient (default: most common)",
    )
    parser.add_argument(
        "--entropy-clip",
        type=finite_float(0.0, inclusive=False),
        default=0.2,
        help="clip coefficient of the App. B layout's runs",
    )
    args = parser.parse_args(argv)
    runs, unfinished = finished(read_runs(args.runs_dir))
    if not runs:
        raise ConfigError(f"--runs-dir {args.runs_dir}: no finished runs (none has summary.json)")
    runs = select_modes(select_cells(runs, args.cell), args.modes)
    runs = mark_collapses(runs, args.definition)
    ent_coefs = [run["ent_coef"] for run in runs]
    ent_coef = max(set(ent_coefs), key=ent_coefs.count) if args.ent_coef is None else args.ent_coef
    fig6_runs = [run for run in runs if math.isclose(run["ent_coef"], ent_coef)]
    if not fig6_runs:
        found = ", ".join(f"{e:g}" for e in set(ent_coefs))
        raise ConfigError(f"--ent-coef {ent_coef:g}: no runs with it (found {found})")
    if unfinished:
        names = ", ".join(f"{run['name']} ({run['status']})" for run in unfinished)
        print(f"not drawn, not finished: {names}")
    fig6, entropy_path = (
        os.path.join(args.out_dir, name) for name in ("collapse_fig6.png", "collapse_entropy.png")
    )
    draw_fig6(fig6_runs, fig6, note=f"entropy {ent_coef:g}")
    print(
        f"wrote {fig6} ({len(runs)} runs found, "
        f"Fig. 6 uses the {len(fig6_runs)} at entropy {ent_coef:g})"
    )
    if draw_entropy_comparison(runs, entropy_path, args.entropy_clip):
        found = ", ".join(f"{e:g}" for e in sorted(set(ent_coefs)))
        print(f"wrote {entropy_path} (entropy coefficients {found})")
    else:
        print(
            f"no {entropy_path}: no mode has runs at two entropy coefficients "
            f"with clip {args.entropy_clip:g}"
        )
    return 0


def run(argv=None) -> int:
    """main() as a command: bad input (a ConfigError) is one line on stderr, exit status 2."""
    return run_command(main, argv, ConfigError, 2)


if __name__ == "__main__":
    sys.exit(run())
