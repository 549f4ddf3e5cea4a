"""tasks/filter.py on fixed embeddings (hand-computed scores, threshold edges) and models/rs_detector.py with the
tiny random CLIP on RSSCN7 images against generated non-RS images; embed -> filter through the harness."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from models.clip import ClipSpec, load_clip
from models.rs_detector import (
    Detector,
    DetectorMismatchError,
    fit_logistic,
    load_detector,
    save_detector,
    train_detector,
)
from rs5m.config import FilterConfig, parse_config
from rs5m.detector_cli import cmd_train_detector
from storage.arrays import read_arrays
from storage.atomic import write_parquet
from storage.layout import Layout
from storage.markers import Manifest, sha256_file, write_manifest
from storage.schemas import EMBED_SCHEMA, FILTER_SCHEMA, VALIDATE_SCHEMA
from tasks.embed import EMBED
from tasks.filter import (
    FILTER,
    REASONS,
    PromptEnsemble,
    ZeroShotRsScorer,
    build_rs_scorer,
    filter_identity,
    resolve_prompts,
    score_and_filter,
    zero_shot_rs_probability,
)
from tests.helpers import missing_data

TINY = ClipSpec("rs5m-tiny-vit", seed=0, device="cpu")

# 16-d unit vectors with entries +-0.25: every dot product is a multiple of 1/16, exact in float16 and float32
_SIGNS = np.array(
    [
        [1] * 16,
        [1] * 16,
        [1] * 12 + [-1] * 4,
        [1] * 10 + [-1] * 6,
        [1] * 8 + [-1] * 8,
        [1] * 4 + [-1] * 12,
    ]
)
IMAGE_EMB = np.full((6, 16), 0.25, dtype=np.float16)
TEXT_EMB = (0.25 * _SIGNS).astype(np.float16)
CLIP_SCORES = [1.0, 1.0, 0.5, 0.25, 0.0, -0.5]  # by hand: (16 - 2 * minus signs) / 16
RS_SCORES = [0.9, 0.5, 0.49, 0.7, 0.95, 0.1]


def fake_scorer(values):
    def score(image_emb: np.ndarray) -> np.ndarray:
        assert image_emb.shape[0] == len(values)
        return np.array(values, dtype=np.float64)

    return score


def embed_table(n: int) -> pa.Table:
    return pa.table(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "source": ["web"] * n,
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "extra": [None] * n,
            "matched_keyword": ["aerial"] * n,
            "sha256": ["0" * 64] * n,
            "width": [64] * n,
            "height": [64] * n,
            "image_format": ["JPEG"] * n,
            "phash": [bytes([i] * 32) for i in range(n)],
        },
        schema=EMBED_SCHEMA,
    )


def run(clip_min: float, rs_min: float, rs_scores=RS_SCORES):
    config = FilterConfig(clip_score_min=clip_min, rs_score_min=rs_min)
    return score_and_filter(embed_table(6), IMAGE_EMB, TEXT_EMB, fake_scorer(rs_scores), config)


def ledger_scores(outcome) -> list[dict[str, float]]:
    return [dict(pairs) for pairs in outcome.decisions.column("scores").to_pylist()]


def test_hand_computed_scores_and_inclusive_threshold_edges():
    outcome = run(clip_min=0.25, rs_min=0.5)
    scores = ledger_scores(outcome)
    assert [s["clip_score"] for s in scores] == CLIP_SCORES
    np.testing.assert_array_equal([s["rs_score"] for s in scores], np.float32(RS_SCORES))
    assert outcome.decisions.column("reason").to_pylist() == [
        None,  # both well above
        None,  # rs_score exactly 0.5: kept
        "not_remote_sensing",  # rs_score 0.49
        None,  # clip_score exactly 0.25: kept
        "low_clip_score",  # clip_score 0
        "not_remote_sensing",  # both fail: RS first
    ]
    details = outcome.decisions.column("detail").to_pylist()
    assert details[4] == "clip_score 0.0000 < 0.25"
    assert details[5] == "rs_score 0.1000 < 0.5; clip_score -0.5000 < 0.25"
    assert set(REASONS) == {"not_remote_sensing", "low_clip_score"}
    assert outcome.kept.schema == FILTER_SCHEMA
    assert outcome.kept.column("sample_id").to_pylist() == ["s0", "s1", "s3"]
    assert outcome.kept.column("clip_score").to_pylist() == [1.0, 1.0, 0.25]
    np.testing.assert_array_equal(outcome.kept.column("rs_score").to_numpy(), np.float32([0.9, 0.5, 0.7]))
    np.testing.assert_array_equal(outcome.arrays["image"], IMAGE_EMB[[0, 1, 3]])
    np.testing.assert_array_equal(outcome.arrays["text"], TEXT_EMB[[0, 1, 3]])


def test_threshold_equal_to_a_score_not_representable_in_float32_is_inclusive():
    # 0.7 is not a float32; the score 0.7 and the threshold 0.7 round to the same float32 and pass
    assert run(clip_min=-1.0, rs_min=0.7).decisions.column("reason")[3].as_py() is None
    assert run(clip_min=-1.0, rs_min=0.7000001).decisions.column("reason")[3].as_py() == "not_remote_sensing"


def test_just_above_an_edge_drops():
    reasons = run(clip_min=0.2500001, rs_min=0.5000001).decisions.column("reason").to_pylist()
    assert reasons[1] == "not_remote_sensing"
    assert reasons[3] == "low_clip_score"


def test_changing_a_threshold_changes_decisions_only():
    loose, strict = run(clip_min=-1.0, rs_min=0.0), run(clip_min=0.5, rs_min=0.9)
    assert ledger_scores(loose) == ledger_scores(strict)
    assert loose.counts() == {"kept": 6}
    assert strict.decisions.column("reason").to_pylist() == [
        None,
        "not_remote_sensing",
        "not_remote_sensing",
        "not_remote_sensing",
        "low_clip_score",
        "not_remote_sensing",
    ]
    strict_ids = strict.kept.column("sample_id").to_pylist()
    assert strict_ids == ["s0"]
    common = loose.kept.filter(pa.compute.is_in(loose.kept.column("sample_id"), pa.array(strict_ids)))
    assert common.equals(strict.kept)


def test_zero_shot_probability_by_hand():
    classes = np.eye(3, 4)  # two RS classes, one other, orthogonal
    images = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float16)
    probability = zero_shot_rs_probability(images, classes, np.array([True, True, False]), logit_scale=2.0)
    e2 = math.exp(2.0)
    np.testing.assert_allclose(probability, [(e2 + 1) / (e2 + 2), 2 / (e2 + 2), 2 / 3], rtol=1e-6)


def test_prompt_ensemble_validation_and_identity(tmp_path):
    shipped = resolve_prompts("rs-v1")
    ensemble = PromptEnsemble.read(shipped)
    assert "satellite image" in ensemble.rs_classes and "person" in ensemble.classes
    assert not ensemble.rs_classes & {"person", "food", "screenshot"}
    data = json.loads(shipped.read_text())
    reformatted = tmp_path / "same.json"
    reformatted.write_text(json.dumps(data, indent=None))
    assert PromptEnsemble.read(reformatted).identity == ensemble.identity
    data["other"]["person"].append("a photo of a child.")
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(data))
    assert PromptEnsemble.read(changed).identity != ensemble.identity
    missing_group = tmp_path / "bad.json"
    missing_group.write_text(json.dumps({"remote_sensing": data["remote_sensing"]}))
    with pytest.raises(ValueError, match="exactly the keys"):
        PromptEnsemble.read(missing_group)
    with pytest.raises(ValueError, match="unknown prompt ensemble version 'rs-v9'"):
        resolve_prompts("rs-v9")


@pytest.fixture(scope="module")
def encoder():
    return load_clip(TINY, num_workers=0)


def test_zero_shot_scorer_with_the_tiny_model(encoder, tmp_path):
    scorer = ZeroShotRsScorer(PromptEnsemble.read(resolve_prompts("rs-v1")), encoder)
    assert scorer.class_emb.shape == (15, 64)
    np.testing.assert_allclose(np.linalg.norm(scorer.class_emb, axis=1), 1.0, rtol=1e-5)
    assert scorer.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # random init's temperature
    image_emb = encoder.encode_texts(["a satellite image.", "a photo of a dog."])  # any unit vectors
    expected = zero_shot_rs_probability(image_emb, scorer.class_emb, scorer.is_rs_class, 1 / 0.07)
    np.testing.assert_allclose(scorer(image_emb), expected, rtol=1e-5)
    assert np.all((scorer(image_emb) > 0) & (scorer(image_emb) < 1))
    # the stage's scorer: same class embeddings, built once per process for all shard tasks
    config = pipeline_config(tmp_path)
    stage_scorer = build_rs_scorer(config)
    assert stage_scorer is build_rs_scorer(config)
    np.testing.assert_allclose(stage_scorer(image_emb), scorer(image_emb), rtol=1e-6)


def test_fit_logistic_separates_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(1, 1, (50, 3)), rng.normal(-1, 1, (50, 3))])
    y = np.repeat([1, 0], 50)
    first, second = fit_logistic(x, y), fit_logistic(x, y)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    accuracy = np.mean(((x @ first[0] + first[1]) > 0) == (y == 1))
    assert accuracy > 0.9


def non_rs_image(index: int) -> bytes:
    """Ordinary-photo stand-ins: documents, drawings, screenshots, sky gradients, flat product shots."""
    rng = np.random.default_rng(index)
    kind = index % 4
    image = Image.new("RGB", (256, 256), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(image)
    if kind == 0:  # text document
        for line in range(12):
            draw.text((16, 12 + 20 * line), "lorem ipsum dolor sit amet " * 2, fill=(20, 20, 20))
    elif kind == 1:  # drawing
        for _ in range(5):
            x, y = rng.integers(0, 200, 2)
            draw.ellipse((x, y, x + 50, y + 50), outline=(0, 0, 0), width=3)
    elif kind == 2:  # screenshot
        draw.rectangle((0, 0, 256, 30), fill=(40, 70, 160))
        for row in range(6):
            draw.rectangle((20, 45 + 35 * row, 236, 70 + 35 * row), fill=(235, 235, 235), outline=(150,) * 3)
    else:  # sky from the ground
        top, bottom = np.array([70, 120, 220]), np.array([200, 225, 255])
        ramp = np.linspace(0, 1, 256)[:, None, None]
        image = Image.fromarray(np.broadcast_to(top + ramp * (bottom - top), (256, 256, 3)).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def detector_folders(shared_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    images = shared_data / "rsscn7" / "images"
    if not images.is_dir():
        missing_data(f"{images} is absent: the detector is trained on real RSSCN7 JPEGs")
    root = tmp_path_factory.mktemp("detector-data")
    positives, negatives = root / "rs", root / "other"
    for name in ("cIndustry", "fResident"):
        target = positives / name
        target.mkdir(parents=True)
        for path in sorted((images / name).glob("*.jpg"))[:20]:
            (target / path.name).symlink_to(path)
    negatives.mkdir()
    for index in range(40):
        (negatives / f"n{index:02d}.jpg").write_bytes(non_rs_image(index))
    (negatives / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return positives, negatives


@pytest.fixture(scope="module")
def detector(detector_folders, encoder) -> Detector:
    return train_detector(*detector_folders, encoder)


def test_detector_training_reports_heldout_accuracy_and_is_deterministic(detector, detector_folders, encoder):
    stats = detector.stats
    assert (stats["n_positive"], stats["n_negative"]) == (40, 40)
    assert (stats["n_train"], stats["n_heldout"]) == (64, 16)
    assert stats["skipped_files"] == [str(detector_folders[1] / "broken.jpg")]
    assert stats["heldout_accuracy"] >= 0.9
    assert detector.model_identity == TINY.identity()
    again = train_detector(*detector_folders, encoder)
    np.testing.assert_array_equal(again.weights, detector.weights)
    assert again.stats == detector.stats


def pipeline_config(workdir: Path, **filter_fields):
    return parse_config(
        {
            "workdir": str(workdir),
            "sources": [{"name": "web", "path": "unused.parquet", "format": "parquet"}],
            "clip": {"model": "rs5m-tiny-vit", "device": "cpu", "num_workers": 0},
            "filter": filter_fields,
        }
    )


def test_detector_round_trip_and_use_in_filter(detector, encoder, rsscn7_sample, tmp_path):
    path = Layout(tmp_path).detector("probe")
    assert path == tmp_path.resolve() / "detectors" / "probe.json"
    save_detector(detector, path)
    loaded = load_detector(path, TINY.identity())
    np.testing.assert_array_equal(loaded.weights, detector.weights)
    assert (loaded.bias, loaded.stats) == (detector.bias, detector.stats)
    image_emb = encoder.encode_images(rsscn7_sample)
    np.testing.assert_array_equal(loaded.score(image_emb), detector.score(image_emb))

    config = pipeline_config(tmp_path, detector="probe")
    np.testing.assert_array_equal(build_rs_scorer(config)(image_emb), detector.score(image_emb))
    identity = filter_identity(config)
    assert identity["detector"] == sha256_file(path)
    assert "detector" not in filter_identity(pipeline_config(tmp_path))


def test_detector_for_another_model_is_refused(detector, tmp_path):
    save_detector(detector, Layout(tmp_path).detector("probe"))
    other = ClipSpec("rs5m-tiny-vit", seed=1, device="cpu")
    with pytest.raises(DetectorMismatchError, match="retrain"):
        load_detector(Layout(tmp_path).detector("probe"), other.identity())
    config = pipeline_config(tmp_path, detector="probe")
    config = config.model_copy(update={"clip": config.clip.model_copy(update={"seed": 1})})
    with pytest.raises(DetectorMismatchError):
        build_rs_scorer(config)
    with pytest.raises(FileNotFoundError, match="train-detector"):
        build_rs_scorer(pipeline_config(tmp_path, detector="absent"))


def test_train_detector_command(detector_folders, tmp_path, capsys):
    args = argparse.Namespace(
        workdir=str(tmp_path),
        name="cli-probe",
        positives=str(detector_folders[0]),
        negatives=str(detector_folders[1]),
        config=None,
        heldout_fraction=0.2,
        seed=0,
    )
    assert cmd_train_detector(args) == 0
    out = capsys.readouterr().out
    saved = Layout(tmp_path).detector("cli-probe")
    assert f"saved {saved}" in out and "held-out" in out
    assert load_detector(saved, TINY.identity()).stats["n_heldout"] == 16
    assert cmd_train_detector(argparse.Namespace(**{**vars(args), "name": "../escape"})) == 2


@pytest.fixture(scope="module")
def rsscn7_sample(shared_data: Path) -> list[bytes]:
    folder = shared_data / "rsscn7" / "images"
    if not folder.is_dir():
        missing_data(f"{folder} is absent")
    return [sorted(d.glob("*.jpg"))[-1].read_bytes() for d in sorted(folder.iterdir())]


def test_embed_then_filter_through_the_harness(rsscn7_sample, tmp_path):
    layout = Layout(tmp_path)
    n = len(rsscn7_sample)
    validated = pa.table(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "source": ["web"] * n,
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "caption": [f"aerial photo {i}" for i in range(n)],
            "extra": [None] * n,
            "matched_keyword": ["aerial"] * n,
            "image": rsscn7_sample,
            "sha256": [hashlib.sha256(b).hexdigest() for b in rsscn7_sample],
            "width": [400] * n,
            "height": [400] * n,
            "image_format": ["JPEG"] * n,
        },
        schema=VALIDATE_SCHEMA,
    )
    write_parquet(layout.data("validate", "00000"), validated)
    sha = sha256_file(layout.data("validate", "00000"))
    write_manifest(layout, Manifest("validate", "f", None, {"00000": sha}, {}, {}, "r0", "now"))
    # thresholds chosen so that the random model keeps some rows and drops others
    config = pipeline_config(tmp_path, clip_score_min=-1.0, rs_score_min=0.0)
    EMBED.run(layout, "00000", config, "r1")
    write_manifest(
        layout,
        Manifest(
            "embed", "f", None, {"00000": sha256_file(layout.data("embed", "00000"))}, {}, {}, "r1", "x"
        ),
    )
    summary = FILTER.run(layout, "00000", config, "r1")
    assert summary.counts == {"kept": n}
    embedded = read_arrays(layout, "embed", "00000", ("image", "text"))
    filtered = read_arrays(layout, "filter", "00000", ("image", "text"))
    np.testing.assert_array_equal(filtered["image"], embedded["image"])
    ledger = pq.read_table(layout.ledger("filter", "00000"))
    clip_scores = [dict(s)["clip_score"] for s in ledger.column("scores").to_pylist()]
    kept = pq.read_table(layout.data("filter", "00000"))
    np.testing.assert_array_equal(kept.column("clip_score").to_numpy(), np.float32(clip_scores))
    # a stricter rs threshold at the median score drops about half; kept arrays follow the kept rows
    median = float(np.median(kept.column("rs_score").to_numpy()))
    strict = config.model_copy(update={"filter": config.filter.model_copy(update={"rs_score_min": median})})
    summary = FILTER.run(layout, "00000", strict, "r2")
    assert 0 < summary.counts["kept"] < n
    kept = pq.read_table(layout.data("filter", "00000"))
    rows = [int(s[1:]) for s in kept.column("sample_id").to_pylist()]
    np.testing.assert_array_equal(
        read_arrays(layout, "filter", "00000", ("image",))["image"], embedded["image"][rows]
    )
