"""The demo corpus: three small synthetic web sources and the loopback HTTP server behind their URLs.

Every metadata row is made with its designed fate - the stage that drops it and the reason, or none when
it survives validate - so `expected_funnel()` follows from the design, not from a run. The corpus is
deterministic: fixed seeds, numpy's PCG64 streams, integer drawing with PIL, JPEGs at a fixed quality; the
same Pillow and numpy versions should give the same bytes on any machine (checked across processes, not
across machines). Later stages are designed for too: RS captions on ordinary photos (for the CLIP /
RS-domain filter) and duplicates of several kinds (for exact, URL, perceptual and embedding dedup) survive
validate, each tagged with the image it copies: `expected_dedup()` lists the duplicate groups they form.
`write_demo_eval_set()` writes the evaluation image folder for decontaminate: transformed copies of a few
training tiles (`expected_contaminated()`) and unrelated tiles that must match nothing.
"""

from __future__ import annotations

import binascii
import io
import json
import socketserver
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from models.perceptual_hash import DEFAULT_MAX_DISTANCE, HASH_BITS, dct_hashes, hash_neighbours
from storage.atomic import write_bytes, write_parquet, write_text

STAGES = ("ingest", "keyword", "download", "validate")
# Source name -> file name under the demo source folder; configs/demo.yaml names the same files.
SOURCE_FILES = {
    "laion_like": "laion_like.parquet",
    "cc3m_like": "cc3m_like.tsv",
    "redcaps_like": "redcaps_like.jsonl",
}
SEED = 5_000_011
TILE_SIDE = 256
JPEG_QUALITY = 90
REENCODE_QUALITY = 55
# A slow URL answers after this long: 10x the demo config's 2 s timeout, so it can never finish in time.
SLOW_RESPONSE_S = 20.0

Fate = tuple[str, str] | None  # (stage, reason) of the drop; None: survives validate

# Items per source (laion_like, cc3m_like, redcaps_like) and the designed fate of each category.
COMPOSITION: dict[str, tuple[int, int, int]] = {
    "rs_tile": (60, 45, 45),
    "ordinary_photo": (35, 30, 25),
    "keyword_false_positive": (7, 6, 5),
    "rs_lookalike": (5, 4, 3),
    "rs_caption_on_photo": (10, 8, 7),
    "duplicate_row": (5, 4, 3),
    "same_bytes_other_url": (3, 2, 2),
    "reencoded_copy": (2, 2, 1),
    "rotated_copy": (2, 2, 1),
    "flipped_copy": (2, 1, 2),
    "same_url_other_caption": (2, 1, 1),
    "same_url_other_source": (0, 1, 1),
    "http_404": (3, 3, 2),
    "slow_response": (2, 1, 1),
    "connection_dropped": (1, 1, 1),
    "incomplete_body": (1, 1, 0),
    "html_body": (2, 2, 1),
    "truncated_jpeg": (2, 2, 1),
    "garbage_bytes": (2, 1, 1),
    "tiny_image": (2, 1, 2),
    "huge_png_header": (1, 1, 1),
    "invalid_url": (3, 3, 3),
}
FATES: dict[str, Fate] = {
    "rs_tile": None,
    "ordinary_photo": ("keyword", "no_keyword"),
    "keyword_false_positive": ("keyword", "excluded_keyword"),
    "rs_lookalike": ("keyword", "no_keyword"),
    "rs_caption_on_photo": None,
    "duplicate_row": ("ingest", "duplicate_row"),
    "same_bytes_other_url": None,
    "reencoded_copy": None,
    "rotated_copy": None,
    "flipped_copy": None,
    "same_url_other_caption": None,
    "same_url_other_source": None,
    "http_404": ("download", "http_error"),
    "slow_response": ("download", "timeout"),
    "connection_dropped": ("download", "download_error"),
    "incomplete_body": ("download", "download_error"),
    "html_body": ("validate", "undecodable"),
    "truncated_jpeg": ("validate", "truncated"),
    "garbage_bytes": ("validate", "undecodable"),
    "tiny_image": ("validate", "too_small"),
    "huge_png_header": ("validate", "too_large"),
    "invalid_url": ("ingest", "invalid_url"),
}

