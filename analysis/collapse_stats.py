"""Does MDR prevent the collapse? Collapse rates, paired tests and survival curves of probe runs.

    python analysis/collapse_stats.py --runs-dir docs/collapse/study [--out-dir DIR]
        [--reference bn] [--cell bnm=0.1] [--modes bn,eval,bn-mdr] [--seeds 1-4] [--rank]
        [--cost-json bench.json] [--check-definition docs/collapse]

Every metrics.csv under --runs-dir is one run; a cell is (mode, clip, entropy coefficient, BN
momentum, view batching) and its runs differ by seed. Per cell: the collapse rate with a 95 %
Clopper-Pearson interval; against the reference mode's cell of the same settings, paired by seed: an
exact McNemar test (a two-sided binomial test of the discordant pairs, b of b + c at p = 1/2) and
paired bootstrap 95 % intervals (percentile method) of the differences in AUC and final reward;
Kaplan-Meier curves of the time to collapse. Prints the table and writes to --out-dir
collapse_stats.md (the same table, each run's verdict, the table again under each criterion alone,
the precursors of collapses), collapse_stats.png (reward quartiles and Kaplan-Meier curves) and
collapse_fig6.png (the paper's Fig. 6 layout).
The cost column is each cell's median wall time per run over the reference's, or, with --cost-json,
the side-by-side measurement of `benchmarks/bench_sps.py --configs probe/<mode>,... --json FILE`
(runs made at different times under different loads compare load, not cost).
The collapse definition is below (docs/collapse.md, "Collapse definition (fixed before the decisive
runs)").
"""

import json
import math
import os
import statistics
import sys
from collections import deque

import numpy as np
from collapse_figures import (
    SETTING_LABELS,
    SETTINGS,
    ArgumentParser,
    ConfigError,
    cell_label,
    draw_fig6,
    draw_summary,
    format_setting,
    group_runs,
    read_runs,
    varying_settings,
)
from scipy import stats

# The collapse definition. A run has collapsed at the first update that starts a streak of
# consecutive updates in which, after learning has started (its smoothed reward was once >=
# LEARNING_STARTED), either
#   the smoothed reward stays below REWARD_FRACTION x its best so far for REWARD_UPDATES updates
#   (a reward collapse), or
#   the acting policy's entropy stays below ENTROPY_MAX for ENTROPY_UPDATES updates (an entropy
#   collapse).
# Updates in which no episode ended (reward NaN) are skipped: they neither count nor break a streak.
SMOOTH_WINDOW = 10  # updates in the reward's moving average (the probe's --smooth-window default)
LEARNING_STARTED = 10.0  # percent of the optimal return; a uniformly random policy scores about -6
REWARD_FRACTION = 0.25  # "far below its best"
REWARD_UPDATES = 10  # a full moving-average window: a crash of a few updates cannot fill it
ENTROPY_MAX = 0.25  # nats, of ln 7 = 1.95 at uniform: about 96 % of the probability on one action
ENTROPY_UPDATES = 5  # per-update values, no smoothing: fewer updates make a streak
# the definition uses both; the report adds each alone as a sensitivity check
CRITERIA = ("reward", "entropy")

FINAL_UPDATES = 10  # final reward: mean normalized reward over the last updates
# the updates before a collapse's onset searched for a spike of Delta pi minus (paper Sec. 3.3)
PRECURSOR_UPDATES = 10
# the fewest earlier updates that make a baseline (median Delta pi minus) for the spike ratio
BASELINE_UPDATES = 5
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


def collapse_onset(rewards, entropies, criteria=CRITERIA) -> tuple:
    """(index of the collapse's first update, 'reward' or 'entropy'), or (None, None) if the run
    did not collapse. rewards: normalized reward per update (percent of optimal, NaN where no
    episode ended); entropies: the acting policy's entropy per update. The first streak of one of
    `criteria` to reach its length decides."""
    rewards, entropies = np.asarray(rewards, dtype=float), np.asarray(entropies, dtype=float)
    window = deque(maxlen=SMOOTH_WINDOW)
    best = -math.inf
    streaks = {
        criterion: [] for criterion in criteria
    }  # only the criteria asked for can end the run
    needed = {"reward": REWARD_UPDATES, "entropy": ENTROPY_UPDATES}
    for index in np.flatnonzero(np.isfinite(rewards)):
        window.append(rewards[index])
        smoothed = float(np.mean(window))
        best = max(best, smoothed)
        started = best >= LEARNING_STARTED
        low = {
            "reward": started and smoothed < REWARD_FRACTION * best,
            "entropy": started and entropies[index] < ENTROPY_MAX,
        }
        for criterion, streak in streaks.items():
            streak[:] = streak + [index] if low[criterion] else []
            if len(streak) == needed[criterion]:
                return int(streak[0]), criterion
    return None, None


