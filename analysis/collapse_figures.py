"""Figures of the reward-collapse probe's runs (ppo_collapse_probe.py): the paper's Fig. 6 layout,
the App. B entropy comparison, and the summary figure of analysis/collapse_stats.py. Reads every
metrics.csv (+ summary.json) under a folder, old runs (with the retired collapse_flag column, no
acting_entropy) and new ones alike.

    python analysis/collapse_figures.py --runs-dir docs/collapse
    # writes docs/collapse_fig6.png, docs/collapse_entropy.png

x marks the collapse onset of analysis/collapse_stats.py's definition (docs/collapse.md, "Collapse
definition").
"""

import argparse
import csv
import json
import math
import os
import sys
import textwrap

import numpy as np

MODE_LABELS = {"bn": "BN", "eval": "Eval", "bn-mdr": "BN+MDR"}
# Rows and legends in this order; modes not listed follow, alphabetically.
MODE_ORDER = (
    "bn",
    "eval",
    "bn-mdr",
    "bn-recal",
    "bn-train",
    "bn-oldtrain",
    "brn",
    "brn-mdr",
    "bn-wn",
    "gn",
    "none",
)
SETTINGS = (
    "clip_coef",
    "ent_coef",
    "bn_momentum",
    "view_batching",
)  # a cell = mode + these; seeds within a cell
SETTING_LABELS = {
    "clip_coef": "clip",
    "ent_coef": "ent",
    "bn_momentum": "bnm",
    "view_batching": "views",
}
SERIES = (
    "iteration",
    "global_step",
    "normalized_reward",
    "smoothed_reward",
    "delta_pi_minus",
    "entropy",
)
REWARD_YLIM = (
    -20.0,
    100.0,
)  # normalized reward, percent of the optimal return (stopping at once: about -12)
DELTA_YLIM = (1e-5, 1.0)  # JS divergence in nats, <= ln 2


class ConfigError(Exception):
    """Bad input: printed as one line, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), like the ConfigErrors."""

    def error(self, message):
        print(f"error: {message} (--help lists the options)", file=sys.stderr)
        sys.exit(2)


def mode_label(mode: str) -> str:
    return MODE_LABELS.get(mode, mode)


def mode_rank(mode: str) -> tuple:
    return (MODE_ORDER.index(mode), "") if mode in MODE_ORDER else (len(MODE_ORDER), mode)


def read_float(value) -> float:
    return float(value) if value not in (None, "") else math.nan


