"""Bad input, tried as a new user would (issue 27): one table of bad inputs across the three
scripts, the env and the analysis tools. Each row must end with a non-zero exit status, exactly one
line on stderr (the tools' "error: ..."), no traceback, and nothing new in runs/. Plus the data-loss
cases: a finished run survives --resume auto, a failed run's retry with the same command works, and
--overwrite moves the old folder aside.

The commands run in-process (cli(argv) / run(argv)) in a temporary working folder: no interpreter
start-up per row, nothing lands in the repository. Validation comes before torch or env work, so a
row takes well under a second; a row whose check were missing would train (tiny settings) and
show as exit status 0. The env is a library: its bad input is a ValueError (gymnasium's
convention) with a one-line message, which its rows turn into exit status 1 and that line. Rows
that give an analysis tool a corrupt file expect the one warning line naming it (issue 27 item 3:
skipped, not fatal) before the one error line saying that nothing usable is left."""

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import gymnasium as gym
import pytest

import envs  # noqa: F401  (registers PatchLoc-v0)
import ppo_collapse_probe as probe
import ppo_patchloc_mdr as patchloc
import ppo_procgen_mdr as procgen

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "analysis"))  # the analysis tools import each other by name
import aggregate  # noqa: E402
import collapse_stats  # noqa: E402
import compare_runs  # noqa: E402

SCRIPTS = {"procgen": procgen, "patchloc": patchloc, "probe": probe}
# tiny runs: a row whose check were missing would train for seconds, not hours, and then fail
TINY = {
    "procgen": "--env-id coinrun --num-envs 2 --num-steps 8 --minibatch-size 8 --total-timesteps 16"
    " --num-eval-envs 2 --eval-interval 0 --no-pretrained --no-cuda",
    "patchloc": "--num-tasks 4 --num-test-tasks 2 --view-size 16 --num-envs 2 --num-steps 8"
    " --minibatch-size 8 --total-timesteps 16 --num-eval-envs 2 --hidden-size 32 --no-pretrained"
    " --no-cuda --num-render-episodes 0 --mdr-rounds 1 --eval-interval 0",
    "probe": "--num-envs 2 --num-steps 8 --minibatch-size 8 --total-timesteps 16 --view-size 16"
    " --hidden-size 32 --mode bn-mdr",
}


def unfinished_run(tmp_path):
    """runs/x holds events of a run that was killed before its first checkpoint."""
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "events.out.tfevents.1.host.1.0").write_bytes(b"")


def read_only_runs(tmp_path, monkeypatch):
    """runs/ read-only. As root (CI containers) the permission bits do not bind, so os.access is
    made to report what a user would meet; the scripts must still stop before writing."""
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    if os.access(runs, os.W_OK):
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).resolve() == runs.resolve():
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)


def corrupt_args_json(tmp_path):
    """The only run of runs/: TensorBoard events and an args.json that is not JSON."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "runs" / "bigfish__ppo_procgen_mdr__bn0.1__mdr2-1__s1"
    with SummaryWriter(str(run_dir)) as writer:
        writer.add_scalar("charts/episodic_return", 1.0, 8)
    (run_dir / "args.json").write_text('{"env_id": "bigfish", ')


def corrupt_metrics_csv(tmp_path, folder="runs"):
    """The only run of `folder`: a metrics.csv without the probe's columns and a summary.json."""
    run_dir = tmp_path / folder / "ppo_collapse_probe__bn__s1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("iteration,oops\n1,2\n")
    (run_dir / "summary.json").write_text('{"status": "completed"}')


def script_row(name, flags, fragment, prepare=None):
    return pytest.param(("script", name, flags, fragment, prepare), id=f"{name}: {flags}")


def tool_row(name, argv, fragment, prepare=None, warnings=0):
    tool = {"aggregate": aggregate, "collapse_stats": collapse_stats, "compare": compare_runs}
    row = ("tool", tool[name], argv, fragment, prepare, warnings)
    return pytest.param(row, id=f"{name}: {argv}")


def env_row(label, call, fragment):
    return pytest.param(("env", call, fragment), id=f"env: {label}")


def env_step(action, **settings):
    env = gym.make("PatchLoc-v0", num_tasks=2, view_size=8, **settings)
    env.reset(seed=0)
    env.step(action)


