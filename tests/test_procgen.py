"""Tests of ppo_procgen_mdr.py: unit tests in-process (tiny tensors), end-to-end runs as subprocesses (tiny configs).

Every subprocess runs with cwd=tmp_path, so its runs/ and wandb/ folders land in a temporary directory."""

import copy
import math
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_procgen_mdr as ppo

SCRIPT = Path(ppo.__file__).resolve()
NUM_ACTIONS = 15  # Procgen's action space
NORMS = ["bn", "eval", "brn", "ln", "gn", "none", "dropout"]
MODE_FREE_NORMS = {"eval", "ln", "gn", "none"}
# one iteration of 2 envs x 32 steps (4 minibatches of 16), CPU, random init, held-out evaluation only at the end
TINY = [
    "--num-envs", "2",
    "--num-steps", "32",
    "--minibatch-size", "16",
    "--total-timesteps", "64",
    "--num-eval-envs", "2",
    "--eval-interval", "0",
    "--no-pretrained",
    "--no-cuda",
]  # fmt: skip
TB_KEYS = [
    "charts/episodic_return",
    "charts/learning_rate",
    "charts/SPS",
    "charts/delta_pi_minus",
    "charts/delta_pi_plus",
    "charts/test_episodic_return",
    "charts/test_normalized_score",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "losses/standard/policy_loss",
    "losses/rectify/policy_loss",
    "mdr/ratio_gap",
    "mdr/trust_region_violation",
]
IMAGENET_FILE = "resnet18-f37072fd.pth"


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def run_script(cwd, *args, script=SCRIPT, timeout=300):
    """Run the script as a user would, in `cwd`; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def single_run_dir(cwd) -> Path:
    run_dirs = list((Path(cwd) / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


def read_scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} from the TensorBoard event file(s) of a run."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def load_checkpoint(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def tiny_args(**overrides) -> ppo.Args:
    """Valid in-process arguments: one iteration of 2 envs x 16 steps (2 minibatches of 16), CPU, random init."""
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


def make_agent(norm="bn", seed=0, **overrides) -> ppo.Agent:
    torch.manual_seed(seed)
    return ppo.Agent(NUM_ACTIONS, tiny_args(norm=norm, **overrides))


def random_obs(n=16, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def make_batch(agent, n=16, seed=0) -> dict:
    """A flat rollout batch whose old log-probs and values are the agent's eval-mode outputs (as in collection)."""
    generator = torch.Generator().manual_seed(seed)
    obs = random_obs(n, seed)
    actions = torch.randint(0, NUM_ACTIONS, (n,), generator=generator)
    was_training = agent.training
    agent.eval()
    with torch.no_grad():
        _, logprobs, _, values = agent.get_action_and_value(obs, actions)
    agent.train(was_training)
    return {
        "obs": obs,
        "actions": actions,
        "logprobs": logprobs,
        "advantages": torch.randn(n, generator=generator),
        "returns": torch.randn(n, generator=generator),
        "values": values.flatten(),
    }


