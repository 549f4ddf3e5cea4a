"""CLIP image and caption embeddings through open_clip's model registry.

`load_clip(ClipSpec(...))` builds an open_clip model from one of three weight sources:
  - a hub tag of open_clip's pretrained registry (`ViT-B-32` / `laion2b_s34b_b79k`), downloaded by open_clip
    into the Hugging Face cache (fails with `ClipWeightsUnavailableError` offline when not cached);
  - a local checkpoint file (GeoRSCLIP releases are open_clip state dicts);
  - random initialisation seeded by `ClipSpec.seed` (tests, benchmarks).
The project's own architectures in models/configs/*.json (for instance the tiny `rs5m-tiny-vit`) are registered
with open_clip before any lookup, so every name resolves the same way.

Images are decoded one of two ways (`decoder=`):
  - "pil": PIL decode and open_clip's own preprocess, in `num_workers` decode processes (or in this process when
    0). The processes are started once per encoder and reused by every call (`DecodePool`); they are never
    forked from this process: the stage tasks call the encoder from threads, and a fork copies locks that other
    threads hold (importlib's module locks, logging's) into a child that waits on them for ever. They come
    from multiprocessing's forkserver (a single-threaded server started with fork+exec, which preloads this
    module), or from spawn where there is no forkserver;
  - "torchvision": torchvision.io.decode_jpeg on the model's device (nvjpeg batch decode on CUDA, libjpeg on CPU)
    followed by the same resize / centre crop / normalise as tensor ops on that device; images that are not JPEG
    or that the JPEG decoder rejects go through PIL.
"auto" picks "torchvision" on CUDA and "pil" on CPU.

No prefect import here: this module runs from a source tree on GPU machines that only have torch and open_clip.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from models.placement import TORCH_DTYPES, DeviceChoice, Precision, check_placement, resolve_device
from rs5m import forkserver

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

Decoder = Literal["auto", "pil", "torchvision"]
# Views of an image encode_images can embed besides the image itself. They are applied to the preprocessed
# square (resize of the short side, centre crop, normalise), which equals preprocessing the rotated or flipped
# image: a quarter turn or a flip maps the centre crop onto the centre crop of the turned image.
ImageView = Literal["rot0", "rot90", "rot180", "rot270", "hflip", "vflip"]
ROTATIONS: tuple[ImageView, ...] = ("rot0", "rot90", "rot180", "rot270")

_JPEG_MAGIC = b"\xff\xd8\xff"

Progress = Callable[[int], None]


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
        check_placement(self.precision, self.device)

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
        return resolve_device(self.device)


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

    num_workers: decode processes of the PIL path, started by the first encode_images call and kept by the
    encoder (0 decodes in the calling process).
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


def _pil_open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_pil_batch(
    images: Sequence[bytes], preprocess, image_size: tuple[int, int]
) -> tuple[np.ndarray, list[int]]:
    """PIL decode + open_clip's own preprocess of each image -> ((n, 3, H, W) float32, positions PIL could not
    decode; their rows are zeros). The decode processes and the in-process path (num_workers=0) both run this."""
    pixels = np.zeros((len(images), 3, *image_size), dtype=np.float32)
    undecodable = []
    for position, data in enumerate(images):
        try:
            image = _pil_open(data)
        except (OSError, ValueError, Image.DecompressionBombError):
            undecodable.append(position)
            continue
        pixels[position] = preprocess(image).numpy()
    return pixels, undecodable


class DecodeWorkerDiedError(BrokenProcessPool):
    """A decode process died (killed, out of memory, a crash in a native decoder) while encode_images waited."""


# the decode process's state, set once by its initializer
_worker_preprocess = None
_worker_image_size: tuple[int, int] = (0, 0)
_OWNER_POLL_SECONDS = 1.0
_WAIT_POLL_SECONDS = 1.0
# how long a dead decode process may go unnoticed by concurrent.futures before the caller gives up on it
_DEAD_PROCESS_GRACE_SECONDS = 3.0


def _init_decode_process(preprocess, image_size: tuple[int, int], owner_pid: int) -> None:
    global _worker_preprocess, _worker_image_size
    _worker_preprocess, _worker_image_size = preprocess, image_size
    # Ctrl-C reaches the whole process group: the owner decides what stops, and it stops the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one core per process, as torch's DataLoader workers do (ToTensor/Normalize would start intra-op threads)
    torch.set_num_threads(1)
    threading.Thread(
        target=_exit_when_orphaned, args=(owner_pid,), name="rs5m-decode-watch", daemon=True
    ).start()


def _decode_in_worker(images: list[bytes]) -> tuple[np.ndarray, list[int]]:
    return decode_pil_batch(images, _worker_preprocess, _worker_image_size)


def _exit_when_orphaned(owner_pid: int) -> None:
    """Ends a decode process whose owner is gone (SIGKILL, a crash): nothing would ever send it work or the stop
    sentinel. Not the parent pid: a forkserver child's parent is the server, which outlives the owner while any
    of its children hold the server's pipe."""
    while _process_alive(owner_pid):
        time.sleep(_OWNER_POLL_SECONDS)
    os._exit(0)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs (macOS): the signal check above is all there is
    return state not in (b"Z", b"X")  # a zombie is dead, only not yet reaped


