"""Zero-shot evaluation of a CLIP encoder as GeoRSCLIP reports it: scene classification and image-text retrieval.

Datasets:
  - classification: a folder of class folders (torchvision's ImageFolder layout and order, read with its own
    find_classes / make_dataset); the class names in the prompts are RS5M's (`rs5m_classname`);
  - retrieval: a CSV of `filename,caption` rows (or `filename,title`, as RS5M's RSICD / RSITMD test CSVs), several
    rows per image.

Zero-shot classifier (`zeroshot_weights`), from the text encoder's raw (unnormalised, float32) features of every
prompt (template × class):
  - "rs5m" (RS5M's inference_tool.zeroshot_classifier): per class the mean of the raw prompt features, then
    L2-normalised;
  - "clip_benchmark" (CLIP_benchmark's zero_shot_classifier): each prompt feature L2-normalised, averaged, and the
    mean renormalised.
Logits = 100 · L2-normalised image feature · class weight (both protocols). Everything after the encoder runs in
float64.

Metrics carry CLIP_benchmark's names and definitions (fractions in [0, 1]):
  - `acc1`, `acc5`: share of images whose class is among the top 1 / top 5 logits, from one torch.topk(k) call
    with k = 5 (k = 1 when there are fewer than 5 classes, where acc5 is NaN, as in CLIP_benchmark);
  - `mean_per_class_recall`: sklearn's balanced_accuracy_score of the argmax prediction (torch.argmax: the first
    maximal logit), i.e. the mean over the classes that have images of the share of their images predicted as
    that class;
  - `image_retrieval_recall@K` (text→image: one query per caption, a hit when its image is among the top K
    images), `text_retrieval_recall@K` (image→text: one query per image, a hit when any of its captions is among
    the top K captions), K = 1, 5, 10; with fewer than K candidates all of them are the top K (CLIP_benchmark's
    recall_at_k would raise); `mean_recall` is the mean of these six (RS5M's "mR").
Scores are cosine similarities. Ties are broken as torch.topk breaks them (the metrics always run on CPU tensors),
which is not always the lower index: the top 1 of the scores [0, 1, 1, 1, 0, 1] is position 3 (torch 2.14), while
argmax, used for mean_per_class_recall, says 1.

No prefect import here: the CLI and a Prefect flow both call `evaluate`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from models.clip import ClipEncoder, UndecodableImageError

Protocol = Literal["rs5m", "clip_benchmark"]
PROTOCOLS: tuple[Protocol, ...] = ("rs5m", "clip_benchmark")
RETRIEVAL_KS = (1, 5, 10)
TEMPLATES_DIR = Path(__file__).resolve().parent / "eval_templates"
RS5M_TEMPLATES = TEMPLATES_DIR / "rs5m.txt"
LOGIT_SCALE = 100.0
# images read from disk and handed to the encoder per call (rounded up to whole batches): bounds the memory the
# image bytes take while the encoder's decode processes stay busy
_IMAGES_PER_CALL = 1024
_NAMED_FILES = 3

# called with (items encoded so far, items to encode in this evaluate call): images, prompts and captions
EvalProgress = Callable[[int, int], None]


class EvalDataError(ValueError):
    """An evaluation dataset or template file is unusable; the message is one line naming the path and the
    problem."""


class ClassificationSet(NamedTuple):
    """classnames: the class folder names, sorted (ImageFolder's class indices); samples: (image file, class
    index) in ImageFolder's order."""

    classnames: list[str]
    samples: list[tuple[Path, int]]


class RetrievalSet(NamedTuple):
    """images: unique image files in order of first appearance; captions: one per CSV row, in row order;
    caption_image: for each caption the index of its image in `images`."""

    images: list[Path]
    captions: list[str]
    caption_image: list[int]


def read_classification_folder(path: str | os.PathLike[str]) -> ClassificationSet:
    """A folder of class folders, read as torchvision's ImageFolder reads it: classes are the sub-folder names
    sorted (index = position), images are the files under each class folder, recursively, whose names end (case
    insensitive) in one of torchvision's IMG_EXTENSIONS, in sorted os.walk order. Raises EvalDataError for a
    missing path, a file, a folder without class folders, and class folders without images (ImageFolder refuses
    those too)."""
    root = Path(path)
    if not root.exists():
        raise EvalDataError(f"{root}: no such folder")
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a folder (classification needs a folder of class folders)")
    try:
        classnames, class_to_index = find_classes(root)
    except FileNotFoundError:
        raise EvalDataError(
            f"{root}: no class folders (expected one sub-folder of images per class)"
        ) from None
    except OSError as error:
        raise EvalDataError(f"{root}: cannot be listed ({error.strerror or error})") from None
    samples = make_dataset(root, class_to_index, extensions=IMG_EXTENSIONS, allow_empty=True)
    empty = sorted(set(classnames) - {classnames[index] for _, index in samples})
    if empty:
        raise EvalDataError(
            f"{root}: class folders without images: {', '.join(empty)} "
            f"(image extensions: {' '.join(IMG_EXTENSIONS)})"
        )
    return ClassificationSet(classnames, [(Path(file), index) for file, index in samples])


