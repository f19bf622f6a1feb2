"""The paper's experiment grids as plain run lists (one command per line) and as wandb sweep files.

    python sweeps/make_grids.py --list  # the grids and how many runs each has
    python sweeps/make_grids.py         # rewrite sweeps/lists/*.txt and sweeps/wandb/*.yaml
    # patch-loc on your images
    python sweeps/make_grids.py --image-source /data/histo /data/openimages --out my_grids

A list runs on SLURM with sweeps/slurm_array.sh (one array task per line) or locally with xargs
(README, "Run the paper's grid on a cluster"). A grid is a concatenation of variant families; each
family is also one wandb sweep file (wandb's grid method is a cartesian product, and an MDR setting
couples alpha1 with alpha2, so each is its own family). Lines are ordered seed first: the first
third of a list is seed 1 of every configuration."""

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tyro
import yaml

PROCGEN, PATCHLOC = "ppo_procgen_mdr.py", "ppo_patchloc_mdr.py"
# the paper's six (Sec. 4.1)
GAMES = ["bigfish", "bossfight", "caveflyer", "chaser", "coinrun", "starpilot"]
SEEDS = [1, 2, 3]
# epochs per rollout are 3 (Procgen) or 3 rounds x 3 (patch-loc, --mdr-rounds 3 is its default): PPO
# puts all of them in train mode, MDR splits them (paper Sec. 4 and App. C)
PPO = {"alpha1": 3, "alpha2": 0}
MDR21 = {"alpha1": 2, "alpha2": 1}
MDR12 = {"alpha1": 1, "alpha2": 2}
FLAG_ORDER = [
    "env-id",
    "num-tasks",
    "image-source",
    "norm",
    "alpha1",
    "alpha2",
    "bn-momentum",
    "dropout-p",
    "seed",
]
METRIC = {PROCGEN: "charts/episodic_return", PATCHLOC: "charts/normalized_reward"}
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Family:
    """Runs that differ only along a cartesian grid of flags: one wandb sweep file."""

    name: str
    script: str
    what: str
    fixed: dict
    axes: dict  # flag -> values; seeds are added by the grid

    def configs(self) -> list[dict]:
        return [
            {**self.fixed, **dict(zip(self.axes, values))}
            for values in itertools.product(*self.axes.values())
        ]


@dataclass(frozen=True)
class Grid:
    script: str
    what: str
    families: list

    def lines(self) -> list[str]:
        configs = [config for family in self.families for config in family.configs()]
        return [
            command(self.script, {**config, "seed": seed}) for seed in SEEDS for config in configs
        ]


def command(script: str, flags: dict) -> str:
    return " ".join(
        ["python", script] + [f"--{flag} {flags[flag]}" for flag in FLAG_ORDER if flag in flags]
    )


def families(image_sources: list[str]) -> dict[str, Family]:
    games = {"env-id": GAMES}
    tasks = {"num-tasks": [256, 1024], "image-source": image_sources}
    tasks_2048 = {"num-tasks": [2048], "image-source": image_sources}
    return {
        f.name: f
        for f in [
            Family(
                "procgen_nonorm",
                PROCGEN,
                "PPO without normalization (Fig. 3 'PPO', Fig. 4 'NoNorm')",
                {"norm": "none", **PPO},
                games,
            ),
            Family(
                "procgen_mode_free",
                PROCGEN,
                "Eval (BN frozen: no running-stat update, so no momentum), LN, GN",
                PPO,
                {**games, "norm": ["eval", "ln", "gn"]},
            ),
            Family(
                "procgen_bn",
                PROCGEN,
                "BN and BRN in train mode, BN momentum 0.1 and 0.01",
                PPO,
                {**games, "norm": ["bn", "brn"], "bn-momentum": [0.1, 0.01]},
            ),
            Family(
                "procgen_bn_mdr21",
                PROCGEN,
                "BN+MDR(2,1), BN momentum 0.1 and 0.01",
                {"norm": "bn", **MDR21},
                {**games, "bn-momentum": [0.1, 0.01]},
            ),
            Family(
                "procgen_bn_mdr12",
                PROCGEN,
                "BN+MDR(1,2), BN momentum 0.1 and 0.01",
                {"norm": "bn", **MDR12},
                {**games, "bn-momentum": [0.1, 0.01]},
            ),
            Family(
                "procgen_dropout",
                PROCGEN,
                "Dropout 10 % in place of BN, plain PPO",
                {"norm": "dropout", **PPO, "dropout-p": 0.1},
                games,
            ),
            Family(
                "procgen_dropout_mdr",
                PROCGEN,
                "Dropout 10 % + MDR(2,1)",
                {"norm": "dropout", **MDR21, "dropout-p": 0.1},
                games,
            ),
            Family(
                "patchloc_baselines",
                PATCHLOC,
                "no norm, BN, Eval, BRN, LN, GN with plain PPO; 256 and 1024 tasks",
                PPO,
                {**tasks, "norm": ["none", "bn", "eval", "brn", "ln", "gn"]},
            ),
            Family(
                "patchloc_bn_mdr",
                PATCHLOC,
                "BN+MDR(2,1); 256 and 1024 tasks",
                {"norm": "bn", **MDR21},
                tasks,
            ),
            Family(
                "patchloc_nonorm_2048",
                PATCHLOC,
                "no norm, plain PPO; 2048 tasks",
                {"norm": "none", **PPO},
                tasks_2048,
            ),
            Family(
                "patchloc_dropout",
                PATCHLOC,
                "Dropout 10 % and 20 %, plain PPO; 2048 tasks",
                {"norm": "dropout", **PPO},
                {**tasks_2048, "dropout-p": [0.1, 0.2]},
            ),
            Family(
                "patchloc_dropout_mdr",
                PATCHLOC,
                "Dropout 10 % and 20 % + MDR(2,1); 2048 tasks",
                {"norm": "dropout", **MDR21},
                {**tasks_2048, "dropout-p": [0.1, 0.2]},
            ),
        ]
    }


