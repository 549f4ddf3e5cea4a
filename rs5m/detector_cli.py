"""`rs5m train-detector`: fit the linear-probe RS detector the filter stage can use (filter.detector: NAME)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_train_detector_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "train-detector",
        help="train a linear-probe remote-sensing detector on CLIP image embeddings",
        description="Embeds two image folders with the config's CLIP model, fits a logistic regression and "
        "saves it as WORKDIR/detectors/NAME.json; set `filter: {detector: NAME}` to use it.",
    )
    parser.add_argument("--workdir", required=True, help="pipeline work directory")
    parser.add_argument("--name", required=True, help="detector name (letters, digits, '_', '.', '-')")
    parser.add_argument("--positives", required=True, help="folder of remote-sensing images (recursive)")
    parser.add_argument("--negatives", required=True, help="folder of other images (recursive)")
    parser.add_argument(
        "--config", help="pipeline config whose `clip` section names the model (default: ClipConfig())"
    )
    parser.add_argument("--heldout-fraction", type=float, default=0.2, help="share held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.set_defaults(handler=cmd_train_detector)
    return parser


def cmd_train_detector(args: argparse.Namespace) -> int:
    from models.clip import ClipWeightsUnavailableError
    from models.rs_detector import check_detector_name, save_detector, train_detector
    from rs5m.config import ClipConfig, load_config
    from storage.layout import Layout
    from tasks.embed import shared_encoder

    try:
        name = check_detector_name(args.name)
        clip = load_config(args.config).clip if args.config else ClipConfig()
        detector = train_detector(
            Path(args.positives),
            Path(args.negatives),
            shared_encoder(clip).encoder,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            batch_size=clip.batch_size,
        )
    except (OSError, ValueError, ClipWeightsUnavailableError) as error:
        # what the user gave (folders, fraction, model, config) is wrong: say it in one line
        print(f"rs5m train-detector: {error}", file=sys.stderr)
        return 2
    path = Layout(Path(args.workdir)).detector(name)
    save_detector(detector, path)
    stats = detector.stats
    print(
        f"model {detector.model_identity}\n"
        f"images: {stats['n_positive']} positive, {stats['n_negative']} negative "
        f"({stats['n_train']} fitted, {stats['n_heldout']} held out)\n"
        f"accuracy: train {stats['train_accuracy']:.3f}, held-out {stats['heldout_accuracy']:.3f}"
    )
    if stats["skipped_files"]:
        print(f"skipped {len(stats['skipped_files'])} undecodable file(s), listed in the detector file")
    print(f"saved {path}\nuse it with `filter: {{detector: {name}}}` in the pipeline config")
    return 0