def clone_state(module: nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed_entries(before: dict, module: nn.Module) -> list:
    return [name for name, tensor in module.state_dict().items() if not torch.equal(before[name], tensor)]


def running_stat_names(module: nn.Module) -> list:
    return [name for name, _ in module.named_buffers() if name.endswith(("running_mean", "running_var"))]


# ----------------------------------------------------------------------------------------------------------------------
# 1. GAE


def test_compute_gae_matches_hand_computed_values():
    gamma, gae_lambda = 0.9, 0.5  # gamma * lambda = 0.45
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # (num_steps=3, num_envs=2)
    values = torch.tensor([[0.5, 1.0], [0.2, 0.4], [0.3, 0.6]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # env 0: obs[1] starts a new episode
    next_value = torch.tensor([[0.7, 0.8]])
    next_done = torch.tensor([0.0, 1.0])  # env 1: the observation after the rollout starts a new episode

    advantages, returns = ppo.compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda)

    # env 0: t=2: delta = 1 + 0.9*0.7 - 0.3 = 1.33                            -> A = 1.33
    #        t=1: delta = 0 + 0.9*0.3 - 0.2 = 0.07 (dones[2]=0)               -> A = 0.07 + 0.45*1.33 = 0.6685
    #        t=0: dones[1]=1 cuts the bootstrap: delta = 1 - 0.5 = 0.5       -> A = 0.5
    # env 1: t=2: next_done=1 cuts the bootstrap: delta = 1 - 0.6 = 0.4      -> A = 0.4
    #        t=1: delta = 2 + 0.9*0.6 - 0.4 = 2.14                            -> A = 2.14 + 0.45*0.4 = 2.32
    #        t=0: delta = 0 + 0.9*0.4 - 1.0 = -0.64                           -> A = -0.64 + 0.45*2.32 = 0.404
    expected_advantages = torch.tensor([[0.5, 0.404], [0.6685, 2.32], [1.33, 0.4]])
    # returns = advantages + values
    expected_returns = torch.tensor([[1.0, 1.404], [0.8685, 2.72], [1.63, 1.0]])
    torch.testing.assert_close(advantages, expected_advantages, rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, expected_returns, rtol=0, atol=1e-6)


def test_compute_values_uses_the_eval_mode_critic():
    agent = make_agent("bn")
    obs = random_obs(32)
    agent.eval()
    with torch.no_grad():
        expected = agent.get_value(obs).flatten()
    agent.train()  # e.g. after a standard phase with --alpha2 0
    before = clone_state(agent)

    values = ppo.compute_values(agent, obs, 16)  # in 2 chunks

    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
    assert agent.training
    assert changed_entries(before, agent) == []  # no running-stat update


# ----------------------------------------------------------------------------------------------------------------------
# 2. Train/eval mode sequence of one update (in-process main with recording wrappers)


@pytest.mark.parametrize(
    "alpha1, alpha2, rounds",
    [(2, 1, 1), (1, 2, 1), (3, 0, 1), (2, 1, 2), (3, 0, 2)],
)
def test_mode_sequence_of_one_update(alpha1, alpha2, rounds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ppo, "evaluate", lambda agent, args, device, iteration: np.zeros(args.num_eval_envs))
    events, rollout_modes, value_modes = [], [], []

    original_update, original_values = ppo.ppo_update, ppo.compute_values
    original_get_action_and_value, original_get_value = ppo.Agent.get_action_and_value, ppo.Agent.get_value
    original_get_policy_and_value, inside_get_action_and_value = ppo.Agent.get_policy_and_value, []

    def recording_update(agent, *args, **kwargs):
        events.append("train" if agent.training else "eval")
        return original_update(agent, *args, **kwargs)

    def recording_values(agent, *args, **kwargs):
        events.append("compute_values")
        return original_values(agent, *args, **kwargs)

    def recording_get_action_and_value(self, x, action=None):  # the update's and the ratio gap's passes
        inside_get_action_and_value.append(True)
        try:
            return original_get_action_and_value(self, x, action)
        finally:
            inside_get_action_and_value.pop()

    def recording_get_policy_and_value(self, x):
        if not inside_get_action_and_value:  # called directly: rollout collection (evaluate is stubbed out)
            rollout_modes.append((self.training, torch.is_grad_enabled()))
        return original_get_policy_and_value(self, x)

    def recording_get_value(self, x):  # bootstrap value and compute_values' critic passes
        value_modes.append((self.training, torch.is_grad_enabled()))
        return original_get_value(self, x)

    monkeypatch.setattr(ppo, "ppo_update", recording_update)
    monkeypatch.setattr(ppo, "compute_values", recording_values)
    monkeypatch.setattr(ppo.Agent, "get_action_and_value", recording_get_action_and_value)
    monkeypatch.setattr(ppo.Agent, "get_policy_and_value", recording_get_policy_and_value)
    monkeypatch.setattr(ppo.Agent, "get_value", recording_get_value)
    args = tiny_args(alpha1=alpha1, alpha2=alpha2, mdr_rounds=rounds)  # |D_k| = 32, m = 16: 2 minibatches per epoch

    assert ppo.main(args) == 0

    minibatches_per_epoch = args.num_envs * args.num_steps // args.minibatch_size
    one_round = ["train"] * alpha1 * minibatches_per_epoch + ["eval"] * alpha2 * minibatches_per_epoch
    expected = one_round + (["compute_values"] + one_round) * (rounds - 1)
    assert events == expected
    assert rollout_modes == [(False, False)] * args.num_steps  # eval mode, under no_grad
    # 1 bootstrap value after the rollout, then per extra round: compute_values (|D_k|/m chunks) + 1 bootstrap value
    assert value_modes == [(False, False)] * (1 + (rounds - 1) * (minibatches_per_epoch + 1))


# ----------------------------------------------------------------------------------------------------------------------
# 3. BN running statistics: moved by the standard phase only


@pytest.mark.parametrize("norm, moves_in_train_mode", [("bn", True), ("brn", True), ("eval", False)])
def test_running_stats_move_only_in_standard_phase(norm, moves_in_train_mode):
    agent = make_agent(norm)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    batch = make_batch(agent)
    stat_names = running_stat_names(agent)
    assert stat_names, "the backbone should have running statistics"

    def update(measure_ratio_gap):
        timer = ppo.SectionTimer(False, torch.device("cpu"))
        ppo.ppo_update(agent, optimizer, batch, torch.arange(16), tiny_args(norm=norm), measure_ratio_gap, timer)

    agent.train()  # standard phase
    before = clone_state(agent)
    update(measure_ratio_gap=True)
    moved = [name for name in stat_names if name in changed_entries(before, agent)]
    assert bool(moved) == moves_in_train_mode, moved
    if moves_in_train_mode:
        assert moved == stat_names  # every running mean and variance
    assert agent.training, "the ratio-gap measurement must leave the agent in train mode"

    agent.eval()  # rectification phase
    before = clone_state(agent)
    update(measure_ratio_gap=False)
    changed = changed_entries(before, agent)
    assert not [name for name in changed if name in dict(agent.named_buffers())]  # stats and num_batches_tracked
    assert "backbone.bn1.weight" in changed  # ... while the parameters (affine ones too) still learn


# ----------------------------------------------------------------------------------------------------------------------
# 4. Diagnostics are side-effect free


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
    # a freshly initialised mode-dependent network: the train- and eval-mode policies differ, within JS's bounds
    assert 0.0 < delta_pi.item() <= math.log(2)


@pytest.mark.parametrize("norm", ["bn", "brn", "dropout"])
def test_policy_mismatch_with_known_eval_logits_matches_and_saves_the_eval_pass(norm, monkeypatch):
    agent = make_agent(norm)
    with torch.no_grad():  # a peaked policy: at init (logits ~0.01) delta_pi ~1e-6 is at the level of float rounding
        agent.actor[-1].weight.mul_(100.0)
    b_obs = random_obs(32, seed=1)
    agent.eval()
    with torch.no_grad():  # the eval-mode logits computed as the rollout does: 8 envs per step, not minibatches of 16
        b_eval_logits = torch.cat([agent.get_policy_and_value(b_obs[i : i + 8])[0].logits for i in range(0, 32, 8)])
    agent.train()
    original_features, modes = ppo.Agent.features, []

    def recording_features(self, x):
        modes.append(self.training)
        return original_features(self, x)

    monkeypatch.setattr(ppo.Agent, "features", recording_features)
    computed = ppo.policy_mismatch(agent, b_obs, 16, 0, torch.Generator().manual_seed(0))
    assert modes == [False, True, False, True]  # per minibatch: an eval-mode, then a train-mode pass
    modes.clear()
    before = clone_state(agent)
    given = ppo.policy_mismatch(agent, b_obs, 16, 0, torch.Generator().manual_seed(0), b_eval_logits=b_eval_logits)
    assert modes == [True, True]  # the eval-mode side is read, not recomputed
    assert changed_entries(before, agent) == [] and agent.training
    assert given.item() == pytest.approx(computed.item(), rel=1e-3)
    assert given.item() > 1e-4


def test_delta_pi_minus_reads_the_rollout_logits_of_the_eval_mode_policy(tmp_path, monkeypatch):
    """The logits main stores during the rollout are the eval-mode policy at theta_k on exactly batch["obs"] (eq. 6):
    a wrong mode, a step misaligned with its observation or a stale network would all differ from this recomputation."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ppo, "evaluate", lambda agent, args, device, iteration: np.zeros(args.num_eval_envs))
    original_mismatch, checked = ppo.policy_mismatch, []

    def checking_mismatch(agent, b_obs, minibatch_size, num_minibatches, generator, b_eval_logits=None):
        if b_eval_logits is not None:  # delta_pi_minus, before the update
            was_training = agent.training
            agent.eval()
            with torch.no_grad():
                recomputed = agent.get_policy_and_value(b_obs)[0].logits
            agent.train(was_training)
            torch.testing.assert_close(b_eval_logits, recomputed, rtol=1e-4, atol=1e-5)
            checked.append(len(b_obs))
        return original_mismatch(agent, b_obs, minibatch_size, num_minibatches, generator, b_eval_logits)

    monkeypatch.setattr(ppo, "policy_mismatch", checking_mismatch)
    args = tiny_args(total_timesteps=64)  # two iterations: the second one's logits come from an updated network
    assert ppo.main(args) == 0
    assert checked == [args.batch_size] * 2


@pytest.mark.parametrize("training", [True, False], ids=["from-train-mode", "from-eval-mode"])
@pytest.mark.parametrize("norm", ["bn", "brn", "dropout"])
def test_eval_mode_ratio_has_no_side_effects(norm, training):
    agent = make_agent(norm)
    batch = make_batch(agent)
    agent.train(training)
    before = clone_state(agent)
    rng_state = torch.get_rng_state()

    eval_ratio = ppo.eval_mode_ratio(agent, batch["obs"], batch["actions"], batch["logprobs"])

    after_rand = torch.rand(3)
    torch.set_rng_state(rng_state)
    assert torch.equal(after_rand, torch.rand(3)), "the global torch RNG stream moved"
    assert changed_entries(before, agent) == []
    assert agent.training == training
    # old log-probs = the eval-mode log-probs (make_batch): r is 1 however the agent was left
    torch.testing.assert_close(eval_ratio, torch.ones(16), rtol=0, atol=1e-5)


def test_trust_region_diagnostics_values():
    agent = make_agent("bn")
    batch = make_batch(agent)
    agent.train()
    inside = torch.ones(16)  # r' = 1: inside [0.8, 1.2]

    same = ppo.trust_region_diagnostics(
        inside, ppo.eval_mode_ratio(agent, batch["obs"], batch["actions"], batch["logprobs"]), 0.2
    )
    assert same["ratio_gap"].item() == pytest.approx(0.0, abs=1e-5)
    assert same["trust_region_violation"].item() == 0.0

    # old log-probs lowered by 0.5: r = e^0.5 ~ 1.65 lies outside [0.8, 1.2] for every sample, r' = 1 inside
    shifted_ratio = ppo.eval_mode_ratio(agent, batch["obs"], batch["actions"], batch["logprobs"] - 0.5)
    shifted = ppo.trust_region_diagnostics(inside, shifted_ratio, 0.2)
    assert shifted["ratio_gap"].item() == pytest.approx(math.exp(0.5) - 1.0, rel=1e-4)
    assert shifted["trust_region_violation"].item() == 1.0
    half = ppo.trust_region_diagnostics(torch.tensor([1.0, 1.0, 1.5, 1.5]), torch.tensor([1.0, 1.5, 1.0, 1.5]), 0.2)
    assert half["trust_region_violation"].item() == 0.25  # only r' inside with r outside counts
    assert half["ratio_gap"].item() == pytest.approx(0.25)


def test_ppo_update_measures_r_at_the_running_stats_the_minibatch_started_with():
    """r is taken before the minibatch's train-mode pass: after it, the running statistics have moved (momentum 0.1)
    and r would be measured off the ones the minibatch started with."""
    agent = make_agent("bn")
    with torch.no_grad():
        agent.actor[-1].weight.mul_(100.0)  # a peaked policy, sensitive to the statistics it is normalized with
    batch = make_batch(agent)
    agent.train()
    reference = copy.deepcopy(agent)
    with torch.no_grad():
        expected_r = ppo.eval_mode_ratio(reference, batch["obs"], batch["actions"], batch["logprobs"])
        _, train_logprob, _, _ = reference.get_action_and_value(batch["obs"], batch["actions"])
    expected_gap = ((train_logprob - batch["logprobs"]).exp() - expected_r).abs().mean().item()
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)

    stats = ppo.ppo_update(
        agent, optimizer, batch, torch.arange(16), tiny_args(), True, ppo.SectionTimer(False, torch.device("cpu"))
    )

    assert stats["ratio_gap"].item() == pytest.approx(expected_gap, rel=1e-4)
    assert expected_gap > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# 5. Jensen-Shannon divergence


def test_js_divergence_of_identical_distributions_is_zero():
    logits = torch.randn(4, NUM_ACTIONS, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ppo.js_divergence(logits, logits.clone()), torch.zeros(4), rtol=0, atol=1e-6)


def test_js_divergence_hand_computed():
    p, q = (0.25, 0.75), (0.5, 0.5)
    m = (0.375, 0.625)  # (p + q) / 2
    kl_pm = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    kl_qm = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    expected = 0.5 * (kl_pm + kl_qm)  # ~ 0.0338 nats
    assert m == tuple((a + b) / 2 for a, b in zip(p, q))

    logits_p, logits_q = torch.tensor([p]).log(), torch.tensor([q]).log() + 3.0  # logits are shift-invariant
    js = ppo.js_divergence(logits_p, logits_q)
    assert js.shape == (1,)
    assert js.item() == pytest.approx(expected, rel=1e-5)
    assert ppo.js_divergence(logits_q, logits_p).item() == pytest.approx(expected, rel=1e-5)  # symmetric


def test_js_divergence_of_disjoint_distributions_is_ln2():
    js = ppo.js_divergence(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))
    assert js.item() == pytest.approx(math.log(2), rel=1e-5)
    assert js.item() <= math.log(2) + 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# 6. ImageNet weights (from a state dict the test writes into a temporary TORCH_HOME; never downloaded)


@pytest.fixture(scope="module")
def fake_imagenet_home(tmp_path_factory):
    """A TORCH_HOME holding a resnet18 state dict with random weights, affine params and running statistics."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(123)
    state_dict = torchvision.models.resnet18().state_dict()
    for name, tensor in state_dict.items():
        if name.endswith("running_var"):
            tensor.copy_(torch.rand_like(tensor) + 0.5)
        elif name.endswith(("running_mean", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "downsample.1.bias")):
            tensor.copy_(torch.randn_like(tensor))
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state_dict, checkpoints / IMAGENET_FILE)
    return torch_home, state_dict


@pytest.fixture
def no_download(monkeypatch):
    """torch.hub's download (what torchvision's Weights.get_state_dict reaches for a missing file) fails as offline."""
    attempts = []

    def offline_download(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    return attempts


@pytest.mark.parametrize("norm", NORMS)
def test_pretrained_weights_load_into_each_variant(norm, fake_imagenet_home, no_download, monkeypatch):
    torch_home, saved = fake_imagenet_home
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    own = make_agent(norm, pretrained=True).backbone.state_dict()

    assert no_download == []
    for name in ("conv1.weight", "layer3.0.conv1.weight", "layer3.1.conv2.weight", "layer3.0.downsample.0.weight"):
        assert torch.equal(own[name], saved[name]), name
    norm_tensors = ("bn1.weight", "bn1.bias", "layer3.1.bn2.weight", "layer3.0.downsample.1.bias")
    running_stats = ("bn1.running_mean", "bn1.running_var", "layer3.1.bn2.running_mean", "layer2.0.downsample.1.running_var")
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


def test_corrupt_cached_imagenet_weights_is_a_config_error(tmp_path, fake_imagenet_home, no_download, monkeypatch):
    complete = (fake_imagenet_home[0] / "hub" / "checkpoints" / IMAGENET_FILE).read_bytes()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / IMAGENET_FILE).write_bytes(complete[: len(complete) // 2])  # an interrupted download
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    with pytest.raises(ppo.ConfigError) as error:
        make_agent("bn", pretrained=True)

    assert no_download == []
    assert str(checkpoints / IMAGENET_FILE) in str(error.value)
    assert "--no-pretrained" in str(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# 7. Batch Renormalization


def bn_and_brn(channels=8, **brn_kwargs):
    """A BatchNorm2d and a BatchRenorm2d with the same random affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(channels, momentum=0.1)
    brn = ppo.BatchRenorm2d(channels, momentum=0.1, **brn_kwargs)
    weight, bias = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)
    running_mean, running_var = torch.randn(channels, generator=generator), torch.rand(channels, generator=generator) + 0.5
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
        (dict(r_max=3.0, d_max=5.0, warmup=5000), 0),  # wider bounds, but at the start of the warm-up ramp
    ],
    ids=["rmax1-dmax0", "warmup-start"],
)
def test_batch_renorm_equals_batchnorm_with_unit_bounds(brn_kwargs, batches_tracked):
    bn, brn = bn_and_brn(**brn_kwargs)
    brn.num_batches_tracked.fill_(batches_tracked)
    x = renorm_input()

    assert torch.equal(brn.eval()(x), bn.eval()(x))  # eval mode: both normalize with the same running statistics
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
    # per channel, Batch Renorm's output is BatchNorm's x_hat * r + d, before the same affine transform
    x_hat = (bn_out - bn.bias[None, :, None, None]) / bn.weight[None, :, None, None]
    renormed = (brn_out - brn.bias[None, :, None, None]) / brn.weight[None, :, None, None]
    assert (renormed.mean(dim=(0, 2, 3)) - x_hat.mean(dim=(0, 2, 3))).abs().min() > 0.5  # d != 0 on every channel


# ----------------------------------------------------------------------------------------------------------------------
# 8. Bad input


def test_validate_args_accepts_the_tiny_config():
    ppo.validate_args(tiny_args())  # the base of the bad cases below is valid: each case breaks one thing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(env_id="notagame"), "valid Procgen games: bigfish, bossfight, caveflyer, chaser, climber, coinrun"),
        (dict(alpha1=-1), "--alpha1 -1"),
        (dict(alpha2=-1), "--alpha2 -1"),
        (dict(alpha1=0, alpha2=0), "at least one > 0"),
        (dict(mdr_rounds=0), "--mdr-rounds"),
        (dict(minibatch_size=24), "must divide the rollout size num_envs x num_steps = 32"),
        (dict(minibatch_size=64), "--minibatch-size 64"),
        (dict(total_timesteps=16), "--total-timesteps 16"),
        (dict(num_envs=0), "--num-envs 0"),
        (dict(num_eval_envs=0), "--num-eval-envs 0"),
        (dict(dropout_p=1.0), "--dropout-p"),
        (dict(bn_momentum=0.0), "--bn-momentum"),
        (dict(brn_rmax=0.5), "--brn-rmax"),
        (dict(gn_groups=3), "--gn-groups 3"),
        (dict(checkpoint_interval=0), "--checkpoint-interval"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_validate_args_rejects_bad_input(overrides, message):
    with pytest.raises(ppo.ConfigError) as error:
        ppo.validate_args(tiny_args(**overrides))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env-id", "notagame"], "notagame"),
        (["--alpha1", "0", "--alpha2", "0"], "--alpha1 0 --alpha2 0"),
        (["--resume", "garbage.pt"], "not a readable checkpoint"),
        (["--resume", "missing.pt"], "no such file"),
    ],
    ids=["unknown-game", "no-epochs", "corrupt-resume", "missing-resume"],
)
def test_cli_bad_input_is_one_line_error(args, message, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))

    result = run_script(tmp_path, *TINY, *args)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "wandb").exists()


# ----------------------------------------------------------------------------------------------------------------------
# 9-10. End-to-end runs of each norm variant; the TensorBoard log


@pytest.mark.parametrize("norm", NORMS)
def test_each_norm_variant_runs(norm, tmp_path):
    result = run_script(tmp_path, *TINY, "--norm", norm)

    assert_ok(result)
    assert "iteration=1/1, global_step=64" in result.stdout
    assert "held-out evaluation: test_episodic_return=" in result.stdout
    assert list(single_run_dir(tmp_path).glob("events.out.tfevents.*"))
    # MDR changes nothing without a mode-dependent layer, and the script says so
    assert ("has no mode-dependent layer" in result.stdout) == (norm in MODE_FREE_NORMS)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Two iterations of MDR(2,1) with --norm bn and a held-out evaluation after each; returns (stdout, scalars)."""
    cwd = tmp_path_factory.mktemp("logged_run")
    result = run_script(cwd, *TINY, "--total-timesteps", "128", "--eval-interval", "1")
    assert_ok(result)
    return result.stdout, read_scalars(single_run_dir(cwd))


def test_tensorboard_log_holds_every_key_with_finite_values(logged_run):
    _, scalars = logged_run
    missing = [key for key in TB_KEYS if key not in scalars]
    assert not missing, f"missing {missing}; logged: {sorted(scalars)}"
    for key in TB_KEYS:
        values = [value for _, value in scalars[key]]
        assert np.all(np.isfinite(values)), (key, values)
    for key in ("charts/learning_rate", "charts/SPS", "charts/delta_pi_minus", "losses/value_loss", "mdr/ratio_gap"):
        assert [step for step, _ in scalars[key]] == [64, 128], key  # one point per iteration
    assert len(scalars["charts/test_episodic_return"]) == 2  # --eval-interval 1


def test_tensorboard_delta_pi_is_within_js_bounds(logged_run):
    _, scalars = logged_run
    for key in ("charts/delta_pi_minus", "charts/delta_pi_plus"):
        for _, value in scalars[key]:
            assert 0.0 <= value <= math.log(2), (key, value)
    for _, value in scalars["mdr/trust_region_violation"]:
        assert 0.0 <= value <= 1.0


def test_tensorboard_episodic_return_matches_stdout(logged_run):
    stdout, scalars = logged_run
    printed = {}  # global_step -> episodic return printed for the iteration, when an episode ended in it
    for line in stdout.splitlines():
        if line.startswith("iteration="):
            fields = dict(field.split("=") for field in line.split(", "))
            if fields["episodic_return"] != "n/a":
                printed[int(fields["global_step"])] = float(fields["episodic_return"])
    # bigfish, seed 1, 2 envs x 64 steps: an episode ends in iteration 2 (the levels and the policy are seeded)
    assert printed, "no episode ended during the run; the TensorBoard check needs one"
    logged = dict(scalars.get("charts/episodic_return", []))
    assert sorted(logged) == sorted(printed)
    for step, value in printed.items():
        assert logged[step] == pytest.approx(value, abs=0.005)


# ----------------------------------------------------------------------------------------------------------------------
# 11. Weights and Biases (offline)


def test_track_writes_an_offline_wandb_run(tmp_path):
    result = run_script(
        tmp_path, *TINY, "--track", "--save-model", "--norm", "brn", "--alpha1", "1", "--alpha2", "2", "--seed", "7"
    )

    assert_ok(result)
    run_folders = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_folders) == 1, run_folders
    wandb_files = list(run_folders[0].glob("run-*.wandb"))
    assert len(wandb_files) == 1
    records = wandb_files[0].read_bytes()
    run_dir = single_run_dir(tmp_path)
    assert run_dir.name.startswith("bigfish__ppo_procgen_mdr__brn__mdr1-2__7__")
    for expected in (run_dir.name, "norm=brn", "mdr=(1,2)", "seed=7"):  # run name and tags
        assert expected.encode() in records, expected
    # the checkpoint carries the wandb run id, so that --resume continues the same wandb run
    wandb_id = load_checkpoint(run_dir)["wandb_id"]
    assert wandb_files[0].name == f"run-{wandb_id}.wandb"


# ----------------------------------------------------------------------------------------------------------------------
# 12. Checkpoints and exact resume


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """4 iterations uninterrupted vs 2 iterations then --resume to 4 (same seed, constant learning rate, CPU)."""
    common = [*TINY, "--no-anneal-lr", "--save-model"]
    full = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(run_script(full, *common, "--total-timesteps", "256"))
    split = tmp_path_factory.mktemp("resumed")
    assert_ok(run_script(split, *common, "--total-timesteps", "128"))
    first_half = load_checkpoint(single_run_dir(split))
    resumed = run_script(split, *common, "--total-timesteps", "256", "--resume", single_run_dir(split) / "checkpoint.pt")
    assert_ok(resumed)
    return {"full": single_run_dir(full), "split": single_run_dir(split), "first_half": first_half, "resumed": resumed}


def test_checkpoint_contents(resumed_runs):
    checkpoint = load_checkpoint(resumed_runs["full"])  # weights_only=True: plain tensors and Python containers

    assert {"agent", "optimizer", "global_step", "iteration", "args", "rng"} <= set(checkpoint)
    assert checkpoint["global_step"] == 256 and checkpoint["iteration"] == 4
    assert checkpoint["args"]["norm"] == "bn" and checkpoint["args"]["seed"] == 1
    assert {"python", "numpy", "torch", "diag"} <= set(checkpoint["rng"])
    agent = ppo.Agent(NUM_ACTIONS, tiny_args(norm=checkpoint["args"]["norm"]))
    agent.load_state_dict(checkpoint["agent"])  # strict: every parameter and buffer
    assert resumed_runs["first_half"]["global_step"] == 128 and resumed_runs["first_half"]["iteration"] == 2


def test_resume_matches_uninterrupted_run(resumed_runs):
    full, resumed = load_checkpoint(resumed_runs["full"]), load_checkpoint(resumed_runs["split"])

    assert "resumed" in resumed_runs["resumed"].stdout and "at iteration 2, global_step 128" in resumed_runs["resumed"].stdout
    assert resumed["global_step"] == full["global_step"] == 256
    assert resumed["agent"].keys() == full["agent"].keys()
    different = [name for name in full["agent"] if not torch.equal(full["agent"][name], resumed["agent"][name])]
    assert different == [], "parameters/buffers differ between the resumed and the uninterrupted run"
    # and the resumed run kept training: its parameters are not those it was resumed from
    assert not torch.equal(resumed["agent"]["actor.4.weight"], resumed_runs["first_half"]["agent"]["actor.4.weight"])


def test_resume_with_different_arguments_is_rejected(resumed_runs, tmp_path):
    checkpoint = resumed_runs["full"] / "checkpoint.pt"

    result = run_script(tmp_path, *TINY, "--no-anneal-lr", "--resume", checkpoint, "--norm", "gn")

    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--norm" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------------
# 13. Ctrl-C


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--total-timesteps", "64000", "--save-model", "--checkpoint-interval", "1000"],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        first_lines = []
        for line in process.stdout:  # ends at EOF if the run dies early
            first_lines.append(line)
            if line.startswith("iteration="):
                break
        assert any(line.startswith("iteration=") for line in first_lines), "".join(first_lines)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130, stderr
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped at iteration")]
    assert len(stopped) == 1, stdout
    iteration = int(stopped[0].split()[3].rstrip(";"))
    run_dir = single_run_dir(tmp_path)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["iteration"] == iteration < 1000
    assert checkpoint["global_step"] == 64 * iteration
    scalars = read_scalars(run_dir)  # the event file was closed cleanly and is readable
    assert [step for step, _ in scalars["charts/SPS"]] == [64 * i for i in range(1, iteration + 1)]


# ----------------------------------------------------------------------------------------------------------------------
# 14. Non-finite loss


def test_non_finite_loss_at_cli_is_one_line_error(tmp_path):
    # Adam steps of ~1e10 on every weight overflow the network within the first iteration
    result = run_script(tmp_path, *TINY, "--learning-rate", "1e10", "--save-model", "--checkpoint-interval", "1")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "non-finite" in lines[0], result.stderr
    assert not (single_run_dir(tmp_path) / "checkpoint.pt").exists()  # nothing saved after the NaN


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    iterations, original_gae, original_loss = [], ppo.compute_gae, ppo.clipped_ppo_loss

    def counting_gae(*args, **kwargs):  # called once per iteration (--mdr-rounds 1)
        iterations.append(1)
        return original_gae(*args, **kwargs)

    def loss_nan_from_iteration_2(*args, **kwargs):
        loss, ratio, stats = original_loss(*args, **kwargs)
        return (loss * float("nan") if len(iterations) >= 2 else loss), ratio, stats

    monkeypatch.setattr(ppo, "compute_gae", counting_gae)
    monkeypatch.setattr(ppo, "clipped_ppo_loss", loss_nan_from_iteration_2)
    monkeypatch.setattr(ppo, "evaluate", lambda agent, args, device, iteration: np.zeros(args.num_eval_envs))

    exit_code = ppo.main(tiny_args(total_timesteps=96, save_model=True, checkpoint_interval=1))

    assert exit_code == 1
    assert "non-finite loss at iteration 2" in capsys.readouterr().err
    assert len(iterations) == 2  # the run stopped there
    checkpoint = load_checkpoint(single_run_dir(tmp_path))
    assert checkpoint["iteration"] == 1 and checkpoint["global_step"] == 32
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["agent"].values() if tensor.is_floating_point())


# ----------------------------------------------------------------------------------------------------------------------
# 15. Copy-paste ready


def test_script_runs_alone_in_an_empty_folder(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    script = Path(shutil.copy(SCRIPT, alone))
    assert [path.name for path in alone.iterdir()] == ["ppo_procgen_mdr.py"]

    result = run_script(alone, *TINY, script=script)

    assert_ok(result)
    assert "iteration=1/1, global_step=64" in result.stdout
    assert list(single_run_dir(alone).glob("events.out.tfevents.*"))
