"""Durable atomic file writes: write to a temporary sibling, fsync it, rename it over the target, fsync the
folder.

A reader never sees a half-written file; a process killed mid-write leaves only a `.<name>.tmp-*` sibling
(removed by the next write of the same stage, see `remove_temporaries`). Syncing the folder after the rename
makes the order of two writes survive a power loss too: "the marker is written last" holds on disk, not only
in the page cache. A full disk raises `DiskFullError`, which names the file and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TEMPORARY_INFIX = ".tmp-"
# The mode open() would give a new file: mkstemp makes it owner-only, and a released dataset, a report or a
# manifest would then be unreadable to the other people who share the work directory.
_UMASK = os.umask(0)
os.umask(_UMASK)
NEW_FILE_MODE = 0o666 & ~_UMASK


class DiskFullError(OSError):
    """No space left while writing a work-directory file; nothing was replaced, a rerun resumes."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename, a new or deleted file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_durably(path: Path) -> None:
    """Delete a file (if present) and sync its folder, so the deletion is on disk before what follows."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to target; on success it replaces target in one rename, durably."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}{TEMPORARY_INFIX}", dir=target.parent)
    except OSError as error:
        raise _described(error, target) from error
    try:
        os.fchmod(fd, NEW_FILE_MODE)
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except OSError as error:
            raise _described(error, target) from error
    finally:
        tmp.unlink(missing_ok=True)


def _described(error: OSError, target: Path) -> OSError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return DiskFullError(
            errno.ENOSPC,
            f"no space left on the device while writing {target}; nothing was replaced: free space and "
            "rerun the same command to resume",
        )
    return error


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode())


def write_json(target: Path, payload: Any) -> None:
    write_text(target, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(target: Path, table: pa.Table) -> None:
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries that killed writers left anywhere under `folder`; returns them."""
    if not folder.exists():
        return []
    leftovers = sorted(p for p in folder.rglob(f".*{TEMPORARY_INFIX}*") if p.is_file())
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
