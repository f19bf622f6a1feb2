"""Tests of analysis/collapse_runs.py: the collapse definition, the first study's and the revised
one, on hand-made curves and on the committed runs; arms; reading run folders (finished, killed,
half-written, corrupt); provenance and the refusal to pair mixed runs; Stage C's plan of runs; the
dropout probability in the arm (never two probabilities in one cell) and the dropout plan."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))  # the modules' folder
import collapse_runs as cr
from collapse_run_files import (
    PROVENANCE,
    ZEN3,
    ZEN4,
    curve,
    kind_check,
    write_dropout_run,
    write_run,
    write_stage_c_run,
)

ANALYSIS = Path(cr.__file__).parent
COMMITTED_RUNS = ANALYSIS.parent / "docs" / "collapse"
NAN = float("nan")
HIGH = curve((1.5, 200))  # an acting entropy far from either criterion
CURVES = (curve((5.0, 3)), HIGH[:3])  # a short run that learned nothing


# --------------------------------------------------------------------------------------------------
# The definition on hand-made curves: what both definitions share


@pytest.mark.parametrize("definition", cr.DEFINITIONS)
def test_a_sustained_reward_crash_is_flagged_where_the_smoothed_reward_falls_below_a_quarter(
    definition,
):
    rewards = curve((50.0, 30), (0.0, 30))
    # no entropy collapse: the paper's reward collapse need not come with one
    entropies = curve((1.5, 60))

    # smoothed reward at update 30 + j: 50 (9 - j) / 10, below 0.25 x 50 from j = 7 on
    assert cr.detect_collapse(rewards, entropies, definition) == (True, 37)
    assert cr.collapse_onset(rewards, entropies, definition) == (37, "reward")


@pytest.mark.parametrize(
    "low_updates, flagged", [(cr.REWARD_UPDATES - 1, False), (cr.REWARD_UPDATES, True)]
)
@pytest.mark.parametrize("definition", cr.DEFINITIONS)
def test_the_reward_must_stay_low_for_reward_updates_in_a_row(low_updates, flagged, definition):
    # the smoothed reward is below 12.5 from update 37 on while its window holds at most two 50s:
    # zeros - 5 updates
    rewards = curve((50.0, 30), (0.0, low_updates + 5), (50.0, 20))

    assert cr.detect_collapse(rewards, curve((1.5, len(rewards))), definition) == (
        (True, 37) if flagged else (False, len(rewards) - 1)
    )


@pytest.mark.parametrize("definition, onset", [("old", 22), ("revised", 25)])
def test_an_entropy_collapse_with_the_reward_near_zero_is_flagged_at_its_first_update(
    definition, onset
):
    rewards = curve((15.0, 20), (0.5, 40))
    entropies = curve((1.4, 22), (0.01, 38))

    # both before the reward criterion (low from update 27): the smoothed reward at 20 + j is
    # 15 - 1.45 (j + 1), below half of its best (7.5) from j = 5 on, where the revised streak starts
    assert cr.collapse_onset(rewards, entropies, definition) == (onset, "entropy")


@pytest.mark.parametrize("definition", cr.DEFINITIONS)
def test_a_dip_that_recovers_within_a_few_updates_is_not_a_collapse(definition):
    rewards = curve((60.0, 40), (0.0, 4), (60.0, 40))  # smoothed: at least 36 = 60 % of the best
    entropies = curve((1.2, 41), (0.1, cr.ENTROPY_UPDATES - 1), (1.2, 39))

    assert cr.detect_collapse(rewards, entropies, definition) == (False, 83)


@pytest.mark.parametrize("definition", cr.DEFINITIONS)
def test_a_run_that_never_learns_is_censored_even_if_its_entropy_collapses(definition):
    rewards = curve((-6.0, 10), (9.9, 40), (0.0, 30))  # best smoothed reward 9.9 < 10 % of optimal
    entropies = curve((1.9, 30), (0.0, 50))

    assert cr.detect_collapse(rewards, entropies, definition) == (False, 79)


def test_updates_without_a_finished_episode_are_skipped():
    rewards = curve((20.0, 10), (5.0, 1), (NAN, 1), (5.0, 1), (NAN, 3), (5.0, 3))
    entropies = curve((1.5, 10), (0.0, 9))  # low from update 10; 5 of those updates have a reward
    assert cr.collapse_onset(rewards, entropies, "old") == (10, "entropy")

    entropies[-1] = (
        1.5  # now 4 low updates with a reward: NaN updates do not count towards a streak
    )
    assert cr.detect_collapse(rewards, entropies, "old") == (False, 18)

    rewards = curve((NAN, 3), (12.0, 2), (NAN, 2), (0.0, 30))
    # the smoothed reward averages finished updates only (never NaN): 12, 12, then 12 x 2 / (2 + k)
    assert cr.collapse_onset(rewards, curve((1.5, 37)), "old") == (13, "reward")


def test_each_criterion_alone_flags_only_its_own_collapse():
    # deterministic and still earning: entropy only, and only under the old definition
    confident = (curve((80.0, 60)), curve((1.4, 30), (0.05, 30)))
    # the reward collapse of the first test: reward only
    crashed = (curve((50.0, 30), (0.0, 30)), curve((1.5, 60)))

    assert cr.collapse_onset(*confident, "old") == (30, "entropy")
    assert cr.collapse_onset(*confident, "old", ("entropy",)) == (30, "entropy")
    assert cr.collapse_onset(*confident, "old", ("reward",)) == (None, None)
    assert cr.collapse_onset(*crashed, "revised", ("reward",)) == (37, "reward")
    assert cr.collapse_onset(*crashed, "revised", ("entropy",)) == (None, None)


def test_an_unknown_definition_is_refused():
    with pytest.raises(ValueError, match="one of old, revised"):
        cr.collapse_onset(curve((1.0, 3)), curve((1.0, 3)), "new")


# --------------------------------------------------------------------------------------------------
# The revised definition (docs/collapse/study_c/PLAN.md)


def test_a_confident_good_policy_is_a_collapse_only_under_the_old_definition():
    # the first study's BN+MDR seed 10 and Eval seed 9: near-deterministic at 61-99 % of optimal
    rewards, entropies = curve((80.0, 60)), curve((1.4, 30), (0.05, 30))

    assert cr.collapse_onset(rewards, entropies, "old") == (30, "entropy")
    assert cr.collapse_onset(rewards, entropies, "revised") == (None, None)


def test_a_low_entropy_policy_at_a_tenth_of_its_best_is_a_collapse():
    # best smoothed reward 50; from update 30 the reward is 5 and the entropy low. The smoothed
    # reward at 30 + j is 50 - 4.5 (j + 1): below half of 50 from j = 5 (index 35), so the revised
    # entropy streak starts there and is 5 long at 39, before the reward criterion's (from 38) is 10
    rewards, entropies = curve((50.0, 30), (5.0, 40)), curve((1.4, 30), (0.05, 40))

    assert cr.collapse_onset(rewards, entropies, "revised") == (35, "entropy")
    assert cr.collapse_onset(rewards, entropies, "old") == (30, "entropy")


def test_the_revised_entropy_criterion_looks_at_the_smoothed_reward():
    # entropy low from update 30 on; the reward at 40 % of its best for 4 updates, but its moving
    # average never below 38 = 76 % of the best
    rewards = curve((50.0, 30), (20.0, 4), (50.0, 30))
    entropies = curve((1.4, 30), (0.05, 34))
    assert cr.smoothed_rewards(rewards)[1].min() == pytest.approx(38.0)

    assert cr.collapse_onset(rewards, entropies, "revised") == (None, None)
    assert cr.collapse_onset(rewards, entropies, "old") == (30, "entropy")


def test_smoothed_rewards_skip_nan_updates_and_track_the_best():
    indices, smoothed, best = cr.smoothed_rewards([NAN, 10.0, 30.0, NAN, 20.0])

    assert list(indices) == [1, 2, 4]
    assert list(smoothed) == [10.0, 20.0, 20.0] and list(best) == [10.0, 20.0, 20.0]


def test_the_committed_runs_keep_their_documented_collapses_under_the_old_definition():
    """docs/collapse.md, 'Collapse definition (fixed before the decisive runs)': BN 4/4, BN+MDR seed
    2 in all three BN+MDR cells, no Eval run; the update is the collapse's first."""
    # the 16 runs of the first sessions (docs/collapse/study/ holds the study's runs, made after the
    # definition was fixed; study_c/ Stage C's)
    runs = [run for run in cr.read_runs(str(COMMITTED_RUNS)) if not run["name"].startswith("study")]
    runs = cr.mark_collapses(runs, "old")

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
            np.mean(run["normalized_reward"][max(0, i - cr.SMOOTH_WINDOW + 1) : i + 1])
            for i in range(150)
        ]
        np.testing.assert_allclose(window, run["smoothed_reward"], atol=1e-3)


