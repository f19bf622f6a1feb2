"""Tests of ppo_patchloc_mdr.py: unit tests on tiny views and tensors, and tiny training runs
(16-pixel views, 4 + 2 procedural tasks, 8-step episodes, hidden width 32, random init).

Training runs call main() in-process (no interpreter and torch import per run); only what needs a
real process (the command line, an external signal, a copy of the script outside the repository,
wandb) runs one, with cwd=tmp_path and OMP_NUM_THREADS=1: on a small shared machine, torch's
intra-op threads oversubscribe the cores (measured 3x slower)."""

import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import types
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import STOP_SIGNALS
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import envs.patchloc
import ppo_patchloc_mdr as ppo
from envs import PatchLocEnv, PatchLocVecEnv, make_task_sets, procedural_image

SCRIPT = Path(ppo.__file__).resolve()
REPO_ROOT = SCRIPT.parent
NUM_ACTIONS = 7
V = 16  # view side of every test; the images are 4V = 64 pixels
NORMS = ["bn", "eval", "brn", "ln", "gn", "none", "dropout"]
MODE_FREE_NORMS = {"eval", "ln", "gn", "none"}
# one iteration of 2 envs x 16 steps (2 minibatches of 16), MDR(2,1) x 1 round, held-out evaluation
# only at the end
TINY_FIELDS = dict(
    num_envs=2,
    num_steps=16,
    minibatch_size=16,
    total_timesteps=32,
    num_tasks=4,
    num_test_tasks=2,
    view_size=V,
    image_size=4 * V,
    max_episode_steps=8,
    num_eval_envs=2,
    num_render_episodes=1,
    hidden_size=32,
    mdr_rounds=1,
    eval_interval=0,
    pretrained=False,
    cuda=False,
)
TB_KEYS = [
    "charts/episodic_return",
    "charts/episodic_length",
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
    "mdr/trust_region_violation_signed",
    "losses/standard/policy_loss",
    "losses/rectify/policy_loss",
    "losses/standard/approx_kl",
    "losses/rectify/clipfrac",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
]
# What test_joint_view_batching_logs_the_values_of_bae95b5 compares: the values logged at steps 32
# and 64 of `joint_run` (2 iterations of MDR(2,1) x 2 rounds).
BAE95B5_TAGS = ["charts/normalized_reward", "charts/delta_pi_minus", "charts/delta_pi_plus"]
BAE95B5_TAGS += ["losses/standard/value_loss", "losses/rectify/value_loss", "losses/policy_loss"]
BAE95B5_TAGS += ["losses/explained_variance", "losses/approx_kl", "mdr/ratio_gap"]
IMAGENET_FILE = "resnet18-f37072fd.pth"
GREEN = np.array([0, 255, 0], dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """In-process tests: one intra-op thread (see the module docstring), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_flags(fields: dict) -> list:
    """Args fields as command-line flags (booleans as --name / --no-name)."""
    flags = []
    for name, value in fields.items():
        flag = name.replace("_", "-")
        flags += (
            [f"--{flag}" if value else f"--no-{flag}"]
            if isinstance(value, bool)
            else [f"--{flag}", str(value)]
        )
    return flags


def tiny_args(**overrides) -> ppo.Args:
    """Valid arguments of the tiny configuration (TINY_FIELDS), with overrides."""
    return ppo.Args(**{**TINY_FIELDS, **overrides})


def run_script(cwd, *args, timeout=300):
    """Run the script as a user would, in `cwd`, with the tiny configuration and `args`; returns the
    CompletedProcess."""
    command = [sys.executable, str(SCRIPT), *cli_flags(TINY_FIELDS), *map(str, args)]
    return subprocess.run(
        command, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=timeout
    )


def script_env(pythonpath=str(REPO_ROOT)) -> dict:
    return {**os.environ, "PYTHONPATH": pythonpath, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def assert_ok(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def assert_one_line_error(stderr: str, message: str):
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and message in lines[0], lines[0]


@dataclass
class Run:
    """An in-process run of main()."""

    exit_code: int
    stdout: str
    stderr: str
    run_dir: Path
    args: ppo.Args


def run_main(cwd, args=None, **overrides) -> Run:
    """main() as `python ppo_patchloc_mdr.py` would run it in `cwd` (stdout and stderr captured, so
    not a terminal)."""
    args = args or tiny_args(**overrides)
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        patch.chdir(cwd)
        exit_code = ppo.main(args)
    run_dir = Path(cwd, "runs", args.run_name or ppo.default_run_name(args))
    return Run(exit_code, stdout.getvalue(), stderr.getvalue(), run_dir, args)


def ok_run(cwd, args=None, **overrides) -> Run:
    run = run_main(cwd, args, **overrides)
    assert run.exit_code == 0, f"exit {run.exit_code}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    return run


def single_run_dir(cwd) -> Path:
    run_dirs = list((Path(cwd) / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


def read_checkpoint(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def scalars_of(run_dir) -> dict:
    """Every TensorBoard scalar of a run folder, over all its event files (a resumed run adds one):
    tag -> [(step, value)]."""
    scalars = {}
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(
                (event.step, event.value) for event in accumulator.Scalars(tag)
            )
    return {tag: sorted(points) for tag, points in scalars.items()}


def make_agent(norm="bn", seed=0, **overrides) -> ppo.Agent:
    torch.manual_seed(seed)
    return ppo.Agent(NUM_ACTIONS, tiny_args(norm=norm, **overrides))


def random_obs(n=8, seed=0) -> torch.Tensor:
    """uint8 (n, 3 views, V, V, 3), as the env returns."""
    return torch.randint(
        0, 256, (n, 3, V, V, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def make_batch(agent, n=16, seed=0) -> dict:
    """A flat rollout batch whose old log-probs, logits and values are the agent's eval-mode outputs
    (as in collection)."""
    generator = torch.Generator().manual_seed(seed)
    obs = random_obs(n, seed)
    actions = torch.randint(0, NUM_ACTIONS, (n,), generator=generator)
    with ppo.temporary_mode(agent, training=False), torch.no_grad():
        policy, values = agent.get_policy_and_value(obs)
    batch = {
        "obs": obs,
        "actions": actions,
        "logprobs": policy.log_prob(actions),
        "logits": policy.logits,
    }
    return {
        **batch,
        "values": values.flatten(),
        "advantages": torch.randn(n, generator=generator),
        "returns": torch.randn(n),
    }


def clone_state(module: nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed_entries(before: dict, module: nn.Module) -> list:
    return [
        name
        for name, tensor in module.state_dict().items()
        if not torch.equal(before[name], tensor)
    ]


def batchnorms(agent) -> list:
    return [m for m in agent.modules() if isinstance(m, (nn.BatchNorm2d, ppo.BatchRenorm2d))]


def running_stats(agent) -> torch.Tensor:
    """Every BatchNorm running mean and variance of the agent, concatenated (a copy)."""
    return torch.cat(
        [torch.cat([m.running_mean, m.running_var]) for m in batchnorms(agent)]
    ).clone()


def write_images(folder, count, height=80, width=100, seed=0):
    """`count` random-structured PNGs (procedural images cropped to height x width); returns their
    paths."""
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
    """Pixels of the outline `draw_episode` draws for a normalised box, computed here from the box
    alone."""
    y0, x0, y1, x1 = (np.asarray(box) * side).round().astype(int)
    inside_outer = np.zeros((side, side), dtype=bool)
    inside_outer[y0:y1, x0:x1] = True
    inside_inner = np.zeros((side, side), dtype=bool)
    inside_inner[y0 + width : y1 - width, x0 + width : x1 - width] = True
    return inside_outer & ~inside_inner


# --------------------------------------------------------------------------------------------------
# 1. The three-view network and --view-batching


@pytest.mark.parametrize("view_batching, passes", [("separate", [5, 5, 5]), ("joint", [15])])
def test_three_view_forward_shapes_and_backbone_passes(view_batching, passes):
    agent = make_agent("bn", view_batching=view_batching)
    calls = []
    agent.backbone.register_forward_hook(
        lambda module, inputs, output: calls.append((inputs[0].shape, output.shape))
    )
    obs = random_obs(5)

    action, logprob, entropy, value = agent.get_action_and_value(obs)

    assert action.shape == logprob.shape == entropy.shape == (5,)
    assert value.shape == (5, 1) and 0 <= action.min() and action.max() < NUM_ACTIONS
    assert agent.features(obs).shape == (5, 768) and agent.actor(agent.features(obs)).shape == (
        5,
        NUM_ACTIONS,
    )
    # separate: one backbone pass per view over its B images; joint: one pass over all 3B; 256
    # features per image
    assert calls[: len(passes)] == [
        (torch.Size([n, 3, V, V]), torch.Size([n, 256])) for n in passes
    ]
    assert len(calls) == 3 * len(passes)
    agent.get_value(obs)
    assert len(calls) == 4 * len(passes)


@pytest.mark.parametrize("view_batching", ["separate", "joint"])
def test_views_share_the_backbone_and_keep_their_place_in_the_features(view_batching):
    agent = make_agent(
        "bn", view_batching=view_batching
    ).eval()  # eval mode: running statistics, images on their own
    obs = random_obs(4, seed=3)
    perm = [2, 0, 1]  # view v of the permuted observation is view perm[v] of the original

    with torch.no_grad():
        features = agent.features(obs).reshape(4, 3, 256)
        permuted = agent.features(obs[:, perm]).reshape(4, 3, 256)
        # each 256-d chunk is the backbone applied to that view alone (one network, not three)
        alone = torch.stack(
            [agent.backbone(obs[:, v].permute(0, 3, 1, 2).float() / 255.0) for v in range(3)], dim=1
        )

    torch.testing.assert_close(permuted, features[:, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features, alone, rtol=1e-5, atol=1e-6)
    # different images, different features
    assert not torch.allclose(features[:, 0], features[:, 1])


def separate_and_joint(norm="bn"):
    """Two agents with the same weights, one per --view-batching."""
    separate = make_agent(norm, view_batching="separate")
    joint = ppo.Agent(NUM_ACTIONS, tiny_args(norm=norm, view_batching="joint"))
    joint.load_state_dict(separate.state_dict())
    return separate, joint


@pytest.mark.parametrize("norm", ["bn", "brn"])
def test_separate_and_joint_view_batching_agree_in_eval_mode(norm):
    separate, joint = separate_and_joint(norm)
    obs = random_obs(6, seed=2)

    with torch.no_grad():
        outputs = [agent.eval().get_policy_and_value(obs) for agent in (separate, joint)]

    torch.testing.assert_close(outputs[0][0].logits, outputs[1][0].logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-5, atol=1e-6)
    # an eval-mode pass moves no statistic
    assert torch.equal(running_stats(separate), running_stats(joint))


def test_separate_view_batching_normalizes_each_view_with_its_own_batch_statistics():
    """Train mode: separate = the backbone run on the target views, then the overviews, then the
    current views (BatchNorm batch statistics per view type, running statistics moved three times);
    joint = one pass over the 3B images."""
    separate, joint = separate_and_joint("bn")
    reference = copy.deepcopy(separate).train()
    obs = random_obs(6, seed=2)

    with torch.no_grad():
        separate_features = separate.train().features(obs)
        joint_features = joint.train().features(obs)
        view_by_view = [
            reference.backbone(obs[:, v].permute(0, 3, 1, 2).float() / 255.0) for v in range(3)
        ]

    torch.testing.assert_close(
        separate_features, torch.cat(view_by_view, dim=1), rtol=1e-5, atol=1e-6
    )
    # the same three running-stats updates
    torch.testing.assert_close(separate.state_dict(), reference.state_dict())
    assert (
        separate.backbone.bn1.num_batches_tracked.item() == 3
        and joint.backbone.bn1.num_batches_tracked.item() == 1
    )
    assert not torch.allclose(separate_features, joint_features, atol=1e-3)
    assert not torch.allclose(running_stats(separate), running_stats(joint))


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """2 iterations of MDR(2,1) x 2 rounds with --view-batching joint."""
    return ok_run(
        tmp_path_factory.mktemp("joint"), total_timesteps=64, mdr_rounds=2, view_batching="joint"
    )


def bae95b5_features(self, x):
    """Agent.features of bae95b5 (before the restructure), as it was written but for its --amp
    autocast (off here): uint8 (B, 3 views, V, V, 3) -> one backbone pass over B*3 images in
    [0, 1], channels_last in memory (BatchNorm's batch statistics span all views) -> (B, 768)."""
    batch, views = x.shape[:2]
    images = x.reshape((batch * views,) + x.shape[2:]).permute(0, 3, 1, 2).float().div_(255.0)
    return self.backbone(images).float().reshape(batch, views * 256)


@pytest.fixture(scope="module")
def bae95b5_run(tmp_path_factory):
    """joint_run's configuration with bae95b5's Agent.features."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(ppo.Agent, "features", bae95b5_features)
        return ok_run(
            tmp_path_factory.mktemp("bae95b5"),
            total_timesteps=64,
            mdr_rounds=2,
            view_batching="joint",
        )


def test_bae95b5_features_are_the_joint_path_and_not_the_separate_one():
    """The reference is sensitive: in train mode it equals the joint path, not the separate one."""
    separate, joint = separate_and_joint("bn")
    obs = random_obs(6, seed=2)

    with torch.no_grad():
        reference = bae95b5_features(copy.deepcopy(joint).train(), obs.clone())
        features = joint.train().features(obs.clone()), separate.train().features(obs.clone())

    assert torch.equal(features[0], reference)
    assert not torch.allclose(features[1], reference, atol=1e-3)


def test_joint_view_batching_logs_the_values_of_bae95b5(joint_run, bae95b5_run):
    """--view-batching joint is bae95b5's computation (one backbone pass over the 3B views). This
    test pinned the values bae95b5 logged until issue 27; on an AVX2-only CPU they failed (oneDNN
    rounds differently there, and two iterations of training amplify it past any fixed tolerance).
    Now both sides run here, on this CPU: the script's joint path, and the run with bae95b5's
    Agent.features; a change to the joint path (another view order, a pass per view, a dtype)
    moves the values far more than the tolerance. The rest of the loop is compared with bae95b5
    across commits, on one machine, by `benchmarks/compare_with_commit.sh bae95b5` with
    NEW_FLAGS_PATCHLOC="--view-batching joint"."""
    joint, reference = scalars_of(joint_run.run_dir), scalars_of(bae95b5_run.run_dir)

    for tag in BAE95B5_TAGS:
        assert [step for step, _ in joint[tag]] == [step for step, _ in reference[tag]] == [32, 64]
        assert [value for _, value in joint[tag]] == pytest.approx(
            [value for _, value in reference[tag]], rel=1e-6, abs=1e-9
        ), tag


def test_separate_view_batching_is_the_default_and_changes_the_run(joint_run, logged_run):
    """logged_run is joint_run's configuration with the default (separate) view batching and more
    evaluation, which comes after the first iteration's update and logging: that iteration is
    comparable."""
    assert ppo.Args().view_batching == "separate" and logged_run.args.view_batching == "separate"
    separate, joint = scalars_of(logged_run.run_dir), scalars_of(joint_run.run_dir)

    for tag in (
        "charts/delta_pi_minus",
        "charts/delta_pi_plus",
        "losses/standard/value_loss",
        "mdr/ratio_gap",
    ):
        assert separate[tag][0][0] == joint[tag][0][0] == 32
        assert separate[tag][0][1] != pytest.approx(joint[tag][0][1], rel=1e-3), tag


# --------------------------------------------------------------------------------------------------
# 2-3. The MDR update: phases, modes, minibatches, the recomputation of advantages, which calls move
# BatchNorm's running statistics (in-process main)


class Recorder:
    """Wraps what main calls to log, in order, each call's mode and whether it moved BatchNorm's
    running statistics: `updates` (one dict per ppo_update), `events` ("train"/"eval" per update,
    "recompute" per recompute_advantages), `others` (kind, training, grad enabled, moved) for the
    rollout's and the diagnostics' passes; also each epoch's shuffled indices, each GAE result and
    each policy_mismatch's observations. Checks on the way that the rollout's logits
    (delta_pi_minus's eval-mode side) are the eval-mode policy at theta_k on exactly batch["obs"]: a
    wrong mode, a step misaligned with its observation or a stale network would differ from the
    recomputation."""

    def __init__(self, monkeypatch):
        self.updates, self.events, self.others, self.recompute_passes = [], [], [], []
        self.shuffles, self.gae, self.mismatch_obs, self.rollout_logits_checked = [], [], [], 0
        self.depth = 0  # > 0 inside a wrapped call: inner passes belong to it
        original = {
            name: getattr(ppo, name)
            for name in ("ppo_update", "eval_mode_ratio", "recompute_advantages")
        }
        original.update(
            policy_mismatch=ppo.policy_mismatch,
            compute_gae=ppo.compute_gae,
            shuffle=np.random.shuffle,
        )
        original_get_policy_and_value, original_get_value = (
            ppo.Agent.get_policy_and_value,
            ppo.Agent.get_value,
        )

        def tracked(kind, function):
            def wrapper(agent, *args, **kwargs):
                before, training = running_stats(agent), agent.training
                self.depth += 1
                try:
                    result = function(agent, *args, **kwargs)
                finally:
                    self.depth -= 1
                self.others.append(
                    (
                        kind,
                        training,
                        torch.is_grad_enabled(),
                        not torch.equal(before, running_stats(agent)),
                    )
                )
                return result

            return wrapper

        def recording_update(agent, optimizer, mb, args, eval_ratio=None):
            before, training = running_stats(agent), agent.training
            self.depth += 1
            if eval_ratio is not None:
                # r at the running statistics this minibatch starts with (before its pass)
                torch.testing.assert_close(
                    eval_ratio, original["eval_mode_ratio"](agent, mb), rtol=0, atol=0
                )
            stats = original["ppo_update"](agent, optimizer, mb, args, eval_ratio)
            self.depth -= 1
            moved = not torch.equal(before, running_stats(agent))
            self.updates.append(
                dict(training=training, moved=moved, measured=eval_ratio is not None, mb=mb)
            )
            self.events.append("train" if training else "eval")
            return stats

        def recording_recompute(agent, *args, **kwargs):
            self.events.append("recompute")
            return tracked("recompute", original["recompute_advantages"])(agent, *args, **kwargs)

        def recording_mismatch(
            agent, b_obs, minibatch_size, num_minibatches, generator, b_eval_logits=None
        ):
            # (the rollout storage is overwritten by the next iteration)
            self.mismatch_obs.append(b_obs.clone())
            if b_eval_logits is not None:
                # delta_pi_minus reads the rollout's logits: those of theta_k in eval mode
                self.depth += 1
                with ppo.temporary_mode(agent, training=False), torch.no_grad():
                    recomputed = agent.get_policy_and_value(b_obs)[0].logits
                self.depth -= 1
                torch.testing.assert_close(b_eval_logits, recomputed, rtol=1e-4, atol=1e-5)
                self.rollout_logits_checked += 1
            mismatch = tracked("mismatch", original["policy_mismatch"])
            return mismatch(agent, b_obs, minibatch_size, num_minibatches, generator, b_eval_logits)

        def recording_gae(rewards, values, *args):
            advantages, returns = original["compute_gae"](rewards, values, *args)
            self.gae.append(
                dict(values=values.reshape(-1).clone(), advantages=advantages.reshape(-1).clone())
            )
            return advantages, returns

        def recording_shuffle(indices):
            original["shuffle"](indices)
            self.shuffles.append(indices.copy())

        def recording_get_value(agent, x):
            if self.depth:  # recompute_advantages' critic passes
                self.recompute_passes.append((agent.training, torch.is_grad_enabled()))
                return original_get_value(agent, x)
            # the value after the rollout (step 2)
            return tracked("bootstrap", original_get_value)(agent, x)

        def recording_get_policy_and_value(agent, x):
            if self.depth:  # inside the update or a diagnostic
                return original_get_policy_and_value(agent, x)
            return tracked("collect", original_get_policy_and_value)(agent, x)  # the rollout

        monkeypatch.setattr(ppo, "ppo_update", recording_update)
        monkeypatch.setattr(ppo, "eval_mode_ratio", tracked("ratio", original["eval_mode_ratio"]))
        monkeypatch.setattr(ppo, "recompute_advantages", recording_recompute)
        monkeypatch.setattr(ppo, "policy_mismatch", recording_mismatch)
        monkeypatch.setattr(ppo, "compute_gae", recording_gae)
        monkeypatch.setattr(np.random, "shuffle", recording_shuffle)
        monkeypatch.setattr(ppo.Agent, "get_value", recording_get_value)
        monkeypatch.setattr(ppo.Agent, "get_policy_and_value", recording_get_policy_and_value)

    def kinds(self, kind):
        return [entry[1:] for entry in self.others if entry[0] == kind]


def expected_events(alpha1, alpha2, rounds, minibatches_per_epoch):
    one_round = ["train"] * alpha1 * minibatches_per_epoch + [
        "eval"
    ] * alpha2 * minibatches_per_epoch
    return one_round + (["recompute"] + one_round) * (rounds - 1)


def assert_only_the_standard_phase_moves_batchnorm(recorder):
    """Eval mode (collection, rectification, diagnostics, values of rounds 2..R) never moves the
    running statistics; every train-mode minibatch does."""
    assert [u["moved"] for u in recorder.updates] == [u["training"] for u in recorder.updates]
    moved_elsewhere = [entry for entry in recorder.others if entry[3]]
    assert moved_elsewhere == [], moved_elsewhere


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """One iteration of the default MDR (3 rounds of MDR(2,1)), minibatch 12: K = ceil(32 / 12) = 3,
    the last one of 8."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = Recorder(monkeypatch)
        args = tiny_args(alpha1=2, alpha2=1, mdr_rounds=3, minibatch_size=12)
        assert (args.alpha1, args.alpha2, args.mdr_rounds) == (
            ppo.Args().alpha1,
            ppo.Args().alpha2,
            ppo.Args().mdr_rounds,
        )
        ok_run(tmp_path_factory.mktemp("recorded"), args)
    return recorder, args


def test_mode_of_every_phase_and_which_phase_moves_batchnorm(recorded_run):
    recorder, args = recorded_run

    assert recorder.events == expected_events(2, 1, 3, 3)
    assert_only_the_standard_phase_moves_batchnorm(recorder)
    assert sum(u["moved"] for u in recorder.updates) == 3 * 2 * 3  # rounds x alpha1 x K
    # the rollout and its bootstrap value: eval mode, no grad; the diagnostics and rounds 2..R: eval
    # mode
    assert recorder.kinds("collect") == [(False, False, False)] * args.num_steps
    assert recorder.kinds("bootstrap") == [(False, False, False)]
    assert [kind for kind, *_ in recorder.others if kind == "mismatch"] == [
        "mismatch"
    ] * 2  # minus and plus
    assert recorder.rollout_logits_checked == 1
    # 3 chunks of D_k + the next state
    assert recorder.recompute_passes == [(False, False)] * (2 * (3 + 1))


def test_ratio_gap_measured_before_the_pass_on_every_8th_standard_minibatch(recorded_run):
    recorder, _ = recorded_run

    standard = [u["measured"] for u in recorder.updates if u["training"]]
    # of 18 standard minibatches
    assert [i for i, measured in enumerate(standard) if measured] == [
        0,
        8,
        16,
    ]
    assert not any(u["measured"] for u in recorder.updates if not u["training"])
    assert len(recorder.kinds("ratio")) == 3 and not any(
        moved for *_, moved in recorder.kinds("ratio")
    )


def test_minibatches_partition_d_k_and_rounds_2_to_r_train_on_recomputed_advantages(recorded_run):
    recorder, args = recorded_run
    sizes = [12, 12, 8]
    epochs_per_round = 3
    rounds = 3
    b_obs = recorder.mismatch_obs[0]  # delta_pi_minus: called with D_k's observations

    assert len(recorder.shuffles) == rounds * epochs_per_round
    assert len(recorder.gae) == rounds  # the rollout's GAE, then one per recomputation
    for r, gae in enumerate(recorder.gae):
        for epoch in range(r * epochs_per_round, (r + 1) * epochs_per_round):
            perm = recorder.shuffles[epoch]
            assert sorted(perm) == list(range(32))
            for j, size in enumerate(sizes):
                mb = recorder.updates[3 * epoch + j]["mb"]
                inds = perm[12 * j : 12 * j + size]
                assert len(mb["obs"]) == size
                assert torch.equal(mb["obs"], b_obs[inds])
                # round r's values and advantages
                assert torch.equal(mb["values"], gae["values"][inds])
                assert torch.equal(mb["advantages"], gae["advantages"][inds])
        if r > 0:
            # the recomputed values are new (eval-mode critic after the update), and so are the
            # advantages
            assert not torch.allclose(gae["values"], recorder.gae[r - 1]["values"])
            assert not torch.allclose(gae["advantages"], recorder.gae[r - 1]["advantages"])
    assert not np.array_equal(recorder.shuffles[0], recorder.shuffles[1])  # reshuffled every epoch


@pytest.mark.parametrize(
    "alpha1, alpha2, rounds, iterations",
    [(1, 2, 2, 1), (3, 0, 2, 2), (0, 3, 2, 1)],
    ids=["mdr1-2x2", "ppo3x2", "eval-only3x2"],
)
def test_phase_mode_sequence_and_rollouts_in_eval_mode(
    alpha1, alpha2, rounds, iterations, tmp_path, monkeypatch
):
    """Plain PPO (--alpha2 0) ends its update in train mode: two iterations show that the next
    rollout is eval mode."""
    recorder = Recorder(monkeypatch)
    # K = 2
    args = tiny_args(
        alpha1=alpha1, alpha2=alpha2, mdr_rounds=rounds, total_timesteps=32 * iterations
    )

    ok_run(tmp_path, args)

    assert recorder.events == expected_events(alpha1, alpha2, rounds, 2) * iterations
    # values and the bootstrap value recomputed in eval mode even when the round ended in train mode
    # (plain PPO, --alpha2 0): before the fix, that bootstrap pass moved the running statistics
    assert recorder.recompute_passes == [(False, False)] * (iterations * (rounds - 1) * 3)
    # eval mode, no grad
    assert recorder.kinds("collect") == [(False, False, False)] * (iterations * args.num_steps)
    # the second one's logits come from an updated network
    assert recorder.rollout_logits_checked == iterations
    assert_only_the_standard_phase_moves_batchnorm(recorder)


@pytest.mark.parametrize("norm", ["bn", "dropout"])
def test_recompute_advantages_uses_the_eval_mode_critic_from_either_mode(norm):
    agent = make_agent(norm).train()
    generator = torch.Generator().manual_seed(5)
    obs, next_obs = random_obs(10, seed=4), random_obs(2, seed=6)  # a rollout of 5 steps x 2 envs
    rewards, dones = (
        torch.randn(5, 2, generator=generator),
        (torch.rand(5, 2, generator=generator) < 0.3).float(),
    )
    next_done = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        train_mode = agent.get_value(obs).flatten()  # (moves BatchNorm's running statistics: first)
        with ppo.temporary_mode(agent, training=False):
            values, next_value = (
                agent.get_value(obs).flatten(),
                agent.get_value(next_obs).reshape(1, -1),
            )
    args = tiny_args(minibatch_size=4)  # chunks of 4, 4 and 2
    expected_advantages, expected_returns = ppo.compute_gae(
        rewards, values.view(5, 2), dones, next_value, next_done, args.gamma, args.gae_lambda
    )
    before = clone_state(agent)

    result = ppo.recompute_advantages(
        agent, {"obs": obs}, rewards, dones, next_obs, next_done, args
    )

    torch.testing.assert_close(result["values"], values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        result["advantages"], expected_advantages.reshape(-1), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        result["returns"], expected_returns.reshape(-1), rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(result["values"], train_mode)
    # the bootstrap pass too: eval mode
    assert agent.training and changed_entries(before, agent) == []


def test_temporary_mode_restores_the_mode_even_on_error():
    agent = make_agent("bn").train()
    with ppo.temporary_mode(agent, training=False):
        assert not agent.training and not agent.backbone.bn1.training
    assert agent.training and agent.backbone.bn1.training
    with pytest.raises(RuntimeError), ppo.temporary_mode(agent.eval(), training=True):
        assert agent.backbone.bn1.training
        raise RuntimeError
    assert not agent.training and not agent.backbone.bn1.training


def test_compute_gae_cuts_the_bootstrap_at_episode_starts():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [0.25], [1.0]])
    # obs[2] starts a new episode: no bootstrap from step 2 into step 1
    dones = torch.tensor([[0.0], [0.0], [1.0]])
    advantages, returns = ppo.compute_gae(
        rewards, values, dones, torch.tensor([[4.0]]), torch.tensor([0.0]), 0.5, 0.5
    )

    delta2 = 2.0 + 0.5 * 4.0 - 1.0
    delta1 = 0.0 - 0.25
    delta0 = 1.0 + 0.5 * 0.25 - 0.5
    expected = torch.tensor([[delta0 + 0.25 * delta1], [delta1], [delta2]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)


# --------------------------------------------------------------------------------------------------
# 4. The loss, the update, the learning-rate schedule


def test_clipped_ppo_loss_uses_the_advantages_it_is_given():
    args = tiny_args(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, clip_vloss=False)
    mb = {
        "logprobs": torch.zeros(4),
        "returns": torch.tensor([1.0, 0.0, 0.0, 2.0]),
        "values": torch.zeros(4),
    }
    # ratios 1.5 (clipped to 1.2), 0.5 (to 0.8), 1.1, 1
    newlogprob = torch.log(torch.tensor([1.5, 0.5, 1.1, 1.0]))
    advantages = torch.tensor([1.0, 1.0, -1.0, 2.0])
    entropy = torch.full((4,), 1.5)
    newvalue = torch.tensor([[1.0], [1.0], [0.0], [0.0]])

    loss, ratio, stats = ppo.clipped_ppo_loss(newlogprob, entropy, newvalue, advantages, mb, args)

    # pessimistic: max of the two losses per sample
    policy_loss = -(1.2 * 1.0 + 0.5 * 1.0 + 1.1 * -1.0 + 1.0 * 2.0) / 4
    value_loss = 0.5 * (0 + 1 + 0 + 4) / 4
    assert stats["policy_loss"].item() == pytest.approx(policy_loss, rel=1e-6)
    assert stats["value_loss"].item() == pytest.approx(value_loss, rel=1e-6)
    assert loss.item() == pytest.approx(policy_loss - 0.01 * 1.5 + 0.5 * value_loss, rel=1e-6)
    torch.testing.assert_close(ratio, torch.tensor([1.5, 0.5, 1.1, 1.0]))
    assert stats["clipfrac"].item() == 0.5
    assert set(stats) == {
        "policy_loss",
        "value_loss",
        "entropy",
        "old_approx_kl",
        "approx_kl",
        "clipfrac",
    }


def test_ppo_update_normalizes_the_advantages_and_reports_the_trust_region_of_eval_ratio():
    agent = make_agent("bn")
    batch = make_batch(agent)
    agent.train()
    reference = copy.deepcopy(agent)
    eval_ratio = ppo.eval_mode_ratio(agent, batch)
    args = tiny_args()

    stats = ppo.ppo_update(
        agent, torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5), batch, args, eval_ratio
    )

    _, newlogprob, entropy, newvalue = reference.get_action_and_value(
        batch["obs"], batch["actions"]
    )
    normalized = (batch["advantages"] - batch["advantages"].mean()) / (
        batch["advantages"].std() + 1e-8
    )
    loss, ratio, expected = ppo.clipped_ppo_loss(
        newlogprob, entropy, newvalue, normalized, batch, args
    )
    expected.update(
        ppo.trust_region_diagnostics(ratio.detach(), eval_ratio, normalized, args.clip_coef)
    )
    assert stats.keys() == {*expected, "loss"}
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), key
    assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert changed_entries(reference.state_dict(), agent)  # one optimizer step
    assert "ratio_gap" not in ppo.ppo_update(
        agent, torch.optim.SGD(agent.parameters(), lr=0.0), batch, args
    )


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


# --------------------------------------------------------------------------------------------------
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
    """Each minibatch's two sides are eq. 6's at the call's running statistics (a train-mode pass
    moves them); the rollout's eval-mode logits, given as b_eval_logits, give the same value with
    one pass per minibatch instead of two."""
    agent = make_agent(norm)
    with torch.no_grad():
        # a peaked policy: at init delta_pi is too small to tell anything apart
        agent.actor[-1].weight.mul_(100.0)
    b_obs = random_obs(24, seed=1)
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(24, generator=generator)
    expected = []
    for start in range(0, 24, 8):
        # each minibatch on fresh copies: nothing has moved their statistics
        with torch.no_grad():
            eval_copy, train_copy = copy.deepcopy(agent).eval(), copy.deepcopy(agent).train()
            mb_obs = b_obs[perm[start : start + 8]]
            if norm == "dropout":  # the masks policy_mismatch draws: one seed per minibatch
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            train_logits = train_copy.actor(train_copy.features(mb_obs))
            expected.append(
                ppo.js_divergence(train_logits, eval_copy.actor(eval_copy.features(mb_obs)))
                .mean()
                .item()
            )
    agent.eval()
    with torch.no_grad():
        # the eval-mode logits as the rollout computes them: 2 envs per step, not minibatches of 8
        b_eval_logits = torch.cat(
            [agent.get_policy_and_value(b_obs[i : i + 2])[0].logits for i in range(0, 24, 2)]
        )
    agent.train()
    passes = []
    original_features = ppo.Agent.features

    def counting_features(self, x):
        passes.append(self.training)
        return original_features(self, x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ppo.Agent, "features", counting_features)
        torch.manual_seed(1)  # dropout's masks come from the generator, whatever torch's state
        computed = ppo.policy_mismatch(agent, b_obs, 8, 0, torch.Generator().manual_seed(0))
        assert passes == [False, True] * 3
        passes.clear()
        given = ppo.policy_mismatch(
            agent, b_obs, 8, 0, torch.Generator().manual_seed(0), b_eval_logits=b_eval_logits
        )
        assert passes == [True] * 3
        passes.clear()
        # one minibatch (the default)
        ppo.policy_mismatch(agent, b_obs, 8, 1, torch.Generator().manual_seed(0))
        assert passes == [False, True]
        # off
        assert ppo.policy_mismatch(agent, b_obs, 8, -1, torch.Generator().manual_seed(0)) is None
        assert passes == [False, True]

    assert computed.item() == pytest.approx(np.mean(expected), rel=1e-5)
    assert given.item() == pytest.approx(np.mean(expected), rel=1e-3)
    assert computed.item() > 1e-4


def test_js_divergence_is_capped_at_ln_2():
    logits_p = torch.tensor([[60.0, -60.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    logits_q = torch.tensor([[-60.0, 60.0, 0.0], [0.0, 0.0, 0.0], [3.0, 2.0, 1.0]])

    js = ppo.js_divergence(logits_p, logits_q)

    assert js[0].item() == pytest.approx(math.log(2), rel=1e-6)  # disjoint supports: the maximum
    assert js[1].item() == 0.0
    assert 0.0 < js[2].item() < math.log(2)
    assert (js <= math.log(2)).all() and (js >= 0).all()


def test_collect_mode_train_stores_the_train_mode_log_probs_of_the_collecting_network(
    tmp_path, monkeypatch
):
    """--collect-mode train: each stored log-prob is the train-mode output of the network that
    acted, i.e. normalized with the batch statistics of the envs' observations at that step; its
    running statistics moved once per step and once for the bootstrap value; delta_pi_minus is then
    computed, not read from the rollout."""
    seen = {}
    original_scalars, original_update, original_mismatch = (
        ppo.iteration_scalars,
        ppo.ppo_update,
        ppo.policy_mismatch,
    )

    def capture_scalars(args, optimizer, finished, phase_stats, batch, delta_pi):
        seen.setdefault("batch", batch)
        return original_scalars(args, optimizer, finished, phase_stats, batch, delta_pi)

    def capture_update(agent, *args, **kwargs):
        seen.setdefault("tracked", agent.backbone.bn1.num_batches_tracked.item())
        return original_update(agent, *args, **kwargs)

    def capture_mismatch(*args):
        seen.setdefault("eval_logits", args[5:])
        return original_mismatch(*args)

    monkeypatch.setattr(ppo, "iteration_scalars", capture_scalars)
    monkeypatch.setattr(ppo, "ppo_update", capture_update)
    monkeypatch.setattr(ppo, "policy_mismatch", capture_mismatch)
    args = tiny_args(collect_mode="train")
    ok_run(tmp_path, args)

    torch.manual_seed(args.seed)  # the agent main built (the task sets draw from numpy, not torch)
    theta_0 = ppo.Agent(NUM_ACTIONS, tiny_args())
    batch, n = seen["batch"], args.num_envs
    with torch.no_grad():
        steps = [slice(i, i + n) for i in range(0, args.batch_size, n)]  # the rollout, step by step
        train_mode = torch.cat(
            [
                theta_0.train().get_action_and_value(batch["obs"][s], batch["actions"][s])[1]
                for s in steps
            ]
        )
        eval_mode = theta_0.eval().get_action_and_value(batch["obs"], batch["actions"])[1]
    torch.testing.assert_close(batch["logprobs"], train_mode, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch["logprobs"], eval_mode, rtol=1e-5, atol=1e-5)
    # separate view batching: 3 BatchNorm passes per forward
    assert seen["tracked"] == 3 * (args.num_steps + 1)
    assert seen["eval_logits"] == (None,)


# --------------------------------------------------------------------------------------------------
# 6. The ratio gap and the trust region (eq. 10-11)


@pytest.mark.parametrize("training", [True, False], ids=["from-train-mode", "from-eval-mode"])
@pytest.mark.parametrize("norm", ["bn", "brn", "dropout"])
def test_eval_mode_ratio_has_no_side_effects(norm, training):
    agent = make_agent(norm)
    batch = make_batch(agent)
    agent.train(training)
    before = clone_state(agent)
    rng_state = torch.get_rng_state()

    eval_ratio = ppo.eval_mode_ratio(agent, batch)

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
    inside, advantages = torch.ones(16), torch.ones(16)  # r' = 1: inside [0.8, 1.2]

    same = ppo.trust_region_diagnostics(inside, ppo.eval_mode_ratio(agent, batch), advantages, 0.2)
    assert same["ratio_gap"].item() == pytest.approx(0.0, abs=1e-5)
    assert (
        same["trust_region_violation"].item() == same["trust_region_violation_signed"].item() == 0.0
    )

    # old log-probs lowered by 0.5: r = e^0.5 ~ 1.65 lies outside [0.8, 1.2] for every sample,
    # r' = 1 inside
    shifted_ratio = ppo.eval_mode_ratio(agent, {**batch, "logprobs": batch["logprobs"] - 0.5})
    shifted = ppo.trust_region_diagnostics(inside, shifted_ratio, advantages, 0.2)
    assert shifted["ratio_gap"].item() == pytest.approx(math.exp(0.5) - 1.0, rel=1e-4)
    assert shifted["trust_region_violation"].item() == 1.0
    # A > 0 and r > 1 + eps: r's clip stops the gradient
    assert shifted["trust_region_violation_signed"].item() == 1.0
    against = ppo.trust_region_diagnostics(inside, shifted_ratio, -advantages, 0.2)
    # A < 0: the clip never stops r > 1 + eps
    assert against["trust_region_violation_signed"].item() == 0.0

    half = ppo.trust_region_diagnostics(
        torch.tensor([1.0, 1.0, 1.5, 1.5]), torch.tensor([1.0, 1.5, 1.0, 1.5]), torch.ones(4), 0.2
    )
    assert half["trust_region_violation"].item() == 0.25  # only r' inside with r outside counts
    assert half["ratio_gap"].item() == pytest.approx(0.25)
    # signed, per sample: r clipped (r > 1.2 with A > 0, r < 0.8 with A < 0) and r' not
    signed = ppo.trust_region_diagnostics(
        torch.tensor([1.0, 1.0, 1.5, 1.0, 1.0, 0.5]),
        torch.tensor([1.5, 0.5, 1.5, 1.5, 0.5, 0.5]),
        torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]),
        0.2,
    )
    # the first two samples
    assert signed["trust_region_violation_signed"].item() == pytest.approx(2 / 6)
    assert signed["trust_region_violation"].item() == pytest.approx(4 / 6)


# --------------------------------------------------------------------------------------------------
# 7. --bn-recalibrate: running statistics of the new weights on D_k


def batchnorm_inputs(agent, obs) -> dict:
    """The input of every BatchNorm layer in a train-mode pass of a copy of the agent (its own agent
    untouched)."""
    reference = copy.deepcopy(agent).train()
    inputs = {}
    names = {module: name for name, module in reference.named_modules()}

    def record(module, args, output):
        inputs.setdefault(names[module], []).append(args[0])

    hooks = [m.register_forward_hook(record) for m in batchnorms(reference)]
    with torch.no_grad():
        reference.features(obs)
    for hook in hooks:
        hook.remove()
    return inputs


@pytest.mark.parametrize(
    "minibatch_size, sizes", [(12, [12]), (5, [5, 5, 2])], ids=["all-of-d_k", "minibatch-average"]
)
def test_recalibrate_batchnorm_sets_the_average_batch_statistics_of_d_k(minibatch_size, sizes):
    """With one minibatch = D_k (joint view batching): each running mean / var becomes the exact
    mean and unbiased variance of the layer's input on D_k (for the first one, conv1's output); with
    several, the average over the minibatches of theirs. Nothing else changes and no RNG is
    drawn."""
    agent = make_agent("bn", view_batching="joint").eval()
    b_obs = random_obs(12, seed=7)
    expected = {}
    for start, size in zip(range(0, 12, minibatch_size), sizes):
        for name, [x] in batchnorm_inputs(agent, b_obs[start : start + size]).items():
            expected.setdefault(name, []).append(
                (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True))
            )
    with torch.no_grad():
        conv1 = agent.backbone.conv1(b_obs.reshape(36, V, V, 3).permute(0, 3, 1, 2).float() / 255.0)
    before, rng_state = clone_state(agent), torch.get_rng_state()

    ppo.recalibrate_batchnorm(agent, b_obs, minibatch_size)

    assert torch.equal(torch.get_rng_state(), rng_state) and not agent.training
    modules = dict(agent.named_modules())
    for name, stats in expected.items():
        means, variances = (torch.stack(column).mean(0) for column in zip(*stats))
        torch.testing.assert_close(modules[name].running_mean, means, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(modules[name].running_var, variances, rtol=1e-4, atol=1e-5)
    if len(sizes) == 1:
        bn1 = agent.backbone.bn1
        torch.testing.assert_close(bn1.running_mean, conv1.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            bn1.running_var, conv1.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6
        )
    else:  # the average of minibatch statistics is not the statistics of D_k
        assert not torch.allclose(agent.backbone.bn1.running_var, conv1.var((0, 2, 3)), rtol=1e-3)
    changed = changed_entries(before, agent)
    assert set(changed) == {
        f"{name}.running_{stat}" for name in expected for stat in ("mean", "var")
    }


def test_recalibrate_batchnorm_with_separate_views_averages_the_three_view_statistics():
    agent = make_agent("bn").eval()
    b_obs = random_obs(12, seed=7)
    with torch.no_grad():
        conv1 = [
            agent.backbone.conv1(b_obs[:, v].permute(0, 3, 1, 2).float() / 255.0) for v in range(3)
        ]

    ppo.recalibrate_batchnorm(agent, b_obs, 12)

    expected_mean = torch.stack([x.mean((0, 2, 3)) for x in conv1]).mean(0)
    expected_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in conv1]).mean(0)
    torch.testing.assert_close(agent.backbone.bn1.running_mean, expected_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(agent.backbone.bn1.running_var, expected_var, rtol=1e-4, atol=1e-6)


def test_recalibrate_batchnorm_works_on_batch_renorm():
    agent = make_agent("brn").eval()
    b_obs = random_obs(8, seed=7)
    before = clone_state(agent)

    ppo.recalibrate_batchnorm(agent, b_obs, 4)

    changed = changed_entries(before, agent)
    assert "backbone.bn1.running_mean" in changed and "backbone.bn1.running_var" in changed
    # Batch Renorm's warm-up clock stays
    assert not [name for name in changed if "num_batches_tracked" in name]


def test_recalibrate_batchnorm_leaves_frozen_eval_mode_batchnorm_alone():
    agent = make_agent("eval")  # --norm eval: BatchNorm always on its (ImageNet) running statistics
    before = clone_state(agent)

    ppo.recalibrate_batchnorm(agent, random_obs(8, seed=7), 4)

    assert changed_entries(before, agent) == []


def test_bn_recalibrate_run_is_finite_and_differs_from_without(joint_run, tmp_path, monkeypatch):
    calls = []
    original = ppo.recalibrate_batchnorm

    def counting(agent, b_obs, minibatch_size):
        calls.append((agent.training, len(b_obs), minibatch_size))
        return original(agent, b_obs, minibatch_size)

    monkeypatch.setattr(ppo, "recalibrate_batchnorm", counting)
    run = ok_run(
        tmp_path, total_timesteps=64, mdr_rounds=2, view_batching="joint", bn_recalibrate=True
    )
    scalars, without = scalars_of(run.run_dir), scalars_of(joint_run.run_dir)

    # once per iteration, after the update (its last phase: eval mode)
    assert calls == [(False, 32, 16)] * 2
    assert all(math.isfinite(value) for points in scalars.values() for _, value in points)
    # measured after the recalibration
    assert scalars["charts/delta_pi_plus"][0] != without["charts/delta_pi_plus"][0]
    # the next rollout
    assert scalars["losses/standard/value_loss"][1] != without["losses/standard/value_loss"][1]
    # same first update
    assert scalars["losses/standard/value_loss"][0] == without["losses/standard/value_loss"][0]


# --------------------------------------------------------------------------------------------------
# 8. Held-out evaluation and the episode drawings


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
                counted.extend(
                    zip(
                        infos["episode"]["task_id"][mask].tolist(),
                        infos["episode"]["r"][mask].tolist(),
                    )
                )
            return out

    # what envs.run_tasks builds
    monkeypatch.setattr(envs.patchloc, "PatchLocVecEnv", RecordingVecEnv)
    args = tiny_args(num_eval_envs=3)  # fewer envs than tasks: the rest are queued

    first = ppo.evaluate(agent, test_tasks, 7, args, torch.device("cpu"))
    runs_of_first = list(counted)
    second = ppo.evaluate(agent, test_tasks, 7, args, torch.device("cpu"))

    assert agent.training  # the mode is restored
    assert {key: len(values) for key, values in first.items()} == {
        "r": 7,
        "normalized_r": 7,
        "success": 7,
    }
    assert sorted(task for task, _ in runs_of_first) == list(range(7))  # every task exactly once
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    # the returns are those of the greedy eval-mode policy, task by task
    agent.eval()
    for task, episode_return in runs_of_first:
        assert episode_return == pytest.approx(
            greedy_return(agent, test_tasks, task, args.max_episode_steps), abs=1e-5
        )
    optimal = PatchLocEnv(test_tasks).optimal_returns[[task for task, _ in runs_of_first]]
    # in the order episodes ended
    np.testing.assert_allclose(first["normalized_r"], first["r"] / optimal, rtol=1e-5)


def test_episode_scalars_are_percent_of_optimal_and_success_rate():
    episodes = {
        "r": np.array([1.0, 3.0]),
        "normalized_r": np.array([0.25, 0.75]),
        "success": np.array([False, True]),
    }

    assert ppo.episode_scalars(episodes, "test_") == {
        "charts/test_episodic_return": 2.0,
        "charts/test_normalized_reward": 50.0,
        "charts/test_success_rate": 0.5,
    }


def test_drawn_episodes_show_the_target_and_the_window_path():
    """The evaluation image: envs' draw_episodes with the script's greedy eval-mode policy, which
    restores the mode."""
    _, test_tasks = tiny_task_sets()
    agent = make_agent("bn")
    agent.train()

    with ppo.greedy_policy(agent, torch.device("cpu")) as act:
        assert not agent.training and not torch.is_grad_enabled()
        drawing = ppo.draw_episodes(test_tasks, range(3), act, max_steps=20, seed=1)
    assert agent.training and torch.is_grad_enabled()

    side = 4 * V
    assert drawing.shape == (side, 3 * side, 3) and drawing.dtype == np.uint8
    for i in range(3):
        panel, image = drawing[:, i * side : (i + 1) * side], test_tasks.image(i)
        green = np.all(panel == GREEN, axis=-1) & ~np.all(image == GREEN, axis=-1)
        target_outline = outline_mask(side, test_tasks.target_boxes[i], width=2)
        # green only on the target's outline ...
        assert green.any() and not (green & ~target_outline).any()
        # ... and most of it visible under the window path
        assert green[target_outline].mean() > 0.5
        # the first window (the full image) is outlined along the image border, in a colour of the
        # path (blue -> yellow)
        border = panel[0].astype(int)
        assert np.all((border[:, 0] == border[:, 1]) & (border[:, 2] == 255 - border[:, 0])), border
        assert not np.array_equal(panel, image)


def test_held_out_evaluation_uses_the_disjoint_test_tasks(tmp_path, monkeypatch):
    created, evaluated, rendered = [], [], []
    original_make, original_evaluate, original_render = (
        ppo.make_task_sets,
        ppo.evaluate,
        ppo.draw_episodes,
    )

    def recording_make(*args, **kwargs):
        created.append(original_make(*args, **kwargs))
        return created[-1]

    def recording_evaluate(agent, task_set, num_tasks, args, device):
        evaluated.append((task_set, num_tasks))
        return original_evaluate(agent, task_set, num_tasks, args, device)

    def recording_render(task_set, task_ids, act, max_steps, seed):
        rendered.append(task_set)
        return original_render(task_set, task_ids, act, max_steps, seed)

    monkeypatch.setattr(ppo, "make_task_sets", recording_make)
    monkeypatch.setattr(ppo, "evaluate", recording_evaluate)
    monkeypatch.setattr(ppo, "draw_episodes", recording_render)

    ok_run(tmp_path, num_tasks=6, num_test_tasks=5)

    [(train_tasks, test_tasks)] = created
    assert (train_tasks.split, train_tasks.num_tasks, test_tasks.split, test_tasks.num_tasks) == (
        "train",
        6,
        "test",
        5,
    )
    assert not set(train_tasks.image_ids) & set(test_tasks.image_ids)
    # held-out tasks all once, then as many training tasks as possible for the generalization gap
    assert evaluated == [(test_tasks, 5), (train_tasks, 5)]
    assert rendered == [test_tasks]


def test_folder_task_sets_share_no_image_file(tmp_path):
    write_images(tmp_path / "images", 12)
    args = tiny_args(image_source=str(tmp_path / "images"), num_test_tasks=4)

    train_tasks, test_tasks = make_task_sets(
        args.num_tasks,
        args.num_test_tasks,
        args.image_source,
        args.image_size,
        args.view_size,
        seed=args.seed,
    )

    assert len(set(train_tasks.image_ids)) == 4 and len(set(test_tasks.image_ids)) == 4
    assert not set(train_tasks.image_ids) & set(test_tasks.image_ids)
    assert test_tasks.split == "test"


# --------------------------------------------------------------------------------------------------
# ImageNet initialisation from a cached state dict (offline)


@pytest.fixture(scope="module")
def fake_imagenet_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a random torchvision ResNet-18 state dict under the
    ImageNet file name."""
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
def test_pretrained_weights_load_into_the_shared_backbone(
    norm, fake_imagenet_home, no_download, monkeypatch
):
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


# --------------------------------------------------------------------------------------------------
# 9. End-to-end runs of each norm variant; run names, args.json and the TensorBoard log


def test_default_run_name_is_a_function_of_the_arguments():
    args = ppo.Args()
    assert (
        ppo.default_run_name(args)
        == "patchloc-procedural-1024__ppo_patchloc_mdr__bn0.1__mdr2-1x3__s1"
    )
    # no clock: a requeued job finds its folder
    assert ppo.default_run_name(ppo.Args()) == ppo.default_run_name(args)
    names = {
        ppo.default_run_name(ppo.Args(**fields))
        for fields in (
            dict(seed=2),
            dict(norm="brn", bn_momentum=0.01),
            dict(norm="dropout", dropout_p=0.2),
            dict(norm="gn"),
            dict(alpha2=0, mdr_rounds=1),
            dict(num_tasks=256),
            dict(image_source="/data/slides/"),
            dict(collect_mode="train", bn_recalibrate=True),
        )
    }
    assert names == {
        "patchloc-procedural-1024__ppo_patchloc_mdr__bn0.1__mdr2-1x3__s2",
        "patchloc-procedural-1024__ppo_patchloc_mdr__brn0.01__mdr2-1x3__s1",
        "patchloc-procedural-1024__ppo_patchloc_mdr__dropout0.2__mdr2-1x3__s1",
        "patchloc-procedural-1024__ppo_patchloc_mdr__gn__mdr2-1x3__s1",
        "patchloc-procedural-1024__ppo_patchloc_mdr__bn0.1__mdr3-0__s1",
        "patchloc-procedural-256__ppo_patchloc_mdr__bn0.1__mdr2-1x3__s1",
        "patchloc-slides-1024__ppo_patchloc_mdr__bn0.1__mdr2-1x3__s1",
        "patchloc-procedural-1024__ppo_patchloc_mdr__bn0.1__mdr2-1x3__collecttrain__bnrecal__s1",
    }


def test_wandb_tags_and_group():
    assert ppo.wandb_tags(ppo.Args(norm="brn", bn_momentum=0.01, seed=3)) == [
        "patchloc-procedural",
        "tasks=1024",
        "norm=brn",
        "mdr=(2,1)",
        "seed=3",
        "bn_momentum=0.01",
    ]
    assert not [tag for tag in ppo.wandb_tags(ppo.Args(norm="gn")) if tag.startswith("bn_momentum")]
    assert ppo.wandb_tags(ppo.Args(image_source="/data/slides"))[0] == "patchloc-folder"


@pytest.mark.parametrize("norm", NORMS)
def test_each_norm_variant_runs(norm, tmp_path):
    run = ok_run(tmp_path, norm=norm)

    assert "iteration=1/1, global_step=32" in run.stdout
    assert "held-out evaluation: test_normalized_reward=" in run.stdout
    label = {"bn": "bn0.1", "brn": "brn0.1", "dropout": "dropout0.1"}.get(norm, norm)
    assert (
        single_run_dir(tmp_path).name
        == f"patchloc-procedural-4__ppo_patchloc_mdr__{label}__mdr2-1__s1"
    )
    assert list(run.run_dir.glob("events.out.tfevents.*"))
    assert ("has no mode-dependent layer" in run.stdout) == (norm in MODE_FREE_NORMS)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Two iterations of MDR(2,1) x 2 rounds, --norm bn, held-out evaluation after each, two drawn
    episodes."""
    cwd = tmp_path_factory.mktemp("logged_run")
    return ok_run(cwd, total_timesteps=64, eval_interval=1, mdr_rounds=2, num_render_episodes=2)


def test_run_folder_holds_args_json(logged_run):
    assert logged_run.run_dir.name == "patchloc-procedural-4__ppo_patchloc_mdr__bn0.1__mdr2-1x2__s1"
    saved = json.loads((logged_run.run_dir / "args.json").read_text())
    [provenance] = saved.pop("provenance")  # one process made this run
    assert saved == asdict(logged_run.args)
    assert (
        provenance["from_step"] == 0
        and len(provenance["commit"]) == 40
        and isinstance(provenance["dirty"], bool)
    )
    assert provenance["torch"] == ppo.torch.__version__ and provenance["cpu"]
    assert (saved["batch_size"], saved["num_iterations"], saved["run_name"]) == (32, 2, None)


def test_tensorboard_log_holds_every_key_with_finite_values(logged_run):
    scalars = scalars_of(logged_run.run_dir)
    missing = [key for key in TB_KEYS if key not in scalars]
    assert not missing, f"missing {missing}; logged: {sorted(scalars)}"
    for key in TB_KEYS:
        values = [value for _, value in scalars[key]]
        assert values and np.all(np.isfinite(values)), (key, values)
    for key in (
        "charts/SPS",
        "charts/delta_pi_minus",
        "losses/value_loss",
        "mdr/ratio_gap",
        "charts/test_normalized_reward",
    ):
        assert [step for step, _ in scalars[key]] == [32, 64], key  # one point per iteration
    for key in ("charts/delta_pi_minus", "charts/delta_pi_plus"):
        assert all(0.0 <= value <= math.log(2) for _, value in scalars[key]), key
    for key in (
        "mdr/trust_region_violation",
        "mdr/trust_region_violation_signed",
        "charts/test_success_rate",
    ):
        assert all(0.0 <= value <= 1.0 for _, value in scalars[key]), key
    for key in (
        "charts/normalized_reward",
        "charts/test_normalized_reward",
    ):
        # percent of the optimal return
        assert all(-100.0 <= value <= 100.0 for _, value in scalars[key]), key


def test_progress_lines_match_tensorboard(logged_run):
    """stdout is not a terminal: one plain line per iteration, its values those written to
    TensorBoard."""
    lines = [line for line in logged_run.stdout.splitlines() if line.startswith("iteration=")]
    assert [line.split(",")[0] for line in lines] == ["iteration=1/2", "iteration=2/2"]
    scalars = scalars_of(logged_run.run_dir)
    for line in lines:
        fields = dict(field.split("=") for field in line.split(", "))
        step = int(fields["global_step"])
        for key in ("normalized_reward", "delta_pi_minus"):
            logged = dict(scalars[f"charts/{key}"])[step]
            assert float(fields[key]) == pytest.approx(logged, rel=1e-3), key
        assert float(fields["SPS"]) == dict(scalars["charts/SPS"])[step]


def test_tensorboard_holds_the_episode_drawings(logged_run):
    accumulator = EventAccumulator(str(logged_run.run_dir), size_guidance={"images": 0})
    accumulator.Reload()
    assert "eval/test_episodes" in accumulator.Tags()["images"]
    events = accumulator.Images("eval/test_episodes")
    assert [event.step for event in events] == [32, 64]
    image = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)))
    assert image.shape == (4 * V, 2 * 4 * V, 3)
    assert np.all(image == GREEN, axis=-1).any()  # the targets' outlines


