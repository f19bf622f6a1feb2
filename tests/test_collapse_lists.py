"""sweeps/make_collapse_lists.py: the collapse study's run lists (issues 12, 13, and Stage C of
issue 26) are what docs/collapse.md and docs/collapse/study_c/PLAN.md describe, equal what the
generator writes now, name distinct folders, pair their seeds across modes, and parse as the
probe's own arguments."""

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
