"""Training speed and memory of the three scripts, side by side in one run.

Each measurement is a fresh worker process (its own peak RSS, its own OpenMP settings) that imports
one script, drives its main() for a fixed short budget with the script's own functions wrapped in
timers (SectionTimer below: the scripts carry no timing code), then times the compute bound in the
same process: the same forward+backward passes of the same network (same modes, same minibatch
sizes, same --amp/--compile), and the same value recomputations between MDR rounds, on random uint8
tensors of the same shapes, with no indexing, loss bookkeeping, clipping or optimizer. Held-out
evaluation is not part of an iteration's cost: the Procgen one is stubbed out, the patch-loc one
runs on 4 tasks and is timed in its own section, left out of the sums. Configurations are
interleaved, the order reversed every other round (A, B, C, C, B, A, ...), so that the load of a
shared machine and any effect of a run's position in the round fall on all of them alike; figures
are medians over repeats x iterations with their min-max spread. Every figure comes twice: from wall
time, and from the CPU time of the worker process (all its threads), which other jobs on a shared
machine disturb far less.

    # every script, ~40 min on 2 cores
    python benchmarks/bench_sps.py --device cpu --json bench.json
    python benchmarks/bench_sps.py --device cpu --configs procgen/mdr,procgen/ppo --repeats 5
    # this checkout against an older commit's scripts, interleaved (issue 24: no speed regression)
    git worktree add /tmp/base 7fb6a75
    python benchmarks/bench_sps.py --device cpu --configs procgen/mdr,patchloc/mdr,probe/bn-mdr \
        --against /tmp/base
    python benchmarks/bench_sps.py --device cuda \
        --configs procgen/paper,procgen/paper-amp,procgen/paper-compile
    # memory at paper settings
    python benchmarks/bench_sps.py --configs procgen/paper-memory --repeats 1 --memory-design
    # smoke
    python benchmarks/bench_sps.py --configs procgen/paper,procgen/paper-amp --shape 4,16,32 \
        --warmup 0 --repeats 1
    # the rivals' cost (docs/rivals.md)
    python benchmarks/bench_sps.py --device cpu --repeats 3 --configs probe/bn,probe/eval,\
probe/bn-mdr,probe/bn-recal,probe/bn-train,probe/bn-oldtrain,probe/brn,probe/brn-mdr,probe/bn-wn,\
probe/gn,probe/none
    # LayerNorm's cost, added later (docs/rivals.md; a file of its own, measured beside bn)
    python benchmarks/bench_sps.py --device cpu --repeats 3 --configs probe/bn,probe/ln \
        --json docs/rivals/bench_probe_ln.json

Configurations (--configs, script/variant). Shapes: procgen 64 envs x 16 steps, minibatch 128
(paper: 256 steps, minibatch 2048); patchloc 4 envs x 48 steps, minibatch 16, views of 64 px (paper:
750 steps, minibatch 128, 112 px; the same number of minibatches per epoch within 2x, which sets
what the diagnostics cost); probe its own defaults (4 envs x 32 steps, minibatch 32, views of 32
px). Variants: mdr = MDR(2,1) with the default diagnostics; ppo = --alpha1 3 --alpha2 0 (probe: bn =
BN in train mode for all 3 epochs, eval = BN frozen); nodiag / ppo-nodiag = the same with the
diagnostics off; threads1 = --torch-threads 1 (probe: threads0 = torch's default, both cores; the
probe's own default is 1); spin = OMP_WAIT_POLICY=ACTIVE (the scripts' default is PASSIVE); amp /
amp1 = --amp (with --torch-threads 1); compile = --compile; paper, paper-amp, paper-compile,
paper-nochannelslast = the paper's 64 envs x 256 steps, minibatch 2048, one iteration (~7 min per
run on 2 CPU cores, compute bound included), the last with --no-channels-last (a no-op on CPU; on
CUDA the conv weights stay contiguous NCHW); paper-nodiag = paper with the diagnostics off and no
compute bound; paper-memory = the paper's shapes with one train-mode and one eval-mode epoch
(--update-epochs 2 --alpha1 1 --alpha2 1): every minibatch has the paper's size, so the peak memory
is the full iteration's; paper-memory-amp: the same with --amp. probe/<mode> for each rival mode of
docs/rivals.md (bn-recal, bn-train, ..., none, ln): the probe's defaults in that mode. --warmup and
--iterations, where given, replace every configuration's own counts (on a GPU a paper-shape
iteration takes seconds, and its first one pays for CUDA's and cuDNN's start-up); --shape replaces
every configuration's envs, steps and minibatch size (a smoke test of the benchmark itself, as
benchmarks/gpu_check.sh --quick runs it).
"""

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCGEN_OBS = (64, 64, 3)
NUM_PROCGEN_ACTIONS = 15
# "evaluation" is timed too, and left out
SECTIONS = ("env", "inference", "update", "diagnostics", "other")
# wall seconds; CPU seconds of the process (all threads), steadier on a shared machine
CLOCKS = ("time", "cpu")

