"""Versioned files shipped with the project (keyword lists, prompt ensembles): a config names either a
version ("rs-v1") or a file path."""

from __future__ import annotations

import re
from pathlib import Path

VERSION_PATTERN = re.compile(r"^[a-z0-9]+-v[0-9]+$")


def resolve_shipped(value: str, folder: Path, suffix: str, what: str) -> Path:
    """A shipped version -> `folder/<version><suffix>`; anything else is a file path. A ValueError names
    what is missing (and, for a version, which ones are shipped)."""
    if VERSION_PATTERN.match(value):
        path = folder / f"{value}{suffix}"
        if not path.is_file():
            names = (p.name.removesuffix(suffix) for p in folder.glob(f"*{suffix}"))
            shipped = sorted(names, key=_version_order)
            raise ValueError(f"unknown {what} version {value!r} (shipped: {', '.join(shipped)})")
        return path
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} file not found: {value}")
    return path


def _version_order(name: str) -> tuple[str, int, str]:
    """rs-v2 before rs-v10; a name that is no version after the versions of its prefix."""
    found = re.fullmatch(r"(.*-v)([0-9]+)", name)
    return (found[1], int(found[2]), "") if found else (name, 1 << 62, name)
