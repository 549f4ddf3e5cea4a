"""GeoRSCLIP fine-tuning: open_clip's contrastive training on the released dataset, resumable, under torchrun.

    python -m models.train --config RUN.json --workdir WORKDIR                            one process
    torchrun --standalone --nproc_per_node N -m models.train --config RUN.json --workdir WORKDIR

RUN.json holds a `rs5m.train_config.TrainConfig`. From Python, `launch(config, workdir)` checks the inputs
(`check_training_inputs`: before any process starts), writes RUN.json and runs one of those commands, streaming
its output line by line.

Outputs, WORKDIR/train/<run_name>/ (`TrainLayout`):
    run.json                          {"model", "pretrained", "method", "config", "data", "data_fingerprint",
                                       "pairs", "steps_per_epoch", "total_steps", "world_size", "status"
                                       (running | complete), "final" (once complete)}
    launch.json                       the config of the latest `launch` (the file --config names)
    metrics.jsonl                     one line per optimiser step: {"step", "epoch", "loss", "lr", "samples_per_s"}
    checkpoints/step-000050.pt        weights after step 50: a plain open_clip state dict (LoRA merged in)
    checkpoints/step-000050.state.pt  what resuming from step 50 needs (below); written after the .pt
    checkpoints/final.pt              the trained weights (plain open_clip state dict)
    .train.lock                       held by the trainer (rank 0) while it runs
Every file is written atomically (storage.atomic): a checkpoint is complete when its state file exists.
Use the weights with `register_project_configs(); model = open_clip.create_model(ARCH);
model.load_state_dict(torch.load(path))` (no peft needed), or as `pretrained:` of a further run.

Step n (1-based) trains on batch n-1 of the data order: epoch e = (n-1) // steps_per_epoch, batch b within it.
Epoch e's order is a permutation of all pairs drawn from (seed, e); each global batch is batch_size consecutive
pairs of it (the remainder of an epoch is dropped), and rank r of W takes the r-th of W equal slices. Each image's
augmentation is drawn from (seed, epoch, pair), so the data a step sees does not depend on num_workers, on which
process loads it, or on where a run was resumed.

Resume: rerunning the same command continues from the newest complete checkpoint. Its state file holds the step,
the data position (epoch, batch), the optimiser's state (the learning rate is a function of the step:
open_clip_train's cosine_lr; there is no GradScaler, bf16 autocast needs none), every rank's RNG states (python,
numpy, torch CPU and CUDA), and for LoRA the whole peft model (peft merges and unmerges the attention adapters
into nn.MultiheadAttention's frozen weights around every forward pass, which moves them by rounding, so the base
weights are state too). On CPU the resumed run's
weights equal an uninterrupted run's bit for bit: fixed seeds, torch.use_deterministic_algorithms, and data that
depends only on the step. metrics.jsonl is cut back to the resumed step, so it reads as if uninterrupted.

From open_clip / open_clip_train: model, transforms and tokenizer (factory), ClipLoss with features gathered
across processes (gather_with_grad, local_loss), cosine_lr, get_autocast, init_distributed_device_so (torchrun's
env://, NCCL on CUDA, gloo on CPU), the weight-decay exemptions of its main (plus the model's no_weight_decay
names), the logit_scale clamp. Written here because open_clip_train lacks it: reading the released Parquet (or a
CSV) with a deterministic, resumable order; RS5M's augmentation; peft LoRA with merged saves; checkpoints that
resume exactly (open_clip_train resumes at epoch boundaries and keeps no RNG state); input checks before launch.

No prefect import: this module runs on GPU machines that only have torch, open_clip and peft.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torchvision.transforms as T
from filelock import FileLock, Timeout
from open_clip.loss import ClipLoss
from open_clip_train.distributed import init_distributed_device_so
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr
from PIL import Image
from pydantic import ValidationError
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.clip import (
    ClipSpec,
    _process_alive,
    ensure_loadable,
    register_project_configs,
    unknown_model_message,
)
from rs5m.train_config import TrainConfig
from storage.atomic import atomic_path, remove_temporaries, write_json, write_text
from storage.layout import TrainLayout

REPO_ROOT = Path(__file__).resolve().parents[1]
# Set by `launch` for the processes it starts: they end themselves (their whole process group) when the
# launcher is gone, so a launcher killed with SIGKILL leaves no trainer running on.
LAUNCHER_PID_ENV = "RS5M_TRAIN_LAUNCHER_PID"
STATE_FORMAT = 1
# Row groups of image bytes each loading process keeps: small data sets stay in memory after the first epoch,
# large ones read a row group per image at worst (a global shuffle has no locality).
ROW_GROUP_CACHE_BYTES = 512 << 20
# Tags that keep the shuffling and the augmentation streams of one seed apart.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 1, 2
_LORA_MODULE_TYPES = (nn.Linear, nn.MultiheadAttention)

StepCallback = Callable[[dict[str, Any]], None]


class TrainingInputError(ValueError):
    """Training cannot start with these inputs (data, model, device, an earlier run under the same name); the
    message is one line that says what and where."""


# ---------------------------------------------------------------------------------------------------------------
# Data: the (image, text) pairs and the order they are trained in


@dataclass(frozen=True)
class Pairs:
    """The (image, text) pairs of a training set, in a fixed order; images are read when a batch needs them.

    Parquet (a released dataset's train/*.parquet): one pair per row with a non-empty `caption_column`, then,
    per row, one per non-empty value of each `extra_caption_columns` entry (file by file, in file order).
    `locations` rows are (part, row group, row in group). CSV: the same per row, `locations` rows are (row,)
    and `files[row]` is the image's path (relative paths resolve against the CSV's folder).
    """

    source: Path
    kind: Literal["parquet", "csv"]
    files: tuple[str, ...]
    locations: np.ndarray
    texts: pa.Array
    fingerprint: str

    def __len__(self) -> int:
        return len(self.texts)

    def describe(self, index: int) -> str:
        """Where pair `index`'s image is, in words (error messages)."""
        if self.kind == "csv":
            return self.files[int(self.locations[index, 0])]
        part, group, row = (int(v) for v in self.locations[index])
        return f"{self.files[part]} row group {group} row {row}"


