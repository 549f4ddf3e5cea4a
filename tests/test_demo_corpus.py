"""The demo corpus: deterministic, served as designed, and consistent with its expected funnel."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import time
import warnings
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, UnidentifiedImageError

from models.perceptual_hash import DEFAULT_MAX_DISTANCE, HASH_BITS, dct_hashes, hash_neighbours
from rs5m import demo
from rs5m.config import EvalSetConfig, PipelineConfig, parse_config
from storage.schemas import DOWNLOAD_SCHEMA
from tasks.decontaminate import eval_files
from tasks.ingest import SourceIngester, normalise_url
from tasks.keyword import KeywordMatcher, filter_shard
from tasks.stage import ShardOutcome
from tasks.validate import validate_shard

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# Broader than any RS keyword list: an ordinary caption holding one of these could be kept by mistake.
RS_WATCH_WORDS = (
    "aerial", "satellite", "remote", "sensing", "drone", "orthophoto", "landsat", "sentinel", "bird",
    "overhead", "top view", "above", "map", "earth", "land", "uav", "gis", "imagery", "spot", "planet",
)  # fmt: skip


@pytest.fixture(scope="module")
def corpus() -> demo.DemoCorpus:
    return demo.demo_corpus()


def _demo_config(workdir: Path) -> PipelineConfig:
    """configs/demo.yaml with its relative paths resolved against workdir, as the demo CLI does."""
    return parse_config(yaml.safe_load(DEMO_CONFIG.read_text()), str(DEMO_CONFIG), base_dir=workdir)


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return _demo_config(Path("/demo"))


@pytest.fixture(scope="module")
def server(corpus: demo.DemoCorpus):
    with demo.DemoServer(corpus=corpus) as running:
        yield running


def _digest(corpus: demo.DemoCorpus) -> dict[str, str]:
    return {path: hashlib.sha256(res.body).hexdigest() for path, res in corpus.resources.items()}


def _first(corpus: demo.DemoCorpus, category: str) -> demo.DemoRow:
    return next(row for row in corpus.rows if row.category == category)


def _get(server: demo.DemoServer, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    address = urlsplit(server.base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_two_builds_give_identical_rows_bytes_and_source_files(
    corpus: demo.DemoCorpus, tmp_path: Path
) -> None:
    rebuilt = demo.build_corpus()
    assert rebuilt.rows == corpus.rows
    assert [row.extra for row in rebuilt.rows] == [row.extra for row in corpus.rows]
    assert _digest(rebuilt) == _digest(corpus)
    assert demo.eval_set_images(rebuilt) == demo.eval_set_images(corpus)

    demo.write_demo_sources(tmp_path / "a", "http://127.0.0.1:8765", corpus)
    demo.write_demo_sources(tmp_path / "b", "http://127.0.0.1:8765", rebuilt)
    for name in demo.SOURCE_FILES.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_another_seed_gives_other_images() -> None:
    assert _digest(demo.build_corpus(seed=1)) != _digest(demo.demo_corpus())


def test_composition_follows_the_design(corpus: demo.DemoCorpus) -> None:
    counts = Counter((row.category, row.source) for row in corpus.rows)
    for category, per_source in demo.COMPOSITION.items():
        for source, n in zip(demo.SOURCE_FILES, per_source, strict=True):
            assert counts[(category, source)] == n, (category, source)
    assert 300 <= len(corpus.rows) <= 450
    assert sum(demo.COMPOSITION["slow_response"]) <= 6
    assert all(row.fate == demo.FATES[row.category] for row in corpus.rows)


def test_ordinary_captions_hold_no_rs_word(corpus: demo.DemoCorpus) -> None:
    for row in corpus.rows:
        if row.category == "ordinary_photo":
            assert not [word for word in RS_WATCH_WORDS if word in row.caption.lower()], row.caption


def test_exact_duplicate_rows_repeat_an_earlier_row_of_their_source(corpus: demo.DemoCorpus) -> None:
    for source in demo.SOURCE_FILES:
        keys = [(row.path, row.caption) for row in corpus.source_rows(source)]
        repeated = sum(n - 1 for n in Counter(keys).values())
        assert repeated == sum(row.category == "duplicate_row" for row in corpus.source_rows(source))


def test_designed_copies_match_their_originals(corpus: demo.DemoCorpus) -> None:
    def decode(path: str) -> np.ndarray:
        """The image at path, shrunk to 32x32: what perceptual near-duplicate detection looks at."""
        image = Image.open(io.BytesIO(corpus.resources[path].body)).convert("RGB")
        return np.asarray(image.resize((32, 32), Image.Resampling.BOX), dtype=np.int16)

    seen = set()
    for row in corpus.rows:
        if row.copy_of is None:
            continue
        seen.add(row.category)
        original = decode(row.copy_of)
        if row.category == "same_bytes_other_url":
            assert row.path != row.copy_of
            assert corpus.resources[row.path].body == corpus.resources[row.copy_of].body
        elif row.category in ("same_url_other_caption", "same_url_other_source"):
            assert row.path == row.copy_of
        else:
            expected = {
                "reencoded_copy": original,
                "rotated_copy": np.rot90(original),
                "flipped_copy": original[:, ::-1],
            }
            copy = decode(row.path)
            assert corpus.resources[row.path].body != corpus.resources[row.copy_of].body
            assert np.abs(copy - expected[row.category]).mean() < 3, row.category
    assert seen == {
        "same_bytes_other_url",
        "same_url_other_caption",
        "same_url_other_source",
        "reencoded_copy",
        "rotated_copy",
        "flipped_copy",
    }


def test_validate_fates_hold_for_pil(corpus: demo.DemoCorpus, config: PipelineConfig) -> None:
    limits = config.validate_
    for row in corpus.rows:
        if row.fate is not None and row.fate[0] != "validate":
            continue
        body = corpus.resources[row.path].body
        reason = row.fate[1] if row.fate else None
        if reason == "undecodable":
            with pytest.raises(UnidentifiedImageError):
                Image.open(io.BytesIO(body))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(body))
            except Image.DecompressionBombError:
                assert reason == "too_large"
                continue
        width, height = image.size
        if reason == "too_large":
            assert width * height > limits.max_pixels or max(width, height) > limits.max_side
        elif reason == "truncated":
            with pytest.raises(OSError, match="truncated"):
                image.load()
        else:
            image.load()
            assert (min(width, height) < limits.min_side) == (reason == "too_small"), row.category
            assert width * height <= limits.max_pixels and max(width, height) <= limits.max_side


def test_server_serves_each_behaviour(corpus: demo.DemoCorpus, server: demo.DemoServer) -> None:
    tile = _first(corpus, "rs_tile")
    status, headers, body = _get(server, tile.path)
    assert (status, headers["Content-Type"], body) == (200, "image/jpeg", corpus.resources[tile.path].body)
    assert tile.url(server.base_url) == server.base_url + tile.path

    assert _get(server, _first(corpus, "http_404").path)[0] == 404
    assert _get(server, "/no/such/path.jpg")[0] == 404

    status, headers, body = _get(server, _first(corpus, "html_body").path)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<html" in body.lower()

    png = _first(corpus, "huge_png_header")
    assert _get(server, png.path)[2] == corpus.resources[png.path].body

    with pytest.raises(http.client.RemoteDisconnected):
        _get(server, _first(corpus, "connection_dropped").path)
    with pytest.raises(http.client.IncompleteRead):
        _get(server, _first(corpus, "incomplete_body").path)


def test_slow_url_outlasts_the_client_timeout_and_does_not_delay_stop(corpus: demo.DemoCorpus) -> None:
    started = time.monotonic()
    with demo.DemoServer(corpus=corpus) as server, pytest.raises(TimeoutError):
        _get(server, _first(corpus, "slow_response").path, timeout=0.3)
    assert time.monotonic() - started < 3


def test_server_listens_on_a_given_port(corpus: demo.DemoCorpus, server: demo.DemoServer) -> None:
    busy_port = urlsplit(server.base_url).port
    with pytest.raises(OSError), demo.DemoServer(port=busy_port, corpus=corpus):
        pass


def test_source_files_parse_with_the_designed_rows(corpus: demo.DemoCorpus, tmp_path: Path) -> None:
    base_url = "http://127.0.0.1:8765"
    demo.write_demo_sources(tmp_path, base_url, corpus)
    expected = {source: corpus.source_rows(source) for source in demo.SOURCE_FILES}

    laion = pq.read_table(tmp_path / "laion_like.parquet")
    assert laion.column_names == ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity"]
    assert laion.column("URL").to_pylist() == [row.url(base_url) for row in expected["laion_like"]]
    assert laion.column("TEXT").to_pylist() == [row.caption for row in expected["laion_like"]]
    assert "" in laion.column("URL").to_pylist()

    cc3m = pd.read_csv(tmp_path / "cc3m_like.tsv", sep="\t", header=None, names=["caption", "url"])
    assert len(cc3m) == len(expected["cc3m_like"])
    assert cc3m["url"].tolist() == [row.url(base_url) for row in expected["cc3m_like"]]
    assert cc3m["caption"].tolist() == [row.caption for row in expected["cc3m_like"]]

    lines = (tmp_path / "redcaps_like.jsonl").read_text(encoding="utf-8").splitlines()
    redcaps = [json.loads(line) for line in lines]
    assert [set(record) for record in redcaps] == [{"url", "caption", "subreddit"}] * len(
        expected["redcaps_like"]
    )
    assert [record["caption"] for record in redcaps] == [row.caption for row in expected["redcaps_like"]]


def test_expected_funnel_is_consistent(corpus: demo.DemoCorpus) -> None:
    funnel = demo.expected_funnel(corpus)
    assert list(funnel) == list(demo.STAGES)
    for source in demo.SOURCE_FILES:
        assert funnel["ingest"][source]["in"] == len(corpus.source_rows(source))
        for stage, next_stage in zip(demo.STAGES, demo.STAGES[1:], strict=False):
            assert funnel[next_stage][source]["in"] == funnel[stage][source]["kept"]
        for stage in demo.STAGES:
            counts = funnel[stage][source]
            assert counts["in"] == counts["kept"] + sum(counts["dropped"].values())
        survivors = sum(row.fate is None for row in corpus.source_rows(source))
        assert funnel["validate"][source]["kept"] == survivors
    designed = Counter(row.fate for row in corpus.rows if row.fate is not None)
    assert set(designed) == {fate for fate in demo.FATES.values() if fate is not None}
    for (stage, reason), n in designed.items():
        assert sum(funnel[stage][source]["dropped"].get(reason, 0) for source in demo.SOURCE_FILES) == n


def test_demo_config_matches_the_corpus(config: PipelineConfig) -> None:
    assert {s.name: Path(s.path) for s in config.sources} == {
        name: Path("/demo/demo_sources") / file for name, file in demo.SOURCE_FILES.items()
    }
    assert config.download.timeout_s * 5 <= demo.SLOW_RESPONSE_S
    assert config.download.allow_private_networks
    assert config.download.retries == 0


def test_stage_functions_meet_the_designed_fates(corpus: demo.DemoCorpus, tmp_path: Path) -> None:
    """ingest, keyword and validate count as designed; download's outcomes (which need img2dataset and the
    server) are taken as designed here and checked by the end-to-end demo run."""
    base_url = "http://127.0.0.1:8765"
    config = _demo_config(tmp_path)
    demo.write_demo_sources(tmp_path / "demo_sources", base_url, corpus)
    designed = {
        (row.url(base_url), row.caption): row
        for row in corpus.rows
        if row.fate != ("ingest", "duplicate_row")
    }
    matcher = KeywordMatcher.from_config(config.keyword)
    actual = {
        stage: {source: Counter() for source in demo.SOURCE_FILES}
        for stage in ("ingest", "keyword", "validate")
    }

    def count(stage: str, source: str, outcome: ShardOutcome) -> ShardOutcome:
        actual[stage][source].update(outcome.counts())
        return outcome

    for source in config.sources:
        for ingested in SourceIngester(source, config.ingest).shards():
            kept = count("ingest", source.name, ingested).kept
            kept = count("keyword", source.name, filter_shard(kept, matcher)).kept
            rows = [
                designed[pair]
                for pair in zip(kept["url"].to_pylist(), kept["caption"].to_pylist(), strict=True)
            ]
            downloaded = [row.fate is None or row.fate[0] == "validate" for row in rows]
            bodies = [corpus.resources[row.path].body for row, ok in zip(rows, downloaded, strict=True) if ok]
            shard = kept.filter(pa.array(downloaded)).append_column("image", pa.array(bodies, pa.binary()))
            count("validate", source.name, validate_shard(shard.cast(DOWNLOAD_SCHEMA), config.validate_))

    funnel = demo.expected_funnel(corpus)
    for stage, per_source in actual.items():
        for source, counts in per_source.items():
            expected = funnel[stage][source]
            dropped = {key.split(":", 1)[1]: n for key, n in counts.items() if key.startswith("dropped:")}
            assert (counts["kept"], dropped) == (expected["kept"], expected["dropped"]), (stage, source)


def test_demo_config_keeps_noise_scores_out_of_the_later_stages(config: PipelineConfig) -> None:
    """expected_dedup and expected_contaminated hold only with these values: the random CLIP's scores and
    embeddings must decide nothing, and the perceptual threshold is the one the eval set is designed for."""
    assert config.clip.pretrained is None
    assert (config.filter.clip_score_min, config.filter.rs_score_min) == (-1.0, 0.0)
    assert config.dedup.exact and config.dedup.embedding_min_similarity is None
    assert config.dedup.perceptual_max_distance == DEFAULT_MAX_DISTANCE
    assert config.decontaminate.embedding_min_similarity is None
    assert config.decontaminate.perceptual_max_distance == DEFAULT_MAX_DISTANCE
    # the CLI writes the eval set into the work directory; the config names it relative to it
    assert [(s.name, s.path) for s in config.decontaminate.eval_sets] == [("demo_eval", "/demo/demo_eval")]
    assert config.shard.webdataset and 0 < config.shard.val_fraction < 0.5


def _survivor_bodies(corpus: demo.DemoCorpus, server: demo.DemoServer) -> dict[str, bytes]:
    """The served body of every URL path a validate survivor points at."""
    bodies = {}
    for path in sorted({row.path for row in corpus.rows if row.fate is None}):
        status, _, body = _get(server, path)
        assert status == 200, path
        bodies[path] = body
    return bodies


def test_eval_set_copies_match_their_originals_and_nothing_else(
    corpus: demo.DemoCorpus, server: demo.DemoServer, tmp_path: Path
) -> None:
    folder = tmp_path / "demo_eval"
    demo.write_demo_eval_set(folder, corpus)
    designed = demo.eval_set_images(corpus)
    files = eval_files(EvalSetConfig(name="demo_eval", path=str(folder)))
    assert [file.name for file in files] == sorted(designed)
    assert {file.name: file.read_bytes() for file in files} == {
        n: image.body for n, image in designed.items()
    }

    bodies = _survivor_bodies(corpus, server)
    paths = list(bodies)
    training = dct_hashes(bodies.values())
    eval_hashes = dct_hashes(file.read_bytes() for file in files)
    queries, matches, _ = hash_neighbours(training, DEFAULT_MAX_DISTANCE, queries=eval_hashes)
    matched = {name: set() for name in designed}
    for query, match in zip(queries.tolist(), matches.tolist(), strict=True):
        matched[files[query].name].add(paths[match])
    assert matched == {n: {image.copy_of} if image.copy_of else set() for n, image in designed.items()}

    copies = {n: image for n, image in designed.items() if image.copy_of is not None}
    assert len(copies) == 3 and len(designed) - len(copies) == 4
    assert demo.expected_contaminated(corpus) == {image.copy_of for image in copies.values()}
    for name, image in copies.items():
        assert image.body != bodies[image.copy_of], name  # not an exact copy: only the hash can find it
        if "reencoded" not in name:
            # rotated/flipped: the plain Hamming distance misses it, only the dihedral minimum finds it
            plain = np.unpackbits(dct_hashes([image.body])[0] ^ dct_hashes([bodies[image.copy_of]])[0])
            assert plain.sum() > DEFAULT_MAX_DISTANCE, name
    grouped = {path for group in demo.expected_dedup(corpus) for _, path, _ in group}
    assert not grouped & demo.expected_contaminated(corpus)  # each copied tile survives dedup alone


def test_designed_dedup_groups_are_exactly_the_duplicates_among_survivors(
    corpus: demo.DemoCorpus, server: demo.DemoServer
) -> None:
    """Within a group every two rows share a normalised URL or a sha256 or are within the perceptual
    threshold; no two rows of different groups (or singletons) are. With no chaining in dedup's grouping,
    the demo run then keeps exactly one row per designed group, whatever the clip_scores."""
    survivors = [row for row in corpus.rows if row.fate is None]
    bodies = _survivor_bodies(corpus, server)
    keys = [demo.row_key(row.source, row.url(server.base_url), row.caption) for row in survivors]
    assert keys == [(row.source, row.path, row.caption) for row in survivors]
    assert len(set(keys)) == len(keys)

    urls = [normalise_url(row.url(server.base_url)) for row in survivors]
    shas = [hashlib.sha256(bodies[row.path]).hexdigest() for row in survivors]
    paths = list(bodies)
    index_of_path = {path: index for index, path in enumerate(paths)}
    first, second, distances = hash_neighbours(dct_hashes(bodies.values()), HASH_BITS - 1)
    distance = np.zeros((len(paths), len(paths)), dtype=np.int64)
    distance[first, second] = distance[second, first] = distances
    rows_at = [index_of_path[row.path] for row in survivors]

    def linked(a: int, b: int) -> bool:
        near = distance[rows_at[a], rows_at[b]] <= DEFAULT_MAX_DISTANCE
        return urls[a] == urls[b] or shas[a] == shas[b] or bool(near)

    group_of = {key: index for index, group in enumerate(demo.expected_dedup(corpus)) for key in group}
    within, across = [], []
    for a in range(len(survivors)):
        for b in range(a + 1, len(survivors)):
            same_group = keys[a] in group_of and group_of.get(keys[a]) == group_of.get(keys[b])
            assert linked(a, b) == same_group, (keys[a], keys[b])
            bits = int(distance[rows_at[a], rows_at[b]])
            (within if same_group else across).append(bits)
    assert all(len(group) >= 2 for group in demo.expected_dedup(corpus))
    assert max(within) <= 5 and min(across) > DEFAULT_MAX_DISTANCE  # measured: 3 and 80 bits
    copies = {row.category for row in survivors if row.copy_of is not None}
    grouped = {survivors[keys.index(key)].category for key in group_of}
    assert copies <= grouped and "rs_tile" in grouped
