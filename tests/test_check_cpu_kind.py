"""sweeps/check_cpu_kind.py: a committed probe run's first updates, rerun here from a checkout,
match it bit for bit (timing aside) when this CPU kind made it, and any other value is named as the
first difference; bad input is a one-line error with nothing printed to stdout."""

import csv
import json
import os
import shlex
import subprocess
import sys

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


def check(tmp_path, *args):
    return subprocess.run(
        [sys.executable, CHECK, *args], cwd=tmp_path, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """(folder, list file, DEST): a tiny dropout-mdr run made here, as the queue commits it."""
    folder = tmp_path_factory.mktemp("cpu-kind")
    work = folder / "work"
    work.mkdir()
    command = shlex.split(LINE)
    command[1] = os.path.join(REPO_ROOT, command[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    dest = folder / "dest"
    (dest / "study" / "d_s3").mkdir(parents=True)
    metrics = (work / "runs" / "study" / "d_s3" / "metrics.csv").read_text()
    (dest / "study" / "d_s3" / "metrics.csv").write_text(metrics)
    listing = folder / "list.txt"
    listing.write_text(f"# a study's list\n{LINE}\n")
    return folder, listing, dest


def edit_metrics(path, update: int, column: str, value: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[update - 1][column] = value
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_run_made_here_matches_and_another_value_is_named(committed):
    """The shortened rerun (2 of the run's 3 updates) matches its first rows, whatever the timing
    columns say; one changed loss is the first difference, at its update and column."""
    folder, listing, dest = committed
    metrics = dest / "study" / "d_s3" / "metrics.csv"
    original = metrics.read_text()
    try:
        edit_metrics(metrics, 1, "sps", "1")  # timing may differ between runs
        args = [REPO_ROOT, str(listing), str(dest), "study/d_s3", "--updates", "2"]
        result = check(folder, *args)
        assert result.returncode == 0, result.stderr
        [record] = [json.loads(line) for line in result.stdout.splitlines()]
        assert record["run"] == "study/d_s3" and record["same"] is True
        assert record["updates"] == 2 and record["first_difference"] is None
        head = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
        )
        assert record["commit"] == head.stdout.strip()
        assert set(record["host"]) >= {"cpu_family", "model", "torch_cpu_capability"}
        edit_metrics(metrics, 2, "approx_kl", "0.5")
        result = check(folder, *args)
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout)
        assert record["same"] is False
        assert record["first_difference"] == {"update": 2, "column": "approx_kl"}
    finally:
        metrics.write_text(original)


def test_no_record_is_printed_when_one_run_cannot_be_checked(committed):
    """All or nothing: the first run is checked, the second has too few updates, so stdout stays
    empty and stderr has one line."""
    folder, listing, dest = committed
    other = LINE.replace("study/d_s3", "study/short_s3")
    listing2 = folder / "list2.txt"
    listing2.write_text(f"{LINE}\n{other}\n")
    (dest / "study" / "short_s3").mkdir(exist_ok=True)
    rows = (dest / "study" / "d_s3" / "metrics.csv").read_text().splitlines()[:2]
    (dest / "study" / "short_s3" / "metrics.csv").write_text("\n".join(rows) + "\n")
    args = [REPO_ROOT, str(listing2), str(dest), "study/d_s3", "study/short_s3", "--updates", "2"]
    result = check(folder, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {dest / 'study' / 'short_s3' / 'metrics.csv'} has 1 updates, fewer than "
        "--updates 2"
    ]


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
    ],
)
def test_bad_input_is_one_line(tmp_path, runs, line, expected):
    listing = tmp_path / "list.txt"
    listing.write_text(line + "\n")
    (tmp_path / "dest" / "study" / "d_s3").mkdir(parents=True)
    (tmp_path / "dest" / "study" / "d_s3" / "metrics.csv").write_text("iteration,global_step\n")
    result = check(tmp_path, REPO_ROOT, str(listing), str(tmp_path / "dest"), *runs)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == expected.format(list=listing)


def test_a_worktree_without_the_probe_is_one_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(LINE + "\n")
    result = check(tmp_path, str(tmp_path), str(listing), str(tmp_path), "study/d_s3")
    assert result.returncode == 2 and result.stdout == ""
    expected = f"error: {tmp_path} is not a git checkout with ppo_collapse_probe.py"
    assert result.stderr.strip() == expected