# script -> (module, the benchmark's shape, fixed overrides of its Args)
SCRIPTS = {
    "procgen": (
        "ppo_procgen_mdr",
        {"num_envs": 64, "num_steps": 16, "minibatch_size": 128},
        {"eval_interval": 0, "pretrained": False},
    ),
    "patchloc": (
        "ppo_patchloc_mdr",
        {"num_envs": 4, "num_steps": 48, "minibatch_size": 16},
        {
            "pretrained": False,
            "view_size": 64,
            "num_tasks": 16,
            "num_test_tasks": 4,
            "num_eval_envs": 4,
            "num_render_episodes": 0,
        },
    ),
    "probe": ("ppo_collapse_probe", {"num_envs": 4, "num_steps": 32, "minibatch_size": 32}, {}),
}
# measured iterations per run, and unmeasured ones before them
RUN_LENGTH = {"iterations": 2, "warmup": 1}
PAPER_SHAPE = {
    "num_envs": 64,
    "num_steps": 256,
    "minibatch_size": 2048,
    "iterations": 1,
    "warmup": 0,
}
NO_DIAG = {"diag_minibatches": -1, "diag_ratio_every": 0}
MDR, PPO = {"alpha1": 2, "alpha2": 1}, {"alpha1": 3, "alpha2": 0}
# docs/rivals.md (ln: LayerNorm, benchmarked later in a file of its own)
PROBE_RIVALS = ("bn-recal", "bn-train", "bn-oldtrain", "brn", "brn-mdr", "bn-wn", "gn", "none")
PROBE_RIVALS += ("ln",)
# name -> (overrides of the script's Args, extra environment variables, overrides of the benchmark's
# shape)
CONFIGS = {
    "procgen/mdr": (MDR, {}, {}),
    "procgen/ppo": (PPO, {}, {}),
    "procgen/nodiag": ({**MDR, **NO_DIAG}, {}, {}),
    "procgen/ppo-nodiag": ({**PPO, **NO_DIAG}, {}, {}),
    "procgen/threads1": ({"torch_threads": 1}, {}, {}),
    "procgen/spin": ({}, {"OMP_WAIT_POLICY": "ACTIVE"}, {}),
    "procgen/amp": ({"amp": True}, {}, {}),
    "procgen/amp1": ({"amp": True, "torch_threads": 1}, {}, {}),
    "procgen/compile": ({"compile": True}, {}, {}),
    "procgen/paper": ({}, {}, PAPER_SHAPE),
    "procgen/paper-amp": ({"amp": True}, {}, PAPER_SHAPE),
    "procgen/paper-compile": ({"compile": True}, {}, PAPER_SHAPE),
    "procgen/paper-nochannelslast": ({"channels_last": False}, {}, PAPER_SHAPE),
    "procgen/paper-nodiag": (NO_DIAG, {}, {**PAPER_SHAPE, "bound": False}),
    "procgen/paper-memory": (
        {"update_epochs": 2, "alpha1": 1, "alpha2": 1},
        {},
        {**PAPER_SHAPE, "bound": False},
    ),
    "procgen/paper-memory-amp": (
        {"update_epochs": 2, "alpha1": 1, "alpha2": 1, "amp": True},
        {},
        {**PAPER_SHAPE, "bound": False},
    ),
    "patchloc/mdr": (MDR, {}, {}),
    "patchloc/ppo": (PPO, {}, {}),
    "patchloc/nodiag": ({**MDR, **NO_DIAG}, {}, {}),
    "patchloc/ppo-nodiag": ({**PPO, **NO_DIAG}, {}, {}),
    "patchloc/threads1": ({"torch_threads": 1}, {}, {}),
    "patchloc/amp": ({"amp": True}, {}, {}),
    "probe/bn-mdr": ({"mode": "bn-mdr"}, {}, {}),
    "probe/bn": ({"mode": "bn"}, {}, {}),
    "probe/eval": ({"mode": "eval"}, {}, {}),
    "probe/threads0": ({"mode": "bn-mdr", "torch_threads": 0}, {}, {}),
    **{f"probe/{mode}": ({"mode": mode}, {}, {}) for mode in PROBE_RIVALS},
}
DEFAULT_CONFIGS = (
    "procgen/mdr,procgen/ppo,procgen/nodiag,procgen/ppo-nodiag,procgen/threads1,procgen/spin,"
    "procgen/amp,"
    "patchloc/mdr,patchloc/ppo,patchloc/nodiag,probe/bn-mdr,probe/bn,probe/threads0"
)
# (a, b, label): ratios of a over b, paired by round
PAIRS = [
    ("procgen/mdr", "procgen/ppo", "Procgen: MDR(2,1) / PPO(3,0)"),
    ("procgen/nodiag", "procgen/ppo-nodiag", "Procgen: MDR(2,1) / PPO(3,0), diagnostics off"),
    ("procgen/nodiag", "procgen/mdr", "Procgen: diagnostics off / default diagnostics"),
    ("procgen/mdr", "procgen/spin", "Procgen: default (OMP passive) / OMP spinning"),
    ("procgen/threads1", "procgen/mdr", "Procgen: 1 thread / default (both cores)"),
    ("procgen/amp", "procgen/mdr", "Procgen: --amp / default"),
    ("procgen/amp1", "procgen/threads1", "Procgen: --amp / float32, both --torch-threads 1"),
    ("procgen/compile", "procgen/mdr", "Procgen: --compile / default"),
    ("procgen/paper-amp", "procgen/paper", "Procgen, paper shapes: --amp / default"),
    ("procgen/paper-compile", "procgen/paper", "Procgen, paper shapes: --compile / default"),
    (
        "procgen/paper",
        "procgen/paper-nochannelslast",
        "Procgen, paper shapes: channels_last (default) / --no-channels-last",
    ),
    (
        "procgen/paper-nodiag",
        "procgen/paper",
        "Procgen, paper shapes: diagnostics off / default diagnostics",
    ),
    ("patchloc/mdr", "patchloc/ppo", "Patch-loc: MDR(2,1) / PPO(3,0), 3 rounds"),
    ("patchloc/nodiag", "patchloc/ppo-nodiag", "Patch-loc: MDR(2,1) / PPO(3,0), diagnostics off"),
    ("patchloc/nodiag", "patchloc/mdr", "Patch-loc: diagnostics off / default diagnostics"),
    ("patchloc/threads1", "patchloc/mdr", "Patch-loc: 1 thread / default (both cores)"),
    ("patchloc/amp", "patchloc/mdr", "Patch-loc: --amp / default"),
    ("probe/bn-mdr", "probe/bn", "Probe: bn-mdr / bn (same 3 epochs)"),
    ("probe/bn-mdr", "probe/eval", "Probe: bn-mdr / eval"),
    ("probe/threads0", "probe/bn-mdr", "Probe: both cores / its default 1 thread"),
    *[(f"probe/{mode}", "probe/bn", f"Probe: {mode} / bn") for mode in PROBE_RIVALS],
]


