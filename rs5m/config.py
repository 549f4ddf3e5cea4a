"""The pipeline's typed configuration: parsed and validated once, when a run starts.

Every stage reads only its own section; the fields of that section go into the stage's fingerprint, so
changing one reruns that stage and marks every later stage stale.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rs5m.config_base import (
    _CONTENT_HASHED,
    _SPEED_ONLY,
    ConfigError,
    Strict,
    describe_validation_error,
    read_yaml_mapping,
)
from rs5m.train_config import TrainConfig, resolve_train_paths

SOURCE_FORMATS = ("parquet", "csv", "tsv", "jsonl")


def _check_unique(kind: str, names: list[str]) -> None:
    # names key files and report rows: two entries with one name would merge their counts
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{kind} names must be unique, repeated: {', '.join(duplicates)}")


class SourceConfig(Strict):
    """One web image-text source (a LAION part, CC3M's TSV, ...)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
    path: str = Field(description="Local path, glob, or fsspec URL (http(s) tested; s3, gcs, ... untested).")
    format: Literal["parquet", "csv", "tsv", "jsonl"]
    header: bool = Field(True, description="csv/tsv only: whether the first line names the columns.")
    column_names: list[str] | None = Field(
        None, description="csv/tsv without header: names given to the columns, in file order."
    )
    url_column: str = "url"
    caption_column: str = "caption"
    encoding: str = Field(
        "utf-8",
        description="csv/tsv/jsonl: the files' text encoding, a Python codec name (latin-1, cp1252, utf-16, "
        "...); other than UTF-8 is transcoded to UTF-8 while reading. A line that does not decode is a "
        "malformed_row.",
    )
    multiline_values: bool = Field(
        False,
        description="csv only: allow line breaks inside quoted values. Off: one physical line is one row, and "
        "a line whose quoting is broken is a malformed_row.",
    )

    @field_validator("encoding")
    @classmethod
    def _known_text_codec(cls, encoding: str) -> str:
        try:
            info = codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r}: not a codec Python knows") from None
        if not info._is_text_encoding:  # base64, rot13, zlib, ...: bytes-to-bytes, not a text encoding
            raise ValueError(f"{encoding!r} is not a text encoding")
        return encoding

    @model_validator(mode="after")
    def _headerless_needs_names(self) -> SourceConfig:
        if self.format in ("csv", "tsv") and not self.header and not self.column_names:
            raise ValueError("a csv/tsv source without header needs column_names")
        if self.format in ("parquet", "jsonl") and not self.header:
            raise ValueError("header: false applies to csv/tsv only")
        if self.format == "parquet" and codecs.lookup(self.encoding).name != "utf-8":
            raise ValueError("encoding applies to csv/tsv/jsonl only (Parquet strings are UTF-8)")
        if self.multiline_values and self.format != "csv":
            raise ValueError("multiline_values applies to csv only")
        return self


class IngestConfig(Strict):
    shard_rows: int = Field(
        10_000, ge=1, description="Rows per ingest shard; later stages keep the sharding."
    )
    max_caption_chars: int = Field(
        4096, ge=1, description="A longer caption (in characters) is dropped as caption_too_long."
    )
    max_line_bytes: int = Field(
        1 << 20,
        ge=1,
        le=1 << 30,
        description="csv/tsv/jsonl: a longer physical line (in bytes, after transcoding to UTF-8) is a "
        "malformed_row and is skipped without being held in memory; reading goes on at the next line.",
    )


class KeywordConfig(Strict):
    # Each list has its own versions: rs-v3 to rs-v18 changed the keywords, rs-v5 came with rs-v3 places, rs-v7
    # with rs-v1 geonames, rs-v11 with rs-v3 exclusions, rs-v15 with rs-v4 places.
    keywords: str = Field(
        "rs-v18",
        description="Shipped keyword list version (rs-v18 ... rs-v1) or a path to a keyword file.",
    )
    exclusions: str = Field(
        "rs-v3",
        description="Shipped exclusion list version (rs-v3 ... rs-v1) or a path to an exclusion file.",
    )
    places: str = Field(
        "rs-v4",
        description="Shipped places list version (rs-v4 ... rs-v2) or a path to one: the words a `CUE ~place` entry "
        "needs nearby. Read only by lists with such entries (its content is then part of the stage identity).",
        json_schema_extra=_CONTENT_HASHED,
    )
    geonames: str = Field(
        "rs-v1",
        description="Shipped geonames list version (rs-v1) or a path to one: the GeoNames cities, regions and "
        "countries a `CUE ~geoname` entry needs nearby. Read only by lists with such entries (its content is "
        "then part of the stage identity).",
        json_schema_extra=_CONTENT_HASHED,
    )
    batch_rows: int = Field(
        500_000,
        ge=1,
        description="Rows the stage matches in one call, from consecutive shards of one task (speed only): each "
        "call compiles its RE2 patterns (about 25 ms), which on 10,000-row shards costs more than matching them.",
        json_schema_extra=_SPEED_ONLY,
    )


