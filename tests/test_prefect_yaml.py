"""prefect.yaml's deployments point at real flows and carry parameters those flows accept."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from rs5m.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]


def test_every_deployment_names_a_flow_and_valid_parameters() -> None:
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert project["deployments"]
    for deployment in project["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert flow.name == deployment["name"]
        PipelineConfig.model_validate(deployment["parameters"]["config"])
