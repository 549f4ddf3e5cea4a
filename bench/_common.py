"""What every bench script needs before its project imports: the repository on sys.path (scripts run as
`python bench/<name>.py`, from any folder), the offline environment (set before img2dataset, transformers or
a spawned worker reads it), where ../shared's data is, and a device sync for timing GPU work."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "DO_NOT_TRACK": "1",
}

for _name, _value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def synchronize(device: object) -> None:
    """Wait for queued GPU work (a no-op on CPU), so a timer around it measures the work."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)
