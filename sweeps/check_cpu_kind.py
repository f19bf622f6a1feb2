"""Which CPU kind made a committed collapse-probe run: rerun its first updates here and compare.

    # the dropout study's runs whose first start went unrecorded (docs/dropout/PLAN.md, 2026-12-04)
    python sweeps/check_cpu_kind.py /work/study-cb2e6e5 docs/dropout/stability_step1.txt \
        docs/dropout stability/none_s31 stability/dropout_p0.1_s31 > cpu_kinds.jsonl

The project's VMs all call their CPU "AMD EPYC", but some are AMD family 25 model 1 (Zen 3, torch's
CPU kernels at AVX2) and some model 17 (Zen 4, AVX-512), and a probe run of one seed differs across
the two from its first update on. A run whose starts were not recorded (`hosts.jsonl`, written by
sweeps/run_and_commit.sh from 2026-12-04 on) can still be placed: this reruns the run's own line of
the study's command list from WORKTREE (a checkout of the commit that made it), for its first
--updates updates only, in a temporary folder, with the queue's one thread (niced, as the queue
runs), and compares those rows of the new metrics.csv with DEST/<run-name>/metrics.csv, every
column but the timing ones, as written (6 significant digits). They match on the kind that made
the run (its first start: a run resumed later may have gone on elsewhere) and differ on another.

Other code would differ too, and be taken for the other kind, so a run is refused (one line on
stderr, exit 2) unless WORKTREE's HEAD is the commit of the run's first start (DEST/<run-name>/
summary.json, provenance_segments[0], which must have run clean) and its tracked files are
unchanged. A resumed run is placed
by its first start only: --updates above that start's updates is refused too.

Prints one JSON line per run: the run, "same" (true or false), the rows compared, the first column
that differs, the worktree's commit and the machine as the line's interpreter sees it (as
hosts.jsonl records it). Nothing is written elsewhere: the temporary folder is removed and no
bytecode is written into the worktree. The probe's learning rate is constant and its rows do not
depend on --total-timesteps, which is what makes a shortened rerun comparable.
"""

import argparse
import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

SCRIPT = "ppo_collapse_probe.py"
TIMING = ("sps", "wall_time")  # the only columns a rerun may change
# hosts.jsonl's fields (sweeps/run_and_commit.sh), as the interpreter that runs the line sees them:
# another interpreter on one machine may have another torch, whose kernels are another SIMD level
MACHINE_KEYS = ("model_name", "cpu_family", "model", "stepping", "torch_cpu_capability")
MACHINE_KEYS += ("torch", "cpus", "python")
MACHINE = r"""
import json, os, platform
import torch
try:
    with open("/proc/cpuinfo") as f:
        first_processor = f.read().split("\n\n")[0].splitlines()
except OSError:
    first_processor = []
fields = {}
for line in first_processor:
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
record = {key.replace(" ", "_"): fields.get(key) for key in ("model name", "cpu family")}
record.update(model=fields.get("model"), stepping=fields.get("stepping"))
record["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
record.update(torch=torch.__version__, cpus=os.cpu_count(), python=platform.python_version())
print(json.dumps(record))
"""


class CheckError(Exception):
    """Bad input: a one-line message."""


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no iteration


def last_line(done: subprocess.CompletedProcess) -> str:
    return ((done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"])[0]


def child_env() -> dict:
    """The queue's one thread, no wandb upload, and no __pycache__ written into the worktree."""
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONDONTWRITEBYTECODE="1")


def interpreter(tokens: list, worktree: str) -> str:
    """The line's interpreter; a relative path is the worktree's, where the queue ran the line."""
    python = tokens[0]
    if os.sep in python and not os.path.isabs(python):
        return os.path.join(worktree, python)
    return python


def machine(python: str, name: str) -> dict:
    """The machine as sweeps/run_and_commit.sh's hosts.jsonl records a start, seen by `python`
    (the interpreter of run `name`'s line, which runs the rerun): its torch, not this process's."""
    with tempfile.TemporaryDirectory(prefix="cpu-kind-") as folder:  # no stray import path
        try:
            done = subprocess.run(
                [python, "-c", MACHINE], cwd=folder, env=child_env(), capture_output=True, text=True
            )
        except OSError as error:
            raise CheckError(
                f"cannot run {python}, the interpreter of {name}: {error.strerror}"
            ) from None
    if done.returncode != 0:
        raise CheckError(
            f"{python} (the interpreter of {name}) cannot describe this machine: {last_line(done)}"
        )
    try:
        record = json.loads((done.stdout.strip().splitlines() or [""])[-1])
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or tuple(record) != MACHINE_KEYS:
        raise CheckError(f"{python} (the interpreter of {name}) printed no machine record")
    return record


def run_lines(list_path: str) -> dict:
    """The command list's lines by their --run-name (--run-name NAME or --run-name=NAME; the last
    one of a line, as the script's parser takes it)."""
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as error:
        raise CheckError(f"cannot read the command list {list_path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise CheckError(
            f"the command list {list_path} is not UTF-8 text: {error.reason}"
        ) from None
    by_name = {}
    for number, line in enumerate(lines, start=1):
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line)
        except ValueError as error:
            raise CheckError(f"{list_path} line {number}: {error}") from None
        name = None
        for index, token in enumerate(tokens):
            if token == "--run-name" and index + 1 < len(tokens):
                name = tokens[index + 1]
            elif token.startswith("--run-name="):
                name = token.partition("=")[2]
        if name:
            by_name[name] = tokens
    return by_name