def test_the_revised_definition_drops_only_the_confident_policies_of_the_decisive_study():
    """Issue 26: in the decisive cell (BN momentum 0.1, views separate) the old definition flags
    BN+MDR seed 10 and Eval seed 9, both confident policies still earning; the revised one flags
    neither, and keeps BN's six collapses."""
    runs = cr.select_cells(cr.read_runs(str(COMMITTED_RUNS / "study")), "bnm=0.1")
    runs = [run for run in runs if run["arm"] in ("bn", "eval", "bn-mdr")]

    def flagged(definition):
        marked = cr.mark_collapses([dict(run) for run in runs], definition)
        return {(r["arm"], r["seed"]) for r in marked if r["collapse_index"] is not None}

    bn = {("bn", seed) for seed in (1, 2, 4, 5, 7, 10)}
    assert {key for key in flagged("old") if key[0] == "bn"} == bn
    assert flagged("old") - bn == {("bn-mdr", 10), ("eval", 9)}
    assert flagged("revised") == bn


# --------------------------------------------------------------------------------------------------
# Arms and reading run folders


@pytest.mark.parametrize(
    "mode, alphas, arm",
    [
        ("bn", (3, 0), "bn"),
        ("bn", (2, 0), "bn-e2"),
        ("eval", (4, 0), "eval-e4"),
        ("bn-mdr", (2, 1), "bn-mdr"),
        ("bn-mdr", (1, 2), "bn-mdr12"),
        ("brn-mdr", (3, 1), "brn-mdr31"),
        ("bn", (None, None), "bn"),  # not recorded: the defaults
    ],
)
def test_an_arm_is_the_mode_and_what_it_changed_of_the_epochs(mode, alphas, arm):
    assert cr.arm_name(mode, *alphas) == arm


