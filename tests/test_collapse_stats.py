"""Tests of analysis/collapse_stats.py: the statistics on small cases with known answers (rates,
McNemar, Kaplan-Meier, bootstrap, the exact sign-flip test, TOST, Holm), recovery and precursors on
hand-made curves, the command line on folders of tiny hand-written runs (the first studies' layout
and Stage C's, partial and complete) and on the committed runs; the dropout study (docs/dropout/
PLAN.md): the fluctuation measure, the Holm family, the Step 2 rule, Study 1's report and Study 2's
held-out gap on hand-made runs. The collapse definition itself: tests/test_collapse_runs.py."""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))  # the modules' folder
import collapse_runs as cr
import collapse_stats as cs
from collapse_run_files import (
    PROVENANCE,
    ZEN3,
    ZEN4,
    curve,
    kind_check,
    write_dropout_run,
    write_gen_run,
    write_stage_c_run,
)
from collapse_run_files import write_run as write_full_run

ANALYSIS = Path(cs.__file__).parent
COMMITTED_RUNS = ANALYSIS.parent / "docs" / "collapse"
NAN = float("nan")
HIGH = curve((1.5, 200))  # an acting entropy far from either criterion


# --------------------------------------------------------------------------------------------------
# Statistics with known answers


@pytest.mark.parametrize(
    "collapses, runs, low, high",
    [
        (0, 10, 0.0, 1 - 0.025 ** (1 / 10)),  # 0.3085: closed form when no run collapsed
        (10, 10, 0.025 ** (1 / 10), 1.0),
        (3, 10, 0.0667, 0.6525),  # as R's binom.test(3, 10) prints it: 0.06673951 0.65245285
    ],
)
def test_clopper_pearson_matches_published_values(collapses, runs, low, high):
    assert cs.clopper_pearson(collapses, runs) == pytest.approx((low, high), abs=1e-4)


@pytest.mark.parametrize(
    "b, c, p", [(5, 0, 0.0625), (0, 5, 0.0625), (0, 0, 1.0), (2, 2, 1.0), (6, 1, 0.125)]
)
def test_exact_mcnemar_is_the_binomial_test_of_the_discordant_pairs(b, c, p):
    assert cs.mcnemar_exact(b, c) == pytest.approx(p)  # 2 x 0.5^5; 2 x (1 + 7) / 2^7


def test_kaplan_meier_of_a_small_censored_sample_computed_by_hand():
    # at 3: 4/5; at 5: one of 4 at risk collapses (the other 5 is censored) -> 0.8 x 3/4; 8
    # censored; 10: the last
    times, survival = cs.kaplan_meier([3, 5, 5, 8, 10], [True, True, False, False, True])

    assert list(times) == [0, 3, 5, 8, 10]
    assert survival == pytest.approx([1.0, 0.8, 0.6, 0.6, 0.0])


def test_kaplan_meier_without_collapses_stays_at_one():
    times, survival = cs.kaplan_meier([150, 150, 120], [False, False, False])

    assert list(times) == [0, 120, 150] and list(survival) == [1.0, 1.0, 1.0]


def test_paired_bootstrap_of_two_pairs_spans_the_resampled_means():
    # differences 1 and 3: resampled means 1, 2, 3 with probabilities 1/4, 1/2, 1/4 -> the 2.5 and
    # 97.5 % points are 1, 3
    assert cs.paired_bootstrap([11.0, 23.0], [10.0, 20.0]) == pytest.approx((2.0, 1.0, 3.0))


def test_paired_bootstrap_edge_cases():
    # one difference
    assert cs.paired_bootstrap([5.0, 6.0, 7.0], [4.0, 5.0, 6.0]) == pytest.approx((1.0, 1.0, 1.0))
    # a pair with a NaN is dropped; 1 pair: no interval
    mean, low, high = cs.paired_bootstrap([5.0, NAN], [1.0, 2.0])
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(
    "x, p",
    [
        # the 8 sign assignments of (1, 2, 3) sum to 6, 4, 2, 0, 0, -2, -4, -6: |sum| >= 6 twice
        ([1.0, 2.0, 3.0], 2 / 8),
        # of (1, -1, 2): 2, 0, 4, -2, 2, -4, 0, -2: |sum| >= 2 six times
        ([1.0, -1.0, 2.0], 6 / 8),
        # one pair: both assignments are as extreme
        ([5.0], 1.0),
        # (1, 1, 1, 1): only all + and all - reach |sum| 4: 2 of 16
        ([1.0, 1.0, 1.0, 1.0], 2 / 16),
    ],
)
def test_the_exact_sign_flip_test_enumerated_by_hand(x, p):
    assert cs.sign_flip_test(x, [0.0] * len(x)) == pytest.approx(p)
    assert cs.sign_flip_test([v + 10 for v in x], [10.0] * len(x)) == pytest.approx(p)  # paired


def test_the_sign_flip_test_drops_nan_pairs_and_refuses_too_many():
    assert cs.sign_flip_test([1.0, 2.0, NAN, 3.0], [0.0, 0.0, 0.0, NAN]) == pytest.approx(2 / 4)
    assert math.isnan(cs.sign_flip_test([NAN], [1.0]))
    with pytest.raises(ValueError, match="at most 24"):
        cs.sign_flip_test([1.0] * 25, [0.0] * 25)


def test_tost_on_a_case_computed_by_hand():
    """Differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), 2 degrees of freedom, margin 3. With 2
    degrees of freedom the t CDF has the closed form F(t) = 1/2 + t / (2 sqrt(2 + t^2)):
    p_upper = F((2 - 3) sqrt(3)) = 1/2 - sqrt(3) / (2 sqrt(5)) = 0.11270, p_lower = 1 - F(5 sqrt(3))
    = 1/2 - 5 sqrt(3) / (2 sqrt(77)) = 0.006536. The 90 % interval is 2 -+ t(0.95; 2) / sqrt(3) with
    t(0.95; 2) = 2.920 (the textbook table): [0.314, 3.686], which crosses +3: not equivalent."""
    result = cs.tost_paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], margin=3.0, alpha=0.05)

    assert result["p_upper"] == pytest.approx(0.5 - math.sqrt(3) / (2 * math.sqrt(5)))
    assert result["p_lower"] == pytest.approx(0.5 - 5 * math.sqrt(3) / (2 * math.sqrt(77)))
    assert result["p"] == result["p_upper"] and result["p"] > 0.05
    assert (result["low"], result["high"]) == pytest.approx(
        (2 - 2.920 / math.sqrt(3), 2 + 2.920 / math.sqrt(3)), abs=1e-3
    )
    wide = cs.tost_paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], margin=10.0, alpha=0.05)
    assert wide["p"] < 0.05 and -10 < wide["low"] < wide["high"] < 10  # within +-10: equivalent


def test_tost_edge_cases():
    assert math.isnan(cs.tost_paired([1.0], [0.0], 10.0, 0.05)["p"])  # one pair: no spread
    same = cs.tost_paired([2.0, 2.0], [0.0, 0.0], 10.0, 0.05)  # identical differences
    assert same["p"] == 0.0 and same["low"] == same["high"] == 2.0
    assert cs.tost_paired([12.0, 12.0], [0.0, 0.0], 10.0, 0.05)["p"] == 1.0


def test_holm_on_known_p_values():
    # sorted: 0.01 <= 0.05/3 rejected; 0.03 > 0.05/2 stops, so 0.04 is not rejected either.
    # Adjusted: 3 x 0.01 = 0.03, max(0.03, 2 x 0.03) = 0.06, max(0.06, 0.04) = 0.06
    results = cs.holm([0.01, 0.04, 0.03], 0.05)

    assert [level for level, _, _ in results] == pytest.approx([0.05 / 3, 0.05, 0.05 / 2])
    assert [reject for _, reject, _ in results] == [True, False, False]
    assert [adjusted for _, _, adjusted in results] == pytest.approx([0.03, 0.06, 0.06])
    # every one rejected; a NaN (a test without pairs yet) is never rejected and ranks last
    assert [r for _, r, _ in cs.holm([0.001, 0.02, 0.01], 0.05)] == [True, True, True]
    assert [r for _, r, _ in cs.holm([NAN, 0.001, 0.01], 0.05)] == [False, True, True]


# --------------------------------------------------------------------------------------------------
# Recovery (Stage C's secondary outcome)


def recovery_of(rewards, entropies=None) -> dict:
    entropies = curve((1.5, len(rewards))) if entropies is None else entropies
    run = {"normalized_reward": rewards, "iteration": np.arange(1.0, len(rewards) + 1)}
    run["collapse_index"] = cr.collapse_onset(rewards, entropies, "revised")[0]
    return cs.recovery(run)


def test_a_drop_that_recovers_counts_as_recovered():
    # the reward collapse of 50 -> 0 starts at index 37 (smoothed 10 < 12.5); from index 50 the
    # reward is 50 again: the smoothed reward is 5 (k + 1) at 50 + k, back at half of the best at
    # onset (25) at index 54, 17 updates after the onset. Below a quarter of the best: indices 37-51
    result = recovery_of(curve((50.0, 30), (0.0, 20), (50.0, 50)))

    assert result == {
        "ended_collapsed": False,
        "spent": 15,
        "recovery_time": 17.0,
        "recovered": True,
    }


def test_a_collapse_that_never_recovers_is_censored_at_the_last_update():
    result = recovery_of(curve((50.0, 30), (0.0, 70)))

    # onset at index 37, the last update at index 99; collapsed from 37 on: 63 updates
    assert result == {
        "ended_collapsed": True,
        "spent": 63,
        "recovery_time": 62.0,
        "recovered": False,
    }


def test_a_run_without_a_collapse_has_no_recovery_time():
    result = recovery_of(curve((50.0, 100)))

    assert result == {
        "ended_collapsed": False,
        "spent": 0,
        "recovery_time": None,
        "recovered": None,
    }


# --------------------------------------------------------------------------------------------------
# Precursors: Delta pi minus and the signed trust-region violation before a collapse


def hand_run(delta, violation, smoothed, collapse_index=None) -> dict:
    return {
        "iteration": np.arange(1, len(delta) + 1, dtype=float),
        "delta_pi_minus": np.asarray(delta, dtype=float),
        "trust_region_violation_signed": np.asarray(violation, dtype=float),
        "smoothed_reward": np.asarray(smoothed, dtype=float),
        "collapse_index": collapse_index,
    }


def test_the_spike_before_a_collapse_is_its_window_peak_over_the_earlier_median():
    delta = curve(
        (1e-3, 40), (0.05, 1), (2e-3, 19)
    )  # a spike at index 40, then the collapse at index 45
    violation = curve((0.0, 38), (0.3, 1), (0.0, 21))
    run = hand_run(delta, violation, curve((20.0, 60)), collapse_index=45)

    found = cs.precursors(run)

    assert found["end"] == 45 and found["peak"] == pytest.approx(0.05)
    assert found["ratio"] == pytest.approx(
        0.05 / 1e-3
    )  # baseline: the median of the updates before index 35
    assert found["violation"] == pytest.approx(0.3)
    late = cs.spike(
        run, 59
    )  # the window 49..59 holds no spike; its baseline includes it, but the median ignores it
    assert late["peak"] == pytest.approx(2e-3) and late["ratio"] == pytest.approx(2.0)