def data_path(config: TrainConfig, workdir: Path) -> Path:
    """The dataset a run reads: `config.data`, or WORKDIR/dataset (the pipeline's current release)."""
    return Path(config.data) if config.data is not None else Path(workdir) / "dataset"


def read_pairs(config: TrainConfig, workdir: Path) -> Pairs:
    """Indexes the training pairs of `config`'s dataset (text columns only: no image is read); raises
    TrainingInputError for a missing or unusable dataset."""
    source = data_path(config, workdir)
    columns = [config.caption_column, *config.extra_caption_columns]
    if source.is_dir():
        # through the `dataset` symlink once, now: a release swapped in while training runs is not mixed in
        parts = sorted((source.resolve() / "train").glob("*.parquet"))
        if not parts:
            raise TrainingInputError(
                f"no training data in {source}: no train/*.parquet (a released dataset folder such as "
                "WORKDIR/dataset holds train/part-00000.parquet ...)"
            )
        pairs = _parquet_pairs(source, parts, columns)
    elif source.is_file() and source.suffix.lower() == ".csv":
        pairs = _csv_pairs(source, columns)
    elif not source.exists():
        where = "data" if config.data is not None else "data is null, so WORKDIR/dataset"
        raise TrainingInputError(
            f"no dataset at {source} ({where}): run the pipeline's release first, or set data to a dataset "
            "folder or a CSV of filename,caption"
        )
    else:
        raise TrainingInputError(f"data {source} is neither a released dataset folder nor a .csv file")
    if len(pairs) == 0:
        raise TrainingInputError(f"{source} has no rows with a non-empty {' or '.join(columns)}")
    return pairs


def _nonempty_rows(values: pa.Array, column: str, where: Path) -> np.ndarray:
    if pa.types.is_null(values.type):
        return np.empty(0, dtype=np.int64)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise TrainingInputError(f"{where}: column {column!r} is {values.type}, not text")
    nonempty = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), False)
    return np.flatnonzero(nonempty.to_numpy(zero_copy_only=False))