def test_the_committed_runs_keep_their_mode_as_arm():
    # the first sessions' 16 and the first study's 68, made before runs recorded their provenance,
    # and the dropout study's 4 LayerNorm runs beside the rivals' (Stage C's, in study_c/, have
    # arms of theirs)
    runs = [
        run for run in cr.read_runs(str(COMMITTED_RUNS)) if not run["name"].startswith("study_c")
    ]
    layernorm = [run for run in runs if run["name"].startswith("study/rivals/ln_")]
    older = [run for run in runs if run not in layernorm]

    assert all(run["arm"] == run["mode"] and run["status"] == "completed" for run in runs)
    assert len(older) == 84 and all(run["provenance"] == [] for run in older)
    assert sorted(run["seed"] for run in layernorm) == [1, 2, 3, 4]
    commits = {segment["commit"][:7] for run in layernorm for segment in run["provenance"]}
    assert {run["mode"] for run in layernorm} == {"ln"} and commits == {"cb2e6e5"}


def test_a_run_reads_its_arm_status_and_provenance(tmp_path):
    segments = [{"from_iteration": 1, **PROVENANCE}, {"from_iteration": 57, **PROVENANCE}]
    write_run(tmp_path / "a", "bn-mdr", 11, curve((5.0, 3)), curve((1.5, 3)), (1, 2))
    write_run(tmp_path / "b", "bn", 11, curve((5.0, 3)), curve((1.5, 3)), (2, 0), segments=segments)
    write_run(tmp_path / "c", "bn", 12, curve((5.0, 3)), curve((1.5, 3)), summary=False)
    write_run(tmp_path / "d", "bn", 13, curve((5.0, 3)), curve((1.5, 3)), provenance=None)

    runs = {run["name"]: run for run in cr.read_runs(str(tmp_path))}

    assert [runs[name]["arm"] for name in "abcd"] == ["bn-mdr12", "bn-e2", "bn", "bn"]
    assert runs["a"]["provenance"] == [{"from_iteration": 1, **PROVENANCE}]
    assert runs["b"]["provenance"] == segments and runs["d"]["provenance"] == []
    assert cr.run_provenance(runs["a"]) == ("a" * 40, "AMD EPYC", "2.14.1")
    assert cr.run_provenance(runs["d"]) is None
    assert [runs[name]["status"] for name in "abcd"] == ["completed"] * 2 + ["unfinished"] + [
        "completed"
    ]
    done, others = cr.finished(list(runs.values()))
    assert sorted(run["name"] for run in done) == ["a", "b", "d"] and others == [runs["c"]]
    assert runs["c"]["bn_momentum"] is None and runs["c"]["args"] == {}


def test_a_half_written_last_line_of_a_killed_run_is_dropped(tmp_path):
    folder = write_run(
        tmp_path / "killed", "bn", 1, curve((5.0, 4)), curve((1.5, 4)), summary=False
    )
    with open(folder / "metrics.csv", "a") as f:
        f.write("5,640,bn,0.2")  # the process died mid-line

    (run,) = cr.read_runs(str(tmp_path))

    assert list(run["iteration"]) == [1, 2, 3, 4] and run["status"] == "unfinished"


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("metrics.csv", "metrics.csv: no column normalized_reward"),
        ("numbers", "metrics.csv: a value that is not a number"),
        ("summary.json", "summary.json: unreadable"),
        ("args", "summary.json: not a summary.json of ppo_collapse_probe.py (no args object)"),
        ("provenance", "summary.json: its provenance is not a list of objects"),
    ],
)
def test_a_corrupt_run_file_is_skipped_with_one_warning_line(tmp_path, capsys, damage, reason):
    write_run(tmp_path / "good", "bn", 1, curve((5.0, 3)), curve((1.5, 3)))
    bad = write_run(tmp_path / "bad", "bn", 2, curve((5.0, 3)), curve((1.5, 3)))
    if damage == "metrics.csv":
        text = (bad / "metrics.csv").read_text()
        (bad / "metrics.csv").write_text(text.replace("normalized_reward", "reward", 1))
    elif damage == "numbers":
        text = (bad / "metrics.csv").read_text().splitlines()
        (bad / "metrics.csv").write_text("\n".join(text[:2] + [text[2].replace("5.0", "x")]))
    elif damage == "summary.json":
        (bad / "summary.json").write_text('{"status": "compl')
    elif damage == "args":
        (bad / "summary.json").write_text('{"status": "completed", "args": [1]}')
    else:
        (bad / "summary.json").write_text('{"args": {}, "provenance_segments": "x"}')

    runs, skipped = cr.read_runs_and_skipped(str(tmp_path))

    assert [run["name"] for run in runs] == ["good"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}/") and reason in skipped[0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: skipped {bad}/")


