"""A source that cannot be read fails alone and clearly; the other sources' work is kept. Runs the CLI in
Prefect's default ephemeral mode (no PREFECT_API_URL)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

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
