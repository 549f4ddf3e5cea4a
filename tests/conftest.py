"""Test environment: offline, isolated Prefect home, and shared fixtures (real data, a real Prefect server)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

# Set before anything imports prefect, albumentations or transformers: they read these at import time.
_PREFECT_HOME = tempfile.mkdtemp(prefix="rs5m-prefect-home-")
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "WANDB_MODE": "disabled",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": _PREFECT_HOME,
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
)
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402
import yaml  # noqa: E402

from tests.helpers import PrefectServer, free_port, missing_data, rs5m  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public data). CI always has it, so there its absence fails the test; elsewhere
    the tests that need it skip, saying why."""
    if not SHARED_DATA.is_dir():
        missing_data(f"../shared/data is absent ({SHARED_DATA}): this test needs the real public data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_server():
    """A real `prefect server start` on loopback for the whole session (not the test harness)."""
    server = PrefectServer(port=free_port(), home=Path(_PREFECT_HOME) / "server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, prefect_server, demo_port) -> Path:
    """One uninterrupted `rs5m demo` run: the reference of tests/test_pipeline.py and test_crash_matrix.py
    (marked xdist_group "demo", so that under pytest-xdist one worker makes it once for both)."""
    workdir = tmp_path_factory.mktemp("demo-reference")
    result = rs5m("demo", "--workdir", str(workdir), "--port", str(demo_port), env=prefect_server.env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Outputs in" in result.stdout
    # a progress line per stage on stderr (flows/stages.py), and not img2dataset's own bar per shard
    assert re.search(r"^download: (\d+) of \1 units \(0 reused, \1 run\)", result.stderr, re.MULTILINE)
    assert "0it [" not in result.stderr + result.stdout
    # training: its progress line (flows/train.py TrainingLine), not a log line per step; the scorecard once
    steps = yaml.safe_load((workdir / "demo-config.yaml").read_text())["train"]["steps"]
    assert re.search(rf"^train \S+: step {steps} of {steps}, loss [\d.]+, ", result.stderr, re.MULTILINE)
    assert not re.search(r"\bstep \d+/\d+ epoch ", result.stderr)
    assert (result.stdout + result.stderr).count("| dataset | metric | base |") == 1
    return workdir
