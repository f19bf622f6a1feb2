# PPO with Mode-Dependent Rectification (MDR) on Procgen, CleanRL-style, one file.
# Paper: Mohamad, Ponzio, Descombes, "Mode-Dependent Rectification for Stable PPO Training" (arXiv 2602.05619).
# Run:   python ppo_procgen_mdr.py --env-id bigfish --norm bn --alpha1 2 --alpha2 1 --cuda
import contextlib
import io
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal, Optional

# OpenMP threads that spin while they wait steal the cores from Procgen's threads and from other jobs: passive waiting
# measured up to 2.6x the SPS on 2 shared cores (docs/benchmarks.md). Read once, when torch loads OpenMP; yours wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import ResNet18_Weights, resnet18

# procgen imports the unmaintained `gym`, which prints a deprecation banner on import: noise, not our users' problem.
with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
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
    save_model: bool = False
    """if toggled, write a checkpoint to `runs/{run_name}/checkpoint.pt` every `checkpoint_interval` and at the end"""
    checkpoint_interval: int = 50
    """iterations between checkpoints (with --save-model)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue from (same arguments; --total-timesteps may grow)"""

    # Speed (none of these changes what is computed, except --amp; docs/benchmarks.md has the measurements)
    channels_last: bool = True
    """CUDA: keep the conv weights in channels_last memory format, like the NHWC observations (a no-op on CPU)"""
    amp: bool = False
    """run the backbone under bfloat16 autocast (CUDA; CPUs with bf16 units, e.g. AVX512-BF16); heads and losses in float32"""
    compile: bool = False
    """torch.compile the backbone (one compile per mode and batch shape, ~1 min on CPU; on CPU measured no faster)"""
    torch_threads: int = 0
    """torch's intra-op CPU threads (0 = torch's default, one per core)"""
    timing: bool = False
    """log the wall and CPU time per section (env, inference, update, diagnostics, ...) and peak memory under perf/; on
    CUDA it synchronizes at section boundaries, so leave it off for production runs"""

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
    """toggle learning rate annealing (linear to 0, CleanRL's default; the paper does not say)"""
    gamma: float = 0.999
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    minibatch_size: int = 2048
    """the minibatch size m (must divide num_envs * num_steps)"""
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
    alpha1: int = 2
    """epochs per round in train mode (standard phase)"""
    alpha2: int = 1
    """epochs per round in eval mode (rectification phase); 0 = plain PPO"""
    mdr_rounds: int = 1
    """rounds R per rollout; values and advantages are recomputed (eval mode) before rounds 2..R"""

    # Network: shallow ResNet-18 (paper Table 1) and its norm layer
    norm: Literal["bn", "eval", "brn", "ln", "gn", "none", "dropout"] = "bn"
    """backbone norm layer: BatchNorm, BatchNorm frozen in eval mode, Batch Renorm, LayerNorm, GroupNorm, none, dropout"""
    bn_momentum: float = 0.1
    """running-statistics momentum of BatchNorm and Batch Renorm (the paper tries 0.1 and 0.01)"""
    brn_rmax: float = 3.0
    """Batch Renorm: final bound r_max on the std correction r"""
    brn_dmax: float = 5.0
    """Batch Renorm: final bound d_max on the mean correction d"""
    brn_warmup: int = 5000
    """Batch Renorm: train-mode forward passes over which r_max ramps from 1 and d_max from 0"""
    gn_groups: int = 32
    """number of groups of --norm gn"""
    dropout_p: float = 0.1
    """dropout probability of --norm dropout (a Dropout in place of each BatchNorm)"""
    pretrained: bool = True
    """initialise the backbone from ImageNet (torchvision weights; offline: $TORCH_HOME/hub/checkpoints)"""

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

    # Mismatch diagnostics (paper eq. 6-7 and 10-11)
    diag_minibatches: int = 1
    """minibatches of D_k over which delta_pi_minus/plus are averaged (0 = all of D_k, -1 = off)"""
    diag_ratio_every: int = 8
    """measure the eval-mode ratio r next to r' on every k-th standard-phase minibatch, from the first (0 = never)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size |D_k| (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


class ConfigError(Exception):
    """Bad input: printed as one line, no traceback."""


class NonFiniteLossError(Exception):
    """The loss became NaN/inf: the run stops before anything is saved."""


# easy-mode (R_min, R_max) of the paper's six games (Cobbe et al. 2020), for the normalized score
PROCGEN_RETURN_RANGE = {
    "coinrun": (5.0, 10.0),
    "starpilot": (2.5, 64.0),
    "caveflyer": (3.5, 12.0),
    "chaser": (0.5, 13.0),
    "bigfish": (1.0, 40.0),
    "bossfight": (0.5, 13.0),
}
MODE_DEPENDENT_NORMS = ("bn", "brn", "dropout")
# fields that may differ between a run and its --resume (everything else defines the computation)
RESUMABLE_FIELDS = (
    "resume",
    "total_timesteps",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "wandb_group",
    "save_model",
    "checkpoint_interval",
    "cuda",
    "num_iterations",
    "channels_last",
    "compile",
    "torch_threads",
    "timing",
)


def validate_args(args: Args) -> None:
    """Reject impossible settings before anything is created."""
    if args.env_id not in PROCGEN_GAMES:
        raise ConfigError(f"unknown --env-id {args.env_id!r}; valid Procgen games: {', '.join(PROCGEN_GAMES)}")
    if args.alpha1 < 0 or args.alpha2 < 0 or args.alpha1 + args.alpha2 == 0:
        raise ConfigError(
            f"--alpha1 {args.alpha1} --alpha2 {args.alpha2}: both must be >= 0 and at least one > 0 (e.g. 2 and 1)"
        )
    if args.mdr_rounds < 1:
        raise ConfigError(f"--mdr-rounds {args.mdr_rounds}: must be >= 1")
    for name in ("num_envs", "num_steps", "minibatch_size", "num_levels", "num_test_levels", "num_eval_envs"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    batch_size = args.num_envs * args.num_steps
    if args.minibatch_size > batch_size or batch_size % args.minibatch_size:
        raise ConfigError(
            f"--minibatch-size {args.minibatch_size} must divide the rollout size "
            f"num_envs x num_steps = {batch_size}; e.g. --minibatch-size {batch_size // max(1, batch_size // 2048)}"
        )
    if args.total_timesteps < batch_size:
        raise ConfigError(f"--total-timesteps {args.total_timesteps} is smaller than one rollout ({batch_size} steps)")
    if not 0.0 <= args.dropout_p < 1.0 or not 0.0 < args.bn_momentum <= 1.0 or args.brn_rmax < 1.0 or args.brn_dmax < 0:
        raise ConfigError("need 0 <= --dropout-p < 1, 0 < --bn-momentum <= 1, --brn-rmax >= 1 and --brn-dmax >= 0")
    if args.gn_groups < 1 or 64 % args.gn_groups:
        raise ConfigError(f"--gn-groups {args.gn_groups} must divide 64 (the backbone has 64, 128 and 256 channels)")
    if args.checkpoint_interval < 1 or args.eval_interval < 0 or args.diag_minibatches < -1 or args.diag_ratio_every < 0:
        raise ConfigError(
            "--checkpoint-interval must be >= 1; --eval-interval, --diag-ratio-every >= 0; --diag-minibatches >= -1 (-1 = off)"
        )
    if args.torch_threads < 0:
        raise ConfigError(f"--torch-threads {args.torch_threads}: must be >= 0 (0 = torch's default)")


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class EvalModeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalizes with its running statistics (`--norm eval`): the stats stay frozen
    (ImageNet's when pretrained) whatever the module's mode; the affine parameters still learn."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BatchRenorm2d(nn.Module):
    """Batch Renormalization (Ioffe, 2017). Train mode: x_hat = (x - mu_B) / sigma_B * r + d, with r = sigma_B / sigma,
    d = (mu_B - mu) / sigma (no gradient), clipped to [1/r_max, r_max] and [-d_max, d_max]; the bounds ramp up from
    (1, 0), i.e. plain BatchNorm, over `warmup` forward passes. Eval mode: running statistics, like BatchNorm.
    Same parameter and buffer names as nn.BatchNorm2d, so ImageNet BatchNorm weights load into it."""

    def __init__(self, num_features, momentum=0.1, eps=1e-5, r_max=3.0, d_max=5.0, warmup=5000):
        super().__init__()
        self.momentum, self.eps, self.r_max, self.d_max, self.warmup = momentum, eps, r_max, d_max, warmup
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        x = x.float()  # --amp: statistics in float32 (a no-op otherwise)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        std = (var + self.eps).sqrt()
        running_std = (self.running_var + self.eps).sqrt()
        ramp = (self.num_batches_tracked.float() / max(self.warmup, 1)).clamp(max=1.0)
        r_max = 1.0 + (self.r_max - 1.0) * ramp
        d_max = self.d_max * ramp
        r = torch.minimum(torch.maximum(std.detach() / running_std, 1.0 / r_max), r_max)
        d = torch.minimum(torch.maximum((mean.detach() - self.running_mean) / running_std, -d_max), d_max)
        x_hat = (x - mean[None, :, None, None]) / std[None, :, None, None] * r[None, :, None, None] + d[None, :, None, None]
        with torch.no_grad():
            n = x.numel() / x.size(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        return x_hat * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def make_norm_layer(args: Args):
    """The one line that makes each --norm variant: torchvision's resnet18(norm_layer=...) calls it per channel count."""
    return {
        "bn": partial(nn.BatchNorm2d, momentum=args.bn_momentum),
        "eval": EvalModeBatchNorm2d,
        "brn": partial(
            BatchRenorm2d, momentum=args.bn_momentum, r_max=args.brn_rmax, d_max=args.brn_dmax, warmup=args.brn_warmup
        ),
        "ln": lambda channels: nn.GroupNorm(1, channels),
        "gn": lambda channels: nn.GroupNorm(args.gn_groups, channels),
        "none": lambda channels: nn.Identity(),
        "dropout": lambda channels: nn.Dropout(args.dropout_p),
    }[args.norm]


