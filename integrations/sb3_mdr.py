"""MDR for Stable-Baselines3: `MDRPPO`, SB3's PPO with Mode-Dependent Rectification.

Mode-Dependent Rectification (Mohamad, Ponzio, Descombes, arXiv 2602.05619, Algorithm 1): of the
`n_epochs` epochs of each PPO update, the first `alpha1 = n_epochs - alpha2` run with the network in
train mode (standard phase, what SB3's PPO does in every epoch) and the last `alpha2` in eval mode
(rectification phase). Rollouts are collected in eval mode, as SB3 already does. Nothing else
differs from SB3's PPO; `alpha2=0` is SB3's PPO, bit for bit. Why SB3 needs it, what it logs, and a
small measured comparison: docs/mdr_in_sb3.md.

From SB3's PPO to MDRPPO (an image env; BatchNormCNN, below, is NatureCNN with BatchNorm):

    from integrations.sb3_mdr import BatchNormCNN, MDRPPO  # instead of PPO
    policy_kwargs = dict(features_extractor_class=BatchNormCNN)
    model = MDRPPO("CnnPolicy", env, n_epochs=3, alpha2=1, policy_kwargs=policy_kwargs)
    model.learn(100_000)  # logs train/delta_pi_minus and train/ratio_gap next to SB3's keys

Example (the project's patch-localization env through gym.make, CPU-sized defaults):

    python integrations/sb3_mdr.py --env PatchLoc-v0 --alpha2 1

Tested against stable-baselines3 2.9.2 (torch 2.14.1, gymnasium 1.4.0). `MDRPPO.train` is a copy of
SB3's `PPO.train`, whose text is identical in the SB3 releases 2.4.0 to 2.9.2; other versions are
refused at construction with a one-line error.
"""

import argparse
import ast
import importlib
import inspect
import math
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import explained_variance
from torch import nn
from torch.nn import functional as F

# SB3 releases whose PPO.train() is, character for character, the one MDRPPO.train copies (checked
# against the release tags of DLR-RM/stable-baselines3; 2.3.2 and earlier resample the gSDE noise in
# each minibatch, which the copy would silently drop).
SB3_SUPPORTED = ((2, 4, 0), (2, 9, 2))


class MDRError(ValueError):
    """Bad input to MDRPPO, BatchNormCNN or the example: a one-line message saying what to
    change."""


def sb3_version() -> tuple:
    """The installed SB3 release as (major, minor, patch); a pre-release counts as its release."""
    release = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", stable_baselines3.__version__)
    return tuple(int(n or 0) for n in release.groups()) if release else (0, 0, 0)


def check_sb3_version() -> None:
    low, high = SB3_SUPPORTED
    if not low <= sb3_version() <= high:
        supported = "-".join(".".join(map(str, v)) for v in SB3_SUPPORTED)
        raise MDRError(
            f"MDRPPO copies PPO.train() of stable-baselines3 {supported}, found "
            f"{stable_baselines3.__version__}: pip install stable-baselines3==2.9.2"
        )