def check_script(tokens: list) -> None:
    if len(tokens) < 2 or os.path.basename(tokens[1]) != SCRIPT:
        raise CheckError(f"only {SCRIPT} runs can be checked, not: {shlex.join(tokens)}")


def read_text(path: str) -> str:
    """A run file's text, as written (no newline translation)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return f.read()
    except OSError as error:
        raise CheckError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise CheckError(f"{path} is not UTF-8 text: {error.reason}") from None


def first_start(summary_path: str) -> tuple:
    """(commit, updates) of the run's first start, from its summary.json: updates is None when the
    run was never resumed. A lone `provenance` (no list of starts) must be a first start."""
    try:
        summary = json.loads(read_text(summary_path))
    except json.JSONDecodeError as error:
        raise CheckError(f"{summary_path} is not JSON: {error.msg} (line {error.lineno})") from None
    segments = None
    if isinstance(summary, dict):
        segments = summary.get("provenance_segments")
        if segments is None and "provenance" in summary:
            segments = [summary["provenance"]]
    if not isinstance(segments, list) or not segments or not isinstance(segments[0], dict):
        raise CheckError(f"{summary_path} has no provenance_segments (the run's starts)")
    commit, start = segments[0].get("commit"), segments[0].get("from_iteration")
    if not is_int(start) or start != 1:
        raise CheckError(
            f"{summary_path}: the first recorded start is from iteration {start!r}, "
            "not 1: the commit of the run's first start is not recorded"
        )
    if not isinstance(commit, str) or not re.fullmatch("[0-9a-f]{40}", commit):
        raise CheckError(
            f"{summary_path}: the first start's commit is {commit!r}, not 40 hex digits"
        )
    if segments[0].get("dirty") is not False:  # changed files: other code than the commit's
        raise CheckError(
            f"{summary_path}: the first start ran from a changed checkout of {commit} (dirty "
            f"{segments[0].get('dirty')!r}): a rerun of the commit cannot place it"
        )
    if len(segments) == 1:
        return commit, None
    second = segments[1].get("from_iteration") if isinstance(segments[1], dict) else None
    if not is_int(second) or second < 2:
        raise CheckError(
            f"{summary_path}: the second start's from_iteration is {second!r}, not "
            "an integer above 1"
        )
    return commit, second - 1


def shortened(tokens: list, worktree: str, total_timesteps: int, run_name: str) -> list:
    """The line's command for `total_timesteps` steps, from the worktree's script, under a new
    run name, without --resume."""
    command = [interpreter(tokens, worktree), os.path.join(worktree, SCRIPT)]
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
    """The first `count` rows of a metrics.csv, each with an integer global_step."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        rows = list(reader)
        columns = reader.fieldnames or []
    except csv.Error as error:
        raise CheckError(f"{path} is not a CSV file: {error}") from None
    if "global_step" not in columns:
        raise CheckError(f"{path} has no global_step column")
    if len(rows) < count:
        raise CheckError(f"{path} has {len(rows)} updates, fewer than --updates {count}")
    for update, row in enumerate(rows[:count], start=1):
        try:
            int(row["global_step"])
        except (TypeError, ValueError):  # TypeError: a short row's missing value (None)
            raise CheckError(
                f"{path} update {update}: global_step {row['global_step']!r} is not an integer"
            ) from None
    return rows[:count]


