"""Tests of ppo_procgen_mdr.py: unit tests on tiny tensors, tiny runs of main() in-process (held-out
evaluation stubbed out where it is not the subject), the command line in-process through runpy, and
one run as a real subprocess.

Every run works in a temporary directory (monkeypatch.chdir / cwd=), so its runs/ and wandb/ folders
land there."""

import contextlib
import copy
import io
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import types
import urllib.error
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
import tyro
from conftest import STOP_SIGNALS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_procgen_mdr as ppo

SCRIPT = Path(ppo.__file__).resolve()
NUM_ACTIONS = 15  # Procgen's action space
NORMS = ["bn", "eval", "brn", "ln", "gn", "none", "dropout"]
MODE_FREE_NORMS = {"eval", "ln", "gn", "none"}
# the command line of one iteration of 2 envs x 32 steps (4 minibatches of 16), CPU, random init
TINY = (
    "--num-envs 2 --num-steps 32 --minibatch-size 16 --total-timesteps 64 "
    "--num-eval-envs 2 --eval-interval 0 --no-pretrained --no-cuda"
).split()
TB_KEYS = [
    "charts/episodic_return",
    "charts/normalized_score",
    "charts/episodic_length",
    "charts/learning_rate",
    "charts/SPS",
    "charts/delta_pi_minus",
    "charts/delta_pi_plus",
    "charts/test_episodic_return",
    "charts/test_normalized_score",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "losses/standard/policy_loss",
    "losses/rectify/policy_loss",
    "mdr/ratio_gap",
    "mdr/trust_region_violation",
    "mdr/trust_region_violation_signed",
]
IMAGENET_FILE = "resnet18-f37072fd.pth"
# 2 envs x 8 steps, 2 minibatches of 8
ONE_SHORT_ROLLOUT = dict(num_steps=8, minibatch_size=8, total_timesteps=16)


# --------------------------------------------------------------------------------------------------
# helpers


def tiny_args(**overrides) -> ppo.Args:
    """Valid in-process arguments: one iteration of 2 envs x 16 steps (2 minibatches of 16), CPU,
    random init."""
    fields = dict(
        num_envs=2,
        num_steps=16,
        minibatch_size=16,
        total_timesteps=32,
        num_eval_envs=2,
        eval_interval=0,
        pretrained=False,
        cuda=False,
    )
    return ppo.Args(**{**fields, **overrides})


def stub_evaluate(monkeypatch):
    """The held-out evaluation plays until each env's first episode ends: seconds per call on CPU,
    so runs that do not test it get a stand-in (its own test is
    test_evaluate_is_a_function_of_the_parameters)."""
    monkeypatch.setattr(
        ppo, "evaluate", lambda agent, args, device, iteration: np.zeros(args.num_eval_envs)
    )


def run_main(cwd, monkeypatch, args: ppo.Args):
    """main(args) in `cwd` with the evaluation stubbed out; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    stub_evaluate(monkeypatch)
    # not a TTY: the plain progress line per iteration
    stdout, stderr = (
        io.StringIO(),
        io.StringIO(),
    )
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        exit_code = ppo.main(args)
    return exit_code, stdout.getvalue(), stderr.getvalue()


def run_cli(cwd, monkeypatch, *argv):
    """The script as `python ppo_procgen_mdr.py ARGV` would run it, in-process (runpy: no
    interpreter start-up, no import of torch); returns its exit status."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return exit_info.value.code


def assert_one_line_error(exit_code, capsys, *fragments) -> str:
    """What the user sees: exit status 2 with one line 'error: ...' on stderr (cli()), nothing else
    there; returns the line."""
    stderr = capsys.readouterr().err
    assert exit_code == 2, f"exit status {exit_code!r}, stderr:\n{stderr}"
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)
    return stderr


