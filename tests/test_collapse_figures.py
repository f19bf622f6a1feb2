"""Tests of analysis/collapse_figures.py: reading old and new probe runs, the Fig. 6 and App. B
layouts from hand-written CSVs, one panel's content, Stage C's figures (families as columns, the
paired differences), the dropout study's figures (two dropout probabilities never one row, train vs
held-out curves), the command line (its output folder, unfinished runs, bad input)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ppo_collapse_probe as probe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))  # the modules' folder
import collapse_figures as figures
import collapse_runs as cr

ANALYSIS = Path(figures.__file__).parent
PNG = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

# Runs committed before the probe logged acting_entropy (and while it had an online collapse
# detector)
OLD_RUN = ANALYSIS.parent / "docs" / "collapse" / "bn_clip0.2_ent0.01_seed1"
with open(OLD_RUN / "metrics.csv", newline="") as old_csv:
    OLD_COLUMNS = next(csv.reader(old_csv))


def write_run(folder: Path, mode, clip, ent, seed, iterations=40, crash_at=None, old=False):
    """A run as the probe writes it (old=True: the columns and summary of the runs committed before
    acting_entropy and --view-batching): a rising reward (crashing at `crash_at`; none in update 1),
    a growing Delta pi minus (0 in eval mode), the acting entropy 0.1 below the loss's."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    columns = OLD_COLUMNS if old else probe.CSV_COLUMNS
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for i in range(1, iterations + 1):
            reward = min(90.0, 3.0 * i) + rng.normal(0, 3)
            if crash_at and i >= crash_at:
                reward = 5.0
            if i == 1:
                reward = float("nan")  # no episode finished in the first update
            row = {column: 0.0 for column in columns}
            row.update(
                iteration=i, global_step=128 * i, mode=mode, clip_coef=clip, ent_coef=ent, seed=seed
            )
            row.update(alpha1=2, alpha2=1) if "mdr" in mode else row.update(alpha1=3, alpha2=0)
            row.update(
                normalized_reward=reward,
                smoothed_reward=reward,
                entropy=1.5,
                acting_entropy=1.4,
                wall_time=2.0 * i,
            )
            row["delta_pi_minus"] = 0.0 if mode == "eval" else 1e-4 * math.exp(i / 8)
            writer.writerow(row)
    run_args = {"bn_momentum": 0.01} if old else {"bn_momentum": 0.1, "view_batching": "separate"}
    (folder / "summary.json").write_text(
        json.dumps({"wall_time_s": 2.0 * iterations, "args": run_args})
    )


def test_read_runs_reads_old_and_new_runs(tmp_path):
    write_run(tmp_path / "old", "bn", 0.2, 0.01, 1, iterations=5, old=True)
    write_run(tmp_path / "new" / "a", "bn-mdr", 0.05, 0.0, 2, iterations=7)
    write_run(tmp_path / "crashed", "eval", 0.2, 0.01, 3, iterations=4)
    (tmp_path / "crashed" / "summary.json").unlink()
    (tmp_path / "empty").mkdir()
    # killed before its first update
    (tmp_path / "empty" / "metrics.csv").write_text(",".join(probe.CSV_COLUMNS) + "\n")

    runs = {run["name"]: run for run in cr.read_runs(str(tmp_path))}

    assert sorted(runs) == ["crashed", "new/a", "old"]
    old, new, crashed = runs["old"], runs["new/a"], runs["crashed"]
    assert (old["entropy_source"], new["entropy_source"]) == ("entropy", "acting_entropy")
    assert list(old["acting_entropy"]) == [1.5] * 5 and list(new["acting_entropy"]) == [1.4] * 7
    assert (old["bn_momentum"], old["view_batching"]) == (
        0.01,
        "joint",
    )  # before --view-batching: one joint pass
    assert (new["mode"], new["seed"], new["clip_coef"], new["ent_coef"], new["bn_momentum"]) == (
        "bn-mdr",
        2,
        0.05,
        0.0,
        0.1,
    )
    assert new["view_batching"] == "separate" and new["wall_time_s"] == 14.0
    assert (crashed["bn_momentum"], crashed["view_batching"], crashed["wall_time_s"]) == (
        None,
        None,
        8.0,
    )
    assert math.isnan(new["normalized_reward"][0]) and list(new["iteration"]) == list(range(1, 8))