def detect_collapse(rewards, entropies) -> tuple:
    """(True, index of the collapse's first update) or (False, index of the last update: the run is
    censored there)."""
    onset, _ = collapse_onset(rewards, entropies)
    return (True, onset) if onset is not None else (False, len(rewards) - 1)


def mark_collapses(runs: list, criteria=CRITERIA) -> list:
    """Sets each run's collapse_index (None: no collapse) and collapse_criterion under `criteria`;
    returns the runs."""
    for run in runs:
        onset = collapse_onset(run["normalized_reward"], run["acting_entropy"], criteria)
        run["collapse_index"], run["collapse_criterion"] = onset
    return runs


# --------------------------------------------------------------------------------------------------
# Statistics (scipy)


def clopper_pearson(collapses: int, runs: int) -> tuple:
    """Exact (Clopper-Pearson) confidence interval of a binomial proportion."""
    interval = stats.binomtest(collapses, runs).proportion_ci(
        confidence_level=CONFIDENCE, method="exact"
    )
    return interval.low, interval.high


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p-value: two-sided binomial test of b discordant pairs of one kind among b + c
    at p = 1/2."""
    return 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue


def kaplan_meier(times, collapsed) -> tuple:
    """Kaplan-Meier estimate of P(no collapse by t): (times, survival) as a right-continuous step
    function from (0, 1). times: the collapse update, or the last update of a run without one
    (censored there)."""
    censored = ~np.asarray(collapsed, dtype=bool)
    survival = stats.ecdf(
        stats.CensoredData.right_censored(np.asarray(times, dtype=float), censored)
    ).sf
    return np.concatenate([[0.0], survival.quantiles]), np.concatenate(
        [[1.0], survival.probabilities]
    )


def paired_bootstrap(x, y) -> tuple:
    """(mean of x - y, low, high): paired bootstrap percentile interval of the mean difference
    (pairs with a NaN dropped; the interval is NaN with fewer than 2 pairs)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(x - y))
    if len(x) < 2:
        return mean, math.nan, math.nan
    result = stats.bootstrap(
        (x, y),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        random_state=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def finite_mean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.mean(values)) if len(values) else math.nan


def run_measures(run) -> dict:
    """Per run: time to collapse (update) and whether it collapsed; AUC = mean normalized reward
    over the updates in which an episode ended (the area under the raw normalized-reward curve
    divided by their number); final reward = mean over the last FINAL_UPDATES updates; mean and
    median Delta pi minus over the updates (the mean weighs the spikes, the median the typical
    update)."""
    collapsed = run["collapse_index"] is not None
    index = run["collapse_index"] if collapsed else len(run["iteration"]) - 1
    deltas = run["delta_pi_minus"][np.isfinite(run["delta_pi_minus"])]
    return {
        "collapsed": collapsed,
        "time": float(run["iteration"][index]),
        "auc": finite_mean(run["normalized_reward"]),
        "final": finite_mean(run["normalized_reward"][-FINAL_UPDATES:]),
        "mean_delta": float(np.mean(deltas)) if len(deltas) else math.nan,
        "median_delta": float(np.median(deltas)) if len(deltas) else math.nan,
    }


