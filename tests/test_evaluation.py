"""models/evaluation.py: zero-shot classification and retrieval metrics (hand-computed, against CLIP_benchmark's
own functions when it is installed), the two classifier protocols, the dataset readers and their errors, and
evaluate() on real RSSCN7 and UCM-Captions images with the tiny random CLIP."""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import evaluation
from models.clip import ClipSpec, load_clip
from models.evaluation import (
    RS5M_TEMPLATES,
    EvalDataError,
    classification_logits,
    classification_metrics,
    evaluate,
    fill_template,
    format_table,
    load_templates,
    read_classification_folder,
    read_retrieval_csv,
    retrieval_metrics,
    rs5m_classname,
    zeroshot_weights,
)
from tests.helpers import missing_data, unit

RETRIEVAL_KEYS = [
    "image_retrieval_recall@1",
    "image_retrieval_recall@5",
    "image_retrieval_recall@10",
    "text_retrieval_recall@1",
    "text_retrieval_recall@5",
    "text_retrieval_recall@10",
    "mean_recall",
]
CLASSIFICATION_KEYS = ["acc1", "acc5", "mean_per_class_recall"]
# a few of RS5M's templates keep the real-data tests fast; the full set is checked in its own test
FEW_TEMPLATES = [
    "a remote sensing image of a {}.",
    "an aerial image of the {}.",
    "a satellite image of many {}.",
]


@pytest.fixture(scope="module")
def tiny():
    encoder = load_clip(ClipSpec(model="rs5m-tiny-vit", seed=0, device="cpu"), num_workers=0)
    yield encoder
    encoder.close()


def _jpeg(seed: int, size: int = 80) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --- classification metrics -------------------------------------------------------------------------------


def test_classification_metrics_by_hand():
    # 6 classes, 7 images; class 5 has a single image, class 4 none. Rows list the logits.
    logits = np.array(
        [
            [9, 1, 2, 3, 4, 5],  # class 0: top-1 0 (hit)
            [1, 9, 2, 3, 4, 5],  # class 0: top-1 1, class 0 is 6th (miss at 1 and 5)
            [1, 2, 9, 3, 4, 0],  # class 1: top-1 2, class 1 is 4th (hit at 5)
            [1, 9, 2, 3, 4, 5],  # class 1: top-1 1 (hit)
            [0, 1, 2, 9, 3, 4],  # class 2: top-1 3, class 2 is 4th (hit at 5)
            [0, 1, 2, 9, 3, 4],  # class 3: top-1 3 (hit)
            [5, 4, 3, 2, 1, 0],  # class 5 (its only image): top-1 0, class 5 is last (miss at 1 and 5)
        ],
        dtype=float,
    )
    targets = [0, 0, 1, 1, 2, 3, 5]
    metrics = classification_metrics(logits, targets)
    assert list(metrics) == CLASSIFICATION_KEYS
    assert metrics["acc1"] == pytest.approx(3 / 7)
    assert metrics["acc5"] == pytest.approx(5 / 7)
    # per class recall over the classes that have images: 0: 1/2, 1: 1/2, 2: 0, 3: 1, 5: 0 (class 4: none)
    assert metrics["mean_per_class_recall"] == pytest.approx((0.5 + 0.5 + 0 + 1 + 0) / 5)


def test_acc5_is_nan_with_fewer_than_five_classes_as_in_clip_benchmark():
    logits = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [0.0, 3.0, 2.0, 1.0]])
    metrics = classification_metrics(logits, [0, 1, 1])
    assert metrics["acc1"] == pytest.approx(2 / 3)
    assert math.isnan(metrics["acc5"])
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0.5) / 2)
    # five classes: top-5 holds every class
    five = classification_metrics(np.zeros((2, 5)) + np.arange(5), [0, 4])
    assert five["acc5"] == 1.0 and five["acc1"] == 0.5


