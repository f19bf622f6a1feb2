"""Tests of analysis/plot_learning.py on a TensorBoard folder written here: the PNG it draws, where
it goes (only where --out says), and bad input."""

import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))  # the modules' folder
import plot_learning


@pytest.fixture
def run_dir(tmp_path) -> Path:
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(0, 1000, 100):
        writer.add_scalar("charts/normalized_reward", step / 10, step)
        writer.add_scalar("charts/test_normalized_reward", step / 20, step)
        writer.add_scalar("charts/generalization_gap", 3.0, step)
    writer.close()
    return tmp_path / "run"


def test_the_learning_curve_is_drawn_where_out_says(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    plot_learning.main([str(run_dir), "--out", "figs/curve.png", "--random-reference", "-14"])

    assert (tmp_path / "figs" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["figs", "run"]


@pytest.mark.parametrize(
    "args, line",
    [
        (["RUN"], "error: the following arguments are required: --out"),
        (
            ["RUN", "--out", "a.png", "--smooth", "0"],
            "error: argument --smooth: '0' is not a whole",
        ),
        (
            ["RUN", "--out", "a.png", "--smooth", "x"],
            "error: argument --smooth: 'x' is not a whole",
        ),
        (
            ["RUN", "--out", "a.png", "--random-reference", "inf"],
            "error: argument --random-reference: 'inf' is not a finite number",
        ),
        (["missing", "--out", "a.png"], "error: missing: no such folder"),
        (["EMPTY", "--out", "a.png"], "error: no normalized-reward scalars in"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    run_dir, tmp_path, monkeypatch, capsys, args, line
):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    args = [
        str(run_dir) if a == "RUN" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args
    ]

    with pytest.raises(SystemExit) as exit:
        plot_learning.main(args)

    message = capsys.readouterr().err or str(exit.value.code)
    assert exit.value.code != 0 and message.startswith(line) and message.strip().count("\n") == 0
    assert not (tmp_path / "a.png").exists()
