"""Training speed and memory of ppo_procgen_mdr.py, side by side in one run.

Each measurement is a fresh worker process (its own peak RSS, its own OpenMP settings) that imports the script, drives
main() with --timing for a fixed short budget (the held-out evaluation stubbed out: it runs every --eval-interval
iterations, default 25, and is not part of an iteration's cost), then times the compute bound in the same process: the
same number of forward+backward passes of the same network (same modes, same --amp/--compile) on random uint8 tensors
of the same shapes, with no indexing, loss bookkeeping, clipping or optimizer. Configurations are interleaved
(A, B, C, A, B, C, ...) so that the load of a shared machine falls on all of them alike; figures are medians over
repeats x iterations with their min-max spread. Every figure comes twice: from wall time, and from the CPU time of the
worker process (all its threads), which other jobs on a shared machine disturb far less.

    python benchmarks/bench_sps.py --device cpu                          # ~30 min on 2 cores
    python benchmarks/bench_sps.py --device cpu --configs mdr,ppo --repeats 5
    python benchmarks/bench_sps.py --device cuda --num-steps 256 --minibatch-size 2048 --configs mdr,ppo,nodiag,amp,compile
    python benchmarks/bench_sps.py --device cpu --configs paper,paper-amp1 --repeats 1  # paper settings, 1 iteration each
    python benchmarks/bench_sps.py --memory-design                      # uint8 buffer vs CleanRL's float32 buffer

Configurations (--configs): mdr = MDR(2,1) with the default diagnostics; ppo = --alpha1 3 --alpha2 0; nodiag = MDR(2,1)
with the diagnostics off; ppo-nodiag = PPO(3,0) with the diagnostics off; olddiag = MDR(2,1) with the previous
diagnostics defaults (2 minibatches, ratio every 4th);
threads1 = --torch-threads 1; spin = OMP_WAIT_POLICY=ACTIVE (OpenMP threads spin while they wait; the script's default
is PASSIVE); amp = --amp; amp1 = --amp --torch-threads 1; compile = --compile; paper, paper1 (--torch-threads 1),
paper-amp1 (--amp --torch-threads 1) = the paper's 64 envs x 256 steps, minibatch 2048, one iteration.
"""

import argparse
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
OBS_BYTES = 64 * 64 * 3  # one Procgen observation, uint8

PAPER_SHAPE = {"num_envs": 64, "num_steps": 256, "minibatch_size": 2048, "iterations": 1, "warmup": 0}
# name -> (overrides of the script's Args, extra environment variables, overrides of the benchmark's shape)
CONFIGS = {
    "mdr": ({"alpha1": 2, "alpha2": 1}, {}, {}),
    "ppo": ({"alpha1": 3, "alpha2": 0}, {}, {}),
    "nodiag": ({"alpha1": 2, "alpha2": 1, "diag_minibatches": -1, "diag_ratio_every": 0}, {}, {}),
    "ppo-nodiag": ({"alpha1": 3, "alpha2": 0, "diag_minibatches": -1, "diag_ratio_every": 0}, {}, {}),
    "olddiag": ({"alpha1": 2, "alpha2": 1, "diag_minibatches": 2, "diag_ratio_every": 4}, {}, {}),
    "threads1": ({"torch_threads": 1}, {}, {}),
    "spin": ({}, {"OMP_WAIT_POLICY": "ACTIVE"}, {}),
    "amp": ({"amp": True}, {}, {}),
    "amp1": ({"amp": True, "torch_threads": 1}, {}, {}),
    "compile": ({"compile": True}, {}, {}),
    "paper": ({}, {}, PAPER_SHAPE),
    "paper1": ({"torch_threads": 1}, {}, PAPER_SHAPE),
    "paper-amp1": ({"amp": True, "torch_threads": 1}, {}, PAPER_SHAPE),
}
SECTIONS = ("env", "inference", "update", "diagnostics", "other")
CLOCKS = ("time", "cpu")  # wall seconds; CPU seconds of the process (all threads), steadier on a shared machine


