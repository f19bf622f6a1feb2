"""sweeps/make_collapse_lists.py: the collapse study's run lists (issues 12, 13, Stage C of issue
26 and the dropout study of issue 22) are what docs/collapse.md, docs/collapse/study_c/PLAN.md and
docs/dropout/PLAN.md describe, equal what the generator writes now, name distinct folders, pair
their seeds across modes, and parse as the probe's own arguments."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import tyro

import ppo_collapse_probe as probe

REPO = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location(
    "make_collapse_lists", REPO / "sweeps" / "make_collapse_lists.py"
)
lists = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lists)

COMMITTED = Path(lists.OUT) / "stage_a.txt"
STUDY_C = Path(lists.OUT_C)
# Stage C's arms (PLAN.md): arm -> (mode, train-mode epochs alpha1, eval-mode epochs alpha2)
STAGE_C_ARMS = {
    "bn": ("bn", 3, 0),
    "bn-e2": ("bn", 2, 0),
    "bn-mdr21": ("bn-mdr", 2, 1),
    "bn-mdr12": ("bn-mdr", 1, 2),
}


def commands(path: Path) -> list:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_stage_a_regenerates_the_committed_list(tmp_path):
    lists.main(["stage-a", "--out", str(tmp_path / "a.txt")])
    assert commands(tmp_path / "a.txt") == commands(COMMITTED)


@pytest.mark.parametrize(
    "stage, modes, seeds", [("stage-b", 3, 10), ("rivals", len(lists.RIVALS), 4)]
)
def test_lists_pair_seeds_across_modes_and_name_distinct_folders(stage, modes, seeds, tmp_path):
    lists.main([stage, "--bn-momentum", "0.1", "--out", str(tmp_path / "l.txt")])
    lines = commands(tmp_path / "l.txt")
    if stage == "stage-b":
        # BN and BN+MDR seeds 1-3 of the regime are Stage A's runs: the cell is Stage A's + Stage
        # B's
        stage_a = [line for line in commands(COMMITTED) if "--bn-momentum 0.1 " in line]
        assert len(stage_a) == 2 * 3 and not set(stage_a) & {
            line.replace("stage_b/", "stage_a/") for line in lines
        }
        lines += stage_a
    assert len(lines) == modes * seeds
    parsed = []
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "ppo_collapse_probe.py"]
        parsed.append(tyro.cli(probe.Args, args=argv[2:]))
    assert len({args.run_name for args in parsed}) == len(parsed)  # one folder per run
    by_mode = {}
    for args in parsed:
        by_mode.setdefault(args.mode, set()).add(args.seed)
        assert (
            args.bn_momentum == 0.1
            and args.view_batching == "separate"
            and args.run_name.startswith((stage.replace("-", "_"), "stage_a/"))
        )
    # paired
    assert all(seeds_of_mode == set(range(1, seeds + 1)) for seeds_of_mode in by_mode.values())
    assert set(by_mode) <= set(probe.MODES)


@pytest.mark.parametrize(
    "stage, flags, name",
    [
        ("stage-c", ["--bn-momentum", "0.1"], "stage_c.txt"),
        (
            "stage-c-photos",
            ["--bn-momentum", "0.1", "--image-source", "data/photos"],
            "stage_c_photos.txt",
        ),
    ],
)
def test_stage_c_lists_are_what_the_generator_writes_now(stage, flags, name, tmp_path):
    out = tmp_path / name
    assert lists.main([stage, *flags, "--out", str(out)]) == 0
    committed = STUDY_C / name
    # the header's command reads the list from where it was written
    written = out.read_text().replace(str(out), str(committed.relative_to(REPO)))
    assert written == committed.read_text()


@pytest.mark.parametrize(
    "name, folder, arms, seeds",
    [
        ("stage_c.txt", "procedural", list(STAGE_C_ARMS), range(11, 27)),
        ("stage_c_photos.txt", "photos", ["bn", "bn-mdr21"], range(11, 19)),
    ],
)
def test_stage_c_lists_pair_fresh_seeds_across_arms_in_the_decisive_regime(
    name, folder, arms, seeds
):
    seeds_of_arm = {}
    listed_seeds = []
    run_names = set()
    for line in commands(STUDY_C / name):
        argv = shlex.split(line)
        assert argv[:2] == ["python", "ppo_collapse_probe.py"]
        args = tyro.cli(probe.Args, args=argv[2:])
        probe.validate_args(args)  # resolves alpha1 / alpha2 from --mode and --update-epochs
        match = re.fullmatch(rf"{folder}/(.+)_bnm0\.1_s(\d+)", args.run_name)
        assert match, args.run_name
        arm, seed = match.group(1), int(match.group(2))
        assert seed == args.seed
        assert (args.mode, args.alpha1, args.alpha2) == STAGE_C_ARMS[arm], line
        # the decisive regime, 200 updates
        assert (args.bn_momentum, args.view_batching, args.clip_coef) == (0.1, "separate", 0.2)
        assert args.total_timesteps == 200 * args.num_envs * args.num_steps
        if folder == "photos":
            assert (args.image_source, args.targets_per_image) == ("data/photos", 2)
        else:
            assert (args.image_source, args.targets_per_image) == ("procedural", 1)
        seeds_of_arm.setdefault(arm, []).append(seed)
        listed_seeds.append(seed)
        run_names.add(args.run_name)
    assert sorted(seeds_of_arm) == sorted(arms)
    # paired: every arm runs every seed once; fresh: none of Stages A and B's 1-10
    assert all(arm_seeds == list(seeds) for arm_seeds in seeds_of_arm.values()), seeds_of_arm
    # ordered by seed: a queue stopped early leaves whole pairs
    assert listed_seeds == sorted(listed_seeds)
    assert len(run_names) == len(listed_seeds) == len(arms) * len(seeds)  # one folder per run


# issue 22 (docs/dropout/PLAN.md): the dropout stability lists and LayerNorm's
DROPOUT = REPO / "docs" / "dropout"
DROPOUT_LISTS = [
    ("dropout-step1", "stability_step1.txt"),
    ("dropout-step2", "stability_step2.txt"),
    ("dropout-ln", "ln.txt"),
]


@pytest.mark.parametrize("stage, name", DROPOUT_LISTS)
def test_dropout_lists_are_what_the_generator_writes_now(stage, name, tmp_path):
    out = tmp_path / name
    assert lists.main([stage, "--bn-momentum", "0.1", "--out", str(out)]) == 0
    committed = DROPOUT / name
    written = out.read_text().replace(str(out), str(committed.relative_to(REPO)))
    assert written == committed.read_text()


@pytest.mark.parametrize(
    "name, arms",
    [
        ("stability_step1.txt", [("none", None), ("dropout", 0.1), ("dropout-mdr", 0.1)]),
        ("stability_step2.txt", [("dropout", 0.2), ("dropout-mdr", 0.2)]),
    ],
)
def test_dropout_stability_lists_pair_seeds_31_to_42_in_stage_c_regime(name, arms):
    """PLAN.md's Study 1: 36 runs (step 1) and 24 (step 2), every arm on every seed 31-42, ordered
    by seed, 200 updates in Stage C's regime, MDR(2,1) for dropout-mdr, one folder per run under
    docs/dropout/ (the header's DEST)."""
    path = DROPOUT / name
    assert "run_and_commit.sh $CHECKOUT/docs/dropout < docs/dropout/" + name in path.read_text()
    stage_c = shlex.split(commands(STUDY_C / "stage_c.txt")[0])
    runs, listed_seeds = [], []
    for line in commands(path):
        argv = shlex.split(line)
        assert argv[:2] == ["python", "ppo_collapse_probe.py"]
        args = tyro.cli(probe.Args, args=argv[2:])
        probe.validate_args(args)  # resolves the alphas and the dropout p
        # Stage C's regime flags, as its list gives them
        for flag in ("--bn-momentum", "--view-batching", "--total-timesteps"):
            assert argv[argv.index(flag) + 1] == stage_c[stage_c.index(flag) + 1], flag
        assert (args.view_batching, args.clip_coef, args.ent_coef) == ("separate", 0.2, 0.01)
        assert (args.image_source, args.update_epochs) == ("procedural", 3)
        assert args.total_timesteps == 200 * args.num_envs * args.num_steps
        expected_alphas = (2, 1) if args.mode == "dropout-mdr" else (3, 0)
        assert (args.alpha1, args.alpha2) == expected_alphas
        arm = f"{args.mode}_p{args.dropout_p:g}" if args.dropout_p is not None else args.mode
        assert args.run_name == f"stability/{arm}_s{args.seed}"
        runs.append((args.mode, args.dropout_p, args.seed))
        listed_seeds.append(args.seed)
    assert len(runs) == len(set(runs)) == 12 * len(arms)  # one folder per run
    assert sorted(runs) == sorted((m, p, s) for m, p in arms for s in range(31, 43))
    # ordered by seed: a queue stopped early leaves whole triples (pairs)
    assert listed_seeds == sorted(listed_seeds)


def test_ln_list_is_the_rivals_lines_for_ln_beside_the_rivals_runs():
    """PLAN.md's Study 3: --mode ln on seeds 1-4 with exactly the rivals' flags, its folders
    beside theirs (DEST docs/collapse/study)."""
    path = DROPOUT / "ln.txt"
    assert (
        "run_and_commit.sh $CHECKOUT/docs/collapse/study < docs/dropout/ln.txt" in path.read_text()
    )
    gn = [line for line in commands(Path(lists.OUT) / "rivals.txt") if "--mode gn " in line]
    expected = [line.replace("gn", "ln") for line in gn]
    assert len(expected) == 4
    assert commands(path) == expected
    rivals = {
        re.search(r"--run-name (\S+)", line).group(1)
        for line in commands(Path(lists.OUT) / "rivals.txt")
    }
    seeds = []
    for line in commands(path):
        args = tyro.cli(probe.Args, args=shlex.split(line)[2:])
        probe.validate_args(args)
        assert (args.mode, args.dropout_p) == ("ln", None)
        assert args.run_name == f"rivals/ln_bnm0.1_s{args.seed}" and args.run_name not in rivals
        seeds.append(args.seed)
    assert seeds == [1, 2, 3, 4]
