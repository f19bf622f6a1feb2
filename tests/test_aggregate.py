"""Tests of analysis/aggregate.py on tiny runs written here (TensorBoard event files and args.json,
as the scripts write them; no training), read from runs/ and from a stand-in for the wandb API."""

import ast
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))  # the modules' folder
import aggregate  # noqa: E402

STEPS = range(0, 1001, 100)  # a final score (last 10 % of steps) averages steps 900 and 1000
PROCGEN_GAMES = ["bigfish", "coinrun"]


def procgen(env_id, norm, alpha1, alpha2, seed, bn_momentum=0.1, dropout_p=0.1):
    return dict(
        exp_name="ppo_procgen_mdr",
        env_id=env_id,
        norm=norm,
        alpha1=alpha1,
        alpha2=alpha2,
        mdr_rounds=1,
        bn_momentum=bn_momentum,
        dropout_p=dropout_p,
        seed=seed,
    )


def patchloc(num_tasks, norm, alpha1, alpha2, seed, dropout_p=0.1):
    return dict(
        exp_name="ppo_patchloc_mdr",
        num_tasks=num_tasks,
        image_source="procedural",
        norm=norm,
        alpha1=alpha1,
        alpha2=alpha2,
        mdr_rounds=3,
        bn_momentum=0.1,
        dropout_p=dropout_p,
        seed=seed,
    )


def fake_runs():
    """(config, {tag: {step: value}}): each run's curve rises linearly to a final level that names
    what the test expects."""
    runs = []

    def add(config, final, test_final=None, normalized=True):
        ramp = {step: final * step / 1000 for step in STEPS}
        if config["exp_name"] == "ppo_procgen_mdr":
            series = {"charts/episodic_return": ramp, "charts/SPS": {s: 123.0 for s in STEPS}}
            if normalized:
                series["charts/normalized_score"] = {s: v / 10 for s, v in ramp.items()}
            test_tag = "charts/test_episodic_return"
        else:
            series = {"charts/normalized_reward": ramp}
            test_tag = "charts/test_normalized_reward"
        if test_final is not None:
            series[test_tag] = {
                step: test_final for step in (500, 1000)
            }  # evaluated every few iterations
        runs.append((config, series))

    for game_offset, game in enumerate(PROCGEN_GAMES):
        for seed in (1, 2, 3):
            add(procgen(game, "bn", 3, 0, seed, bn_momentum=0.1), 1 + game_offset + seed)
            add(
                procgen(game, "bn", 3, 0, seed, bn_momentum=0.01), 2 + game_offset + seed
            )  # BN's best momentum
            add(
                procgen(game, "bn", 2, 1, seed, bn_momentum=0.1), 4 + game_offset + seed
            )  # BN+MDR: 7 +- 1 on bigfish
            add(procgen(game, "bn", 1, 2, seed, bn_momentum=0.01), 3 + game_offset + seed)
            add(procgen(game, "none", 3, 0, seed), 2 + seed, test_final=1.0)
            add(procgen(game, "dropout", 3, 0, seed), 1 + seed, test_final=0.5)
            add(procgen(game, "dropout", 2, 1, seed), 3 + seed, test_final=2.0)
    for seed in (1, 2, 3):
        add(patchloc(256, "bn", 3, 0, seed), 20 + seed)
        add(patchloc(256, "bn", 2, 1, seed), 60 + seed)
        add(patchloc(2048, "none", 3, 0, seed), 80 + seed, test_final=10.0)
        add(patchloc(2048, "dropout", 3, 0, seed, dropout_p=0.2), 50 + seed, test_final=30.0)
        add(patchloc(2048, "dropout", 2, 1, seed, dropout_p=0.2), 70 + seed, test_final=40.0)
    return runs


