"""Tests of sweeps/: the grid generator, the committed run lists and wandb sweep files, the lock
file, and the array script's line handling (the SLURM runs themselves are in
tests/test_slurm.py)."""

import dataclasses
import filecmp
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import tyro
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

import ppo_patchloc_mdr
import ppo_procgen_mdr

SCRIPT_ARGS = {
    "ppo_procgen_mdr.py": ppo_procgen_mdr.Args,
    "ppo_patchloc_mdr.py": ppo_patchloc_mdr.Args,
}
GRID_SIZES = {"procgen_fig3": 216, "procgen_fig4": 54, "patchloc_fig3": 42, "patchloc_fig5": 15}


def run_generator(repo_root, *args):
    return subprocess.run(
        [sys.executable, str(repo_root / "sweeps" / "make_grids.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def parse(words):
    """`python SCRIPT --flag value ...` -> (script, the script's Args as a hashable tuple, without
    --track)."""
    assert words[0] == "python", words
    args = tyro.cli(SCRIPT_ARGS[words[1]], args=words[2:])
    return words[1], tuple(
        sorted((k, str(v)) for k, v in dataclasses.asdict(args).items() if k != "track")
    )


def list_lines(repo_root):
    return {
        path.stem: path.read_text().splitlines()
        for path in sorted((repo_root / "sweeps" / "lists").glob("*.txt"))
    }


def test_list_prints_every_grid_and_its_size(repo_root):
    result = run_generator(repo_root, "--list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    for grid, size in GRID_SIZES.items():
        assert int(rows[grid][2]) == size, result.stdout
    # the 18 NoNorm runs of procgen_fig4 are procgen_fig3's PPO runs: one run folder each
    assert int(rows["all"][1]) == sum(GRID_SIZES.values()) - 18, result.stdout


def test_committed_lists_and_sweeps_are_the_generators_output(repo_root, tmp_path):
    result = run_generator(repo_root, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for folder in ["lists", "wandb"]:
        comparison = filecmp.dircmp(tmp_path / folder, repo_root / "sweeps" / folder)
        assert not comparison.left_only and not comparison.right_only, (
            f"{folder}: rerun python sweeps/make_grids.py"
        )
        _, mismatch, errors = filecmp.cmpfiles(
            tmp_path / folder, repo_root / "sweeps" / folder, comparison.common_files
        )
        assert not mismatch and not errors, (
            f"sweeps/{folder} {mismatch} differ: rerun python sweeps/make_grids.py"
        )


def test_every_list_line_parses_and_sets_what_it_names(repo_root):
    lines = list_lines(repo_root)
    assert {grid: len(grid_lines) for grid, grid_lines in lines.items()} == GRID_SIZES
    for line in itertools.chain(*lines.values()):
        words = line.split()
        # as sweeps/slurm_array.sh runs it
        args = tyro.cli(SCRIPT_ARGS[words[1]], args=[*words[2:], "--resume", "auto"])
        for flag, value in zip(words[2::2], words[3::2]):
            assert str(getattr(args, flag[2:].replace("-", "_"))) == value, line
        assert args.resume == "auto"


def test_grids_hold_the_papers_variants(repo_root):
    lines = list_lines(repo_root)
    fig3 = [dict(zip(line.split()[2::2], line.split()[3::2])) for line in lines["procgen_fig3"]]
    # a BatchNorm that updates running statistics is run at both momenta; Eval freezes them,
    # LN/GN/none have none
    for flags in fig3:
        assert ("--bn-momentum" in flags) == (flags["--norm"] in ("bn", "brn")), flags
    methods = {(f["--norm"], f["--alpha1"], f["--alpha2"]) for f in fig3}
    assert methods == {(n, "3", "0") for n in ["none", "bn", "eval", "brn", "ln", "gn"]} | {
        ("bn", "2", "1"),
        ("bn", "1", "2"),
    }
    fig5 = [dict(zip(line.split()[2::2], line.split()[3::2])) for line in lines["patchloc_fig5"]]
    assert {f["--num-tasks"] for f in fig5} == {"2048"}
    assert {(f["--norm"], f.get("--dropout-p"), f["--alpha2"]) for f in fig5} == {
        ("none", None, "0"),
        *itertools.product(["dropout"], ["0.1", "0.2"], ["0", "1"]),
    }


def test_wandb_sweeps_expand_to_the_run_lists(repo_root):
    """Each grid point expanded as the wandb agent does (${args_no_boolean_flags}) parses with the
    script's tyro Args, and the sweeps together are exactly the runs of the lists."""
    from_sweeps = []
    for path in sorted((repo_root / "sweeps" / "wandb").glob("*.yaml")):
        sweep = yaml.safe_load(path.read_text())
        assert sweep["method"] == "grid" and "${args_no_boolean_flags}" in sweep["command"], path
        axes = [
            [(name, v) for v in spec.get("values", [spec.get("value")])]
            for name, spec in sweep["parameters"].items()
        ]
        for point in itertools.product(*axes):
            flags = create_sweep_command_args(
                {"args": {name: {"value": value} for name, value in point}}
            )
            macros = {"${env}": [], "${program}": [sweep["program"]]}
            macros["${args_no_boolean_flags}"] = flags["args_no_boolean_flags"]
            words = [w for word in sweep["command"] for w in macros.get(word, [word])]
            assert "--track" in words, words  # a boolean flag: tyro takes --track, not --track=True
            from_sweeps.append(parse(words))
    from_lists = {parse(line.split()) for line in itertools.chain(*list_lines(repo_root).values())}
    assert len(from_sweeps) == len(set(from_sweeps)), "two sweep files run the same configuration"
    assert set(from_sweeps) == from_lists


def test_lock_pins_every_requirement(repo_root):
    """requirements-lock.txt is generated from requirements.txt (sweeps/make_lock.sh): every
    requirement that applies here is pinned there, at a version requirements.txt allows."""
    pins = {}
    for line in (repo_root / "requirements-lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for line in (repo_root / "requirements.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            name = canonicalize_name(requirement.name)
            assert name in pins, (
                f"{name} is not in requirements-lock.txt: rerun sweeps/make_lock.sh"
            )
            assert requirement.specifier.contains(pins[name]), (
                f"{name}=={pins[name]} breaks {line}: rerun sweeps/make_lock.sh"
            )


def test_bad_image_source_is_a_one_line_error(repo_root, tmp_path):
    result = run_generator(repo_root, "--image-source", "my images", "--out", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--image-source" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.fixture
def array_script(repo_root, tmp_path):
    """Runs sweeps/slurm_array.sh as SLURM would, with PYTHON=echo: prints the command of the array
    task's line."""
    (tmp_path / "list.txt").write_text(
        "python ppo_procgen_mdr.py --seed 1\npython ppo_procgen_mdr.py --seed 2\n"
    )

    def run(task, **env):
        return subprocess.run(
            ["bash", str(repo_root / "sweeps" / "slurm_array.sh"), "list.txt"],
            cwd=tmp_path,
            env={**os.environ, "PYTHON": "echo", "SLURM_ARRAY_TASK_ID": str(task), **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    return run


def test_array_script_runs_its_line_with_resume_auto(array_script):
    result = array_script(2, EXTRA_ARGS="--track --wandb-project-name mdr")
    assert result.returncode == 0, result.stderr
    assert (
        "ppo_procgen_mdr.py --seed 2 --resume auto --track --wandb-project-name mdr\n"
        in result.stdout
    )
    assert "--seed 1" not in result.stdout


def test_array_script_rejects_a_task_past_the_list(array_script):
    result = array_script(3)
    assert result.returncode == 2 and "has no line 3; use --array=1-2" in result.stderr


SWEEPS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "sweeps")
RUN_AND_COMMIT = os.path.join(SWEEPS_DIR, "run_and_commit.sh")
FAKE_RUN = """import json, os, sys
folder = os.path.join("runs", sys.argv[sys.argv.index("--run-name") + 1])
# the scripts refuse a run folder holding files not of their own run: nothing is put there first
assert not os.path.isdir(folder) or not os.listdir(folder), os.listdir(folder)
os.makedirs(folder, exist_ok=True)
names = "metrics.csv args.json tasks.json events.out.tfevents.1.host checkpoint.pt"
for name in names.split():
    open(os.path.join(folder, name), "w").write(name)
json.dump({"status": "completed"}, open(os.path.join(folder, "summary.json"), "w"))
"""


def test_run_and_commit_commits_what_analysis_reads_and_skips_a_finished_line(tmp_path):
    """The queue behind the studies: a finished run's metrics, arguments, TensorBoard events,
    tasks and summary are committed into DEST's checkout (never its checkpoint), with the machine
    of each start (hosts.jsonl, kept outside the run folder until then), and the same line again is
    skipped, so a queue restarts where it stopped."""
    repo, work = tmp_path / "repo", tmp_path / "work"
    for folder in (repo, work):
        folder.mkdir()
        subprocess.run(["git", "init", "-q", str(folder)], check=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C"]
    subprocess.run([*git, str(work), "commit", "-q", "--allow-empty", "-m", "code"], check=True)
    subprocess.run([*git, str(repo), "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    (work / "ppo_fake.py").write_text(FAKE_RUN)
    (repo / "docs").mkdir()  # DEST's parent: a folder of the checkout the runs go to
    line = f"{sys.executable} ppo_fake.py --seed 1 --run-name study/a_s1"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    command = ["bash", RUN_AND_COMMIT, str(repo / "docs" / "runs"), line]
    first = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "done study/a_s1" in first.stdout, first.stdout
    listed = subprocess.run(
        ["git", "-C", str(repo), "show", "--name-only", "--format=%s", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.split()
    committed = sorted(os.path.basename(path) for path in listed if path.startswith("docs/"))
    assert committed == sorted(
        ["args.json", "events.out.tfevents.1.host", "metrics.csv", "summary.json", "tasks.json"]
        + ["hosts.jsonl"]
    )
    assert listed[:3] == ["study:", "study/a_s1", "(ppo_fake.py"]
    # the machine of the start, as the line's interpreter sees it
    hosts = (repo / "docs" / "runs" / "study" / "a_s1" / "hosts.jsonl").read_text().splitlines()
    [host] = [json.loads(record) for record in hosts]
    assert set(host) == {
        "started",
        "model_name",
        "cpu_family",
        "model",
        "stepping",
        "torch_cpu_capability",
        "torch",
        "cpus",
        "python",
    }
    assert host["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert host["torch"] == torch.__version__ and host["cpus"] == os.cpu_count()
    with open("/proc/cpuinfo") as f:  # the first processor's model name, where it has one
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    assert host["model_name"] == (names[0] if names else None)
    again = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    assert again.stdout.strip() == "skip study/a_s1 (done)"


STUDY_QUEUE = os.path.join(SWEEPS_DIR, "study_queue.sh")
# each study's command lists, in the order of their plans, and the commit its plan fixed
PLANNED_LISTS = [
    ("ec589f7", "docs/collapse/study_c", "docs/collapse/study_c/stage_c.txt"),
    ("ec589f7", "docs/collapse/study_c", "docs/collapse/study_c/stage_c_photos.txt"),
    ("cb2e6e5", "docs/dropout", "docs/dropout/stability_step1.txt"),
    ("cb2e6e5", "docs/dropout", "docs/dropout/stability_step2.txt"),  # Step 1's report: it must run
    ("cb2e6e5", "docs/collapse/study", "docs/dropout/ln.txt"),
    ("cb2e6e5", "docs/dropout", "docs/dropout/generalization.txt"),
]


def test_study_queue_runs_every_planned_run_in_order_at_its_commit(repo_root, tmp_path):
    """--dry-run: one item per command line of the lists, in the plans' order, each in a
    worktree of its study's commit (which exists and holds the modes its lines use) and committed
    to its study's folder; no run name twice in one folder."""
    result = subprocess.run(
        ["bash", STUDY_QUEUE, str(tmp_path / "wt"), "--dry-run"],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    expected = []
    for commit, dest, path in PLANNED_LISTS:
        with open(os.path.join(repo_root, path)) as f:
            lines = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
        assert lines, path
        expected += [
            f"{tmp_path / 'wt'}/study-{commit}|{repo_root}/{dest}|{line}" for line in lines
        ]
    assert result.stdout.splitlines() == expected
    assert not (tmp_path / "wt").exists()  # a dry run makes nothing
    names = [(item.split("|")[1], item.split("--run-name ")[1].split()[0]) for item in expected]
    assert len(set(names)) == len(names)
    # what the lists use: Stage C's MDR(1,2) and 2-epoch control; the dropout and LayerNorm modes
    needs = {
        "ec589f7": ['"bn-mdr"', "update_epochs: int", "alpha2: Optional[int]"],
        "cb2e6e5": ['"dropout-mdr"', '"ln"', "dropout_p: Optional[float]"],
    }
    for commit, strings in needs.items():
        probe = subprocess.run(
            ["git", "-C", repo_root, "show", f"{commit}:ppo_collapse_probe.py"],
            capture_output=True,
            text=True,
        )
        assert probe.returncode == 0, f"{commit} is not in this clone's history"
        assert [text for text in strings if text not in probe.stdout] == [], commit


@pytest.mark.parametrize("args", [[], ["a", "--dry-rn"], ["a", "--dry-run", "b"]])
def test_study_queue_bad_usage_is_one_line(repo_root, args):
    result = subprocess.run(
        ["bash", STUDY_QUEUE, *args], cwd=repo_root, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == "usage: bash sweeps/study_queue.sh WORKDIR [--dry-run]\n"
