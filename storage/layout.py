"""Where everything lives under a work directory. Every path the pipeline reads or writes comes from here.

WORKDIR/
  .rs5m.lock, .rs5m.lock.json        the writer's lock (held by the one run writing here) and who holds it
  catalog.duckdb                     DuckDB views over the Parquet below (no tables)
  runs/<run_id>.json                 one record per run: config, stages, outcome
  release -> releases/<id>           the current release (a symlink, swapped in one rename)
  dataset -> release/dataset         its Parquet dataset (what Hugging Face datasets, DuckDB, training read)
  webdataset -> release/webdataset   its WebDataset tars, when the release has them (open_clip_train)
  releases/<id>/                     complete releases; releases/.building-<run>/ one being written
  <stage>/data/<shard_id>.parquet    the stage's survivors, the next stage's input
  <stage>/ledger/<shard_id>.parquet  one fate per sample that entered the stage
  <stage>/markers/<unit>.json        completion marker of a shard (ingest: of a source)
  <stage>/manifest.json              written once every shard of the stage is done
  <stage>/started.json               the stage is running (or was, when a run was killed): removed at its end
  <stage>/scratch/<shard_id>/        working space of an unfinished shard (download), wiped on reuse
  cache/eval/<name>-<key>.npz        an eval set's perceptual hashes and embeddings (decontaminate)
  detectors/<name>.json              linear-probe RS detectors trained by `rs5m train-detector`
  train/<run_name>/                  a training run (TrainLayout): run record, metrics, checkpoints
"""

from __future__ import annotations

import re
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

    @property
    def lock_file(self) -> Path:
        return self.root / ".rs5m.lock"

    @property
    def lock_holder(self) -> Path:
        return self.root / ".rs5m.lock.json"

    def relative(self, path: Path) -> str:
        """A path under the work directory as recorded in markers: relative, "/"-separated."""
        return Path(path).relative_to(self.root).as_posix()

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run_record(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.json"

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

    def started(self, stage: str) -> Path:
        return self.stage_dir(stage) / "started.json"

    def scratch_root(self, stage: str) -> Path:
        return self.stage_dir(stage) / "scratch"

    @property
    def release(self) -> Path:
        """The current release: a symlink into releases/, swapped in one rename."""
        return self.root / "release"

    @property
    def dataset(self) -> Path:
        """The current release's Parquet dataset (readers open WORKDIR/dataset/...), through `release`."""
        return self.root / "dataset"

    @property
    def webdataset(self) -> Path:
        """The current release's WebDataset tars, through `release`."""
        return self.root / "webdataset"

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    def fresh_scratch(self, stage: str, shard_id: str) -> Path:
        """An empty working folder for one shard; whatever a killed attempt left there is removed first."""
        path = self.scratch_root(stage) / shard_id
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def remove_scratch(self, stage: str, shard_id: str) -> None:
        shutil.rmtree(self.scratch_root(stage) / shard_id, ignore_errors=True)

    def detector(self, name: str) -> Path:
        return self.root / "detectors" / f"{name}.json"

    def eval_cache(self, name: str, key: str) -> Path:
        """Cached index of eval set `name`; `key` hashes what it was computed from (model, files)."""
        return self.root / "cache" / "eval" / f"{name}-{key}.npz"

    def demo_sources(self) -> Path:
        return self.root / "demo_sources"


_CHECKPOINT = re.compile(r"^step-(\d{6,})\.state\.pt$")


@dataclass(frozen=True)
class TrainLayout:
    """Where a training run's files live: WORKDIR/train/<run_name>/ (models/train.py's docstring says what
    each is)."""

    workdir: Path
    run_name: str

    @property
    def root(self) -> Path:
        return self.workdir / "train" / self.run_name

    @property
    def run_record(self) -> Path:
        return self.root / "run.json"

    @property
    def launch_config(self) -> Path:
        return self.root / "launch.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".train.lock"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def weights(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}.pt"

    def state(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}.state.pt"

    @property
    def final(self) -> Path:
        return self.checkpoints / "final.pt"

    def latest_checkpoint(self) -> int | None:
        """The step of the newest complete checkpoint (state file and weights both there), None if none."""
        if not self.checkpoints.is_dir():
            return None
        steps = [int(m.group(1)) for p in self.checkpoints.iterdir() if (m := _CHECKPOINT.match(p.name))]
        complete = [step for step in steps if self.weights(step).is_file()]
        return max(complete, default=None)