def test_only_corrupt_or_empty_runs_is_a_config_error(tmp_path):
    bad = write_run(tmp_path / "bad", "bn", 2, curve((5.0, 3)), curve((1.5, 3)))
    (bad / "summary.json").write_text("{")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.csv").write_text("iteration,mode\n")  # killed before update 1

    with pytest.raises(cr.ConfigError, match="no runs found"):
        cr.read_runs(str(tmp_path))
    with pytest.raises(cr.ConfigError, match="--runs-dir missing: no such folder"):
        cr.read_runs("missing")


def test_selecting_cells_modes_and_seeds(tmp_path):
    for arm, alphas in (("bn", (3, 0)), ("bn-e2", (2, 0))):
        for seed in (1, 2, 5):
            write_run(tmp_path / f"{arm}_s{seed}", "bn", seed, curve((5.0, 3)), HIGH[:3], alphas)
    runs = cr.read_runs(str(tmp_path))

    assert {run["arm"] for run in cr.select_modes(runs, "bn-e2")} == {"bn-e2"}
    assert len(cr.select_cells(runs, "mode=bn-e2,bnm=0.1,views=separate")) == 3
    assert sorted(run["seed"] for run in cr.select_seeds(runs, "1-2")) == [1, 1, 2, 2]
    assert sorted(run["seed"] for run in cr.select_seeds(runs, "5,1")) == [1, 1, 5, 5]
    with pytest.raises(cr.ConfigError, match="'3-1' is not a seed or a range like 1-4"):
        cr.select_seeds(runs, "3-1")
    with pytest.raises(cr.ConfigError, match="no runs of eval"):
        cr.select_modes(runs, "eval")
    # a range is never enumerated: a huge one is as quick as a small one
    assert len(cr.select_seeds(runs, "0-999999999999")) == 6


# --------------------------------------------------------------------------------------------------
# Provenance


def three_runs(tmp_path, **second) -> list:
    """bn seed 1, bn-mdr seeds 1 and 2; the second run with `second` as write_run arguments."""
    write_run(tmp_path / "bn_s1", "bn", 1, curve((5.0, 3)), HIGH[:3])
    write_run(tmp_path / "mdr_s1", "bn-mdr", 1, curve((5.0, 3)), HIGH[:3], **second)
    write_run(tmp_path / "mdr_s2", "bn-mdr", 2, curve((5.0, 3)), HIGH[:3])
    return cr.read_runs(str(tmp_path))


def test_runs_of_one_provenance_or_none_are_paired(tmp_path):
    runs = three_runs(tmp_path, provenance=None)  # one of the first studies' runs: unknown

    cr.check_provenance([runs], allow_mixed=False)

    summary = cr.provenance_summary(runs)
    assert summary == (
        "Provenance of the 3 runs: 2 from commit aaaaaaa, AMD EPYC, torch 2.14.1; "
        "1 unknown (made before runs recorded it)."
    )


