"""Config validation at the edge: a bad value names its field; the CLI exits non-zero without a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from models.rs_detector import Detector, save_detector
from rs5m.config import ConfigError, load_config, parse_config
from storage.layout import Layout
from tasks.pipeline import check_config
from tests.helpers import BIN

GOOD = {
    "workdir": "work",
    "sources": [
        {
            "name": "cc3m",
            "path": "cc3m.tsv",
            "format": "tsv",
            "header": False,
            "column_names": ["caption", "url"],
        }
    ],
}


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("workdir: work\nsources:\n  - {name: a, path: a.parquet, format: parquet}\n")
    config = load_config(path)
    assert config.workdir == tmp_path / "work"
    assert config.sources[0].path == str(tmp_path / "a.parquet")
    assert config.download.allow_private_networks is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ingest": {"shard_rows": 0}}, "ingest.shard_rows"),
        ({"download": {"threads": "many"}}, "download.threads"),
        ({"download": {"timeout": 5}}, "download.timeout"),
        ({"validate": {"max_pixels": 10**12}}, "validate.max_pixels"),
        ({"sources": [{"name": "x", "path": "x", "format": "xml"}]}, "sources.0.format"),
        ({"sources": [{"name": "bad name!", "path": "x", "format": "csv"}]}, "sources.0.name"),
        ({"sources": [{"name": "x", "path": "x", "format": "tsv", "header": False}]}, "sources.0"),
        (
            {"sources": [{"name": "x", "path": "x", "format": "csv", "encoding": "not-a-codec"}]},
            "sources.0.encoding",
        ),
        (
            {"sources": [{"name": "x", "path": "x", "format": "csv", "encoding": "base64"}]},
            "sources.0.encoding",
        ),
        ({"sources": [{"name": "x", "path": "x", "format": "parquet", "encoding": "latin-1"}]}, "sources.0"),
        ({"ingest": {"max_caption_chars": 0}}, "ingest.max_caption_chars"),
        ({"ingest": {"max_line_bytes": 0}}, "ingest.max_line_bytes"),
        ({"sources": [{"name": "../evil", "path": "x", "format": "csv"}]}, "sources.0.name"),
        ({"sources": [{"name": "a/../../b", "path": "x", "format": "csv"}]}, "sources.0.name"),
        (
            {"decontaminate": {"eval_sets": [{"name": "../../x", "path": "x"}]}},
            "decontaminate.eval_sets.0.name",
        ),
        ({"filter": {"detector": "../../../etc/passwd"}}, "filter.detector"),
        ({"sources": []}, "sources"),
        ({"sources": [GOOD["sources"][0], GOOD["sources"][0]]}, "sources"),
        (
            {"decontaminate": {"eval_sets": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}},
            "decontaminate.eval_sets",
        ),
    ],
)
def test_bad_values_name_their_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**GOOD, **change}, origin="test.yaml")
    assert f"  {field}:" in str(caught.value)
    assert "test.yaml" in str(caught.value)


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_multiline_values_is_for_csv_only(fmt: str) -> None:
    source = {"name": "x", "path": "x", "format": fmt, "multiline_values": True}
    if fmt == "tsv":
        source.update(header=False, column_names=["caption", "url"])
    with pytest.raises(ConfigError, match=r"(?s)  sources\.0:.*multiline_values applies to csv only"):
        parse_config({**GOOD, "sources": [source]}, origin="test.yaml")
    csv_source = {"name": "x", "path": "x", "format": "csv", "multiline_values": True, "encoding": "cp1252"}
    config = parse_config({**GOOD, "sources": [csv_source]})
    assert config.sources[0].multiline_values and config.sources[0].encoding == "cp1252"


def test_an_unknown_encoding_names_the_field_and_the_value() -> None:
    source = {"name": "x", "path": "x", "format": "jsonl", "encoding": "not-a-codec"}
    with pytest.raises(ConfigError) as caught:
        parse_config({**GOOD, "sources": [source]}, origin="test.yaml")
    assert "sources.0.encoding" in str(caught.value) and "'not-a-codec'" in str(caught.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rs5m"), *args], capture_output=True, text=True, timeout=120)


def test_cli_rejects_a_malformed_config_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "workdir: w\nsources:\n  - {name: a, path: a.csv, format: csv}\ndownload: {processes: -1}\n"
    )
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert "download.processes" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("text", ["workdir: [unclosed", "- just a list"])
def test_cli_rejects_unparseable_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("run", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(path) in result.stderr


def test_cli_rejects_a_missing_config_and_an_unknown_stage(tmp_path: Path) -> None:
    result = run_cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read config" in result.stderr
    result = run_cli("run", str(tmp_path / "nope.yaml"), "--stages", "ingest,dedupe")
    assert result.returncode == 2 and "unknown stage(s) dedupe" in result.stderr


def _resources_config(tmp_path: Path, **sections: dict) -> dict:
    """A config whose model, prompts and eval set all resolve; `sections` replace parts of it."""
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir(exist_ok=True)
    (eval_dir / "a.png").write_bytes(b"not decoded by the check")
    return {
        **GOOD,
        "workdir": str(tmp_path / "work"),
        "clip": {"model": "rs5m-tiny-vit"},
        "decontaminate": {"eval_sets": [{"name": "val", "path": str(eval_dir)}]},
        **sections,
    }


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"clip": {"model": "rs5m-tiny-vitt"}},
            "clip: unknown open_clip model 'rs5m-tiny-vitt' (did you mean",
        ),
        ({"clip": {"model": "rs5m-tiny-vit", "pretrained": "/no/such/ckpt.pt"}}, "neither a file nor"),
        ({"filter": {"rs_prompts": "rs-v9"}}, "stage filter (clip, filter): "),
        ({"filter": {"detector": "absent"}}, "no detector at"),
        (
            {"filter": {"detector": "other_model"}},
            "was trained on embeddings of 'ViT-B-32:laion2b_s34b_b79k'",
        ),
        ({"decontaminate": {"eval_sets": [{"name": "v", "path": "/no/such/dir"}]}}, "is not a folder"),
        ({"decontaminate": {"eval_sets": [{"name": "v", "path": "."}]}}, "no .bmp/"),
    ],
)
def test_missing_or_unfit_resources_fail_before_any_stage_runs(
    tmp_path: Path, sections: dict, expected: str
) -> None:
    save_detector(
        Detector(weights=np.zeros(64), bias=0.0, model_identity="ViT-B-32:laion2b_s34b_b79k"),
        Layout(tmp_path / "work").detector("other_model"),
    )
    (tmp_path / "empty").mkdir()
    config = parse_config(_resources_config(tmp_path, **sections), base_dir=tmp_path / "empty")
    check_config(config, ["ingest", "keyword", "download", "validate"])  # these stages use none of it
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    assert expected in str(caught.value)
    assert len(str(caught.value)) < 1000


def test_resources_that_resolve_pass_the_check(tmp_path: Path) -> None:
    check_config(parse_config(_resources_config(tmp_path)))


def test_cli_reports_a_missing_detector_in_one_line_and_runs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(_resources_config(tmp_path, filter={"detector": "absent"})))
    result = run_cli("run", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("rs5m: stage filter (clip, filter): no detector at")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work" / "ingest").exists()
