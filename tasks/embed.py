"""embed: CLIP image and caption embeddings plus a perceptual hash for every validated image.

Every row is kept; its metadata (VALIDATE_SCHEMA minus the image bytes, which stay in validate/data) goes on
with `phash`, the rotation/flip-aware DCT hash of the original bytes (models/perceptual_hash.py, 32 bytes), and
two float16 L2-normalised arrays stored beside the shard: "image" (n, d) and "text" (n, d) of the captions
(a null caption is embedded as the empty string, so every row has a text embedding).

A row is dropped only when its bytes cannot be decoded for hashing or by the encoder (`unembeddable`); validate
has already decoded every image fully, so this marks a decoder difference (the encoder may use nvjpeg), not a
routine filter.

The model comes from the config's `clip` section; one loaded encoder per ClipSpec is kept for the life of the
process, so the shards of a run (and later stages using the same model) do not load it again.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from models.perceptual_hash import HASH_BYTES, dct_hash
from rs5m.config import ClipConfig, PipelineConfig
from storage.schemas import EMBED_SCHEMA
from tasks.harness import Report, ShardStage
from tasks.stage import ShardOutcome, split_by_reason
from tasks.watchdog import heartbeat, holding

if TYPE_CHECKING:  # torch and open_clip load in seconds: only the work imports them, not `rs5m report`
    from models.clip import ClipEncoder, ClipSpec

HASH_THREADS = os.cpu_count() or 1

REASONS = {
    "unembeddable": "the image bytes could not be decoded for the perceptual hash or by the CLIP encoder",
}


def embed_shard(
    table: pa.Table,
    encoder: ClipEncoder,
    batch_size: int = 64,
    *,
    progress: Callable[[int], None] | None = None,
) -> ShardOutcome:
    """Decide every row of a shard of validated images (VALIDATE_SCHEMA, or RS3's rows); survivors keep their
    columns but `image` and gain `phash` (EMBED_SCHEMA for a VALIDATE_SCHEMA shard), arrays aligned.

    progress: a heartbeat, called after each batch the encoder finishes with its number of items (images, then
    captions; the images are counted twice in the rare case that the encoder rejects some and runs again).
    """
    from models.clip import UndecodableImageError

    images = table.column("image").to_pylist()
    # Hashing runs in threads while the encoder works (PIL releases the GIL): one core hashes ~900 img/s, so a
    # serial loop would cap a GPU encoder (~12k img/s) at a fraction of its rate. Nothing in this stage forks
    # while those threads run: the encoder's decode processes come from a forkserver (models/clip.py).
    hashing = hash_pool().map(_hash_or_error, images)
    reasons: list[str | None] = [None] * len(images)
    details: list[str | None] = [None] * len(images)
    candidates = [row for row, data in enumerate(images) if data is not None]
    try:
        image_emb = encoder.encode_images(
            [images[row] for row in candidates], batch_size=batch_size, progress=progress
        )
    except UndecodableImageError as error:
        # rare (validate decoded every image): drop the rows the encoder named and encode the rest again
        rejected = {candidates[position] for position in error.indices}
        for row in rejected:
            reasons[row], details[row] = "unembeddable", "the CLIP encoder's decoder rejected the bytes"
        candidates = [row for row in candidates if row not in rejected]
        image_emb = encoder.encode_images(
            [images[row] for row in candidates], batch_size=batch_size, progress=progress
        )
    hashes = list(hashing)
    for row, hashed in enumerate(hashes):
        # a failed hash's message names the decoder's complaint, so it replaces the encoder's vaguer one
        if isinstance(hashed, str):
            reasons[row], details[row] = "unembeddable", hashed
    embedded = [position for position, row in enumerate(candidates) if reasons[row] is None]
    kept_rows = [candidates[position] for position in embedded]
    captions = table.column("caption").to_pylist()
    text_emb = encoder.encode_texts([captions[row] or "" for row in kept_rows], progress=progress)
    outcome = split_by_reason(table, pa.array(reasons, pa.string()), pa.array(details, pa.string()))
    kept = outcome.kept.drop_columns(["image"]).append_column(
        "phash", pa.array([hashes[row] for row in kept_rows], pa.binary(HASH_BYTES))
    )
    return ShardOutcome(
        kept=kept,
        decisions=outcome.decisions,
        arrays={"image": image_emb[embedded], "text": text_emb},
    )


@functools.cache
def hash_pool() -> ThreadPoolExecutor:
    """The process's perceptual-hash threads, shared by every embed shard."""
    return ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="rs5m-phash")


def _hash_or_error(data: bytes | None) -> bytes | str:
    """The perceptual hash of one image, or the message saying why it cannot be computed."""
    if data is None:
        return "perceptual hash: no image bytes"
    try:
        return dct_hash(data).tobytes()
    except ValueError as error:
        return f"perceptual hash: {error}"


def clip_spec(config: ClipConfig) -> ClipSpec:
    from models.clip import ClipSpec

    return ClipSpec(
        model=config.model,
        pretrained=config.pretrained,
        precision=config.precision,
        device=config.device,
        seed=config.seed,
    )


class SharedEncoder:
    """A loaded encoder with the lock its users hold while encoding: stage tasks run in threads, and two shards
    encoding at once (sharing its decode processes, the CPU cores or one GPU) gain nothing. The encoder is safe
    to call from several threads without it; the lock is about throughput and memory."""

    def __init__(self, encoder: ClipEncoder) -> None:
        self.encoder = encoder
        self.lock = threading.Lock()


_LOADING = threading.Lock()


@functools.cache
def _shared_encoder(spec: ClipSpec, num_workers: int) -> SharedEncoder:
    from models.clip import load_clip

    return SharedEncoder(load_clip(spec, num_workers=num_workers))


def shared_encoder(config: ClipConfig) -> SharedEncoder:
    """The process's encoder for this model, loaded on first use (under a lock: shard tasks run in threads)."""
    with _LOADING:
        return _shared_encoder(clip_spec(config), config.num_workers)


def model_identity(config: ClipConfig) -> dict[str, str]:
    """What the stored embeddings depend on besides the config fields: the weights (a checkpoint file's hash,
    a hub tag, or the random-init seed and architecture) and the precision they ran at."""
    return {"model": clip_spec(config).identity(), "precision": config.precision}


def _processor(config: PipelineConfig) -> Callable[[pa.Table], ShardOutcome]:
    shared = shared_encoder(config.clip)

    def process(table: pa.Table) -> ShardOutcome:
        with holding(shared.lock):
            return embed_shard(
                table, shared.encoder, batch_size=config.clip.batch_size, progress=lambda _n: heartbeat()
            )

    return process


def embed_stage(name: str, upstream: str, report: Report, images_from: str | None = None) -> ShardStage:
    """The embed stage over any upstream whose rows carry a `caption` and validated `image` bytes (their own,
    or those of the earlier stage `images_from`)."""
    return ShardStage(
        name=name,
        upstream=upstream,
        reasons=REASONS,
        sections=("clip",),
        code_version="2",
        report=report,
        drops=("image",),
        adds=(EMBED_SCHEMA.field("phash"),),
        make_processor=_processor,
        identity=lambda config: model_identity(config.clip),
        images_from=images_from,
        forks_processes=True,
    )


EMBED = embed_stage("embed", "validate", Report("(ours) embedded", "kept"))