def test_the_machines_of_queued_runs_are_named_from_their_hosts_jsonl(tmp_path):
    """sweeps/run_and_commit.sh's hosts.jsonl (one record per start) names each run's CPU kind as
    the scripts' provenance() does; a run resumed on another kind is named with both; a run with
    fewer records than processes (started before the queue recorded them) is named; runs without
    the file are counted. A line that is not a JSON object skips the run, naming the file."""
    write_run(tmp_path / "bn_s1", "bn", 1, curve((5.0, 3)), HIGH[:3])
    write_run(tmp_path / "mdr_s1", "bn-mdr", 1, curve((5.0, 3)), HIGH[:3])
    write_run(tmp_path / "mdr_s2", "bn-mdr", 2, curve((5.0, 3)), HIGH[:3])
    write_run(tmp_path / "bn_s2", "bn", 2, curve((5.0, 3)), HIGH[:3])
    records = {"bn_s1": [ZEN4], "mdr_s1": [ZEN3, ZEN4], "mdr_s2": [ZEN4]}
    for name, hosts in records.items():
        lines = [json.dumps({"started": "2026-12-04T02:31:08Z", **host}) for host in hosts]
        (tmp_path / name / "hosts.jsonl").write_text("\n".join(lines) + "\n")
    summary = json.loads((tmp_path / "mdr_s2" / "summary.json").read_text())
    summary["provenance_segments"] = [{"from_iteration": 1, **PROVENANCE}] * 2
    (tmp_path / "mdr_s2" / "summary.json").write_text(json.dumps(summary))

    runs = cr.read_runs(str(tmp_path))

    zen4 = "AMD EPYC (cpu family 25, model 17, stepping 1), AVX512 kernels"
    zen3 = "AMD EPYC (cpu family 25, model 1, stepping 1), AVX2 kernels"
    assert cr.provenance_summary(runs).endswith(
        f" Machines of their starts (hosts.jsonl, 3 runs): 2 on {zen4}; 1 on {zen3} then {zen4}."
        " Not every start recorded (the first ones ran before the queue recorded them): mdr_s2."
        " 1 run has no hosts.jsonl."
    )
    assert "hosts.jsonl" not in cr.provenance_summary([run for run in runs if not run["hosts"]])

    (tmp_path / "bn_s2" / "hosts.jsonl").write_text('{"model_name": "AMD EPYC"}\n[1, 2]\n')
    runs, skipped = cr.read_runs_and_skipped(str(tmp_path))
    assert [run["name"] for run in runs] == ["bn_s1", "mdr_s1", "mdr_s2"]
    assert skipped == [f"{tmp_path / 'bn_s2' / 'hosts.jsonl'}: a line is not a JSON object"]


@pytest.mark.parametrize("field, value", [("commit", "b" * 40), ("cpu", "Intel"), ("torch", "2.9")])
def test_runs_from_another_commit_or_machine_are_refused_naming_them(tmp_path, field, value):
    runs = three_runs(tmp_path, provenance={**PROVENANCE, field: value})

    with pytest.raises(cr.ConfigError) as error:
        cr.check_provenance([runs], allow_mixed=False)

    message = str(error.value)
    assert message.startswith("runs that are paired come from different commits or machines: ")
    assert "mdr_s1 (commit" in message and "bn_s1, mdr_s2 (commit aaaaaaa" in message
    assert message.endswith("; pass --allow-mixed to pair them anyway") and "\n" not in message
    cr.check_provenance([runs], allow_mixed=True)
    cr.check_provenance([runs[:1], runs[1:2]], allow_mixed=False)  # not paired with each other
    assert "paired (--allow-mixed)" in cr.provenance_summary(runs, allow_mixed=True)


def test_a_run_resumed_on_another_machine_is_refused(tmp_path):
    segments = [{"from_iteration": 1, **PROVENANCE}, {"from_iteration": 3, **PROVENANCE}]
    segments[1]["cpu"] = "Intel Xeon"
    runs = three_runs(tmp_path, segments=segments)

    with pytest.raises(cr.ConfigError, match=r"mdr_s1 was resumed on another commit or machine "):
        cr.check_provenance([runs], allow_mixed=False)
    cr.check_provenance([runs], allow_mixed=True)


def test_a_dirty_tree_is_named_in_the_summary(tmp_path):
    runs = three_runs(tmp_path, provenance={**PROVENANCE, "dirty": True})

    assert cr.provenance_summary(runs).endswith("From a tree with uncommitted changes: mdr_s1.")


# --------------------------------------------------------------------------------------------------
# Stage C's plan of runs


