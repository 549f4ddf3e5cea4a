"""decontaminate: drop training samples that copy an image of an evaluation set.

Eval sets come from the config (`decontaminate.eval_sets`: a name and a folder searched recursively for
EVAL_IMAGE_SUFFIXES). For each set an index is built once per task: the rotation/flip-invariant DCT hash of
every eval image (models/perceptual_hash.py) and its image embedding with the run's CLIP (the `clip` section,
the same encoder the embed stage used). It is cached at WORKDIR/cache/eval/<name>-<key>.npz, where key hashes
the model identity and the sorted list of files with their sizes and mtimes, so editing a set or changing the
model rebuilds it, and the same key is part of the stage fingerprint, so it also reruns every shard.

A training sample is `contaminated` when, for some set, its `phash` is within `perceptual_max_distance` bits
of an eval image's (any rotation or flip) or its image embedding has cosine >= `embedding_min_similarity`
with one; either test is disabled by null. The detail names the best match of EVERY set it matched, as
"eval set <name>: <path relative to the set's folder> (hamming d | cosine c)", joined by "; " (a perceptual
match is named in preference to an embedding match of the same set), so per-set overlap counts can be read
from the ledger by counting "eval set <name>:" prefixes. Scores, for every sample when the set's test is
enabled: "eval_cosine" = highest cosine to any eval image of any set; "eval_hamming" = the smallest distance
to an eval image when one is within the threshold.

An eval image that cannot be read or decoded fails the task (EvalSetError): silently skipping it would weaken
the guarantee this stage exists for.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.near_duplicates import embedding_neighbours
from models.perceptual_hash import dct_hash, hash_neighbours
from rs5m.config import DecontaminateConfig, EvalSetConfig, PipelineConfig
from storage.atomic import write_bytes
from storage.layout import Layout
from tasks.dedup import phash_matrix
from tasks.embed import model_identity, shared_encoder
from tasks.harness import Report, ShardStage
from tasks.stage import ShardOutcome, decisions

REASONS = {
    "contaminated": "perceptual hash or image embedding matches an image of an evaluation set (detail names it)",
}

EVAL_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif"})
# Bump when what the cache holds, or how it is computed, changes.
INDEX_VERSION = 1
ENCODE_BATCH = 64

# Decontaminate tasks run in threads: one builds a missing cache while the others wait and then read it.
_BUILDING = threading.Lock()


class EvalSetError(RuntimeError):
    """An eval set folder that is missing, empty, or holds an image that cannot be read or decoded."""


@dataclass(frozen=True)
class EvalSetIndex:
    name: str
    paths: tuple[str, ...]  # relative to the set's folder, sorted
    hashes: np.ndarray  # (m, 8) uint8
    embeddings: np.ndarray  # (m, d) float16, L2-normalised


@dataclass(frozen=True)
class EvalIndex:
    sets: tuple[EvalSetIndex, ...]


def eval_files(eval_set: EvalSetConfig) -> list[Path]:
    folder = Path(eval_set.path)
    if not folder.is_dir():
        raise EvalSetError(f"eval set {eval_set.name!r}: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EVAL_IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EvalSetError(
            f"eval set {eval_set.name!r}: no {'/'.join(sorted(EVAL_IMAGE_SUFFIXES))} files under {folder}"
        )
    return files


def eval_set_key(eval_set: EvalSetConfig, files: list[Path], model: dict[str, str]) -> str:
    """Hash of the model identity and the set's relative file names and contents (not where the folder is
    or when its files were written: a copied eval set is the same eval set)."""
    from models.clip import file_sha256

    folder = Path(eval_set.path)
    listing = [[path.relative_to(folder).as_posix(), file_sha256(path)] for path in files]
    payload = json.dumps({"version": INDEX_VERSION, "model": model, "files": listing}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def eval_identity(config: PipelineConfig) -> dict[str, str]:
    """Stage fingerprint part: one key per eval set (it covers the model as well)."""
    model = model_identity(config.clip)
    return {f"eval:{s.name}": eval_set_key(s, eval_files(s), model) for s in config.decontaminate.eval_sets}


def build_eval_index(layout: Layout, config: PipelineConfig) -> EvalIndex:
    """Every configured eval set's index, read from the cache or computed (and cached)."""
    model = model_identity(config.clip)
    sets = []
    for eval_set in config.decontaminate.eval_sets:
        files = eval_files(eval_set)
        path = layout.eval_cache(eval_set.name, eval_set_key(eval_set, files, model))
        with _BUILDING:
            if not path.exists():
                write_bytes(path, _index_bytes(_compute_set(eval_set, files, config)))
        sets.append(_read_set(eval_set.name, path))
    return EvalIndex(tuple(sets))