# Captions. RS captions use clear rs-v1 keyword phrases; ordinary captions avoid every RS-ish word.
RS_PHRASES = (
    ("aerial view of", 6),
    ("aerial photo of", 4),
    ("satellite image of", 6),
    ("satellite view of", 3),
    ("high resolution satellite image of", 2),
    ("remote sensing image of", 4),
    ("drone shot of", 2),
    ("drone view of", 1),
    ("bird's-eye view of", 1),
    ("orthophoto of", 1),
    ("Sentinel-2 image of", 1),
    ("Landsat image of", 1),
)
TILE_SCENES = {
    "fields": ("farmland with a road", "a patchwork of crop fields", "ploughed fields and a farm track"),
    "roads": ("a suburban road grid", "a town with intersecting streets", "a road network between blocks"),
    "river": ("a river bend", "a meandering river through farmland", "a small river crossing fields"),
    "buildings": ("a dense residential area", "an industrial zone with large roofs", "a dense city centre"),
    "forest": ("a dense forest", "a forest with a clearing", "woodland with a dirt track"),
    "coast": ("a coastline with a sandy beach", "a bay with shallow water", "a shoreline and the sea"),
}
RS_SUFFIXES = (
    "",
    "",
    "",
    " in spring",
    " in late summer",
    " near Lyon",
    " in São Paulo",
    ", 0.5 m resolution",
)
PHOTO_SUBJECTS = {
    "sky": (
        "sunset over the mountains",
        "a calm lake at dawn",
        "storm clouds over the hills",
        "a lighthouse at dusk",
    ),
    "object": (
        "a red apple on a wooden table",
        "a ceramic mug on a desk",
        "a pair of running shoes",
        "a vase of tulips",
        "a stack of old books",
        "a bowl of ramen",
    ),
    "portrait": (
        "portrait of a smiling woman",
        "an old man wearing a hat",
        "a child blowing bubbles",
        "my grandmother baking bread",
    ),
}
PHOTO_SUFFIXES = (
    "",
    "",
    " in soft light",
    ", studio photo",
    " (photo by me)",
    ", 35mm film",
    " at golden hour",
)
# A keyword inside an excluded phrase (tasks/keywords/rs-v1.exclusions.txt): dropped as excluded_keyword.
FALSE_POSITIVE_CAPTIONS = (
    "aerial yoga class in a bright studio",
    "aerial silks performer at the circus",
    "a TV aerial on a tiled roof",
    "fire engine with an aerial ladder",
    "aerial roots of a banyan tree",
    "beginner aerial yoga hammock",
    "aerial hoop routine at a dance school",
)
# Words that look like RS but are no rs-v1 keyword on their own (satellite, sentinel, drone, top view):
# dropped as no_keyword.
LOOKALIKE_CAPTIONS = (
    "Toshiba Satellite laptop, 15.6 inch, barely used",
    "a satellite dish on a brick wall",
    "Minecraft Sentinel skin",
    "DJI drone for sale, like new",
    "satellite TV receiver on a shelf",
    "top view of wireless headphones on a desk",
    "satellite radio in a car dashboard",
)
SUBREDDITS_RS = ("EarthPorn", "drones", "satellite_imagery", "MapPorn")
SUBREDDITS_PHOTO = ("pics", "itookapicture", "food", "OldSchoolCool")
INVALID_URLS = {
    "laion_like": ("", "ftp://mirror.example.org/tiles/0001.jpg", "not a url"),
    "cc3m_like": (
        "ftp://mirror.example.org/tiles/0002.jpg",
        "not a url",
        "ftp://mirror.example.org/tiles/0003.jpg",
    ),
    "redcaps_like": ("", "not a url", "ftp://mirror.example.org/tiles/0004.jpg"),
}
HUGE_PNG_SIZES = ((40_000, 40_000), (12_000, 12_000), (30_000, 100))  # pixels, pixels, side over the limit
TINY_SIZES = ((16, 16), (20, 300))


@dataclass(frozen=True)
class Resource:
    """What the server answers at one path."""

    behaviour: str  # ok | not_found | slow | drop_connection | incomplete
    body: bytes = b""
    content_type: str = "image/jpeg"
    size: tuple[int, int] | None = None  # (width, height) of the image in body, when it is one


@dataclass(frozen=True)
class DemoRow:
    """One metadata row of one source, with the fate it is designed to meet."""

    source: str
    category: str
    caption: str
    path: str | None  # server path; None for a row whose URL is invalid
    invalid_url: str = ""  # the URL written for a row without path
    fate: Fate = None
    copy_of: str | None = None  # server path of the image this one duplicates (for the dedup stages)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def url(self, base_url: str) -> str:
        return base_url.rstrip("/") + self.path if self.path is not None else self.invalid_url


@dataclass(frozen=True)
class DemoCorpus:
    rows: tuple[DemoRow, ...]  # in file order within each source
    resources: dict[str, Resource]

    def source_rows(self, source: str) -> list[DemoRow]:
        return [row for row in self.rows if row.source == source]


# ---------------------------------------------------------------- drawing (integer arithmetic only)


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int, amplitude: int) -> np.ndarray:
    """Low-frequency noise in [-amplitude, amplitude]: a small random grid upsampled bilinearly."""
    grid = rng.integers(128 - amplitude, 128 + amplitude + 1, size=(cells, cells), dtype=np.uint8)
    smooth = Image.fromarray(grid, "L").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.int16) - 128


def _textured(img: Image.Image, rng: np.random.Generator, amplitude: int = 14, grain: int = 6) -> Image.Image:
    pixels = np.asarray(img, dtype=np.int16)
    pixels = pixels + _smooth_noise(rng, img.size, 6, amplitude)[..., None]
    pixels = pixels + rng.integers(-grain, grain + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], spread: int = 14) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in colour)
    return (r, g, b)