def _decode_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one (rs5m/forkserver.py): its server is started by fork+exec and is
    single-threaded, it imports the main module and this one (torch, open_clip, PIL) once, and each process
    forked from it starts in milliseconds; spawn elsewhere. Either way, as for every spawn-like start (and
    img2dataset), a script that encodes at import time needs an `if __name__ == "__main__":` guard."""
    if forkserver.available():
        return forkserver.context()
    return multiprocessing.get_context("spawn")


def _exit_description(pid: int, code: int | None) -> str:
    if code is None:
        return f"pid {pid} still running"
    if code < 0:
        try:
            return f"pid {pid} killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"pid {pid} killed by signal {-code}"
    return f"pid {pid} exited with status {code}"


class DecodePool:
    """`workers` processes that decode image bytes with PIL and apply `preprocess`; started on first use and
    kept until close(), so every call (every shard) reuses them. Safe to submit to from several threads."""

    def __init__(self, workers: int, preprocess, image_size: tuple[int, int]) -> None:
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=_decode_context(),
            initializer=_init_decode_process,
            initargs=(preprocess, image_size, os.getpid()),
        )
        self._died_lock = threading.Lock()
        self._exits: str | None = None
        _LIVE_POOLS.add(self)
        _stop_pools_before_exit()

    def submit(self, images: list[bytes]) -> Future[tuple[np.ndarray, list[int]]]:
        return self._executor.submit(_decode_in_worker, images)

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stops the processes: pieces not started are cancelled, the running ones finish. With a timeout, the
        processes still busy after it (stuck in a decoder) are killed."""
        # concurrent.futures keeps no public record of its processes: read its internals, best effort
        processes = dict(getattr(self._executor, "_processes", None) or {})
        manager = getattr(self._executor, "_executor_manager_thread", None)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if not wait or manager is None or manager is threading.current_thread():
            return
        manager.join(timeout)
        if manager.is_alive():
            for process in processes.values():
                with contextlib.suppress(ValueError, OSError):  # already closed or gone
                    process.kill()
            manager.join(timeout)

    def process_ids(self) -> list[int]:
        # concurrent.futures keeps no public record of its processes: read its internals
        processes = getattr(self._executor, "_processes", None) or {}
        return list(processes)

    def has_dead_process(self) -> bool:
        processes = dict(getattr(self._executor, "_processes", None) or {})
        return any(process.exitcode is not None for process in processes.values())

    def died(self, what: str) -> DecodeWorkerDiedError:
        """The error to raise once this pool is broken (a process died), saying which processes ended how.
        Stops the pool (the executor has already stopped the other processes). Every caller gets the same."""
        with self._died_lock:
            if self._exits is None:
                # concurrent.futures keeps no public record of its processes: read its internals, best effort
                processes = dict(getattr(self._executor, "_processes", None) or {})
                manager = getattr(self._executor, "_executor_manager_thread", None)
                self._executor.shutdown(wait=False, cancel_futures=True)
                if manager is not None and manager is not threading.current_thread():
                    # it terminates and reaps the other processes: every exit code is known once it ends
                    manager.join(timeout=2)
                    if manager.is_alive():
                        # stuck reading half a result (the process died while sending it): the other
                        # processes hold the pipe open; ending them gives the manager its end of file
                        for process in processes.values():
                            with contextlib.suppress(ValueError, OSError):
                                process.kill()
                        manager.join(timeout=10)
                codes = {pid: process.exitcode for pid, process in processes.items()}
                exits = "; ".join(_exit_description(pid, code) for pid, code in codes.items())
                self._exits = exits or "exit codes unknown"
                if any(code is not None and code > 0 for code in codes.values()):
                    self._exits += (
                        "; a Python error is on stderr. A process that fails as it starts usually could not "
                        "import the main module, which each one imports: run scripts from a file, with their "
                        'work under `if __name__ == "__main__":`'
                    )
        return DecodeWorkerDiedError(
            f"a PIL decode process of the CLIP encoder died while {what} ({self._exits}). Once one dies the "
            "pool stops the others (SIGTERM) and this call returns no embeddings; the encoder's next call starts "
            "new decode processes. If it repeats, look for the kernel's OOM killer (`dmesg`) or an image that "
            "crashes the decoder, or decode in the calling process with clip.num_workers: 0"
        )


