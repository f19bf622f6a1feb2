"""Tests of integrations/sb3_mdr.py (MDRPPO, SB3's PPO with MDR): alpha2=0 is SB3's PPO bit for bit,
the network's mode in each epoch and in the rollout, running statistics moving only in the standard
phase, side-effect-free diagnostics (JS divergence, Delta pi minus, the ratio gap), train() a
faithful copy of SB3's, save/load, BatchNormCNN, a tiny learn() on PatchLoc-v0 and the example's
command line, bad input. Tiny runs: 2 envs x 8 steps, minibatches of 8, 36-px views."""

import ast
import csv
import importlib
import inspect
import math
import subprocess
import sys
import textwrap
import warnings

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from torch import nn

from envs import ENV_ID  # importing envs registers PatchLoc-v0
from integrations import sb3_mdr
from integrations.sb3_mdr import MDRPPO, BatchNormCNN, MDRError

ENV_KWARGS = dict(num_tasks=2, view_size=36, seed=1)
# 2 updates of 2 envs x 8 steps: 2 minibatches of 8 per epoch
RUN = dict(n_steps=8, batch_size=8, n_epochs=3, learning_rate=1e-3, seed=3, device="cpu")
TWO_UPDATES = 2 * 2 * 8
MINIBATCHES = 2


def patchloc_env(n_envs=2):
    return make_vec_env(ENV_ID, n_envs=n_envs, seed=1, env_kwargs=ENV_KWARGS)


class BatchNormDropoutCNN(BatchNormCNN):
    """BatchNormCNN with dropout before its linear layer: both kinds of mode-dependent layer."""

    def __init__(self, observation_space, features_dim: int = 64):
        super().__init__(observation_space, features_dim)
        self.linear = nn.Sequential(nn.Dropout(0.5), self.linear)


def make(cls=MDRPPO, extractor=BatchNormCNN, env=None, **kwargs):
    policy_kwargs = dict(
        features_extractor_class=extractor,
        features_extractor_kwargs=dict(features_dim=64),
        net_arch=[32],
    )
    return cls("CnnPolicy", env or patchloc_env(), policy_kwargs=policy_kwargs, **RUN, **kwargs)


def state(model) -> dict:
    """Every parameter and buffer of the policy (running statistics included)."""
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not th.equal(a[k], b[k])]
    assert not different, f"differ: {different}"


def batchnorms(model) -> list:
    return [m for m in model.policy.modules() if isinstance(m, nn.BatchNorm2d)]


# --------------------------------------------------------------------------------------------------
# Against SB3's PPO
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("diagnostics", [False, True])
def test_alpha2_zero_is_sb3_ppo_bit_for_bit(diagnostics):
    ppo = make(PPO).learn(TWO_UPDATES)
    mdr = make(alpha2=0, diagnostics=diagnostics).learn(TWO_UPDATES)
    assert mdr._n_updates == ppo._n_updates == 2 * 3
    assert_same_state(state(ppo), state(mdr))


def test_mdr_differs_from_ppo_with_batchnorm():
    """The check above can fail: one rectification epoch changes the parameters."""
    ppo, mdr = make(PPO).learn(TWO_UPDATES), make(alpha2=1).learn(TWO_UPDATES)
    assert any(not th.equal(state(ppo)[k], state(mdr)[k]) for k in state(ppo))


def test_train_is_sb3_train_plus_the_mdr_lines():
    """MDRPPO.train without its lines tagged MDR is SB3's PPO.train, statement for statement."""
    lines = inspect.getsource(MDRPPO.train).splitlines()
    assert sum("# MDR" in line for line in lines) >= 6
    copy = "\n".join(line for line in lines if "# MDR" not in line)
    sb3 = textwrap.dedent(inspect.getsource(PPO.train))
    assert ast.dump(ast.parse(textwrap.dedent(copy))) == ast.dump(ast.parse(sb3))


class Recorder:
    """Forward pre-hook on the features extractor: per forward pass, where it ran (rollout or
    update) and whether the network was in train mode; with the first BatchNorm's running mean."""

    def __init__(self, model):
        self.where, self.calls = "rollout", []
        self.bn = batchnorms(model)[0]
        model.policy.features_extractor.register_forward_pre_hook(self.record)
        original = model.train

        def train():
            self.where = "update"
            original()
            self.where = "rollout"

        model.train = train

    def record(self, module, inputs):
        self.calls.append((self.where, module.training, self.bn.running_mean.clone()))


def test_each_epoch_runs_in_its_phase_mode_and_the_rollout_in_eval_mode():
    model = make(alpha2=1, diagnostics=False)
    recorder = Recorder(model)
    model.learn(TWO_UPDATES)
    rollout = [training for where, training, _ in recorder.calls if where == "rollout"]
    update = [training for where, training, _ in recorder.calls if where == "update"]
    assert rollout and not any(rollout)
    epochs = [update[i : i + MINIBATCHES] for i in range(0, len(update), MINIBATCHES)]
    assert epochs == [[True] * MINIBATCHES, [True] * MINIBATCHES, [False] * MINIBATCHES] * 2
    assert model.alpha1 == 2


