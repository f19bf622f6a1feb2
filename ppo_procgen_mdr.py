# PPO with Mode-Dependent Rectification (MDR) on Procgen, CleanRL-style, one file.
# Paper: Mohamad, Ponzio, Descombes, "Mode-Dependent Rectification for Stable PPO Training"
# (arXiv 2602.05619). MDR in your own PPO, as a diff against CleanRL's ppo_procgen.py:
# docs/mdr_in_your_ppo.md. `grep -n "[#] MDR" ppo_procgen_mdr.py` lists the method's lines; nothing
# below the "Infrastructure" banner changes what is learned.
# Run:   python ppo_procgen_mdr.py --env-id bigfish --norm bn --alpha1 2 --alpha2 1 --cuda
import contextlib
import errno
import io
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal, Optional

# Passive OpenMP waiting (spinning threads steal cores): up to 2.6x the SPS on 2 cores
# (docs/benchmarks.md); a value you set yourself wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import ResNet18_Weights, resnet18
from tqdm import tqdm

# procgen imports the unmaintained `gym`, which prints a deprecation banner on import: noise, not
# our users' problem.
with (
    warnings.catch_warnings(),
    contextlib.redirect_stdout(io.StringIO()),
    contextlib.redirect_stderr(io.StringIO()),
):
    warnings.simplefilter("ignore")
    from procgen import ProcgenEnv
    from procgen.env import ENV_NAMES as PROCGEN_GAMES


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the Procgen level sampler)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available (falls back to CPU with a notice)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "ppo-mdr"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    wandb_group: Optional[str] = None
    """the wandb group, e.g. one per (game, norm, alpha) to aggregate seeds"""
    run_name: Optional[str] = None
    """folder under runs/ (default: game, norm, BN momentum, alphas and seed: a rerun of a
    command finds its folder)"""
    save_model: bool = False
    """if toggled, write a checkpoint to `runs/{run_name}/checkpoint.pt` every
    `checkpoint_interval` and at the end"""
    checkpoint_interval: int = 50
    """iterations between checkpoints (with --save-model or --resume auto)"""
    resume: Optional[str] = None
    """checkpoint.pt to continue (same args; --total-timesteps may grow), or `auto` (checkpoints
    on): continue the run folder's checkpoint, start afresh in an empty folder, exit 0 if the run
    is finished (README: "Run folders")"""
    overwrite: bool = False
    """if toggled, a run folder that holds another run is moved aside to NAME.old-N (never
    deleted) and the run starts afresh"""

    # Speed (none of these changes what is computed, except --amp; docs/benchmarks.md has the
    # measurements)
    channels_last: bool = True
    """CUDA: keep the conv weights in channels_last memory format, like the NHWC observations (a
    no-op on CPU)"""
    amp: bool = False
    """run the backbone under bfloat16 autocast (CUDA; CPUs with bf16 units, e.g. AVX512-BF16);
    heads and losses in float32"""
    compile: bool = False
    """torch.compile the backbone (one compile per mode and batch shape, ~1 min on CPU; on CPU
    measured no faster)"""
    torch_threads: int = 0
    """torch's intra-op CPU threads (0 = torch's default, one per core)"""

    # Algorithm specific arguments (paper Table 2, Procgen column)
    env_id: str = "bigfish"
    """the id of the Procgen game"""
    total_timesteps: int = 25_000_000
    """total timesteps of the experiments"""
    learning_rate: float = 5e-4
    """the learning rate of the optimizer"""
    weight_decay: float = 1e-4
    """Adam's weight decay (L2, as torch.optim.Adam applies it)"""
    num_envs: int = 64
    """the number of parallel game environments"""
    num_steps: int = 256
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """toggle learning rate annealing (linear to 0, as in CleanRL's ppo.py, not its
    ppo_procgen.py; the paper is silent)"""
    gamma: float = 0.999
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    minibatch_size: int = 2048
    """the minibatch size m (when it does not divide |D_k|, the last minibatch of an epoch is
    smaller)"""
    update_epochs: int = 3
    """the K epochs to update the policy (per round: alpha1 in train mode, then alpha2 in eval
    mode)"""
    norm_adv: bool = True
    """toggles advantages normalization (per minibatch)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient epsilon"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function, as per the paper"""
    ent_coef: float = 1e-4
    """coefficient of the entropy"""
    vf_coef: float = 1.0
    """coefficient of the value function"""
    max_grad_norm: float = 1.0
    """the maximum norm for the gradient clipping"""

    # Mode-Dependent Rectification (paper Sec. 3.4, Algorithm 1)
    alpha1: Optional[int] = None  # MDR
    """epochs per round in train mode (standard phase), the first of the E = --update-epochs;
    default E - alpha2"""
    alpha2: Optional[int] = None  # MDR
    """epochs per round in eval mode (rectification phase), the last of the E; 0 = plain PPO;
    default E - alpha1 if --alpha1 is given, else E // 3 (at least 1): MDR(2,1) of 3"""
    collect_mode: Literal["eval", "train"] = "eval"
    """mode of the policy that collects D_k: eval (the paper's) or train (batch statistics of the
    env batch, as CoinRun)"""
    bn_recalibrate: bool = False
    """after each update, reset BatchNorm's running statistics to their average over D_k under
    the new weights (precise BN)"""
    mdr_rounds: int = 1  # MDR
    """rounds R per rollout; values and advantages are recomputed (eval mode) before rounds 2..R"""

    # Network: shallow ResNet-18 (paper Table 1) and its norm layer
    norm: Literal["bn", "eval", "brn", "ln", "gn", "none", "dropout"] = "bn"
    """backbone norm layer: BatchNorm, BatchNorm frozen in eval mode, Batch Renorm, LayerNorm,
    GroupNorm, none, dropout"""
    bn_momentum: float = 0.1
    """running-statistics momentum of BatchNorm and Batch Renorm (the paper tries 0.1 and 0.01)"""
    dropout_p: float = 0.1
    """dropout probability of --norm dropout (a Dropout in place of each BatchNorm)"""
    pretrained: bool = True
    """initialise the backbone from ImageNet (torchvision weights; offline:
    $TORCH_HOME/hub/checkpoints)"""

    # Procgen levels and held-out evaluation
    num_levels: int = 500
    """number of training levels (levels 0 .. num_levels-1)"""
    distribution_mode: Literal["easy", "hard"] = "easy"
    """Procgen difficulty"""
    num_test_levels: int = 500
    """number of held-out levels (num_levels .. num_levels+num_test_levels-1, never trained on)"""
    num_eval_envs: int = 64
    """held-out episodes per evaluation (one per env, so short episodes are not over-counted)"""
    eval_interval: int = 25
    """iterations between held-out evaluations (also run at the end); 0 = only at the end"""
    evaluate: Optional[str] = None
    """a checkpoint.pt to evaluate instead of training: the run's held-out levels, scores printed
    and saved as evaluation-N.json beside it (N: the first free)"""
    capture_video: bool = False
    """with --evaluate: also save the first held-out episode as eval_video-N.gif (a wandb video
    with --track)"""

    # Mismatch diagnostics (paper eq. 6-7 and 10-11)
    diag_minibatches: int = 1
    """minibatches of D_k over which delta_pi_minus/plus are averaged (0 = all of D_k, -1 = off)"""
    diag_ratio_every: int = 8
    """measure the eval-mode ratio r next to r' on every k-th standard-phase minibatch, from the
    first (0 = never)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size |D_k| (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""

    def __post_init__(self):  # MDR: every Args, from the command line or not, has both
        self.alpha1, self.alpha2 = split_epochs(self)  # MDR


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
    """Shallow ResNet-18 (paper Table 1): torchvision's resnet18 without layer4 and fc, 256
    features; --norm's layer."""
    norm_layer = {
        "bn": partial(nn.BatchNorm2d, momentum=args.bn_momentum),
        "eval": EvalModeBatchNorm2d,
        "brn": partial(BatchRenorm2d, momentum=args.bn_momentum),
        "ln": lambda channels: nn.GroupNorm(1, channels),
        "gn": lambda channels: nn.GroupNorm(32, channels),
        "none": lambda channels: nn.Identity(),
        "dropout": lambda channels: nn.Dropout(args.dropout_p),
    }[args.norm]
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
    """Shared shallow ResNet-18 backbone; separate actor and critic MLPs (width 256)."""

    def __init__(self, num_actions: int, args: Args, hidden: int = 256):
        super().__init__()
        self.amp = args.amp
        self.backbone = make_backbone(args)
        self.actor = mlp(256, hidden, num_actions, std=0.01)
        self.critic = mlp(256, hidden, 1, std=1.0)

    def features(self, x):
        # uint8 (B, 64, 64, 3) -> float in [0, 1], channels_last; no ImageNet mean/std (Table 2);
        # in place: one float copy
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.backbone(x).float()

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
    # only dropout draws in the forward pass: without it `generator` gives only the permutations
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


