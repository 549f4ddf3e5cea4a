"""A source that cannot be read fails alone and clearly; the other sources' work is kept. Runs the CLI in
Prefect's default ephemeral mode (no PREFECT_API_URL)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

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
    assert funnel["stages"][1]["sources"] == {"good": {"in": 3, "kept": 2, "dropped": {"no_keyword": 1}}}
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


def test_a_shrunk_source_leaves_no_stale_shard_files_and_a_failed_one_keeps_its_work(
    tmp_path: Path, prefect_server
) -> None:
    shrinking, flaky = tmp_path / "shrinking.jsonl", tmp_path / "flaky.jsonl"
    _write_jsonl(shrinking, 25)
    _write_jsonl(flaky, 10)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workdir": str(tmp_path / "work"),
                "ingest": {"shard_rows": 10},
                "sources": [
                    {"name": "shrinking", "path": str(shrinking), "format": "jsonl"},
                    {"name": "flaky", "path": str(flaky), "format": "jsonl"},
                ],
            }
        )
    )
    work = tmp_path / "work"

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "rs5m"), "run", str(config), "--stages", "ingest,keyword"],
            capture_output=True,
            text=True,
            env=prefect_server.env(),
            timeout=300,
        )

    def files(stage: str) -> list[str]:
        return sorted(
            p.relative_to(work / stage).as_posix() for p in (work / stage).rglob("*") if p.is_file()
        )

    assert run().returncode == 0
    assert [f for f in files("keyword") if f.startswith("ledger/")] == [
        "ledger/flaky-00000.parquet",
        *(f"ledger/shrinking-{i:05d}.parquet" for i in range(3)),
    ]
    flaky_keyword_ledger = (work / "keyword" / "ledger" / "flaky-00000.parquet").read_bytes()

    _write_jsonl(shrinking, 8)
    flaky.rename(tmp_path / "flaky.away")
    result = run()
    assert result.returncode == 1 and "flaky" in result.stderr.strip().splitlines()[-2]
    for stage in ("ingest", "keyword"):
        assert not [f for f in files(stage) if "shrinking-0000" in f and "shrinking-00000" not in f]
        assert pq.read_table(work / stage / "ledger").num_rows == 8 + 10  # the failed source's rows stay
    assert (work / "ingest" / "markers" / "flaky.json").exists()
    assert (work / "keyword" / "ledger" / "flaky-00000.parquet").exists()

    (tmp_path / "flaky.away").rename(flaky)
    assert run().returncode == 0
    # the source's work was kept, so nothing of it ran again
    assert (work / "keyword" / "ledger" / "flaky-00000.parquet").read_bytes() == flaky_keyword_ledger
    assert pq.read_table(work / "keyword" / "ledger").num_rows == 18