def analyse(runs: list, reference: str) -> list:
    """One dict per cell: its runs' measures, the rate and its interval, Kaplan-Meier curve, and the
    paired comparison with the reference mode's cell of the same settings (None when there is none,
    or for the reference itself)."""
    cells = group_runs(runs)
    shown = varying_settings(runs)
    results = []
    for key, cell_runs in cells.items():
        measures = {run["seed"]: run_measures(run) for run in cell_runs}
        collapses = sum(m["collapsed"] for m in measures.values())
        times, collapsed = zip(*[(m["time"], m["collapsed"]) for m in measures.values()])
        wall_times = [run["wall_time_s"] for run in cell_runs if math.isfinite(run["wall_time_s"])]
        result = {
            "key": key,
            "label": cell_label(key, shown),
            "runs": cell_runs,
            "n": len(cell_runs),
            "collapses": collapses,
            "rate_ci": clopper_pearson(collapses, len(cell_runs)),
            "auc": finite_mean([m["auc"] for m in measures.values()]),
            "mean_delta": finite_mean([m["mean_delta"] for m in measures.values()]),
            "median_delta": float(np.nanmedian([m["median_delta"] for m in measures.values()])),
            "wall_time": float(np.median(wall_times)) if wall_times else math.nan,
            "km": kaplan_meier(times, collapsed),
            "measures": measures,
            "comparison": None,
        }
        results.append(result)
    by_key = {result["key"]: result for result in results}
    for result in results:
        ref = by_key.get((reference,) + result["key"][1:])
        if ref is None or ref is result:
            continue
        seeds = sorted(set(result["measures"]) & set(ref["measures"]))
        mine, theirs = [result["measures"][s] for s in seeds], [ref["measures"][s] for s in seeds]
        b = sum(m["collapsed"] and not t["collapsed"] for m, t in zip(mine, theirs))
        c = sum(t["collapsed"] and not m["collapsed"] for m, t in zip(mine, theirs))
        result["comparison"] = {
            "pairs": len(seeds),
            "b": b,
            "c": c,
            "p": mcnemar_exact(b, c) if seeds else math.nan,
            "auc": paired_bootstrap([m["auc"] for m in mine], [t["auc"] for t in theirs]),
            "final": paired_bootstrap([m["final"] for m in mine], [t["final"] for t in theirs]),
            "wall_ratio": result["wall_time"] / ref["wall_time"],
        }
    return results


def benchmark_cost(path: str, reference: str) -> dict:
    """{mode: (median, min, max)} of the wall time per step of probe/<mode> over probe/<reference>,
    one ratio per round of a `benchmarks/bench_sps.py --json` file (a round runs every configuration
    back to back, so each ratio saw one load)."""
    try:
        with open(path) as f:
            rounds = {
                name.removeprefix("probe/"): [
                    statistics.median(repeat["sps"]) for repeat in repeats
                ]
                for name, repeats in json.load(f).items()
                if name.startswith("probe/")
            }
    except (
        OSError,
        ValueError,
        AttributeError,
        KeyError,
        TypeError,
        statistics.StatisticsError,
    ) as error:
        raise ConfigError(
            f"--cost-json {path}: not a readable benchmarks/bench_sps.py --json file ({error})"
        ) from None
    if reference not in rounds:
        message = f"no probe/{reference} configuration to compare with; rerun bench_sps.py with it"
        raise ConfigError(f"--cost-json {path}: {message}")
    ratios = {
        mode: [ref / sps for ref, sps in zip(rounds[reference], sps_rounds)]
        for mode, sps_rounds in rounds.items()
    }
    return {mode: (statistics.median(r), min(r), max(r)) for mode, r in ratios.items() if r}


def spike(run, end: int) -> dict:
    """Delta pi minus and the signed trust-region violation in the window of PRECURSOR_UPDATES + 1
    updates ending at update index `end` (included): their peaks, and Delta pi minus's peak over its
    median in the updates before the window (its baseline; NaN with fewer than BASELINE_UPDATES of
    them)."""
    start = max(0, end - PRECURSOR_UPDATES)
    delta, violation = run["delta_pi_minus"], run["trust_region_violation_signed"]
    window, before = delta[start : end + 1], delta[:start][np.isfinite(delta[:start])]
    peak = float(np.nanmax(window)) if np.isfinite(window).any() else math.nan
    baseline = float(np.median(before)) if len(before) >= BASELINE_UPDATES else math.nan
    peak_violation = violation[start : end + 1]
    return {
        "end": end,
        "peak": peak,
        "ratio": peak / baseline if baseline > 0 else math.nan,
        "violation": float(np.nanmax(peak_violation))
        if np.isfinite(peak_violation).any()
        else math.nan,
    }


def precursors(run) -> dict:
    """Before a collapse: the spike measures of the window that ends at its onset. For a run without
    a collapse, the same at the window where the ratio is largest (its biggest spike), among the
    windows that end once learning has started (where a collapse could have begun): a spike that
    precedes collapses is only a warning sign if runs that do not collapse have no such spikes."""
    if run["collapse_index"] is not None:
        return spike(run, run["collapse_index"])
    learning = np.flatnonzero(
        np.nan_to_num(run["smoothed_reward"], nan=-math.inf) >= LEARNING_STARTED
    )
    first = max(
        PRECURSOR_UPDATES + BASELINE_UPDATES,
        learning[0] if len(learning) else len(run["iteration"]),
    )
    windows = [spike(run, end) for end in range(first, len(run["iteration"]))]
    windows = [w for w in windows if math.isfinite(w["ratio"])]
    return (
        max(windows, key=lambda w: w["ratio"]) if windows else spike(run, len(run["iteration"]) - 1)
    )


