"""GeoRSCLIP flows: `train` (fine-tuning in torchrun processes, models/train.py) and `train_and_evaluate` (train,
then evaluate the base model and every saved checkpoint: a scorecard).

The training task launches torchrun as a subprocess, streams its lines into the flow run's log, keeps a
progress artifact up to date, and fails when the processes fail; rerunning resumes from the last checkpoint.
At the end it publishes the loss curve (an SVG picture, also saved as train/<run>/loss.svg) and a table of
the logged steps. Evaluation runs one task per model (models/evaluation.py through rs5m/eval_cli.py).
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any, TextIO

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.evaluate import result_rows
from flows.progress_line import ProgressLine
from rs5m.config import EvalConfig, PipelineConfig, as_pipeline_config
from rs5m.eval_cli import EvalRequest, json_safe, run_evaluation
from storage.atomic import write_json, write_text
from storage.layout import TrainLayout

STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")
LOSS = re.compile(r"\bloss (\S+)")
TERMINAL_EVERY_S = 60.0  # off a terminal (a CI log, a worker's output): a plain progress line this often
PROGRESS_EVERY_S = 5.0  # progress artifact updates (one API call each) at most this often
TABLE_ROWS = 50  # steps shown in the metrics table (evenly spaced, the last one included)


class TrainingLine:
    """Training's progress on the terminal (flows/progress_line.py): step, loss and steps/s of this process
    (a resumed run starts at its checkpoint), live on a terminal, else a plain line every TERMINAL_EVERY_S
    and one at the end."""

    def __init__(self, run_name: str, total_steps: int, terminal: TextIO | None = None) -> None:
        self.run_name, self.total = run_name, total_steps
        self.first: tuple[int, float] | None = None  # (step, time) of the first step this process saw
        self.done, self.loss = 0, ""
        self.line = ProgressLine(self.describe(), total_steps, terminal, plain_every_s=TERMINAL_EVERY_S)

    def step(self, done: int, line: str) -> None:
        self.done = done
        loss = LOSS.search(line)
        self.loss = loss[1] if loss else self.loss
        if self.first is None:
            self.first = (done, time.monotonic())
        self.line.update(done, self.describe())

    def finish(self, complete: bool) -> None:
        """The final line; a complete run is at its last step (also one that was complete before)."""
        if complete:
            self.done = self.total
        self.line.finish(self.describe())

    def describe(self) -> str:
        text = f"train {self.run_name}: step {self.done} of {self.total}"
        if self.loss:
            text += f", loss {self.loss}"
        if self.first is not None and self.done > self.first[0]:
            rate = (self.done - self.first[0]) / max(time.monotonic() - self.first[1], 1e-9)
            text += f", {rate:.2f} steps/s"
        return text


class TrainingFailedError(RuntimeError):
    """The training processes exited with an error; the run folder keeps the last checkpoint."""


def _run_folder(config: PipelineConfig) -> Path:
    return TrainLayout(Path(config.workdir).resolve(), config.train.run_name).root


@task(name="train-model")
def train_model(config: PipelineConfig) -> str:
    """Runs (or resumes) the `train:` section's run; returns its folder."""
    from models.train import check_training_inputs, launch

    logger = get_run_logger()
    plan = check_training_inputs(config.train, config.workdir)
    progress = create_progress_artifact(
        progress=0.0, key="rs5m-train-progress", description=f"{config.train.run_name}: steps done, percent"
    )
    terminal = TrainingLine(config.train.run_name, plan.total_steps)
    last_update = 0.0

    def on_line(line: str) -> None:
        nonlocal last_update
        logger.info(line)
        step = STEP_LINE.match(line)
        if step is None:
            return
        terminal.step(int(step[1]), line)
        if time.monotonic() - last_update > PROGRESS_EVERY_S or step[1] == step[2]:
            last_update = time.monotonic()
            update_progress_artifact(progress, progress=100.0 * int(step[1]) / int(step[2]))

    code = None
    try:
        code = launch(config.train, config.workdir, on_line=on_line)
    finally:
        terminal.finish(complete=code == 0)
    if code != 0:
        raise TrainingFailedError(
            f"training exited with status {code} after its last checkpoint; rerun the same command to resume"
        )
    folder = _run_folder(config)
    publish_training(folder, plan.total_steps)
    return str(folder)


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def loss_curve_svg(metrics: list[dict[str, Any]], width: int = 640, height: int = 240) -> str:
    """The loss per step as a small SVG line chart (no plotting library needed)."""
    steps = [m["step"] for m in metrics]
    losses = [m["loss"] for m in metrics]
    low, high = min(losses), max(losses)
    span_x, span_y = max(steps[-1] - steps[0], 1), (high - low) or 1.0
    margin = 40
    points = " ".join(
        f"{margin + (s - steps[0]) / span_x * (width - 2 * margin):.1f},"
        f"{height - margin - (v - low) / span_y * (height - 2 * margin):.1f}"
        for s, v in zip(steps, losses, strict=True)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>'
        f'<text x="{margin}" y="20" font-size="12">loss {high:.4f} (max) .. {low:.4f} (min)</text>'
        f'<text x="{margin}" y="{height - 10}" font-size="12">step {steps[0]}</text>'
        f'<text x="{width - margin}" y="{height - 10}" font-size="12" text-anchor="end">step {steps[-1]}</text>'
        "</svg>"
    )