def test_a_run_without_a_collapse_is_measured_at_its_biggest_spike_after_learning_started():
    delta = curve((1e-3, 15), (0.2, 1), (1e-3, 34), (0.01, 1), (1e-3, 9))  # spikes at 15 and 50
    smoothed = curve(
        (0.0, 30), (30.0, 30)
    )  # learning starts at index 30: windows end at 30 or later, so start at >= 20
    run = hand_run(delta, np.full(60, NAN), smoothed)

    found = cs.precursors(run)

    assert 50 <= found["end"] <= 50 + cs.PRECURSOR_UPDATES and found["peak"] == pytest.approx(0.01)
    assert found["ratio"] == pytest.approx(10.0) and math.isnan(
        found["violation"]
    )  # old runs: no signed column
    assert math.isnan(
        cs.spike(hand_run(delta[:8], np.zeros(8), smoothed[:8]), 7)["ratio"]
    )  # no baseline yet


# --------------------------------------------------------------------------------------------------
# Command line


def write_run(
    folder: Path, mode: str, seed: int, rewards, entropies, bn_momentum=0.01, wall_time=100.0
):
    """The columns the analysis reads, as the probe writes them, and a summary.json."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            cr.SERIES + ("mode", "seed", "clip_coef", "ent_coef", "acting_entropy", "wall_time")
        )
        for i, (reward, entropy) in enumerate(zip(rewards, entropies), start=1):
            delta_pi_minus = (
                0.0 if mode == "eval" else 0.41 if i == 1 else 0.01
            )  # one spike: mean 0.02, median 0.01
            writer.writerow(
                [i, 128 * i, reward, reward, delta_pi_minus, 1.0, mode, seed, 0.2, 0.01, entropy, i]
            )
    args = {"mode": mode, "seed": seed, "bn_momentum": bn_momentum, "view_batching": "separate"}
    (folder / "summary.json").write_text(json.dumps({"wall_time_s": wall_time, "args": args}))


@pytest.fixture
def study(tmp_path):
    """BN collapses in seeds 1-3 (entropy, at update 21), BN+MDR in seed 3 only; Eval in seeds 1-2
    (not paired: its BN momentum differs); a BN+MDR run at another BN momentum with no BN run to
    pair with."""
    learned, collapsed = curve((40.0, 40)), curve((40.0, 20), (0.0, 20))
    high, low = curve((1.5, 40)), curve((1.5, 20), (0.0, 20))
    for seed in (1, 2, 3):
        write_run(tmp_path / "study" / f"bn_s{seed}", "bn", seed, collapsed, low, wall_time=100.0)
        mdr_curves = (collapsed, low) if seed == 3 else (learned + seed, high)
        write_run(
            tmp_path / "study" / f"bn-mdr_s{seed}", "bn-mdr", seed, *mdr_curves, wall_time=150.0
        )
    for seed in (1, 2):
        write_run(
            tmp_path / "study" / f"eval_s{seed}", "eval", seed, learned, high, bn_momentum=0.1
        )
    write_run(tmp_path / "study" / "bn-mdr_bnm0.5_s1", "bn-mdr", 1, learned, high, bn_momentum=0.5)
    return tmp_path / "study"


def table_rows(output: str) -> dict:
    """{(mode, bnm): cells} of the printed statistics table."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("bn", "bn-mdr", "eval"):
            rows[(cells[0], cells[3])] = cells
    return rows


@pytest.fixture
def drawn(monkeypatch):
    """The figures the command line would draw, recorded instead of drawn (matplotlib takes seconds
    a figure; the figures themselves are tested once, below, and in tests/test_collapse_figures.py):
    {file name: the drawing function's arguments}."""
    calls = {}

    def recorder(name):
        def record(*args, **kwargs):
            calls[os.path.basename(args[1])] = (args, kwargs)

        return record

    for name in ("draw_summary", "draw_fig6", "draw_paired_differences", "draw_train_vs_heldout"):
        monkeypatch.setattr(cs, name, recorder(name))
    return calls


def test_cli_prints_the_check_and_the_table_and_writes_the_report_and_figures(
    study, tmp_path, capsys, drawn
):
    out_dir = tmp_path / "out"

    assert (
        cs.main(
            [
                "--runs-dir",
                str(study),
                "--out-dir",
                str(out_dir),
                "--check-definition",
                str(COMMITTED_RUNS),
            ]
        )
        == 0
    )

    output = capsys.readouterr().out
    assert output.startswith(
        f"Collapse definition on the runs in {COMMITTED_RUNS}: Collapse: after the smoothed reward"
    )
    assert (
        "| `bn_clip0.2_ent0.01_seed1` | yes, update 41 (entropy) | 41.3 | 0.000 (entropy) |"
        in output
    )
    assert "| `eval_clip0.2_ent0_seed2` | no | 51.3 | 0.696 (entropy) |" in output
    assert output.index("`eval_clip0.2_ent0_seed2`") < output.index("| mode |")
    rows = table_rows(output)
    assert sorted(rows) == [("bn", "0.01"), ("bn-mdr", "0.01"), ("bn-mdr", "0.5"), ("eval", "0.1")]
    bn, mdr = rows[("bn", "0.01")], rows[("bn-mdr", "0.01")]
    # columns: mode, clip, ent, bnm, views, n, collapses, rate, McNemar, AUC, dAUC, dfinal, mean
    # dpi, median dpi, wall
    assert bn[5:8] == ["3", "3", "1.00 [0.29, 1.00]"] and bn[8] == "–" and bn[9] == "20.0"
    assert mdr[5:8] == ["3", "1", "0.33 [0.01, 0.91]"]
    assert mdr[8] == "0.5 (0/2, 3)"  # exact McNemar: 2 pairs where only BN collapsed, p = 2 x 0.5^2
    assert mdr[9] == "34.3"  # (41 + 42 + 20) / 3
    assert mdr[10].startswith("+14.3 [") and mdr[11].startswith(
        "+27.7 ["
    )  # paired: (21 + 22 + 0) / 3, (41 + 42 + 0) / 3
    assert (
        mdr[12] == "0.02" and mdr[13] == "0.01" and mdr[14] == "1.50"
    )  # mean (0.41 + 39 x 0.01) / 40, median
    assert (
        rows[("eval", "0.1")][8] == "–" and rows[("bn-mdr", "0.5")][8] == "–"
    )  # no BN cell of these settings
    report = (out_dir / "collapse_stats.md").read_text()
    assert (
        "| bn-mdr | 0.2 | 0.01 | 0.01 | separate | 3 | 1 | 0.33 [0.01, 0.91] | 0.5 (0/2, 3) |"
        in report
    )
    assert "| `bn_s1` | yes, update 21 (entropy) |" in report
    assert re.search(
        r"\| `bn_s1` \| yes, update 21 \(entropy\) \|.*\| 28 / 21 \|\n", report
    )  # reward: 8 zeros in the window
    reward_alone = report[
        report.index("### The reward criterion alone") : report.index(
            "### The entropy criterion alone"
        )
    ]
    assert (
        "| bn-mdr | 0.2 | 0.01 | 0.01 | separate | 3 | 1 | 0.33 [0.01, 0.91] | 0.5 (0/2, 3) |"
        in reward_alone
    )
    assert sorted(drawn) == ["collapse_fig6.png", "collapse_stats.png"]