def _cuts(rng: np.random.Generator, length: int, count: int, gap: int = 24) -> list[int]:
    """0, count cut positions at least gap apart (and from the edges), length."""
    lattice = np.arange(gap, length - gap + 1, gap) + int(rng.integers(0, gap // 3))
    inner = rng.choice(lattice[lattice <= length - gap], size=count, replace=False)
    return [0, *sorted(int(x) for x in inner), length]


def _walk(rng: np.random.Generator, side: int, step: int, swing: int) -> list[tuple[int, int]]:
    """A left-to-right random walk, for rivers, tracks and coastlines."""
    y = int(rng.integers(side // 5, 4 * side // 5))
    points = []
    for x in range(-step, side + 2 * step, step):
        points.append((x, y))
        y = int(np.clip(y + rng.integers(-swing, swing + 1), 10, side - 10))
    return points


CROPS = ((92, 128, 58), (148, 150, 72), (188, 170, 98), (120, 92, 60), (70, 112, 52), (170, 160, 120))
ROOFS = ((168, 84, 66), (120, 120, 124), (200, 196, 190), (140, 70, 56), (90, 92, 98))


def _draw_fields(rng: np.random.Generator, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), (126, 110, 80))
    draw = ImageDraw.Draw(img)
    xs, ys = _cuts(rng, side, int(rng.integers(2, 5))), _cuts(rng, side, int(rng.integers(2, 5)))
    for x0, x1 in zip(xs, xs[1:], strict=False):
        for y0, y1 in zip(ys, ys[1:], strict=False):
            colour = _jitter(rng, CROPS[int(rng.integers(len(CROPS)))])
            draw.rectangle((x0, y0, x1, y1), fill=colour)
            furrow = tuple(max(c - 22, 0) for c in colour)
            step = int(rng.integers(4, 8))
            if rng.integers(2):
                for x in range(x0 + 2, x1, step):
                    draw.line(((x, y0), (x, y1)), fill=furrow)
            else:
                for y in range(y0 + 2, y1, step):
                    draw.line(((x0, y), (x1, y)), fill=furrow)
    for x in xs[1:-1]:
        draw.line(((x, 0), (x, side)), fill=(58, 82, 44), width=2)
    road_y = ys[int(rng.integers(1, len(ys) - 1))]
    draw.line(((0, road_y), (side, road_y)), fill=(150, 146, 140), width=5)
    return _textured(img, rng)


def _draw_roads(rng: np.random.Generator, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), _jitter(rng, (176, 170, 150)))
    draw = ImageDraw.Draw(img)
    xs, ys = _cuts(rng, side, int(rng.integers(3, 6))), _cuts(rng, side, int(rng.integers(3, 6)))
    for x0, x1 in zip(xs, xs[1:], strict=False):
        for y0, y1 in zip(ys, ys[1:], strict=False):
            if rng.integers(4) == 0:
                draw.rectangle((x0 + 5, y0 + 5, x1 - 5, y1 - 5), fill=_jitter(rng, (84, 124, 64)))
                continue
            for bx in range(x0 + 7, x1 - 14, 13):
                for by in range(y0 + 7, y1 - 14, 13):
                    draw.rectangle(
                        (bx, by, bx + 9, by + 9), fill=_jitter(rng, ROOFS[int(rng.integers(len(ROOFS)))])
                    )
    width = int(rng.integers(5, 9))
    for x in xs[1:-1]:
        draw.line(((x, 0), (x, side)), fill=(72, 72, 76), width=width)
    for y in ys[1:-1]:
        draw.line(((0, y), (side, y)), fill=(72, 72, 76), width=width)
    return _textured(img, rng, amplitude=10)


def _draw_river(rng: np.random.Generator, side: int) -> Image.Image:
    img = _draw_fields(rng, side) if rng.integers(2) else _draw_forest(rng, side)
    draw = ImageDraw.Draw(img)
    course = _walk(rng, side, 24, 26)
    width = int(rng.integers(10, 24))
    draw.line(course, fill=(52, 78, 40), width=width + 8, joint="curve")
    draw.line(course, fill=_jitter(rng, (58, 88, 112)), width=width, joint="curve")
    return _textured(img, rng, amplitude=6, grain=3)


def _draw_buildings(rng: np.random.Generator, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), _jitter(rng, (110, 108, 104)))
    draw = ImageDraw.Draw(img)
    big = bool(rng.integers(2))
    pitch = 40 if big else 18
    for bx in range(2, side, pitch):
        for by in range(2, side, pitch):
            w, h = (int(rng.integers(pitch // 2, pitch - 3)) for _ in range(2))
            ox, oy = (int(rng.integers(0, pitch - w)) for _ in range(2)) if w < pitch else (0, 0)
            x0, y0 = bx + ox, by + oy
            draw.rectangle((x0 + 3, y0 + 3, x0 + w + 3, y0 + h + 3), fill=(40, 40, 44))  # shadow
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=_jitter(rng, ROOFS[int(rng.integers(len(ROOFS)))]))
    x = int(rng.integers(side // 4, 3 * side // 4))
    draw.line(((x, 0), (x, side)), fill=(64, 64, 68), width=7)
    return _textured(img, rng, amplitude=12)


def _draw_forest(rng: np.random.Generator, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), _jitter(rng, (38, 70, 34)))
    draw = ImageDraw.Draw(img)
    for _ in range(900):
        x, y = (int(v) for v in rng.integers(0, side, size=2))
        radius = int(rng.integers(3, 8))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_jitter(rng, (44, 86, 40), 18))
    for _ in range(int(rng.integers(1, 4))):  # clearings
        cx, cy = (int(v) for v in rng.integers(0, side, size=2))
        rx, ry = (int(v) for v in rng.integers(12, 60, size=2))
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_jitter(rng, (128, 140, 80), 20))
    draw.line(_walk(rng, side, 32, 20), fill=(150, 130, 96), width=3, joint="curve")
    return _textured(img, rng, amplitude=20)


def _draw_coast(rng: np.random.Generator, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), _jitter(rng, (40, 86, 124)))
    draw = ImageDraw.Draw(img)
    shore = _walk(rng, side, 16, 14)
    draw.polygon([*shore, (side + 40, side + 10), (-40, side + 10)], fill=(214, 198, 150))  # beach
    inland = [(x, y + 12) for x, y in shore]
    draw.polygon([*inland, (side + 40, side + 10), (-40, side + 10)], fill=_jitter(rng, (88, 118, 62)))
    draw.line([(x, y - 3) for x, y in shore], fill=(150, 178, 196), width=3)  # surf
    return _textured(img, rng, amplitude=12)


TILE_DRAWERS: dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "fields": _draw_fields,
    "roads": _draw_roads,
    "river": _draw_river,
    "buildings": _draw_buildings,
    "forest": _draw_forest,
    "coast": _draw_coast,
}
PHOTO_SIZES = ((320, 240), (240, 320), (300, 300), (400, 300))
ORIENTATIONS = (None, *Image.Transpose)  # the eight symmetries of a square