def first_difference(committed: list, rerun: list):
    """(update, column) of the first value that differs, or None."""
    for row, (old, new) in enumerate(zip(committed, rerun), start=1):
        for column, value in old.items():
            if column not in TIMING and new.get(column) != value:
                return row, column
    return None


def check(worktree: str, tokens: list, committed: list) -> dict:
    """Rerun the line's first len(committed) updates in a temporary folder, niced as the queue runs
    its lines (it takes the idle CPU), and compare them with the committed rows."""
    updates = len(committed)
    batch = int(committed[0]["global_step"])  # update 1 ends at one batch of steps
    command = shortened(tokens, worktree, updates * batch, "check")
    if shutil.which("nice"):
        command = ["nice", "-n", "10", *command]
    with tempfile.TemporaryDirectory(prefix="cpu-kind-") as folder:
        try:
            done = subprocess.run(
                command, cwd=folder, env=child_env(), capture_output=True, text=True
            )
        except OSError as error:
            raise CheckError(f"cannot run {shlex.join(command)}: {error.strerror}") from None
        if done.returncode != 0:
            raise CheckError(f"the rerun failed ({shlex.join(command)}): {last_line(done)}")
        rerun = read_rows(os.path.join(folder, "runs", "check", "metrics.csv"), updates)
    differs = first_difference(committed, rerun)
    where = None if differs is None else {"update": differs[0], "column": differs[1]}
    return {"same": differs is None, "updates": updates, "first_difference": where}


def worktree_commit(worktree: str) -> str:
    """The worktree's HEAD; refused if tracked files differ from it (the rerun runs those)."""
    done = subprocess.run(
        ["git", "-C", worktree, "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if done.returncode != 0 or not os.path.isfile(os.path.join(worktree, SCRIPT)):
        raise CheckError(f"{worktree} is not a git checkout with {SCRIPT}")
    commit = done.stdout.strip()
    status = ["git", "-C", worktree, "status", "--porcelain", "--untracked-files=no"]
    done = subprocess.run(status, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckError(f"git status fails in {worktree}: {last_line(done)}")
    if done.stdout.strip():
        first = done.stdout.splitlines()[0][3:]  # porcelain: XY PATH
        raise CheckError(
            f"the worktree {worktree} has changed tracked files ({first} and maybe more): it "
            f"would rerun other code than its commit {commit}; make a worktree of {commit}"
        )
    return commit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("worktree", help="a checkout of the commit that made the runs")
    parser.add_argument("command_list", help="the study's command list (one line per run)")
    parser.add_argument("dest", help="the folder holding the committed runs (DEST/<run-name>/)")
    parser.add_argument("runs", nargs="+", help="run names, as the list's --run-name")
    parser.add_argument("--updates", type=int, default=3, help="first updates compared")
    args = parser.parse_args(argv)
    worktree = os.path.abspath(args.worktree)  # the rerun runs in another folder
    try:
        if args.updates < 1:
            raise CheckError(f"--updates must be at least 1, got {args.updates}")
        commit = worktree_commit(worktree)
        lines = run_lines(args.command_list)
        missing = [name for name in args.runs if name not in lines]
        if missing:
            raise CheckError(f"not in {args.command_list}: {', '.join(missing)}")
        for name in args.runs:
            check_script(lines[name])
        committed = {}  # every run is refused or read before the first rerun
        for name in args.runs:
            made_at, first_updates = first_start(os.path.join(args.dest, name, "summary.json"))
            if made_at != commit:
                raise CheckError(
                    f"{name} was made at {made_at} (its first start), the worktree {worktree} "
                    f"is at {commit}: make a worktree of {made_at}"
                )
            if first_updates is not None and args.updates > first_updates:
                raise CheckError(
                    f"--updates {args.updates} exceeds the first start's {first_updates} updates "
                    f"of {name}: the check places only the first start"
                )
            metrics = os.path.join(args.dest, name, "metrics.csv")
            committed[name] = read_rows(metrics, args.updates)
        pythons = {name: interpreter(lines[name], worktree) for name in args.runs}
        hosts = {}  # by interpreter
        for name, python in pythons.items():
            if python not in hosts:
                hosts[python] = machine(python, name)
        out = io.StringIO()
        for name in args.runs:
            result = check(worktree, lines[name], committed[name])
            record = {"run": name, **result, "commit": commit}
            record.update(checked=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            record.update(host=hosts[pythons[name]])
            print(json.dumps(record), file=out)
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(out.getvalue())  # all or nothing: no partial record on an error
    return 0


if __name__ == "__main__":
    sys.exit(main())
