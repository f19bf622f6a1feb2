"""Tests of the reward-collapse probe (ppo_collapse_probe.py): JS divergence, side-effect-free Delta pi, the collapse
detector on synthetic curves, the per-update CSV of a real run, bad input. The figures: tests/test_collapse_figures.py."""

import copy
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ppo_collapse_probe as probe

SCRIPT = Path(probe.__file__).resolve()
TINY = ["--num-envs", "2", "--num-steps", "16", "--minibatch-size", "8", "--total-timesteps", "64"]
TINY += ["--view-size", "16", "--image-size", "64", "--hidden-size", "32"]


def run_script(cwd, *args):
    """Run the script as a user would, in `cwd`; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parent), "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result, message):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and message in lines[0], lines[0]


def tiny_agent(mode="bn"):
    return probe.Agent(7, probe.Args(mode=mode, view_size=16, hidden_size=32))


def random_obs(n, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    return torch.randint(0, 256, (n, 3, 16, 16, 3), dtype=torch.uint8, generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# JS divergence


def test_js_divergence_of_identical_distributions_is_zero():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0], [5.0, 5.0, -3.0, 1.0]])
    assert torch.allclose(probe.js_divergence(logits, logits.clone()), torch.zeros(2), atol=1e-7)


def test_js_divergence_two_classes_matches_hand_value():
    p, q = (0.9, 0.1), (0.5, 0.5)
    m = (0.7, 0.3)
    expected = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + 0.5 * sum(
        qi * math.log(qi / mi) for qi, mi in zip(q, m)
    )
    logits_p, logits_q = torch.log(torch.tensor([p], dtype=torch.float64)), torch.log(torch.tensor([q], dtype=torch.float64))

    assert probe.js_divergence(logits_p, logits_q).item() == pytest.approx(expected, rel=1e-9)
    assert probe.js_divergence(logits_q, logits_p).item() == pytest.approx(expected, rel=1e-9)  # symmetric


def test_js_divergence_of_disjoint_distributions_is_ln2_and_never_above():
    logits_p = torch.tensor([[60.0, -60.0, -60.0], [-60.0, 60.0, -60.0]])
    logits_q = torch.tensor([[-60.0, 60.0, -60.0], [-60.0, -60.0, 60.0]])

    js = probe.js_divergence(logits_p, logits_q)

    assert torch.allclose(js, torch.full((2,), math.log(2.0)), atol=1e-6)
    assert torch.all(js <= math.log(2.0))


# ----------------------------------------------------------------------------------------------------------------------
# Delta pi: side-effect free


def test_policy_mismatch_has_no_side_effect_and_measures_the_bn_gap():
    torch.manual_seed(0)
    agent = tiny_agent("bn")
    b_obs = random_obs(24)
    agent.train()
    with torch.no_grad():  # a few train-mode passes so that the running stats are not the initial 0/1
        for _ in range(3):
            agent.get_value(b_obs[:8])
    agent.eval()
    state_before = copy.deepcopy(agent.state_dict())
    assert state_before["backbone.bn1.num_batches_tracked"].item() == 3
    rng_before = torch.get_rng_state()

    delta = probe.policy_mismatch(agent, b_obs, 8, torch.Generator().manual_seed(1))

    assert not agent.training  # mode restored
    state_after = agent.state_dict()
    assert state_after.keys() == state_before.keys()
    changed = [name for name in state_before if not torch.equal(state_before[name], state_after[name])]
    assert changed == [], f"policy_mismatch changed {changed}"
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert 0.0 < delta.item() <= math.log(2.0)  # train vs eval BatchNorm really differ here

    agent.train()
    probe.policy_mismatch(agent, b_obs, 8, torch.Generator().manual_seed(1))
    assert agent.training


def test_policy_mismatch_measures_every_minibatch_against_the_running_stats_it_was_called_with():
    """Each minibatch's two sides are those of eq. 6 at the call's running statistics: a train-mode pass moves them
    (momentum 0.1), so an eval-mode side computed after it, or after an earlier minibatch's, is measured off them."""
    torch.manual_seed(0)
    agent = tiny_agent("bn")
    b_obs = random_obs(24)
    with torch.no_grad():
        agent.actor[-1].weight.mul_(100.0)  # a peaked policy: at init delta_pi is too small to tell anything apart
        agent.train()
        for _ in range(3):
            agent.get_value(b_obs[:8])
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    expected = []
    for start in range(0, 24, 8):  # each minibatch on a fresh copy: nothing has moved its statistics
        with torch.no_grad():
            eval_copy, train_copy = copy.deepcopy(agent).eval(), copy.deepcopy(agent).train()
            mb_obs = b_obs[perm[start : start + 8]]
            eval_logits = eval_copy.actor(eval_copy.features(mb_obs))
            train_logits = train_copy.actor(train_copy.features(mb_obs))
        expected.append(probe.js_divergence(train_logits, eval_logits).mean().item())

    delta = probe.policy_mismatch(agent, b_obs, 8, torch.Generator().manual_seed(1))

    assert delta.item() == pytest.approx(np.mean(expected), rel=1e-5)
    assert delta.item() > 1e-3


