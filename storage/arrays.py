"""Per-row arrays stored beside a shard: `<stage>/arrays/<shard>.<name>.npy`, row i belongs to the shard's
data row i (embeddings, float16). NumPy's format: memory-mappable, and readable without this project."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from storage.atomic import atomic_path
from storage.layout import Layout


class ArrayMismatchError(RuntimeError):
    """Arrays whose row count differs from their shard's: a bug or a damaged work directory."""


def write_arrays(
    layout: Layout, stage: str, shard_id: str, arrays: Mapping[str, np.ndarray], rows: int
) -> list[Path]:
    """Write each array atomically; returns the files written."""
    written = []
    for name, array in arrays.items():
        if array.shape[0] != rows:
            raise ArrayMismatchError(
                f"{stage}/{shard_id}: array {name!r} has {array.shape[0]} rows, shard {rows}"
            )
        path = layout.array(stage, shard_id, name)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        written.append(path)
    return written


def read_arrays(
    layout: Layout, stage: str, shard_id: str, names: Iterable[str], rows: int | None = None
) -> dict[str, np.ndarray]:
    arrays = {}
    for name in names:
        array = np.load(layout.array(stage, shard_id, name), mmap_mode="r", allow_pickle=False)
        if rows is not None and array.shape[0] != rows:
            raise ArrayMismatchError(
                f"{stage}/{shard_id}: array {name!r} has {array.shape[0]} rows, shard {rows}"
            )
        arrays[name] = array
    return arrays