BAD_INPUTS = [
    # ppo_procgen_mdr.py: every row of issue 27's list, and more
    script_row("procgen", "--gamma 2", "--gamma 2.0: must be a finite number in (0, 1]"),
    script_row(
        "procgen", "--clip-coef -1", "--clip-coef -1.0: must be a finite number in (0, inf)"
    ),
    script_row("procgen", "--alpha2 100000", "--alpha2"),
    script_row("procgen", "--run-name ../../x", "must name a folder inside runs/"),
    script_row("procgen", "--run-name /tmp/x", "must name a folder inside runs/"),
    script_row("procgen", "--learning-rate 1e38", "--learning-rate 1e+38: must be a finite number"),
    script_row("procgen", "--learning-rate nan", "--learning-rate nan: must be a finite number"),
    script_row("procgen", "--learning-rate -1", "--learning-rate -1.0: must be a finite number"),
    script_row("procgen", "--seed -1", "--seed -1: must be a finite number in [0, 2147483647]"),
    script_row("procgen", "--seed 4294967296", "--seed 4294967296"),
    script_row("procgen", "--env-id notagame", "unknown --env-id 'notagame'"),
    script_row("procgen", "--gae-lambda 0", "--gae-lambda 0.0"),
    script_row("procgen", "--ent-coef -0.5", "--ent-coef -0.5"),
    script_row("procgen", "--vf-coef inf", "--vf-coef inf"),
    script_row("procgen", "--max-grad-norm 0", "--max-grad-norm 0.0"),
    script_row("procgen", "--update-epochs 0", "--update-epochs 0"),
    script_row("procgen", "--update-epochs 1000", "--update-epochs 1000"),
    script_row("procgen", "--alpha1 2 --alpha2 2", "--alpha1"),
    script_row("procgen", "--minibatch-size 0", "--minibatch-size 0"),
    script_row("procgen", "--minibatch-size 1000", "--minibatch-size"),
    script_row("procgen", "--overwrite --resume auto", "give one of them"),
    script_row("procgen", "--torch-threads 100000", "--torch-threads 100000"),
    script_row("procgen", "--run-name x", "runs/x holds an unfinished run", unfinished_run),
    script_row("procgen", "", "is not writable", read_only_runs),
    # ppo_patchloc_mdr.py
    script_row("patchloc", "--gamma 2", "--gamma 2.0"),
    script_row("patchloc", "--learning-rate nan", "--learning-rate nan"),
    script_row("patchloc", "--learning-rate 1e38", "--learning-rate 1e+38"),
    script_row("patchloc", "--seed -1", "--seed -1"),
    script_row("patchloc", "--run-name ../x", "must name a folder inside runs/"),
    script_row("patchloc", "--alpha2 100000", "--alpha2"),
    script_row("patchloc", "--mdr-rounds 0", "--mdr-rounds 0"),
    script_row("patchloc", "--clip-coef 0", "--clip-coef 0.0"),
    script_row("patchloc", "--slide-mpp 0", "--slide-mpp 0.0"),
    script_row("patchloc", "--slide-mpp nan", "--slide-mpp nan"),
    script_row("patchloc", "--slide-level -1", "--slide-level -1"),
    script_row("patchloc", "--regions-per-slide 0", "--regions-per-slide 0"),
    script_row("patchloc", "--min-tissue 1.5", "--min-tissue 1.5"),
    script_row("patchloc", "--image-source /nonexistent/folder", "/nonexistent/folder"),
    script_row("patchloc", "--num-tasks 0", "--num-tasks 0: must be >= 1"),
    script_row("patchloc", "--hidden-size 0", "--hidden-size 0: must be >= 1"),
    script_row("patchloc", "--minibatch-size 1000", "--minibatch-size"),
    script_row("patchloc", "--run-name x", "runs/x holds an unfinished run", unfinished_run),
    script_row("patchloc", "", "is not writable", read_only_runs),
    # ppo_collapse_probe.py
    script_row("probe", "--mode foo", "unknown --mode 'foo'"),
    script_row("probe", "--gamma 2", "--gamma 2.0"),
    script_row("probe", "--clip-coef -1", "--clip-coef -1.0"),
    script_row("probe", "--learning-rate 1e38", "--learning-rate 1e+38"),
    script_row("probe", "--learning-rate -1", "--learning-rate -1.0"),
    script_row("probe", "--seed -1", "--seed -1"),
    script_row("probe", "--run-name ../../x", "must name a folder inside runs/"),
    script_row("probe", "--alpha2 100000", "--alpha2"),
    script_row("probe", "--min-tissue -1", "--min-tissue -1.0"),
    script_row("probe", "--torch-threads 100000", "--torch-threads 100000"),
    # issue 22: the dropout modes' flag
    script_row("probe", "--mode dropout --dropout-p 1.0", "--dropout-p 1.0: must be in [0, 1)"),
    script_row("probe", "--mode dropout-mdr --dropout-p -0.1", "--dropout-p -0.1"),
    script_row("probe", "--mode bn --dropout-p 0.1", "--dropout-p applies to the dropout modes"),
    script_row("probe", "--mode dropout --alpha2 1", "--alpha1/--alpha2 apply to the MDR modes"),
    script_row("patchloc", "--norm dropout --dropout-p 1.5", "--dropout-p 1.5 < 1"),
    script_row("probe", "--resume auto --checkpoint-interval 0", "--checkpoint-interval 0"),
    script_row("probe", "--run-name x", "runs/x holds an unfinished run", unfinished_run),
    script_row("probe", "", "is not writable", read_only_runs),
    # the env
    env_row("step(1.5)", lambda: env_step(1.5), "integers in 0..6"),
    env_row("step(7)", lambda: env_step(7), "integers in 0..6"),
    env_row("step(True)", lambda: env_step(True), "integers in 0..6"),
    env_row(
        "num_tasks=0",
        lambda: gym.make("PatchLoc-v0", num_tasks=0),
        "must be an integer >= 1 (got 0)",
    ),
    # the analysis tools
    tool_row("aggregate", "--runs-dir runs", "--out-dir"),
    tool_row("aggregate", "--out-dir f --final-fraction 2", "--final-fraction"),
    tool_row("aggregate", "--out-dir f --points 1", "--points"),
    tool_row("aggregate", "--out-dir f --runs-dir nowhere", "--runs-dir nowhere: no such folder"),
    tool_row("aggregate", "--out-dir f", "no runs of", corrupt_args_json, warnings=1),
    tool_row("collapse_stats", "--out-dir f --runs-dir nowhere", "nowhere: no such folder"),
    tool_row(
        "collapse_stats", "--out-dir f --runs-dir runs", "no runs found", corrupt_metrics_csv, 1
    ),
    tool_row("compare", "runs/a runs/b", "runs/a"),
    tool_row("compare", "runs/a runs/b --tolerance -1", "--tolerance"),
]