def _parquet_pairs(source: Path, parts: list[Path], columns: list[str]) -> Pairs:
    locations, texts = [], []
    for part_index, part in enumerate(parts):
        parquet = pq.ParquetFile(part)
        names = parquet.schema_arrow.names
        if "image" not in names:
            raise TrainingInputError(f"{part} has no image column: not a part of a released dataset")
        for column in columns:
            if column not in names:
                raise TrainingInputError(
                    f"{part} has no column {column!r} (caption_column / extra_caption_columns); it has: "
                    f"{', '.join(names)}"
                )
        table = parquet.read(columns=columns)
        group_starts = np.cumsum(
            [0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        )
        for column in columns:
            values = table[column].combine_chunks()
            rows = _nonempty_rows(values, column, part)
            groups = np.searchsorted(group_starts, rows, side="right") - 1
            locations.append(
                np.stack([np.full_like(rows, part_index), groups, rows - group_starts[groups]], 1)
            )
            texts.append(values.take(pa.array(rows)).cast(pa.large_string()))
    return _pairs(source, "parquet", tuple(str(p) for p in parts), locations, texts, [p.name for p in parts])


def _csv_pairs(source: Path, columns: list[str]) -> Pairs:
    try:
        table = pacsv.read_csv(
            source,
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.large_string() for name in ["filename", *columns]}
            ),
        )
    except (pa.ArrowInvalid, OSError) as error:
        raise TrainingInputError(f"cannot read CSV {source}: {error}") from None
    for column in ["filename", *columns]:
        if column not in table.column_names:
            raise TrainingInputError(
                f"{source} has no column {column!r} (a training CSV has filename and {', '.join(columns)})"
            )
    filenames = table["filename"].to_pylist()
    files = tuple(str(source.parent / name) if name else "" for name in filenames)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise TrainingInputError(
            f"{len(missing)} of the {len(files)} images {source} lists are missing (first: {missing[0]})"
        )
    locations, texts = [], []
    for column in columns:
        values = table[column].combine_chunks()
        rows = _nonempty_rows(values, column, source)
        locations.append(rows[:, None])
        texts.append(values.take(pa.array(rows)))
    return _pairs(source, "csv", files, locations, texts, filenames)


def _pairs(
    source: Path,
    kind: Literal["parquet", "csv"],
    files: tuple[str, ...],
    locations: list[np.ndarray],
    texts: list[pa.Array],
    names: Sequence[str],
) -> Pairs:
    location_array = np.concatenate(locations).astype(np.int64) if locations else np.empty((0, 1), np.int64)
    text_array = pa.concat_arrays(texts) if texts else pa.array([], pa.large_string())
    # names relative to the dataset: moving the dataset keeps a run resumable, changing its rows does not
    digest = hashlib.sha256(json.dumps([kind, list(names)]).encode())
    digest.update(location_array.tobytes())
    digest.update("\x00".join(text_array.to_pylist()).encode())
    return Pairs(source, kind, files, location_array, text_array, digest.hexdigest())