def read_runs(runs_dir: str, option: str = "--runs-dir") -> list:
    """Every metrics.csv under runs_dir (recursively) as a dict: name (folder relative to
    runs_dir), mode, seed, the cell settings, wall_time_s, one array per SERIES column and
    acting_entropy: the eval-mode acting policy's entropy where the run logged it, else the loss's
    (train-mode) entropy, which is all that old runs have (entropy_source says which)."""
    if not os.path.isdir(runs_dir):
        raise ConfigError(f"{option} {runs_dir}: no such folder")
    runs = []
    for root, dirs, files in os.walk(runs_dir):
        dirs.sort()
        if "metrics.csv" not in files:
            continue
        with open(os.path.join(root, "metrics.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        summary_path = os.path.join(root, "summary.json")
        summary = {}
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        run_args = summary.get("args", {})
        run = {
            "name": os.path.relpath(root, runs_dir),
            "mode": rows[0]["mode"],
            "seed": int(rows[0]["seed"]),
            "clip_coef": float(rows[0]["clip_coef"]),
            "ent_coef": float(rows[0]["ent_coef"]),
            "bn_momentum": run_args.get(
                "bn_momentum"
            ),  # None: no summary.json (a run that crashed)
            "view_batching": run_args.get(
                "view_batching", "joint" if run_args else None
            ),  # runs before the flag: joint
            "wall_time_s": summary.get("wall_time_s", read_float(rows[-1].get("wall_time"))),
            "collapse_index": None,  # set by collapse_stats.mark_collapses
        }
        for column in SERIES:
            run[column] = np.array([read_float(row[column]) for row in rows])
        run["entropy_source"] = "acting_entropy" if "acting_entropy" in rows[0] else "entropy"
        run["acting_entropy"] = np.array([read_float(row[run["entropy_source"]]) for row in rows])
        signed = [
            read_float(row.get("trust_region_violation_signed")) for row in rows
        ]  # NaN in runs before the column
        run["trust_region_violation_signed"] = np.array(signed)
        runs.append(run)
    if not runs:
        raise ConfigError(f"{option} {runs_dir}: no runs found (no non-empty metrics.csv below it)")
    return runs


def format_setting(value) -> str:
    if value is None:
        return "?"
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_key(run) -> tuple:
    return (run["mode"],) + tuple(run[setting] for setting in SETTINGS)


def sort_key(key: tuple) -> tuple:
    """Cells ordered by mode (MODE_ORDER), then by settings (None, i.e. unknown, first)."""
    return (mode_rank(key[0]),) + tuple((value is not None, str(value)) for value in key[1:])


def group_runs(runs: list, key=cell_key) -> dict:
    """{key: runs sorted by seed}, keys in sort_key order."""
    groups = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return {k: sorted(groups[k], key=lambda run: run["seed"]) for k in sorted(groups, key=sort_key)}


def varying_settings(runs: list) -> list:
    """The settings that differ between runs (the only ones worth naming in a label)."""
    return [
        setting for setting in SETTINGS if len({format_setting(run[setting]) for run in runs}) > 1
    ]


def cell_label(key: tuple, shown: list) -> str:
    settings = dict(zip(SETTINGS, key[1:]))
    return ", ".join(
        [mode_label(key[0])] + [f"{SETTING_LABELS[s]} {format_setting(settings[s])}" for s in shown]
    )


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


def new_figure(rows: int, cols: int, size: tuple):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


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


def draw_fig6(runs: list, path: str, note: str = ""):
    """The paper's Fig. 6 layout: one row per mode (and per other setting that varies), one column
    per clip value."""
    rows = group_runs(
        runs, key=lambda run: cell_key(run)[:1] + cell_key(run)[2:]
    )  # the cell without its clip
    clips = sorted({run["clip_coef"] for run in runs}, reverse=True)
    shown = [setting for setting in varying_settings(runs) if setting != "clip_coef"]
    fig, axes = new_figure(len(rows), len(clips), (5.5 * len(clips), 2.9 * len(rows)))
    for row, (key, row_runs) in enumerate(rows.items()):
        label = cell_label(key[:1] + (None,) + key[1:], shown)
        for col, clip in enumerate(clips):
            panel_runs = [run for run in row_runs if math.isclose(run["clip_coef"], clip)]
            draw_panel(axes[row][col], panel_runs, f"{label}, clip {clip:g}")
    title = (
        "Reward (blue, moving average) and Δπ⁻ (red, log) per update; "
        "thin: seeds, thick: mean, x: collapse onset"
    )
    save_figure(fig, title + (f"; {note}" if note else ""), path)


def draw_entropy_comparison(runs: list, path: str, clip: float):
    """App. B layout: one row per mode that has runs at two or more entropy coefficients (at
    `clip`), one column per coefficient; thick line: the minimum over the two most fluctuating
    seeds."""
    at_clip = [run for run in runs if math.isclose(run["clip_coef"], clip)]
    ent_coefs = sorted({run["ent_coef"] for run in at_clip}, reverse=True)
    by_mode = group_runs(at_clip, key=lambda run: (run["mode"],))
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


def draw_summary(cells: list, path: str, note: str = ""):
    """collapse_stats.png. cells: (label, runs, km_times, km_survival) per cell. Left: median and
    interquartile band of the smoothed reward over the cell's runs per update; right: Kaplan-Meier
    curves of the time to collapse."""
    fig, axes = new_figure(1, 2, (13, 5))
    reward_ax, km_ax = axes[0]
    for index, (label, runs, km_times, km_survival) in enumerate(cells):
        color, style = (
            f"C{index % 10}",
            ("-", "--", ":")[index // 10 % 3],
        )  # the 11th cell on: dashed, not a reused colour
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
        km_ax.step(
            km_times,
            km_survival,
            where="post",
            color=color,
            ls=style,
            lw=1.8,
            label=f"{label} (n={len(runs)})",
        )
    reward_ax.set(xlabel="update", ylabel="smoothed reward (% of optimum)", ylim=REWARD_YLIM)
    reward_ax.set_title("median and interquartile range over seeds", fontsize=9)
    km_ax.set(xlabel="update", ylabel="P(no collapse yet)", ylim=(-0.03, 1.03))
    km_ax.set_title(
        "Kaplan-Meier: time to collapse (runs without one censored at their last update)",
        fontsize=9,
    )
    for ax in (reward_ax, km_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, "Collapse statistics" + (f"; {note}" if note else ""), path)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs-dir", default="docs/collapse", help="folder searched (recursively) for metrics.csv"
    )
    parser.add_argument(
        "--out", default="docs/collapse_fig6.png", help="Fig. 6 layout (rows: mode, columns: clip)"
    )
    parser.add_argument(
        "--entropy-out",
        default="docs/collapse_entropy.png",
        help="App. B layout (entropy coefficients)",
    )
    parser.add_argument(
        "--ent-coef",
        type=float,
        default=None,
        help="Fig. 6's entropy coefficient (default: most common)",
    )
    parser.add_argument(
        "--entropy-clip",
        type=float,
        default=0.2,
        help="clip coefficient of the App. B layout's runs",
    )
    args = parser.parse_args(argv)
    # collapse_stats imports this module's drawing; the collapse definition it holds is needed only
    # here
    from collapse_stats import mark_collapses

    runs = mark_collapses(read_runs(args.runs_dir))
    ent_coefs = [run["ent_coef"] for run in runs]
    ent_coef = max(set(ent_coefs), key=ent_coefs.count) if args.ent_coef is None else args.ent_coef
    fig6_runs = [run for run in runs if math.isclose(run["ent_coef"], ent_coef)]
    if not fig6_runs:
        found = ", ".join(f"{e:g}" for e in set(ent_coefs))
        raise ConfigError(f"--ent-coef {ent_coef:g}: no runs with it (found {found})")
    draw_fig6(fig6_runs, args.out, note=f"entropy {ent_coef:g}")
    print(
        f"wrote {args.out} ({len(runs)} runs found, "
        f"Fig. 6 uses the {len(fig6_runs)} at entropy {ent_coef:g})"
    )
    if draw_entropy_comparison(runs, args.entropy_out, args.entropy_clip):
        found = ", ".join(f"{e:g}" for e in sorted(set(ent_coefs)))
        print(f"wrote {args.entropy_out} (entropy coefficients {found})")
    else:
        print(
            f"no {args.entropy_out}: no mode has runs at two entropy coefficients "
            f"with clip {args.entropy_clip:g}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
