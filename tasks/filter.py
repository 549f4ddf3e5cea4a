"""filter: keep image-text pairs whose caption matches the image and whose image is remote sensing.

Two scores per row, both from the embed stage's float16 embeddings (no image is decoded here):
  clip_score  cosine(image, caption): dot product of the two embeddings, each renormalised in float32 (float16
              storage leaves norms off 1 by up to ~1e-3).
  rs_score    probability that the image is remote sensing, by default zero-shot against a prompt ensemble:
              each class's embedding is the mean of its normalised prompt embeddings, renormalised;
              logits = scale * image . class for every class of both groups; softmax over all classes;
              rs_score = the summed probability of the `remote_sensing` classes. `scale` is the model's own
              learned temperature exp(logit_scale) (about 100 for trained CLIP, capped at 100 as in CLIP;
              1/0.07 = 14.3 for a random init), or 100 for a model without one.
              With `filter.detector` set, rs_score = sigmoid(w . image + b) of a linear probe trained by
              `rs5m train-detector` (models/rs_detector.py) instead, read from WORKDIR/detectors/<name>.json.

Keep iff clip_score >= clip_score_min and rs_score >= rs_score_min (both inclusive). Scores are float32 and
the thresholds are rounded to float32 before comparing, so a score that equals its threshold passes and the
stored scores (float32 columns, and exactly the same values in the ledger) reproduce every decision. A row failing both is dropped as
`not_remote_sensing`: the image is off-topic whatever its caption says; the detail names both failures.
Both scores go into the ledger's `scores` map for every row and into the kept rows' columns.

Prompt ensembles (filter.rs_prompts): a shipped version (rs-v1 = tasks/prompts/rs-v1.json) or a JSON file
  {"remote_sensing": {"<class>": ["<prompt>", ...], ...}, "other": {"<class>": ["<prompt>", ...], ...}}
with full prompt sentences. rs-v1 sets five RS classes (satellite, aerial, remote sensing, drone top-down,
orthophoto) against ten ordinary-photo classes (people, food, products, indoor scenes, animals, street-level
views and sky, screenshots, drawings, text documents, vehicle close-ups): the more ordinary classes there are,
the less an ambiguous image's mass lands on the RS side by default.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from models.rs_detector import check_detector_name, load_detector
from rs5m.config import FilterConfig, PipelineConfig
from storage.layout import Layout
from storage.markers import sha256_file
from storage.schemas import FILTER_SCHEMA
from tasks.embed import clip_spec, model_identity, shared_encoder
from tasks.harness import Report, ShardStage
from tasks.shipped import resolve_shipped
from tasks.stage import ShardOutcome, decisions

if TYPE_CHECKING:  # torch and open_clip load in seconds: only the work imports them, not `rs5m report`
    from models.clip import ClipEncoder, ClipSpec

REASONS = {
    "not_remote_sensing": "rs_score < rs_score_min: the image is not remote sensing (checked first; "
    "detail also names a failing clip_score)",
    "low_clip_score": "clip_score < clip_score_min: the caption does not describe the image",
}

PROMPTS_DIR = Path(__file__).parent / "prompts"
# A config value of this shape names a shipped prompt ensemble; anything else is a file path.
_GROUPS = ("remote_sensing", "other")
# Bumped when the zero-shot scoring rule changes, so the identity (and the stage fingerprint) changes with it.
ZERO_SHOT_VERSION = "1"
DEFAULT_LOGIT_SCALE = 100.0

RsScorer = Callable[[np.ndarray], np.ndarray]  # (n, d) image embeddings -> (n,) probability of RS


@dataclass(frozen=True)
class PromptEnsemble:
    classes: dict[str, list[str]]  # class -> prompts, RS classes first
    rs_classes: frozenset[str]
    identity: str  # sha256 of the parsed content: formatting changes do not rerun the stage

    @classmethod
    def read(cls, path: Path) -> PromptEnsemble:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read prompt ensemble {path}: {error}") from None
        if not isinstance(data, dict) or sorted(data) != sorted(_GROUPS):
            raise ValueError(f"prompt ensemble {path} must be an object with exactly the keys {_GROUPS}")
        classes: dict[str, list[str]] = {}
        for group in _GROUPS:
            members = data[group]
            if not isinstance(members, dict) or not members:
                raise ValueError(f"{path}: {group!r} must map at least one class to its prompts")
            for name, prompts in members.items():
                if name in classes:
                    raise ValueError(f"{path}: class {name!r} appears in both groups")
                if (
                    not isinstance(prompts, list)
                    or not prompts
                    or not all(isinstance(p, str) and p.strip() for p in prompts)
                ):
                    raise ValueError(f"{path}: class {name!r} needs a non-empty list of non-empty prompts")
                classes[name] = prompts
        canonical = json.dumps({"zero_shot": ZERO_SHOT_VERSION, **data}, sort_keys=True)
        return cls(classes, frozenset(data["remote_sensing"]), hashlib.sha256(canonical.encode()).hexdigest())


def resolve_prompts(value: str) -> Path:
    """A shipped version ("rs-v1") or a file path -> the ensemble file; ValueError naming what is missing."""
    return resolve_shipped(value, PROMPTS_DIR, ".json", "prompt ensemble")


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def zero_shot_rs_probability(
    image_emb: np.ndarray, class_emb: np.ndarray, is_rs_class: np.ndarray, logit_scale: float
) -> np.ndarray:
    """Softmax over all classes of logit_scale * cosine(image, class); summed over the RS classes. (n,)"""
    logits = logit_scale * (_normalised(image_emb) @ _normalised(class_emb).T).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return probabilities[:, np.asarray(is_rs_class, dtype=bool)].sum(axis=1)


class ZeroShotRsScorer:
    """rs_score from a prompt ensemble; the class embeddings are computed once, when the scorer is built."""

    def __init__(self, ensemble: PromptEnsemble, encoder: ClipEncoder) -> None:
        names = list(ensemble.classes)
        self.class_emb = np.stack(
            [_normalised(_normalised(encoder.encode_texts(ensemble.classes[n])).mean(axis=0)) for n in names]
        )
        self.is_rs_class = np.array([n in ensemble.rs_classes for n in names])
        scale = getattr(encoder.model, "logit_scale", None)
        self.logit_scale = (
            DEFAULT_LOGIT_SCALE if scale is None else min(float(scale.detach().exp()), DEFAULT_LOGIT_SCALE)
        )

    def __call__(self, image_emb: np.ndarray) -> np.ndarray:
        return zero_shot_rs_probability(image_emb, self.class_emb, self.is_rs_class, self.logit_scale)


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, d) arrays, float32."""
    return np.einsum("ij,ij->i", _normalised(image_emb), _normalised(text_emb))


