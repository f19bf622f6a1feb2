"""Does MDR prevent the collapse? Collapse rates, paired tests and survival curves of probe runs.

    python analysis/collapse_stats.py --runs-dir docs/collapse/study --out-dir DIR
        [--reference bn] [--cell bnm=0.1] [--modes bn,eval,bn-mdr] [--seeds 1-4] [--rank]
        [--cost-json bench.json] [--check-definition docs/collapse] [--definition old|revised]
    python analysis/collapse_stats.py --runs-dir docs/collapse/study_c --study stage-c \
        --out-dir docs/collapse/study_c

Every metrics.csv under --runs-dir is one run; a cell is (arm, clip, entropy coefficient, BN
momentum, view batching) and its runs differ by seed. An arm is the mode, with what it changed of
the update's epochs (bn-e2: 2 epochs; bn-mdr12: MDR(1,2)); the first studies' runs keep their mode.
A dropout mode's arm names its probability (dropout p0.1, dropout-mdr p0.2): never one cell.
Per cell: the collapse rate with a 95 % Clopper-Pearson interval; against the reference arm's cell
of the same settings, paired by seed: an exact McNemar test (a two-sided binomial test of the
discordant pairs, b of b + c at p = 1/2) and paired bootstrap 95 % intervals (percentile method) of
the differences in AUC and final reward; Kaplan-Meier curves of the time to collapse. Prints the
table and writes to --out-dir collapse_stats.md (the same table, each run's verdict, the table again
under each criterion alone, the precursors of collapses), collapse_stats.png (reward quartiles and
Kaplan-Meier curves) and collapse_fig6.png (the paper's Fig. 6 layout).
The cost column is each cell's median wall time per run over the reference's, or, with --cost-json,
the side-by-side measurement of `benchmarks/bench_sps.py --configs probe/<mode>,... --json FILE`
(runs made at different times under different loads compare load, not cost); --cost-json again adds
a later file for modes benchmarked later, each with the reference, each mode in one file.
--definition: the collapse definition (analysis/collapse_runs.py): old (the first study's,
docs/collapse.md, the default: its committed reports) or revised (Stage C's; every table is then
followed by the old definition's).
--study stage-c: Stage C's pre-registered analysis (docs/collapse/study_c/PLAN.md) of the runs in
procedural/ and photos/: the revised definition with the old one beside it in every table, the
primary and the Holm-corrected secondary tests, recovery, and collapse_paired.png (the paired
differences); it reports on whatever runs have finished, with how many pairs are complete.
--study dropout: Study 1 of docs/dropout/PLAN.md (none, dropout, dropout-mdr at each dropout
probability found, seeds 31-42): the primary sign-flip test, the Holm family D1-D4, the Step 2
decision, the fluctuation measure; stability.md and stability_*.png. With --gen-runs-dir DIR, also
Study 2 (--study dropout-gen alone: DIR as --runs-dir): ppo_patchloc_mdr.py runs' final held-out
gap, its paired differences and TOST, and with --pilot-runs-dir the plan's check that its none
runs at seeds 1 and 2 repeat the pilot's; generalization.md and generalization_curves.png.
--study dropout-pilot: Study 2's pilot (arm none at several training-task counts and step budgets):
each regime's final gap and training-task reward, and the plan's choice; pilot.md, pilot_curves.png.

    python analysis/collapse_stats.py --study dropout --runs-dir docs/dropout/stability \
        --gen-runs-dir docs/dropout/generalization --pilot-runs-dir docs/dropout/pilot \
        --out-dir docs/dropout

Runs paired with each other must come from one commit, CPU model and torch version (their
summary.json provenance) unless --allow-mixed; runs that did not finish are named, not analysed.
"""

import json
import math
import os
import statistics
import sys

import numpy as np
from cli import ArgumentParser, run_command
from collapse_figures import draw_fig6, draw_paired_differences, draw_summary, draw_train_vs_heldout
from collapse_runs import (
    CRITERIA,
    DEFINITIONS,
    DROPOUT_ARMS,
    DROPOUT_SEEDS,
    DROPOUT_STEPS,
    ENTROPY_REWARD_FRACTION,
    KIND_CHECKS_FILE,
    LEARNING_STARTED,
    REWARD_FRACTION,
    SETTING_LABELS,
    SETTINGS,
    SMOOTH_WINDOW,
    STAGE_C_FAMILIES,
    ConfigError,
    CorruptRun,
    cell_label,
    check_provenance,
    collapse_onset,
    definition_text,
    dropout_study_runs,
    finished,
    format_setting,
    group_runs,
    kind_text,
    kinds_cell,
    mark_collapses,
    mode_label,
    mode_rank,
    provenance_summary,
    read_hosts,
    read_json_file,
    read_kind_checks,
    read_runs,
    read_runs_and_skipped,
    record_kind,
    run_checks,
    select_cells,
    select_modes,
    select_seeds,
    smoothed_rewards,
    stage_c_runs,
    start_kinds,
    varying_settings,
    with_p,
)
from scipy import stats

FINAL_UPDATES = 10  # final reward: mean normalized reward over the last updates
# the updates before a collapse's onset searched for a spike of Delta pi minus (paper Sec. 3.3)
PRECURSOR_UPDATES = 10
# the fewest earlier updates that make a baseline (median Delta pi minus) for the spike ratio
BASELINE_UPDATES = 5
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
FEW_SEEDS = 3  # an interval over fewer seeds (or pairs) carries a caution


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


def survival_curves(measures: dict) -> tuple:
    """(runs, curves) of one arm from its per-definition measures ({definition: {seed: measure}}):
    the revised definition's runs, and a Kaplan-Meier curve per definition."""
    curves = [
        (*kaplan_meier(*zip(*[(m["time"], m["collapsed"]) for m in by_seed.values()])), d)
        for d, by_seed in measures.items()
    ]
    return [m["run"] for m in measures["revised"].values()], curves


def finite_pairs(x, y) -> tuple:
    """x and y as arrays, the pairs with a NaN dropped."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def paired_bootstrap(x, y, confidence: float = CONFIDENCE) -> tuple:
    """(mean of x - y, low, high): paired bootstrap percentile interval of the mean difference
    (pairs with a NaN dropped; the interval is NaN with fewer than 2 pairs)."""
    x, y = finite_pairs(x, y)
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
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


MAX_EXACT_PAIRS = 24  # the exact sign-flip test enumerates 2^n sign assignments


def sign_flip_test(x, y) -> float:
    """Exact two-sided paired sign-flip permutation test of the mean of x - y: the share of the 2^n
    assignments of signs to the n differences whose |mean| is at least the observed one (pairs with
    a NaN dropped; NaN without a pair)."""
    x, y = finite_pairs(x, y)
    differences = x - y
    n = len(differences)
    if n == 0:
        return math.nan
    if n > MAX_EXACT_PAIRS:
        raise ValueError(f"{n} pairs: the exact test enumerates 2^n, at most {MAX_EXACT_PAIRS}")
    signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # every +-1 row, once
    sums = np.abs(signs @ differences)
    observed = abs(differences.sum())
    # the same |sum| in another order of additions may differ in its last bits: not a smaller one
    return float(np.mean(sums >= observed - 1e-9 * max(1.0, observed)))


def tost_paired(x, y, margin: float, alpha: float) -> dict:
    """Two one-sided paired t-tests of equivalence of x and y within +-margin (TOST): p_lower tests
    H0 mean(x - y) <= -margin, p_upper H0 mean(x - y) >= +margin; p = the larger (equivalence at
    alpha iff p < alpha), and the (1 - 2 alpha) t interval of the mean difference, which lies inside
    +-margin iff p < alpha. NaN with fewer than 2 pairs (pairs with a NaN dropped)."""
    x, y = finite_pairs(x, y)
    differences = x - y
    n = len(differences)
    result = {"n": n, "mean": float(np.mean(differences)) if n else math.nan}
    result.update(p_lower=math.nan, p_upper=math.nan, p=math.nan, low=math.nan, high=math.nan)
    if n < 2:
        return result
    mean, se = result["mean"], float(np.std(differences, ddof=1) / math.sqrt(n))
    if se == 0:  # every difference the same: no spread to test against
        result.update(p_lower=float(mean <= -margin), p_upper=float(mean >= margin), low=mean)
        result.update(p=max(result["p_lower"], result["p_upper"]), high=mean)
        return result
    t = stats.t(df=n - 1)
    result.update(
        p_lower=float(t.sf((mean + margin) / se)), p_upper=float(t.cdf((mean - margin) / se))
    )
    half = float(t.ppf(1 - alpha)) * se
    result.update(p=max(result["p_lower"], result["p_upper"]), low=mean - half, high=mean + half)
    return result


def holm(p_values: list, alpha: float) -> list:
    """Holm's step-down procedure over the family of p_values (NaN: not tested, never rejected):
    per test, in the given order, (the level its p is compared with, rejected?, Holm-adjusted p).
    The smallest p is compared with alpha/m, the next with alpha/(m - 1), ...; the first that fails
    stops the procedure."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: (not math.isfinite(p_values[i]), p_values[i]))
    results, still_rejecting, adjusted = [None] * m, True, 0.0
    for rank, i in enumerate(order):
        p = p_values[i] if math.isfinite(p_values[i]) else math.nan
        level = alpha / (m - rank)
        still_rejecting = still_rejecting and math.isfinite(p) and p <= level
        adjusted = max(adjusted, min(1.0, (m - rank) * p)) if math.isfinite(p) else math.nan
        results[i] = (level, still_rejecting, adjusted)
    return results


# --------------------------------------------------------------------------------------------------
# Per run


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


RECOVERY_FRACTION = 0.5  # recovered: the smoothed reward back at >= this x the best at the onset


def recovery(run) -> dict:
    """Stage C's recovery outcomes (docs/collapse/study_c/PLAN.md), over the updates in which an
    episode ended: ended_collapsed, the last smoothed reward below REWARD_FRACTION x the best,
    after learning started; spent, the updates after learning started whose smoothed reward is
    below REWARD_FRACTION x the best so far; for a run with a collapse (its collapse_index),
    recovery_time:
    the updates from the onset to the first later update whose smoothed reward is back at >=
    RECOVERY_FRACTION x the best so far at the onset, and recovered; a run that never gets there is
    not recovered, censored at its last update (recovery_time: to that update)."""
    indices, smoothed, best = smoothed_rewards(run["normalized_reward"])
    low = (best >= LEARNING_STARTED) & (smoothed < REWARD_FRACTION * best)
    result = {
        "ended_collapsed": bool(len(low) and low[-1]),
        "spent": int(low.sum()),
        "recovery_time": None,
        "recovered": None,
    }
    onset = run["collapse_index"]
    if onset is not None:
        at_onset = int(np.flatnonzero(indices == onset)[0])
        back = np.flatnonzero((indices > onset) & (smoothed >= RECOVERY_FRACTION * best[at_onset]))
        end = indices[back[0]] if len(back) else len(run["iteration"]) - 1
        result["recovered"] = bool(len(back))
        result["recovery_time"] = float(run["iteration"][end] - run["iteration"][onset])
    return result


def analyse(runs: list, reference: str) -> list:
    """One dict per cell: its runs' measures, the rate and its interval, Kaplan-Meier curve, and the
    paired comparison with the reference arm's cell of the same settings (None when there is none,
    or for the reference itself). Seeds that share nothing with the reference cell's are a
    ConfigError."""
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
        if not seeds:
            raise ConfigError(
                f"{result['label']} (seeds {seed_list(result['measures'])}) and {reference} "
                f"(seeds {seed_list(ref['measures'])}) share no seed: nothing to pair; "
                "choose runs of the same seeds (--seeds, --cell)"
            )
        mine, theirs = [result["measures"][s] for s in seeds], [ref["measures"][s] for s in seeds]
        b = sum(m["collapsed"] and not t["collapsed"] for m, t in zip(mine, theirs))
        c = sum(t["collapsed"] and not m["collapsed"] for m, t in zip(mine, theirs))
        result["comparison"] = {
            "pairs": len(seeds),
            "b": b,
            "c": c,
            "p": mcnemar_exact(b, c),
            "auc": paired_bootstrap([m["auc"] for m in mine], [t["auc"] for t in theirs]),
            "final": paired_bootstrap([m["final"] for m in mine], [t["final"] for t in theirs]),
            "wall_ratio": result["wall_time"] / ref["wall_time"],
        }
    return results


def seed_list(seeds) -> str:
    """'1-4, 7' for the seeds 1, 2, 3, 4, 7."""
    seeds, parts = sorted(seeds), []
    for seed in seeds:
        if parts and seed == parts[-1][1] + 1:
            parts[-1][1] = seed
        else:
            parts.append([seed, seed])
    return ", ".join(f"{low}" if low == high else f"{low}-{high}" for low, high in parts)


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


def benchmark_costs(paths: list, reference: str) -> dict:
    """benchmark_cost of each --cost-json file, merged: a mode measured later (LayerNorm, added
    after the rivals' benchmark) comes with a file of its own, its ratio to the reference measured
    side by side in that file's rounds. A mode other than the reference in two files is refused:
    its two ratios were measured under different loads or machines and cannot be one number."""
    merged, source = {}, {}
    for path in paths:
        for mode, cost in benchmark_cost(path, reference).items():
            if mode != reference and mode in source:
                raise ConfigError(
                    f"--cost-json: probe/{mode} is in both {source[mode]} and {path}; "
                    "give each mode's ratio one file"
                )
            merged[mode], source[mode] = cost, path
    return merged


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


def caution(n: int) -> str:
    """The caution beside an interval over fewer than FEW_SEEDS seeds or pairs ('' otherwise)."""
    return f" ⚠ only {n} seed{'s' * (n != 1)}" if n < FEW_SEEDS else ""


def format_difference(estimate: tuple, n: int = FEW_SEEDS) -> str:
    """mean [low, high] of a paired difference over n pairs."""
    mean, low, high = estimate
    if not math.isfinite(mean):
        return "–"
    interval = f"[{low:+.1f}, {high:+.1f}]" if math.isfinite(low) else "[–]"
    return f"{mean:+.1f} {interval}{caution(n)}"