@dataclass(frozen=True)
class DataOrder:
    """Which pairs each step trains on (see the module docstring)."""

    pairs: int
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.pairs // self.batch_size

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of 0-based step `step`."""
        return divmod(step, self.steps_per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch]).permutation(self.pairs)


def total_steps(config: TrainConfig, pairs: int) -> int:
    return config.steps if config.steps is not None else config.epochs * (pairs // config.batch_size)


def rs5m_train_transform(cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """RS5M's train augmentation for a model's preprocess cfg (`model.visual.preprocess_cfg`):
    RandomResizedCrop(size, scale=(0.9, 1.0)) with the model's interpolation, RGB, random horizontal and vertical
    flips (p=0.5 each), a random quarter turn (0, 90, 180, 270 degrees; 0 or 180 for a non-square size), then the
    model's normalisation. Draws from torch's global RNG (the caller seeds it per image)."""
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    interpolation = (
        T.InterpolationMode.BILINEAR if cfg["interpolation"] == "bilinear" else T.InterpolationMode.BICUBIC
    )
    return T.Compose(
        [
            T.RandomResizedCrop((height, width), scale=(0.9, 1.0), interpolation=interpolation),
            _to_rgb,
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ToTensor(),
            _RandomQuarterTurn(square=height == width),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


class _RandomQuarterTurn(nn.Module):
    """Turns a (C, H, W) tensor by 0, 90, 180 or 270 degrees, equally likely (0 or 180 when not square)."""

    def __init__(self, square: bool) -> None:
        super().__init__()
        self.square = square

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(4 if self.square else 2, ()))
        return torch.rot90(pixels, turns if self.square else 2 * turns, dims=(-2, -1))


class _ImageReader:
    """Image bytes of pairs: Parquet row groups are read whole (only the image column) and the most recent are
    kept up to ROW_GROUP_CACHE_BYTES; CSV images are read from their files."""

    def __init__(self, pairs: Pairs) -> None:
        self.pairs = pairs
        self.cache: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()
        self.cached_bytes = 0

    def read(self, index: int) -> bytes:
        if self.pairs.kind == "csv":
            return Path(self.pairs.files[int(self.pairs.locations[index, 0])]).read_bytes()
        part, group, row = (int(v) for v in self.pairs.locations[index])
        return self._row_group(part, group)[row].as_py()

    def _row_group(self, part: int, group: int) -> pa.Array:
        key = (part, group)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        images = pq.ParquetFile(self.pairs.files[part]).read_row_group(group, columns=["image"])
        column = images.column(0).combine_chunks()
        self.cache[key] = column
        self.cached_bytes += column.nbytes
        while self.cached_bytes > ROW_GROUP_CACHE_BYTES and len(self.cache) > 1:
            _, dropped = self.cache.popitem(last=False)
            self.cached_bytes -= dropped.nbytes
        return column


class StepBatches(torch.utils.data.Dataset):
    """Item k: this process's share of the batch of 0-based step `first_step + k`, as (pixels, tokens)."""

    def __init__(
        self,
        pairs: Pairs,
        order: DataOrder,
        steps: range,
        rank: int,
        world_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        augmented: bool,
    ) -> None:
        self.pairs = pairs
        self.order = order
        self.steps = steps
        self.share = order.batch_size // world_size
        self.rank = rank
        self.transform = transform
        self.tokenizer = tokenizer
        self.augmented = augmented
        self.reader = _ImageReader(pairs)
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def indices(self, step: int) -> np.ndarray:
        """The pairs this process trains on at 0-based step `step`."""
        epoch, batch = self.order.position(step)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, self.order.epoch_order(epoch))
        start = batch * self.order.batch_size + self.rank * self.share
        return self._epoch_order[1][start : start + self.share]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.steps[item]
        epoch, _ = self.order.position(step)
        indices = self.indices(step)
        pixels = torch.stack([self._pixels(int(index), epoch) for index in indices])
        tokens = self.tokenizer([self.pairs.texts[int(index)].as_py() for index in indices])
        return pixels, tokens

    def _pixels(self, index: int, epoch: int) -> torch.Tensor:
        try:
            image = Image.open(io.BytesIO(self.reader.read(index)))
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(
                f"image of pair {index} ({self.pairs.describe(index)}) cannot be decoded: {error}"
            ) from error
        if not self.augmented:
            return self.transform(image)
        # the augmentation of an image depends on (seed, epoch, pair) only, not on which process draws it
        seed = np.random.SeedSequence([self.order.seed, _AUGMENT_STREAM, epoch, index]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.transform(image)


# ---------------------------------------------------------------------------------------------------------------
# Model, optimiser, checkpoints


def _trained_towers_pattern(config: TrainConfig) -> str:
    """Regex of the module paths inside the towers that are not locked: the image tower is everything under
    `visual.`, the text tower everything else."""
    towers = ([] if config.lock_image else [r"visual\..*"]) + (
        [] if config.lock_text else [r"(?!visual\.).*"]
    )
    return f"(?:{'|'.join(towers)})"


def lora_target_pattern(config: TrainConfig) -> str:
    """peft `target_modules` (a regex, matched in full against module paths): the modules named in
    `lora.targets` inside the towers that are not locked."""
    names = "|".join(re.escape(name) for name in config.lora.targets)
    return rf"{_trained_towers_pattern(config)}\.(?:{names})"


def _check_lora_targets(config: TrainConfig) -> None:
    # the architecture on the meta device: module names and types without allocating or loading weights
    modules = dict(open_clip.create_model(config.model, device="meta").named_modules())
    towers = _trained_towers_pattern(config)
    for target in config.lora.targets:
        matched = [m for name, m in modules.items() if re.fullmatch(rf"{towers}\.{re.escape(target)}", name)]
        if not matched:
            raise TrainingInputError(
                f"lora.targets: {target!r} names no module of {config.model} in the towers being trained "
                "(open_clip's transformer blocks have attn, c_fc and c_proj)"
            )
        wrong = {type(m).__name__ for m in matched if not isinstance(m, _LORA_MODULE_TYPES)}
        if wrong:
            raise TrainingInputError(
                f"lora.targets: {target!r} is a {', '.join(sorted(wrong))}; LoRA adapts Linear and "
                "MultiheadAttention modules (attn, c_fc, c_proj)"
            )


@dataclass
class _Model:
    clip: nn.Module  # the open_clip model (inside `net` for LoRA)
    net: nn.Module  # what trains: the open_clip model, or its peft wrapper
    transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]