# --------------------------------------------------------------------------------------------------
# Tables


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def format_difference(estimate: tuple) -> str:
    mean, low, high = estimate
    if not math.isfinite(mean):
        return "–"
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]" if math.isfinite(low) else f"{mean:+.1f} [–]"


def stats_table(results: list, reference: str, cost: dict | None = None) -> str:
    """The statistics table; its last column is `cost` ({mode: (median, min, max)}, from
    benchmark_cost) if given, else the runs' own wall times."""
    header = ["mode"] + [SETTING_LABELS[s] for s in SETTINGS] + ["n", "collapses", "rate [95 % CP]"]
    header += [f"McNemar p vs {reference} (b/c, pairs)", "AUC", f"ΔAUC vs {reference} [95 % CI]"]
    header += [f"Δfinal vs {reference} [95 % CI]", "mean Δπ⁻", "median Δπ⁻"]
    header += [f"wall time / {reference} (side by side)" if cost else f"wall time / {reference}"]
    rows = []
    for result in results:
        low, high = result["rate_ci"]
        row = [result["key"][0]] + [format_setting(value) for value in result["key"][1:]]
        row += [
            str(result["n"]),
            str(result["collapses"]),
            f"{result['collapses'] / result['n']:.2f} [{low:.2f}, {high:.2f}]",
        ]
        comparison = result["comparison"]
        if comparison is None:
            row += ["–", f"{result['auc']:.1f}", "–", "–"]
        else:
            p = f"{comparison['p']:.3g}" if math.isfinite(comparison["p"]) else "–"
            row += [
                f"{p} ({comparison['b']}/{comparison['c']}, {comparison['pairs']})",
                f"{result['auc']:.1f}",
            ]
            row += [format_difference(comparison["auc"]), format_difference(comparison["final"])]
        row += [f"{result['mean_delta']:.2g}", f"{result['median_delta']:.2g}"]
        if cost:
            ratio = cost.get(result["key"][0])
            row += [f"{ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f})" if ratio else "–"]
        else:
            wall_ratio = comparison["wall_ratio"] if comparison else math.nan
            row += [f"{wall_ratio:.2f}" if math.isfinite(wall_ratio) else "–"]
        rows.append(row)
    return markdown_table(header, rows)


def sensitivity_table(runs: list, reference: str, criterion: str, cost: dict | None) -> str:
    """stats_table with collapses decided by `criterion` alone (on copies: the runs keep the
    definition's verdict)."""
    return stats_table(
        analyse(mark_collapses([dict(run) for run in runs], (criterion,)), reference),
        reference,
        cost,
    )


def runs_table(runs: list) -> str:
    """One row per run: whether and where the definition flags a collapse, and what it looked at."""
    rows = []
    for run in sorted(runs, key=lambda run: run["name"]):
        measures = run_measures(run)
        flagged = (
            f"yes, update {measures['time']:g} ({run['collapse_criterion']})"
            if measures["collapsed"]
            else "no"
        )
        smoothed = run["smoothed_reward"][np.isfinite(run["smoothed_reward"])]
        entropy = run["acting_entropy"][np.isfinite(run["acting_entropy"])]
        alone = [
            collapse_onset(run["normalized_reward"], run["acting_entropy"], (criterion,))[0]
            for criterion in CRITERIA
        ]
        rows.append(
            [
                f"`{run['name']}`",
                flagged,
                f"{smoothed.max():.1f}" if len(smoothed) else "–",
                f"{entropy.min():.3f} ({run['entropy_source']})" if len(entropy) else "–",
                f"{measures['auc']:.1f}",
                f"{measures['final']:.1f}",
                str(len(run["iteration"])),
                " / ".join(
                    "–" if onset is None else f"{run['iteration'][onset]:g}" for onset in alone
                ),
            ]
        )
    header = [
        "run",
        "collapse",
        "best smoothed reward",
        "min entropy (column)",
        "AUC",
        "final reward",
        "updates",
    ]
    header += [" / ".join(CRITERIA) + " criterion alone"]
    return markdown_table(header, rows)