def format_rate(collapses: int, n: int) -> str:
    """collapses / n [95 % Clopper-Pearson interval]."""
    if n == 0:
        return "–"
    low, high = clopper_pearson(collapses, n)
    return f"{collapses / n:.2f} [{low:.2f}, {high:.2f}]{caution(n)}"


def format_p(p: float) -> str:
    return f"{p:.3g}" if math.isfinite(p) else "–"


def stats_table(results: list, reference: str, cost=None) -> str:
    """The statistics table; its last column is `cost` ({mode: (median, min, max)}, from
    benchmark_cost) if given, else the runs' own wall times."""
    header = ["mode"] + [SETTING_LABELS[s] for s in SETTINGS] + ["n", "collapses", "rate [95 % CP]"]
    header += [f"McNemar p vs {reference} (b/c, pairs)", "AUC", f"ΔAUC vs {reference} [95 % CI]"]
    header += [f"Δfinal vs {reference} [95 % CI]", "mean Δπ⁻", "median Δπ⁻"]
    header += [f"wall time / {reference} (side by side)" if cost else f"wall time / {reference}"]
    rows = []
    for result in results:
        row = [result["key"][0]] + [format_setting(value) for value in result["key"][1:]]
        row += [str(result["n"]), str(result["collapses"])]
        row += [format_rate(result["collapses"], result["n"])]
        comparison = result["comparison"]
        if comparison is None:
            row += ["–", f"{result['auc']:.1f}", "–", "–"]
        else:
            pairs = comparison["pairs"]
            row += [
                f"{format_p(comparison['p'])} ({comparison['b']}/{comparison['c']}, {pairs})",
                f"{result['auc']:.1f}",
            ]
            row += [format_difference(comparison[key], pairs) for key in ("auc", "final")]
        row += [f"{result['mean_delta']:.2g}", f"{result['median_delta']:.2g}"]
        if cost:
            ratio = cost.get(result["key"][0])
            row += [f"{ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f})" if ratio else "–"]
        else:
            wall_ratio = comparison["wall_ratio"] if comparison else math.nan
            row += [f"{wall_ratio:.2f}" if math.isfinite(wall_ratio) else "–"]
        rows.append(row)
    return markdown_table(header, rows)


def marked(runs: list, definition: str, criteria=CRITERIA) -> list:
    """Copies of the runs with their collapses under `definition` and `criteria` (the runs keep
    their own verdict)."""
    return mark_collapses([dict(run) for run in runs], definition, criteria)


def sensitivity_table(runs: list, reference: str, criterion: str, cost, definition: str) -> str:
    """stats_table with collapses decided by `criterion` alone."""
    return stats_table(analyse(marked(runs, definition, (criterion,)), reference), reference, cost)


def flagged_text(run) -> str:
    """'yes, update U (criterion)' or 'no', for the run's collapse_index."""
    if run["collapse_index"] is None:
        return "no"
    return f"yes, update {run['iteration'][run['collapse_index']]:g} ({run['collapse_criterion']})"


def runs_table(runs: list, definition: str, also=None) -> str:
    """One row per run: whether and where the definition flags a collapse (and, with also, another
    definition: its verdict in a column of its own), and what it looked at."""
    others = {run["name"]: run for run in marked(runs, also)} if also else {}
    rows = []
    for run in sorted(runs, key=lambda run: run["name"]):
        measures = run_measures(run)
        smoothed = run["smoothed_reward"][np.isfinite(run["smoothed_reward"])]
        entropy = run["acting_entropy"][np.isfinite(run["acting_entropy"])]
        alone = [
            collapse_onset(
                run["normalized_reward"], run["acting_entropy"], definition, (criterion,)
            )[0]
            for criterion in CRITERIA
        ]
        row = [f"`{run['name']}`", flagged_text(run)]
        row += [flagged_text(others[run["name"]])] if also else []
        row += [
            f"{smoothed.max():.1f}" if len(smoothed) else "–",
            f"{entropy.min():.3f} ({run['entropy_source']})" if len(entropy) else "–",
            f"{measures['auc']:.1f}",
            f"{measures['final']:.1f}",
            str(len(run["iteration"])),
            " / ".join("–" if onset is None else f"{run['iteration'][onset]:g}" for onset in alone),
        ]
        rows.append(row)
    header = ["run", "collapse"] + ([f"collapse ({also} definition)"] if also else [])
    header += ["best smoothed reward", "min entropy (column)", "AUC", "final reward", "updates"]
    header += [" / ".join(CRITERIA) + " criterion alone"]
    return markdown_table(header, rows)


def precursors_table(runs: list) -> str:
    """One row per run: Delta pi minus and the signed trust-region violation before its collapse (or
    at its biggest Delta pi minus spike when it has none), against the run's medians."""
    rows = []
    for run in sorted(
        runs, key=lambda run: (run["arm"], run["collapse_index"] is None, run["name"])
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


def methods_text(reference: str, cost_json) -> str:
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
            f"({', '.join(cost_json)}: median over rounds, min-max; each round runs every mode "
            "of its file once, back to back, at the probe's defaults; a mode's ratio is to the "
            "reference of its own file)."
            if cost_json
            else "median per run (summary.json), relative to the reference cell's."
        )
    )


def skipped_text(skipped: list) -> str:
    """A report's line naming the run folders it could not read."""
    return f"Skipped, unreadable ({len(skipped)}): " + "; ".join(skipped) + ".\n"


def run_names(runs: list) -> str:
    """`name` (status), ... of the runs a report leaves out."""
    return ", ".join(f"`{run['name']}` ({run['status']})" for run in runs)


def notes_text(runs: list, unfinished: list, skipped: list, allow_mixed: bool) -> str:
    """What the report did not analyse and where the runs came from, one paragraph per kind; ''
    when every run finished, none was skipped and none recorded its provenance (the first
    studies' reports read as they were)."""
    notes = []
    if unfinished:
        names = run_names(unfinished)
        notes.append(f"Not finished, not analysed ({len(unfinished)}): {names}.\n")
    if skipped:
        notes.append(skipped_text(skipped))
    if any(run["provenance"] for run in runs):
        notes.append(provenance_summary(runs, allow_mixed) + "\n")
    return "\n".join(notes)


def comparison_groups(runs: list, reference: str) -> list:
    """The runs that are paired with each other: each cell with the reference arm's cell of the same
    settings (a cell without one alone)."""
    cells = group_runs(runs)
    return [
        cell_runs + (cells.get((reference,) + key[1:], []) if key[0] != reference else [])
        for key, cell_runs in cells.items()
    ]