class _DecodePools:
    """An encoder's decode pools, one per worker count asked for (normally just clip.num_workers)."""

    def __init__(self, preprocess, image_size: tuple[int, int]) -> None:
        self._preprocess = preprocess
        self._image_size = image_size
        self._pools: dict[int, DecodePool] = {}
        self._lock = threading.Lock()

    def get(self, workers: int) -> DecodePool:
        with self._lock:
            pool = self._pools.get(workers)
            if pool is None:
                pool = self._pools[workers] = DecodePool(workers, self._preprocess, self._image_size)
            return pool

    def process_ids(self) -> list[int]:
        with self._lock:
            return [pid for pool in self._pools.values() for pid in pool.process_ids()]

    def discard(self, pool: DecodePool) -> None:
        with self._lock:
            if self._pools.get(pool.workers) is pool:
                del self._pools[pool.workers]

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close(wait=wait, timeout=timeout)


def _result(future: Future, pool: DecodePool):
    """future.result(), waking every second: a thread blocked in a wait without a timeout never sees an exception
    raised into it asynchronously (a stall watchdog's ShardStalled); one in a timed wait takes it at once.
    Raises BrokenProcessPool when a process of `pool` has been dead for a while and the future is still
    pending: concurrent.futures never notices a process killed while it was writing its result (its manager
    thread waits for the rest of that message for ever)."""
    dead_since: float | None = None
    while True:
        try:
            return future.result(timeout=_WAIT_POLL_SECONDS)
        except TimeoutError:
            if future.done():
                raise
            if pool.has_dead_process():
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since > _DEAD_PROCESS_GRACE_SECONDS:
                    raise BrokenProcessPool("a decode process died without the pool noticing") from None


_LIVE_POOLS: weakref.WeakSet[DecodePool] = weakref.WeakSet()
_EXIT_GRACE_SECONDS = 5.0


@functools.cache
def _stop_pools_before_exit() -> None:
    """At interpreter exit, concurrent.futures waits for every running piece without a time limit, so a decode
    process stuck in a decoder would keep a finished (or watchdog-stopped) run from ever exiting. This hook
    runs first (threading runs its exit hooks newest first) and kills what is still busy after a grace time."""
    register = getattr(threading, "_register_atexit", None)  # private, as concurrent.futures' own hook is
    if register is not None:
        with contextlib.suppress(RuntimeError):  # the interpreter is already shutting down
            register(_stop_live_pools)


def _stop_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close(wait=True, timeout=_EXIT_GRACE_SECONDS)


def _pieces(total: int, batch_size: int, piece: int) -> deque[tuple[int, int]]:
    """[start, end) ranges of at most `piece` items that never cross a multiple of batch_size."""
    ranges: deque[tuple[int, int]] = deque()
    for batch_start in range(0, total, batch_size):
        batch_end = min(batch_start + batch_size, total)
        ranges.extend(
            (start, min(start + piece, batch_end)) for start in range(batch_start, batch_end, piece)
        )
    return ranges


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


