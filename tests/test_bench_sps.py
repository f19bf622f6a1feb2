"""benchmarks/bench_sps.py's compute bound must time the network passes a script really makes in an
iteration, or its "update / bound" efficiency means nothing. Each test runs a script's main() on a
tiny config, records every pass through Agent.features (mode, batch size, gradient on or off) and
compares it with what the benchmark counts. Its SectionTimer (the scripts carry no timing code) must
charge each call to one section and cut iterations where main() logs them."""

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ppo_collapse_probe
import ppo_patchloc_mdr
import ppo_procgen_mdr

spec = importlib.util.spec_from_file_location(
    "bench_sps", Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sps.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture
def recorded_passes(monkeypatch):
    """Every Agent.features call of the three scripts, as (training, batch size, gradient
    enabled)."""
    passes = []
    for module in (ppo_procgen_mdr, ppo_patchloc_mdr, ppo_collapse_probe):
        original = module.Agent.features

        def features(self, x, original=original):
            passes.append((self.training, x.shape[0], torch.is_grad_enabled()))
            return original(self, x)

        monkeypatch.setattr(module.Agent, "features", features)
    threads = torch.get_num_threads()
    yield passes
    torch.set_num_threads(threads)


def run(module, args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    with contextlib.redirect_stdout(io.StringIO()):
        assert module.main(args) in (0, None)
    return args


def expected_iteration(script, module, args):
    """The rollout's inference passes (eval mode, no gradient), then the update section's passes as
    the benchmark counts them."""
    rollout = [(False, args.num_envs, False)] * (args.num_steps + 1)
    return rollout + bench.update_passes(script, module, args)


def test_update_passes_by_hand():
    args = ppo_patchloc_mdr.Args(
        num_envs=2, num_steps=35, minibatch_size=32, alpha1=2, alpha2=1, mdr_rounds=2
    )
    args.batch_size = 70  # minibatches of 32, 32 and 6
    train, rectify = (
        [(True, 32, True), (True, 32, True), (True, 6, True)],
        [(False, 32, True), (False, 32, True), (False, 6, True)],
    )
    # D_k chunks + bootstrap
    values = [
        (False, 32, False),
        (False, 32, False),
        (False, 6, False),
        (False, 2, False),
    ]
    assert (
        bench.update_passes("patchloc", ppo_patchloc_mdr, args)
        == train * 2 + rectify + values + train * 2 + rectify
    )


def test_bound_counts_the_procgen_script_passes(recorded_passes, tmp_path, monkeypatch):
    monkeypatch.setattr(
        ppo_procgen_mdr,
        "evaluate",
        lambda agent, args, device, iteration: np.zeros(args.num_eval_envs),
    )
    args = ppo_procgen_mdr.Args(
        num_envs=2,
        num_steps=16,
        minibatch_size=8,
        total_timesteps=64,
        num_eval_envs=2,
        eval_interval=0,
        pretrained=False,
        cuda=False,
        mdr_rounds=2,
        diag_minibatches=-1,
        diag_ratio_every=0,
    )
    run(ppo_procgen_mdr, args, tmp_path, monkeypatch)
    iteration = expected_iteration("procgen", ppo_procgen_mdr, args)
    assert (False, 8, False) in iteration  # the values recomputed before round 2
    assert recorded_passes == iteration * args.num_iterations


def test_bound_counts_the_patchloc_script_passes(recorded_passes, tmp_path, monkeypatch):
    args = ppo_patchloc_mdr.Args(
        num_envs=2,
        num_steps=16,
        minibatch_size=12,
        total_timesteps=64,
        num_tasks=4,
        num_test_tasks=4,
        view_size=16,
        image_size=64,
        num_eval_envs=2,
        num_render_episodes=0,
        hidden_size=32,
        mdr_rounds=2,
        eval_interval=0,
        pretrained=False,
        cuda=False,
        diag_minibatches=-1,
        diag_ratio_every=0,
    )
    run(ppo_patchloc_mdr, args, tmp_path, monkeypatch)
    # the ragged last minibatch
    assert (True, 8, True) in bench.update_passes("patchloc", ppo_patchloc_mdr, args)
    measured = expected_iteration("patchloc", ppo_patchloc_mdr, args) * args.num_iterations
    assert recorded_passes[: len(measured)] == measured
    # the evaluation
    assert all(not training and not grad for training, _, grad in recorded_passes[len(measured) :])


@pytest.mark.parametrize("mode", ["bn-mdr", "eval"])
def test_bound_counts_the_probe_gradient_passes(mode, recorded_passes, tmp_path, monkeypatch):
    """The probe's diagnostics cannot be switched off (they are its measurement): compare the passes
    with gradient."""
    args = ppo_collapse_probe.Args(
        mode=mode,
        num_envs=2,
        num_steps=10,
        minibatch_size=8,
        total_timesteps=40,
        num_tasks=2,
        view_size=16,
        image_size=64,
        hidden_size=32,
    )
    run(ppo_collapse_probe, args, tmp_path, monkeypatch)
    counted = [
        p for p in bench.update_passes("probe", ppo_collapse_probe, args) if p[2]
    ] * args.num_iterations
    assert [p for p in recorded_passes if p[2]] == counted
    assert len(counted) == 3 * 3 * args.num_iterations  # 3 epochs of minibatches 8, 8, 4


def test_section_timer_charges_a_nested_call_to_the_outer_section(monkeypatch):
    now = [0.0]
    # CPU: two busy threads
    monkeypatch.setattr(bench, "clocks", lambda: {"time": now[0], "cpu": 2 * now[0]})
    timer = bench.SectionTimer()
    timer.mark = bench.clocks()

    def advance(seconds):
        now[0] += seconds

    diagnostics = timer.wrap(lambda: advance(3), "diagnostics")
    update = timer.wrap(lambda: (advance(1), diagnostics(), advance(1)), "update")
    advance(2)  # other
    update()  # 5 s, its inner diagnostics call included
    diagnostics()  # 3 s
    timer.end_iteration()
    advance(4)
    timer.end_iteration()

    first, second = timer.iterations
    assert first["time"] == {"env": 0, "inference": 0, "update": 5, "diagnostics": 3, "other": 2}
    assert first["cpu"] == {"env": 0, "inference": 0, "update": 10, "diagnostics": 6, "other": 4}
    assert second["time"] == {"env": 0, "inference": 0, "update": 0, "diagnostics": 0, "other": 4}


def test_section_timer_times_each_iteration_of_a_procgen_run_and_unwraps(tmp_path, monkeypatch):
    monkeypatch.setattr(
        ppo_procgen_mdr, "evaluate", lambda agent, args, *rest: np.zeros(args.num_eval_envs)
    )
    args = ppo_procgen_mdr.Args(
        num_envs=2,
        num_steps=16,
        minibatch_size=8,
        total_timesteps=64,
        num_eval_envs=2,
        eval_interval=0,
        pretrained=False,
        cuda=False,
    )
    originals = (
        ppo_procgen_mdr.ppo_update,
        ppo_procgen_mdr.Agent.get_value,
        ppo_procgen_mdr.RunLogger.log,
    )
    timer = bench.SectionTimer()
    timer.instrument(ppo_procgen_mdr)
    try:
        run(ppo_procgen_mdr, args, tmp_path, monkeypatch)
    finally:
        timer.finish()

    assert len(timer.iterations) == args.num_iterations == 2
    for iteration in timer.iterations:
        assert all(
            iteration["time"][section] > 0
            for section in ("env", "inference", "update", "diagnostics")
        )
        assert iteration["time"]["other"] >= 0
    # the final evaluation, after the last iteration's log
    assert timer.iterations[-1]["evaluation"]["time"] > 0
    assert (
        ppo_procgen_mdr.ppo_update,
        ppo_procgen_mdr.Agent.get_value,
        ppo_procgen_mdr.RunLogger.log,
    ) == originals


BENCH = Path(bench.__file__)


def test_against_runs_each_config_on_both_checkouts_in_the_same_rounds(tmp_path):
    """--against CHECKOUT: every config also runs on that checkout's scripts (NAME@base), and the
    ratio table pairs them. The base here is a copy of this checkout's probe, so the worker must
    report the copy's file, not this checkout's (nor may an editable install's envs win)."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "ppo_collapse_probe.py").write_bytes(Path(ppo_collapse_probe.__file__).read_bytes())
    (base / "envs").symlink_to(Path(ppo_collapse_probe.__file__).parent / "envs")
    out = tmp_path / "bench.json"
    command = [sys.executable, str(BENCH), "--configs", "probe/bn", "--shape", "2,8,8"]
    command += ["--warmup", "0", "--iterations", "1", "--repeats", "1", "--against", str(base)]
    result = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(out.read_text())
    assert sorted(runs) == ["probe/bn", "probe/bn@base"]
    assert runs["probe/bn"][0]["script_file"] == ppo_collapse_probe.__file__
    assert runs["probe/bn@base"][0]["script_file"] == str(base / "ppo_collapse_probe.py")
    assert "| probe/bn: this checkout / base |" in result.stdout


def test_against_a_folder_without_the_scripts_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--configs", "probe/bn", "--against", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --against {tmp_path}: no ppo_collapse_probe.py there (not a checkout?)"
    ]
