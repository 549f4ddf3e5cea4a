"""Where everything lives under a work directory. Every path the pipeline reads or writes comes from here.

WORKDIR/
  catalog.duckdb                     DuckDB views over the Parquet below (no tables)
  runs/<run_id>.json                 one record per run: config, stages, outcome
  <stage>/data/<shard_id>.parquet    the stage's survivors, the next stage's input
  <stage>/ledger/<shard_id>.parquet  one fate per sample that entered the stage
  <stage>/markers/<unit>.json        completion marker of a shard (ingest: of a source)
  <stage>/manifest.json              written once every shard of the stage is done
  <stage>/scratch/<shard_id>/        working space of an unfinished shard (download), wiped on reuse
  cache/eval/<name>-<key>.npz        an eval set's perceptual hashes and embeddings (decontaminate)
  detectors/<name>.json              linear-probe RS detectors trained by `rs5m train-detector`
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


def shard_name(source: str, index: int) -> str:
    """The id of a source's index-th ingest shard; every later stage keeps it."""
    return f"{source}-{index:05d}"


def shard_source(shard_id: str) -> str:
    """The source a shard id was made from (source names may contain '-', the index never does)."""
    return shard_id.rsplit("-", 1)[0]


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    def run_record(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.json"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def data(self, stage: str, shard_id: str) -> Path:
        return self.stage_dir(stage) / "data" / f"{shard_id}.parquet"

    def ledger(self, stage: str, shard_id: str) -> Path:
        return self.stage_dir(stage) / "ledger" / f"{shard_id}.parquet"

    def array(self, stage: str, shard_id: str, name: str) -> Path:
        return self.stage_dir(stage) / "arrays" / f"{shard_id}.{name}.npy"

    def marker(self, stage: str, unit: str) -> Path:
        return self.stage_dir(stage) / "markers" / f"{unit}.json"

    def manifest(self, stage: str) -> Path:
        return self.stage_dir(stage) / "manifest.json"

    def fresh_scratch(self, stage: str, shard_id: str) -> Path:
        """An empty working folder for one shard; whatever a killed attempt left there is removed first."""
        path = self.stage_dir(stage) / "scratch" / shard_id
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def remove_scratch(self, stage: str, shard_id: str) -> None:
        shutil.rmtree(self.stage_dir(stage) / "scratch" / shard_id, ignore_errors=True)

    def remove_unlisted(
        self, stage: str, shards: set[str], units: set[str], failed_sources: set[str]
    ) -> list[Path]:
        """Deletes the stage's files of shards and units it no longer has (a source that shrank or left the
        config), so that reading `<stage>/ledger/*.parquet` directly gives one fate per current sample.
        Files of a source that failed this run stay: when it reads again, its shards resume instead of being
        downloaded again. Returns what was removed."""

        def stale(name: str, keep: set[str]) -> bool:
            return (
                name not in keep and name not in failed_sources and shard_source(name) not in failed_sources
            )

        stage_dir = self.stage_dir(stage)
        removed: list[Path] = []
        for folder, suffix, keep in (
            ("data", ".parquet", shards),
            ("ledger", ".parquet", shards),
            ("arrays", ".npy", shards),
            ("markers", ".json", units),
        ):
            for path in sorted((stage_dir / folder).glob(f"*{suffix}")):
                name = path.name.removesuffix(suffix)
                owner = name.rsplit(".", 1)[0] if folder == "arrays" else name  # <shard>.<array>.npy
                if stale(owner, keep):
                    path.unlink()
                    removed.append(path)
        for path in sorted((stage_dir / "scratch").glob("*")):
            if stale(path.name, shards):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def detector(self, name: str) -> Path:
        return self.root / "detectors" / f"{name}.json"

    def eval_cache(self, name: str, key: str) -> Path:
        """Cached index of eval set `name`; `key` hashes what it was computed from (model, files)."""
        return self.root / "cache" / "eval" / f"{name}-{key}.npz"

    def demo_sources(self) -> Path:
        return self.root / "demo_sources"