def test_stage_c_runs_get_the_plans_arms_and_families(tmp_path):
    for arm in ("bn", "bn-e2", "bn-mdr21", "bn-mdr12"):
        write_stage_c_run(tmp_path, "procedural", arm, 11, curve((5.0, 3)), HIGH[:3])
    write_stage_c_run(tmp_path, "photos", "bn-mdr21", 18, curve((5.0, 3)), HIGH[:3])
    write_stage_c_run(tmp_path, "photos", "bn", 12, curve((5.0, 3)), HIGH[:3], summary=False)

    runs = cr.stage_c_runs(cr.read_runs(str(tmp_path)))

    assert sorted((run["family"], run["arm"], run["seed"]) for run in runs) == [
        ("photos", "bn", 12),
        ("photos", "bn-mdr21", 18),
        ("procedural", "bn", 11),
        ("procedural", "bn-e2", 11),
        ("procedural", "bn-mdr12", 11),
        ("procedural", "bn-mdr21", 11),
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: write_run(p / "procedural" / "x", "bn-mdr", 11, *CURVES, (0, 3)),
            "procedural/x: --mode bn-mdr with 0 train-mode and 3 eval-mode epochs is not an arm of "
            "the plan's procedural runs (bn, bn-e2, bn-mdr21, bn-mdr12)",
        ),
        (
            lambda p: write_stage_c_run(p, "photos", "bn-e2", 11, *CURVES),
            "photos/bn-e2_bnm0.1_s11: --mode bn with 2 train-mode and 0 eval-mode epochs is not "
            "an arm of the plan's photos runs (bn, bn-mdr21)",
        ),
        (
            lambda p: write_stage_c_run(p, "procedural", "bn", 27, *CURVES),
            "seed 27 is not one of the plan's procedural seeds (11-26)",
        ),
        (
            lambda p: write_run(p / "procedural" / "bn_again_s11", "bn", 11, *CURVES),
            "procedural/bn_again_s11 and procedural/bn_bnm0.1_s11: two runs of bn, seed 11",
        ),
        (
            lambda p: write_run(p / "elsewhere" / "bn", "bn", 11, *CURVES),
            "elsewhere/bn: not a run of Stage C's plan (not under procedural/ or photos/)",
        ),
        (
            lambda p: write_stage_c_run(p, "procedural", "bn-e2", 11, *CURVES, bn_momentum=0.01),
            "procedural/bn-e2_bnm0.1_s11: bn_momentum 0.01: not the plan's regime",
        ),
        (
            lambda p: write_stage_c_run(p, "photos", "bn", 11, *CURVES, image_source="procedural"),
            "photos/bn_bnm0.1_s11: image_source procedural, targets_per_image 2: not the plan's",
        ),
    ],
)
def test_a_run_the_plan_does_not_have_is_a_config_error(tmp_path, make, message):
    write_stage_c_run(tmp_path, "procedural", "bn", 11, *CURVES)
    make(tmp_path)

    with pytest.raises(cr.ConfigError) as error:
        cr.stage_c_runs(cr.read_runs(str(tmp_path)))
    assert message in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# The dropout probability: part of the arm, so never pooled


@pytest.mark.parametrize(
    "mode, alphas, p, arm",
    [
        ("dropout", (3, 0), 0.1, "dropout p0.1"),
        ("dropout", (3, 0), 0.2, "dropout p0.2"),
        ("dropout-mdr", (2, 1), 0.1, "dropout-mdr p0.1"),
        ("dropout-mdr", (1, 2), 0.2, "dropout-mdr12 p0.2"),
        ("dropout", (3, 0), None, "dropout p?"),  # not recorded (a killed run)
        ("bn", (3, 0), 0.1, "bn"),  # the probability of a mode without dropout means nothing
        ("none", (3, 0), None, "none"),
    ],
)
def test_a_dropout_arm_names_its_probability(mode, alphas, p, arm):
    assert cr.arm_name(mode, *alphas, p) == arm


def test_runs_of_two_dropout_probabilities_are_never_pooled(tmp_path):
    for seed in (1, 2):
        for p in (0.1, 0.2):
            write_run(tmp_path / f"d{p}_s{seed}", "dropout", seed, *CURVES, dropout_p=p)
            write_run(tmp_path / f"m{p}_s{seed}", "dropout-mdr", seed, *CURVES, dropout_p=p)
        # a bn run recording the flag's default, and one from before the flag: one cell
        default = {"dropout_p": 0.1} if seed == 1 else {}
        write_run(tmp_path / f"bn_s{seed}", "bn", seed, *CURVES, **default)
    runs = cr.read_runs(str(tmp_path))

    cells = cr.group_runs(runs)

    assert [key[0] for key in cells] == [
        "bn",
        "dropout p0.1",
        "dropout p0.2",
        "dropout-mdr p0.1",
        "dropout-mdr p0.2",
    ]
    assert all(len(cell) == 2 for cell in cells.values())
    assert {run["dropout_p"] for run in cells[("dropout p0.2", 0.2, 0.01, 0.1, "separate")]} == {
        0.2
    }
    assert {run["dropout_p"] for run in runs if run["mode"] == "bn"} == {None}
    labels = [cr.cell_label(key, []) for key in cells]
    assert labels[1:3] == ["dropout p0.1", "dropout p0.2"]
    assert len(cr.select_cells(runs, "p=0.2")) == 4
    assert {run["arm"] for run in cr.select_cells(runs, "mode=dropout p0.1")} == {"dropout p0.1"}


def test_a_run_from_before_the_flag_has_no_probability(tmp_path):
    # summary.json args without dropout_p (and no column): None, shown as p?
    write_run(tmp_path / "old", "dropout", 1, *CURVES)
    (run,) = cr.read_runs(str(tmp_path))

    assert run["dropout_p"] is None and run["arm"] == "dropout p?"


def test_the_probability_column_is_read_before_the_summary(tmp_path):
    folder = write_run(tmp_path / "killed", "dropout", 1, *CURVES, summary=False)
    lines = (folder / "metrics.csv").read_text().splitlines()
    lines = [lines[0] + ",dropout_p"] + [line + ",0.2" for line in lines[1:]]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")

    (run,) = cr.read_runs(str(tmp_path))

    assert run["dropout_p"] == 0.2 and run["arm"] == "dropout p0.2"


