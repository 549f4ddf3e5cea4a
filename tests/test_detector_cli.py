"""`rs5m train-detector` as a user runs it: a separate process, a pipeline config, real RSSCN7 aerial images as
positives and drawn non-RS images as negatives; the detector file, the printed accuracy, a refused name."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from tests.helpers import BIN, missing_data

REPO_ROOT = Path(__file__).resolve().parents[1]
RS_CLASSES = ("aGrass", "cIndustry", "gParking")  # three RSSCN7 classes, 50 JPEGs each
N_DRAWINGS = 30
CLI_TIMEOUT_S = 120


def train_detector_for(
    user_folders: dict[str, Path], workdir: Path, name: str
) -> subprocess.CompletedProcess:
    return train_detector_cli(
        "--workdir",
        str(workdir),
        "--name",
        name,
        "--positives",
        str(user_folders["positives"]),
        "--negatives",
        str(user_folders["negatives"]),
        "--config",
        str(user_folders["config"]),
    )


def train_detector_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "rs5m"), "train-detector", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),  # tests/conftest.py made it offline
        timeout=CLI_TIMEOUT_S,
    )


def draw_negatives(folder: Path, count: int) -> None:
    """Flat-coloured shapes, lines and strokes on plain backgrounds: clip art, not aerial photographs."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        width, height = (int(v) for v in rng.integers(96, 320, size=2))
        background = tuple(int(v) for v in rng.integers(200, 256, size=3))
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            box = sorted(rng.integers(0, width, size=2).tolist()) + sorted(
                rng.integers(0, height, size=2).tolist()
            )
            x0, x1, y0, y1 = box
            colour = tuple(int(v) for v in rng.integers(0, 200, size=3))
            shape = i % 3
            if shape == 0:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif shape == 1:
                draw.rectangle((x0, y0, x1, y1), outline=colour, width=3)
            else:
                draw.line((x0, y0, x1, y1), fill=colour, width=4)
        draw.text((5, 5), f"drawing {i}", fill=(0, 0, 0))
        image.save(folder / f"drawing_{i:02d}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture(scope="module")
def tiny_clip_dim() -> int:
    return json.loads((REPO_ROOT / "models" / "configs" / "rs5m-tiny-vit.json").read_text())["embed_dim"]


@pytest.fixture(scope="module")
def user_folders(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rsscn7 = shared_data / "rsscn7" / "images"
    if not all((rsscn7 / name).is_dir() for name in RS_CLASSES):
        missing_data(f"RSSCN7 class folders {RS_CLASSES} absent under {rsscn7}")
    root = tmp_path_factory.mktemp("train-detector")
    positives = root / "positives"
    for name in RS_CLASSES:
        # Linked file by file: a linked folder would not be searched (pathlib's rglob skips directory links).
        (positives / name).mkdir(parents=True)
        for image in sorted((rsscn7 / name).glob("*.jpg")):
            (positives / name / image.name).symlink_to(image)
    negatives = root / "negatives"
    draw_negatives(negatives, N_DRAWINGS)
    (negatives / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = root / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workdir": "work",
                "sources": [{"name": "unused", "path": "unused.parquet", "format": "parquet"}],
                "clip": {"model": "rs5m-tiny-vit", "device": "cpu", "num_workers": 0},
            }
        )
    )
    return {"root": root, "positives": positives, "negatives": negatives, "config": config}


@pytest.fixture(scope="module")
def trained(user_folders: dict[str, Path]) -> tuple[subprocess.CompletedProcess, Path]:
    workdir = user_folders["root"] / "work"
    return train_detector_for(user_folders, workdir, "rs"), workdir


def test_train_detector_writes_a_detector_for_the_configured_model(
    trained: tuple[subprocess.CompletedProcess, Path], user_folders: dict[str, Path], tiny_clip_dim: int
) -> None:
    result, workdir = trained
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    payload = json.loads((workdir / "detectors" / "rs.json").read_text())
    assert payload["kind"] == "logistic_regression"
    assert payload["model_identity"].startswith("rs5m-tiny-vit:random-init:0:")
    assert len(payload["weights"]) == tiny_clip_dim
    assert np.isfinite(payload["weights"]).all() and np.isfinite(payload["bias"])

    stats = payload["stats"]
    n_positive = sum(len(list((user_folders["positives"] / name).iterdir())) for name in RS_CLASSES)
    assert (stats["n_positive"], stats["n_negative"]) == (n_positive, N_DRAWINGS)
    assert stats["n_train"] + stats["n_heldout"] == n_positive + N_DRAWINGS
    assert stats["skipped_files"] == [str(user_folders["negatives"] / "truncated.jpg")]


def test_train_detector_prints_the_saved_detectors_accuracy(
    trained: tuple[subprocess.CompletedProcess, Path],
) -> None:
    result, workdir = trained
    assert result.returncode == 0, result.stderr
    stats = json.loads((workdir / "detectors" / "rs.json").read_text())["stats"]

    printed = re.search(r"accuracy: train (\d\.\d{3}), held-out (\d\.\d{3})", result.stdout)
    assert printed, result.stdout
    assert printed.group(2) == f"{stats['heldout_accuracy']:.3f}"
    assert printed.group(1) == f"{stats['train_accuracy']:.3f}"
    # The accuracy of the saved weights on the held-out images: a whole number of them right.
    correct = stats["heldout_accuracy"] * stats["n_heldout"]
    assert abs(correct - round(correct)) < 1e-9
    assert f"({stats['n_train']} fitted, {stats['n_heldout']} held out)" in result.stdout
    assert "skipped 1 undecodable file(s)" in result.stdout
    assert f"saved {workdir / 'detectors' / 'rs.json'}" in result.stdout


def test_train_detector_refuses_a_name_that_is_not_a_file_name(
    user_folders: dict[str, Path], tmp_path: Path
) -> None:
    result = train_detector_for(user_folders, tmp_path, "../rs")
    assert result.returncode == 2
    assert "detector name '../rs' must match" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "detectors").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--positives": "missing"}, "image folder not found"),
        ({"--positives": "empty"}, "at least 2"),
        ({"--heldout-fraction": "1.5"}, "heldout"),
    ],
)
def test_train_detector_reports_bad_input_in_one_line(
    user_folders: dict[str, Path], tmp_path: Path, change: dict[str, str], expected: str
) -> None:
    (tmp_path / "empty").mkdir()
    args = {
        "--workdir": str(tmp_path / "work"),
        "--name": "rs",
        "--positives": str(user_folders["positives"]),
        "--negatives": str(user_folders["negatives"]),
        "--config": str(user_folders["config"]),
    }
    args.update({k: str(tmp_path / v) if k == "--positives" else v for k, v in change.items()})
    result = train_detector_cli(*(item for pair in args.items() for item in pair))
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("rs5m train-detector: ") and expected in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work" / "detectors").exists()