def test_run_logger_skips_non_finite_values_and_prints_one_line_per_iteration(tmp_path, capsys):
    args = tiny_args()
    args.batch_size, args.num_iterations = 32, 3
    logger = ppo.RunLogger(str(tmp_path / "run"), args, "cpu", None, global_step=0)
    logger.advance(32)
    logger.log(
        {
            "charts/normalized_reward": 12.5,
            "losses/explained_variance": math.nan,
            "a/inf": math.inf,
        },
        iteration=1,
    )
    logger.advance(32)
    logger.log({"charts/test_normalized_reward": 3.0})
    logger.close(0)

    # stdout is not a terminal here: no progress bar, a line per iteration between the start and
    # end lines (with the pace of the first rollout and iteration)
    start, pace, line, estimate, end = capsys.readouterr().out.splitlines()
    assert start.startswith(f"{tmp_path / 'run'}: the run of ") and " starts on cpu: 3 " in start
    assert pace.startswith("collecting at ") and "for the first rollout" in pace
    assert line.startswith("iteration=1/3, global_step=32, normalized_reward=12.5, SPS=")
    assert estimate.startswith("iteration 1 took ") and "the 2 left take about " in estimate
    assert end.startswith(
        f"completed: {tmp_path / 'run'}, global_step 64, test_normalized_reward=3"
    )
    assert end.endswith(" (summary.json)")
    scalars = scalars_of(tmp_path / "run")
    assert set(scalars) == {
        "charts/normalized_reward",
        "charts/SPS",
        "charts/test_normalized_reward",
    }
    assert scalars["charts/normalized_reward"] == [(32, 12.5)] and scalars[
        "charts/test_normalized_reward"
    ] == [(64, 3.0)]
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert saved.pop("provenance")[0]["from_step"] == 0 and saved == asdict(args)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_run_logger_on_a_terminal_shows_a_progress_bar_instead_of_lines(tmp_path, monkeypatch):
    stdout, stderr = Terminal(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)  # tqdm's bar
    args = tiny_args()
    args.batch_size, args.num_iterations = 32, 2
    # a resumed run: the bar starts at 32
    logger = ppo.RunLogger(str(tmp_path / "run"), args, "cpu", None, global_step=32)

    logger.advance(32)
    logger.log({"charts/normalized_reward": 12.5}, iteration=2)
    logger.close(0)

    assert (
        "iteration=" not in stdout.getvalue()
        and "continues from global_step 32" in stdout.getvalue()
    )
    assert (logger.bar.n, logger.bar.total) == (64, 64)
    assert "normalized_reward=12.5" in stderr.getvalue()