def test_cli_draws_its_figures(study, tmp_path):
    # the one test here that draws (seconds a figure): two cells
    args = ["--runs-dir", str(study), "--out-dir", str(tmp_path), "--cell", "bnm=0.01"]
    assert cs.main(args) == 0

    for name in ("collapse_stats.png", "collapse_fig6.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_cell_filter_and_reference(study, tmp_path, capsys, drawn):
    assert (
        cs.main(
            [
                "--runs-dir",
                str(study),
                "--out-dir",
                str(tmp_path),
                "--cell",
                "bnm=0.01",
                "--reference",
                "bn-mdr",
            ]
        )
        == 0
    )

    rows = table_rows(capsys.readouterr().out)
    assert sorted(rows) == [("bn", "0.01"), ("bn-mdr", "0.01")]
    assert rows[("bn", "0.01")][8] == "0.5 (2/0, 3)" and rows[("bn", "0.01")][14] == "0.67"


def test_cli_modes_filter(study, tmp_path, capsys, drawn):
    assert (
        cs.main(["--runs-dir", str(study), "--out-dir", str(tmp_path), "--modes", "bn,eval"]) == 0
    )

    assert sorted(table_rows(capsys.readouterr().out)) == [("bn", "0.01"), ("eval", "0.1")]


def test_cli_rank_orders_the_table_by_auc(study, tmp_path, capsys, drawn):
    assert cs.main(["--runs-dir", str(study), "--out-dir", str(tmp_path), "--rank"]) == 0

    lines = capsys.readouterr().out.splitlines()[2:6]
    order = [(line.split("|")[1].strip(), line.split("|")[4].strip()) for line in lines]
    assert sorted(order[:2]) == [("bn-mdr", "0.5"), ("eval", "0.1")]  # AUC 40 both
    assert order[2:] == [("bn-mdr", "0.01"), ("bn", "0.01")]  # AUC 34.3, then 20


def test_cli_seeds_filter(study, tmp_path, capsys, drawn):
    assert (
        cs.main(
            [
                "--runs-dir",
                str(study),
                "--out-dir",
                str(tmp_path),
                "--cell",
                "bnm=0.01",
                "--seeds",
                "1,3-3",
            ]
        )
        == 0
    )

    output = capsys.readouterr().out
    rows = table_rows(output)
    assert rows[("bn", "0.01")][5] == "2"
    # two seeds: a caution beside each interval
    assert rows[("bn-mdr", "0.01")][5:12] == [
        "2",
        "1",
        "0.50 [0.01, 0.99] ⚠ only 2 seeds",
        "1 (0/1, 2)",
        "30.5",
        "+10.5 [+0.0, +21.0] ⚠ only 2 seeds",
        "+20.5 [+0.0, +41.0] ⚠ only 2 seeds",
    ]


def write_bench(path: Path, sps_by_config: dict) -> Path:
    """A benchmarks/bench_sps.py --json file: per configuration, one entry per round with its
    iterations' SPS."""
    path.write_text(
        json.dumps(
            {name: [{"sps": sps} for sps in rounds] for name, rounds in sps_by_config.items()}
        )
    )
    return path


def test_cli_cost_json_gives_the_side_by_side_wall_time_column(study, tmp_path, capsys, drawn):
    # per round: bn's median SPS over bn-mdr's = 10/5 and 20/8; eval has no configuration; patchloc
    # is not a probe mode
    bench = write_bench(
        tmp_path / "bench.json",
        {
            "probe/bn": [[9, 11], [20, 20]],
            "probe/bn-mdr": [[5, 5], [7, 9]],
            "patchloc/mdr": [[1, 1], [1, 1]],
        },
    )

    assert (
        cs.main(["--runs-dir", str(study), "--out-dir", str(tmp_path), "--cost-json", str(bench)])
        == 0
    )

    output = capsys.readouterr().out
    assert "| wall time / bn (side by side) |" in output.splitlines()[0]
    rows = table_rows(output)
    assert (
        rows[("bn-mdr", "0.01")][14] == "2.25 (2.00-2.50)"
        and rows[("bn-mdr", "0.5")][14] == "2.25 (2.00-2.50)"
    )
    assert rows[("bn", "0.01")][14] == "1.00 (1.00-1.00)" and rows[("eval", "0.1")][14] == "–"
    report = (tmp_path / "collapse_stats.md").read_text()
    assert f"measured side by side ({bench}: median over rounds" in report
    assert (
        report.count("| wall time / bn (side by side) |") == 3
    )  # the table and both sensitivity tables


def test_a_later_cost_json_adds_its_modes_each_against_its_own_reference(
    study, tmp_path, capsys, drawn
):
    # the first file has no eval; the second measures eval beside bn in rounds of its own (bn 10
    # and 12, eval 5 and 4: ratios 2.0 and 3.0), whatever the first file's bn was
    first = write_bench(
        tmp_path / "first.json", {"probe/bn": [[9, 11], [20, 20]], "probe/bn-mdr": [[5, 5], [7, 9]]}
    )
    later = write_bench(
        tmp_path / "later.json", {"probe/bn": [[10, 10], [12, 12]], "probe/eval": [[5, 5], [4, 4]]}
    )
    args = ["--runs-dir", str(study), "--out-dir", str(tmp_path / "out")]

    assert cs.main([*args, "--cost-json", str(first), "--cost-json", str(later)]) == 0

    rows = table_rows(capsys.readouterr().out)
    assert rows[("bn-mdr", "0.01")][14] == "2.25 (2.00-2.50)"
    assert rows[("eval", "0.1")][14] == "2.50 (2.00-3.00)"
    report = (tmp_path / "out" / "collapse_stats.md").read_text()
    assert f"measured side by side ({first}, {later}: median over rounds" in report


def test_a_mode_in_two_cost_jsons_is_a_config_error(study, tmp_path):
    first = write_bench(tmp_path / "first.json", {"probe/bn": [[9]], "probe/eval": [[5]]})
    later = write_bench(tmp_path / "later.json", {"probe/bn": [[10]], "probe/eval": [[4]]})
    message = (
        f"--cost-json: probe/eval is in both {first} and {later}; give each mode's ratio one file"
    )
    with pytest.raises(cs.ConfigError, match=re.escape(message)):
        cs.main(
            [
                *["--runs-dir", str(study), "--out-dir", str(tmp_path / "out")],
                *["--cost-json", str(first), "--cost-json", str(later)],
            ]
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a readable benchmarks/bench_sps.py --json file"),
        (
            '{"probe/bn": [{"wall_s": 3}]}',
            "not a readable benchmarks/bench_sps.py --json file ('sps')",
        ),
        (
            '{"probe/eval": [{"sps": [1]}]}',
            "no probe/bn configuration to compare with; rerun bench_sps.py with it",
        ),
    ],
)
def test_a_bad_cost_json_is_a_config_error(study, tmp_path, content, message):
    (tmp_path / "bench.json").write_text(content)
    with pytest.raises(cs.ConfigError, match=re.escape(message)):
        cs.main(
            [
                "--runs-dir",
                str(study),
                "--out-dir",
                str(tmp_path / "out"),
                "--cost-json",
                str(tmp_path / "bench.json"),
            ]
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runs-dir", "missing"], "--runs-dir missing: no such folder"),
        (
            ["--cost-json", "missing.json"],
            "--cost-json missing.json: not a readable benchmarks/bench_sps.py --json file",
        ),
        (["--runs-dir", "empty"], "--runs-dir empty: no runs found"),
        (
            ["--reference", "gn"],
            "--reference gn: no runs of that mode (modes found: bn, bn-mdr, eval)",
        ),
        (["--cell", "bnm=0.3"], "--cell bnm=0.3: no runs match"),
        (
            ["--cell", "momentum=0.1"],
            "is not key=value with key one of mode, clip, ent, bnm, views",
        ),
        (["--modes", "bn,gn"], "--modes bn,gn: no runs of gn (modes found: bn, bn-mdr, eval)"),
        (["--seeds", "1-x"], "--seeds 1-x: '1-x' is not a seed or a range like 1-4"),
        (["--seeds", "7"], "--seeds 7: no runs with these seeds"),
        (["--check-definition", "missing"], "--check-definition missing: no such folder"),
    ],
)
def test_bad_input_is_a_config_error(study, tmp_path, monkeypatch, args, message):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cs.ConfigError, match=re.escape(message)):
        cs.main(["--runs-dir", str(study), "--out-dir", "out"] + args)
    assert not (tmp_path / "out").exists()


def run_cli(cwd, monkeypatch, capsys, *args) -> tuple:
    """(exit status, stderr) of the command line in cwd, in this process (the command's own
    process: test_the_command_line_is_the_same_in_its_own_process)."""
    monkeypatch.chdir(cwd)
    try:
        status = cs.run(list(args))
    except SystemExit as exit:  # argparse's errors
        status = exit.code
    return status, capsys.readouterr().err


# (arguments, the one line on stderr): the tool's bad input, each also in BAD_INPUT of the report
BAD_COMMAND_LINES = [
    (["--runs-dir", "missing", "--out-dir", "out"], "error: --runs-dir missing: no such folder"),
    (
        ["--runs-dir", "study"],
        "error: the following arguments are required: --out-dir (--help lists the options)",
    ),
    (
        ["--runs-dir", "study", "--out-dir", "out", "--definition", "new"],
        "error: argument --definition: invalid choice: 'new'",
    ),
    (
        ["--runs-dir", "study", "--out-dir", "out", "--seeds", "4-2"],
        "error: --seeds 4-2: '4-2' is not a seed or a range like 1-4",
    ),
    (
        ["--runs-dir", "study", "--out-dir", "out", "--study", "stage-c"],
        "error: bn-mdr_bnm0.5_s1: not a run of Stage C's plan (not under procedural/ or photos/)",
    ),
    (
        ["--runs-dir", "study", "--out-dir", "out", "--study", "stage-c", "--seeds", "1-3"],
        "error: --study stage-c runs the plan's analysis of every run; --seeds does not apply "
        "to it",
    ),
]


@pytest.mark.parametrize("args, line", BAD_COMMAND_LINES)
def test_bad_input_on_the_command_line_is_one_line(study, monkeypatch, capsys, args, line):
    status, err = run_cli(study.parent, monkeypatch, capsys, *args)

    assert status == 2 and err.startswith(line) and err.count("\n") == 1
    assert not (study.parent / "out").exists()


def test_the_command_line_is_the_same_in_its_own_process(study):
    result = subprocess.run(
        [sys.executable, str(ANALYSIS / "collapse_stats.py"), "--runs-dir", "missing"],
        cwd=study.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2 and result.stderr == (
        "error: the following arguments are required: --out-dir (--help lists the options)\n"
    )


def test_the_revised_definition_reports_the_old_one_after_every_table(study, tmp_path, drawn):
    assert (
        cs.main(["--runs-dir", str(study), "--out-dir", str(tmp_path), "--definition", "revised"])
        == 0
    )

    report = (tmp_path / "collapse_stats.md").read_text()
    # BN's collapses are entropy collapses that end at a reward of 0: both definitions flag them
    assert report.count("### The same under the old definition") == 1
    assert "| run | collapse | collapse (old definition) | best smoothed reward |" in report
    # revised: the entropy counts once the smoothed reward 40 (9 - j) / 10 is below 20 (j = 5)
    assert "| `bn_s1` | yes, update 26 (entropy) | yes, update 21 (entropy) |" in report
    for heading in (
        "### The reward criterion alone (revised definition)",
        "### The entropy criterion alone (revised definition)",
        "### The entropy criterion alone (old definition)",
    ):
        assert heading in report
    args, _ = drawn["collapse_stats.png"]
    ((title, cells),) = args[0]
    assert [len(curves) for _, _, curves in cells] == [2] * 4  # revised and old Kaplan-Meier


def test_unfinished_and_unreadable_runs_are_named_not_analysed(study, tmp_path, capsys, drawn):
    killed = study / "bn_s4"
    write_run(killed, "bn", 4, curve((40.0, 10)), curve((1.5, 10)))
    (killed / "summary.json").unlink()
    broken = study / "bn_s5"
    write_run(broken, "bn", 5, curve((40.0, 10)), curve((1.5, 10)))
    (broken / "summary.json").write_text("{")

    assert cs.main(["--runs-dir", str(study), "--out-dir", str(tmp_path / "out")]) == 0

    report = (tmp_path / "out" / "collapse_stats.md").read_text()
    assert "Not finished, not analysed (1): `bn_s4` (unfinished).\n" in report
    assert f"Skipped, unreadable (1): {broken}/summary.json: unreadable (" in report
    assert "bn_s4" not in report.split("(unfinished).\n", 1)[1]  # in no table
    assert capsys.readouterr().err.startswith(f"warning: skipped {broken}/summary.json")
    assert table_rows(report)[("bn", "0.01")][5] == "3"


def test_paired_cells_that_share_no_seed_are_a_config_error(tmp_path, drawn):
    for mode, seed in (("bn", 1), ("bn", 2), ("bn-mdr", 3)):
        write_run(tmp_path / "runs" / f"{mode}_s{seed}", mode, seed, curve((40.0, 10)), HIGH[:10])

    with pytest.raises(cs.ConfigError) as error:
        cs.main(["--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")])

    assert str(error.value) == (
        "BN+MDR (seeds 3) and bn (seeds 1-2) share no seed: nothing to pair; choose runs of the "
        "same seeds (--seeds, --cell)"
    )
    assert not (tmp_path / "out").exists()