class DownloadConfig(Strict):
    processes: int = Field(2, ge=1, description="img2dataset processes_count.", json_schema_extra=_SPEED_ONLY)
    threads: int = Field(16, ge=1, description="img2dataset thread_count.", json_schema_extra=_SPEED_ONLY)
    timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for any one network operation (connect, each read)."
    )
    retries: int = Field(
        0,
        ge=0,
        description="More attempts per URL after a transient failure (408, 425, 429, 500, 502-504, timeout, "
        "reset, cut-short body); other 4xx, refused redirects and X-Robots-Tag opt-outs are never retried.",
    )
    max_seconds_per_url: float | None = Field(
        None,
        gt=0,
        description="Hard limit on one URL's total time: every attempt (connect, headers, whole body) and "
        "the waits between them; a body that trickles in ends as timeout. null: 3 x timeout_s x (retries + 1).",
    )
    max_retry_after_s: float | None = Field(
        None,
        ge=0,
        description="Longest Retry-After (429, 503, ...) waited for before a retry; a longer one ends the URL "
        "without retrying. null: timeout_s.",
    )
    user_agent_token: str | None = None
    allow_private_networks: bool = Field(
        False, description="Allow loopback, private and link-local hosts (tests and demo only)."
    )


class ValidateConfig(Strict):
    min_side: int = Field(32, ge=1, description="Drop images whose shorter side is below this (too_small).")
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        le=178_956_970,  # PIL refuses anything above twice its own default limit before we see the size
        description="Refuse images above this many pixels before decoding (too_large).",
    )
    max_side: int = Field(20_000, ge=1, description="Refuse images with a side above this before decoding.")


class ClipConfig(Strict):
    """The CLIP model every model-based stage uses (embed, filter prompts, decontamination)."""

    model: str = Field(
        "rs5m-tiny-vit",
        description="open_clip model name (ViT-B-32, ...) or a config shipped in models/configs (rs5m-tiny-vit).",
    )
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag (laion2b_s34b_b79k), or a local checkpoint file (GeoRSCLIP); "
        "null: random weights from `seed` (tests and the offline demo: every score is noise).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = Field(0, description="Seed of the random initialisation when pretrained is null.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_SPEED_ONLY)
    batch_size: int = Field(64, ge=1, json_schema_extra=_SPEED_ONLY)
    num_workers: int = Field(
        2, ge=0, description="CPU image decoding workers.", json_schema_extra=_SPEED_ONLY
    )


class FilterConfig(Strict):
    clip_score_min: float = Field(
        0.2, ge=-1, le=1, description="Keep if cosine(image, caption) >= this (inclusive)."
    )
    rs_score_min: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Keep if the probability that the image is remote sensing >= this (inclusive).",
    )
    rs_prompts: str = Field("rs-v1", description="Shipped prompt ensemble version or a path to one (JSON).")
    detector: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Name of a linear probe trained by `rs5m train-detector` in the work directory.",
    )


class DedupConfig(Strict):
    exact: bool = Field(True, description="Same normalised URL, or same sha256 of the original bytes.")
    perceptual_max_distance: int | None = Field(
        64,
        ge=0,
        le=255,
        description="Hamming bits (of 256) of the rotation/flip-invariant DCT hash; null disables.",
    )
    perceptual_min_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Verification: a perceptual match links two images only if their image embeddings' cosine "
        "is at least this too (meaningful with real CLIP weights); null: the hash alone decides.",
    )
    embedding_min_similarity: float | None = Field(
        0.95, gt=0, le=1, description="Cosine of image embeddings; null disables."
    )
    embedding_backend: Literal["auto", "flat", "ivf", "torch"] = "auto"
    embedding_k: int = Field(32, ge=1, le=64, description="Neighbours searched per sample.")


class EvalSetConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
    path: str = Field(
        description="A folder of evaluation images (searched recursively).",
        json_schema_extra=_CONTENT_HASHED,
    )