def grids(image_sources: list[str]) -> dict[str, Grid]:
    f = families(image_sources)
    return {
        "procgen_fig3": Grid(
            PROCGEN,
            "Fig. 3 bottom: 6 games x {PPO, BN, Eval, BN+MDR(2,1), BN+MDR(1,2), BRN, LN, GN}, "
            "BN momenta 0.1/0.01 where running stats are updated",
            [
                f["procgen_nonorm"],
                f["procgen_mode_free"],
                f["procgen_bn"],
                f["procgen_bn_mdr21"],
                f["procgen_bn_mdr12"],
            ],
        ),
        "procgen_fig4": Grid(
            PROCGEN,
            "Fig. 4: 6 games x {NoNorm, Dropout, Dropout+MDR(2,1)}, dropout 10 %",
            [f["procgen_nonorm"], f["procgen_dropout"], f["procgen_dropout_mdr"]],
        ),
        "patchloc_fig3": Grid(
            PATCHLOC,
            "Fig. 3 top: 256 and 1024 tasks x {PPO, BN, Eval, BN+MDR(2,1), BRN, LN, GN}",
            [f["patchloc_baselines"], f["patchloc_bn_mdr"]],
        ),
        "patchloc_fig5": Grid(
            PATCHLOC,
            "Fig. 5: 2048 tasks x {NoNorm, Dropout, Dropout+MDR(2,1)}, dropout 10 % and 20 %",
            [f["patchloc_nonorm_2048"], f["patchloc_dropout"], f["patchloc_dropout_mdr"]],
        ),
    }


def sweep_file(family: Family) -> str:
    """A wandb grid sweep over the family; the agent runs `python SCRIPT --flag=value ... --track`
    per grid point."""
    parameters = {flag: {"value": value} for flag, value in family.fixed.items()}
    parameters |= {flag: {"values": values} for flag, values in family.axes.items()}
    # a boolean: `--track` via args_no_boolean_flags
    parameters |= {"seed": {"values": SEEDS}, "track": {"value": True}}
    sweep = {
        "name": family.name,
        "description": family.what,
        "program": family.script,
        "method": "grid",
        "metric": {"name": METRIC[family.script], "goal": "maximize"},
        "parameters": parameters,
        "command": ["${env}", "python", "${program}", "${args_no_boolean_flags}"],
    }
    runs = len(family.configs()) * len(SEEDS)
    header = (
        f"# generated by sweeps/make_grids.py (edit the grid there): {runs} runs\n"
        f"# wandb sweep --project PROJECT sweeps/wandb/{family.name}.yaml, "
        "then wandb agent ENTITY/PROJECT/SWEEP_ID\n"
    )
    return header + yaml.safe_dump(sweep, sort_keys=False, width=127)


@dataclass
class Args:
    out: Optional[str] = None
    """write OUT/lists/<grid>.txt and OUT/wandb/<family>.yaml (default: the folder of this file)"""
    image_source: list[str] = field(default_factory=lambda: ["procedural"])
    """patch-loc image sources: `procedural` and/or folders of images (the paper: natural images,
    histopathology)"""
    list: bool = False
    """print the grids and their sizes, write nothing"""


def main(args: Args) -> None:
    if not args.image_source:
        sys.exit("error: --image-source needs at least one source (procedural or a folder)")
    for source in args.image_source:
        if not re.fullmatch(r"[\w./+-]+", source):
            sys.exit(
                f"error: --image-source {source!r}: use a path of letters, digits and ._/+- "
                "(list lines split on spaces)"
            )
    all_grids = grids(args.image_source)
    if args.list:
        print(f"{'grid':<15}{'script':<21}{'runs':>5}  what")
        for name, grid in all_grids.items():
            print(f"{name:<15}{grid.script:<21}{len(grid.lines()):>5}  {grid.what}")
        distinct = {line for grid in all_grids.values() for line in grid.lines()}
        print(
            f"{'all':<36}{len(distinct):>5}  "
            "distinct runs (a run in two grids is one run folder, run once)"
        )
        return
    out = Path(args.out) if args.out else HERE
    (out / "lists").mkdir(parents=True, exist_ok=True)
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    for name, grid in all_grids.items():
        (out / "lists" / f"{name}.txt").write_text("\n".join(grid.lines()) + "\n")
    all_families = families(args.image_source)
    for family in all_families.values():
        (out / "wandb" / f"{family.name}.yaml").write_text(sweep_file(family))
    print(
        f"wrote {len(all_grids)} run lists to {out / 'lists'} "
        f"and {len(all_families)} sweep files to {out / 'wandb'}"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