def test_runs_of_another_commit_are_not_paired_unless_allowed(tmp_path, drawn):
    runs = tmp_path / "runs"
    write_full_run(runs / "bn_s1", "bn", 1, curve((40.0, 10)), HIGH[:10])
    write_full_run(runs / "mdr_s1", "bn-mdr", 1, curve((40.0, 10)), HIGH[:10])
    other = {**PROVENANCE, "commit": "b" * 40}
    write_full_run(runs / "mdr_s2", "bn-mdr", 2, curve((40.0, 10)), HIGH[:10], provenance=other)
    write_full_run(runs / "bn_s2", "bn", 2, curve((40.0, 10)), HIGH[:10], provenance=None)

    with pytest.raises(cs.ConfigError, match=r"^runs that are paired come from different commits"):
        cs.main(["--runs-dir", str(runs), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()

    assert (
        cs.main(["--runs-dir", str(runs), "--out-dir", str(tmp_path / "out"), "--allow-mixed"]) == 0
    )
    report = (tmp_path / "out" / "collapse_stats.md").read_text()
    assert (
        "Provenance of the 4 runs: 2 from commit aaaaaaa, AMD EPYC, torch 2.14.1; 1 from commit "
        "bbbbbbb, AMD EPYC, torch 2.14.1; 1 unknown (made before runs recorded it). Runs of "
        "different provenance were paired (--allow-mixed).\n"
    ) in report


def assert_committed_report_is_reproduced(args: list, study: str, out_dir: Path) -> None:
    """docs/collapse.md's command (args, run from the checkout's root) rewrites
    docs/collapse/<study>/collapse_stats.md byte for byte, the line naming the command aside (it
    names its --out-dir)."""
    committed = (COMMITTED_RUNS / study / "collapse_stats.md").read_text().splitlines()
    os.chdir(ANALYSIS.parent)
    try:
        assert cs.main(args + ["--out-dir", str(out_dir)]) == 0
    finally:
        os.chdir(out_dir)
    written = (out_dir / "collapse_stats.md").read_text().splitlines()
    assert (
        written[2]
        == f"Written by `python analysis/collapse_stats.py {' '.join(args)} --out-dir {out_dir}`."
    )
    assert written[:2] + written[3:] == committed[:2] + committed[3:]


def test_the_first_studys_committed_report_is_reproduced(tmp_path, drawn):
    args = ["--runs-dir", "docs/collapse/study", "--cell", "bnm=0.1", "--modes", "bn,eval,bn-mdr"]
    assert_committed_report_is_reproduced(args, "study", tmp_path)


def test_stage_cs_committed_report_is_reproduced(tmp_path, drawn):
    """From the 80 committed runs, with the three figures the page shows."""
    args = ["--runs-dir", "docs/collapse/study_c", "--study", "stage-c"]
    assert_committed_report_is_reproduced(args, "study_c", tmp_path)
    assert sorted(drawn) == ["collapse_fig6.png", "collapse_paired.png", "collapse_stats.png"]


def test_stage_cs_verdict_quotes_its_reports():
    """Every interval and p-value that docs/collapse.md's Stage C verdict states is in the committed
    reports (Stage C's, and the first study's for the replication's comparison): the verdict is
    copied from the commands' output, not retyped."""
    page = (COMMITTED_RUNS.parent / "collapse.md").read_text()
    verdict = page[: page.index("## Stage C:")]
    verdict = verdict[verdict.index("> **Verdict (issue 26") :]
    report = (COMMITTED_RUNS / "study_c" / "collapse_stats.md").read_text()
    report += (COMMITTED_RUNS / "study" / "collapse_stats.md").read_text()
    intervals = re.findall(r"\[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]", verdict)
    # p-values are rounded in the verdict: each must be the report's, to the digits it gives
    p_values = re.findall(r"(?:p =|Holm|Holm-adjusted) (0\.\d+)", verdict)
    assert len(intervals) >= 10 and len(p_values) >= 8  # the check cannot pass on an empty match
    for interval in intervals:
        assert interval in report, interval
    reported = re.findall(r"0\.\d+", report)
    for p in p_values:
        assert any(r.startswith(p) or f"{float(r):.{len(p) - 2}f}" == p for r in reported), p


# --------------------------------------------------------------------------------------------------
# Stage C (--study stage-c) on hand-made runs: partial, as while the study runs


CRASH = (curve((50.0, 60), (0.0, 140)), curve((1.5, 60), (0.05, 140)))  # collapses at index 66
GOOD = (curve((50.0, 200)), HIGH)
DIP = (curve((50.0, 60), (0.0, 15), (50.0, 125)), HIGH)  # a reward collapse that recovers
CONFIDENT = (curve((50.0, 200)), curve((1.5, 100), (0.1, 100)))  # the old entropy criterion's


@pytest.fixture
def stage_c(tmp_path):
    """Procedural seeds 11-13 of every arm and a killed bn seed 14; photos seeds 11-12. BN
    collapses (both definitions); MDR(2,1) learns; BN with 2 epochs dips and recovers in seed 11;
    MDR(1,2) is a confident good policy (flagged by the old definition only), its AUC 2, 1 and 0
    points below MDR(2,1)'s."""
    study = tmp_path / "study_c"
    for seed in (11, 12, 13):
        write_stage_c_run(study, "procedural", "bn", seed, *CRASH)
        write_stage_c_run(study, "procedural", "bn-e2", seed, *(DIP if seed == 11 else GOOD))
        write_stage_c_run(study, "procedural", "bn-mdr21", seed, GOOD[0] + seed - 11, HIGH)
        rewards = CONFIDENT[0] + 2 * (seed - 12)  # MDR(2,1) minus 2, 1, 0
        write_stage_c_run(study, "procedural", "bn-mdr12", seed, rewards, CONFIDENT[1])
    write_stage_c_run(study, "procedural", "bn", 14, *CRASH, summary=False)
    for seed in (11, 12):
        write_stage_c_run(study, "photos", "bn", seed, *CRASH)
        write_stage_c_run(study, "photos", "bn-mdr21", seed, *GOOD)
    return study


def stage_c_report(study, out_dir, capsys=None) -> str:
    assert cs.main(["--runs-dir", str(study), "--study", "stage-c", "--out-dir", str(out_dir)]) == 0
    return (out_dir / "collapse_stats.md").read_text()


def table_row(report: str, section: str, first_cell: str, skip: int = 0) -> list:
    """The cells of the row starting with first_cell in the first table after `section` (the
    skip + 1-th such row)."""
    after = report[report.index(section) :]
    for line in after.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] == first_cell:
            if not skip:
                return cells
            skip -= 1
    raise AssertionError(f"no row {first_cell} after {section}")


def test_stage_c_reports_partial_data_with_its_complete_pairs(stage_c, tmp_path, capsys, drawn):
    report = stage_c_report(stage_c, tmp_path / "out")

    assert report.startswith(f"# Stage C: collapse statistics of {stage_c}\n")
    assert "Revised definition (primary): Collapse:" in report
    assert "Old definition (the first study's, beside it in every table): Collapse:" in report
    assert "Provenance of the 16 runs: 16 from commit aaaaaaa, AMD EPYC, torch 2.14.1.\n" in report
    assert (
        "Finished runs: 12 of the plan's 64 (bn 3/16, bn-e2 3/16, bn-mdr21 3/16, bn-mdr12 3/16). "
        "Not finished or failed, not analysed: `procedural/bn_bnm0.1_s14` (unfinished). Seeds "
        "finished in every arm: 3 of 16 (11-13)."
    ) in report
    assert "Finished runs: 4 of the plan's 16 (bn 2/8, bn-mdr21 2/8)." in report
    # the primary test: BN only collapsed in all 3 pairs, p = 2 x 0.5^3
    assert table_row(report, "### Primary test", "revised (primary)") == [
        "revised (primary)",
        "3",
        "0 / 3",
        "0.25",
        "not resolved",
    ]
    # S3: differences -2, -1, 0 (mean -1, se 1/sqrt(3)): far inside +-10, equivalent after Holm
    s3 = table_row(report, "### Secondary tests", "S3: AUC bn-mdr12 − bn-mdr21")
    assert (
        s3[2] == "3"
        and s3[3].startswith("-1.0 [")
        and s3[-1] == ("MDR(1,2) and MDR(2,1) are equivalent")
    )
    tost = cs.tost_paired([-2.0, -1.0, 0.0], [0.0] * 3, 10.0, 0.05)
    assert s3[6] == f"{tost['p']:.3g}" and s3[7] == "0.01667"  # the smallest p: 0.05 / 3
    # S1: MDR(2,1) minus BN 2 epochs, AUC differences (50 - 46.25, 51 - 50, 52 - 50): the sign-flip
    # test of 3 positive differences is 2/8 at best
    s1 = table_row(report, "### Secondary tests", "S1: AUC bn-mdr21 − bn-e2")
    assert s1[6] == "0.25" and s1[-1] == "not resolved"
    # MDR(1,2)'s confident policy: a collapse under the old definition only
    mdr12 = table_row(report, "### Arms", "bn-mdr12")
    assert mdr12[1:6] == ["3", "0", "0.00 [0.00, 0.71]", "3", "1.00 [0.29, 1.00]"]
    # the dip of BN with 2 epochs recovered; BN never did, and ended collapsed
    assert table_row(report, "### Recovery", "bn-e2")[2:8] == [
        "0",
        "0 [0-10]",  # the median of 10, 0, 0
        "1",
        "1",
        "12 [12-12]",
        "0",
    ]
    bn = table_row(report, "### Recovery", "bn")
    assert bn[2] == "3" and bn[4:8] == ["3", "0", "–", "3 (after 134 [134-134])"]
    assert (
        "| `procedural/bn-e2_bnm0.1_s11` | yes, update 68 (reward) | yes, update 68 (reward) "
        "| yes, after 12 updates |" in report
    )
    # photos: a family of its own
    photos = report[report.index("## Real photographs") :]
    assert table_row(photos, "### Primary test", "revised (primary)")[1:4] == ["2", "0 / 2", "0.5"]
    assert "### Secondary tests" not in photos
    # the figures: both families, the paired differences of every comparison
    (proc_title, proc_cells), (photo_title, _) = drawn["collapse_stats.png"][0][0]
    assert (proc_title, photo_title) == ("Procedural images", "Real photographs")
    assert [label for label, _, _ in proc_cells] == [
        "BN",
        "BN, 2 epochs",
        "BN+MDR(2,1)",
        "BN+MDR(1,2)",
    ]
    panels = drawn["collapse_paired.png"][0][0]
    assert [len(comparisons) for _, comparisons in panels] == [5, 1]
    assert list(panels[0][1][3][1]) == pytest.approx([3.75, 1.0, 2.0])  # S1's, one per seed
    assert len(drawn["collapse_fig6.png"][0][0]) == 16
    printed = capsys.readouterr().out
    assert (
        "Procedural images: finished runs 12; primary McNemar bn-mdr21 vs bn (revised): p = 0.25"
        in printed
    )


@pytest.mark.parametrize("killed", [True, False])
def test_stage_c_with_no_finished_run_writes_the_report_only(tmp_path, drawn, killed):
    # a study under way (one run killed) or not begun (the plan alone)
    (tmp_path / "study_c").mkdir()
    (tmp_path / "study_c" / "PLAN.md").write_text("the plan")
    if killed:
        write_stage_c_run(tmp_path / "study_c", "procedural", "bn", 11, *CRASH, summary=False)

    report = stage_c_report(tmp_path / "study_c", tmp_path / "out")

    assert "No finished runs yet." in report and "Finished runs: 0 of the plan's 64" in report
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["collapse_stats.md"]
    assert drawn == {}


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda study: write_stage_c_run(
                study, "procedural", "bn-e2", 14, *GOOD, provenance={**PROVENANCE, "cpu": "Intel"}
            ),
            "error: runs that are paired come from different commits or machines: ",
        ),
        (
            lambda study: write_full_run(study / "procedural" / "gn_s11", "gn", 11, *GOOD),
            "error: procedural/gn_s11: --mode gn with 3 train-mode and 0 eval-mode epochs is not",
        ),
        (
            lambda study: write_stage_c_run(study, "photos", "bn", 19, *GOOD),
            "error: photos/bn_bnm0.1_s19: seed 19 is not one of the plan's photos seeds (11-18)",
        ),
    ],
)
def test_stage_c_bad_runs_are_one_line_errors_and_nothing_is_written(
    stage_c, monkeypatch, capsys, damage, message
):
    damage(stage_c)

    args = ("--runs-dir", "study_c", "--study", "stage-c", "--out-dir", "out")
    status, err = run_cli(stage_c.parent, monkeypatch, capsys, *args)

    assert status == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (stage_c.parent / "out").exists()


