"""rs3_caption: the ranking rule (top_cap, ssl_cap, orientation words), the seeded choice, the final caption's
composition, rotated views in the CLIP encoder, and the stage over a shard with the shipped tiny BLIP-2 and
the tiny CLIP (real models, random weights)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from models.clip import ClipSpec, load_clip
from rs5m.config import CaptionConfig
from tasks.rs3_caption import (
    Captioning,
    caption_shard,
    coin,
    decoding,
    final_caption,
    names_orientation,
    rank,
    shared_captioner,
)

FORMATS = {"fmow_src": "fmow", "ben_src": "bigearthnet", "folder_src": "image_folder"}


def test_top_cap_is_the_best_mean_and_ssl_cap_the_steadiest_of_the_best_five() -> None:
    candidates = ["a", "b", "c", "d", "e", "f", "g"]
    # dyadic values: means and spreads are exact, so the ties below are real ties
    scores = np.array(
        [
            [0.5, 0.25, 0.5, 0.25],  # a: mean 0.375, spread 0.125
            [0.3125] * 4,  # b: mean 0.3125, spread 0: the steadiest, but not among the best five
            [0.75, 0.5, 0.75, 0.5],  # c: mean 0.625 (best), spread 0.125
            [0.5625, 0.5, 0.5625, 0.5],  # d: mean 0.53125, spread 0.03125
            [0.59375, 0.46875, 0.59375, 0.46875],  # e: mean 0.53125 (tie with d: d came first), 0.0625
            [0.53125, 0.46875, 0.53125, 0.46875],  # f: mean 0.5, spread 0.03125 (tie: d has the better mean)
            [0.5, 0.4375, 0.5, 0.4375],  # g: mean 0.46875, spread 0.03125
        ],
        np.float32,
    )
    ranked = rank(candidates, scores, pool=5)
    assert ranked is not None
    assert ranked.order == [2, 3, 4, 5, 6, 0, 1]
    assert (ranked.top, ranked.ssl) == (2, 3)
    assert rank(candidates, scores, pool=1).ssl == 2  # a pool of one: ssl_cap is top_cap


def test_a_caption_naming_an_orientation_is_not_ssl_cap_unless_all_of_the_pool_do() -> None:
    scores = np.array([[0.4, 0.2, 0.4, 0.2], [0.3, 0.3, 0.3, 0.3], [0.35, 0.25, 0.35, 0.25]], np.float32)
    oriented = ["a road", "a river on the left of a field", "houses"]
    ranked = rank(oriented, scores, pool=3)
    assert ranked.top == 0 and ranked.ssl == 2  # the steadiest (1) names a side
    all_oriented = ["top of a hill", "a river on the left", "north of a town"]
    assert rank(all_oriented, scores, pool=3).ssl == 1  # nothing else to choose: the rule applies to all


def test_empty_candidates_are_never_chosen() -> None:
    scores = np.array([[0.9] * 4, [0.1] * 4, [0.2, 0.1, 0.2, 0.1]], np.float32)
    ranked = rank(["", "fields", "  "], scores, pool=5)
    assert ranked.order == [1] and ranked.top == ranked.ssl == 1
    assert rank(["", " "], scores[:2], pool=5) is None


@pytest.mark.parametrize(
    ("caption", "oriented"),
    [
        ("a river on the left of the town", True),
        ("buildings in the top right corner", True),
        ("a road north of the lake", True),
        ("the Southeastern part of a field", True),
        ("a vertically striped farmland", True),
        ("a bridge above the river", True),
        ("a bright field with rooftops", False),
        ("leftover topsoil near a bottomland", False),
        ("many buildings and a road", False),
    ],
)
def test_orientation_words(caption: str, oriented: bool) -> None:
    assert names_orientation(caption) is oriented


def test_the_random_choice_is_a_fair_seeded_coin_per_sample() -> None:
    ids = [f"sample-{i}" for i in range(4000)]
    draws = [coin(sample_id, 0) for sample_id in ids]
    assert draws == [coin(sample_id, 0) for sample_id in ids]
    assert 0.47 < np.mean(draws) < 0.53
    assert draws != [coin(sample_id, 1) for sample_id in ids]


def test_the_final_caption_puts_the_meta_caption_first_for_fmow_and_bigearthnet_only() -> None:
    assert (
        final_caption("an airport in France", "planes parked", "fmow") == "an airport in France planes parked"
    )
    assert final_caption("a patch", "fields", "bigearthnet") == "a patch fields"
    assert final_caption("a satellite image of a farm", "fields", "image_folder") == "fields"
    assert final_caption(None, "fields", "fmow") == "fields"
    assert final_caption("a patch", None, "bigearthnet") == "a patch"


def _jpeg(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.RandomState(seed)
    # smooth content, so that resampling differences stay small
    base = rng.randint(0, 255, (4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(base).resize(size, Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clip():
    encoder = load_clip(ClipSpec(model="rs5m-tiny-vit", seed=0), num_workers=0)
    yield encoder
    encoder.close()


@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_a_view_embeds_the_image_as_if_it_had_been_turned_first(clip, size) -> None:
    images = [_jpeg(seed, size) for seed in range(3)]
    views = clip.encode_images(images, views=("rot0", "rot90", "rot180", "rot270", "hflip", "vflip"))
    assert views.shape == (3, 6, clip.embed_dim)
    assert np.allclose(views[:, 0], clip.encode_images(images), atol=2e-3)
    turned = {
        1: Image.Transpose.ROTATE_90,  # PIL: counter-clockwise, as torch.rot90
        2: Image.Transpose.ROTATE_180,
        3: Image.Transpose.ROTATE_270,
        4: Image.Transpose.FLIP_LEFT_RIGHT,
        5: Image.Transpose.FLIP_TOP_BOTTOM,
    }
    for index, transpose in turned.items():
        expected = []
        for data in images:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).transpose(transpose).save(buffer, "PNG")
            expected.append(buffer.getvalue())
        cosines = (views[:, index].astype(np.float32) * clip.encode_images(expected).astype(np.float32)).sum(
            1
        )
        assert cosines.min() > 0.99, (index, cosines)
    # the views differ from the upright image (a random model is not rotation-invariant)
    assert ((views[:, 0].astype(np.float32) * views[:, 1].astype(np.float32)).sum(1) < 0.999).any()
    with pytest.raises(ValueError, match="unknown image view"):
        clip.encode_images(images, views=("rot45",))


def _shard(n: int) -> pa.Table:
    sources = [list(FORMATS)[i % 3] for i in range(n)]
    return pa.table(
        {
            "sample_id": [f"id-{i:03d}" for i in range(n)],
            "source": sources,
            "caption": pa.nulls(n, pa.string()),
            "meta_caption": [None if i % 4 == 3 else f"a satellite image number {i}" for i in range(n)],
            "image": [_jpeg(100 + i, (72, 64)) for i in range(n)],
        }
    )


@pytest.fixture(scope="module")
def captioning_parts(clip):
    config = CaptionConfig(num_candidates=4, max_length=12, batch_size=3)
    captioner, _ = shared_captioner(config)
    return captioner, clip, config


def test_the_stage_ranks_real_candidates_and_writes_the_choice(captioning_parts) -> None:
    captioner, clip, config = captioning_parts
    table = _shard(8)
    outcome = caption_shard(table, Captioning(captioner, clip, decoding(config), config, FORMATS))
    assert outcome.counts() == {"kept": 8}
    kept = outcome.kept.to_pylist()
    assert "image" in outcome.kept.column_names  # the harness drops it (images are stored once)
    choices = {row["caption_choice"] for row in kept}
    assert choices == {"top_cap", "ssl_cap"}  # RS5M's coin, over 8 images
    for row, meta in zip(kept, table.column("meta_caption").to_pylist(), strict=True):
        candidates = row["caption_candidates"]
        assert 1 <= len(candidates) <= 4 and all(len(c["view_scores"]) == 4 for c in candidates)
        means = [c["mean_score"] for c in candidates]
        assert means == sorted(means, reverse=True)
        for candidate in candidates:
            assert candidate["mean_score"] == pytest.approx(np.mean(candidate["view_scores"]), abs=1e-6)
        assert row["top_cap"] == candidates[0]["text"] and row["top_cap_score"] == pytest.approx(means[0])
        steadiest = min(candidates, key=lambda c: (np.std(c["view_scores"]), -c["mean_score"]))
        if not any(names_orientation(c["text"]) for c in candidates):
            assert row["ssl_cap"] == steadiest["text"]
        assert row["ssl_cap_spread"] == pytest.approx(
            np.std(next(c for c in candidates if c["text"] == row["ssl_cap"])["view_scores"]), abs=1e-5
        )
        chosen = row[row["caption_choice"]]
        assert row["caption"] == final_caption(meta, chosen, FORMATS[row["source"]])
    # the scores are the CLIP cosines of the caption with the turned image
    first = kept[0]
    text = clip.encode_texts([first["top_cap"]]).astype(np.float32)[0]
    views = clip.encode_images(
        [table.column("image")[0].as_py()], views=("rot0", "rot90", "rot180", "rot270")
    )
    expected = views[0].astype(np.float32) @ text
    assert first["caption_candidates"][0]["view_scores"] == pytest.approx(expected.tolist(), abs=2e-3)


def test_captions_are_the_same_on_a_rerun_and_with_another_batch_size(captioning_parts) -> None:
    captioner, clip, config = captioning_parts
    table = _shard(5)
    first = caption_shard(table, Captioning(captioner, clip, decoding(config), config, FORMATS)).kept
    other = config.model_copy(update={"batch_size": 2})
    again = caption_shard(table, Captioning(captioner, clip, decoding(other), other, FORMATS)).kept
    assert first.drop_columns(["image"]).to_pylist() == again.drop_columns(["image"]).to_pylist()
    top_only = config.model_copy(update={"choice": "top_cap", "flips": True})
    tops = caption_shard(table, Captioning(captioner, clip, decoding(top_only), top_only, FORMATS)).kept
    assert all(len(c["view_scores"]) == 6 for row in tops.to_pylist() for c in row["caption_candidates"])
    assert all(row["caption_choice"] == "top_cap" for row in tops.to_pylist())


def test_without_a_model_the_caption_is_the_meta_caption() -> None:
    config = CaptionConfig(model=None)
    table = _shard(8)
    outcome = caption_shard(table, Captioning(None, None, decoding(config), config, FORMATS))
    assert outcome.counts() == {"kept": 6, "dropped:no_caption_source": 2}
    assert all(row["caption"] == row["meta_caption"] for row in outcome.kept.to_pylist())


class _EmptyCaptioner:
    """Writes nothing for one image: what a model that ends every caption at once would give."""

    def __init__(self, captioner) -> None:
        self.captioner = captioner

    def generate(self, images, decoding, batch_size, progress=None, *, keys):
        captions = self.captioner.generate(images, decoding, batch_size, progress, keys=keys)
        return [["", " "] if key == "id-001" else row for key, row in zip(keys, captions, strict=True)]


def test_an_image_whose_candidates_are_all_empty_is_dropped_with_its_reason(captioning_parts) -> None:
    captioner, clip, config = captioning_parts
    outcome = caption_shard(
        _shard(3), Captioning(_EmptyCaptioner(captioner), clip, decoding(config), config, FORMATS)
    )
    assert outcome.counts() == {"kept": 2, "dropped:no_model_caption": 1}
    assert outcome.decisions.filter(pc.equal(outcome.decisions["fate"], "dropped"))[
        "sample_id"
    ].to_pylist() == ["id-001"]


def test_the_config_refuses_bad_values_naming_the_field() -> None:
    from rs5m.config import PipelineConfig

    with pytest.raises(ValueError, match="rs3.caption.top_p"):
        PipelineConfig.model_validate(
            {
                "workdir": "w",
                "rs3": {"sources": [{"name": "a", "format": "fmow", "path": "p"}], "caption": {"top_p": 0}},
            }
        )