def score_and_filter(
    table: pa.Table,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    rs_scorer: RsScorer,
    config: FilterConfig,
) -> ShardOutcome:
    """Decide every row of an embedded shard; survivors keep their columns and gain clip_score and rs_score
    (FILTER_SCHEMA for an EMBED_SCHEMA shard), with their arrays."""
    if not len(image_emb) == len(text_emb) == table.num_rows:
        raise ValueError(
            f"{table.num_rows} rows but {len(image_emb)} image / {len(text_emb)} text embeddings"
        )
    clip = clip_scores(image_emb, text_emb)
    rs = np.asarray(rs_scorer(image_emb), dtype=np.float32).reshape(table.num_rows)
    # float32 on both sides: a score equal to a threshold (0.7) after rounding to float32 passes it
    low_clip = ~(clip >= np.float32(config.clip_score_min))  # a NaN score fails too
    not_rs = ~(rs >= np.float32(config.rs_score_min))
    reasons: list[str | None] = []
    details: list[str | None] = []
    for c, r, fails_clip, fails_rs in zip(clip.tolist(), rs.tolist(), low_clip, not_rs, strict=True):
        failures = []
        if fails_rs:
            failures.append(f"rs_score {r:.4f} < {config.rs_score_min}")
        if fails_clip:
            failures.append(f"clip_score {c:.4f} < {config.clip_score_min}")
        reasons.append("not_remote_sensing" if fails_rs else "low_clip_score" if fails_clip else None)
        details.append("; ".join(failures) or None)
    scores = [{"clip_score": c, "rs_score": r} for c, r in zip(clip.tolist(), rs.tolist(), strict=True)]
    keep = ~(low_clip | not_rs)
    kept = (
        table.filter(pa.array(keep))
        .append_column("clip_score", pa.array(clip[keep], pa.float32()))
        .append_column("rs_score", pa.array(rs[keep], pa.float32()))
    )
    return ShardOutcome(
        kept=kept,
        decisions=decisions(
            table.column("sample_id"), table.column("source"), reasons, details, scores=scores
        ),
        arrays={"image": np.asarray(image_emb[keep]), "text": np.asarray(text_emb[keep])},
    )


