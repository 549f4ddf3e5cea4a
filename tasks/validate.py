"""validate: check each downloaded image by decoding it fully, and record what it is.

Per row: read only the header (size, format), refuse oversized images before any pixel is decoded
(decompression bombs) and undersized ones without decoding, then decode the first frame completely so a
truncated or corrupt body is caught here and not in a training job. Kept rows carry the sha256 of the
original bytes (never re-encoded: EXIF orientation and colour profiles stay as downloaded), the stored width
and height (before any EXIF rotation) and PIL's format name (JPEG, PNG, WEBP, GIF, MPO for multi-picture
JPEGs, ...).

Only the formats in IMAGE_FORMATS are opened: PIL can also open formats that hand the bytes to external
programs (EPS runs Ghostscript), which untrusted web content must not reach.
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import warnings
from typing import NamedTuple

import pyarrow as pa
from PIL import Image, ImageFile

from rs5m.config import ValidateConfig
from storage.schemas import VALIDATE_SCHEMA
from tasks.harness import Report, ShardStage
from tasks.stage import ShardOutcome, split_by_reason

REASONS = {
    "too_large": "the header declares more pixels than max_pixels or a side above max_side (not decoded)",
    "undecodable": "no bytes, not an image of an accepted format, or the header cannot be read",
    "truncated": "the header is fine but the data ends early or is corrupt when fully decoded",
    "too_small": "the shorter side is below min_side",
}

# The columns validate adds to whatever rows it reads (PUB11's downloads, RS3's images).
ADDED_FIELDS = tuple(VALIDATE_SCHEMA.field(name) for name in ("sha256", "width", "height", "image_format"))


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


class _Check(NamedTuple):
    reason: str | None
    detail: str | None = None
    width: int = 0
    height: int = 0
    image_format: str | None = None


def validate_shard(table: pa.Table, config: ValidateConfig) -> ShardOutcome:
    """Decide every row of a shard with an `image` column; survivors come back with their columns plus
    sha256, width, height and image_format (VALIDATE_SCHEMA for a DOWNLOAD_SCHEMA shard), in input order."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Set process-wide by some other code; PIL would then pad truncated images instead of failing.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: cannot detect truncation"
        )
    reasons: list[str | None] = []
    details: list[str | None] = []
    hashes: list[str] = []
    widths: list[int] = []
    heights: list[int] = []
    formats: list[str | None] = []
    with warnings.catch_warnings():
        # PIL warns above its own Image.MAX_IMAGE_PIXELS; config.max_pixels is checked here instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for chunk in table.column("image").chunks:
            for value in chunk:
                data = value.as_py()
                check = _check_image(data, config)
                reasons.append(check.reason)
                details.append(check.detail)
                if check.reason is None:
                    hashes.append(hashlib.sha256(data).hexdigest())
                    widths.append(check.width)
                    heights.append(check.height)
                    formats.append(check.image_format)
    outcome = split_by_reason(table, pa.array(reasons, pa.string()), pa.array(details, pa.string()))
    survivors = outcome.kept.drop_columns(
        [f.name for f in ADDED_FIELDS if f.name in outcome.kept.column_names]
    )
    added = [
        pa.chunked_array([hashes], pa.string()),
        pa.chunked_array([widths], pa.int32()),
        pa.chunked_array([heights], pa.int32()),
        pa.chunked_array([formats], pa.string()),
    ]
    kept = pa.Table.from_arrays(
        [*survivors.columns, *added], schema=pa.schema([*survivors.schema, *ADDED_FIELDS])
    )
    return ShardOutcome(kept=kept, decisions=outcome.decisions)


def _check_image(data: bytes | None, config: ValidateConfig) -> _Check:
    if data is None:
        return _Check("undecodable", "no image bytes")
    if not data:
        return _Check("undecodable", "empty body (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        # PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS), raised before it returns the size.
        return _Check("too_large", str(error))
    except Image.UnidentifiedImageError:
        return _Check("undecodable", f"not a {'/'.join(IMAGE_FORMATS)} image; starts with {data[:16]!r}")
    except MemoryError:
        raise
    except Exception as error:
        declared = _riff_declared_length(data)
        if declared is not None and len(data) < declared:
            # PIL's WebP decoder needs the whole file to open it, so a cut WebP fails here, not in load().
            return _Check("truncated", f"WEBP: RIFF header declares {declared} bytes, got {len(data)}")
        return _Check("undecodable", f"header unreadable: {_message(error)}")
    with image:
        width, height = image.size
        size = f"{width}x{height}"
        if width * height > config.max_pixels:
            return _Check("too_large", f"{size} = {width * height} px > {config.max_pixels}")
        if max(width, height) > config.max_side:
            return _Check("too_large", f"{size}: side {max(width, height)} > {config.max_side}")
        if min(width, height) < config.min_side:
            return _Check("too_small", f"{size}: shorter side {min(width, height)} < {config.min_side}")
        try:
            image.load()  # first frame only, fully decoded: no draft(), no reduced scale
        except Image.DecompressionBombError as error:
            return _Check("too_large", str(error))
        except MemoryError:
            raise
        except Exception as error:
            return _Check("truncated", f"{image.format} {size}: {_message(error)}")
        return _Check(None, None, width, height, image.format)


def _riff_declared_length(data: bytes) -> int | None:
    """Total file length a RIFF/WEBP header declares, or None for other data."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    return struct.unpack("<I", data[4:8])[0] + 8


def _message(error: Exception) -> str:
    return str(error) or type(error).__name__


def validate_stage(name: str, upstream: str, report: Report) -> ShardStage:
    """The validate stage over any upstream whose rows carry `image` bytes."""
    return ShardStage(
        name=name,
        upstream=upstream,
        reasons=REASONS,
        sections=("validate",),
        code_version="1",
        report=report,
        adds=ADDED_FIELDS,
        make_processor=lambda config: functools.partial(validate_shard, config=config.validate_),
    )


VALIDATE = validate_stage("validate", "download", Report("invalid images removed", "dropped"))