def precursors_table(runs: list) -> str:
    """One row per run: Delta pi minus and the signed trust-region violation before its collapse (or
    at its biggest Delta pi minus spike when it has none), against the run's medians."""
    rows = []
    for run in sorted(
        runs, key=lambda run: (run["mode"], run["collapse_index"] is None, run["name"])
    ):
        found = precursors(run)
        violation = run["trust_region_violation_signed"]
        where = "onset" if run["collapse_index"] is not None else "largest spike"
        rows.append(
            [
                f"`{run['name']}`",
                f"{where}, update {run['iteration'][found['end']]:g}",
                f"{found['peak']:.3g}",
                f"{found['ratio']:.0f}x" if math.isfinite(found["ratio"]) else "–",
                f"{found['violation']:.2f}" if math.isfinite(found["violation"]) else "–",
                f"{np.nanmedian(violation):.3f}" if np.isfinite(violation).any() else "–",
            ]
        )
    header = [
        "run",
        "window ends at",
        "peak Δπ⁻",
        "peak / earlier median",
        "peak signed TR violation",
        "median TR violation",
    ]
    return markdown_table(header, rows)


def definition_text() -> str:
    return (
        f"Collapse: after the smoothed reward (moving average over {SMOOTH_WINDOW} updates) was "
        f"once >= {LEARNING_STARTED:g} % of optimal, either the smoothed reward < "
        f"{REWARD_FRACTION:g} x its best so far for {REWARD_UPDATES} consecutive updates, or the "
        f"acting entropy < {ENTROPY_MAX:g} nats for {ENTROPY_UPDATES}; the collapse's update is "
        "the streak's first. Runs without one are censored at their last update."
    )


def methods_text(reference: str, cost_json: str | None) -> str:
    return (
        f"Rate: collapsed runs / runs, exact Clopper-Pearson {CONFIDENCE:.0%} interval. Against "
        f"{reference}, pairs by seed in the cell of the same settings: exact McNemar (two-sided "
        "binomial test of b = this mode only collapsed among the b + c discordant pairs, p = 1/2); "
        f"ΔAUC and Δfinal = mean over pairs of this mode minus {reference}, paired bootstrap "
        f"percentile interval ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}). AUC = mean "
        "raw normalized reward over the updates (those without a finished episode skipped); final "
        f"= mean over the last {FINAL_UPDATES} updates; mean Δπ⁻ = mean over runs of each run's "
        "mean over its updates, median Δπ⁻ = median over runs of each run's median; wall time = "
        + (
            "time per step relative to the reference's, measured side by side "
            f"({cost_json}: median over rounds, min-max; each round runs every mode once, back to "
            "back, at the probe's defaults)."
            if cost_json
            else "median per run (summary.json), relative to the reference cell's."
        )
    )


# --------------------------------------------------------------------------------------------------
# Command line


def select_cells(runs: list, cell: str) -> list:
    """Runs whose settings match every key=value of `cell` (keys: mode and the SETTING_LABELS
    values)."""
    keys = {"mode": "mode", **{label: setting for setting, label in SETTING_LABELS.items()}}
    selected = runs
    for item in filter(None, cell.split(",")):
        name, _, value = item.partition("=")
        if name not in keys or not value:
            raise ConfigError(
                f"--cell {cell}: '{item}' is not key=value with key one of {', '.join(keys)}"
            )
        setting = keys[name]
        selected = [run for run in selected if matches(run[setting], value)]
    if not selected:
        found = [cell_label(key, SETTINGS) for key in group_runs(runs)]
        raise ConfigError(f"--cell {cell}: no runs match (cells found: {'; '.join(found)})")
    return selected


def select_modes(runs: list, modes: str) -> list:
    """Runs of the comma-separated `modes` (all runs if empty); a mode without runs is an error."""
    wanted = [mode for mode in modes.split(",") if mode]
    missing = sorted(set(wanted) - {run["mode"] for run in runs})
    if missing:
        found = ", ".join(sorted({run["mode"] for run in runs}))
        raise ConfigError(
            f"--modes {modes}: no runs of {', '.join(missing)} (modes found: {found})"
        )
    return [run for run in runs if not wanted or run["mode"] in wanted]


def select_seeds(runs: list, seeds: str) -> list:
    """Runs whose seed is in `seeds` ("1-4", "1,2,5" or a mix; all runs if empty)."""
    if not seeds:
        return runs
    wanted = set()
    for item in seeds.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ConfigError(f"--seeds {seeds}: '{item}' is not a seed or a range like 1-4")
        wanted |= set(range(int(low), int(high or low) + 1))
    selected = [run for run in runs if run["seed"] in wanted]
    if not selected:
        raise ConfigError(f"--seeds {seeds}: no runs with these seeds")
    return selected


