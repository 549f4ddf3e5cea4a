"""What `rs5m run` shows while it works: a progress line per stage (flows/stages.py StageProgress), the funnel
on stdout at the end, and, unless --verbose, neither Prefect's own log lines nor img2dataset's output
(rs5m/verbosity.py, tasks/img2dataset_output.py)."""

from __future__ import annotations

import http.server
import io
import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from PIL import Image

import flows.stages
import flows.train
from flows.stages import StageProgress
from rs5m.config import DownloadConfig
from rs5m.verbosity import VERBOSE_ENV
from tasks.download import download_shard
from tasks.harness import ShardSummary
from tests.helpers import keyword_shard, rs5m

# a stage's plain line: "download: 3 of 3 units (1 reused, 2 run), 1,234 rows/s, 0.0 s"
STAGE_LINE = r"{stage}: {n} of {n} units \({reused} reused, {ran} run\)(, [\d,]+ rows/s)?, \d+\.\d s"
# img2dataset's own output: its tqdm bar, its advice, its logger process's speed lines
IMG2DATASET_OUTPUT = ("0it [", "check your bandwidth speed", "images per sec")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def artifacts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, str]]:
    """The progress artifact's (percent, description) as StageProgress sets them, without a Prefect API."""
    recorded: list[tuple[float, str]] = []

    def create(progress: float, key: str, description: str) -> str:
        recorded.append((progress, description))
        return "artifact-id"

    def update(artifact_id: str, progress: float, description: str) -> None:
        recorded.append((progress, description))

    monkeypatch.setattr(flows.stages, "create_progress_artifact", create)
    monkeypatch.setattr(flows.stages, "update_progress_artifact", update)
    return recorded


def _three_units(progress: StageProgress) -> None:
    progress.unit_finished(ShardSummary("download", "web-00000", skipped=True))
    progress.unit_finished(ShardSummary("download", "web-00001", skipped=False, counts={"kept": 40, "x": 10}))
    progress.unit_finished(None)  # a failed unit


def test_off_a_terminal_a_stage_writes_one_plain_line_when_it_ends(artifacts, monkeypatch) -> None:
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    log = io.StringIO()
    with StageProgress("download", 3, terminal=log) as progress:
        _three_units(progress)
        assert log.getvalue() == ""  # nothing while it runs: a CI log or a worker's output gets no redraws
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(STAGE_LINE.format(stage="download", n=3, reused=1, ran=2), lines[0]), lines
    assert "rows/s" in lines[0]
    # one count behind both: the UI's artifact says the same
    assert artifacts[-1][0] == 100.0
    assert artifacts[-1][1].startswith("download: 3 of 3 units (1 reused, 2 run), ")


def test_the_ui_artifact_moves_at_most_every_interval_and_always_at_the_end(artifacts, monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(flows.stages.time, "monotonic", lambda: clock[0])
    with StageProgress("embed", 6, terminal=io.StringIO()) as progress:
        for _ in range(3):  # units that end within one interval: no round trip to the server each
            progress.unit_finished(ShardSummary("embed", "web", skipped=True))
        assert len(artifacts) == 1  # created, not yet moved
        clock[0] += StageProgress.ARTIFACT_INTERVAL_S
        progress.unit_finished(ShardSummary("embed", "web", skipped=True))
        assert artifacts[-1][0] == pytest.approx(100 * 4 / 6)
        progress.unit_finished(ShardSummary("embed", "web", skipped=True))
        assert len(artifacts) == 2
        progress.unit_finished(ShardSummary("embed", "web", skipped=True))  # the last unit: at once
    assert len(artifacts) == 3
    assert artifacts[-1] == (100.0, "embed: 6 of 6 units (6 reused, 0 run)")


def test_on_a_terminal_a_live_line_is_replaced_by_the_plain_line(artifacts, monkeypatch) -> None:
    monkeypatch.setenv(VERBOSE_ENV, "0")
    monkeypatch.setenv("TERM", "xterm-256color")  # rich draws no live line on a dumb terminal
    terminal = _Terminal()
    with StageProgress("keyword", 3, terminal=terminal) as progress:
        _three_units(progress)
    drawn = terminal.getvalue()
    assert "ETA" in drawn and "\x1b[" in drawn  # rich's live line was drawn, then cleared
    # the cursor is never hidden: a run stopped by Ctrl-C could not show it again
    assert "\x1b[?25l" not in drawn
    last = ANSI.sub("", drawn).replace("\r", "\n").strip().splitlines()[-1]
    assert re.fullmatch(STAGE_LINE.format(stage="keyword", n=3, reused=1, ran=2), last), last


def test_a_verbose_run_gets_plain_lines_on_a_terminal_too(artifacts, monkeypatch) -> None:
    """Log lines would tear a live line: a verbose run writes the plain line only."""
    monkeypatch.setenv(VERBOSE_ENV, "1")
    terminal = _Terminal()
    with StageProgress("keyword", 3, terminal=terminal) as progress:
        _three_units(progress)
    assert "\x1b" not in terminal.getvalue() and len(terminal.getvalue().splitlines()) == 1


# --- img2dataset's output: only when verbose ----------------------------------------------------------


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (20, 120, 200)).save(buffer, "JPEG")
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(buffer.getvalue())))
        self.end_headers()
        self.wfile.write(buffer.getvalue())


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _download_two_images(base_url: str, scratch: Path) -> pa.Table:
    """One download_shard call (one img2dataset run), from a worker thread as Prefect's task runner makes it;
    its survivors."""
    shard = keyword_shard([f"{base_url}/a.jpg", f"{base_url}/b.jpg"])
    config = DownloadConfig(processes=1, threads=2, timeout_s=10, allow_private_networks=True)
    scratch.mkdir()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(download_shard, shard, config, scratch).result().kept