class DecontaminateConfig(Strict):
    eval_sets: list[EvalSetConfig] = Field(default_factory=list)
    perceptual_max_distance: int | None = Field(64, ge=0, le=255)
    embedding_min_similarity: float | None = Field(0.95, gt=0, le=1)

    @field_validator("eval_sets")
    @classmethod
    def _unique_names(cls, eval_sets: list[EvalSetConfig]) -> list[EvalSetConfig]:
        _check_unique("eval set", [s.name for s in eval_sets])
        return eval_sets


class ShardConfig(Strict):
    rows_per_shard: int = Field(10_000, ge=1, description="Final Parquet shard size in rows.")
    bytes_per_shard: int | None = Field(
        None, ge=1, description="Also close a shard once its image bytes reach this."
    )
    val_fraction: float = Field(
        0.01, ge=0, le=0.5, description="Share of samples in the val split (by hash)."
    )
    webdataset: bool = Field(False, description="Also export the same samples as WebDataset tar shards.")


SourceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
RS3_FORMATS = ("fmow", "bigearthnet", "image_folder")


class Rs3SourceConfig(Strict):
    """One label-only remote-sensing dataset, read in its own on-disk layout (README: RS3)."""

    name: SourceName
    format: Literal["fmow", "bigearthnet", "image_folder"]
    path: str = Field(
        description="fmow: a split folder of fMoW-rgb (<category>/<category>_<id>/...); bigearthnet: the v1 "
        "folder of patch folders, or the v2 folder holding metadata.parquet; image_folder: a folder of images "
        "(MillionAID, your own), searched recursively."
    )
    views: list[Literal["rgb", "msrgb"]] = Field(
        default_factory=lambda: ["rgb"],
        min_length=1,
        description="fmow only: which JPEG of each capture to take (msrgb is the same capture, pan-sharpened "
        "multispectral: a near-duplicate of rgb).",
    )
    class_from_folder: bool = Field(
        True, description="image_folder only: the image's parent folder name is its class (MillionAID train)."
    )
    metadata: str | None = Field(
        None,
        description="image_folder only: a CSV or JSONL with a `file` column (path relative to `path`) and any of "
        "`class`, `lat`, `lon`, `time`; default: metadata.csv or metadata.jsonl in the folder, if there is one.",
    )

    @model_validator(mode="after")
    def _options_fit_the_format(self) -> Rs3SourceConfig:
        if self.format != "fmow" and self.views != ["rgb"]:
            raise ValueError("views applies to fmow only")
        if self.format != "image_folder" and self.metadata is not None:
            raise ValueError("metadata applies to image_folder only")
        return self


class MetaCaptionConfig(Strict):
    """How meta captions are filled from each image's metadata (README: Meta captions)."""

    templates: str = Field(
        "rs5m-v1",
        description="Shipped template set version (RS5M's geometa templates) or a path to a JSON file.",
    )
    season: Literal["hemisphere", "rs5m"] = Field(
        "hemisphere",
        description="hemisphere: the season of the month at the image's latitude; rs5m: RS5M's rule "
        "(December-February is winter everywhere).",
    )
    utm_zone: Literal["latitude_band", "rs5m"] = Field(
        "latitude_band",
        description="BigEarthNet's zone as zone number + latitude band (29U); rs5m: with the hemisphere "
        "letter (29N), as RS5M wrote it.",
    )