def test_tied_logits_acc1_follows_torch_topk_and_mean_per_class_recall_follows_argmax():
    """The image's class 3 ties with classes 1, 2 and 5. torch.topk on CPU ranks position 3 first among them (not
    the lowest index), torch.argmax gives the first maximum, 1. CLIP_benchmark takes acc1 from topk and
    mean_per_class_recall from argmax, and so do we: the same image counts as right for one and wrong for the
    other."""
    row = [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    scores = torch.tensor([row], dtype=torch.float64)
    assert torch.topk(scores, 5, dim=1).indices[0, 0].item() == 3
    assert torch.topk(scores, 1, dim=1).indices[0, 0].item() == 3
    assert torch.argmax(scores, dim=1).item() == 1
    metrics = classification_metrics(np.array([row]), [3])
    assert metrics["acc1"] == 1.0
    assert metrics["acc5"] == 1.0
    assert metrics["mean_per_class_recall"] == 0.0


# --- retrieval metrics ------------------------------------------------------------------------------------


def test_retrieval_metrics_by_hand_with_several_captions_per_image():
    # images are the axes (scaled: raw features are normalised inside); captions are unit vectors, so each score
    # is one coordinate of the caption
    images = np.diag([2.0, 0.5, 3.0])
    captions = 5 * np.array(
        [
            [0.8, 0.6, 0.0],  # image 0; best image 0 (hit)
            [0.6, 0.0, 0.8],  # image 0; best image 2
            [0.6, 0.8, 0.0],  # image 1; best image 1 (hit)
            [0.28, 0.0, 0.96],  # image 1; best image 2
            [0.0, 0.6, 0.8],  # image 2; best image 2 (hit)
        ]
    )
    owner = [0, 0, 1, 1, 2]
    metrics = retrieval_metrics(images, captions, owner)
    assert list(metrics) == RETRIEVAL_KEYS
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    # image 0's best caption is caption 0 (0.8, its own), image 1's caption 2 (0.8, its own), image 2's caption 3
    # (0.96, image 1's)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    # fewer candidates than K: every candidate is in the top K
    for k in (5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == 1.0
        assert metrics[f"text_retrieval_recall@{k}"] == 1.0
    assert metrics["mean_recall"] == pytest.approx((3 / 5 + 1 + 1 + 2 / 3 + 1 + 1) / 6)


def _reference_recalls(images: np.ndarray, texts: np.ndarray, owner: list[int]) -> dict[str, float]:
    """Recall@K by counting, for each query, the candidates scoring above its best positive (no ties here)."""
    scores = unit(texts) @ unit(images).T
    owner_array = np.array(owner)
    metrics = {}
    for k in (1, 5, 10):
        text_hits = [(row > row[owner[i]]).sum() < k for i, row in enumerate(scores)]
        image_hits = [
            (scores[:, j] > scores[owner_array == j, j].max()).sum() < k for j in range(len(images))
        ]
        metrics[f"image_retrieval_recall@{k}"] = float(np.mean(text_hits))
        metrics[f"text_retrieval_recall@{k}"] = float(np.mean(image_hits))
    return metrics


@pytest.fixture(scope="module")
def random_retrieval() -> tuple[np.ndarray, np.ndarray, list[int]]:
    rng = np.random.default_rng(3)
    images = rng.standard_normal((15, 8))
    owner = [j for j in range(15) for _ in range(2 + j % 2)]  # 2 or 3 captions per image
    texts = images[owner] + 1.5 * rng.standard_normal((len(owner), 8))
    return images, texts, owner


def test_retrieval_metrics_equal_a_counting_reference(random_retrieval):
    images, texts, owner = random_retrieval
    metrics = retrieval_metrics(images, texts, owner)
    expected = _reference_recalls(images, texts, owner)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < metrics["image_retrieval_recall@1"] < metrics["image_retrieval_recall@10"] < 1
    assert metrics["mean_recall"] == pytest.approx(np.mean([metrics[k] for k in RETRIEVAL_KEYS[:6]]))


def test_tied_retrieval_scores_follow_torch_topk():
    """Images 1, 2, 3 and 5 are the same vector, so every caption scores [0, 1, 1, 1, 0, 1] against the six
    images. torch.topk (k = 1) returns image 3: image 3's caption is a hit at K = 1, image 1's caption a miss
    (argmax would have said image 1)."""
    images = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    captions = np.array([[1.0, 0.0], [1.0, 0.0]])
    metrics = retrieval_metrics(images, captions, [3, 1])
    assert metrics["image_retrieval_recall@1"] == 0.5
    assert metrics["image_retrieval_recall@5"] == 1.0  # top 5 = 3, 5, 1, 2, 4
    # image -> text: each image's two candidate captions tie; topk over [1, 1] returns caption 0 (image 3's)
    assert torch.topk(torch.tensor([[1.0, 1.0]], dtype=torch.float64), 1).indices.item() == 0
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1 / 6)  # image 3 only; 0, 2, 4, 5 have none


# --- classifier protocols ---------------------------------------------------------------------------------


def _numpy_rs5m(raw: np.ndarray) -> np.ndarray:
    mean = raw.astype(np.float64).mean(axis=1)
    return mean / np.sqrt((mean**2).sum(axis=1, keepdims=True))


def _numpy_clip_benchmark(raw: np.ndarray) -> np.ndarray:
    prompts = raw.astype(np.float64)
    prompts = prompts / np.sqrt((prompts**2).sum(axis=2, keepdims=True))
    mean = prompts.mean(axis=1)
    return mean / np.sqrt((mean**2).sum(axis=1, keepdims=True))


def test_protocols_differ_when_prompt_norms_differ_and_agree_when_they_are_equal():
    rng = np.random.default_rng(0)
    directions = unit(rng.standard_normal((4, 5, 16)))  # 4 classes, 5 prompts
    norms = rng.uniform(0.5, 20.0, size=(4, 5, 1))
    raw = (directions * norms).astype(np.float32)
    rs5m, clip_benchmark = zeroshot_weights(raw, "rs5m"), zeroshot_weights(raw, "clip_benchmark")
    assert rs5m.shape == clip_benchmark.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(rs5m, axis=1), 1.0, atol=1e-12)
    assert np.abs(rs5m - clip_benchmark).max() > 0.05
    np.testing.assert_allclose(rs5m, _numpy_rs5m(raw), rtol=0, atol=1e-12)
    np.testing.assert_allclose(clip_benchmark, _numpy_clip_benchmark(raw), rtol=0, atol=1e-12)
    # equal norms within each class (any per-class scale): the two rules give the same weights
    same = directions * rng.uniform(0.5, 20.0, size=(4, 1, 1))
    np.testing.assert_allclose(
        zeroshot_weights(same, "rs5m"), zeroshot_weights(same, "clip_benchmark"), rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="protocol"):
        zeroshot_weights(raw, "openai")  # type: ignore[arg-type]