def test_wandb_run_name_group_tags_and_resumed_id(tmp_path, monkeypatch):
    """--track: the wandb run is named after the run folder, grouped with the other seeds of its
    configuration (unless --wandb-group), tagged, and continues the run id a checkpoint gives."""
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        # Run.finish
        return types.SimpleNamespace(id="new-id", finish=lambda exit_code: calls.append(exit_code))

    fake_wandb = types.SimpleNamespace(init=init)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.chdir(tmp_path)
    args = tiny_args(track=True, norm="brn", seed=3)
    args.batch_size, args.num_iterations = 32, 1

    logger = ppo.RunLogger(
        os.path.join("runs", ppo.default_run_name(args)), args, "cpu", "saved-id", global_step=0
    )
    logger.close(143)
    grouped = ppo.RunLogger(
        os.path.join("runs", "mine"), tiny_args(track=True, wandb_group="sweep-7"), "cpu", None, 0
    )
    grouped.close(0)

    first, exit_code, second, _ = calls
    assert first["name"] == "patchloc-procedural-4__ppo_patchloc_mdr__brn0.1__mdr2-1__s3"
    # the name without the seed
    assert first["group"] == "patchloc-procedural-4__ppo_patchloc_mdr__brn0.1__mdr2-1"
    assert (first["id"], first["resume"], logger.wandb_id, exit_code) == (
        "saved-id",
        "allow",
        "new-id",
        143,
    )
    assert first["tags"] == ppo.wandb_tags(args) and "bn_momentum=0.1" in first["tags"]
    assert (second["name"], second["group"], second["id"]) == ("mine", "sweep-7", None)