def study_report(args, runs: list, unfinished: list, skipped: list, command: str) -> tuple:
    """(the report's text, the printed table, the figures' cells): the statistics of `runs` by cell
    under args.definition, and, where it is the revised one, every table again under the old."""
    cost = benchmark_costs(args.cost_json, args.reference) if args.cost_json else None
    results = analyse(runs, args.reference)
    if args.rank:  # a ranking table: the highest area under the reward curve first
        results.sort(
            key=lambda result: -result["auc"] if math.isfinite(result["auc"]) else math.inf
        )
    table = stats_table(results, args.reference, cost)
    primary = args.definition
    also = "old" if primary == "revised" else None

    def with_old(text: str, table_of) -> str:
        """A table, followed by the same under the old definition when the primary is revised."""
        if not also:
            return text
        return text + f"\n### The same under the {also} definition\n\n" + table_of(also) + "\n"

    def table_under(definition: str) -> str:
        results_old = analyse(marked(runs, definition), args.reference)
        order = [result["key"] for result in results]
        results_old.sort(key=lambda result: order.index(result["key"]))
        return stats_table(results_old, args.reference, cost)

    definitions = [definition_text(primary)]
    if also:
        definitions.append(f"Old definition (beside it in every table): {definition_text(also)}")
    notes = notes_text(runs, unfinished, skipped, args.allow_mixed)
    alone = [(criterion, primary) for criterion in CRITERIA]
    if also:
        alone.append(("entropy", also))
    report = [
        f"# Collapse statistics of {args.runs_dir}\n",
        f"Written by `{command}`.\n",
        *[text + "\n" for text in definitions],
        methods_text(args.reference, args.cost_json) + "\n",
        *([notes] if notes else []),
        with_old(table + "\n", table_under),
        "## Runs\n",
        runs_table(runs, primary, also) + "\n",
        "## Sensitivity: each criterion alone\n",
        "The same statistics with only one of the definition's two criteria (a check of how much "
        "the verdict depends on each, not a second definition): the reward criterion alone is the "
        "paper's reward collapse; the entropy criterion alone also flags a near-deterministic "
        "policy that still earns its reward.\n",
        *[
            f"### The {criterion} criterion alone"
            + (f" ({definition} definition)" if also else "")
            + "\n\n"
            + sensitivity_table(runs, args.reference, criterion, cost, definition)
            + "\n"
            for criterion, definition in alone
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
    old_km = {}
    if also:
        old_km = {r["key"]: r["km"] for r in analyse(marked(runs, also), args.reference)}
    cells = [
        (
            result["label"],
            result["runs"],
            [(*result["km"], primary)] + ([(*old_km[result["key"]], also)] if also else []),
        )
        for result in results
    ]
    return "\n".join(report), table, cells


# --------------------------------------------------------------------------------------------------
# Stage C (docs/collapse/study_c/PLAN.md): its pre-registered tests, on whatever runs have finished

ALPHA = 0.05  # the primary test's, and the family-wise level of the Holm-corrected secondary tests
EQUIVALENCE_MARGIN = 10.0  # S3's TOST margin, points of AUC: 40 % of the first study's +24.9
PRIMARY = ("bn-mdr21", "bn")  # exact McNemar under the revised definition, per family
# (name, arm, minus arm, test, question, what a significant result is called: the plan's words)
SECONDARY = (
    (
        "S1",
        "bn-mdr21",
        "bn-e2",
        "sign-flip",
        "the confound: the rectification, or one fewer train-mode epoch?",
        "it is the rectification, not the fewer epochs",
    ),
    ("S2", "bn-mdr12", "bn", "sign-flip", "does MDR(1,2) help?", "MDR(1,2) helps"),
    (
        "S3",
        "bn-mdr12",
        "bn-mdr21",
        "tost",
        "are MDR(1,2) and MDR(2,1) equivalent?",
        "MDR(1,2) and MDR(2,1) are equivalent",
    ),
)
PRIMARY_CALLED = "MDR prevents the collapse on fresh seeds"
FAMILY_TITLES = {"procedural": "Procedural images", "photos": "Real photographs"}


class Family:
    """One family of runs paired by seed: Stage C's procedural/ or photos/ (arms and seeds the
    plan's, by name), or those given: its finished runs' measures under both definitions
    (collapses decided by `criteria`), by arm and seed."""

    def __init__(self, name: str, runs: list, criteria=CRITERIA, arms=None, seeds=None):
        self.name = name
        self.arms, self.seeds = (arms, seeds) if arms else STAGE_C_FAMILIES[name]
        self.runs = runs
        self.by_definition = {}
        for definition in DEFINITIONS:
            by_arm = {arm: {} for arm in self.arms}
            for run in marked(runs, definition, criteria):
                measures = run_measures(run)
                measures.update(run=run, **recovery(run))
                by_arm[run["arm"]][run["seed"]] = measures
            self.by_definition[definition] = by_arm

    def measures(self, arm: str, definition: str = "revised") -> dict:
        return self.by_definition[definition][arm]

    def pairs(self, arm: str, other: str) -> list:
        return sorted(set(self.measures(arm)) & set(self.measures(other)))

    def values(self, arm: str, other: str, key: str, definition: str = "revised") -> tuple:
        """(arm's, other's) `key` over their pairs."""
        seeds = self.pairs(arm, other)
        return tuple(
            [self.measures(a, definition)[seed][key] for seed in seeds] for a in (arm, other)
        )

    def mcnemar(self, arm: str, other: str, definition: str) -> dict:
        """b: only arm collapsed, c: only other; p: exact McNemar."""
        mine, theirs = self.values(arm, other, "collapsed", definition)
        b = sum(m and not t for m, t in zip(mine, theirs))
        c = sum(t and not m for m, t in zip(mine, theirs))
        pairs = len(mine)
        return {"pairs": pairs, "b": b, "c": c, "p": mcnemar_exact(b, c) if pairs else math.nan}

    def difference(self, arm: str, other: str, key: str, confidence=CONFIDENCE) -> tuple:
        return paired_bootstrap(*self.values(arm, other, key), confidence)

    def complete_seeds(self) -> list:
        """The seeds finished in every arm of the family."""
        return [s for s in self.seeds if all(s in self.measures(arm) for arm in self.arms)]


def mcnemar_text(result: dict) -> str:
    return f"{format_p(result['p'])} ({result['b']}/{result['c']}, {result['pairs']})"


def called(p: float, reject: bool, positive: bool, name: str) -> str:
    """The plan's name for a result ('What the results will be called')."""
    if not math.isfinite(p):
        return "not yet computable"
    if not reject:
        return "not resolved"
    return name if positive else "significant, against it"


def primary_table(family: Family) -> str:
    """The primary test (bn-mdr21 vs bn, exact McNemar), under the revised and the old
    definition."""
    rows = []
    for definition in ("revised", "old"):
        result = family.mcnemar(*PRIMARY, definition)
        verdict = called(
            result["p"], result["p"] < ALPHA, result["c"] > result["b"], PRIMARY_CALLED
        )
        label = "revised (primary)" if definition == "revised" else "old (for comparison)"
        rows.append(
            [
                label,
                str(result["pairs"]),
                f"{result['b']} / {result['c']}",
                format_p(result["p"]),
                verdict if definition == "revised" else "–",
            ]
        )
    header = ["definition", "pairs", f"b / c ({PRIMARY[0]} only / {PRIMARY[1]} only collapsed)"]
    header += ["exact McNemar p", f"called (at {ALPHA:g})"]
    return markdown_table(header, rows)


def secondary_results(family: Family) -> list:
    """S1-S3 with their p-values and Holm's verdicts."""
    results = []
    for name, arm, other, test, question, success in SECONDARY:
        mine, theirs = family.values(arm, other, "auc")
        result = {"name": name, "arm": arm, "other": other, "test": test, "question": question}
        result.update(
            success=success, pairs=len(mine), bootstrap=family.difference(arm, other, "auc")
        )
        if test == "sign-flip":
            result["p"] = sign_flip_test(mine, theirs)
        else:
            result["tost"] = tost_paired(mine, theirs, EQUIVALENCE_MARGIN, ALPHA)
            result["p"] = result["tost"]["p"]
        results.append(result)
    for result, (level, reject, adjusted) in zip(
        results, holm([result["p"] for result in results], ALPHA)
    ):
        # a sign-flip test is the plan's success only if positive; the TOST's direction is none
        positive = result["test"] == "tost" or result["bootstrap"][0] > 0
        result.update(level=level, reject=reject, adjusted=adjusted)
        result["called"] = called(result["p"], reject, positive, result["success"])
    return results


def secondary_table(results: list) -> str:
    rows = []
    for result in results:
        if result["test"] == "sign-flip":
            test = f"exact sign-flip permutation (2^{result['pairs']})"
            extra = "–"
        else:
            tost = result["tost"]
            test = f"TOST, margin ±{EQUIVALENCE_MARGIN:g} (p = max of {format_p(tost['p_lower'])}"
            test += f", {format_p(tost['p_upper'])})"
            extra = (
                f"[{tost['low']:+.1f}, {tost['high']:+.1f}]{caution(result['pairs'])}"
                if math.isfinite(tost["low"])
                else "–"
            )
        rows.append(
            [
                f"{result['name']}: {result.get('outcome', 'AUC')} {result['arm']} − "
                f"{result['other']}",
                result["question"],
                str(result["pairs"]),
                format_difference(result["bootstrap"], result["pairs"]),
                extra,
                test,
                format_p(result["p"]),
                f"{result['level']:.4g}",
                format_p(result["adjusted"]),
                result["called"],
            ]
        )
    header = ["test", "question", "pairs", "mean Δ [95 % paired bootstrap]"]
    header += [f"{100 * (1 - 2 * ALPHA):.0f} % t interval (TOST)", "p-value of", "p"]
    header += ["Holm: compared with"]
    header += ["Holm-adjusted p", "called"]
    return markdown_table(header, rows)


def arms_table(family: Family) -> str:
    """Per arm: runs, collapses and rate under both definitions, AUC, final, Delta pi minus."""
    rows = []
    for arm in family.arms:
        revised, old = family.measures(arm, "revised"), family.measures(arm, "old")
        n = len(revised)
        row = [arm, str(n)]
        for measures in (revised, old):
            collapses = sum(m["collapsed"] for m in measures.values())
            row += [str(collapses), format_rate(collapses, n)]
        values = list(revised.values())
        if values:
            row += [f"{finite_mean([m[key] for m in values]):.1f}" for key in ("auc", "final")]
            row += [f"{finite_mean([m['mean_delta'] for m in values]):.2g}"]
            row += [f"{np.nanmedian([m['median_delta'] for m in values]):.2g}"]
        else:
            row += ["–"] * 4
        rows.append(row)
    header = ["arm", "runs", "collapses (revised)", "rate (revised) [95 % CP]"]
    header += ["collapses (old)", "rate (old) [95 % CP]", "AUC", "final reward", "mean Δπ⁻"]
    header += ["median Δπ⁻"]
    return markdown_table(header, rows)


def comparisons(family: Family) -> list:
    """(arm, other) of the paired comparisons reported: every arm against bn, then S1's and S3's."""
    pairs = [(arm, "bn") for arm in family.arms if arm != "bn"]
    pairs += [(arm, other) for _, arm, other, *_ in SECONDARY if {arm, other} <= set(family.arms)]
    return list(dict.fromkeys(pairs))


def comparisons_table(family: Family) -> str:
    rows = []
    for arm, other in comparisons(family):
        pairs = len(family.pairs(arm, other))
        rows.append(
            [
                f"{arm} vs {other}",
                str(pairs),
                mcnemar_text(family.mcnemar(arm, other, "revised")),
                mcnemar_text(family.mcnemar(arm, other, "old")),
                format_difference(family.difference(arm, other, "auc"), pairs),
                format_difference(family.difference(arm, other, "final"), pairs),
            ]
        )
    header = ["comparison", "pairs", "McNemar p (b/c, pairs), revised", "McNemar p, old"]
    header += ["ΔAUC [95 % CI]", "Δfinal [95 % CI]"]
    return markdown_table(header, rows)


def spread(values: list) -> str:
    """'median [min-max]' of values, '–' if none."""
    if not values:
        return "–"
    return f"{np.median(values):g} [{min(values):g}-{max(values):g}]"


def recovery_table(family: Family) -> str:
    rows = []
    for arm in family.arms:
        revised = list(family.measures(arm, "revised").values())
        row = [arm, str(len(revised))]
        row += [str(sum(m["ended_collapsed"] for m in revised))]
        row += [spread([m["spent"] for m in revised])]
        collapsed = [m for m in revised if m["collapsed"]]
        recovered = [m["recovery_time"] for m in collapsed if m["recovered"]]
        censored = [m["recovery_time"] for m in collapsed if not m["recovered"]]
        row += [str(len(collapsed)), str(len(recovered)), spread(recovered)]
        row += [f"{len(censored)}" + (f" (after {spread(censored)})" if censored else "")]
        row += [str(sum(m["collapsed"] for m in family.measures(arm, "old").values()))]
        rows.append(row)
    header = ["arm", "runs", "ended collapsed", "updates spent collapsed, median [min-max]"]
    header += ["collapsed (revised)", "recovered", "updates to recover, median [min-max]"]
    header += ["not recovered (censored after, updates)", "collapsed (old)"]
    return markdown_table(header, rows)


def criteria_table(family: Family) -> str:
    """Each criterion alone: per arm the collapses, rate and McNemar against bn; the reward
    criterion is the same in both definitions, the entropy criterion is not."""
    columns = [("reward", "revised"), ("entropy", "revised"), ("entropy", "old")]
    alone = {criterion: Family(family.name, family.runs, (criterion,)) for criterion in CRITERIA}
    rows = []
    for arm in family.arms:
        row = [arm]
        for criterion, definition in columns:
            view = alone[criterion]
            measures = view.measures(arm, definition)
            collapses = sum(m["collapsed"] for m in measures.values())
            row += [f"{collapses}, {format_rate(collapses, len(measures))}"]
            row += ["–" if arm == "bn" else mcnemar_text(view.mcnemar(arm, "bn", definition))]
        rows.append(row)
    header = ["arm"]
    for criterion, definition in columns:
        label = f"{criterion} alone" + (f" ({definition})" if criterion == "entropy" else "")
        header += [f"{label}: collapses, rate [95 % CP]", "McNemar p vs bn (b/c, pairs)"]
    return markdown_table(header, rows)


def stage_c_runs_table(family: Family) -> str:
    rows = []
    for run in sorted(family.runs, key=lambda run: run["name"]):
        revised = family.measures(run["arm"], "revised")[run["seed"]]
        old = family.measures(run["arm"], "old")[run["seed"]]
        smoothed = run["smoothed_reward"][np.isfinite(run["smoothed_reward"])]
        entropy = run["acting_entropy"][np.isfinite(run["acting_entropy"])]
        if revised["recovered"] is None:
            recovered = "–"
        elif revised["recovered"]:
            recovered = f"yes, after {revised['recovery_time']:g} updates"
        else:
            recovered = f"no (censored after {revised['recovery_time']:g})"
        rows.append(
            [
                f"`{run['name']}`",
                flagged_text(revised["run"]),
                flagged_text(old["run"]),
                recovered,
                "yes" if revised["ended_collapsed"] else "no",
                str(revised["spent"]),
                f"{smoothed.max():.1f}" if len(smoothed) else "–",
                f"{entropy.min():.3f}" if len(entropy) else "–",
                f"{revised['auc']:.1f}",
                f"{revised['final']:.1f}",
                str(len(run["iteration"])),
            ]
        )
    header = ["run", "collapse (revised)", "collapse (old)", "recovered (revised)"]
    header += ["ended collapsed", "updates spent collapsed", "best smoothed reward"]
    header += ["min acting entropy", "AUC", "final reward", "updates"]
    return markdown_table(header, rows)


def completeness_text(family: Family, others: list) -> str:
    """How many of the plan's runs have finished, which did not, and how many pairs are complete."""
    counts = ", ".join(
        f"{arm} {len(family.measures(arm))}/{len(family.seeds)}" for arm in family.arms
    )
    planned = len(family.arms) * len(family.seeds)
    text = f"Finished runs: {len(family.runs)} of the plan's {planned} ({counts})."
    not_done = [run for run in others if run["family"] == family.name]
    if not_done:
        names = run_names(not_done)
        text += f" Not finished or failed, not analysed: {names}."
    complete = family.complete_seeds()
    text += (
        f" Seeds finished in every arm: {len(complete)} of {len(family.seeds)}"
        + (f" ({seed_list(complete)})" if complete else "")
        + ". Each paired test uses the seeds finished in both of its arms (pairs below)."
    )
    return text


def stage_c_methods() -> str:
    return (
        f"Methods (fixed by the plan): rate with its exact Clopper-Pearson {CONFIDENCE:.0%} "
        "interval; McNemar: exact two-sided binomial test of b (the first arm only collapsed) "
        "among the b + c discordant pairs at p = 1/2. Secondary tests on AUC (mean normalized "
        "reward over the run's updates, points of optimal), paired by seed: S1 and S2 by the "
        "exact two-sided sign-flip permutation test of the mean difference (all 2^n sign "
        "assignments), S3 by two one-sided paired t-tests (TOST) of equivalence within "
        f"±{EQUIVALENCE_MARGIN:g} points (p = the larger one-sided p; its {1 - 2 * ALPHA:.0%} t "
        f"interval). Holm's step-down over S1-S3 at a family-wise {ALPHA:g}. ΔAUC and Δfinal "
        f"(final = mean over the last {FINAL_UPDATES} updates): paired bootstrap percentile "
        f"{CONFIDENCE:.0%} intervals ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}). "
        f"Recovery: ended collapsed = the last smoothed reward < {REWARD_FRACTION:g} x the best; "
        f"updates spent collapsed = updates with the smoothed reward < {REWARD_FRACTION:g} x the "
        "best so far (after learning started); updates to recover = from the onset to the first "
        f"later update back at >= {RECOVERY_FRACTION:g} x the best so far at the onset (a run that "
        "never gets there is not recovered, censored at its last update). "
        f"⚠ marks an interval over fewer than {FEW_SEEDS} seeds."
    )


def stage_c_report(args, runs: list, unfinished: list, skipped: list, command: str) -> tuple:
    """(report text, printed summary, figure rows, Fig. 6 runs, paired-difference panels)."""
    families = [
        Family(name, [run for run in runs if run["family"] == name]) for name in STAGE_C_FAMILIES
    ]
    report = [
        f"# Stage C: collapse statistics of {args.runs_dir}\n",
        f"Written by `{command}`.\n",
        "Pre-registration: [PLAN.md](PLAN.md) (docs/collapse/study_c/PLAN.md). Every number below "
        "is computed from the runs' committed metrics.csv files.\n",
        f"Revised definition (primary): {definition_text('revised')}\n",
        f"Old definition (the first study's, beside it in every table): {definition_text('old')}\n",
        stage_c_methods() + "\n",
        provenance_summary(runs, args.allow_mixed) + "\n" if runs else "No finished runs yet.\n",
    ]
    if skipped:
        report.append(skipped_text(skipped))
    printed = []
    for family in families:
        title = FAMILY_TITLES[family.name]
        report += [f"## {title} (`{family.name}/`)\n", completeness_text(family, unfinished) + "\n"]
        if not family.runs:
            continue
        primary = family.mcnemar(*PRIMARY, "revised")
        printed.append(
            f"{title}: finished runs {len(family.runs)}; primary McNemar {PRIMARY[0]} vs "
            f"{PRIMARY[1]} (revised): p = {format_p(primary['p'])} "
            f"(b/c {primary['b']}/{primary['c']}, {primary['pairs']} pairs)"
        )
        report += ["### Primary test\n", primary_table(family) + "\n"]
        if all({arm, other} <= set(family.arms) for _, arm, other, *_ in SECONDARY):
            secondary = secondary_results(family)
            report += [
                f"### Secondary tests (Holm, family-wise {ALPHA:g})\n",
                secondary_table(secondary) + "\n",
            ]
            printed += [
                f"  {r['name']} {r['arm']} − {r['other']}: ΔAUC "
                f"{format_difference(r['bootstrap'], r['pairs'])}, p = {format_p(r['p'])} "
                f"({r['pairs']} pairs): {r['called']}"
                for r in secondary
            ]
        report += [
            "### Arms\n",
            arms_table(family) + "\n",
            "### Paired comparisons\n",
            "b/c: the first arm only / the second only collapsed. "
            "Differences: the first minus the second.\n",
            comparisons_table(family) + "\n",
            "### Recovery (secondary outcome, descriptive)\n",
            "Time to recover is the plan's, from the revised definition's onsets (an onset of the "
            "old entropy criterion can fall while the reward is still high, where recovering "
            "means nothing); the old definition's collapses are counted beside it.\n",
            recovery_table(family) + "\n",
            "### Each criterion alone\n",
            "The reward criterion is the same in both definitions; the revised entropy criterion "
            f"counts only while the smoothed reward is < {ENTROPY_REWARD_FRACTION:g} x its best "
            "so far.\n",
            criteria_table(family) + "\n",
            "### Runs\n",
            stage_c_runs_table(family) + "\n",
        ]
    rows, panels = [], []
    for family in families:
        if not family.runs:
            continue
        cells = []
        for arm in family.arms:
            measures = {d: family.measures(arm, d) for d in ("revised", "old")}
            if measures["revised"]:
                cells.append((mode_label(arm), *survival_curves(measures)))
        rows.append((FAMILY_TITLES[family.name], cells))
        comparisons_drawn = []
        for arm, other in comparisons(family):
            mine, theirs = family.values(arm, other, "auc")
            differences = np.asarray(mine, dtype=float) - np.asarray(theirs, dtype=float)
            label = f"{mode_label(arm)}\n− {mode_label(other)}"
            comparisons_drawn.append((label, differences, family.difference(arm, other, "auc")))
        panels.append((FAMILY_TITLES[family.name], comparisons_drawn))
    fig6_runs = [
        measures["run"]
        for family in families
        for arm in family.arms
        for measures in family.measures(arm, "revised").values()
    ]
    return "\n".join(report), "\n".join(printed), rows, fig6_runs, panels


# --------------------------------------------------------------------------------------------------
# The dropout study (docs/dropout/PLAN.md). Study 1, stability on the probe: its pre-registered
# tests by dropout probability, on whatever runs have finished, with the Step 2 decision.


def fluctuation(rewards) -> float:
    """The plan's fluctuation of a run: the mean absolute update-to-update change of the smoothed
    reward (moving average over SMOOTH_WINDOW updates; updates without a finished episode skipped),
    over the updates after learning started (its best smoothed reward so far >= LEARNING_STARTED):
    the changes from the update where it started on. NaN for a run that never started learning (or
    started at its last update: no change to measure)."""
    _, smoothed, best = smoothed_rewards(rewards)
    started = np.flatnonzero(best >= LEARNING_STARTED)
    if len(started) == 0 or started[0] == len(smoothed) - 1:
        return math.nan
    return float(np.mean(np.abs(np.diff(smoothed[started[0] :]))))


DROPOUT_PRIMARY = ("dropout-mdr", "dropout")  # ΔAUC, exact sign-flip test, at p 0.1
DROPOUT_PRIMARY_P = 0.1
DROPOUT_PRIMARY_CALLED = "Dropout+MDR is more stable than dropout"
# (name, arm, minus arm, outcome, question, what the claim is called, the claim's sign)
DROPOUT_SECONDARY = (
    (
        "D1",
        "dropout",
        "none",
        "auc",
        "does dropout underperform no normalization? (Fig. 4)",
        "dropout underperforms no normalization",
        -1,
    ),
    (
        "D2",
        "dropout-mdr",
        "none",
        "auc",
        "does Dropout+MDR beat no normalization?",
        "Dropout+MDR beats no normalization",
        +1,
    ),
    (
        "D3",
        "dropout",
        "none",
        "fluctuation",
        "does dropout fluctuate more? (Fig. 4)",
        "dropout fluctuates more than no normalization",
        +1,
    ),
    (
        "D4",
        "dropout-mdr",
        "dropout",
        "fluctuation",
        "does the rectification calm it?",
        "Dropout+MDR fluctuates less than dropout",
        -1,
    ),
)
OUTCOME_NAMES = {"auc": "AUC", "final": "final", "fluctuation": "fluctuation"}
DROPOUT_PAIRS = (("dropout", "none"), ("dropout-mdr", "none"), ("dropout-mdr", "dropout"))


def dropout_family(p: float, runs: list) -> Family:
    """The runs of none and of both dropout arms at p, paired by seed, with each run's
    fluctuation beside its measures."""
    arms = tuple(with_p(arm, p) for arm in ("none", "dropout", "dropout-mdr"))
    family = Family(
        f"p {p:g}", [run for run in runs if run["arm"] in arms], arms=arms, seeds=DROPOUT_SEEDS
    )
    for by_arm in family.by_definition.values():
        for by_seed in by_arm.values():
            for measures in by_seed.values():
                measures["fluctuation"] = fluctuation(measures["run"]["normalized_reward"])
    family.p = p
    return family


def finite_count(family: Family, arm: str, other: str, outcome: str) -> int:
    """The pairs of arm and other with a value of `outcome` in both (fluctuation: runs that
    learned)."""
    return len(finite_pairs(*family.values(arm, other, outcome))[0])


def dropout_test(family: Family, arm: str, other: str, outcome: str) -> dict:
    """Δoutcome arm minus other at the family's p: pairs, bootstrap, exact sign-flip p."""
    arm, other = with_p(arm, family.p), with_p(other, family.p)
    mine, theirs = family.values(arm, other, outcome)
    return {
        "arm": arm,
        "other": other,
        "pairs": finite_count(family, arm, other, outcome),
        "bootstrap": paired_bootstrap(mine, theirs),
        "p": sign_flip_test(mine, theirs),
    }


def dropout_primary(family: Family, restrict=None) -> dict:
    """The primary test; restrict(arm, other): the family it runs on (default: `family`)."""
    tested = restrict(*DROPOUT_PRIMARY) if restrict else family
    result = dropout_test(tested, *DROPOUT_PRIMARY, "auc")
    reject = math.isfinite(result["p"]) and result["p"] < ALPHA
    result["called"] = called(
        result["p"], reject, result["bootstrap"][0] > 0, DROPOUT_PRIMARY_CALLED
    )
    return result


def dropout_secondary(family: Family, restrict=None) -> list:
    """D1-D4 at the family's p with their sign-flip p-values and Holm's verdicts (one family);
    restrict(arm, other): the family each test runs on (default: `family`)."""
    results = []
    for name, arm, other, outcome, question, success, sign in DROPOUT_SECONDARY:
        tested = restrict(arm, other) if restrict else family
        result = dropout_test(tested, arm, other, outcome)
        result.update(name=name, test="sign-flip", question=question, success=success)
        result.update(outcome=f"{OUTCOME_NAMES[outcome]}", sign=sign)
        results.append(result)
    for result, (level, reject, adjusted) in zip(
        results, holm([result["p"] for result in results], ALPHA)
    ):
        positive = result["sign"] * result["bootstrap"][0] > 0
        result.update(level=level, reject=reject, adjusted=adjusted)
        result["called"] = called(result["p"], reject, positive, result["success"])
    return results


def step2_decision(dropout_vs_none: tuple, mdr_vs_dropout: tuple, pairs: int) -> tuple:
    """The plan's rule, from Step 1's ΔAUC intervals (mean, low, high): Step 2 runs unless
    dropout − none lies below 0 and dropout-mdr − dropout above 0. (True: it must run, False: it
    need not, None: not yet decidable, fewer than 2 pairs; the sentence). `pairs`: Step 1's seeds
    finished in all three arms; with fewer than the plan's the decision is provisional."""
    (_, low1, high1), (_, low2, high2) = dropout_vs_none, mdr_vs_dropout
    planned = len(DROPOUT_SEEDS)
    shown = (
        f"ΔAUC dropout − none [{low1:+.1f}, {high1:+.1f}], dropout-mdr − dropout "
        f"[{low2:+.1f}, {high2:+.1f}]"
    )
    if not all(math.isfinite(v) for v in (low1, high1, low2, high2)):
        return None, (
            f"Step 2: not yet decidable (Step 1 has {pairs} of {planned} seeds in every arm; "
            "an interval needs 2 pairs)."
        )
    resolved = high1 < 0 and low2 > 0
    text = (
        f"Step 2 need not run: Step 1 resolves both of the paper's claims ({shown})."
        if resolved
        else "Step 2 must run: Step 1 leaves the question open (" + shown + "; the plan "
        "needs the first interval below 0 and the second above 0)."
    )
    if pairs < planned:
        text = (
            f"Provisional, Step 1 has {pairs} of {planned} seeds in every arm (the plan decides "
            f"on the complete Step 1): {text}"
        )
    return (not resolved), text


def fluctuation_text() -> str:
    return (
        "Fluctuation (the plan's): the mean absolute update-to-update change of the smoothed "
        f"reward (moving average over {SMOOTH_WINDOW} updates, updates without a finished episode "
        f"skipped), over the updates after learning started (best so far >= {LEARNING_STARTED:g} "
        "% of optimal), in points of optimal per update. A run that never started learning has no "
        "value; it is named below and left out of the fluctuation pairs."
    )


def dropout_methods() -> str:
    return (
        "Methods (fixed by the plan): AUC = mean normalized reward over the run's updates "
        f"(points of optimal), final = mean over the last {FINAL_UPDATES} updates. Primary: ΔAUC "
        f"dropout-mdr − dropout at p {DROPOUT_PRIMARY_P:g}, exact two-sided paired sign-flip "
        f"permutation test (all 2^n sign assignments) at alpha {ALPHA:g}. Secondary D1-D4, per p: "
        f"the same test, Holm's step-down as one family at a family-wise {ALPHA:g}. Intervals: "
        f"paired bootstrap percentile {CONFIDENCE:.0%} ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}). Reported, not tested: Δfinal, collapse rates with exact "
        f"Clopper-Pearson {CONFIDENCE:.0%} intervals, exact McNemar (two-sided binomial test of b, "
        "the first arm only collapsed, among the b + c discordant pairs at p = 1/2). "
        f"⚠ marks an interval over fewer than {FEW_SEEDS} pairs."
    )


def dropout_completeness(families: list, others: list) -> str:
    """Per step: how many of the plan's runs have finished, which did not, complete seeds."""
    lines = []
    for family in families:
        step = DROPOUT_STEPS[family.p]
        arms = family.arms if step == 1 else family.arms[1:]  # Step 2 reuses none's runs
        counts = ", ".join(
            f"{arm} {len(family.measures(arm))}/{len(DROPOUT_SEEDS)}" for arm in arms
        )
        done = sum(len(family.measures(arm)) for arm in arms)
        complete = family.complete_seeds()
        lines.append(
            f"Step {step} (p {family.p:g}): {done} of the plan's {len(arms) * len(DROPOUT_SEEDS)} "
            f"runs finished ({counts}); seeds finished in every arm: {len(complete)} of "
            f"{len(DROPOUT_SEEDS)}" + (f" ({seed_list(complete)})" if complete else "") + "."
        )
    if others:
        names = run_names(others)
        lines.append(f"Not finished or failed, not analysed ({len(others)}): {names}.")
    lines.append("Each paired test uses the seeds finished in both of its arms (pairs below).")
    return "\n\n".join(lines)


def dropout_primary_table(result: dict) -> str:
    row = [
        f"AUC {result['arm']} − {result['other']}",
        str(result["pairs"]),
        format_difference(result["bootstrap"], result["pairs"]),
        f"exact sign-flip permutation (2^{result['pairs']})",
        format_p(result["p"]),
        result["called"],
    ]
    header = ["test", "pairs", "mean Δ [95 % paired bootstrap]", "p-value of", "p"]
    return markdown_table(header + [f"called (at {ALPHA:g})"], [row])


def dropout_arms_table(family: Family) -> str:
    """arms_table's columns and the fluctuation per arm: mean over the runs with a value, their
    number, the runs without one."""
    base = arms_table(family).splitlines()
    rows = [base[0] + " fluctuation, mean [min-max] |", base[1] + "---|"]
    for line, arm in zip(base[2:], family.arms):
        values = [m["fluctuation"] for m in family.measures(arm).values()]
        finite = [v for v in values if math.isfinite(v)]
        text = f"{np.mean(finite):.2f} [{min(finite):.2f}-{max(finite):.2f}]" if finite else "–"
        if len(finite) < len(values):
            text += f" ({len(values) - len(finite)} never learned)"
        rows.append(line + f" {text} |")
    return "\n".join(rows)


def dropout_comparisons_table(family: Family) -> str:
    rows = []
    for arm, other in DROPOUT_PAIRS:
        arm, other = with_p(arm, family.p), with_p(other, family.p)
        pairs = len(family.pairs(arm, other))
        row = [f"{arm} vs {other}", str(pairs)]
        row += [mcnemar_text(family.mcnemar(arm, other, d)) for d in ("revised", "old")]
        for outcome in ("auc", "final", "fluctuation"):
            n = finite_count(family, arm, other, outcome)
            row.append(format_difference(family.difference(arm, other, outcome), n))
        rows.append(row)
    header = ["comparison", "pairs", "McNemar p (b/c, pairs), revised", "McNemar p, old"]
    header += ["ΔAUC [95 % CI]", "Δfinal [95 % CI]", "Δfluctuation [95 % CI]"]
    return markdown_table(header, rows)


def dropout_runs_table(family: Family, include_none: bool, checks: dict) -> str:
    """One row per finished run: its collapses, measures and the CPU kinds of its starts (the
    plan's entry of 2026-12-04 names them per run)."""
    rows = []
    for run in sorted(family.runs, key=lambda run: run["name"]):
        if run["arm"] == "none" and not include_none:
            continue
        revised = family.measures(run["arm"], "revised")[run["seed"]]
        old = family.measures(run["arm"], "old")[run["seed"]]
        smoothed = run["smoothed_reward"][np.isfinite(run["smoothed_reward"])]
        value = revised["fluctuation"]
        rows.append(
            [
                f"`{run['name']}`",
                run["arm"],
                flagged_text(revised["run"]),
                flagged_text(old["run"]),
                f"{revised['auc']:.1f}",
                f"{revised['final']:.1f}",
                f"{value:.2f}" if math.isfinite(value) else "– (never learned)",
                f"{smoothed.max():.1f}" if len(smoothed) else "–",
                str(len(run["iteration"])),
                kinds_cell(run, checks),
            ]
        )
    header = ["run", "arm", "collapse (revised)", "collapse (old)", "AUC", "final reward"]
    header += ["fluctuation", "best smoothed reward", "updates", "CPU kind of its starts"]
    return markdown_table(header, rows)


def never_learned(families: list) -> list:
    """The names of the finished runs without a fluctuation value (each once)."""
    names = {
        measures["run"]["name"]
        for family in families
        for by_seed in family.by_definition["revised"].values()
        for measures in by_seed.values()
        if not math.isfinite(measures["fluctuation"])
    }
    return sorted(names)


# The plan's within-kind sensitivity (docs/dropout/PLAN.md, its entry of 2026-12-04, declared
# before the analysis): each test again over the seeds whose two runs ran every start on one CPU
# kind. The verdicts stay the all-pairs tests; a call that differs is stated beside them.


WITHIN_KIND_TEXT = (
    "Each test again over the seeds whose two runs ran every start on one CPU kind (family, "
    "model, torch's CPU capability: from hosts.jsonl, the CPU string of scripts from 2026-12-04 "
    f"on, and for an unrecorded first start {KIND_CHECKS_FILE}). The verdicts are the tests "
    "above; this says whether the mix of CPU kinds could have made them."
)


def single_kind_seeds(pairs: dict, checks: dict) -> tuple:
    """pairs {seed: (run, run)} -> (the seeds whose two runs ran every start on one CPU kind,
    {seed: why not}, {kind: runs of the kept seeds on it})."""
    kept, left, kinds_kept = [], {}, {}
    for seed, runs in sorted(pairs.items()):
        kinds, reasons = set(), []
        for run in runs:
            found, why = start_kinds(run, run_checks(checks, run["name"]))
            if found is None:
                reasons.append(f"`{run['name']}`: {why}")
            else:
                kinds |= found
        if not reasons and len(kinds) > 1:
            reasons.append("its runs ran on " + " and ".join(kind_text(k) for k in sorted(kinds)))
        if reasons:
            left[seed] = "; ".join(reasons)
            continue
        kept.append(seed)
        (kind,) = kinds
        kinds_kept.setdefault(kind, set()).update(run["name"] for run in runs)
    return kept, left, kinds_kept


class KindRestriction:
    """Restricts pairs to their single-kind seeds, one comparison at a time, remembering what each
    comparison left out ({(arm, other): {seed: why}}) and the kinds of the runs kept."""

    def __init__(self, checks: dict):
        self.checks, self.left, self.kinds = checks, {}, {}

    def seeds(self, arm: str, other: str, pairs: dict) -> list:
        """pairs {seed: (arm's run, other's run)} -> the single-kind seeds among them."""
        kept, left, kinds = single_kind_seeds(pairs, self.checks)
        self.left[(arm, other)] = left
        for kind, names in kinds.items():
            self.kinds.setdefault(kind, set()).update(names)
        return kept


def family_pairs(family: Family, arm: str, other: str) -> dict:
    """{seed: (arm's run, other's run)} over the family's pairs of arm and other."""
    return {
        seed: tuple(family.measures(a)[seed]["run"] for a in (arm, other))
        for seed in family.pairs(arm, other)
    }


class WithinKind(KindRestriction):
    """The single-kind restriction of one dropout family: restrict(arm, other) is the family of
    the seeds kept for that pair."""

    def __init__(self, family: Family, checks: dict):
        super().__init__(checks)
        self.family = family

    def __call__(self, arm: str, other: str) -> Family:
        arm, other = with_p(arm, self.family.p), with_p(other, self.family.p)
        kept = self.seeds(arm, other, family_pairs(self.family, arm, other))
        return dropout_family(self.family.p, [r for r in self.family.runs if r["seed"] in kept])


def checked_starts_text(runs: list, checks: dict) -> str:
    """The runs whose first start a rerun checked (cpu_kinds.jsonl), as a sentence ('' if none)."""
    parts = []
    for run in sorted(runs, key=lambda run: run["name"]):
        for check in run_checks(checks, run["name"]):
            verdict = "reproduced" if check["same"] else "not reproduced"
            parts.append(f"`{run['name']}` {verdict} on {kind_text(record_kind(check['host']))}")
    if not parts:
        return ""
    return (
        f"First starts checked by rerunning their first updates ({KIND_CHECKS_FILE}, "
        "sweeps/check_cpu_kind.py): " + "; ".join(parts) + "."
    )


def left_out_text(left: dict) -> str:
    """What the sensitivity left out, by comparison (each seed with its reason)."""
    lines = [
        f"- {arm} vs {other}: " + "; ".join(f"seed {seed} ({why})" for seed, why in seeds.items())
        for (arm, other), seeds in left.items()
        if seeds
    ]
    return (
        "\n".join(lines)
        if lines
        else "No seed is left out: every pair's runs ran every start on one kind."
    )


NO_CALL = ("not resolved", "not yet computable")  # called() names of a test that calls nothing


def sensitivity_rows(everything: list, restricted: list) -> tuple:
    """Table rows (test, pairs all -> single-kind, Δ, p, Holm-adjusted p, call, all pairs' call),
    the tests whose call differs ("not resolved" and "not yet computable" both call nothing) and
    those not computable over the single-kind seeds."""
    rows, differ, uncomputable = [], [], []
    for full, kept in zip(everything, restricted):
        name = kept.get("name", "primary")
        rows.append(
            [
                f"{name}: {kept.get('outcome', 'AUC')} {kept['arm']} − {kept['other']}",
                f"{full['pairs']} → {kept['pairs']}",
                format_difference(kept["bootstrap"], kept["pairs"]),
                format_p(kept["p"]),
                format_p(kept["adjusted"]) if "adjusted" in kept else "– (not in Holm)",
                kept["called"],
                full["called"],
            ]
        )
        calls = {kept["called"], full["called"]}
        if len(calls) > 1 and not calls <= set(NO_CALL):
            differ.append(f"{name} (all pairs: {full['called']}; single-kind: {kept['called']})")
        if not math.isfinite(kept["p"]):
            uncomputable.append(f"{name} ({kept['pairs']} pairs)")
    return rows, differ, uncomputable


def within_kind_text(
    level: str, restriction: KindRestriction, checked: str, table: str, calls: tuple, agreed: str
) -> tuple:
    """(the paragraphs of a within-kind sensitivity section under a `level` heading, the sentence
    that goes under the report's own tests). calls: (the calls that differ from all pairs', the
    tests not computable over the single-kind seeds, the fewest pairs a test kept); agreed: the
    sentence when no call differs."""
    differ, uncomputable, fewest = calls
    agreement = agreed
    if differ:
        agreement = "Calls that differ from all pairs': " + "; ".join(differ) + "."
    if uncomputable:
        agreement += " Not computable over the single-kind seeds: " + ", ".join(uncomputable) + "."
    shown = "; ".join(
        f"{kind_text(kind)}: {len(names)} runs" for kind, names in sorted(restriction.kinds.items())
    )
    text = [
        f"{level} Within-kind sensitivity (the plan's entry of 2026-12-04, declared before the "
        "analysis)\n",
        WITHIN_KIND_TEXT + "\n",
        f"Kinds of the kept pairs' runs: {shown or 'none'}.\n",
    ]
    if checked:
        text.append(checked + "\n")
    text += [table + "\n", "Left out:\n", left_out_text(restriction.left) + "\n"]
    text.append(agreement + "\n")
    return text, f"Within-kind sensitivity ({fewest} pairs at the fewest): {agreement}"


def within_kind_section(family: Family, checks: dict, primary: dict, secondary: list) -> tuple:
    """(the report's sensitivity section for one dropout family, its sentence for under the
    tests)."""
    restrict = WithinKind(family, checks)
    restricted = [dropout_primary(family, restrict)] + dropout_secondary(family, restrict)
    rows, differ, uncomputable = sensitivity_rows([primary] + secondary, restricted)
    header = ["test", "pairs (all → single-kind)", "mean Δ [95 % paired bootstrap]", "p"]
    header += ["Holm-adjusted p (D1-D4)", "called, single-kind", "called, all pairs"]
    fewest = min(kept["pairs"] for kept in restricted)
    return within_kind_text(
        "###",
        restrict,
        checked_starts_text(family.runs, checks),
        markdown_table(header, rows),
        (differ, uncomputable, fewest),
        "Every call is the same as over all pairs.",
    )


def dropout_report(
    args, runs: list, unfinished: list, skipped: list, command: str, checks=None
) -> tuple:
    """(report text, printed summary, figure rows, fluctuation panels, paired panels). checks:
    the runs folder's cpu_kinds.jsonl records (read_kind_checks), for the within-kind
    sensitivity."""
    checks = checks or {}
    ps = sorted(
        {
            p
            for p in DROPOUT_STEPS
            if p == DROPOUT_PRIMARY_P
            or any(run["arm"] != "none" and math.isclose(run["dropout_p"], p) for run in runs)
        }
    )
    families = [dropout_family(p, runs) for p in ps]
    report = [
        f"# Dropout, Study 1 (stability): statistics of {args.runs_dir}\n",
        f"Written by `{command}`.\n",
        "Pre-registration: docs/dropout/PLAN.md (Study 1). Every number below is computed from "
        "the runs' committed metrics.csv files.\n",
        f"Revised definition (primary): {definition_text('revised')}\n",
        f"Old definition (the first study's, beside it in every table): {definition_text('old')}\n",
        fluctuation_text() + "\n",
        dropout_methods() + "\n",
        provenance_summary(runs, args.allow_mixed) + "\n" if runs else "No finished runs yet.\n",
    ]
    if skipped:
        report.append(skipped_text(skipped))
    report += ["## Completeness\n", dropout_completeness(families, unfinished) + "\n"]
    fewest = min(len(family.complete_seeds()) for family in families)
    if fewest < FEW_SEEDS:
        report.append(
            f"⚠ Caution: fewer than {FEW_SEEDS} seeds are finished in every arm ({fewest} at the "
            "fewest): the intervals and p-values below say little yet.\n"
        )
    learned_not = never_learned(families)
    if learned_not:
        report.append(
            f"Never started learning, no fluctuation value ({len(learned_not)}): "
            + ", ".join(f"`{name}`" for name in learned_not)
            + ".\n"
        )
    first = families[0]
    _, decision_text = step2_decision(
        first.difference(with_p("dropout", first.p), "none", "auc"),
        first.difference(with_p("dropout-mdr", first.p), with_p("dropout", first.p), "auc"),
        len(first.complete_seeds()),
    )
    report += ["## Step 2 decision (from Step 1's ΔAUC intervals, the plan's rule)\n"]
    report.append(decision_text + "\n")
    printed = [decision_text]
    for family in families:
        step = DROPOUT_STEPS[family.p]
        report.append(f"## p {family.p:g} (Step {step})\n")
        if not family.runs:
            report.append("No finished runs yet.\n")
            continue
        primary = dropout_primary(family)
        title = (
            "Primary test"
            if family.p == DROPOUT_PRIMARY_P
            else (
                f"The primary comparison at p {family.p:g} (Step 2; the plan's primary is at p "
                f"{DROPOUT_PRIMARY_P:g})"
            )
        )
        secondary = dropout_secondary(family)
        sensitivity, sensitivity_line = within_kind_section(family, checks, primary, secondary)
        report += [
            f"### {title}\n",
            dropout_primary_table(primary) + "\n",
            f"### Secondary tests (Holm over D1-D4 at p {family.p:g}, family-wise {ALPHA:g})\n",
            secondary_table(secondary) + "\n",
            sensitivity_line + "\n",
            *sensitivity,
            "### Arms\n",
            dropout_arms_table(family) + "\n",
            "### Paired comparisons (reported, not tested)\n",
            "b/c: the first arm only / the second only collapsed. Differences: the first minus "
            "the second.\n",
            dropout_comparisons_table(family) + "\n",
            "### Runs\n",
            dropout_runs_table(family, step == 1, checks) + "\n",
        ]
        printed.append(
            f"p {family.p:g}: ΔAUC {primary['arm']} − {primary['other']} "
            f"{format_difference(primary['bootstrap'], primary['pairs'])}, sign-flip p = "
            f"{format_p(primary['p'])} ({primary['pairs']} pairs): {primary['called']}"
        )
        printed += [
            f"  {r['name']} {r['outcome']} {r['arm']} − {r['other']}: "
            f"{format_difference(r['bootstrap'], r['pairs'])}, p = {format_p(r['p'])}: "
            f"{r['called']}"
            for r in secondary
        ]
        printed.append("  " + sensitivity_line)
    rows, fluctuation_panels, paired_panels = [], [], []
    for family in families:
        cells, values = [], []
        for arm in family.arms:
            measures = {d: family.measures(arm, d) for d in ("revised", "old")}
            if not measures["revised"]:
                continue
            cells.append((arm, *survival_curves(measures)))
            fluct = [m["fluctuation"] for m in measures["revised"].values()]
            values.append(
                (
                    arm,
                    [v for v in fluct if math.isfinite(v)],
                    (finite_mean(fluct), math.nan, math.nan),
                )
            )
        if not cells:
            continue
        rows.append((f"p {family.p:g}", cells))
        fluctuation_panels.append((f"p {family.p:g}", values))
        drawn = []
        for arm, other in DROPOUT_PAIRS:
            arm, other = with_p(arm, family.p), with_p(other, family.p)
            mine, theirs = family.values(arm, other, "auc")
            differences = np.asarray(mine, dtype=float) - np.asarray(theirs, dtype=float)
            drawn.append((f"{arm}\n− {other}", differences, family.difference(arm, other, "auc")))
        paired_panels.append((f"p {family.p:g}", drawn))
    return "\n".join(report), "\n".join(printed), rows, fluctuation_panels, paired_panels


STABILITY_FILES = ("stability.md", "stability_rewards.png", "stability_fluctuation.png")
STABILITY_FILES += ("stability_paired.png",)


def main_dropout(args, command: str) -> int:
    """--study dropout: Study 1 of docs/dropout/PLAN.md on every run under --runs-dir (and, with
    --gen-runs-dir, Study 2)."""
    all_runs, skipped = read_runs_and_skipped(args.runs_dir, allow_none=True)
    runs, unfinished = finished(dropout_study_runs(all_runs))
    pairs = [
        [run for run in runs if run["arm"] in {with_p(arm, p) for arm in DROPOUT_ARMS.values()}]
        for p in DROPOUT_STEPS
    ]
    check_provenance(pairs, args.allow_mixed)
    generalization = gen_analysis(args, command) if args.gen_runs_dir else None
    report, printed, rows, fluctuation_panels, paired_panels = dropout_report(
        args, runs, unfinished, skipped, command, read_kind_checks(args.runs_dir)
    )
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, STABILITY_FILES[0]), "w") as f:
        f.write(report)
    written = [STABILITY_FILES[0]]
    if rows:
        path = os.path.join(args.out_dir, STABILITY_FILES[1])
        draw_summary(
            rows, path, "the dropout study, Study 1 (revised definition solid, old dotted)"
        )
        draw_paired_differences(
            fluctuation_panels,
            os.path.join(args.out_dir, STABILITY_FILES[2]),
            ylabel="fluctuation (points of optimal per update)",
            title="Fluctuation per run (the plan's: mean |change| of the smoothed reward after "
            "learning started): a dot per run that learned; bar: the arm's mean",
        )
        draw_paired_differences(paired_panels, os.path.join(args.out_dir, STABILITY_FILES[3]))
        written += list(STABILITY_FILES[1:])
    print(printed)
    if generalization:
        written += write_gen(args, *generalization)
    print(
        f"\nwrote {', '.join(written)} to {args.out_dir} ({len(runs)} finished runs, "
        f"{len(unfinished)} not finished)"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# The dropout study's Study 2, generalization: ppo_patchloc_mdr.py runs (TensorBoard events,
# args.json, summary.json), their final held-out gap and its paired differences

GAP_TAG = "charts/generalization_gap"  # train minus held-out normalized reward, points
HELD_OUT_TAG = "charts/test_normalized_reward"  # the greedy policy on the held-out tasks
GAP_EVALUATIONS = 3  # the final gap: the mean over the last held-out evaluations
GAP_MARGIN = 5.0  # the TOST margin of dropout-mdr vs dropout, points of gap
# what every run of the study shares (args.json); the arms differ in norm, alpha2 and dropout_p
GEN_REGIME = (
    "num_tasks",
    "num_test_tasks",
    "image_source",
    "view_size",
    "total_timesteps",
    "eval_interval",
    "update_epochs",
    "clip_coef",
    "ent_coef",
    "learning_rate",
    "num_envs",
    "num_steps",
    "mdr_rounds",
    "max_episode_steps",
    "hidden_size",
    "pretrained",
    "view_batching",
)
GEN_FILES = ("generalization.md", "generalization_curves.png")
GEN_SEEDS = range(1, 9)  # the plan's 8 paired seeds (its entry of 2026-12-02)
GEN_P = 0.1  # Study 2's dropout probability
GEN_SPLITS = {"none": (3, 0), "dropout": (3, 0), "dropout-mdr": (2, 1)}  # (alpha1, alpha2)
# the regime the pilot chose (the plan's entry of 2026-12-02); every other argument is shared
GEN_PLAN = {
    "num_tasks": 32,
    "num_test_tasks": 100,
    "image_source": "procedural",
    "view_size": 32,
    "total_timesteps": 76800,
    "eval_interval": 30,
}
# the arguments in which runs of Study 2 may differ: their arm and seed, and how a run was named,
# tracked and kept (a repeat of a pilot run may differ from it only in the latter)
GEN_ARM_ARGS = ("norm", "alpha1", "alpha2", "dropout_p", "seed")
GEN_INFRASTRUCTURE = (
    "run_name",
    "resume",
    "overwrite",
    "provenance",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "wandb_group",
    "save_model",
    "checkpoint_interval",
)


def gen_arm(config: dict):
    """The plan's arm of a ppo_patchloc_mdr.py run's arguments: none (--norm none --alpha2 0),
    'dropout p0.1' (--norm dropout --alpha2 0), 'dropout-mdr p0.1' (--norm dropout, alpha2 > 0);
    None for any other."""
    norm, alpha2 = config.get("norm"), int(config.get("alpha2") or 0)
    if norm == "none" and alpha2 == 0:
        return "none"
    if norm == "dropout":
        return with_p("dropout-mdr" if alpha2 else "dropout", float(config.get("dropout_p", 0.1)))
    return None


def read_gen_runs(runs_dir: str, option: str) -> tuple:
    """(runs, skipped): every folder under runs_dir with TensorBoard events and a patch-loc
    run's arguments, as a dict: name, arm, seed, status (summary.json's, 'unfinished' without
    one), config, provenance (its segments), hosts (hosts.jsonl's records), gap and held_out
    ((steps, values) of the held-out evaluations). A ConfigError for a run of another arm."""
    from aggregate import CorruptRun as TensorBoardCorrupt
    from aggregate import read_tensorboard_run

    if not os.path.isdir(runs_dir):
        raise ConfigError(f"{option} {runs_dir}: no such folder")
    runs, skipped = [], []
    for root, dirs, files in os.walk(runs_dir):
        dirs.sort()
        if not any(name.startswith("events.out.tfevents.") for name in files):
            continue
        name = os.path.relpath(root, runs_dir)
        try:
            run = read_tensorboard_run(root, name)
            summary = read_gen_summary(os.path.join(root, "summary.json"))
            hosts = read_hosts(os.path.join(root, "hosts.jsonl"))
        except (TensorBoardCorrupt, CorruptRun) as error:
            print(f"warning: skipped {error}", file=sys.stderr)
            skipped.append(str(error))
            continue
        if run is None or run.kind != "patchloc":
            continue
        arm = gen_arm(run.config)
        if arm is None:
            raise ConfigError(
                f"{name}: --norm {run.config.get('norm')} --alpha2 {run.config.get('alpha2')} "
                "is not an arm of Study 2 (none, dropout, dropout with --alpha2 1)"
            )
        seed = int(run.config["seed"])
        provenance = summary.get("provenance") or run.config.get("provenance") or []
        empty = (np.array([]), np.array([]))
        runs.append(
            {
                "name": name,
                "folder": root,
                "arm": arm,
                "seed": seed,
                "status": summary.get("status", "unfinished") if summary else "unfinished",
                "config": run.config,
                "provenance": provenance if isinstance(provenance, list) else [provenance],
                "hosts": hosts,  # sweeps/run_and_commit.sh's record of each start
                "gap": run.series.get(GAP_TAG, empty),
                "held_out": run.series.get(HELD_OUT_TAG, empty),
            }
        )
    return runs, skipped


def check_gen_plan(runs: list) -> None:
    """A ConfigError for a run Study 2's plan does not have: a seed outside 1-8, another dropout
    probability or epoch split, or (a finished run) another regime than the pilot's choice or an
    argument that differs between runs and is neither the arm, the seed nor infrastructure."""
    for run in runs:
        config, base = run["config"], run["arm"].split(" ")[0]
        split = (int(config.get("alpha1", 0)), int(config.get("alpha2", 0)))
        if split != GEN_SPLITS[base]:
            raise ConfigError(
                f"{run['name']}: --alpha1 {split[0]} --alpha2 {split[1]} is not the plan's split "
                f"of {base} (--alpha1 {GEN_SPLITS[base][0]} --alpha2 {GEN_SPLITS[base][1]})"
            )
        if base != "none" and not math.isclose(float(config.get("dropout_p", 0.1)), GEN_P):
            raise ConfigError(
                f"{run['name']}: dropout probability {config.get('dropout_p')} is not Study 2's "
                f"({GEN_P:g})"
            )
        if run["seed"] not in GEN_SEEDS:
            raise ConfigError(
                f"{run['name']}: seed {run['seed']} is not one of the plan's seeds "
                f"({GEN_SEEDS[0]}-{GEN_SEEDS[-1]})"
            )
    finished_runs = finished(runs)[0]
    for run in finished_runs:
        for key, planned in GEN_PLAN.items():
            if canonical_text(run["config"].get(key)) != canonical_text(planned):
                raise ConfigError(
                    f"{run['name']}: {key} {run['config'].get(key)} is not the regime the pilot "
                    f"chose ({key} {planned}; docs/dropout/PLAN.md, 2026-12-02)"
                )
    free = set(GEN_ARM_ARGS) | set(GEN_INFRASTRUCTURE)
    keys = sorted({key for run in finished_runs for key in run["config"]} - free)
    check_gen_regime(finished_runs, keys)


def check_one_run_each(runs: list, label) -> None:
    """A ConfigError naming the first two runs of one label(run) and seed."""
    seen = {}
    for run in runs:
        key = (label(run), run["seed"])
        twin = seen.setdefault(key, run["name"])
        if twin != run["name"]:
            raise ConfigError(f"{twin} and {run['name']}: two runs of {key[0]}, seed {key[1]}")


def read_gen_summary(path: str) -> dict:
    """A training script's summary.json ({} if there is none: the run did not finish); CorruptRun
    (the file and the reason) if it cannot be read."""
    try:
        summary = read_json_file(path)
    except CorruptRun as error:
        raise CorruptRun(f"{path}: {error}") from None
    if summary is None:
        return {}
    if not isinstance(summary, dict):
        raise CorruptRun(f"{path}: not a summary.json of ppo_patchloc_mdr.py (no JSON object)")
    return summary


def gen_curves(run) -> tuple:
    """(steps, train, held_out) at the run's held-out evaluations: train = held-out + gap, the
    greedy policy on as many training tasks."""
    gap, held_out = dict(zip(*run["gap"])), dict(zip(*run["held_out"]))
    steps = np.array(sorted(set(gap) & set(held_out)))
    held = np.array([held_out[step] for step in steps])
    return steps, held + np.array([gap[step] for step in steps]), held


def gen_measures(run) -> dict:
    """The run's final gap, training-task and held-out reward: means over its last
    GAP_EVALUATIONS held-out evaluations (NaN with fewer), and how many it has."""
    steps, train, held_out = gen_curves(run)
    enough = len(steps) >= GAP_EVALUATIONS
    last = slice(-GAP_EVALUATIONS, None)
    return {
        "evaluations": len(steps),
        "gap": float(np.mean(train[last] - held_out[last])) if enough else math.nan,
        "train": float(np.mean(train[last])) if enough else math.nan,
        "held_out": float(np.mean(held_out[last])) if enough else math.nan,
    }


def paired_seeds(by_arm: dict, arm: str, other: str) -> list:
    """The seeds at which both arms have a run, in order."""
    return sorted(set(by_arm.get(arm, {})) & set(by_arm.get(other, {})))


def gap_comparison(by_arm: dict, arm: str, other: str) -> dict:
    """Δgap arm minus other, paired by seed: pairs, bootstrap, sign-flip p; for dropout-mdr vs
    dropout the TOST within ±GAP_MARGIN too."""
    seeds = paired_seeds(by_arm, arm, other)
    mine = [by_arm[arm][seed]["gap"] for seed in seeds]
    theirs = [by_arm[other][seed]["gap"] for seed in seeds]
    result = {"arm": arm, "other": other, "pairs": len(finite_pairs(mine, theirs)[0])}
    result.update(bootstrap=paired_bootstrap(mine, theirs), p=sign_flip_test(mine, theirs))
    if arm.startswith("dropout-mdr") and other.startswith("dropout"):
        result["tost"] = tost_paired(mine, theirs, GAP_MARGIN, ALPHA)
    return result


def equivalence_cell(tost) -> str:
    """A Δgap's TOST as 'p = ..., [low, high]: equivalent' ('–' without one)."""
    if not tost or not math.isfinite(tost["p"]):
        return "–"
    verdict = "equivalent" if tost["p"] < ALPHA else "not shown equivalent"
    return f"p = {format_p(tost['p'])}, [{tost['low']:+.1f}, {tost['high']:+.1f}]: {verdict}"


def gap_comparisons(by_arm: dict, ps: list, restrict=None) -> list:
    """The three Δgap comparisons per dropout p, each p's three one Holm family;
    restrict(arm, other): the by_arm each comparison runs on (default: by_arm)."""
    comparisons = [
        gap_comparison(restrict(a, o) if restrict else by_arm, a, o)
        for p in ps
        for a, o in ((with_p(arm, p), with_p(other, p)) for arm, other in DROPOUT_PAIRS)
    ]
    for start in range(0, len(comparisons), len(DROPOUT_PAIRS)):  # one Holm family per p
        family = comparisons[start : start + len(DROPOUT_PAIRS)]
        for c, result in zip(family, holm([c["p"] for c in family], ALPHA)):
            c["holm"] = result
    return comparisons


def gen_calls(comparison: dict) -> tuple:
    """(the Holm call: the difference's sign where rejected, else None; the TOST's: whether it
    shows equivalence). Not computable calls nothing, as not rejected does."""
    _, rejected, adjusted = comparison["holm"]
    sign = "+" if comparison["bootstrap"][0] > 0 else "−"
    tost = comparison.get("tost")
    equivalent = bool(tost) and math.isfinite(tost["p"]) and tost["p"] < ALPHA
    return (sign if rejected and math.isfinite(adjusted) else None), equivalent


def gen_call_text(comparison: dict) -> str:
    """A Δgap comparison's calls in words: Holm's (with the difference), and the TOST's where it
    has one."""
    text = f"Holm {holm_cell(comparison['holm'])}"
    if math.isfinite(comparison["bootstrap"][0]):
        text += f" at Δ {comparison['bootstrap'][0]:+.1f}"
    if "tost" in comparison:
        text += f", TOST {equivalence_cell(comparison['tost'])}"
    return text


def gen_within_kind(by_arm: dict, ps: list, comparisons: list, checks: dict) -> tuple:
    """(the Study 2 report's within-kind sensitivity section, its sentence for under the paired
    differences): the comparisons again over the seeds whose two runs ran every start on one
    CPU kind."""
    restriction = KindRestriction(checks)

    def restrict(arm: str, other: str) -> dict:
        pairs = {
            seed: (by_arm[arm][seed]["run"], by_arm[other][seed]["run"])
            for seed in paired_seeds(by_arm, arm, other)
        }
        kept = restriction.seeds(arm, other, pairs)
        return {a: {s: by_arm[a][s] for s in kept} for a in (arm, other)}

    restricted = gap_comparisons(by_arm, ps, restrict)
    rows, differ, uncomputable = [], [], []
    for full, kept in zip(comparisons, restricted):
        name = f"gap {kept['arm']} − {kept['other']}"
        rows.append(
            [
                name,
                f"{full['pairs']} → {kept['pairs']}",
                format_difference(kept["bootstrap"], kept["pairs"]),
                format_p(kept["p"]),
                holm_cell(kept["holm"]),
                equivalence_cell(kept.get("tost")),
            ]
        )
        if gen_calls(kept) != gen_calls(full):
            calls = [gen_call_text(c) for c in (full, kept)]
            differ.append(f"{name} (all pairs: {calls[0]}; single-kind: {calls[1]})")
        if not math.isfinite(kept["p"]):
            uncomputable.append(f"{name} ({kept['pairs']} pairs)")
        elif "tost" in kept and not math.isfinite(kept["tost"]["p"]):
            uncomputable.append(f"the TOST of {name} ({kept['pairs']} pairs)")
    header = ["difference", "pairs (all → single-kind)", "mean Δ [95 % paired bootstrap]"]
    header += ["sign-flip p", "Holm-adjusted p (3 per dropout p)"]
    header += [f"TOST ±{GAP_MARGIN:g} (p, {1 - 2 * ALPHA:.0%} t interval)"]
    runs = [m["run"] for seeds in by_arm.values() for m in seeds.values()]
    return within_kind_text(
        "##",
        restriction,
        checked_starts_text(runs, checks),
        markdown_table(header, rows),
        (differ, uncomputable, min(kept["pairs"] for kept in restricted)),
        "Every call (Holm, TOST) is the same as over all pairs.",
    )


def gen_methods(pairs: int) -> str:
    """The report's methods paragraph. Holm calls are possible only when the smallest sign-flip p
    the pairs allow is below Holm's smallest level, alpha over the three comparisons."""
    floor = 2 / 2**pairs if pairs else math.nan
    holm_floor = ALPHA / len(DROPOUT_PAIRS)
    return (
        "Methods (fixed by the plan): per run, the final generalization gap = the mean of "
        f"`{GAP_TAG}` (training-task minus held-out normalized reward of the greedy eval-mode "
        f"policy, points) over its last {GAP_EVALUATIONS} held-out evaluations; a run with fewer "
        "has none. Δgap = the first arm minus the second, paired by seed: paired bootstrap "
        f"percentile {CONFIDENCE:.0%} interval ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}) and the exact two-sided sign-flip permutation p-value; dropout-mdr "
        f"vs dropout also as an equivalence check, TOST within ±{GAP_MARGIN:g} points (p = the "
        f"larger one-sided p, its {1 - 2 * ALPHA:.0%} t interval). "
        + (
            f"With {pairs} pairs the sign-flip test can reach p = {format_p(floor)}: the three "
            "Δgap p-values of a dropout probability are one Holm family at family-wise alpha "
            f"{ALPHA:g} (the plan's entry of 2026-12-02: 8 seeds), and a difference is called only "
            "if it survives Holm."
            if floor < holm_floor
            else f"With {pairs} pairs the sign-flip test cannot go below p = {format_p(floor)}, "
            f"not below Holm's smallest level ({ALPHA:g}/{len(DROPOUT_PAIRS)}): this study "
            "describes the three Δgap, it cannot call one. The TOST is still reported at alpha "
            f"{ALPHA:g}, as the plan's answer to its question."
        )
        + f" ⚠ marks an interval over fewer than {FEW_SEEDS} pairs."
    )


def holm_cell(result: tuple) -> str:
    """A Holm result (level, rejected, adjusted p) as 'p = 0.0234, rejected' / '..., kept'."""
    _, rejected, adjusted = result
    if not math.isfinite(adjusted):
        return "–"
    return f"p = {format_p(adjusted)}, {'rejected' if rejected else 'kept'}"


def check_gen_regime(
    runs: list, keys=GEN_REGIME, why: str = "Study 2 compares arms of one regime"
) -> str:
    """The settings (of keys) every finished run shares, as text; a ConfigError naming the first
    that differs, and why they must not."""
    shared = []
    for key in keys:
        values = {canonical_text(run["config"].get(key)) for run in runs}
        if len(values) > 1:
            found = "; ".join(
                f"{run['name']} {canonical_text(run['config'].get(key))}" for run in runs
            )
            raise ConfigError(f"the runs differ in {key} ({found}): {why}")
        if runs:
            shared.append(f"{key} {values.pop()}")
    return ", ".join(shared)


def canonical_text(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format_setting(float(value)) if numeric else str(value)


def gen_notes(runs: list, skipped: list, unfinished: list, allow_mixed: bool) -> list:
    """Study 2's and its pilot's lines after the regime: where the runs came from, the folders that
    could not be read, the runs not finished."""
    notes = [provenance_summary(runs, allow_mixed) + "\n"] if runs else []
    if skipped:
        notes.append(skipped_text(skipped))
    if unfinished:
        count = len(unfinished)
        notes.append(f"Not finished or failed, not analysed ({count}): {run_names(unfinished)}.\n")
    return notes


PILOT_REPEATS = (1, 2)  # the seeds at which the study's `none` runs repeat the pilot's round 2


def pilot_repeats(runs: list, checks: dict, pilot_dir) -> tuple:
    """(the Study 2 report's section, its printed line): the study's finished `none` runs at seeds
    1 and 2 against the pilot's runs (under pilot_dir) of the same arguments but infrastructure,
    every logged scalar but timing compared step by step, bit for bit (the plan's entry of
    2026-12-02 expects them identical; its entry of 2026-12-04, only on the pilot's CPU kind)."""
    from compare_runs import TIMING_TAGS, compare, load

    title = (
        f"## The `none` runs at seeds {PILOT_REPEATS[0]} and {PILOT_REPEATS[1]} against the pilot\n"
    )
    if pilot_dir is None:
        return [title, "Not compared: no --pilot-runs-dir given.\n"], ""
    pilot_runs = finished(read_gen_runs(pilot_dir, "--pilot-runs-dir")[0])[0]
    pilot_checks = read_kind_checks(pilot_dir)

    def arguments(run) -> dict:
        return {k: v for k, v in run["config"].items() if k not in GEN_INFRASTRUCTURE}

    rows, verdicts = [], []
    for run in sorted(runs, key=lambda run: run["seed"]):
        if run["arm"] != "none" or run["seed"] not in PILOT_REPEATS:
            continue
        twins = [twin for twin in pilot_runs if arguments(twin) == arguments(run)]
        if not twins:
            rows.append(
                [f"`{run['name']}`", "–", "–", kinds_cell(run, checks), "–", "no pilot run"]
            )
            verdicts.append(f"{run['name']} has no pilot run of its arguments")
        for twin in twins:
            result = compare(load(twin["folder"]), load(run["folder"]), TIMING_TAGS)
            differ = [(tag, detail) for status, tag, detail in result if status != "SAME"]
            verdict = (
                f"differ in {len(differ)} of {len(result)} tags (`{differ[0][0]}`: "
                f"{differ[0][1] or 'only in one'})"
                if differ
                else f"identical ({len(result)} tags)"
            )
            commits = sorted(
                {str(segment.get("commit")) for r in (run, twin) for segment in r["provenance"]}
            )
            rows.append(
                [
                    f"`{run['name']}`",
                    f"`{twin['name']}`",
                    "same" if len(commits) == 1 else ", ".join(commits),
                    kinds_cell(run, checks),
                    kinds_cell(twin, pilot_checks),
                    verdict,
                ]
            )
            verdicts.append(
                f"{run['name']} vs the pilot's {twin['name']}: {verdict.split(' (')[0]}"
            )
    intro = (
        f"The plan expects the study's `none` runs at seeds {PILOT_REPEATS[0]} and "
        f"{PILOT_REPEATS[1]} to repeat the pilot's runs of the same command at the same commit "
        "value for value (its entry of 2026-12-02), if they ran on the pilot's CPU kind (entry "
        f"of 2026-12-04). Compared: every logged scalar but timing ({', '.join(TIMING_TAGS)}), "
        f"step by step, bit for bit; the pilot's runs from {pilot_dir}.\n"
    )
    if not rows:
        return [title, intro, "No finished `none` run at these seeds yet.\n"], ""
    header = ["study run", "pilot run", "commit", "study run's CPU kind", "pilot run's CPU kind"]
    header += ["values"]
    return [title, intro, markdown_table(header, rows) + "\n"], (
        "Repeat of the pilot: " + "; ".join(verdicts)
    )


def gen_analysis(args, command: str) -> tuple:
    """Study 2 on the runs under --gen-runs-dir (--runs-dir with --study dropout-gen): (report,
    printed summary, figure panels)."""
    runs_dir = args.gen_runs_dir or args.runs_dir
    option = "--gen-runs-dir" if args.gen_runs_dir else "--runs-dir"
    all_runs, skipped = read_gen_runs(runs_dir, option)
    check_one_run_each(all_runs, lambda run: run["arm"])
    check_gen_plan(all_runs)
    runs, unfinished = finished(all_runs)
    regime = check_gen_regime(runs)
    ps = sorted(
        {float(run["config"].get("dropout_p", 0.1)) for run in runs if run["arm"] != "none"}
    )
    check_provenance(
        [
            [run for run in runs if run["arm"] == "none" or run["arm"].endswith(f"p{p:g}")]
            for p in ps
        ]
        or [runs],
        args.allow_mixed,
    )
    by_arm = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = {**gen_measures(run), "run": run}
    arms = sorted(by_arm, key=mode_rank)
    comparisons = gap_comparisons(by_arm, ps)
    pairs = min((c["pairs"] for c in comparisons), default=0)
    report = [
        f"# Dropout, Study 2 (generalization): held-out gap of {runs_dir}\n",
        f"Written by `{command}`.\n",
        "Pre-registration: docs/dropout/PLAN.md (Study 2). Every number below is computed from "
        "the runs' TensorBoard events (ppo_patchloc_mdr.py's held-out evaluations).\n",
        gen_methods(pairs) + "\n",
        (f"Regime (every finished run): {regime}.\n" if runs else "No finished runs yet.\n"),
    ]
    report += gen_notes(runs, skipped, unfinished, args.allow_mixed)
    short = sorted(
        m["run"]["name"]
        for seeds in by_arm.values()
        for m in seeds.values()
        if m["evaluations"] < GAP_EVALUATIONS
    )
    if short:
        report.append(
            f"Fewer than {GAP_EVALUATIONS} held-out evaluations, no final gap: "
            + ", ".join(f"`{name}`" for name in short)
            + ".\n"
        )
    if runs and pairs < FEW_SEEDS:
        report.append(
            f"⚠ Caution: {pairs} pair{'s' * (pairs != 1)} at the fewest: the intervals say "
            "little yet.\n"
        )
    rows = []
    for arm in arms:
        values = list(by_arm[arm].values())
        row = [arm, str(len(values))]
        for key in ("train", "held_out", "gap"):
            finite = [m[key] for m in values if math.isfinite(m[key])]
            row.append(
                f"{np.mean(finite):.1f} [{min(finite):.1f}, {max(finite):.1f}]" if finite else "–"
            )
        rows.append(row)
    header = ["arm", "runs", "final training-task reward, mean [min, max]"]
    header += ["final held-out reward", "final gap"]
    report += ["## Arms\n", markdown_table(header, rows) + "\n"]
    rows, printed = [], []
    for c in comparisons:
        tost = c.get("tost")
        equivalence = equivalence_cell(tost)
        rows.append(
            [
                f"gap {c['arm']} − {c['other']}",
                str(c["pairs"]),
                format_difference(c["bootstrap"], c["pairs"]),
                format_p(c["p"]),
                holm_cell(c["holm"]),
                equivalence,
            ]
        )
        printed.append(
            f"Δgap {c['arm']} − {c['other']}: {format_difference(c['bootstrap'], c['pairs'])}, "
            f"sign-flip p = {format_p(c['p'])}, Holm {holm_cell(c['holm'])} ({c['pairs']} pairs)"
            + (f"; TOST ±{GAP_MARGIN:g}: {equivalence}" if tost else "")
        )
    header = ["difference", "pairs", "mean Δ [95 % paired bootstrap]", "sign-flip p"]
    header += ["Holm-adjusted p (3 per dropout p)"]
    header += [f"TOST ±{GAP_MARGIN:g} (p, {1 - 2 * ALPHA:.0%} t interval)"]
    report += ["## Paired differences of the final gap\n", markdown_table(header, rows) + "\n"]
    checks = read_kind_checks(runs_dir)
    if comparisons:
        sensitivity, line = gen_within_kind(by_arm, ps, comparisons, checks)
        report += [line + "\n", *sensitivity]
        printed.append(line)
    repeats, line = pilot_repeats(runs, checks, args.pilot_runs_dir)
    report += repeats
    printed += [line] if line else []
    rows = []
    for arm in arms:
        for seed, m in sorted(by_arm[arm].items()):
            rows.append(
                [f"`{m['run']['name']}`", arm, str(seed), str(m["evaluations"])]
                + [
                    f"{m[key]:.1f}" if math.isfinite(m[key]) else "–"
                    for key in ("train", "held_out", "gap")
                ]
                + [kinds_cell(m["run"], checks)]
            )
    header = ["run", "arm", "seed", "held-out evaluations", "final training-task reward"]
    header += ["final held-out reward", "final gap", "CPU kind of its starts"]
    report += ["## Runs\n", markdown_table(header, rows) + "\n"]
    panels = [(arm, [gen_curves(m["run"]) for _, m in sorted(by_arm[arm].items())]) for arm in arms]
    return "\n".join(report), "\n".join(printed), panels


def write_gen(args, report: str, printed: str, panels: list) -> list:
    """The Study 2 report (and its figure, where runs finished) in --out-dir; the files written."""
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, GEN_FILES[0]), "w") as f:
        f.write(report)
    if printed:
        print(printed)
    if not panels:
        return [GEN_FILES[0]]
    draw_train_vs_heldout(panels, os.path.join(args.out_dir, GEN_FILES[1]), "Study 2")
    return list(GEN_FILES)


