"""prefect.yaml's deployments point at real flows and carry parameters those flows accept: a config file's path
(relative to the repository, the working directory `prefect deploy` records) that loads as a pipeline config."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from rs5m.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_every_deployment_names_a_flow_and_valid_parameters() -> None:
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert project["deployments"]
    for deployment in project["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        parameters = flow.validate_parameters(deployment["parameters"])  # raises on a parameter it refuses
        assert parameters["config"] == deployment["parameters"]["config"], deployment["name"]  # a path, kept
        config = load_config(REPO / parameters["config"])
        assert config.clip.pretrained, f"{deployment['name']}: the example config must name real CLIP weights"
