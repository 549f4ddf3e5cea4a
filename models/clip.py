"""CLIP image and caption embeddings through open_clip's model registry.

`load_clip(ClipSpec(...))` builds an open_clip model from one of three weight sources:
  - a hub tag of open_clip's pretrained registry (`ViT-B-32` / `laion2b_s34b_b79k`), downloaded by open_clip
    into the Hugging Face cache (fails with `ClipWeightsUnavailableError` offline when not cached);
  - a local checkpoint file (GeoRSCLIP releases are open_clip state dicts);
  - random initialisation seeded by `ClipSpec.seed` (tests, benchmarks).
The project's own architectures in models/configs/*.json (for instance the tiny `rs5m-tiny-vit`) are registered
with open_clip before any lookup, so every name resolves the same way.

Images are decoded one of two ways (`decoder=`):
  - "pil": a torch DataLoader whose worker processes decode with PIL and apply open_clip's own preprocess;
  - "torchvision": torchvision.io.decode_jpeg on the model's device (nvjpeg batch decode on CUDA, libjpeg on CPU)
    followed by the same resize / centre crop / normalise as tensor ops on that device; images that are not JPEG
    or that the JPEG decoder rejects go through PIL.
"auto" picks "torchvision" on CUDA and "pil" on CPU.

No prefect import here: this module runs from a source tree on GPU machines that only have torch and open_clip.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from open_clip.pretrained import download_pretrained
from open_clip.transform import PreprocessCfg
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

Precision = Literal["fp32", "bf16", "fp16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
Decoder = Literal["auto", "pil", "torchvision"]

_TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_JPEG_MAGIC = b"\xff\xd8\xff"


class ClipWeightsUnavailableError(RuntimeError):
    """A hub tag's weights are neither in the local cache nor downloadable (offline, no network)."""


class UndecodableImageError(ValueError):
    """Some inputs of encode_images could not be decoded; `indices` lists every one of them (input positions)."""

    def __init__(self, indices: list[int], total: int) -> None:
        self.indices = indices
        shown = ", ".join(map(str, indices[:20])) + (", ..." if len(indices) > 20 else "")
        super().__init__(
            f"{len(indices)} of {total} images could not be decoded (positions {shown}); "
            "drop them (the validate stage should already have) and encode the rest"
        )


