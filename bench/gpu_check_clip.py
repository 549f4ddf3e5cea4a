"""GPU check of models/clip.py: JPEG bytes -> CLIP image embeddings, nvjpeg path vs PIL DataLoader path.

Builds --n synthetic JPEGs (smooth random textures, --size px square, like img2dataset's 256 px output), loads
--model with random weights cast to --precision, then times, best of --repeats after one warm-up batch:
  (a) decoder="torchvision": torchvision.io.decode_jpeg batch decode on the GPU (nvjpeg) + resize/crop/normalise
      on the GPU;
  (b) decoder="pil": a DataLoader with --workers PIL worker processes and open_clip's preprocess;
  (c) the model alone on already preprocessed pixels (the ceiling for both).
It also prints the cosine agreement of (a) and (b). Needs torch, torchvision and open_clip_torch only (no prefect);
run from the repository root:

    python bench/gpu_check_clip.py                       # H100: ViT-B-32, bf16, 2048 images
    python bench/gpu_check_clip.py --cpu-smoke           # anywhere: tiny model on CPU, checks the script runs

Without CUDA (and without --cpu-smoke) it prints why and exits 0 without measuring.
"""

from __future__ import annotations

import _common  # noqa: F401 - the repository on sys.path, the offline environment

import argparse
import io
import os
import sys
import time
from collections.abc import Callable

import numpy as np


def synthetic_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def best_rate(run: Callable[[], object], count: int, repeats: int, synchronize: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--n", type=int, default=2048, help="synthetic JPEGs")
    parser.add_argument("--size", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 64 images, fp32, on CPU")
    args = parser.parse_args()

    import torch

    if args.cpu_smoke:
        args.model, args.precision, args.n, args.batch_size, args.repeats = "rs5m-tiny-vit", "fp32", 64, 32, 1
        args.workers = min(args.workers, 2)
        device = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check_clip: no CUDA device (torch.cuda.is_available() is False): nothing measured.")
        print("Run it on a GPU machine, or pass --cpu-smoke to check that the script itself works.")
        return 0
    else:
        device = "cuda"

    from models.clip import ClipSpec, decode_to_uint8, load_clip, resize_crop_normalise

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}")
    started = time.perf_counter()
    images = synthetic_jpegs(args.n, args.size)
    mean_kib = sum(map(len, images)) / len(images) / 1024
    print(
        f"{args.n} synthetic {args.size}px JPEGs ({mean_kib:.0f} KiB mean) in {time.perf_counter() - started:.1f} s"
    )

    spec = ClipSpec(args.model, precision=args.precision, device=device, seed=0)
    nvjpeg = load_clip(spec, decoder="torchvision")
    pil = load_clip(spec, decoder="pil", num_workers=args.workers)
    pil.model = nvjpeg.model  # one copy of the weights on the GPU
    print(
        f"model {spec.identity()} precision {args.precision}, batch {args.batch_size}, PIL workers {args.workers}"
    )

    warm_up = images[: args.batch_size]
    nvjpeg.encode_images(warm_up, args.batch_size)
    pil.encode_images(warm_up, args.batch_size)

    def run_nvjpeg() -> np.ndarray:
        return nvjpeg.encode_images(images, args.batch_size)

    def run_pil() -> np.ndarray:
        return pil.encode_images(images, args.batch_size)

    # a fixed preprocessed batch: what the model alone sustains
    decoded, _ = decode_to_uint8(warm_up, nvjpeg.device)
    pixels = resize_crop_normalise(decoded, nvjpeg.preprocess_cfg, nvjpeg.dtype)

    def run_model_only() -> None:
        with torch.inference_mode():
            for _ in range(0, args.n, args.batch_size):
                nvjpeg.model.encode_image(pixels)

    rates = {
        "nvjpeg decode + GPU preprocess + encode": best_rate(run_nvjpeg, args.n, args.repeats, synchronize),
        "PIL DataLoader + open_clip preprocess + encode": best_rate(
            run_pil, args.n, args.repeats, synchronize
        ),
        "model only (preprocessed batch reused)": best_rate(
            run_model_only, args.n, args.repeats, synchronize
        ),
    }
    for name, rate in rates.items():
        print(f"{name:>48}: {rate:10.0f} img/s")

    a, b = run_nvjpeg().astype(np.float32), run_pil().astype(np.float32)
    cosines = (a * b).sum(axis=1)
    print(f"cosine(nvjpeg path, PIL path): min {cosines.min():.4f}, mean {cosines.mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
