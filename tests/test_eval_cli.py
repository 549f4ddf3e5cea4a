"""`rs5m eval` as its contract says (README: Evaluation): classification folders and retrieval CSVs of real
images (RSSCN7, UC Merced captions), the JSON output's shape and metric names, the printed table, one-line
errors with exit status 2; and the `evaluate` flow against a real Prefect server."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import missing_data, rs5m

CLASSIFICATION_METRICS = {"acc1", "acc5", "mean_per_class_recall"}
RETRIEVAL_METRICS = {
    *(f"{direction}_retrieval_recall@{k}" for direction in ("image", "text") for k in (1, 5, 10)),
    "mean_recall",
}


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory, shared_data: Path) -> dict[str, Path]:
    rsscn7, ucm = shared_data / "rsscn7" / "images", shared_data / "ucm_captions"
    if not rsscn7.is_dir() or not (ucm / "captions.csv").is_file():
        missing_data(f"RSSCN7 or the UC Merced captions are absent under {shared_data}")
    root = tmp_path_factory.mktemp("eval-sets")
    classes = root / "rsscn7"
    for folder in sorted(rsscn7.iterdir())[:3]:
        (classes / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:3]:
            shutil.copy(image, classes / folder.name / image.name)
    with open(ucm / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = sorted({row["filename"] for row in rows})[::100][:6]
    retrieval = root / "ucm"
    retrieval.mkdir()
    with open(retrieval / "test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "caption"])
        for row in rows:
            if row["filename"] in chosen:
                target = retrieval / row["filename"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ucm / row["filename"], target)
                writer.writerow([row["filename"], row["caption"]])
    return {"rsscn7": classes, "ucm": retrieval / "test.csv"}


def test_eval_writes_the_results_with_clip_benchmarks_metric_names(eval_sets, tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    result = rs5m(
        "eval",
        "--model",
        "rs5m-tiny-vit",
        "--seed",
        "3",
        "--dataset",
        f"rsscn7={eval_sets['rsscn7']}",
        "--dataset",
        f"ucm={eval_sets['ucm']}",
        "--output",
        str(output),
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert [(r["dataset"], r["task"]) for r in results] == [
        ("rsscn7", "zeroshot_classification"),
        ("ucm", "zeroshot_retrieval"),
    ]
    for entry in results:
        assert set(entry) == {"dataset", "task", "protocol", "model", "pretrained", "metrics"}
        assert (entry["protocol"], entry["model"], entry["pretrained"]) == ("rs5m", "rs5m-tiny-vit", None)
        assert all(value is None or 0.0 <= value <= 1.0 for value in entry["metrics"].values())
    assert set(results[0]["metrics"]) == CLASSIFICATION_METRICS
    assert results[0]["metrics"]["acc5"] is None  # three classes: clip_benchmark's NaN, written as null
    retrieval = results[1]["metrics"]
    assert set(retrieval) == RETRIEVAL_METRICS
    six = [value for name, value in retrieval.items() if name != "mean_recall"]
    assert retrieval["mean_recall"] == pytest.approx(sum(six) / 6)
    # six images: every image is within the top ten, in both directions
    assert retrieval["image_retrieval_recall@10"] == retrieval["text_retrieval_recall@10"] == 1.0
    # the table prints percent with two decimals, as RS5M's README
    acc1 = results[0]["metrics"]["acc1"]
    assert re.search(rf"\|\s*rsscn7\s*\|.*\|\s*{100 * acc1:.2f}\s*\|", result.stdout), result.stdout


def test_the_protocol_and_templates_are_the_users_choice(eval_sets, tmp_path: Path) -> None:
    templates = tmp_path / "templates.txt"
    templates.write_text("a satellite photo of a {}.\nan aerial view of the {}.\n")
    output = tmp_path / "results.json"
    arguments = ["eval", "--model", "rs5m-tiny-vit", "--dataset", f"rsscn7={eval_sets['rsscn7']}"]
    result = rs5m(
        *arguments,
        "--protocol",
        "clip_benchmark",
        "--templates",
        str(templates),
        "--output",
        str(output),
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = json.loads(output.read_text())
    assert entry["protocol"] == "clip_benchmark" and set(entry["metrics"]) == CLASSIFICATION_METRICS


@pytest.mark.parametrize("problem", ["missing", "empty", "no_columns", "undecodable", "bad_model"])
def test_bad_input_is_one_line_and_exit_status_2(eval_sets, tmp_path: Path, problem: str) -> None:
    model = "rs5m-tiny-vit"
    if problem == "missing":
        dataset, expected = str(tmp_path / "nowhere"), "nowhere"
    elif problem == "empty":
        (tmp_path / "empty").mkdir()
        dataset, expected = str(tmp_path / "empty"), "empty"
    elif problem == "no_columns":
        (tmp_path / "bad.csv").write_text("image,text\na.jpg,a caption\n")
        dataset, expected = str(tmp_path / "bad.csv"), "bad.csv"
    elif problem == "undecodable":
        folder = tmp_path / "classes"
        shutil.copytree(eval_sets["rsscn7"], folder)
        first = sorted(folder.iterdir())[0]
        (first / "broken.jpg").write_bytes(b"<html>not an image</html>")
        dataset, expected = str(folder), "broken.jpg"
    else:
        model, dataset, expected = "no-such-model", str(eval_sets["rsscn7"]), "no-such-model"
    result = rs5m("eval", "--model", model, "--dataset", f"d={dataset}", env=dict(os.environ))
    assert result.returncode == 2
    # one line says what is wrong (open_clip may log its random-weights warning before it)
    errors = [line for line in result.stderr.splitlines() if line.startswith("rs5m eval: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_the_evaluate_flow_publishes_a_table(eval_sets, tmp_path: Path, prefect_server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.evaluate import evaluate_flow
    from rs5m.eval_cli import json_safe

    output = tmp_path / "flow.json"
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        results = evaluate_flow(
            model="rs5m-tiny-vit", datasets={"rsscn7": str(eval_sets["rsscn7"])}, output=str(output)
        )
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rs5m-eval"]))
            )
    assert json.loads(output.read_text()) == json_safe(results)
    table = artifacts[-1].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {row["metric"] for row in rows} == CLASSIFICATION_METRICS
    acc1 = next(row for row in rows if row["metric"] == "acc1")
    assert acc1["percent"] == round(100 * results[0]["metrics"]["acc1"], 2)
