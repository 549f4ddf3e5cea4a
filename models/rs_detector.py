"""A linear probe on CLIP image embeddings that tells remote-sensing images from other images.

`train_detector` embeds two folders of images (positives: remote sensing; negatives: anything else) with a
ClipEncoder and fits an L2-regularised logistic regression by Newton's method in float64 numpy: no random
initialisation and no minibatches, so the same files and model give the same weights. A stratified held-out
part (chosen by a seeded permutation) measures accuracy; the saved weights are the ones fitted on the rest, so
the reported accuracy describes exactly the saved detector.

The detector is stored as JSON (weights, bias, the CLIP model identity it was trained for, training stats).
Loading it for another model identity is refused: its weights mean nothing in another embedding space.

No prefect import: this runs wherever models/clip.py runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.atomic import write_json

if TYPE_CHECKING:  # torch and open_clip load in seconds: `rs5m report` imports this module for the names
    from models.clip import ClipEncoder

FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DetectorMismatchError(ValueError):
    """A detector trained on another CLIP model's embeddings than the one in use."""


def check_detector_name(name: str) -> str:
    """Detector names become file names under WORKDIR/detectors: letters, digits, '_', '.', '-'."""
    if not _NAME_RE.match(name):
        raise ValueError(f"detector name {name!r} must match {_NAME_RE.pattern}")
    return name


@dataclass(frozen=True)
class Detector:
    weights: np.ndarray  # (d,) float64
    bias: float
    model_identity: str  # ClipSpec.identity() of the embeddings it was trained on
    stats: dict[str, Any] = field(default_factory=dict)

    def score(self, image_emb: np.ndarray) -> np.ndarray:
        """(n, d) image embeddings -> (n,) probability of remote sensing, sigmoid(w . x + b), float64."""
        if image_emb.ndim != 2 or image_emb.shape[1] != len(self.weights):
            raise ValueError(f"expected (n, {len(self.weights)}) embeddings, got {image_emb.shape}")
        return _sigmoid(image_emb.astype(np.float64) @ self.weights + self.bias)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "logistic_regression",
            "model_identity": self.model_identity,
            "weights": self.weights.tolist(),
            "bias": self.bias,
            "stats": self.stats,
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Detector:
        if payload.get("format_version") != FORMAT_VERSION or payload.get("kind") != "logistic_regression":
            raise ValueError(
                f"not a format-{FORMAT_VERSION} logistic-regression detector "
                f"(format_version={payload.get('format_version')!r}, kind={payload.get('kind')!r})"
            )
        return cls(
            weights=np.asarray(payload["weights"], dtype=np.float64),
            bias=float(payload["bias"]),
            model_identity=str(payload["model_identity"]),
            stats=dict(payload.get("stats", {})),
        )


def save_detector(detector: Detector, path: Path) -> None:
    write_json(path, detector.to_json())


def load_detector(path: Path, model_identity: str) -> Detector:
    """Read a detector and refuse it unless it was trained for `model_identity` (ClipSpec.identity())."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no detector at {path}: train one with `rs5m train-detector --workdir ... --name {Path(path).stem} "
            "--positives DIR --negatives DIR`"
        ) from None
    detector = Detector.from_json(payload)
    if detector.model_identity != model_identity:
        raise DetectorMismatchError(
            f"detector {path} was trained on embeddings of {detector.model_identity!r}, but the configured "
            f"CLIP model is {model_identity!r}; retrain it with the current clip section"
        )
    return detector


def image_files(folder: Path) -> list[Path]:
    """Image files under folder (recursive), sorted so training sees them in a fixed order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def embed_files(
    paths: list[Path], encoder: ClipEncoder, batch_size: int = 64
) -> tuple[np.ndarray, list[Path]]:
    """Image embeddings of the decodable files, and the files that could not be decoded."""
    from models.clip import UndecodableImageError

    images = [p.read_bytes() for p in paths]
    try:
        return encoder.encode_images(images, batch_size=batch_size), []
    except UndecodableImageError as error:
        bad = set(error.indices)
        good = [i for i in range(len(paths)) if i not in bad]
        embeddings = encoder.encode_images([images[i] for i in good], batch_size=batch_size)
        return embeddings, [paths[i] for i in sorted(bad)]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # split by sign so exp never overflows
    out = np.empty_like(z, dtype=np.float64)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    exp_z = np.exp(z[~positive])
    out[~positive] = exp_z / (1.0 + exp_z)
    return out


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, l2: float = 1e-3, max_iter: int = 50, tol: float = 1e-10
) -> tuple[np.ndarray, float]:
    """Minimise mean log-loss + l2/2 * |w|^2 (bias not penalised) by Newton's method; deterministic."""
    x = np.hstack([features.astype(np.float64), np.ones((len(features), 1))])
    y = labels.astype(np.float64)
    penalty = np.full(x.shape[1], l2)
    penalty[-1] = 0.0
    theta = np.zeros(x.shape[1])
    for _ in range(max_iter):
        p = _sigmoid(x @ theta)
        gradient = x.T @ (p - y) / len(y) + penalty * theta
        hessian = (x * (p * (1 - p))[:, None]).T @ x / len(y) + np.diag(penalty)
        # a tiny ridge keeps the bias direction solvable when all probabilities saturate
        step = np.linalg.solve(hessian + 1e-12 * np.eye(len(theta)), gradient)
        theta -= step
        if float(np.abs(step).max()) < tol:
            break
    return theta[:-1], float(theta[-1])


def _split(n: int, heldout_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    held = min(max(1, int(round(n * heldout_fraction))), n - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def train_detector(
    positive_dir: Path,
    negative_dir: Path,
    encoder: ClipEncoder,
    *,
    heldout_fraction: float = 0.2,
    l2: float = 1e-3,
    seed: int = 0,
    batch_size: int = 64,
) -> Detector:
    """Fit a remote-sensing probe on two image folders; stats carry the held-out accuracy.

    Each folder needs at least 2 decodable images (one to fit, one held out). Undecodable files are skipped
    and listed in stats["skipped_files"].
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    embedded = {}
    skipped: list[str] = []
    for label, folder in ((1, positive_dir), (0, negative_dir)):
        embeddings, bad = embed_files(image_files(folder), encoder, batch_size)
        if len(embeddings) < 2:
            raise ValueError(f"{folder}: need at least 2 decodable images, found {len(embeddings)}")
        embedded[label] = embeddings
        skipped.extend(str(p) for p in bad)
    rng = np.random.default_rng(seed)
    parts = {label: _split(len(emb), heldout_fraction, rng) for label, emb in embedded.items()}

    def stack(which: int) -> tuple[np.ndarray, np.ndarray]:
        features = np.concatenate([embedded[label][parts[label][which]] for label in (1, 0)])
        labels = np.concatenate([np.full(len(parts[label][which]), label) for label in (1, 0)])
        return features, labels

    (train_x, train_y), (held_x, held_y) = stack(0), stack(1)
    weights, bias = fit_logistic(train_x, train_y, l2=l2)
    detector = Detector(weights, bias, encoder.spec.identity())

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean((detector.score(x) >= 0.5) == (y == 1)))

    stats = {
        "positives": str(positive_dir),
        "negatives": str(negative_dir),
        "n_positive": len(embedded[1]),
        "n_negative": len(embedded[0]),
        "n_train": len(train_y),
        "n_heldout": len(held_y),
        "train_accuracy": accuracy(train_x, train_y),
        "heldout_accuracy": accuracy(held_x, held_y),
        "l2": l2,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "precision": encoder.spec.precision,
        "skipped_files": skipped,
    }
    return Detector(weights, bias, detector.model_identity, stats)
