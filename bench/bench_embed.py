"""Benchmark: the embed stage from a shard's JPEG bytes against a bare loop of the same model.

Baseline: in the main process, for each batch, PIL decode + open_clip's preprocessing, stack, encode_image,
L2-normalise, float16 (what a notebook would write). Candidates, same model, batch size and dtype: the
stage's image encoding (ClipEncoder.encode_images: its persistent PIL decode processes on CPU, nvjpeg on a
GPU), the like-for-like comparison; the PIL decode through a torch DataLoader whose workers are forked anew
for every call (what the encoder did before; it can hang when called from threads, not in this
single-threaded script); and the whole embed stage (tasks.embed.embed_shard), which also embeds every caption
and computes the perceptual hash in a thread pool beside the encoder. Images/s and ratios are printed (run
order alternates; medians over --repeats), then the perceptual hash alone, serial and through the stage's pool:
the ceiling the hash puts on the stage (it matters on a GPU, where the encoder is fast).

First, the cost of one call on a small shard (--small-shard images): the encoder's first call, which starts
its decode processes (once per encoder; the first encoder of a process also starts multiprocessing's
forkserver, which imports torch and open_clip), then its later calls, against the bare loop, the forked
DataLoader and a DataLoader with forkserver workers (started again for every call, the dataset pickled to each).

CPU (the issue's setting): ViT-B-32, random weights, 512 images. On a GPU machine run it from the source tree
with --device cuda --precision bf16 and compare with STACK_NOTES (PIL DataLoader 1.6k img/s, nvjpeg 12.1k).
"""

from __future__ import annotations

from _common import SHARED_DATA  # first: sys.path and the offline environment

import argparse
import io
import statistics
import time

import numpy as np

RSSCN7 = SHARED_DATA / "rsscn7" / "images"


def jpeg_bytes(count: int) -> list[bytes]:
    """Real RSSCN7 JPEGs (400x400) repeated to `count`, or generated ones when ../shared is absent."""
    files = sorted(RSSCN7.rglob("*.jpg")) if RSSCN7.is_dir() else []
    if files:
        return [files[i % len(files)].read_bytes() for i in range(count)]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def encode_pixels(encoder, pixels) -> np.ndarray:
    import torch

    with torch.inference_mode():
        features = encoder.model.encode_image(pixels.to(encoder.device, dtype=encoder.dtype)).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy().astype(np.float16)


def bare_loop(encoder, images: list[bytes], batch_size: int) -> np.ndarray:
    import torch
    from PIL import Image

    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [
            encoder.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
            for data in images[start : start + batch_size]
        ]
        chunks.append(encode_pixels(encoder, torch.stack(batch)))
    return np.concatenate(chunks)


class _ImageBytes:
    """A map-style dataset: image bytes -> open_clip's preprocessed tensor (the encoder's PIL decode)."""

    def __init__(self, images: list[bytes], preprocess, image_size: tuple[int, int]) -> None:
        self.images, self.preprocess, self.image_size = images, preprocess, image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        import torch

        from models.clip import decode_pil_batch

        pixels, _ = decode_pil_batch([self.images[index]], self.preprocess, self.image_size)
        return torch.from_numpy(pixels[0])