def write_run(folder, config, series, with_args_json=True):
    writer = SummaryWriter(str(folder))
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()),
    )
    for tag, values in series.items():
        for step, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()
    if with_args_json:
        (folder / "args.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for i, (config, series) in enumerate(fake_runs()):
        write_run(
            root / f"run{i:03d}", config, series, with_args_json=i % 5 != 0
        )  # some with the text summary only
    # a resumed run: its first event file logged steps 0-600 with wrong values, the resumed one
    # re-logs 500-1000
    config = procgen("caveflyer", "bn", 2, 1, seed=1)
    write_run(
        root / "resumed", config, {"charts/episodic_return": {s: -5.0 for s in range(0, 601, 100)}}
    )
    write_run(
        root / "resumed",
        config,
        {"charts/episodic_return": {s: 9.0 for s in range(500, 1001, 100)}},
    )
    # the same configuration and seed twice (a run restarted under another --run-name, stopped
    # early): the longer counts
    write_run(
        root / "stopped",
        procgen("bigfish", "bn", 2, 1, seed=1),
        {"charts/episodic_return": {0: 0.0, 100: 100.0}},
    )
    # not a run of the two training scripts (a collapse-probe run): skipped
    write_run(root / "probe", {"mode": "bn", "seed": 1}, {"charts/normalized_reward": {0: 1.0}})
    return root


@pytest.fixture(scope="module")
def aggregated(runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    assert (
        aggregate.main(["--runs-dir", str(runs_dir), "--out-dir", str(out), "--reps", "200"]) == 0
    )
    with open(out / "final_scores.csv") as f:
        rows = {(r["figure"], r["panel"], r["method"], r["metric"]): r for r in csv.DictReader(f)}
    return out, rows, (out / "final_scores.md").read_text()


def test_every_figure_is_drawn(aggregated):
    out, _, _ = aggregated
    for name in ["fig3_procgen", "fig4_procgen_dropout", "fig3_patchloc", "fig5_patchloc_dropout"]:
        image = imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, name


def test_final_scores_are_mean_and_std_over_seeds(aggregated):
    _, rows, table = aggregated
    row = rows[("fig3_procgen", "bigfish", "BN+MDR", "charts/episodic_return")]
    # seeds end at 5, 6, 7 (x 1.0 at step 1000, x 0.9 at step 900): finals 4.75, 5.7, 6.65
    assert (
        float(row["mean"]) == pytest.approx(5.7)
        and float(row["std"]) == pytest.approx(0.95)
        and row["seeds"] == "3"
    )
    assert "| bigfish |" in table and "5.70 +- 0.95" in table


def test_best_variant_per_method_as_the_paper_reports(aggregated):
    _, rows, _ = aggregated
    assert (
        rows[("fig3_procgen", "coinrun", "BN", "charts/episodic_return")]["variant"]
        == "(3,0) m=0.01"
    )
    assert (
        rows[("fig3_procgen", "coinrun", "BN+MDR", "charts/episodic_return")]["variant"]
        == "(2,1) m=0.1"
    )  # beat (1,2)
    methods = {method for figure, _, method, _ in rows if figure == "fig3_procgen"}
    assert methods == {"BN", "BN+MDR", "NoNorm"}  # dropout runs are Fig. 4's


def test_dropout_figures_have_train_and_held_out_scores(aggregated):
    _, rows, _ = aggregated
    assert {m for f, _, m, _ in rows if f == "fig4_procgen_dropout"} == {
        "NoNorm",
        "Dropout",
        "Dropout+MDR",
    }
    assert (
        float(
            rows[("fig4_procgen_dropout", "coinrun", "Dropout+MDR", "charts/test_episodic_return")][
                "mean"
            ]
        )
        == 2.0
    )
    fig5 = {(panel, m) for f, panel, m, _ in rows if f == "fig5_patchloc_dropout"}
    assert fig5 == {
        ("procedural, 2048 tasks", m) for m in ["NoNorm", "Dropout 20%", "Dropout 20%+MDR"]
    }
    assert {panel for f, panel, _, _ in rows if f == "fig3_patchloc"} == {
        "procedural, 256 tasks"
    }  # NoNorm alone: no panel


def test_a_resumed_run_keeps_the_values_logged_last(aggregated):
    _, rows, _ = aggregated
    assert (
        float(rows[("fig3_procgen", "caveflyer", "BN+MDR", "charts/episodic_return")]["mean"])
        == 9.0
    )


def test_interquartile_mean_and_probability_of_improvement(aggregated):
    _, _, table = aggregated
    # the games with a normalized score and every method: bigfish and coinrun (caveflyer has BN+MDR
    # alone); final
    # normalized scores 0.095 x the final level (seeds x games)
    levels = {
        "BN": [[2 + g + s for g in (0, 1)] for s in (1, 2, 3)],
        "BN+MDR": [[4 + g + s for g in (0, 1)] for s in (1, 2, 3)],
    }
    levels["NoNorm"] = [[2 + s] * 2 for s in (1, 2, 3)]
    for method, level in levels.items():
        iqm = scipy.stats.trim_mean(0.095 * np.array(level), 0.25, axis=None)
        row = re.search(
            rf"\| {re.escape(method)} \| 3 x 2 \| ([\d.]+) \| \[([\d.]+), ([\d.]+)\] \|", table
        )
        assert row and float(row.group(1)) == pytest.approx(iqm, abs=1e-3), table
        assert float(row.group(2)) <= iqm <= float(row.group(3))
    # P(X > Y) per game (ties count half), averaged over games
    x, y = np.array(levels["BN+MDR"]), np.array(levels["BN"])
    pairs = (x[:, None, :] > y[None, :, :]) + 0.5 * (x[:, None, :] == y[None, :, :])
    row = re.search(r"\| BN\+MDR \| BN \| ([\d.]+) \|", table)
    assert row and float(row.group(1)) == pytest.approx(pairs.mean(), abs=1e-3)


def test_wandb_project_gives_the_same_table(aggregated, monkeypatch, tmp_path):
    """--wandb-project reads the same runs through wandb's public API (a stand-in here: config and
    scan_history)."""
    import wandb

    class FakeRun:
        def __init__(self, i, config, series):
            self.name, self.config, self.series = f"run{i}", {**config, "_wandb": {}}, series

        def scan_history(self, keys):
            tag = next(k for k in keys if k != "global_step")
            return [
                {"global_step": step, tag: value}
                for step, value in self.series.get(tag, {}).items()
            ]

    class FakeApi:
        def runs(self, project):
            assert project == "me/mdr"
            return [FakeRun(i, config, series) for i, (config, series) in enumerate(fake_runs())]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    assert (
        aggregate.main(["--wandb-project", "me/mdr", "--out-dir", str(tmp_path), "--reps", "200"])
        == 0
    )
    out, _, _ = aggregated
    with open(out / "final_scores.csv") as f:
        from_runs_dir = [
            r for r in csv.DictReader(f) if r["panel"] != "caveflyer"
        ]  # the resumed run is not in wandb's
    with open(tmp_path / "final_scores.csv") as f:
        from_wandb = list(csv.DictReader(f))
    numbers = ("mean", "std")  # TensorBoard stores float32
    assert [{k: v for k, v in r.items() if k not in numbers} for r in from_wandb] == [
        {k: v for k, v in r.items() if k not in numbers} for r in from_runs_dir
    ]
    for wandb_row, runs_dir_row in zip(from_wandb, from_runs_dir):
        assert [float(wandb_row[k]) for k in numbers] == pytest.approx(
            [float(runs_dir_row[k]) for k in numbers], rel=1e-5
        )


def test_the_table_says_how_many_runs_are_drawn_and_cautions_below_three_seeds(aggregated):
    _, _, table = aggregated
    # 7 x 2 x 3 Procgen + 5 x 3 patch-loc + resumed + stopped (a duplicate, dropped)
    assert table.startswith("# Final scores (59 runs from ")
    # drawn: every configuration but BN(1,2) at m=0.01 (BN+MDR(2,1) beat it) and BN(3,0) m=0.1
    assert "The figures draw 46 of the 59 runs: one variant per method and panel." in table
    assert "Not drawn (another variant of the method was, or no figure shows it): " in table
    assert "bigfish, BN, (3,0) m=0.1 (3 seeds)" in table
    assert "| caveflyer | BN+MDR |" not in table  # one method: its own row, the cell below
    assert "9.00 +- 0.00 ⚠ only 1 seed ((2,1) m=0.1; 1 seed)" in table
    assert "5.70 +- 0.95 ((2,1) m=0.1; 3 seeds)" in table


def aggregate_dir(tmp_path, runs: list, *extra) -> tuple:
    """Run aggregate.py on these (config, series) runs, in tmp_path/runs; (exit status, out dir)."""
    for i, (config, series) in enumerate(runs):
        write_run(tmp_path / "runs" / f"run{i}", config, series)
    out = tmp_path / "out"
    args = ["--runs-dir", str(tmp_path / "runs"), "--out-dir", str(out), "--reps", "20", *extra]
    return aggregate.main(args), out


def ramp(final: float, last_step: int = 1000) -> dict:
    return {
        "charts/normalized_reward": {s: final * s / last_step for s in range(0, last_step + 1, 100)}
    }


def test_runs_that_differ_in_total_timesteps_are_separate_variants(tmp_path):
    """Issue 27: a 640-step run and 4,096-step ones were one configuration, and the one with more
    logged points was kept. Now each is its own variant, named by the argument it differs in."""
    short = [({**patchloc(256, "bn", 2, 1, 1), "total_timesteps": 640}, ramp(90.0, 600))]
    long = [
        ({**patchloc(256, "bn", 2, 1, s), "total_timesteps": 4096}, ramp(60.0)) for s in (1, 2, 3)
    ]

    status, out = aggregate_dir(tmp_path, short + long)

    assert status == 0
    with open(out / "final_scores.csv") as f:
        (row,) = list(csv.DictReader(f))
    # the short run's final score is higher (90): it is the variant drawn, with its one seed
    assert row["variant"] == "(2,1)x3 m=0.1 total_timesteps=640" and row["seeds"] == "1"
    table = (out / "final_scores.md").read_text()
    assert "Not drawn (another variant of the method was, or no figure shows it): procedural, " in (
        table
    )
    assert "BN+MDR, (2,1)x3 m=0.1 total_timesteps=4096 (3 seeds)." in table


def test_arguments_that_do_not_change_training_do_not_split_a_curve(tmp_path, capsys):
    provenance = [{"from_step": 0, "commit": "abc", "cpu": "x", "torch": "2"}]
    runs = [
        (
            {
                **patchloc(256, "bn", 2, 1, seed),
                "run_name": f"name{seed}",
                "track": seed == 2,
                "wandb_project_name": f"p{seed}",
                "checkpoint_interval": 10 * seed,
                "torch_threads": seed,
                "cuda": seed == 1,
                "provenance": provenance * seed,
            },
            ramp(50.0 + seed),
        )
        for seed in (1, 2, 3)
    ]

    status, out = aggregate_dir(tmp_path, runs)

    assert status == 0
    with open(out / "final_scores.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["variant"] == "(2,1)x3 m=0.1" and row["seeds"] == "3"
    assert capsys.readouterr().err == ""


def test_a_learning_rate_that_differs_splits_a_curve(tmp_path):
    runs = [({**patchloc(256, "bn", 2, 1, s), "learning_rate": 5e-4}, ramp(50.0)) for s in (1, 2)]
    runs += [({**patchloc(256, "bn", 2, 1, 3), "learning_rate": 1e-3}, ramp(70.0))]

    status, out = aggregate_dir(tmp_path, runs)

    with open(out / "final_scores.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["(2,1)x3 m=0.1 learning_rate=0.001"]


@pytest.mark.parametrize(
    "damage, warning",
    [
        (lambda folder: (folder / "args.json").write_text("{"), "args.json: unreadable ("),
        (lambda folder: (folder / "args.json").write_text("[1]"), "args.json: not the arguments"),
        (
            lambda folder: (folder / "args.json").write_text(
                json.dumps({"num_tasks": 256, "norm": "bn"})
            ),
            "no seed, alpha2, bn_momentum in its arguments",
        ),
        (
            lambda folder: (folder / "args.json").write_text(
                json.dumps({**patchloc(256, "bn", 2, 1, 4), "alpha2": "x"})
            ),
            "an argument that is not of its type",
        ),
    ],
)
def test_a_corrupt_run_is_skipped_with_one_warning_line(tmp_path, capsys, damage, warning):
    runs = [(patchloc(256, "bn", 2, 1, s), ramp(50.0)) for s in (1, 2, 3, 4)]
    for i, (config, series) in enumerate(runs):
        write_run(tmp_path / "runs" / f"run{i}", config, series)
    damage(tmp_path / "runs" / "run3")

    args = ["--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")]
    assert aggregate.main(args + ["--reps", "20"]) == 0

    err = capsys.readouterr().err
    assert err.startswith(f"warning: skipped {tmp_path / 'runs' / 'run3'}") and warning in err
    assert err.count("\n") == 1
    with open(tmp_path / "out" / "final_scores.csv") as f:
        assert [r["seeds"] for r in csv.DictReader(f)] == ["3"]


def test_a_run_without_scalars_is_skipped_with_one_warning_line(tmp_path, capsys):
    runs = [(patchloc(256, "bn", 2, 1, s), ramp(50.0)) for s in (1, 2, 3)]
    for i, (config, series) in enumerate(runs):
        write_run(tmp_path / "runs" / f"run{i}", config, series)
    for events in (tmp_path / "runs" / "run2").glob("events.out.tfevents.*"):
        events.write_bytes(b"not an event file")

    args = ["--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")]
    assert aggregate.main(args + ["--reps", "20"]) == 0

    assert capsys.readouterr().err == (
        f"warning: skipped {tmp_path / 'runs' / 'run2'}: no scalars in its TensorBoard events "
        "(empty or unreadable)\n"
    )


def test_the_ignored_arguments_are_the_scripts_resumable_fields_but_the_steps(repo_root):
    """NOT_TRAINING repeats the training scripts' RESUMABLE_FIELDS (read here from their source,
    without importing them), all but total_timesteps."""
    for script in ("ppo_procgen_mdr.py", "ppo_patchloc_mdr.py"):
        fields = []
        for node in ast.walk(ast.parse((repo_root / script).read_text())):
            targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
            if any(getattr(t, "id", None) == "RESUMABLE_FIELDS" for t in targets):
                fields += ast.literal_eval(node.value)
        assert "total_timesteps" in fields, script
        assert set(fields) - {"total_timesteps"} <= set(aggregate.NOT_TRAINING), script
        other = set(aggregate.NOT_TRAINING) - set(fields)
        assert other == {"exp_name", "seed", "provenance", "_wandb"}, script


# (arguments, the start of the one line on stderr)
BAD_COMMAND_LINES = [
    ([], "error: the following arguments are required: --out-dir"),
    (["--out", "out"], "error: the following arguments are required: --out-dir"),  # no abbreviation
    (
        ["--out-dir", "out", "--points", "1"],
        "error: argument --points: '1' is not a whole number in [2, 100000]",
    ),
    (
        ["--out-dir", "out", "--points", "abc"],
        "error: argument --points: 'abc' is not a whole number",
    ),
    (
        ["--out-dir", "out", "--reps", "0"],
        "error: argument --reps: '0' is not a whole number in [1, 1e+06]",
    ),
    (
        ["--out-dir", "out", "--final-fraction", "0"],
        "error: argument --final-fraction: '0' is not a number in (0, 1]",
    ),
    (
        ["--out-dir", "out", "--final-fraction", "nan"],
        "error: argument --final-fraction: 'nan' is not",
    ),
    (
        ["--out-dir", "out", "--final-fraction", "1.5"],
        "error: argument --final-fraction: '1.5' is not",
    ),
    (
        ["--out-dir", "out", "--seed", "-1"],
        "error: argument --seed: '-1' is not a whole number in [0, 4.29497e+09]",
    ),
    (["--out-dir", "out", "--runs-dir", "missing"], "error: --runs-dir missing: no such folder"),
    (["--out-dir", "out", "--runs-dir", "empty"], "error: empty: no runs of ppo_procgen_mdr.py"),
]


@pytest.mark.parametrize("args, line", BAD_COMMAND_LINES)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, line):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    try:
        status = aggregate.run(args)
    except SystemExit as exit:  # argparse's errors
        status = exit.code

    err = capsys.readouterr().err
    assert status != 0 and err.startswith(line) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_no_runs_is_a_one_line_error(repo_root, tmp_path):
    (tmp_path / "runs").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(repo_root / "analysis" / "aggregate.py"),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode == 1
        and result.stderr.count("\n") == 1
        and result.stderr.startswith("error:")
    ), result.stderr
    assert not (tmp_path / "out").exists()
