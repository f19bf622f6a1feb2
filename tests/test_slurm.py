"""sweeps/slurm_array.sh on a real one-node SLURM started on this machine (Debian's slurm-wlm and
munge, as root).

A 2-task array of tiny Procgen runs; mid-run, task 1 gets the time-limit signal (USR1 to the batch
shell, what `--signal=B:USR1@120` sends: the script forwards it and requeues itself) and task 2 is
requeued from outside (`scontrol requeue`: SIGTERM to every process, as a preemption). Both must
finish, each continuing from its checkpoint, with the metrics of an uninterrupted run."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

DAEMONS = ["sbatch", "munged", "slurmctld", "slurmd"]
missing = [name for name in DAEMONS if shutil.which(name) is None]
pytestmark = [
    pytest.mark.skipif(
        bool(missing),
        reason=f"no {', '.join(missing)}: apt-get install slurm-wlm munge (.ci/run does)",
    ),
    pytest.mark.skipif(
        hasattr(os, "geteuid") and os.geteuid() != 0,
        reason="a one-node SLURM needs root for slurmd",
    ),
]
ITERATIONS = 8
STEPS_PER_ITERATION = 32
# 2 envs x 16 steps per iteration on the CPU, one thread per run (the node has 2 CPUs), a checkpoint
# every 2 iterations
TINY = (
    "--env-id bigfish --num-envs 2 --num-steps 16 --minibatch-size 16 "
    f"--total-timesteps {STEPS_PER_ITERATION * ITERATIONS} "
    "--num-eval-envs 2 --eval-interval 0 --checkpoint-interval 2 --torch-threads 1 "
    "--diag-minibatches -1 --no-pretrained --no-cuda"
)
UNTIMED = ("charts/SPS", "perf/")  # wall-clock figures differ between any two runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout, what, logs=(), env=None):
    """Poll `condition` until it is true; else fail with the tails of `logs` and, given `env`,
    SLURM's view of the jobs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    tails = "\n".join(
        f"--- {log}:\n{Path(log).read_text()[-3000:]}" for log in logs if Path(log).exists()
    )
    if env is not None:
        tails += (
            "\n--- scontrol show job:\n"
            + subprocess.run(
                ["scontrol", "show", "job"], env=env, capture_output=True, text=True
            ).stdout
        )
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


@pytest.fixture(scope="module")
def slurm():
    """munged, slurmctld and slurmd on this host (one node, 2 CPUs, ports and state in a temporary
    folder), stopped at the end; yields the environment that points sbatch, squeue and scontrol at
    it."""
    home = Path(tempfile.mkdtemp(prefix="slurm-"))  # short: munge's socket path must fit a sockaddr
    home.chmod(0o755)  # munged: the socket's folder must be reachable by everyone
    key = home / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    (home / "slurm.conf").write_text(
        f"""ClusterName=mdrtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={home}/munge.socket
CredType=cred/munge
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/slurmctld.log
SlurmdLogFile={home}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = {**os.environ, "SLURM_CONF": str(home / "slurm.conf")}
    munged = [
        "munged",
        "-F",
        "--force",
        f"--socket={home}/munge.socket",
        f"--key-file={key}",
        f"--log-file={home}/munged.log",
    ]
    munged += [f"--pid-file={home}/munged.pid", f"--seed-file={home}/munge.seed"]
    commands = [munged, ["slurmctld", "-D", "-i"], ["slurmd", "-D"]]
    daemons = []
    try:
        for command in commands:
            daemons.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
            if command[0] == "munged":
                wait_for(
                    (home / "munge.socket").exists, 30, "munged's socket", [home / "munged.log"]
                )

        def node_idle():
            return (
                "idle"
                in subprocess.run(
                    ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
                ).stdout
            )

        wait_for(
            node_idle, 60, "the node to be idle", [home / "slurmctld.log", home / "slurmd.log"]
        )
        yield env
    finally:
        # this cluster's jobs: the test's
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        # cancelled runs checkpoint and exit; then their node daemon can go
        deadline = time.monotonic() + 90
        while squeue(env) and time.monotonic() < deadline:
            time.sleep(1)
        for daemon in reversed(daemons):
            # slurmd, slurmctld, munged: each one this fixture started, by its process
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(home, ignore_errors=True)


def squeue(env) -> str:
    return subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout


def job(env, job_id) -> dict:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def run_dir(work: Path, seed: int):
    """The run folder (named by the script from its arguments) whose args.json has this seed, or
    None."""
    for args_file in work.glob("runs/*/args.json"):
        try:
            if json.loads(args_file.read_text())["seed"] == seed:
                return args_file.parent
        except json.JSONDecodeError:  # being written
            pass
    return None


def scalars(folder: Path) -> dict:
    """tag -> {step: value} over every event file of the folder (a resumed run adds one; a re-logged
    step: the last)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if not tag.startswith(UNTIMED)]
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in tags}


