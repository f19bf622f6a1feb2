"""sweeps/check_cpu_kind.py: a committed probe run's first updates, rerun here from a checkout of
the run's commit, match it bit for bit (timing aside) when this CPU kind made it, and any other
value is named as the first difference; a checkout at another commit or with changed files is
refused, since its other code would read as another kind; bad input is a one-line error with
nothing printed to stdout. The tests check out their own clone of this repository's HEAD: this
checkout may be dirty while it is worked on."""

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO_ROOT, "sweeps", "check_cpu_kind.py")
TINY = "--num-envs 2 --num-steps 16 --minibatch-size 8 --view-size 16 --image-size 64"
TINY += " --hidden-size 32"
# 3 updates of 2 envs x 16 steps; the check reruns fewer, with a smaller --total-timesteps
LINE = (
    f"{shlex.quote(sys.executable)} ppo_collapse_probe.py --mode dropout-mdr --dropout-p 0.1 "
    f"{TINY} --total-timesteps 96 --seed 3 --run-name study/d_s3"
)
HOST_KEYS = ["model_name", "cpu_family", "model", "stepping", "torch_cpu_capability", "torch"]
HOST_KEYS += ["cpus", "python"]  # hosts.jsonl's, in its order (sweeps/run_and_commit.sh)
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONDONTWRITEBYTECODE="1")


class Committed(NamedTuple):
    folder: Path
    worktree: Path  # a clean clone of this repository's HEAD, which made the run
    listing: Path
    dest: Path