@functools.cache
def register_project_configs() -> None:
    """Adds models/configs/*.json to open_clip's registry (once per process: add_model_config rescans)."""
    open_clip.add_model_config(CONFIG_DIR)


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so a rewritten checkpoint is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP model to load and how to run it.

    pretrained: None (random init with `seed`), an open_clip hub tag of `model` (see
    `open_clip.list_pretrained_tags_by_model(model)`), or the path of a local checkpoint file.
    """

    model: str = "ViT-B-32"
    pretrained: str | None = None
    precision: Precision = "fp32"
    device: DeviceChoice = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in _TORCH_DTYPES:
            raise ValueError(f"precision must be one of {sorted(_TORCH_DTYPES)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    @property
    def source(self) -> Literal["random", "checkpoint", "hub"]:
        if self.pretrained is None:
            return "random"
        if os.path.isfile(self.pretrained):
            return "checkpoint"
        register_project_configs()
        if self.pretrained in open_clip.list_pretrained_tags_by_model(self.model):
            return "hub"
        if self.model not in open_clip.list_models():
            raise ValueError(unknown_model_message(self.model))
        raise ValueError(
            f"pretrained={self.pretrained!r} is neither a file nor an open_clip tag of {self.model}; "
            f"tags: {open_clip.list_pretrained_tags_by_model(self.model)}"
        )

    def identity(self) -> str:
        """What determines the weights, for stage fingerprints (precision and device are not part of it)."""
        source = self.source
        if source == "hub":
            return f"{self.model}:{self.pretrained}"
        if source == "checkpoint":
            return f"{self.model}:sha256:{file_sha256(self.pretrained)}"
        return f"{self.model}:random-init:{self.seed}:config-sha256:{_config_sha256(self.model)}"

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _config_sha256(model: str) -> str:
    register_project_configs()
    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(unknown_model_message(model))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def unknown_model_message(model: str) -> str:
    close = difflib.get_close_matches(model, open_clip.list_models(), n=3, cutoff=0.5)
    suggestion = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"unknown open_clip model {model!r}{suggestion}; list them with "
        "`python -c 'import open_clip; print(open_clip.list_models())'` (the project's own are in models/configs/)"
    )


def _download_hint(model: str, tag: str) -> str:
    cfg = open_clip.get_pretrained_cfg(model, tag)
    hub_repo = (cfg.get("hf_hub") or "").rstrip("/")
    fetch = (
        f"`huggingface-cli download {hub_repo}`"
        if hub_repo
        else f"download {cfg.get('url') or '(no URL known)'}"
    )
    return (
        f"On a machine with internet, fill the Hugging Face cache with "
        f"`python -c \"import open_clip; open_clip.create_model_and_transforms('{model}', pretrained='{tag}')\"` "
        f"(or {fetch}) and copy the cache (HF_HOME) here, or point at the checkpoint file itself: "
        f"`clip.pretrained: /path/to/checkpoint` in the pipeline config, ClipSpec(pretrained='/path/to/checkpoint') "
        f"in Python."
    )


def ensure_loadable(spec: ClipSpec, cache_dir: str | None = None) -> None:
    """Raises, with what to do, unless load_clip(spec) can build the model: a known architecture, a checkpoint
    file or hub tag that resolves, hub weights that are cached or downloadable (they are downloaded now), and
    the device. Cheap apart from that download, so a pipeline checks it before any stage runs."""
    spec.identity()  # the architecture and the weight source resolve
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("clip.device is 'cuda' but torch.cuda.is_available() is False on this machine")
    if spec.source != "hub":
        return
    try:
        download_pretrained(open_clip.get_pretrained_cfg(spec.model, spec.pretrained), cache_dir=cache_dir)
    except (OSError, RuntimeError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the download failed (no network?)"
        raise ClipWeightsUnavailableError(
            f"weights for {spec.model} / {spec.pretrained} are not in the local cache and {why}. "
            f"{_download_hint(spec.model, spec.pretrained)} Cause: {err}"
        ) from err


def load_clip(
    spec: ClipSpec,
    *,
    num_workers: int = 2,
    decoder: Decoder = "auto",
    cache_dir: str | None = None,
) -> ClipEncoder:
    """Builds the model of `spec` in eval mode, weights cast to spec.precision (no autocast).

    num_workers: DataLoader worker processes of the PIL decode path (0 decodes in this process).
    cache_dir: where open_clip looks for / downloads hub weights (default: the Hugging Face cache).
    """
    register_project_configs()
    ensure_loadable(spec, cache_dir)
    device = spec.resolved_device()
    pretrained = None if spec.source == "random" else spec.pretrained
    # open_clip's "bf16"/"fp16" cast Linear/Conv/attention weights and keep LayerNorms in fp32 (OpenAI-style)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model,
            pretrained=pretrained,
            precision=spec.precision,
            device=device,
            cache_dir=cache_dir,
        )
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.model)
    if decoder == "auto":
        decoder = "torchvision" if device.type == "cuda" else "pil"
    return ClipEncoder(
        spec=spec,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        num_workers=num_workers,
        decoder=decoder,
    )


class _PilImageDataset(Dataset):
    """Encoded image bytes -> (preprocessed tensor, decoded?) with open_clip's own PIL preprocess."""

    def __init__(self, images: Sequence[bytes], preprocess, image_size: tuple[int, int]) -> None:
        self.images = images
        self.preprocess = preprocess
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            image = _pil_open(self.images[index])
        except (OSError, ValueError, Image.DecompressionBombError):
            return torch.zeros((3, *self.image_size)), False
        return self.preprocess(image), True