class CaptionConfig(Strict):
    """BLIP-2 captions of RS3 images, ranked by the `clip` model across rotations (README: RS3 captions).
    The defaults are RS5M's decoding (sampling, top-k 50, top-p 0.95, 50 tokens, no prompt)."""

    model: str | None = Field(
        "blip2-tiny",
        description="blip2-tiny (shipped config, random weights: gibberish, offline), a hub name "
        "(Salesforce/blip2-opt-2.7b, -6.7b) or a folder in save_pretrained layout; null: no model captions "
        "(an RS3 caption is its meta caption, an image without one is dropped as no_caption_source).",
    )
    adapter: str | None = Field(
        None, description="A peft LoRA adapter (folder or hub name) merged into the model on load."
    )
    seed: int = Field(0, description="Random initialisation of blip2-tiny (real weights ignore it).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Weights' precision; RS5M ran fp16 on GPU (the captions differ with it)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_SPEED_ONLY)
    batch_size: int = Field(
        16, ge=1, description="Images per generate() call.", json_schema_extra=_SPEED_ONLY
    )
    num_candidates: int = Field(10, ge=1, description="Captions sampled per image, then ranked.")
    do_sample: bool = Field(True, description="false: the best num_candidates beams of a beam search.")
    top_k: int = Field(50, ge=0, description="0: no top-k cut.")
    top_p: float = Field(0.95, gt=0, le=1, description="1: no nucleus cut.")
    max_length: int = Field(50, ge=1, description="Generated tokens at most.")
    sampling_seed: int = Field(0, description="With the sample id, decides every sampled token.")
    prompt: str | None = Field(None, description="Text BLIP-2 continues (none in RS5M).")
    flips: bool = Field(
        False, description="Also score each candidate on the horizontally and vertically mirrored image."
    )
    ssl_pool: int = Field(
        5, ge=1, description="ssl_cap is chosen among this many best candidates by mean score (RS5M: five)."
    )
    choice: Literal["random", "top_cap", "ssl_cap"] = Field(
        "random",
        description="The model caption an image gets: random (RS5M: top_cap or ssl_cap with equal odds, "
        "seeded by the sample id), or always one of them.",
    )
    choice_seed: int = 0


class Rs3Config(Strict):
    sources: list[Rs3SourceConfig] = Field(min_length=1)
    shard_rows: int = Field(
        1000, ge=1, description="Images per RS3 shard (they are read whole: keep a shard's images in memory)."
    )
    meta: MetaCaptionConfig = MetaCaptionConfig()
    caption: CaptionConfig = CaptionConfig()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Rs3SourceConfig]) -> list[Rs3SourceConfig]:
        _check_unique("source", [s.name for s in sources])
        return sources


class RunnerConfig(Strict):
    shard_concurrency: int = Field(2, ge=1, description="Shards processed at once by CPU stages.")
    download_concurrency: int = Field(
        1, ge=1, description="Download shards at once (each already uses processes x threads)."
    )
    verify: Literal["checksum", "size"] = Field(
        "checksum",
        description="Before skipping a done shard, check its files against the sha256 (checksum) or only "
        "the size (size: faster on huge work directories, misses damage that keeps the size).",
        json_schema_extra=_SPEED_ONLY,
    )
    max_tasks_per_stage: int = Field(
        1000,
        ge=1,
        description="Prefect task runs per stage at most: a stage with more units (shards) gives each task a "
        "batch of consecutive units (the Prefect server slows down at thousands of task runs).",
        json_schema_extra=_SPEED_ONLY,
    )
    stall_timeout_s: float | None = Field(
        1800.0,
        gt=0,
        description="A shard that makes no progress for this long fails (with where it was) instead of "
        "hanging the run; null: never.",
        json_schema_extra=_SPEED_ONLY,
    )


class EvalConfig(Strict):
    """Evaluation of the trained models (`rs5m train --evaluate`, the train_and_evaluate flow; README:
    Evaluation)."""

    datasets: dict[str, str] = Field(
        min_length=1,
        description="name -> a folder of class folders (zero-shot classification) or a filename,caption CSV "
        "(retrieval).",
    )
    protocol: Literal["rs5m", "clip_benchmark"] = "rs5m"
    templates: str | None = Field(
        None, description="Prompt templates, one per line with {}; null: RS5M's 105."
    )
    batch_size: int = Field(64, ge=1, json_schema_extra=_SPEED_ONLY)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_SPEED_ONLY)


NO_SOURCES = (
    "no sources: give web `sources:` (the PUB11 pipeline), `rs3: {sources: [...]}` (RS3), or both (or only a "
    "`train:` section, for `rs5m train`)"
)


