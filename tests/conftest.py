"""Shared pytest setup: offline W&B for every test, and the repository root importable (the scripts
are single files)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where the single-file scripts live)."""
    return REPO_ROOT