# ----------------------------------------------------------------------------------------------------------------------
# worker: one training run + its compute bound, in this process


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def compute_bound(ppo, args, device, num_actions=15):
    """Seconds of the same forward+backward passes (update) and forward passes (inference) as one iteration, on a fresh
    network (same modes, --amp, --compile, channels_last) fed random tensors of the same shapes."""
    import torch

    torch.manual_seed(0)
    agent = ppo.Agent(num_actions, args).to(device)
    if args.channels_last and device.type == "cuda":
        agent = agent.to(memory_format=torch.channels_last)
    if args.compile:
        agent.backbone.compile(dynamic=False)
    mb_obs = torch.randint(0, 256, (args.minibatch_size, 64, 64, 3), dtype=torch.uint8, device=device)
    mb_actions = torch.randint(0, num_actions, (args.minibatch_size,), device=device)
    env_obs = torch.randint(0, 256, (args.num_envs, 64, 64, 3), dtype=torch.uint8, device=device)

    def forward_backward(training):
        agent.train(training)
        _, logprob, entropy, value = agent.get_action_and_value(mb_obs, mb_actions)
        (logprob.sum() + entropy.sum() + value.sum()).backward()
        agent.zero_grad(set_to_none=True)

    def inference():
        agent.eval()
        with torch.no_grad():
            agent.get_action_and_value(env_obs)

    minibatches = args.batch_size // args.minibatch_size
    passes = [True] * args.alpha1 * minibatches + [False] * args.alpha2 * minibatches
    for training in (True, False):  # warm-up (and compilation) of each mode
        forward_backward(training)
    inference()
    synchronize(device)
    start = clocks()
    for training in passes * args.mdr_rounds:
        forward_backward(training)
    synchronize(device)
    middle = clocks()
    for _ in range(args.num_steps + 1):  # the rollout's steps and the bootstrap value
        inference()
    synchronize(device)
    end = clocks()
    return {
        "update": {clock: middle[clock] - start[clock] for clock in CLOCKS},
        "inference": {clock: end[clock] - middle[clock] for clock in CLOCKS},
    }


def clocks():
    return {"time": time.perf_counter(), "cpu": time.process_time()}