def build_model(config: TrainConfig, device: torch.device) -> _Model:
    """The model of `config` ready to train on `device`: weights from `pretrained` (or random from `seed`; reseeds
    torch's global RNG), towers locked, LoRA adapters added, gradient checkpointing set."""
    register_project_configs()
    torch.manual_seed(config.seed)
    clip, _, preprocess_val = open_clip.create_model_and_transforms(
        config.model, pretrained=config.pretrained, device=device, output_dict=True
    )
    if config.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    if config.method == "full":
        if config.lock_image:
            clip.lock_image_tower()
        if config.lock_text:
            clip.lock_text_tower()
        net = clip
    else:
        from peft import LoraConfig, get_peft_model  # only LoRA runs need peft on the machine

        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=lora_target_pattern(config),
        )
        net = get_peft_model(clip, lora)
    transform = (
        rs5m_train_transform(clip.visual.preprocess_cfg) if config.augment == "rs5m" else preprocess_val
    )
    return _Model(clip, net, transform, open_clip.get_tokenizer(config.model))


def _param_groups(model: _Model, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip_train main's AdamW groups: no decay on 1-d parameters (biases, norm gains, logit_scale),
    names with bn/ln/bias/logit_scale, and the model's no_weight_decay() names (positional and class
    embeddings)."""
    exempt_names = getattr(model.clip, "no_weight_decay", set)()
    exempt_ids = {id(p) for name, p in model.clip.named_parameters() if name in exempt_names}
    decay, no_decay = [], []
    for name, parameter in model.net.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = (
            parameter.ndim < 2
            or any(part in name for part in ("bn", "ln", "bias", "logit_scale"))
            or id(parameter) in exempt_ids
        )
        (no_decay if exempt else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def plain_state_dict(model: _Model, method: str) -> dict[str, torch.Tensor]:
    """The open_clip state dict of the model's current weights, on CPU; LoRA adapters merged (in a copy: training
    goes on with the adapters)."""
    module = copy.deepcopy(model.net).merge_and_unload() if method == "lora" else model.clip
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}


def optimizer_step(
    model: _Model,
    net: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    trainable: list[nn.Parameter],
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    autocast: Callable[[], Any],
    max_grad_norm: float | None,
) -> torch.Tensor:
    """One training step on a batch already on the device: forward under autocast, contrastive loss, backward,
    gradient clipping, AdamW step, logit_scale clamp. Returns the loss."""
    with autocast():
        out = net(pixels, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    with torch.no_grad():
        # as open_clip_train: a temperature above 100 destabilises training
        model.clip.logit_scale.clamp_(0, math.log(100))
    return loss


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(target: Path, payload: Any) -> None:
    with atomic_path(target) as tmp:
        torch.save(payload, tmp)


# ---------------------------------------------------------------------------------------------------------------
# Checks before launch, and the training loop


@dataclass(frozen=True)
class TrainingPlan:
    """What a run will do, from check_training_inputs."""

    data: Path
    pairs: int
    steps_per_epoch: int
    total_steps: int
    device: str


def _resolved_device(config: TrainConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def _prepare(config: TrainConfig, workdir: Path) -> tuple[TrainingPlan, Pairs]:
    register_project_configs()
    architecture = open_clip.get_model_config(config.model)
    if architecture is None:
        raise TrainingInputError(f"model: {unknown_model_message(config.model)}")
    if "multimodal_cfg" in architecture or "init_logit_bias" in architecture:
        raise TrainingInputError(
            f"model: {config.model} is a CoCa or SigLIP model; this trainer has CLIP's contrastive loss only"
        )
    if config.device == "cuda" and not torch.cuda.is_available():
        raise TrainingInputError("device: cuda, but torch.cuda.is_available() is False on this machine")
    try:
        ensure_loadable(ClipSpec(model=config.model, pretrained=config.pretrained))
    except (ValueError, RuntimeError) as error:
        raise TrainingInputError(f"pretrained: {error}") from None
    device = _resolved_device(config)
    if device == "cuda" and torch.cuda.device_count() < config.workers:
        raise TrainingInputError(
            f"workers: {config.workers} processes need {config.workers} GPUs; this machine has "
            f"{torch.cuda.device_count()}"
        )
    if config.method == "lora":
        _check_lora_targets(config)
    pairs = read_pairs(config, workdir)
    if len(pairs) < config.batch_size:
        raise TrainingInputError(
            f"batch_size {config.batch_size} is larger than the {len(pairs)} training pairs of {pairs.source}: "
            f"not one full batch (each of the {config.workers} processes takes "
            f"{config.batch_size // config.workers} of every batch; a partial batch is dropped)"
        )
    _check_earlier_run(config, TrainLayout(Path(workdir), config.run_name), pairs)
    plan = TrainingPlan(
        data=pairs.source,
        pairs=len(pairs),
        steps_per_epoch=len(pairs) // config.batch_size,
        total_steps=total_steps(config, len(pairs)),
        device=device,
    )
    return plan, pairs


def _check_earlier_run(config: TrainConfig, layout: TrainLayout, pairs: Pairs) -> None:
    """A run folder that already holds a run must hold this one: same output-affecting fields, same data."""
    if not layout.run_record.is_file():
        return
    record = json.loads(layout.run_record.read_text())
    try:
        earlier = TrainConfig.model_validate(record["config"]).output_fields()
    except (KeyError, ValidationError):
        raise TrainingInputError(
            f"{layout.run_record} does not hold a run this version can continue; use another run_name"
        ) from None
    changed = sorted(name for name, value in config.output_fields().items() if earlier.get(name) != value)
    if changed:
        raise TrainingInputError(
            f"run {config.run_name} in {layout.root} was started with other values of {', '.join(changed)}; "
            "rerun it unchanged to resume, or use another run_name"
        )
    if record.get("data_fingerprint") != pairs.fingerprint:
        raise TrainingInputError(
            f"the training data ({pairs.source}) changed since run {config.run_name} started in {layout.root}; "
            "use another run_name"
        )


def check_training_inputs(config: TrainConfig, workdir: str | os.PathLike[str]) -> TrainingPlan:
    """Everything that can be checked before a training process starts; raises TrainingInputError (one line):
    an unknown or unsupported architecture, pretrained weights that do not resolve (hub weights are downloaded
    now, once, rather than by every process), CUDA asked for and missing or fewer GPUs than workers, LoRA
    targets that match no Linear / MultiheadAttention module of the trained towers, no dataset, a dataset
    without an image column or without rows, a caption column that is missing or not text, CSV images that are
    missing, fewer pairs than one batch (batches are never partial), and a run folder holding an earlier run with
    other output-affecting settings or other data."""
    return _prepare(config, Path(workdir).resolve())[0]


def _watch_launcher() -> None:
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher:
        return

    def watch() -> None:
        while _process_alive(int(launcher)):
            time.sleep(1.0)
        os.killpg(os.getpgrp(), signal.SIGKILL)  # launch() made this group for the trainer's processes alone

    threading.Thread(target=watch, name="rs5m-train-launcher-watch", daemon=True).start()


def _truncated_metrics(path: Path, last_step: int) -> str:
    """metrics.jsonl's lines of steps 1..last_step (a line cut short by a kill is dropped)."""
    if not path.is_file():
        return ""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", math.inf) <= last_step:
            kept.append(line + "\n")
    return "".join(kept)