def _draw_tile(rng: np.random.Generator, kind: str) -> Image.Image:
    """An RS tile of the given kind, in one of eight orientations: overhead views have no "up"."""
    img = TILE_DRAWERS[kind](rng, TILE_SIDE)
    orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    return img.transpose(orientation) if orientation is not None else img


def _backdrop(rng: np.random.Generator, size: tuple[int, int], base: tuple[int, int, int]) -> Image.Image:
    """A softly varying background with a few muted shapes, so no two photos share their layout."""
    colour = np.array(_jitter(rng, base, 40), dtype=np.int16)
    blobs = np.stack([_smooth_noise(rng, size[::-1], 4, 40) for _ in range(3)], axis=-1)
    img = Image.fromarray(np.clip(colour + blobs, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    width, height = size
    for _ in range(int(rng.integers(2, 5))):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        w, h = int(rng.integers(30, width // 2)), int(rng.integers(30, height // 2))
        draw.rectangle((x, y, x + w, y + h), fill=_jitter(rng, base, 60))
    return img


def _draw_photo(rng: np.random.Generator, family: str) -> Image.Image:
    """An ordinary photo: a sky over hills, objects on a table, or a portrait."""
    width, height = PHOTO_SIZES[int(rng.integers(len(PHOTO_SIZES)))]
    if family == "sky":
        top, bottom = np.array(_jitter(rng, (70, 120, 200), 30)), np.array(_jitter(rng, (240, 170, 120), 30))
        weights = np.arange(height, dtype=np.int32)[:, None]
        sky = (top * (height - 1 - weights) + bottom * weights) // (height - 1)
        img = Image.fromarray(np.repeat(sky[:, None, :], width, axis=1).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        horizon = int(rng.integers(height // 3, 4 * height // 5))
        sun_x, sun_r = int(rng.integers(30, width - 30)), int(rng.integers(12, 30))
        draw.ellipse(
            (sun_x - sun_r, horizon - 3 * sun_r, sun_x + sun_r, horizon - sun_r), fill=(255, 230, 180)
        )
        step = int(rng.integers(30, 70))
        peaks = [(x, horizon - int(rng.integers(0, height // 3))) for x in range(0, width + step, step)]
        draw.polygon(
            [(0, horizon), *peaks, (width, height), (0, height)], fill=_jitter(rng, (60, 60, 80), 30)
        )
        return _textured(img, rng, amplitude=4, grain=3)
    if family == "object":
        img = _backdrop(rng, (width, height), (200, 196, 188))
        draw = ImageDraw.Draw(img)
        table = int(rng.integers(height // 3, 4 * height // 5))
        draw.rectangle((0, table, width, height), fill=_jitter(rng, (130, 90, 60), 40))
        for _ in range(int(rng.integers(1, 4))):
            colour = _jitter(rng, (180, 40, 40), 90)
            x, w, h = int(rng.integers(10, width - 80)), int(rng.integers(30, 80)), int(rng.integers(30, 100))
            box = (x, table - h, x + w, table + 6)
            draw.ellipse(box, fill=colour) if rng.integers(2) else draw.rectangle(box, fill=colour)
            draw.ellipse((x + w // 4, table - h + 6, x + w // 2, table - h + h // 3), fill=(250, 250, 245))
        return _textured(img, rng, amplitude=6, grain=4)
    img = _backdrop(rng, (width, height), (190, 186, 170))
    draw = ImageDraw.Draw(img)
    head = int(rng.integers(28, 60))
    cx = int(rng.integers(width // 4, 3 * width // 4))
    top = int(rng.integers(height // 8, height // 2))
    body = (cx - 2 * head, top + 2 * head, cx + 2 * head, height + head)
    draw.ellipse(body, fill=_jitter(rng, (60, 70, 120), 60))
    draw.ellipse((cx - head - 4, top - 10, cx + head + 4, top + head), fill=_jitter(rng, (60, 40, 30), 30))
    draw.ellipse((cx - head, top, cx + head, top + 2 * head + 10), fill=_jitter(rng, (220, 180, 150), 30))
    for ex in (cx - head // 2, cx + head // 2):
        draw.ellipse((ex - 4, top + head - 4, ex + 4, top + head + 4), fill=(40, 30, 30))
    return _textured(img, rng, amplitude=6, grain=4)


def _jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (valid CRCs) followed by a few bytes of image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", binascii.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


HTML_PAGES = (
    b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body><h1>Forbidden</h1></body></html>",
    b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form>Login to see this image</form></body>",
    b"<html><body><p>This image is no longer available.</p></body></html>\n",
)
NOT_FOUND_PAGE = b"<html><body><h1>404 Not Found</h1></body></html>"


# ---------------------------------------------------------------- corpus design


class _CorpusBuilder:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = np.random.default_rng(seed)  # captions and choices; images get their own streams
        self.resources: dict[str, Resource] = {}
        self.images: dict[str, Image.Image] = {}  # RS tiles by path, for the designed copies
        self.rows: dict[str, list[DemoRow]] = {name: [] for name in SOURCE_FILES}

    def image_rng(self) -> np.random.Generator:
        """The stream for the next served body, keyed by its number: no image depends on another's draws."""
        return np.random.default_rng((self.seed, len(self.resources)))

    def serve(self, folder: str, extension: str, resource: Resource) -> str:
        path = f"/{folder}/{len(self.resources):04d}.{extension}"
        self.resources[path] = resource
        return path

    def add(
        self, source: str, category: str, caption: str, path: str | None, extra: dict | None = None, **kw: Any
    ) -> DemoRow:
        """Record a row with its category's designed fate; extra: the source's other columns, if given."""
        extra = self.extra_columns(source, category, path) if extra is None else extra
        row = DemoRow(source, category, caption, path, fate=FATES[category], extra=extra, **kw)
        self.rows[source].append(row)
        return row

    def extra_columns(self, source: str, category: str, path: str | None) -> dict[str, Any]:
        if source == "laion_like":
            size = self.resources[path].size if path is not None else None
            return {
                "WIDTH": size[0] if size else None,
                "HEIGHT": size[1] if size else None,
                "similarity": round(float(self.rng.uniform(0.28, 0.42)), 4),
            }
        if source == "redcaps_like":
            rs_like = category not in ("ordinary_photo", "keyword_false_positive", "rs_lookalike")
            names = SUBREDDITS_RS if rs_like else SUBREDDITS_PHOTO
            return {"subreddit": names[int(self.rng.integers(len(names)))]}
        return {}

    def pick(self, options: tuple[str, ...]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def rs_caption(self, kind: str | None = None) -> str:
        phrases, weights = zip(*RS_PHRASES, strict=True)
        phrase = phrases[int(self.rng.choice(len(phrases), p=np.array(weights) / sum(weights)))]
        kind = kind or self.pick(tuple(TILE_SCENES))
        caption = f"{phrase} {self.pick(TILE_SCENES[kind])}{self.pick(RS_SUFFIXES)}"
        return caption[0].upper() + caption[1:] if self.rng.integers(3) == 0 else caption

    def tile(self, kind: str) -> str:
        img = _draw_tile(self.image_rng(), kind)
        path = self.serve("tiles", "jpg", Resource("ok", _jpeg(img), size=img.size))
        self.images[path] = img
        return path

    def photo(self) -> tuple[str, str]:
        family = self.pick(tuple(PHOTO_SUBJECTS))
        img = _draw_photo(self.image_rng(), family)
        return self.serve("photos", "jpg", Resource("ok", _jpeg(img), size=img.size)), family


def _photo_caption(builder: _CorpusBuilder, family: str) -> str:
    return builder.pick(PHOTO_SUBJECTS[family]) + builder.pick(PHOTO_SUFFIXES)


def build_corpus(seed: int = SEED) -> DemoCorpus:
    """Design every row and every served body; pure and deterministic for a given seed."""
    builder = _CorpusBuilder(seed)
    counts = {category: dict(zip(SOURCE_FILES, n, strict=True)) for category, n in COMPOSITION.items()}
    tiles: dict[str, list[DemoRow]] = {}
    for source in SOURCE_FILES:
        add = builder.add
        kinds = tuple(TILE_DRAWERS)
        tiles[source] = []
        for i in range(counts["rs_tile"][source]):
            kind = kinds[i % len(kinds)]
            tiles[source].append(add(source, "rs_tile", builder.rs_caption(kind), builder.tile(kind)))
        for _ in range(counts["ordinary_photo"][source]):
            path, family = builder.photo()
            add(source, "ordinary_photo", _photo_caption(builder, family), path)
        for category, captions in (
            ("keyword_false_positive", FALSE_POSITIVE_CAPTIONS),
            ("rs_lookalike", LOOKALIKE_CAPTIONS),
        ):
            for _ in range(counts[category][source]):
                path, _family = builder.photo()
                add(source, category, builder.pick(captions), path)
        for _ in range(counts["rs_caption_on_photo"][source]):
            path, _family = builder.photo()
            add(source, "rs_caption_on_photo", builder.rs_caption(), path)

        originals = [tiles[source][int(i)] for i in builder.rng.permutation(len(tiles[source]))]
        earlier = list(builder.rows[source])  # exact repeats of earlier rows, photos and tiles alike
        for i in builder.rng.choice(len(earlier), counts["duplicate_row"][source], replace=False):
            row = earlier[int(i)]
            add(source, "duplicate_row", row.caption, row.path, extra=dict(row.extra))
        for _ in range(counts["same_bytes_other_url"][source]):
            original = originals.pop()
            body = builder.resources[original.path]
            path = builder.serve("mirror", "jpg", body)
            add(source, "same_bytes_other_url", builder.rs_caption(), path, copy_of=original.path)
        for category, transform, quality in (
            ("reencoded_copy", None, REENCODE_QUALITY),
            ("rotated_copy", Image.Transpose.ROTATE_90, JPEG_QUALITY),
            ("flipped_copy", Image.Transpose.FLIP_LEFT_RIGHT, JPEG_QUALITY),
        ):
            for _ in range(counts[category][source]):
                original = originals.pop()
                img = builder.images[original.path]
                img = img.transpose(transform) if transform is not None else img
                path = builder.serve("copies", "jpg", Resource("ok", _jpeg(img, quality), size=img.size))
                add(source, category, builder.rs_caption(), path, copy_of=original.path)
        for _ in range(counts["same_url_other_caption"][source]):
            original = originals.pop()
            caption = builder.rs_caption()
            while caption == original.caption:  # the same caption too would make an exact duplicate row
                caption = builder.rs_caption()
            add(source, "same_url_other_caption", caption, original.path, copy_of=original.path)
        for i in range(counts["same_url_other_source"][source]):
            original = tiles["laion_like"][-1 - i]
            add(source, "same_url_other_source", builder.rs_caption(), original.path, copy_of=original.path)

        _add_failures(builder, source, counts)
        for url in INVALID_URLS[source][: counts["invalid_url"][source]]:
            builder.add(source, "invalid_url", builder.rs_caption(), None, invalid_url=url)

    rows: list[DemoRow] = []
    for source in SOURCE_FILES:  # interleave the categories like a real source, in a fixed order
        source_rows = builder.rows[source]
        rows.extend(source_rows[int(i)] for i in builder.rng.permutation(len(source_rows)))
    return DemoCorpus(rows=tuple(rows), resources=builder.resources)


def _add_failures(builder: _CorpusBuilder, source: str, counts: dict[str, dict[str, int]]) -> None:
    """Rows with clear RS captions whose URL fails at download or whose body fails at validate."""

    def add(category: str, folder: str, extension: str, resource: Resource) -> None:
        builder.add(source, category, builder.rs_caption(), builder.serve(folder, extension, resource))

    def tile_bytes() -> bytes:
        kind = builder.pick(tuple(TILE_DRAWERS))
        return _jpeg(_draw_tile(builder.image_rng(), kind))

    for _ in range(counts["http_404"][source]):
        add("http_404", "gone", "jpg", Resource("not_found", NOT_FOUND_PAGE, "text/html"))
    for _ in range(counts["slow_response"][source]):
        add("slow_response", "slow", "jpg", Resource("slow", tile_bytes()))
    for _ in range(counts["connection_dropped"][source]):
        add("connection_dropped", "reset", "jpg", Resource("drop_connection"))
    for _ in range(counts["incomplete_body"][source]):
        add("incomplete_body", "partial", "jpg", Resource("incomplete", tile_bytes()))
    for _ in range(counts["html_body"][source]):
        page = HTML_PAGES[int(builder.rng.integers(len(HTML_PAGES)))]
        add("html_body", "pages", "jpg", Resource("ok", page, "text/html; charset=utf-8"))
    for _ in range(counts["truncated_jpeg"][source]):
        body = tile_bytes()
        add("truncated_jpeg", "cut", "jpg", Resource("ok", body[: len(body) * 3 // 5]))
    for _ in range(counts["garbage_bytes"][source]):
        body = b"\x00GARBAGE" + builder.image_rng().bytes(int(builder.rng.integers(1_000, 4_000)))
        add("garbage_bytes", "noise", "jpg", Resource("ok", body))
    for i in range(counts["tiny_image"][source]):
        size = TINY_SIZES[i % len(TINY_SIZES)]
        img = _draw_tile(builder.image_rng(), "fields").resize(size, Image.Resampling.BILINEAR)
        add("tiny_image", "thumbs", "jpg", Resource("ok", _jpeg(img), size=size))
    for i in range(counts["huge_png_header"][source]):
        size = HUGE_PNG_SIZES[(i + list(SOURCE_FILES).index(source)) % len(HUGE_PNG_SIZES)]
        add("huge_png_header", "huge", "png", Resource("ok", _png_header_only(*size), "image/png", size=size))


@cache
def demo_corpus() -> DemoCorpus:
    """The corpus for the default seed, built once per process."""
    return build_corpus()


def expected_funnel(corpus: DemoCorpus | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{stage: {source: {"in": n, "kept": n, "dropped": {reason: n}}}} as designed, for the demo config."""
    corpus = corpus or demo_corpus()
    funnel: dict[str, dict[str, dict[str, Any]]] = {
        stage: {source: {"in": 0, "kept": 0, "dropped": {}} for source in SOURCE_FILES} for stage in STAGES
    }
    for row in corpus.rows:
        for stage in STAGES:
            counts = funnel[stage][row.source]
            counts["in"] += 1
            if row.fate is not None and row.fate[0] == stage:
                reason = row.fate[1]
                counts["dropped"][reason] = counts["dropped"].get(reason, 0) + 1
                break
            counts["kept"] += 1
    for per_source in funnel.values():
        for counts in per_source.values():
            counts["dropped"] = dict(sorted(counts["dropped"].items()))
    return funnel


# ---------------------------------------------------------------- dedup and decontaminate design

# A survivor row, independent of the server's port (sample ids are not: they hash the full URL).
RowKey = tuple[str, str, str]  # (source, URL path, caption)
EVAL_SEED = 7_000_003  # the unrelated eval tiles: another seed than the corpus's, so no tile is shared
EVAL_UNRELATED_KINDS = ("fields", "roads", "river", "coast")
# Eval images keep at least this rotation/flip-invariant distance from every training survivor but the one
# they copy: the demo config's threshold plus the 5 bits a rotation, flip or re-encoding can move a hash
# (models/perceptual_hash.py), so an eval copy is within the threshold of its original and of nothing else.
EVAL_MIN_DISTANCE = DEFAULT_MAX_DISTANCE + 6
# The eval copies, one per source: new bytes, so only the rotation/flip-invariant perceptual check finds them.
EVAL_COPY_TRANSFORMS: tuple[tuple[str, Image.Transpose | None, int], ...] = (
    ("rotated", Image.Transpose.ROTATE_90, JPEG_QUALITY),
    ("flipped", Image.Transpose.FLIP_TOP_BOTTOM, JPEG_QUALITY),
    ("reencoded", None, REENCODE_QUALITY),
)


@dataclass(frozen=True)
class EvalImage:
    body: bytes
    copy_of: str | None  # server path of the training tile it copies; None for an unrelated image


def row_key(source: str, url: str, caption: str) -> RowKey:
    """The key of a pipeline row (its source, URL and caption columns) as expected_dedup names rows."""
    return source, urlsplit(url).path, caption


def _survivors(corpus: DemoCorpus) -> list[DemoRow]:
    return [row for row in corpus.rows if row.fate is None]


def expected_dedup(corpus: DemoCorpus | None = None) -> list[set[RowKey]]:
    """The designed duplicate groups among validate survivors, each a set of row keys, in corpus order.

    Rows are in one group when they share a URL path (same URL, other caption or other source) or one is a
    `copy_of` the other (same bytes elsewhere, re-encoded, rotated, flipped). Every member of a group is an
    exact or perceptual duplicate of every other (tests/test_demo_corpus.py), and no two survivors of
    different groups are, so dedup with the demo config keeps exactly one row per group; which one depends on
    the clip_scores, random with the demo's untrained CLIP.
    """
    corpus = corpus or demo_corpus()
    parent: dict[str, str] = {}

    def root(path: str) -> str:
        while parent.get(path, path) != path:
            path = parent[path]
        return path

    survivors = _survivors(corpus)
    for row in survivors:
        if row.copy_of is not None:
            parent[root(row.path)] = root(row.copy_of)
    groups: dict[str, set[RowKey]] = {}
    for row in survivors:
        groups.setdefault(root(row.path), set()).add((row.source, row.path, row.caption))
    return [group for group in groups.values() if len(group) > 1]


def _nearest_distances(survivors: np.ndarray, candidates: list[bytes]) -> list[int]:
    """Each candidate image's rotation/flip-invariant distance to the nearest of the survivors' hashes."""
    queries, _, distances = hash_neighbours(survivors, HASH_BITS - 1, queries=dct_hashes(candidates))
    return [int(distances[queries == index].min()) for index in range(len(candidates))]


def _eval_copy_originals(corpus: DemoCorpus, survivor_paths: list[str], hashes: np.ndarray) -> list[DemoRow]:
    """Per source, the first RS tile that survives validate, has no designed duplicate (no other row shares
    its URL or copies it, so it reaches decontaminate whatever dedup keeps) and is EVAL_MIN_DISTANCE from
    every other survivor (so its eval copy matches it alone)."""
    shared = Counter(row.path for row in corpus.rows)
    copied = {row.copy_of for row in corpus.rows}
    position = {path: index for index, path in enumerate(survivor_paths)}
    originals = []
    for source in SOURCE_FILES:
        for row in corpus.source_rows(source):
            if row.category != "rs_tile" or shared[row.path] > 1 or row.path in copied:
                continue
            others = np.delete(hashes, position[row.path], axis=0)
            if _nearest_distances(others, [corpus.resources[row.path].body])[0] >= EVAL_MIN_DISTANCE:
                originals.append(row)
                break
    return originals


def eval_set_images(corpus: DemoCorpus | None = None) -> dict[str, EvalImage]:
    """The demo eval set by file name: transformed copies of training tiles, then unrelated new tiles."""
    corpus = corpus or demo_corpus()
    survivor_paths = sorted({row.path for row in _survivors(corpus)})
    hashes = dct_hashes(corpus.resources[path].body for path in survivor_paths)
    images = {}
    originals = _eval_copy_originals(corpus, survivor_paths, hashes)
    for (label, transform, quality), original in zip(EVAL_COPY_TRANSFORMS, originals, strict=True):
        with Image.open(io.BytesIO(corpus.resources[original.path].body)) as decoded:
            img = decoded.convert("RGB")
        img = img.transpose(transform) if transform is not None else img
        images[f"{len(images):02d}_{label}.jpg"] = EvalImage(_jpeg(img, quality), original.path)
    draws = 0
    for kind in EVAL_UNRELATED_KINDS:
        while True:  # a random tile can land near a training one: draw again until it is far from all
            body = _jpeg(_draw_tile(np.random.default_rng((EVAL_SEED, draws)), kind))
            draws += 1
            if _nearest_distances(hashes, [body])[0] >= EVAL_MIN_DISTANCE:
                break
        images[f"{len(images):02d}_unrelated_{kind}.jpg"] = EvalImage(body, None)
    return images


def write_demo_eval_set(folder: Path, corpus: DemoCorpus | None = None) -> None:
    """Write the demo eval set (configs/demo.yaml's decontaminate.eval_sets) as JPEG files into folder."""
    for name, image in eval_set_images(corpus).items():
        write_bytes(Path(folder) / name, image.body)


HELDOUT_SEED = 7_000_003  # not the corpus's: held-out tiles the training data never saw
HELDOUT_PER_CLASS = 4
HELDOUT_CAPTIONED = 8


def write_demo_heldout_sets(folder: Path) -> None:
    """Held-out synthetic evaluation sets for the demo's training run (configs/demo.yaml's `eval:`):
    `scenes/<kind>/NN.jpg`, HELDOUT_PER_CLASS tiles of each TILE_SCENES kind (zero-shot classification), and
    `captions.csv` (filename,caption), HELDOUT_CAPTIONED tiles with two of their kind's scene phrases each
    (retrieval)."""
    rng = np.random.default_rng(HELDOUT_SEED)
    folder = Path(folder)
    for kind in TILE_SCENES:
        for index in range(HELDOUT_PER_CLASS):
            write_bytes(folder / "scenes" / kind / f"{index:02d}.jpg", _jpeg(_draw_tile(rng, kind)))
    lines = ["filename,caption"]
    kinds = list(TILE_SCENES)
    for index in range(HELDOUT_CAPTIONED):
        kind = kinds[index % len(kinds)]
        name = f"captioned/{index:02d}.jpg"
        write_bytes(folder / name, _jpeg(_draw_tile(rng, kind)))
        lines += [f"{name},{RS_PHRASES[j][0]} {TILE_SCENES[kind][j]}" for j in range(2)]
    write_text(folder / "captions.csv", "\n".join(lines) + "\n")


def expected_contaminated(corpus: DemoCorpus | None = None) -> set[str]:
    """URL paths of the training rows the demo eval set copies: decontaminate drops exactly these."""
    return {image.copy_of for image in eval_set_images(corpus).values() if image.copy_of is not None}


# ---------------------------------------------------------------- source files


def write_demo_sources(source_dir: Path, base_url: str, corpus: DemoCorpus | None = None) -> None:
    """Write the three source files with URLs on base_url (the running DemoServer's)."""
    corpus = corpus or demo_corpus()
    source_dir = Path(source_dir)

    laion = corpus.source_rows("laion_like")
    table = pa.table(
        {
            "URL": pa.array([row.url(base_url) for row in laion], pa.string()),
            "TEXT": pa.array([row.caption for row in laion], pa.string()),
            "WIDTH": pa.array([row.extra["WIDTH"] for row in laion], pa.int64()),
            "HEIGHT": pa.array([row.extra["HEIGHT"] for row in laion], pa.int64()),
            "similarity": pa.array([row.extra["similarity"] for row in laion], pa.float64()),
        }
    )
    write_parquet(source_dir / SOURCE_FILES["laion_like"], table)

    cc3m_lines = [f"{row.caption}\t{row.url(base_url)}\n" for row in corpus.source_rows("cc3m_like")]
    write_text(source_dir / SOURCE_FILES["cc3m_like"], "".join(cc3m_lines))

    redcaps_lines = [
        json.dumps({"url": row.url(base_url), "caption": row.caption, **row.extra}, ensure_ascii=False) + "\n"
        for row in corpus.source_rows("redcaps_like")
    ]
    write_text(source_dir / SOURCE_FILES["redcaps_like"], "".join(redcaps_lines))


# ---------------------------------------------------------------- loopback server


class _DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # img2dataset opens processes x threads connections at once

    def __init__(self, address: tuple[str, int], resources: dict[str, Resource]) -> None:
        self.resources = resources
        self.stopping = threading.Event()
        super().__init__(address, _DemoHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name, which can hang on a machine without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (timeouts, by design) are not errors worth a traceback."""


class _DemoHandler(BaseHTTPRequestHandler):
    server: _DemoHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: img2dataset's hundreds of requests would flood the demo's output."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        resource = self.server.resources.get(self.path.split("?", 1)[0])
        if resource is None:
            return self._answer(404, NOT_FOUND_PAGE, "text/html")
        if resource.behaviour == "not_found":
            return self._answer(404, resource.body, resource.content_type)
        if resource.behaviour == "drop_connection":
            self.close_connection = True  # hang up without a status line
            return None
        if resource.behaviour == "slow" and self.server.stopping.wait(SLOW_RESPONSE_S):
            return None
        if resource.behaviour == "incomplete":
            return self._answer(200, resource.body, resource.content_type, send=len(resource.body) // 2)
        return self._answer(200, resource.body, resource.content_type)

    def _answer(self, status: int, body: bytes, content_type: str, send: int | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if send is None else body[:send])
        except OSError:  # the client gave up first
            pass
        self.close_connection = True


class DemoServer:
    """Serves the demo corpus on 127.0.0.1 from memory; use as a context manager."""

    def __init__(self, port: int = 0, corpus: DemoCorpus | None = None) -> None:
        self.corpus = corpus or demo_corpus()
        self._port = port
        self._httpd: _DemoHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("DemoServer is not running")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> DemoServer:
        self._httpd = _DemoHTTPServer(("127.0.0.1", self._port), self.corpus.resources)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="demo-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.stopping.set()  # wakes the slow handlers so they end without answering
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