def main_dropout_gen(args, command: str) -> int:
    """--study dropout-gen: Study 2 of docs/dropout/PLAN.md on every run under --runs-dir."""
    written = write_gen(args, *gen_analysis(args, command))
    print(f"\nwrote {', '.join(written)} to {args.out_dir}")
    return 0


# Study 2's pilot (docs/dropout/PLAN.md): the `none` runs at several training-task counts and step
# budgets; the regime in which a network without dropout visibly overfits

PILOT_MIN_GAP = 10.0  # points: an overfitting regime's final gap is at least this
PILOT_MIN_TRAIN = 30.0  # % of optimal: and its final training-task reward at least this
PILOT_VARIES = ("num_tasks", "total_timesteps", "eval_interval")  # what the pilot tries
PILOT_FILES = ("pilot.md", "pilot_curves.png")


def pilot_regime(run) -> tuple:
    """(training tasks, environment steps) of a pilot run."""
    return int(run["config"]["num_tasks"]), int(run["config"]["total_timesteps"])


def pilot_choice(regimes: dict) -> tuple:
    """(tasks, steps) of the plan's choice among regimes {(tasks, steps): [measures of its runs]}:
    the smallest task count with a regime whose means over its seeds reach both thresholds (of
    that count's regimes, the fewest steps); None if no regime overfits."""
    overfitting = [regime for regime, runs in regimes.items() if pilot_overfits(runs)]
    return min(overfitting, default=None)