def test_stage_c_refuses_the_old_definition_as_primary(stage_c, tmp_path):
    with pytest.raises(cs.ConfigError, match="the plan's primary definition is the revised one"):
        cs.main(
            [
                "--runs-dir",
                str(stage_c),
                "--study",
                "stage-c",
                "--out-dir",
                str(tmp_path / "o"),
                "--definition",
                "old",
            ]
        )
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# The dropout study (docs/dropout/PLAN.md), Study 1: the fluctuation measure, by hand


def test_fluctuation_after_learning_started_computed_by_hand():
    # smoothed 20, 30, 26.67 (best 20 >= 10 from the first update): changes 10 and 10/3
    assert cs.fluctuation([20.0, 40.0, 20.0]) == pytest.approx(20 / 3)
    # 10 zeros, then 100s: the moving average climbs 10, 20, ..., 100, then stays; learning starts
    # at 10 (the 11th update): 9 changes of 10 and 2 of 0 after it, none before
    rising = [0.0] * 10 + [100.0] * 12
    assert cs.fluctuation(rising) == pytest.approx(90 / 11)


def test_fluctuation_skips_updates_without_a_finished_episode():
    rising = [0.0] * 10 + [100.0] * 12
    with_gaps = rising[:12] + [NAN, NAN] + rising[12:16] + [NAN] + rising[16:] + [NAN]

    assert cs.fluctuation(with_gaps) == pytest.approx(90 / 11)
    # a NaN before learning started changes nothing either
    assert cs.fluctuation([NAN, 20.0, NAN, 40.0, 20.0]) == pytest.approx(20 / 3)


@pytest.mark.parametrize(
    "rewards",
    [
        [5.0] * 30,  # never reaches 10 % of optimal
        [0.0] * 10 + [100.0],  # reaches it at its last update: no change after it
        [NAN] * 5,  # no episode ever finished
    ],
)
def test_a_run_that_never_started_learning_has_no_fluctuation(rewards):
    assert math.isnan(cs.fluctuation(rewards))


# --------------------------------------------------------------------------------------------------
# Study 1's tests: the Holm family D1-D4 and the Step 2 rule


class StubFamily:
    """What the dropout tests read of a Family: its p and paired values."""

    p = 0.1

    def __init__(self, values):
        self.data = values

    def values(self, arm, other, outcome):
        return self.data[(arm, other, outcome)]


def test_the_holm_family_of_four_in_the_order_of_its_p_values():
    data = {
        # D1: 8 differences of -10: sign-flip p = 2 / 2^8, below alpha / 4
        ("dropout p0.1", "none", "auc"): ([1.0] * 8, [11.0] * 8),
        # D2: +5, +5, +5, -1: |sum| >= 14 in 4 of 16 assignments
        ("dropout-mdr p0.1", "none", "auc"): ([5.0, 5.0, 5.0, -1.0], [0.0] * 4),
        # D3: one run never learned (NaN): 3 pairs, all positive, p = 2 / 8
        ("dropout p0.1", "none", "fluctuation"): ([2.0, 2.0, 2.0, 2.0], [1.0, 1.5, NAN, 0.5]),
        # D4: -1, -1, +1, +1: sum 0, p = 1
        ("dropout-mdr p0.1", "dropout p0.1", "fluctuation"): ([0.0, 0.0, 2.0, 2.0], [1.0] * 4),
    }

    results = cs.dropout_secondary(StubFamily(data))

    assert [r["name"] for r in results] == ["D1", "D2", "D3", "D4"]
    assert [r["p"] for r in results] == pytest.approx([2 / 256, 0.25, 0.25, 1.0])
    assert [r["pairs"] for r in results] == [8, 4, 3, 4]
    # Holm: the smallest p against 0.05 / 4, the tie in the given order, the largest against 0.05
    assert [r["level"] for r in results] == pytest.approx([0.0125, 0.05 / 3, 0.025, 0.05])
    assert [r["adjusted"] for r in results] == pytest.approx([4 / 128, 0.75, 0.75, 1.0])
    assert [r["called"] for r in results] == [
        "dropout underperforms no normalization",  # negative, the claim's sign
        "not resolved",
        "not resolved",
        "not resolved",
    ]
    # the same p with the other sign is a result against the paper
    data[("dropout p0.1", "none", "auc")] = ([11.0] * 8, [1.0] * 8)
    assert cs.dropout_secondary(StubFamily(data))[0]["called"] == "significant, against it"


def test_the_primary_sign_flip_p_value_of_a_tiny_example():
    # differences +1, +2, +3: of the 8 sign assignments only +++ and --- reach |sum| 6
    data = {("dropout-mdr p0.1", "dropout p0.1", "auc"): ([11.0, 12.0, 13.0], [10.0] * 3)}

    result = cs.dropout_primary(StubFamily(data))

    assert result["p"] == pytest.approx(0.25) and result["pairs"] == 3
    assert result["bootstrap"][0] == pytest.approx(2.0) and result["called"] == "not resolved"


@pytest.mark.parametrize(
    "dropout_vs_none, mdr_vs_dropout, pairs, must_run, start",
    [
        ((-5.0, -8.0, -2.0), (4.0, 1.0, 7.0), 12, False, "Step 2 need not run"),
        ((-5.0, -8.0, 0.5), (4.0, 1.0, 7.0), 12, True, "Step 2 must run"),  # crosses 0
        ((-5.0, -8.0, -2.0), (4.0, -0.1, 7.0), 12, True, "Step 2 must run"),
        ((-5.0, -8.0, -2.0), (4.0, 1.0, 7.0), 6, False, "Provisional, Step 1 has 6 of 12"),
        ((-5.0, NAN, NAN), (4.0, NAN, NAN), 1, None, "Step 2: not yet decidable"),
    ],
)
def test_the_step_2_rule(dropout_vs_none, mdr_vs_dropout, pairs, must_run, start):
    decision, text = cs.step2_decision(dropout_vs_none, mdr_vs_dropout, pairs)

    assert decision is must_run and text.startswith(start)
    if pairs == 6:
        assert "Step 2 need not run" in text


# --------------------------------------------------------------------------------------------------
# Study 1 on the command line, on hand-made runs


FLAT = curve((1.5, 200))


def stability_report(study: Path, out: Path) -> str:
    """Study 1's report of the runs in `study`, written by the command line into `out`."""
    assert cs.main(["--study", "dropout", "--runs-dir", str(study), "--out-dir", str(out)]) == 0
    return (out / "stability.md").read_text()


@pytest.fixture
def dropout_study(tmp_path):
    """Seeds 31-33: none at 50, dropout at 40, 41, 42, dropout-mdr 1, 2, 3 above it (p 0.1);
    p 0.2 at seeds 31-32 only; a killed dropout run (seed 34) and a none run that never learns
    (seed 34)."""
    study = tmp_path / "study"
    for index, seed in enumerate((31, 32, 33)):
        write_dropout_run(study, "none", seed, curve((50.0, 200)), FLAT)
        write_dropout_run(study, "dropout", seed, curve((40.0 + index, 200)), FLAT)
        write_dropout_run(study, "dropout-mdr", seed, curve((41.0 + 2 * index, 200)), FLAT)
    for seed in (31, 32):
        write_dropout_run(study, "dropout", seed, curve((30.0, 200)), FLAT, p=0.2)
        write_dropout_run(study, "dropout-mdr", seed, curve((45.0, 200)), FLAT, p=0.2)
    write_dropout_run(study, "dropout", 34, curve((40.0, 50)), FLAT[:50], summary=False)
    write_dropout_run(study, "none", 34, curve((5.0, 200)), FLAT)
    return study


def test_the_dropout_study_reports_both_probabilities_apart(dropout_study, tmp_path, drawn):
    report = stability_report(dropout_study, tmp_path / "o")

    assert report.startswith(f"# Dropout, Study 1 (stability): statistics of {dropout_study}\n")
    assert (
        "Step 1 (p 0.1): 10 of the plan's 36 runs finished (none 4/12, dropout p0.1 3/12, "
        "dropout-mdr p0.1 3/12); seeds finished in every arm: 3 of 12 (31-33)."
    ) in report
    assert "Step 2 (p 0.2): 4 of the plan's 24 runs finished (dropout p0.2 2/12" in report
    assert "Not finished or failed, not analysed (1): `dropout_p0.1_s34` (unfinished)." in report
    assert "Never started learning, no fluctuation value (1): `none_s34`." in report
    # p 0.2 has 2 complete seeds: the caution
    assert "⚠ Caution: fewer than 3 seeds are finished in every arm (2 at the fewest)" in report
    # the primary test: differences +1, +2, +3, p = 2/8
    primary = table_row(report, "### Primary test", "AUC dropout-mdr p0.1 − dropout p0.1")
    assert primary[1:3] == ["3", "+2.0 [+1.0, +3.0]"] and primary[4:] == ["0.25", "not resolved"]
    # p 0.2 kept apart: its own differences (+15, 2 pairs), never pooled with p 0.1's
    at_p02 = report[report.index("## p 0.2 (Step 2)") :]
    row = table_row(
        at_p02, "### The primary comparison at p 0.2", "AUC dropout-mdr p0.2 − dropout p0.2"
    )
    assert row[1:3] == ["2", "+15.0 [+15.0, +15.0] ⚠ only 2 seeds"]
    d1 = table_row(report, "### Secondary tests", "D1: AUC dropout p0.1 − none")
    assert d1[2:4] == ["3", "-9.0 [-10.0, -8.0]"] and d1[6] == "0.25"
    # flat curves: fluctuation 0 in every run that learned
    assert table_row(report, "### Arms", "none")[-1] == "0.00 [0.00-0.00] (1 never learned)"
    # the Step 2 rule, provisional: dropout − none [-10, -8] < 0, mdr − dropout [+1, +3] > 0
    assert (
        "Provisional, Step 1 has 3 of 12 seeds in every arm (the plan decides on the complete "
        "Step 1): Step 2 need not run: Step 1 resolves both of the paper's claims (ΔAUC dropout "
        "− none [-10.0, -8.0], dropout-mdr − dropout [+1.0, +3.0])."
    ) in report
    rows = drawn["stability_rewards.png"][0][0]
    assert [(title, [label for label, *_ in cells]) for title, cells in rows] == [
        ("p 0.1", ["none", "dropout p0.1", "dropout-mdr p0.1"]),
        ("p 0.2", ["none", "dropout p0.2", "dropout-mdr p0.2"]),
    ]
    fluctuation_panels = drawn["stability_fluctuation.png"][0][0]
    assert [len(values) for _, values, _ in fluctuation_panels[0][1]] == [3, 3, 3]  # 1 left out
    assert sorted(drawn) == [
        "stability_fluctuation.png",
        "stability_paired.png",
        "stability_rewards.png",
    ]


def write_hosts(folder: Path, *records) -> None:
    lines = [json.dumps({"started": "2026-12-04T05:00:00Z", **record}) for record in records]
    (folder / "hosts.jsonl").write_text("\n".join(lines) + "\n")


