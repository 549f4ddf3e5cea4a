"""What every typed config section shares (rs5m/config.py, rs5m/train_config.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Fields that change only how fast a stage runs, never what it outputs: left out of stage fingerprints.
_SPEED_ONLY = {"affects_output": False}


# Paths whose content the stage hashes itself: moving the files reruns nothing.
_CONTENT_HASHED = {"affects_output": False}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the bad field."""
