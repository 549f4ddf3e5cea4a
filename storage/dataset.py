"""The released dataset: Parquet shards per split with a dataset card and a manifest, and an optional
WebDataset copy, laid out so that each reader takes its folder as it is.

WORKDIR/release -> releases/<release id>   the current release (a relative symlink, swapped in one rename)
WORKDIR/dataset -> release/dataset         Parquet: `datasets.load_dataset("parquet", data_dir=...)`,
                                           `load_dataset(WORKDIR/dataset)` (the card), DuckDB, training
WORKDIR/webdataset -> release/webdataset   WebDataset (shard.webdataset: true): open_clip_train, webdataset
WORKDIR/releases/<release id>/
  dataset/README.md                        the dataset card: its YAML `configs` name the splits' files
  dataset/manifest.json                    every file below with split, rows, bytes, sha256; totals; schema
  dataset/<split>/part-00000.parquet ...   DATASET_SCHEMA rows, in the order the plan gives them
  webdataset/<split>/shard-00000.tar       the same samples as part-00000.parquet, same order
  webdataset/<split>/sizes.json            samples per tar, which open_clip_train reads (no --train-num-samples)

The tars are beside the Parquet folder, not in it: Hugging Face datasets takes every file under a folder
named after a split as that split's data, tars included. Paths in the manifest are relative to the release
folder, so they hold from WORKDIR too (`dataset/train/part-00000.parquet`). Splits are `train` and `val`
(which Hugging Face names `validation`).

A part holds at most `rows_per_shard` rows and at most `bytes_per_shard` bytes of images: a row whose image
would pass the byte budget starts the next part, and an image larger than the whole budget gets a part of its
own. (The Parquet file adds the other columns, about 200 bytes a row, and its footer.)

Commit protocol: a release is replaced as a whole. The new one is built in `releases/.building-<id>/`
beside the current one, its manifest written last; the folder is then renamed to `releases/<release id>`
(the id is a hash of the manifest: the same rows give the same id) and the `release` symlink is swapped to
it in one rename (`dataset` and `webdataset` point through it). A reader of `WORKDIR/dataset/...` sees the
old release or the new one, never a mix, and the old release stays in place until the new one is complete;
it is deleted after the swap. A build killed half-way leaves a `.building-*` folder, which the next build
(or `rs5m prune`) removes. Same rows in, byte-identical files out: no timestamps, fixed row-group sizes,
fixed tar headers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from storage.atomic import atomic_path, fsync_dir, sha256_file, write_json, write_text
from storage.layout import Layout
from storage.schemas import META_CAPTION_FIELDS, MODEL_CAPTION_FIELDS, RS3_METADATA_FIELDS

SPLITS = ("train", "val")
FORMAT_VERSION = 2  # 2: Parquet under dataset/, tars under webdataset/ with sizes.json, a dataset card
PARQUET_FOLDER = "dataset"
WEBDATASET_FOLDER = "webdataset"
SIZES_FILE = "sizes.json"  # open_clip_train's name (open_clip_train.data.get_dataset_size)
CARD_FILE = "README.md"  # where Hugging Face datasets looks for a dataset card
MANIFEST_FILE = "manifest.json"
HF_SPLIT_NAMES = {"train": "train", "val": "validation"}

DATASET_SCHEMA = pa.schema(
    [
        # the downloaded bytes, never re-encoded (EXIF and colour profiles intact)
        pa.field("image", pa.large_binary(), nullable=False),
        pa.field("image_format", pa.string()),  # PIL's name: JPEG, PNG, WEBP, GIF, BMP, TIFF, AVIF, MPO
        pa.field("caption", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("clip_score", pa.float32()),
        pa.field("rs_score", pa.float32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),  # of the image bytes
        pa.field("phash", pa.string()),  # 256-bit DCT hash as 64 hex digits
        pa.field("group_id", pa.string()),  # near-duplicate group this sample kept
        pa.field("matched_keyword", pa.string()),
        pa.field("extra", pa.string()),  # the source's other columns, a JSON object
        pa.field("split", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),  # pub11 (web pairs) | rs3 (captioned RS datasets)
        # RS3 rows only (null for pub11): the meta caption, the ranked model captions, and the metadata
        *META_CAPTION_FIELDS,
        *MODEL_CAPTION_FIELDS,
        *(f.with_nullable(True) for f in RS3_METADATA_FIELDS),
    ]
)

# Row groups stay small so a reader can fetch a few images without a whole part; both limits are fixed
# (not taken from how the rows arrive) so the same rows always give the same file.
ROW_GROUP_ROWS = 256
ROW_GROUP_IMAGE_BYTES = 64 << 20
# Dictionary encoding and min/max statistics only where they help: never on the image bytes (statistics
# would copy two images per row group into the footer).
_DICTIONARY_COLUMNS = ["image_format", "source", "matched_keyword", "split", "subset"]
_STATISTICS_COLUMNS = [name for name in DATASET_SCHEMA.names if name != "image"]
_COMPRESSION = {name: ("none" if name == "image" else "zstd") for name in DATASET_SCHEMA.names}

# WebDataset file extension per PIL format name (MPO: a multi-picture JPEG, decodable as JPEG).
IMAGE_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "AVIF": "avif",
}


class DatasetPlanError(ValueError):
    """Rows that cannot be written as planned (wrong columns, unknown split): a bug upstream."""


@dataclass(frozen=True)
class DatasetPlan:
    """What to write. `batches` yields DATASET_SCHEMA tables in the final order (rows of both splits may
    be mixed; each split keeps its own order); it is consumed once, so the caller can stream images
    without holding the whole dataset. `description` goes into the manifest as is (split rule, order)."""

    batches: Iterable[pa.Table]
    rows_per_shard: int
    bytes_per_shard: int | None = None
    webdataset: bool = False
    description: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetFile:
    path: str  # relative to the release folder (and to WORKDIR), "/"-separated
    kind: str  # "parquet", "webdataset", "webdataset_sizes" or "card"
    split: str | None  # None: the card, which covers both
    rows: int
    image_bytes: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetManifest:
    format_version: int
    files: list[DatasetFile]
    totals: dict[str, Any]
    schema: list[dict[str, Any]]
    sharding: dict[str, Any]
    description: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> DatasetManifest:
        return cls(**{**payload, "files": [DatasetFile(**f) for f in payload["files"]]})


def dataset_dir(layout: Layout) -> Path:
    """The current release's Parquet dataset, as readers open it (a symlink through `release`)."""
    return layout.dataset


