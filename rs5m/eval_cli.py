"""`rs5m eval`: zero-shot classification and image-text retrieval of any open_clip model (models/evaluation.py).

    rs5m eval --model ARCH [--pretrained TAG_OR_PATH] [--seed N] --dataset NAME=PATH [--dataset NAME=PATH ...]
              [--protocol rs5m|clip_benchmark] [--templates FILE] [--output results.json]

PATH a folder of class folders: zero-shot classification; PATH a CSV with `filename,caption` columns: retrieval.
Bad input (a path, an empty folder, a CSV without its columns, an undecodable image, an unknown model): one
line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate: the inputs of `rs5m eval` and of the `evaluate` flow."""

    model: str
    datasets: list[tuple[str, str]]
    pretrained: str | None = None
    seed: int = 0
    protocol: Literal["rs5m", "clip_benchmark"] = "rs5m"
    templates: str | None = None  # None: RS5M's 105 templates
    batch_size: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: int = field(default=2)


def run_evaluation(request: EvalRequest, progress=None) -> list[dict[str, Any]]:
    """Loads the model and evaluates it on every dataset; each result names the model and its weights.
    Raises ValueError (EvalDataError, an unknown model, bad templates) or ClipWeightsUnavailableError with a
    one-line message on bad input, before any image is encoded."""
    from models.clip import ClipSpec, ensure_loadable, load_clip
    from models.evaluation import evaluate, load_templates, read_classification_folder, read_retrieval_csv

    names = [name for name, _ in request.datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique: {', '.join(names)}")
    for _, path in request.datasets:  # the data first: a typo in a path should not wait for a model load
        reader = read_retrieval_csv if Path(path).suffix.lower() == ".csv" else read_classification_folder
        reader(path)
    templates = load_templates(request.templates)
    spec = ClipSpec(
        model=request.model,
        pretrained=request.pretrained,
        precision=request.precision,
        device=request.device,
        seed=request.seed,
    )
    ensure_loadable(spec)
    with load_clip(spec, num_workers=request.num_workers) as encoder:
        results = evaluate(
            encoder, request.datasets, request.protocol, templates, request.batch_size, progress=progress
        )
    return [{**result, "model": request.model, "pretrained": request.pretrained} for result in results]


def json_safe(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NaN (acc5 of a set with fewer than five classes, as clip_benchmark reports it) as null: valid JSON."""
    return [
        {
            **result,
            "metrics": {
                name: None if isinstance(value, float) and math.isnan(value) else value
                for name, value in result["metrics"].items()
            },
        }
        for result in results
    ]


def _dataset(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name.strip(), path.strip()


def add_eval_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "eval",
        help="zero-shot classification and image-text retrieval of an open_clip model",
        description="Evaluates an open_clip model: a folder of class folders is a zero-shot classification "
        "set, a CSV with filename,caption columns a retrieval set (README: Evaluation).",
    )
    parser.add_argument(
        "--model", required=True, help="open_clip architecture (ViT-B-32, rs5m-tiny-vit, ...)"
    )
    parser.add_argument(
        "--pretrained", help="open_clip tag or checkpoint file (a GeoRSCLIP .pt); default: random weights"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (no --pretrained)")
    parser.add_argument(
        "--dataset",
        action="append",
        type=_dataset,
        required=True,
        metavar="NAME=PATH",
        help="a folder of class folders (classification) or a filename,caption CSV (retrieval); repeatable",
    )
    parser.add_argument("--protocol", choices=["rs5m", "clip_benchmark"], default="rs5m")
    parser.add_argument("--templates", help="prompt templates, one per line with {} (default: RS5M's 105)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.set_defaults(handler=cmd_eval)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from models.clip import ClipWeightsUnavailableError
    from models.evaluation import format_table
    from storage.atomic import write_json

    request = EvalRequest(
        model=args.model,
        datasets=args.dataset,
        pretrained=args.pretrained,
        seed=args.seed,
        protocol=args.protocol,
        templates=args.templates,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
    )
    try:
        results = run_evaluation(request)
    except (OSError, ValueError, RuntimeError, ClipWeightsUnavailableError) as error:
        print(f"rs5m eval: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(results))
    if args.output:
        write_json(Path(args.output), json_safe(results))
        print(f"results written to {args.output}")
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
