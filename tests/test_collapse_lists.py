"""sweeps/make_collapse_lists.py: the collapse study's run lists (issues 12, 13) are what
docs/collapse.md describes, name distinct folders, pair their seeds across modes, and parse as the
probe's own arguments."""

import importlib.util
import shlex
from pathlib import Path

import pytest
import tyro

import ppo_collapse_probe as probe

SPEC = importlib.util.spec_from_file_location(
    "make_collapse_lists",
    Path(__file__).resolve().parent.parent / "sweeps" / "make_collapse_lists.py",
)
lists = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lists)

COMMITTED = Path(lists.OUT) / "stage_a.txt"


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
    if (
        stage == "stage-b"
        # BN and BN+MDR seeds 1-3 of the regime are Stage A's runs: the cell is Stage A's + Stage
        # B's
    ):
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