# --------------------------------------------------------------------------------------------------
# worker: one training run + its compute bound, in this process


def clocks():
    return {"time": time.perf_counter(), "cpu": time.process_time()}


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def update_passes(script, ppo, args):
    """The update section's network passes of one iteration: [(training mode, minibatch size,
    backward)], in order."""
    alpha1, alpha2 = args.alpha1, args.alpha2  # every script resolves them from --update-epochs
    sizes = [
        min(args.minibatch_size, args.batch_size - start)
        for start in range(0, args.batch_size, args.minibatch_size)
    ]
    passes = []
    for mdr_round in range(getattr(args, "mdr_rounds", 1)):
        if mdr_round > 0:
            # eval-mode values of D_k (chunked by the minibatch size), then the bootstrap value
            passes += [(False, size, False) for size in sizes] + [(False, args.num_envs, False)]
        passes += [(True, size, True) for size in sizes] * alpha1 + [
            (False, size, True) for size in sizes
        ] * alpha2
    return passes


def compute_bound(script, ppo, args, device, obs_shape, num_actions):
    """Seconds of the update section's network passes and of the rollout's inference passes of one
    iteration, on a fresh network (same modes, --amp, --compile, channels_last) fed random uint8
    tensors of the same shapes."""
    import torch

    torch.manual_seed(0)
    agent = ppo.Agent(num_actions, args).to(device)
    if getattr(args, "channels_last", False) and device.type == "cuda":
        # the probe has neither flag
        agent = agent.to(memory_format=torch.channels_last)
    if getattr(args, "compile", False):
        agent.backbone.compile(dynamic=False)
    passes = update_passes(script, ppo, args)
    inputs = {
        size: (
            torch.randint(0, 256, (size,) + obs_shape, dtype=torch.uint8, device=device),
            torch.randint(0, num_actions, (size,), device=device),
        )
        for size in {size for _, size, _ in passes} | {args.num_envs}
    }

    def run(training, size, backward):
        agent.train(training)
        obs, actions = inputs[size]
        with torch.set_grad_enabled(backward):
            _, logprob, entropy, value = agent.get_action_and_value(obs, actions)
        if backward:
            (logprob.sum() + entropy.sum() + value.sum()).backward()
            agent.zero_grad(set_to_none=True)

    for signature in sorted(set(passes) | {(False, args.num_envs, False)}):
        # warm-up (and compilation) of each shape
        run(*signature)
    synchronize(device)
    start = clocks()
    for signature in passes:
        run(*signature)
    synchronize(device)
    middle = clocks()
    for _ in range(args.num_steps + 1):  # the rollout's steps and the bootstrap value
        run(False, args.num_envs, False)
    synchronize(device)
    end = clocks()
    return {
        "update": {clock: middle[clock] - start[clock] for clock in CLOCKS},
        "inference": {clock: end[clock] - middle[clock] for clock in CLOCKS},
    }