def pilot_overfits(measures: list) -> bool:
    gap = np.mean([m["gap"] for m in measures])
    train = np.mean([m["train"] for m in measures])
    return bool(gap >= PILOT_MIN_GAP and train >= PILOT_MIN_TRAIN)


def pilot_analysis(args, command: str) -> tuple:
    """The pilot on the runs under --runs-dir (arm none only): (report, printed choice, figure
    panels), one row per regime (training tasks, steps) and one per run."""
    all_runs, skipped = read_gen_runs(args.runs_dir, "--runs-dir")
    others = [run["name"] for run in all_runs if run["arm"] != "none"]
    if others:
        raise ConfigError(f"{others[0]}: the pilot runs arm none only (--norm none --alpha2 0)")
    check_one_run_each(
        all_runs, lambda run: "none at {} tasks, {} steps".format(*pilot_regime(run))
    )
    runs, unfinished = finished(all_runs)
    keys = [key for key in GEN_REGIME if key not in PILOT_VARIES]
    shared = check_gen_regime(runs, keys, "the pilot varies only " + ", ".join(PILOT_VARIES))
    check_provenance([runs], args.allow_mixed)
    regimes = {}
    for run in runs:
        measures = gen_measures(run)
        if math.isfinite(measures["gap"]):
            regimes.setdefault(pilot_regime(run), []).append({**measures, "run": run})
    choice = pilot_choice(regimes)
    if choice:
        chosen = f"{choice[0]} training tasks, {choice[1]:,} steps"
        printed = f"Pilot choice: {chosen} (the smallest task count at which none overfits)"
    else:
        printed = (
            "Pilot choice: no regime overfits; by the plan the study runs at 32 training tasks, "
            "and its report says the regime lacks the overfitting the question needs"
        )
    report = [
        f"# Dropout, Study 2's pilot: does a network without dropout overfit? ({args.runs_dir})\n",
        f"Written by `{command}`.\n",
        "Rule (docs/dropout/PLAN.md, Study 2): a regime (training-task count, step budget) "
        f"overfits when, over its seeds, the mean final gap is at least {PILOT_MIN_GAP:g} points "
        f"and the mean final training-task reward at least {PILOT_MIN_TRAIN:g} % of optimal; "
        "final = the mean over the last "
        f"{GAP_EVALUATIONS} held-out evaluations, the training-task reward = held-out + "
        f"`{GAP_TAG}` (the greedy eval-mode policy on as many training tasks). The pilot "
        "picks the smallest task count with a regime that overfits (of its regimes, the fewest "
        "steps).\n",
        (f"Every run shares: {shared}.\n" if runs else "No finished runs yet.\n"),
    ]
    report += gen_notes(runs, skipped, unfinished, args.allow_mixed)
    short = [run["name"] for run in runs if not math.isfinite(gen_measures(run)["gap"])]
    if short:
        names = ", ".join(f"`{name}`" for name in short)
        report.append(f"Fewer than {GAP_EVALUATIONS} held-out evaluations, left out: {names}.\n")
    if unfinished:
        printed += f" (so far: {len(unfinished)} run{'s' * (len(unfinished) != 1)} unfinished)"
    report.append(f"**{printed}.**\n")
    rows = []
    for regime, measures in sorted(regimes.items()):
        row = [str(regime[0]), f"{regime[1]:,}", str(len(measures))]
        row += [f"{np.mean([m[key] for m in measures]):.1f}" for key in ("train", "held_out")]
        row += [f"{np.mean([m['gap'] for m in measures]):.1f}"]
        row += ["yes" if pilot_overfits(measures) else "no"]
        rows.append(row)
    header = ["training tasks", "steps", "seeds", "final training-task reward, mean"]
    header += ["final held-out reward, mean", "final gap, mean", "overfits"]
    report += ["## Regimes\n", markdown_table(header, rows) + "\n"]
    rows, panels = [], []
    for regime, measures in sorted(regimes.items()):
        curves = []
        for m in sorted(measures, key=lambda m: m["run"]["seed"]):
            curves.append(gen_curves(m["run"]))
            train = curves[-1][1]
            rows.append(
                [f"`{m['run']['name']}`", str(m["run"]["seed"]), str(m["evaluations"])]
                + [f"{m[key]:.1f}" for key in ("train", "held_out", "gap")]
                + [f"{np.max(train):.1f}"]
            )
        panels.append((f"none, {regime[0]} tasks, {regime[1]:,} steps", curves))
    header = ["run", "seed", "held-out evaluations", "final training-task reward"]
    header += ["final held-out reward", "final gap", "best training-task reward"]
    report += ["## Runs\n", markdown_table(header, rows) + "\n"]
    return "\n".join(report), printed, panels