def _pil_open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _pil_to_uint8_chw(data: bytes) -> torch.Tensor:
    rgb = np.asarray(_pil_open(data).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _decode_jpegs(data: torch.Tensor | list[torch.Tensor], device: torch.device):
    if device.type == "cuda":
        # torchvision's CUDA decoder writes into allocator blocks that kernels queued on the caller's stream may
        # still read (corrupts on H100s, pytorch/vision#9606): drain the stream first
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_to_uint8(
    images: Sequence[bytes], device: torch.device
) -> tuple[list[torch.Tensor | None], list[int]]:
    """Decodes to RGB uint8 CHW tensors on `device`: JPEGs in one decode_jpeg batch (nvjpeg on CUDA), the rest
    and any JPEG the batch decoder rejects with PIL. Returns (tensors, positions that nothing could decode)."""
    decoded: list[torch.Tensor | None] = [None] * len(images)
    jpeg_positions = [i for i, data in enumerate(images) if data[:3] == _JPEG_MAGIC]
    if jpeg_positions:
        buffers = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpeg_positions]
        try:
            batch = _decode_jpegs(buffers, device)
        except RuntimeError:
            # the batch call fails as a whole on one bad JPEG: retry one by one, PIL below takes the rest
            batch = []
            for buffer in buffers:
                try:
                    batch.append(_decode_jpegs(buffer, device))
                except RuntimeError:
                    batch.append(None)
        for position, tensor in zip(jpeg_positions, batch, strict=True):
            decoded[position] = tensor
    undecodable = []
    for position, tensor in enumerate(decoded):
        if tensor is not None:
            continue
        try:
            decoded[position] = _pil_to_uint8_chw(images[position]).to(device, non_blocking=True)
        except (OSError, ValueError, Image.DecompressionBombError):
            undecodable.append(position)
    return decoded, undecodable


def tensor_preprocess_supported(cfg: PreprocessCfg) -> bool:
    """Whether resize_crop_normalise reproduces open_clip's inference preprocess for `cfg` (square 'shortest'
    crops and 'squash'; 'longest' pads and non-square 'shortest' uses open_clip's ResizeKeepRatio)."""
    square = isinstance(cfg.size, int) or cfg.size[0] == cfg.size[1]
    return cfg.resize_mode == "squash" or (cfg.resize_mode == "shortest" and square)


def resize_crop_normalise(
    images: Sequence[torch.Tensor], cfg: PreprocessCfg, dtype: torch.dtype
) -> torch.Tensor:
    """open_clip's inference preprocess as tensor ops on the images' device: uint8 CHW tensors of any sizes ->
    normalised (N, 3, H, W) batch. Resizing runs once per distinct input size (img2dataset output is mostly
    one size), on uint8 like PIL, then crops, then normalises in fp32."""
    if not tensor_preprocess_supported(cfg):
        raise ValueError(f"{cfg} is not reproduced by the tensor path; use decoder='pil'")
    height, width = (cfg.size, cfg.size) if isinstance(cfg.size, int) else tuple(cfg.size)
    interpolation = (
        InterpolationMode.BILINEAR if cfg.interpolation == "bilinear" else InterpolationMode.BICUBIC
    )
    device = images[0].device
    out = torch.empty((len(images), 3, height, width), dtype=torch.uint8, device=device)
    positions_by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for position, image in enumerate(images):
        positions_by_shape[tuple(image.shape)].append(position)
    for positions in positions_by_shape.values():
        group = torch.stack([images[p] for p in positions])
        if cfg.resize_mode == "squash":
            group = tvf.resize(group, [height, width], interpolation=interpolation, antialias=True)
        else:
            # shortest side to the target, as torchvision's Resize(int) does on PIL images in open_clip
            group = tvf.resize(group, [height], interpolation=interpolation, antialias=True)
            group = tvf.center_crop(group, [height, width])
        out[torch.tensor(positions, device=device)] = group
    mean = torch.tensor(cfg.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = out.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return pixels.to(dtype)


def _normalised_float16(features: torch.Tensor) -> np.ndarray:
    return nnf.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float16)


