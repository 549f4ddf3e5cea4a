"""rs3_caption: BLIP-2 captions for RS3 images, ranked with CLIP across rotations, then the final caption.

Per image (models/blip2.py generates, models/clip.py scores):
1. BLIP-2 samples `num_candidates` captions once, from the upright image (keyed by the sample id, so a rerun
   or a resumed shard writes the same captions whatever the batch).
2. The `clip` model scores every non-empty candidate against the image turned by 0, 90, 180 and 270 degrees
   (and mirrored both ways with `flips`): cosine(image view, caption), float32. Only this cheap scoring sees
   the rotations.
3. top_cap: the candidate with the best mean score over the views.
   ssl_cap: among the `ssl_pool` (5) best candidates by mean score, the one whose scores vary least across
   the views (smallest population standard deviation; ties: the better mean). A caption that names an
   orientation or a side (ORIENTATION: "on the left", "top right", "north of", "upper", "vertical", ...)
   cannot be rotation-invariant in meaning however stable its score is, so it is not eligible while the
   pool holds one that does not; if every caption of the pool names one, the rule applies to all of them.
   Equal scores keep the earlier candidate (generation order).
4. The model caption is top_cap or ssl_cap: by default a seeded coin per sample id (RS5M's random choice),
   or always one of them (`choice`). The final caption of a fMoW or BigEarthNet image is
   `meta_caption + " " + model caption` (the model caption alone when no meta caption could be built); of an
   image-folder image (MillionAID) the model caption alone, its meta caption kept in `meta_caption`.

Drops: `no_model_caption` when every candidate is empty; with `model: null` (no model captions) the
caption is the meta caption and an image without one is dropped as `no_caption_source`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from rs5m.config import CaptionConfig, PipelineConfig
from storage.schemas import MODEL_CAPTION_FIELDS, SAMPLE_FIELDS
from tasks.embed import model_identity, shared_encoder
from tasks.harness import Report, ShardStage
from tasks.stage import ShardOutcome, decisions
from tasks.watchdog import heartbeat, holding

if TYPE_CHECKING:  # transformers loads in seconds: only the stage's work imports it (not `rs5m report`)
    from models.blip2 import Captioner, CaptionerSpec, Decoding
    from models.clip import ClipEncoder, ImageView

REASONS = {
    "no_model_caption": "every caption BLIP-2 sampled for the image was empty",
    "no_caption_source": "no model captions are configured (rs3.caption.model: null) and the image's "
    "metadata gives no meta caption",
}
# bumped when the ranking or composition rule changes: every shard is captioned again
RANKING_VERSION = "1"
# formats whose final caption is prefixed by the meta caption (RS5M: FMoW and BigEarthNet, not MillionAID)
META_PREFIXED_FORMATS = frozenset({"fmow", "bigearthnet"})
CAPTION_FIELD = next(f for f in SAMPLE_FIELDS if f.name == "caption")
ADDED_FIELDS = (CAPTION_FIELD, *MODEL_CAPTION_FIELDS)

_DIRECTIONS = r"(?:north|south)(?:[- ]?(?:east|west))?(?:ern|ward|wards)?|(?:east|west)(?:ern|ward|wards)?"
ORIENTATION = re.compile(
    rf"\b(?:left|right|top|bottom|upper|lower|above|below|beneath|underneath|"
    rf"horizontal(?:ly)?|vertical(?:ly)?|diagonal(?:ly)?|upside|{_DIRECTIONS})\b",
    re.IGNORECASE,
)


def names_orientation(caption: str) -> bool:
    """Whether a caption names a side, direction or orientation (ORIENTATION), which a rotation changes."""
    return ORIENTATION.search(caption) is not None


def views(flips: bool) -> tuple[ImageView, ...]:
    """The views every candidate is scored on, in the order of the stored per-view scores."""
    from models.clip import ROTATIONS

    return (*ROTATIONS, "hflip", "vflip") if flips else ROTATIONS


@dataclass(frozen=True)
class Ranked:
    """One image's ranking: candidate indices best first by mean score, and the two picks."""

    order: list[int]  # non-empty candidates, best mean first
    top: int
    ssl: int


def rank(candidates: Sequence[str], scores: np.ndarray, pool: int) -> Ranked | None:
    """candidates (c,) and their (c, views) scores -> the ranking (module docstring), or None when every
    candidate is empty."""
    eligible = [i for i, text in enumerate(candidates) if text.strip()]
    if not eligible:
        return None
    means = scores.mean(axis=1)
    spreads = scores.std(axis=1)
    # stable sorts: equal values keep generation order
    order = sorted(eligible, key=lambda i: -means[i])
    head = order[:pool]
    unoriented = [i for i in head if not names_orientation(candidates[i])]
    ssl = min(unoriented or head, key=lambda i: (spreads[i], -means[i]))
    return Ranked(order, order[0], ssl)


