"""Zero-shot classification speed of models.evaluation.evaluate against a bare encode loop of the same model
(random weights, seed 0) over the same files, in one process; best of --repeats, the order of the runs
alternating between repeats.

  (a) bare images: in the main process, per batch of --batch-size files, PIL open + convert("RGB") + the
      model's open_clip preprocess, stack, model.encode_image under inference_mode (what a notebook writes);
  (b) ours, images: the image part of evaluate (evaluation._encode_image_files, which evaluate calls): the
      files' bytes through ClipEncoder.encode_images, PIL decode and the same preprocess in --workers
      decode processes (started once, by a warm-up call, as an evaluation run's first dataset does);
  (c) ours, prompts: the prompt part, ClipEncoder.encode_texts of the 105 RS5M templates x classes prompts;
  (d) evaluate(): the whole call on the folder: reading it (ImageFolder's order), (b), (c), the zero-shot
      weights and the metrics;
  (e) bare total: (a) plus the same prompts through the tokenizer and model.encode_text in batches: what a
      script computing the same classifier must encode too.
Images: --classes class folders of --images-per-class generated JPEGs (--side px) in a temporary folder.
Printed: each run's seconds, then the best seconds and images/s of each (images counted; prompts are extra work
in (c), (d) and (e)), (b)/(a) (target >= 0.9), (d)/(e) (target >= 0.9), the prompts' share of (d), and the
largest difference between (a)'s and (b)'s image features (they run the same preprocess and model).

    .venv/bin/python bench/bench_eval.py --threads 1                     # tiny model, CPU
    .venv/bin/python bench/bench_eval.py --model ViT-B-32 --device cuda --precision bf16 --workers 8 \\
        --images-per-class 400 --batch-size 256                         # a GPU (ours decodes with nvjpeg)

On a CPU that other jobs share, --threads 1 keeps torch's threads from waiting on descheduled ones (see
bench_train.py).
"""

from __future__ import annotations

from _common import synchronize  # first: sys.path and the offline environment

import argparse
import io
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.clip import ClipSpec, load_clip
from models.evaluation import (
    _encode_image_files,
    evaluate,
    fill_template,
    load_templates,
    rs5m_classname,
)

CLASS_NAMES = [
    "Dense_Residential",
    "Farmland",
    "Forest",
    "Industrial",
    "Parking",
    "River_Lake",
    "Grassland",
    "Airport",
    "Beach",
    "Desert",
]


def write_class_folders(root: Path, classes: int, per_class: int, side: int) -> list[str]:
    """classes x per_class JPEGs (smooth random scenes plus grain, quality 90) under root/<class>/."""
    rng = np.random.default_rng(0)
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"Class_{i}" for i in range(classes)]
    for name in names:
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            small = rng.integers(0, 255, (max(1, side // 8), max(1, side // 8), 3), dtype=np.uint8)
            big = np.asarray(Image.fromarray(small).resize((side, side), Image.BILINEAR), dtype=np.int64)
            grain = rng.integers(-20, 20, (side, side, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
            (folder / f"{index:05d}.jpg").write_bytes(buffer.getvalue())
    return names


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="rs5m-tiny-vit")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--images-per-class", type=int, default=40)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="ClipEncoder's decode processes (PIL path)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default, one per core)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        classnames = write_class_folders(root, args.classes, args.images_per_class, args.side)
        files = sorted(root.rglob("*.jpg"))
        templates = load_templates()
        prompts = [
            fill_template(template, rs5m_classname(name)) for name in classnames for template in templates
        ]
        encoder = load_clip(
            ClipSpec(model=args.model, precision=args.precision, device=args.device, seed=0),
            num_workers=args.workers,
        )
        model, preprocess, device, dtype = encoder.model, encoder.preprocess, encoder.device, encoder.dtype
        batch = args.batch_size

        def bare_images() -> np.ndarray:
            chunks = []
            with torch.inference_mode():
                for start in range(0, len(files), batch):
                    pixels = torch.stack(
                        [preprocess(Image.open(path).convert("RGB")) for path in files[start : start + batch]]
                    )
                    chunks.append(model.encode_image(pixels.to(device, dtype)).float().cpu().numpy())
            return np.concatenate(chunks)

        def bare_total() -> None:
            bare_images()
            with torch.inference_mode():
                for start in range(0, len(prompts), batch):
                    tokens = encoder.tokenizer(prompts[start : start + batch]).to(device)
                    model.encode_text(tokens).float().cpu().numpy()

        def ours_images() -> np.ndarray:
            return _encode_image_files(encoder, files, batch, lambda _: None)

        def ours_prompts() -> None:
            encoder.encode_texts(prompts, batch, normalize=False)

        def ours_evaluate() -> None:
            evaluate(encoder, [("bench", root)], "rs5m", templates, batch)

        # warm-up: the first call starts the decode processes; first forward passes allocate
        reference = bare_images()
        difference = float(np.abs(ours_images() - reference).max())
        scale = float(np.abs(reference).max())
        runs = {
            "bare": bare_images,
            "images": ours_images,
            "prompts": ours_prompts,
            "evaluate": ours_evaluate,
            "bare_total": bare_total,
        }
        best = dict.fromkeys(runs, math.inf)
        for repeat in range(args.repeats):
            for case in runs if repeat % 2 == 0 else reversed(runs):
                synchronize(device)
                start = time.perf_counter()
                runs[case]()
                synchronize(device)
                seconds = time.perf_counter() - start
                best[case] = min(best[case], seconds)
                print(f"  repeat {repeat} {case:10s} {seconds:8.3f} s", flush=True)
        encoder.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = len(files)
    print(
        f"model {args.model} (random init, {args.precision} on {device}, {torch.get_num_threads()} threads), "
        f"{args.classes} classes x {args.images_per_class} JPEGs {args.side}px = {n} images, "
        f"{len(prompts)} prompts ({len(templates)} templates), batch {batch}, decoder {encoder.decoder} with "
        f"{args.workers} workers, best of {args.repeats}"
    )
    names = {
        "bare": "(a) bare images",
        "images": "(b) ours: evaluate's image part",
        "prompts": "(c) ours: evaluate's prompt part",
        "evaluate": "(d) evaluate() total",
        "bare_total": "(e) bare images + prompts",
    }
    for case, name in names.items():
        count, unit = (len(prompts), "prompts/s") if case == "prompts" else (n, "images/s")
        print(f"  {name:34s} {best[case]:8.3f} s  {count / best[case]:8.1f} {unit}")
    print(f"image part / bare images (images/s): {best['bare'] / best['images']:.2f}x   (target >= 0.9)")
    print(
        f"evaluate() / bare images + prompts:  {best['bare_total'] / best['evaluate']:.2f}x   (target >= 0.9)"
    )
    print(f"prompts' share of evaluate():        {best['prompts'] / best['evaluate']:.1%}")
    print(f"largest |(a) - (b)| image feature:   {difference:.2e} (largest |feature| {scale:.2e})")


if __name__ == "__main__":
    main()