# --------------------------------------------------------------------------------------------------
# The dropout study's plan of runs (docs/dropout/PLAN.md, Study 1)


def test_dropout_study_runs_get_the_plans_arms(tmp_path):
    write_dropout_run(tmp_path, "none", 31, *CURVES)
    for p in (0.1, 0.2):
        write_dropout_run(tmp_path, "dropout", 31, *CURVES, p=p)
        write_dropout_run(tmp_path, "dropout-mdr", 31, *CURVES, p=p)
    # two killed runs that recorded no probability yet: not twins
    write_run(tmp_path / "k1", "dropout", 32, *CURVES, summary=False)
    write_run(tmp_path / "k2", "dropout", 32, *CURVES, summary=False)

    runs = cr.dropout_study_runs(cr.read_runs(str(tmp_path)))

    assert sorted(run["arm"] for run in runs) == [
        "dropout p0.1",
        "dropout p0.2",
        "dropout p?",
        "dropout p?",
        "dropout-mdr p0.1",
        "dropout-mdr p0.2",
        "none",
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: write_run(p / "bn_s31", "bn", 31, *CURVES),
            "bn_s31: --mode bn with 3 train-mode and 0 eval-mode epochs is not an arm of the plan",
        ),
        (
            lambda p: write_dropout_run(p, "dropout", 31, *CURVES, p=0.3),
            "dropout_p0.3_s31: dropout probability 0.3 is not the plan's (0.1 or 0.2)",
        ),
        (
            lambda p: write_run(p / "old", "dropout", 31, *CURVES),
            "old: dropout probability ? is not the plan's",
        ),
        (
            lambda p: write_dropout_run(p, "dropout", 43, *CURVES),
            "seed 43 is not one of the plan's seeds (31-42)",
        ),
        (
            lambda p: write_run(p / "again", "dropout", 31, *CURVES, dropout_p=0.1),
            "again and dropout_p0.1_s31: two runs of dropout p0.1, seed 31",
        ),
        (
            lambda p: write_dropout_run(p, "dropout-mdr", 31, *CURVES, clip_coef=0.3),
            "dropout-mdr_p0.1_s31: clip_coef 0.3: not the plan's regime",
        ),
    ],
)
def test_a_run_the_dropout_plan_does_not_have_is_a_config_error(tmp_path, make, message):
    write_dropout_run(tmp_path, "dropout", 31, *CURVES)
    make(tmp_path)

    with pytest.raises(cr.ConfigError) as error:
        cr.dropout_study_runs(cr.read_runs(str(tmp_path)))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_module_imports_alone(repo_root):
    """No import circle: each analysis module imports on its own (issue 24)."""
    for module in ("collapse_runs", "collapse_figures", "collapse_stats"):
        result = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, 'analysis'); import {module}"],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (module, result.stderr)


def kinds_run(segments, hosts, name="r_s1") -> dict:
    """A run dict with what start_kinds reads: its provenance segments and hosts.jsonl records.
    A segment's CPU string is "old" (no kind: scripts before 2026-12-04) or a kind's ("zen3")."""
    cpus = {
        "old": "AMD EPYC",
        "zen3": "AMD EPYC (cpu family 25, model 1, stepping 1), AVX2 kernels",
        "zen4": "AMD EPYC (cpu family 25, model 17, stepping 1), AVX512 kernels",
    }
    provenance = [{**PROVENANCE, "cpu": cpus[cpu]} for cpu in segments]
    return {"name": name, "provenance": provenance, "hosts": hosts}


K3, K4 = ("25", "1", "AVX2"), ("25", "17", "AVX512")
ZEN4_TEXT, ZEN3_TEXT = "family 25 model 17 (AVX512)", "family 25 model 1 (AVX2)"