def run_script(cwd, *args, script=SCRIPT, timeout=300):
    """Run the script as a user would, in a fresh interpreter in `cwd`; returns the
    CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def single_run_dir(cwd) -> Path:
    run_dirs = list((Path(cwd) / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


def read_scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} from every TensorBoard event file of a run folder (a resumed run
    has several)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def load_checkpoint(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def make_agent(norm="bn", seed=0, **overrides) -> ppo.Agent:
    torch.manual_seed(seed)
    return ppo.Agent(NUM_ACTIONS, tiny_args(norm=norm, **overrides))


def random_obs(n=16, seed=0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def make_minibatch(agent, n=16, seed=0) -> dict:
    """A minibatch whose old log-probs, logits and values are the agent's eval-mode outputs (as in
    collection)."""
    generator = torch.Generator().manual_seed(seed)
    obs = random_obs(n, seed)
    actions = torch.randint(0, NUM_ACTIONS, (n,), generator=generator)
    with ppo.temporary_mode(agent, training=False), torch.no_grad():
        policy, values = agent.get_policy_and_value(obs)
    return {
        "obs": obs,
        "actions": actions,
        "logprobs": policy.log_prob(actions),
        "logits": policy.logits,
        "advantages": torch.randn(n, generator=generator),
        "returns": torch.randn(n, generator=generator),
        "values": values.flatten(),
    }


def clone_state(module: nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed_entries(before: dict, module_or_state) -> list:
    after = (
        module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    )
    return [name for name, tensor in after.items() if not torch.equal(before[name], tensor)]


def running_stat_names(module: nn.Module) -> list:
    return [
        name for name, _ in module.named_buffers() if name.endswith(("running_mean", "running_var"))
    ]


def progress_lines(stdout: str) -> list:
    """The plain per-iteration lines as dicts: 'iteration=1/2, global_step=32, ...' -> {'iteration':
    '1/2', ...}."""
    lines = [line for line in stdout.splitlines() if line.startswith("iteration=")]
    return [dict(field.split("=") for field in line.split(", ")) for line in lines]


# --------------------------------------------------------------------------------------------------
# 1. GAE, and the advantages of MDR rounds 2..R


def test_compute_gae_matches_hand_computed_values():
    gamma, gae_lambda = 0.9, 0.5  # gamma * lambda = 0.45
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # (num_steps=3, num_envs=2)
    values = torch.tensor([[0.5, 1.0], [0.2, 0.4], [0.3, 0.6]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # env 0: obs[1] starts a new episode
    next_value = torch.tensor([[0.7, 0.8]])
    # env 1: the observation after the rollout starts a new episode
    next_done = torch.tensor([0.0, 1.0])

    advantages, returns = ppo.compute_gae(
        rewards, values, dones, next_value, next_done, gamma, gae_lambda
    )

    # env 0: t=2: delta = 1 + 0.9*0.7 - 0.3 = 1.33              -> A = 1.33
    #        t=1: delta = 0 + 0.9*0.3 - 0.2 = 0.07 (dones[2]=0) -> A = 0.07 + 0.45*1.33 = 0.6685
    #        t=0: dones[1]=1 cuts the bootstrap: delta = 1 - 0.5 = 0.5 -> A = 0.5
    # env 1: t=2: next_done=1 cuts the bootstrap: delta = 1 - 0.6 = 0.4 -> A = 0.4
    #        t=1: delta = 2 + 0.9*0.6 - 0.4 = 2.14              -> A = 2.14 + 0.45*0.4 = 2.32
    #        t=0: delta = 0 + 0.9*0.4 - 1.0 = -0.64             -> A = -0.64 + 0.45*2.32 = 0.404
    expected_advantages = torch.tensor([[0.5, 0.404], [0.6685, 2.32], [1.33, 0.4]])
    # returns = advantages + values
    expected_returns = torch.tensor([[1.0, 1.404], [0.8685, 2.72], [1.63, 1.0]])
    torch.testing.assert_close(advantages, expected_advantages, rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, expected_returns, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", ["bn", "dropout"])
def test_recompute_advantages_uses_the_eval_mode_critic(norm):
    """Rounds 2..R: values of D_k and the bootstrap value of the state after it from the eval-mode
    critic, whatever mode the last phase left (train mode with --alpha2 0), and without moving any
    running statistic."""
    num_steps, num_envs = 3, 8
    agent = make_agent(norm)
    obs, next_obs = random_obs(num_steps * num_envs), random_obs(num_envs, seed=1)
    generator = torch.Generator().manual_seed(2)
    rewards, dones = (
        torch.randn(num_steps, num_envs, generator=generator),
        torch.zeros(num_steps, num_envs),
    )
    next_done = torch.zeros(num_envs)
    agent.eval()
    with torch.no_grad():
        expected_values = agent.get_value(obs).flatten()
        expected_next_value = agent.get_value(next_obs).reshape(1, -1)
    expected_advantages, expected_returns = ppo.compute_gae(
        rewards,
        expected_values.view(num_steps, num_envs),
        dones,
        expected_next_value,
        next_done,
        0.999,
        0.95,
    )
    agent.train()  # e.g. after a standard phase with --alpha2 0
    before = clone_state(agent)

    recomputed = ppo.recompute_advantages(
        agent,
        {"obs": obs},
        rewards,
        dones,
        next_obs,
        next_done,
        tiny_args(minibatch_size=16),  # in chunks of 16 and 8
    )

    torch.testing.assert_close(recomputed["values"], expected_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        recomputed["advantages"], expected_advantages.reshape(-1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        recomputed["returns"], expected_returns.reshape(-1), rtol=1e-5, atol=1e-5
    )
    assert agent.training
    assert changed_entries(before, agent) == []  # no running-stat update


# --------------------------------------------------------------------------------------------------
# 2. The mode of every phase: collection, standard and rectification phases, value recomputation
#    (main in-process)


@pytest.mark.parametrize(
    "alpha1, alpha2, rounds, minibatch_size, collect_mode",
    [
        (2, 1, 1, 8, "eval"),
        (1, 2, 1, 8, "eval"),
        (3, 0, 1, 8, "eval"),
        (2, 1, 2, 8, "eval"),
        (3, 0, 2, 8, "eval"),
        (2, 1, 1, 12, "eval"),  # 12 does not divide |D_k| = 16: minibatches of 12 and 4
        (2, 1, 2, 8, "train"),
    ],
)
def test_mode_sequence_of_one_update(
    alpha1, alpha2, rounds, minibatch_size, collect_mode, tmp_path, monkeypatch
):
    events, rollout_modes, value_modes = [], [], []
    original_update, original_recompute = ppo.ppo_update, ppo.recompute_advantages
    original_get_action_and_value, original_get_value = (
        ppo.Agent.get_action_and_value,
        ppo.Agent.get_value,
    )
    original_get_policy_and_value = ppo.Agent.get_policy_and_value
    inside_get_action_and_value = []

    def recording_update(agent, optimizer, mb, *args, **kwargs):
        events.append(("train" if agent.training else "eval", len(mb["obs"])))
        return original_update(agent, optimizer, mb, *args, **kwargs)

    def recording_recompute(agent, *args, **kwargs):
        events.append(("recompute", agent.training))
        return original_recompute(agent, *args, **kwargs)

    def recording_get_action_and_value(
        self, x, action=None
    ):  # the update's and the ratio gap's passes
        inside_get_action_and_value.append(True)
        try:
            return original_get_action_and_value(self, x, action)
        finally:
            inside_get_action_and_value.pop()

    def recording_get_policy_and_value(self, x):
        if not inside_get_action_and_value:
            # called directly: rollout collection (evaluate is stubbed out)
            rollout_modes.append((self.training, torch.is_grad_enabled()))
        return original_get_policy_and_value(self, x)

    def recording_get_value(self, x):  # the bootstrap value and recompute_advantages' critic passes
        value_modes.append((self.training, torch.is_grad_enabled()))
        return original_get_value(self, x)

    monkeypatch.setattr(ppo, "ppo_update", recording_update)
    monkeypatch.setattr(ppo, "recompute_advantages", recording_recompute)
    monkeypatch.setattr(ppo.Agent, "get_action_and_value", recording_get_action_and_value)
    monkeypatch.setattr(ppo.Agent, "get_policy_and_value", recording_get_policy_and_value)
    monkeypatch.setattr(ppo.Agent, "get_value", recording_get_value)
    args = tiny_args(
        alpha1=alpha1,
        alpha2=alpha2,
        mdr_rounds=rounds,
        collect_mode=collect_mode,
        **ONE_SHORT_ROLLOUT,
    )
    args.minibatch_size = minibatch_size

    assert run_main(tmp_path, monkeypatch, args)[0] == 0

    # |D_k| = 16
    sizes = [min(minibatch_size, 16 - start) for start in range(0, 16, minibatch_size)]
    one_round = [("train", size) for size in sizes] * alpha1 + [
        ("eval", size) for size in sizes
    ] * alpha2
    expected = one_round + ([("recompute", alpha2 == 0)] + one_round) * (rounds - 1)
    assert events == expected
    collecting_in_train_mode = collect_mode == "train"
    assert rollout_modes == [(collecting_in_train_mode, False)] * args.num_steps  # under no_grad
    # the bootstrap value after the rollout (in the collection's mode), then per extra round the
    # eval-mode critic on D_k (|D_k|/m chunks) and on the state after it
    chunks = len(sizes)
    assert value_modes == [(collecting_in_train_mode, False)] + [(False, False)] * (rounds - 1) * (
        chunks + 1
    )


# --------------------------------------------------------------------------------------------------
# 3. BN running statistics: moved by the standard phase only


@pytest.mark.parametrize(
    "norm, moves_in_train_mode", [("bn", True), ("brn", True), ("eval", False)]
)
def test_running_stats_move_only_in_standard_phase(norm, moves_in_train_mode):
    agent = make_agent(norm)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    mb = make_minibatch(agent)
    stat_names = running_stat_names(agent)
    assert stat_names, "the backbone should have running statistics"
    args = tiny_args(norm=norm)

    # standard phase, with the ratio gap measured as the loop does on its k-th minibatches
    agent.train()
    before = clone_state(agent)
    ppo.ppo_update(agent, optimizer, mb, args, ppo.eval_mode_ratio(agent, mb))
    moved = [name for name in stat_names if name in changed_entries(before, agent)]
    assert bool(moved) == moves_in_train_mode, moved
    if moves_in_train_mode:
        assert moved == stat_names  # every running mean and variance
    assert agent.training, "the ratio-gap measurement must leave the agent in train mode"

    agent.eval()  # rectification phase
    before = clone_state(agent)
    ppo.ppo_update(agent, optimizer, mb, args)
    changed = changed_entries(before, agent)
    # stats and num_batches_tracked
    assert not [name for name in changed if name in dict(agent.named_buffers())]
    # ... while the parameters (affine ones too) still learn
    assert "backbone.bn1.weight" in changed


def test_temporary_mode_restores_the_mode_even_on_error():
    agent = make_agent("bn")
    for training in (True, False):
        agent.train(not training)
        with ppo.temporary_mode(agent, training) as inside:
            assert inside is agent and agent.training == training
            assert all(module.training == training for module in agent.modules())
        assert agent.training == (not training)
    agent.eval()
    with pytest.raises(RuntimeError), ppo.temporary_mode(agent, True):
        raise RuntimeError
    assert not agent.training


# --------------------------------------------------------------------------------------------------
# 4. Diagnostics are side-effect free; Delta pi minus is read from the rollout


@pytest.mark.parametrize("training", [True, False], ids=["from-train-mode", "from-eval-mode"])
@pytest.mark.parametrize("norm", ["bn", "brn", "dropout"])
def test_policy_mismatch_has_no_side_effects(norm, training):
    agent = make_agent(norm)
    agent.train(training)
    b_obs = random_obs(32, seed=1)
    before = clone_state(agent)
    rng_state = torch.get_rng_state()

    delta_pi = ppo.policy_mismatch(agent, b_obs, 16, 0, torch.Generator().manual_seed(0))

    after_rand = torch.rand(3)
    torch.set_rng_state(rng_state)
    assert torch.equal(after_rand, torch.rand(3)), "the global torch RNG stream moved"
    assert changed_entries(before, agent) == []  # parameters, running stats, num_batches_tracked
    assert agent.training == training
    # a freshly initialised mode-dependent network: the train- and eval-mode policies differ, within
    # JS's bounds
    assert 0.0 < delta_pi.item() <= math.log(2)


def test_policy_mismatch_counts_its_minibatches(monkeypatch):
    """num_minibatches: 0 = all of D_k (here 2 of 16), n = the first n of a shuffled order, -1 = off
    (None, no pass)."""
    agent = make_agent("bn")
    b_obs = random_obs(32, seed=1)
    original_features = ppo.Agent.features
    passes = []

    def recording_features(self, x):
        passes.append(len(x))
        return original_features(self, x)

    monkeypatch.setattr(ppo.Agent, "features", recording_features)
    for num_minibatches, expected_passes in [(0, 4), (1, 2), (2, 4), (5, 4), (-1, 0)]:
        passes.clear()
        delta_pi = ppo.policy_mismatch(
            agent, b_obs, 16, num_minibatches, torch.Generator().manual_seed(0)
        )
        # an eval-mode and a train-mode pass per minibatch
        assert passes == [16] * expected_passes, num_minibatches
        assert (delta_pi is None) == (num_minibatches == -1)


@pytest.mark.parametrize("norm", ["bn", "brn", "dropout"])
def test_policy_mismatch_with_known_eval_logits_matches_and_saves_the_eval_pass(norm, monkeypatch):
    agent = make_agent(norm)
    with torch.no_grad():
        # a peaked policy: at init (logits ~0.01) delta_pi ~1e-6 is at the level of float rounding
        agent.actor[-1].weight.mul_(100.0)
    b_obs = random_obs(32, seed=1)
    agent.eval()
    with torch.no_grad():
        # the eval-mode logits computed as the rollout does: 8 envs per step, not minibatches of 16
        b_eval_logits = torch.cat(
            [agent.get_policy_and_value(b_obs[i : i + 8])[0].logits for i in range(0, 32, 8)]
        )
    agent.train()
    original_features = ppo.Agent.features
    modes = []

    def recording_features(self, x):
        modes.append(self.training)
        return original_features(self, x)

    monkeypatch.setattr(ppo.Agent, "features", recording_features)
    computed = ppo.policy_mismatch(agent, b_obs, 16, 0, torch.Generator().manual_seed(0))
    # per minibatch: an eval-mode, then a train-mode pass
    assert modes == [
        False,
        True,
        False,
        True,
    ]
    modes.clear()
    before = clone_state(agent)
    given = ppo.policy_mismatch(
        agent, b_obs, 16, 0, torch.Generator().manual_seed(0), b_eval_logits=b_eval_logits
    )
    assert modes == [True, True]  # the eval-mode side is read, not recomputed
    assert changed_entries(before, agent) == [] and agent.training
    assert given.item() == pytest.approx(computed.item(), rel=1e-3)
    assert given.item() > 1e-4


@pytest.mark.parametrize("collect_mode", ["eval", "train"])
def test_rollout_stores_the_collecting_policy(collect_mode, tmp_path, monkeypatch):
    """What main stores per step is the output of the network that collected D_k, in the
    collection's mode, on exactly that step's observations: --collect-mode eval (the paper's): the
    eval-mode policy at theta_k (eq. 6's behaviour policy, also Delta pi minus's eval-mode side);
    --collect-mode train: the train-mode policy with the batch statistics of that step's env batch.
    A wrong mode, a step misaligned with its observation, or a stale network would differ."""
    calls, snapshots, batches, given_logits = [], [], [], []
    original_mismatch, original_scalars = ppo.policy_mismatch, ppo.iteration_scalars

    def recording_mismatch(
        agent, b_obs, minibatch_size, num_minibatches, generator, b_eval_logits=None
    ):
        calls.append(num_minibatches)
        if len(calls) % 2 == 1:
            # the first call of an iteration: Delta pi minus, before the update (then plus)
            snapshots.append(copy.deepcopy(agent))
            # a view of the rollout
            given_logits.append(None if b_eval_logits is None else b_eval_logits.clone())
        return original_mismatch(
            agent, b_obs, minibatch_size, num_minibatches, generator, b_eval_logits
        )

    def recording_scalars(args, optimizer, finished, phase_stats, batch, delta_pi):
        batches.append({key: value.clone() for key, value in batch.items()})
        return original_scalars(args, optimizer, finished, phase_stats, batch, delta_pi)

    monkeypatch.setattr(ppo, "policy_mismatch", recording_mismatch)
    monkeypatch.setattr(ppo, "iteration_scalars", recording_scalars)
    # two iterations: the second one's rollout comes from an updated network; Delta pi off (its call
    # is still made)
    args = tiny_args(
        num_steps=8,
        total_timesteps=32,
        collect_mode=collect_mode,
        diag_minibatches=-1,
        diag_ratio_every=0,
    )

    assert run_main(tmp_path, monkeypatch, args)[0] == 0

    assert len(snapshots) == len(batches) == 2
    for theta_k, batch, logits in zip(snapshots, batches, given_logits):
        theta_k.train(collect_mode == "train")
        with torch.no_grad():
            # one forward per rollout step (env batch of num_envs), as in collection
            steps = [theta_k.get_policy_and_value(obs) for obs in batch["obs"].split(args.num_envs)]
        recomputed_logits = torch.cat([policy.logits for policy, _ in steps])
        recomputed_values = torch.cat([value.flatten() for _, value in steps])
        recomputed_logprobs = torch.cat(
            [
                policy.log_prob(action)
                for (policy, _), action in zip(steps, batch["actions"].split(args.num_envs))
            ]
        )
        torch.testing.assert_close(batch["logprobs"], recomputed_logprobs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch["values"], recomputed_values, rtol=1e-4, atol=1e-5)
        if collect_mode == "eval":
            # the minibatches never need them: only Delta pi minus reads the rollout's
            assert "logits" not in batch
            torch.testing.assert_close(logits, recomputed_logits, rtol=1e-4, atol=1e-5)
        else:
            # train-mode logits are no eval-mode side: Delta pi minus computes its own
            assert logits is None
            # the test can tell: the whole of D_k in one batch gives other batch statistics, eval
            # mode other outputs
            with torch.no_grad():
                whole_batch = theta_k.get_policy_and_value(batch["obs"])[0].log_prob(
                    batch["actions"]
                )
                theta_k.eval()
                eval_mode = theta_k.get_policy_and_value(batch["obs"])[0].log_prob(batch["actions"])
            assert not torch.allclose(batch["logprobs"], whole_batch, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(batch["logprobs"], eval_mode, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["from-train-mode", "from-eval-mode"])
@pytest.mark.parametrize("norm", ["bn", "brn", "dropout"])
def test_eval_mode_ratio_has_no_side_effects(norm, training):
    agent = make_agent(norm)
    mb = make_minibatch(agent)
    agent.train(training)
    before = clone_state(agent)
    rng_state = torch.get_rng_state()

    eval_ratio = ppo.eval_mode_ratio(agent, mb)

    after_rand = torch.rand(3)
    torch.set_rng_state(rng_state)
    assert torch.equal(after_rand, torch.rand(3)), "the global torch RNG stream moved"
    assert changed_entries(before, agent) == []
    assert agent.training == training
    # old log-probs = the eval-mode log-probs (make_minibatch): r is 1 however the agent was left
    torch.testing.assert_close(eval_ratio, torch.ones(16), rtol=0, atol=1e-5)


def test_trust_region_diagnostics_values():
    agent = make_agent("bn")
    mb = make_minibatch(agent)
    agent.train()
    inside = torch.ones(16)  # r' = 1: inside [0.8, 1.2]
    advantages = torch.ones(16)

    same = ppo.trust_region_diagnostics(inside, ppo.eval_mode_ratio(agent, mb), advantages, 0.2)
    assert same["ratio_gap"].item() == pytest.approx(0.0, abs=1e-5)
    assert same["trust_region_violation"].item() == 0.0
    assert same["trust_region_violation_signed"].item() == 0.0

    # old log-probs lowered by 0.5: r = e^0.5 ~ 1.65 lies outside [0.8, 1.2] for every sample,
    # r' = 1 inside
    shifted_ratio = ppo.eval_mode_ratio(agent, {**mb, "logprobs": mb["logprobs"] - 0.5})
    shifted = ppo.trust_region_diagnostics(inside, shifted_ratio, advantages, 0.2)
    assert shifted["ratio_gap"].item() == pytest.approx(math.exp(0.5) - 1.0, rel=1e-4)
    assert shifted["trust_region_violation"].item() == 1.0
    # A > 0 and r > 1 + eps: the clip would stop it
    assert shifted["trust_region_violation_signed"].item() == 1.0

    half = ppo.trust_region_diagnostics(
        torch.tensor([1.0, 1.0, 1.5, 1.5]), torch.tensor([1.0, 1.5, 1.0, 1.5]), torch.ones(4), 0.2
    )
    assert half["trust_region_violation"].item() == 0.25  # only r' inside with r outside counts
    assert half["ratio_gap"].item() == pytest.approx(0.25)


def test_trust_region_violation_signed_follows_the_sign_of_the_advantage():
    """The clip stops a sample's gradient when r > 1 + eps with A > 0, or r < 1 - eps with A < 0.
    Counted: stopped under the eval-mode r but not under the optimized r'. r' = 1 everywhere (never
    stopped); r per sample below."""
    eval_ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 1.5, 0.5])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.0, 0.0])
    # stopped under r: sample 0 (A > 0, r > 1.2) and sample 3 (A < 0, r < 0.8); A = 0 is stopped by
    # neither
    diagnostics = ppo.trust_region_diagnostics(torch.ones(8), eval_ratio, advantages, 0.2)
    assert diagnostics["trust_region_violation_signed"].item() == 2 / 8
    assert diagnostics["trust_region_violation"].item() == 6 / 8  # the unsigned count ignores A

    # r' itself stopped on the same side: not a violation; r' = 1.5 with A > 0 and r = 1.5: both
    # stop it
    train_ratio = torch.tensor([1.5, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    both = ppo.trust_region_diagnostics(train_ratio, eval_ratio, advantages, 0.2)
    assert both["trust_region_violation_signed"].item() == 0.0


def test_ppo_update_diagnostics_use_the_given_r_and_the_normalized_advantages():
    """ppo_update compares the given eval-mode r with its own train-mode r' (at the parameters
    before its step), and the sign-aware count uses the advantages the surrogate uses: normalized
    per minibatch with --norm-adv."""
    agent = make_agent("bn")
    # all > 0; normalized: 0-7 < 0 < 8-15
    mb = {
        **make_minibatch(agent),
        "advantages": torch.arange(1.0, 17.0),
    }
    agent.train()
    reference = copy.deepcopy(agent)
    with torch.no_grad():
        _, train_logprob, _, _ = reference.get_action_and_value(mb["obs"], mb["actions"])
    train_ratio = (train_logprob - mb["logprobs"]).exp()
    assert (
        (train_ratio - 1).abs() < 0.2
    ).all()  # r' inside the trust region: every stop below is r's
    eval_ratio = torch.full((16,), 1.5)  # above 1 + eps: the clip stops it where A > 0
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)

    stats = ppo.ppo_update(agent, optimizer, mb, tiny_args(), eval_ratio)

    assert stats["ratio_gap"].item() == pytest.approx(
        (train_ratio - eval_ratio).abs().mean().item(), rel=1e-4
    )
    assert stats["trust_region_violation"].item() == 1.0
    # normalized, samples 8-15 have A > 0: half are stopped under r (the raw advantages, all > 0,
    # would give all)
    assert stats["trust_region_violation_signed"].item() == 0.5
    assert changed_entries(clone_state(reference), agent), "ppo_update took no step"


def test_ppo_update_normalizes_the_advantages_per_minibatch():
    """Scaling and shifting a minibatch's advantages changes nothing with --norm-adv, and changes
    the loss without."""

    def loss_with(advantages, norm_adv):
        agent = make_agent("bn")
        mb = {**make_minibatch(agent), "advantages": advantages}
        optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
        return ppo.ppo_update(agent, optimizer, mb, tiny_args(norm_adv=norm_adv))[
            "policy_loss"
        ].item()

    advantages = torch.randn(16, generator=torch.Generator().manual_seed(3))
    assert loss_with(advantages, True) == pytest.approx(
        loss_with(10.0 * advantages + 5.0, True), rel=1e-4, abs=1e-6
    )
    assert loss_with(advantages, False) != pytest.approx(
        loss_with(10.0 * advantages + 5.0, False), rel=1e-2
    )


def test_ratio_gap_is_measured_before_the_train_pass_on_every_kth_standard_minibatch(
    tmp_path, monkeypatch
):
    """The loop measures r (eval mode) right before the train-mode pass of standard minibatches 0,
    k, 2k, ... of the iteration (counted across epochs and rounds), at the parameters and running
    statistics that minibatch starts with."""
    calls = []
    original_ratio, original_update = ppo.eval_mode_ratio, ppo.ppo_update

    def recording_ratio(agent, mb):
        eval_ratio = original_ratio(agent, mb)
        calls.append(("ratio", clone_state(agent), eval_ratio))
        return eval_ratio

    def recording_update(agent, optimizer, mb, args, eval_ratio=None):
        if eval_ratio is not None:
            kind, state, measured = calls[-1]
            # the measurement just taken, on this minibatch
            assert kind == "ratio" and measured is eval_ratio
            assert changed_entries(state, agent) == []  # nothing moved in between
        calls.append(("train" if agent.training else "eval", eval_ratio is not None))
        return original_update(agent, optimizer, mb, args, eval_ratio)

    monkeypatch.setattr(ppo, "eval_mode_ratio", recording_ratio)
    monkeypatch.setattr(ppo, "ppo_update", recording_update)
    args = tiny_args(
        alpha1=2,
        alpha2=1,
        mdr_rounds=2,
        diag_ratio_every=3,
        diag_minibatches=-1,
        **ONE_SHORT_ROLLOUT,
    )

    assert run_main(tmp_path, monkeypatch, args)[0] == 0

    updates = [call for call in calls if call[0] != "ratio"]
    standard = [measured for phase, measured in updates if phase == "train"]
    assert len(standard) == 8  # 2 rounds x 2 epochs x 2 minibatches
    assert [i for i, measured in enumerate(standard) if measured] == [0, 3, 6]
    # never in rectification
    assert not [measured for phase, measured in updates if phase == "eval" and measured]
    assert len(calls) == len(updates) + 3


# --------------------------------------------------------------------------------------------------
# 5. Jensen-Shannon divergence


def test_js_divergence_of_identical_distributions_is_zero():
    logits = torch.randn(4, NUM_ACTIONS, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        ppo.js_divergence(logits, logits.clone()), torch.zeros(4), rtol=0, atol=1e-6
    )


def test_js_divergence_hand_computed():
    p, q = (0.25, 0.75), (0.5, 0.5)
    m = (0.375, 0.625)  # (p + q) / 2
    kl_pm = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    kl_qm = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    expected = 0.5 * (kl_pm + kl_qm)  # ~ 0.0338 nats
    assert m == tuple((a + b) / 2 for a, b in zip(p, q))

    # logits are shift-invariant
    logits_p, logits_q = (
        torch.tensor([p]).log(),
        torch.tensor([q]).log() + 3.0,
    )
    js = ppo.js_divergence(logits_p, logits_q)
    assert js.shape == (1,)
    assert js.item() == pytest.approx(expected, rel=1e-5)
    # symmetric
    assert ppo.js_divergence(logits_q, logits_p).item() == pytest.approx(expected, rel=1e-5)


def test_js_divergence_of_disjoint_distributions_is_capped_at_ln2():
    js = ppo.js_divergence(
        torch.tensor([[50.0, -50.0], [1e4, -1e4]]), torch.tensor([[-50.0, 50.0], [-1e4, 1e4]])
    )
    assert js.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-5)
    assert (js <= math.log(2)).all()  # capped: rounding never reports more than the maximum


# --------------------------------------------------------------------------------------------------
# 6. Precise BN (--bn-recalibrate)


@pytest.mark.parametrize("norm", ["bn", "brn"])
@pytest.mark.parametrize(
    "minibatch_size", [32, 16, 24], ids=["all-of-D_k", "two-minibatches", "uneven-minibatches"]
)
def test_recalibrate_batchnorm_sets_the_average_batch_statistics(norm, minibatch_size):
    """Running mean/var of every BN layer = the average over D_k's minibatches (in order) of the
    batch mean and the unbiased batch variance of its input, each minibatch's pass made from the
    statistics the update left. One minibatch = all of D_k: the first BN holds the exact mean and
    variance of conv1's output on D_k."""
    agent = make_agent(norm)
    with torch.no_grad():  # stale running statistics, far from D_k's
        for name, buffer in agent.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.fill_(3.0)
    agent.eval()
    b_obs = random_obs(32, seed=4)
    minibatches = b_obs.split(minibatch_size)
    with torch.no_grad():
        conv1 = [agent.backbone.conv1(mb.permute(0, 3, 1, 2).float() / 255.0) for mb in minibatches]
    # the last BN's inputs, from a fresh copy per minibatch (what "the statistics the update left"
    # means)
    deep_inputs = []
    for mb in minibatches:
        fresh = copy.deepcopy(agent).train()
        fresh.backbone.layer3[1].bn2.register_forward_hook(
            lambda module, inputs, output: deep_inputs.append(inputs[0])
        )
        with torch.no_grad():
            fresh.features(mb)
    before = clone_state(agent)
    rng_state = torch.get_rng_state()

    ppo.recalibrate_batchnorm(agent, b_obs, minibatch_size)

    bn1, last = agent.backbone.bn1, agent.backbone.layer3[1].bn2
    torch.testing.assert_close(
        bn1.running_mean, torch.stack([x.mean((0, 2, 3)) for x in conv1]).mean(0)
    )
    torch.testing.assert_close(
        bn1.running_var, torch.stack([x.var((0, 2, 3), unbiased=True) for x in conv1]).mean(0)
    )
    torch.testing.assert_close(
        last.running_mean, torch.stack([x.mean((0, 2, 3)) for x in deep_inputs]).mean(0)
    )
    torch.testing.assert_close(
        last.running_var, torch.stack([x.var((0, 2, 3)) for x in deep_inputs]).mean(0)
    )
    if minibatch_size == 32:  # the exact statistics of D_k
        whole = conv1[0].permute(1, 0, 2, 3).reshape(64, -1).double()
        torch.testing.assert_close(bn1.running_mean.double(), whole.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            bn1.running_var.double(), whole.var(1, unbiased=True), rtol=1e-5, atol=1e-6
        )
    # num_batches_tracked, weights: as they were
    assert sorted(changed_entries(before, agent)) == sorted(running_stat_names(agent))
    assert not agent.training
    after_rand = torch.rand(3)
    torch.set_rng_state(rng_state)
    assert torch.equal(after_rand, torch.rand(3)), "recalibration drew from the global torch RNG"


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory):
    """The default tiny run (one iteration), its final agent and TensorBoard scalars: the baseline
    of the rivals below."""
    cwd = tmp_path_factory.mktemp("one_iteration")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_main(cwd, monkeypatch, tiny_args(save_model=True))[0] == 0
    run_dir = single_run_dir(cwd)
    return load_checkpoint(run_dir)["agent"], read_scalars(run_dir)