def dataloader_loop(
    encoder, images: list[bytes], batch_size: int, num_workers: int, context: str | None = None
) -> np.ndarray:
    """The encoder's PIL path before the decode processes: a DataLoader per call, workers forked (context None)
    or started by `context`, two batches per worker in flight."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _ImageBytes(images, encoder.preprocess, encoder.image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers > 0 else None,
        multiprocessing_context=context if num_workers > 0 else None,
    )
    return np.concatenate([encode_pixels(encoder, pixels) for pixels in loader])


def small_shard_costs(encoder, images: list[bytes], batch_size: int, num_workers: int) -> None:
    n = len(images)
    start = time.perf_counter()
    reference = encoder.encode_images(images, batch_size=batch_size)
    first = time.perf_counter() - start
    costs = {
        "encoder, later calls (the same decode processes)": lambda: encoder.encode_images(
            images, batch_size=batch_size
        ),
        "encoder, decoding in the calling process (num_workers 0)": lambda: encoder.encode_images(
            images, batch_size=batch_size, num_workers=0
        ),
        "bare loop": lambda: bare_loop(encoder, images, batch_size),
    }
    if num_workers > 0:
        costs["DataLoader, workers forked per call"] = lambda: dataloader_loop(
            encoder, images, batch_size, num_workers
        )
        costs["DataLoader, forkserver workers per call"] = lambda: dataloader_loop(
            encoder, images, batch_size, num_workers, "forkserver"
        )
        # the forkserver DataLoader's first call may start the server: not what a later call costs
        assert np.array_equal(costs["DataLoader, forkserver workers per call"](), reference)
    seconds: dict[str, list[float]] = {name: [] for name in costs}
    for _ in range(5):  # round robin: load from other processes spreads over every case
        for name, call in costs.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    print(f"one call on a {n}-image shard (median of 5):")
    print(f"  {'encoder, first call (starts its decode processes)':58s} {first:7.3f} s")
    for name in costs:
        print(f"  {name:58s} {statistics.median(seconds[name]):7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--num-workers", type=int, default=2, help="the encoder's PIL decode processes (CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--small-shard", type=int, default=64, help="images of the per-call cost measurement (0: skip it)"
    )
    args = parser.parse_args()

    import pyarrow as pa

    from models.clip import ClipSpec, load_clip
    from models.perceptual_hash import dct_hash
    from storage.schemas import VALIDATE_SCHEMA
    from tasks.embed import HASH_THREADS, embed_shard, hash_pool

    images = jpeg_bytes(args.images)
    n = len(images)
    table = pa.table(
        {
            "sample_id": [f"s{i:06d}" for i in range(n)],
            "source": ["bench"] * n,
            "url": [f"http://example.org/{i}.jpg" for i in range(n)],
            "caption": ["an aerial view of farmland"] * n,
            "extra": [None] * n,
            "matched_keyword": ["aerial view"] * n,
            "image": images,
            "sha256": [""] * n,
            "width": [400] * n,
            "height": [400] * n,
            "image_format": ["JPEG"] * n,
        }
    ).cast(VALIDATE_SCHEMA)
    spec = ClipSpec(model=args.model, precision=args.precision, device=args.device, seed=0)
    encoder = load_clip(spec, num_workers=args.num_workers)
    print(
        f"{args.model} random weights, {args.precision} on {encoder.device}, {n} JPEGs, batch {args.batch_size}, "
        f"stage decoder {encoder.decoder} with {args.num_workers} workers"
    )
    bare_loop(encoder, images[: args.batch_size], args.batch_size)  # warm-up: first-call allocations
    if args.small_shard and encoder.decoder == "pil":
        small_shard_costs(encoder, images[: args.small_shard], args.batch_size, args.num_workers)
        with load_clip(spec, num_workers=args.num_workers) as another:
            start = time.perf_counter()
            another.encode_images(images[: args.small_shard], batch_size=args.batch_size)
            print(
                f"  {'another encoder, first call (the forkserver already runs)':58s} "
                f"{time.perf_counter() - start:7.3f} s"
            )
    else:
        encoder.encode_images(images[: args.batch_size], batch_size=args.batch_size)  # starts its processes

    cases = (
        ("bare", "dataloader", "encoder", "stage")
        if encoder.decoder == "pil"
        else ("bare", "encoder", "stage")
    )
    times: dict[str, list[float]] = {case: [] for case in cases}
    for repeat in range(args.repeats):
        for case in cases if repeat % 2 == 0 else reversed(cases):
            start = time.perf_counter()
            if case == "bare":
                bare = bare_loop(encoder, images, args.batch_size)
            elif case == "dataloader":
                forked = dataloader_loop(encoder, images, args.batch_size, args.num_workers)
            elif case == "encoder":
                encoded = encoder.encode_images(images, batch_size=args.batch_size)
            else:
                outcome = embed_shard(table, encoder, batch_size=args.batch_size)
            times[case].append(time.perf_counter() - start)
            print(f"  repeat {repeat} {case:7s} {times[case][-1]:8.2f} s  {n / times[case][-1]:8.1f} img/s")
    agreement = float(np.min(np.sum(bare.astype(np.float32) * encoded.astype(np.float32), axis=1)))
    assert np.array_equal(encoded, outcome.arrays["image"])
    median = {case: statistics.median(times[case]) for case in cases}
    if "dataloader" in cases:
        assert np.array_equal(encoded, forked)
        print(
            f"median img/s: forked DataLoader (before) {n / median['dataloader']:.1f}; encoder/DataLoader "
            f"throughput {median['dataloader'] / median['encoder']:.2f}"
        )
    print(
        f"median img/s: bare loop {n / median['bare']:.1f}, stage image encoding {n / median['encoder']:.1f}, "
        f"whole embed stage (images + captions + phash) {n / median['stage']:.1f}"
    )
    print(
        f"image encoding stage/bare throughput: {median['bare'] / median['encoder']:.2f}; whole stage/bare: "
        f"{median['bare'] / median['stage']:.2f}; min cosine between the two image paths: {agreement:.5f}"
    )
    start = time.perf_counter()
    for data in images:
        dct_hash(data)
    serial = time.perf_counter() - start
    start = time.perf_counter()
    list(hash_pool().map(dct_hash, images))
    pooled = time.perf_counter() - start
    print(
        f"perceptual hash alone: serial {n / serial:.0f} img/s, the stage's pool of "
        f"{HASH_THREADS} threads {n / pooled:.0f} img/s"
    )


if __name__ == "__main__":
    main()
