"""prefect.yaml as a data engineer uses it: a real `prefect server`, the work pools, `prefect deploy --all` from
the repository, a worker started elsewhere, the rebuild deployment run on a config file, and the evaluation
deployment started by the build's completion event (its trigger), with the same config."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from rs5m import demo
from tests.helpers import BIN, PrefectServer, free_port, write_demo_pub11_config

REPO = Path(__file__).resolve().parents[1]
BUILD_DEPLOYMENTS = {"rs5m-rebuild", "rs5m-pub11", "rs5m-rs3", "rs5m-release"}
RUN_TIMEOUT_S = 900


def prefect(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 600) -> str:
    result = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def test_prefect_yaml_declares_a_deployment_per_parent_flow_with_a_config_path() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert "pull" not in spec  # `prefect deploy` records the repository as the working directory
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == BUILD_DEPLOYMENTS | {"rs5m-train-and-evaluate"}
    for deployment in deployments.values():
        config = deployment["parameters"]["config"]
        assert isinstance(config, str) and (REPO / config).is_file(), deployment["name"]
        assert deployment["concurrency_limit"]["limit"] == 1
    schedules = deployments["rs5m-rebuild"]["schedules"]
    assert [s["active"] for s in schedules] == [False]  # ships inactive
    (trigger,) = deployments["rs5m-train-and-evaluate"]["triggers"]
    assert set(trigger["match_related"]["prefect.resource.name"]) == BUILD_DEPLOYMENTS


@pytest.fixture
def own_server(tmp_path: Path):
    """A server of this test's own: deployments, work pools and automations must not leak into other tests."""
    server = PrefectServer(port=free_port(), home=tmp_path / "prefect-home")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_deploy_all_then_a_worker_runs_the_rebuild_and_its_completion_starts_the_evaluation(
    tmp_path: Path, own_server: PrefectServer
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**own_server.env(), "PREFECT_HOME": str(tmp_path / "client-home")}
    for pool in ("rs5m-process", "rs5m-gpu"):
        prefect("work-pool", "create", pool, "--type", "process", env=env)
    prefect("deploy", "--all", env=env)

    elsewhere = (
        tmp_path / "worker-cwd"
    )  # the flow runs find the code through the deployment, not the worker's cwd
    elsewhere.mkdir()
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "rs5m-process"],
        env=env,
        cwd=elsewhere,
        stdout=(tmp_path / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    workdir = tmp_path / "work"
    try:
        with demo.DemoServer(port=free_port()) as served:
            config = write_demo_pub11_config(workdir, served.base_url)
            out = prefect("deployment", "run", "rs5m/rs5m-rebuild", "--param", f"config={config}", env=env)
            with (
                temporary_settings({PREFECT_API_URL: own_server.api_url}),
                get_client(sync_client=True) as client,
            ):
                (build,) = client.read_flow_runs()
                assert str(build.id) in out
                # a second run of the same deployment meanwhile (an overlapping schedule): it waits for the
                # deployment's one slot instead of writing the work directory beside the first
                out = prefect(
                    "deployment", "run", "rs5m/rs5m-rebuild", "--param", f"config={config}", env=env
                )
                (overlapping,) = [run for run in client.read_flow_runs() if run.id != build.id]
                deadline = time.monotonic() + RUN_TIMEOUT_S

                def waited(run_id: UUID) -> bool:
                    # from the run's state history, not a sample of its state: a wait between two polls counts
                    return any(
                        s.name == "AwaitingConcurrencySlot" for s in client.read_flow_run_states(run_id)
                    )

                # The worker may submit both runs in one poll, in either order: whichever gets the slot is the
                # build, the other must wait for it, and the two never run at once.
                while True:
                    assert time.monotonic() < deadline, "neither run waited for the deployment's slot in time"
                    first, second = (client.read_flow_run(run.id) for run in (build, overlapping))
                    assert not (first.state.is_running() and second.state.is_running()), (
                        "both runs were running"
                    )
                    waiting = next((run for run in (second, first) if waited(run.id)), None)
                    if waiting is not None:
                        # seen waiting is enough (its run would be a no-op)
                        client.delete_flow_run(waiting.id)
                        build = first if waiting is second else second
                        break
                    if first.state.is_final() and second.state.is_final():
                        log = (tmp_path / "worker.log").read_text(errors="replace")[-5000:]
                        raise AssertionError(
                            "neither run waited for the deployment's concurrency slot: "
                            f"{first.state.name} ({first.state.message}), {second.state.name}\n{log}"
                        )
                    time.sleep(2)
                while not (build := client.read_flow_run(build.id)).state.is_final():
                    assert time.monotonic() < deadline, f"build still {build.state.name}"
                    time.sleep(2)
                log = (tmp_path / "worker.log").read_text(errors="replace")[-5000:]
                assert build.state.is_completed(), f"{build.state}\n{log}"

                # the trigger: a flow run of the evaluation deployment, created by the automation
                evaluation = client.read_deployments(
                    deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=["rs5m-train-and-evaluate"])
                    )
                )[0]
                deadline = time.monotonic() + 120
                while not (triggered := _runs_of(client, FlowRunFilter, evaluation.id)):
                    assert time.monotonic() < deadline, (
                        "the build completed but no evaluation run was started"
                    )
                    time.sleep(2)
                (run,) = triggered
                assert run.parameters == {"config": str(config)}
                client.delete_flow_run(run.id)  # no GPU worker here: it would wait in its queue
        assert (workdir / "dataset").is_symlink() and list((workdir / "dataset").glob("**/*.parquet"))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def _runs_of(client, flow_run_filter, deployment_id: UUID) -> list:
    from prefect.client.schemas.filters import FlowRunFilterDeploymentId

    return client.read_flow_runs(
        flow_run_filter=flow_run_filter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
    )