def test_bn_recalibrate_run_logs_finite_values_and_other_running_stats(
    one_iteration, tmp_path, monkeypatch
):
    assert run_main(tmp_path, monkeypatch, tiny_args(save_model=True, bn_recalibrate=True))[0] == 0

    run_dir = single_run_dir(tmp_path)
    agent, scalars = load_checkpoint(run_dir)["agent"], read_scalars(run_dir)
    baseline_agent, baseline_scalars = one_iteration
    assert sorted(scalars) == sorted(baseline_scalars)
    for tag, points in scalars.items():
        assert np.isfinite([value for _, value in points]).all(), tag
    # the update is the same (recalibration comes after it); the running statistics and what is
    # measured after differ
    stat_names = [name for name in agent if name.endswith(("running_mean", "running_var"))]
    assert sorted(changed_entries(baseline_agent, agent)) == sorted(stat_names)
    assert scalars["charts/delta_pi_plus"] != baseline_scalars["charts/delta_pi_plus"]
    assert scalars["charts/delta_pi_minus"] == baseline_scalars["charts/delta_pi_minus"]


def test_collect_mode_train_run_differs_from_eval(one_iteration, tmp_path, monkeypatch):
    assert run_main(tmp_path, monkeypatch, tiny_args(save_model=True, collect_mode="train"))[0] == 0

    run_dir = single_run_dir(tmp_path)
    agent, scalars = load_checkpoint(run_dir)["agent"], read_scalars(run_dir)
    assert np.isfinite([value for points in scalars.values() for _, value in points]).all()
    # other log-probs, other gradient
    assert "actor.4.weight" in changed_entries(one_iteration[0], agent)


