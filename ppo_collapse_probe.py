# Reward-collapse probe (paper Fig. 1 and 6, App. A and B): PPO on the patch-localization task with BatchNorm in
# train mode during updates and eval mode during collection (bn), BatchNorm frozen in eval mode (eval), or BatchNorm
# with Mode-Dependent Rectification (bn-mdr). One run per invocation, CleanRL-style, one file (+ envs/).
# Paper: Mohamad, Ponzio, Descombes, "Mode-Dependent Rectification for Stable PPO Training" (arXiv 2602.05619).
# Run:   python ppo_collapse_probe.py --mode bn --clip-coef 0.2 --seed 1      (then --mode eval, --mode bn-mdr)
# Plot:  python ppo_collapse_probe.py plot --runs-dir docs/collapse --out docs/collapse_fig6.png
# Every update logs reward, Delta pi minus/plus and the trust-region diagnostics to TensorBoard, wandb (--track) and
# runs/<run_name>/metrics.csv (one flushed row per update); a collapse detector flags crashes of the running reward
# and runs/<run_name>/summary.json records them. The defaults are the App. A regime ("fewer transitions per dataset,
# fewer optimization steps, four environments") sized for 2 CPU cores, <= 15 min per run (docs/collapse.md).
# Differences from ppo_patchloc_mdr.py: one MDR round per rollout (no advantage recomputation), a constant learning
# rate (a decaying one would damp late collapses), no held-out evaluation (the probe watches training reward), and
# no checkpoint/resume (a run is short; a killed run keeps its CSV, which is what the figure reads).
import contextlib
import csv
import json
import math
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

# OpenMP threads that spin while they wait steal the cores from the env and from other jobs: passive waiting measured
# up to 2.6x the SPS of ppo_procgen_mdr.py on 2 shared cores (docs/benchmarks.md). Read once, when torch loads OpenMP;
# yours wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import ResNet18_Weights, resnet18