def main_dropout_pilot(args, command: str) -> int:
    """--study dropout-pilot: Study 2's pilot on the runs under --runs-dir; pilot.md and its
    figure in --out-dir."""
    report, printed, panels = pilot_analysis(args, command)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, PILOT_FILES[0]), "w") as f:
        f.write(report)
    written = [PILOT_FILES[0]]
    if panels:
        draw_train_vs_heldout(panels, os.path.join(args.out_dir, PILOT_FILES[1]), "pilot")
        written.append(PILOT_FILES[1])
    print(printed)
    print(f"\nwrote {', '.join(written)} to {args.out_dir}")
    return 0


# --------------------------------------------------------------------------------------------------
# Command line


def family_column(run) -> str:
    return FAMILY_TITLES[run["family"]].lower()


def refuse_options(args, study: str) -> None:
    """A pre-registered analysis takes no cell selection: a ConfigError naming what was given."""
    options = {
        "--reference": args.reference != "bn",
        "--cell": args.cell,
        "--modes": args.modes,
        "--seeds": args.seeds,
        "--rank": args.rank,
        "--cost-json": args.cost_json,
        "--check-definition": args.check_definition,
    }
    if study != "dropout":
        options["--gen-runs-dir"] = args.gen_runs_dir
    if study not in ("dropout", "dropout-gen"):
        options["--pilot-runs-dir"] = args.pilot_runs_dir
    elif study == "dropout" and args.pilot_runs_dir and not args.gen_runs_dir:
        raise ConfigError(
            "--pilot-runs-dir: only with Study 2 (--gen-runs-dir, or --study dropout-gen)"
        )
    given = [option for option, value in options.items() if value]
    if given:
        raise ConfigError(
            f"--study {study} runs the plan's analysis of every run; {', '.join(given)} "
            "does not apply to it"
        )
    if args.definition == "old":
        raise ConfigError(
            f"--study {study} --definition old: the plan's primary definition is the revised one; "
            "the report shows the old one beside it in every table"
        )