def run_row(row, tmp_path, monkeypatch) -> tuple:
    """(exit status, stdout, stderr) of one row, run in tmp_path; a traceback (an exception that
    escapes the command) fails the test with it."""
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    kind = row[0]
    if kind == "script":
        _, name, flags, _, prepare = row
        argv = TINY[name].split() + flags.split()
    elif kind == "tool":
        _, tool, argv, _, prepare, _ = row
        argv = argv.split()
    else:
        prepare = None
    if prepare is read_only_runs:
        read_only_runs(tmp_path, monkeypatch)
    elif prepare is not None:
        prepare(tmp_path)
    before = runs_files(tmp_path)
    status = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if kind == "script":
                status = SCRIPTS[name].cli(argv)
            elif kind == "tool":
                status = tool.run(argv)
            else:
                row[1]()
                status = 0
        except SystemExit as e:  # argparse, tyro
            status = e.code
        except ValueError as e:
            if kind != "env":
                raise AssertionError(traceback.format_exc()) from None
            status = 1
            print(e, file=sys.stderr)
        except Exception:
            raise AssertionError(traceback.format_exc()) from None
    assert runs_files(tmp_path) == before, "something was written to runs/"
    return status, out.getvalue(), err.getvalue()


def runs_files(tmp_path) -> list:
    runs = tmp_path / "runs"
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*")) if runs.exists() else []


def test_the_table_holds_at_least_40_rows_from_every_part():
    kinds = [param.values[0][0] for param in BAD_INPUTS]
    scripts = {param.values[0][1] for param in BAD_INPUTS if param.values[0][0] == "script"}
    tools = {param.values[0][1] for param in BAD_INPUTS if param.values[0][0] == "tool"}
    assert len(BAD_INPUTS) >= 40 and "env" in kinds
    assert scripts == set(SCRIPTS) and tools == {aggregate, collapse_stats, compare_runs}