# --------------------------------------------------------------------------------------------------
# 10. Checkpoints, stop signals and exact resume


RESUME_FIELDS = dict(total_timesteps=96, mdr_rounds=2)  # 3 iterations, linear learning-rate decay


def stop_at(monkeypatch, iteration, *signums):
    """Send `signums` to this process when main starts `iteration` (from inside the iteration, as a
    scheduler would)."""
    original = ppo.learning_rate_at

    def signalling(i, args):
        if i == iteration:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return original(i, args)

    monkeypatch.setattr(ppo, "learning_rate_at", signalling)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return ok_run(tmp_path_factory.mktemp("uninterrupted"), save_model=True, **RESUME_FIELDS)


def assert_same_training(run_dir, reference_dir):
    """Bitwise the same parameters, optimizer state, RNG streams and episodes in progress at the
    end, and the same TensorBoard scalars at every step (all but SPS)."""
    full, resumed = read_checkpoint(reference_dir), read_checkpoint(run_dir)
    assert (
        resumed["global_step"] == full["global_step"] and resumed["iteration"] == full["iteration"]
    )
    assert [
        name
        for name in full["agent"]
        if not torch.equal(full["agent"][name], resumed["agent"][name])
    ] == []
    assert [
        k for k, v in full["env"]["envs"].items() if not torch.equal(v, resumed["env"]["envs"][k])
    ] == []
    assert torch.equal(full["env"]["next_obs"], resumed["env"]["next_obs"])
    assert torch.equal(full["rng"]["torch"], resumed["rng"]["torch"])
    assert full["optimizer"]["state"][0]["exp_avg"].equal(
        resumed["optimizer"]["state"][0]["exp_avg"]
    )
    expected, scalars = scalars_of(reference_dir), scalars_of(run_dir)
    expected.pop("charts/SPS"), scalars.pop("charts/SPS")
    assert scalars == expected