@torch.no_grad()
def recompute_advantages(agent, batch, rewards, dones, next_obs, next_done, args: Args):  # MDR
    """MDR rounds 2..R (paper App. D): values, GAE advantages and returns of D_k from the current
    eval-mode critic."""
    with temporary_mode(agent, training=False):
        m = args.minibatch_size
        values = torch.cat(
            [
                agent.get_value(batch["obs"][i : i + m]).flatten()
                for i in range(0, len(batch["obs"]), m)
            ]
        )
        next_value = agent.get_value(next_obs).reshape(1, -1)
    advantages, returns = compute_gae(
        rewards, values.view_as(rewards), dones, next_value, next_done, args.gamma, args.gae_lambda
    )
    return {"values": values, "advantages": advantages.reshape(-1), "returns": returns.reshape(-1)}


def make_env(args: Args, num_envs, start_level, num_levels, seed):
    """`num_envs` envs of --env-id on levels start_level .. start_level + num_levels - 1, seeded
    (CleanRL's procgen script does not seed, so its runs differ)."""
    return ProcgenEnv(
        num_envs=num_envs,
        env_name=args.env_id,
        num_levels=num_levels,
        start_level=start_level,
        distribution_mode=args.distribution_mode,
        rand_seed=seed,
    )


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


def make_agent(num_actions: int, args: Args, device):
    """The agent on `device` and CleanRL's Adam (with --weight-decay); --channels-last and
    --compile as asked."""
    agent = Agent(num_actions, args).to(device)
    if args.channels_last and device.type == "cuda":
        # NHWC observations already make the activations channels_last (not on CPU: no gain there,
        # and the grad-norm sum reorders)
        agent = agent.to(memory_format=torch.channels_last)
    if args.compile:  # in place: the state_dict keys stay the same, so checkpoints load either way
        agent.backbone.compile(dynamic=False)
    optimizer = torch.optim.Adam(
        agent.parameters(),
        lr=args.learning_rate,
        eps=1e-5,
        weight_decay=args.weight_decay,
        fused=device.type == "cuda",
    )
    if args.alpha2 > 0 and args.norm not in ("bn", "brn", "dropout"):
        print(
            f"note: --norm {args.norm} has no mode-dependent layer, so the rectification phase "
            "equals the standard one"
        )
    return agent, optimizer


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
    if args.evaluate:
        return evaluate_checkpoint(args)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    run_dir = os.path.join("runs", args.run_name or default_run_name(args))
    checkpoint, run_dir = find_checkpoint(args, run_dir)
    device = seed_everything(args)  # TRY NOT TO MODIFY: seeding

    # env setup: training levels 0..num_levels-1
    envs = make_env(args, args.num_envs, 0, args.num_levels, args.seed)
    num_actions = envs.action_space.n
    agent, optimizer = make_agent(num_actions, args, device)
    storage = rollout_storage(args, envs.observation_space["rgb"].shape, num_actions, device)
    obs, actions, logprobs, logits, rewards, dones, values = storage

    # TRY NOT TO MODIFY: start the game
    global_step, start_iteration, wandb_id = 0, 1, None
    next_obs = torch.as_tensor(envs.reset()["rgb"]).to(device)
    next_done = torch.zeros(args.num_envs).to(device)
    tracker = EpisodeTracker(args.num_envs)
    # own stream: diagnostics never shift the training RNG
    diag_generator = torch.Generator().manual_seed(args.seed)
    live = {
        "agent": agent,
        "optimizer": optimizer,
        "envs": envs,
        "tracker": tracker,
        "diag_generator": diag_generator,
    }
    if checkpoint is not None:
        restored = restore_checkpoint(checkpoint, live, device)
        global_step, start_iteration, next_obs, next_done, wandb_id = restored
    # only now, after every check has passed, is anything written
    logger = RunLogger(run_dir, args, device, wandb_id, global_step)
    stop = StopRequest()  # Ctrl-C, SIGTERM, SIGUSR1: finish the iteration, save a checkpoint, exit
    iteration, exit_code = start_iteration - 1, 0
    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                lrnow = frac * args.learning_rate
                optimizer.param_groups[0]["lr"] = lrnow

            # 1. Interaction: D_k is collected in eval mode, as the policy acts when deployed (paper
            # Sec. 3.2), or with --collect-mode train in train mode (a rival: OpenAI's CoinRun)
            agent.train(args.collect_mode == "train")  # MDR
            # returns and lengths of the training episodes that end in this rollout
            finished = ([], [])
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
                next_obs_np, reward, done, _ = envs.step(action.cpu().numpy())
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32).to(device)
                next_obs = torch.as_tensor(next_obs_np["rgb"]).to(device)
                next_done = torch.as_tensor(done, dtype=torch.float32).to(device)
                for ended, values_of_ended in zip(finished, tracker.update(reward, done)):
                    ended.extend(values_of_ended)
                logger.advance(args.num_envs)

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
            b_eval_logits = logits.view(-1, num_actions) if args.collect_mode == "eval" else None
            delta_pi_minus = policy_mismatch(*diag, b_eval_logits)

            # 3. MDR update (Algorithm 1): per round, alpha1 epochs in train mode, then alpha2
            # epochs in eval mode
            phase_stats = {"standard": [], "rectify": []}
            # per iteration, as CleanRL: shuffles depend on the RNG alone (exact resume)
            b_inds = np.arange(args.batch_size)
            for mdr_round in range(args.mdr_rounds):  # MDR
                # rounds 2..R recompute the values and advantages of D_k (eval-mode critic)
                if mdr_round > 0:  # MDR
                    recomputed = recompute_advantages(  # MDR
                        agent, batch, rewards, dones, next_obs, next_done, args
                    )
                    batch.update(recomputed)  # MDR
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
                        stats = ppo_update(agent, optimizer, mb, args, eval_ratio)
                        phase_stats[phase].append(stats)
            if args.bn_recalibrate:
                # a rival of MDR (docs/rivals.md): running statistics of the new weights on D_k
                recalibrate_batchnorm(agent, batch["obs"], args.minibatch_size)
            delta_pi_plus = policy_mismatch(*diag)

            # 4. Logging (host syncs once per iteration, not per minibatch), held-out evaluation,
            # checkpoint
            delta_pi = (delta_pi_minus, delta_pi_plus)
            scalars = iteration_scalars(args, optimizer, finished, phase_stats, batch, delta_pi)
            logger.log(scalars, iteration)
            last = iteration == args.num_iterations
            if (args.eval_interval and iteration % args.eval_interval == 0) or last:
                tqdm.write(evaluate_and_log(agent, args, device, iteration, logger))
            due = args.save_model and (iteration % args.checkpoint_interval == 0 or last)
            if due or stop.requested:
                rollout_end = (next_obs, next_done)
                save_checkpoint(run_dir, live, args, iteration, global_step, rollout_end, logger)
            if stop.requested:
                tqdm.write(
                    f"stopped at iteration {iteration}; continue it with --resume auto (same "
                    "arguments)"
                )
                exit_code = 128 + stop.requested
                break
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        exit_code = 1
    except KeyboardInterrupt:
        print(f"interrupted during iteration {iteration}; nothing saved for it", file=sys.stderr)
        exit_code = 130
    finally:
        stop.restore()
        envs.close()
        logger.close(exit_code)
    return exit_code