def test_ppo_update_measures_r_at_the_running_stats_the_minibatch_started_with():
    """The ratio gap's r is the eval-mode ratio before the minibatch's train-mode pass, which moves the running
    statistics (momentum 0.5 here, so that the difference shows)."""
    torch.manual_seed(0)
    args = probe.Args(mode="bn", view_size=16, hidden_size=32, bn_momentum=0.5)
    agent = probe.Agent(7, args)
    obs, actions = random_obs(16), torch.randint(0, 7, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        agent.actor[-1].weight.mul_(100.0)  # a peaked policy, sensitive to the statistics it is normalized with
        agent.eval()
        _, logprobs, _, values = agent.get_action_and_value(obs, actions)
    agent.train()
    batch = {"obs": obs, "actions": actions, "logprobs": logprobs, "values": values.flatten()}
    batch.update(advantages=torch.randn(16), returns=torch.randn(16))
    reference = copy.deepcopy(agent)
    with torch.no_grad():
        expected_r = probe.eval_mode_ratio(reference, obs, actions, logprobs)
        _, train_logprob, _, _ = reference.get_action_and_value(obs, actions)
    expected_gap = ((train_logprob - logprobs).exp() - expected_r).abs().mean().item()
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)

    stats = probe.ppo_update(
        agent, optimizer, batch, torch.arange(16), args, True, probe.SectionTimer(False, torch.device("cpu"))
    )

    assert stats["ratio_gap"].item() == pytest.approx(expected_gap, rel=1e-4)
    assert expected_gap > 1e-3


def test_policy_mismatch_is_zero_for_eval_mode_batchnorm():
    torch.manual_seed(0)
    agent = tiny_agent("eval")

    delta = probe.policy_mismatch(agent, random_obs(16), 8, torch.Generator().manual_seed(1))

    assert delta.item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Collapse detector


def feed(curve, window=5, drop=0.5, min_best=30.0, recover_frac=0.8):
    detector = probe.CollapseDetector(window, drop, min_best, recover_frac)
    flags = [detector.update(iteration, value) for iteration, value in enumerate(curve, start=1)]
    return detector, [i for i, flag in enumerate(flags, start=1) if flag]


RISE_THEN_CRASH = list(np.linspace(0.0, 80.0, 20)) + [80.0] * 10 + [10.0] * 30  # crash starts at iteration 31


def test_detector_flags_a_sustained_crash_once_and_no_recovery():
    detector, flagged = feed(RISE_THEN_CRASH)

    # moving average of 5 at iterations 31, 32, 33: 66, 52, 38 -> first below 0.5 x 80 at 33
    assert flagged == [33]
    assert detector.collapses == [{"iteration": 33, "pre_collapse_best": pytest.approx(80.0), "recovery_iteration": None}]
    assert detector.in_collapse
    assert detector.best == pytest.approx(80.0)