class ClipEncoder:
    """A loaded CLIP model; encodes image bytes and captions to L2-normalised float16 embeddings."""

    def __init__(
        self,
        *,
        spec: ClipSpec,
        model: torch.nn.Module,
        preprocess,
        tokenizer,
        device: torch.device,
        num_workers: int,
        decoder: Literal["pil", "torchvision"],
    ) -> None:
        if decoder not in ("pil", "torchvision"):
            raise ValueError(f"decoder must be 'auto', 'pil' or 'torchvision', got {decoder!r}")
        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.num_workers = num_workers
        self.dtype = _TORCH_DTYPES[spec.precision]
        self.preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
        if decoder == "torchvision" and not tensor_preprocess_supported(self.preprocess_cfg):
            logger.info("%s has no tensor path: decoding with PIL", self.preprocess_cfg)
            decoder = "pil"
        self.decoder = decoder
        size = self.preprocess_cfg.size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.embed_dim = int(open_clip.get_model_config(spec.model)["embed_dim"])

    @torch.inference_mode()
    def encode_images(
        self, images: Sequence[bytes], batch_size: int = 256, *, num_workers: int | None = None
    ) -> np.ndarray:
        """JPEG/PNG/... bytes -> (n, embed_dim) float16, L2-normalised rows, input order.

        Raises UndecodableImageError naming every undecodable input after the whole pass (the validate stage
        drops those before this one, so this is a data-integrity error, not a per-sample drop).
        """
        if len(images) == 0:
            return np.empty((0, self.embed_dim), dtype=np.float16)
        if self.decoder == "pil":
            workers = self.num_workers if num_workers is None else num_workers
            chunks, undecodable = self._encode_images_pil(images, batch_size, workers)
        else:
            chunks, undecodable = self._encode_images_tensor(images, batch_size)
        if undecodable:
            raise UndecodableImageError(undecodable, len(images))
        return np.concatenate(chunks)

    def _encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        return _normalised_float16(self.model.encode_image(pixels))

    def _encode_images_pil(
        self, images: Sequence[bytes], batch_size: int, num_workers: int
    ) -> tuple[list[np.ndarray], list[int]]:
        loader = DataLoader(
            _PilImageDataset(images, self.preprocess, self.image_size),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            # two batches per worker in flight keeps the model busy without holding many decoded batches
            prefetch_factor=2 if num_workers > 0 else None,
        )
        chunks, undecodable = [], []
        offset = 0
        for pixels, decoded in loader:
            undecodable.extend(offset + i for i in torch.nonzero(~decoded).flatten().tolist())
            chunks.append(self._encode_pixels(pixels))
            offset += len(decoded)
        return chunks, undecodable

    def _encode_images_tensor(
        self, images: Sequence[bytes], batch_size: int
    ) -> tuple[list[np.ndarray], list[int]]:
        chunks, undecodable = [], []
        for start in range(0, len(images), batch_size):
            decoded, failed = decode_to_uint8(images[start : start + batch_size], self.device)
            undecodable.extend(start + i for i in failed)
            # undecodable slots get a black image so rows stay aligned; the caller raises before returning them
            black = torch.zeros((3, *self.image_size), dtype=torch.uint8, device=self.device)
            tensors = [black if t is None else t for t in decoded]
            chunks.append(
                self._encode_pixels(resize_crop_normalise(tensors, self.preprocess_cfg, self.dtype))
            )
        return chunks, undecodable

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        """Captions -> (n, embed_dim) float16, L2-normalised rows (open_clip tokenizer, truncated to context)."""
        chunks = [np.empty((0, self.embed_dim), dtype=np.float16)]
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            chunks.append(_normalised_float16(self.model.encode_text(tokens)))
        return np.concatenate(chunks)