def apply_view(pixels: torch.Tensor, view: ImageView) -> torch.Tensor:
    """(n, C, H, W) -> the same images turned counter-clockwise (rot90: a quarter turn) or mirrored."""
    quarter_turns = {"rot0": 0, "rot90": 1, "rot180": 2, "rot270": 3}
    if view in quarter_turns:
        return torch.rot90(pixels, quarter_turns[view], dims=(-2, -1))
    if view == "hflip":
        return torch.flip(pixels, dims=(-1,))
    if view == "vflip":
        return torch.flip(pixels, dims=(-2,))
    raise ValueError(f"unknown image view {view!r}; known: rot0, rot90, rot180, rot270, hflip, vflip")


def _embeddings(features: torch.Tensor, normalize: bool) -> np.ndarray:
    """The model's output rows as numpy: L2-normalised float16, or (normalize=False) the raw float32 features."""
    if normalize:
        return nnf.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float16)
    return features.float().cpu().numpy()


def _embedding_dtype(normalize: bool) -> type[np.floating]:
    return np.float16 if normalize else np.float32


class ClipEncoder:
    """A loaded CLIP model; encodes image bytes and captions to L2-normalised float16 embeddings (or, with
    normalize=False, to the model's raw float32 features, as zero-shot evaluation protocols need).

    With decoder "pil" and num_workers > 0 it owns decode processes, started by the first encode_images call and
    reused by every later one (a 64-image shard does not pay their start-up). They stop at close(), when the
    encoder is garbage-collected, or at interpreter exit. Calls from several threads are safe (they share the
    processes; each call's results stay in its own input order)."""

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
        self.dtype = TORCH_DTYPES[spec.precision]
        self.preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
        if decoder == "torchvision" and not tensor_preprocess_supported(self.preprocess_cfg):
            logger.info("%s has no tensor path: decoding with PIL", self.preprocess_cfg)
            decoder = "pil"
        self.decoder = decoder
        size = self.preprocess_cfg.size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.embed_dim = int(open_clip.get_model_config(spec.model)["embed_dim"])
        self._decode_pools = _DecodePools(preprocess, self.image_size)
        # not a method of self: the finaliser must not keep the encoder alive
        weakref.finalize(self, self._decode_pools.close, False)

    def close(self, timeout: float | None = None) -> None:
        """Stops the decode processes: waits for the pieces they are decoding, at most `timeout` seconds when
        given (then kills them). The encoder stays usable: a later call starts new ones."""
        self._decode_pools.close(wait=True, timeout=timeout)

    def __enter__(self) -> ClipEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @torch.inference_mode()
    def encode_images(
        self,
        images: Sequence[bytes],
        batch_size: int = 256,
        *,
        num_workers: int | None = None,
        progress: Progress | None = None,
        views: Sequence[ImageView] | None = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """JPEG/PNG/... bytes -> (n, embed_dim) float16, L2-normalised rows, input order; with `views`,
        (n, len(views), embed_dim): each image decoded and preprocessed once, then embedded as each view
        (apply_view), all views of a batch in one forward pass. normalize=False returns the model's raw
        features as float32 instead (no normalisation; same shapes).

        Raises UndecodableImageError naming every undecodable input after the whole pass (the validate stage
        drops those before this one, so this is a data-integrity error, not a per-sample drop), and
        DecodeWorkerDiedError (a BrokenProcessPool) if a decode process dies meanwhile.
        num_workers: decode processes for this call (default: the encoder's); 0 decodes in this process.
        progress: called after each encoded batch with its number of images (a heartbeat).
        """
        for view in views or ():
            apply_view(torch.zeros(1, 1, 1, 1), view)  # an unknown view fails before any work
        encode = functools.partial(self._encode_pixels, views=tuple(views or ("rot0",)), normalize=normalize)
        if len(images) == 0:
            empty = (0, self.embed_dim) if views is None else (0, len(views), self.embed_dim)
            return np.empty(empty, dtype=_embedding_dtype(normalize))
        if self.decoder == "pil":
            workers = self.num_workers if num_workers is None else num_workers
            chunks, undecodable = self._encode_images_pil(images, batch_size, workers, progress, encode)
        else:
            chunks, undecodable = self._encode_images_tensor(images, batch_size, progress, encode)
        if undecodable:
            raise UndecodableImageError(undecodable, len(images))
        embeddings = np.concatenate(chunks)
        return embeddings[:, 0] if views is None else embeddings

    def _encode_pixels(
        self, pixels: torch.Tensor, views: tuple[ImageView, ...], normalize: bool
    ) -> np.ndarray:
        """(n, 3, H, W) preprocessed -> (n, len(views), embed_dim)."""
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        batch = pixels if views == ("rot0",) else torch.cat([apply_view(pixels, view) for view in views])
        embedded = _embeddings(self.model.encode_image(batch), normalize)
        return embedded.reshape(len(views), len(pixels), -1).transpose(1, 0, 2)

    def _encode_images_pil(
        self,
        images: Sequence[bytes],
        batch_size: int,
        workers: int,
        progress: Progress | None,
        encode: Callable[[torch.Tensor], np.ndarray],
    ) -> tuple[list[np.ndarray], list[int]]:
        chunks: list[np.ndarray] = []
        undecodable: list[int] = []
        if workers == 0:
            for start in range(0, len(images), batch_size):
                pixels, failed = decode_pil_batch(
                    images[start : start + batch_size], self.preprocess, self.image_size
                )
                undecodable.extend(start + i for i in failed)
                chunks.append(encode(torch.from_numpy(pixels)))
                _report(progress, len(pixels))
            return chunks, undecodable
        pool = self._decode_pools.get(workers)
        # a batch goes out in up to `workers` pieces, so even a one-batch shard spreads over every process; about
        # two pieces per process are in flight, so they decode the next batch while the model encodes this one
        pieces = _pieces(len(images), batch_size, math.ceil(batch_size / workers))
        in_flight: deque[tuple[int, Future]] = deque()
        batch_start = batch_end = 0
        try:
            for batch_start in range(0, len(images), batch_size):
                batch_end = min(batch_start + batch_size, len(images))
                parts = []
                while pieces or in_flight:
                    while pieces and len(in_flight) < 2 * workers:
                        start, end = pieces.popleft()
                        in_flight.append((start, pool.submit(list(images[start:end]))))
                    if in_flight[0][0] >= batch_end:
                        break
                    start, future = in_flight.popleft()
                    pixels, failed = _result(future, pool)
                    parts.append(pixels)
                    undecodable.extend(start + i for i in failed)
                batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
                chunks.append(encode(torch.from_numpy(batch)))
                _report(progress, batch_end - batch_start)
        except BrokenProcessPool as error:
            self._decode_pools.discard(pool)
            what = f"decoding images {batch_start}-{batch_end - 1} of the {len(images)} of this call"
            raise pool.died(what) from error
        finally:
            for _, future in in_flight:
                future.cancel()
        return chunks, undecodable

    def decode_process_ids(self) -> list[int]:
        """The process ids of this encoder's decode processes (diagnostics: py-spy dump, a watchdog's report)."""
        return self._decode_pools.process_ids()

    def _encode_images_tensor(
        self,
        images: Sequence[bytes],
        batch_size: int,
        progress: Progress | None,
        encode: Callable[[torch.Tensor], np.ndarray],
    ) -> tuple[list[np.ndarray], list[int]]:
        chunks, undecodable = [], []
        for start in range(0, len(images), batch_size):
            decoded, failed = decode_to_uint8(images[start : start + batch_size], self.device)
            undecodable.extend(start + i for i in failed)
            # undecodable slots get a black image so rows stay aligned; the caller raises before returning them
            black = torch.zeros((3, *self.image_size), dtype=torch.uint8, device=self.device)
            tensors = [black if t is None else t for t in decoded]
            chunks.append(encode(resize_crop_normalise(tensors, self.preprocess_cfg, self.dtype)))
            _report(progress, len(decoded))
        return chunks, undecodable

    @torch.inference_mode()
    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int = 1024,
        *,
        progress: Progress | None = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """Captions -> (n, embed_dim) float16, L2-normalised rows (open_clip tokenizer, truncated to context);
        normalize=False returns the model's raw features as float32 instead (no normalisation).

        progress: called after each encoded batch with its number of captions (a heartbeat).
        """
        chunks = [np.empty((0, self.embed_dim), dtype=_embedding_dtype(normalize))]
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            tokens = self.tokenizer(batch).to(self.device)
            chunks.append(_embeddings(self.model.encode_text(tokens), normalize))
            _report(progress, len(batch))
        return np.concatenate(chunks)


def _report(progress: Progress | None, done: int) -> None:
    if progress is not None:
        progress(done)