def default_alpha2(n_epochs: int) -> int:
    """The scripts' default: a third of the epochs in eval mode, at least one (MDR(2,1) of 3)."""
    return max(1, n_epochs // 3)


def check_alpha2(n_epochs: int, alpha2) -> None:
    if isinstance(alpha2, bool) or not isinstance(alpha2, (int, np.integer)):
        raise MDRError(f"MDRPPO: alpha2 must be an integer number of epochs, got {alpha2!r}")
    if not 0 <= alpha2 <= n_epochs:
        raise MDRError(
            f"MDRPPO: alpha2={alpha2} must be between 0 (SB3's PPO) and n_epochs={n_epochs} "
            f"(every epoch in eval mode); e.g. n_epochs=3, alpha2=1"
        )


def nature_cnn_side(side: int) -> int:
    """Side of NatureCNN's last feature map for an input of `side` px (kernels 8, 4, 3; strides
    4, 2, 1; no padding), 0 when the input is too small."""
    for kernel, stride in ((8, 4), (4, 2), (3, 1)):
        side = (side - kernel) // stride + 1 if side >= kernel else 0
    return side


class BatchNormCNN(BaseFeaturesExtractor):
    """SB3's NatureCNN (same convolutions, same linear layer) with a BatchNorm2d after each conv.

    Observations: an SB3 image space (SB3 moves channels first and scales to [0, 1] before the
    extractor), or PatchLoc-v0's uint8 (views, H, W, C), whose views are stacked as views * C
    channels and scaled to [0, 1] here (SB3 scales only 3-D image spaces). Images must be at least
    36 x 36 px, the smallest NatureCNN's convolutions accept. `bn_momentum`: torch's default 0.1.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        features_dim: int = 512,
        normalized_image: bool = False,
        bn_momentum: float = 0.1,
    ):
        shape = observation_space.shape
        self.views = len(shape) == 4 and observation_space.dtype == np.uint8
        if self.views:
            channels, height, width = shape[0] * shape[3], shape[1], shape[2]
        elif is_image_space(
            observation_space, check_channels=False, normalized_image=normalized_image
        ):
            channels, height, width = shape  # SB3 transposed it to channels first
        else:
            raise MDRError(
                f"BatchNormCNN needs an SB3 image space (uint8 images, H x W x C or C x H x W) or "
                f"uint8 (views, H, W, C), got {observation_space}; use MlpPolicy for vectors"
            )
        last_h, last_w = nature_cnn_side(height), nature_cnn_side(width)
        if min(last_h, last_w) < 1:
            raise MDRError(
                f"BatchNormCNN: NatureCNN's convolutions need images of at least 36 x 36 px, got "
                f"{height} x {width} (PatchLoc-v0: pass view_size >= 36)"
            )
        super().__init__(observation_space, features_dim)

        def conv_bn(in_channels, out_channels, kernel, stride):
            conv = nn.Conv2d(
                in_channels, out_channels, kernel_size=kernel, stride=stride, padding=0
            )
            return [conv, nn.BatchNorm2d(out_channels, momentum=bn_momentum), nn.ReLU()]

        self.cnn = nn.Sequential(
            *conv_bn(channels, 32, 8, 4),
            *conv_bn(32, 64, 4, 2),
            *conv_bn(64, 64, 3, 1),
            nn.Flatten(),
        )
        self.linear = nn.Sequential(nn.Linear(64 * last_h * last_w, features_dim), nn.ReLU())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        if self.views:  # (B, views, H, W, C) in 0..255 -> (B, views * C, H, W) in [0, 1]
            batch, views, height, width, channels = observations.shape
            observations = observations.permute(0, 1, 4, 2, 3).reshape(
                batch, views * channels, height, width
            )
            observations = observations / 255.0
        return self.linear(self.cnn(observations))


# --------------------------------------------------------------------------------------------------
# Diagnostics (paper eq. 6 and 10): each side-effect free (no running statistic or torch RNG moves)
# --------------------------------------------------------------------------------------------------
# torch's common bases of BatchNorm*/SyncBatchNorm/InstanceNorm* and of Dropout*/AlphaDropout (torch
# has no public base class for them)
NORM_BASE, DROPOUT_BASE = nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd


def mode_dependent_layers(module: nn.Module) -> list:
    """The layers whose output depends on train/eval mode: norms with running statistics, dropout
    with p > 0. A custom mode-dependent layer is not recognised."""
    return [
        m
        for m in module.modules()
        if (isinstance(m, NORM_BASE) and m.track_running_stats)
        or (isinstance(m, DROPOUT_BASE) and m.p > 0)
    ]


@contextmanager
def training_mode(policy, mode: bool):
    """A block with the policy in train (True) or eval mode, then its previous mode back."""
    was_training = policy.training
    policy.set_training_mode(mode)
    try:
        yield policy
    finally:
        policy.set_training_mode(was_training)


@contextmanager
def frozen_state(policy, device: th.device):
    """A block after which every buffer of the policy (running statistics, num_batches_tracked) and
    the torch RNG streams that dropout draws from are as they were before it."""
    saved = [(buffer, buffer.clone()) for buffer in policy.buffers()]
    devices = []
    if device.type == "cuda":
        devices = [th.cuda.current_device() if device.index is None else device.index]
    with th.random.fork_rng(devices=devices):
        try:
            yield policy
        finally:
            for buffer, value in saved:
                buffer.copy_(value)


def js_divergence(logits_p: th.Tensor, logits_q: th.Tensor) -> th.Tensor:
    """Jensen-Shannon divergence in nats between categorical distributions given by logits, one per
    row: 0 for equal distributions, at most ln 2."""
    log_p, log_q = F.log_softmax(logits_p, dim=-1), F.log_softmax(logits_q, dim=-1)
    log_m = th.logsumexp(th.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0.0, max=math.log(2.0))


def rollout_observations(buffer):
    """D_k's observations as tensors on the buffer's device, one row per transition (whether or not
    SB3's get() has flattened the buffer yet: the caller draws its own minibatches)."""
    if isinstance(buffer.observations, dict):
        return {
            key: buffer.to_torch(obs.reshape((-1, *buffer.obs_shape[key])))
            for key, obs in buffer.observations.items()
        }
    return buffer.to_torch(buffer.observations.reshape((-1, *buffer.obs_shape)))


def policy_logits(policy, obs) -> th.Tensor:
    return policy.get_distribution(obs).distribution.logits


@th.no_grad()
def policy_mismatch(policy, buffer, batch_size: int, seed: int) -> float:
    """Delta pi minus (paper eq. 6) on the rollout D_k before the update: mean over D_k's
    minibatches of the JS divergence between the train-mode policy (BatchNorm on the minibatch's
    statistics, dropout drawn) and the eval-mode policy that collected D_k. Minibatches of
    `batch_size` from a permutation drawn by its own generator (`seed`), so that no RNG stream the
    update uses moves."""
    obs = rollout_observations(buffer)
    size = buffer.buffer_size * buffer.n_envs
    order = th.randperm(size, generator=th.Generator().manual_seed(seed)).to(buffer.device)
    divergences = []
    with frozen_state(policy, buffer.device):
        for start in range(0, size, batch_size):
            inds = order[start : start + batch_size]
            mb_obs = {k: v[inds] for k, v in obs.items()} if isinstance(obs, dict) else obs[inds]
            with training_mode(policy, False):
                eval_logits = policy_logits(policy, mb_obs)
            with training_mode(policy, True):
                train_logits = policy_logits(policy, mb_obs)
            divergences.append(js_divergence(train_logits, eval_logits).mean().item())
    return float(np.mean(divergences))


@th.no_grad()
def eval_mode_ratio(policy, rollout_data, actions: th.Tensor) -> th.Tensor:
    """Eq. 10's r on a minibatch: the eval-mode policy's probability ratio at the current
    parameters, measured before the minibatch's train-mode pass moves the running statistics. Eval
    mode moves no running statistic and draws no dropout mask."""
    with training_mode(policy, False):
        _, log_prob, _ = policy.evaluate_actions(rollout_data.observations, actions)
    return th.exp(log_prob - rollout_data.old_log_prob)


# --------------------------------------------------------------------------------------------------
# The algorithm: MDRPPO
# --------------------------------------------------------------------------------------------------
class MDRPPO(PPO):
    """SB3's PPO with Mode-Dependent Rectification: each update's first `alpha1 = n_epochs - alpha2`
    epochs in train mode, the last `alpha2` in eval mode; every other argument is SB3's PPO's.

    :param alpha2: epochs of each update in eval mode (rectification phase), 0 to n_epochs;
        0 = SB3's PPO; default n_epochs // 3, at least 1 (MDR(2,1) for n_epochs=3)
    :param diagnostics: log train/delta_pi_minus (eq. 6; Discrete action spaces) and
        train/ratio_gap (eq. 10, standard phase); they cost extra forward passes and change nothing
    """

    def __init__(self, *args, alpha2: Optional[int] = None, diagnostics: bool = True, **kwargs):
        check_sb3_version()
        bound = inspect.signature(PPO).bind(*args, **kwargs)  # n_epochs as SB3 would read it
        bound.apply_defaults()
        n_epochs = bound.arguments["n_epochs"]
        self.alpha2 = default_alpha2(n_epochs) if alpha2 is None else alpha2
        check_alpha2(n_epochs, self.alpha2)  # before SB3 builds the envs
        self.diagnostics = diagnostics
        super().__init__(*args, **kwargs)

    @property
    def alpha1(self) -> int:
        """Epochs of each update in train mode (standard phase)."""
        return self.n_epochs - self.alpha2

    def _setup_model(self) -> None:
        check_alpha2(self.n_epochs, self.alpha2)  # again: load() sets the saved or given values
        super()._setup_model()
        if self.alpha2 > 0 and not mode_dependent_layers(self.policy):
            warnings.warn(
                "MDRPPO: the policy has no BatchNorm/InstanceNorm with running statistics and no "
                "dropout, so eval mode equals train mode: the rectification phase equals the "
                "standard one and this is SB3's PPO",
                stacklevel=2,
            )
        if self.diagnostics and not isinstance(self.action_space, spaces.Discrete):
            warnings.warn(
                "MDRPPO: train/delta_pi_minus is measured for Discrete action spaces only "
                "(train/ratio_gap is logged for every action space)",
                stacklevel=2,
            )

    def record_delta_pi_minus(self) -> None:
        """train/delta_pi_minus on the rollout, before the update (Discrete action spaces only)."""
        if isinstance(self.action_space, spaces.Discrete):
            delta = policy_mismatch(
                self.policy, self.rollout_buffer, self.batch_size, self._n_updates
            )
            self.logger.record("train/delta_pi_minus", delta)

    # A copy of PPO.train() of stable-baselines3 2.9.2 (identical in 2.4.0-2.9.2, see
    # SB3_SUPPORTED), reformatted to 100 columns. The lines tagged MDR are the only additions.
    def train(self) -> None:
        """
        Update policy using the currently gathered rollout buffer.
        """
        if self.diagnostics:  # MDR diagnostics: Delta pi minus (eq. 6) on D_k, before the update
            self.record_delta_pi_minus()  # MDR
        ratio_gaps = []  # MDR
        # Switch to train mode (this affects batch norm / dropout)
        self.policy.set_training_mode(True)
        # Update optimizer learning rate
        self._update_learning_rate(self.policy.optimizer)
        # Compute current clip range
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        # Optional: clip range for the value function
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        entropy_losses = []
        pg_losses, value_losses = [], []
        clip_fractions = []

        continue_training = True
        # train for n_epochs epochs
        for epoch in range(self.n_epochs):
            self.policy.set_training_mode(epoch < self.alpha1)  # MDR: standard, then rectification
            approx_kl_divs = []
            # Do a complete pass on the rollout buffer
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    # Convert discrete action from float to long
                    actions = rollout_data.actions.long().flatten()

                measure_gap = self.diagnostics and epoch < self.alpha1  # MDR: standard phase
                if measure_gap:  # MDR: r before this pass moves the running statistics
                    eval_ratio = eval_mode_ratio(self.policy, rollout_data, actions)  # MDR
                values, log_prob, entropy = self.policy.evaluate_actions(
                    rollout_data.observations, actions
                )
                values = values.flatten()
                # Normalize advantage
                advantages = rollout_data.advantages
                # Normalization does not make sense if mini batchsize == 1, see GH issue #325
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

                # ratio between old and new policy, should be one at the first iteration
                ratio = th.exp(log_prob - rollout_data.old_log_prob)
                if measure_gap:  # MDR: mean |r' - r|, the optimized ratio against eq. 10's r
                    ratio_gaps.append((ratio.detach() - eval_ratio).abs().mean().item())  # MDR

                # clipped surrogate loss
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()

                # Logging
                pg_losses.append(policy_loss.item())
                clip_fraction = th.mean((th.abs(ratio - 1) > clip_range).float()).item()
                clip_fractions.append(clip_fraction)

                if self.clip_range_vf is None:
                    # No clipping
                    values_pred = values
                else:
                    # Clip the difference between old and new value
                    # NOTE: this depends on the reward scaling
                    values_pred = rollout_data.old_values + th.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf
                    )
                # Value loss using the TD(gae_lambda) target
                value_loss = F.mse_loss(rollout_data.returns, values_pred)
                value_losses.append(value_loss.item())

                # Entropy loss favor exploration
                if entropy is None:
                    # Approximate entropy when no analytical form
                    entropy_loss = -th.mean(-log_prob)
                else:
                    entropy_loss = -th.mean(entropy)

                entropy_losses.append(entropy_loss.item())

                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

                # Calculate approximate form of reverse KL Divergence for early stopping
                # see issue #417: https://github.com/DLR-RM/stable-baselines3/issues/417
                # and discussion in PR #419: https://github.com/DLR-RM/stable-baselines3/pull/419
                # and Schulman blog: http://joschu.net/blog/kl-approx.html
                with th.no_grad():
                    log_ratio = log_prob - rollout_data.old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)

                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(
                            f"Early stopping at step {epoch} due to reaching max kl: "
                            f"{approx_kl_div:.2f}"
                        )
                    break

                # Optimization step
                self.policy.optimizer.zero_grad()
                loss.backward()
                # Clip grad norm
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()

            self._n_updates += 1
            if not continue_training:
                break

        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )

        # Logs
        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        if ratio_gaps:  # MDR: none without diagnostics or without a standard phase (alpha1 = 0)
            self.logger.record("train/ratio_gap", np.mean(ratio_gaps))  # MDR