@pytest.mark.parametrize(
    "signum, iteration", [(signal.SIGTERM, 2), (signal.SIGUSR1, 1)], ids=["SIGTERM", "SIGUSR1"]
)
def test_stop_signal_saves_a_checkpoint_and_resume_auto_continues_exactly(
    signum, iteration, uninterrupted, sentinel_handlers, tmp_path
):
    """A cluster's stop signal mid-iteration: the iteration finishes, its checkpoint (agent,
    optimizer, RNG streams, the PatchLocVecEnv's episodes in progress) is written, the exit code is
    128 + signum; the requeued job (the same command, --resume auto) ends where the uninterrupted
    run ends."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(monkeypatch, iteration, signum)
        stopped = run_main(tmp_path, resume="auto", **RESUME_FIELDS)

    assert stopped.exit_code == 128 + signum == {signal.SIGTERM: 143, signal.SIGUSR1: 138}[signum]
    assert f"{signal.Signals(signum).name}: finishing this iteration" in stopped.stdout
    assert f"stopped at iteration {iteration}; continue it with --resume auto" in stopped.stdout
    checkpoint = read_checkpoint(stopped.run_dir)
    assert (checkpoint["iteration"], checkpoint["global_step"]) == (iteration, 32 * iteration)
    assert {"tasks", "states", "steps", "returns", "queue", "rng"} <= set(checkpoint["env"]["envs"])
    assert all(signal.getsignal(s) is sentinel_handlers for s in STOP_SIGNALS)  # put back

    resumed = run_main(tmp_path, resume="auto", **RESUME_FIELDS)

    assert resumed.exit_code == 0 and resumed.run_dir == stopped.run_dir
    assert f"at iteration {iteration}, global_step {32 * iteration}" in resumed.stdout
    assert_same_training(resumed.run_dir, uninterrupted.run_dir)


def test_resume_auto_on_a_run_without_a_checkpoint_refuses_and_keeps_it(tmp_path):
    """A folder that holds an unfinished run and no checkpoint (a job killed before its first one):
    --resume auto has nothing to continue and must not delete it, so it refuses with one line
    saying what is there and what to do; an empty or absent folder starts afresh, checkpoints on
    (issue 27, item 1)."""
    run_dir = tmp_path / "runs" / "job"
    run_dir.mkdir(parents=True)
    (run_dir / "events.out.tfevents.0.stale").write_bytes(b"")
    args = main_args(resume="auto")

    with pytest.raises(ppo.ConfigError) as error:
        ppo.find_checkpoint(args, str(run_dir))

    assert "holds an unfinished run without a checkpoint (events.out.tfevents.0.stale;" in str(
        error.value
    )
    assert "--run-name NAME starts another run, --overwrite moves this one aside" in str(
        error.value
    )
    assert [path.name for path in run_dir.iterdir()] == ["events.out.tfevents.0.stale"]
    (run_dir / "events.out.tfevents.0.stale").unlink()
    assert ppo.find_checkpoint(args, str(run_dir)) == (None, str(run_dir)) and args.save_model
    assert ppo.find_checkpoint(args, str(tmp_path / "runs" / "new")) == (
        None,
        str(tmp_path / "runs" / "new"),
    )
    with pytest.raises(ppo.ConfigError, match="not a readable checkpoint"):
        # a path must exist
        ppo.find_checkpoint(main_args(resume=str(run_dir / "checkpoint.pt")), str(run_dir))


def main_args(**overrides) -> ppo.Args:
    """tiny_args with what main() fills in before it looks at the run folder."""
    args = tiny_args(**overrides)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    return args


def test_resume_path_may_grow_total_timesteps(tmp_path):
    first = ok_run(tmp_path, save_model=True)
    saved = read_checkpoint(first.run_dir)
    checkpoint_path = first.run_dir / "checkpoint.pt"

    with pytest.raises(ppo.ConfigError, match="the run used different --seed"):
        run_main(tmp_path, resume=str(checkpoint_path), total_timesteps=64, seed=2)
    grown = ok_run(tmp_path, resume=str(checkpoint_path), total_timesteps=64, save_model=True)

    assert (
        "at iteration 1, global_step 32" in grown.stdout
        and "iteration=2/2, global_step=64" in grown.stdout
    )
    assert (saved["iteration"], read_checkpoint(first.run_dir)["iteration"]) == (1, 2)
    learning_rates = scalars_of(first.run_dir)["charts/learning_rate"]
    # the new schedule from iteration 2
    assert learning_rates == [
        (32, pytest.approx(4e-5)),
        (64, pytest.approx(4e-5 / 2)),
    ]
    assert not torch.equal(
        read_checkpoint(first.run_dir)["agent"]["actor.4.weight"], saved["agent"]["actor.4.weight"]
    )


def test_checkpoint_contents(uninterrupted):
    # weights_only=True: plain tensors and Python containers
    checkpoint = read_checkpoint(uninterrupted.run_dir)

    assert {
        "agent",
        "optimizer",
        "global_step",
        "iteration",
        "args",
        "run_name",
        "rng",
        "env",
        "wandb_id",
    } <= set(checkpoint)
    assert checkpoint["global_step"] == 96 and checkpoint["iteration"] == 3
    assert checkpoint["run_name"] == uninterrupted.run_dir.name
    assert checkpoint["args"]["norm"] == "bn" and checkpoint["args"]["view_size"] == V
    assert set(checkpoint["rng"]) == {"python", "numpy", "torch", "cuda", "diag"}
    assert checkpoint["env"]["next_obs"].shape == (2, 3, V, V, 3) and checkpoint["env"][
        "next_done"
    ].shape == (2,)
    agent = ppo.Agent(NUM_ACTIONS, tiny_args(norm="bn"))
    agent.load_state_dict(checkpoint["agent"])  # strict: every parameter and buffer


def test_second_ctrl_c_quits_at_once_without_a_checkpoint(sentinel_handlers, tmp_path, monkeypatch):
    stop_at(monkeypatch, 1, signal.SIGINT, signal.SIGINT)

    run = run_main(tmp_path, save_model=True)

    assert run.exit_code == 130
    assert "SIGINT: finishing this iteration" in run.stdout
    assert "interrupted during iteration 1; nothing saved for it" in run.stderr
    assert not (run.run_dir / "checkpoint.pt").exists()
    assert all(signal.getsignal(s) is sentinel_handlers for s in STOP_SIGNALS)


# --------------------------------------------------------------------------------------------------
# 11. Bad input: one line, no traceback, nothing written


def test_validate_args_rejects_a_minibatch_of_one_sample():
    with pytest.raises(ppo.ConfigError, match="minibatch of one sample"):
        # 32 = 31 + 1: the last minibatch's advantage std is NaN
        ppo.validate_args(tiny_args(minibatch_size=31))
    ppo.validate_args(tiny_args(minibatch_size=31, norm_adv=False))
    ppo.validate_args(tiny_args(minibatch_size=30))


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(minibatch_size=33),
            "--minibatch-size must be <= and --total-timesteps >= num_envs x num_steps = 32",
        ),
        (
            dict(total_timesteps=31),
            "--minibatch-size must be <= and --total-timesteps >= num_envs x num_steps = 32",
        ),
        (
            dict(minibatch_size=1),
            "--minibatch-size 1 leaves a minibatch of one sample in a rollout of 32",
        ),
    ],
)
def test_check_minibatches(fields, message):
    with pytest.raises(ppo.ConfigError) as error:
        ppo.check_minibatches(tiny_args(**fields))
    assert message in str(error.value) and "\n" not in str(error.value)
    # one minibatch of all of D_k
    ppo.check_minibatches(tiny_args(minibatch_size=32, total_timesteps=32))
    ppo.check_minibatches(tiny_args(minibatch_size=1, norm_adv=False))


BAD_INPUTS = {
    "missing-folder": "nowhere",
    "empty-folder": "/images",
    # (envs/ words the reason; here: the script passes it on as one line)
    "too-few-usable-images": "/images",
    "images-smaller-than-image-size": "/images",
    "image-size-below-4-views": "image_size (32)",
    "no-epochs": "--alpha1 0 --alpha2 0",
    "recalibrate-without-batchnorm": "--bn-recalibrate",
    "corrupt-checkpoint": "not a readable checkpoint",
    "foreign-checkpoint": "not a checkpoint of this script",
    "existing-run-folder": "holds an unfinished run without a checkpoint",
}


def bad_input(case, tmp_path) -> dict:
    """Prepare the files of one bad-input case in tmp_path; returns the Args fields that make it
    bad."""
    (tmp_path / "images").mkdir()
    if case == "too-few-usable-images":  # 4 + 2 tasks need 6 images; one of the 6 files is broken
        write_images(tmp_path / "images", 5)
        (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    if case == "images-smaller-than-image-size":
        write_images(tmp_path / "images", 6)  # 80 x 100 pixels
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    torch.save({"agent": {}}, tmp_path / "foreign.pt")
    if case == "existing-run-folder":
        # a fresh run into the folder of an earlier run with the same arguments
        run_dir = tmp_path / "runs" / ppo.default_run_name(tiny_args())
        run_dir.mkdir(parents=True)
        (run_dir / "events.out.tfevents.0.earlier").write_bytes(b"")
    return {
        "missing-folder": dict(image_source=str(tmp_path / "nowhere")),
        "empty-folder": dict(image_source=str(tmp_path / "images")),
        "too-few-usable-images": dict(image_source=str(tmp_path / "images")),
        "images-smaller-than-image-size": dict(
            image_source=str(tmp_path / "images"), image_size=128
        ),
        "image-size-below-4-views": dict(image_size=32),
        "no-epochs": dict(alpha1=0, alpha2=0),
        "recalibrate-without-batchnorm": dict(norm="gn", bn_recalibrate=True),
        "corrupt-checkpoint": dict(resume=str(tmp_path / "garbage.pt")),
        "foreign-checkpoint": dict(resume=str(tmp_path / "foreign.pt")),
        "existing-run-folder": dict(),
    }[case]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_config_error_before_anything_is_written(case, tmp_path):
    fields = bad_input(case, tmp_path)
    runs_before = sorted(str(p) for p in (tmp_path / "runs").rglob("*"))

    with pytest.raises(ppo.ConfigError) as error:
        run_main(tmp_path, **fields)

    assert BAD_INPUTS[case] in str(error.value) and "\n" not in str(error.value)
    assert sorted(str(p) for p in (tmp_path / "runs").rglob("*")) == runs_before  # nothing written


def test_cli_bad_input_is_one_line_error(tmp_path):
    """The command line turns every ConfigError above into one line and exit status 2 (here: a run
    into the folder of an unfinished one)."""
    bad_input("existing-run-folder", tmp_path)

    result = run_script(tmp_path)

    assert result.returncode == 2
    assert_one_line_error(result.stderr, BAD_INPUTS["existing-run-folder"])
    assert not (tmp_path / "wandb").exists()


def test_non_finite_loss_stops_the_run_with_a_one_line_error(tmp_path, monkeypatch):
    original = ppo.clipped_ppo_loss

    def nan_loss(*args):
        loss, ratio, stats = original(*args)
        return loss * math.nan, ratio, stats

    monkeypatch.setattr(ppo, "clipped_ppo_loss", nan_loss)

    run = run_main(tmp_path, save_model=True)

    assert run.exit_code == 1
    assert_one_line_error(run.stderr, "non-finite loss")
    assert not (
        run.run_dir / "checkpoint.pt"
    ).exists()  # the last checkpoint (none here) is left as it was


# --------------------------------------------------------------------------------------------------
# 12-14. Image folders, Weights and Biases (offline), copy-paste


def test_image_folder_source_runs(tmp_path):
    write_images(tmp_path / "photos", 12)

    run = ok_run(tmp_path, image_source=str(tmp_path / "photos"))

    assert "iteration=1/1, global_step=32" in run.stdout
    assert "held-out evaluation: test_normalized_reward=" in run.stdout
    assert single_run_dir(tmp_path).name == "patchloc-photos-4__ppo_patchloc_mdr__bn0.1__mdr2-1__s1"


def test_track_writes_an_offline_wandb_run(tmp_path):
    result = run_script(
        tmp_path, "--track", "--save-model", "--norm", "brn", "--alpha1", "1", "--alpha2", "2"
    )

    assert_ok(result)
    run_folders = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_folders) == 1, run_folders
    wandb_files = list(run_folders[0].glob("run-*.wandb"))
    assert len(wandb_files) == 1
    records = wandb_files[0].read_bytes()
    run_dir = single_run_dir(tmp_path)
    assert run_dir.name == "patchloc-procedural-4__ppo_patchloc_mdr__brn0.1__mdr1-2__s1"
    for expected in (
        run_dir.name,
        "norm=brn",
        "mdr=(1,2)",
        "tasks=4",
        "bn_momentum=0.1",
    ):
        # name and tags
        assert expected.encode() in records, expected
    # --resume continues this run
    assert wandb_files[0].name == f"run-{read_checkpoint(run_dir)['wandb_id']}.wandb"


def test_script_runs_alone_and_stops_on_sigusr1(tmp_path):
    """The script copied with envs/ into an empty folder (the repository not importable), run as a
    cluster job: plain progress lines (not a terminal), --run-name, and SLURM's warning signal from
    outside: the iteration finishes, its checkpoint is written, exit code 138."""
    alone = tmp_path / "alone"
    alone.mkdir()
    script = Path(shutil.copy(SCRIPT, alone))
    shutil.copytree(
        REPO_ROOT / "envs", alone / "envs", ignore=shutil.ignore_patterns("__pycache__")
    )
    assert sorted(path.name for path in alone.iterdir()) == ["envs", "ppo_patchloc_mdr.py"]
    command = [
        sys.executable,
        str(script),
        *cli_flags(TINY_FIELDS),
        "--total-timesteps",
        "3200",
        "--run-name",
        "my-run",
    ]

    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen(command, cwd=alone, env=script_env(pythonpath=""), **pipes)
    try:
        # 100 iterations: the signal comes long before the end; before the first iteration's line
        # come the start line and the pace of the first rollout
        first_lines = [process.stdout.readline() for _ in range(3)]
        assert first_lines[0].startswith("runs/my-run: the run of "), first_lines
        assert first_lines[2].startswith("iteration=1/100, global_step=32"), (
            "".join(first_lines) + process.stderr.read()
        )
        process.send_signal(signal.SIGUSR1)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()

    assert process.returncode == 138, stderr
    assert "Traceback" not in stderr
    [stopped] = [line for line in stdout.splitlines() if line.startswith("stopped at iteration")]
    iteration = int(stopped.split()[3].rstrip(";"))
    run_dir = alone / "runs" / "my-run"
    assert single_run_dir(alone) == run_dir and list(run_dir.glob("events.out.tfevents.*"))
    assert read_checkpoint(run_dir)["iteration"] == iteration < 100
    assert json.loads((run_dir / "args.json").read_text())["run_name"] == "my-run"


# --------------------------------------------------------------------------------------------------
# Whole-slide images (issue 23): the slide flags reach the task sets, tasks.json in the run folder


def test_a_tiny_run_on_slides_writes_tasks_json_and_its_metrics(tmp_path):
    """Six pyramidal TIFF slides written here (tests/test_slides.py), the README's slide flags:
    the run trains on regions of the training slides, evaluates on other slides, and tasks.json
    locates every task; the start and end lines say where and how it went."""
    from test_slides import SLIDES, write_slide

    for name, blobs in SLIDES.items():
        write_slide(tmp_path / "slides" / name, blobs, "0.5", "aperio" if ".svs" in name else "x")
    fields = dict(image_source=str(tmp_path / "slides"), slide_mpp=2.0, regions_per_slide=2)

    run = ok_run(tmp_path, **fields, min_tissue=0.4, run_name="slides")

    tasks = json.loads((run.run_dir / "tasks.json").read_text())
    assert tasks["settings"]["slide_mpp"] == 2.0 and tasks["settings"]["regions_per_slide"] == 2
    assert tasks["settings"]["min_tissue"] == 0.4
    train, test = tasks["splits"]["train"], tasks["splits"]["test"]
    assert (len(train), len(test)) == (4, 2)
    assert all(task["mpp"] == pytest.approx(2.0) and task["level"] == 1 for task in train + test)
    # slide-level split: no held-out slide is a training slide
    assert not {task["file"] for task in train} & {task["file"] for task in test}
    scalars = scalars_of(run.run_dir)
    assert [step for step, _ in scalars["charts/normalized_reward"]] == [32]
    assert np.isfinite(scalars["charts/test_normalized_reward"][0][1])
    lines = run.stdout.splitlines()
    assert (
        lines[0].startswith(f"{Path('runs', 'slides')}: the run of ") and " on cpu: 1 " in lines[0]
    )
    assert lines[-1].startswith(f"completed: {Path('runs', 'slides')}, global_step 32, ")
    assert "test_normalized_reward=" in lines[-1] and lines[-1].endswith("(summary.json)")
    assert json.loads((run.run_dir / "summary.json").read_text())["status"] == "completed"
