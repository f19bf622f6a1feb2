"""Tests of ppo_patchloc_mdr.py: unit tests in-process (tiny views and tensors), end-to-end runs as subprocesses (tiny
configs: 16-pixel views, 4 + 4 tasks, hidden width 32, random init).

Every subprocess runs with cwd=tmp_path, so its runs/ and wandb/ folders land in a temporary directory, and with
OMP_NUM_THREADS=1: on a small shared machine, torch's intra-op threads oversubscribe the cores (measured 3x slower)."""

import copy
import io
import math
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_patchloc_mdr as ppo
from envs import PatchLocEnv, PatchLocVecEnv, make_task_sets, procedural_image

SCRIPT = Path(ppo.__file__).resolve()
REPO_ROOT = SCRIPT.parent
NUM_ACTIONS = 7
V = 16  # view side of every test; the images are 4V = 64 pixels
NORMS = ["bn", "eval", "brn", "ln", "gn", "none", "dropout"]
MODE_FREE_NORMS = {"eval", "ln", "gn", "none"}
# one iteration of 2 envs x 16 steps (2 minibatches of 16), MDR(2,1) x 1 round, held-out evaluation only at the end
TINY = [
    "--num-envs", "2",
    "--num-steps", "16",
    "--minibatch-size", "16",
    "--total-timesteps", "32",
    "--num-tasks", "4",
    "--num-test-tasks", "4",
    "--view-size", str(V),
    "--image-size", str(4 * V),
    "--num-eval-envs", "2",
    "--num-render-episodes", "1",
    "--hidden-size", "32",
    "--mdr-rounds", "1",
    "--eval-interval", "0",
    "--no-pretrained",
    "--no-cuda",
]  # fmt: skip
TB_KEYS = [
    "charts/episodic_return",
    "charts/normalized_reward",
    "charts/success_rate",
    "charts/test_episodic_return",
    "charts/test_normalized_reward",
    "charts/test_success_rate",
    "charts/generalization_gap",
    "charts/delta_pi_minus",
    "charts/delta_pi_plus",
    "charts/learning_rate",
    "charts/SPS",
    "mdr/ratio_gap",
    "mdr/trust_region_violation",
    "losses/standard/policy_loss",
    "losses/rectify/policy_loss",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
]
IMAGENET_FILE = "resnet18-f37072fd.pth"
GREEN = np.array([0, 255, 0], dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """In-process tests: one intra-op thread (see the module docstring), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(cwd, *args, script=SCRIPT, pythonpath=str(REPO_ROOT), timeout=300):
    """Run the script as a user would, in `cwd`; returns the CompletedProcess (text stdout/stderr)."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_one_line_error(result, message, cwd):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and message in lines[0], lines[0]
    assert not (Path(cwd) / "runs").exists()
    assert not (Path(cwd) / "wandb").exists()


def single_run_dir(cwd) -> Path:
    run_dirs = list((Path(cwd) / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


def load_checkpoint(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def tiny_args(**overrides) -> ppo.Args:
    """Valid in-process arguments, the same configuration as TINY."""
    fields = dict(
        num_envs=2,
        num_steps=16,
        minibatch_size=16,
        total_timesteps=32,
        num_tasks=4,
        num_test_tasks=4,
        view_size=V,
        image_size=4 * V,
        num_eval_envs=2,
        num_render_episodes=1,
        hidden_size=32,
        mdr_rounds=1,
        eval_interval=0,
        pretrained=False,
        cuda=False,
    )
    return ppo.Args(**{**fields, **overrides})


def make_agent(norm="bn", seed=0, **overrides) -> ppo.Agent:
    torch.manual_seed(seed)
    return ppo.Agent(NUM_ACTIONS, tiny_args(norm=norm, **overrides))


def random_obs(n=8, seed=0) -> torch.Tensor:
    """uint8 (n, 3 views, V, V, 3), as the env returns."""
    return torch.randint(0, 256, (n, 3, V, V, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


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
    return {"obs": obs, "actions": actions, "logprobs": logprobs, "values": values.flatten()}


def clone_state(module: nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed_entries(before: dict, module: nn.Module) -> list:
    return [name for name, tensor in module.state_dict().items() if not torch.equal(before[name], tensor)]


def write_images(folder, count, height=80, width=100, seed=0):
    """`count` random-structured PNGs (procedural images cropped to height x width); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(procedural_image(rng, max(height, width))[:height, :width]).save(path)
        paths.append(path)
    return paths


def tiny_task_sets(num_train=4, num_test=4):
    return make_task_sets(num_train, num_test, "procedural", 4 * V, V, seed=1)


def outline_mask(side, box, width):
    """Pixels of the outline `draw_episode` draws for a normalised box, computed here from the box alone."""
    y0, x0, y1, x1 = (np.asarray(box) * side).round().astype(int)
    inside_outer = np.zeros((side, side), dtype=bool)
    inside_outer[y0:y1, x0:x1] = True
    inside_inner = np.zeros((side, side), dtype=bool)
    inside_inner[y0 + width : y1 - width, x0 + width : x1 - width] = True
    return inside_outer & ~inside_inner


# ----------------------------------------------------------------------------------------------------------------------
# 1. The three-view network


def test_three_view_forward_shapes_and_one_backbone_pass():
    agent = make_agent("bn")
    calls = []
    agent.backbone.register_forward_hook(lambda module, inputs, output: calls.append((inputs[0].shape, output.shape)))
    obs = random_obs(5)

    action, logprob, entropy, value = agent.get_action_and_value(obs)
    logits = agent.actor(agent.features(obs))

    assert action.shape == logprob.shape == entropy.shape == (5,)
    assert logits.shape == (5, NUM_ACTIONS) and value.shape == (5, 1)
    assert 0 <= action.min() and action.max() < NUM_ACTIONS
    # one backbone pass per forward, over all B x 3 images (float, channels first), 256 features each
    assert calls[0] == (torch.Size([15, 3, V, V]), torch.Size([15, 256]))
    assert len(calls) == 2
    assert agent.get_value(obs).shape == (5, 1) and len(calls) == 3


def test_views_share_the_backbone_and_keep_their_place_in_the_features():
    agent = make_agent("bn").eval()  # eval mode: running statistics, so every image is processed on its own
    obs = random_obs(4, seed=3)
    perm = [2, 0, 1]  # view v of the permuted observation is view perm[v] of the original

    with torch.no_grad():
        features = agent.features(obs).reshape(4, 3, 256)
        permuted = agent.features(obs[:, perm]).reshape(4, 3, 256)
        # each 256-d chunk is the backbone applied to that view alone (one network, not three)
        separate = torch.stack([agent.backbone(obs[:, v].permute(0, 3, 1, 2).float() / 255.0) for v in range(3)], dim=1)

    torch.testing.assert_close(permuted, features[:, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features, separate, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features[:, 0], features[:, 1])  # different images, different features


# ----------------------------------------------------------------------------------------------------------------------
# 2-3. The MDR update: phases, modes, minibatches, and the recomputation of advantages (in-process main)


class Recorder:
    """Wraps ppo_update, compute_values and the Agent's get_value, get_action_and_value and get_policy_and_value to log
    what main does."""

    def __init__(self, monkeypatch):
        self.events, self.minibatches, self.rollout_modes, self.recompute_modes = [], [], [], []
        self.recomputed, self.batch_values, self.batch_advantages = [], [], []
        self.in_recompute = False
        original_update, original_values = ppo.ppo_update, ppo.compute_values
        original_get_value, original_get_action_and_value = ppo.Agent.get_value, ppo.Agent.get_action_and_value
        original_get_policy_and_value, self.inside_get_action_and_value = ppo.Agent.get_policy_and_value, False

        def recording_update(agent, optimizer, batch, mb_inds, *args, **kwargs):
            self.events.append("train" if agent.training else "eval")
            self.minibatches.append(mb_inds.tolist())
            self.batch_values.append(batch["values"])
            self.batch_advantages.append(batch["advantages"].clone())
            return original_update(agent, optimizer, batch, mb_inds, *args, **kwargs)

        def recording_values(agent, b_obs, chunk_size):
            self.events.append("recompute")
            self.in_recompute = True
            values = original_values(agent, b_obs, chunk_size)
            self.in_recompute = False
            was_training = agent.training
            agent.eval()
            with torch.no_grad():  # reference: the eval-mode critic at the current parameters
                expected = agent.critic(agent.features(b_obs)).flatten()
            agent.train(was_training)
            torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)
            self.recomputed.append(values)
            return values

        def recording_get_value(agent, x):
            if self.in_recompute:
                self.recompute_modes.append((agent.training, torch.is_grad_enabled()))
            return original_get_value(agent, x)

        def recording_get_action_and_value(agent, x, action=None):  # the update's, ratio gap's and evaluation's passes
            self.inside_get_action_and_value = True
            try:
                return original_get_action_and_value(agent, x, action)
            finally:
                self.inside_get_action_and_value = False

        def recording_get_policy_and_value(agent, x):
            if not self.inside_get_action_and_value:  # called directly: rollout collection
                self.rollout_modes.append((agent.training, torch.is_grad_enabled()))
            return original_get_policy_and_value(agent, x)

        monkeypatch.setattr(ppo, "ppo_update", recording_update)
        monkeypatch.setattr(ppo, "compute_values", recording_values)
        monkeypatch.setattr(ppo.Agent, "get_value", recording_get_value)
        monkeypatch.setattr(ppo.Agent, "get_action_and_value", recording_get_action_and_value)
        monkeypatch.setattr(ppo.Agent, "get_policy_and_value", recording_get_policy_and_value)


def expected_events(alpha1, alpha2, rounds, minibatches_per_epoch):
    one_round = ["train"] * alpha1 * minibatches_per_epoch + ["eval"] * alpha2 * minibatches_per_epoch
    return one_round + (["recompute"] + one_round) * (rounds - 1)


@pytest.mark.parametrize(
    "minibatch_size, sizes",
    [(8, [8, 8, 8, 8]), (12, [12, 12, 8])],  # |D_k| = 32: K = 4, and K = ceil(32 / 12) = 3 with a smaller last one
    ids=["m-divides", "last-minibatch-smaller"],
)
def test_advantages_recomputed_at_rounds_2_to_R_in_eval_mode(minibatch_size, sizes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorder = Recorder(monkeypatch)
    args = tiny_args(alpha1=2, alpha2=1, mdr_rounds=3, minibatch_size=minibatch_size)

    assert ppo.main(args) == 0

    k = len(sizes)
    assert k == math.ceil(32 / minibatch_size)
    assert recorder.events == expected_events(2, 1, 3, k)
    assert recorder.events.count("recompute") == 2 and recorder.events[0] != "recompute"  # R - 1, never before round 1
    # compute_values' critic passes run in eval mode under no_grad, in chunks of m
    assert recorder.recompute_modes == [(False, False)] * (2 * k)
    # every epoch is one shuffled pass over D_k, in K minibatches of m (the last one smaller)
    epochs = [recorder.minibatches[i : i + k] for i in range(0, len(recorder.minibatches), k)]
    assert len(epochs) == 9
    for epoch in epochs:
        assert [len(mb) for mb in epoch] == sizes
        assert sorted(i for mb in epoch for i in mb) == list(range(32))
    assert epochs[0] != epochs[1]  # reshuffled
    # rounds 2 and 3 train on the recomputed values, and on new advantages
    per_round = 3 * k
    for r in range(3):
        values = recorder.batch_values[r * per_round : (r + 1) * per_round]
        assert all(v is values[0] for v in values)
        if r > 0:
            assert values[0] is recorder.recomputed[r - 1]
            previous_advantages = recorder.batch_advantages[(r - 1) * per_round]
            assert not torch.allclose(recorder.batch_advantages[r * per_round], previous_advantages)


@pytest.mark.parametrize(
    "alpha1, alpha2, rounds",
    [(2, 1, 3), (1, 2, 3), (3, 0, 2), (0, 3, 2)],
    ids=["mdr2-1x3", "mdr1-2x3", "ppo3x2", "eval-only3x2"],
)
def test_phase_mode_sequence_and_rollouts_in_eval_mode(alpha1, alpha2, rounds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorder = Recorder(monkeypatch)
    args = tiny_args(alpha1=alpha1, alpha2=alpha2, mdr_rounds=rounds, total_timesteps=64)  # 2 iterations, K = 2

    assert ppo.main(args) == 0

    assert recorder.events == expected_events(alpha1, alpha2, rounds, 2) * 2
    # values recomputed in eval mode even when the round ended in train mode (plain PPO, --alpha2 0)
    assert recorder.recompute_modes == [(False, False)] * (2 * (rounds - 1) * 2)
    assert recorder.rollout_modes == [(False, False)] * (2 * args.num_steps)  # eval mode, under no_grad


@pytest.mark.parametrize("norm", ["bn", "dropout"])
def test_compute_values_is_the_eval_mode_critic_from_either_mode(norm):
    agent = make_agent(norm).train()
    b_obs = random_obs(10, seed=4)
    with torch.no_grad():
        train_mode = agent.get_value(b_obs).flatten()  # (moves BatchNorm's running statistics: first)
        expected = agent.eval().get_value(b_obs).flatten()
    agent.train()
    before = clone_state(agent)

    values = ppo.compute_values(agent, b_obs, 4)  # chunks of 4, 4 and 2

    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(values, train_mode)
    assert agent.training and changed_entries(before, agent) == []


# ----------------------------------------------------------------------------------------------------------------------
# 4. Learning-rate schedule


def schedule(kind, iterations=10, peak=3e-4):
    args = tiny_args(lr_schedule=kind, learning_rate=peak)
    args.num_iterations = iterations
    return [ppo.learning_rate_at(i, args) for i in range(1, iterations + 1)]


def test_linear_schedule():
    rates = schedule("linear")
    assert rates[0] == pytest.approx(3e-4)
    assert rates[-1] == pytest.approx(3e-4 / 10)
    assert all(b < a for a, b in zip(rates, rates[1:]))
    np.testing.assert_allclose(np.diff(rates), -3e-5, rtol=1e-9)  # equal steps


def test_cosine_schedule():
    rates = schedule("cosine", iterations=100)
    assert rates[0] == pytest.approx(3e-4)
    assert rates[50] == pytest.approx(1.5e-4)  # iteration 51: progress 0.5
    assert 0 < rates[-1] < 1e-3 * 3e-4
    assert all(b < a for a, b in zip(rates, rates[1:]))


def test_constant_schedule():
    assert schedule("constant") == [3e-4] * 10


# ----------------------------------------------------------------------------------------------------------------------
# 5. Diagnostics are side-effect free on the three-view agent


@pytest.mark.parametrize("training", [True, False], ids=["from-train-mode", "from-eval-mode"])
@pytest.mark.parametrize("norm", ["bn", "brn", "dropout"])
def test_policy_mismatch_has_no_side_effects(norm, training):
    agent = make_agent(norm)
    agent.train(training)
    b_obs = random_obs(16, seed=1)
    before = clone_state(agent)
    rng_state = torch.get_rng_state()

    delta_pi = ppo.policy_mismatch(agent, b_obs, 8, 0, torch.Generator().manual_seed(0))

    after_rand = torch.rand(3)
    torch.set_rng_state(rng_state)
    assert torch.equal(after_rand, torch.rand(3)), "the global torch RNG stream moved"
    assert changed_entries(before, agent) == []  # parameters, running stats, num_batches_tracked
    assert agent.training == training
    assert 0.0 < delta_pi.item() <= math.log(2)  # a mode-dependent network: the two policies differ


@pytest.mark.parametrize("norm", ["bn", "brn", "dropout"])
def test_policy_mismatch_against_the_running_stats_it_was_called_with(norm):
    """Each minibatch's two sides are eq. 6's at the call's running statistics (a train-mode pass moves them); the
    rollout's eval-mode logits, given as b_eval_logits, give the same value with one pass per minibatch instead of two."""
    agent = make_agent(norm)
    with torch.no_grad():
        agent.actor[-1].weight.mul_(100.0)  # a peaked policy: at init delta_pi is too small to tell anything apart
    b_obs = random_obs(24, seed=1)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    rng_state, expected = torch.get_rng_state(), []  # the same dropout masks for the reference and the function
    for start in range(0, 24, 8):  # each minibatch on fresh copies: nothing has moved their statistics
        with torch.no_grad():
            eval_copy, train_copy = copy.deepcopy(agent).eval(), copy.deepcopy(agent).train()
            mb_obs = b_obs[perm[start : start + 8]]
            train_logits = train_copy.actor(train_copy.features(mb_obs))
            expected.append(ppo.js_divergence(train_logits, eval_copy.actor(eval_copy.features(mb_obs))).mean().item())
    agent.eval()
    with torch.no_grad():  # the eval-mode logits as the rollout computes them: 2 envs per step, not minibatches of 8
        b_eval_logits = torch.cat([agent.get_policy_and_value(b_obs[i : i + 2])[0].logits for i in range(0, 24, 2)])
    agent.train()
    passes, original_features = [], ppo.Agent.features

    def counting_features(self, x):
        passes.append(self.training)
        return original_features(self, x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ppo.Agent, "features", counting_features)
        torch.set_rng_state(rng_state)
        computed = ppo.policy_mismatch(agent, b_obs, 8, 0, torch.Generator().manual_seed(0))
        assert passes == [False, True] * 3
        passes.clear()
        torch.set_rng_state(rng_state)
        given = ppo.policy_mismatch(agent, b_obs, 8, 0, torch.Generator().manual_seed(0), b_eval_logits=b_eval_logits)
        assert passes == [True] * 3

    assert computed.item() == pytest.approx(np.mean(expected), rel=1e-5)
    assert given.item() == pytest.approx(np.mean(expected), rel=1e-3)
    assert computed.item() > 1e-4


def test_delta_pi_minus_reads_the_rollout_logits_of_the_eval_mode_policy(tmp_path, monkeypatch):
    """The logits main stores during the rollout are the eval-mode policy at theta_k on exactly batch["obs"] (eq. 6):
    a wrong mode, a step misaligned with its observation or a stale network would all differ from this recomputation."""
    monkeypatch.chdir(tmp_path)
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


def test_policy_mismatch_is_zero_without_mode_dependent_layers():
    agent = make_agent("gn")
    delta_pi = ppo.policy_mismatch(agent, random_obs(16, seed=1), 8, 0, torch.Generator().manual_seed(0))
    assert delta_pi.item() == pytest.approx(0.0, abs=1e-6)


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
    batch.update(advantages=torch.randn(16), returns=torch.randn(16))
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
# 6. Held-out evaluation and the episode drawings


def greedy_return(agent, task_set, task_id, max_steps):
    """Reference: one greedy eval-mode episode of a task in the single env."""
    env = PatchLocEnv(task_set, max_steps=max_steps)
    obs, _ = env.reset(options={"task_id": task_id})
    total, done = 0.0, False
    while not done:
        with torch.no_grad():
            action = agent.actor(agent.features(torch.as_tensor(obs[None]))).argmax().item()
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        done = terminated or truncated
    return total


def test_evaluate_runs_each_task_once_and_is_deterministic(monkeypatch):
    _, test_tasks = tiny_task_sets(num_test=7)
    agent = make_agent("bn").train()
    counted = []

    class RecordingVecEnv(PatchLocVecEnv):
        def step(self, actions):
            out = super().step(actions)
            infos = out[4]
            if "episode" in infos:
                mask = infos["_episode"] & infos["episode"]["from_queue"]
                counted.extend(zip(infos["episode"]["task_id"][mask].tolist(), infos["episode"]["r"][mask].tolist()))
            return out

    monkeypatch.setattr(ppo, "PatchLocVecEnv", RecordingVecEnv)
    args = tiny_args(num_eval_envs=3)  # fewer envs than tasks: the rest are queued

    first = ppo.evaluate(agent, test_tasks, 7, args, torch.device("cpu"))
    runs_of_first = list(counted)
    second = ppo.evaluate(agent, test_tasks, 7, args, torch.device("cpu"))

    assert agent.training  # the mode is restored
    assert {key: len(values) for key, values in first.items()} == {"r": 7, "normalized_r": 7, "success": 7}
    assert sorted(task for task, _ in runs_of_first) == list(range(7))  # every task exactly once
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    # the returns are those of the greedy eval-mode policy, task by task
    agent.eval()
    for task, episode_return in runs_of_first:
        assert episode_return == pytest.approx(greedy_return(agent, test_tasks, task, args.max_episode_steps), abs=1e-5)
    optimal = PatchLocEnv(test_tasks).optimal_returns[[task for task, _ in runs_of_first]]
    np.testing.assert_allclose(first["normalized_r"], first["r"] / optimal, rtol=1e-5)  # in the order episodes ended


def test_render_episodes_draws_the_target_and_the_window_path():
    _, test_tasks = tiny_task_sets()
    agent = make_agent("bn")
    args = tiny_args(num_render_episodes=3)

    drawing = ppo.render_episodes(agent, test_tasks, args, torch.device("cpu"))

    side = 4 * V
    assert drawing.shape == (side, 3 * side, 3) and drawing.dtype == np.uint8
    for i in range(3):
        panel, image = drawing[:, i * side : (i + 1) * side], test_tasks.image(i)
        green = np.all(panel == GREEN, axis=-1) & ~np.all(image == GREEN, axis=-1)
        target_outline = outline_mask(side, test_tasks.target_boxes[i], width=2)
        assert green.any() and not (green & ~target_outline).any()  # green only on the target's outline ...
        assert green[target_outline].mean() > 0.5  # ... and most of it visible under the window path
        # the first window (the full image) is outlined along the image border, in a colour of the path (blue -> yellow)
        border = panel[0].astype(int)
        assert np.all((border[:, 0] == border[:, 1]) & (border[:, 2] == 255 - border[:, 0])), border
        assert not np.array_equal(panel, image)


# ----------------------------------------------------------------------------------------------------------------------
# ImageNet initialisation from a cached state dict (offline)


@pytest.fixture(scope="module")
def fake_imagenet_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a random torchvision ResNet-18 state dict under the ImageNet file name."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(123)
    state_dict = torchvision.models.resnet18().state_dict()
    for name, tensor in state_dict.items():
        if name.endswith("running_var"):
            tensor.copy_(torch.rand_like(tensor) + 0.5)
        elif name.endswith(("running_mean", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias")):
            tensor.copy_(torch.randn_like(tensor))
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state_dict, checkpoints / IMAGENET_FILE)
    return torch_home, state_dict


@pytest.fixture
def no_download(monkeypatch):
    attempts = []

    def offline_download(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    return attempts


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_pretrained_weights_load_into_the_shared_backbone(norm, fake_imagenet_home, no_download, monkeypatch):
    torch_home, saved = fake_imagenet_home
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    own = make_agent(norm, pretrained=True).backbone.state_dict()

    assert no_download == []
    for name in ("conv1.weight", "bn1.weight", "layer3.1.conv2.weight", "layer3.1.bn2.bias"):
        assert torch.equal(own[name], saved[name]), name
    assert ("bn1.running_mean" in own) == (norm == "bn")
    if norm == "bn":
        assert torch.equal(own["layer2.0.bn1.running_var"], saved["layer2.0.bn1.running_var"])


def test_missing_imagenet_weights_offline_is_a_config_error(tmp_path, no_download, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    with pytest.raises(ppo.ConfigError) as error:
        make_agent("bn", pretrained=True)

    assert str(tmp_path / "hub" / "checkpoints" / IMAGENET_FILE) in str(error.value)
    assert "--no-pretrained" in str(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# 7-8. End-to-end runs of each norm variant; the TensorBoard log


@pytest.mark.parametrize("norm", NORMS)
def test_each_norm_variant_runs(norm, tmp_path):
    result = run_script(tmp_path, *TINY, "--norm", norm)

    assert_ok(result)
    assert "iteration=1/1, global_step=32" in result.stdout
    assert "held-out evaluation: test_normalized_reward=" in result.stdout
    run_dir = single_run_dir(tmp_path)
    assert run_dir.name.startswith(f"patchloc-procedural-4__ppo_patchloc_mdr__{norm}__mdr2-1__1__")
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert ("has no mode-dependent layer" in result.stdout) == (norm in MODE_FREE_NORMS)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Two iterations of MDR(2,1) x 2 rounds, --norm bn, held-out evaluation after each; returns (stdout, accumulator)."""
    cwd = tmp_path_factory.mktemp("logged_run")
    result = run_script(
        cwd, *TINY, "--total-timesteps", "64", "--eval-interval", "1", "--mdr-rounds", "2", "--num-render-episodes", "2"
    )
    assert_ok(result)
    accumulator = EventAccumulator(str(single_run_dir(cwd)), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return result.stdout, accumulator


def scalars_of(accumulator, tag):
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_log_holds_every_key_with_finite_values(logged_run):
    _, accumulator = logged_run
    logged = accumulator.Tags()["scalars"]
    missing = [key for key in TB_KEYS if key not in logged]
    assert not missing, f"missing {missing}; logged: {sorted(logged)}"
    for key in TB_KEYS:
        values = [value for _, value in scalars_of(accumulator, key)]
        assert values and np.all(np.isfinite(values)), (key, values)
    for key in ("charts/SPS", "charts/delta_pi_minus", "losses/value_loss", "mdr/ratio_gap", "charts/test_normalized_reward"):
        assert [step for step, _ in scalars_of(accumulator, key)] == [32, 64], key  # one point per iteration
    for key in ("charts/delta_pi_minus", "charts/delta_pi_plus"):
        assert all(0.0 <= value <= math.log(2) for _, value in scalars_of(accumulator, key)), key
    for key in ("mdr/trust_region_violation", "charts/success_rate", "charts/test_success_rate"):
        assert all(0.0 <= value <= 1.0 for _, value in scalars_of(accumulator, key)), key
    for key in ("charts/normalized_reward", "charts/test_normalized_reward"):  # percent of the optimal return
        assert all(-100.0 <= value <= 100.0 for _, value in scalars_of(accumulator, key)), key


def test_tensorboard_normalized_reward_matches_stdout(logged_run):
    stdout, accumulator = logged_run
    printed = {}
    for line in stdout.splitlines():
        if line.startswith("iteration="):
            fields = dict(field.split("=") for field in line.split(", "))
            if fields["normalized_reward"] != "nan%":
                printed[int(fields["global_step"])] = float(fields["normalized_reward"].rstrip("%"))
    assert printed, "no episode ended during the run"
    logged = dict(scalars_of(accumulator, "charts/normalized_reward"))
    assert sorted(logged) == sorted(printed)
    for step, value in printed.items():
        assert logged[step] == pytest.approx(value, abs=0.05)


def test_tensorboard_holds_the_episode_drawings(logged_run):
    _, accumulator = logged_run
    assert "eval/test_episodes" in accumulator.Tags()["images"]
    events = accumulator.Images("eval/test_episodes")
    assert [event.step for event in events] == [32, 64]
    image = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)))
    assert image.shape == (4 * V, 2 * 4 * V, 3)
    assert np.all(image == GREEN, axis=-1).any()  # the targets' outlines


# ----------------------------------------------------------------------------------------------------------------------
# 9. Held-out evaluation on tasks disjoint from training


def test_held_out_evaluation_uses_the_disjoint_test_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    created, evaluated, rendered = [], [], []
    original_make, original_evaluate, original_render = ppo.make_task_sets, ppo.evaluate, ppo.render_episodes

    def recording_make(*args, **kwargs):
        created.append(original_make(*args, **kwargs))
        return created[-1]

    def recording_evaluate(agent, task_set, num_tasks, args, device):
        evaluated.append((task_set, num_tasks))
        return original_evaluate(agent, task_set, num_tasks, args, device)

    def recording_render(agent, task_set, args, device):
        rendered.append(task_set)
        return original_render(agent, task_set, args, device)

    monkeypatch.setattr(ppo, "make_task_sets", recording_make)
    monkeypatch.setattr(ppo, "evaluate", recording_evaluate)
    monkeypatch.setattr(ppo, "render_episodes", recording_render)

    assert ppo.main(tiny_args(num_tasks=6, num_test_tasks=5)) == 0

    [(train_tasks, test_tasks)] = created
    assert (train_tasks.split, train_tasks.num_tasks, test_tasks.split, test_tasks.num_tasks) == ("train", 6, "test", 5)
    assert not set(train_tasks.image_ids) & set(test_tasks.image_ids)
    # held-out tasks all once, then as many training tasks as possible for the generalization gap
    assert evaluated == [(test_tasks, 5), (train_tasks, 5)]
    assert rendered == [test_tasks]


def test_folder_task_sets_share_no_image_file(tmp_path):
    write_images(tmp_path / "images", 12)
    args = tiny_args(image_source=str(tmp_path / "images"))

    train_tasks, test_tasks = make_task_sets(
        args.num_tasks, args.num_test_tasks, args.image_source, args.image_size, args.view_size, seed=args.seed
    )

    assert len(set(train_tasks.image_ids)) == 4 and len(set(test_tasks.image_ids)) == 4
    assert not set(train_tasks.image_ids) & set(test_tasks.image_ids)
    assert test_tasks.split == "test"


# ----------------------------------------------------------------------------------------------------------------------
# 10. Checkpoints and exact resume


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """4 iterations uninterrupted vs 2 iterations then --resume to 4 (MDR(2,1) x 2 rounds, constant learning rate)."""
    common = [*TINY, "--mdr-rounds", "2", "--lr-schedule", "constant", "--save-model"]
    full = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(run_script(full, *common, "--total-timesteps", "128"))
    split = tmp_path_factory.mktemp("resumed")
    assert_ok(run_script(split, *common, "--total-timesteps", "64"))
    first_half = load_checkpoint(single_run_dir(split))
    resumed = run_script(split, *common, "--total-timesteps", "128", "--resume", single_run_dir(split) / "checkpoint.pt")
    assert_ok(resumed)
    return {"full": single_run_dir(full), "split": single_run_dir(split), "first_half": first_half, "resumed": resumed}


def test_checkpoint_contents(resumed_runs):
    checkpoint = load_checkpoint(resumed_runs["full"])  # weights_only=True: plain tensors and Python containers

    assert {"agent", "optimizer", "global_step", "iteration", "args", "rng", "env"} <= set(checkpoint)
    assert checkpoint["global_step"] == 128 and checkpoint["iteration"] == 4
    assert checkpoint["args"]["norm"] == "bn" and checkpoint["args"]["view_size"] == V
    agent = ppo.Agent(NUM_ACTIONS, tiny_args(norm="bn"))
    agent.load_state_dict(checkpoint["agent"])  # strict: every parameter and buffer
    assert resumed_runs["first_half"]["global_step"] == 64 and resumed_runs["first_half"]["iteration"] == 2


def test_resume_matches_uninterrupted_run(resumed_runs):
    full, resumed = load_checkpoint(resumed_runs["full"]), load_checkpoint(resumed_runs["split"])

    assert "at iteration 2, global_step 64" in resumed_runs["resumed"].stdout
    assert resumed["global_step"] == full["global_step"] == 128
    assert resumed["agent"].keys() == full["agent"].keys()
    different = [name for name in full["agent"] if not torch.equal(full["agent"][name], resumed["agent"][name])]
    assert different == [], "parameters/buffers differ between the resumed and the uninterrupted run"
    for key, value in full["env"]["envs"].items():  # and the episodes in progress
        assert torch.equal(value, resumed["env"]["envs"][key]), key
    # the resumed run kept training: its parameters are not those it was resumed from
    assert not torch.equal(resumed["agent"]["actor.4.weight"], resumed_runs["first_half"]["agent"]["actor.4.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# 11. Bad input: one line on stderr, no traceback, nothing written


def test_validate_args_rejects_a_minibatch_of_one_sample():
    with pytest.raises(ppo.ConfigError, match="minibatch of one sample"):
        ppo.validate_args(tiny_args(minibatch_size=31))  # 32 = 31 + 1: the last minibatch's advantage std is NaN
    ppo.validate_args(tiny_args(minibatch_size=31, norm_adv=False))
    ppo.validate_args(tiny_args(minibatch_size=30))


BAD_INPUTS = {
    "missing-folder": "does not exist",
    "empty-folder": "holds no .jpg/.jpeg/.png/.tif/.tiff files",
    "corrupt-png": "broken.png",
    "image-size-below-4-views": "image_size (32) must be >= 4 * view_size (64)",
    "images-smaller-than-image-size": "skipped 8 smaller than 128 px",
    "no-epochs": "--alpha1 0 --alpha2 0",
    "corrupt-checkpoint": "not a readable checkpoint",
}


def bad_input(case, tmp_path) -> dict:
    """Prepare the files of one bad-input case in tmp_path; returns the Args fields that make it bad."""
    images = tmp_path / "images"
    images.mkdir()
    if case == "corrupt-png":  # 4 + 4 tasks use every one of the 8 files
        write_images(images, 7)
        (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    if case == "images-smaller-than-image-size":
        write_images(images, 8)  # 80 x 100 pixels
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    return {
        "missing-folder": dict(image_source=str(tmp_path / "nowhere")),
        "empty-folder": dict(image_source=str(images)),
        "corrupt-png": dict(image_source=str(images)),
        "image-size-below-4-views": dict(image_size=32),
        "images-smaller-than-image-size": dict(image_source=str(images), image_size=128),
        "no-epochs": dict(alpha1=0, alpha2=0),
        "corrupt-checkpoint": dict(resume=str(tmp_path / "garbage.pt")),
    }[case]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_config_error_before_anything_is_written(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fields = bad_input(case, tmp_path)

    with pytest.raises(ppo.ConfigError) as error:
        ppo.main(tiny_args(**fields))

    assert BAD_INPUTS[case] in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["corrupt-png", "no-epochs", "corrupt-checkpoint"])
def test_cli_bad_input_is_one_line_error(case, tmp_path):
    fields = bad_input(case, tmp_path)
    flags = [item for name, value in fields.items() for item in (f"--{name.replace('_', '-')}", value)]

    result = run_script(tmp_path, *TINY, *flags)

    assert_one_line_error(result, BAD_INPUTS[case], tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# 12-14. Image folders, Weights and Biases (offline), copy-paste


def test_image_folder_source_runs(tmp_path):
    write_images(tmp_path / "photos", 12)

    result = run_script(tmp_path, *TINY, "--image-source", tmp_path / "photos")

    assert_ok(result)
    assert "iteration=1/1, global_step=32" in result.stdout
    assert "held-out evaluation: test_normalized_reward=" in result.stdout
    assert single_run_dir(tmp_path).name.startswith("patchloc-photos-4__ppo_patchloc_mdr__bn__mdr2-1__1__")


def test_track_writes_an_offline_wandb_run(tmp_path):
    result = run_script(tmp_path, *TINY, "--track", "--save-model", "--norm", "brn", "--alpha1", "1", "--alpha2", "2")

    assert_ok(result)
    run_folders = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_folders) == 1, run_folders
    wandb_files = list(run_folders[0].glob("run-*.wandb"))
    assert len(wandb_files) == 1
    records = wandb_files[0].read_bytes()
    run_dir = single_run_dir(tmp_path)
    for expected in (run_dir.name, "norm=brn", "mdr=(1,2)", "tasks=4"):  # run name and tags
        assert expected.encode() in records, expected
    assert wandb_files[0].name == f"run-{load_checkpoint(run_dir)['wandb_id']}.wandb"  # --resume continues this run


def test_script_runs_alone_with_envs_in_an_empty_folder(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    script = Path(shutil.copy(SCRIPT, alone))
    shutil.copytree(REPO_ROOT / "envs", alone / "envs", ignore=shutil.ignore_patterns("__pycache__"))
    assert sorted(path.name for path in alone.iterdir()) == ["envs", "ppo_patchloc_mdr.py"]

    result = run_script(alone, *TINY, script=script, pythonpath="")  # the repository is not importable

    assert_ok(result)
    assert "iteration=1/1, global_step=32" in result.stdout
    assert list(single_run_dir(alone).glob("events.out.tfevents.*"))