@pytest.mark.parametrize("level, flagged", [(41.0, []), (39.0, [35])])
def test_detector_threshold_is_drop_times_the_running_best(level, flagged):
    # best 80, drop 0.5: a sustained fall to 41 stays above 40, a fall to 39 crosses it once the window is all 39
    curve = RISE_THEN_CRASH[:30] + [level] * 20

    assert feed(curve)[1] == flagged


def test_detector_waits_for_a_full_window():
    curve = [90.0] + [20.0] * 30  # a lucky first update: its partial average (90) must not become the best

    detector, flagged = feed(curve)

    assert flagged == []
    assert detector.best == pytest.approx(34.0)  # first full window: (90 + 4 x 20) / 5


def test_detector_records_the_recovery_iteration():
    curve = RISE_THEN_CRASH[:49] + [80.0] * 20  # back to 80 from iteration 50

    detector, flagged = feed(curve)

    # moving average at 50, 51, 52, 53: 24, 38, 52, 66 -> first >= 0.8 x 80 = 64 at 53
    assert flagged == [33]
    assert detector.collapses[0]["recovery_iteration"] == 53
    assert not detector.in_collapse


def test_detector_flags_a_second_collapse_after_a_recovery():
    curve = RISE_THEN_CRASH[:49] + [80.0] * 20 + [0.0] * 10

    detector, flagged = feed(curve)

    assert flagged == [33, 72]  # moving average at 69, 70, 71, 72: 80, 64, 48, 32
    assert [event["recovery_iteration"] for event in detector.collapses] == [53, None]


def test_detector_ignores_a_noisy_but_stable_curve():
    rng = np.random.default_rng(0)
    curve = list(60.0 + rng.uniform(-25.0, 25.0, size=300))

    detector, flagged = feed(curve, window=10)

    assert flagged == [] and detector.collapses == []
    assert 60.0 < detector.best < 85.0


def test_detector_needs_the_best_above_min_best():
    curve = list(np.linspace(0.0, 25.0, 20)) + [0.0] * 30  # falls to 0, but its best (25) never reached 30

    detector, flagged = feed(curve)

    assert flagged == [] and detector.collapses == []


def test_detector_skips_updates_without_episodes():
    curve = RISE_THEN_CRASH[:30] + [float("nan")] * 5 + [10.0] * 10

    detector, flagged = feed(curve)

    assert flagged == [38]  # the NaN updates (31..35) neither count in the average nor advance it
    assert math.isfinite(detector.smoothed)


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    "overrides, alphas",
    [
        (dict(mode="bn"), (3, 0)),
        (dict(mode="eval"), (3, 0)),
        (dict(mode="bn-mdr"), (2, 1)),
        (dict(mode="bn-mdr", update_epochs=6), (4, 2)),
        (dict(mode="bn-mdr", alpha1=1), (1, 2)),
        (dict(mode="bn-mdr", alpha2=3), (0, 3)),
        (dict(mode="bn-mdr", alpha1=4, alpha2=2, update_epochs=6), (4, 2)),
    ],
)
def test_phase_epochs_keep_the_total_fixed(overrides, alphas):
    assert probe.validate_args(probe.Args(**overrides)) == alphas


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mode="foo"), "--mode foo"),
        (dict(mode="bn", alpha2=1), "bn-mdr only"),
        (dict(mode="bn-mdr", alpha1=3, alpha2=1), "--alpha1 3 --alpha2 1"),
        (dict(mode="bn-mdr", alpha1=3), "--alpha1 3 --alpha2 0"),
        (dict(mode="bn-mdr", alpha2=4), "--alpha1 -1 --alpha2 4"),
        (dict(update_epochs=0), "--update-epochs 0"),
        (dict(minibatch_size=1000), "--minibatch-size 1000"),
        (dict(collapse_drop=0.5, recover_frac=0.4), "--recover-frac 0.4"),
        (dict(collapse_drop=1.0), "--collapse-drop 1.0"),
        (dict(clip_coef=0.0), "--clip-coef"),
    ],
)
def test_validate_args_rejects_bad_input(overrides, message):
    with pytest.raises(probe.ConfigError) as error:
        probe.validate_args(probe.Args(**overrides))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "args, message",
    [(["--mode", "foo"], "--mode foo"), (["--mode", "bn-mdr", "--alpha1", "3", "--alpha2", "1"], "--alpha1 3 --alpha2 1")],
    ids=["unknown-mode", "alphas-not-summing-to-epochs"],
)
def test_cli_bad_input_is_one_line_error(args, message, tmp_path):
    result = run_script(tmp_path, *TINY, *args)

    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------------
