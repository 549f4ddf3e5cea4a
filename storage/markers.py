"""Completion markers (per shard) and manifests (per stage): what makes a rerun resume instead of redo.

A shard is done when its marker exists, names the current stage fingerprint, and records the same input
checksums as the inputs have now. A stage is complete when its manifest exists and was built on the
upstream manifest that is there now; so a stage rerun with a new fingerprint rewrites its manifest and
every later stage becomes stale, while earlier stages are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from storage.atomic import remove_durably, sha256_file, write_json
from storage.layout import Layout


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
    stage: str, sections: dict[str, BaseModel | None], identity: dict[str, str], code_version: str
) -> str:
    """A hash of everything that decides what a stage writes: its name, the output-affecting fields of its
    config sections, the identity of what it reads besides (lists, models) and its code version."""
    payload = {
        "stage": stage,
        "config": {
            name: None if section is None else output_fields(section)
            for name, section in sorted(sections.items())
        },
        "identity": identity,
        "code_version": code_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# The one unit of a stage that sees all shards at once (dedup, shard): its marker covers every shard.
GLOBAL_UNIT = "_all"

# A work-directory file as it was written: path relative to the work directory -> {"sha256", "bytes"}.
FileDigests = dict[str, dict[str, Any]]
Verification = Literal["checksum", "size"]


def digest_files(layout: Layout, paths: Iterable[Path]) -> FileDigests:
    """The digests of files just written (read back from the page cache: cheap next to writing them)."""
    return {
        layout.relative(path): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(paths)
    }


def damaged_file(layout: Layout, files: FileDigests, verify: Verification) -> str | None:
    """The first file that is missing, has another size, or (verify="checksum") another sha256 than
    recorded, as a message; None when all are intact."""
    for relative, digest in sorted(files.items()):
        path = layout.root / relative
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return f"{relative} is missing"
        if size != digest["bytes"]:
            return f"{relative} has {size} bytes, {digest['bytes']} were written"
        if verify == "checksum" and sha256_file(path) != digest["sha256"]:
            return f"{relative} does not match its checksum (damaged on disk)"
    return None


@dataclass(frozen=True)
class Marker:
    """A unit (shard, source or whole stage) is done: with this fingerprint, from these inputs, and these
    exact files (`files`: every data, ledger and array file the unit wrote, with sha256 and size)."""

    stage: str
    unit: str
    fingerprint: str
    inputs: dict[str, str]
    outputs: dict[str, str]  # shard_id -> sha256 of its data file
    counts: dict[str, dict[str, int]]  # shard_id -> {"kept": n, "dropped:<reason>": n}
    run_id: str
    finished_at: str
    extra: dict[str, Any] = field(default_factory=dict)
    files: FileDigests = field(default_factory=dict)


def write_marker(layout: Layout, marker: Marker) -> None:
    write_json(layout.marker(marker.stage, marker.unit), asdict(marker))


def read_marker(layout: Layout, stage: str, unit: str) -> Marker | None:
    path = layout.marker(stage, unit)
    try:
        return Marker(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        return None  # an unreadable marker means "not done": the shard reruns


def remove_marker(layout: Layout, stage: str, unit: str) -> None:
    """The unit is about to be rewritten: from now until its new marker, it is not done, even across a
    crash or a power loss (the deletion is synced before any output is touched)."""
    remove_durably(layout.marker(stage, unit))


def marker_is_current(marker: Marker | None, fingerprint: str, inputs: dict[str, str]) -> bool:
    return marker is not None and marker.fingerprint == fingerprint and marker.inputs == inputs


def current_marker(
    layout: Layout, stage: str, unit: str, fingerprint: str, inputs: dict[str, str], verify: Verification
) -> Marker | None:
    """The unit's marker if the unit can be skipped: same fingerprint and inputs, and every file it
    records still on disk as written. A marker without file records (an older version) is not current."""
    marker = read_marker(layout, stage, unit)
    if not marker_is_current(marker, fingerprint, inputs) or not marker.files:
        return None
    if damaged_file(layout, marker.files, verify) is not None:
        return None
    return marker


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
    upstreams: list[str] | None = (
        None  # the stages it was built on ([] for a first stage; None: not recorded)
    )


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


def upstreams_identity(layout: Layout, upstreams: Sequence[str]) -> str | None:
    """The identity of what a stage reads now: its upstream's manifest identity (one upstream), a hash of
    them all (several: the release), None (a first stage)."""
    identities = [manifest_identity(layout, upstream) for upstream in upstreams]
    if len(identities) <= 1:
        return identities[0] if identities else None
    return hashlib.sha256(json.dumps(identities).encode()).hexdigest()


def invalidate_manifest(layout: Layout, stage: str) -> None:
    """A stage that starts running is no longer complete until it finishes."""
    remove_durably(layout.manifest(stage))
