# Reward-collapse probe (paper Fig. 1 and 6, App. A and B) and the rival fixes for BatchNorm in PPO
# (docs/rivals.md): PPO on the patch-localization task in one --mode per run. CleanRL-style, one
# file (+ envs/). MDR in your own PPO: docs/mdr_in_your_ppo.md; `grep -n "[#] MDR"` lists the
# method's lines. Paper: Mohamad, Ponzio, Descombes (2602.05619).
# Run:      python ppo_collapse_probe.py --mode bn --clip-coef 0.2 --seed 1
#           (then --mode eval, --mode bn-mdr)
# Analyse:  python analysis/collapse_stats.py --runs-dir docs/collapse/study
#           (collapse rates, tests, figures)
# Every update: reward, Delta pi minus/plus and the trust-region diagnostics to TensorBoard, wandb
# (--track) and one flushed row of runs/<run_name>/metrics.csv; summary.json at the end. Defaults:
# the App. A regime sized for 2 CPU cores (docs/collapse.md). Unlike ppo_patchloc_mdr.py: one MDR
# round per rollout, a constant learning rate (a decaying one would damp late collapses), no
# held-out evaluation (the probe watches training reward).
import contextlib
import copy
import csv
import errno
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal, Optional

# OpenMP threads that spin while they wait steal the cores from the env and from other jobs:
# passive waiting measured up to 2.6x the SPS of ppo_procgen_mdr.py on 2 shared cores
# (docs/benchmarks.md). Read once, when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import ResNet18_Weights, resnet18

