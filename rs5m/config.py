"""The pipeline's typed configuration: parsed and validated once, when a run starts.

Every stage reads only its own section; the fields of that section go into the stage's fingerprint, so
changing one reruns that stage and marks every later stage stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Fields that change only how fast a stage runs, never what it outputs: left out of stage fingerprints.
_SPEED_ONLY = {"affects_output": False}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SOURCE_FORMATS = ("parquet", "csv", "tsv", "jsonl")


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

    @model_validator(mode="after")
    def _headerless_needs_names(self) -> SourceConfig:
        if self.format in ("csv", "tsv") and not self.header and not self.column_names:
            raise ValueError("a csv/tsv source without header needs column_names")
        if self.format in ("parquet", "jsonl") and not self.header:
            raise ValueError("header: false applies to csv/tsv only")
        return self


class IngestConfig(Strict):
    shard_rows: int = Field(
        10_000, ge=1, description="Rows per ingest shard; later stages keep the sharding."
    )


class KeywordConfig(Strict):
    keywords: str = Field("rs-v1", description="Shipped list version (rs-v1) or a path to a keyword file.")
    exclusions: str = Field(
        "rs-v1", description="Shipped list version (rs-v1) or a path to an exclusion file."
    )


class DownloadConfig(Strict):
    processes: int = Field(2, ge=1, description="img2dataset processes_count.", json_schema_extra=_SPEED_ONLY)
    threads: int = Field(16, ge=1, description="img2dataset thread_count.", json_schema_extra=_SPEED_ONLY)
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout.")
    retries: int = Field(0, ge=0, description="img2dataset's own retries per URL.")
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


class RunnerConfig(Strict):
    shard_concurrency: int = Field(2, ge=1, description="Shards processed at once by CPU stages.")
    download_concurrency: int = Field(
        1, ge=1, description="Download shards at once (each already uses processes x threads)."
    )


class PipelineConfig(Strict):
    workdir: Path
    sources: list[SourceConfig] = Field(min_length=1)
    ingest: IngestConfig = IngestConfig()
    keyword: KeywordConfig = KeywordConfig()
    download: DownloadConfig = DownloadConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    runner: RunnerConfig = RunnerConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique, repeated: {', '.join(duplicates)}")
        return sources

    def source(self, name: str) -> SourceConfig:
        return next(s for s in self.sources if s.name == name)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the bad field."""


def _describe(error: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def parse_config(
    data: dict[str, Any], origin: str = "<dict>", base_dir: Path | None = None
) -> PipelineConfig:
    """Validate a config mapping; relative workdir and source paths resolve against base_dir."""
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, origin)) from None
    if base_dir is None:
        return config
    return config.model_copy(
        update={
            "workdir": (base_dir / config.workdir).resolve(),
            "sources": [_resolve_source(s, base_dir) for s in config.sources],
            "keyword": config.keyword.model_copy(
                update={
                    name: _resolve_list(getattr(config.keyword, name), base_dir)
                    for name in ("keywords", "exclusions")
                }
            ),
        }
    )


def _resolve_list(value: str, base_dir: Path) -> str:
    """A keyword list given as a relative file path resolves against the config; a version name stays."""
    candidate = base_dir / value
    return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.is_file() else value


def _resolve_source(source: SourceConfig, base_dir: Path) -> SourceConfig:
    if "://" in source.path or Path(source.path).is_absolute():
        return source
    return source.model_copy(update={"path": str((base_dir / source.path).resolve())})


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return parse_config(data, origin=str(path), base_dir=path.parent)
