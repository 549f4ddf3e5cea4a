"""The terminal side of `rs5m`: `report` and `status` answer without loading torch, their text fits 100
columns, output into a closed pipe ends quietly, and `status`, `run --dry-run` and `check` say what a data
engineer asks before and during a run. The work directory here is a real one, made by running ingest and
keyword through their plain functions (no Prefect, no torch: seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rs5m.config import load_config
from rs5m.report import FunnelReport, StageFunnel, funnel_text, load_funnel
from rs5m.terminal import TEXT_WIDTH, table, wrapped
from storage.layout import Layout
from storage.lock import workdir_lock
from storage.runs import COMPLETED, RUNNING, write_run_record
from tasks.harness import begin_stage, now
from tasks.pipeline import STAGE_ORDER, STAGES, refresh_workdir_catalog
from tests.helpers import BIN, run_stage_directly

HEAVY = ("torch", "open_clip", "transformers", "prefect")
SOURCES = {"cc3m_like": 150, "laion_like": 230, "redcaps_like_with_a_long_name": 90}
CAPTIONS = ("aerial view of a harbour {i}", "a cat on a sofa {i}", "satellite image of farmland {i}")


def _write_config(tmp: Path, name: str = "pipeline", **sections: dict) -> Path:
    config = {
        "workdir": str(tmp / "work"),
        "ingest": {"shard_rows": 64},
        "sources": [
            {"name": name, "path": str(tmp / f"{name}.jsonl"), "format": "jsonl"} for name in SOURCES
        ],
        **sections,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, Path]:
    """(work directory, config): ingest and keyword complete, recorded as one completed run."""
    tmp = tmp_path_factory.mktemp("cli")
    for name, rows in SOURCES.items():
        (tmp / f"{name}.jsonl").write_text(
            "".join(
                json.dumps({"url": f"http://images.example.org/{name}/{i}.jpg", "caption": caption}) + "\n"
                for i in range(rows)
                for caption in [CAPTIONS[i % 3].format(i=i)]
            )
        )
    config_path = _write_config(tmp)
    config = load_config(config_path)
    layout = Layout(config.workdir)
    started = now()
    for stage in ("ingest", "keyword"):
        run_stage_directly(layout, stage, config, "run-a")
        refresh_workdir_catalog(layout)
    write_run_record(
        layout,
        "run-a",
        {
            "started_at": started,
            "finished_at": now(),
            "stages": ["ingest", "keyword"],
            "status": COMPLETED,
            "config": config.model_dump(mode="json"),
        },
    )
    return layout.root, config_path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def rs5m(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "rs5m"), *args], capture_output=True, text=True, env=_env(), timeout=timeout
    )


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300
    )


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and modification time, but the lock file's (a reader's probe of it opens it)."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != ".rs5m.lock"
    }


# --- report and status answer without torch ---------------------------------------------------------


def test_the_cli_and_the_report_import_nothing_heavy() -> None:
    result = _python(
        "import rs5m.cli, rs5m.report, rs5m.status, rs5m.plan; import sys; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"heavy modules imported: {result.stdout}"


def test_report_and_status_of_a_work_directory_load_no_torch(workdir) -> None:
    root, _ = workdir
    result = _python(
        "import sys; from rs5m.cli import main; "
        f"codes = [main(['report', {str(root)!r}]), main(['status', {str(root)!r}, '--json'])]; "
        f"print(codes, [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "[0, 0] []"


# --- the text fits a 100-column terminal --------------------------------------------------------------


def test_the_report_of_a_work_directory_fits_100_columns(workdir) -> None:
    root, _ = workdir
    result = rs5m("report", str(root))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= TEXT_WIDTH, [line for line in lines if len(line) > TEXT_WIDTH]
    report = load_funnel(Layout(root))
    assert result.stdout.strip() == funnel_text(report).strip()
    header = next(line for line in lines if line.lstrip().startswith("source "))
    assert header.split() == ["source", "ingest", "keyword"]
    for name, rows in SOURCES.items():
        row = next(line for line in lines if line.strip().startswith(f"{name} "))
        ingest, keyword = report.stages[0].sources[name], report.stages[1].sources[name]
        assert row.split() == [name, str(rows), str(keyword["kept"])]
        assert ingest["in"] == rows
    assert "  download: not run" in lines


def _synthetic_report() -> FunnelReport:
    """Every stage complete, RS5M's eleven PUB11 sources and three RS3 ones with counts in the millions,
    long errors, notes and captions: the widest report there is."""
    pub11 = ["laion2b_en", "coyo700m", "laion400m", "laion_aesthetics_v2_6plus", "cc3m", "cc12m", "yfcc15m"]
    pub11 += ["wit_english_only", "redcaps", "sbu_captions", "visual_genome"]
    rs3 = ["fmow_rgb_full", "bigearthnet_s2_v1", "millionaid_train"]
    reasons = {"http_error": 812_345, "timeout": 99_999, "download_error": 7_654_321, "too_small": 12}
    stages = []
    for position, name in enumerate(STAGE_ORDER):
        names = rs3 if name.startswith("rs3_") else pub11 if position < 6 else pub11 + rs3
        sources = {
            source: {"in": 123_456_789 - position, "kept": 98_765_432 - position, "dropped": dict(reasons)}
            for source in names
        }
        stages.append(StageFunnel(STAGES[name], "complete", sources))
    return FunnelReport(
        "/data/" + "very-long-work-directory-name/" * 4,
        stages,
        {"redcaps": "cannot read https://example.org/" + "x" * 150 + ".tsv: 404 Not Found " * 5},
        eval_overlap={f"eval_set_{i}_with_a_long_name": 1234 for i in range(8)},
        notes=["a note " * 40],
        last_run={"run_id": "f" * 36, "status": "interrupted", "error": "interrupted by SIGTERM " * 10},
        caption_quality={
            "sources": {name: _quality() for name in rs3},
            "all": _quality(),
            "examples": {
                name: [{"file": "a/" * 30 + "P0000001.jpg", "caption": "gibberish " * 40, "sample_id": "s"}]
                for name in rs3
            },
        },
    )


def _quality() -> dict:
    from rs5m.caption_quality import TABLE_COLUMNS

    return {key: 123456.789 for key, _ in TABLE_COLUMNS}


def _section(lines: list[str], first: str, after: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    return lines[start : next(i for i, line in enumerate(lines) if i > start and line.startswith(after))]


def test_the_widest_report_fits_100_columns_and_keeps_every_number() -> None:
    report = _synthetic_report()
    text = funnel_text(report)
    lines = text.splitlines()
    assert max(map(len, lines)) <= TEXT_WIDTH, [line for line in lines if len(line) > TEXT_WIDTH]
    release = ["dedup", "decontaminate", "shard"]
    for pipeline, after, stages in (
        ("pub11", "rs3: ", [*STAGE_ORDER[:6], *release]),
        ("rs3", "Per stage", [*STAGE_ORDER[6:13], *release]),
    ):
        section = _section(lines, f"{pipeline}: ", after)
        headers = [line.split()[1:] for line in section if line.startswith("  source ")]
        assert len(headers) > 1  # too wide for one block: it continues below
        assert [name for header in headers for name in header] == stages
        sources = {name for stage in report.stages for name in stage.sources if stage.info.name == stages[0]}
        for name in [*sources, "total"]:  # every row in every block
            assert sum(line.split()[0] == name for line in section if line.strip()) == len(headers)
    total_in = 11 * 123_456_789  # pub11's ingest column counts what came in
    total = next(line for line in _section(lines, "pub11: ", "rs3: ") if line.split()[:1] == ["total"])
    assert total.split()[1] == str(total_in)
    assert "x" * 90 in text.replace("\n", "").replace(" ", "")  # the long error is wrapped, not cut
    assert text.count("NOTE: a note") == 1


def test_wrapped_and_table_never_exceed_the_width() -> None:
    assert wrapped("short") == ["short"]
    long = wrapped("  " + "word " * 60 + "/" + "p" * 250)
    assert all(len(line) <= TEXT_WIDTH for line in long)
    assert all(line.startswith("      ") for line in long[1:])
    rows = [["name", *(f"column{i:03d}" for i in range(30))], ["a", *(str(10**9 + i) for i in range(30))]]
    lines = table(rows, indent="  ")
    assert all(len(line) <= TEXT_WIDTH for line in lines)
    assert sum(line.startswith("  name ") for line in lines) == 5  # 30 columns of 10: 7 a block


# --- output into a closed pipe ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["report", "W"], ["status", "W", "--json"], ["--help"]])
def test_output_into_a_closed_pipe_ends_quietly(workdir, command: list[str]) -> None:
    root, _ = workdir
    args = [str(root) if arg == "W" else arg for arg in command]
    process = subprocess.Popen(
        [str(BIN / "rs5m"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    process.stdout.close()  # the reader is gone before the command writes anything
    _, stderr = process.communicate(timeout=300)
    # 141 as if killed by SIGPIPE (argparse's help ignores a failed write: 0)
    assert process.returncode == (0 if command == ["--help"] else 141), stderr.decode()[-3000:]
    assert stderr == b""


def test_a_reader_that_stops_early_leaves_no_traceback(workdir) -> None:
    root, _ = workdir
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"'{BIN / 'rs5m'}' report '{root}' | head -3"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert len(result.stdout.splitlines()) == 3
    assert result.stderr == "" and result.returncode in (0, 141)


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch) -> None:
    from rs5m import cli

    def broken(_args):
        raise BrokenPipeError("a socket of the command's own")

    monkeypatch.setattr(cli, "cmd_status", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["status", "anywhere"])


# --- rs5m status --------------------------------------------------------------------------------------


def test_status_lists_the_runs_and_their_state_now(workdir, tmp_path: Path) -> None:
    root, _ = workdir
    result = rs5m("status", str(root))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no run is writing it now" in result.stdout
    assert "run-a  completed" in result.stdout and "ran 2 stages: ingest to keyword" in result.stdout
    assert max(map(len, result.stdout.splitlines())) <= TEXT_WIDTH

    # a killed run: its record still says running, nobody holds the lock
    killed = tmp_path / "killed"
    layout = Layout(killed)
    write_run_record(
        layout, "run-k", {"started_at": now(), "stages": ["ingest", "keyword"], "status": RUNNING}
    )
    begin_stage(layout, "keyword", "run-k")
    status = json.loads(rs5m("status", str(killed), "--json").stdout)
    assert status["writer"] is None
    (run,) = status["runs"]
    assert run["run_id"] == "run-k" and run["status"] == "interrupted" and run["recorded_status"] == "running"
    assert run["stage"] == "keyword" and run["finished_at"] is None
    text = rs5m("status", str(killed)).stdout
    assert "ended without recording its end" in text and "stopped in stage keyword (stage 2 of 2)" in text


def test_status_shows_the_running_stage_and_the_writer(workdir, tmp_path: Path) -> None:
    root, config_path = workdir
    config = load_config(config_path)
    layout = Layout(root)
    try:
        with workdir_lock(layout, "run-b"):  # held by this process: the command sees a writer
            write_run_record(
                layout, "run-b", {"started_at": now(), "stages": ["ingest", "keyword"], "status": RUNNING}
            )
            begin_stage(layout, "keyword", "run-b")
            shards = STAGES["keyword"].units(layout, config)
            for shard in shards[:2]:
                (layout.marker("keyword", shard)).unlink()
                STAGES["keyword"].run_unit(layout, shard, config, "run-b")
            result = rs5m("status", str(root))
            assert result.returncode == 0, result.stderr[-3000:]
            assert "being written now by run run-b" in result.stdout
            assert "run-b  running" in result.stdout
            assert f"running stage keyword (stage 2 of 2): 2 of {len(shards)} units written" in result.stdout
            status = json.loads(rs5m("status", str(root), "--json").stdout)
            assert status["writer"]["run_id"] == "run-b" and status["writer"]["pid"] == os.getpid()
            assert status["runs"][-1]["progress"] == {"units_written": 2, "units": len(shards)}
    finally:  # the module's work directory as it was: keyword complete, run-b gone
        run_stage_directly(layout, "keyword", config, "run-a")
        refresh_workdir_catalog(layout)
        layout.run_record("run-b").unlink(missing_ok=True)


def test_status_of_what_is_not_a_work_directory_is_bad_input(tmp_path: Path) -> None:
    result = rs5m("status", str(tmp_path / "absent"))
    assert result.returncode == 2 and result.stderr.startswith("rs5m status: no work directory at")
    result = rs5m("status", str(tmp_path))
    assert result.returncode == 2 and "no runs recorded" in result.stderr and "Traceback" not in result.stderr


# --- rs5m run --dry-run -------------------------------------------------------------------------------

SELECTED = "ingest,keyword,download,validate"


def test_dry_run_says_what_is_current_and_what_would_run_and_writes_nothing(workdir) -> None:
    root, config_path = workdir
    before = _snapshot(root)
    result = rs5m("run", str(config_path), "--stages", SELECTED, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _snapshot(root) == before
    assert "nothing was run, locked or written" in " ".join(result.stdout.split())  # wrapped at 100 columns
    assert max(map(len, result.stdout.splitlines())) <= TEXT_WIDTH
    rows = {
        line.split()[1]: line.split()[2:]
        for line in result.stdout.splitlines()
        if line.startswith("  pub11 ")
    }
    shards = len(STAGES["keyword"].units(Layout(root), load_config(config_path)))
    assert rows["ingest"] == ["3", "3", "0"]
    assert rows["keyword"] == [str(shards), str(shards), "0"]
    assert rows["download"] == [str(shards), "0", str(shards)]
    assert rows["validate"] == ["?", "?", "all"]
    assert f"download: {shards} not done yet" in result.stdout
    assert "validate: units known once download has run" in result.stdout

    plan = json.loads(rs5m("run", str(config_path), "--stages", SELECTED, "--dry-run", "--json").stdout)
    assert plan["units_to_run"] == shards and plan["stages_to_run"] == ["download", "validate"]
    assert _snapshot(root) == before


def test_dry_run_names_a_config_change_and_a_stage_that_could_not_start(workdir) -> None:
    root, config_path = workdir
    changed = _write_config(
        config_path.parent, "changed", keyword={"keywords": "rs-v1", "exclusions": "rs-v1"}
    )
    plan = json.loads(rs5m("run", str(changed), "--stages", "ingest,keyword", "--dry-run", "--json").stdout)
    keyword = next(stage for stage in plan["stages"] if stage["stage"] == "keyword")
    assert keyword["current"] == 0 and keyword["why"] == {"config or code changed": keyword["units"]}
    # validate alone: its upstream download has not run, so the run would stop there
    result = rs5m("run", str(config_path), "--stages", "validate", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the run would fail here: it reads download, which is not run" in result.stdout


def test_dry_run_while_a_run_writes_the_work_directory_takes_no_lock(workdir) -> None:
    root, config_path = workdir
    with workdir_lock(Layout(root), "run-c"):
        result = rs5m("run", str(config_path), "--stages", "ingest,keyword", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "being written now by run run-c" in result.stdout
    assert "Everything selected is current" in result.stdout


# --- rs5m check ---------------------------------------------------------------------------------------


def test_check_passes_a_good_config_and_names_what_it_checked(workdir) -> None:
    _, config_path = workdir
    result = rs5m("check", str(config_path), "--stages", SELECTED)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK, a run could start" in result.stdout
    assert "checked 4 stages: ingest, keyword, download, validate" in result.stdout


def test_check_fails_a_bad_config_with_one_clear_line(workdir) -> None:
    _, config_path = workdir
    bad = _write_config(config_path.parent, "bad", keyword={"places": "rs-v9"})
    result = rs5m("check", str(bad), "--stages", "keyword")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("rs5m: stage keyword (keyword): unknown places list version 'rs-v9'")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = rs5m("check", str(config_path), "--pipeline", "rs3")
    assert result.returncode == 2 and "--pipeline rs3: the config has no rs3 sources" in result.stderr
    result = rs5m("run", str(bad), "--stages", "keyword", "--dry-run")
    assert result.returncode == 2 and "unknown places list version" in result.stderr
