"""The typed configuration of GeoRSCLIP fine-tuning (`models/train.py`): the `train:` section of a YAML file.

Validated once by pydantic, like the pipeline config (`rs5m/config.py`): a bad value names its field
(`lr: Input should be greater than 0`). What needs the data, the model registry or the machine (the dataset
exists and holds a full batch, the architecture is known, LoRA targets match modules, CUDA is there) is checked
by `models.train.check_training_inputs` before any training process starts.

Fields marked speed-only (`_SPEED_ONLY`) change how fast a run goes or which checkpoints it leaves, never the
weights it ends with, and `data` is checked by its content: a killed run may be resumed with other values of
them; any other change is refused (use a new `run_name`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from rs5m.config_base import (
    _CONTENT_HASHED,
    _SPEED_ONLY,
    ConfigError,
    Strict,
    describe_validation_error,
    read_yaml_mapping,
)

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# open_clip's transformer blocks (both towers): `attn` is an nn.MultiheadAttention (its q/k/v projection is the
# Parameter in_proj_weight, not a Linear), `c_fc` and `c_proj` are the MLP's Linear layers.
DEFAULT_LORA_TARGETS = ("attn", "c_fc", "c_proj")


class LoraSettings(Strict):
    """LoRA adapters (peft) on the attention and MLP projections of the towers that are not locked."""

    r: int = Field(16, ge=1, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0, description="Scale: the update is (alpha / r) * B @ A.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapter's input. Applies to Linear targets (c_fc, c_proj) only: peft merges "
        "the adapter into nn.MultiheadAttention's weights for each forward pass, so `attn` adapters see no "
        "dropout.",
    )
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="Module names (the last part of a module path) to adapt: attn (q, k, v and output "
        "projection of nn.MultiheadAttention), c_fc, c_proj (MLP). Each must name a module of the model.",
    )


class TrainConfig(Strict):
    """One fine-tuning run of an open_clip model on a released dataset (or a CSV of image files)."""

    run_name: str = Field(
        pattern=RUN_NAME_PATTERN,
        description="Folder of the run's outputs: WORKDIR/train/<run_name>/ (letters, digits, _ . -; 64 at most).",
    )
    model: str = Field(
        "rs5m-tiny-vit",
        description="open_clip architecture (ViT-B-32, ...) or a config shipped in models/configs (rs5m-tiny-vit).",
    )
    pretrained: str | None = Field(
        None,
        description="Starting weights: an open_clip pretrained tag (laion2b_s34b_b79k), a checkpoint file (a "
        "GeoRSCLIP release, a previous run's final.pt); null: random initialisation from `seed`.",
    )
    data: str | None = Field(
        None,
        description="A released dataset folder (WORKDIR/dataset: trains on its train/*.parquet), or a CSV file "
        "with columns filename,caption (image paths relative to the CSV's folder); null: WORKDIR/dataset. A "
        "resumed run checks the pairs' fingerprint (file names, rows, captions), not this path.",
        json_schema_extra=_CONTENT_HASHED,
    )
    caption_column: str = Field("caption", description="Parquet: the column each image is paired with.")
    extra_caption_columns: list[str] = Field(
        default_factory=list,
        description="Parquet: further text columns (RS3's top_cap, ssl_cap, meta_caption); each non-empty value "
        "adds one more (image, text) pair, so an RS3 image can be seen with its second caption too. Empty: "
        "`caption` only (RS5M's choice of one model caption per image).",
    )
    method: Literal["full", "lora"] = Field(
        "full", description="full: train every weight of the unlocked towers; lora: adapters only (peft)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="method: lora only.")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate (AdamW), reached after warm-up.")
    weight_decay: float = Field(
        0.2,
        ge=0,
        description="AdamW decoupled weight decay; never applied to biases, norms, logit_scale or embeddings.",
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Pairs per optimiser step across all processes (the contrastive loss sees all of them); "
        "each process takes batch_size / workers. An epoch is floor(pairs / batch_size) steps (the rest of the "
        "shuffled pairs is dropped).",
    )
    epochs: int | None = Field(None, ge=1, description="Training length in passes over the data (or steps).")
    steps: int | None = Field(None, ge=1, description="Training length in optimiser steps (or epochs).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, then cosine decay to 0 at the last step.")
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the global gradient norm to this; null: no clipping."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: autocast on CUDA (weights and optimiser stay fp32). On a machine without CUDA "
        "(device auto) a bf16 run trains in fp32 and says so.",
    )
    grad_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass (less memory, ~30% slower).",
        json_schema_extra=_SPEED_ONLY,
    )
    lock_image: bool = Field(False, description="Freeze the image tower (LoRA: no adapters in it).")
    lock_text: bool = Field(False, description="Freeze the text tower (LoRA: no adapters in it).")
    seed: int = Field(
        0, ge=0, description="Decides the random initialisation, the shuffling, augmentation and dropout."
    )
    augment: Literal["none", "rs5m"] = Field(
        "none",
        description="none: the model's inference preprocess (resize, centre crop, normalise); rs5m: RS5M's "
        "train transform: RandomResizedCrop(scale 0.9-1.0), random horizontal and vertical flips, a random "
        "quarter turn, then the model's normalisation.",
    )
    checkpoint_every_steps: int = Field(
        500,
        ge=1,
        description="Write a checkpoint (weights + resume state) every this many steps; a killed run resumes "
        "from the newest one.",
        json_schema_extra=_SPEED_ONLY,
    )
    workers: int = Field(
        1, ge=1, description="Training processes (torchrun; one per GPU on CUDA, gloo on CPU)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_SPEED_ONLY)
    num_workers: int = Field(
        2, ge=0, description="Data loading processes per training process.", json_schema_extra=_SPEED_ONLY
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        if self.batch_size % self.workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of workers ({self.workers}): each process "
                "takes an equal share of every batch"
            )
        # compared with the defaults, not "was it given": a dumped config (run.json) names every field
        if self.method == "full" and self.lora != LoraSettings():
            raise ValueError("lora applies to method: lora only")
        if self.lock_image and self.lock_text:
            raise ValueError("lock_image and lock_text together leave nothing to train")
        if self.caption_column in self.extra_caption_columns:
            raise ValueError(f"extra_caption_columns repeats caption_column ({self.caption_column!r})")
        if len(set(self.extra_caption_columns)) != len(self.extra_caption_columns):
            raise ValueError("extra_caption_columns has a column twice")
        if self.precision == "bf16" and self.device == "cpu":
            raise ValueError("precision bf16 needs CUDA (autocast); use fp32 with device cpu")
        return self

    def output_fields(self) -> dict[str, Any]:
        """The fields that decide the trained weights, as JSON values: every field but the speed-only ones and
        `data` (whose content the trainer fingerprints). What a resumed run must share with the run it
        continues."""
        dumped = self.model_dump(mode="json")
        for name, info in type(self).model_fields.items():
            if (info.json_schema_extra or {}).get("affects_output") is False:
                dumped.pop(name)
        return dumped


def parse_train_config(
    data: dict[str, Any], origin: str = "<dict>", base_dir: Path | None = None
) -> TrainConfig:
    """Validates a `train:` mapping; a relative `data` path, and a relative `pretrained` naming a file there,
    resolve against base_dir (the YAML file's folder)."""
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, f"train config {origin}")) from None
    return config if base_dir is None else resolve_train_paths(config, base_dir)


def resolve_train_paths(config: TrainConfig, base_dir: Path) -> TrainConfig:
    """A relative `data` path, and a relative `pretrained` naming a file there, against base_dir (the YAML
    file's folder)."""
    update: dict[str, Any] = {}
    if config.data is not None and not Path(config.data).is_absolute():
        update["data"] = str((base_dir / config.data).resolve())
    if config.pretrained is not None and not Path(config.pretrained).is_absolute():
        candidate = base_dir / config.pretrained
        if candidate.is_file():
            update["pretrained"] = str(candidate.resolve())
    return config.model_copy(update=update)


def load_train_config(path: str | Path) -> TrainConfig:
    """Reads the `train:` section of a YAML file (configs/train_rs5m_retrieval.yaml is an example)."""
    path = Path(path)
    document = read_yaml_mapping(path)
    if not isinstance(document.get("train"), dict):
        raise ConfigError(f"config {path} has no `train:` mapping")
    return parse_train_config(document["train"], origin=str(path), base_dir=path.parent)
