"""The `evaluate` flow: `rs5m eval` as a Prefect flow (same inputs), its results as a table artifact.

One task per model evaluated (it loads the model once and runs every dataset): evaluation is a batch job over
whole datasets, never one task per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from rs5m.eval_cli import EvalRequest, json_safe, run_evaluation


def result_rows(results: list[dict[str, Any]], label: str | None = None) -> list[dict[str, Any]]:
    """One row per model x dataset x metric, percent with two decimals (as RS5M's README prints them)."""
    rows = []
    for result in json_safe(results):
        for metric, value in result["metrics"].items():
            rows.append(
                {
                    **({"model": label} if label else {"model": result["model"]}),
                    "dataset": result["dataset"],
                    "task": result["task"],
                    "metric": metric,
                    "percent": None if value is None else round(100 * value, 2),
                }
            )
    return rows


@task(name="evaluate-model")
def evaluate_model(request: EvalRequest) -> list[dict[str, Any]]:
    return run_evaluation(request)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    model: str,
    datasets: dict[str, str],
    pretrained: str | None = None,
    seed: int = 0,
    protocol: Literal["rs5m", "clip_benchmark"] = "rs5m",
    templates: str | None = None,
    output: str | None = None,
    batch_size: int = 64,
    device: Literal["auto", "cpu", "cuda"] = "auto",
) -> list[dict[str, Any]]:
    """Zero-shot classification (folders of class folders) and retrieval (filename,caption CSVs) of one
    open_clip model; `datasets` maps a name to its path."""
    from models.evaluation import format_table
    from storage.atomic import write_json

    request = EvalRequest(
        model=model,
        datasets=list(datasets.items()),
        pretrained=pretrained,
        seed=seed,
        protocol=protocol,
        templates=templates,
        batch_size=batch_size,
        device=device,
    )
    results = evaluate_model(request)
    print(format_table(results))
    create_table_artifact(
        key="rs5m-eval", table=result_rows(results), description=f"Evaluation of {model} ({pretrained})"
    )
    if output:
        write_json(Path(output), json_safe(results))
    return results
