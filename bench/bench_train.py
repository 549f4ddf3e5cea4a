"""Training speed of the project's GeoRSCLIP step (models/train.py) against a bare open_clip loop of the same
model, batch and dtype, in one process; best of --repeats, the order of the runs alternating between repeats.

  (a) bare: open_clip.create_model_and_transforms(model), AdamW over model.parameters(), open_clip's
      ClipLoss(), and per step autocast forward, loss, zero_grad, backward, step, over pre-made image and
      token tensors already on the device (what a hand-written loop does);
  (b) ours step: the same tensors through the project's step (models.train.optimizer_step, what _train calls)
      around its pieces: build_model (output_dict, the config's seed), AdamW over
      _param_groups (no decay on biases, norms, logit_scale, embeddings), cosine_lr (set every step),
      ClipLoss(local_loss, gather_with_grad, cache_labels), get_autocast, zero_grad(set_to_none), the
      logit_scale clamp, loss.item() and the metrics line written to a file (and the printed line, to
      /dev/null) every step; on CPU with torch.use_deterministic_algorithms(True), as train() sets there;
  (c) full train(): models.train.train() itself on a Parquet written like a release's part
      (WORKDIR/dataset/train/part-00000.parquet, columns image (JPEG bytes, uncompressed) and caption, row
      groups of storage.dataset.ROW_GROUP_ROWS) of the same images: its StepBatches read, decode and
      preprocess each batch in a DataLoader of --num-workers processes while the step runs. Timed from the end
      of step 1 to the end of the last step (on_step), so the model build, the data index, the loader's
      start-up and the final save are outside; needs --steps >= 2;
  (d) loading alone: the DataLoader over StepBatches as _train builds it, iterated without training (the
      ceiling the data path puts on (c)), timed from the first batch to the last.

Both models start from the same weights (random init from seed 0; pretrained is None), so the first-step losses
of (a) and (b) are printed side by side as a check. Images: RSSCN7's JPEGs (400x400) from ../shared when present,
else generated JPEGs of --side px; (a) and (b) use them preprocessed with the model's inference transform.
Printed: each run's ms per step, then the best ms per step and samples/s of each, (b)/(a) (target >= 0.9),
(c)/(a) and (d)/(a). On a CPU that other jobs share, --threads 1: with torch's default (a thread per core) a
step waits on threads that are descheduled, and step times of the same loop varied 30x from run to run
(2 cores, load 3-4); (c) and (d) also need cores for their loading processes to overlap with the step.

    .venv/bin/python bench/bench_train.py --threads 1                            # tiny model, CPU
    .venv/bin/python bench/bench_train.py --model ViT-B-32 --batch-size 16 --steps 3 --repeats 1 --threads 1
    .venv/bin/python bench/bench_train.py --model ViT-B-32 --batch-size 256 --steps 20 --precision bf16 \\
        --device cuda --num-workers 8                                            # a GPU
"""

from __future__ import annotations

from _common import SHARED_DATA, synchronize  # first: sys.path and the offline environment

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from open_clip.loss import ClipLoss
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr
from PIL import Image

from models.clip import register_project_configs
from models.train import (
    DataOrder,
    StepBatches,
    _param_groups,
    build_model,
    optimizer_step,
    read_pairs,
    train,
)
from rs5m.train_config import TrainConfig
from storage.dataset import ROW_GROUP_ROWS

RSSCN7 = SHARED_DATA / "rsscn7" / "images"


def jpeg_pairs(count: int, side: int) -> tuple[list[bytes], list[str], str]:
    """`count` (JPEG bytes, caption) pairs: RSSCN7's images repeated, or generated ones without ../shared."""
    files = sorted(RSSCN7.rglob("*.jpg")) if RSSCN7.is_dir() else []
    captions = [
        f"an aerial view of scene {i % 97} with {i % 13} buildings near a river" for i in range(count)
    ]
    if files:
        return [files[i % len(files)].read_bytes() for i in range(count)], captions, "RSSCN7 JPEGs, 400x400"
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        small = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        noise = rng.integers(-20, 20, (side, side, 3))
        big = np.asarray(Image.fromarray(small).resize((side, side), Image.BILINEAR), dtype=np.int64)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images, captions, f"generated JPEGs, {side}x{side}"