def load_imagenet_weights(backbone: nn.Module) -> list:
    """Load torchvision's ImageNet ResNet-18 into the shallow backbone: every tensor whose name and shape exist in it
    (convs always; affine params for bn/eval/brn/ln/gn; running stats for bn/eval/brn). Returns the loaded names."""
    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        state_dict = weights.get_state_dict(progress=False)
    except Exception as e:  # offline (URLError), or a truncated file in the cache (RuntimeError)
        raise ConfigError(
            f"ImageNet weights unavailable ({type(e).__name__}): put resnet18-f37072fd.pth at {cached} or pass --no-pretrained"
        ) from None
    own = backbone.state_dict()
    loadable = {
        name: tensor
        for name, tensor in state_dict.items()
        if name in own and own[name].shape == tensor.shape and not name.endswith("num_batches_tracked")
    }
    backbone.load_state_dict(loadable, strict=False)
    return sorted(loadable)


def make_backbone(args: Args) -> nn.Module:
    """Shallow ResNet-18 (paper Table 1): torchvision's resnet18 without layer4 and fc; average pool -> 256 features."""
    backbone = resnet18(weights=None, norm_layer=make_norm_layer(args))
    backbone.layer4 = nn.Identity()
    backbone.fc = nn.Identity()
    if args.pretrained:
        load_imagenet_weights(backbone)
    return backbone