@pytest.mark.parametrize("row", BAD_INPUTS)
def test_bad_input_is_one_line_and_nonzero_and_writes_nothing(row, tmp_path, monkeypatch):
    status, _, stderr = run_row(row, tmp_path, monkeypatch)

    fragment = row[3] if row[0] in ("script", "tool") else row[2]
    warnings = row[5] if row[0] == "tool" else 0
    lines = stderr.splitlines()
    assert status not in (0, None), f"exit status {status!r}; stderr:\n{stderr}"
    assert "Traceback" not in stderr
    assert len(lines) == warnings + 1, stderr
    assert all(line.startswith("warning: skipped ") for line in lines[:warnings]), stderr
    assert fragment in lines[-1], (fragment, lines[-1])
    if row[0] != "env":
        assert lines[-1].startswith("error: "), lines[-1]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_bad_input_from_the_shell_is_one_line(name, tmp_path):
    """The process as a user starts it (interpreter, tyro, sys.exit): status 2, one line."""
    command = [sys.executable, str(REPO_ROOT / f"{SCRIPTS[name].__name__}.py")]
    command += [*TINY[name].split(), "--gamma", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: --gamma 2.0: must be a finite number in (0, 1]"]
    assert not (tmp_path / "runs").exists()


ANALYSIS_TOOLS = ["collapse_stats", "collapse_figures", "compare_runs", "aggregate"]


@pytest.mark.parametrize("size", [100, 1_000_000])
@pytest.mark.parametrize("tool", ANALYSIS_TOOLS)
def test_an_analysis_tool_piped_into_a_reader_that_left_exits_quietly(tool, size, tmp_path):
    """`python analysis/TOOL.py ... | head`: the reader closes the pipe before the tool is done.
    The tool stops with status 1 and nothing on stderr, whether its output overflowed the pipe
    while main() ran (1 MB) or sat in stdout's buffer until the end (100 bytes). Its main() is
    swapped for one that prints `size` bytes, so the test needs no runs."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO_ROOT / 'analysis')!r}); import {tool} as t; "
        f"t.main = lambda argv=None: print('x' * {size}) or 0; sys.exit(t.run([]))"
    )
    reader, writer = os.pipe()
    os.close(reader)  # the reader has left before the first byte
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, stdout=writer, stderr=subprocess.PIPE
        )
    finally:
        os.close(writer)

    assert result.returncode == 1, result.stderr.decode()
    assert result.stderr.decode() == ""


# --------------------------------------------------------------------------------------------------
# Data loss: a run folder is never destroyed (issue 27 item 1)


def tiny_cli(name, tmp_path, monkeypatch, *flags) -> tuple:
    """(exit status, stdout, stderr) of a tiny run of script `name` in tmp_path."""
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = SCRIPTS[name].cli([*TINY[name].split(), "--run-name", "x", *flags])
    return status, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict:
    """name -> (bytes, mtime) of every file below `folder`."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", ["patchloc", "probe"])
def test_a_finished_run_without_checkpoint_survives_resume_auto(name, tmp_path, monkeypatch):
    """The README's smoke run (no --save-model), repeated as a sweep line with --resume auto: exit 0
    at once, saying the run is finished and where; every file and mtime as it was."""
    status, _, stderr = tiny_cli(name, tmp_path, monkeypatch)
    run_dir = tmp_path / "runs" / "x"
    assert status == 0, stderr
    assert not (run_dir / "checkpoint.pt").exists()
    before = snapshot(run_dir)

    status, stdout, stderr = tiny_cli(name, tmp_path, monkeypatch, "--resume", "auto")

    assert status == 0 and stderr == ""
    assert stdout.startswith(f"{Path('runs', 'x')} holds this run, finished at global_step 16")
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["x"]


def test_a_failed_run_is_retried_by_the_same_command(tmp_path, monkeypatch):
    """A run that failed before its first checkpoint (here an exception in the loop, as a
    non-finite loss or a crash would) is marked failed; the same command moves its folder aside to
    x.failed-1 (never deleted) and starts afresh, and the retry completes."""
    original = patchloc.clipped_ppo_loss

    def broken(*args, **kwargs):
        raise FloatingPointError("non-finite loss: the run stops")

    monkeypatch.setattr(patchloc, "clipped_ppo_loss", broken)
    status, stdout, stderr = tiny_cli("patchloc", tmp_path, monkeypatch, "--resume", "auto")
    run_dir = tmp_path / "runs" / "x"
    assert status == 1 and stderr.startswith("error: non-finite loss")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["checkpoint"]) == ("failed", None)
    assert "no checkpoint was written" in stdout and "intact" not in stdout
    failed = snapshot(run_dir)

    monkeypatch.setattr(patchloc, "clipped_ppo_loss", original)
    status, stdout, stderr = tiny_cli("patchloc", tmp_path, monkeypatch, "--resume", "auto")

    assert status == 0, stderr
    assert f"{Path('runs', 'x')} (its run failed: failed) moved aside to " in stdout
    assert snapshot(tmp_path / "runs" / "x.failed-1") == failed
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_overwrite_moves_the_old_run_aside(tmp_path, monkeypatch):
    status, _, _ = tiny_cli("probe", tmp_path, monkeypatch)
    first = snapshot(tmp_path / "runs" / "x")
    assert status == 0

    for number in (1, 2):
        status, stdout, _ = tiny_cli("probe", tmp_path, monkeypatch, "--overwrite")
        assert status == 0 and f"moved aside to {Path('runs', f'x.old-{number}')}" in stdout
    assert snapshot(tmp_path / "runs" / "x.old-1") == first
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["x", "x.old-1", "x.old-2"]