def main_stage_c(args, command: str) -> int:
    """--study stage-c: the plan's analysis of every run under --runs-dir."""
    all_runs, skipped = read_runs_and_skipped(args.runs_dir, allow_none=True)
    runs, unfinished = finished(stage_c_runs(all_runs))
    families = [[run for run in runs if run["family"] == name] for name in STAGE_C_FAMILIES]
    check_provenance(families, args.allow_mixed)
    report, printed, rows, fig6_runs, panels = stage_c_report(
        args, runs, unfinished, skipped, command
    )
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "collapse_stats.md"), "w") as f:
        f.write(report)
    written = ["collapse_stats.md"]
    if runs:
        draw_summary(rows, os.path.join(args.out_dir, "collapse_stats.png"), "Stage C")
        draw_fig6(
            fig6_runs,
            os.path.join(args.out_dir, "collapse_fig6.png"),
            "collapse onsets of the revised definition",
            column=family_column,
        )
        draw_paired_differences(panels, os.path.join(args.out_dir, "collapse_paired.png"))
        written += ["collapse_stats.png", "collapse_fig6.png", "collapse_paired.png"]
    print(printed or "no finished runs yet")
    print(
        f"\nwrote {', '.join(written)} to {args.out_dir} ({len(runs)} finished runs, "
        f"{len(unfinished)} not finished)"
    )
    return 0


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs-dir",
        default="docs/collapse/study",
        help="folder searched (recursively) for metrics.csv",
    )
    parser.add_argument(
        "--out-dir", required=True, help="where the report and figures go (created if needed)"
    )
    parser.add_argument(
        "--reference",
        default="bn",
        help="the arm every other arm is compared with, paired by seed",
    )
    parser.add_argument(
        "--cell",
        default="",
        help="only cells matching key=value[,key=value] (mode, clip, ent, bnm, views, p)",
    )
    parser.add_argument(
        "--modes", default="", help="only these arms, comma-separated (default: every arm found)"
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
        action="append",
        default=None,
        help="wall-time column from this bench_sps.py --json (probe/<mode>); repeat it for modes "
        "benchmarked later, each file with the reference",
    )
    parser.add_argument(
        "--check-definition",
        default=None,
        help="first print the definition's verdict on these runs",
    )
    parser.add_argument(
        "--definition",
        choices=DEFINITIONS,
        default=None,
        help="collapse definition: old (the first study's; default) or revised (Stage C's, with "
        "the old one after every table)",
    )
    parser.add_argument(
        "--study",
        choices=["stage-c", "dropout", "dropout-gen", "dropout-pilot"],
        default=None,
        help="a pre-registered analysis: stage-c (docs/collapse/study_c/PLAN.md); dropout "
        "(docs/dropout/PLAN.md, Study 1; Study 2 too with --gen-runs-dir); dropout-gen (Study 2 "
        "alone, ppo_patchloc_mdr.py runs under --runs-dir); dropout-pilot (Study 2's pilot: "
        "which training-task count makes none overfit)",
    )
    parser.add_argument(
        "--gen-runs-dir",
        default=None,
        help="--study dropout: also Study 2 of the ppo_patchloc_mdr.py runs in this folder",
    )
    parser.add_argument(
        "--pilot-runs-dir",
        default=None,
        help="Study 2: compare its none runs at seeds 1 and 2 with the pilot's runs in this folder",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="pair runs from different commits, CPUs or torch versions (named in the report)",
    )
    args = parser.parse_args(argv)
    command = "python analysis/collapse_stats.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.study:
        refuse_options(args, args.study)
        study = {
            "stage-c": main_stage_c,
            "dropout": main_dropout,
            "dropout-gen": main_dropout_gen,
            "dropout-pilot": main_dropout_pilot,
        }
        return study[args.study](args, command.strip())
    if args.gen_runs_dir:
        raise ConfigError("--gen-runs-dir: only with --study dropout")
    if args.pilot_runs_dir:
        raise ConfigError("--pilot-runs-dir: only with Study 2 (--study dropout-gen or dropout)")
    definition = args.definition or "old"

    if args.check_definition:
        checked = mark_collapses(
            finished(read_runs(args.check_definition, "--check-definition"))[0], definition
        )
        print(
            f"Collapse definition on the runs in {args.check_definition}: "
            f"{definition_text(definition)}\n"
        )
        print(runs_table(checked, definition) + "\n")
    all_runs, skipped = read_runs_and_skipped(args.runs_dir)
    runs, unfinished = finished(all_runs)
    if not runs:
        raise ConfigError(f"--runs-dir {args.runs_dir}: no finished runs (none has summary.json)")
    runs = select_modes(select_cells(runs, args.cell), args.modes)
    runs = mark_collapses(select_seeds(runs, args.seeds), definition)
    arms = sorted({run["arm"] for run in runs})
    if args.reference not in arms:
        raise ConfigError(
            f"--reference {args.reference}: no runs of that mode (modes found: {', '.join(arms)})"
        )
    check_provenance(comparison_groups(runs, args.reference), args.allow_mixed)
    args.definition = definition
    report, table, cells = study_report(args, runs, unfinished, skipped, command.strip())
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "collapse_stats.md"), "w") as f:
        f.write(report)
    draw_summary([("", cells)], os.path.join(args.out_dir, "collapse_stats.png"))
    draw_fig6(runs, os.path.join(args.out_dir, "collapse_fig6.png"))
    print(table)
    print(
        "\nwrote collapse_stats.md, collapse_stats.png and collapse_fig6.png "
        f"to {args.out_dir} ({len(runs)} runs)"
    )
    return 0


def run(argv=None) -> int:
    """main() as a command: bad input (a ConfigError) is one line on stderr, exit status 2."""
    return run_command(main, argv, ConfigError, 2)


if __name__ == "__main__":
    sys.exit(run())