def publish_training(folder: Path, total_steps: int) -> None:
    """The loss curve (picture and file) and a table of the logged steps, as artifacts."""
    metrics = read_metrics(folder)
    if not metrics:
        return
    svg = loss_curve_svg(metrics)
    write_text(folder / "loss.svg", svg)
    encoded = base64.b64encode(svg.encode()).decode()
    create_markdown_artifact(
        key="rs5m-train-loss",
        markdown=f"# Loss of {folder.name}\n\n![loss curve](data:image/svg+xml;base64,{encoded})\n\n"
        f"{len(metrics)} of {total_steps} steps logged; the file is `{folder / 'loss.svg'}`.",
        description="Training loss per step",
    )
    stride = max(1, len(metrics) // TABLE_ROWS)
    shown = metrics[::stride] + ([metrics[-1]] if (len(metrics) - 1) % stride else [])
    create_table_artifact(key="rs5m-train-metrics", table=shown, description="Loss, learning rate, samples/s")


def evaluated_models(config: PipelineConfig, folder: Path) -> list[tuple[str, str | None]]:
    """(label, weights) of the base model and of every saved checkpoint, in step order, final last (the
    checkpoint of the last step holds final.pt's weights: evaluated once)."""
    checkpoints = sorted((folder / "checkpoints").glob("step-*.pt"))
    checkpoints = [path for path in checkpoints if not path.name.endswith(".state.pt")]
    final = folder / "checkpoints" / "final.pt"
    if final.is_file():  # the last step's checkpoint holds final.pt's weights
        last = json.loads((folder / "run.json").read_text())["total_steps"]
        checkpoints = [path for path in checkpoints if path.stem != f"step-{last:06d}"]
    models: list[tuple[str, str | None]] = [("base", config.train.pretrained)]
    models += [(path.stem, str(path)) for path in checkpoints]
    if final.is_file():
        models.append(("final", str(final)))
    return models


@task(name="evaluate-checkpoint")
def evaluate_checkpoint(request: EvalRequest) -> list[dict[str, Any]]:
    return run_evaluation(request)


def scorecard_rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model x dataset x metric, with the change against the base model (percentage points)."""
    base = {(r["dataset"], r["metric"]): r["percent"] for r in result_rows(results["base"], "base")}
    rows = []
    for label, model_results in results.items():
        for row in result_rows(model_results, label):
            before = base.get((row["dataset"], row["metric"]))
            change = None if before is None or row["percent"] is None else round(row["percent"] - before, 2)
            rows.append({**row, "vs_base": change})
    return rows


def scorecard_text(rows: list[dict[str, Any]]) -> str:
    models = list(dict.fromkeys(row["model"] for row in rows))
    keys = list(dict.fromkeys((row["dataset"], row["metric"]) for row in rows))
    value = {(row["model"], row["dataset"], row["metric"]): row["percent"] for row in rows}
    header = ["dataset", "metric", *models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset, metric in keys:
        cells = [value.get((model, dataset, metric)) for model in models]
        lines.append(
            f"| {dataset} | {metric} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |"
        )
    return "\n".join(lines)


def evaluate_run(config: PipelineConfig, evaluation: EvalConfig, folder: Path) -> list[dict[str, Any]]:
    """Evaluates the base model and every checkpoint; publishes and writes the scorecard."""
    results = {}
    evaluated = evaluated_models(config, folder)
    for label, weights in evaluated:
        request = EvalRequest(
            model=config.train.model,
            datasets=list(evaluation.datasets.items()),
            pretrained=weights,
            seed=config.train.seed,
            protocol=evaluation.protocol,
            templates=evaluation.templates,
            batch_size=evaluation.batch_size,
            device=evaluation.device,
        )
        results[label] = json_safe(evaluate_checkpoint.with_options(name=f"evaluate-{label}")(request))
    rows = scorecard_rows(results)
    scorecard = [
        {"model": label, "pretrained": weights, "results": results[label]} for label, weights in evaluated
    ]
    write_json(folder / "scorecard.json", {"models": scorecard, "rows": rows})
    create_table_artifact(
        key="rs5m-scorecard", table=rows, description="Base model vs each checkpoint, per dataset and metric"
    )
    print(scorecard_text(rows))
    return rows


@flow(name="train", log_prints=True)
def train_flow(config: PipelineConfig | str) -> str:
    """Fine-tunes as the config's `train:` section says (resuming a killed run); returns the run folder.
    `config` is the config or a config file's path."""
    return train_model(as_pipeline_config(config))


@flow(name="train_and_evaluate", log_prints=True)
def train_and_evaluate_flow(config: PipelineConfig | str) -> list[dict[str, Any]]:
    """Train, then evaluate the base model and every saved checkpoint on the `eval:` datasets: the scorecard
    (one row per model x dataset x metric, with the change against the base) as the `rs5m-scorecard` table
    artifact and train/<run>/scorecard.json. `config` is the config or a config file's path."""
    config = as_pipeline_config(config)
    if config.eval is None:
        raise ValueError("train_and_evaluate needs an `eval:` section (datasets to evaluate on)")
    folder = Path(train_model(config))
    return evaluate_run(config, config.eval, folder)
