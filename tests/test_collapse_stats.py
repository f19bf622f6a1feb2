"""Tests of analysis/collapse_stats.py: the collapse definition on hand-made curves and on the 16
committed probe runs, the statistics on small cases with known answers, the command line on a folder
of tiny hand-written runs."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))  # the modules' folder
import collapse_figures as figures
import collapse_stats as cs

ANALYSIS = Path(cs.__file__).parent

COMMITTED_RUNS = ANALYSIS.parent / "docs" / "collapse"
NAN = float("nan")


def curve(*pieces) -> np.ndarray:
    """Concatenated (value, number of updates) pieces."""
    return np.concatenate([np.full(length, value, dtype=float) for value, length in pieces])


# --------------------------------------------------------------------------------------------------
# The definition on hand-made curves


def test_a_sustained_reward_crash_is_flagged_where_the_smoothed_reward_falls_below_a_quarter():
    rewards = curve((50.0, 30), (0.0, 30))
    entropies = curve(
        (1.5, 60)
    )  # no entropy collapse: the paper's reward collapse need not come with one

    # smoothed reward at update 30 + j: 50 (9 - j) / 10, below 0.25 x 50 from j = 7 on
    assert cs.detect_collapse(rewards, entropies) == (True, 37)
    assert cs.collapse_onset(rewards, entropies) == (37, "reward")


@pytest.mark.parametrize(
    "low_updates, flagged", [(cs.REWARD_UPDATES - 1, False), (cs.REWARD_UPDATES, True)]
)
def test_the_reward_must_stay_low_for_reward_updates_in_a_row(low_updates, flagged):
    # the smoothed reward is below 12.5 from update 37 on while its window holds at most two 50s:
    # zeros - 5 updates
    rewards = curve((50.0, 30), (0.0, low_updates + 5), (50.0, 20))

    assert cs.detect_collapse(rewards, curve((1.5, len(rewards)))) == (
        (True, 37) if flagged else (False, len(rewards) - 1)
    )


def test_an_entropy_collapse_with_the_reward_near_zero_is_flagged_at_its_first_update():
    rewards = curve((15.0, 20), (0.5, 40))
    entropies = curve((1.4, 22), (0.01, 38))

    assert cs.collapse_onset(rewards, entropies) == (
        22,
        "entropy",
    )  # before the reward criterion (from update 27)


def test_each_criterion_alone_flags_only_its_own_collapse():
    confident = (
        curve((80.0, 60)),
        curve((1.4, 30), (0.05, 30)),
    )  # deterministic and still earning: entropy only
    crashed = (
        curve((50.0, 30), (0.0, 30)),
        curve((1.5, 60)),
    )  # the reward collapse of the first test: reward only

    assert (
        cs.collapse_onset(*confident)
        == (30, "entropy")
        == cs.collapse_onset(*confident, ("entropy",))
    )
    assert cs.collapse_onset(*confident, ("reward",)) == (None, None)
    assert cs.collapse_onset(*crashed, ("reward",)) == (37, "reward")
    assert cs.collapse_onset(*crashed, ("entropy",)) == (None, None)


def test_a_dip_that_recovers_within_a_few_updates_is_not_a_collapse():
    rewards = curve((60.0, 40), (0.0, 4), (60.0, 40))  # smoothed: at least 36 = 60 % of the best
    entropies = curve((1.2, 41), (0.1, cs.ENTROPY_UPDATES - 1), (1.2, 39))

    assert cs.detect_collapse(rewards, entropies) == (False, 83)


def test_a_run_that_never_learns_is_censored_even_if_its_entropy_collapses():
    rewards = curve((-6.0, 10), (9.9, 40), (0.0, 30))  # best smoothed reward 9.9 < 10 % of optimal
    entropies = curve((1.9, 30), (0.0, 50))

    assert cs.detect_collapse(rewards, entropies) == (False, 79)


def test_updates_without_a_finished_episode_are_skipped():
    rewards = curve((20.0, 10), (5.0, 1), (NAN, 1), (5.0, 1), (NAN, 3), (5.0, 3))
    entropies = curve((1.5, 10), (0.0, 9))  # low from update 10; 5 of those updates have a reward
    assert cs.collapse_onset(rewards, entropies) == (10, "entropy")

    entropies[-1] = (
        1.5  # now 4 low updates with a reward: NaN updates do not count towards a streak
    )
    assert cs.detect_collapse(rewards, entropies) == (False, 18)

    rewards = curve((NAN, 3), (12.0, 2), (NAN, 2), (0.0, 30))
    # the smoothed reward averages finished updates only (never NaN): 12, 12, then 12 x 2 / (2 + k)
    assert cs.collapse_onset(rewards, curve((1.5, 37))) == (13, "reward")


def test_the_definition_flags_exactly_the_documented_collapses_of_the_committed_runs():
    """docs/collapse.md, 'Collapse definition (fixed before the decisive runs)': BN 4/4, BN+MDR seed
    2 in all three BN+MDR cells, no Eval run; the update is the collapse's first."""
    # the 16 runs of the first sessions (docs/collapse/study/ holds the study's runs, made after the
    # definition was fixed)
    runs = [
        run
        for run in figures.read_runs(str(COMMITTED_RUNS))
        if "study" not in Path(run["name"]).parts
    ]
    runs = cs.mark_collapses(runs)

    flagged = {
        run["name"]: int(run["iteration"][run["collapse_index"]])
        for run in runs
        if run["collapse_index"] is not None
    }

    assert len(runs) == 16
    assert flagged == {
        "bn_clip0.2_ent0.01_seed1": 41,
        "bn_clip0.2_ent0.01_seed2": 116,
        "bn_clip0.05_ent0.01_seed1": 145,
        "bn_clip0.05_ent0.01_seed2": 108,
        "bn-mdr_clip0.2_ent0.01_seed2": 51,
        "bn-mdr_clip0.05_ent0.01_seed2": 71,
        "bn-mdr_clip0.2_ent0_seed2": 14,
    }
    for run in runs:  # the definition's moving average is the probe's smoothed_reward column
        window = [
            np.mean(run["normalized_reward"][max(0, i - cs.SMOOTH_WINDOW + 1) : i + 1])
            for i in range(150)
        ]
        np.testing.assert_allclose(window, run["smoothed_reward"], atol=1e-3)


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
    assert cs.paired_bootstrap([5.0, 6.0, 7.0], [4.0, 5.0, 6.0]) == pytest.approx(
        (1.0, 1.0, 1.0)
    )  # one difference
    mean, low, high = cs.paired_bootstrap(
        [5.0, NAN], [1.0, 2.0]
    )  # a pair with a NaN is dropped; 1 pair: no interval
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)


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
            figures.SERIES
            + ("mode", "seed", "clip_coef", "ent_coef", "acting_entropy", "wall_time")
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