# A real (tiny) run: the CSV and the summary


def test_tiny_run_writes_one_csv_row_per_update_and_a_summary(tmp_path):
    result = run_script(tmp_path, *TINY, "--mode", "bn-mdr", "--clip-coef", "0.05", "--seed", "3")

    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    (run_dir,) = (tmp_path / "runs").iterdir()
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == probe.CSV_COLUMNS
    assert [int(row["iteration"]) for row in rows] == [1, 2]  # 64 steps / (2 envs x 16 steps)
    assert [int(row["global_step"]) for row in rows] == [32, 64]
    assert {(row["mode"], float(row["clip_coef"]), float(row["ent_coef"]), row["seed"]) for row in rows} == {
        ("bn-mdr", 0.05, 0.01, "3")
    }
    assert {(row["alpha1"], row["alpha2"]) for row in rows} == {("2", "1")}
    for row in rows:
        for column in ("delta_pi_minus", "delta_pi_plus", "ratio_gap", "trust_region_violation", "entropy", "approx_kl"):
            assert math.isfinite(float(row[column])), column
        assert 0.0 <= float(row["delta_pi_minus"]) <= math.log(2.0)
        assert 0.0 <= float(row["trust_region_violation"]) <= 1.0
        assert row["collapse_flag"] == "0" and row["collapse_count"] == "0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iterations"] == 2
    assert summary["collapse_iterations"] == [] and summary["recovery_iterations"] == []
    deltas = [float(row["delta_pi_minus"]) for row in rows]
    assert summary["peak_delta_pi_minus"] == pytest.approx(max(deltas), rel=1e-5)
    assert summary["peak_delta_pi_minus_iteration"] == 1 + int(np.argmax(deltas))
    assert summary["final_reward"] == pytest.approx(float(rows[-1]["smoothed_reward"]), rel=1e-5, nan_ok=True)
    assert list(run_dir.glob("events.out.tfevents.*"))


def test_non_finite_loss_stops_the_run_and_keeps_csv_and_summary(tmp_path, monkeypatch):
    original = probe.clipped_ppo_loss

    def nan_loss(*args, **kwargs):
        loss, ratio, stats = original(*args, **kwargs)
        return loss * float("nan"), ratio, stats

    monkeypatch.setattr(probe, "clipped_ppo_loss", nan_loss)
    monkeypatch.chdir(tmp_path)
    args = probe.Args(
        mode="bn", num_envs=2, num_steps=16, minibatch_size=8, total_timesteps=64, view_size=16, image_size=64, hidden_size=32
    )

    assert probe.main(args) == 1

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "metrics.csv").read_text().strip().splitlines() == [",".join(probe.CSV_COLUMNS)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "non-finite loss" and summary["iterations"] == 0


def test_sigterm_keeps_the_finished_updates_and_writes_the_summary(tmp_path, monkeypatch):
    original, calls = probe.policy_mismatch, []

    def terminate_in_second_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Delta pi minus of update 2: update 1 is complete, update 2 is not
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(probe, "policy_mismatch", terminate_in_second_update)
    monkeypatch.chdir(tmp_path)
    handler_before = signal.getsignal(signal.SIGTERM)
    args = probe.Args(
        mode="bn", num_envs=2, num_steps=16, minibatch_size=8, total_timesteps=160, view_size=16, image_size=64, hidden_size=32
    )

    assert probe.main(args) == 130

    assert signal.getsignal(signal.SIGTERM) is handler_before
    (run_dir,) = (tmp_path / "runs").iterdir()
    with open(run_dir / "metrics.csv", newline="") as f:
        assert [row["iteration"] for row in csv.DictReader(f)] == ["1"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["iterations"] == 1