class Agent(nn.Module):
    """Shared shallow ResNet-18 backbone; separate actor and critic MLPs (FC-ReLU-FC-ReLU-out, width 256)."""

    def __init__(self, num_actions: int, args: Args, hidden: int = 256):
        super().__init__()
        self.amp = args.amp
        self.backbone = make_backbone(args)
        self.actor = nn.Sequential(
            layer_init(nn.Linear(256, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, num_actions), std=0.01),
        )
        self.critic = nn.Sequential(
            layer_init(nn.Linear(256, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )

    def features(self, x):
        # uint8 (B, 64, 64, 3) -> float (B, 3, 64, 64) in [0, 1], channels_last in memory; no ImageNet mean/std (paper
        # Table 2). Divided in place: one float copy of the minibatch, not two. --amp: the backbone in bfloat16.
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.backbone(x).float()

    def get_value(self, x):
        return self.critic(self.features(x))

    def get_policy_and_value(self, x):
        hidden = self.features(x)
        policy = Categorical(logits=self.actor(hidden), validate_args=False)  # NaN logits reach the non-finite-loss check
        return policy, self.critic(hidden)

    def get_action_and_value(self, x, action=None):
        policy, value = self.get_policy_and_value(x)
        if action is None:
            action = policy.sample()
        return action, policy.log_prob(action), policy.entropy(), value


def compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """Generalized Advantage Estimation over a (num_steps, num_envs) rollout. dones[t] = 1 when obs[t] starts a new
    episode (CleanRL's convention), so the bootstrap from step t+1 is cut by dones[t+1]."""
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


@torch.no_grad()
def compute_values(agent, b_obs, chunk_size):
    """Eval-mode values of a flat batch of observations (MDR rounds 2..R recompute them on D_k)."""
    was_training = agent.training
    agent.eval()
    values = torch.cat([agent.get_value(b_obs[i : i + chunk_size]).flatten() for i in range(0, len(b_obs), chunk_size)])
    agent.train(was_training)
    return values


def js_divergence(logits_p, logits_q):
    """Jensen-Shannon divergence (nats, per row) between two categorical distributions; 0 <= JS <= ln 2."""
    log_p, log_q = F.log_softmax(logits_p, dim=-1), F.log_softmax(logits_q, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - np.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0.0)


@torch.no_grad()
def policy_mismatch(agent, b_obs, minibatch_size, num_minibatches, generator, b_eval_logits=None):
    """Delta pi (paper eq. 6-7): mean JS divergence between the train-mode policy (batch statistics of a shuffled
    minibatch of size m) and the eval-mode policy, over `num_minibatches` minibatches of D_k (0 = all; -1 = off: None).
    Both sides use the current running statistics: each train-mode pass moves them, so they are restored after it.
    `b_eval_logits`: the eval-mode logits of b_obs if already known (before the update they are the rollout's: eq. 6's
    pi^{mu_r^-}_{theta_k} is the behaviour policy), which saves one forward pass per minibatch.
    Side-effect free: running stats, num_batches_tracked, parameters and the global RNG streams are restored."""
    if num_minibatches < 0:
        return None
    was_training = agent.training
    saved_buffers = {name: buf.clone() for name, buf in agent.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    perm = torch.randperm(len(b_obs), generator=generator).to(b_obs.device)
    total = len(b_obs) // minibatch_size
    divergences = []
    for start in range(0, minibatch_size * (num_minibatches or total), minibatch_size):
        mb_inds = perm[start : start + minibatch_size]
        mb_obs = b_obs[mb_inds]
        if b_eval_logits is None:
            agent.eval()
            eval_logits = agent.actor(agent.features(mb_obs))
        else:
            eval_logits = b_eval_logits[mb_inds]
        agent.train()
        train_logits = agent.actor(agent.features(mb_obs))
        for name, buf in agent.named_buffers():
            buf.copy_(saved_buffers[name])
        divergences.append(js_divergence(train_logits, eval_logits).mean())
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    agent.train(was_training)
    return torch.stack(divergences).mean()


def clipped_ppo_loss(newlogprob, entropy, newvalue, mb_logprobs, mb_advantages, mb_returns, mb_values, args: Args):
    """CleanRL's PPO loss (paper eq. 4-5): clipped surrogate, (clipped) value loss, entropy bonus."""
    logratio = newlogprob - mb_logprobs
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    if args.norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    newvalue = newvalue.view(-1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb_returns) ** 2
        v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - mb_returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    stats = {
        "policy_loss": pg_loss.detach(),
        "value_loss": v_loss.detach(),
        "entropy": entropy_loss.detach(),
        "old_approx_kl": old_approx_kl,
        "approx_kl": approx_kl,
        "clipfrac": clipfrac,
    }
    return loss, ratio, stats


@torch.no_grad()
def eval_mode_ratio(agent, mb_obs, mb_actions, mb_logprobs):
    """Eq. 10's r: the eval-mode policy's ratio at the current parameters and running statistics. Measured before the
    minibatch's train-mode pass, which moves the statistics (and would hold its activations alongside). Side-effect
    free: an eval-mode forward under no_grad updates no running statistic and draws no dropout mask."""
    was_training = agent.training
    agent.eval()
    _, eval_logprob, _, _ = agent.get_action_and_value(mb_obs, mb_actions)
    agent.train(was_training)
    return (eval_logprob - mb_logprobs).exp()


def trust_region_diagnostics(train_ratio, eval_ratio, clip_coef):
    """Eq. 10-11 made measurable: mean |r' - r| between the optimized train-mode ratio r' and the eval-mode ratio r,
    and the fraction of samples the clip cannot stop (r' inside [1 - eps, 1 + eps], r outside)."""
    inside = lambda ratio: (ratio - 1.0).abs() <= clip_coef  # noqa: E731
    violation = (inside(train_ratio) & ~inside(eval_ratio)).float().mean()
    return {"ratio_gap": (train_ratio - eval_ratio).abs().mean(), "trust_region_violation": violation}


def ppo_update(agent, optimizer, batch, mb_inds, args: Args, measure_ratio_gap: bool, timer):
    """One minibatch gradient step in the agent's current mode; returns detached stats (no host sync). The ratio-gap
    measurement is charged to the timer's "diagnostics" section (a disabled SectionTimer costs nothing)."""
    mb_obs, mb_actions, mb_logprobs = batch["obs"][mb_inds], batch["actions"][mb_inds], batch["logprobs"][mb_inds]
    eval_ratio = None
    if measure_ratio_gap:
        with timer("diagnostics"):
            eval_ratio = eval_mode_ratio(agent, mb_obs, mb_actions, mb_logprobs)
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions)
    loss, ratio, stats = clipped_ppo_loss(
        newlogprob,
        entropy,
        newvalue,
        mb_logprobs,
        batch["advantages"][mb_inds],
        batch["returns"][mb_inds],
        batch["values"][mb_inds],
        args,
    )
    if eval_ratio is not None:
        stats.update(trust_region_diagnostics(ratio.detach(), eval_ratio, args.clip_coef))
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    stats["loss"] = loss.detach()
    return stats


def mean_stats(stats_list):
    """Average a list of stat dicts key by key (keys measured on only some minibatches average over those); one host sync."""
    keys = sorted({key for stats in stats_list for key in stats})
    means = torch.stack([torch.stack([s[key] for s in stats_list if key in s]).mean() for key in keys])
    return dict(zip(keys, means.tolist()))


class SectionTimer:
    """Wall and CPU time per section of an iteration (--timing): `with timer("env"): ...`. Sections nest; time counts
    once, in the innermost open one, and time outside every section counts as "other". CPU time is this process's (all
    its threads): on a shared machine it varies far less than wall time. On CUDA the timer synchronizes at each boundary
    (kernels run asynchronously). Disabled, it hands out a shared no-op context: no clock read, no sync."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.sync = enabled, enabled and device.type == "cuda"
        self.totals, self.open, self.last = {}, [], (0.0, 0.0)

    def __call__(self, section: str):
        return self._timed(section) if self.enabled else contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed(self, section):
        self._charge()
        self.open.append(section)
        try:
            yield
        finally:
            self._charge()
            self.open.pop()

    def _charge(self):
        """Add the wall and CPU time since the last boundary to the innermost open section."""
        if self.sync:
            torch.cuda.synchronize()
        now = (time.perf_counter(), time.process_time())
        if self.open:
            for clock, start, end in zip(("time", "cpu"), self.last, now):
                key = f"{self.open[-1]}_{clock}"
                self.totals[key] = self.totals.get(key, 0.0) + end - start
        self.last = now

    def start(self):
        """Begin an iteration."""
        if self.enabled:
            self.totals, self.open = {}, []
            self._charge()
            self.open.append("other")

    def stop(self) -> dict:
        """End the iteration: its seconds per section, {"env_time": wall, "env_cpu": CPU, ...} (empty when disabled)."""
        if not self.enabled:
            return {}
        self._charge()
        totals, self.totals, self.open = self.totals, {}, []
        return totals


def peak_memory_gb(device) -> dict:
    """Peak resident memory of this process (ru_maxrss, KiB on Linux) and, on CUDA, torch's peak allocation."""
    import resource  # Unix only, and needed only with --timing

    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        peak["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return peak


def to_device(array, staging: torch.Tensor, device):
    """A numpy array from the env as a tensor of staging's dtype on the device. CPU: no copy where the dtypes agree.
    CUDA: copied into the preallocated pinned `staging`, then sent asynchronously; safe, because the next step's action
    read-back synchronizes before staging is written again."""
    if device.type != "cuda":
        return torch.as_tensor(array, dtype=staging.dtype)
    staging.copy_(torch.from_numpy(array))
    return staging.to(device, non_blocking=True)


class EpisodeTracker:
    """Running return/length per env; procgen's vector env reports only per-step rewards and dones."""

    def __init__(self, num_envs):
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def update(self, rewards, dones):
        """Add one step; return (returns, lengths) of the episodes that just ended."""
        self.returns += rewards
        self.lengths += 1
        finished = (self.returns[dones].copy(), self.lengths[dones].copy())
        self.returns[dones] = 0.0
        self.lengths[dones] = 0
        return finished


def normalized_score(env_id, returns):
    """(R - R_min) / (R_max - R_min) with the easy-mode constants; None for games outside the paper's six."""
    if env_id not in PROCGEN_RETURN_RANGE or len(returns) == 0:
        return None
    r_min, r_max = PROCGEN_RETURN_RANGE[env_id]
    return float((np.mean(returns) - r_min) / (r_max - r_min))


def make_env(args: Args, num_envs, start_level, num_levels, seed):
    return ProcgenEnv(
        num_envs=num_envs,
        env_name=args.env_id,
        num_levels=num_levels,
        start_level=start_level,
        distribution_mode=args.distribution_mode,
        rand_seed=seed,
    )


@torch.no_grad()
def evaluate(agent, args: Args, device, iteration):
    """Held-out evaluation: first episode of each of `num_eval_envs` envs on levels the agent never trained on,
    eval-mode policy. A fresh env and a forked RNG seeded from (seed, iteration), so evaluation is a function of the
    parameters alone and leaves the training RNG stream untouched (a resumed run matches an uninterrupted one)."""
    envs = make_env(args, args.num_eval_envs, args.num_levels, args.num_test_levels, args.seed + 1_000_003 * iteration)
    was_training = agent.training
    agent.eval()
    tracker = EpisodeTracker(args.num_eval_envs)
    episode_returns = np.full(args.num_eval_envs, np.nan)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + iteration)
        next_obs = envs.reset()["rgb"]
        while np.isnan(episode_returns).any():
            action, _, _, _ = agent.get_action_and_value(torch.as_tensor(next_obs, device=device))
            obs, reward, done, _ = envs.step(action.cpu().numpy())
            next_obs = obs["rgb"]
            finished = np.isnan(episode_returns) & done
            episode_returns[finished] = tracker.returns[finished] + reward[finished]
            tracker.update(reward, done)
    envs.close()
    agent.train(was_training)
    return episode_returns


def env_state(envs):
    """Procgen's full simulator state (one byte string per env), as uint8 tensors for a weights_only checkpoint."""
    return [torch.frombuffer(bytearray(state), dtype=torch.uint8) for state in envs.env.callmethod("get_state")]


def get_rng_states(diag_generator):
    """Every RNG stream the training consumes, in weights_only-loadable types (numpy's key array as a tensor)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "diag": diag_generator.get_state(),
    }


def set_rng_states(states, diag_generator):
    random.setstate(tuple(item if not isinstance(item, list) else tuple(item) for item in states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    diag_generator.set_state(states["diag"])


def save_checkpoint(path, state):
    """Atomic write: a crash mid-save leaves the previous checkpoint intact."""
    tmp_path = path + ".tmp"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(path, args: Args):
    """Read and check a checkpoint written by --save-model; one-line ConfigError on anything wrong."""
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"--resume {path}: not a readable checkpoint ({type(e).__name__}); use one written by --save-model"
        ) from None
    required = {"agent", "optimizer", "global_step", "iteration", "args", "run_name", "rng", "env"}
    if not isinstance(checkpoint, dict) or not required <= set(checkpoint):
        raise ConfigError(f"--resume {path}: not a checkpoint of this script (missing {sorted(required - set(checkpoint))})")
    saved = {**asdict(Args()), **checkpoint["args"]}  # a field added after the checkpoint was written: its default
    changed = [name for name, value in asdict(args).items() if name not in RESUMABLE_FIELDS and saved[name] != value]
    if changed:
        raise ConfigError(f"--resume {path}: the run used different {', '.join('--' + n.replace('_', '-') for n in changed)}")
    return checkpoint


def main(args: Args):
    validate_args(args)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    checkpoint = load_checkpoint(args.resume, args) if args.resume else None

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic  # fastest conv algorithms, picked by timing: not repeatable
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.cuda and not torch.cuda.is_available():
        print("note: --cuda requested but CUDA is not available; running on CPU")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup: training levels 0..num_levels-1, seeded (CleanRL's procgen script does not seed, so its runs differ)
    envs = make_env(args, args.num_envs, 0, args.num_levels, args.seed)
    num_actions = envs.action_space.n
    agent = Agent(num_actions, args).to(device)
    if args.channels_last and device.type == "cuda":  # NHWC observations already make the activations channels_last
        agent = agent.to(memory_format=torch.channels_last)  # (not on CPU: no gain there, and the grad-norm sum reorders)
    if args.compile:  # in place: the state_dict keys stay the same, so checkpoints load either way
        agent.backbone.compile(dynamic=False)
    optimizer = torch.optim.Adam(
        agent.parameters(), lr=args.learning_rate, eps=1e-5, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )
    if args.alpha2 > 0 and args.norm not in MODE_DEPENDENT_NORMS:
        print(f"note: --norm {args.norm} has no mode-dependent layer, so the rectification phase equals the standard one")

    # storage setup; observations stay uint8 (4x smaller than float32), converted per minibatch
    obs_shape = envs.observation_space["rgb"].shape
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    logits = torch.zeros((args.num_steps, args.num_envs, num_actions)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    # host-side staging of the env's outputs, pinned on CUDA so that their per-step copies to the device are asynchronous
    pin = device.type == "cuda"
    staging = {
        "obs": torch.empty((args.num_envs,) + obs_shape, dtype=torch.uint8, pin_memory=pin),
        "reward": torch.empty(args.num_envs, dtype=torch.float32, pin_memory=pin),
        "done": torch.empty(args.num_envs, dtype=torch.float32, pin_memory=pin),
    }
    timer = SectionTimer(args.timing, device)

    # TRY NOT TO MODIFY: start the game
    global_step, start_iteration = 0, 1
    next_obs = torch.as_tensor(envs.reset()["rgb"]).to(device)
    next_done = torch.zeros(args.num_envs).to(device)
    tracker = EpisodeTracker(args.num_envs)
    diag_generator = torch.Generator().manual_seed(args.seed)  # own stream: diagnostics never shift the training RNG
    run_name = f"{args.env_id}__{args.exp_name}__{args.norm}__mdr{args.alpha1}-{args.alpha2}__{args.seed}__{int(time.time())}"
    wandb_id = None
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
        run_name, wandb_id = checkpoint["run_name"], checkpoint.get("wandb_id")
        envs.env.callmethod("set_state", [bytes(state.numpy()) for state in checkpoint["env"]["procgen"]])
        next_obs = checkpoint["env"]["next_obs"].to(device)
        next_done = checkpoint["env"]["next_done"].to(device)
        tracker.returns, tracker.lengths = checkpoint["env"]["returns"].numpy(), checkpoint["env"]["lengths"].numpy()
        set_rng_states(checkpoint["rng"], diag_generator)
        print(f"resumed {run_name} at iteration {checkpoint['iteration']}, global_step {global_step}")

    # logging: only now, after every check has passed, is anything written
    run_dir = os.path.join("runs", run_name)
    if args.track:
        import wandb

        wandb_run = wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            group=args.wandb_group,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            tags=[args.env_id, f"norm={args.norm}", f"mdr=({args.alpha1},{args.alpha2})", f"seed={args.seed}"],
            id=wandb_id,  # None on a fresh run: wandb picks one, kept in the checkpoint so --resume continues it
            resume="allow",
            save_code=True,
        )
        wandb_id = wandb_run.id
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    def checkpoint_state(iteration):
        return {
            "agent": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "global_step": global_step,
            "iteration": iteration,
            "run_name": run_name,
            "wandb_id": wandb_id,
            "args": asdict(args),
            "rng": get_rng_states(diag_generator),
            "env": {
                "procgen": env_state(envs),
                "next_obs": next_obs.cpu(),
                "next_done": next_done.cpu(),
                "returns": torch.from_numpy(tracker.returns.copy()),
                "lengths": torch.from_numpy(tracker.lengths.copy()),
            },
        }

    # Ctrl-C: finish the current iteration, save, close cleanly; a second Ctrl-C quits at once
    stop_requested = []

    def request_stop(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(signum)
        print("\nCtrl-C: finishing this iteration, then saving a checkpoint (Ctrl-C again to quit at once)")

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    start_time, start_step = time.time(), global_step
    iteration, exit_code = start_iteration - 1, 0
    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            # Annealing the rate if instructed to do so.
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            # 1. Interaction: rollouts are always collected by the eval-mode policy (paper Sec. 3.2)
            timer.start()
            agent.eval()
            finished_returns, finished_lengths = [], []
            for step in range(0, args.num_steps):
                global_step += args.num_envs
                obs[step] = next_obs
                dones[step] = next_done
                with timer("inference"), torch.no_grad():
                    policy, value = agent.get_policy_and_value(next_obs)
                    action = policy.sample()
                    values[step] = value.flatten()
                    actions[step] = action
                    logprobs[step] = policy.log_prob(action)
                    logits[step] = policy.logits  # the behaviour policy: delta_pi_minus's eval-mode side (eq. 6)
                with timer("env"):
                    next_obs_np, reward, done, _ = envs.step(action.cpu().numpy())
                    rewards[step] = to_device(reward, staging["reward"], device)
                    next_obs = to_device(next_obs_np["rgb"], staging["obs"], device)
                    next_done = to_device(done, staging["done"], device)
                    episode_returns, episode_lengths = tracker.update(reward, done)
                    finished_returns.extend(episode_returns)
                    finished_lengths.extend(episode_lengths)

            # 2. Advantages and value targets (GAE) of the eval-mode values
            with timer("inference"), torch.no_grad():
                next_value = agent.get_value(next_obs).reshape(1, -1)
            with timer("update"), torch.no_grad():
                advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, args.gamma, args.gae_lambda)

            # flatten the batch
            batch = {
                "obs": obs.reshape((-1,) + obs.shape[2:]),
                "logprobs": logprobs.reshape(-1),
                "logits": logits.reshape(-1, num_actions),
                "actions": actions.reshape(-1),
                "advantages": advantages.reshape(-1),
                "returns": returns.reshape(-1),
                "values": values.reshape(-1),
            }
            diag_mb = min(args.diag_minibatches, args.batch_size // args.minibatch_size)  # 0: all of D_k; -1: off
            with timer("diagnostics"):
                delta_pi_minus = policy_mismatch(
                    agent, batch["obs"], args.minibatch_size, diag_mb, diag_generator, b_eval_logits=batch["logits"]
                )

            # 3. MDR update (Algorithm 1): per round, alpha1 epochs in train mode, then alpha2 epochs in eval mode
            phase_stats = {"standard": [], "rectify": []}
            b_inds = np.arange(args.batch_size)  # per iteration, as CleanRL: shuffles depend on the RNG alone (exact resume)
            with timer("update"):
                for mdr_round in range(args.mdr_rounds):
                    if mdr_round > 0:  # values and GAE recomputed on D_k by the eval-mode critic
                        batch["values"] = compute_values(agent, batch["obs"], args.minibatch_size)
                        with torch.no_grad():
                            next_value = agent.get_value(next_obs).reshape(1, -1)
                        advantages, returns = compute_gae(
                            rewards,
                            batch["values"].view_as(rewards),
                            dones,
                            next_value,
                            next_done,
                            args.gamma,
                            args.gae_lambda,
                        )
                        batch["advantages"], batch["returns"] = advantages.reshape(-1), returns.reshape(-1)
                    for phase, num_epochs in (("standard", args.alpha1), ("rectify", args.alpha2)):
                        agent.train(phase == "standard")
                        for epoch in range(num_epochs):
                            np.random.shuffle(b_inds)
                            epoch_inds = torch.as_tensor(b_inds, device=device)  # one host-to-device copy per epoch
                            for start in range(0, args.batch_size, args.minibatch_size):
                                mb_inds = epoch_inds[start : start + args.minibatch_size]
                                mb_index = len(phase_stats[phase])
                                measure = (
                                    phase == "standard" and args.diag_ratio_every > 0 and mb_index % args.diag_ratio_every == 0
                                )
                                phase_stats[phase].append(ppo_update(agent, optimizer, batch, mb_inds, args, measure, timer))
            agent.eval()
            with timer("diagnostics"):
                delta_pi_plus = policy_mismatch(agent, batch["obs"], args.minibatch_size, diag_mb, diag_generator)

            # 4. Logging (one host sync per iteration)
            all_stats = mean_stats(phase_stats["standard"] + phase_stats["rectify"])
            if not np.isfinite(all_stats["loss"]):
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {iteration} (global_step {global_step}); the run stops here and the "
                    "last checkpoint (if any) is intact; try a lower --learning-rate or --max-grad-norm"
                )
            y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            if finished_returns:
                writer.add_scalar("charts/episodic_return", np.mean(finished_returns), global_step)
                writer.add_scalar("charts/episodic_length", np.mean(finished_lengths), global_step)
                score = normalized_score(args.env_id, finished_returns)
                if score is not None:
                    writer.add_scalar("charts/normalized_score", score, global_step)
            for key in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
                writer.add_scalar(f"losses/{key}", all_stats[key], global_step)
            for phase, stats_list in phase_stats.items():
                if stats_list:
                    for key, value in mean_stats(stats_list).items():
                        prefix = "mdr" if key in ("ratio_gap", "trust_region_violation") else f"losses/{phase}"
                        writer.add_scalar(f"{prefix}/{key}", value, global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            if diag_mb >= 0:
                delta_pi_minus, delta_pi_plus = torch.stack([delta_pi_minus, delta_pi_plus]).tolist()
                writer.add_scalar("charts/delta_pi_minus", delta_pi_minus, global_step)
                writer.add_scalar("charts/delta_pi_plus", delta_pi_plus, global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            mean_return = f"{np.mean(finished_returns):.2f}" if finished_returns else "n/a"
            print(
                f"iteration={iteration}/{args.num_iterations}, global_step={global_step}, episodic_return={mean_return}, "
                f"delta_pi_minus={'n/a' if diag_mb < 0 else f'{delta_pi_minus:.2e}'}, SPS={sps}"
            )

            if (args.eval_interval and iteration % args.eval_interval == 0) or iteration == args.num_iterations:
                with timer("evaluation"):
                    test_returns = evaluate(agent, args, device, iteration)
                writer.add_scalar("charts/test_episodic_return", np.mean(test_returns), global_step)
                score = normalized_score(args.env_id, test_returns)
                if score is not None:
                    writer.add_scalar("charts/test_normalized_score", score, global_step)
                print(f"held-out evaluation: test_episodic_return={np.mean(test_returns):.2f} over {len(test_returns)} levels")

            if args.save_model and (iteration % args.checkpoint_interval == 0 or iteration == args.num_iterations):
                save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), checkpoint_state(iteration))
            if args.timing:  # seconds per section of this iteration, and the peak memory so far
                for name, value in {**timer.stop(), **peak_memory_gb(device)}.items():
                    writer.add_scalar(f"perf/{name}", value, global_step)
            if stop_requested:
                save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), checkpoint_state(iteration))
                print(f"stopped at iteration {iteration}; resume with --resume {os.path.join(run_dir, 'checkpoint.pt')}")
                exit_code = 130
                break
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        exit_code = 1
    except KeyboardInterrupt:
        print(f"interrupted during iteration {iteration}; nothing saved for it", file=sys.stderr)
        exit_code = 130
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        envs.close()
        writer.close()
        if args.track:
            wandb.finish(exit_code=exit_code)
    return exit_code


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    try:
        sys.exit(main(cli_args))
    except ConfigError as e:
        sys.exit(f"error: {e}")
