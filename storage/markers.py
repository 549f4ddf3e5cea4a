"""Completion markers (per shard) and manifests (per stage): what makes a rerun resume instead of redo.

A shard is done when its marker exists, names the current stage fingerprint, and records the same input
checksums as the inputs have now. A stage is complete when its manifest exists and was built on the
upstream manifest that is there now; so a stage rerun with a new fingerprint rewrites its manifest and
every later stage becomes stale, while earlier stages are untouched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from storage.atomic import write_json
from storage.layout import Layout

# Bump a stage's version when its code changes what it outputs: every shard of it reruns.
STAGE_CODE_VERSIONS = {
    "ingest": "1",
    "keyword": "1",
    "download": "1",
    "validate": "1",
    "embed": "1",
    "filter": "1",
    "dedup": "1",
    "decontaminate": "1",
    "shard": "1",
}


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def output_fields(section: BaseModel) -> dict[str, Any]:
    """The config fields that can change a stage's output; fields marked `affects_output: False`
    (processes, threads, batch sizes) are left out, so tuning them never reruns anything."""
    values: dict[str, Any] = {}
    for name, info in type(section).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("affects_output") is False:
            continue
        value = getattr(section, name)
        values[name] = output_fields(value) if isinstance(value, BaseModel) else _plain(value)
    return values


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return output_fields(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def stage_fingerprint(
    stage: str, sections: dict[str, BaseModel], identity: dict[str, str] | None = None
) -> str:
    payload = {
        "stage": stage,
        "config": {name: output_fields(section) for name, section in sorted(sections.items())},
        "identity": identity or {},
        "code_version": STAGE_CODE_VERSIONS[stage],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Marker:
    stage: str
    unit: str
    fingerprint: str
    inputs: dict[str, str]
    outputs: dict[str, str]  # shard_id -> sha256 of its data file
    counts: dict[str, dict[str, int]]  # shard_id -> {"kept": n, "dropped:<reason>": n}
    run_id: str
    finished_at: str
    extra: dict[str, Any] = field(default_factory=dict)


def write_marker(layout: Layout, marker: Marker) -> None:
    write_json(layout.marker(marker.stage, marker.unit), asdict(marker))


def read_marker(layout: Layout, stage: str, unit: str) -> Marker | None:
    path = layout.marker(stage, unit)
    try:
        return Marker(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError):
        return None  # an unreadable marker means "not done": the shard reruns


def marker_is_current(marker: Marker | None, fingerprint: str, inputs: dict[str, str]) -> bool:
    return marker is not None and marker.fingerprint == fingerprint and marker.inputs == inputs


@dataclass(frozen=True)
class Manifest:
    stage: str
    fingerprint: str
    upstream_identity: str | None  # manifest_identity() of the upstream stage this stage was built on
    shards: dict[str, str]  # shard_id -> sha256 of its data file
    counts: dict[str, dict[str, int]]
    failed_sources: dict[str, str]  # source -> error, for sources that could not be read
    run_id: str
    finished_at: str


def write_manifest(layout: Layout, manifest: Manifest) -> None:
    write_json(layout.manifest(manifest.stage), asdict(manifest))


def read_manifest(layout: Layout, stage: str) -> Manifest | None:
    try:
        return Manifest(**json.loads(layout.manifest(stage).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def manifest_identity(layout: Layout, stage: str) -> str | None:
    """A hash of what a stage's output is (fingerprint, shard checksums, failed sources), not of when or by
    which run it was made: rerunning a stage that produces the same shards leaves later stages current."""
    manifest = read_manifest(layout, stage)
    if manifest is None:
        return None
    content = {
        "fingerprint": manifest.fingerprint,
        "shards": manifest.shards,
        "failed": manifest.failed_sources,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def invalidate_manifest(layout: Layout, stage: str) -> None:
    """A stage that starts running is no longer complete until it finishes."""
    layout.manifest(stage).unlink(missing_ok=True)
