"""What `rs5m prune WORKDIR` deletes: files no current manifest names.

A run never deletes a shard's files because its source left the config or shrank: leaving a source out for
one run must not throw away its downloads. Pruning is explicit. It plans, per stage folder that has a
manifest, the data, ledger, array and marker files of shards and units the manifest does not name (the
files of sources the manifest records as failed are kept: they resume when the source reads again), plus
everywhere: download scratch folders, temporaries of killed writers, and releases other than the current
one. A stage without a manifest (running, failed, interrupted) is left alone, since its files may be what
its rerun resumes from. The caller holds the work directory's lock.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from storage.atomic import TEMPORARY_INFIX
from storage.dataset import current_release
from storage.layout import Layout, shard_source
from storage.markers import GLOBAL_UNIT, read_manifest

_SHARD_FILES = {"data": ".parquet", "ledger": ".parquet", "arrays": ".npy"}


@dataclass
class PrunePlan:
    paths: list[Path] = field(default_factory=list)  # files and folders to delete
    bytes: int = 0
    by_group: dict[str, tuple[int, int]] = field(default_factory=dict)  # group -> (entries, bytes)
    skipped_stages: list[str] = field(default_factory=list)  # no manifest: left alone

    def add(self, group: str, path: Path) -> None:
        size = _size(path)
        self.paths.append(path)
        self.bytes += size
        entries, total = self.by_group.get(group, (0, 0))
        self.by_group[group] = (entries + 1, total + size)


def plan_prune(layout: Layout) -> PrunePlan:
    plan = PrunePlan()
    for stage_dir in sorted(p for p in layout.root.iterdir() if p.is_dir() and (p / "markers").is_dir()):
        stage = stage_dir.name
        manifest = read_manifest(layout, stage)
        if manifest is None:
            plan.skipped_stages.append(stage)
            continue
        shards, failed = set(manifest.shards), set(manifest.failed_sources)

        def kept(name: str, units: set[str], failed: set[str] = failed) -> bool:
            return name in units or name in failed or shard_source(name) in failed

        for folder, suffix in _SHARD_FILES.items():
            for path in sorted((stage_dir / folder).glob(f"*{suffix}")):
                name = path.name.removesuffix(suffix)
                owner = name.rsplit(".", 1)[0] if folder == "arrays" else name  # <shard>.<array>.npy
                if not kept(owner, shards):
                    plan.add(f"{stage}/{folder}", path)
        units = shards | {shard_source(s) for s in shards} | {GLOBAL_UNIT}
        for path in sorted((stage_dir / "markers").glob("*.json")):
            if not kept(path.stem, units):
                plan.add(f"{stage}/markers", path)
        for path in sorted(layout.scratch_root(stage).glob("*")):
            plan.add(f"{stage}/scratch", path)
    for path in sorted(layout.root.rglob(f".*{TEMPORARY_INFIX}*")):
        if path.is_file() or path.is_symlink():
            plan.add("temporaries", path)
    release = current_release(layout)
    if layout.releases.is_dir():
        for path in sorted(layout.releases.iterdir()):
            if path.name != release:
                plan.add("releases", path)
    return plan


def apply_prune(plan: PrunePlan) -> None:
    for path in plan.paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0