def test_img2dataset_output_shows_only_in_a_verbose_run(image_server, tmp_path, monkeypatch, capfd) -> None:
    """Captured at the file descriptors, so the output of img2dataset's spawned worker and logger processes
    counts too."""
    monkeypatch.setenv(VERBOSE_ENV, "0")
    assert _download_two_images(image_server, tmp_path / "quiet").num_rows == 2
    quiet = capfd.readouterr()
    assert not [text for text in IMG2DATASET_OUTPUT if text in quiet.out + quiet.err], quiet

    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert _download_two_images(image_server, tmp_path / "verbose").num_rows == 2
    verbose = capfd.readouterr()
    assert [text for text in IMG2DATASET_OUTPUT if text not in verbose.out + verbose.err] == [], verbose


# --- the command -----------------------------------------------------------------------------------------


def test_rs5m_run_shows_stage_lines_and_the_funnel_and_prefects_lines_only_when_verbose(
    tmp_path: Path, prefect_server
) -> None:
    source = tmp_path / "web.jsonl"
    captions = ("aerial view of a harbour {i}", "a cat on a sofa {i}")
    source.write_text(
        "".join(
            json.dumps({"url": f"http://images.example.org/{i}.jpg", "caption": captions[i % 2].format(i=i)})
            + "\n"
            for i in range(25)
        )
    )
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workdir": str(tmp_path / "work"),
                "ingest": {"shard_rows": 10},
                "sources": [{"name": "web", "path": str(source), "format": "jsonl"}],
            }
        )
    )
    args = ("run", str(config), "--stages", "ingest,keyword")
    env = prefect_server.env()
    del env["PREFECT_LOGGING_LEVEL"]  # tests/conftest.py's WARNING would hide Prefect's lines either way
    prefect_line = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| INFO ", re.MULTILINE)

    result = rs5m(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not prefect_line.search(result.stderr), result.stderr
    assert re.search(STAGE_LINE.format(stage="ingest", n=1, reused=0, ran=1), result.stderr), result.stderr
    assert re.search(STAGE_LINE.format(stage="keyword", n=3, reused=0, ran=3), result.stderr), result.stderr
    assert "# RS5M funnel" in result.stdout and "| total | 25 | 13 |" in result.stdout, result.stdout
    assert "units" not in result.stdout  # progress on stderr, the funnel alone on stdout

    again = rs5m(*args, "--verbose", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Finished in state Completed()" in again.stderr and prefect_line.search(again.stderr)
    assert re.search(STAGE_LINE.format(stage="keyword", n=3, reused=3, ran=0), again.stderr), again.stderr
    assert "| total | 25 | 13 |" in again.stdout


# --- training: flows/train.py TrainingLine ------------------------------------------------------------


def test_training_writes_a_plain_line_now_and_then_and_one_at_the_end(monkeypatch) -> None:
    """Off a terminal (a CI log, a worker's output) training is long: a plain line at most every
    TERMINAL_EVERY_S, then the final one; a resumed run's rate counts only the steps this process ran."""
    import flows.progress_line
    from flows.train import TERMINAL_EVERY_S, TrainingLine

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    clock = [1000.0]
    monkeypatch.setattr(flows.progress_line.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(flows.train.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    line = TrainingLine("tiny", 100, terminal=log)
    for step in range(11, 101):  # resumed at step 10, one step a second
        clock[0] += 1.0
        line.step(step, f"step {step}/100 epoch 1 loss {4 - step / 50:.4f} lr 1e-05 4.2 samples/s")
    line.finish(complete=True)
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    lines = log.getvalue().splitlines()
    assert TERMINAL_EVERY_S == 60.0
    assert lines == [
        "train tiny: step 70 of 100, loss 2.6000, 1.00 steps/s",  # 60 s after the start
        "train tiny: step 100 of 100, loss 2.0000, 1.00 steps/s, 90.0 s",
    ]


def test_training_already_complete_ends_at_its_last_step(monkeypatch) -> None:
    from flows.train import TrainingLine

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    log = io.StringIO()
    TrainingLine("tiny", 8, terminal=log).finish(complete=True)  # the trainer found the run complete
    assert re.fullmatch(r"train tiny: step 8 of 8, \d+\.\d s\n", log.getvalue())