def test_the_within_kind_sensitivity_repeats_study_1_over_single_kind_seeds(tmp_path, drawn):
    """The plan's entry of 2026-12-04. Seeds 31-36, dropout-mdr − dropout = +1 ... +6 (all
    pairs: p = 2/64, called). Left out: seed 32 (dropout resumed, its first start unrecorded and
    unchecked) and seed 36 (dropout-mdr on another kind). none_s31 has no hosts.jsonl, but a rerun
    reproduced it (cpu_kinds.jsonl), so seed 31 stays. Primary over seeds 31, 33-35: +1, +3, +4,
    +5, p = 2/16, not resolved: the call that differs is named."""
    study = tmp_path / "study"
    twice = [{"from_iteration": 1, **PROVENANCE}, {"from_iteration": 100, **PROVENANCE}]
    for index, seed in enumerate(range(31, 37)):
        for arm, level in (
            ("none", 50.0),
            ("dropout", 40.0 + index),
            ("dropout-mdr", 41.0 + 2 * index),
        ):
            extra = {"segments": twice} if (arm, seed) == ("dropout", 32) else {}
            folder = write_dropout_run(study, arm, seed, curve((level, 200)), FLAT, **extra)
            if (arm, seed) != ("none", 31):
                write_hosts(folder, ZEN3 if (arm, seed) == ("dropout-mdr", 36) else ZEN4)
    check = kind_check("stability/none_s31", True, ZEN4)
    (study / "cpu_kinds.jsonl").write_text(json.dumps(check) + "\n")
    report = stability_report(study, tmp_path / "o")

    section = report[report.index("### Within-kind sensitivity") : report.index("### Arms")]
    # the verdicts are the all-pairs tests: the primary is called there
    primary = table_row(report, "### Primary test", "AUC dropout-mdr p0.1 − dropout p0.1")
    assert primary[1] == "6" and primary[4:] == [
        "0.0312",
        "Dropout+MDR is more stable than dropout",
    ]
    row = table_row(section, "| test", "primary: AUC dropout-mdr p0.1 − dropout p0.1")
    assert row[1:4] == ["6 → 4", "+3.2 [+1.8, +4.5]", "0.125"]
    assert row[5:] == ["not resolved", "Dropout+MDR is more stable than dropout"]
    # D1 (dropout − none) loses seed 32 only, D2 (dropout-mdr − none) seed 36 only: Holm of 4
    d1 = table_row(section, "| test", "D1: AUC dropout p0.1 − none")
    assert d1[1] == "6 → 5" and d1[3:5] == ["0.0625", "0.25"]
    assert table_row(section, "| test", "D2: AUC dropout-mdr p0.1 − none")[1] == "6 → 5"
    assert "Kinds of the kept pairs' runs: family 25 model 17 (AVX512): 16 runs." in section
    assert (
        "First starts checked by rerunning their first updates (cpu_kinds.jsonl, "
        "sweeps/check_cpu_kind.py): `none_s31` reproduced on family 25 model 17 (AVX512)."
    ) in section
    assert (
        "- dropout-mdr p0.1 vs dropout p0.1: seed 32 (`dropout_p0.1_s32`: start 1 of 2 unrecorded "
        "and not checked (cpu_kinds.jsonl)); seed 36 (its runs ran on family 25 model 1 (AVX2) "
        "and family 25 model 17 (AVX512))"
    ) in section
    assert (
        "Calls that differ from all pairs': primary (all pairs: Dropout+MDR is more stable than "
        "dropout; single-kind: not resolved)."
    ) in section


def test_the_within_kind_sensitivity_of_runs_without_any_record(dropout_study, tmp_path, drawn):
    """Runs whose starts nothing records (no hosts.jsonl, CPU strings without a kind): every seed
    is left out, with its reason, and the single-kind tests are not computable."""
    report = stability_report(dropout_study, tmp_path / "o")

    section = report[report.index("### Within-kind sensitivity") : report.index("### Arms")]
    row = table_row(section, "| test", "primary: AUC dropout-mdr p0.1 − dropout p0.1")
    assert row[1] == "3 → 0" and row[5:] == ["not yet computable", "not resolved"]
    assert "Kinds of the kept pairs' runs: none." in section
    assert "seed 31 (`dropout-mdr_p0.1_s31`: start 1 of 1 unrecorded and not checked" in section


def test_the_within_kind_sensitivity_of_study_2(tmp_path, drawn):
    """Gaps: none 20, dropout 10, dropout-mdr 10 ± 0.5 at seeds 1-8, every start recorded; seed
    8's dropout ran on another kind. Single-kind: 7 pairs for the two comparisons with dropout
    (sign-flip p = 2/2^7), 8 for dropout-mdr − none (2/2^8); Holm's step-down: 3 x 2/2^8 = 0.0234
    for the smallest, then 2 x 2/2^7 = 0.0312."""
    study = tmp_path / "generalization"
    for seed in range(1, 9):
        mdr = 10.0 + (0.5 if seed % 2 else -0.5)
        for arm, gap in (("none", 20.0), ("dropout", 10.0), ("dropout-mdr", mdr)):
            folder = write_gen_run(study / f"{arm}_s{seed}", arm, seed, [5.0] * 3, [gap] * 3)
            write_hosts(folder, ZEN3 if (arm, seed) == ("dropout", 8) else ZEN4)
    args = ["--study", "dropout-gen", "--runs-dir", str(study), "--out-dir", str(tmp_path / "o")]
    assert cs.main(args) == 0
    report = (tmp_path / "o" / "generalization.md").read_text()

    section = report[report.index("## Within-kind sensitivity") : report.index("## Runs")]
    row = table_row(section, "| difference", "gap dropout p0.1 − none")
    assert row[1:5] == ["8 → 7", "-10.0 [-10.0, -10.0]", "0.0156", "p = 0.0312, rejected"]
    row = table_row(section, "| difference", "gap dropout-mdr p0.1 − none")
    assert row[1] == "8 → 8" and row[4] == "p = 0.0234, rejected"
    row = table_row(section, "| difference", "gap dropout-mdr p0.1 − dropout p0.1")
    assert row[1] == "8 → 7" and row[5].endswith(": equivalent")
    assert "- dropout p0.1 vs none: seed 8 (its runs ran on family 25 model 1 (AVX2) and" in section
    assert "Kinds of the kept pairs' runs: family 25 model 17 (AVX512): 23 runs." in section
    assert "Every call (Holm, TOST) is the same as over all pairs." in section


def test_a_within_kind_call_that_differs_is_named_under_the_tests(tmp_path, drawn):
    """Study 1: the primary is called over seeds 31-36, and the single-kind sentence sits right
    under the secondary tests. Study 2: dropout ran seeds 1-5 on another kind than none and
    dropout-mdr, so dropout − none keeps seeds 6-8 (p = 2/8, Holm 2 x 0.25 = 0.5: kept) against 8
    pairs (rejected): the call that differs is named under the paired differences, with both
    calls. dropout-mdr − dropout (3 pairs, p = 1) is not rejected in either: not named."""
    study = tmp_path / "study"
    for index, seed in enumerate(range(31, 37)):
        for arm, level in (("none", 50.0), ("dropout", 40.0), ("dropout-mdr", 41.0 + index)):
            folder = write_dropout_run(study, arm, seed, curve((level, 200)), FLAT)
            write_hosts(folder, ZEN3 if (arm, seed) == ("dropout", 31) else ZEN4)
    report = stability_report(study, tmp_path / "o")
    tests = report[report.index("### Secondary tests") : report.index("### Within-kind")]
    assert tests.rstrip().endswith(
        "Within-kind sensitivity (5 pairs at the fewest): Calls that differ from all pairs': "
        "primary (all pairs: Dropout+MDR is more stable than dropout; single-kind: not "
        "resolved)."
    )

    gen = tmp_path / "generalization"
    for seed in range(1, 9):
        for arm, gap in (("none", 20.0), ("dropout", 10.0), ("dropout-mdr", 10.0 + seed % 2)):
            folder = write_gen_run(gen / f"{arm}_s{seed}", arm, seed, [5.0] * 3, [gap] * 3)
            write_hosts(folder, ZEN3 if arm == "dropout" and seed <= 5 else ZEN4)
    args = ["--study", "dropout-gen", "--runs-dir", str(gen), "--out-dir", str(tmp_path / "g")]
    assert cs.main(args) == 0
    report = (tmp_path / "g" / "generalization.md").read_text()
    differences = report[report.index("## Paired differences") : report.index("## Within-kind")]
    assert differences.rstrip().endswith(
        "Within-kind sensitivity (3 pairs at the fewest): Calls that differ from all pairs': "
        "gap dropout p0.1 − none (all pairs: Holm p = 0.0234, rejected at Δ -10.0; single-kind: "
        "Holm p = 0.5, kept at Δ -10.0)."
    )


def test_a_check_that_did_not_reproduce_a_first_start_leaves_its_seed_out(tmp_path, drawn):
    """none_s31 has no hosts.jsonl and its rerun differed on Zen 4: its kind is unknown, so seed
    31 leaves the sensitivity, and the report says the check did not reproduce it."""
    study = tmp_path / "study"
    for seed in (31, 32):
        for arm, level in (("none", 50.0), ("dropout", 40.0), ("dropout-mdr", 42.0)):
            folder = write_dropout_run(study, arm, seed, curve((level, 200)), FLAT)
            if (arm, seed) != ("none", 31):
                write_hosts(folder, ZEN4)
    check = kind_check("stability/none_s31", False, ZEN4)
    (study / "cpu_kinds.jsonl").write_text(json.dumps(check) + "\n")
    report = stability_report(study, tmp_path / "o")

    section = report[report.index("### Within-kind sensitivity") : report.index("### Arms")]
    assert "`none_s31` not reproduced on family 25 model 17 (AVX512)." in section
    assert (
        "- dropout p0.1 vs none: seed 31 (`none_s31`: its first start is unrecorded, and its "
        "first 3 updates rerun on family 25 model 17 (AVX512) differ (cpu_kinds.jsonl))"
    ) in section
    assert table_row(section, "| test", "D1: AUC dropout p0.1 − none")[1] == "2 → 1"
    assert table_row(section, "| test", "primary: AUC dropout-mdr p0.1 − dropout p0.1")[1] == (
        "2 → 2"
    )


def test_a_corrupt_kind_check_file_stops_the_report_in_one_line(tmp_path, capsys, drawn):
    study = tmp_path / "study"
    write_dropout_run(study, "none", 31, curve((50.0, 200)), FLAT)
    (study / "cpu_kinds.jsonl").write_text('{"run": "stability/none_s31"}\n')
    args = ["--study", "dropout", "--runs-dir", str(study), "--out-dir", str(tmp_path / "o")]
    assert cs.run(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: {study / 'cpu_kinds.jsonl'}: a line is not a record of sweeps/check_cpu_kind.py "
        "(run, same, commit, host)"
    ]
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_the_dropout_study_not_begun_writes_its_report_only(tmp_path, drawn):
    (tmp_path / "study").mkdir()
    args = ["--study", "dropout", "--runs-dir", str(tmp_path / "study")]
    assert cs.main(args + ["--out-dir", str(tmp_path / "o")]) == 0

    report = (tmp_path / "o" / "stability.md").read_text()
    assert "No finished runs yet." in report and "Step 2: not yet decidable" in report
    assert sorted(path.name for path in (tmp_path / "o").iterdir()) == ["stability.md"]
    assert drawn == {}


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--cell", "p=0.1"],
            "error: --study dropout runs the plan's analysis of every run; --cell",
        ),
        (["--definition", "old"], "error: --study dropout --definition old: the plan's primary"),
    ],
)
def test_the_dropout_study_refuses_cell_selection(
    dropout_study, tmp_path, monkeypatch, capsys, extra, message
):
    args = ("--study", "dropout", "--runs-dir", "study", "--out-dir", "out", *extra)
    status, err = run_cli(tmp_path, monkeypatch, capsys, *args)

    assert status == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_gen_runs_dir_without_the_dropout_study_is_refused(tmp_path, monkeypatch, capsys):
    args = ("--runs-dir", ".", "--gen-runs-dir", ".", "--out-dir", "out")
    status, err = run_cli(tmp_path, monkeypatch, capsys, *args)

    assert status == 2 and err == "error: --gen-runs-dir: only with --study dropout\n"


