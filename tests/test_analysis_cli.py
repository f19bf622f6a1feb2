"""Tests of analysis/cli.py, the parser and the command wrapper every analysis tool shares: argparse
errors on one line with status 2 and no abbreviations, bad input as `error: ...` with the tool's
status, any other exception left to escape (a bug must show its traceback), a closed stdout
quiet."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"
sys.path.insert(0, str(ANALYSIS))  # the modules' folder
import aggregate  # noqa: E402
import cli  # noqa: E402
import collapse_figures  # noqa: E402
import collapse_stats  # noqa: E402
import compare_runs  # noqa: E402
import plot_learning  # noqa: E402


class Bad(Exception):
    pass


def parser():
    parser = cli.ArgumentParser(prog="tool")
    parser.add_argument("--out-dir", required=True)
    return parser


def test_an_argparse_error_is_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "error: the following arguments are required: --out-dir (--help lists the options)\n"
    )


def test_an_option_is_never_taken_from_its_prefix(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--out", "x"])
    assert capsys.readouterr().err.splitlines() == [
        "error: the following arguments are required: --out-dir (--help lists the options)"
    ]


@pytest.mark.parametrize("status", [1, 2])
def test_bad_input_is_one_line_with_the_tools_status(status, capsys):
    def main(argv):
        print("half")
        raise Bad(f"--x {argv[0]}: must be positive")

    assert cli.run_command(main, ["-1"], Bad, status) == status
    out, err = capsys.readouterr()
    assert (out, err) == ("half\n", "error: --x -1: must be positive\n")


def test_the_main_status_and_argv_pass_through(capsys):
    seen = []
    assert cli.run_command(lambda argv: seen.append(argv) or 3, ["a"], Bad, 2) == 3
    assert seen == [["a"]] and capsys.readouterr().err == ""


def test_any_other_exception_escapes_with_its_traceback():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_command(main, [], Bad, 2)


@pytest.mark.parametrize("tool", [aggregate, collapse_figures, collapse_stats, compare_runs])
def test_every_tool_runs_through_the_shared_wrapper(tool, monkeypatch):
    """Each tool's run() passes its own main() (looked up when run() is called, so a test may swap
    it), its bad-input class and its status to run_command."""
    calls = []
    monkeypatch.setattr(tool, "run_command", lambda *a: calls.append(a) or 0)
    assert tool.run(["x"]) == 0
    ((main, argv, bad_input, status),) = calls
    assert main is tool.main and argv == ["x"]
    expected = {aggregate: (aggregate.UserError, 1), compare_runs: (compare_runs.BadInput, 2)}
    assert (bad_input, status) == expected.get(tool, (collapse_stats.ConfigError, 2))


@pytest.mark.parametrize("tool", [aggregate, collapse_figures, collapse_stats, compare_runs])
def test_every_tool_parses_with_the_shared_parser(tool):
    assert tool.ArgumentParser is cli.ArgumentParser
    assert plot_learning.ArgumentParser is cli.ArgumentParser


def test_a_closed_stdout_gives_status_1_and_nothing_on_stderr(tmp_path):
    code = (
        f"import sys; sys.path.insert(0, {str(ANALYSIS)!r}); import cli; "
        "sys.exit(cli.run_command(lambda argv: print('x' * 100) or 0, [], ValueError, 2))"
    )
    reader, writer = os.pipe()
    os.close(reader)  # the reader has left before the first byte
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, stdout=writer, stderr=subprocess.PIPE
        )
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr.decode()) == (1, "")
