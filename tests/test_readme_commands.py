"""No command in the README overwrites a tracked file (issue 27 item 3): every analysis, figure
and sweep command of the README's code blocks is run in a fresh clone of this checkout, and `git
status` must stay clean after each. The training scripts' commands are not run here (minutes to
hours each): they write only inside runs/, which .gitignore covers and tests/test_bad_input.py
keeps them inside."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# lines of the README's commands that stand for the reader's own data: not runnable here
PLACEHOLDERS = ("RUN_A", "ENTITY/", "/data/")
RUN_HERE = ("python analysis/", "python sweeps/")


def readme_commands() -> list:
    """The README's `python analysis/...` and `python sweeps/...` lines, in order, with their
    trailing comments and the optional parts in [brackets] removed."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for line in (line.strip() for block in blocks for line in block.splitlines()):
        if line.startswith(RUN_HERE):
            line = re.sub(r"\s+#.*$", "", line)
            commands.append(re.sub(r"\s*\[[^\]]*\]", "", line).strip())
    return commands


def test_the_readme_has_the_commands_this_test_runs():
    commands = readme_commands()
    runnable = [c for c in commands if not any(p in c for p in PLACEHOLDERS)]
    assert any("collapse_figures.py" in c for c in runnable), commands
    assert any("aggregate.py" in c for c in runnable), commands
    assert any("--study stage-c" in c for c in runnable), commands
    assert "[" not in " ".join(runnable)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A clone of this checkout's HEAD plus its uncommitted changes (the tree under test), so that
    `git status` there shows only what the commands write."""
    target = tmp_path_factory.mktemp("readme") / "repo"
    subprocess.run(["git", "clone", "-q", "--local", str(ROOT), str(target)], check=True)
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-m"], capture_output=True, text=True, check=True
    ).stdout.split()
    for path in tracked:  # the working tree's edits, so the test checks what is being tested
        if (ROOT / path).is_file():
            shutil.copyfile(ROOT / path, target / path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(target)]
    subprocess.run(
        [*git, "commit", "-q", "-a", "-m", "tree under test", "--allow-empty"], check=True
    )
    return target


@pytest.mark.parametrize(
    "command", [c for c in readme_commands() if not any(p in c for p in PLACEHOLDERS)]
)
def test_a_readme_command_leaves_git_status_clean(command, clone, tmp_path):
    words = command.replace("/tmp/check", str(tmp_path / "check")).split()
    env = {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, *words[1:]], cwd=clone, capture_output=True, text=True, env=env
    )
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=clone,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert status == "", f"{command} changed the checkout:\n{status}"