def test_logits_are_100_times_cosine():
    weights = unit(np.array([[1.0, 0.0], [1.0, 1.0]]))
    logits = classification_logits(np.array([[3.0, 0.0], [0.0, 0.5]]), weights)
    np.testing.assert_allclose(logits, 100 * np.array([[1.0, 0.5**0.5], [0.0, 0.5**0.5]]), atol=1e-12)


# --- templates and class names ----------------------------------------------------------------------------


def test_shipped_templates_are_rs5ms_105():
    templates = load_templates()
    assert load_templates(RS5M_TEMPLATES) == templates
    assert len(templates) == 105 and len(set(templates)) == 105
    assert templates[0] == "a remote sensing image of many {}."
    assert all(template.count("{}") == 1 for template in templates)


def test_shipped_templates_equal_the_rs5m_protocol_copy(shared_data):
    source = shared_data / "rs5m_protocol" / "zeroshot_templates.txt"
    if not source.is_file():
        missing_data(f"{source} is absent: the shipped templates are compared with RS5M's")
    assert RS5M_TEMPLATES.read_bytes() == source.read_bytes()


def test_template_files_need_one_placeholder_per_line(tmp_path):
    good = _write(tmp_path / "good.txt", "a photo of a {}.\r\nan image of the {c}\n")
    assert load_templates(good) == ["a photo of a {}.", "an image of the {c}"]
    assert [fill_template(t, "dense residential") for t in load_templates(good)] == [
        "a photo of a dense residential.",
        "an image of the dense residential",
    ]
    for name, text, line in [
        ("none.txt", "a photo of a {}.\na photo.\n", 2),
        ("two.txt", "a {} and a {}\n", 1),
        ("other.txt", "a {x}\n", 1),
        ("blank.txt", "a {}\n\na {c}\n", 2),
    ]:
        path = _write(tmp_path / name, text)
        with pytest.raises(EvalDataError) as error:
            load_templates(path)
        assert f"line {line}:" in _one_line_naming(error, path)
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(EvalDataError, match="no templates"):
        load_templates(empty)
    with pytest.raises(EvalDataError) as error:
        load_templates(tmp_path / "absent.txt")
    _one_line_naming(error, tmp_path / "absent.txt")