from envs import PatchLocConfigError, PatchLocVecEnv, make_task_sets, write_tasks_json


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python, the task set and the envs)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """if toggled, cuda will be used when available (the probe is sized for CPU)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "ppo-mdr-collapse"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    wandb_group: Optional[str] = None
    """the wandb group (default: the run name without the seed, so that seeds aggregate)"""
    run_name: Optional[str] = None
    """folder under runs/ (default: mode, dropout p, clip, entropy, BN momentum, view batching
    and seed; never the clock)"""
    resume: Optional[str] = None
    """`auto` (checkpoints on): continue the run folder's checkpoint, start afresh in an empty
    folder, exit 0 if the run is finished (README: "Run folders"); or a checkpoint's path"""
    overwrite: bool = False
    """if toggled, a run folder that holds another run is moved aside to NAME.old-N (never
    deleted) and the run starts afresh"""
    checkpoint_interval: int = 10
    """updates between checkpoints with --resume auto (a stop signal always writes one)"""

    torch_threads: int = 1
    """CPU threads of torch (1: on a small shared machine more threads slow a run down;
    0 = torch's default)"""

    # What is compared (paper Fig. 6: rows = mode, columns = clip; App. B: entropy coefficient)
    mode: str = "bn"
    """bn, eval, bn-mdr (the paper's), its other layers dropout, dropout-mdr, ln, or a rival:
    bn-recal, bn-train, bn-oldtrain, brn, brn-mdr, bn-wn, gn, none (MODES)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient epsilon (Fig. 6: 0.2 and 0.05)"""
    ent_coef: float = 0.01
    """coefficient of the entropy (App. B compares it with 0)"""
    update_epochs: int = 3
    """epochs E per rollout in every mode: the MDR modes (bn-mdr, brn-mdr, dropout-mdr) split
    them alpha1 + alpha2, others train all E"""
    alpha1: Optional[int] = None  # MDR
    """MDR modes only: epochs in train mode (standard phase); default E - alpha2"""
    alpha2: Optional[int] = None  # MDR
    """MDR modes only: epochs in eval mode (rectification phase); default E // 3 (at least 1),
    i.e. MDR(2,1) of 3"""

    # Algorithm specific arguments: the App. A regime, CPU-sized (docs/collapse.md)
    total_timesteps: int = 19_200
    """total timesteps of the experiments (150 updates of 128 transitions)"""
    learning_rate: float = 1e-3
    """the (constant) learning rate of the optimizer"""
    weight_decay: float = 1e-4
    """Adam's weight decay (L2, as torch.optim.Adam applies it)"""
    num_envs: int = 4
    """the number of parallel patch-localization environments"""
    num_steps: int = 32
    """the number of steps to run in each environment per policy rollout (few transitions per
    D_k)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    minibatch_size: int = 32
    """the minibatch size m (when it does not divide |D_k|, the last minibatch of an epoch is
    smaller)"""
    norm_adv: bool = True
    """toggles advantages normalization (per minibatch)"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function, as per the paper"""
    vf_coef: float = 1.0
    """coefficient of the value function"""
    max_grad_norm: float = 1.0
    """the maximum norm for the gradient clipping"""

    # Network: shallow ResNet-18 shared by the three views (paper Table 1)
    bn_momentum: float = 0.01
    """running-statistics momentum of BatchNorm (the paper tries 0.1 and 0.01)"""
    dropout_p: Optional[float] = None
    """dropout probability of the dropout modes, in [0, 1), as the training scripts' --dropout-p
    (None: DEFAULT_DROPOUT_P = 0.1; an error with the other modes)"""
    pretrained: bool = False
    """initialise the backbone from ImageNet (needs
    $TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth offline)"""
    hidden_size: int = 768
    """width of the actor and critic MLPs (paper: 768 = 3 views x 256 features)"""
    view_batching: Literal["separate", "joint"] = "separate"
    """separate: one backbone pass per view, BatchNorm statistics per view type (paper App. C);
    joint: one pass over all"""

    # Task set (envs/): App. A uses four training environments
    num_tasks: int = 4
    """number of training tasks (a target patch in an image each)"""
    image_source: str = "procedural"
    """'procedural' (built-in generator, no download), or a folder of images (.jpg .png .tif, any
    size) and/or whole-slide images (.svs .ndpi .mrxs .scn .bif, pyramidal .tif; docs/slides.md),
    subfolders too"""
    image_size: Optional[int] = None
    """side m that images are processed at, >= 4 x view size (default: 4 x --view-size)"""
    targets_per_image: int = 1
    """tasks (targets) drawn from each image, so that 2048 tasks can come from a few hundred
    images"""
    slide_mpp: Optional[float] = None
    """slides: micrometres per pixel of a task's image (None: 2.0, a 5x view; docs/slides.md)"""
    slide_level: Optional[int] = None
    """slides: read this pyramid level instead of --slide-mpp (for slides without MPP metadata)"""
    regions_per_slide: int = 32
    """slides: task images (non-overlapping regions of tissue) drawn from each slide"""
    min_tissue: float = 0.5
    """slides: tissue fraction a region and each target need (Otsu on saturation, as CLAM)"""
    view_size: int = 32
    """side of each of the three views (paper: 112; CPU-sized: 32)"""
    max_episode_steps: int = 20
    """steps before an episode is truncated"""

    # Mismatch diagnostics (paper eq. 6-7 and 10-11): complete by default, they are the probe's
    # measurement
    diag_minibatches: int = 0
    """minibatches of D_k over which delta_pi_minus/plus are averaged (0 = all of D_k, -1 = off)"""
    diag_ratio_every: int = 1
    """measure the eval-mode ratio r next to r' on every k-th standard-phase minibatch, from the
    first (0 = never)"""
    smooth_window: int = 10
    """updates in the moving average of the reward (the smoothed_reward column)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size |D_k| (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# --mode: the paper's three (BN: train mode in updates, eval in collection; BN frozen; BN + MDR)
# and the rivals
MODES = {
    "bn": "BN",
    "eval": "Eval",
    "bn-mdr": "BN+MDR",
    "bn-recal": "BN + running statistics recomputed on D_k after each update (precise BN)",
    "bn-train": "BN in train mode everywhere, collection included (OpenAI CoinRun)",
    "bn-oldtrain": "BN, old log-probs from the train-mode policy at theta_k",
    "brn": "Batch Renorm",
    "brn-mdr": "Batch Renorm + MDR",
    "bn-wn": "BN + weight normalization of the convs (CrossQ + WN)",
    "gn": "GroupNorm (no mode dependence)",
    "none": "no normalization",
    "dropout": "Dropout in place of each BatchNorm (masks in the updates, none in collection)",
    "dropout-mdr": "Dropout+MDR",
    "ln": "LayerNorm over channels and space, GroupNorm(1, C) (no mode dependence)",
}
MDR_MODES = ("bn-mdr", "brn-mdr", "dropout-mdr")  # they split the epochs: alpha1 + alpha2
DROPOUT_MODES = ("dropout", "dropout-mdr")  # the modes with --dropout-p
DEFAULT_DROPOUT_P = 0.1  # the paper's 10 % (Fig. 4), the training scripts' default
# metrics.csv, one row per update (analysis/ reads these names)
CSV_COLUMNS = """iteration global_step mode clip_coef ent_coef seed alpha1 alpha2 episodes
episodic_return normalized_reward smoothed_reward success_rate delta_pi_minus delta_pi_plus
ratio_gap trust_region_violation trust_region_violation_signed entropy acting_entropy approx_kl
old_approx_kl clipfrac approx_kl_standard clipfrac_standard approx_kl_rectify clipfrac_rectify
policy_loss value_loss explained_variance sps wall_time""".split()
TENSORBOARD_COLUMNS = CSV_COLUMNS[
    CSV_COLUMNS.index("episodic_return") : CSV_COLUMNS.index("sps") + 1
]


def split_epochs(args: Args) -> tuple:  # MDR
    """(alpha1, alpha2): the E = --update-epochs epochs of a round, alpha1 in train mode (standard
    phase), then alpha2 in eval mode (rectification phase); MDR splits the epochs, it adds none.
    Either flag alone sets the other (alpha1 + alpha2 = E); neither: alpha2 = E // 3, at least 1
    (MDR(2,1) of 3). Both: as given (validate_args checks that they add up to E)."""
    epochs, alpha2 = args.update_epochs, args.alpha2
    if alpha2 is None:
        alpha2 = max(1, epochs // 3) if args.alpha1 is None else epochs - args.alpha1
    return (epochs - alpha2 if args.alpha1 is None else args.alpha1), alpha2


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class EvalModeBatchNorm2d(nn.BatchNorm2d):
    """`--norm eval`: BatchNorm with frozen running statistics (ImageNet's if pretrained) in both
    modes; affine learns."""

    def forward(self, x):
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class BatchRenorm2d(nn.Module):
    """Batch Renormalization (Ioffe, 2017) with nn.BatchNorm2d's names (ImageNet weights load).
    Train mode: x_hat = (x - mu_B) / sigma_B * r + d, r = sigma_B / sigma in [1/r_max, r_max],
    d = (mu_B - mu) / sigma in [-d_max, d_max] (no gradient), bounds ramped from BatchNorm's
    (1, 0) over `warmup` passes. Eval mode: running statistics."""

    def __init__(self, num_features, momentum=0.1, eps=1e-5, r_max=3.0, d_max=5.0, warmup=5000):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.r_max = r_max
        self.d_max = d_max
        self.warmup = warmup
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        x = x.float()  # --amp: statistics in float32 (a no-op otherwise)
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        std, running_std = (var + self.eps).sqrt(), (self.running_var + self.eps).sqrt()
        ramp = (self.num_batches_tracked.float() / max(self.warmup, 1)).clamp(max=1.0)
        r_max, d_max = 1.0 + (self.r_max - 1.0) * ramp, self.d_max * ramp
        r = torch.minimum(torch.maximum(std.detach() / running_std, 1.0 / r_max), r_max)
        d = torch.minimum(
            torch.maximum((mean.detach() - self.running_mean) / running_std, -d_max), d_max
        )

        def channel(t):  # a per-channel vector, broadcast over (N, C, H, W)
            return t[None, :, None, None]

        x_hat = (x - channel(mean)) / channel(std) * channel(r) + channel(d)
        with torch.no_grad():
            n = x.numel() / x.size(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        return x_hat * channel(self.weight) + channel(self.bias)


def make_backbone(args: Args) -> nn.Module:
    """Shallow ResNet-18 (paper Table 1): torchvision's resnet18 without layer4 and fc; average
    pool -> 256 features. The norm layer is the one line that differs between the modes (Batch
    Renorm: its bounds ramp over ~15 updates; ln and the dropout modes: as the training
    scripts' --norm ln and --norm dropout)."""
    batchnorm = partial(nn.BatchNorm2d, momentum=args.bn_momentum)  # bn, bn-mdr, the BN rivals
    norm_layer = {
        "eval": EvalModeBatchNorm2d,
        "brn": partial(BatchRenorm2d, momentum=args.bn_momentum, warmup=500),
        "brn-mdr": partial(BatchRenorm2d, momentum=args.bn_momentum, warmup=500),
        "ln": lambda channels: nn.GroupNorm(1, channels),
        "gn": lambda channels: nn.GroupNorm(32, channels),
        "none": lambda channels: nn.Identity(),
        "dropout": lambda channels: nn.Dropout(args.dropout_p),
        "dropout-mdr": lambda channels: nn.Dropout(args.dropout_p),
    }.get(args.mode, batchnorm)
    backbone = resnet18(weights=None, norm_layer=norm_layer)
    backbone.layer4 = nn.Identity()
    backbone.fc = nn.Identity()
    if args.pretrained:
        load_imagenet_weights(backbone)
    return backbone


def load_imagenet_weights(backbone: nn.Module) -> list:
    """Load every tensor of torchvision's ImageNet ResNet-18 whose name and shape exist in the
    backbone; their names."""
    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        state_dict = weights.get_state_dict(progress=False)
    except Exception as e:  # offline (URLError), or a truncated file in the cache (RuntimeError)
        raise ConfigError(
            f"no ImageNet weights ({type(e).__name__}): put them at {cached} or pass "
            "--no-pretrained"
        ) from None
    own = backbone.state_dict()
    loadable = {
        k: v
        for k, v in state_dict.items()
        if k in own and own[k].shape == v.shape and "num_batches" not in k
    }
    backbone.load_state_dict(loadable, strict=False)
    return sorted(loadable)


def mlp(in_features: int, hidden: int, out_features: int, std: float) -> nn.Sequential:
    """FC-ReLU-FC-ReLU-out (paper Table 1), CleanRL's orthogonal init; `std` of the output layer."""
    layers = [
        layer_init(nn.Linear(in_features, hidden)),
        nn.ReLU(),
        layer_init(nn.Linear(hidden, hidden)),
        nn.ReLU(),
    ]
    return nn.Sequential(*layers, layer_init(nn.Linear(hidden, out_features), std=std))


class Agent(nn.Module):
    """Paper Table 1: one shallow ResNet-18 on the three views (target, overview, current), 768
    features; actor, critic."""

    def __init__(self, num_actions: int, args: Args):
        super().__init__()
        self.separate_views = args.view_batching == "separate"
        self.backbone = make_backbone(args)
        self.actor = mlp(3 * 256, args.hidden_size, num_actions, std=0.01)
        self.critic = mlp(3 * 256, args.hidden_size, 1, std=1.0)

    def features(self, x):
        # uint8 (B, 3 views, V, V, 3) -> float images in [0, 1], channels_last in memory -> (B, 768)
        # = per sample the target's, the overview's and the current view's 256 features. No ImageNet
        # mean/std (paper Table 2). Divided in place: one float copy of the minibatch, not two.
        # --view-batching separate: one pass per view (BatchNorm's batch statistics per view type,
        # running statistics a blend of the three); joint: one pass over all 3B images. Same
        # weights, same output in eval mode.
        batch, views = x.shape[:2]
        images = x.reshape((batch * views,) + x.shape[2:]).permute(0, 3, 1, 2).float().div_(255.0)
        if self.separate_views:
            by_view = images.view(batch, views, *images.shape[1:])
            return torch.cat([self.backbone(by_view[:, v]).float() for v in range(views)], dim=1)
        return self.backbone(images).float().reshape(batch, views * 256)

    def get_value(self, x):
        return self.critic(self.features(x))

    def get_policy_and_value(self, x):
        hidden = self.features(x)
        # no argument validation: NaN logits reach the non-finite-loss check
        policy = Categorical(logits=self.actor(hidden), validate_args=False)
        return policy, self.critic(hidden)

    def get_action_and_value(self, x, action=None):
        policy, value = self.get_policy_and_value(x)
        if action is None:
            action = policy.sample()
        return action, policy.log_prob(action), policy.entropy(), value


def compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """GAE over a (num_steps, num_envs) rollout; dones[t] = 1 when obs[t] starts an episode (it
    cuts the bootstrap into t)."""
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


def clipped_ppo_loss(newlogprob, entropy, newvalue, mb_advantages, mb, args: Args):
    """CleanRL's PPO loss (eq. 4-5): clipped surrogate, (clipped) value loss, entropy bonus;
    advantages as normalized."""
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    newvalue = newvalue.view(-1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb["returns"]) ** 2
        v_clipped = mb["values"] + torch.clamp(
            newvalue - mb["values"], -args.clip_coef, args.clip_coef
        )
        v_loss_clipped = (v_clipped - mb["returns"]) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb["returns"]) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    stats = dict(
        policy_loss=pg_loss.detach(), value_loss=v_loss.detach(), entropy=entropy_loss.detach()
    )
    return (
        loss,
        ratio,
        dict(**stats, old_approx_kl=old_approx_kl, approx_kl=approx_kl, clipfrac=clipfrac),
    )


def ppo_update(agent, optimizer, mb, args: Args, eval_ratio=None):
    """One gradient step on `mb` in the agent's current mode (= MDR phase); detached stats, no
    host sync. `eval_ratio`: eq. 10's r on `mb`, measured by the loop before this pass moved the
    running statistics, or None."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb["obs"], mb["actions"])
    mb_advantages = mb["advantages"]
    if args.norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    loss, ratio, stats = clipped_ppo_loss(newlogprob, entropy, newvalue, mb_advantages, mb, args)
    if eval_ratio is not None:
        stats.update(
            trust_region_diagnostics(ratio.detach(), eval_ratio, mb_advantages, args.clip_coef)
        )
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    stats["loss"] = loss.detach()
    return stats


@contextlib.contextmanager
def temporary_mode(agent, training: bool):
    """A block in train or eval mode, then the mode restored: every mode change that is not the
    method's goes through here, so the bare agent.train()/agent.eval() calls, tagged MDR, are
    the method's alone."""
    was_training = agent.training
    agent.train(training)
    try:
        yield agent
    finally:
        agent.train(was_training)


def js_divergence(logits_p, logits_q):
    """Jensen-Shannon divergence (nats, per row) between two categorical distributions;
    0 <= JS <= ln 2."""
    log_p, log_q = F.log_softmax(logits_p, dim=-1), F.log_softmax(logits_q, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0.0, max=math.log(2.0))


@torch.no_grad()
def policy_mismatch(agent, b_obs, minibatch_size, num_minibatches, generator, b_eval_logits=None):
    """Delta pi (eq. 6-7): mean JS divergence of the train-mode policy (batch statistics of a
    minibatch; dropout: one mask draw per minibatch, from `generator`) from the eval-mode one
    (`b_eval_logits` if known: the rollout's), over `num_minibatches` of D_k (0 = all; -1 = off).
    Side-effect free: buffers and torch's RNG state are restored."""
    if num_minibatches < 0:
        return None
    # only dropout draws in a forward pass; other networks' diagnostics keep the stream they had
    dropout = any(isinstance(module, nn.Dropout) for module in agent.modules())
    saved_buffers = {name: buf.clone() for name, buf in agent.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    perm = torch.randperm(len(b_obs), generator=generator).to(b_obs.device)
    total = len(b_obs) // minibatch_size
    divergences = []
    for start in range(0, minibatch_size * (min(num_minibatches, total) or total), minibatch_size):
        mb_inds = perm[start : start + minibatch_size]
        mb_obs = b_obs[mb_inds]
        with temporary_mode(agent, training=False):
            eval_logits = (
                agent.actor(agent.features(mb_obs))
                if b_eval_logits is None
                else b_eval_logits[mb_inds]
            )
        with temporary_mode(agent, training=True):
            if dropout:  # the masks from the diagnostics' stream, not the training one
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            train_logits = agent.actor(agent.features(mb_obs))
        for name, buf in agent.named_buffers():
            buf.copy_(saved_buffers[name])
        divergences.append(js_divergence(train_logits, eval_logits).mean())
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return torch.stack(divergences).mean()


@torch.no_grad()
def eval_mode_ratio(agent, mb):
    """Eq. 10's r: the eval-mode policy's ratio at the current parameters and running statistics
    (measured before the minibatch's train-mode pass moves them). Side-effect free: no running
    statistic moves, no dropout mask is drawn."""
    with temporary_mode(agent, training=False):
        _, eval_logprob, _, _ = agent.get_action_and_value(mb["obs"], mb["actions"])
    return (eval_logprob - mb["logprobs"]).exp()


def trust_region_diagnostics(train_ratio, eval_ratio, advantages, clip_coef):
    """Eq. 10-11 on one minibatch, from the optimized train-mode ratio r' and the eval-mode
    ratio r: ratio_gap = mean |r' - r|; trust_region_violation: r' in [1 - eps, 1 + eps], r not;
    ..._signed: the clip would stop the gradient under r but not under r' (it stops
    r > 1 + eps for A > 0, r < 1 - eps for A < 0)."""

    def inside(ratio):
        return (ratio - 1.0).abs() <= clip_coef

    def clipped(ratio):
        return ((advantages > 0) & (ratio > 1 + clip_coef)) | (
            (advantages < 0) & (ratio < 1 - clip_coef)
        )

    violation = (inside(train_ratio) & ~inside(eval_ratio)).float().mean()
    signed = (clipped(eval_ratio) & ~clipped(train_ratio)).float().mean()
    gap = (train_ratio - eval_ratio).abs().mean()
    return {
        "ratio_gap": gap,
        "trust_region_violation": violation,
        "trust_region_violation_signed": signed,
    }


def make_optimizer(agent, args: Args, device):
    """CleanRL's Adam. --mode bn-wn (CrossQ + WN): each conv weight feeds a BatchNorm that hides
    its scale, so it gets no weight decay and is projected to unit norm per output channel after
    each step (a constant effective learning rate)."""
    convs = (
        [m.weight for m in agent.backbone.modules() if isinstance(m, nn.Conv2d)]
        if args.mode == "bn-wn"
        else []
    )
    others = [p for p in agent.parameters() if all(p is not w for w in convs)]
    groups = [{"params": others}] + ([{"params": convs, "weight_decay": 0.0}] if convs else [])
    optimizer = torch.optim.Adam(
        groups,
        lr=args.learning_rate,
        eps=1e-5,
        weight_decay=args.weight_decay,
        fused=device.type == "cuda",
    )
    if convs:

        def project(*_):  # also the optimizer's step post-hook, whose arguments it ignores
            for w in convs:
                w.data.div_(torch.linalg.vector_norm(w.data, dim=(1, 2, 3), keepdim=True))

        project()
        optimizer.register_step_post_hook(project)
    return optimizer


@torch.no_grad()
def train_mode_logprobs(theta_k, mb):
    """--mode bn-oldtrain: log pi_old of the minibatch's actions from the train-mode policy at
    the pre-update parameters (batch statistics of this minibatch), so the optimized ratio starts
    at 1 in the mode that is optimized."""
    with temporary_mode(theta_k, training=True):
        return theta_k.get_action_and_value(mb["obs"], mb["actions"])[1]


@torch.no_grad()
def recalibrate_batchnorm(agent, b_obs, minibatch_size):
    """Precise BN, the forum tip "run train mode without any learning for a few batches before
    switching to eval mode" (a rival of MDR, docs/rivals.md): running statistics := the mean over
    D_k's minibatches of the new weights' batch statistics (momentum None), so the next rollout
    sees the current network's. No other buffer moves, no RNG drawn."""
    # exact types: not eval-mode BatchNorm (EvalModeBatchNorm2d subclasses nn.BatchNorm2d)
    norms = [m for m in agent.modules() if type(m) in (nn.BatchNorm2d, BatchRenorm2d)]
    saved = {name: buf.clone() for name, buf in agent.named_buffers()}
    stats = {m: [] for m in norms}

    def record(m, inputs, _):  # a forward hook: the batch statistics of the layer's input
        stats[m].append((inputs[0].float().mean((0, 2, 3)), inputs[0].float().var((0, 2, 3))))

    hooks = [m.register_forward_hook(record) for m in norms]
    with temporary_mode(agent, training=True), torch.random.fork_rng(devices=[]):
        for start in range(0, len(b_obs), minibatch_size):
            agent.features(b_obs[start : start + minibatch_size])
            for name, buf in agent.named_buffers():
                buf.copy_(saved[name])  # each pass sees the statistics the update left
    for hook in hooks:
        hook.remove()
    for m in norms:
        m.running_mean.copy_(torch.stack([mean for mean, _ in stats[m]]).mean(0))
        m.running_var.copy_(torch.stack([var for _, var in stats[m]]).mean(0))


def make_envs(args: Args):
    """Envs on the training tasks drawn from the seed (the held-out set, one task, is not used by
    the probe); bad task settings are a ConfigError."""
    try:
        sizes = (args.num_tasks, 1, args.image_source, args.image_size, args.view_size)
        settings = ("targets_per_image", "slide_mpp", "slide_level", "regions_per_slide")
        settings = {name: getattr(args, name) for name in (*settings, "min_tissue")}
        train_tasks, _ = make_task_sets(*sizes, seed=args.seed, **settings)
        return PatchLocVecEnv(train_tasks, args.num_envs, max_steps=args.max_episode_steps)
    except PatchLocConfigError as e:
        raise ConfigError(str(e)) from None


def seed_everything(args: Args) -> torch.device:
    """CleanRL's seeding (python, numpy, torch; cuDNN deterministic unless
    --no-torch-deterministic), torch's CPU threads, and the device: CUDA if asked for and there,
    else CPU (with a notice when --cuda found none)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    # benchmark mode picks the fastest conv algorithms by timing them: not repeatable
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.cuda and not torch.cuda.is_available():
        print("note: --cuda requested but CUDA is not available; running on CPU")
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def rollout_storage(args: Args, obs_shape: tuple, num_actions: int, device) -> tuple:
    """CleanRL's storage of one rollout, (num_steps, num_envs) of each: obs, actions, logprobs,
    logits, rewards, dones, values. Observations stay uint8 (4x smaller than float32), converted
    per minibatch."""
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    logits = torch.zeros((args.num_steps, args.num_envs, num_actions)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    return obs, actions, logprobs, logits, rewards, dones, values


def main(args: Args):
    validate_args(args)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    run_dir = os.path.join("runs", args.run_name or default_run_name(args))
    checkpoint, run_dir = find_checkpoint(args, run_dir)
    device = seed_everything(args)  # TRY NOT TO MODIFY: seeding

    # env setup
    envs = make_envs(args)
    num_actions = envs.single_action_space.n
    agent = Agent(num_actions, args).to(device)
    optimizer = make_optimizer(agent, args, device)
    storage = rollout_storage(args, envs.single_observation_space.shape, num_actions, device)
    obs, actions, logprobs, logits, rewards, dones, values = storage

    # TRY NOT TO MODIFY: start the game
    global_step, start_iteration = 0, 1
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs).to(device)
    next_done = torch.zeros(args.num_envs).to(device)
    # own stream: diagnostics never shift the training RNG
    diag_generator = torch.Generator().manual_seed(args.seed)
    b_inds = np.arange(args.batch_size)
    live = {
        "agent": agent,
        "optimizer": optimizer,
        "envs": envs,
        "diag_generator": diag_generator,
        "b_inds": b_inds,
    }
    if checkpoint is not None:
        restored = restore_checkpoint(checkpoint, live, device)
        global_step, start_iteration, next_obs, next_done, _ = restored
    # only now, after every check has passed, is anything written
    logger = RunLogger(run_dir, args, device, checkpoint)
    stop = StopRequest()  # Ctrl-C, SIGTERM, SIGUSR1: finish the update, save a checkpoint, exit
    status, exit_code = "completed", 0
    try:
        save_tasks(run_dir, envs.task_set)  # the training tasks (the probe holds none out)
        for iteration in range(start_iteration, args.num_iterations + 1):
            # 1. Interaction: D_k is collected in eval mode (paper Sec. 3.2), or with --mode
            # bn-train in train mode (a rival: OpenAI's CoinRun)
            agent.train(args.mode == "bn-train")  # MDR
            finished = {"r": [], "normalized_r": [], "success": [], "acting_entropy": []}
            for step in range(0, args.num_steps):
                global_step += args.num_envs
                obs[step] = next_obs
                dones[step] = next_done
                with torch.no_grad():
                    policy, value = agent.get_policy_and_value(next_obs)
                    action = policy.sample()
                    values[step] = value.flatten()
                    actions[step] = action
                    logprobs[step] = policy.log_prob(action)
                    # the behaviour policy: delta_pi_minus's eval-mode side (eq. 6) when D_k is
                    # collected in eval mode
                    logits[step] = policy.logits
                    finished["acting_entropy"].append(policy.entropy().mean())
                next_obs_np, reward, terminations, truncations, infos = envs.step(
                    action.cpu().numpy()
                )
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32).to(device)
                next_obs = torch.as_tensor(next_obs_np).to(device)
                next_done = np.logical_or(terminations, truncations)
                next_done = torch.as_tensor(next_done, dtype=torch.float32).to(device)
                for key in ("r", "normalized_r", "success"):
                    ended = infos["episode"][key][infos["_episode"]] if "episode" in infos else []
                    finished[key].extend(ended)

            # 2. Advantages and value targets (GAE) of the values estimated during collection
            with torch.no_grad():
                next_value = agent.get_value(next_obs).reshape(1, -1)
                advantages, returns = compute_gae(
                    rewards, values, dones, next_value, next_done, args.gamma, args.gae_lambda
                )
            batch = {
                "obs": obs.reshape((-1,) + obs.shape[2:]),
                "logprobs": logprobs.reshape(-1),
                "actions": actions.reshape(-1),
                "advantages": advantages.reshape(-1),
                "returns": returns.reshape(-1),
                "values": values.reshape(-1),
            }
            diag = (agent, batch["obs"], args.minibatch_size, args.diag_minibatches, diag_generator)
            b_eval_logits = None if args.mode == "bn-train" else logits.view(-1, num_actions)
            delta_pi_minus = policy_mismatch(*diag, b_eval_logits)

            # 3. MDR update (Algorithm 1, one round): alpha1 epochs in train mode, then alpha2
            # epochs in eval mode
            phase_stats = {"standard": [], "rectify": []}
            # the pre-update policy, frozen
            theta_k = copy.deepcopy(agent) if args.mode == "bn-oldtrain" else None
            for epoch in range(args.update_epochs):
                agent.train(epoch < args.alpha1)  # MDR: train mode, then eval mode
                phase = "standard" if epoch < args.alpha1 else "rectify"  # MDR
                np.random.shuffle(b_inds)
                epoch_inds = torch.as_tensor(b_inds, device=device)  # one host-to-device copy
                for start in range(0, args.batch_size, args.minibatch_size):
                    end = start + args.minibatch_size
                    mb_inds = epoch_inds[start:end]
                    mb = {key: value[mb_inds] for key, value in batch.items()}
                    measure = phase == "standard" and args.diag_ratio_every > 0
                    measure = measure and len(phase_stats[phase]) % args.diag_ratio_every == 0
                    eval_ratio = eval_mode_ratio(agent, mb) if measure else None
                    if theta_k is not None:  # bn-oldtrain
                        mb["logprobs"] = train_mode_logprobs(theta_k, mb)
                    stats = ppo_update(agent, optimizer, mb, args, eval_ratio)
                    phase_stats[phase].append(stats)
            if args.mode == "bn-recal":
                # precise BN: the running statistics of the new weights on D_k
                recalibrate_batchnorm(agent, batch["obs"], args.minibatch_size)
            delta_pi_plus = policy_mismatch(*diag)

            # 4. Logging: TensorBoard (and wandb through it) and one metrics.csv row per update
            logger.log_update(
                iteration, global_step, finished, phase_stats, batch, delta_pi_minus, delta_pi_plus
            )
            due = args.resume == "auto" and iteration % args.checkpoint_interval == 0
            if stop.requested or due:
                rollout_end = (next_obs, next_done)
                save_checkpoint(run_dir, live, args, iteration, global_step, rollout_end, logger)
            if stop.requested:
                status, exit_code = "stopped", 128 + stop.requested
                break
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        status, exit_code = "non-finite loss", 1
    except KeyboardInterrupt:
        print(
            "interrupted (a second Ctrl-C); metrics.csv and summary.json keep the finished updates",
            file=sys.stderr,
        )
        status, exit_code = "interrupted", 130
    finally:
        stop.restore()
        envs.close()
        summary = logger.close(status, exit_code)
    print(
        f"{summary['status']}: {run_dir}, best {summary['best_reward']}, final "
        f"{summary['final_reward']}, peak delta_pi_minus {summary['peak_delta_pi_minus']} "
        f"(iteration {summary['peak_delta_pi_minus_iteration']}), "
        f"{readable_time(summary['wall_time_s'])} (summary.json)"
    )
    return exit_code


# ==================================================================================================
# Infrastructure: checkpoints, logging, validation. Not the method: nothing below changes what is
# learned.
# ==================================================================================================


def mean_stats(stats_list):
    """Average a list of stat dicts key by key (keys measured on only some minibatches average
    over those); one host sync."""
    keys = sorted({key for stats in stats_list for key in stats})
    means = torch.stack(
        [torch.stack([s[key] for s in stats_list if key in s]).mean() for key in keys]
    )
    return dict(zip(keys, means.tolist()))


class ConfigError(Exception):
    """Bad input: printed as one line, no traceback."""


class RunFinished(Exception):
    """The run folder holds this run, finished: nothing to do (cli() prints the message and exits
    0, so that a repeated or requeued command is a no-op)."""


def check_number(args: Args, name: str, low, high=math.inf, low_open=False) -> None:
    """A one-line ConfigError unless args.<name> is finite and in [low, high] ((low, high] with
    low_open): NaN and inf fail, and an upper limit catches a typo before it runs for hours."""
    value = getattr(args, name)
    above = low < value if low_open else low <= value
    if not (math.isfinite(value) and above and value <= high):
        shown = [f"{bound:g}" if isinstance(bound, float) else str(bound) for bound in (low, high)]
        interval = (
            f"{'(' if low_open else '['}{shown[0]}, {shown[1]}{')' if high == math.inf else ']'}"
        )
        raise ConfigError(
            f"--{name.replace('_', '-')} {value}: must be a finite number in {interval}"
        )


def check_ppo_numbers(args: Args, max_seed: int = 2**32 - 1) -> None:
    """The PPO flags of every script, each a one-line error outside its range: seeds as numpy takes
    them, a step size of at most 1, at most 100 epochs and 4 threads a core (beyond them a typo,
    not a setting: 100000 threads exhaust the memory)."""
    check_number(args, "seed", 0, max_seed)
    check_number(args, "learning_rate", 0.0, 1.0, low_open=True)
    for name in ("gamma", "gae_lambda"):
        check_number(args, name, 0.0, 1.0, low_open=True)
    for name in ("clip_coef", "max_grad_norm"):
        check_number(args, name, 0.0, low_open=True)
    for name in ("ent_coef", "vf_coef", "weight_decay"):
        check_number(args, name, 0.0)
    check_number(args, "update_epochs", 1, 100)
    check_number(args, "torch_threads", 0, 4 * (os.cpu_count() or 1))


def check_run_flags(args: Args) -> None:
    """--run-name stays inside runs/ (a relative name that does not climb out of it), and
    --overwrite (start afresh) does not meet --resume (continue)."""
    inside = os.path.normpath(os.path.join("runs", args.run_name or "default"))
    if os.path.isabs(args.run_name or "") or not inside.startswith("runs" + os.sep):
        raise ConfigError(
            f"--run-name {args.run_name!r}: must name a folder inside runs/ (a relative name "
            "whose '..' do not leave it)"
        )
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite starts afresh and --resume continues: give one of them")


def check_slide_settings(args: Args) -> None:
    """The slide flags (docs/slides.md) in their ranges, one-line errors before any file is
    opened."""
    if args.slide_mpp is not None:
        check_number(args, "slide_mpp", 0.0, low_open=True)
    if args.slide_level is not None:
        check_number(args, "slide_level", 0)
    check_number(args, "regions_per_slide", 1)
    check_number(args, "min_tissue", 0.0, 1.0)


def provenance() -> dict:
    """Where a run came from: the git commit of this script's checkout and whether tracked files
    differed from it (None outside git), torch's version and the CPU: its model name, family, model
    and stepping, and the SIMD level of torch's CPU kernels. analysis/collapse_stats.py pairs runs
    only within one."""
    here = os.path.dirname(os.path.abspath(__file__))
    commit = dirty = None
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        status = ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"]
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = bool(
                subprocess.run(status, capture_output=True, text=True, timeout=30).stdout.strip()
            )
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        pass
    # The model name alone ("AMD EPYC") names no generation, and generations run other kernels
    # (AVX2, AVX-512): there the same seed gives other numbers from the first update on.
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            first_processor = f.read().split("\n\n")[0].splitlines()
        fields = {}
        for line in first_processor:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        generation = [
            f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields
        ]
        cpu = fields.get("model name", cpu) + (f" ({', '.join(generation)})" if generation else "")
    cpu += f", {torch.backends.cpu.get_cpu_capability()} kernels"
    return {"commit": commit, "dirty": dirty, "torch": str(torch.__version__), "cpu": cpu}


# fields that may differ between a run and its --resume (everything else defines the computation)
RESUMABLE_FIELDS = (
    "resume",
    "total_timesteps",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "wandb_group",
    "run_name",
)
RESUMABLE_FIELDS += ("checkpoint_interval", "cuda", "num_iterations", "torch_threads")
RESUMABLE_FIELDS += ("overwrite",)


def validate_args(args: Args) -> None:
    """Reject impossible settings before anything is created; sets args.alpha1/alpha2 for --mode:
    bn and eval train all E = --update-epochs epochs in train mode, the MDR modes split them
    (default MDR(2,1) of 3)."""
    if args.mode not in MODES:
        raise ConfigError(f"unknown --mode {args.mode!r}; valid modes: {', '.join(MODES)}")
    for name in (
        "update_epochs",
        "num_envs",
        "num_steps",
        "minibatch_size",
        "num_tasks",
        "hidden_size",
        "smooth_window",
        "checkpoint_interval",
    ):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    check_ppo_numbers(args)
    check_run_flags(args)
    check_slide_settings(args)
    epochs = args.update_epochs
    if args.mode not in MDR_MODES:
        if args.alpha1 is not None or args.alpha2 is not None:
            raise ConfigError(
                f"--alpha1/--alpha2 apply to the MDR modes only (--mode {args.mode} trains all E "
                "in train mode)"
            )
        args.alpha1, args.alpha2 = epochs, 0
    else:
        alpha1, alpha2 = split_epochs(args)
        if alpha1 < 0 or alpha2 < 1 or alpha1 + alpha2 != epochs:
            raise ConfigError(
                f"--alpha1 {alpha1} --alpha2 {alpha2}: MDR needs alpha1 >= 0, alpha2 >= 1 and "
                f"alpha1 + alpha2 = --update-epochs {epochs} (MDR splits the epochs, it adds none)"
            )
        args.alpha1, args.alpha2 = alpha1, alpha2
    check_minibatches(args)
    check_dropout_p(args)
    if not 0.0 < args.bn_momentum <= 1.0:
        raise ConfigError(f"--bn-momentum {args.bn_momentum}: need 0 < --bn-momentum <= 1")
    if args.diag_minibatches < -1 or args.diag_ratio_every < 0:
        raise ConfigError("need --diag-minibatches >= -1 (-1 = off) and --diag-ratio-every >= 0")


def check_dropout_p(args: Args) -> None:
    """--dropout-p belongs to the dropout modes (default DEFAULT_DROPOUT_P), in [0, 1); elsewhere
    it is an error (it would change nothing)."""
    if args.mode not in DROPOUT_MODES:
        if args.dropout_p is not None:
            raise ConfigError(
                f"--dropout-p applies to the dropout modes only ({', '.join(DROPOUT_MODES)}); "
                f"--mode {args.mode} has no dropout: drop the flag or change the mode"
            )
        return
    if args.dropout_p is None:
        args.dropout_p = DEFAULT_DROPOUT_P
    if not 0.0 <= args.dropout_p < 1.0:  # NaN fails too
        raise ConfigError(
            f"--dropout-p {args.dropout_p}: must be in [0, 1) (the probability that a unit is "
            "zeroed)"
        )


def check_minibatches(args: Args) -> None:
    """One minibatch rule for all scripts: m <= |D_k|; the last minibatch of an epoch may be
    smaller, never 1 sample."""
    n, m = args.num_envs * args.num_steps, args.minibatch_size
    if m > n or args.total_timesteps < n:
        raise ConfigError(
            f"--minibatch-size must be <= and --total-timesteps >= num_envs x num_steps = {n}"
        )
    # a 1-sample minibatch's normalized advantage is NaN
    if args.norm_adv and (m == 1 or n % m == 1):
        raise ConfigError(
            f"--minibatch-size {m} leaves a minibatch of one sample in a rollout of {n}; else "
            "--no-norm-adv"
        )


def default_run_name(args: Args) -> str:
    """The run's folder, a function of what defines it (so a rerun of the same command finds the
    same folder)."""
    split = args.alpha2 and (args.alpha1, args.alpha2) != (2, 1)  # an MDR split other than (2,1)
    alphas = f"__mdr{args.alpha1}-{args.alpha2}" if split else ""
    unused = ("eval", "gn", "ln", "none", *DROPOUT_MODES)  # no BatchNorm whose statistics move
    momentum = "" if args.mode in unused else f"__bnm{args.bn_momentum:g}"
    dropout = f"__p{args.dropout_p:g}" if args.mode in DROPOUT_MODES else ""
    loss = f"clip{args.clip_coef:g}__ent{args.ent_coef:g}"
    views = args.view_batching
    mode = f"{args.mode}{alphas}{dropout}"
    return f"{args.exp_name}__{mode}__{loss}{momentum}__{views}__s{args.seed}"


class StopRequest:
    """Ctrl-C, SIGTERM, SIGUSR1 (SLURM's warnings): finish the iteration, checkpoint, exit
    128 + signal; 2nd Ctrl-C: quit."""

    def __init__(self):
        self.requested = 0
        self.previous = {
            s: signal.signal(s, self._request)
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
        }

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this iteration, then saving a checkpoint "
            "(Ctrl-C again: quit now)"
        )

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# summary.json statuses of a run that failed (a retry moves its folder aside and starts afresh)
FAILED = ("failed", "non-finite loss")


def read_json(path: str) -> dict:
    """The JSON object in `path`; {} if there is none or it cannot be read."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def different_flags(saved: dict, args: Args) -> list:
    """The flags (--name) that `args` sets to other values than a run's saved arguments, other than
    RESUMABLE_FIELDS: a field added after the run was saved counts as its default, and a run from
    before --update-epochs trained alpha1 + alpha2 epochs per round."""
    filled = {**asdict(Args()), **saved}
    if "update_epochs" not in saved and "alpha1" in saved:
        filled["update_epochs"] = filled["alpha1"] + filled["alpha2"]
    return [
        "--" + name.replace("_", "-")
        for name, value in asdict(args).items()
        if name not in RESUMABLE_FIELDS and filled[name] != value
    ]


def next_free_number(folder: str, pattern: str) -> int:
    """The first N >= 1 for which folder/pattern.format(N) does not exist (so nothing is
    overwritten)."""
    number = 1
    while os.path.exists(os.path.join(folder, pattern.format(number))):
        number += 1
    return number


def readable_time(seconds: float) -> str:
    """Seconds as a person reads them: 42 s, 17 min, 3.5 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def check_writable(run_dir: str) -> None:
    """A one-line error before anything is built if the run folder cannot be made or written there
    (a read-only disk or folder)."""
    existing = run_dir
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing or ".", os.W_OK | os.X_OK):
        raise ConfigError(
            f"{existing or '.'} is not writable (a read-only disk or folder?), so {run_dir} cannot "
            "be written: run from a folder where runs/ can be"
        )


def move_aside(run_dir: str, kind: str, why: str) -> None:
    """Rename the run folder to NAME.<kind>-N (the first N free), never delete it; one line says
    so."""
    folder, name = os.path.split(run_dir)
    aside = f"{run_dir}.{kind}-{next_free_number(folder, name + '.' + kind + '-{}')}"
    os.rename(run_dir, aside)
    print(f"{run_dir} ({why}) moved aside to {aside}; this run starts afresh")


def claim_run_folder(args: Args, run_dir: str) -> bool:
    """What the run folder holds decides, before anything is built (the README's table, "Run
    folders"): True: --resume auto continues its checkpoint; False: the run starts afresh (the
    folder is absent or empty, or its earlier run was moved aside: --overwrite, or a run that
    failed). Raises RunFinished if it holds this run, finished, and ConfigError if it holds a run
    that this command must not touch. Nothing is ever deleted."""
    files = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if not files:
        return False
    if args.overwrite:
        move_aside(run_dir, "old", "--overwrite")
        return False
    summary = read_json(os.path.join(run_dir, "summary.json"))
    status, step = summary.get("status", "unfinished"), summary.get("global_step", 0)
    saved = summary.get("args") or read_json(os.path.join(run_dir, "args.json"))
    changed = different_flags(saved, args) if saved else []
    checkpoint = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    resumable = checkpoint and args.resume == "auto" and not changed
    if status == "completed" and step >= args.num_iterations * args.batch_size and not changed:
        raise RunFinished(
            f"{run_dir} holds this run, finished at global_step {step} (its summary.json): "
            "nothing to do"
        )
    if status in FAILED and not resumable:
        move_aside(run_dir, "failed", f"its run failed: {status}")
        return False
    if resumable:
        return True
    other = "--run-name NAME starts another run, --overwrite moves this one aside"
    if changed:
        raise ConfigError(f"{run_dir} holds a run with different {', '.join(changed)}: {other}")
    if checkpoint:
        raise ConfigError(
            f"{run_dir} holds a run ({status}) with a checkpoint: --resume auto continues it, "
            f"{other}"
        )
    if status == "completed":
        raise ConfigError(
            f"{run_dir} holds this run finished at global_step {step} without a checkpoint, so it "
            f"cannot go on to --total-timesteps {args.total_timesteps}: {other}"
        )
    listed = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    raise ConfigError(
        f"{run_dir} holds an unfinished run without a checkpoint ({listed}; no summary.json of a "
        f"finished run): {other}"
    )


def find_checkpoint(args: Args, run_dir: str):
    """(checkpoint or None, run folder) for --resume PATH, or the run folder as claim_run_folder
    finds it (--resume auto continues its checkpoint); never overwrites a run."""
    check_writable(run_dir)
    if args.resume in (None, "auto") and not claim_run_folder(args, run_dir):
        return None, run_dir
    path = os.path.join(run_dir, "checkpoint.pt") if args.resume == "auto" else args.resume
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        changed = different_flags(checkpoint["args"], args)
    except Exception as e:  # missing, truncated, not this script's
        raise ConfigError(
            f"--resume {path}: not a checkpoint of this script ({type(e).__name__})"
        ) from None
    if changed:
        raise ConfigError(f"--resume {path}: the run used different {', '.join(changed)}")
    return checkpoint, os.path.join("runs", checkpoint["run_name"])


def save_checkpoint(run_dir, live, args: Args, iteration, global_step, rollout, logger):
    """All a bit-for-bit continuation needs (`live`: agent, optimizer, envs, diag_generator,
    b_inds); atomic write."""
    envs_state = {
        k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
        for k, v in live["envs"].get_state().items()
    }
    state = {
        "agent": live["agent"].state_dict(),
        "optimizer": live["optimizer"].state_dict(),
        "args": asdict(args),
    }
    state.update(
        global_step=global_step,
        iteration=iteration,
        run_name=os.path.relpath(run_dir, "runs"),
        rows=logger.rows,
    )
    state.update(
        b_inds=torch.from_numpy(live["b_inds"]),
        wandb_id=logger.wandb_id,
        provenance=logger.provenance,
    )
    # numpy's key array is saved as a tensor: weights_only-loadable
    name, keys, *rest = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = dict(
        python=random.getstate(),
        numpy=[name, torch.from_numpy(keys.astype(np.int64)), *rest],
        cuda=cuda,
    )
    state["rng"] = dict(rng, torch=torch.get_rng_state(), diag=live["diag_generator"].get_state())
    state["env"] = {"envs": envs_state, "next_obs": rollout[0].cpu(), "next_done": rollout[1].cpu()}
    path = os.path.join(run_dir, "checkpoint.pt")
    try:
        with open(path + ".tmp", "wb") as f:  # a read-only folder: Python's OSError, one line
            torch.save(state, f)
    except RuntimeError as e:  # torch's writer on a full disk: an OSError naming the file too
        raise OSError(errno.EIO, str(e).splitlines()[0], path + ".tmp") from None
    os.replace(path + ".tmp", path)


def restore_checkpoint(checkpoint, live, device):
    """Put a checkpoint's state back into `live`; returns (global_step, next iteration, next_obs,
    next_done, wandb id)."""
    live["agent"].load_state_dict(checkpoint["agent"])
    live["optimizer"].load_state_dict(checkpoint["optimizer"])
    # the probe shuffles one index array across updates
    live["b_inds"][:] = checkpoint["b_inds"].numpy()
    env = checkpoint["env"]
    live["envs"].set_state(
        {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in env["envs"].items()}
    )
    rng = checkpoint["rng"]
    random.setstate(
        tuple(item if not isinstance(item, list) else tuple(item) for item in rng["python"])
    )
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    live["diag_generator"].set_state(rng["diag"])
    print(
        f"resumed {checkpoint['run_name']} at iteration {checkpoint['iteration']}, global_step "
        f"{checkpoint['global_step']}"
    )
    next_obs, next_done = env["next_obs"].to(device), env["next_done"].to(device)
    return (
        checkpoint["global_step"],
        checkpoint["iteration"] + 1,
        next_obs,
        next_done,
        checkpoint.get("wandb_id"),
    )


def tensorboard_tag(column: str) -> str:
    """The TensorBoard tag of a metrics.csv column, in CleanRL's groups (charts/, losses/,
    losses/<phase>/, mdr/)."""
    name, _, phase = column.rpartition("_")
    if phase in ("standard", "rectify"):
        return f"losses/{phase}/{name}"
    if column in (
        "entropy",
        "approx_kl",
        "old_approx_kl",
        "clipfrac",
        "policy_loss",
        "value_loss",
        "explained_variance",
    ):
        return f"losses/{column}"
    if column.startswith(("ratio", "trust")):
        return f"mdr/{column}"
    return "charts/SPS" if column == "sps" else f"charts/{column}"


class RunLogger:
    """runs/<run>/: TensorBoard (wandb with --track), metrics.csv (a flushed row per update),
    summary.json at the end."""

    def __init__(self, run_dir: str, args: Args, device, checkpoint: Optional[dict]):
        self.run_dir = run_dir
        self.args = args
        self.rows = list(checkpoint["rows"]) if checkpoint else []
        rewards = [
            row["normalized_reward"] for row in self.rows if math.isfinite(row["normalized_reward"])
        ]
        self.recent_rewards = deque(rewards, maxlen=args.smooth_window)
        self.start_time = time.time() - (self.rows[-1]["wall_time"] if self.rows else 0.0)
        self.process_start, self.first_update = time.time(), True  # for the estimate of the rest
        self.wandb_id = checkpoint.get("wandb_id") if checkpoint else None
        # where each stretch of the run was computed: one entry per process (a resumed run adds one)
        self.provenance = list(checkpoint.get("provenance", [])) if checkpoint else []
        self.provenance.append({"from_iteration": len(self.rows) + 1, **provenance()})
        if args.track:
            import wandb

            run_name = os.path.basename(run_dir)
            tags = [
                f"mode={args.mode}",
                f"clip={args.clip_coef:g}",
                f"ent={args.ent_coef:g}",
                f"seed={args.seed}",
            ]
            tags += [f"bn_momentum={args.bn_momentum:g}", f"views={args.view_batching}"]
            group = args.wandb_group or run_name.rsplit("__s", 1)[0]  # the seeds of one config
            wandb_run = wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                group=group,
                sync_tensorboard=True,
                config=vars(args),
                name=run_name,
                tags=tags,
                id=self.wandb_id,
                resume="allow",
                save_code=True,
            )
            self.wandb_id = wandb_run.id
        self.writer = SummaryWriter(run_dir)
        self.writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()),
        )
        self.csv_file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
        self.csv_writer = csv.DictWriter(self.csv_file, fieldnames=CSV_COLUMNS)
        self.csv_writer.writeheader()
        # a resumed run: the updates its checkpoint holds (later ones were lost with the process)
        for row in self.rows:
            self.write_row(row)
        mdr = f"MDR({args.alpha1},{args.alpha2})"
        start = f"continues from update {len(self.rows)}" if self.rows else "starts"
        print(
            f"run {run_dir}: --mode {args.mode} = {mdr}, |D_k| {args.batch_size}, {start} on "
            f"{device}: {args.num_iterations} updates, a line each",
            flush=True,
        )

    def log_update(
        self, iteration, global_step, finished, phase_stats, batch, delta_pi_minus, delta_pi_plus
    ) -> dict:
        """One update's row: metrics.csv, TensorBoard and a printed line. Raises FloatingPointError
        on a NaN/inf loss."""
        all_stats = mean_stats(phase_stats["standard"] + phase_stats["rectify"])
        if not np.isfinite(all_stats["loss"]):
            raise FloatingPointError(
                f"non-finite loss at iteration {iteration} (global_step {global_step}); the run "
                "stops here, its metrics.csv and summary.json are kept; try a lower "
                "--learning-rate or --max-grad-norm"
            )
        phases = {phase: mean_stats(stats) if stats else {} for phase, stats in phase_stats.items()}
        nan = float("nan")
        off = torch.tensor(nan)  # --diag-minibatches -1
        acting_entropy = torch.stack(finished["acting_entropy"]).mean()
        deltas = torch.stack(
            [off if d is None else d for d in (delta_pi_minus, delta_pi_plus)] + [acting_entropy]
        )
        delta_pi_minus, delta_pi_plus, acting_entropy = deltas.tolist()  # one host sync
        normalized = 100.0 * float(np.mean(finished["normalized_r"])) if finished["r"] else nan
        if math.isfinite(normalized):
            self.recent_rewards.append(normalized)
        y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
        var_y = np.var(y_true)
        elapsed = time.time() - self.start_time

        def mean(values):  # nan for no values, not numpy's warning
            return float(np.mean(values)) if len(values) else nan

        row = {"iteration": iteration, "global_step": global_step, "episodes": len(finished["r"])}
        row.update(
            {
                key: getattr(self.args, key)
                for key in ("mode", "clip_coef", "ent_coef", "seed", "alpha1", "alpha2")
            }
        )
        row.update(
            episodic_return=mean(finished["r"]),
            normalized_reward=normalized,
            success_rate=mean(finished["success"]),
        )
        row.update(smoothed_reward=mean(self.recent_rewards), acting_entropy=acting_entropy)
        row.update(delta_pi_minus=delta_pi_minus, delta_pi_plus=delta_pi_plus)
        row.update(sps=int(global_step / elapsed), wall_time=elapsed)
        row["explained_variance"] = (
            nan if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
        )
        for key in ("ratio_gap", "trust_region_violation", "trust_region_violation_signed"):
            row[key] = phases["standard"].get(key, nan)
        for key in (
            "entropy",
            "approx_kl",
            "old_approx_kl",
            "clipfrac",
            "policy_loss",
            "value_loss",
        ):
            row[key] = all_stats[key]
        for phase, key in ((phase, key) for phase in phases for key in ("approx_kl", "clipfrac")):
            row[f"{key}_{phase}"] = phases[phase].get(key, nan)
        self.rows.append(row)
        self.write_row(row)
        self.log_scalars(
            {tensorboard_tag(column): row[column] for column in TENSORBOARD_COLUMNS}, global_step
        )
        print(
            f"iteration={iteration}/{self.args.num_iterations}, global_step={global_step}, "
            f"episodic_return={row['episodic_return']:.3f}, "
            f"normalized_reward={row['normalized_reward']:.1f}%, "
            f"smoothed={row['smoothed_reward']:.1f}%, "
            f"delta_pi_minus={row['delta_pi_minus']:.2e}, SPS={row['sps']}",
            flush=True,  # the probe's logs are meant to be watched (tail -f)
        )
        left = self.args.num_iterations - iteration
        if self.first_update and left:
            took = time.time() - self.process_start
            print(
                f"update {iteration} took {readable_time(took)}: the {left} left take about "
                f"{readable_time(took * left)} at this pace",
                flush=True,
            )
        self.first_update = False
        return row

    def write_row(self, row: dict):
        self.csv_writer.writerow(
            {
                key: f"{value:.6g}" if isinstance(value, float) else value
                for key, value in row.items()
            }
        )
        self.csv_file.flush()

    def log_scalars(self, scalars: dict, global_step: int):
        for tag, value in scalars.items():
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, global_step)

    def close(self, status: str, exit_code: int) -> dict:
        """Close the CSV, TensorBoard and wandb; write and return summary.json (best and final
        smoothed reward, peak Delta pi minus; collapses are decided by analysis/collapse_stats.py
        from metrics.csv). Its status is how the run ended, which the next --resume auto reads: an
        exception still on its way out of main(), whose `finally` calls this, makes it failed."""
        crash = sys.exc_info()[1]
        status = "failed" if crash is not None else status
        self.csv_file.close()
        self.writer.close()
        if self.args.track:
            import wandb

            wandb.finish(exit_code=1 if crash else exit_code)
        rows = self.rows
        deltas = [
            (row["delta_pi_minus"], row["iteration"])
            for row in rows
            if math.isfinite(row["delta_pi_minus"])
        ]
        smoothed = [
            (row["smoothed_reward"], row["iteration"])
            for row in rows
            if math.isfinite(row["smoothed_reward"])
        ]
        summary = {
            "status": status,
            **{key: getattr(self.args, key) for key in ("mode", "clip_coef", "ent_coef", "seed")},
        }
        summary["error"] = f"{type(crash).__name__}: {crash}" if crash else None
        summary.update(iterations=len(rows), global_step=rows[-1]["global_step"] if rows else 0)
        summary.update(
            wall_time_s=rows[-1]["wall_time"] if rows else 0.0,
            final_reward=smoothed[-1][0] if smoothed else None,
        )
        best, peak = max(smoothed, default=(None, None)), max(deltas, default=(None, None))
        summary.update(
            best_reward=best[0], best_reward_iteration=best[1], peak_delta_pi_minus=peak[0]
        )
        summary.update(peak_delta_pi_minus_iteration=peak[1], args=asdict(self.args))
        summary.update(provenance=self.provenance[-1], provenance_segments=self.provenance)
        summary["reward_unit"] = (
            "percent of the optimal return, moving average over --smooth-window updates"
        )
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary


def save_tasks(run_dir: str, *task_sets) -> None:
    """tasks.json in the run folder: each task's image file (a slide's level, region at level 0
    and MPP) and target box, so that every result can be traced back to the tissue (envs/)."""
    try:
        write_tasks_json(os.path.join(run_dir, "tasks.json"), *task_sets)
    except PatchLocConfigError as e:
        raise ConfigError(str(e)) from None


def cli(argv=None) -> int:
    """The command line (`argv`: its words; None: sys.argv): bad input is one line on stderr and
    exit status 2, a write that fails (a full or read-only disk) one line and 1, and a run that is
    already finished exits 0 at once."""
    args = tyro.cli(Args, args=argv)
    try:
        return main(args)
    except RunFinished as e:
        print(e)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
