"""Which CPU kind made a committed collapse-probe run: rerun its first updates here and compare.

    # the dropout study's runs whose first start went unrecorded (docs/dropout/PLAN.md, 2026-12-04)
    python sweeps/check_cpu_kind.py /work/study-cb2e6e5 docs/dropout/stability_step1.txt \
        docs/dropout stability/none_s31 stability/dropout_p0.1_s31 > cpu_kinds.jsonl

The project's VMs all call their CPU "AMD EPYC", but some are AMD family 25 model 1 (Zen 3, torch's
CPU kernels at AVX2) and some model 17 (Zen 4, AVX-512), and a probe run of one seed differs across
the two from its first update on. A run whose starts were not recorded (`hosts.jsonl`, written by
sweeps/run_and_commit.sh from 2026-12-04 on) can still be placed: this reruns the run's own line of
the study's command list from WORKTREE (a checkout of the commit that made it), for its first
--updates updates only, in a temporary folder, with the queue's one thread, and compares those rows
of the new metrics.csv with DEST/<run-name>/metrics.csv, every column but the timing ones, as
written (6 significant digits). They match on the kind that made the run (its first start: a run
resumed later may have gone on elsewhere) and differ on another.

Prints one JSON line per run: the run, "same" (true or false), the rows compared, the first column
that differs, the worktree's commit and this machine (as hosts.jsonl records it). Nothing is
written elsewhere; the temporary folder is removed. The probe's learning rate is constant and its
rows do not depend on --total-timesteps, which is what makes a shortened rerun comparable.
"""

import argparse
import csv
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

SCRIPT = "ppo_collapse_probe.py"
TIMING = ("sps", "wall_time")  # the only columns a rerun may change


class CheckError(Exception):
    """Bad input: a one-line message."""


def machine() -> dict:
    """This machine as sweeps/run_and_commit.sh's hosts.jsonl records a start."""
    import torch

    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            first_processor = f.read().split("\n\n")[0].splitlines()
    except OSError:
        first_processor = []
    for line in first_processor:
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    record = {key.replace(" ", "_"): fields.get(key) for key in ("model name", "cpu family")}
    record.update(model=fields.get("model"), stepping=fields.get("stepping"))
    record["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    record.update(torch=torch.__version__, cpus=os.cpu_count(), python=platform.python_version())
    return record


def run_lines(list_path: str) -> dict:
    """The command list's lines by their --run-name."""
    try:
        with open(list_path) as f:
            lines = [line.strip() for line in f]
    except OSError as error:
        raise CheckError(f"cannot read the command list {list_path}: {error.strerror}") from None
    by_name = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        tokens = shlex.split(line)
        if "--run-name" in tokens[:-1]:
            by_name[tokens[tokens.index("--run-name") + 1]] = tokens
    return by_name


def check_script(tokens: list) -> None:
    if len(tokens) < 2 or os.path.basename(tokens[1]) != SCRIPT:
        raise CheckError(f"only {SCRIPT} runs can be checked, not: {shlex.join(tokens)}")


def shortened(tokens: list, worktree: str, total_timesteps: int, run_name: str) -> list:
    """The line's command for `total_timesteps` steps, from the worktree's script, under a new
    run name, without --resume."""
    command = [tokens[0], os.path.join(worktree, SCRIPT)]
    skip = False
    for token in tokens[2:]:
        if skip:
            skip = False
            continue
        flag, equals, _ = token.partition("=")
        if flag in ("--total-timesteps", "--run-name", "--resume"):
            skip = not equals  # --flag VALUE: the value is the next token
            continue
        command.append(token)
    return command + ["--total-timesteps", str(total_timesteps), "--run-name", run_name]


def read_rows(path: str, count: int) -> list:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise CheckError(f"cannot read {path}: {error.strerror}") from None
    if len(rows) < count:
        raise CheckError(f"{path} has {len(rows)} updates, fewer than --updates {count}")
    return rows[:count]


def first_difference(committed: list, rerun: list):
    """(update, column) of the first value that differs, or None."""
    for row, (old, new) in enumerate(zip(committed, rerun), start=1):
        for column, value in old.items():
            if column not in TIMING and new.get(column) != value:
                return row, column
    return None


def check(worktree: str, tokens: list, committed_csv: str, updates: int) -> dict:
    """Rerun the line's first `updates` updates in a temporary folder and compare them."""
    committed = read_rows(committed_csv, updates)
    with tempfile.TemporaryDirectory(prefix="cpu-kind-") as folder:
        batch = int(committed[0]["global_step"])  # update 1 ends at one batch of steps
        command = shortened(tokens, worktree, updates * batch, "check")
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CheckError(f"the rerun failed ({shlex.join(command)}): {tail[0]}")
        rerun = read_rows(os.path.join(folder, "runs", "check", "metrics.csv"), updates)
    differs = first_difference(committed, rerun)
    where = None if differs is None else {"update": differs[0], "column": differs[1]}
    return {"same": differs is None, "updates": updates, "first_difference": where}


def worktree_commit(worktree: str) -> str:
    done = subprocess.run(
        ["git", "-C", worktree, "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if done.returncode != 0 or not os.path.isfile(os.path.join(worktree, SCRIPT)):
        raise CheckError(f"{worktree} is not a git checkout with {SCRIPT}")
    return done.stdout.strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("worktree", help="a checkout of the commit that made the runs")
    parser.add_argument("command_list", help="the study's command list (one line per run)")
    parser.add_argument("dest", help="the folder holding the committed runs (DEST/<run-name>/)")
    parser.add_argument("runs", nargs="+", help="run names, as the list's --run-name")
    parser.add_argument("--updates", type=int, default=3, help="first updates compared")
    args = parser.parse_args(argv)
    try:
        if args.updates < 1:
            raise CheckError(f"--updates must be at least 1, got {args.updates}")
        commit = worktree_commit(args.worktree)
        lines = run_lines(args.command_list)
        missing = [name for name in args.runs if name not in lines]
        if missing:
            raise CheckError(f"not in {args.command_list}: {', '.join(missing)}")
        for name in args.runs:
            check_script(lines[name])
        host = machine()
        out = io.StringIO()
        for name in args.runs:
            committed_csv = os.path.join(args.dest, name, "metrics.csv")
            result = check(args.worktree, lines[name], committed_csv, args.updates)
            record = {"run": name, **result, "commit": commit}
            record.update(checked=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), host=host)
            print(json.dumps(record), file=out)
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(out.getvalue())  # all or nothing: no partial record on an error
    return 0


if __name__ == "__main__":
    sys.exit(main())