# --------------------------------------------------------------------------------------------------
# 7. ImageNet weights (from a state dict the test writes into a temporary TORCH_HOME; never
#    downloaded)


@pytest.fixture(scope="module")
def fake_imagenet_home(tmp_path_factory):
    """A TORCH_HOME holding a resnet18 state dict with random weights, affine params and running
    statistics."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(123)
    state_dict = torchvision.models.resnet18().state_dict()
    for name, tensor in state_dict.items():
        if name.endswith("running_var"):
            tensor.copy_(torch.rand_like(tensor) + 0.5)
        elif name.endswith(
            (
                "running_mean",
                "bn1.weight",
                "bn1.bias",
                "bn2.weight",
                "bn2.bias",
                "downsample.1.bias",
            )
        ):
            tensor.copy_(torch.randn_like(tensor))
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state_dict, checkpoints / IMAGENET_FILE)
    return torch_home, state_dict


@pytest.fixture
def no_download(monkeypatch):
    """torch.hub's download (what torchvision's Weights.get_state_dict reaches for a missing file)
    fails as offline."""
    attempts = []

    def offline_download(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    return attempts


@pytest.mark.parametrize("norm", NORMS)
def test_pretrained_weights_load_into_each_variant(
    norm, fake_imagenet_home, no_download, monkeypatch
):
    torch_home, saved = fake_imagenet_home
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    own = make_agent(norm, pretrained=True).backbone.state_dict()

    assert no_download == []
    for name in (
        "conv1.weight",
        "layer3.0.conv1.weight",
        "layer3.1.conv2.weight",
        "layer3.0.downsample.0.weight",
    ):
        assert torch.equal(own[name], saved[name]), name
    norm_tensors = ("bn1.weight", "bn1.bias", "layer3.1.bn2.weight", "layer3.0.downsample.1.bias")
    running_stats = (
        "bn1.running_mean",
        "bn1.running_var",
        "layer3.1.bn2.running_mean",
        "layer2.0.downsample.1.running_var",
    )
    if norm in ("bn", "eval", "brn"):
        for name in norm_tensors + running_stats:
            assert torch.equal(own[name], saved[name]), name
    elif norm in ("ln", "gn"):
        for name in norm_tensors:  # GroupNorm's affine params have BatchNorm's names and shapes
            assert torch.equal(own[name], saved[name]), name
        assert not any(name in own for name in running_stats)
    else:  # none, dropout: no norm parameters at all
        assert not any(name in own for name in norm_tensors + running_stats)
    assert not any(name.startswith(("layer4", "fc")) for name in own)


def test_missing_imagenet_weights_offline_is_a_config_error(tmp_path, no_download, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected_path = str(tmp_path / "hub" / "checkpoints" / IMAGENET_FILE)

    with pytest.raises(ppo.ConfigError) as error:
        make_agent("bn", pretrained=True)

    assert len(no_download) == 1, "the offline download stub should have been reached"
    assert expected_path in str(error.value)
    assert "--no-pretrained" in str(error.value)


def test_corrupt_cached_imagenet_weights_is_a_config_error(
    tmp_path, fake_imagenet_home, no_download, monkeypatch
):
    complete = (fake_imagenet_home[0] / "hub" / "checkpoints" / IMAGENET_FILE).read_bytes()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # an interrupted download
    (checkpoints / IMAGENET_FILE).write_bytes(complete[: len(complete) // 2])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    with pytest.raises(ppo.ConfigError) as error:
        make_agent("bn", pretrained=True)

    assert no_download == []
    assert str(checkpoints / IMAGENET_FILE) in str(error.value)
    assert "--no-pretrained" in str(error.value)


# --------------------------------------------------------------------------------------------------
# 8. Norm layers: Batch Renormalization, and the fixed settings of --norm brn and gn


def bn_and_brn(channels=8, **brn_kwargs):
    """A BatchNorm2d and a BatchRenorm2d with the same random affine parameters and running
    statistics."""
    generator = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(channels, momentum=0.1)
    brn = ppo.BatchRenorm2d(channels, momentum=0.1, **brn_kwargs)
    weight, bias = (
        torch.rand(channels, generator=generator) + 0.5,
        torch.randn(channels, generator=generator),
    )
    running_mean, running_var = (
        torch.randn(channels, generator=generator),
        torch.rand(channels, generator=generator) + 0.5,
    )
    for module in (bn, brn):
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        module.running_mean.copy_(running_mean)
        module.running_var.copy_(running_var)
    return bn, brn


def renorm_input(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(16, 8, 5, 5, generator=generator) + 1.0


@pytest.mark.parametrize(
    "brn_kwargs, batches_tracked",
    [
        (dict(r_max=1.0, d_max=0.0, warmup=1), 10_000),  # bounds (1, 0), long after the warm-up
        (
            dict(r_max=3.0, d_max=5.0, warmup=5000),
            0,
        ),  # wider bounds, but at the start of the warm-up ramp
    ],
    ids=["rmax1-dmax0", "warmup-start"],
)
def test_batch_renorm_equals_batchnorm_with_unit_bounds(brn_kwargs, batches_tracked):
    bn, brn = bn_and_brn(**brn_kwargs)
    brn.num_batches_tracked.fill_(batches_tracked)
    x = renorm_input()

    # eval mode: both normalize with the same running statistics
    assert torch.equal(brn.eval()(x), bn.eval()(x))
    torch.testing.assert_close(brn.train()(x), bn.train()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert brn.num_batches_tracked.item() == batches_tracked + 1


def test_batch_renorm_differs_from_batchnorm_after_warmup_with_stale_stats():
    bn, brn = bn_and_brn(r_max=3.0, d_max=5.0, warmup=1)
    brn.num_batches_tracked.fill_(1)  # warm-up over: r in [1/3, 3], d in [-5, 5]
    for module in (bn, brn):  # stale running statistics, far from the batch's (mean ~1, var ~4)
        module.running_mean.fill_(-2.0)
        module.running_var.fill_(0.5)
    x = renorm_input()

    bn_out, brn_out = bn.train()(x), brn.train()(x)

    assert not torch.allclose(brn_out, bn_out, atol=1e-2)
    # per channel, Batch Renorm's output is BatchNorm's x_hat * r + d, before the same affine
    # transform
    x_hat = (bn_out - bn.bias[None, :, None, None]) / bn.weight[None, :, None, None]
    renormed = (brn_out - brn.bias[None, :, None, None]) / brn.weight[None, :, None, None]
    assert (
        renormed.mean(dim=(0, 2, 3)) - x_hat.mean(dim=(0, 2, 3))
    ).abs().min() > 0.5  # d != 0 on every channel


def test_norm_layers_use_the_fixed_settings():
    """--norm brn: Ioffe's r_max 3, d_max 5, warm-up 5000 and --bn-momentum; --norm gn: 32 groups;
    ln: one group."""
    brn = make_agent("brn", bn_momentum=0.01).backbone.layer3[1].bn2
    assert (brn.r_max, brn.d_max, brn.warmup, brn.momentum) == (3.0, 5.0, 5000, 0.01)
    assert make_agent("bn", bn_momentum=0.01).backbone.bn1.momentum == 0.01
    assert make_agent("gn").backbone.layer2[0].bn1.num_groups == 32
    assert make_agent("ln").backbone.layer2[0].bn1.num_groups == 1


# --------------------------------------------------------------------------------------------------
# 9. Bad input


def test_validate_args_accepts_the_tiny_config():
    # the base of the bad cases below is valid: each case breaks one thing
    ppo.validate_args(tiny_args())
    # m need not divide |D_k| = 32: the last minibatch has 8
    ppo.validate_args(tiny_args(minibatch_size=24))
    # a 1-sample minibatch is fine unnormalized
    ppo.validate_args(tiny_args(minibatch_size=31, norm_adv=False))
    ppo.validate_args(tiny_args(bn_recalibrate=True, norm="brn"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(env_id="notagame"),
            "valid Procgen games: bigfish, bossfight, caveflyer, chaser, climber, coinrun",
        ),
        (dict(alpha1=-1), "--alpha1 -1"),
        (dict(alpha2=-1), "--alpha2 -1"),
        (dict(alpha1=0, alpha2=0), "alpha1 + alpha2 = --update-epochs 3"),
        (dict(alpha1=3, alpha2=1), "--alpha1 3 --alpha2 1: need both >= 0 and alpha1 + alpha2"),
        (dict(update_epochs=0), "--update-epochs 0: must be >= 1"),
        (dict(mdr_rounds=0), "--mdr-rounds 0"),
        (dict(minibatch_size=31), "leaves a minibatch of one sample"),  # 32 = 31 + 1
        (dict(minibatch_size=1), "--minibatch-size 1 leaves a minibatch of one sample"),
        (dict(minibatch_size=64), "--minibatch-size must be <="),
        (dict(total_timesteps=16), "--total-timesteps >= num_envs x num_steps = 32"),
        (dict(num_envs=0), "--num-envs 0"),
        (dict(num_eval_envs=0), "--num-eval-envs 0"),
        (dict(dropout_p=1.0), "--dropout-p"),
        (dict(bn_momentum=0.0), "--bn-momentum"),
        (dict(checkpoint_interval=0), "--checkpoint-interval"),
        (dict(eval_interval=-1), "--eval-interval"),
        (dict(bn_recalibrate=True, norm="ln"), "--bn-recalibrate"),
        (dict(bn_recalibrate=True, norm="eval"), "--norm bn or brn"),
    ],
    ids=lambda value: (
        "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None
    ),
)
def test_validate_args_rejects_bad_input(overrides, message):
    with pytest.raises(ppo.ConfigError) as error:
        ppo.validate_args(tiny_args(**overrides))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides, alphas",
    [
        (dict(), (2, 1)),  # MDR(2,1) of CleanRL's 3 epochs
        (dict(alpha1=2, alpha2=1), (2, 1)),  # the design command
        (dict(alpha2=0), (3, 0)),  # plain PPO: all 3 epochs in train mode
        (dict(alpha2=2), (1, 2)),
        (dict(alpha1=1), (1, 2)),  # either flag sets the other
        (dict(update_epochs=6), (4, 2)),  # neither: alpha2 = E // 3
        (dict(update_epochs=1), (0, 1)),  # ... at least 1
        (dict(update_epochs=1, alpha2=0), (1, 0)),
        (dict(update_epochs=4, alpha1=1, alpha2=3), (1, 3)),
    ],
)
def test_update_epochs_split_into_alpha1_and_alpha2(overrides, alphas):
    args = tiny_args(**overrides)
    ppo.validate_args(args)
    assert (args.alpha1, args.alpha2) == alphas
    assert args.alpha1 + args.alpha2 == args.update_epochs


def test_the_design_command_line_parses_to_mdr_2_1_of_3():
    flags = "--env-id bigfish --norm bn --alpha1 2 --alpha2 1 --cuda".split()
    args = tyro.cli(ppo.Args, args=flags)
    ppo.validate_args(args)
    assert (args.update_epochs, args.alpha1, args.alpha2) == (3, 2, 1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env-id", "notagame"], "notagame"),
        (["--alpha1", "0", "--alpha2", "0"], "--alpha1 0 --alpha2 0"),
        (["--alpha1", "3", "--alpha2", "1"], "alpha1 + alpha2 = --update-epochs 3"),
        (["--bn-recalibrate", "--norm", "ln"], "--bn-recalibrate"),
        (["--resume", "garbage.pt"], "not a readable checkpoint"),
        (["--resume", "missing.pt"], "missing.pt: not a readable checkpoint"),
    ],
    ids=[
        "unknown-game",
        "no-epochs",
        "epochs-that-do-not-add-up",
        "recalibrate-without-bn",
        "corrupt-resume",
        "missing-resume",
    ],
)
def test_cli_bad_input_is_one_line_error(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))

    exit_code = run_cli(tmp_path, monkeypatch, *TINY, *args)

    assert_one_line_error(exit_code, capsys, message)
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "wandb").exists()


# --------------------------------------------------------------------------------------------------
# 10. Run folders: names from the arguments, args.json, no mixing of runs


def test_default_run_name_is_a_function_of_the_arguments():
    name = ppo.default_run_name
    # no clock: a requeued job finds it
    assert name(tiny_args()) == "bigfish__ppo_procgen_mdr__bn0.1__mdr2-1__s1"
    assert name(tiny_args(norm="brn", bn_momentum=0.01, alpha1=1, alpha2=2, seed=7)) == (
        "bigfish__ppo_procgen_mdr__brn0.01__mdr1-2__s7"
    )
    assert (
        name(tiny_args(env_id="coinrun", mdr_rounds=3, alpha2=0))
        == "coinrun__ppo_procgen_mdr__bn0.1__mdr3-0x3__s1"
    )
    assert (
        name(tiny_args(norm="dropout", dropout_p=0.2))
        == "bigfish__ppo_procgen_mdr__dropout0.2__mdr2-1__s1"
    )
    for norm in ("eval", "ln", "gn", "none"):
        # no BN momentum where there is no running statistic that uses it
        assert (
            name(tiny_args(norm=norm, bn_momentum=0.01))
            == f"bigfish__ppo_procgen_mdr__{norm}__mdr2-1__s1"
        )
    names = {
        name(tiny_args(**change))
        for change in ({}, dict(seed=2), dict(bn_momentum=0.01), dict(alpha1=3))
    }
    assert len(names) == 4


def main_args(**overrides) -> ppo.Args:
    """tiny_args with what main() fills in before it looks at the run folder."""
    args = tiny_args(**overrides)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    return args


def test_find_checkpoint_without_resume_refuses_a_folder_that_holds_a_run(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    # no folder yet, or an empty one: fresh
    assert ppo.find_checkpoint(main_args(), str(run_dir)) == (None, str(run_dir))
    run_dir.mkdir(parents=True)
    assert ppo.find_checkpoint(main_args(), str(run_dir)) == (None, str(run_dir))
    (run_dir / "args.json").write_text("{}")
    (run_dir / "events.out.tfevents.1.host.1.0").write_bytes(b"")

    for resume in (None, "auto"):  # no checkpoint: --resume auto has nothing to continue either
        with pytest.raises(ppo.ConfigError) as error:
            ppo.find_checkpoint(main_args(resume=resume), str(run_dir))

        message = str(error.value)
        assert "holds an unfinished run without a checkpoint (args.json, events.out" in message
        assert "--run-name NAME starts another run, --overwrite moves this one aside" in message
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "args.json",
        "events.out.tfevents.1.host.1.0",
    ]


def test_cli_fresh_run_into_a_folder_with_events_is_one_line_error(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / ppo.default_run_name(tiny_args())
    run_dir.mkdir(parents=True)
    (run_dir / "events.out.tfevents.1.host.1.0").write_bytes(b"")

    exit_code = run_cli(tmp_path, monkeypatch, *TINY, "--resume", "auto")

    assert_one_line_error(exit_code, capsys, str(Path("runs") / run_dir.name), "--overwrite")
    # untouched
    assert sorted(path.name for path in run_dir.iterdir()) == ["events.out.tfevents.1.host.1.0"]


# --------------------------------------------------------------------------------------------------
# 11. End-to-end runs of each norm variant; the TensorBoard log and the progress lines


@pytest.mark.parametrize("norm", NORMS)
def test_each_norm_variant_runs(norm, tmp_path, monkeypatch):
    # one rollout of 2 envs x 8 steps, one minibatch, MDR(1,1)
    args = tiny_args(
        norm=norm,
        num_steps=8,
        total_timesteps=16,
        update_epochs=2,
        alpha1=1,
        alpha2=1,
        run_name=f"norm-{norm}",
    )

    exit_code, stdout, _ = run_main(tmp_path, monkeypatch, args)

    assert exit_code == 0
    assert "iteration=1/1, global_step=16" in stdout
    assert "held-out evaluation: test_episodic_return=" in stdout
    assert single_run_dir(tmp_path).name == f"norm-{norm}"  # --run-name
    scalars = read_scalars(single_run_dir(tmp_path))
    assert np.isfinite(scalars["losses/policy_loss"][0][1]) and np.isfinite(
        scalars["charts/delta_pi_plus"][0][1]
    )
    # MDR changes nothing without a mode-dependent layer, and the script says so
    assert ("has no mode-dependent layer" in stdout) == (norm in MODE_FREE_NORMS)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Two iterations of MDR(2,1), --norm bn, 2 envs x 32 steps, a (stubbed) evaluation after each;
    returns (args, run folder, stdout, scalars)."""
    cwd = tmp_path_factory.mktemp("logged_run")
    args = tiny_args(num_steps=32, total_timesteps=128, eval_interval=1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        exit_code, stdout, _ = run_main(cwd, monkeypatch, args)
    assert exit_code == 0
    run_dir = single_run_dir(cwd)
    return args, run_dir, stdout, read_scalars(run_dir)


def test_tensorboard_log_holds_every_key_with_finite_values(logged_run):
    _, _, _, scalars = logged_run
    missing = [key for key in TB_KEYS if key not in scalars]
    assert not missing, f"missing {missing}; logged: {sorted(scalars)}"
    for key in TB_KEYS:
        values = [value for _, value in scalars[key]]
        assert np.all(np.isfinite(values)), (key, values)
    for key in (
        "charts/learning_rate",
        "charts/SPS",
        "charts/delta_pi_minus",
        "losses/value_loss",
        "mdr/ratio_gap",
    ):
        assert [step for step, _ in scalars[key]] == [64, 128], key  # one point per iteration
    assert len(scalars["charts/test_episodic_return"]) == 2  # --eval-interval 1
    # annealed
    assert [value for _, value in scalars["charts/learning_rate"]] == pytest.approx([5e-4, 2.5e-4])


def test_tensorboard_diagnostics_are_within_their_bounds(logged_run):
    _, _, _, scalars = logged_run
    for key in ("charts/delta_pi_minus", "charts/delta_pi_plus"):
        for _, value in scalars[key]:
            assert 0.0 <= value <= math.log(2), (key, value)
    for key in (
        "mdr/trust_region_violation",
        "mdr/trust_region_violation_signed",
        "losses/clipfrac",
    ):
        for _, value in scalars[key]:
            assert 0.0 <= value <= 1.0, (key, value)


def test_progress_line_per_iteration_when_stdout_is_not_a_terminal(logged_run):
    args, _, stdout, scalars = logged_run
    lines = progress_lines(stdout)
    assert [(line["iteration"], line["global_step"]) for line in lines] == [
        ("1/2", "64"),
        ("2/2", "128"),
    ]
    # bigfish, seed 1, 2 envs x 64 steps: an episode ends in iteration 2 (the levels and the policy
    # are seeded)
    printed = {
        int(line["global_step"]): float(line["episodic_return"])
        for line in lines
        if "episodic_return" in line
    }
    assert printed, "no episode ended during the run; the TensorBoard check needs one"
    logged = dict(scalars.get("charts/episodic_return", []))
    assert sorted(logged) == sorted(printed)  # printed exactly when logged
    for step, value in printed.items():
        assert logged[step] == pytest.approx(value, abs=0.005)
    for line in lines:
        assert float(line["delta_pi_minus"]) == pytest.approx(
            dict(scalars["charts/delta_pi_minus"])[int(line["global_step"])], rel=1e-3
        )
        assert int(line["SPS"]) >= 0
    assert stdout.count("held-out evaluation: test_episodic_return=") == 2


def test_run_folder_is_named_from_the_arguments_and_holds_args_json(logged_run):
    args, run_dir, _, _ = logged_run
    assert run_dir.name == ppo.default_run_name(args)
    saved = json.loads((run_dir / "args.json").read_text())
    [provenance] = saved.pop("provenance")  # one process made this run
    assert saved == json.loads(json.dumps(asdict(args)))
    assert (
        provenance["from_step"] == 0
        and len(provenance["commit"]) == 40
        and isinstance(provenance["dirty"], bool)
    )
    assert provenance["torch"] == ppo.torch.__version__ and provenance["cpu"]
    assert saved["batch_size"] == 64 and saved["num_iterations"] == 2  # filled in at run time


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["log-file", "terminal"])
def test_run_logger_progress_and_non_finite_scalars(terminal, tmp_path, monkeypatch, capsys):
    """Elsewhere than a terminal (a cluster's log file): one plain line per iteration. On a
    terminal: a tqdm bar on stderr instead. Non-finite scalars are not written to TensorBoard."""
    args = tiny_args()
    args.num_iterations, args.batch_size = 2, 32
    stdout = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    run_dir = tmp_path / "runs" / "x"

    logger = ppo.RunLogger(str(run_dir), args, "cpu", None, 0)
    logger.advance(32)
    logger.log(
        {"charts/episodic_return": 2.5, "charts/delta_pi_minus": 0.001, "losses/x": float("nan")},
        iteration=1,
    )
    logger.log({"charts/test_episodic_return": float("inf"), "charts/test_normalized_score": 0.5})
    logger.close(0)

    lines = progress_lines(stdout.getvalue())
    if terminal:
        assert lines == []
        assert "32/64" in capsys.readouterr().err  # the bar, over the run's steps
    else:
        assert len(lines) == 1
        assert {key: lines[0][key] for key in ("iteration", "global_step", "episodic_return")} == {
            "iteration": "1/2",
            "global_step": "32",
            "episodic_return": "2.5",
        }
    scalars = read_scalars(run_dir)
    assert sorted(scalars) == [
        "charts/SPS",
        "charts/delta_pi_minus",
        "charts/episodic_return",
        "charts/test_normalized_score",
    ]
    assert all(step == 32 for points in scalars.values() for step, _ in points)