def train(
    config: TrainConfig, workdir: str | os.PathLike[str], *, on_step: StepCallback | None = None
) -> Path:
    """Trains (or resumes, or finds complete) run `config.run_name` in this process, as one rank of torchrun's
    process group when WORLD_SIZE > 1. Returns the path of final.pt.

    Prints one line per step on rank 0 (`step N/M epoch E loss L lr R samples/s S`) and calls `on_step` there
    with the metrics record. Seeds torch's global RNG; on CPU turns deterministic algorithms on for its
    duration."""
    workdir = Path(workdir).resolve()
    layout = TrainLayout(workdir, config.run_name)
    _watch_launcher()
    distributed = init_distributed_device_so(device=_resolved_device(config))
    rank, world_size = distributed["global_rank"], distributed["world_size"]
    device = torch.device(distributed["device"])
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    lock = FileLock(layout.lock)
    try:
        if rank == 0:
            layout.root.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise TrainingInputError(
                    f"run {config.run_name} is being trained by another process (it holds {layout.lock})"
                ) from None
        if world_size != config.workers:
            raise TrainingInputError(
                f"workers is {config.workers} but {world_size} processes were started; launch() starts the right "
                "number"
            )
        # open_clip's ClipLoss gathers with torch.distributed.nn.all_gather, deprecated in torch 2.14: one
        # warning per process and run that the caller cannot act on
        warnings.filterwarnings(
            "ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning
        )
        if device.type == "cpu":
            # bitwise-equal resumes on CPU; CUDA would also need CUBLAS_WORKSPACE_CONFIG and slower kernels
            torch.use_deterministic_algorithms(True)
        return _train(config, layout, rank, world_size, device, on_step)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        if lock.is_locked:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    layout: TrainLayout,
    rank: int,
    world_size: int,
    device: torch.device,
    on_step: StepCallback | None,
) -> Path:
    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    plan, pairs = _prepare(config, layout.workdir)
    if _is_complete(layout):
        say(f"run {config.run_name} is complete: {layout.final}")
        return layout.final
    use_bf16 = config.precision == "bf16" and device.type == "cuda"
    if config.precision == "bf16" and not use_bf16:
        say("precision bf16 needs CUDA: training in fp32 on this machine")
    model = build_model(config, device)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = cosine_lr(optimizer, config.lr, config.warmup_steps, plan.total_steps)
    order = DataOrder(len(pairs), config.batch_size, config.seed)

    start = layout.latest_checkpoint() or 0
    if start:
        # our own file (pickled RNG states, not only tensors): weights_only would refuse numpy's state
        state = torch.load(layout.state(start), map_location="cpu", weights_only=False)
        if state["format"] != STATE_FORMAT:
            raise TrainingInputError(
                f"{layout.state(start)} has state format {state['format']}, this version reads {STATE_FORMAT}"
            )
        if state["data_position"] != dict(zip(("epoch", "batch"), order.position(start), strict=True)):
            raise TrainingInputError(f"{layout.state(start)} does not match the data order of this run")
        if config.method == "lora":
            model.net.load_state_dict(state["lora_model"])
        else:
            model.clip.load_state_dict(torch.load(layout.weights(start), map_location=device))
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"][rank])
        say(f"resuming run {config.run_name} at step {start}/{plan.total_steps} from {layout.state(start)}")

    if rank == 0:
        remove_temporaries(layout.checkpoints)
        write_text(layout.metrics, _truncated_metrics(layout.metrics, start))
        write_json(layout.run_record, _run_record(config, plan, pairs, world_size, status="running"))
    say(
        f"training {config.run_name}: {config.model} ({config.method}), {plan.pairs} pairs, "
        f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps, {world_size} process(es) on "
        f"{device.type}"
    )

    net = model.net
    if world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = ClipLoss(
        local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size
    )
    autocast = get_autocast("amp_bf16" if use_bf16 else "fp32", device_type=device.type)
    trainable = [p for p in model.net.parameters() if p.requires_grad]
    batches = StepBatches(
        pairs,
        order,
        range(start, plan.total_steps),
        rank,
        world_size,
        model.transform,
        model.tokenizer,
        augmented=config.augment != "none",
    )
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        # its own generator: creating the loader must not draw from the global RNG that resumes restore
        generator=torch.Generator(),
    )
    metrics = open(layout.metrics, "a") if rank == 0 else None  # noqa: SIM115 - appended to until the end
    try:
        net.train()
        last = time.perf_counter()
        for step, (pixels, tokens) in zip(range(start, plan.total_steps), loader, strict=True):
            lr = scheduler(step)
            pixels = pixels.to(device, non_blocking=True)
            tokens = tokens.to(device, non_blocking=True)
            loss = optimizer_step(
                model, net, loss_fn, optimizer, trainable, pixels, tokens, autocast, config.max_grad_norm
            )
            done = step + 1
            mean_loss = loss.detach().float()
            if world_size > 1:
                # each rank's local loss covers its share of the batch: the batch's loss is their mean
                dist.all_reduce(mean_loss)
                mean_loss /= world_size
            now = time.perf_counter()
            record = {
                "step": done,
                "epoch": order.position(step)[0],
                "loss": mean_loss.item(),
                "lr": lr,
                "samples_per_s": config.batch_size / (now - last),
            }
            last = now
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                say(
                    f"step {done}/{plan.total_steps} epoch {record['epoch']} loss {record['loss']:.4f} "
                    f"lr {lr:.3e} samples/s {record['samples_per_s']:.1f}"
                )
                if on_step is not None:
                    on_step(record)
            if done % config.checkpoint_every_steps == 0:
                _checkpoint(config, layout, model, optimizer, order, done, pairs, rank, world_size, metrics)
    finally:
        if metrics is not None:
            metrics.close()
    if rank == 0:
        _save(layout.final, plain_state_dict(model, config.method))
        write_json(layout.run_record, _run_record(config, plan, pairs, world_size, status="complete"))
        say(f"run {config.run_name} complete: {layout.final}")
    if world_size > 1:
        dist.barrier()
    return layout.final


