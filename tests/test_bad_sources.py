"""A source that cannot be read fails alone and clearly; the other sources' work is kept. Runs the CLI in
Prefect's default ephemeral mode (no PREFECT_API_URL)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import yaml

from tests.helpers import BIN, free_port


def test_unreachable_and_malformed_sources_fail_alone(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        "\n".join(
            json.dumps({"url": f"http://images.example.org/{i}.jpg", "caption": caption})
            for i, caption in enumerate(
                ["aerial view of a harbour", "a cat on a sofa", "satellite image of farmland"]
            )
        )
        + "\n"
    )
    wrong_columns = tmp_path / "wrong.csv"
    wrong_columns.write_text("link,text\nhttp://images.example.org/x.jpg,aerial view\n")
    dirty = tmp_path / "dirty.tsv"  # a latin-1 byte and a broken line: two recorded drops, not a lost source
    dirty.write_bytes(
        b"aerial view of a port\thttp://images.example.org/d1.jpg\n"
        b"vue a\xe9rienne\thttp://images.example.org/d2.jpg\n"
        b"no url here\n"
        b"a dog on a sofa\thttp://images.example.org/d3.jpg"
    )
    config = {
        "workdir": str(tmp_path / "work"),
        "sources": [
            {"name": "good", "path": str(good), "format": "jsonl"},
            {
                "name": "unreachable",
                "path": f"http://127.0.0.1:{free_port()}/captions.tsv",
                "format": "tsv",
                "header": False,
                "column_names": ["caption", "url"],
            },
            {"name": "wrong_columns", "path": str(wrong_columns), "format": "csv"},
            {
                "name": "dirty",
                "path": str(dirty),
                "format": "tsv",
                "header": False,
                "column_names": ["caption", "url"],
            },
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [str(BIN / "rs5m"), "run", str(path), "--stages", "ingest,keyword"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    final_words = result.stderr.strip().splitlines()[-2:]
    assert "unreachable" in final_words[0] and "wrong_columns" in final_words[0]
    assert "has no column 'url'" in final_words[0] and "wrong.csv" in final_words[0]
    assert "rerun the same command to resume" in final_words[1]

    report = subprocess.run(
        [str(BIN / "rs5m"), "report", str(tmp_path / "work"), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    funnel = json.loads(report.stdout)
    assert [s["stage"] for s in funnel["stages"]] == ["ingest", "keyword"]
    assert funnel["stages"][0]["sources"]["dirty"] == {"in": 4, "kept": 2, "dropped": {"malformed_row": 2}}
    assert funnel["stages"][1]["sources"] == {
        "good": {"in": 3, "kept": 2, "dropped": {"no_keyword": 1}},
        "dirty": {"in": 2, "kept": 1, "dropped": {"no_keyword": 1}},
    }
    assert sorted(funnel["failed_sources"]) == ["unreachable", "wrong_columns"]


def _write_jsonl(path: Path, rows: int) -> None:
    path.write_text(
        "".join(
            json.dumps(
                {"url": f"http://images.example.org/{path.stem}/{i}.jpg", "caption": f"aerial view {i}"}
            )
            + "\n"
            for i in range(rows)
        )
    )


def test_sources_that_shrink_fail_or_leave_keep_their_files_until_an_explicit_prune(
    tmp_path: Path, prefect_server
) -> None:
    shrinking, flaky = tmp_path / "shrinking.jsonl", tmp_path / "flaky.jsonl"
    _write_jsonl(shrinking, 25)
    _write_jsonl(flaky, 10)
    work = tmp_path / "work"
    both = [
        {"name": "shrinking", "path": str(shrinking), "format": "jsonl"},
        {"name": "flaky", "path": str(flaky), "format": "jsonl"},
    ]

    def run(sources: list[dict]) -> subprocess.CompletedProcess:
        config = tmp_path / "pipeline.yaml"
        config.write_text(
            yaml.safe_dump({"workdir": str(work), "ingest": {"shard_rows": 10}, "sources": sources})
        )
        return subprocess.run(
            [str(BIN / "rs5m"), "run", str(config), "--stages", "ingest,keyword"],
            capture_output=True,
            text=True,
            env=prefect_server.env(),
            timeout=300,
        )

    def prune(*flags: str) -> str:
        result = subprocess.run(
            [str(BIN / "rs5m"), "prune", str(work), *flags], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def ledger_files() -> list[str]:
        return sorted(p.name for p in (work / "keyword" / "ledger").glob("*.parquet"))

    def current_fates() -> int:
        con = duckdb.connect(str(work / "catalog.duckdb"), read_only=True)
        return con.sql("SELECT count(*) FROM ledger WHERE stage = 'keyword'").fetchall()[0][0]

    everything = ["flaky-00000.parquet", *(f"shrinking-{i:05d}.parquet" for i in range(3))]
    assert run(both).returncode == 0
    assert ledger_files() == everything
    flaky_keyword_ledger = (work / "keyword" / "ledger" / "flaky-00000.parquet").read_bytes()

    # a source whose file is gone fails alone; a shrunk one has fewer current shards; nothing is deleted
    _write_jsonl(shrinking, 8)
    flaky.rename(tmp_path / "flaky.away")
    result = run(both)
    assert result.returncode == 1 and "flaky" in result.stderr.strip().splitlines()[-2]
    assert ledger_files() == everything
    assert current_fates() == 8  # the current funnel: the failed source is reported, its old files kept

    # left out of the config for one run: its files stay, and when it comes back it resumes
    (tmp_path / "flaky.away").rename(flaky)
    assert run(both[:1]).returncode == 0
    assert ledger_files() == everything and current_fates() == 8
    planned = prune()
    assert "ingest/data: 3 entries" in planned and "keyword/ledger: 3 entries" in planned
    assert "would delete" in planned and "--yes" in planned
    assert ledger_files() == everything  # a plan deletes nothing
    assert run(both).returncode == 0
    assert (work / "keyword" / "ledger" / "flaky-00000.parquet").read_bytes() == flaky_keyword_ledger
    assert current_fates() == 18

    # pruned explicitly: only then are the files the current manifests do not name deleted
    assert run(both[:1]).returncode == 0
    assert "deleted" in prune("--yes")
    assert ledger_files() == ["shrinking-00000.parquet"]
    assert pq.read_table(work / "keyword" / "ledger").num_rows == 8  # read directly: one fate per sample
    assert "nothing to prune" in prune()
    assert run(both[:1]).returncode == 0
