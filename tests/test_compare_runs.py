"""Tests of analysis/compare_runs.py on two hand-written metrics.csv folders: SAME, DIFF and ONLY
IN, the tolerance, and bad input (a missing folder, an unreadable metrics.csv, a bad tolerance)."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))  # the modules' folder
import compare_runs


def write_metrics(folder: Path, header: str, *rows: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder


@pytest.fixture
def runs(tmp_path) -> tuple:
    a = write_metrics(
        tmp_path / "a", "global_step,loss,mode,sps,only_a", "128,0.5,bn,9,1", "256,0.25,bn,9,1"
    )
    b = write_metrics(
        tmp_path / "b", "global_step,loss,mode,sps", "128,0.5,bn,7", "256,0.2500001,bn,8"
    )
    return a, b


def test_the_tags_are_compared_step_by_step(runs, capsys):
    assert compare_runs.run([str(runs[0]), str(runs[1])]) == 1

    lines = capsys.readouterr().out.splitlines()
    # sps is ignored by default; mode is not a number: not a tag
    assert lines == [
        "DIFF       loss  first at step 256: 0.25 vs 0.2500001",
        "ONLY IN A  only_a  ",
    ]


def test_a_tolerance_makes_close_values_the_same(runs, capsys):
    assert compare_runs.run([str(runs[0]), str(runs[1]), "--tolerance", "1e-6"]) == 0

    assert capsys.readouterr().out.splitlines()[0] == "SAME       loss  2 values"


@pytest.mark.parametrize(
    "make, args, line",
    [
        (None, ["missing", "b"], "error: missing: no such folder (a run folder with TensorBoard"),
        (
            None,
            ["a", "b", "--tolerance", "-1"],
            "error: argument --tolerance: '-1' is not a finite",
        ),
        (None, ["a", "b", "--tolerance", "nan"], "error: argument --tolerance: 'nan' is not"),
        (None, ["a"], "error: the following arguments are required: run_b"),
        (
            lambda tmp: write_metrics(tmp / "c", "step,loss", "128,0.5"),
            ["a", "c"],
            "error: c/metrics.csv: no global_step column",
        ),
        (
            lambda tmp: write_metrics(tmp / "c", "global_step,loss", "x,0.5"),
            ["a", "c"],
            "error: c/metrics.csv: unreadable (",
        ),
        (
            lambda tmp: (tmp / "c").mkdir(),
            ["a", "c"],
            "error: no logged values in c",
        ),
    ],
)
def test_bad_input_is_one_line(runs, monkeypatch, capsys, make, args, line):
    tmp = runs[0].parent
    if make:
        make(tmp)
    monkeypatch.chdir(tmp)
    try:
        status = compare_runs.run(args)
    except SystemExit as exit:  # argparse's errors
        status = exit.code

    err = capsys.readouterr().err
    assert status == 2 and err.startswith(line) and err.count("\n") == 1, err


def test_the_command_line_exits_2_on_bad_input_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, compare_runs.__file__, "missing", "other"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: missing: no such folder")