def _checkpoint(
    config: TrainConfig,
    layout: TrainLayout,
    model: _Model,
    optimizer: torch.optim.Optimizer,
    order: DataOrder,
    step: int,
    pairs: Pairs,
    rank: int,
    world_size: int,
    metrics: io.TextIOBase | None,
) -> None:
    """Weights first, then the state file (its presence marks the checkpoint complete). Rank 0 writes both;
    every rank contributes its RNG state."""
    rng = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rng, _rng_state())
    else:
        rng[0] = _rng_state()
    if rank == 0:
        _save(layout.weights(step), plain_state_dict(model, config.method))
        # the metrics lines up to this step are on disk before the checkpoint that a resume truncates to
        metrics.flush()
        os.fsync(metrics.fileno())
        epoch, batch = order.position(step)
        state = {
            "format": STATE_FORMAT,
            "step": step,
            "data_position": {"epoch": epoch, "batch": batch},
            "pairs": len(pairs),
            "data_fingerprint": pairs.fingerprint,
            "world_size": world_size,
            "optimizer": optimizer.state_dict(),
            "rng": rng,
        }
        if config.method == "lora":
            state["lora_model"] = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
        _save(layout.state(step), state)
    if world_size > 1:
        dist.barrier()


def _is_complete(layout: TrainLayout) -> bool:
    if not (layout.final.is_file() and layout.run_record.is_file()):
        return False
    return json.loads(layout.run_record.read_text()).get("status") == "complete"