def test_rs5m_classnames():
    assert rs5m_classname("Dense_Residential") == "dense residential"
    assert rs5m_classname("AnnualCrop") == "annualcrop"
    assert rs5m_classname("river_lake/north") == "river lake north"


# --- dataset readers --------------------------------------------------------------------------------------


def test_classification_folder_reads_like_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "scenes"
    _write(root / "b_forest" / "x.JPG", _jpeg(0))
    _write(root / "b_forest" / "deeper" / "y.png", _jpeg(1))
    _write(root / "b_forest" / "notes.txt", "not an image")
    _write(root / "a_beach" / "z.tif", _jpeg(2))
    classnames, samples = read_classification_folder(root)
    assert classnames == ["a_beach", "b_forest"]
    assert samples == [
        (root / "a_beach" / "z.tif", 0),
        (root / "b_forest" / "x.JPG", 1),
        (root / "b_forest" / "deeper" / "y.png", 1),
    ]
    reference = ImageFolder(str(root))
    assert reference.classes == classnames
    assert [(Path(file), index) for file, index in reference.samples] == samples


def test_retrieval_csv_reader(tmp_path):
    _write(tmp_path / "images" / "a.jpg", _jpeg(0))
    _write(tmp_path / "images" / "b.jpg", _jpeg(1))
    path = _write_csv(
        tmp_path / "test.csv",
        ["filename", "title"],  # RS5M's column name
        [
            ["images/b.jpg", "a beach, with waves"],
            ["images/a.jpg", "a forest"],
            ["./images/b.jpg", "sand"],
            ["images/a.jpg", "trees"],
        ],
    )
    images, captions, caption_image = read_retrieval_csv(path)
    assert images == [tmp_path / "images" / "b.jpg", tmp_path / "images" / "a.jpg"]
    assert captions == ["a beach, with waves", "a forest", "sand", "trees"]
    assert caption_image == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing folder", "no such file or folder"),
        ("empty folder", "no class folders"),
        ("class without images", "class folders without images: b"),
        ("not a dataset", "neither a folder"),
        ("missing csv", "no such file"),
        ("empty csv", "empty CSV"),
        ("csv without columns", "needs filename and caption"),
        ("csv header only", "no rows"),
        ("csv row without caption", "line 3 has no caption"),
        ("csv missing image", "1 of 2 image files do not exist"),
    ],
)
def test_unusable_datasets_are_refused_before_anything_is_encoded(tmp_path, case, expected):
    good = _write(tmp_path / "good" / "a" / "x.jpg", _jpeg(0)).parent.parent
    _write(tmp_path / "img.jpg", _jpeg(1))
    paths = {
        "missing folder": tmp_path / "nope",
        "empty folder": tmp_path / "empty",
        "class without images": tmp_path / "partial",
        "not a dataset": tmp_path / "img.jpg",
        "missing csv": tmp_path / "nope.csv",
        "empty csv": _write(tmp_path / "empty.csv", ""),
        "csv without columns": _write_csv(tmp_path / "cols.csv", ["image", "text"], [["img.jpg", "x"]]),
        "csv header only": _write_csv(tmp_path / "header.csv", ["filename", "caption"], []),
        "csv row without caption": _write_csv(
            tmp_path / "short.csv", ["filename", "caption"], [["img.jpg", "x"], ["img.jpg"]]
        ),
        "csv missing image": _write_csv(
            tmp_path / "missing.csv", ["filename", "caption"], [["img.jpg", "x"], ["gone.jpg", "y"]]
        ),
    }
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "partial" / "a" / "x.jpg", _jpeg(0))
    (tmp_path / "partial" / "b").mkdir()

    class MustNotEncode:
        def encode_images(self, *args, **kwargs):
            raise AssertionError("encoded before every dataset was checked")

        encode_texts = encode_images

    with pytest.raises(EvalDataError) as error:
        evaluate(
            MustNotEncode(),  # type: ignore[arg-type]
            [("good", good), ("bad", paths[case])],
            "rs5m",
            FEW_TEMPLATES,
            batch_size=8,
        )
    assert expected in _one_line_naming(error, paths[case])