def detector_path(config: PipelineConfig) -> Path | None:
    if config.filter.detector is None:
        return None
    return Layout(config.workdir).detector(check_detector_name(config.filter.detector))


_ZERO_SHOT_LOCK = threading.Lock()
_ZERO_SHOT_SCORERS: dict[tuple[ClipSpec, str], ZeroShotRsScorer] = {}


def build_rs_scorer(config: PipelineConfig) -> RsScorer:
    """The configured rs_score: the linear probe when filter.detector is set, else zero-shot prompts."""
    path = detector_path(config)
    if path is not None:
        # checked against the model identity: a probe trained for other embeddings is refused here
        return load_detector(path, clip_spec(config.clip).identity()).score
    ensemble = PromptEnsemble.read(resolve_prompts(config.filter.rs_prompts))
    key = (clip_spec(config.clip), ensemble.identity)
    with _ZERO_SHOT_LOCK:
        # every shard task builds a processor: the class embeddings are computed once per process
        if key not in _ZERO_SHOT_SCORERS:
            shared = shared_encoder(config.clip)
            with shared.lock:
                _ZERO_SHOT_SCORERS[key] = ZeroShotRsScorer(ensemble, shared.encoder)
        return _ZERO_SHOT_SCORERS[key]


def filter_identity(config: PipelineConfig) -> dict[str, str]:
    identity = {
        **model_identity(config.clip),
        "prompts": PromptEnsemble.read(resolve_prompts(config.filter.rs_prompts)).identity,
    }
    path = detector_path(config)
    if path is not None:
        load_detector(path, clip_spec(config.clip).identity())  # exists, and was trained for this model
        identity["detector"] = sha256_file(path)
    return identity


def _processor(config: PipelineConfig) -> Callable[..., ShardOutcome]:
    rs_scorer = build_rs_scorer(config)

    def process(table: pa.Table, arrays: dict[str, np.ndarray]) -> ShardOutcome:
        return score_and_filter(table, arrays["image"], arrays["text"], rs_scorer, config.filter)

    return process


# Thresholds at their floors: every sample is kept with both scores (cosine >= -1, probability >= 0).
KEEP_ALL = FilterConfig(clip_score_min=-1.0, rs_score_min=0.0)


def _scoring_processor(config: PipelineConfig) -> Callable[..., ShardOutcome]:
    rs_scorer = build_rs_scorer(config)

    def process(table: pa.Table, arrays: dict[str, np.ndarray]) -> ShardOutcome:
        return score_and_filter(table, arrays["image"], arrays["text"], rs_scorer, KEEP_ALL)

    return process


ADDED_FIELDS = (FILTER_SCHEMA.field("clip_score"), FILTER_SCHEMA.field("rs_score"))

FILTER = ShardStage(
    name="filter",
    upstream="embed",
    reasons=REASONS,
    sections=("clip", "filter"),
    code_version="1",
    report=Report("non-RS outliers removed", "dropped"),
    adds=ADDED_FIELDS,
    make_processor=_processor,
    identity=filter_identity,
    upstream_arrays=("image", "text"),
)


def score_stage(name: str, upstream: str, report: Report) -> ShardStage:
    """The filter's scores without its thresholds: label-only RS datasets (RS3) are remote sensing by
    construction and their captions are ours, so nothing is dropped; the scores rank duplicates in dedup
    and go to the ledger and the release."""
    return ShardStage(
        name=name,
        upstream=upstream,
        reasons={},
        sections=("clip",),
        code_version="1",
        report=report,
        adds=ADDED_FIELDS,
        make_processor=_scoring_processor,
        identity=filter_identity,
        upstream_arrays=("image", "text"),
    )