def test_running_statistics_move_only_in_the_standard_phase():
    model = make(alpha2=1, diagnostics=False)
    recorder = Recorder(model)
    model.learn(TWO_UPDATES)
    means = [(training, mean) for where, training, mean in recorder.calls if where == "update"]
    means.append((None, recorder.bn.running_mean.clone()))  # after the last pass
    moved = [not th.equal(a, b) for (_, a), (_, b) in zip(means, means[1:])]
    assert moved == [training for training, _ in means[:-1]]
    standard_passes = 2 * model.alpha1 * MINIBATCHES  # per BatchNorm: one per standard pass
    assert all(int(bn.num_batches_tracked) == standard_passes for bn in batchnorms(model))


def test_all_epochs_in_eval_mode_leave_the_running_statistics_at_their_start():
    model = make(alpha2=3)
    start = {k: v for k, v in state(model).items() if "running" in k or "num_batches" in k}
    model.learn(TWO_UPDATES)
    assert all(th.equal(v, state(model)[k]) for k, v in start.items())
    assert "train/ratio_gap" not in model.logger.name_to_value  # no standard phase, no gap


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------
def test_js_divergence_is_zero_for_equal_symmetric_and_at_most_ln2():
    p, q = th.tensor([[0.0, 1.0, 2.0]]), th.tensor([[2.0, 0.0, -1.0]])
    assert sb3_mdr.js_divergence(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert sb3_mdr.js_divergence(p, q).item() == pytest.approx(sb3_mdr.js_divergence(q, p).item())
    disjoint = sb3_mdr.js_divergence(th.tensor([[50.0, -50.0]]), th.tensor([[-50.0, 50.0]]))
    assert disjoint.item() == pytest.approx(math.log(2.0), rel=1e-6)
    # two classes, p = (1/2, 1/2), q = (1, 0), their mixture m = (3/4, 1/4)
    m = np.array([0.75, 0.25])
    by_hand = 0.5 * (0.5 * np.log(0.5 / m[0]) + 0.5 * np.log(0.5 / m[1])) + 0.5 * np.log(1 / m[0])
    two = sb3_mdr.js_divergence(th.tensor([[0.0, 0.0]]), th.tensor([[60.0, 0.0]]))
    assert two.item() == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("alpha2", [0, 1])
def test_diagnostics_change_nothing(alpha2):
    """Same parameters, running statistics and dropout masks with the diagnostics on and off
    (BatchNorm and dropout in the network)."""
    on = make(extractor=BatchNormDropoutCNN, alpha2=alpha2, diagnostics=True).learn(TWO_UPDATES)
    off = make(extractor=BatchNormDropoutCNN, alpha2=alpha2, diagnostics=False).learn(TWO_UPDATES)
    assert_same_state(state(on), state(off))
    logged = on.logger.name_to_value
    assert logged["train/delta_pi_minus"] > 0 and logged["train/ratio_gap"] > 0
    assert "train/delta_pi_minus" not in off.logger.name_to_value
    assert "train/ratio_gap" not in off.logger.name_to_value


def test_policy_mismatch_restores_buffers_mode_and_rng():
    model = make(extractor=BatchNormDropoutCNN, alpha2=1)
    model.learn(TWO_UPDATES)  # running statistics away from their start, a filled buffer
    model.policy.set_training_mode(True)
    before, rng = state(model), th.get_rng_state()
    delta = sb3_mdr.policy_mismatch(model.policy, model.rollout_buffer, 8, seed=0)
    assert 0 < delta < math.log(2.0)
    assert_same_state(before, state(model))
    assert th.equal(rng, th.get_rng_state())
    assert model.policy.training
    again = sb3_mdr.policy_mismatch(model.policy, model.rollout_buffer, 8, seed=0)
    assert again == delta


def test_eval_mode_ratio_restores_the_mode_and_touches_no_buffer():
    model = make(alpha2=1)
    model.learn(TWO_UPDATES)
    model.policy.set_training_mode(True)
    before = state(model)
    rollout_data = next(model.rollout_buffer.get(8))
    actions = rollout_data.actions.long().flatten()
    ratio = sb3_mdr.eval_mode_ratio(model.policy, rollout_data, actions)
    assert ratio.shape == (8,) and th.all(ratio > 0)
    assert_same_state(before, state(model))
    assert model.policy.training


def test_without_a_mode_dependent_layer_the_diagnostics_read_zero_and_one_warning_says_why():
    env = make_vec_env("CartPole-v1", n_envs=2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = MDRPPO("MlpPolicy", env, alpha2=1, **RUN)
    ours = [w for w in caught if "MDRPPO" in str(w.message)]
    assert len(ours) == 1 and "rectification phase equals the standard one" in str(ours[0].message)
    model.learn(TWO_UPDATES)
    logged = model.logger.name_to_value
    assert logged["train/delta_pi_minus"] == pytest.approx(0.0, abs=1e-6)
    assert logged["train/ratio_gap"] == pytest.approx(0.0, abs=1e-6)


def test_plain_ppo_without_a_mode_dependent_layer_gives_no_warning():
    env = make_vec_env("CartPole-v1", n_envs=2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MDRPPO("MlpPolicy", env, alpha2=0, **RUN)
    assert not [w for w in caught if "MDRPPO" in str(w.message)]


def test_mode_dependent_layers_found_and_not():
    found = sb3_mdr.mode_dependent_layers(
        nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.1), nn.LayerNorm(3), nn.Dropout(0.0))
    )
    assert [type(m) for m in found] == [nn.BatchNorm1d, nn.Dropout]
    frozen = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.GroupNorm(1, 3))
    assert sb3_mdr.mode_dependent_layers(frozen) == []