# ==================================================================================================
# Infrastructure: checkpoints, logging, validation. Not the method: nothing below changes what is
# learned.
# ==================================================================================================


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
RESUMABLE_FIELDS = ("resume", "total_timesteps", "track", "wandb_project_name", "wandb_entity")
RESUMABLE_FIELDS += ("wandb_group", "run_name", "save_model", "checkpoint_interval", "cuda")
RESUMABLE_FIELDS += ("num_iterations", "channels_last", "compile", "torch_threads", "evaluate")
RESUMABLE_FIELDS += ("capture_video", "overwrite")
# the plain line per iteration
PRINTED_KEYS = ("charts/episodic_return", "charts/delta_pi_minus", "charts/SPS")


def validate_args(args: Args) -> None:
    """Reject impossible settings before anything is created."""
    if args.env_id not in PROCGEN_GAMES:
        raise ConfigError(
            f"unknown --env-id {args.env_id!r}; valid Procgen games: {', '.join(PROCGEN_GAMES)}"
        )
    for name in (
        "update_epochs",
        "mdr_rounds",
        "num_envs",
        "num_steps",
        "minibatch_size",
        "num_levels",
        "num_test_levels",
        "num_eval_envs",
    ):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    # Procgen's level seeds are 31-bit
    check_ppo_numbers(args, max_seed=2**31 - 1)
    check_number(args, "mdr_rounds", 1, 100)
    check_number(args, "num_test_levels", 1, 2**31 - 1 - args.num_levels)
    check_run_flags(args)
    check_epoch_split(args)
    check_minibatches(args)
    if not 0.0 <= args.dropout_p < 1.0 or not 0.0 < args.bn_momentum <= 1.0:
        raise ConfigError(
            f"need 0 <= --dropout-p {args.dropout_p} < 1 and 0 < --bn-momentum "
            f"{args.bn_momentum} <= 1"
        )
    if args.checkpoint_interval < 1 or min(args.eval_interval, args.diag_ratio_every) < 0:
        raise ConfigError(
            "need --checkpoint-interval >= 1, and --eval-interval, --diag-ratio-every >= 0"
        )
    if args.diag_minibatches < -1 or (args.bn_recalibrate and args.norm not in ("bn", "brn")):
        raise ConfigError(
            f"need --diag-minibatches {args.diag_minibatches} >= -1, and --norm bn or brn for "
            "--bn-recalibrate"
        )