class SectionTimer:
    """Wall and CPU seconds per section of each iteration, measured from outside the script:
    `instrument` wraps the functions main() calls (env steps, the rollout's forward passes,
    ppo_update, the diagnostics, the evaluation) and cuts an iteration where main() logs it. A call
    inside a timed call counts to the outer one (the forward passes of ppo_update are update time);
    the rest of an iteration is "other". On CUDA it synchronizes at every boundary."""

    SECTION_OF = {  # the functions main() calls, where a script has them -> their section
        "compute_gae": "update",
        "ppo_update": "update",
        "recompute_advantages": "update",
        "recalibrate_batchnorm": "update",
        "train_mode_logprobs": "update",
        "policy_mismatch": "diagnostics",
        "eval_mode_ratio": "diagnostics",
        "evaluate": "evaluation",
        "evaluate_and_log": "evaluation",
    }
    # outside any other section: the rollout's passes
    AGENT_INFERENCE = ("get_policy_and_value", "get_value")
    # what main() builds its envs with; their step() is "env"
    ENV_FACTORIES = ("make_env", "PatchLocVecEnv")
    # RunLogger: log(scalars, iteration) or the probe's log_update(iteration, ...)
    ITERATION_ENDS = ("log", "log_update")

    def __init__(self, synchronize=lambda: None):
        self.synchronize = synchronize
        self.open = None  # the section of the timed call in progress
        self.patched = []
        self.iterations = []
        self.totals = {}
        self.mark = None

    def wrap(self, function, section):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self.open is not None:  # inside another timed call: counts to that one
                return function(*args, **kwargs)
            self.synchronize()
            start = clocks()
            self.open = section
            try:
                return function(*args, **kwargs)
            finally:
                self.synchronize()
                end = clocks()
                self.open = None
                for clock in CLOCKS:
                    self.totals[section, clock] = (
                        self.totals.get((section, clock), 0.0) + end[clock] - start[clock]
                    )

        return timed

    def end_iteration(self):
        """Close the iteration that started at the previous end (or at instrument()); "other" is its
        unaccounted time."""
        self.synchronize()
        now = clocks()
        record = {
            clock: {section: self.totals.get((section, clock), 0.0) for section in SECTIONS}
            for clock in CLOCKS
        }
        record["evaluation"] = {
            clock: self.totals.get(("evaluation", clock), 0.0) for clock in CLOCKS
        }
        for clock in CLOCKS:
            timed = sum(record[clock].values()) + record["evaluation"][clock]
            record[clock]["other"] = max(now[clock] - self.mark[clock] - timed, 0.0)
        self.iterations.append(record)
        self.totals = {}
        self.mark = now

    def finish(self):
        """After main(): the evaluation after the last iteration's log counts to it; every wrapper
        is removed."""
        if self.iterations:
            for clock in CLOCKS:
                self.iterations[-1]["evaluation"][clock] += self.totals.get(
                    ("evaluation", clock), 0.0
                )
        for owner, name, original in reversed(self.patched):
            setattr(owner, name, original)
        self.patched = []

    def patch(self, owner, name, replacement):
        self.patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def instrument(self, ppo):
        for name, section in self.SECTION_OF.items():
            if hasattr(ppo, name):
                self.patch(ppo, name, self.wrap(getattr(ppo, name), section))
        for name in self.AGENT_INFERENCE:
            self.patch(ppo.Agent, name, self.wrap(getattr(ppo.Agent, name), "inference"))
        for name in self.ENV_FACTORIES:
            if hasattr(ppo, name):
                self.patch(ppo, name, self.timed_env_factory(getattr(ppo, name)))
        for name in self.ITERATION_ENDS:
            if hasattr(ppo.RunLogger, name):
                self.patch(
                    ppo.RunLogger, name, self.ending_iteration(getattr(ppo.RunLogger, name), name)
                )
        self.mark = clocks()

    def timed_env_factory(self, factory):
        def make(*args, **kwargs):
            envs = factory(*args, **kwargs)
            envs.step = self.wrap(envs.step, "env")
            return envs

        return make

    def ending_iteration(self, method, name):
        def log(logger, *args, **kwargs):
            result = method(logger, *args, **kwargs)
            iteration = args[1] if name == "log" and len(args) > 1 else kwargs.get("iteration")
            if name == "log_update" or iteration is not None:
                # log(scalars) alone: the evaluation's scores
                self.end_iteration()
            return result

        return log