# --------------------------------------------------------------------------------------------------
# Study 2: the held-out gap of ppo_patchloc_mdr.py runs (TensorBoard events), by hand


@pytest.fixture
def gen_study(tmp_path):
    """Seeds 1-3: held-out 10, 20, 30, 40 in every run; the gaps' last 3 evaluations average to
    20 + seed (none), 10 + seed (dropout), 10 + seed + 0, +1, -1 (dropout-mdr); a killed run and
    one with 2 evaluations only."""
    study = tmp_path / "generalization"
    held_out = [10.0, 20.0, 30.0, 40.0]
    for index, seed in enumerate((1, 2, 3)):
        shift = (0.0, 1.0, -1.0)[index]
        # the last 3: g - 2, g, g + 2 average to g; the first (50) is left out
        for arm, g in (("none", 20.0 + seed), ("dropout", 10.0 + seed)):
            write_gen_run(study / f"{arm}_s{seed}", arm, seed, held_out, [50.0, g - 2, g, g + 2])
        g = 10.0 + seed + shift
        write_gen_run(
            study / f"mdr_s{seed}", "dropout-mdr", seed, held_out, [50.0, g - 2, g, g + 2]
        )
    write_gen_run(study / "none_s4", "none", 4, held_out[:2], [1.0, 2.0], summary=False)
    write_gen_run(study / "dropout_s4", "dropout", 4, held_out[:2], [1.0, 2.0])
    return study


def test_generalization_runs_carry_their_hosts_jsonl(gen_study):
    """Study 2's patch-loc runs are queued too: their hosts.jsonl is read as the probe runs' is
    (tests/test_collapse_runs.py), and a corrupt one skips the run, naming the file."""
    record = {"model_name": "AMD EPYC", "cpu_family": "25", "torch_cpu_capability": "AVX2"}
    (gen_study / "none_s1" / "hosts.jsonl").write_text(json.dumps(record) + "\n")
    (gen_study / "none_s2" / "hosts.jsonl").write_text("not json\n")

    runs, skipped = cs.read_gen_runs(str(gen_study), "--gen-runs-dir")

    hosts = {run["name"]: run["hosts"] for run in runs}
    assert hosts["none_s1"] == [record] and hosts["dropout_s1"] == []
    assert "none_s2" not in hosts
    assert [reason.split(": ")[0] for reason in skipped] == [
        str(gen_study / "none_s2" / "hosts.jsonl")
    ]


def test_the_generalization_gap_computed_by_hand(gen_study, tmp_path, drawn):
    args = [
        "--study",
        "dropout-gen",
        "--runs-dir",
        str(gen_study),
        "--out-dir",
        str(tmp_path / "o"),
    ]
    assert cs.main(args) == 0
    report = (tmp_path / "o" / "generalization.md").read_text()

    assert "Not finished or failed, not analysed (1): `none_s4` (unfinished)." in report
    assert "Fewer than 3 held-out evaluations, no final gap: `dropout_s4`." in report
    assert "With 3 pairs the sign-flip test cannot go below p = 0.25" in report
    # none seed 1: gap 21; training tasks = held-out + gap, last 3: (39 + 51 + 63) / 3
    assert table_row(report, "## Runs", "`none_s1`")[3:] == [
        "4",
        "51.0",
        "30.0",
        "21.0",
        "unknown: start 1 of 1 unrecorded and not checked (cpu_kinds.jsonl)",
    ]
    assert table_row(report, "## Arms", "none")[1:] == [
        "3",
        "52.0 [51.0, 53.0]",
        "30.0 [30.0, 30.0]",
        "22.0 [21.0, 23.0]",
    ]
    # dropout − none: -10 in every pair; dropout-mdr − dropout: 0, +1, -1 (sum 0: p = 1)
    row = table_row(report, "## Paired differences", "gap dropout p0.1 − none")
    assert row[1:4] == ["3", "-10.0 [-10.0, -10.0]", "0.25"]
    row = table_row(report, "## Paired differences", "gap dropout-mdr p0.1 − dropout p0.1")
    tost = cs.tost_paired([0.0, 1.0, -1.0], [0.0] * 3, 5.0, 0.05)
    assert row[1:4] == ["3", "+0.0 [-1.0, +1.0]", "1"] and row[4] == "p = 1, kept"
    assert row[5] == f"p = {tost['p']:.3g}, [{tost['low']:+.1f}, {tost['high']:+.1f}]: equivalent"
    assert tost["p"] < 0.05 and tost["high"] < 5.0
    panels = drawn["generalization_curves.png"][0][0]
    assert [(arm, len(runs)) for arm, runs in panels] == [
        ("none", 3),
        ("dropout p0.1", 4),
        ("dropout-mdr p0.1", 3),
    ]
    steps, train, held = panels[0][1][0]
    assert list(steps) == [600, 1200, 1800, 2400] and list(train) == [60.0, 39.0, 51.0, 63.0]


def test_with_eight_pairs_study_2_tests_its_three_differences_with_holm(tmp_path, drawn):
    """Gaps: none 20, dropout and dropout-mdr 10 (+0.5, -0.5 alternating for dropout-mdr): two
    differences -10 in all 8 pairs (sign-flip p = 2 / 2^8), one that cancels (p = 1)."""
    study = tmp_path / "generalization"
    for seed in range(1, 9):
        mdr = 10.0 + (0.5 if seed % 2 else -0.5)
        for arm, gap in (("none", 20.0), ("dropout", 10.0), ("dropout-mdr", mdr)):
            write_gen_run(study / f"{arm}_s{seed}", arm, seed, [5.0] * 3, [gap] * 3)
    args = ["--study", "dropout-gen", "--runs-dir", str(study), "--out-dir", str(tmp_path / "o")]
    assert cs.main(args) == 0
    report = (tmp_path / "o" / "generalization.md").read_text()

    assert "With 8 pairs the sign-flip test can reach p = 0.00781: the three Δgap" in report
    # Holm: 0.0078 <= 0.05/3 and 0.0078 <= 0.05/2 rejected, 1 > 0.05 kept; adjusted 3p, 3p, 1
    row = table_row(report, "## Paired differences", "gap dropout p0.1 − none")
    assert row[3] == "0.00781" and row[4] == "p = 0.0234, rejected"
    row = table_row(report, "## Paired differences", "gap dropout-mdr p0.1 − none")
    assert row[4] == "p = 0.0234, rejected"
    row = table_row(report, "## Paired differences", "gap dropout-mdr p0.1 − dropout p0.1")
    assert row[2].startswith("+0.0 [") and row[3] == "1" and row[4] == "p = 1, kept"
    assert row[5].endswith(": equivalent")  # the TOST beside it


def gen_arms(study: Path, seeds, gaps=None, hosts=None, **kw) -> None:
    """The three arms at `seeds`, 3 evaluations each, held-out 5 and gap gaps[arm] (none 20,
    dropout 10, dropout-mdr 10 by default); hosts(arm, seed): the hosts.jsonl record or None."""
    gaps = gaps or {"none": 20.0, "dropout": 10.0, "dropout-mdr": 10.0}
    for seed in seeds:
        for arm, gap in gaps.items():
            folder = write_gen_run(study / f"{arm}_s{seed}", arm, seed, [5.0] * 3, [gap] * 3, **kw)
            record = hosts(arm, seed) if hosts else None
            if record:
                write_hosts(folder, record)


def test_with_six_pairs_no_difference_can_survive_holm(tmp_path, drawn):
    """6 pairs reach sign-flip p = 2 / 2^6 = 0.03125 < 0.05, but not Holm's smallest level 0.05/3:
    the report describes; the TOST is still given at 0.05."""
    study = tmp_path / "generalization"
    gen_arms(study, range(1, 7))
    args = ["--study", "dropout-gen", "--runs-dir", str(study), "--out-dir", str(tmp_path / "o")]
    assert cs.main(args) == 0
    report = (tmp_path / "o" / "generalization.md").read_text()

    assert (
        "With 6 pairs the sign-flip test cannot go below p = 0.0312, not below Holm's smallest "
        "level (0.05/3): this study describes the three Δgap, it cannot call one. The TOST is "
        "still reported at alpha 0.05"
    ) in report
    row = table_row(report, "## Paired differences", "gap dropout p0.1 − none")
    assert row[3] == "0.0312" and row[4] == "p = 0.0938, kept"


def test_a_run_with_too_few_evaluations_leaves_its_pair(tmp_path, drawn):
    study = tmp_path / "generalization"
    gen_arms(study, (1, 2, 3))
    short = study / "dropout_s3"
    for path in short.iterdir():
        path.unlink()
    short.rmdir()
    write_gen_run(short, "dropout", 3, [5.0] * 2, [10.0] * 2)
    args = ["--study", "dropout-gen", "--runs-dir", str(study), "--out-dir", str(tmp_path / "o")]
    assert cs.main(args) == 0
    report = (tmp_path / "o" / "generalization.md").read_text()

    assert table_row(report, "## Runs", "`dropout_s3`")[3:7] == ["2", "–", "–", "–"]
    assert table_row(report, "## Paired differences", "gap dropout p0.1 − none")[1] == "2"
    assert table_row(report, "## Paired differences", "gap dropout-mdr p0.1 − none")[1] == "3"
    row = table_row(report, "## Paired differences", "gap dropout-mdr p0.1 − dropout p0.1")
    assert row[1] == "2"


