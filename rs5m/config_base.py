"""What every typed config section shares (rs5m/config.py, rs5m/train_config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

# Fields that change only how fast a stage runs, never what it outputs: left out of stage fingerprints.
_SPEED_ONLY = {"affects_output": False}


# Paths whose content the stage hashes itself: moving the files reruns nothing.
_CONTENT_HASHED = {"affects_output": False}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the bad field."""


def describe_validation_error(error: ValidationError, what: str) -> str:
    """`invalid <what>:` and one line per bad value, naming its field (`sources.0.path: ...`)."""
    lines = [f"invalid {what}:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ConfigError naming the file otherwise."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return data
