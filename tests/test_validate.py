"""validate stage: real decoding of good, broken and hostile images, built here with PIL or read from RSSCN7."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import warnings
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageFile

from rs5m.config import ValidateConfig
from storage.schemas import DECISION_SCHEMA, DOWNLOAD_SCHEMA, DROPPED, KEPT, VALIDATE_SCHEMA
from tasks.validate import REASONS, validate_shard
from tests.helpers import missing_data

CONFIG = ValidateConfig()


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    # Noise compresses badly, so the encoded data is long and a cut lands well inside the pixel data.
    return Image.effect_noise((width, height), 64).convert(mode)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) declares width x height, followed by a few bytes of pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


def webp_declaring(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header declares width x height over a 16x16 image's data."""
    data = bytearray(encode(Image.new("RGB", (16, 16)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
    data[21:25] = struct.pack("<I", bits | (width - 1) | ((height - 1) << 14))
    return bytes(data)


def shard(images: list[bytes | None]) -> pa.Table:
    n = len(images)
    return pa.table(
        {
            "sample_id": [f"s{i:04d}" for i in range(n)],
            "source": ["test"] * n,
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "caption": [f"satellite image {i}" for i in range(n)],
            "extra": [None] * n,
            "matched_keyword": ["satellite"] * n,
            "image": images,
        },
        schema=DOWNLOAD_SCHEMA,
    )


def reasons_of(outcome) -> list[str | None]:
    return outcome.decisions.column("reason").to_pylist()


def details_of(outcome) -> list[str | None]:
    return outcome.decisions.column("detail").to_pylist()


def assert_consistent(table: pa.Table, outcome) -> None:
    """One decision per input row, in order; kept rows are exactly the kept decisions, in order."""
    decisions = outcome.decisions
    assert decisions.schema == DECISION_SCHEMA
    assert outcome.kept.schema == VALIDATE_SCHEMA
    assert decisions.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    for fate, reason in zip(decisions.column("fate").to_pylist(), reasons_of(outcome), strict=True):
        assert (fate, reason in REASONS) in ((KEPT, False), (DROPPED, True))
    sample_ids = table.column("sample_id").to_pylist()
    kept_ids = [s for s, r in zip(sample_ids, reasons_of(outcome), strict=True) if r is None]
    assert outcome.kept.column("sample_id").to_pylist() == kept_ids


def test_good_images_are_kept_with_their_properties():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display; the stored size is what we record
    frames = [noise(48, 40, "P") for _ in range(3)]
    animated_gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    two_picture_jpeg = encode(noise(40, 44), "MPO", save_all=True, append_images=[noise(40, 44)])
    cases = [
        (encode(noise(64, 48), "JPEG", quality=90), 64, 48, "JPEG"),
        (encode(noise(40, 50), "JPEG", progressive=True), 40, 50, "JPEG"),
        (encode(noise(40, 40, "CMYK"), "JPEG"), 40, 40, "JPEG"),
        (encode(noise(80, 32), "JPEG", exif=exif.tobytes()), 80, 32, "JPEG"),
        (two_picture_jpeg, 40, 44, "MPO"),  # a JPEG file; PIL names it MPO and decodes the first picture
        (encode(noise(33, 70, "RGBA"), "PNG"), 33, 70, "PNG"),
        (encode(noise(40, 40, "I;16"), "PNG"), 40, 40, "PNG"),
        (encode(noise(50, 36), "WEBP", quality=80), 50, 36, "WEBP"),
        (encode(noise(50, 36), "WEBP", lossless=True), 50, 36, "WEBP"),
        (animated_gif, 48, 40, "GIF"),
        (encode(noise(32, 32), "BMP"), 32, 32, "BMP"),
        (encode(noise(32, 32), "TIFF", compression="tiff_lzw"), 32, 32, "TIFF"),
    ]
    table = shard([case[0] for case in cases])
    outcome = validate_shard(table, CONFIG)

    assert_consistent(table, outcome)
    assert reasons_of(outcome) == [None] * len(cases)
    kept = outcome.kept
    assert kept.column("image").to_pylist() == [case[0] for case in cases]  # original bytes, untouched
    assert kept.column("sha256").to_pylist() == [hashlib.sha256(case[0]).hexdigest() for case in cases]
    assert kept.column("width").to_pylist() == [case[1] for case in cases]
    assert kept.column("height").to_pylist() == [case[2] for case in cases]
    assert kept.column("image_format").to_pylist() == [case[3] for case in cases]
    assert kept.column("caption").to_pylist() == table.column("caption").to_pylist()


def test_bad_images_are_dropped_with_a_reason_each():
    jpeg = encode(noise(200, 150), "JPEG")
    webp = encode(noise(200, 150), "WEBP")
    half_webp = webp[: len(webp) // 2]
    html = b"<!DOCTYPE html><html><body>Not Found</body></html>"
    cases = [
        (encode(noise(64, 64), "PNG"), None, None),
        (encode(noise(8, 8), "PNG"), "too_small", "8x8: shorter side 8 < 32"),
        (encode(noise(300, 31), "JPEG"), "too_small", "300x31: shorter side 31 < 32"),
        (jpeg[: len(jpeg) // 2], "truncated", "JPEG 200x150: image file is truncated"),
        (half_webp, "truncated", f"WEBP: RIFF header declares {len(webp)} bytes, got {len(half_webp)}"),
        (html, "undecodable", "starts with b'<!DOCTYPE html><'"),
        (random.Random(7).randbytes(5000), "undecodable", "not a JPEG/PNG/WEBP/GIF/BMP/TIFF/AVIF image"),
        (encode(noise(32, 32), "ICO"), "undecodable", "not a JPEG/PNG"),  # an image, but not a web format
        (jpeg[:100], "undecodable", "header unreadable"),
        (b"", "undecodable", "empty body (0 bytes)"),
        (None, "undecodable", "no image bytes"),
        (png_declaring(12000, 12000), "too_large", "12000x12000 = 144000000 px > 89478485"),
        (png_declaring(25000, 40), "too_large", "25000x40: side 25000 > 20000"),
        (png_declaring(30000, 30000), "too_large", "Image size (900000000 pixels) exceeds limit"),
        (webp_declaring(12000, 12000), "too_large", "12000x12000 = 144000000 px > 89478485"),
        (encode(noise(48, 48), "JPEG"), None, None),
    ]
    table = shard([case[0] for case in cases])
    outcome = validate_shard(table, CONFIG)

    assert_consistent(table, outcome)
    assert reasons_of(outcome) == [case[1] for case in cases]
    for detail, (_, _, expected) in zip(details_of(outcome), cases, strict=True):
        assert (detail is None) if expected is None else (expected in detail), (detail, expected)
    assert outcome.counts() == {
        KEPT: 2,
        "dropped:too_small": 2,
        "dropped:truncated": 2,
        "dropped:undecodable": 6,
        "dropped:too_large": 4,
    }


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_cut_anywhere_after_the_header_is_truncated(fraction: float, progressive: bool):
    data = encode(noise(256, 256), "JPEG", progressive=progressive)
    cut = data[: int(len(data) * fraction)]
    assert len(cut) < len(data)
    outcome = validate_shard(shard([cut]), CONFIG)
    assert reasons_of(outcome) == ["truncated"]


def test_oversized_images_are_refused_without_decoding(monkeypatch: pytest.MonkeyPatch):
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def recording_load(image):
        decoded.append(image.size)
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    table = shard([png_declaring(12000, 12000), png_declaring(30000, 30000), encode(noise(40, 40), "PNG")])
    outcome = validate_shard(table, CONFIG)
    assert reasons_of(outcome) == ["too_large", "too_large", None]
    assert decoded == [(40, 40)]


def test_a_real_decompression_bomb_is_refused_without_decoding(monkeypatch: pytest.MonkeyPatch):
    # a valid PNG of 10000 x 10000 grey pixels: ~100 KB on the wire, 100 MB once decoded
    bomb = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(bomb, format="PNG", optimize=True)
    assert len(bomb.getvalue()) < 200_000
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or real_load(image)
    )
    outcome = validate_shard(shard([bomb.getvalue(), encode(noise(40, 40), "PNG")]), CONFIG)
    assert reasons_of(outcome) == ["too_large", None]
    assert decoded == [(40, 40)]  # refused from its header


def test_config_limits_decide_not_pils_warning_threshold(monkeypatch: pytest.MonkeyPatch):
    # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; config allows more than PIL's warning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    config = ValidateConfig(min_side=1, max_pixels=10_000)
    table = shard([encode(noise(40, 40), "PNG"), encode(noise(50, 50), "PNG"), encode(noise(20, 20), "PNG")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = validate_shard(table, config)
    assert reasons_of(outcome) == [None, "too_large", None]  # 1600 px: PIL only warns; 2500 px: PIL refuses
    assert "exceeds limit of 2000 pixels" in details_of(outcome)[1]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]

    smaller = validate_shard(table, ValidateConfig(min_side=1, max_pixels=500))
    assert reasons_of(smaller) == ["too_large", "too_large", None]


def test_global_pil_and_warning_state_is_left_alone():
    filters_before = list(warnings.filters)
    pil_limit_before = Image.MAX_IMAGE_PIXELS
    validate_shard(shard([png_declaring(12000, 12000), encode(noise(40, 40), "JPEG")]), CONFIG)
    assert warnings.filters == filters_before
    assert pil_limit_before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_refuses_to_run_when_pil_tolerates_truncated_images(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        validate_shard(shard([encode(noise(40, 40), "JPEG")]), CONFIG)


def test_empty_and_multi_chunk_shards():
    empty = validate_shard(shard([]), CONFIG)
    assert empty.kept.num_rows == 0 and empty.decisions.num_rows == 0
    assert empty.kept.schema == VALIDATE_SCHEMA

    good = encode(noise(40, 40), "PNG")
    table = pa.concat_tables([shard([good, b"junk"]), shard([None, good])])
    assert table.column("image").num_chunks == 2
    outcome = validate_shard(table, CONFIG)
    assert reasons_of(outcome) == [None, "undecodable", "undecodable", None]
    assert outcome.kept.column("sample_id").to_pylist() == ["s0000", "s0001"]  # the second shard restarts ids


@pytest.fixture(scope="module")
def rsscn7_images(shared_data: Path) -> list[bytes]:
    rsscn7 = shared_data / "rsscn7"
    if not rsscn7.is_dir():
        missing_data(f"RSSCN7 sample not present at {rsscn7} (see its README for how it was extracted)")
    paths = sorted(rsscn7.glob("images/*/*.jpg"))
    assert len(paths) == 350
    return [path.read_bytes() for path in paths]


def test_rsscn7_images_all_pass(rsscn7_images: list[bytes]):
    table = shard(rsscn7_images)
    outcome = validate_shard(table, CONFIG)
    assert_consistent(table, outcome)
    kept = outcome.kept
    assert kept.num_rows == 350
    assert set(kept.column("width").to_pylist()) == {400}
    assert set(kept.column("height").to_pylist()) == {400}
    assert set(kept.column("image_format").to_pylist()) == {"JPEG"}
    assert kept.column("sha256").to_pylist() == [hashlib.sha256(data).hexdigest() for data in rsscn7_images]


def test_rsscn7_images_cut_in_half_are_all_truncated(rsscn7_images: list[bytes]):
    table = shard([data[: len(data) // 2] for data in rsscn7_images])
    outcome = validate_shard(table, CONFIG)
    assert_consistent(table, outcome)
    assert outcome.counts() == {KEPT: 0, "dropped:truncated": 350}
    assert all(detail.startswith("JPEG 400x400: image file is truncated") for detail in details_of(outcome))