def test_run_logger_mirrors_to_wandb_with_group_tags_and_resumable_id(tmp_path, monkeypatch):
    """--track: the wandb run is named after the folder, grouped by the folder name minus the seed,
    tagged (with the BN momentum for bn/brn), and continues the given run id; its exit code reaches
    the run's finish()."""
    calls = []
    fake_wandb = types.ModuleType("wandb")

    def run_finish(exit_code):  # the run's: Run.finish
        calls.append(("finish", exit_code))

    fake_wandb.init = lambda **kwargs: (
        calls.append(("init", kwargs)) or types.SimpleNamespace(id="abc123", finish=run_finish)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    for norm, momentum_tag in [("brn", ["bn_momentum=0.01"]), ("ln", [])]:
        calls.clear()
        args = tiny_args(track=True, norm=norm, bn_momentum=0.01, alpha1=1, alpha2=2, seed=7)
        run_name = ppo.default_run_name(args)

        logger = ppo.RunLogger(os.path.join("runs", run_name), args, "cpu", "previous-id", 0)
        logger.close(143)

        (_, init), finish = calls
        assert init["name"] == run_name and init["group"] == run_name[: -len("__s7")]
        assert init["tags"] == ["bigfish", f"norm={norm}", "mdr=(1,2)", "seed=7", *momentum_tag]
        assert (
            init["id"] == "previous-id" and init["resume"] == "allow" and init["sync_tensorboard"]
        )
        assert logger.wandb_id == "abc123"  # what the checkpoint stores
        assert finish == ("finish", 143)
    args = tiny_args(track=True, wandb_group="mine")
    ppo.RunLogger(os.path.join("runs", "y"), args, "cpu", None, 0).close(0)
    assert calls[-2][1]["group"] == "mine"


# --------------------------------------------------------------------------------------------------
# 12. Checkpoints, signals and exact resume


# 3 iterations of 2 envs x 8 steps
RESUMABLE = dict(num_steps=8, minibatch_size=8, total_timesteps=48)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """3 iterations in one go, started with --resume auto in an empty folder (= a fresh run,
    checkpoints on)."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        exit_code, stdout, _ = run_main(cwd, monkeypatch, tiny_args(resume="auto", **RESUMABLE))
    assert exit_code == 0
    run_dir = single_run_dir(cwd)
    return {
        "stdout": stdout,
        "run_dir": run_dir,
        "checkpoint": load_checkpoint(run_dir),
        "scalars": read_scalars(run_dir),
    }


def test_a_run_says_where_and_how_long_before_it_starts_and_sums_up_at_the_end(uninterrupted):
    """Issue 27 item 4: before the first iteration, a line with the run folder, the device and what
    runs, then the pace of the first rollout and, after the first iteration, the time the rest
    should take; at the end one line with the folder, the final scores and the time."""
    lines = uninterrupted["stdout"].splitlines()
    where = str(Path("runs") / uninterrupted["run_dir"].name)
    assert (
        lines[0].startswith(f"{where}: the run of ")
        and " starts on cpu: 3 iterations of " in (lines[0])
    )
    assert lines[1].startswith("collecting at ") and "about " in lines[1]
    assert lines[2].startswith("iteration=1/3, ")
    assert lines[3].startswith("iteration 1 took ") and "the 2 left take about " in lines[3]
    end = lines[-1]
    assert end.startswith(f"completed: {where}, global_step 48, test_episodic_return=")
    assert "delta_pi_minus=" in end and end.endswith(" (summary.json)")
    summary = json.loads((uninterrupted["run_dir"] / "summary.json").read_text())
    assert (summary["status"], summary["global_step"]) == ("completed", 48)
    assert summary["checkpoint"] == str(Path(where) / "checkpoint.pt")


def test_resume_auto_in_an_empty_folder_starts_fresh_and_checkpoints(uninterrupted):
    assert "resumed" not in uninterrupted["stdout"]
    assert [line["iteration"] for line in progress_lines(uninterrupted["stdout"])] == [
        "1/3",
        "2/3",
        "3/3",
    ]
    # checkpoints on, though --save-model was not given
    assert uninterrupted["checkpoint"]["iteration"] == 3


def test_checkpoint_contents(uninterrupted):
    # loaded with weights_only=True: plain tensors and Python containers
    checkpoint = uninterrupted["checkpoint"]

    assert {
        "agent",
        "optimizer",
        "global_step",
        "iteration",
        "args",
        "rng",
        "env",
        "run_name",
        "wandb_id",
    } <= set(checkpoint)
    assert checkpoint["global_step"] == 48 and checkpoint["iteration"] == 3
    assert checkpoint["run_name"] == uninterrupted["run_dir"].name
    assert checkpoint["args"]["norm"] == "bn" and checkpoint["args"]["seed"] == 1
    assert {"python", "numpy", "torch", "diag"} <= set(checkpoint["rng"])
    assert {"procgen", "next_obs", "next_done", "returns", "lengths"} <= set(checkpoint["env"])
    assert len(checkpoint["env"]["procgen"]) == 2  # one serialized game state per env
    agent = ppo.Agent(NUM_ACTIONS, tiny_args(norm=checkpoint["args"]["norm"]))
    agent.load_state_dict(checkpoint["agent"])  # strict: every parameter and buffer


def interrupt_during_iteration_2(monkeypatch, *signums):
    """Send `signums` to this process from inside iteration 2 (compute_gae runs once per
    iteration)."""
    original_gae = ppo.compute_gae
    calls = []

    def signalling_gae(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return original_gae(*args, **kwargs)

    monkeypatch.setattr(ppo, "compute_gae", signalling_gae)


def resume_arg(resume, path):
    return "auto" if resume == "auto" else path


@pytest.mark.parametrize(
    "signum, resume",
    [(signal.SIGTERM, "auto"), (signal.SIGUSR1, "auto"), (signal.SIGINT, "path")],
    ids=["SIGTERM", "SIGUSR1", "Ctrl-C"],
)
def test_stop_signal_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    signum, resume, uninterrupted, sentinel_handlers, tmp_path, monkeypatch
):
    """SIGTERM / SIGUSR1 (SLURM's warnings before preemption or the time limit) and Ctrl-C: the
    iteration finishes, a checkpoint is written, the exit code is 128 + the signal's number, the
    previous handlers are back. The same command with --resume auto (or --resume PATH) then
    continues to the same parameters and TensorBoard scalars (all but SPS) as the uninterrupted
    run."""
    command = dict(save_model=True, **RESUMABLE)  # --resume PATH: checkpoints from --save-model
    with monkeypatch.context() as interrupting:
        interrupt_during_iteration_2(interrupting, signum)
        exit_code, stdout, _ = run_main(
            tmp_path, interrupting, tiny_args(resume=resume_arg(resume, None), **command)
        )

    assert exit_code == 128 + signum  # 143, 138, 130
    assert f"{signal.Signals(signum).name}: finishing this iteration" in stdout
    assert "stopped at iteration 2; continue it with --resume auto" in stdout
    assert all(signal.getsignal(s) is sentinel_handlers for s in STOP_SIGNALS)
    run_dir = single_run_dir(tmp_path)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["iteration"] == 2 and checkpoint["global_step"] == 32
    assert [line["iteration"] for line in progress_lines(stdout)] == ["1/3", "2/3"]

    resume_path = str(run_dir / "checkpoint.pt")
    exit_code, stdout, _ = run_main(
        tmp_path, monkeypatch, tiny_args(resume=resume_arg(resume, resume_path), **command)
    )

    assert exit_code == 0
    assert f"resumed {run_dir.name} at iteration 2, global_step 32" in stdout
    assert [line["iteration"] for line in progress_lines(stdout)] == ["3/3"]
    assert single_run_dir(tmp_path) == run_dir
    full, resumed = uninterrupted["checkpoint"]["agent"], load_checkpoint(run_dir)["agent"]
    assert changed_entries(full, resumed) == [], (
        "parameters/buffers differ between the resumed and the uninterrupted run"
    )
    assert changed_entries(checkpoint["agent"], resumed), "the resumed run did not train"
    expected = {
        tag: points for tag, points in uninterrupted["scalars"].items() if tag != "charts/SPS"
    }
    scalars = {tag: points for tag, points in read_scalars(run_dir).items() if tag != "charts/SPS"}
    assert [tag for tag in expected if tag.startswith(("losses/", "charts/"))], "nothing to compare"
    assert scalars == expected


def test_second_ctrl_c_quits_at_once(sentinel_handlers, tmp_path, monkeypatch):
    interrupt_during_iteration_2(monkeypatch, signal.SIGINT, signal.SIGINT)
    args = tiny_args(save_model=True, checkpoint_interval=1, **RESUMABLE)

    exit_code, stdout, stderr = run_main(tmp_path, monkeypatch, args)

    assert exit_code == 130
    assert stderr.strip() == "interrupted during iteration 2; nothing saved for it"
    assert "stopped at iteration" not in stdout
    assert load_checkpoint(single_run_dir(tmp_path))["iteration"] == 1  # the last good one, intact
    assert all(signal.getsignal(s) is sentinel_handlers for s in STOP_SIGNALS)


def test_resume_with_different_arguments_is_one_line_error(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    checkpoint = uninterrupted["run_dir"] / "checkpoint.pt"
    # a longer run (--total-timesteps 96): allowed
    resumable = "--num-steps 8 --minibatch-size 8 --total-timesteps 96".split()

    exit_code = run_cli(
        tmp_path, monkeypatch, *TINY, *resumable, "--resume", checkpoint, "--norm", "gn"
    )

    message = assert_one_line_error(exit_code, capsys, "the run used different --norm")
    assert "--total-timesteps" not in message
    assert not (tmp_path / "runs").exists()


def checkpoint_from_before_update_epochs(uninterrupted, tmp_path, **old_args) -> str:
    """The uninterrupted run's checkpoint as the script wrote it before --update-epochs existed
    (issue 24): no update_epochs in its args (its epochs were alpha1 + alpha2), `old_args` set."""
    checkpoint = load_checkpoint(uninterrupted["run_dir"])
    del checkpoint["args"]["update_epochs"]
    checkpoint["args"].update(old_args)
    torch.save(checkpoint, tmp_path / "old.pt")
    return str(tmp_path / "old.pt")


def test_a_checkpoint_from_before_update_epochs_resumes(uninterrupted, tmp_path, monkeypatch):
    path = checkpoint_from_before_update_epochs(uninterrupted, tmp_path)  # MDR(2,1), E = 3
    args = tiny_args(resume=path, **{**RESUMABLE, "total_timesteps": 64})

    exit_code, stdout, _ = run_main(tmp_path, monkeypatch, args)

    assert exit_code == 0
    assert "at iteration 3, global_step 48" in stdout
    assert [line["iteration"] for line in progress_lines(stdout)] == ["4/4"]


def test_an_old_plain_ppo_checkpoint_needs_its_epochs(uninterrupted, tmp_path, monkeypatch, capsys):
    """Before --update-epochs, `--alpha1 1 --alpha2 0` trained one epoch; resuming it takes
    `--update-epochs 1 --alpha2 0` now, and the old flags alone are a one-line error."""
    path = checkpoint_from_before_update_epochs(uninterrupted, tmp_path, alpha1=1, alpha2=0)
    resumable = "--num-steps 8 --minibatch-size 8 --total-timesteps 64".split()

    exit_code = run_cli(tmp_path, monkeypatch, *TINY, *resumable, "--alpha2", "0", "--resume", path)

    assert_one_line_error(exit_code, capsys, "the run used different --update-epochs, --alpha1")
    args = tiny_args(resume=path, update_epochs=1, alpha2=0, **RESUMABLE)
    ppo.validate_args(args)
    args.batch_size, args.num_iterations = 16, 3  # as main sets them
    checkpoint, _ = ppo.find_checkpoint(args, "runs/ignored")
    assert checkpoint["iteration"] == 3


def test_a_finished_run_is_a_no_op_for_resume_auto(uninterrupted, monkeypatch, capsys):
    """The same command again (a requeued or repeated grid line): exit 0 at once, saying where the
    finished run is, and its folder untouched."""
    run_dir = uninterrupted["run_dir"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    flags = "--num-envs 2 --num-steps 8 --minibatch-size 8 --total-timesteps 48 --num-eval-envs 2"
    flags += " --eval-interval 0 --no-pretrained --no-cuda --resume auto"

    exit_code = run_cli(run_dir.parent.parent, monkeypatch, *flags.split())

    out = capsys.readouterr()
    assert exit_code == 0 and out.err == ""
    assert out.out == (
        f"{Path('runs') / run_dir.name} holds this run, finished at global_step 48 (its "
        "summary.json): nothing to do\n"
    )
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before


def test_resume_accepts_a_longer_run(uninterrupted):
    args = tiny_args(
        resume=str(uninterrupted["run_dir"] / "checkpoint.pt"),
        **{**RESUMABLE, "total_timesteps": 96},
    )
    args.batch_size, args.num_iterations = 16, 6  # as main sets them

    checkpoint, run_dir = ppo.find_checkpoint(args, "runs/ignored")

    assert checkpoint["iteration"] == 3 and run_dir == os.path.join(
        "runs", uninterrupted["run_dir"].name
    )


# --------------------------------------------------------------------------------------------------
# 13. Non-finite loss


def nan_loss_from_iteration(monkeypatch, first: int) -> list:
    """clipped_ppo_loss returns NaN from iteration `first` on; the list counts the iterations
    (compute_gae runs once per iteration with --mdr-rounds 1)."""
    iterations = []
    original_gae = ppo.compute_gae
    original_loss = ppo.clipped_ppo_loss

    def counting_gae(*args, **kwargs):
        iterations.append(1)
        return original_gae(*args, **kwargs)

    def nan_loss(*args, **kwargs):
        loss, ratio, stats = original_loss(*args, **kwargs)
        return (loss * float("nan") if len(iterations) >= first else loss), ratio, stats

    monkeypatch.setattr(ppo, "compute_gae", counting_gae)
    monkeypatch.setattr(ppo, "clipped_ppo_loss", nan_loss)
    return iterations


def test_non_finite_loss_is_one_line_error_and_marks_the_run_failed(tmp_path, monkeypatch):
    """Before its first checkpoint: one line on stderr, summary.json says failed and that there is
    no checkpoint, the printed line claims none; the same command again moves the folder aside and
    starts afresh (test_bad_input.py runs that retry)."""
    nan_loss_from_iteration(monkeypatch, 1)
    args = tiny_args(save_model=True, checkpoint_interval=1)

    exit_code, stdout, stderr = run_main(tmp_path, monkeypatch, args)

    assert exit_code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite loss"), stderr
    assert "intact" not in stderr + stdout and "no checkpoint was written" in stdout
    run_dir = single_run_dir(tmp_path)
    assert not (run_dir / "checkpoint.pt").exists()  # nothing saved after the NaN
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["checkpoint"], summary["exit_code"]) == ("failed", None, 1)


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    iterations = nan_loss_from_iteration(monkeypatch, 2)

    exit_code, stdout, stderr = run_main(
        tmp_path, monkeypatch, tiny_args(total_timesteps=96, save_model=True, checkpoint_interval=1)
    )

    assert exit_code == 1
    assert stderr.strip().startswith("error: non-finite loss")
    assert "its last checkpoint is intact: --resume auto continues from it" in stdout
    assert len(iterations) == 2  # the run stopped there
    checkpoint = load_checkpoint(single_run_dir(tmp_path))
    assert checkpoint["iteration"] == 1 and checkpoint["global_step"] == 32
    assert all(
        torch.isfinite(tensor).all()
        for tensor in checkpoint["agent"].values()
        if tensor.is_floating_point()
    )


# --------------------------------------------------------------------------------------------------
# 14. Held-out evaluation


def test_evaluate_is_a_function_of_the_parameters(monkeypatch):
    """Eval-mode policy on held-out levels, a fresh env and its own RNG: the same returns whatever
    the training RNG stream holds, which it leaves untouched, and the agent's mode restored."""
    args = tiny_args(num_eval_envs=1)
    agent = make_agent("bn")
    agent.train()
    levels = []
    original_make_env = ppo.make_env

    def recording_make_env(args, num_envs, start_level, num_levels, seed):
        levels.append((start_level, num_levels))
        return original_make_env(args, num_envs, start_level, num_levels, seed)

    monkeypatch.setattr(ppo, "make_env", recording_make_env)
    returns = []
    for seed in (0, 99):
        rng_state = torch.manual_seed(seed).get_state()
        returns.append(ppo.evaluate(agent, args, torch.device("cpu"), iteration=3))
        assert torch.equal(torch.get_rng_state(), rng_state), (
            "evaluation moved the training RNG stream"
        )

    assert returns[0].shape == (1,) and np.isfinite(returns[0]).all()
    np.testing.assert_array_equal(returns[0], returns[1])
    assert agent.training
    assert levels == [(args.num_levels, args.num_test_levels)] * 2  # levels never trained on


# --------------------------------------------------------------------------------------------------
# 15. The script as users run it: copied alone into an empty folder, tracked offline by wandb,
#     output to a log file


def test_script_runs_alone_and_tracks_offline(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    script = Path(shutil.copy(SCRIPT, alone))
    assert [path.name for path in alone.iterdir()] == ["ppo_procgen_mdr.py"]

    flags = "--track --save-model --norm brn --alpha1 1 --alpha2 2 --seed 7".split()
    result = run_script(alone, *TINY, *flags, script=script)

    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    # stdout is a pipe: the plain line, no bar
    assert "iteration=1/1, global_step=64" in result.stdout
    assert "held-out evaluation: test_episodic_return=" in result.stdout
    run_dir = single_run_dir(alone)
    assert run_dir.name == "bigfish__ppo_procgen_mdr__brn0.1__mdr1-2__s7"
    assert json.loads((run_dir / "args.json").read_text())["norm"] == "brn"
    assert list(run_dir.glob("events.out.tfevents.*"))
    run_folders = list((alone / "wandb").glob("offline-run-*"))
    assert len(run_folders) == 1, run_folders
    wandb_files = list(run_folders[0].glob("run-*.wandb"))
    assert len(wandb_files) == 1
    records = wandb_files[0].read_bytes()
    for expected in (run_dir.name, "norm=brn", "mdr=(1,2)", "seed=7", "bn_momentum=0.1"):
        # run name and tags
        assert expected.encode() in records, expected
    # the checkpoint carries the wandb run id, so that --resume continues the same wandb run
    wandb_id = load_checkpoint(run_dir)["wandb_id"]
    assert wandb_files[0].name == f"run-{wandb_id}.wandb"
