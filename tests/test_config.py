"""Config validation at the edge: a bad value names its field; the CLI exits non-zero without a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rs5m.config import ConfigError, load_config, parse_config
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
        ({"sources": []}, "sources"),
        ({"sources": [GOOD["sources"][0], GOOD["sources"][0]]}, "sources"),
    ],
)
def test_bad_values_name_their_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**GOOD, **change}, origin="test.yaml")
    assert f"  {field}:" in str(caught.value)
    assert "test.yaml" in str(caught.value)


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
