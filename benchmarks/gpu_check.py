"""The GPU check of issue 16: what a lent GPU machine's few minutes should measure, in one go. Run
it through benchmarks/gpu_check.sh, which first installs the wheelhouse there.

Steps, each with its own time limit, all of them within the budget (8 minutes with --device cuda):
  environment    versions of Python, numpy, torch, CUDA, cuDNN and the GPU; the three scripts
                 must import
  tests          pytest -m cuda: the CUDA code paths (tests/test_cuda_paths.py); skipped on a CPU
  bench          bench_sps.py at the paper's Procgen shapes: float32, --amp, --no-channels-last
  user_command   the user's command (+ --no-pretrained: no internet there) for about 2 minutes,
                 then Ctrl-C; it must have logged to TensorBoard
  probe          ppo_collapse_probe.py on the GPU, one run and then several side by side: probe
                 runs per hour
  bench_compile  bench_sps.py --compile at the paper's shapes, in whatever time is left
--quick (with --device cpu: the dry run of tests/test_gpu_check.py) takes tiny shapes everywhere
and skips the compile.

Writes to --out: summary.json (every figure, and "ok" with the problems found) and logs.tar.gz (each
step's log, bench_sps.py's JSON, the runs' TensorBoard events and metrics.csv, the GPU's utilization
samples).
"""

import argparse
import contextlib
import csv
import glob
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_COMMAND = (
    "ppo_procgen_mdr.py",
    "--env-id",
    "bigfish",
    "--norm",
    "bn",
    "--alpha1",
    "2",
    "--alpha2",
    "1",
    "--cuda",
)
# + --seed, one per run
PROBE_COMMAND = ("ppo_collapse_probe.py", "--mode", "bn", "--clip-coef", "0.2", "--cuda")
FINAL_SECONDS = 15  # kept back at the end for the summary and the archive


@dataclass(frozen=True)
class Plan:
    budget: int  # seconds for the whole check
    test_seconds: int
    bench_configs: tuple
    bench_args: tuple  # run length and shape arguments of bench_sps.py
    bench_seconds: int
    compile_configs: tuple  # run in the time left at the end; () = skipped
    user_args: tuple  # appended to the user's command
    user_seconds: int  # how long it trains (from when its run folder appears) before Ctrl-C
    user_startup: int  # allowed until its run folder appears
    user_grace: int  # for the iteration it is in, and its checkpoint
    probe_args: tuple
    side_by_side: tuple  # concurrent probe runs, one phase each
    probe_seconds: int  # per phase


