"""Helpers shared by tests: free ports, a real Prefect server process, subprocess environments."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from storage.layout import Layout
from storage.schemas import KEYWORD_SCHEMA

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 600


def rs5m(*args: str, env: dict[str, str], timeout: float = DEMO_TIMEOUT_S) -> subprocess.CompletedProcess:
    """The `rs5m` command of this environment, its output captured."""
    return subprocess.run(
        [str(BIN / "rs5m"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def missing_data(message: str) -> None:
    """Real public data a test needs is absent: under CI (which always has ../shared) the test fails, elsewhere
    it skips with the reason."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keyword_shard(urls: list[str]) -> pa.Table:
    """A keyword-stage output shard (the download stage's input) with one row per URL."""
    n = len(urls)
    return pa.Table.from_pydict(
        {
            "sample_id": [f"s{i:03d}" for i in range(n)],
            "source": ["web"] * n,
            "url": urls,
            "caption": [f"satellite image {i}" for i in range(n)],
            "extra": [json.dumps({"row": i}) for i in range(n)],
            "matched_keyword": ["satellite"] * n,
        },
        schema=KEYWORD_SCHEMA,
    )


class PrefectServer:
    def __init__(self, port: int, home: Path) -> None:
        self.port = port
        self.home = home
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this server."""
        return {**os.environ, "PREFECT_API_URL": self.api_url}

    def start(self, timeout_s: float = 120) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "server.log", "wb")  # noqa: SIM115 - kept open for the process's lifetime
        self.process = subprocess.Popen(
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--analytics-off",
            ],
            # the UI asks the server where the API is (/ui-settings): this port, not the default 4200
            env={**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_UI_API_URL": self.api_url},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited early; see {self.home / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server not healthy after {timeout_s} s; see {self.home / 'server.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def near(vector: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector with the given cosine to the unit vector `vector`."""
    other = rng.standard_normal(vector.shape)
    other = unit(other - other @ vector * vector)
    return cosine * vector + np.sqrt(1 - cosine**2) * other


def canonical(workdir: Path) -> tuple[list, list]:
    con = duckdb.connect(str(Layout(workdir).catalog), read_only=True)
    ledger = con.sql("SELECT * EXCLUDE (run_id) FROM ledger ORDER BY stage, sample_id").fetchall()
    samples = con.sql("SELECT * FROM samples ORDER BY sample_id").fetchall()
    return ledger, samples


def write_demo_pub11_config(workdir: Path, base_url: str) -> Path:
    """configs/demo.yaml for the demo's PUB11 sources alone (served at base_url), written into workdir with
    its sources, eval and held-out sets, as a user's config file."""
    import yaml

    from rs5m import demo

    layout = Layout(workdir)
    demo.write_demo_sources(layout.demo_sources(), base_url)
    demo.write_demo_eval_set(workdir / "demo_eval")
    demo.write_demo_heldout_sets(workdir / "demo_heldout")
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    del data["rs3"]
    data["workdir"] = str(workdir)
    path = workdir / "pub11-config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_stage_directly(layout: Layout, name: str, config, run_id: str) -> None:
    """One stage over all its units, as its flow does (flows/stages.py), without Prefect."""
    from tasks.harness import begin_stage, complete_stage
    from tasks.pipeline import STAGES

    stage = STAGES[name]
    begin_stage(layout, name, run_id)
    units = stage.units(layout, config)
    _, errors = stage.run_units(layout, units, config, run_id)
    if errors:
        raise next(iter(errors.values()))
    complete_stage(
        layout,
        stage=name,
        upstreams=stage.upstreams(config),
        unit_fingerprints=stage.unit_fingerprints(config, units),
        run_id=run_id,
    )