class PipelineConfig(Strict):
    workdir: Path
    rs3: Rs3Config | None = Field(None, description="Label-only RS datasets: the RS3 pipeline runs when set.")
    train: TrainConfig | None = Field(None, description="GeoRSCLIP fine-tuning (`rs5m train`).")
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="Web image-text sources: the PUB11 pipeline runs when there are any.",
    )
    ingest: IngestConfig = IngestConfig()
    keyword: KeywordConfig = KeywordConfig()
    download: DownloadConfig = DownloadConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    clip: ClipConfig = ClipConfig()
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    shard: ShardConfig = ShardConfig()
    runner: RunnerConfig = RunnerConfig()
    eval: EvalConfig | None = Field(None, description="Evaluation of the base and trained models.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("sources")
    @classmethod
    def _some_sources_with_unique_names(
        cls, sources: list[SourceConfig], info: ValidationInfo
    ) -> list[SourceConfig]:
        # runs when `sources:` is given (rs3 and train are declared before it, so they are known here)
        rs3 = info.data.get("rs3")
        if not sources and rs3 is None and info.data.get("train") is None:
            raise ValueError(NO_SOURCES)
        # names key shards across pipelines: a web source and an RS3 source may not share one
        _check_unique("source", [s.name for s in sources] + [s.name for s in (rs3.sources if rs3 else [])])
        return sources

    @model_validator(mode="after")
    def _something_to_do(self) -> PipelineConfig:
        # `sources:` left out (its validator did not run)
        if not self.sources and self.rs3 is None and self.train is None:
            raise ValueError(NO_SOURCES)
        return self

    @property
    def has_pipelines(self) -> bool:
        return bool(self.sources) or self.rs3 is not None

    def section(self, name: str) -> BaseModel | None:
        """A config section by its YAML name (`validate` is stored as `validate_`), dotted for a part of one
        (`rs3.meta`); None for a section the config leaves out (rs3)."""
        head, _, rest = name.partition(".")
        section = getattr(self, "validate_" if head == "validate" else head)
        for part in rest.split(".") if rest else []:
            section = None if section is None else getattr(section, part)
        return section


def parse_config(
    data: dict[str, Any], origin: str = "<dict>", base_dir: Path | None = None
) -> PipelineConfig:
    """Validate a config mapping; relative paths (workdir, sources, lists, eval sets) resolve against base_dir."""
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, f"config {origin}")) from None
    if base_dir is None:
        return config
    return config.model_copy(
        update={
            "workdir": (base_dir / config.workdir).resolve(),
            "sources": [_resolve_source(s, base_dir) for s in config.sources],
            "keyword": config.keyword.model_copy(
                update={
                    name: _resolve_list(getattr(config.keyword, name), base_dir)
                    for name in ("keywords", "exclusions", "places")
                }
            ),
            "filter": config.filter.model_copy(
                update={"rs_prompts": _resolve_list(config.filter.rs_prompts, base_dir)}
            ),
            "decontaminate": config.decontaminate.model_copy(
                update={
                    "eval_sets": [
                        s.model_copy(update={"path": str(_resolve_path(s.path, base_dir))})
                        for s in config.decontaminate.eval_sets
                    ]
                }
            ),
            "rs3": _resolve_rs3(config.rs3, base_dir) if config.rs3 is not None else None,
            "train": None if config.train is None else resolve_train_paths(config.train, base_dir),
            "eval": None if config.eval is None else _resolve_eval(config.eval, base_dir),
        }
    )


def _resolve_eval(evaluation: EvalConfig, base_dir: Path) -> EvalConfig:
    return evaluation.model_copy(
        update={
            "datasets": {
                name: str(_resolve_path(path, base_dir)) for name, path in evaluation.datasets.items()
            },
            "templates": None
            if evaluation.templates is None
            else str(_resolve_path(evaluation.templates, base_dir)),
        }
    )


def _resolve_rs3(rs3: Rs3Config, base_dir: Path) -> Rs3Config:
    sources = [
        s.model_copy(
            update={
                "path": str(_resolve_path(s.path, base_dir)),
                "metadata": None if s.metadata is None else str(_resolve_path(s.metadata, base_dir)),
            }
        )
        for s in rs3.sources
    ]
    meta = rs3.meta.model_copy(update={"templates": _resolve_list(rs3.meta.templates, base_dir)})
    return rs3.model_copy(update={"sources": sources, "meta": meta})


def _resolve_path(value: str, base_dir: Path) -> Path:
    return Path(value) if Path(value).is_absolute() else (base_dir / value).resolve()


def _resolve_list(value: str, base_dir: Path) -> str:
    """A list (keywords, prompts) given as a relative file path resolves against the config; a version
    name stays."""
    candidate = base_dir / value
    return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.is_file() else value


def _resolve_source(source: SourceConfig, base_dir: Path) -> SourceConfig:
    if "://" in source.path or Path(source.path).is_absolute():
        return source
    return source.model_copy(update={"path": str((base_dir / source.path).resolve())})


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    data = read_yaml_mapping(path)
    return parse_config(data, origin=str(path), base_dir=path.parent)


def as_pipeline_config(config: PipelineConfig | str) -> PipelineConfig:
    """A flow's `config` parameter: the config itself (what `rs5m run` passes), or the path of a config file
    (what the deployments pass), relative to the flow run's working directory (the repository root, which
    `prefect deploy` records)."""
    return config if isinstance(config, PipelineConfig) else load_config(config)