def test_evaluate_refuses_bad_arguments(tiny, tmp_path):
    folder = _write(tmp_path / "set" / "a" / "x.jpg", _jpeg(0)).parent.parent
    with pytest.raises(ValueError, match="protocol"):
        evaluate(tiny, [("s", folder)], "openai", FEW_TEMPLATES, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="placeholder"):
        evaluate(tiny, [("s", folder)], "rs5m", ["no placeholder"], 8)
    with pytest.raises(ValueError, match="repeated: s"):
        evaluate(tiny, [("s", folder), ("s", folder)], "rs5m", FEW_TEMPLATES, 8)


@pytest.mark.parametrize("task", ["classification", "retrieval"])
def test_an_undecodable_image_is_named(tiny, tmp_path, monkeypatch, task):
    # one image per encoder call: the broken one is the first of the second call
    bad = _write(tmp_path / "set" / "b" / "broken.jpg", b"\xff\xd8\xff not really a jpeg")
    _write(tmp_path / "set" / "a" / "fine.jpg", _jpeg(0))
    _write(tmp_path / "set" / "b" / "fine.jpg", _jpeg(1))
    dataset = tmp_path / "set"
    if task == "retrieval":
        dataset = _write_csv(
            tmp_path / "set" / "captions.csv",
            ["filename", "caption"],
            [["a/fine.jpg", "one"], ["b/broken.jpg", "two"], ["b/fine.jpg", "three"]],
        )
    monkeypatch.setattr(evaluation, "_IMAGES_PER_CALL", 1)
    with pytest.raises(EvalDataError) as error:
        evaluate(tiny, [("set", dataset)], "rs5m", FEW_TEMPLATES, batch_size=1)
    assert "cannot be decoded" in _one_line_naming(error, bad)


# --- evaluate on real data with the tiny random CLIP ------------------------------------------------------