def coin(sample_id: str, seed: int) -> bool:
    """RS5M's random choice between top_cap (True) and ssl_cap, as a function of the sample id and seed."""
    return hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=1).digest()[0] < 128


def final_caption(meta: str | None, model_caption: str | None, source_format: str) -> str | None:
    if model_caption is None:
        return meta
    if meta and source_format in META_PREFIXED_FORMATS:
        return f"{meta} {model_caption}"
    return model_caption


@dataclass(frozen=True)
class Captioning:
    """What caption_shard needs besides the rows: the two models and the rules (None: no model captions)."""

    captioner: Captioner | None
    encoder: ClipEncoder | None
    decoding: Decoding
    config: CaptionConfig
    formats: dict[str, str]  # source name -> format
    clip_batch_size: int = 64


def caption_shard(
    table: pa.Table, captioning: Captioning, progress: Callable[[int], None] | None = None
) -> ShardOutcome:
    """Decide every row of an RS3 shard that carries `image` and the meta caption columns; survivors get their
    final `caption` and MODEL_CAPTION_FIELDS, in input order."""
    sample_ids = table.column("sample_id").to_pylist()
    metas = table.column("meta_caption").to_pylist()
    source_formats = [captioning.formats[source] for source in table.column("source").to_pylist()]
    columns: dict[str, list] = {f.name: [None] * len(sample_ids) for f in ADDED_FIELDS}
    reasons: list[str | None] = [None] * len(sample_ids)
    if captioning.captioner is None:
        for row, meta in enumerate(metas):
            columns["caption"][row] = meta
            columns["caption_choice"][row] = "meta" if meta else None
            reasons[row] = None if meta else "no_caption_source"
    else:
        _caption_with_model(table, captioning, columns, reasons, progress)
        for row, model_caption in enumerate(columns["caption"]):
            columns["caption"][row] = final_caption(metas[row], model_caption, source_formats[row])
    keep = pa.array([reason is None for reason in reasons], pa.bool_())
    survivors = table.filter(keep).drop_columns(["caption"])
    added = [
        pa.array([v for v, r in zip(columns[f.name], reasons, strict=True) if r is None], f.type)
        for f in ADDED_FIELDS
    ]
    kept = pa.Table.from_arrays(
        [*survivors.columns, *added], schema=pa.schema([*survivors.schema, *ADDED_FIELDS])
    )
    details = [REASONS[reason] if reason else None for reason in reasons]
    return ShardOutcome(kept=kept, decisions=decisions(sample_ids, table.column("source"), reasons, details))


def _caption_with_model(
    table: pa.Table,
    captioning: Captioning,
    columns: dict[str, list],
    reasons: list[str | None],
    progress: Callable[[int], None] | None,
) -> None:
    config = captioning.config
    sample_ids = table.column("sample_id").to_pylist()
    images = table.column("image").to_pylist()
    candidates = captioning.captioner.generate(
        images, captioning.decoding, config.batch_size, progress, keys=sample_ids
    )
    texts = sorted({text for row in candidates for text in row if text.strip()})
    text_emb = captioning.encoder.encode_texts(texts, progress=progress).astype(np.float32)
    text_row = {text: i for i, text in enumerate(texts)}
    image_emb = captioning.encoder.encode_images(
        images, batch_size=captioning.clip_batch_size, views=views(config.flips), progress=progress
    ).astype(np.float32)
    for row, row_candidates in enumerate(candidates):
        scores = np.zeros((len(row_candidates), image_emb.shape[1]), np.float32)
        for i, text in enumerate(row_candidates):
            if text in text_row:
                scores[i] = image_emb[row] @ text_emb[text_row[text]]
        ranked = rank(row_candidates, scores, config.ssl_pool)
        if ranked is None:
            reasons[row] = "no_model_caption"
            continue
        choice = config.choice
        if choice == "random":
            choice = "top_cap" if coin(sample_ids[row], config.choice_seed) else "ssl_cap"
        chosen = ranked.top if choice == "top_cap" else ranked.ssl
        means = scores.mean(axis=1)
        values = {
            "caption": row_candidates[chosen],
            "caption_choice": choice,
            "caption_score": means[chosen],
            "top_cap": row_candidates[ranked.top],
            "top_cap_score": means[ranked.top],
            "ssl_cap": row_candidates[ranked.ssl],
            "ssl_cap_score": means[ranked.ssl],
            "ssl_cap_spread": scores[ranked.ssl].std(),
            "caption_candidates": [
                {"text": row_candidates[i], "mean_score": means[i], "view_scores": scores[i].tolist()}
                for i in ranked.order[: config.ssl_pool]
            ],
        }
        for name, value in values.items():
            columns[name][row] = value.item() if isinstance(value, np.generic) else value