@pytest.mark.parametrize(
    "stray, message",
    [
        (
            lambda s: write_gen_run(s / "none_s9", "none", 9, [5.0] * 3, [1.0] * 3),
            "error: none_s9: seed 9 is not one of the plan's seeds (1-8)",
        ),
        (
            lambda s: write_gen_run(s / "drop_s3", "dropout", 3, [5.0] * 3, [1.0] * 3, p=0.2),
            "error: drop_s3: dropout probability 0.2 is not Study 2's (0.1)",
        ),
        (
            lambda s: write_gen_run(
                s / "mdr12_s3", "dropout-mdr", 3, [5.0] * 3, [1.0] * 3, alpha1=1, alpha2=2
            ),
            "error: mdr12_s3: --alpha1 1 --alpha2 2 is not the plan's split of dropout-mdr "
            "(--alpha1 2 --alpha2 1)",
        ),
        (
            lambda s: write_gen_run(s / "none_s3", "none", 3, [5.0] * 3, [1.0] * 3, num_tasks=64),
            "error: none_s3: num_tasks 64 is not the regime the pilot chose (num_tasks 32; "
            "docs/dropout/PLAN.md, 2026-12-02)",
        ),
        (
            lambda s: write_gen_run(
                s / "none_s3", "none", 3, [5.0] * 3, [1.0] * 3, lr_schedule="linear"
            ),
            "error: the runs differ in lr_schedule (",
        ),
    ],
)
def test_study_2_refuses_a_run_outside_its_plan(stray, message, tmp_path, monkeypatch, capsys):
    study = tmp_path / "generalization"
    gen_arms(study, (1, 2))
    stray(study)
    args = ("--study", "dropout-gen", "--runs-dir", "generalization", "--out-dir", "out")
    status, err = run_cli(tmp_path, monkeypatch, capsys, *args)

    assert status == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_the_none_runs_at_seeds_1_and_2_are_compared_with_the_pilot(tmp_path, drawn):
    """none_s1 repeats its pilot run value for value, none_s2 does not (another gap); a pilot run
    of another budget is nobody's twin; the study's runs name their CPU kind, the pilot's none."""
    study, pilot = tmp_path / "generalization", tmp_path / "pilot"
    gen_arms(study, (1, 2, 3), hosts=lambda arm, seed: ZEN4)
    write_gen_run(pilot / "none_t32_steps76800_s1", "none", 1, [5.0] * 3, [20.0] * 3)
    write_gen_run(pilot / "none_t32_steps76800_s2", "none", 2, [5.0] * 3, [21.0] * 3)
    write_gen_run(pilot / "none_t32_s1", "none", 1, [5.0] * 3, [20.0] * 3, total_timesteps=30720)
    args = ["--study", "dropout-gen", "--runs-dir", str(study), "--out-dir", str(tmp_path / "o")]
    assert cs.main(args + ["--pilot-runs-dir", str(pilot)]) == 0
    report = (tmp_path / "o" / "generalization.md").read_text()

    zen4 = "family 25 model 17 (AVX512)"
    unrecorded = "unknown: start 1 of 1 unrecorded and not checked (cpu_kinds.jsonl)"
    section = "## The `none` runs at seeds 1 and 2 against the pilot"
    assert table_row(report, section, "`none_s1`")[1:] == [
        "`none_t32_steps76800_s1`",
        "same",
        zen4,
        unrecorded,
        "identical (3 tags)",
    ]
    row = table_row(report, section, "`none_s2`")
    assert row[1] == "`none_t32_steps76800_s2`"
    assert row[5].startswith("differ in 2 of 3 tags (`charts/generalization_gap`: first at step")
    assert "`none_s3`" not in report[report.index(section) : report.index("## Runs")]
    assert table_row(report, "## Runs", "`dropout_s1`")[7] == zen4

    assert cs.main(args) == 0  # without the pilot's folder
    report = (tmp_path / "o" / "generalization.md").read_text()
    assert f"{section}\n\nNot compared: no --pilot-runs-dir given." in report


def test_a_tost_that_cannot_be_computed_over_single_kind_seeds_is_named(tmp_path, drawn):
    """dropout ran on another kind at seeds 1-7: one single-kind pair of dropout-mdr vs dropout,
    a sign-flip p (1) but no TOST."""
    study = tmp_path / "generalization"
    gen_arms(
        study,
        range(1, 9),
        gaps={"none": 20.0, "dropout": 10.0, "dropout-mdr": 10.5},
        hosts=lambda arm, seed: ZEN3 if arm == "dropout" and seed <= 7 else ZEN4,
    )
    args = ["--study", "dropout-gen", "--runs-dir", str(study), "--out-dir", str(tmp_path / "o")]
    assert cs.main(args) == 0
    report = (tmp_path / "o" / "generalization.md").read_text()

    assert "the TOST of gap dropout-mdr p0.1 − dropout p0.1 (1 pairs)" in report


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--study", "stage-c", "--pilot-runs-dir", "p"),
            "error: --study stage-c runs the plan's analysis of every run; --pilot-runs-dir",
        ),
        (
            ("--study", "dropout", "--pilot-runs-dir", "p"),
            "error: --pilot-runs-dir: only with Study 2 (--gen-runs-dir, or --study dropout-gen)",
        ),
        (("--pilot-runs-dir", "p"), "error: --pilot-runs-dir: only with Study 2"),
    ],
)
def test_the_pilot_folder_only_goes_with_study_2(args, message, tmp_path, monkeypatch, capsys):
    status, err = run_cli(tmp_path, monkeypatch, capsys, *args, "--out-dir", "out")
    assert status == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_the_dropout_study_and_its_generalization_in_one_command(
    dropout_study, gen_study, tmp_path, drawn
):
    args = [
        "--study",
        "dropout",
        "--runs-dir",
        str(dropout_study),
        "--gen-runs-dir",
        str(gen_study),
    ]
    assert cs.main(args + ["--out-dir", str(tmp_path / "o")]) == 0

    assert sorted(path.name for path in (tmp_path / "o").iterdir()) == [
        "generalization.md",
        "stability.md",
    ]
    assert "generalization_curves.png" in drawn and "stability_rewards.png" in drawn


# --------------------------------------------------------------------------------------------------
# Study 2's pilot: which regime makes `none` overfit, by hand


@pytest.fixture
def pilot_runs(tmp_path):
    """none at 32 tasks for 6000 steps: gaps 12 and 6 (mean 9 < 10: no); 32 tasks for 12000
    steps: gap 10 exactly, training reward 30 exactly (the thresholds: yes); 64 tasks for 6000:
    gap 20, training 50 (yes, but more tasks). Every run: 4 evaluations, the first left out."""
    pilot = tmp_path / "pilot"

    def run(name, seed, tasks, steps, held_out, gap):
        # the last 3 evaluations: held-out h - 1, h, h + 1 and gap g + 1, g, g - 1
        tests = [0.0, held_out - 1, held_out, held_out + 1]
        gaps = [40.0, gap + 1, gap, gap - 1]
        kw = {"num_tasks": tasks, "total_timesteps": steps}
        write_gen_run(pilot / name, "none", seed, tests, gaps, **kw)

    run("none_t32_s1", 1, 32, 6000, 30.0, 12.0)
    run("none_t32_s2", 2, 32, 6000, 30.0, 6.0)
    run("none_t32_long_s1", 1, 32, 12000, 15.0, 5.0)
    run("none_t32_long_s2", 2, 32, 12000, 25.0, 15.0)
    run("none_t64_s1", 1, 64, 6000, 30.0, 20.0)
    return pilot


def test_the_pilot_picks_the_smallest_task_count_that_overfits(pilot_runs, tmp_path, drawn):
    args = ["--study", "dropout-pilot", "--runs-dir", str(pilot_runs)]
    assert cs.main(args + ["--out-dir", str(tmp_path / "o")]) == 0
    report = (tmp_path / "o" / "pilot.md").read_text()

    assert "**Pilot choice: 32 training tasks, 12,000 steps (the smallest task count" in report
    # 32 x 6000: training = held-out + gap, (42 + 36) / 2 = 39; gap (12 + 6) / 2 = 9
    assert table_row(report, "## Regimes", "32")[1:] == ["6,000", "2", "39.0", "30.0", "9.0", "no"]
    # 32 x 12000: training (20 + 40) / 2 = 30, gap (5 + 15) / 2 = 10: both thresholds, met
    row = table_row(report, "## Regimes", "32", skip=1)
    assert row[1:] == ["12,000", "2", "30.0", "20.0", "10.0", "yes"]
    assert table_row(report, "## Regimes", "64")[1:] == [
        "6,000",
        "1",
        "50.0",
        "30.0",
        "20.0",
        "yes",
    ]
    # one run: training = held-out + gap at each evaluation; the best is the first (0 + 40)
    row = table_row(report, "## Runs", "`none_t32_s2`")
    assert row[1:] == ["2", "4", "36.0", "30.0", "6.0", "40.0"]
    panels = drawn["pilot_curves.png"][0][0]
    assert [(label, len(runs)) for label, runs in panels] == [
        ("none, 32 tasks, 6,000 steps", 2),
        ("none, 32 tasks, 12,000 steps", 2),
        ("none, 64 tasks, 6,000 steps", 1),
    ]


def test_the_pilot_says_when_no_regime_overfits(pilot_runs, tmp_path, drawn):
    for name in ("none_t32_long_s2", "none_t64_s1"):
        (pilot_runs / name / "summary.json").unlink()  # killed: named, not analysed
    args = ["--study", "dropout-pilot", "--runs-dir", str(pilot_runs)]
    assert cs.main(args + ["--out-dir", str(tmp_path / "o")]) == 0
    report = (tmp_path / "o" / "pilot.md").read_text()

    assert "**Pilot choice: no regime overfits; by the plan the study runs at 32 training" in report
    assert "(so far: 2 runs unfinished)" in report
    assert "Not finished or failed, not analysed (2): `none_t32_long_s2` (unfinished)" in report


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda pilot: write_gen_run(pilot / "drop_s1", "dropout", 1, [1.0] * 3, [1.0] * 3),
            "error: drop_s1: the pilot runs arm none only (--norm none --alpha2 0)",
        ),
        (
            lambda pilot: write_gen_run(
                pilot / "again_s1", "none", 1, [1.0] * 3, [1.0] * 3, total_timesteps=6000
            ),
            "error: again_s1 and none_t32_s1: two runs of none at 32 tasks, 6000 steps, seed 1",
        ),
        (
            lambda pilot: write_gen_run(pilot / "x", "none", 5, [1.0] * 3, [1.0] * 3, view_size=64),
            "error: the runs differ in view_size (",
        ),
    ],
)
def test_bad_pilot_runs_are_one_line_errors_and_nothing_is_written(
    pilot_runs, monkeypatch, capsys, damage, message
):
    damage(pilot_runs)

    args = ("--study", "dropout-pilot", "--runs-dir", "pilot", "--out-dir", "out")
    status, err = run_cli(pilot_runs.parent, monkeypatch, capsys, *args)

    assert status == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (pilot_runs.parent / "out").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda study: write_gen_run(
                study / "bn_s1", "none", 1, [1.0] * 3, [1.0] * 3, norm="bn"
            ),
            "error: bn_s1: --norm bn --alpha2 0 is not an arm of Study 2",
        ),
        (
            lambda study: write_gen_run(
                study / "x", "dropout", 5, [1.0] * 3, [1.0] * 3, num_tasks=64
            ),
            "error: x: num_tasks 64 is not the regime the pilot chose (num_tasks 32;",
        ),
        (
            lambda study: write_gen_run(study / "again_s1", "none", 1, [1.0] * 3, [1.0] * 3),
            "error: again_s1 and none_s1: two runs of none, seed 1",
        ),
    ],
)
def test_study_2_bad_runs_are_one_line_errors_and_nothing_is_written(
    gen_study, monkeypatch, capsys, damage, message
):
    damage(gen_study)

    args = ("--study", "dropout-gen", "--runs-dir", "generalization", "--out-dir", "out")
    status, err = run_cli(gen_study.parent, monkeypatch, capsys, *args)

    assert status == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (gen_study.parent / "out").exists()