# --------------------------------------------------------------------------------------------------
# save/load, BatchNormCNN, end to end
# --------------------------------------------------------------------------------------------------
def test_save_load_keeps_alpha1_alpha2_and_the_weights(tmp_path):
    model = make(alpha2=2, diagnostics=False)  # alpha1 = 1
    model.learn(TWO_UPDATES)
    model.save(tmp_path / "model.zip")
    loaded = MDRPPO.load(tmp_path / "model.zip", env=patchloc_env(), device="cpu")
    assert (loaded.alpha1, loaded.alpha2, loaded.n_epochs) == (1, 2, 3)
    assert loaded.diagnostics is False
    assert_same_state(state(model), state(loaded))
    loaded.learn(TWO_UPDATES // 2)  # it trains on


def test_load_with_an_alpha2_beyond_the_epochs_is_refused(tmp_path):
    make(alpha2=1).save(tmp_path / "model.zip")
    with pytest.raises(MDRError, match="alpha2=5 must be between 0"):
        MDRPPO.load(tmp_path / "model.zip", env=patchloc_env(), alpha2=5)


def test_batchnorm_cnn_is_nature_cnn_with_a_batchnorm_after_each_conv():
    space = gym.spaces.Box(0, 255, (3, 36, 36, 3), dtype=np.uint8)
    layers = [type(m) for m in BatchNormCNN(space).cnn]
    conv_bn_relu = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert layers == conv_bn_relu * 3 + [nn.Flatten]
    convs = [m for m in BatchNormCNN(space).cnn if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (9, 32, (8, 8), (4, 4)),
        (32, 64, (4, 4), (2, 2)),
        (64, 64, (3, 3), (1, 1)),
    ]
    image = gym.spaces.Box(0, 255, (3, 84, 84), dtype=np.uint8)  # SB3's channels-first image
    extractor = BatchNormCNN(image, features_dim=16)
    assert extractor(th.rand(4, 3, 84, 84)).shape == (4, 16)
    assert extractor.linear[0].in_features == 64 * 7 * 7  # NatureCNN's on 84 px


def test_batchnorm_cnn_stacks_the_views_and_scales_them():
    space = gym.spaces.Box(0, 255, (3, 36, 36, 3), dtype=np.uint8)
    extractor = BatchNormCNN(space, features_dim=8).eval()
    obs = th.randint(0, 256, (2, 3, 36, 36, 3)).float()
    by_hand = obs.permute(0, 1, 4, 2, 3).reshape(2, 9, 36, 36) / 255.0
    assert th.equal(extractor(obs), extractor.linear(extractor.cnn(by_hand)))


def test_batchnorm_cnn_refuses_small_or_non_image_observations():
    with pytest.raises(MDRError, match="at least 36 x 36 px, got 32 x 32"):
        BatchNormCNN(gym.spaces.Box(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(MDRError, match="needs an SB3 image space"):
        BatchNormCNN(gym.spaces.Box(-1.0, 1.0, (4,), dtype=np.float32))


def test_a_tiny_learn_on_patchloc_logs_sb3s_keys_and_the_diagnostics(tmp_path):
    log_dir = tmp_path / "run"
    code = sb3_mdr.main(
        [
            "--env-kwargs",
            "num_tasks=2",
            "--n-envs=2",
            "--n-steps=8",
            "--batch-size=8",
            "--total-timesteps=48",
            f"--log-dir={log_dir}",
        ]
    )
    assert code == 0
    with open(log_dir / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["time/iterations"]) for r in rows] == [1, 2, 3]
    assert rows[-1]["time/total_timesteps"] == "48"
    for row in rows[1:]:  # train/ keys of update k are written with rollout k + 1
        delta, gap = float(row["train/delta_pi_minus"]), float(row["train/ratio_gap"])
        assert 0 < delta < math.log(2.0) and 0 < gap < 1
        assert math.isfinite(float(row["train/approx_kl"]))
    assert rows[0]["train/delta_pi_minus"] == ""  # no update before the first rollout
    model = MDRPPO.load(log_dir / "model.zip", device="cpu")
    assert (model.alpha1, model.alpha2) == (2, 1)
    assert isinstance(model.policy.features_extractor, BatchNormCNN)
    assert model.observation_space.shape == (3, 36, 36, 3)
    assert sb3_mdr.main([f"--log-dir={log_dir}"]) == 2  # the run folder is never overwritten


def test_the_comparisons_rows_pair_each_rollout_with_its_own_update():
    """docs/sb3/run_comparison.py: row k holds rollout k's episodes and update k's train/ keys
    (SB3 records those after rollout k's log dump)."""
    comparison = importlib.import_module("docs.sb3.run_comparison")
    model, recorded = make(alpha2=1), []
    measure = model.record_delta_pi_minus

    def record():
        measure()
        recorded.append(model.logger.name_to_value["train/delta_pi_minus"])

    model.record_delta_pi_minus = record
    rows = comparison.UpdateRows()
    model.learn(3 * 16, callback=rows)
    assert [row["iteration"] for row in rows.rows] == [1, 2, 3]
    assert [row["global_step"] for row in rows.rows] == [16, 32, 48]
    assert [row["delta_pi_minus"] for row in rows.rows] == recorded
    assert all(0 < row["ratio_gap"] < 1 and row["acting_entropy"] > 0 for row in rows.rows)
    ended = [row for row in rows.rows if row["episodes"]]
    assert ended and all(row["normalized_reward"] <= 100 + 1e-9 for row in ended)  # <= optimal


def test_the_example_runs_as_a_script_from_anywhere(tmp_path):
    script = sb3_mdr.__file__
    args = ["--n-envs=2", "--n-steps=8", "--batch-size=8", "--total-timesteps=16"]
    done = subprocess.run(
        [sys.executable, script, *args, f"--log-dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model.zip").exists()


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha2", [-1, 4, 1.5, True])
def test_alpha2_out_of_range_or_not_an_integer_is_refused_before_sb3_builds_anything(
    alpha2, monkeypatch
):
    def sb3_init(*args, **kwargs):
        raise AssertionError("SB3's BaseAlgorithm.__init__ (it builds the envs) ran first")

    monkeypatch.setattr(BaseAlgorithm, "__init__", sb3_init)
    with pytest.raises(MDRError) as error:
        MDRPPO("CnnPolicy", ENV_ID, n_epochs=3, alpha2=alpha2)
    assert "\n" not in str(error.value) and "alpha2" in str(error.value)


def test_n_epochs_given_by_position_is_read_like_sb3():
    with pytest.raises(MDRError, match="n_epochs=2"):
        MDRPPO("CnnPolicy", None, 3e-4, 8, 8, 2, alpha2=3)


def test_default_alpha2_is_a_third_of_the_epochs_at_least_one():
    assert [sb3_mdr.default_alpha2(n) for n in (1, 3, 10)] == [1, 1, 3]
    assert make(diagnostics=False).alpha2 == 1


@pytest.mark.parametrize("version", ["2.3.2", "2.10.0", "3.0.0a1"])
def test_an_unsupported_sb3_version_is_refused_naming_the_range(version, monkeypatch):
    monkeypatch.setattr(stable_baselines3, "__version__", version)
    with pytest.raises(MDRError, match=f"2.4.0-2.9.2, found {version}: pip install"):
        MDRPPO("CnnPolicy", None, alpha2=1)


def test_the_supported_range_contains_the_pinned_version():
    low, high = sb3_mdr.SB3_SUPPORTED
    assert low <= sb3_mdr.sb3_version() <= high


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha2=5"], "alpha2=5 must be between 0"),
        (["--alpha2=-1"], "alpha2=-1 must be between 0"),
        (["--env-kwargs", "num_tasks"], "write KEY=VALUE"),
        (["--env-kwargs", "colour=3"], "--env PatchLoc-v0 --env-kwargs colour=3"),
        (["--env=NoSuchEnv-v0"], "--env NoSuchEnv-v0"),
        (["--env-kwargs", "view_size=32"], "at least 36 x 36 px"),
    ],
)
def test_bad_command_lines_print_one_line_and_return_2(args, message, tmp_path, capsys):
    assert sb3_mdr.main([*args, f"--log-dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_bad_command_line_exits_2_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, sb3_mdr.__file__, "--n-epochs=3", "--alpha2=4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "error: MDRPPO: alpha2=4 must be between 0" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