def test_array_task_requeued_mid_run_resumes_and_matches_an_uninterrupted_run(
    slurm, repo_root, tmp_path
):
    work, reference = tmp_path / "slurm", tmp_path / "reference"
    work.mkdir()
    reference.mkdir()
    lines = [f"python {repo_root / 'ppo_procgen_mdr.py'} {TINY} --seed {seed}" for seed in (1, 2)]
    (work / "list.txt").write_text("\n".join(lines) + "\n")
    env = {**slurm, "PYTHON": sys.executable, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    logs = [
        work / "task-1.out",
        work / "task-2.out",
        Path(slurm["SLURM_CONF"]).parent / "slurmctld.log",
    ]
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=1-2",
            "--cpus-per-task=1",
            f"--chdir={work}",
            f"--output={work}/task-%a.out",
        ]
        + [str(repo_root / "sweeps" / "slurm_array.sh"), "list.txt"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert submit.returncode == 0, submit.stderr
    array_id = submit.stdout.strip().split(";")[0]
    # the uninterrupted runs, alongside (the same commands as the list's, as sweeps/slurm_array.sh
    # runs them)
    reference_logs = [reference / f"seed-{seed}.out" for seed in (1, 2)]
    references = []
    for line, log in zip(lines, reference_logs):
        with open(log, "w") as out:
            command = [sys.executable, *line.split()[1:], "--resume", "auto"]
            references.append(
                subprocess.Popen(
                    command, cwd=reference, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )

    # mid-run, as soon as its run has written a checkpoint: task 1 gets the time-limit signal, task
    # 2 is requeued
    interrupt = {
        1: ["scancel", "--signal=USR1", "--batch", f"{array_id}_1"],
        2: ["scontrol", "requeue", f"{array_id}_2"],
    }

    def interrupt_checkpointed_runs():
        for seed in list(interrupt):
            folder = run_dir(work, seed)
            if folder is not None and (folder / "checkpoint.pt").exists():
                subprocess.run(interrupt.pop(seed), env=env, check=True)
        return not interrupt

    wait_for(interrupt_checkpointed_runs, 120, "each run's first checkpoint", logs, slurm)

    # a requeued job waits for its begin time (SLURM's delay lets the old batch step finish):
    # release it once it has been pending for a few seconds; released at once, it can start before
    # slurmd is done with the old step, and the new start fails with "Job credential revoked" (seen
    # twice on this machine, task 1, which requeues itself)
    pending_since = {}
    for task in (1, 2):
        task_id = f"{array_id}_{task}"

        def restarted(task_id=task_id):
            state = job(slurm, task_id)
            if state.get("JobState") == "PENDING":
                if time.monotonic() - pending_since.setdefault(task_id, time.monotonic()) > 5:
                    subprocess.run(
                        ["scontrol", "update", f"JobId={task_id}", "StartTime=now"],
                        env=slurm,
                        capture_output=True,
                    )
            return state.get("Restarts") == "1" and state.get("JobState") in (
                "RUNNING",
                "COMPLETED",
            )

        wait_for(restarted, 120, f"task {task} to be requeued and started again", logs, slurm)

    def both_completed():
        return all(job(slurm, f"{array_id}_{t}").get("JobState") == "COMPLETED" for t in (1, 2))

    wait_for(both_completed, 180, "both tasks to complete", logs, slurm)
    for process, log in zip(references, reference_logs):
        assert process.wait(timeout=180) == 0, (
            f"the uninterrupted run failed:\n{log.read_text()[-3000:]}"
        )

    for task, seed in zip((1, 2), (1, 2)):
        state = job(slurm, f"{array_id}_{task}")
        assert state["ExitCode"] == "0:0" and state["Restarts"] == "1", state
        log = logs[task - 1].read_text()
        resumed = re.search(r"resumed .* at iteration (\d+)", log)
        assert resumed and 0 < int(resumed.group(1)) < ITERATIONS, (
            f"task {task} did not resume mid-run:\n{log[-3000:]}"
        )
        interrupted, uninterrupted = scalars(run_dir(work, seed)), scalars(run_dir(reference, seed))
        assert interrupted.keys() == uninterrupted.keys() and "losses/value_loss" in interrupted
        # the last step
        assert max(interrupted["losses/value_loss"].keys()) == STEPS_PER_ITERATION * ITERATIONS
        assert interrupted == uninterrupted, (
            f"task {task}: metrics differ from the uninterrupted run"
        )