def matches(setting, value: str) -> bool:
    if isinstance(setting, float):
        try:
            return math.isclose(setting, float(value))
        except ValueError:
            return False
    return format_setting(setting) == value


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs-dir",
        default="docs/collapse/study",
        help="folder searched (recursively) for metrics.csv",
    )
    parser.add_argument(
        "--out-dir", default=None, help="where the report and figures go (default: --runs-dir)"
    )
    parser.add_argument(
        "--reference",
        default="bn",
        help="the mode every other mode is compared with, paired by seed",
    )
    parser.add_argument(
        "--cell",
        default="",
        help="only cells matching key=value[,key=value] (mode, clip, ent, bnm, views)",
    )
    parser.add_argument(
        "--modes", default="", help="only these modes, comma-separated (default: every mode found)"
    )
    parser.add_argument(
        "--rank",
        action="store_true",
        help="order the table by AUC, highest first (default: by cell)",
    )
    parser.add_argument(
        "--seeds",
        default="",
        help="only these seeds, e.g. 1-4 or 1,2,5 (default: all): modes on equal seeds",
    )
    parser.add_argument(
        "--cost-json",
        default=None,
        help="wall-time column from this bench_sps.py --json (probe/<mode>)",
    )
    parser.add_argument(
        "--check-definition",
        default=None,
        help="first print the definition's verdict on these runs",
    )
    args = parser.parse_args(argv)

    if args.check_definition:
        print(f"Collapse definition on the runs in {args.check_definition}: {definition_text()}\n")
        print(
            runs_table(mark_collapses(read_runs(args.check_definition, "--check-definition")))
            + "\n"
        )
    runs = select_modes(
        select_cells(mark_collapses(read_runs(args.runs_dir)), args.cell), args.modes
    )
    runs = select_seeds(runs, args.seeds)
    modes = sorted({run["mode"] for run in runs})
    if args.reference not in modes:
        raise ConfigError(
            f"--reference {args.reference}: no runs of that mode (modes found: {', '.join(modes)})"
        )
    cost = benchmark_cost(args.cost_json, args.reference) if args.cost_json else None
    results = analyse(runs, args.reference)
    if args.rank:  # a ranking table: the highest area under the reward curve first
        results.sort(
            key=lambda result: -result["auc"] if math.isfinite(result["auc"]) else math.inf
        )
    table = stats_table(results, args.reference, cost)
    out_dir = args.out_dir or args.runs_dir
    os.makedirs(out_dir, exist_ok=True)
    command = "python analysis/collapse_stats.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = [
        f"# Collapse statistics of {args.runs_dir}\n",
        f"Written by `{command.strip()}`.\n",
        definition_text() + "\n",
        methods_text(args.reference, args.cost_json) + "\n",
        table + "\n",
        "## Runs\n",
        runs_table(runs) + "\n",
        "## Sensitivity: each criterion alone\n",
        "The same statistics with only one of the definition's two criteria (a check of how much "
        "the verdict depends on each, not a second definition): the reward criterion alone is the "
        "paper's reward collapse; the entropy criterion alone also flags a near-deterministic "
        "policy that still earns its reward.\n",
        *[
            f"### The {criterion} criterion alone\n\n"
            + sensitivity_table(runs, args.reference, criterion, cost)
            + "\n"
            for criterion in CRITERIA
        ],
        "## Before the collapse\n",
        "Delta pi minus and the signed trust-region violation (the clip would stop the sample's "
        "gradient under the eval-mode ratio r but not under the optimized train-mode r') over the "
        f"{PRECURSOR_UPDATES + 1} updates that end at the collapse's onset; for a run without a "
        "collapse, the window (ending once learning has started, i.e. where a collapse could "
        "begin) where Delta pi minus's peak over its earlier median is largest. A spike before "
        "collapses is a warning sign only if the runs that do not collapse have none as large.\n",
        precursors_table(runs) + "\n",
    ]
    with open(os.path.join(out_dir, "collapse_stats.md"), "w") as f:
        f.write("\n".join(report))
    figure_cells = [(result["label"], result["runs"], *result["km"]) for result in results]
    draw_summary(figure_cells, os.path.join(out_dir, "collapse_stats.png"))
    draw_fig6(runs, os.path.join(out_dir, "collapse_fig6.png"))
    print(table)
    print(
        "\nwrote collapse_stats.md, collapse_stats.png and collapse_fig6.png "
        f"to {out_dir} ({len(runs)} runs)"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