def test_cli_prints_the_check_and_the_table_and_writes_the_report_and_figures(
    study, tmp_path, capsys
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
    for name in ("collapse_stats.png", "collapse_fig6.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_cell_filter_and_reference(study, tmp_path, capsys):
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


def test_cli_modes_filter(study, tmp_path, capsys):
    assert (
        cs.main(["--runs-dir", str(study), "--out-dir", str(tmp_path), "--modes", "bn,eval"]) == 0
    )

    assert sorted(table_rows(capsys.readouterr().out)) == [("bn", "0.01"), ("eval", "0.1")]


def test_cli_rank_orders_the_table_by_auc(study, tmp_path, capsys):
    assert cs.main(["--runs-dir", str(study), "--out-dir", str(tmp_path), "--rank"]) == 0

    lines = capsys.readouterr().out.splitlines()[2:6]
    order = [(line.split("|")[1].strip(), line.split("|")[4].strip()) for line in lines]
    assert sorted(order[:2]) == [("bn-mdr", "0.5"), ("eval", "0.1")]  # AUC 40 both
    assert order[2:] == [("bn-mdr", "0.01"), ("bn", "0.01")]  # AUC 34.3, then 20


def test_cli_seeds_filter(study, tmp_path, capsys):
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
    assert rows[("bn", "0.01")][5] == "2" and rows[("bn-mdr", "0.01")][5:9] == [
        "2",
        "1",
        "0.50 [0.01, 0.99]",
        "1 (0/1, 2)",
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


def test_cli_cost_json_gives_the_side_by_side_wall_time_column(study, tmp_path, capsys):
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
        cs.main(["--runs-dir", str(study)] + args)
    assert not list(tmp_path.glob("**/collapse_stats.md"))


def test_bad_input_on_the_command_line_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ANALYSIS / "collapse_stats.py"), "--runs-dir", "missing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert result.stderr.strip() == "error: --runs-dir missing: no such folder"