@pytest.mark.parametrize(
    "segments, hosts, checks, expected",
    [
        # every start recorded by hosts.jsonl (its records are the last starts)
        (["old", "old"], [ZEN3, ZEN4], [], ({K3, K4}, "")),
        # the scripts' CPU string from 2026-12-04 on names the kind: no record needed
        (["zen3"], [], [], ({K3}, "")),
        # both name the start: they must agree
        (
            ["zen3"],
            [ZEN4],
            [],
            (None, f"start 1: hosts.jsonl says {ZEN4_TEXT}, its CPU string {ZEN3_TEXT}"),
        ),
        # a start stopped before its first checkpoint: a record without a segment
        (["old"], [ZEN4, ZEN4], [], ({K4}, "")),
        (
            ["old"],
            [ZEN3, ZEN4],
            [],
            (None, "hosts.jsonl records 2 starts, summary.json 1, and not all on one known kind"),
        ),
        # torch could not name its kernels: no kind
        (
            ["old"],
            [{**ZEN4, "torch_cpu_capability": "unknown"}],
            [],
            (None, "start 1 of 1 recorded without its CPU kind and not checked (cpu_kinds.jsonl)"),
        ),
        # the first start went unrecorded: a rerun that reproduced it places it
        (["old", "old"], [ZEN4], [kind_check("r_s1", True, ZEN4)], ({K4}, "")),
        # two checks that agree (one kind reproduces it, the other does not)
        (
            ["old", "old"],
            [ZEN4],
            [kind_check("r_s1", False, ZEN3), kind_check("r_s1", True, ZEN4)],
            ({K4}, ""),
        ),
        (
            ["old", "old"],
            [ZEN4],
            [],
            (None, "start 1 of 2 unrecorded and not checked (cpu_kinds.jsonl)"),
        ),
        (
            ["old"],
            [],
            [kind_check("r_s1", False, ZEN4)],
            (
                None,
                f"its first start is unrecorded, and its first 3 updates rerun on {ZEN4_TEXT} "
                "differ (cpu_kinds.jsonl)",
            ),
        ),
        # a check places the first start only
        (
            ["old", "old", "old"],
            [ZEN4],
            [kind_check("r_s1", True, ZEN4)],
            (None, "start 2 of 3 unrecorded"),
        ),
        (
            ["old", "old", "old"],
            [ZEN4],
            [kind_check("r_s1", False, ZEN3)],
            (None, "start 1, 2 of 3 unrecorded"),
        ),
        # checks that contradict each other, or the recorded first start, or another commit's
        (
            ["old"],
            [],
            [kind_check("r_s1", True, ZEN4), kind_check("r_s1", True, ZEN3)],
            (
                None,
                f"its checks on {ZEN3_TEXT} and {ZEN4_TEXT} contradict each other "
                "(cpu_kinds.jsonl)",
            ),
        ),
        (
            ["old"],
            [],
            [kind_check("r_s1", True, ZEN4), kind_check("r_s1", False, ZEN4)],
            (None, f"its checks on {ZEN4_TEXT} contradict each other (cpu_kinds.jsonl)"),
        ),
        (
            ["old"],
            [ZEN4],
            [kind_check("r_s1", True, ZEN3)],
            (
                None,
                f"its first start is recorded on {ZEN4_TEXT}, but its check reproduced on "
                f"{ZEN3_TEXT} (cpu_kinds.jsonl)",
            ),
        ),
        (
            ["old"],
            [ZEN4],
            [kind_check("r_s1", False, ZEN4)],
            (
                None,
                f"its first start is recorded on {ZEN4_TEXT}, but its check not reproduced "
                "(cpu_kinds.jsonl)",
            ),
        ),
        (
            ["old"],
            [],
            [kind_check("r_s1", True, ZEN4, commit="b" * 40)],
            (None, "its check reran commit bbbbbbb, not the run's aaaaaaa (cpu_kinds.jsonl)"),
        ),
        ([], [], [], (None, "no record of its starts")),
    ],
)
def test_the_cpu_kind_of_every_start(segments, hosts, checks, expected):
    assert cr.start_kinds(kinds_run(segments, hosts), checks) == expected


def test_kind_checks_are_read_and_matched_by_the_lists_run_name(tmp_path):
    """cpu_kinds.jsonl (sweeps/check_cpu_kind.py) names a run as its command list does
    (stability/none_s31); the analysis reads the runs folder docs/dropout/stability itself. A run
    checked twice keeps both records, in order."""
    first, second = kind_check("stability/none_s31", True, ZEN4), kind_check("none_s32", True, ZEN4)
    again = kind_check("stability/none_s31", False, ZEN3)
    lines = [json.dumps(record) for record in (first, second, again)]
    (tmp_path / "cpu_kinds.jsonl").write_text("\n".join(lines) + "\n")
    checks = cr.read_kind_checks(str(tmp_path))
    assert cr.run_checks(checks, "none_s31") == [first, again]
    assert cr.run_checks(checks, "stability/none_s31") == [first, again]
    assert cr.run_checks(checks, "none_s32") == [second]
    assert cr.run_checks(checks, "one_s31") == []  # a suffix of the name is not the run
    assert cr.read_kind_checks(str(tmp_path / "absent")) == {}


@pytest.mark.parametrize(
    "content",
    [
        "not json\n",
        '{"run": "a", "same": "yes", "commit": "c", "host": {}}\n',
        '{"run": "a", "same": true, "commit": "c"}\n',
        '{"run": "a", "same": true, "host": {"cpu_family": "25", "model": "1", '
        '"torch_cpu_capability": "AVX2"}}\n',
    ],
)
def test_a_corrupt_kind_check_file_is_one_line(tmp_path, content):
    (tmp_path / "cpu_kinds.jsonl").write_text(content)
    with pytest.raises(cr.ConfigError) as error:
        cr.read_kind_checks(str(tmp_path))
    assert str(error.value).startswith(f"{tmp_path / 'cpu_kinds.jsonl'}: ")
    assert "\n" not in str(error.value)