def captioner_spec(config: CaptionConfig) -> CaptionerSpec:
    from models.blip2 import CaptionerSpec

    return CaptionerSpec(
        model=config.model,
        adapter=config.adapter,
        precision=config.precision,
        device=config.device,
        seed=config.seed,
    )


def decoding(config: CaptionConfig) -> Decoding:
    from models.blip2 import Decoding

    return Decoding(
        num_candidates=config.num_candidates,
        do_sample=config.do_sample,
        top_k=config.top_k,
        top_p=config.top_p,
        max_length=config.max_length,
        seed=config.sampling_seed,
        prompt=config.prompt,
    )


_LOADING = threading.Lock()


@functools.cache
def _shared_captioner(spec: CaptionerSpec) -> tuple[Captioner, threading.Lock]:
    from models.blip2 import load_captioner

    return load_captioner(spec), threading.Lock()


def shared_captioner(config: CaptionConfig) -> tuple[Captioner, threading.Lock]:
    """The process's captioner for this spec with the lock its users hold (one generate at a time)."""
    with _LOADING:
        return _shared_captioner(captioner_spec(config))


def _processor(config: PipelineConfig) -> Callable[[pa.Table], ShardOutcome]:
    caption = config.rs3.caption
    formats = {source.name: source.format for source in config.rs3.sources}
    if caption.model is None:
        off = Captioning(None, None, decoding(caption), caption, formats)
        return lambda table: caption_shard(table, off)
    captioner, captioner_lock = shared_captioner(caption)
    clip = shared_encoder(config.clip)

    def process(table: pa.Table) -> ShardOutcome:
        # each model is used under its own lock; the two are never held together
        captioning = Captioning(
            _GuardedCaptioner(captioner, captioner_lock),
            _GuardedEncoder(clip.encoder, clip.lock),
            decoding(caption),
            caption,
            formats,
            config.clip.batch_size,
        )
        return caption_shard(table, captioning, progress=lambda _n: heartbeat())

    return process


class _GuardedCaptioner:
    def __init__(self, captioner: Captioner, lock: threading.Lock) -> None:
        self.captioner, self.lock = captioner, lock

    def generate(self, *args, **kwargs) -> list[list[str]]:
        with holding(self.lock):
            return self.captioner.generate(*args, **kwargs)


class _GuardedEncoder:
    def __init__(self, encoder: ClipEncoder, lock: threading.Lock) -> None:
        self.encoder, self.lock = encoder, lock

    def encode_texts(self, *args, **kwargs) -> np.ndarray:
        with holding(self.lock):
            return self.encoder.encode_texts(*args, **kwargs)

    def encode_images(self, *args, **kwargs) -> np.ndarray:
        with holding(self.lock):
            return self.encoder.encode_images(*args, **kwargs)


def _identity(config: PipelineConfig) -> dict[str, str]:
    from models.blip2 import SAMPLER_VERSION

    caption = config.rs3.caption
    if caption.model is None:
        return {"ranking": RANKING_VERSION}
    return {
        "captioner": captioner_spec(caption).identity(),
        "sampler": SAMPLER_VERSION,
        "ranking": RANKING_VERSION,
        **{f"clip_{key}": value for key, value in model_identity(config.clip).items()},
    }


def _preflight(config: PipelineConfig) -> None:
    from models.blip2 import ensure_loadable

    if config.rs3.caption.model is not None:
        ensure_loadable(captioner_spec(config.rs3.caption))


RS3_CAPTION = ShardStage(
    name="rs3_caption",
    upstream="rs3_meta",
    images_from="rs3_validate",
    reasons=REASONS,
    sections=("rs3.caption", "clip"),
    code_version="1",
    report=Report("(RS3) BLIP-2 captions", "kept"),
    drops=("caption",),
    adds=ADDED_FIELDS,
    make_processor=_processor,
    identity=_identity,
    preflight=_preflight,
    forks_processes=True,
)