def check(cwd, *args):
    """The tool, without this environment's PYTHONDONTWRITEBYTECODE: it must set that itself."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    command = [sys.executable, CHECK, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def git(worktree, *args) -> str:
    done = subprocess.run(["git", "-C", str(worktree), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def clone(path: Path) -> Path:
    """A checkout of this repository's HEAD (its objects shared, so it takes no time)."""
    done = subprocess.run(["git", "clone", "-q", "--shared", REPO_ROOT, str(path)], text=True)
    assert done.returncode == 0
    return path


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A tiny dropout-mdr run made here by the clone's probe, as the queue commits it (its
    metrics.csv and summary.json in DEST), run in a folder of its own: the clone stays clean."""
    folder = tmp_path_factory.mktemp("cpu-kind")
    worktree = clone(folder / "wt")
    work = folder / "work"
    work.mkdir()
    command = shlex.split(LINE)
    command[1] = str(worktree / command[1])
    done = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    dest = folder / "dest"
    (dest / "study" / "d_s3").mkdir(parents=True)
    for name in ("metrics.csv", "summary.json"):
        shutil.copy(work / "runs" / "study" / "d_s3" / name, dest / "study" / "d_s3" / name)
    listing = folder / "list.txt"
    listing.write_text(f"# a study's list\n{LINE}\n")
    return Committed(folder, worktree, listing, dest)


@pytest.fixture
def dest(committed, tmp_path):
    """A copy of the committed DEST, to edit."""
    return Path(shutil.copytree(committed.dest, tmp_path / "dest"))


def edit_metrics(path, update: int, column: str, value: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[update - 1][column] = value
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def one_error(result) -> str:
    """The one line of a refused check (exit 2, nothing on stdout)."""
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    return line


def test_a_run_made_here_matches_and_another_value_is_named(committed):
    """The shortened rerun (2 of the run's 3 updates) matches its first rows, whatever the timing
    columns say; one changed loss is the first difference, at its update and column."""
    metrics = committed.dest / "study" / "d_s3" / "metrics.csv"
    original = metrics.read_text()
    try:
        edit_metrics(metrics, 1, "sps", "1")  # timing may differ between runs
        args = [committed.worktree, committed.listing, committed.dest, "study/d_s3"]
        args += ["--updates", "2"]
        result = check(committed.folder, *args)
        assert result.returncode == 0, result.stderr
        [record] = [json.loads(line) for line in result.stdout.splitlines()]
        assert record["run"] == "study/d_s3" and record["same"] is True
        assert record["updates"] == 2 and record["first_difference"] is None
        assert record["commit"] == git(committed.worktree, "rev-parse", "HEAD").strip()
        assert list(record["host"]) == HOST_KEYS
        edit_metrics(metrics, 2, "approx_kl", "0.5")
        result = check(committed.folder, *args)
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout)
        assert record["same"] is False
        assert record["first_difference"] == {"update": 2, "column": "approx_kl"}
    finally:
        metrics.write_text(original)


def test_no_record_is_printed_when_one_run_cannot_be_checked(committed, dest):
    """All or nothing: the first run is checked, the second's rerun fails (its line has a value
    the probe refuses), so stdout stays empty and stderr has one line."""
    other = LINE.replace("study/d_s3", "study/bad_s3").replace("--dropout-p 0.1", "--dropout-p 2")
    listing = dest.parent / "list2.txt"
    listing.write_text(f"{LINE}\n{other}\n")
    shutil.copytree(dest / "study" / "d_s3", dest / "study" / "bad_s3")
    args = [committed.worktree, listing, dest, "study/d_s3", "study/bad_s3", "--updates", "1"]
    line = one_error(check(dest.parent, *args))
    assert line.startswith("error: the rerun failed (") and "--dropout-p 2 " in line


@pytest.mark.parametrize(
    "runs, line, expected",
    [
        (["study/x_s1"], LINE, "error: not in {list}: study/x_s1"),
        (
            ["study/d_s3"],
            "python ppo_procgen_mdr.py --seed 3 --run-name study/d_s3",
            "error: only ppo_collapse_probe.py runs can be checked, not: python ppo_procgen_mdr.py "
            "--seed 3 --run-name study/d_s3",
        ),
        (["study/d_s3", "--updates", "0"], LINE, "error: --updates must be at least 1, got 0"),
        (
            ["study/d_s3"],
            f"# a comment\n{LINE}\npython ppo_collapse_probe.py --run-name 'study/e_s3",
            "error: {list} line 3: No closing quotation",
        ),
    ],
)
def test_bad_input_is_one_line(committed, tmp_path, runs, line, expected):
    listing = tmp_path / "list.txt"
    listing.write_text(line + "\n")
    (tmp_path / "dest" / "study" / "d_s3").mkdir(parents=True)
    (tmp_path / "dest" / "study" / "d_s3" / "metrics.csv").write_text("iteration,global_step\n")
    result = check(tmp_path, committed.worktree, listing, tmp_path / "dest", *runs)
    assert one_error(result) == expected.format(list=listing)


def test_a_list_that_is_not_text_is_one_line(committed, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"python ppo_collapse_probe.py --run-name study/d_s3 \xff\n")
    result = check(tmp_path, committed.worktree, listing, committed.dest, "study/d_s3")
    expected = f"error: the command list {listing} is not UTF-8 text: invalid start byte"
    assert one_error(result) == expected


def test_a_worktree_without_the_probe_is_one_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(LINE + "\n")
    result = check(tmp_path, tmp_path, listing, tmp_path, "study/d_s3")
    expected = f"error: {tmp_path} is not a git checkout with ppo_collapse_probe.py"
    assert one_error(result) == expected


def test_a_worktree_at_another_commit_is_refused(committed, tmp_path, dest):
    """The run's first start was made at HEAD: a checkout one commit on is refused, and so is
    HEAD for a run whose summary.json names another commit."""
    head = git(committed.worktree, "rev-parse", "HEAD").strip()
    later = clone(tmp_path / "wt2")
    git(later, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", "x")
    later_head = git(later, "rev-parse", "HEAD").strip()
    assert later_head != head
    result = check(tmp_path, later, committed.listing, committed.dest, "study/d_s3")
    assert one_error(result) == (
        f"error: study/d_s3 was made at {head} (its first start), the worktree {later} is at "
        f"{later_head}: make a worktree of {head}"
    )
    summary_path = dest / "study" / "d_s3" / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary["provenance_segments"][0]["commit"] == head
    summary["provenance_segments"][0]["commit"] = "b" * 40
    summary_path.write_text(json.dumps(summary))
    result = check(tmp_path, committed.worktree, committed.listing, dest, "study/d_s3")
    assert one_error(result) == (
        f"error: study/d_s3 was made at {'b' * 40} (its first start), the worktree "
        f"{committed.worktree} is at {head}: make a worktree of {'b' * 40}"
    )


def test_a_dirty_worktree_is_refused(committed, tmp_path):
    """A checkout of the right commit with a changed tracked file would rerun other code."""
    head = git(committed.worktree, "rev-parse", "HEAD").strip()
    dirty = clone(tmp_path / "wt2")
    with open(dirty / "README.md", "a") as f:
        f.write("changed\n")
    result = check(tmp_path, dirty, committed.listing, committed.dest, "study/d_s3")
    assert one_error(result) == (
        f"error: the worktree {dirty} has changed tracked files (README.md and maybe more): it "
        f"would rerun other code than its commit {head}; make a worktree of {head}"
    )


@pytest.mark.parametrize(
    "summary, expected",
    [
        (None, "cannot read {path}: No such file or directory"),
        ("{", "{path} is not JSON: Expecting property name enclosed in double quotes (line 1)"),
        ("[]", "{path} has no provenance_segments (the run's starts)"),
        ('{"status": "completed"}', "{path} has no provenance_segments (the run's starts)"),
        ('{"provenance_segments": []}', "{path} has no provenance_segments (the run's starts)"),
        (
            '{"provenance_segments": [{"from_iteration": 1, "commit": null}]}',
            "{path}: the first start's commit is None, not 40 hex digits",
        ),
        (
            '{"provenance_segments": [{"from_iteration": 1, "commit": "HEAD"}]}',
            "{path}: the first start's commit is 'HEAD', not 40 hex digits",
        ),
        (
            '{"provenance_segments": [{"commit": "{head}"}]}',
            "{path}: the first recorded start is from iteration None, not 1: the commit of the "
            "run's first start is not recorded",
        ),
        (  # a lone provenance is the last start: here a resumed run's
            '{"provenance": {"from_iteration": 5, "commit": "{head}"}}',
            "{path}: the first recorded start is from iteration 5, not 1: the commit of the run's "
            "first start is not recorded",
        ),
        (
            '{"provenance_segments": [{"from_iteration": 1, "commit": "{head}", "dirty": false}, '
            '{"from_iteration": "2"}]}',
            "{path}: the second start's from_iteration is '2', not an integer above 1",
        ),
        (  # a run made from a changed checkout ran other code than its commit
            '{"provenance_segments": [{"from_iteration": 1, "commit": "{head}", "dirty": true}]}',
            "{path}: the first start ran from a changed checkout of {head} (dirty True): a rerun "
            "of the commit cannot place it",
        ),
        (  # no dirty flag: not known to have run clean
            '{"provenance_segments": [{"from_iteration": 1, "commit": "{head}"}]}',
            "{path}: the first start ran from a changed checkout of {head} (dirty None): a rerun "
            "of the commit cannot place it",
        ),
        (  # a lone first start is taken: the check goes on to the metrics
            '{"provenance": {"from_iteration": 1, "commit": "{head}", "dirty": false}}',
            "{metrics} has 3 updates, fewer than --updates 5",
        ),
    ],
)
def test_a_missing_or_corrupt_summary_is_one_line(committed, dest, summary, expected):
    path = dest / "study" / "d_s3" / "summary.json"
    if summary is None:
        path.unlink()
    else:
        path.write_text(
            summary.replace("{head}", git(committed.worktree, "rev-parse", "HEAD")[:-1])
        )
    args = [committed.worktree, committed.listing, dest, "study/d_s3", "--updates", "5"]
    result = check(dest.parent, *args)
    head = git(committed.worktree, "rev-parse", "HEAD")[:-1]
    expected = expected.replace("{head}", head)
    expected = expected.format(path=path, metrics=path.with_name("metrics.csv"))
    assert one_error(result) == "error: " + expected


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"iteration,global_step\n1,32\n", "{path} has 1 updates, fewer than --updates 2"),
        (b"iteration,step\n1,32\n2,64\n", "{path} has no global_step column"),
        (b"", "{path} has no global_step column"),
        (
            b"iteration,global_step\n1,32\n2,6.4e1\n",
            "{path} update 2: global_step '6.4e1' is not an integer",
        ),
        (
            b"iteration,global_step\n1,32\n2\n",
            "{path} update 2: global_step None is not an integer",
        ),
        (b"iteration,global_step\n1,32\n2,\xff\n", "{path} is not UTF-8 text: invalid start byte"),
        (
            b'iteration,global_step\n1,"' + b"3" * 200_000 + b'"\n',
            "{path} is not a CSV file: field larger than field limit (131072)",
        ),
    ],
)
def test_a_bad_committed_metrics_csv_is_one_line(committed, dest, content, expected):
    path = dest / "study" / "d_s3" / "metrics.csv"
    path.write_bytes(content)
    args = [committed.worktree, committed.listing, dest, "study/d_s3", "--updates", "2"]
    assert one_error(check(dest.parent, *args)) == "error: " + expected.format(path=path)


@pytest.mark.parametrize(
    "python, expected",
    [
        ("{tmp}/no-python", "cannot run {python}, the interpreter of study/d_s3: No such file or "),
        ("{tmp}/text", "cannot run {python}, the interpreter of study/d_s3: Permission denied"),
        (
            "false",
            "{python} (the interpreter of study/d_s3) cannot describe this machine: no output",
        ),
    ],
)
def test_an_interpreter_that_cannot_run_is_one_line(committed, tmp_path, python, expected):
    python = python.format(tmp=tmp_path)
    (tmp_path / "text").write_text("not a program\n")  # not executable
    listing = tmp_path / "list.txt"
    listing.write_text(LINE.replace(shlex.quote(sys.executable), python, 1) + "\n")
    result = check(tmp_path, committed.worktree, listing, committed.dest, "study/d_s3")
    expected = "error: " + expected.format(python=python)
    assert one_error(result).startswith(expected)


def test_run_name_with_equals_and_the_lines_own_interpreter(committed, tmp_path):
    """A line may name its run --run-name=NAME; its interpreter, relative to the worktree where the
    queue ran it, describes the machine (here a wrapper of this Python that reports python 0.0)
    and runs the rerun, niced by 10 as the queue runs it; the worktree may be given relative to
    the caller's folder."""
    worktree = clone(tmp_path / "wt3")  # the wrapper is untracked: the worktree stays clean
    host = dict.fromkeys(HOST_KEYS, "x")
    host.update(cpus=2, python="0.0")
    wrapper = worktree / "wrapped-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = -c ] && {{ echo {shlex.quote(json.dumps(host))}; exit 0; }}\n'
        f"nice > {shlex.quote(str(tmp_path / 'niceness'))}\n"
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    wrapper.chmod(0o755)
    line = LINE.replace(shlex.quote(sys.executable), "./wrapped-python", 1)
    listing = tmp_path / "list.txt"
    listing.write_text(line.replace("--run-name study/d_s3", "--run-name=study/d_s3") + "\n")
    args = ["wt3", listing, committed.dest, "study/d_s3", "--updates", "1"]
    result = check(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["run"] == "study/d_s3" and record["same"] is True
    assert record["host"] == host
    assert int((tmp_path / "niceness").read_text()) == min(os.nice(0) + 10, 19)


def test_updates_beyond_the_first_start_are_refused(committed, dest):
    """A run resumed at update 2 had its first start for 1 update: only that one places it."""
    path = dest / "study" / "d_s3" / "summary.json"
    summary = json.loads(path.read_text())
    first = summary["provenance_segments"][0]
    summary["provenance_segments"].append({**first, "from_iteration": 2})
    path.write_text(json.dumps(summary))
    args = [committed.worktree, committed.listing, dest, "study/d_s3", "--updates", "2"]
    assert one_error(check(dest.parent, *args)) == (
        "error: --updates 2 exceeds the first start's 1 updates of study/d_s3: the check places "
        "only the first start"
    )


def test_a_check_leaves_nothing_in_the_worktree(committed):
    """The rerun runs in a temporary folder and writes no bytecode: the worktree has no new file,
    not even an ignored one (runs/, __pycache__/)."""
    args = [committed.worktree, committed.listing, committed.dest, "study/d_s3", "--updates", "1"]
    result = check(committed.folder, *args)
    assert result.returncode == 0, result.stderr
    status = git(committed.worktree, "status", "--porcelain", "--untracked-files=all", "--ignored")
    assert status == ""
    assert not (committed.worktree / "runs").exists()