@pytest.fixture(scope="module")
def rsscn7_subset(shared_data, tmp_path_factory) -> Path:
    """5 RSSCN7 classes x 6 images, in class folders named by the manifest's label_name (river_lake, ...)."""
    manifest = shared_data / "rsscn7" / "manifest.csv"
    if not manifest.is_file():
        missing_data(f"{manifest} is absent: zero-shot classification runs on real RSSCN7 images")
    with manifest.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    root = tmp_path_factory.mktemp("rsscn7") / "scenes"
    classes = sorted({row["label_name"] for row in rows})[:5]
    for label in classes:
        for row in [row for row in rows if row["label_name"] == label][:6]:
            target = root / label / Path(row["path"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared_data / "rsscn7" / row["path"], target)
    return root


@pytest.fixture(scope="module")
def ucm_subset(shared_data, tmp_path_factory) -> Path:
    """A filename,caption CSV of 20 UCM-Captions images (one per class), 5 captions each, absolute paths."""
    captions_csv = shared_data / "ucm_captions" / "captions.csv"
    if not captions_csv.is_file():
        missing_data(f"{captions_csv} is absent: retrieval runs on real UCM-Captions images")
    with captions_csv.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    chosen: dict[str, str] = {}
    for row in rows:
        chosen.setdefault(Path(row["filename"]).parent.name, row["filename"])
    images = set(sorted(chosen.values())[:20])
    kept = [
        [str(shared_data / "ucm_captions" / row["filename"]), row["caption"]]
        for row in rows
        if row["filename"] in images
    ]
    return _write_csv(tmp_path_factory.mktemp("ucm") / "captions.csv", ["filename", "caption"], kept)


def test_zero_shot_classification_on_rsscn7(tiny, rsscn7_subset, monkeypatch):
    classnames, samples = read_classification_folder(rsscn7_subset)
    assert len(classnames) == 5 and len(samples) == 30
    calls: list[tuple[int, int]] = []
    results = evaluate(
        tiny,
        [("rsscn7", rsscn7_subset)],
        "rs5m",
        FEW_TEMPLATES,
        batch_size=16,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert [(r["dataset"], r["task"], r["protocol"]) for r in results] == [
        ("rsscn7", "zeroshot_classification", "rs5m")
    ]
    metrics = results[0]["metrics"]
    assert list(metrics) == CLASSIFICATION_KEYS
    assert all(0 <= value <= 1 for value in metrics.values())
    assert metrics["acc5"] == 1.0  # five classes: the top 5 is every class
    assert metrics["acc1"] <= 0.6  # random weights: near chance (0.2)
    total = 30 + 5 * len(FEW_TEMPLATES)
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)

    # acc1 again, from the encoder's own raw features and numpy only
    image_bytes = [file.read_bytes() for file, _ in samples]
    images = tiny.encode_images(image_bytes, 16, normalize=False)
    prompts = [template.format(rs5m_classname(name)) for name in classnames for template in FEW_TEMPLATES]
    raw = tiny.encode_texts(prompts, normalize=False).reshape(5, len(FEW_TEMPLATES), -1)
    for protocol, weights in (("rs5m", _numpy_rs5m(raw)), ("clip_benchmark", _numpy_clip_benchmark(raw))):
        predicted = (unit(images.astype(np.float64)) @ weights.T).argmax(axis=1)
        expected = float(np.mean(predicted == np.array([index for _, index in samples])))
        # images read and encoded 14 at a time (two batches of 7): three encoder calls
        monkeypatch.setattr(evaluation, "_IMAGES_PER_CALL", 10)
        again = evaluate(tiny, [("rsscn7", rsscn7_subset)], protocol, FEW_TEMPLATES, batch_size=7)
        assert again[0]["metrics"]["acc1"] == pytest.approx(expected, abs=1e-12), protocol


def test_zero_shot_retrieval_on_ucm_captions(tiny, ucm_subset):
    images, captions, caption_image = read_retrieval_csv(ucm_subset)
    assert len(images) == 20 and len(captions) == 100
    assert np.bincount(caption_image).tolist() == [5] * 20
    results = evaluate(tiny, [("ucm", ucm_subset)], "clip_benchmark", FEW_TEMPLATES, batch_size=16)
    assert results[0]["task"] == "zeroshot_retrieval"
    metrics = results[0]["metrics"]
    assert list(metrics) == RETRIEVAL_KEYS
    for direction in ("image_retrieval", "text_retrieval"):
        at = [metrics[f"{direction}_recall@{k}"] for k in (1, 5, 10)]
        assert 0 <= at[0] <= at[1] <= at[2] <= 1
    assert metrics["image_retrieval_recall@1"] <= 0.4  # chance: 1 in 20
    assert metrics["mean_recall"] == pytest.approx(np.mean([metrics[k] for k in RETRIEVAL_KEYS[:6]]))

    image_features = tiny.encode_images([file.read_bytes() for file in images], 16, normalize=False)
    text_features = tiny.encode_texts(captions, normalize=False)
    best = (unit(text_features.astype(np.float64)) @ unit(image_features.astype(np.float64)).T).argmax(1)
    assert metrics["image_retrieval_recall@1"] == pytest.approx(np.mean(best == np.array(caption_image)))


def test_evaluate_runs_several_datasets_in_order_and_formats_a_table(tiny, rsscn7_subset, ucm_subset):
    results = evaluate(
        tiny, [("ucm", ucm_subset), ("rsscn7", rsscn7_subset)], "clip_benchmark", FEW_TEMPLATES, 32
    )
    assert [r["dataset"] for r in results] == ["ucm", "rsscn7"]
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0] == "| dataset | task | " + " | ".join(RETRIEVAL_KEYS) + " |"
    assert lines[4] == "| dataset | task | acc1 | acc5 | mean_per_class_recall |"
    assert lines[6] == (
        "| rsscn7 | zeroshot_classification | "
        + " | ".join(f"{100 * results[1]['metrics'][k]:.2f}" for k in CLASSIFICATION_KEYS)
        + " |"
    )