def _compute_set(eval_set: EvalSetConfig, files: list[Path], config: PipelineConfig) -> EvalSetIndex:
    images, hashes, failures = [], [], []
    for path in files:
        try:
            data = path.read_bytes()
            hashes.append(dct_hash(data))
            images.append(data)
        except (OSError, ValueError) as error:
            failures.append(f"{path}: {error}")
    if failures:
        raise EvalSetError(
            f"eval set {eval_set.name!r}: {len(failures)} images cannot be used: " + "; ".join(failures[:5])
        )
    shared = shared_encoder(config.clip)
    with shared.lock:
        embeddings = shared.encoder.encode_images(images, batch_size=config.clip.batch_size)
    folder = Path(eval_set.path)
    return EvalSetIndex(
        name=eval_set.name,
        paths=tuple(p.relative_to(folder).as_posix() for p in files),
        hashes=np.stack(hashes),
        embeddings=embeddings,
    )


def _index_bytes(index: EvalSetIndex) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        paths=np.array(index.paths, dtype=str),
        hashes=index.hashes,
        embeddings=index.embeddings,
    )
    return buffer.getvalue()


def _read_set(name: str, path: Path) -> EvalSetIndex:
    with np.load(path, allow_pickle=False) as stored:
        return EvalSetIndex(
            name=name,
            paths=tuple(stored["paths"].tolist()),
            hashes=stored["hashes"],
            embeddings=stored["embeddings"],
        )


def decontaminate_shard(
    table: pa.Table, image_emb: np.ndarray, index: EvalIndex, config: DecontaminateConfig
) -> ShardOutcome:
    """Decide every row of a DEDUP_SCHEMA shard against the eval index; `image_emb` row i is table row i."""
    n = table.num_rows
    hashes, hashed = phash_matrix(table.column("phash"))
    hashed_rows = np.flatnonzero(hashed)
    matches: list[list[str]] = [[] for _ in range(n)]
    best_hamming = np.full(n, np.nan)
    best_cosine = np.full(n, np.nan)
    for eval_set in index.sets:
        matched = np.zeros(n, dtype=bool)
        if config.perceptual_max_distance is not None:
            rows, cols, distance = hash_neighbours(
                eval_set.hashes, config.perceptual_max_distance, queries=hashes[hashed_rows]
            )
            # pairs are sorted by row, then column: order by distance first so each row's closest comes first
            order = np.lexsort((cols, distance, rows))
            rows, cols, distance = hashed_rows[rows[order]], cols[order], distance[order]
            first = np.ones(len(rows), dtype=bool)
            first[1:] = rows[1:] != rows[:-1]
            for row, col, bits in zip(
                rows[first].tolist(), cols[first].tolist(), distance[first].tolist(), strict=True
            ):
                matches[row].append(f"eval set {eval_set.name}: {eval_set.paths[col]} (hamming {bits})")
                matched[row] = True
                best_hamming[row] = np.fmin(best_hamming[row], bits)
        if config.embedding_min_similarity is not None and n:
            # k=1 with no threshold: the nearest eval image of every row, for the score and the test
            rows, cols, similarity = embedding_neighbours(eval_set.embeddings, -1.0, k=1, queries=image_emb)
            best_cosine[rows] = np.fmax(best_cosine[rows], similarity)
            hits = (similarity >= config.embedding_min_similarity) & ~matched[rows]
            for row, col, cosine in zip(
                rows[hits].tolist(), cols[hits].tolist(), similarity[hits].tolist(), strict=True
            ):
                matches[row].append(f"eval set {eval_set.name}: {eval_set.paths[col]} (cosine {cosine:.3f})")
    reasons = ["contaminated" if found else None for found in matches]
    details = ["; ".join(found) if found else None for found in matches]
    scores = [_scores(h, c) for h, c in zip(best_hamming.tolist(), best_cosine.tolist(), strict=True)]
    keep = np.array([reason is None for reason in reasons], dtype=bool)
    return ShardOutcome(
        kept=table.filter(pa.array(keep, pa.bool_())),
        decisions=decisions(
            table.column("sample_id"), table.column("source"), reasons, details, scores=scores
        ),
        arrays={"image": np.asarray(image_emb)[keep]},
    )


def _scores(hamming: float, cosine: float) -> dict[str, float] | None:
    scores = {}
    if not np.isnan(hamming):
        scores["eval_hamming"] = hamming
    if not np.isnan(cosine):
        scores["eval_cosine"] = cosine
    return scores or None


def _processor(config: PipelineConfig) -> Callable[..., ShardOutcome]:
    index = build_eval_index(Layout(config.workdir), config)
    return functools.partial(_process, index=index, config=config.decontaminate)


def _process(
    table: pa.Table, arrays: dict[str, np.ndarray], index: EvalIndex, config: DecontaminateConfig
) -> ShardOutcome:
    return decontaminate_shard(table, arrays["image"], index, config)


DECONTAMINATE = ShardStage(
    name="decontaminate",
    upstream="dedup",
    reasons=REASONS,
    sections=("clip", "decontaminate"),
    code_version="1",
    report=Report("(ours) eval-set copies removed", "dropped"),
    make_processor=_processor,
    identity=eval_identity,
    upstream_arrays=("image",),
    forks_processes=True,
)