PLANS = {
    "full": Plan(
        budget=470,
        test_seconds=75,
        bench_configs=("procgen/paper", "procgen/paper-amp", "procgen/paper-nochannelslast"),
        bench_args=tuple(
            "--warmup 1 --iterations 2 --repeats 1".split()
        ),  # a GPU iteration takes seconds
        bench_seconds=80,
        compile_configs=("procgen/paper-compile",),
        user_args=(),
        user_seconds=120,
        user_startup=20,
        user_grace=20,
        probe_args=(
            "--total-timesteps",
            "5120",
        ),  # 40 updates; the per-update time extrapolates to a full run
        side_by_side=(1, 4, 8),
        probe_seconds=30,
    ),
    "quick": Plan(
        # ~1 min on 2 quiet cores; a dry run on a busy machine must not fail for want of time
        budget=900,
        test_seconds=60,
        bench_configs=("procgen/paper", "procgen/paper-nochannelslast"),
        bench_args=tuple("--shape 2,16,16 --warmup 0 --iterations 1 --repeats 1".split()),
        bench_seconds=90,
        compile_configs=(),  # ~1 min per graph on a CPU
        user_args=tuple(
            "--num-envs 2 --num-steps 16 --minibatch-size 16 --num-eval-envs 2".split()
        ),
        user_seconds=10,
        user_startup=90,
        user_grace=30,
        probe_args=tuple(
            (
                "--num-envs 2 --num-steps 8 --minibatch-size 8 --total-timesteps 32 --view-size 16 "
                "--image-size 64 --hidden-size 32"
            ).split()
        ),
        side_by_side=(1, 2),
        probe_seconds=60,
    ),
}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_bench_sps():
    spec = importlib.util.spec_from_file_location(
        "bench_sps", os.path.join(REPO_ROOT, "benchmarks", "bench_sps.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


# --------------------------------------------------------------------------------------------------
# processes with time limits


def signal_group(process, signum):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def run_processes(
    commands, logs, seconds, stop_signal=signal.SIGTERM, grace=10, start_when=None, startup=0
):
    """Start every (argv, cwd) at once, each in its own process group with its output in its log;
    `seconds` later (counted from when the glob `start_when` first matches, if given, within
    `startup` seconds), send `stop_signal` to those still running (the scripts then finish cleanly:
    checkpoint, summary.json), SIGKILL after `grace`. Returns the exit codes, each process's
    seconds, whether any had to be stopped, and when `start_when` matched."""
    start = time.time()
    processes = []
    for (argv, cwd), log_path in zip(commands, logs):
        os.makedirs(cwd, exist_ok=True)
        with open(log_path, "w") as log_file:
            log_file.write(f"$ cd {cwd} && {shlex.join(argv)}\n")
            log_file.flush()
            processes.append(
                subprocess.Popen(
                    argv, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    ended = {}

    def poll():
        for index, process in enumerate(processes):
            if index not in ended and process.poll() is not None:
                ended[index] = time.time() - start

    clock = None if start_when else start
    while len(ended) < len(processes):
        now = time.time()
        if clock is None and glob.glob(start_when):
            clock = now
        if (clock is not None and now - clock >= seconds) or now - start >= seconds + startup:
            break
        poll()
        time.sleep(0.2)
    running = [
        process
        for index, process in enumerate(processes)
        if index not in ended and process.poll() is None
    ]
    for process in running:
        signal_group(process, stop_signal)
    grace_end = time.time() + grace
    while any(process.poll() is None for process in running) and time.time() < grace_end:
        poll()
        time.sleep(0.2)
    for process in running:
        if process.poll() is None:
            signal_group(process, signal.SIGKILL)
        process.wait()
    poll()
    return {
        "exit_codes": [process.returncode for process in processes],
        "process_seconds": [round(ended[index], 2) for index in range(len(processes))],
        "stopped": bool(running),
        "seconds": round(time.time() - start, 1),
        "started_after_seconds": None if clock is None else round(clock - start, 1),
    }


class GpuSampler:
    """nvidia-smi's GPU utilization and memory once a second, in a thread, for the whole check (none
    without it)."""

    def __init__(self, path):
        self.path = path
        self.samples = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        if shutil.which("nvidia-smi"):
            self.thread.start()

    def run(self):
        query = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ]
        while not self.done.wait(1.0):
            with contextlib.suppress(ValueError, subprocess.TimeoutExpired):
                result = subprocess.run(query, capture_output=True, text=True, timeout=10)
                utilization, memory = (float(value) for value in result.stdout.strip().split(","))
                self.samples.append((time.time(), utilization, memory / 1024))

    def between(self, start, end):
        """Mean utilization (%) and peak memory (GiB) between two times; None without samples."""
        window = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not window:
            return {"gpu_utilization_mean": None, "gpu_memory_peak_gb": None}
        return {
            "gpu_utilization_mean": round(statistics.mean(u for u, _ in window), 1),
            "gpu_memory_peak_gb": round(max(m for _, m in window), 2),
        }

    def stop(self):
        self.done.set()
        with open(self.path, "w") as f:
            f.write("time,utilization_percent,memory_gb\n")
            f.writelines(f"{t:.1f},{u:.0f},{m:.2f}\n" for t, u, m in self.samples)


# --------------------------------------------------------------------------------------------------
# readers


def tensorboard_scalars(run_glob):
    """{tag: [(step, value)]} of the TensorBoard run folders that match; {} when none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for run_dir in sorted(glob.glob(run_glob)):
        accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(
                (event.step, event.value) for event in accumulator.Scalars(tag)
            )
    return scalars


def read_metrics_csv(run_root):
    """The probe's per-update rows (runs/<name>/metrics.csv under run_root); [] when it wrote
    none."""
    paths = glob.glob(os.path.join(run_root, "runs", "**", "metrics.csv"), recursive=True)
    if not paths:
        return []
    with open(paths[0], newline="") as f:
        return list(csv.DictReader(f))


def junit_counts(path):
    if not os.path.exists(path):
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    root = ElementTree.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failing = [
        case for case in cases if case.find("failure") is not None or case.find("error") is not None
    ]
    skipped = [case for case in cases if case.find("skipped") is not None]
    errors = sum(int(suite.get("errors", 0)) for suite in root.iter("testsuite"))
    return {
        "passed": len(cases) - len(failing) - len(skipped),
        "failed": len(failing),
        "errors": errors,
        "skipped": len(skipped),
        "failures": [f"{case.get('classname')}::{case.get('name')}" for case in failing],
    }


def bench_figures(bench, path):
    """Per configuration: medians of SPS, CPU ms per step, the sections' shares of wall time, update
    and inference over the compute bound, and peak memory, from bench_sps.py's --json."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        results = json.load(f)
    figures = {}
    for name, runs in results.items():
        if not runs:
            continue
        iterations = [it["time"] for run in runs for it in run["iterations"]]
        figures[name] = {
            "shape": runs[0]["spec"]["shape"],
            "sps": round(statistics.median(v for run in runs for v in run["sps"]), 1),
            "cpu_ms_per_step": round(
                statistics.median(v for run in runs for v in run["cpu_ms_per_step"]), 3
            ),
            "sections": {
                section: round(
                    statistics.median(it[section] / sum(it.values()) for it in iterations), 3
                )
                for section in bench.SECTIONS
            },
            "peak_rss_gb": round(max(run["peak_rss_gb"] for run in runs), 2),
            "cuda_max_allocated_gb": runs[0]["cuda_max_allocated_gb"],
            "worker_seconds": round(max(run["wall_s"] for run in runs), 1),
        }
        if "bound" in runs[0]:
            for phase in ("update", "inference"):
                figures[name][f"{phase}_over_bound"] = round(
                    statistics.median(
                        statistics.median(it["time"][phase] for it in run["iterations"])
                        / run["bound"][phase]["time"]
                        for run in runs
                    ),
                    3,
                )
    return figures


# --------------------------------------------------------------------------------------------------
# the steps


class Check:
    def __init__(self, cli, plan):
        self.cli = cli
        self.plan = plan
        self.start = time.time()
        self.work = tempfile.mkdtemp(prefix="gpu_check_")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.python = sys.executable
        self.gpu = GpuSampler(os.path.join(self.work, "gpu_samples.csv"))
        self.bench = load_bench_sps()
        self.problems = []
        self.cut_short = []
        self.summary = {
            "issue": 16,
            "ok": False,
            "problems": self.problems,
            "cut_short": self.cut_short,
            "check": {
                "device": cli.device,
                "quick": cli.quick,
                "budget_seconds": plan.budget,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "wheelhouse": os.environ.get(
                    "GPU_CHECK_WHEELHOUSE", "not run through gpu_check.sh"
                ),
            },
        }

    def time_left(self):
        return self.plan.budget - (time.time() - self.start)

    def limit(self, seconds):
        return max(0.0, min(seconds, self.time_left() - FINAL_SECONDS))

    def run(self, name, commands, seconds, startup=0, **stop):
        """One step: its processes within min(seconds + startup, the time left); the step's record
        (status, seconds, logs)."""
        total = self.limit(seconds + startup)
        seconds = min(seconds, total)
        startup = total - seconds
        logs = [
            os.path.join(
                self.logs, f"{name}.log" if len(commands) == 1 else f"{name}_{index + 1}.log"
            )
            for index in range(len(commands))
        ]
        log(
            f"{name}: {len(commands)} process(es), at most {seconds:.0f} s: "
            + shlex.join(commands[0][0])
        )
        start = time.time()
        result = run_processes(commands, logs, seconds, startup=startup, **stop)
        status = (
            "timeout"
            if result["stopped"]
            else "ok"
            if all(code == 0 for code in result["exit_codes"])
            else "failed"
        )
        record = {"status": status, **result, **self.gpu.between(start, time.time())}
        record["logs"] = [os.path.relpath(path, self.work) for path in logs]
        ending = "stopped at its time limit" if status == "timeout" else status
        log(f"{name}: {ending} after {result['seconds']} s (exit codes {result['exit_codes']})")
        if status == "failed":
            # the end of the first failed log, so that check.log alone says what went wrong
            failed = next(path for path, code in zip(logs, result["exit_codes"]) if code != 0)
            with open(failed) as f:
                print("".join(f.readlines()[-15:]), flush=True)
        return record

    def environment(self):
        record = self.run(
            "environment", [([self.python, __file__, "--print-environment"], REPO_ROOT)], 60
        )
        with open(os.path.join(self.logs, "environment.log")) as f:
            lines = [line for line in f if line.startswith("ENVIRONMENT ")]
        environment = json.loads(lines[-1][len("ENVIRONMENT ") :]) if lines else {}
        self.summary["environment"] = {
            **environment,
            "status": record["status"],
            "logs": record["logs"],
        }
        if record["status"] != "ok" or not environment:
            self.problems.append(
                "torch, the three scripts or their packages do not import (logs/environment.log)"
            )
            return False
        gpu, procgen = environment["gpu"], environment["packages"]["procgen-mirror"]
        log(
            f"GPU: {gpu['name'] if gpu else 'none'}"
            + (
                f" ({gpu['memory_gb']} GiB, sm_{gpu['capability']}), driver {gpu['driver']}"
                if gpu
                else ""
            )
            + f"; torch {environment['torch']}, CUDA {environment['cuda']}, "
            f"cuDNN {environment['cudnn']}; "
            f"Python {environment['python']}, numpy {environment['numpy']}, procgen {procgen}"
        )
        if self.cli.device == "cuda" and not gpu:
            self.problems.append(
                "--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)"
            )
            return False
        return True

    def tests(self):
        junit = os.path.join(self.work, "tests.xml")
        argv = [self.python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
        argv += ["--continue-on-collection-errors", f"--junitxml={junit}", "tests"]
        record = self.run("tests", [(argv, REPO_ROOT)], self.plan.test_seconds)
        counts = junit_counts(junit)
        self.summary["tests"] = {**record, **counts}
        ran = counts["passed"] + counts["failed"]
        if record["status"] != "ok" or counts["failed"] or counts["errors"]:
            self.problems.append(
                f"pytest -m cuda: {record['status']}, "
                f"{counts['failed']} failed {counts['failures']}"
            )
        elif self.cli.device == "cuda" and (ran == 0 or counts["skipped"]):
            self.problems.append(
                f"pytest -m cuda: {ran} ran, {counts['skipped']} skipped on the GPU "
                "(logs/tests.log)"
            )

    def bench_step(self, name, configs, seconds):
        path = os.path.join(self.work, f"{name}.json")
        argv = [
            self.python,
            "benchmarks/bench_sps.py",
            "--device",
            self.cli.device,
            "--configs",
            ",".join(configs),
        ]
        argv += [*self.plan.bench_args, "--json", path]
        record = self.run(name, [(argv, REPO_ROOT)], seconds)
        figures = bench_figures(self.bench, path)
        self.summary[name] = {**record, "configs": figures}
        missing = [config for config in configs if config not in figures]
        if record["status"] == "timeout":
            self.cut_short.append(
                f"{name}: stopped after {record['seconds']} s; no result for {missing}"
            )
        elif record["status"] != "ok" or missing:
            self.problems.append(
                f"bench_sps.py: {record['status']}, no result for {missing} (logs/{name}.log)"
            )

    def user_command(self):
        cwd = os.path.join(self.work, "user_command")
        argv = [
            self.python,
            os.path.join(REPO_ROOT, USER_COMMAND[0]),
            *USER_COMMAND[1:],
            "--no-pretrained",
        ]
        argv += self.plan.user_args
        record = self.run(
            "user_command",
            [(argv, cwd)],
            self.plan.user_seconds,
            startup=self.plan.user_startup,
            start_when=os.path.join(
                cwd, "runs", "*"
            ),  # its SummaryWriter: set up, and its Ctrl-C handler installed
            stop_signal=signal.SIGINT,
            grace=self.plan.user_grace,
        )
        scalars = tensorboard_scalars(os.path.join(cwd, "runs", "*"))
        trained = [
            points for tag, points in scalars.items() if tag.startswith(("charts/", "losses/"))
        ]
        steps = sorted({step for points in trained for step, _ in points})
        (exit_code,) = record["exit_codes"]
        sps = scalars.get("charts/SPS", [])
        self.summary["user_command"] = {
            **record,
            "status": "ok"
            if exit_code in (0, 130)
            else "failed",  # 130: it stopped at our Ctrl-C, as asked
            "command": shlex.join(
                ["python", *USER_COMMAND, "--no-pretrained", *self.plan.user_args]
            ),
            "iterations_logged": len(steps),
            "global_step": steps[-1] if steps else 0,
            "sps_last": sps[-1][1] if sps else None,
            "test_episodic_return": [
                value for _, value in scalars.get("charts/test_episodic_return", [])
            ],
            "tags": len(scalars),
        }
        if exit_code not in (0, 130):
            self.problems.append(
                f"the user's command exited with {exit_code} (logs/user_command.log)"
            )
        if not steps:
            self.problems.append(
                f"the user's command logged no iteration in {record['seconds']} s "
                "(logs/user_command.log)"
            )

    def probes(self, default_updates):
        """Each phase runs n probe runs side by side (seeds 1..n, a folder each). Their per-update
        times and the overhead around the updates (start-up, first-update warm-up, exit) give a full
        run's time at the probe's default length, hence runs per hour = n x 3600 / that time."""
        phases = []
        for concurrent in self.plan.side_by_side:
            name = f"probe_{concurrent}"
            commands = [
                (
                    [
                        self.python,
                        os.path.join(REPO_ROOT, PROBE_COMMAND[0]),
                        *PROBE_COMMAND[1:],
                        "--seed",
                        str(seed),
                    ]
                    + list(self.plan.probe_args),
                    os.path.join(self.work, name, f"seed{seed}"),
                )
                for seed in range(1, concurrent + 1)
            ]
            if self.limit(self.plan.probe_seconds) < 5:
                phases.append({"concurrent": concurrent, "status": "skipped"})
                self.cut_short.append(f"{name}: no time left")
                continue
            record = self.run(name, commands, self.plan.probe_seconds)
            updates, per_update, overheads = [], [], []
            for (_, cwd), seconds in zip(commands, record["process_seconds"]):
                wall = [float(row["wall_time"]) for row in read_metrics_csv(cwd)]
                updates.append(len(wall))
                if len(wall) >= 2:
                    per_update.append((wall[-1] - wall[0]) / (len(wall) - 1))
                    overheads.append(seconds - len(wall) * per_update[-1])
            phase = {"concurrent": concurrent, **record, "updates": updates}
            if per_update:
                run_seconds = statistics.median(
                    o + default_updates * p for o, p in zip(overheads, per_update)
                )
                phase.update(
                    seconds_per_update=round(statistics.median(per_update), 4),
                    overhead_seconds=round(statistics.median(overheads), 1),
                    run_seconds_at_default=round(run_seconds, 1),
                    runs_per_hour=round(concurrent * 3600 / run_seconds, 1),
                )
            phases.append(phase)
            if record["status"] == "failed" or min(updates) == 0:
                self.problems.append(
                    f"{name}: {record['status']}, updates logged per run {updates} "
                    f"({record['logs'][0]})"
                )
            elif record["status"] == "timeout":
                self.cut_short.append(
                    f"{name}: stopped after {record['seconds']} s at updates {updates}"
                )
        rated = [phase for phase in phases if "runs_per_hour" in phase]
        best = max(rated, key=lambda phase: phase["runs_per_hour"]) if rated else None
        self.summary["probe"] = {
            "command": shlex.join(["python", *PROBE_COMMAND, "--seed", "N", *self.plan.probe_args]),
            "default_updates": default_updates,
            "phases": phases,
            "best_runs_per_hour": best and best["runs_per_hour"],
            "best_concurrent": best and best["concurrent"],
        }

    def bench_compile(self):
        if not self.plan.compile_configs:
            self.summary["bench_compile"] = {
                "status": "skipped",
                "reason": "--quick: compiling takes minutes on a CPU",
            }
            return
        seconds = self.limit(self.time_left())
        if seconds < 60:
            self.summary["bench_compile"] = {"status": "skipped", "reason": f"{seconds:.0f} s left"}
            self.cut_short.append(f"bench_compile: only {seconds:.0f} s left")
            return
        self.bench_step("bench_compile", self.plan.compile_configs, seconds)

    def ratios(self):
        figures = {
            **self.summary["bench"]["configs"],
            **self.summary["bench_compile"].get("configs", {}),
        }
        base = figures.get("procgen/paper")
        self.summary["bench_ratios"] = {
            f"{name} / procgen/paper": round(config["sps"] / base["sps"], 3)
            for name, config in figures.items()
            if base and name != "procgen/paper"
        }

    def finish(self):
        self.gpu.stop()
        self.summary["ok"] = not self.problems
        self.summary["check"]["seconds"] = round(time.time() - self.start, 1)
        os.makedirs(self.cli.out, exist_ok=True)
        with open(os.path.join(self.cli.out, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=1)
        archive = os.path.join(self.cli.out, "logs.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:  # checkpoints (tens of MB) left out
            tar.add(
                self.work,
                arcname="gpu_check",
                filter=lambda info: None if info.name.endswith(".pt") else info,
            )
        if not self.cli.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        verdict = "ok" if self.summary["ok"] else "PROBLEMS:\n  " + "\n  ".join(self.problems)
        log(f"{verdict}\nwrote {os.path.join(self.cli.out, 'summary.json')} and {archive}")
        return 0 if self.summary["ok"] else 1


def print_environment():
    """The versions and the GPU, as one JSON line; importing the three scripts and starting a
    Procgen env check the packages and system libraries they need."""
    import importlib.metadata
    import platform

    sys.path.insert(0, REPO_ROOT)
    import numpy
    import torch

    import ppo_collapse_probe
    import ppo_procgen_mdr

    importlib.import_module("ppo_patchloc_mdr")  # the third script: it must import too

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    gpu = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
        driver = (
            subprocess.run(query, capture_output=True, text=True).stdout.strip()
            if shutil.which("nvidia-smi")
            else ""
        )
        gpu = {
            "name": properties.name,
            "memory_gb": round(properties.total_memory / 2**30, 1),
            "capability": f"{properties.major}{properties.minor}",
            "count": torch.cuda.device_count(),
            "driver": driver or None,
        }
    # libenv.so loads (Qt, libGL, glib)
    ppo_procgen_mdr.ProcgenEnv(num_envs=1, env_name="bigfish").close()
    probe = ppo_collapse_probe.Args()
    environment = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32": {
            "cudnn_conv": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        },
        "gpu": gpu,
        "cpu_count": os.cpu_count(),
        "packages": {
            name: version(name)
            for name in (
                "torchvision",
                "procgen-mirror",
                "gym3",
                "gym",
                "gymnasium",
                "tyro",
                "tensorboard",
                "pytest",
            )
        },
        "probe_default_updates": probe.total_timesteps // (probe.num_envs * probe.num_steps),
    }
    print("ENVIRONMENT " + json.dumps(environment), flush=True)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes everywhere, no compile: a dry run (~1 min)",
    )
    parser.add_argument("--out", help="folder for summary.json and logs.tar.gz (required)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the working folder (its path is printed)"
    )
    parser.add_argument("--print-environment", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.print_environment:
        return print_environment()
    if not cli.out:
        parser.error("--out is required: the folder for summary.json and logs.tar.gz")

    os.environ.update(WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    check = Check(cli, PLANS["quick" if cli.quick else "full"])
    log(
        f"gpu_check: --device {cli.device}{' --quick' if cli.quick else ''}, "
        f"budget {check.plan.budget} s, in {check.work}"
    )
    try:
        if check.environment():
            check.tests()
            check.bench_step("bench", check.plan.bench_configs, check.plan.bench_seconds)
            check.user_command()
            check.probes(check.summary["environment"]["probe_default_updates"])
            check.bench_compile()
            check.ratios()
    except Exception as e:  # a bug of the check itself: still write what it measured
        check.problems.append(f"gpu_check.py failed: {e!r}")
        raise
    finally:
        exit_code = check.finish()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