def check_epoch_split(args: Args) -> None:
    """The training scripts' rule for --alpha1, --alpha2 (set by split_epochs): both >= 0, and they
    add up to --update-epochs."""
    if args.alpha1 < 0 or args.alpha2 < 0 or args.alpha1 + args.alpha2 != args.update_epochs:
        raise ConfigError(
            f"--alpha1 {args.alpha1} --alpha2 {args.alpha2}: need both >= 0 and alpha1 + alpha2 = "
            f"--update-epochs {args.update_epochs} (MDR splits the epochs, it adds none)"
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
    """The run's folder under runs/, a function of what defines the run (so a requeued job finds
    its own folder)."""
    norm = {
        "bn": f"bn{args.bn_momentum:g}",
        "brn": f"brn{args.bn_momentum:g}",
        "dropout": f"dropout{args.dropout_p:g}",
    }
    mdr = f"mdr{args.alpha1}-{args.alpha2}"
    mdr += f"x{args.mdr_rounds}" if args.mdr_rounds > 1 else ""
    mdr += "__collecttrain" if args.collect_mode == "train" else ""
    mdr += "__bnrecal" if args.bn_recalibrate else ""
    return f"{args.env_id}__{args.exp_name}__{norm.get(args.norm, args.norm)}__{mdr}__s{args.seed}"


def mean_stats(stats_list):
    """Average a list of stat dicts key by key (keys measured on only some minibatches average
    over those); one host sync."""
    keys = sorted({key for stats in stats_list for key in stats})
    means = torch.stack(
        [torch.stack([s[key] for s in stats_list if key in s]).mean() for key in keys]
    )
    return dict(zip(keys, means.tolist()))


def iteration_scalars(args: Args, optimizer, finished, phase_stats, batch, delta_pi) -> dict:
    """One iteration's scalars (CleanRL's keys, per-phase losses, MDR diagnostics); `finished`:
    (returns, lengths)."""
    returns, lengths = finished
    all_stats = mean_stats(phase_stats["standard"] + phase_stats["rectify"])
    if not np.isfinite(all_stats["loss"]):
        raise FloatingPointError(
            "non-finite loss: the run stops (a lower --learning-rate or --max-grad-norm may help)"
        )
    y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
    var_y = np.var(y_true)
    scalars = {"charts/learning_rate": optimizer.param_groups[0]["lr"]}
    explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
    scalars["losses/explained_variance"] = explained_var
    for key in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
        scalars[f"losses/{key}"] = all_stats[key]
    for phase, stats_list in phase_stats.items():
        for key, value in (mean_stats(stats_list) if stats_list else {}).items():
            diagnostic = key.startswith(("ratio_gap", "trust_region"))
            scalars[f"mdr/{key}" if diagnostic else f"losses/{phase}/{key}"] = value
    if delta_pi[0] is not None:
        delta_pi_minus, delta_pi_plus = torch.stack(delta_pi).tolist()
        scalars["charts/delta_pi_minus"] = delta_pi_minus
        scalars["charts/delta_pi_plus"] = delta_pi_plus
    scalars.update(episode_scalars(args.env_id, returns, "") if returns else {})
    scalars.update({"charts/episodic_length": float(np.mean(lengths))} if lengths else {})
    return scalars


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
    finds it (--resume auto continues its checkpoint); never mixes two runs."""
    args.save_model = args.save_model or args.resume == "auto"
    check_writable(run_dir)
    if args.resume in (None, "auto") and not claim_run_folder(args, run_dir):
        return None, run_dir
    path = os.path.join(run_dir, "checkpoint.pt") if args.resume == "auto" else args.resume
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a torch file
        raise ConfigError(
            f"--resume {path}: not a readable checkpoint ({type(e).__name__}); use a --save-model "
            "one"
        ) from None
    required = {"agent", "optimizer", "global_step", "iteration", "args", "run_name", "rng", "env"}
    missing = required - set(checkpoint) if isinstance(checkpoint, dict) else required
    if missing:
        raise ConfigError(
            f"--resume {path}: not a checkpoint of this script (it lacks {sorted(missing)})"
        )
    changed = different_flags(checkpoint["args"], args)
    if changed:
        raise ConfigError(f"--resume {path}: the run used different {', '.join(changed)}")
    return checkpoint, os.path.join("runs", checkpoint["run_name"])


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


class RunLogger:
    """runs/<run>/: args.json, TensorBoard (CleanRL's keys), wandb (--track), summary.json at the
    end; a tqdm bar, or plain lines in a log file; what a person waits for, said as it comes."""

    def __init__(self, run_dir: str, args: Args, device, wandb_id: Optional[str], global_step: int):
        os.makedirs(run_dir, exist_ok=True)
        args_file = os.path.join(run_dir, "args.json")
        # a resumed run keeps where its earlier stretches were computed, one entry per process
        earlier = []
        if global_step and os.path.exists(args_file):
            with open(args_file) as f, contextlib.suppress(ValueError, AttributeError):
                earlier = [
                    p
                    for p in json.load(f).get("provenance", [])
                    if p.get("from_step", 0) < global_step
                ]
        self.provenance = [*earlier, {"from_step": global_step, **provenance()}]
        with open(args_file, "w") as f:
            json.dump({**asdict(args), "provenance": self.provenance}, f, indent=2)
        self.run_dir = run_dir
        self.args = args
        self.wandb_id = wandb_id
        self.global_step = global_step
        self.wandb_run = None
        self.start_time, self.start_step = time.time(), global_step
        # the last value of each tag (summary.json's scores); when to say the rollout's pace
        self.latest, self.pace_due, self.first_iteration = {}, max(args.batch_size // 10, 1), True
        if args.track:
            import wandb

            run_name = os.path.relpath(run_dir, "runs")
            group = args.wandb_group or run_name.rsplit("__s", 1)[0]  # the seeds of one config
            self.wandb_run = wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                group=group,
                sync_tensorboard=True,
                config=vars(args),
                name=run_name,
                tags=wandb_tags(args),
                id=wandb_id,
                resume="allow",
                save_code=True,
            )
            self.wandb_id = self.wandb_run.id
        self.writer = SummaryWriter(run_dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        total = args.num_iterations * args.batch_size
        terminal = sys.stdout.isatty()
        start = f"continues from global_step {global_step}" if global_step else "starts"
        print(
            f"{run_dir}: the run of {', '.join(wandb_tags(args))} {start} on {device}: "
            f"{args.num_iterations} iterations of {args.batch_size} steps ({args.num_envs} envs x "
            f"{args.num_steps}), then an update each; {'a bar' if terminal else 'a line'} shows "
            "the progress",
            flush=True,
        )
        self.bar = (
            tqdm(total=total, initial=global_step, unit="step", dynamic_ncols=True)
            if terminal
            else None
        )

    def advance(self, steps: int):
        self.global_step += steps
        if self.bar is not None:
            self.bar.update(steps)
        collected = self.global_step - self.start_step
        if self.pace_due and collected >= self.pace_due:  # once, early in the first rollout
            self.pace_due = 0
            rollout = self.args.batch_size / collected * (time.time() - self.start_time)
            tqdm.write(
                f"collecting at {collected / (time.time() - self.start_time):.0f} steps/s: about "
                f"{readable_time(rollout)} for the first rollout, then its update"
            )

    def log(self, scalars: dict, iteration: Optional[int] = None):
        """Write the scalars at the current step; with `iteration`, also SPS and the progress
        line (or bar), and after the first iteration the time the run should take."""
        if iteration is not None:
            sps = int((self.global_step - self.start_step) / (time.time() - self.start_time))
            scalars = {**scalars, "charts/SPS": sps}
            shown = {tag.split("/")[-1]: scalars[tag] for tag in PRINTED_KEYS if tag in scalars}
            if self.bar is not None:
                self.bar.set_postfix(
                    {key: f"{value:.3g}" for key, value in shown.items()}, refresh=False
                )
            else:
                values = "".join(f", {key}={value:.4g}" for key, value in shown.items())
                progress = f"iteration={iteration}/{self.args.num_iterations}"
                print(f"{progress}, global_step={self.global_step}{values}", flush=True)
            left = self.args.num_iterations - iteration
            if self.first_iteration and left:
                took = time.time() - self.start_time
                tqdm.write(
                    f"iteration {iteration} took {readable_time(took)}: the {left} left take about "
                    f"{readable_time(took * left)} at this pace, with the held-out evaluations on "
                    "top"
                )
            self.first_iteration = False
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, self.global_step)
                self.latest[tag] = value

    def close(self, exit_code: int):
        """Close the bar, TensorBoard and wandb; write summary.json, the mark of how the run ended
        that the next --resume auto and analysis/ read (completed; stopped; failed: a non-finite
        loss, or an exception still on its way out of main(), whose `finally` calls this), and say
        it in one line."""
        crash = sys.exc_info()[1]
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if crash else exit_code)
        failed = crash is not None or exit_code == 1
        status = "failed" if failed else "completed" if exit_code == 0 else "stopped"
        elapsed = time.time() - self.start_time
        checkpoint = os.path.join(self.run_dir, "checkpoint.pt")
        summary = {"status": status, "exit_code": exit_code, "global_step": self.global_step}
        summary.update(
            error=f"{type(crash).__name__}: {crash}" if crash else None,
            wall_time_s=round(elapsed, 1),
            checkpoint=checkpoint if os.path.exists(checkpoint) else None,
        )
        scores = {tag: value for tag, value in self.latest.items() if tag.startswith("charts/")}
        summary.update(scores=scores, args=asdict(self.args), provenance=self.provenance)
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        shown = [tag for tag in scores if tag.startswith("charts/test_")] + [
            tag for tag in PRINTED_KEYS if tag in scores and tag != "charts/SPS"
        ]
        values = "".join(f", {tag.split('/')[-1]}={scores[tag]:.4g}" for tag in shown)
        after = ""
        if failed:
            after = (
                "; its last checkpoint is intact: --resume auto continues from it"
                if summary["checkpoint"]
                else "; no checkpoint was written: the same command starts it afresh (this "
                "folder moved aside)"
            )
        print(
            f"{status}: {self.run_dir}, global_step {self.global_step}{values}, "
            f"{readable_time(elapsed)} (summary.json){after}",
            flush=True,
        )


def wandb_tags(args: Args) -> list:
    momentum = [f"bn_momentum={args.bn_momentum:g}"] if args.norm in ("bn", "brn") else []
    return [
        args.env_id,
        f"norm={args.norm}",
        f"mdr=({args.alpha1},{args.alpha2})",
        f"seed={args.seed}",
        *momentum,
    ]


class EpisodeTracker:
    """Running return/length per env (procgen reports rewards and dones only); update(): the
    ended episodes' (R, length)."""

    def __init__(self, num_envs):
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def update(self, rewards, dones):
        self.returns += rewards
        self.lengths += 1
        finished = (self.returns[dones].copy(), self.lengths[dones].copy())
        self.returns[dones], self.lengths[dones] = 0.0, 0
        return finished


# easy-mode (R_min, R_max) of the paper's six games (Cobbe et al. 2020), for the normalized score
PROCGEN_RETURN_RANGE = {
    "coinrun": (5.0, 10.0),
    "starpilot": (2.5, 64.0),
    "caveflyer": (3.5, 12.0),
    "chaser": (0.5, 13.0),
    "bigfish": (1.0, 40.0),
    "bossfight": (0.5, 13.0),
}


def episode_scalars(env_id, returns, prefix: str) -> dict:
    """Mean return and, for the paper's six games, the normalized score
    (R - R_min) / (R_max - R_min), easy mode."""
    scalars = {f"charts/{prefix}episodic_return": float(np.mean(returns))}
    if env_id in PROCGEN_RETURN_RANGE:
        r_min, r_max = PROCGEN_RETURN_RANGE[env_id]
        scalars[f"charts/{prefix}normalized_score"] = float(
            (np.mean(returns) - r_min) / (r_max - r_min)
        )
    return scalars


@torch.no_grad()
def evaluate(agent, args: Args, device, iteration, frames=None, progress=None):
    """First episode of each of `num_eval_envs` envs on held-out levels, eval-mode policy; a
    fresh env and an RNG forked from (seed, iteration): a function of the parameters alone.
    `frames` receives the first env's episode (--capture-video), `progress` (a tqdm bar) counts
    the finished episodes."""
    envs = make_env(
        args,
        args.num_eval_envs,
        args.num_levels,
        args.num_test_levels,
        (args.seed + 1_000_003 * iteration) % 2**31,  # Procgen's seeds are 31-bit
    )
    tracker = EpisodeTracker(args.num_eval_envs)
    episode_returns = np.full(args.num_eval_envs, np.nan)
    rng_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with temporary_mode(agent, training=False), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(args.seed + iteration)
        next_obs = envs.reset()["rgb"]
        while np.isnan(episode_returns).any():
            if frames is not None and np.isnan(episode_returns[0]):
                frames.append(next_obs[0].copy())
            action, _, _, _ = agent.get_action_and_value(torch.as_tensor(next_obs, device=device))
            obs, reward, done, _ = envs.step(action.cpu().numpy())
            next_obs = obs["rgb"]
            finished = np.isnan(episode_returns) & done
            episode_returns[finished] = tracker.returns[finished] + reward[finished]
            tracker.update(reward, done)
            if progress is not None:
                progress.update(int(finished.sum()))
    envs.close()
    return episode_returns


def evaluate_and_log(agent, args: Args, device, iteration, logger) -> str:
    """Held-out evaluation during training: logged; the line to print."""
    test_returns = evaluate(agent, args, device, iteration)
    logger.log(episode_scalars(args.env_id, test_returns, "test_"))
    return f"held-out evaluation: test_episodic_return={np.mean(test_returns):.2f}"


def evaluate_checkpoint(args: Args) -> int:
    """--evaluate PATH: held-out scores -> evaluation-N.json beside it (N: the first free, earlier
    ones are kept); --capture-video: the first episode -> eval_video-N.gif. The run's own held-out
    levels and envs, unless this command sets --num-test-levels or --num-eval-envs to other than
    their defaults."""
    defaults, chosen = Args(), {}
    for name in ("num_test_levels", "num_eval_envs"):
        if getattr(args, name) != getattr(defaults, name):
            chosen[name] = getattr(args, name)
    try:
        checkpoint = torch.load(args.evaluate, map_location="cpu", weights_only=True)
        evaluation = {**chosen, "cuda": args.cuda, "track": args.track, "evaluate": None}
        run_args = Args(**{**checkpoint["args"], **evaluation, "pretrained": False})
        agent = Agent(checkpoint["agent"]["actor.4.weight"].shape[0], run_args)
        agent.load_state_dict(checkpoint["agent"])
    except Exception as e:  # missing, truncated, another script's
        raise ConfigError(
            f"--evaluate {args.evaluate}: not a checkpoint of this script ({type(e).__name__})"
        ) from None
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    folder = os.path.dirname(os.path.abspath(args.evaluate))
    number = next_free_number(folder, "evaluation-{}.json")
    first, last = run_args.num_levels, run_args.num_levels + run_args.num_test_levels - 1
    print(
        f"evaluating {args.evaluate} (iteration {checkpoint['iteration']}) on {device}: the first "
        f"episode of {run_args.num_eval_envs} envs on held-out levels {first}..{last} -> "
        f"evaluation-{number}.json",
        flush=True,
    )
    frames = [] if args.capture_video else None
    bar = tqdm(total=run_args.num_eval_envs, unit="episode", disable=not sys.stdout.isatty())
    with bar:
        returns = evaluate(
            agent.to(device), run_args, device, checkpoint["iteration"], frames, progress=bar
        )
    result = {
        "checkpoint": args.evaluate,
        "iteration": checkpoint["iteration"],
        "global_step": checkpoint["global_step"],
        "num_test_levels": run_args.num_test_levels,
        "num_eval_envs": run_args.num_eval_envs,
    }
    result.update(episode_scalars(run_args.env_id, returns, "test_"), test_returns=returns.tolist())
    with open(os.path.join(folder, f"evaluation-{number}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({key: value for key, value in result.items() if key != "test_returns"}))
    # 64 px shown 4x
    frames = [Image.fromarray(frame).resize((256, 256), Image.NEAREST) for frame in frames or []]
    video = os.path.join(folder, f"eval_video-{number}.gif") if frames else None
    # the GIF, and an animated image in TensorBoard (its own video panel needs moviepy < 2)
    if frames:
        # duration in ms: one env step per frame
        frames[0].save(video, save_all=True, append_images=frames[1:], duration=66, loop=0)
        with open(video, "rb") as f:
            gif = Summary.Image(
                height=frames[0].height,
                width=frames[0].width,
                colorspace=3,
                encoded_image_string=f.read(),
            )
        with SummaryWriter(folder) as writer:
            summary = Summary(value=[Summary.Value(tag="eval/test_video", image=gif)])
            writer._get_file_writer().add_summary(summary, checkpoint["global_step"])
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            name=f"{checkpoint['run_name']}-eval",
        )
        scores = {key: value for key, value in result.items() if key.startswith("charts/")}
        wandb.log({**scores, **({"eval/video": wandb.Video(video)} if video else {})})
        wandb.finish()
    return 0


def save_checkpoint(run_dir, live, args: Args, iteration, global_step, rollout, logger):
    """All a bit-for-bit continuation needs (`live`, RNG streams, `rollout` = (next_obs,
    next_done), the wandb run id of `logger`); an atomic write."""
    state = {
        "agent": live["agent"].state_dict(),
        "optimizer": live["optimizer"].state_dict(),
        "args": asdict(args),
    }
    state.update(
        global_step=global_step,
        iteration=iteration,
        run_name=os.path.relpath(run_dir, "runs"),
        wandb_id=logger.wandb_id,
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
    procgen = [
        torch.frombuffer(bytearray(s), dtype=torch.uint8)
        for s in live["envs"].env.callmethod("get_state")
    ]
    tracker = {
        key: torch.from_numpy(getattr(live["tracker"], key).copy())
        for key in ("returns", "lengths")
    }
    state["env"] = dict(
        procgen=procgen, next_obs=rollout[0].cpu(), next_done=rollout[1].cpu(), **tracker
    )
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
    env = checkpoint["env"]
    live["envs"].env.callmethod("set_state", [bytes(state.numpy()) for state in env["procgen"]])
    live["tracker"].returns = env["returns"].numpy()
    live["tracker"].lengths = env["lengths"].numpy()
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