def read_retrieval_csv(path: str | os.PathLike[str]) -> RetrievalSet:
    """A retrieval CSV: a header with `filename` and `caption` columns (or `title` in place of `caption`, as
    RS5M's RSICD / RSITMD test CSVs name it; `caption` wins when both are there), then one row per (image,
    caption) pair, several rows per image. Filenames are relative to the CSV's folder (absolute ones stay as
    they are); two rows name the same image when their joined paths are equal. Header names and filenames are
    stripped of surrounding spaces, caption text is kept as written; blank lines are skipped. The file is read as UTF-8 (a BOM is allowed), else as
    GB18030, the encoding RS5M reads rsicd_test.csv with. Raises EvalDataError for a missing file, an empty CSV,
    missing columns, a row without filename or caption, and image files that do not exist."""
    csv_path = Path(path)
    if not csv_path.is_file():
        raise EvalDataError(f"{csv_path}: no such file")
    reader = csv.reader(io.StringIO(_read_csv_text(csv_path), newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise EvalDataError(f"{csv_path}: empty CSV (expected a header row filename,caption)")
        caption_column = "caption" if "caption" in header else "title"
        if "filename" not in header or caption_column not in header:
            raise EvalDataError(
                f"{csv_path}: columns {','.join(header)}; retrieval needs filename and caption "
                "(or title) columns"
            )
        filename_at, caption_at = header.index("filename"), header.index(caption_column)
        image_index: dict[Path, int] = {}
        captions: list[str] = []
        caption_image: list[int] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            filename = row[filename_at].strip() if filename_at < len(row) else ""
            caption = row[caption_at] if caption_at < len(row) else ""
            if not filename or not caption.strip():
                missing = "filename" if not filename else caption_column
                raise EvalDataError(f"{csv_path}: line {reader.line_num} has no {missing}")
            image = csv_path.parent / filename
            caption_image.append(image_index.setdefault(image, len(image_index)))
            captions.append(caption)
    except csv.Error as error:
        raise EvalDataError(f"{csv_path}: line {reader.line_num}: malformed CSV ({error})") from None
    if not captions:
        raise EvalDataError(f"{csv_path}: no rows after the header")
    images = list(image_index)
    missing_files = [image for image in images if not image.is_file()]
    if missing_files:
        raise EvalDataError(
            f"{csv_path}: {len(missing_files)} of {len(images)} image files do not exist: "
            f"{_some(missing_files)}"
        )
    return RetrievalSet(images, captions, caption_image)


def rs5m_classname(folder: str) -> str:
    """RS5M's class name for a class folder: "_" and "/" replaced by spaces, then lower-cased
    (`Dense_Residential` -> `dense residential`, EuroSAT's `AnnualCrop` -> `annualcrop`)."""
    return folder.replace("_", " ").replace("/", " ").lower()


def load_templates(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Prompt templates, one per line (line breaks \\n or \\r\\n), kept exactly as written; None reads the
    shipped RS5M set (models/eval_templates/rs5m.txt, 105 templates). Every line must hold exactly one
    placeholder, `{}` or `{c}`, and no other brace (EvalDataError naming the file and line otherwise, blank
    lines included)."""
    template_path = RS5M_TEMPLATES if path is None else Path(path)
    try:
        text = template_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise EvalDataError(f"{template_path}: cannot be read as UTF-8 text ({reason})") from None
    templates = text.splitlines()
    if not templates:
        raise EvalDataError(f"{template_path}: no templates")
    for line_number, template in enumerate(templates, start=1):
        problem = _template_problem(template)
        if problem:
            raise EvalDataError(f"{template_path}: line {line_number}: {problem}")
    return templates


def fill_template(template: str, classname: str) -> str:
    """The prompt for one class: the template's placeholder (`{}` or `{c}`) replaced by the class name."""
    problem = _template_problem(template)
    if problem:
        raise ValueError(f"template {template!r}: {problem}")
    placeholder = "{}" if "{}" in template else "{c}"
    return template.replace(placeholder, classname, 1)


def zeroshot_weights(prompt_features: np.ndarray, protocol: Protocol) -> np.ndarray:
    """(classes, templates, dim) raw prompt features -> (classes, dim) float64 unit rows, by the protocol's rule
    (see the module docstring): "rs5m" normalises the mean of the raw features, "clip_benchmark" the mean of the
    normalised features. The two agree when every prompt feature of a class has the same norm."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    features = np.asarray(prompt_features, dtype=np.float64)
    if features.ndim != 3:
        raise ValueError(f"prompt features must be (classes, templates, dim), got shape {features.shape}")
    if protocol == "clip_benchmark":
        features = _unit(features)
    return _unit(features.mean(axis=1))


def classification_logits(image_features: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """(images, dim) image features (raw or normalised) and (classes, dim) weights -> (images, classes) float64
    logits: 100 · normalised image feature · class weight."""
    return (
        LOGIT_SCALE
        * _unit(np.asarray(image_features, dtype=np.float64))
        @ np.asarray(class_weights, dtype=np.float64).T
    )


def classification_metrics(logits: np.ndarray, targets: Sequence[int] | np.ndarray) -> dict[str, float]:
    """`acc1`, `acc5` and `mean_per_class_recall` of (images, classes) logits against class indices, computed as
    CLIP_benchmark computes them (see the module docstring): acc1 and acc5 from one torch.topk call (k = 5, or 1
    with fewer than 5 classes, then acc5 is NaN), mean_per_class_recall from the torch.argmax prediction."""
    scores = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    truth = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    if scores.ndim != 2 or len(scores) != len(truth) or len(truth) == 0:
        raise ValueError(f"logits {tuple(scores.shape)} and targets ({len(truth)},) do not match")
    num_classes = scores.shape[1]
    top = torch.topk(scores, 5 if num_classes >= 5 else 1, dim=1).indices
    correct = top == truth[:, None]
    predicted = scores.argmax(dim=1)
    recalls = [(predicted[truth == label] == label).double().mean().item() for label in torch.unique(truth)]
    return {
        "acc1": correct[:, 0].double().mean().item(),
        "acc5": correct.any(dim=1).double().mean().item() if num_classes >= 5 else math.nan,
        "mean_per_class_recall": float(np.mean(recalls)),
    }


def retrieval_metrics(
    image_features: np.ndarray, text_features: np.ndarray, caption_image: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """Recall@K both ways and their mean (see the module docstring) from (images, dim) and (captions, dim)
    features, raw or normalised (both are L2-normalised here); caption_image[i] is the image of caption i.
    Keys, in this order: image_retrieval_recall@1/5/10, text_retrieval_recall@1/5/10, mean_recall."""
    images = torch.as_tensor(_unit(np.asarray(image_features, dtype=np.float64)))
    texts = torch.as_tensor(_unit(np.asarray(text_features, dtype=np.float64)))
    owner = torch.as_tensor(np.asarray(caption_image, dtype=np.int64))
    if len(owner) != len(texts) or len(texts) == 0 or len(images) == 0:
        raise ValueError(
            f"{len(texts)} captions, {len(owner)} caption->image indices and {len(images)} images do not match"
        )
    scores = texts @ images.T  # (captions, images)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    metrics = {f"image_retrieval_recall@{k}": _hit_rate(scores, positive, k) for k in RETRIEVAL_KS}
    metrics |= {f"text_retrieval_recall@{k}": _hit_rate(scores.T, positive.T, k) for k in RETRIEVAL_KS}
    metrics["mean_recall"] = float(np.mean(list(metrics.values())))
    return metrics


def evaluate(
    encoder: ClipEncoder,
    datasets: Sequence[tuple[str, str | os.PathLike[str]]],
    protocol: Protocol,
    templates: Sequence[str],
    batch_size: int,
    progress: EvalProgress | None = None,
) -> list[dict[str, Any]]:
    """Evaluates `encoder` on each (name, path): a folder is a classification set (read_classification_folder),
    a .csv file a retrieval set (read_retrieval_csv). Every dataset, the protocol and the templates are checked
    before anything is encoded; an image that cannot be read or decoded stops the call with EvalDataError naming
    it. Images go to encoder.encode_images as the files' bytes (the model's own open_clip preprocess), prompts
    and captions to encoder.encode_texts, both with normalize=False, `batch_size` per forward pass.

    Returns, per dataset in order, {"dataset": name, "task": "zeroshot_classification" | "zeroshot_retrieval",
    "protocol": protocol, "metrics": {...}} (the protocol changes classification only).
    progress: called after each encoded batch with (items encoded so far, items in total), items being images,
    prompts and captions over all datasets.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if not templates:
        raise ValueError("no prompt templates")
    for template in templates:
        problem = _template_problem(template)
        if problem:
            raise ValueError(f"template {template!r}: {problem}")
    names = [name for name, _ in datasets]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"dataset names must be unique; repeated: {', '.join(duplicates)}")
    loaded = [(name, _read_dataset(Path(path))) for name, path in datasets]
    total = sum(
        len(data.samples) + len(data.classnames) * len(templates)
        if isinstance(data, ClassificationSet)
        else len(data.images) + len(data.captions)
        for _, data in loaded
    )
    done = 0

    def tick(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    results = []
    for name, data in loaded:
        if isinstance(data, ClassificationSet):
            task = "zeroshot_classification"
            image_features = _encode_image_files(
                encoder, [file for file, _ in data.samples], batch_size, tick
            )
            prompts = [
                fill_template(template, rs5m_classname(folder))
                for folder in data.classnames
                for template in templates
            ]
            prompt_features = encoder.encode_texts(prompts, batch_size, progress=tick, normalize=False)
            weights = zeroshot_weights(
                prompt_features.reshape(len(data.classnames), len(templates), -1), protocol
            )
            metrics = classification_metrics(
                classification_logits(image_features, weights), [index for _, index in data.samples]
            )
        else:
            task = "zeroshot_retrieval"
            image_features = _encode_image_files(encoder, data.images, batch_size, tick)
            text_features = encoder.encode_texts(data.captions, batch_size, progress=tick, normalize=False)
            metrics = retrieval_metrics(image_features, text_features, data.caption_image)
        results.append({"dataset": name, "task": task, "protocol": protocol, "metrics": metrics})
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown tables of evaluate's results, one per task in order of first appearance: a row per result
    (dataset, task), a column per metric (in order of first appearance), values in percent with two decimals
    as RS5M's README reports them (`f"{100 * value:.2f}"`: 0.7442 -> `74.42`), `-` for NaN or a metric a row
    lacks."""
    tables = []
    for task in dict.fromkeys(result["task"] for result in results):
        rows = [result for result in results if result["task"] == task]
        columns = list(dict.fromkeys(metric for row in rows for metric in row["metrics"]))
        lines = [
            "| " + " | ".join(["dataset", "task", *columns]) + " |",
            "|" + "---|" * (2 + len(columns)),
        ]
        for row in rows:
            cells = [_percent(row["metrics"].get(metric)) for metric in columns]
            lines.append("| " + " | ".join([row["dataset"], task, *cells]) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _template_problem(template: str) -> str | None:
    """Why `template` is not a one-placeholder template, or None when it is."""
    if (
        template.count("{") != 1
        or template.count("}") != 1
        or ("{}" not in template and "{c}" not in template)
    ):
        return "needs exactly one placeholder, {} or {c}, and no other brace"
    return None


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (at least 1e-12, as torch.nn.functional.normalize)."""
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def _hit_rate(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """Share of query rows with a positive among their top min(k, candidates) scores (torch.topk)."""
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices
    return positive.gather(1, top).any(dim=1).double().mean().item()


def _read_dataset(path: Path) -> ClassificationSet | RetrievalSet:
    if path.is_dir():
        return read_classification_folder(path)
    if path.suffix.lower() == ".csv":
        return read_retrieval_csv(path)
    if not path.exists():
        raise EvalDataError(f"{path}: no such file or folder")
    raise EvalDataError(f"{path}: neither a folder of class folders (classification) nor a .csv (retrieval)")


def _read_csv_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EvalDataError(f"{path}: cannot be read ({error.strerror or error})") from None
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise EvalDataError(f"{path}: neither UTF-8 nor GB18030 text")


def _encode_image_files(
    encoder: ClipEncoder, files: Sequence[Path], batch_size: int, tick: Callable[[int], None]
) -> np.ndarray:
    """Raw float32 image features of `files`, read and encoded `_IMAGES_PER_CALL` (whole batches) at a time."""
    per_call = batch_size * max(1, math.ceil(_IMAGES_PER_CALL / batch_size))
    parts = []
    for start in range(0, len(files), per_call):
        chunk = files[start : start + per_call]
        try:
            parts.append(
                encoder.encode_images(
                    [_read_image_bytes(file) for file in chunk], batch_size, progress=tick, normalize=False
                )
            )
        except UndecodableImageError as error:
            bad = [chunk[index] for index in error.indices]
            raise EvalDataError(
                f"{bad[0]}: cannot be decoded as an image"
                + (f" (nor can {len(bad) - 1} more: {_some(bad[1:])})" if len(bad) > 1 else "")
            ) from None
    return np.concatenate(parts)


def _read_image_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as error:
        raise EvalDataError(f"{file}: cannot be read ({error.strerror or error})") from None


def _some(paths: Sequence[Path]) -> str:
    """The first few paths, comma-separated, with `...` when there are more."""
    return ", ".join(map(str, paths[:_NAMED_FILES])) + (", ..." if len(paths) > _NAMED_FILES else "")