from envs import PatchLocConfigError, PatchLocVecEnv, make_task_sets


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
    """the wandb group (default: mode, clip and entropy coefficient, so that seeds aggregate)"""

    # Speed (none changes what is computed beyond rounding, except --amp: bfloat16; docs/benchmarks.md measures them on
    # ppo_procgen_mdr.py)
    channels_last: bool = True
    """CUDA: keep the conv weights in channels_last memory format, like the NHWC observations (a no-op on CPU)"""
    amp: bool = False
    """run the backbone under bfloat16 autocast (CUDA; CPUs with bf16 units, e.g. AVX512-BF16); heads and losses in float32"""
    compile: bool = False
    """torch.compile the backbone (one compile per mode and batch shape: rollout, minibatch, a smaller last minibatch)"""
    torch_threads: int = 1
    """CPU threads of torch (1: on a small shared machine more threads slow a run down; 0 = torch's default)"""
    timing: bool = False
    """log the wall and CPU time per section (env, inference, update, diagnostics, other) and peak memory under perf/
    (TensorBoard only; metrics.csv is unchanged); on CUDA it synchronizes at section boundaries, so leave it off for
    the probe's runs"""

    # What is compared (paper Fig. 6: rows = mode, columns = clip; App. B: entropy coefficient)
    mode: str = "bn"
    """bn (BatchNorm: train mode in updates, eval mode in collection), eval (BatchNorm frozen in eval mode), bn-mdr"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient epsilon (Fig. 6: 0.2 and 0.05)"""
    ent_coef: float = 0.01
    """coefficient of the entropy (App. B compares it with 0)"""
    update_epochs: int = 3
    """epochs E per rollout in every mode: bn and eval train all E in their mode, bn-mdr splits them alpha1 + alpha2"""
    alpha1: Optional[int] = None
    """bn-mdr only: epochs in train mode (standard phase); default E - alpha2"""
    alpha2: Optional[int] = None
    """bn-mdr only: epochs in eval mode (rectification phase); default E // 3 (at least 1), i.e. MDR(2,1) of 3"""

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
    """the number of steps to run in each environment per policy rollout (few transitions per D_k)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    minibatch_size: int = 32
    """the minibatch size m (when it does not divide |D_k|, the last minibatch of an epoch is smaller)"""
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
    pretrained: bool = False
    """initialise the backbone from ImageNet (needs $TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth offline)"""
    hidden_size: int = 768
    """width of the actor and critic MLPs (paper: 768 = 3 views x 256 features)"""

    # Task set (envs/): App. A uses four training environments
    num_tasks: int = 4
    """number of training tasks (one image and target each)"""
    image_source: str = "procedural"
    """'procedural' (built-in generator, no download) or a folder of .jpg/.jpeg/.png images"""
    image_size: int = 128
    """side m that folder images are center-cropped and resized to (>= 4 x view size)"""
    view_size: int = 32
    """side of each of the three views (paper: 112; CPU-sized: 32)"""
    max_episode_steps: int = 20
    """steps before an episode is truncated"""

    # Collapse detector (on the normalized reward, percent of the optimal return)
    smooth_window: int = 10
    """updates in the moving average of the reward (the smoothed_reward column and the detector's input)"""
    collapse_drop: float = 0.5
    """flag a collapse when the smoothed reward falls below (1 - drop) x its running best"""
    collapse_min_best: float = 20.0
    """only once the running best exceeds this (percent; a random policy scores about -6)"""
    recover_frac: float = 0.8
    """a collapse is recovered when the smoothed reward is back to >= this x the pre-collapse best"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size |D_k| (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


@dataclass
class PlotArgs:
    runs_dir: str = "docs/collapse"
    """folder searched (recursively) for the runs' metrics.csv"""
    out: str = "docs/collapse_fig6.png"
    """Fig. 6 layout: rows BN / Eval / BN+MDR, columns clip 0.2 / 0.05"""
    entropy_out: str = "docs/collapse_entropy.png"
    """App. B layout: rows BN+MDR / Eval, one column per entropy coefficient found"""
    ent_coef: Optional[float] = None
    """entropy coefficient of the runs in the Fig. 6 layout (default: the most common one)"""
    entropy_clip: float = 0.2
    """clip coefficient of the runs in the App. B layout"""


class ConfigError(Exception):
    """Bad input: printed as one line, no traceback."""


class NonFiniteLossError(Exception):
    """The loss became NaN/inf: the run stops, its CSV and summary are kept."""


MODES = {"bn": "BN", "eval": "Eval", "bn-mdr": "BN+MDR"}
FIG6_CLIPS = (0.2, 0.05)
REWARD_YLIM = (-20.0, 100.0)  # normalized reward, percent of the optimal return (stopping at once: about -12)
DELTA_YLIM = (1e-5, 1.0)  # JS divergence in nats, <= ln 2
CSV_COLUMNS = [
    "iteration",
    "global_step",
    "mode",
    "clip_coef",
    "ent_coef",
    "seed",
    "alpha1",
    "alpha2",
    "episodes",
    "episodic_return",
    "normalized_reward",
    "smoothed_reward",
    "success_rate",
    "delta_pi_minus",
    "delta_pi_plus",
    "ratio_gap",
    "trust_region_violation",
    "entropy",
    "approx_kl",
    "clipfrac",
    "policy_loss",
    "value_loss",
    "explained_variance",
    "collapse_flag",
    "collapse_count",
    "sps",
    "wall_time",
]


def phase_epochs(args: Args) -> tuple:
    """(alpha1, alpha2) of --mode after checking them: bn/eval train all E epochs in one mode, bn-mdr splits E."""
    epochs = args.update_epochs
    if args.mode != "bn-mdr":
        if args.alpha1 is not None or args.alpha2 is not None:
            raise ConfigError(f"--alpha1/--alpha2 apply to --mode bn-mdr only (--mode {args.mode} trains all E epochs)")
        return epochs, 0
    alpha1, alpha2 = args.alpha1, args.alpha2
    if alpha1 is None and alpha2 is None:
        alpha2 = max(1, epochs // 3)
    alpha1 = epochs - alpha2 if alpha1 is None else alpha1
    alpha2 = epochs - alpha1 if alpha2 is None else alpha2
    if alpha1 < 0 or alpha2 < 1 or alpha1 + alpha2 != epochs:
        raise ConfigError(
            f"--alpha1 {alpha1} --alpha2 {alpha2}: bn-mdr needs alpha1 >= 0, alpha2 >= 1 and alpha1 + alpha2 = "
            f"--update-epochs {epochs} (MDR splits the epochs, it adds none)"
        )
    return alpha1, alpha2


def validate_args(args: Args) -> tuple:
    """Reject impossible settings before anything is created; returns (alpha1, alpha2)."""
    if args.mode not in MODES:
        raise ConfigError(f"--mode {args.mode}: must be one of {', '.join(MODES)}")
    if args.torch_threads < 0:
        raise ConfigError(f"--torch-threads {args.torch_threads}: must be >= 0")
    for name in ("update_epochs", "num_envs", "num_steps", "minibatch_size", "num_tasks", "hidden_size", "smooth_window"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    alphas = phase_epochs(args)
    batch_size = args.num_envs * args.num_steps
    if args.minibatch_size > batch_size:
        raise ConfigError(
            f"--minibatch-size {args.minibatch_size} exceeds the rollout size num_envs x num_steps = {batch_size}"
        )
    if args.total_timesteps < batch_size:
        raise ConfigError(f"--total-timesteps {args.total_timesteps} is smaller than one rollout ({batch_size} steps)")
    if not 0.0 < args.clip_coef or args.ent_coef < 0 or not 0.0 < args.bn_momentum <= 1.0:
        raise ConfigError("need --clip-coef > 0, --ent-coef >= 0 and 0 < --bn-momentum <= 1")
    if not 0.0 < args.collapse_drop < 1.0 or not 1.0 - args.collapse_drop < args.recover_frac <= 1.0:
        raise ConfigError(
            f"--collapse-drop {args.collapse_drop} --recover-frac {args.recover_frac}: need 0 < drop < 1 and "
            "1 - drop < recover-frac <= 1 (recovery must mean more than the collapse threshold)"
        )
    return alphas


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class EvalModeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalizes with its running statistics (`--mode eval`): the stats stay frozen
    (ImageNet's when pretrained, 0/1 at random init) whatever the module's mode; the affine parameters still learn."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def load_imagenet_weights(backbone: nn.Module) -> None:
    """Load torchvision's ImageNet ResNet-18 (convs, BN affine params and running stats) into the shallow backbone."""
    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        state_dict = weights.get_state_dict(progress=False)
    except Exception as e:  # offline (URLError), or a truncated file in the cache (RuntimeError)
        raise ConfigError(
            f"ImageNet weights unavailable ({type(e).__name__}): put resnet18-f37072fd.pth at {cached} or drop --pretrained"
        ) from None
    own = backbone.state_dict()
    backbone.load_state_dict(
        {
            name: tensor
            for name, tensor in state_dict.items()
            if name in own and own[name].shape == tensor.shape and not name.endswith("num_batches_tracked")
        },
        strict=False,
    )


def make_backbone(args: Args) -> nn.Module:
    """Shallow ResNet-18 (paper Table 1): torchvision's resnet18 without layer4 and fc; average pool -> 256 features.
    The norm layer is the one line that differs between the modes."""
    norm_layer = EvalModeBatchNorm2d if args.mode == "eval" else partial(nn.BatchNorm2d, momentum=args.bn_momentum)
    backbone = resnet18(weights=None, norm_layer=norm_layer)
    backbone.layer4 = nn.Identity()
    backbone.fc = nn.Identity()
    if args.pretrained:
        load_imagenet_weights(backbone)
    return backbone


class Agent(nn.Module):
    """Paper Table 1: one shallow ResNet-18 backbone applied to the three views (target, overview, current view),
    3 x 256 = 768 features concatenated; separate actor and critic MLPs (FC-ReLU-FC-ReLU-out)."""

    def __init__(self, num_actions: int, args: Args):
        super().__init__()
        self.amp = args.amp
        self.backbone = make_backbone(args)
        hidden = args.hidden_size
        self.actor = nn.Sequential(
            layer_init(nn.Linear(3 * 256, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, num_actions), std=0.01),
        )
        self.critic = nn.Sequential(
            layer_init(nn.Linear(3 * 256, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )

    def features(self, x):
        # uint8 (B, 3 views, V, V, 3) -> one backbone pass over B*3 float images in [0, 1], channels_last in memory
        # (shared weights; BatchNorm's batch statistics span all views) -> (B, 768). No ImageNet mean/std (paper
        # Table 2). Divided in place: one float copy of the minibatch, not two. --amp: the backbone in bfloat16.
        batch, views = x.shape[:2]
        images = x.reshape((batch * views,) + x.shape[2:]).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.backbone(images).float().reshape(batch, views * 256)

    def get_value(self, x):
        return self.critic(self.features(x))

    def get_action_and_value(self, x, action=None):
        hidden = self.features(x)
        logits = self.actor(hidden)
        probs = Categorical(logits=logits, validate_args=False)  # NaN logits reach the non-finite-loss check
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden)


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


def js_divergence(logits_p, logits_q):
    """Jensen-Shannon divergence (nats, per row) between two categorical distributions; 0 <= JS <= ln 2."""
    log_p, log_q = F.log_softmax(logits_p, dim=-1), F.log_softmax(logits_q, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0.0, max=math.log(2.0))


@torch.no_grad()
def policy_mismatch(agent, b_obs, minibatch_size, generator):
    """Delta pi (paper eq. 6-7): mean JS divergence between the train-mode policy (batch statistics of a shuffled
    minibatch of size m) and the eval-mode policy, over all full minibatches of D_k, both sides computed here (the
    Eval configuration's zero is then exact). Both use the current running statistics: each train-mode pass moves
    them, so they are restored after it.
    Side-effect free: running stats, num_batches_tracked, parameters and the global RNG streams are restored."""
    was_training = agent.training
    saved_buffers = {name: buf.clone() for name, buf in agent.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    perm = torch.randperm(len(b_obs), generator=generator).to(b_obs.device)
    divergences = []
    for start in range(0, len(b_obs) // minibatch_size * minibatch_size, minibatch_size):
        mb_obs = b_obs[perm[start : start + minibatch_size]]
        agent.eval()
        eval_logits = agent.actor(agent.features(mb_obs))
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
    """Wall and CPU time per section of an update (--timing): `with timer("env"): ...`. Sections nest; time counts
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
        """Begin an update."""
        if self.enabled:
            self.totals, self.open = {}, []
            self._charge()
            self.open.append("other")

    def stop(self) -> dict:
        """End the update: its seconds per section, {"env_time": wall, "env_cpu": CPU, ...} (empty when disabled)."""
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


class CollapseDetector:
    """Flags reward collapses on a per-update reward series (NaN = no episode finished: skipped).

    The running reward is the moving average of the last `window` values; detection starts once the window is full.
    A collapse is flagged at the update where the running reward falls below (1 - drop) x its running best, provided
    that best is >= min_best (meaningfully above a random policy). The run is then in collapse until the running
    reward is back to >= recover_frac x the pre-collapse best: that update is recorded as the recovery. Only then
    can a new collapse be flagged."""

    def __init__(self, window: int, drop: float, min_best: float, recover_frac: float):
        self.drop, self.min_best, self.recover_frac = drop, min_best, recover_frac
        self.recent = deque(maxlen=window)
        self.smoothed = float("nan")
        self.best, self.best_iteration = float("-inf"), None
        self.collapses = []  # one dict per collapse: iteration, pre_collapse_best, recovery_iteration (None until then)

    @property
    def in_collapse(self) -> bool:
        return bool(self.collapses) and self.collapses[-1]["recovery_iteration"] is None

    def update(self, iteration: int, reward: float) -> bool:
        """Feed the reward of one update; returns True when a collapse is flagged at this update."""
        if not math.isfinite(reward):
            return False
        self.recent.append(reward)
        self.smoothed = float(np.mean(self.recent))
        if len(self.recent) < self.recent.maxlen:
            return False
        if self.in_collapse:
            if self.smoothed >= self.recover_frac * self.collapses[-1]["pre_collapse_best"]:
                self.collapses[-1]["recovery_iteration"] = iteration
        elif self.best >= self.min_best and self.smoothed < (1.0 - self.drop) * self.best:
            self.collapses.append({"iteration": iteration, "pre_collapse_best": self.best, "recovery_iteration": None})
            return True
        if self.smoothed > self.best:
            self.best, self.best_iteration = self.smoothed, iteration
        return False


def run_summary(detector: CollapseDetector, rows: list, status: str, args: Args) -> dict:
    """summary.json: the collapses and recoveries, best and final running reward, peak Delta pi minus."""
    deltas = [(row["delta_pi_minus"], row["iteration"]) for row in rows if math.isfinite(row["delta_pi_minus"])]
    peak_delta, peak_iteration = max(deltas) if deltas else (None, None)
    smoothed = [row["smoothed_reward"] for row in rows if math.isfinite(row["smoothed_reward"])]
    finite_or_none = lambda value: value if value is not None and math.isfinite(value) else None  # noqa: E731
    return {
        "status": status,
        "mode": args.mode,
        "clip_coef": args.clip_coef,
        "ent_coef": args.ent_coef,
        "seed": args.seed,
        "iterations": len(rows),
        "global_step": rows[-1]["global_step"] if rows else 0,
        "wall_time_s": rows[-1]["wall_time"] if rows else 0.0,
        "collapse_iterations": [event["iteration"] for event in detector.collapses],
        "recovery_iterations": [event["recovery_iteration"] for event in detector.collapses],
        "pre_collapse_best": [event["pre_collapse_best"] for event in detector.collapses],
        "best_reward": finite_or_none(detector.best),
        "best_reward_iteration": detector.best_iteration,
        "max_smoothed_reward": max(smoothed) if smoothed else None,
        "final_reward": smoothed[-1] if smoothed else None,
        "peak_delta_pi_minus": peak_delta,
        "peak_delta_pi_minus_iteration": peak_iteration,
        "reward_unit": "normalized reward, percent of the optimal return, moving average over --smooth-window updates",
        "args": asdict(args),
    }


def format_csv_value(value):
    return f"{value:.6g}" if isinstance(value, float) else value


# ----------------------------------------------------------------------------------------------------------------------
# Figures (the `plot` entry point): read the runs' CSVs, draw Fig. 6 and the App. B entropy comparison


def read_runs(runs_dir: str) -> list:
    """Every metrics.csv under runs_dir (recursively) as {mode, clip_coef, ent_coef, seed, path, columns...}."""
    runs = []
    for root, _, files in sorted(os.walk(runs_dir)):
        if "metrics.csv" not in files:
            continue
        path = os.path.join(root, "metrics.csv")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        run = {"path": path, "mode": rows[0]["mode"], "seed": int(rows[0]["seed"])}
        run["clip_coef"], run["ent_coef"] = float(rows[0]["clip_coef"]), float(rows[0]["ent_coef"])
        for column in ("iteration", "global_step", "smoothed_reward", "delta_pi_minus", "collapse_flag"):
            run[column] = np.array([float(row[column]) for row in rows])
        runs.append(run)
    return runs


def select_runs(runs: list, mode: str, clip_coef: float, ent_coef: float) -> list:
    return [
        run
        for run in runs
        if run["mode"] == mode and math.isclose(run["clip_coef"], clip_coef) and math.isclose(run["ent_coef"], ent_coef)
    ]


def mean_curve(runs: list, column: str):
    """Mean over runs per iteration (runs of different lengths: the mean of those that reached it); (x, mean)."""
    by_iteration = {}
    for run in runs:
        for iteration, step, value in zip(run["iteration"], run["global_step"], run[column]):
            if math.isfinite(value):
                by_iteration.setdefault(int(iteration), (step, []))[1].append(value)
    iterations = sorted(by_iteration)
    return np.array([by_iteration[i][0] for i in iterations]), np.array([np.mean(by_iteration[i][1]) for i in iterations])


def fluctuation(run) -> float:
    """Std of the update-to-update change of the smoothed reward (App. B picks the most fluctuating seeds)."""
    values = run["smoothed_reward"][np.isfinite(run["smoothed_reward"])]
    return float(np.std(np.diff(values))) if len(values) > 2 else 0.0


def draw_panel(ax, runs: list, title: str, aggregate: str = "mean"):
    """Reward (left axis) and Delta pi minus (right axis, log) of `runs`: seeds thin, aggregate thick, collapses x.
    aggregate: 'mean' over seeds (Fig. 6) or 'min' over the two most fluctuating seeds (App. B)."""
    ax.set_title(f"{title} ({len(runs)} seed{'s' * (len(runs) != 1)})", fontsize=9)
    if not runs:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    delta_ax = ax.twinx()
    delta_x, delta = mean_curve(runs, "delta_pi_minus")
    show_delta = bool(np.any(delta > DELTA_YLIM[0]))  # eval mode: 0 by definition (rounding leaves ~1e-8)
    for run in runs:
        ax.plot(run["global_step"], run["smoothed_reward"], color="tab:blue", lw=0.7, alpha=0.5)
        flagged = run["collapse_flag"] > 0
        ax.plot(run["global_step"][flagged], run["smoothed_reward"][flagged], "kx", ms=6, mew=1.5)
        positive = run["delta_pi_minus"] > 0
        if show_delta:
            delta_ax.plot(run["global_step"][positive], run["delta_pi_minus"][positive], color="tab:red", lw=0.7, alpha=0.4)
    if aggregate == "min":
        worst = sorted(runs, key=fluctuation, reverse=True)[:2]
        length = min(len(run["smoothed_reward"]) for run in worst)
        worst_reward = np.min([run["smoothed_reward"][:length] for run in worst], axis=0)
        ax.plot(worst[0]["global_step"][:length], worst_reward, color="tab:blue", lw=2.2)
    else:
        reward_x, reward = mean_curve(runs, "smoothed_reward")
        ax.plot(reward_x, reward, color="tab:blue", lw=2.2)
    ax.set_ylim(*REWARD_YLIM)  # every panel on the same scales, as in the paper's figure
    if show_delta:
        delta_ax.plot(delta_x[delta > 0], delta[delta > 0], color="tab:red", lw=2.0)
        delta_ax.set_yscale("log")
        delta_ax.set_ylim(*DELTA_YLIM)
    else:
        delta_ax.text(0.98, 0.04, "Δπ⁻ ≈ 0", ha="right", va="bottom", transform=ax.transAxes, color="tab:red", fontsize=8)
        delta_ax.set_yticks([])
    ax.set_ylabel("reward (% of optimum)", color="tab:blue", fontsize=8)
    delta_ax.set_ylabel("Δπ⁻ (JS, nats)", color="tab:red", fontsize=8)
    ax.tick_params(labelsize=7)
    delta_ax.tick_params(labelsize=7)
    ax.set_xlabel("environment steps", fontsize=8)


def save_figure(fig, title, path):
    """Title, tight layout, PNG at `path` (folders created), figure closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_main(plot_args: PlotArgs) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isdir(plot_args.runs_dir):
        raise ConfigError(f"--runs-dir {plot_args.runs_dir}: no such folder")
    runs = read_runs(plot_args.runs_dir)
    if not runs:
        raise ConfigError(f"--runs-dir {plot_args.runs_dir}: no metrics.csv found")
    ent_coefs = sorted({run["ent_coef"] for run in runs}, reverse=True)
    ent_coef = plot_args.ent_coef
    if ent_coef is None:
        ent_coef = max(ent_coefs, key=lambda e: sum(math.isclose(run["ent_coef"], e) for run in runs))

    fig, axes = plt.subplots(len(MODES), len(FIG6_CLIPS), figsize=(11, 8.5), squeeze=False)
    for row, (mode, label) in enumerate(MODES.items()):
        for col, clip in enumerate(FIG6_CLIPS):
            draw_panel(axes[row][col], select_runs(runs, mode, clip, ent_coef), f"{label}, clip {clip}")
    save_figure(
        fig,
        f"Reward (blue, moving average) and Δπ⁻ (red, log) per update; entropy {ent_coef:g}; thin: seeds, thick: mean, "
        "x: collapse flagged",
        plot_args.out,
    )
    print(f"wrote {plot_args.out} ({len(runs)} runs found, Fig. 6 uses entropy {ent_coef:g})")

    rows = ("bn-mdr", "eval")
    fig, axes = plt.subplots(len(rows), len(ent_coefs), figsize=(5.5 * len(ent_coefs), 6), squeeze=False)
    for row, mode in enumerate(rows):
        for col, ent in enumerate(ent_coefs):
            panel_runs = select_runs(runs, mode, plot_args.entropy_clip, ent)
            draw_panel(axes[row][col], panel_runs, f"{MODES[mode]}, entropy {ent:g}", aggregate="min")
    save_figure(
        fig,
        f"App. B: entropy coefficient, clip {plot_args.entropy_clip:g}; thick: min over the two most fluctuating seeds",
        plot_args.entropy_out,
    )
    print(f"wrote {plot_args.entropy_out} (entropy coefficients {', '.join(f'{e:g}' for e in ent_coefs)})")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Training


def main(args: Args):
    alpha1, alpha2 = validate_args(args)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size

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

    # env setup: the training tasks drawn from the seed (the held-out set, one task, is not used by the probe)
    try:
        train_tasks, _ = make_task_sets(args.num_tasks, 1, args.image_source, args.image_size, args.view_size, seed=args.seed)
        envs = PatchLocVecEnv(train_tasks, args.num_envs, max_steps=args.max_episode_steps)
    except PatchLocConfigError as e:
        raise ConfigError(str(e)) from None
    agent = Agent(envs.single_action_space.n, args).to(device)
    if args.channels_last and device.type == "cuda":  # NHWC observations already make the activations channels_last
        agent = agent.to(memory_format=torch.channels_last)  # (not on CPU: no gain there, and the grad-norm sum reorders)
    if args.compile:  # in place: the state_dict keys stay the same
        agent.backbone.compile(dynamic=False)
    optimizer = torch.optim.Adam(
        agent.parameters(), lr=args.learning_rate, eps=1e-5, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )
    detector = CollapseDetector(args.smooth_window, args.collapse_drop, args.collapse_min_best, args.recover_frac)

    # storage setup; observations stay uint8, converted per minibatch
    obs_shape = envs.single_observation_space.shape
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
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
    global_step = 0
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs).to(device)
    next_done = torch.zeros(args.num_envs).to(device)
    diag_generator = torch.Generator().manual_seed(args.seed)  # own stream: diagnostics never shift the training RNG
    run_name = f"collapse__{args.mode}__clip{args.clip_coef:g}__ent{args.ent_coef:g}__{args.seed}__{int(time.time())}"

    # logging: only now, after every check has passed, is anything written
    run_dir = os.path.join("runs", run_name)
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            group=args.wandb_group or f"{args.mode}__clip{args.clip_coef:g}__ent{args.ent_coef:g}",
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            tags=[f"mode={args.mode}", f"clip={args.clip_coef:g}", f"ent={args.ent_coef:g}", f"seed={args.seed}"],
            save_code=True,
        )
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
    csv_file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
    csv_writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
    csv_writer.writeheader()
    csv_file.flush()
    print(
        f"run {run_name}: --mode {args.mode} = MDR({alpha1},{alpha2}), |D_k| {args.batch_size}, {args.num_iterations} updates"
    )

    def stop_on_sigterm(signum, frame):  # `kill` (e.g. a job scheduler) ends the run like Ctrl-C: summary.json written
        raise KeyboardInterrupt

    previous_sigterm = signal.signal(signal.SIGTERM, stop_on_sigterm)
    b_inds = np.arange(args.batch_size)
    start_time = time.time()
    rows, status, exit_code = [], "completed", 0
    try:
        for iteration in range(1, args.num_iterations + 1):
            # 1. Interaction: rollouts are always collected by the eval-mode policy (paper Sec. 3.2)
            timer.start()
            agent.eval()
            finished = {"r": [], "normalized_r": [], "success": []}
            for step in range(0, args.num_steps):
                global_step += args.num_envs
                obs[step] = next_obs
                dones[step] = next_done
                with timer("inference"), torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(next_obs)
                    values[step] = value.flatten()
                    actions[step] = action
                    logprobs[step] = logprob
                with timer("env"):
                    next_obs_np, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
                    rewards[step] = to_device(reward, staging["reward"], device)
                    next_obs = to_device(next_obs_np, staging["obs"], device)
                    next_done = to_device(np.logical_or(terminations, truncations), staging["done"], device)
                    if "episode" in infos:
                        for key in finished:
                            finished[key].extend(infos["episode"][key][infos["_episode"]])

            # 2. Advantages and value targets (GAE) of the eval-mode values
            with timer("inference"), torch.no_grad():
                next_value = agent.get_value(next_obs).reshape(1, -1)
            with timer("update"), torch.no_grad():
                advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, args.gamma, args.gae_lambda)
            batch = {
                "obs": obs.reshape((-1,) + obs.shape[2:]),
                "logprobs": logprobs.reshape(-1),
                "actions": actions.reshape(-1),
                "advantages": advantages.reshape(-1),
                "returns": returns.reshape(-1),
                "values": values.reshape(-1),
            }
            with timer("diagnostics"):
                delta_pi_minus = policy_mismatch(agent, batch["obs"], args.minibatch_size, diag_generator)

            # 3. Update: alpha1 epochs in train mode (standard phase), then alpha2 in eval mode (rectification, bn-mdr)
            phase_stats = {"standard": [], "rectify": []}
            with timer("update"):
                for phase, num_epochs in (("standard", alpha1), ("rectify", alpha2)):
                    agent.train(phase == "standard")
                    for epoch in range(num_epochs):
                        np.random.shuffle(b_inds)
                        epoch_inds = torch.as_tensor(b_inds, device=device)  # one host-to-device copy per epoch
                        for start in range(0, args.batch_size, args.minibatch_size):
                            mb_inds = epoch_inds[start : start + args.minibatch_size]
                            phase_stats[phase].append(
                                ppo_update(agent, optimizer, batch, mb_inds, args, phase == "standard", timer)
                            )
            agent.eval()
            with timer("diagnostics"):
                delta_pi_plus = policy_mismatch(agent, batch["obs"], args.minibatch_size, diag_generator)

            # 4. Logging: TensorBoard (and wandb through it), one CSV row, the collapse detector
            delta_pi_minus, delta_pi_plus = torch.stack([delta_pi_minus, delta_pi_plus]).tolist()  # one host sync
            all_stats = mean_stats(phase_stats["standard"] + phase_stats["rectify"])
            if not np.isfinite(all_stats["loss"]):
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {iteration} (global_step {global_step}); the run stops here, its "
                    "metrics.csv and summary.json are kept; try a lower --learning-rate or --max-grad-norm"
                )
            standard = mean_stats(phase_stats["standard"]) if phase_stats["standard"] else {}
            y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
            var_y = np.var(y_true)
            nan = float("nan")
            normalized = 100.0 * float(np.mean(finished["normalized_r"])) if finished["r"] else nan
            flag = detector.update(iteration, normalized)
            elapsed = time.time() - start_time
            row = {
                "iteration": iteration,
                "global_step": global_step,
                "mode": args.mode,
                "clip_coef": args.clip_coef,
                "ent_coef": args.ent_coef,
                "seed": args.seed,
                "alpha1": alpha1,
                "alpha2": alpha2,
                "episodes": len(finished["r"]),
                "episodic_return": float(np.mean(finished["r"])) if finished["r"] else nan,
                "normalized_reward": normalized,
                "smoothed_reward": detector.smoothed,
                "success_rate": float(np.mean(finished["success"])) if finished["r"] else nan,
                "delta_pi_minus": delta_pi_minus,
                "delta_pi_plus": delta_pi_plus,
                "ratio_gap": standard.get("ratio_gap", nan),
                "trust_region_violation": standard.get("trust_region_violation", nan),
                "entropy": all_stats["entropy"],
                "approx_kl": all_stats["approx_kl"],
                "clipfrac": all_stats["clipfrac"],
                "policy_loss": all_stats["policy_loss"],
                "value_loss": all_stats["value_loss"],
                "explained_variance": nan if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y),
                "collapse_flag": int(flag),
                "collapse_count": len(detector.collapses),
                "sps": int(global_step / elapsed),
                "wall_time": elapsed,
            }
            rows.append(row)
            csv_writer.writerow({key: format_csv_value(value) for key, value in row.items()})
            csv_file.flush()
            tensorboard_keys = {
                "charts/episodic_return": "episodic_return",
                "charts/normalized_reward": "normalized_reward",
                "charts/smoothed_reward": "smoothed_reward",
                "charts/success_rate": "success_rate",
                "charts/delta_pi_minus": "delta_pi_minus",
                "charts/delta_pi_plus": "delta_pi_plus",
                "mdr/ratio_gap": "ratio_gap",
                "mdr/trust_region_violation": "trust_region_violation",
                "losses/entropy": "entropy",
                "losses/approx_kl": "approx_kl",
                "losses/clipfrac": "clipfrac",
                "losses/policy_loss": "policy_loss",
                "losses/value_loss": "value_loss",
                "losses/explained_variance": "explained_variance",
                "collapse/flag": "collapse_flag",
                "collapse/count": "collapse_count",
                "charts/SPS": "sps",
            }
            for tag, column in tensorboard_keys.items():
                if math.isfinite(row[column]):
                    writer.add_scalar(tag, row[column], global_step)
            print(
                f"iteration={iteration}/{args.num_iterations}, global_step={global_step}, "
                f"episodic_return={row['episodic_return']:.3f}, normalized_reward={normalized:.1f}%, "
                f"smoothed={detector.smoothed:.1f}%, delta_pi_minus={delta_pi_minus:.2e}, SPS={row['sps']}"
                + (f"  <-- collapse #{len(detector.collapses)} flagged" if flag else ""),
                flush=True,  # the probe's logs are meant to be watched (tail -f)
            )
            if args.timing:  # seconds per section of this update, and the peak memory so far (TensorBoard only)
                for name, value in {**timer.stop(), **peak_memory_gb(device)}.items():
                    writer.add_scalar(f"perf/{name}", value, global_step)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        status, exit_code = "non-finite loss", 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C or SIGTERM); metrics.csv and summary.json keep the finished updates", file=sys.stderr)
        status, exit_code = "interrupted", 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        csv_file.close()
        summary = run_summary(detector, rows, status, args)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        envs.close()
        writer.close()
        if args.track:
            wandb.finish(exit_code=exit_code)
    print(
        f"summary: collapses at {summary['collapse_iterations']}, recovered at {summary['recovery_iterations']}, "
        f"best {summary['best_reward']}, final {summary['final_reward']}, peak delta_pi_minus "
        f"{summary['peak_delta_pi_minus']} (iteration {summary['peak_delta_pi_minus_iteration']}) -> {run_dir}"
    )
    return exit_code


if __name__ == "__main__":
    try:
        if len(sys.argv) > 1 and sys.argv[1] == "plot":
            sys.exit(plot_main(tyro.cli(PlotArgs, args=sys.argv[2:], prog=f"{sys.argv[0]} plot")))
        sys.exit(main(tyro.cli(Args)))
    except ConfigError as e:
        sys.exit(f"error: {e}")
