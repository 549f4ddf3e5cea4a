"""tasks/embed.py: real RSSCN7 JPEGs through embed_shard with the tiny random CLIP (offline), and two shards
embedded at once from threads, as Prefect's thread pool runs them (the decode processes must not hang)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from models.clip import ClipSpec, UndecodableImageError, load_clip
from models.perceptual_hash import dct_hashes
from storage.schemas import EMBED_SCHEMA, VALIDATE_SCHEMA
from tasks.embed import REASONS, embed_shard
from tests.helpers import missing_data

TINY_DIM = 64


@pytest.fixture(scope="module")
def encoder():
    return load_clip(ClipSpec("rs5m-tiny-vit", seed=0, device="cpu"), num_workers=0)


@pytest.fixture(scope="module")
def rsscn7_images(shared_data: Path) -> list[bytes]:
    folder = shared_data / "rsscn7" / "images"
    if not folder.is_dir():
        missing_data(f"{folder} is absent: these tests embed real RSSCN7 JPEGs")
    # two per class: varied scenes
    return [p.read_bytes() for d in sorted(folder.iterdir()) for p in sorted(d.glob("*.jpg"))[:2]]


def validate_table(images: list[bytes | None], captions: list[str | None]) -> pa.Table:
    n = len(images)
    return pa.table(
        {
            "sample_id": [f"s{i:03d}" for i in range(n)],
            "source": ["web"] * n,
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "caption": captions,
            "extra": [None] * n,
            "matched_keyword": ["aerial"] * n,
            "image": images,
            "sha256": [hashlib.sha256(b or b"").hexdigest() for b in images],
            "width": [400] * n,
            "height": [400] * n,
            "image_format": ["JPEG"] * n,
        },
        schema=VALIDATE_SCHEMA,
    )


def captions_for(n: int) -> list[str | None]:
    return [None if i == 3 else f"an aerial view number {i} of farmland" for i in range(n)]


def test_every_row_kept_with_aligned_float16_arrays_and_phash(encoder, rsscn7_images):
    table = validate_table(rsscn7_images, captions_for(len(rsscn7_images)))
    outcome = embed_shard(table, encoder, batch_size=5)
    n = len(rsscn7_images)
    assert outcome.counts() == {"kept": n}
    assert outcome.kept.schema == EMBED_SCHEMA
    assert "image" not in outcome.kept.column_names
    assert outcome.kept.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    assert outcome.kept.column("caption").to_pylist() == table.column("caption").to_pylist()
    for name in ("image", "text"):
        assert outcome.arrays[name].shape == (n, TINY_DIM)
        assert outcome.arrays[name].dtype == np.float16
    phash = np.frombuffer(b"".join(outcome.kept.column("phash").to_pylist()), np.uint8).reshape(n, 32)
    np.testing.assert_array_equal(phash, dct_hashes(rsscn7_images))
    # row i of each array belongs to kept row i: compare with one-at-a-time encodings
    for row in (0, 3, n - 1):
        single_image = encoder.encode_images([rsscn7_images[row]])[0].astype(np.float32)
        np.testing.assert_allclose(outcome.arrays["image"][row].astype(np.float32), single_image, atol=2e-3)
        single_text = encoder.encode_texts([table.column("caption")[row].as_py() or ""])[0]
        np.testing.assert_allclose(outcome.arrays["text"][row], single_text, atol=2e-3)
    # distinct images and captions give distinct rows (no broadcast or off-by-one copy)
    assert len({outcome.arrays["image"][i].tobytes() for i in range(n)}) == n


def test_deterministic(encoder, rsscn7_images):
    table = validate_table(rsscn7_images[:6], captions_for(6))
    first, second = embed_shard(table, encoder), embed_shard(table, encoder)
    assert first.kept.equals(second.kept)
    for name in ("image", "text"):
        np.testing.assert_array_equal(first.arrays[name], second.arrays[name])


def test_undecodable_bytes_are_dropped_and_the_rest_stay_aligned(encoder, rsscn7_images):
    images: list[bytes | None] = [rsscn7_images[0], b"<html>not an image</html>", rsscn7_images[1]]
    table = validate_table(images, ["a", "b", "c"])
    outcome = embed_shard(table, encoder)
    assert outcome.counts() == {"kept": 2, "dropped:unembeddable": 1}
    assert set(REASONS) == {"unembeddable"}
    dropped = outcome.decisions.filter(pc.equal(outcome.decisions.column("fate"), "dropped"))
    assert dropped.column("sample_id").to_pylist() == ["s001"]
    assert dropped.column("detail")[0].as_py().startswith("perceptual hash")
    expected = encoder.encode_images([rsscn7_images[0], rsscn7_images[1]])
    np.testing.assert_array_equal(outcome.arrays["image"], expected)
    assert outcome.arrays["text"].shape == (2, TINY_DIM)


class RejectingEncoder:
    """Delegates to a real encoder but rejects one image, as a decoder stricter than PIL would."""

    def __init__(self, encoder, rejected: bytes) -> None:
        self.encoder = encoder
        self.rejected = rejected

    def encode_images(self, images, batch_size=64, *, progress=None):
        bad = [i for i, data in enumerate(images) if data == self.rejected]
        if bad:
            raise UndecodableImageError(bad, len(images))
        return self.encoder.encode_images(images, batch_size=batch_size, progress=progress)

    def encode_texts(self, texts, *, progress=None):
        return self.encoder.encode_texts(texts, progress=progress)


def test_rows_the_encoder_rejects_are_dropped_with_phash_and_arrays_aligned(encoder, rsscn7_images):
    images = rsscn7_images[:4]
    table = validate_table(images, ["a", "b", "c", "d"])
    outcome = embed_shard(table, RejectingEncoder(encoder, rejected=images[2]))
    assert outcome.counts() == {"kept": 3, "dropped:unembeddable": 1}
    assert outcome.kept.column("sample_id").to_pylist() == ["s000", "s001", "s003"]
    kept_images = [images[0], images[1], images[3]]
    phash = np.frombuffer(b"".join(outcome.kept.column("phash").to_pylist()), np.uint8).reshape(3, 32)
    np.testing.assert_array_equal(phash, dct_hashes(kept_images))
    np.testing.assert_array_equal(outcome.arrays["image"], encoder.encode_images(kept_images))
    np.testing.assert_array_equal(outcome.arrays["text"], encoder.encode_texts(["a", "b", "d"]))


def small_jpegs(count: int, seed: int) -> list[bytes]:
    """Smooth random 64x64 JPEGs (the tiny model's input size: decoding is cheap, the test is about processes)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((64, 64), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def test_progress_reports_every_image_batch_then_the_captions(encoder):
    images = small_jpegs(12, seed=3)
    calls: list[int] = []
    outcome = embed_shard(
        validate_table(images, captions_for(12)), encoder, batch_size=5, progress=calls.append
    )
    assert outcome.counts() == {"kept": 12}
    assert calls == [5, 5, 2, 12]


# Two shards in two threads, with the decode processes and the hash pool busy, again and again, in a fresh
# process whose PIL has not yet imported its format plugins: a forked worker then often inherited importlib's
# lock on a plugin module from a hash thread and waited for ever (the forked DataLoader hung in 9 of 12 such
# runs on 2 cores).
ITERATIONS = 20
COLD_ITERATION_TIMEOUT_S = 150  # starts the decode processes (their server imports torch and open_clip)
ITERATION_TIMEOUT_S = 30
CHILD_TIMEOUT_S = 360
TWO_SHARDS_ROWS = (24, 40)


def two_shards_in_threads(shards_path: str, iterations: int) -> None:
    """The child of test_two_shards_in_threads_never_hang: exits 0, 2 if PIL's plugins were imported too early,
    3 (after printing every thread's stack) if an iteration passes its timeout, 1 on a wrong result."""
    from rs5m.config import ClipConfig
    from tasks.embed import _hash_or_error, embed_shard, hash_pool, shared_encoder

    shards: list[list[bytes]] = pickle.loads(Path(shards_path).read_bytes())
    tables = [validate_table(images, captions_for(len(images))) for images in shards]
    shared = shared_encoder(ClipConfig(model="rs5m-tiny-vit", device="cpu", num_workers=2))
    plugins = sorted(name for name in sys.modules if name.startswith("PIL.") and name.endswith("ImagePlugin"))
    if plugins:
        print(f"PIL's plugins are already imported ({plugins}): not a cold start", flush=True)
        sys.exit(2)
    shard_threads = ThreadPoolExecutor(2, thread_name_prefix="shard")  # as Prefect's ThreadPoolTaskRunner
    seconds: list[float] = []
    first: list[np.ndarray] = []
    for iteration in range(iterations):
        start = time.perf_counter()
        futures = [shard_threads.submit(embed_shard, table, shared.encoder, 16) for table in tables]
        busy = [hash_pool().submit(_hash_or_error, data) for images in shards for data in images]
        timeout = COLD_ITERATION_TIMEOUT_S if iteration == 0 else ITERATION_TIMEOUT_S
        _, pending = wait(futures, timeout=timeout)
        if pending:
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            print(
                f"iteration {iteration} did not finish in {timeout} s; decode processes "
                f"{shared.encoder.decode_process_ids()}; every thread's stack:",
                file=sys.stderr,
            )
            for ident, frame in sys._current_frames().items():
                print(f"--- thread {names.get(ident, ident)}", file=sys.stderr)
                traceback.print_stack(frame, file=sys.stderr)
            sys.stderr.flush()
            os._exit(3)
        seconds.append(time.perf_counter() - start)
        wait(busy)
        outcomes = [future.result() for future in futures]
        for outcome, table in zip(outcomes, tables, strict=True):
            assert outcome.counts() == {"kept": table.num_rows}
        arrays = [outcome.arrays["image"] for outcome in outcomes]
        for index, array in enumerate(arrays):
            if iteration == 0:
                first.append(array)
            np.testing.assert_array_equal(array, first[index])
    shard_threads.shutdown()
    for table, array in zip(tables, first, strict=True):
        images = table.column("image").to_pylist()
        in_process = shared.encoder.encode_images(images, batch_size=16, num_workers=0)
        np.testing.assert_array_equal(array, in_process)
    print(
        json.dumps({"first_s": seconds[0], "median_s": statistics.median(seconds[1:] or seconds)}), flush=True
    )
    # no close(): the decode processes must stop by themselves at interpreter exit


def live_group_members(group: int) -> list[str]:
    """The processes of process group `group` that are not zombies (Linux /proc), else [] once none answers."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return []
        return [f"group {group}"]
    members = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
            members.append(f"{stat.parent.name} {cmdline[:160]}")
    return members


def test_two_shards_in_threads_never_hang(tmp_path):
    shards = [small_jpegs(rows, seed) for seed, rows in enumerate(TWO_SHARDS_ROWS)]
    shards_path = tmp_path / "shards.pkl"
    shards_path.write_bytes(pickle.dumps(shards))
    log = tmp_path / "child.log"
    code = f"from tests.test_embed import two_shards_in_threads; two_shards_in_threads({str(shards_path)!r}, {ITERATIONS})"
    with log.open("w") as out:
        # its own process group: whatever it starts (forkserver, decode processes) can be found and stopped
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=Path(__file__).resolve().parents[1],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = child.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            returncode = None
    # a clean interpreter exit stops every decode process; give the orphans a moment, then stop what is left
    deadline = time.monotonic() + 15
    while (leftovers := live_group_members(child.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if leftovers:
        os.killpg(child.pid, signal.SIGKILL)
    output = log.read_text()
    assert returncode == 0, (
        f"the child exited with {returncode} (None: killed at {CHILD_TIMEOUT_S} s):\n{output[-30000:]}"
    )
    assert not leftovers, f"processes still running 15 s after the child exited: {leftovers}"
    timings = json.loads(output.strip().splitlines()[-1])
    print(
        f"two shards in threads: first iteration {timings['first_s']:.2f} s, then {timings['median_s']:.3f} s"
    )