def worker(spec):
    """Run one configuration (the scripts of spec["root"]: this checkout or --against's); print one
    JSON line."""
    sys.path.insert(0, spec.get("root", REPO_ROOT))  # ahead of an editable install's envs too
    script = spec["script"]
    module, _, fixed = SCRIPTS[script]
    # before torch: the script sets OpenMP's wait policy (passive)
    ppo = importlib.import_module(module)
    import resource

    import numpy as np
    import torch

    shape = spec["shape"]
    batch_size = shape["num_envs"] * shape["num_steps"]
    args = ppo.Args(
        num_envs=shape["num_envs"],
        num_steps=shape["num_steps"],
        minibatch_size=shape["minibatch_size"],
        total_timesteps=batch_size * (shape["warmup"] + shape["iterations"]),
        cuda=spec["device"] == "cuda",
        **fixed,
        **spec["overrides"],
    )
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if script == "procgen":  # ~1 min per evaluation on 2 cores, and not part of an iteration's cost
        ppo.evaluate = lambda agent, args, *rest, **kwargs: np.zeros(args.num_eval_envs)
        obs_shape, num_actions = PROCGEN_OBS, NUM_PROCGEN_ACTIONS
    else:
        from envs import NUM_ACTIONS

        obs_shape, num_actions = (3, args.view_size, args.view_size, 3), NUM_ACTIONS
    os.chdir(tempfile.mkdtemp(prefix="bench_sps_"))
    timer = SectionTimer(lambda: synchronize(device))
    timer.instrument(ppo)
    start = time.perf_counter()
    exit_code = ppo.main(args)
    wall = time.perf_counter() - start
    timer.finish()
    assert exit_code in (0, None), exit_code
    # {clock: {section: seconds}, "evaluation": {clock: seconds}}
    iterations = timer.iterations[shape["warmup"] :]
    result = {
        "iterations": iterations,
        "sps": [batch_size / sum(it["time"].values()) for it in iterations],
        "cpu_ms_per_step": [1000 * sum(it["cpu"].values()) / batch_size for it in iterations],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "cuda_max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "script_file": os.path.abspath(ppo.__file__),  # which checkout ran: --against's check
    }
    if shape.get("bound", True):
        args.batch_size = batch_size
        result["bound"] = compute_bound(script, ppo, args, device, obs_shape, num_actions)
    print("RESULT " + json.dumps(result), flush=True)