def collapse_folder(runs_dir: Path) -> Path:
    """The first sessions' layout: BN and BN+MDR at clip 0.2 and 0.05 (seed 1 old runs, seed 2 new),
    and BN+MDR at entropy 0 (3 seeds of different lengths)."""
    for mode in ("bn", "bn-mdr"):
        for clip in (0.2, 0.05):
            for seed in (1, 2):
                crash = 20 if mode == "bn" and seed == 1 else None
                folder = runs_dir / f"{mode}_clip{clip}_ent0.01_seed{seed}"
                write_run(folder, mode, clip, 0.01, seed, crash_at=crash, old=seed == 1)
    for seed in (1, 2, 3):
        folder = runs_dir / f"bn-mdr_clip0.2_ent0_seed{seed}"
        write_run(folder, "bn-mdr", 0.2, 0.0, seed, iterations=30 + seed)
    return runs_dir


def test_fig6_and_entropy_comparison_from_old_and_new_runs(tmp_path, capsys):
    runs_dir = collapse_folder(tmp_path / "collapse")
    write_run(runs_dir / "killed", "bn", 0.2, 0.01, 3)
    (runs_dir / "killed" / "summary.json").unlink()
    out = tmp_path / "figs"

    assert figures.main(["--runs-dir", str(runs_dir), "--out-dir", str(out)]) == 0

    for name in ("collapse_fig6.png", "collapse_entropy.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 30_000, (name, len(data))
    printed = capsys.readouterr().out
    assert printed.startswith("not drawn, not finished: killed (unfinished)\n")
    assert f"wrote {out}/collapse_fig6.png (11 runs found, Fig. 6 uses the 8 at entropy 0.01)" in (
        printed
    )


def test_cli_with_one_cell_draws_fig6_and_says_why_there_is_no_entropy_figure(tmp_path):
    write_run(tmp_path / "collapse" / "bn_clip0.2_ent0.01_seed1", "bn", 0.2, 0.01, 1, crash_at=25)

    result = subprocess.run(
        [sys.executable, str(ANALYSIS / "collapse_figures.py"), "--runs-dir", "collapse"]
        + ["--out-dir", "figs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "figs" / "collapse_fig6.png").stat().st_size > 10_000
    assert (
        "no figs/collapse_entropy.png: no mode has runs at two entropy coefficients"
        in result.stdout
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["collapse", "figs"]


def test_the_committed_first_runs_are_drawn_into_the_folder_given(tmp_path, monkeypatch):
    """The command of docs/collapse.md and the README: the 16 runs of the first sessions (views
    joint), into a folder of the command line; nothing in docs/ is touched."""
    drawn = {}
    monkeypatch.setattr(figures, "draw_fig6", lambda runs, path, note: drawn.update(fig6=runs))
    monkeypatch.setattr(
        figures, "draw_entropy_comparison", lambda runs, path, clip: drawn.update(app_b=runs)
    )
    docs = ANALYSIS.parent / "docs" / "collapse"

    args = ["--runs-dir", str(docs), "--cell", "views=joint", "--out-dir", str(tmp_path)]
    assert figures.main(args) == 0

    assert len(drawn["app_b"]) == 16 and len(drawn["fig6"]) == 12  # 12 at entropy 0.01
    assert {run["arm"] for run in drawn["fig6"]} == {"bn", "eval", "bn-mdr"}
    flagged = sorted(run["name"] for run in drawn["fig6"] if run["collapse_index"] is not None)
    assert flagged == [
        "bn-mdr_clip0.05_ent0.01_seed2",
        "bn-mdr_clip0.2_ent0.01_seed2",
        "bn_clip0.05_ent0.01_seed1",
        "bn_clip0.05_ent0.01_seed2",
        "bn_clip0.2_ent0.01_seed1",
        "bn_clip0.2_ent0.01_seed2",
    ]


def test_draw_panel_marks_an_empty_cell_and_draws_seeds_mean_and_collapse_onsets(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_dir = tmp_path / "collapse"
    for seed in (1, 2, 3):
        write_run(runs_dir / f"bn_seed{seed}", "bn", 0.2, 0.01, seed, iterations=20 + seed)
    runs = cr.read_runs(str(runs_dir))
    runs[1]["collapse_index"] = 7
    fig, (empty_ax, full_ax) = plt.subplots(1, 2)

    figures.draw_panel(empty_ax, [], "BN+MDR, clip 0.05")
    figures.draw_panel(full_ax, runs, "BN, clip 0.2")

    assert [text.get_text() for text in empty_ax.texts] == ["no runs"]
    # per seed: reward and collapse onset (none, one, none); the mean
    assert len(full_ax.lines) == 3 + 3 + 1
    onsets = [line for line in full_ax.lines if line.get_marker() == "x"]
    assert [len(line.get_xdata()) for line in onsets] == [0, 1, 0]
    assert onsets[1].get_xdata()[0] == runs[1]["global_step"][7]
    mean_line = full_ax.lines[-1]
    # the mean spans the longest run (23 updates), from update 2
    assert len(mean_line.get_xdata()) == 22
    expected_first = np.mean([run["smoothed_reward"][1] for run in runs])
    assert mean_line.get_ydata()[0] == pytest.approx(expected_first)
    plt.close(fig)


def test_stage_c_figures_families_as_columns_and_the_paired_differences(tmp_path, monkeypatch):
    runs_dir = tmp_path / "study_c"
    for family in ("procedural", "photos"):
        for seed in (11, 12):
            write_run(runs_dir / family / f"bn_s{seed}", "bn", 0.2, 0.01, seed, iterations=12)
    runs = cr.read_runs(str(runs_dir))
    panels = []
    monkeypatch.setattr(figures, "draw_panel", lambda ax, runs, title: panels.append((title, runs)))

    figures.draw_fig6(runs, str(tmp_path / "fig6.png"), column=lambda run: run["name"][:6])
    differences = [
        ("Procedural images", [("A\n− BN", [1.0, 3.0], (2.0, 1.0, 3.0)), ("B", [], (NAN,) * 3)]),
        ("Real photographs", [("A\n− BN", [5.0], (5.0, NAN, NAN))]),
    ]
    figures.draw_paired_differences(differences, str(tmp_path / "paired.png"))

    # columns in the order the runs come (photos/ sorts first), a panel each with its family's runs
    assert [(title, len(panel_runs)) for title, panel_runs in panels] == [
        ("BN, photos", 2),
        ("BN, proced", 2),
    ]
    assert (tmp_path / "fig6.png").read_bytes()[:8] == PNG
    assert (tmp_path / "paired.png").read_bytes()[:8] == PNG


def test_two_dropout_probabilities_are_two_rows_of_each_figure(tmp_path, monkeypatch):
    for p in (0.1, 0.2):
        for ent in (0.01, 0.0):
            folder = tmp_path / f"dropout_p{p}_ent{ent}"
            write_run(folder, "dropout", 0.2, ent, 1, iterations=12)
            summary = json.loads((folder / "summary.json").read_text())
            summary["args"]["dropout_p"] = p
            (folder / "summary.json").write_text(json.dumps(summary))
    runs = cr.read_runs(str(tmp_path))
    panels = []
    monkeypatch.setattr(
        figures, "draw_panel", lambda ax, runs, title, **kw: panels.append((title, len(runs)))
    )
    monkeypatch.setattr(figures, "save_figure", lambda *args: None)

    figures.draw_entropy_comparison(runs, str(tmp_path / "entropy.png"), 0.2)
    figures.draw_fig6(runs, str(tmp_path / "fig6.png"))

    assert panels == [
        ("dropout p0.1, entropy 0.01", 1),
        ("dropout p0.1, entropy 0", 1),
        ("dropout p0.2, entropy 0.01", 1),
        ("dropout p0.2, entropy 0", 1),
        ("dropout p0.1, ent 0, clip 0.2", 1),
        ("dropout p0.1, ent 0.01, clip 0.2", 1),
        ("dropout p0.2, ent 0, clip 0.2", 1),
        ("dropout p0.2, ent 0.01, clip 0.2", 1),
    ]


def test_train_vs_held_out_curves_and_per_run_values_are_drawn(tmp_path):
    steps = np.array([600.0, 1200.0, 1800.0])
    panels = [
        ("none", [(steps, [10.0, 30.0, 50.0], [5.0, 10.0, 15.0])] * 2),
        (
            "dropout p0.1",
            [(steps, [10.0, 20.0, 30.0], [8.0, 16.0, 24.0]), (steps[:2], [1, 2], [1, 2])],
        ),
        ("dropout-mdr p0.1", []),  # no finished run yet
    ]
    figures.draw_train_vs_heldout(panels, str(tmp_path / "curves.png"))
    values = [("p 0.1", [("none", [0.5, 0.7], (0.6, NAN, NAN)), ("dropout p0.1", [], (NAN,) * 3)])]
    figures.draw_paired_differences(
        values, str(tmp_path / "fluct.png"), ylabel="fluctuation", title="per run"
    )

    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert (tmp_path / "fluct.png").read_bytes()[:8] == PNG


def test_bad_folders_are_config_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "killed" / "bn_s1", "bn", 0.2, 0.01, 1)
    (tmp_path / "killed" / "bn_s1" / "summary.json").unlink()

    with pytest.raises(figures.ConfigError, match="no runs found"):
        figures.main(["--runs-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(figures.ConfigError, match="no finished runs"):
        figures.main(["--runs-dir", str(tmp_path / "killed"), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(figures.ConfigError, match="no such folder"):
        cr.read_runs(str(tmp_path / "missing"))
    assert not (tmp_path / "out").exists()


# (arguments, the one line on stderr)
BAD_COMMAND_LINES = [
    (
        ["--runs-dir", "collapse"],
        "error: the following arguments are required: --out-dir (--help lists the options)",
    ),
    (  # the README's command before --out-dir: never a folder named fig6.png
        ["--runs-dir", "collapse", "--out", "fig6.png"],
        "error: the following arguments are required: --out-dir (--help lists the options)",
    ),
    (
        ["--runs-dir", "collapse", "--out-dir", "out", "--ent-coef", "nan"],
        "error: argument --ent-coef: 'nan' is not a finite number >= 0 (--help lists the options)",
    ),
    (
        ["--runs-dir", "collapse", "--out-dir", "out", "--ent-coef", "-1"],
        "error: argument --ent-coef: '-1' is not a finite number >= 0 (--help lists the options)",
    ),
    (
        ["--runs-dir", "collapse", "--out-dir", "out", "--entropy-clip", "0"],
        "error: argument --entropy-clip: '0' is not a finite number > 0 (--help lists the options)",
    ),
    (
        ["--runs-dir", "collapse", "--out-dir", "out", "--entropy-clip", "x"],
        "error: argument --entropy-clip: 'x' is not a finite number > 0 (--help lists the options)",
    ),
    (
        ["--runs-dir", "collapse", "--out-dir", "out", "--ent-coef", "0.5"],
        "error: --ent-coef 0.5: no runs with it (found 0.01)",
    ),
    (
        ["--runs-dir", "collapse", "--out-dir", "out", "--cell", "bnm=0.3"],
        "error: --cell bnm=0.3: no runs match",
    ),
]


@pytest.mark.parametrize("args, line", BAD_COMMAND_LINES)
def test_bad_input_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys, args, line):
    write_run(tmp_path / "collapse" / "bn_s1", "bn", 0.2, 0.01, 1)
    monkeypatch.chdir(tmp_path)
    try:
        status = figures.run(args)
    except SystemExit as exit:  # argparse's errors
        status = exit.code

    err = capsys.readouterr().err
    assert status == 2 and err.startswith(line) and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "fig6.png").exists()
