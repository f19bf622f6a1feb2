"""Shared pytest setup: offline W&B for every test, the repository root importable (the scripts
are single files), and known handlers for the scripts' stop signals."""

import os
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # the scripts stop cleanly on these

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where the single-file scripts live)."""
    return REPO_ROOT


@pytest.fixture
def sentinel_handlers():
    """Known handlers for the three stop signals, put back afterwards: main must restore exactly
    these. (The handlers a test process starts with depend on how it was started: a background job
    of a non-interactive shell ignores SIGINT, so a test cannot assume Python's default.)"""

    def sentinel(signum, frame):
        return None

    previous = {signum: signal.signal(signum, sentinel) for signum in STOP_SIGNALS}
    yield sentinel
    for signum, handler in previous.items():
        signal.signal(signum, handler)