def memory_design_worker(design, num_envs, num_steps, minibatch_size):
    """Peak RSS of CleanRL's storage design (float32 buffer, float gather, then / 255) vs ours
    (uint8 buffer, uint8 gather, one float copy divided in place): first the rollout storage and one
    minibatch's conversion alone, then with one train-mode forward+backward of the Procgen network
    on that minibatch (its activations) added."""
    sys.path.insert(0, REPO_ROOT)
    ppo = importlib.import_module("ppo_procgen_mdr")
    import torch

    def vm(field):
        with open("/proc/self/status") as status:
            # kB -> GiB
            return next(int(line.split()[1]) for line in status if line.startswith(field)) / 2**20

    torch.manual_seed(0)
    agent = ppo.Agent(NUM_PROCGEN_ACTIONS, ppo.Args(pretrained=False))
    base = vm("VmRSS")
    dtype = torch.float32 if design == "cleanrl" else torch.uint8
    # every page touched
    obs = torch.zeros((num_steps, num_envs) + PROCGEN_OBS, dtype=dtype).random_(0, 256)
    # the rollout's eval-mode logits, kept for delta_pi_minus (CleanRL keeps none); held until the
    # end of the measurement
    logits = None
    if design == "ours":
        logits = torch.zeros((num_steps, num_envs, NUM_PROCGEN_ACTIONS)).normal_()
    b_obs = obs.reshape((-1,) + PROCGEN_OBS)
    mb_inds = torch.randperm(len(b_obs))[:minibatch_size]
    if design == "cleanrl":
        # CleanRL: network input = x / 255.0 of a float gather
        x = b_obs[mb_inds].permute((0, 3, 1, 2)) / 255.0
    else:
        x = b_obs[mb_inds].permute(0, 3, 1, 2).float().div_(255.0)
    storage = vm("VmHWM") - base
    agent.train()
    hidden = agent.backbone(x)
    (agent.actor(hidden).sum() + agent.critic(hidden).sum()).backward()
    result = {
        "design": design,
        "storage_gb": storage,
        "with_update_gb": vm("VmHWM") - base,
        "process_gb": vm("VmHWM"),
    }
    del logits  # held until both measurements were taken
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# orchestration