def manifest_path(layout: Layout) -> Path:
    return dataset_dir(layout) / MANIFEST_FILE


def read_dataset_manifest(layout: Layout) -> DatasetManifest | None:
    try:
        return DatasetManifest.from_json(json.loads(manifest_path(layout).read_text()))
    except FileNotFoundError:
        return None


def current_release(layout: Layout) -> str | None:
    """The id of the release `release` points at (None: no release yet)."""
    try:
        target = os.readlink(layout.release)
    except (FileNotFoundError, OSError):
        return None
    return Path(target).name


def image_extension(image_format: str | None) -> str:
    """The WebDataset key of the image: a known format's usual extension, else the lowercased name."""
    return IMAGE_EXTENSIONS.get(image_format or "", (image_format or "bin").lower())


def write_dataset(layout: Layout, plan: DatasetPlan) -> DatasetManifest:
    """Build a release beside the current one and make it current (module doc). The caller holds the work
    directory's lock: nobody else builds at the same time."""
    for leftover in layout.releases.glob(".building-*"):  # of a killed build
        shutil.rmtree(leftover)
    building = layout.releases / f".building-{os.getpid()}"
    building.mkdir(parents=True)
    writers = {
        split: _SplitWriter(building, split, plan.rows_per_shard, plan.bytes_per_shard, plan.webdataset)
        for split in SPLITS
    }
    rows_per_source: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    try:
        for batch in plan.batches:
            batch = _conform(batch)
            for split, writer in writers.items():
                rows = batch.filter(pc.equal(batch.column("split"), split))
                if rows.num_rows:
                    writer.add(rows)
                    for count in pc.value_counts(rows.column("source")).to_pylist():
                        counts = rows_per_source[split]
                        counts[count["values"]] = counts.get(count["values"], 0) + count["counts"]
                del rows
            del batch  # before the next batch is read: at most one batch's images are held
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(building, ignore_errors=True)
        raise
    files = [f for split in SPLITS for f in writers[split].files]
    files += [
        _write_sizes(building, split, writers[split].files)
        for split in SPLITS
        if any(f.kind == "webdataset" for f in writers[split].files)
    ]
    totals = {
        **_totals(files),
        "rows_per_source": {split: dict(sorted(rows_per_source[split].items())) for split in SPLITS},
    }
    files.append(_write_card(building, files, totals))
    manifest = DatasetManifest(
        format_version=FORMAT_VERSION,
        files=files,
        totals=totals,
        schema=[{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in DATASET_SCHEMA],
        sharding={
            "rows_per_shard": plan.rows_per_shard,
            "bytes_per_shard": plan.bytes_per_shard,
            "row_group_rows": ROW_GROUP_ROWS,
            "row_group_image_bytes": ROW_GROUP_IMAGE_BYTES,
            "webdataset": plan.webdataset,
        },
        description=dict(plan.description),
    )
    write_json(building / PARQUET_FOLDER / MANIFEST_FILE, manifest.to_json())
    _swap_in(layout, building, release_id(manifest))
    return manifest


def release_id(manifest: DatasetManifest) -> str:
    """A hash of what the release holds: the same rows and sharding give the same id."""
    return hashlib.sha256(json.dumps(manifest.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def release_intact(root: Path, manifest: DatasetManifest) -> bool:
    """Every file the manifest names is in `root` with its size and sha256."""
    for file in manifest.files:
        path = root / file.path
        if not path.is_file() or path.stat().st_size != file.bytes or sha256_file(path) != file.sha256:
            return False
    return True


def _swap_in(layout: Layout, building: Path, release: str) -> None:
    final = layout.releases / release
    if final.exists():
        existing = _read_manifest(final)
        if existing is not None and release_intact(final, existing):
            shutil.rmtree(building)  # the same release is already there, intact (a rerun)
        else:  # damaged on disk: the fresh copy replaces it
            shutil.rmtree(final)
            building.rename(final)
    else:
        building.rename(final)
    fsync_dir(layout.releases)
    for link in (layout.release, layout.dataset, layout.webdataset):
        if link.exists() and not link.is_symlink():
            # a folder where a link belongs: a release an older version wrote in place, or a work directory
            # copied with its links followed. Moved aside, then deleted below like any old release.
            aside = layout.releases / f"previous-{link.name}"
            shutil.rmtree(aside, ignore_errors=True)
            link.rename(aside)
    _point(layout.release, Path("releases") / release)
    # fixed links through `release` (an older version's `dataset` pointed into releases/ itself)
    _point(layout.dataset, Path(layout.release.name) / PARQUET_FOLDER)
    if (final / WEBDATASET_FOLDER).is_dir():
        _point(layout.webdataset, Path(layout.release.name) / WEBDATASET_FOLDER)
    else:
        layout.webdataset.unlink(missing_ok=True)
    fsync_dir(layout.root)
    for other in layout.releases.iterdir():
        if other.name != release and not other.name.startswith(".building-"):
            shutil.rmtree(other)


def _point(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` in one rename (readers see the old target or the new one)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    temporary = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)


def _read_manifest(release_dir: Path) -> DatasetManifest | None:
    try:
        return DatasetManifest.from_json(
            json.loads((release_dir / PARQUET_FOLDER / MANIFEST_FILE).read_text())
        )
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def _conform(batch: pa.Table) -> pa.Table:
    if set(batch.column_names) != set(DATASET_SCHEMA.names):
        raise DatasetPlanError(f"dataset rows need columns {DATASET_SCHEMA.names}, got {batch.column_names}")
    batch = batch.select(DATASET_SCHEMA.names).cast(DATASET_SCHEMA)
    unknown = set(pc.unique(batch.column("split")).to_pylist()) - set(SPLITS)
    if unknown:
        raise DatasetPlanError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    return batch


def _totals(files: list[DatasetFile]) -> dict[str, Any]:
    parquet = [f for f in files if f.kind == "parquet"]
    tars = [f for f in files if f.kind == "webdataset"]
    return {
        "rows": sum(f.rows for f in parquet),
        "rows_per_split": {split: sum(f.rows for f in parquet if f.split == split) for split in SPLITS},
        "image_bytes": sum(f.image_bytes for f in parquet),
        "parquet_files": len(parquet),
        "parquet_bytes": sum(f.bytes for f in parquet),
        "webdataset_files": len(tars),
        "webdataset_bytes": sum(f.bytes for f in tars),
    }


def _rows_to_take(
    image_lengths: np.ndarray, rows_left: int, bytes_left: int | None, part_is_empty: bool
) -> tuple[int, bool]:
    """How many of the next rows go into a part that has `rows_left` rows and `bytes_left` image bytes of
    room, and whether it is then full. Rows go in while their images fit; an image larger than the whole
    budget gets a part of its own."""
    candidates = image_lengths[:rows_left]
    if bytes_left is not None:
        fitting = int(np.searchsorted(np.cumsum(candidates), bytes_left, side="right"))
        if fitting < len(candidates):
            return (1 if fitting == 0 and part_is_empty else fitting), True
    return len(candidates), len(candidates) == rows_left


def _image_lengths(table: pa.Table) -> np.ndarray:
    return pc.binary_length(table.column("image")).to_numpy(zero_copy_only=False).astype(np.int64)


class _Part:
    """One open Parquet part (and its tar), written to temporaries until commit()."""

    def __init__(self, root: Path, split: str, index: int, webdataset: bool) -> None:
        self.split = split
        self.rows = 0
        self.image_bytes = 0
        self.paths = {"parquet": Path(PARQUET_FOLDER) / split / f"part-{index:05d}.parquet"}
        if webdataset:
            self.paths["webdataset"] = Path(WEBDATASET_FOLDER) / split / f"shard-{index:05d}.tar"
        self._root = root
        self._stack = ExitStack()
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        try:
            parquet_tmp = self._stack.enter_context(atomic_path(root / self.paths["parquet"]))
            self._parquet = self._stack.enter_context(
                pq.ParquetWriter(
                    parquet_tmp,
                    DATASET_SCHEMA,
                    compression=_COMPRESSION,
                    use_dictionary=_DICTIONARY_COLUMNS,
                    write_statistics=_STATISTICS_COLUMNS,
                )
            )
            self._tar: tarfile.TarFile | None = None
            if webdataset:
                tar_tmp = self._stack.enter_context(atomic_path(root / self.paths["webdataset"]))
                self._tar = self._stack.enter_context(
                    tarfile.TarFile(tar_tmp, "w", format=tarfile.PAX_FORMAT)
                )
        except BaseException:
            self.abort()
            raise

    def add(self, rows: pa.Table) -> None:
        """Append rows (the caller keeps the part within its budget)."""
        self.rows += rows.num_rows
        lengths = _image_lengths(rows)
        self.image_bytes += int(lengths.sum())
        if self._tar is not None:
            _write_samples(self._tar, rows)
        start = 0
        while start < rows.num_rows:
            bytes_left = ROW_GROUP_IMAGE_BYTES - self._pending_bytes
            take, full = _rows_to_take(
                lengths[start:], ROW_GROUP_ROWS - self._pending_rows, bytes_left, self._pending_rows == 0
            )
            piece = rows.slice(start, take)
            # a group left open keeps a copy, not a view: a view would keep the whole batch in memory
            self._pending.append(piece if full else piece.take(np.arange(take)))
            self._pending_rows += take
            self._pending_bytes += int(lengths[start : start + take].sum())
            start += take
            if full:
                self._flush_row_group()

    def _flush_row_group(self) -> None:
        if self._pending_rows:
            group = pa.concat_tables(self._pending).combine_chunks()
            self._parquet.write_table(group, row_group_size=group.num_rows)
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    def commit(self) -> list[DatasetFile]:
        self._flush_row_group()
        self._stack.close()  # closes the writers, then renames each temporary into place
        return [
            _described_file(self._root, path, kind, self.split, self.rows, self.image_bytes)
            for kind, path in self.paths.items()
        ]

    def abort(self) -> None:
        """Close without committing: the temporaries are deleted, the targets left as they were."""
        error = sys.exc_info()[1] or RuntimeError("dataset write aborted")
        self._stack.__exit__(type(error), error, error.__traceback__)


class _SplitWriter:
    """Feeds one split's rows, in order, into consecutive parts."""

    def __init__(
        self, root: Path, split: str, rows_per_shard: int, bytes_per_shard: int | None, webdataset: bool
    ) -> None:
        self._root = root
        self._split = split
        self._rows_per_shard = rows_per_shard
        self._bytes_per_shard = bytes_per_shard
        self._webdataset = webdataset
        self._part: _Part | None = None
        self.files: list[DatasetFile] = []

    def add(self, rows: pa.Table) -> None:
        lengths = _image_lengths(rows)
        start = 0
        while start < rows.num_rows:
            if self._part is None:
                index = sum(1 for f in self.files if f.kind == "parquet")
                self._part = _Part(self._root, self._split, index, self._webdataset)
            part = self._part
            bytes_left = None if self._bytes_per_shard is None else self._bytes_per_shard - part.image_bytes
            take, full = _rows_to_take(
                lengths[start:], self._rows_per_shard - part.rows, bytes_left, part.rows == 0
            )
            part.add(rows.slice(start, take))
            start += take
            if full:
                self._commit()

    def finish(self) -> None:
        if self._part is not None:
            self._commit()

    def _commit(self) -> None:
        part, self._part = self._part, None
        self.files.extend(part.commit())

    def abort(self) -> None:
        if self._part is not None:
            self._part.abort()
            self._part = None


def _write_sizes(root: Path, split: str, files: list[DatasetFile]) -> DatasetFile:
    """webdataset/<split>/sizes.json: samples per tar name, as open_clip_train reads it."""
    sizes = {Path(f.path).name: f.rows for f in files if f.kind == "webdataset"}
    path = Path(WEBDATASET_FOLDER) / split / SIZES_FILE
    write_json(root / path, sizes)
    return _described_file(root, path, "webdataset_sizes", split, sum(sizes.values()))


def _write_card(root: Path, files: list[DatasetFile], totals: dict[str, Any]) -> DatasetFile:
    """dataset/README.md: a Hugging Face dataset card whose `configs` name each split's Parquet files."""
    path = Path(PARQUET_FOLDER) / CARD_FILE
    write_text(root / path, dataset_card(files, totals))
    return _described_file(root, path, "card", None, totals["rows"])


def dataset_card(files: list[DatasetFile], totals: dict[str, Any]) -> str:
    """The card's text: the same files give the same text (no dates)."""
    splits = [s for s in SPLITS if totals["rows_per_split"][s]]
    front = {
        "pretty_name": "Remote-sensing image-text pairs (rs5m-pipeline release)",
        "task_categories": ["zero-shot-image-classification", "image-to-text", "text-to-image"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": HF_SPLIT_NAMES[s], "path": f"{s}/*.parquet"} for s in splits],
            }
        ],
    }
    sources = sorted({name for split in SPLITS for name in totals["rows_per_source"][split]})
    source_rows = [
        f"| {name} | " + " | ".join(str(totals["rows_per_source"][s].get(name, 0)) for s in SPLITS) + " |"
        for name in sources
    ]
    has_tars = any(f.kind == "webdataset" for f in files)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        "# Remote-sensing image-text pairs",
        "",
        f"Built by rs5m-pipeline: {totals['rows']} image-text pairs, "
        + ", ".join(f"{s} {totals['rows_per_split'][s]}" for s in SPLITS)
        + " (`val` is the `validation` split). Every file, with its sha256, is listed in `manifest.json`.",
        "",
        "| source | " + " | ".join(SPLITS) + " |",
        "|---|" + "---|" * len(SPLITS),
        *source_rows,
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import Image, load_dataset",
        'pairs = load_dataset("parquet", data_dir="WORKDIR/dataset")  # or load_dataset("WORKDIR/dataset")',
        'pairs = pairs.cast_column("image", Image())  # the original bytes, decoded as PIL images',
        "```",
        "",
        "DuckDB: `SELECT source, count(*) FROM 'WORKDIR/dataset/*/*.parquet' GROUP BY source`.",
    ]
    if has_tars:
        lines += [
            "",
            "open_clip_train reads the WebDataset copy, whose `sizes.json` gives the sample counts: "
            "`--train-data 'WORKDIR/webdataset/train/shard-{00000..NNNNN}.tar' --dataset-type webdataset`.",
        ]
    lines += [
        "",
        "## Columns",
        "",
        "`image` holds the image bytes as downloaded (never re-encoded; `image_format` names the format), "
        "`caption` the text. The other columns say where each pair came from and why it was kept: "
        + ", ".join(f"`{name}`" for name in DATASET_SCHEMA.names if name not in ("image", "caption"))
        + ". RS3 rows (`subset` = rs3) add the meta caption, the ranked model captions and the image's "
        "metadata; web rows (`subset` = pub11) leave those null.",
        "",
        "## Licence",
        "",
        "Images keep their owners' licences: each row names its `source` and its `url`. Check them before "
        "redistributing.",
        "",
    ]
    return "\n".join(lines)


def _described_file(
    root: Path, path: Path, kind: str, split: str | None, rows: int, image_bytes: int = 0
) -> DatasetFile:
    """The manifest's entry for a written file: its size and sha256 read back from disk."""
    target = root / path
    return DatasetFile(
        path=path.as_posix(),
        kind=kind,
        split=split,
        rows=rows,
        image_bytes=image_bytes,
        bytes=target.stat().st_size,
        sha256=sha256_file(target),
    )


def _write_samples(tar: tarfile.TarFile, rows: pa.Table) -> None:
    """WebDataset members per sample, names sorted within it: <sample_id>.<ext> (the original bytes),
    .json (every other column, `extra` parsed into an object) and .txt (the caption, empty if none)."""
    for row in rows.to_pylist():
        key = row["sample_id"]
        image = row.pop("image")
        metadata = {**row, "extra": json.loads(row["extra"]) if row["extra"] is not None else None}
        members = {
            f"{key}.{image_extension(row['image_format'])}": image,
            f"{key}.json": json.dumps(
                metadata, sort_keys=True, ensure_ascii=False, default=_json_value
            ).encode(),
            f"{key}.txt": (row["caption"] or "").encode(),
        }
        for name in sorted(members):
            _add_member(tar, name, members[name])


def _json_value(value: Any) -> str:
    """What JSON cannot hold as is: a timestamp, as ISO 8601 with its UTC offset."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