def test_format_table_percentages():
    results = [
        {
            "dataset": "aid",
            "task": "zeroshot_classification",
            "protocol": "rs5m",
            "metrics": {"acc1": 0.7442, "acc5": math.nan, "mean_per_class_recall": 0.5},
        },
        {
            "dataset": "eurosat",
            "task": "zeroshot_classification",
            "protocol": "rs5m",
            "metrics": {"acc1": 0.614, "acc5": 0.99999},
        },
    ]
    assert format_table(results) == (
        "| dataset | task | acc1 | acc5 | mean_per_class_recall |\n"
        "|---|---|---|---|---|\n"
        "| aid | zeroshot_classification | 74.42 | - | 50.00 |\n"
        "| eurosat | zeroshot_classification | 61.40 | 100.00 | - |"
    )


# --- the raw features of models/clip.py -------------------------------------------------------------------


def test_encoder_returns_raw_float32_features_when_asked(tiny):
    data = [_jpeg(seed) for seed in range(3)]
    raw = tiny.encode_images(data, 2, normalize=False)
    assert raw.dtype == np.float32 and raw.shape == (3, 64)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(unit(raw), tiny.encode_images(data, 2).astype(np.float32), atol=2e-3)
    views = tiny.encode_images(data, 2, views=["rot0", "rot90"], normalize=False)
    assert views.dtype == np.float32 and views.shape == (3, 2, 64)
    np.testing.assert_allclose(views[:, 0], raw, rtol=1e-5, atol=1e-5)
    texts = ["a beach", "a forest", ""]
    raw_texts = tiny.encode_texts(texts, 2, normalize=False)
    assert raw_texts.dtype == np.float32 and raw_texts.shape == (3, 64)
    np.testing.assert_allclose(unit(raw_texts), tiny.encode_texts(texts).astype(np.float32), atol=2e-3)
    assert tiny.encode_images([], normalize=False).dtype == np.float32
    assert tiny.encode_texts([], normalize=False).dtype == np.float32


# --- CLIP_benchmark's own functions on the same model and data --------------------------------------------


class _CaptionedImages(torch.utils.data.Dataset):
    """(preprocessed image, its captions) per image, the shape CLIP_benchmark's retrieval loaders give."""

    def __init__(self, images: list[Path], captions: list[list[str]], preprocess) -> None:
        self.images, self.captions, self.preprocess = images, captions, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        with Image.open(self.images[index]) as image:
            return self.preprocess(image.convert("RGB")), self.captions[index]