def run_worker(argv, env_extra):
    env = {**os.environ, "WANDB_MODE": "offline", **env_extra}
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv], env=env, capture_output=True, text=True
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        sys.exit(
            f"worker {argv} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def spread(values, fmt="{:.0f}"):
    median = statistics.median(values)
    return f"{fmt.format(median)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def paired_ratios(results, a, b, key):
    """Per-round ratio of the medians of a over b (rounds interleave a and b, so each pair saw the
    same load)."""
    return [
        statistics.median(ra[key]) / statistics.median(rb[key])
        for ra, rb in zip(results[a], results[b])
    ]


def machine_line(device):
    import torch

    with open("/proc/cpuinfo") as cpuinfo:
        model = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
            "?",
        )
    gpu = (
        torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "no GPU"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{os.cpu_count()} CPU cores ({model}), {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average at start {load[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}"
    )


def print_speed_tables(names, results):
    for clock, title in (("time", "wall time"), ("cpu", "CPU time of the process")):
        print(f"\n### {title}: speed, split per section, compute bound\n")
        speed = "SPS" if clock == "time" else "CPU ms per step"
        print(
            f"| config | shape (envs x steps, mb) | {speed} median (min-max) "
            "| env | inference | update | diagnostics | other "
            "| update / bound | inference / bound |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in names:
            runs = results[name]
            shape = runs[0]["spec"]["shape"]
            values = [
                v for run in runs for v in run["sps" if clock == "time" else "cpu_ms_per_step"]
            ]
            iterations = [it[clock] for run in runs for it in run["iterations"]]
            fractions = [
                statistics.median(it[s] / sum(it.values()) for it in iterations) * 100
                for s in SECTIONS
            ]
            bounds = {
                phase: spread(
                    [
                        statistics.median(it[clock][phase] for it in run["iterations"])
                        / run["bound"][phase][clock]
                        for run in runs
                    ],
                    "{:.3f}",
                )
                if "bound" in runs[0]
                else "-"
                for phase in ("update", "inference")
            }
            print(
                f"| {name} | {shape['num_envs']} x {shape['num_steps']}, "
                f"{shape['minibatch_size']} | "
                f"{spread(values, '{:.1f}' if clock == 'time' else '{:.2f}')} | "
                + " | ".join(f"{fraction:.1f} %" for fraction in fractions)
                + f" | {bounds['update']} | {bounds['inference']} |"
            )

    print("\n### Peak memory\n")
    print("| config | peak RSS GiB | CUDA max allocated GiB | torch threads |")
    print("|---|---:|---:|---:|")
    for name in names:
        runs = results[name]
        cuda_peak = runs[0]["cuda_max_allocated_gb"]
        print(
            f"| {name} | {max(run['peak_rss_gb'] for run in runs):.2f} "
            f"| {'-' if cuda_peak is None else f'{cuda_peak:.2f}'} "
            f"| {runs[0]['threads']} (interop {runs[0]['interop_threads']}) |"
        )

    pairs = PAIRS + [
        (name.removesuffix("@base"), name, f"{name.removesuffix('@base')}: this checkout / base")
        for name in names
        if name.endswith("@base")
    ]
    rows = [(label, a, b) for a, b, label in pairs if a in results and b in results]
    if rows:
        print(
            "\n### Speed ratios, paired by round "
            "(each round runs every configuration once, back to back)\n"
        )
        print(
            "| ratio a / b | SPS ratio median (min-max) "
            "| CPU-time ratio b / a median (min-max) | rounds |"
        )
        print("|---|---:|---:|---:|")
        for label, a, b in rows:
            sps = paired_ratios(results, a, b, "sps")
            cpu = paired_ratios(results, b, a, "cpu_ms_per_step")
            print(f"| {label} | {spread(sps, '{:.3f}')} | {spread(cpu, '{:.3f}')} | {len(sps)} |")


def memory_design(num_envs, num_steps, minibatch_size):
    """Computed bytes and measured peak RSS of the two storage designs, alone and with one update's
    activations."""
    n = num_envs * num_steps
    obs_bytes = PROCGEN_OBS[0] * PROCGEN_OBS[1] * PROCGEN_OBS[2]
    # float32 buffer + float gather + (/ 255) copy
    cleanrl = n * obs_bytes * 4 + 2 * minibatch_size * obs_bytes * 4
    # uint8 + uint8 gather + one float
    ours = n * obs_bytes + minibatch_size * obs_bytes + minibatch_size * obs_bytes * 4
    # + the rollout's float32 logits (delta_pi_minus's eval-mode side)
    ours += n * NUM_PROCGEN_ACTIONS * 4
    shape = [str(num_envs), str(num_steps), str(minibatch_size)]
    measured = {
        design: run_worker(["--memory-worker", design, *shape], {})
        for design in ("cleanrl", "ours")
    }
    print(
        f"\n### Storage designs ({num_envs} x {num_steps}, minibatch {minibatch_size}), "
        "peak RSS increase\n"
    )
    print(
        "| design | storage + conversion, computed | measured "
        "| + one train-mode update of the network, measured |"
    )
    print("|---|---:|---:|---:|")
    rows = [
        ("CleanRL: float32 buffer, float gather, `/ 255.0` copy", cleanrl, measured["cleanrl"]),
        (
            "ours: uint8 buffer, uint8 gather, one float copy divided in place; float32 logits",
            ours,
            measured["ours"],
        ),
    ]
    for label, computed, rss in rows:
        print(
            f"| {label} | {computed / 1e6:,.0f} MB | {rss['storage_gb'] * 2**30 / 1e6:,.0f} MB | "
            f"{rss['with_update_gb'] * 2**30 / 1e6:,.0f} MB |"
        )
    ratio = {
        key: measured["ours"][key] / measured["cleanrl"][key]
        for key in ("storage_gb", "with_update_gb")
    }
    print(
        f"| ratio ours / CleanRL | {ours / cleanrl:.3f} | {ratio['storage_gb']:.3f} "
        f"| {ratio['with_update_gb']:.3f} |"
    )
    return measured


def parse_shape(text):
    try:
        num_envs, num_steps, minibatch_size = (int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give ENVS,STEPS,MINIBATCH, e.g. 4,16,32"
        ) from None
    return {"num_envs": num_envs, "num_steps": num_steps, "minibatch_size": minibatch_size}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--iterations",
        type=int,
        help="measured iterations per run (default 2; the paper configs: 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="unmeasured iterations before them (default 1; the paper configs: 0)",
    )
    parser.add_argument(
        "--shape",
        type=parse_shape,
        help="ENVS,STEPS,MINIBATCH for every configuration (a smoke test)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per configuration, interleaved"
    )
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from: {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--memory-design",
        action="store_true",
        help="also measure the storage designs at paper settings",
    )
    parser.add_argument(
        "--against",
        metavar="CHECKOUT",
        help="also run every config on the scripts of another checkout (e.g. a `git worktree` of "
        "an older commit), interleaved in the same rounds: NAME@base, and the ratios NAME / "
        "NAME@base",
    )
    parser.add_argument("--json", help="write every raw result to this file (after every run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        return worker(json.loads(cli.worker))
    if cli.memory_worker:
        design, *shape = cli.memory_worker
        return memory_design_worker(design, *map(int, shape))

    names = [name for name in cli.configs.split(",") if name]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown --configs {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    roots = {name: REPO_ROOT for name in names}
    if cli.against:
        base = os.path.abspath(cli.against)
        missing = [SCRIPTS[name.split("/")[0]][0] for name in names]
        missing = [m for m in missing if not os.path.exists(os.path.join(base, m + ".py"))]
        if missing:
            listed = ", ".join(sorted(set(missing)))
            sys.exit(f"error: --against {cli.against}: no {listed}.py there (not a checkout?)")
        roots.update({f"{name}@base": base for name in names})
        names = [n for name in names for n in (name, f"{name}@base")]
    print(f"Machine: {machine_line(cli.device)}")
    print(f"Command: python {' '.join(sys.argv)}")
    given = {"iterations": cli.iterations, "warmup": cli.warmup, **(cli.shape or {})}
    overrides_of_shape = {key: value for key, value in given.items() if value is not None}
    results = {name: [] for name in names}
    for repeat in range(cli.repeats):
        # A B C, C B A, ...: no config always runs first
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            overrides, env_extra, shape = CONFIGS[name.removesuffix("@base")]
            script = name.split("/")[0]
            shape = {**SCRIPTS[script][1], **RUN_LENGTH, **shape, **overrides_of_shape}
            spec = {"device": cli.device, "script": script, "overrides": overrides, "shape": shape}
            spec["root"] = roots[name]
            result = run_worker(["--worker", json.dumps(spec)], env_extra)
            results[name].append({**result, "spec": spec})
            if cli.json:  # after every run: an interrupted benchmark keeps what it measured
                with open(cli.json, "w") as f:
                    json.dump(results, f, indent=1)
            sps, cpu = (
                ", ".join(f"{v:.2f}" for v in result[key]) for key in ("sps", "cpu_ms_per_step")
            )
            print(
                f"  [{repeat + 1}/{cli.repeats}] {name}: SPS {sps}; CPU ms per step {cpu}",
                flush=True,
            )

    if names:
        print_speed_tables(names, results)
    if cli.memory_design:
        results["memory_design"] = memory_design(
            *(PAPER_SHAPE[k] for k in ("num_envs", "num_steps", "minibatch_size"))
        )
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