# --------------------------------------------------------------------------------------------------
# Example: python integrations/sb3_mdr.py --env PatchLoc-v0 --alpha2 1
# --------------------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent.parent
# PatchLoc-v0 at probe size (docs/collapse.md: 4 tasks, small views), with views of 36 px, the
# smallest NatureCNN accepts; the task set is drawn from --seed
PATCHLOC_KWARGS = {"num_tasks": 4, "view_size": 36}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train SB3's PPO with MDR (MDRPPO) and a BatchNorm NatureCNN on an image env.",
    )
    add = parser.add_argument
    add("--env", default="PatchLoc-v0", help="gymnasium id with image observations")
    add(
        "--env-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="passed to gym.make, values as Python literals (PatchLoc-v0 defaults: num_tasks=4 "
        "view_size=36 seed=--seed)",
    )
    add("--n-envs", type=int, default=4, help="environments stepped in turn (DummyVecEnv)")
    add("--n-steps", type=int, default=32, help="steps per environment per rollout")
    add("--batch-size", type=int, default=32, help="minibatch size")
    add("--n-epochs", type=int, default=3, help="epochs per update (the scripts' --update-epochs)")
    add(
        "--alpha2",
        type=int,
        default=1,
        help="of those, epochs in eval mode (rectification phase); 0 = SB3's PPO",
    )
    add("--learning-rate", type=float, default=1e-3, help="Adam's learning rate (constant)")
    add("--ent-coef", type=float, default=0.01, help="entropy coefficient")
    add("--bn-momentum", type=float, default=0.1, help="BatchNorm's running-statistics momentum")
    add("--total-timesteps", type=int, default=19_200, help="environment steps (150 updates)")
    add("--seed", type=int, default=1, help="seed of SB3 (torch, numpy, envs) and the task set")
    add("--no-diagnostics", action="store_true", help="do not log delta_pi_minus and ratio_gap")
    add("--device", default="cpu", help="torch device (cpu, cuda, auto)")
    add(
        "--log-dir",
        default=None,
        help="SB3 logs (progress.csv) and model.zip (default "
        "runs/sb3_mdr/{env}_mdr{a1}-{a2}_s{seed}); never overwritten",
    )
    return parser.parse_args(argv)


def parse_env_kwargs(pairs: list) -> dict:
    """KEY=VALUE strings -> dict; a value that is not a Python literal stays a string (a path)."""
    kwargs = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise MDRError(f"--env-kwargs {pair!r}: write KEY=VALUE, e.g. num_tasks=16")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def make_env(args: argparse.Namespace):
    """args.n_envs Monitor-wrapped copies of gym.make(args.env, **kwargs) in a DummyVecEnv."""
    kwargs = parse_env_kwargs(args.env_kwargs)
    if args.env.startswith("PatchLoc"):
        # This file runs from integrations/: the project's envs/ (it registers PatchLoc-v0) sits in
        # the repository root. The library part above does not need it.
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        importlib.import_module("envs")  # registers PatchLoc-v0
        kwargs = {**PATCHLOC_KWARGS, "seed": args.seed, **kwargs}
    try:
        return make_vec_env(args.env, n_envs=args.n_envs, seed=args.seed, env_kwargs=kwargs)
    except (gym.error.Error, ValueError, TypeError) as e:
        # user errors: an unknown id, a value the env refuses, a keyword it does not take; any
        # other TypeError is a bug and keeps its traceback
        if isinstance(e, TypeError) and "unexpected keyword argument" not in str(e):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MDRError(
            f"--env {args.env} --env-kwargs {' '.join(args.env_kwargs)}: {message}"
        ) from None


def make_model(args: argparse.Namespace, env) -> MDRPPO:
    """MDRPPO with BatchNormCNN; the arguments not set here are SB3's PPO defaults."""
    return MDRPPO(
        "CnnPolicy",
        env,
        learning_rate=args.learning_rate,
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        ent_coef=args.ent_coef,
        alpha2=args.alpha2,
        diagnostics=not args.no_diagnostics,
        policy_kwargs=dict(
            features_extractor_class=BatchNormCNN,
            features_extractor_kwargs=dict(bn_momentum=args.bn_momentum),
        ),
        seed=args.seed,
        device=args.device,
    )


def default_log_dir(args: argparse.Namespace) -> Path:
    name = (
        f"{args.env.replace('/', '-')}_mdr{args.n_epochs - args.alpha2}-{args.alpha2}_s{args.seed}"
    )
    return Path("runs") / "sb3_mdr" / name


def main(argv=None) -> int:
    args = parse_args(argv)
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir(args)
    try:
        check_sb3_version()
        check_alpha2(args.n_epochs, args.alpha2)  # before the envs are built
        if log_dir.exists() and any(log_dir.iterdir()):
            raise MDRError(f"--log-dir {log_dir} already holds a run; pass another --log-dir")
        env = make_env(args)
        model = make_model(args, env)
    except MDRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.set_logger(configure(str(log_dir), ["stdout", "csv"]))
    model.learn(total_timesteps=args.total_timesteps)
    model.save(log_dir / "model.zip")
    print(f"{log_dir}: progress.csv, model.zip (MDRPPO.load reads it; alpha2={model.alpha2})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