def write_release(root: Path, images: list[bytes], captions: list[str]) -> Path:
    """A dataset folder as a release lays it out (train/part-00000.parquet), image and caption columns only."""
    train_dir = root / "dataset" / "train"
    train_dir.mkdir(parents=True)
    table = pa.table({"image": pa.array(images, pa.binary()), "caption": captions})
    pq.write_table(
        table,
        train_dir / "part-00000.parquet",
        row_group_size=ROW_GROUP_ROWS,
        compression={"image": "none", "caption": "zstd"},
        use_dictionary=False,
    )
    return root / "dataset"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="rs5m-tiny-vit")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps of each timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, CUDA only"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--num-workers", type=int, default=2, help="loading processes of (c) and (d)")
    parser.add_argument("--side", type=int, default=256, help="generated images' side (without RSSCN7)")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default, one per core)"
    )
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the full path is timed from the end of step 1)")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    use_bf16 = args.precision == "bf16" and device.type == "cuda"
    if args.precision == "bf16" and not use_bf16:
        print("precision bf16 needs CUDA (autocast): measuring fp32 on this machine")
    precision = "bf16" if use_bf16 else "fp32"
    batch, steps = args.batch_size, args.steps
    register_project_configs()

    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    images, captions, described = jpeg_pairs(batch * steps, args.side)
    data = write_release(workdir, images, captions)

    def config(run_name: str) -> TrainConfig:
        return TrainConfig(
            run_name=run_name,
            model=args.model,
            data=str(data),
            batch_size=batch,
            steps=steps,
            lr=args.lr,
            precision=precision,
            device=device.type,
            num_workers=args.num_workers,
            checkpoint_every_steps=max(500, steps + 1),
        )

    # (b) the project's model, optimiser, schedule and loss
    ours_config = config("bench-step")
    model = build_model(ours_config, device)
    optimizer = torch.optim.AdamW(_param_groups(model, ours_config.weight_decay), lr=ours_config.lr)
    scheduler = cosine_lr(optimizer, ours_config.lr, ours_config.warmup_steps, steps * (args.repeats + 2))
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1)
    autocast = get_autocast("amp_bf16" if use_bf16 else "fp32", device_type=device.type)
    trainable = [p for p in model.net.parameters() if p.requires_grad]
    order = DataOrder(len(images), batch, ours_config.seed)
    net = model.net
    net.train()

    # (a) the bare model: the same seed, so the same initial weights
    torch.manual_seed(ours_config.seed)
    bare_model, _, preprocess = open_clip.create_model_and_transforms(args.model, device=device)
    bare_model.train()
    bare_optimizer = torch.optim.AdamW(
        bare_model.parameters(), lr=args.lr, weight_decay=ours_config.weight_decay
    )
    bare_loss = ClipLoss()
    bare_autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    )

    tokenizer = open_clip.get_tokenizer(args.model)
    pixels = torch.stack(
        [preprocess(Image.open(io.BytesIO(data_bytes)).convert("RGB")) for data_bytes in images]
    )
    pixels = pixels.reshape(steps, batch, *pixels.shape[1:]).to(device)
    tokens = tokenizer(captions).reshape(steps, batch, -1).to(device)

    def bare(count: int) -> float:
        for i in range(count):
            with bare_autocast:
                image_features, text_features, logit_scale = bare_model(pixels[i], tokens[i])
                loss = bare_loss(image_features, text_features, logit_scale)
            bare_optimizer.zero_grad()
            loss.backward()
            bare_optimizer.step()
        return loss.item()

    metrics = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - appended to until the end, as _train
    printed = open(os.devnull, "w")  # noqa: SIM115 - what _train's say() prints
    global_step = 0

    def ours(count: int) -> float:
        nonlocal global_step
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(device.type == "cpu")  # train() on CPU
        try:
            last = time.perf_counter()
            for i in range(count):
                step = global_step
                lr = scheduler(step)
                step_pixels = pixels[i].to(device, non_blocking=True)
                step_tokens = tokens[i].to(device, non_blocking=True)
                loss = optimizer_step(
                    model,
                    net,
                    loss_fn,
                    optimizer,
                    trainable,
                    step_pixels,
                    step_tokens,
                    autocast,
                    ours_config.max_grad_norm,
                )
                done = step + 1
                mean_loss = loss.detach().float()
                now = time.perf_counter()
                record = {
                    "step": done,
                    "epoch": order.position(step)[0],
                    "loss": mean_loss.item(),
                    "lr": lr,
                    "samples_per_s": batch / (now - last),
                }
                last = now
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                print(
                    f"step {done}/{steps} epoch {record['epoch']} loss {record['loss']:.4f} "
                    f"lr {lr:.3e} samples/s {record['samples_per_s']:.1f}",
                    file=printed,
                    flush=True,
                )
                global_step += 1
            return record["loss"]
        finally:
            torch.use_deterministic_algorithms(deterministic_before)

    full_runs = 0

    def full() -> float:
        """Seconds per step of train(), steps 2..N."""
        nonlocal full_runs
        full_runs += 1
        ends: list[float] = []
        with contextlib.redirect_stdout(io.StringIO()):
            train(
                config(f"bench-full-{full_runs}"), workdir, on_step=lambda _: ends.append(time.perf_counter())
            )
        return (ends[-1] - ends[0]) / (len(ends) - 1)

    def loading() -> float:
        """Seconds per batch of the DataLoader over StepBatches, batches 2..N."""
        loading_config = config("bench-loading")
        batches = StepBatches(
            read_pairs(loading_config, workdir),
            order,
            range(steps),
            0,
            1,
            model.transform,
            model.tokenizer,
            augmented=loading_config.augment != "none",
        )
        loader = torch.utils.data.DataLoader(
            batches,
            batch_size=None,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),
        )
        ends = []
        for step_pixels, step_tokens in loader:
            step_pixels.to(device, non_blocking=True)
            step_tokens.to(device, non_blocking=True)
            synchronize(device)
            ends.append(time.perf_counter())
        return (ends[-1] - ends[0]) / (len(ends) - 1)

    def per_step(run, count: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        run(count)
        synchronize(device)
        return (time.perf_counter() - start) / count

    # warm-up (first calls allocate) on batch 0: the same weights, so the same loss
    first_bare, first_ours = bare(1), ours(1)
    cases = ("bare", "ours", "full", "loading")
    best = dict.fromkeys(cases, math.inf)
    for repeat in range(args.repeats):
        for case in cases if repeat % 2 == 0 else reversed(cases):
            if case == "bare":
                seconds = per_step(bare, steps)
            elif case == "ours":
                seconds = per_step(ours, steps)
            elif case == "full":
                seconds = full()
            else:
                seconds = loading()
            best[case] = min(best[case], seconds)
            print(f"  repeat {repeat} {case:8s} {1000 * seconds:9.1f} ms/step", flush=True)
    metrics.close()
    printed.close()

    print(
        f"model {args.model} (random init, {precision} on {device}, {torch.get_num_threads()} threads), "
        f"batch {batch}, {steps} steps per run, best of {args.repeats}; Parquet of {len(images)} {described}, "
        f"{args.num_workers} loading workers"
    )
    names = {
        "bare": "(a) bare open_clip loop",
        "ours": "(b) ours: the project's step",
        "full": "(c) full train() from Parquet",
        "loading": "(d) loading alone",
    }
    for case in cases:
        print(f"  {names[case]:32s} {1000 * best[case]:9.1f} ms/step  {batch / best[case]:9.2f} samples/s")
    print(f"first-step loss (same weights, same batch): bare {first_bare:.6f}, ours {first_ours:.6f}")
    print(f"ours step / bare (samples/s): {best['bare'] / best['ours']:.2f}x   (target >= 0.9)")
    print(f"full train() / bare:          {best['bare'] / best['full']:.2f}x")
    print(f"loading alone / bare:         {best['bare'] / best['loading']:.2f}x")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