def _run_record(
    config: TrainConfig, plan: TrainingPlan, pairs: Pairs, world_size: int, status: str
) -> dict[str, Any]:
    record = {
        "model": config.model,
        "pretrained": config.pretrained,
        "method": config.method,
        "config": config.model_dump(mode="json"),
        "data": str(plan.data),
        "data_fingerprint": pairs.fingerprint,
        "pairs": plan.pairs,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "world_size": world_size,
        "status": status,
    }
    if status == "complete":
        record["final"] = "checkpoints/final.pt"
    return record


# ---------------------------------------------------------------------------------------------------------------
# Launcher and command line


def launch(
    config: TrainConfig, workdir: str | os.PathLike[str], on_line: Callable[[str], None] = print
) -> int:
    """Checks the inputs (check_training_inputs: a TrainingInputError before any process starts), writes the
    config to WORKDIR/train/<run_name>/launch.json, and runs `python -m models.train` (workers == 1) or
    `torchrun --standalone --nproc_per_node=<workers> -m models.train` with this source tree importable,
    passing each line of its output (stdout and stderr) to on_line. Returns the exit status (0: the run is
    complete; 2: bad input found by the trainer). If the caller is interrupted (KeyboardInterrupt, a
    cancellation raised into it), the whole process group is stopped (SIGTERM, then SIGKILL after 10 s);
    if the caller dies, the trainer notices within a second and kills its group."""
    workdir = Path(workdir).resolve()
    config = absolute_paths(config)
    check_training_inputs(config, workdir)
    layout = TrainLayout(workdir, config.run_name)
    write_json(layout.launch_config, config.model_dump(mode="json"))
    module = ["-m", "models.train", "--config", str(layout.launch_config), "--workdir", str(workdir)]
    if config.workers == 1:
        command = [sys.executable, *module]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={config.workers}",
            *module,
        ]
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "PYTHONPATH": python_path,
        "PYTHONUNBUFFERED": "1",
        LAUNCHER_PID_ENV: str(os.getpid()),
    }
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: stopped as a whole, never by the caller's Ctrl-C alone
    )
    try:
        for line in process.stdout:
            on_line(line.rstrip("\n"))
        return process.wait()
    except BaseException:
        _stop_group(process)
        raise
    finally:
        process.stdout.close()


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """`data`, and `pretrained` when it names a file, made absolute against the current directory (the trainer
    runs elsewhere)."""
    update: dict[str, Any] = {}
    if config.data is not None:
        update["data"] = str(Path(config.data).resolve())
    if config.pretrained is not None and Path(config.pretrained).is_file():
        update["pretrained"] = str(Path(config.pretrained).resolve())
    return config.model_copy(update=update)


def _stop_group(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.train", description="Fine-tune an open_clip model (one torchrun rank)."
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="JSON of a TrainConfig (launch() writes launch.json)"
    )
    parser.add_argument("--workdir", required=True, type=Path, help="the pipeline's work directory")
    args = parser.parse_args(argv)
    try:
        text = args.config.read_text()
    except OSError as error:
        print(f"models.train: cannot read --config {args.config}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        train(TrainConfig.model_validate_json(text), args.workdir)
    except (ValidationError, TrainingInputError) as error:
        print(f"models.train: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