def _collate_captioned(batch):
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def test_classification_matches_clip_benchmark(tiny, rsscn7_subset):
    pytest.importorskip(
        "clip_benchmark", reason="CLIP_benchmark is not installed (pip install clip_benchmark)"
    )
    from clip_benchmark.metrics import zeroshot_classification
    from sklearn.metrics import balanced_accuracy_score
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(rsscn7_subset), transform=tiny.preprocess)
    classnames = [rs5m_classname(name) for name in folder.classes]
    templates = [template.replace("{}", "{c}") for template in FEW_TEMPLATES]  # CLIP_benchmark formats {c}
    loader = torch.utils.data.DataLoader(folder, batch_size=8)

    reference_weights = zeroshot_classification.zero_shot_classifier(
        tiny.model, tiny.tokenizer, classnames, templates, "cpu", amp=False
    )
    raw = tiny.encode_texts(
        [fill_template(t, name) for name in classnames for t in templates], normalize=False
    ).reshape(len(classnames), len(templates), -1)
    ours = zeroshot_weights(raw, "clip_benchmark")
    np.testing.assert_allclose(ours.T, reference_weights.numpy(), atol=1e-6)
    assert np.abs(zeroshot_weights(raw, "rs5m") - ours).max() > 1e-4  # the prompt norms differ

    reference_logits, targets = zeroshot_classification.run_classification(
        tiny.model, reference_weights, loader, "cpu", amp=False
    )
    image_features = tiny.encode_images(
        [Path(file).read_bytes() for file, _ in folder.samples], 8, normalize=False
    )
    logits = classification_logits(image_features, ours)
    np.testing.assert_allclose(logits, reference_logits.numpy(), atol=1e-3)

    # CLIP_benchmark's evaluate() turns these logits into metrics with its accuracy(), which fails under numpy
    # >= 2.4 (float() of a 1-element array), and sklearn's balanced_accuracy_score: apply accuracy()'s rule
    # (one topk(5) call) and sklearn to its logits
    results = evaluate(tiny, [("rsscn7", rsscn7_subset)], "clip_benchmark", templates, batch_size=8)
    metrics = results[0]["metrics"]
    top5 = reference_logits.topk(5, dim=1).indices
    assert metrics["acc1"] == pytest.approx((top5[:, 0] == targets).double().mean().item(), abs=1e-12)
    assert metrics["acc5"] == 1.0 == (top5 == targets[:, None]).any(dim=1).double().mean().item()
    assert metrics["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(targets, reference_logits.argmax(dim=1)), abs=1e-12
    )

    # the tie case: sklearn's balanced accuracy of the argmax prediction, not topk's
    tie = np.array([[0.0, 1.0, 1.0, 1.0, 0.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert classification_metrics(tie, [3, 5]) == {"acc1": 0.5, "acc5": 0.5, "mean_per_class_recall": 0.0}
    with pytest.warns(UserWarning, match="not in y_true"):  # sklearn leaves out classes without images
        assert balanced_accuracy_score([3, 5], torch.as_tensor(tie).argmax(dim=1)) == 0.0


def test_retrieval_matches_clip_benchmark(tiny, ucm_subset, random_retrieval):
    pytest.importorskip(
        "clip_benchmark", reason="CLIP_benchmark is not installed (pip install clip_benchmark)"
    )
    from clip_benchmark.metrics import zeroshot_retrieval

    images, texts, owner = random_retrieval
    scores = torch.as_tensor(unit(texts) @ unit(images).T)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    metrics = retrieval_metrics(images, texts, owner)
    for k in (1, 5, 10):
        text_to_image = (zeroshot_retrieval.recall_at_k(scores, positive, k) > 0).double().mean().item()
        image_to_text = (zeroshot_retrieval.recall_at_k(scores.T, positive.T, k) > 0).double().mean().item()
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(text_to_image, abs=1e-12)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(image_to_text, abs=1e-12)

    files, captions, caption_image = read_retrieval_csv(ucm_subset)
    per_image = [
        [c for c, j in zip(captions, caption_image, strict=True) if j == i] for i in range(len(files))
    ]
    loader = torch.utils.data.DataLoader(
        _CaptionedImages(files, per_image, tiny.preprocess), batch_size=8, collate_fn=_collate_captioned
    )
    reference = zeroshot_retrieval.evaluate(
        tiny.model, loader, tiny.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    ours = evaluate(tiny, [("ucm", ucm_subset)], "rs5m", FEW_TEMPLATES, batch_size=8)[0]["metrics"]
    assert set(reference) == set(RETRIEVAL_KEYS[:6])
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