def worker(spec):
    """Run one configuration; print one JSON line."""
    sys.path.insert(0, REPO_ROOT)
    ppo = importlib.import_module("ppo_procgen_mdr")  # before torch: the script sets OpenMP's wait policy (passive)
    import numpy as np
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shape = spec["shape"]
    batch_size = shape["num_envs"] * shape["num_steps"]
    args = ppo.Args(
        num_envs=shape["num_envs"],
        num_steps=shape["num_steps"],
        minibatch_size=shape["minibatch_size"],
        total_timesteps=batch_size * (shape["warmup"] + shape["iterations"]),
        eval_interval=0,
        pretrained=False,
        cuda=spec["device"] == "cuda",
        timing=True,
        **spec["overrides"],
    )
    ppo.evaluate = lambda agent, args, device, iteration: np.zeros(args.num_eval_envs)  # not part of an iteration's cost
    os.chdir(tempfile.mkdtemp(prefix="bench_sps_"))
    start = time.perf_counter()
    exit_code = ppo.main(args)
    wall = time.perf_counter() - start
    assert exit_code == 0, exit_code
    run_dir = os.path.join("runs", os.listdir("runs")[0])
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    measured = slice(shape["warmup"], None)
    num_iterations = len(scalars["perf/update_time"])
    iterations = [  # {clock: {section: seconds}} per measured iteration
        {
            clock: {section: scalars.get(f"perf/{section}_{clock}", [0.0] * num_iterations)[i] for section in SECTIONS}
            for clock in CLOCKS
        }
        for i in range(num_iterations)
    ][measured]
    result = {
        "iterations": iterations,
        "sps": [batch_size / sum(it["time"].values()) for it in iterations],
        "cpu_ms_per_step": [1000 * sum(it["cpu"].values()) / batch_size for it in iterations],
        "peak_rss_gb": scalars["perf/peak_rss_gb"][-1],
        "cuda_max_allocated_gb": scalars.get("perf/cuda_max_allocated_gb", [None])[-1],
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    args.batch_size = batch_size
    result["bound"] = compute_bound(ppo, args, device)
    print("RESULT " + json.dumps(result), flush=True)


def memory_design_worker(design, num_envs, num_steps, minibatch_size):
    """Peak RSS of the rollout storage and one minibatch's conversion, CleanRL's design (float32 buffer, float gather,
    then / 255) vs ours (uint8 buffer, uint8 gather, one float copy divided in place). No network: storage alone."""
    import torch

    def vm(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field)) / 2**20  # GiB

    base = vm("VmRSS")
    dtype = torch.float32 if design == "cleanrl" else torch.uint8
    obs = torch.zeros((num_steps, num_envs, 64, 64, 3), dtype=dtype).random_(0, 256)  # every page touched
    b_obs = obs.reshape((-1, 64, 64, 3))
    mb_inds = torch.randperm(len(b_obs))[:minibatch_size]
    if design == "cleanrl":
        x = b_obs[mb_inds].permute((0, 3, 1, 2)) / 255.0  # CleanRL: network input = x / 255.0 of a float gather
    else:
        x = b_obs[mb_inds].permute(0, 3, 1, 2).float().div_(255.0)
    peak = vm("VmHWM")
    print("RESULT " + json.dumps({"design": design, "storage_gb": peak - base, "check": float(x.mean())}), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# orchestration


def run_worker(argv, env_extra):
    env = {**os.environ, "WANDB_MODE": "offline", **env_extra}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        sys.exit(f"worker {argv} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def spread(values, fmt="{:.0f}"):
    median = statistics.median(values)
    return f"{fmt.format(median)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def paired_ratios(results, a, b, key):
    """Per-round ratio of the medians of a over b (rounds interleave a and b, so each pair saw the same load)."""
    return [statistics.median(ra[key]) / statistics.median(rb[key]) for ra, rb in zip(results[a], results[b])]


def machine_line(device):
    import torch

    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "no GPU"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{os.cpu_count()} CPU cores ({model}), {gpu}; Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average at start {load[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}"
    )


def memory_design(num_envs, num_steps, minibatch_size):
    """Analytic bytes and measured peak RSS of the two storage designs."""
    n = num_envs * num_steps
    cleanrl = n * OBS_BYTES * 4 + 2 * minibatch_size * OBS_BYTES * 4  # float32 buffer + float gather + (/ 255) copy
    ours = n * OBS_BYTES + minibatch_size * OBS_BYTES + minibatch_size * OBS_BYTES * 4  # uint8 + uint8 gather + one float
    shape = [str(num_envs), str(num_steps), str(minibatch_size)]
    measured = {design: run_worker(["--memory-worker", design, *shape], {})["storage_gb"] for design in ("cleanrl", "ours")}
    print(f"\n### Rollout storage + one minibatch's conversion ({num_envs} x {num_steps}, minibatch {minibatch_size})\n")
    print("| design | bytes (computed) | peak RSS increase (measured) |")
    print("|---|---:|---:|")
    rows = [
        ("CleanRL: float32 buffer, float gather, `/ 255.0` copy", cleanrl, measured["cleanrl"]),
        ("ours: uint8 buffer, uint8 gather, one float copy divided in place", ours, measured["ours"]),
    ]
    for label, computed, rss in rows:
        print(f"| {label} | {computed / 1e6:,.0f} MB | {rss * 2**30 / 1e6:,.0f} MB |")
    print(f"| ratio ours / CleanRL | {ours / cleanrl:.3f} | {measured['ours'] / measured['cleanrl']:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=16, help="paper: 256 (16 keeps an iteration ~20 s on 2 CPU cores)")
    parser.add_argument("--minibatch-size", type=int, default=128, help="paper: 2048 (128 keeps 8 minibatches per epoch)")
    parser.add_argument("--iterations", type=int, default=2, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="iterations run first and not measured")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved")
    parser.add_argument("--configs", default="mdr,ppo,nodiag,ppo-nodiag,olddiag,amp,threads1,spin")
    parser.add_argument("--memory-design", action="store_true", help="also measure the storage designs at paper settings")
    parser.add_argument("--json", help="write every raw result to this file")
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
        sys.exit(f"unknown --configs {unknown}; known: {', '.join(CONFIGS)}")
    print(f"Machine: {machine_line(cli.device)}")
    print(f"Command: python {' '.join(sys.argv)}")
    base_shape = {k: getattr(cli, k) for k in ("num_envs", "num_steps", "minibatch_size", "iterations", "warmup")}
    results = {name: [] for name in names}
    for repeat in range(cli.repeats):
        for name in names:
            overrides, env_extra, shape = CONFIGS[name]
            spec = {"device": cli.device, "overrides": overrides, "shape": {**base_shape, **shape}}
            result = run_worker(["--worker", json.dumps(spec)], env_extra)
            results[name].append({**result, "spec": spec})
            if cli.json:  # after every run: an interrupted benchmark keeps what it measured
                with open(cli.json, "w") as f:
                    json.dump(results, f, indent=1)
            sps, cpu = (", ".join(f"{v:.2f}" for v in result[key]) for key in ("sps", "cpu_ms_per_step"))
            print(f"  [{repeat + 1}/{cli.repeats}] {name}: SPS {sps}; CPU ms per step {cpu}", flush=True)

    if not names:
        return memory_design(64, 256, 2048) if cli.memory_design else None
    for clock, title in (("time", "wall time"), ("cpu", "CPU time of the process")):
        print(f"\n### {title}: speed, split per section, compute bound\n")
        speed = "SPS" if clock == "time" else "CPU ms per step"
        print(
            f"| config | shape (envs x steps, mb) | {speed} median (min-max) | env | inference | update | diagnostics | other "
            "| update / bound | inference / bound |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in names:
            runs = results[name]
            shape = runs[0]["spec"]["shape"]
            values = [v for run in runs for v in run["sps" if clock == "time" else "cpu_ms_per_step"]]
            iterations = [it[clock] for run in runs for it in run["iterations"]]
            fractions = [statistics.median(it[s] / sum(it.values()) for it in iterations) * 100 for s in SECTIONS]
            bound_ratios = {
                phase: [
                    statistics.median(it[clock][phase] for it in run["iterations"]) / run["bound"][phase][clock]
                    for run in runs
                ]
                for phase in ("update", "inference")
            }
            print(
                f"| {name} | {shape['num_envs']} x {shape['num_steps']}, {shape['minibatch_size']} | "
                f"{spread(values, '{:.1f}' if clock == 'time' else '{:.2f}')} | "
                + " | ".join(f"{fraction:.1f} %" for fraction in fractions)
                + f" | {spread(bound_ratios['update'], '{:.3f}')} | {spread(bound_ratios['inference'], '{:.3f}')} |"
            )

    print("\n### Peak memory\n")
    print("| config | peak RSS GiB | CUDA max allocated GiB | torch threads |")
    print("|---|---:|---:|---:|")
    for name in names:
        runs = results[name]
        cuda_peak = runs[0]["cuda_max_allocated_gb"]
        print(
            f"| {name} | {max(run['peak_rss_gb'] for run in runs):.2f} | {'-' if cuda_peak is None else f'{cuda_peak:.2f}'} | "
            f"{runs[0]['threads']} (interop {runs[0]['interop_threads']}) |"
        )

    pairs = [
        ("mdr", "ppo", "MDR(2,1) / PPO(3,0)"),
        ("nodiag", "ppo-nodiag", "MDR(2,1) / PPO(3,0), diagnostics off"),
        ("nodiag", "mdr", "diagnostics off / default diagnostics"),
        ("nodiag", "olddiag", "diagnostics off / previous diagnostics defaults"),
        ("mdr", "spin", "default (OMP passive) / OMP spinning"),
        ("threads1", "mdr", "1 thread / default (all cores)"),
        ("amp", "mdr", "--amp / default"),
        ("amp1", "threads1", "--amp / float32, both --torch-threads 1"),
        ("compile", "mdr", "--compile / default"),
    ]
    rows = [(label, a, b) for a, b, label in pairs if a in results and b in results]
    if rows:
        print("\n### Speed ratios, paired by round (each round runs every configuration once, back to back)\n")
        print("| ratio | SPS ratio median (min-max) | CPU-time ratio b / a median (min-max) | rounds |")
        print("|---|---:|---:|---:|")
        for label, a, b in rows:
            sps = paired_ratios(results, a, b, "sps")
            cpu = paired_ratios(results, b, a, "cpu_ms_per_step")
            print(f"| {label} | {spread(sps, '{:.3f}')} | {spread(cpu, '{:.3f}')} | {len(sps)} |")

    if cli.memory_design:
        memory_design(64, 256, 2048)
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
