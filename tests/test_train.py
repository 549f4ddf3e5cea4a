"""GeoRSCLIP fine-tuning (models/train.py, rs5m/train_config.py) with the tiny random CLIP on tiny data sets.

The slow tests start real processes: kill-and-resume through `launch` (three trainer runs) and two torchrun
processes on gloo; the rest train in this process for a few steps.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import open_clip
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import models.train as train_module
from models.clip import register_project_configs
from models.train import (
    TrainingInputError,
    check_training_inputs,
    launch,
    lora_target_pattern,
    main,
    read_pairs,
    train,
)
from rs5m.config import ConfigError
from rs5m.train_config import TrainConfig, load_train_config, parse_train_config
from storage.layout import TrainLayout

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = "rs5m-tiny-vit"


def _image_bytes(rng: np.random.Generator, size: int, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format=image_format)
    return buffer.getvalue()


def _release(workdir: Path, rows: int = 24, seed: int = 0, rs3_captions: bool = False) -> Path:
    """A released dataset like storage/dataset.py writes (the columns training reads, plus a few others):
    WORKDIR/dataset/train/part-0000{0,1}.parquet, row groups of 8 rows, PNG and JPEG images of 32-48 px."""
    rng = np.random.default_rng(seed)
    train_dir = workdir / "dataset" / "train"
    train_dir.mkdir(parents=True)
    for part, part_rows in enumerate((rows // 2, rows - rows // 2)):
        formats = ["PNG" if i % 2 else "JPEG" for i in range(part_rows)]
        columns = {
            "image": pa.array(
                [_image_bytes(rng, 32 + 16 * (i % 2), f) for i, f in enumerate(formats)], pa.large_binary()
            ),
            "image_format": formats,
            "caption": [
                f"part {part} image {i}: {('fields', 'roads', 'a harbour')[i % 3]}" for i in range(part_rows)
            ],
            "subset": ["rs3" if rs3_captions else "pub11"] * part_rows,
        }
        if rs3_captions:
            # every third row has no second caption, one has only spaces: neither adds a pair
            columns["ssl_cap"] = [
                None if i % 3 == 0 else ("  " if i == 1 else f"ssl {i}") for i in range(part_rows)
            ]
        pq.write_table(pa.table(columns), train_dir / f"part-{part:05d}.parquet", row_group_size=8)
    return workdir / "dataset"


def _csv_dataset(root: Path, rows: int = 12, missing: int = 0) -> Path:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    lines = ["filename,caption"]
    for i in range(rows):
        name = f"images/{i:03d}.jpg"
        if i >= missing:
            (root / name).write_bytes(_image_bytes(rng, 40, "JPEG"))
        lines.append(f'{name},"tile {i}, with a comma"')
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def _config(**overrides) -> TrainConfig:
    fields = {
        "run_name": "tiny",
        "model": TINY,
        "steps": 4,
        "batch_size": 8,
        "lr": 1e-3,
        "checkpoint_every_steps": 2,
        "num_workers": 0,
        "device": "cpu",
    }
    return TrainConfig(**{**fields, **overrides})


def _metrics(layout: TrainLayout) -> list[dict]:
    return [json.loads(line) for line in layout.metrics.read_text().splitlines()]


def _plain_model() -> torch.nn.Module:
    register_project_configs()
    torch.manual_seed(0)
    return open_clip.create_model(TINY)


def _assert_plain_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The file is a bare open_clip state dict: it loads strictly into open_clip.create_model(TINY)."""
    weights = torch.load(path, map_location="cpu", weights_only=True)
    assert not [key for key in weights if "lora" in key or "base_layer" in key or key.startswith("module.")]
    _plain_model().load_state_dict(weights)
    return weights


def test_full_run_writes_weights_resume_states_metrics_and_run_record(tmp_path, capsys):
    workdir = tmp_path / "work"
    _release(workdir)
    config = _config(steps=6, checkpoint_every_steps=3, augment="rs5m", max_grad_norm=1.0, warmup_steps=2)
    seen = []

    final = train(config, workdir, on_step=seen.append)

    layout = TrainLayout(workdir.resolve(), "tiny")
    assert final == layout.final
    assert sorted(p.name for p in layout.checkpoints.iterdir()) == [
        "final.pt",
        "step-000003.pt",
        "step-000003.state.pt",
        "step-000006.pt",
        "step-000006.state.pt",
    ]
    step3 = _assert_plain_checkpoint(layout.weights(3))
    final_weights = _assert_plain_checkpoint(layout.final)
    assert all(
        torch.equal(final_weights[k], v) for k, v in _assert_plain_checkpoint(layout.weights(6)).items()
    )
    assert not all(torch.equal(final_weights[k], v) for k, v in step3.items())

    record = json.loads(layout.run_record.read_text())
    assert record["model"] == TINY and record["pretrained"] is None and record["method"] == "full"
    assert record["config"] == config.model_dump(mode="json")
    assert (record["status"], record["final"], record["world_size"]) == (
        "complete",
        "checkpoints/final.pt",
        1,
    )
    # 24 pairs, batches of 8: 3 steps per epoch, so 6 steps are 2 epochs
    assert (record["pairs"], record["steps_per_epoch"], record["total_steps"]) == (24, 3, 6)

    metrics = _metrics(layout)
    assert metrics == seen
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in metrics] == [0, 0, 0, 1, 1, 1]
    assert set(metrics[0]) == {"step", "epoch", "loss", "lr", "samples_per_s"}
    # linear warm-up over 2 steps, then cosine decay (open_clip_train's cosine_lr)
    assert [round(m["lr"] / 1e-3, 6) for m in metrics[:3]] == [0.5, 1.0, 1.0]
    assert metrics[3]["lr"] < metrics[2]["lr"] and metrics[5]["lr"] < metrics[4]["lr"]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    # the randomly initialised model learns at least the temperature: its first losses are the highest
    assert np.mean([m["loss"] for m in metrics[-2:]]) < np.mean([m["loss"] for m in metrics[:2]])

    state = torch.load(layout.state(3), weights_only=False)
    assert (state["step"], state["data_position"], len(state["rng"])) == (3, {"epoch": 1, "batch": 0}, 1)
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert "step 6/6 epoch 1 loss" in capsys.readouterr().out

    # rerunning a complete run changes nothing
    before = layout.final.stat().st_mtime_ns
    assert train(config, workdir) == layout.final
    assert layout.final.stat().st_mtime_ns == before and len(_metrics(layout)) == 6


def test_csv_dataset_trains_with_a_loading_process(tmp_path):
    csv = _csv_dataset(tmp_path / "csv")
    workdir = tmp_path / "work"
    config = _config(data=str(csv), steps=2, num_workers=1, augment="rs5m")

    train(config, workdir)

    layout = TrainLayout(workdir.resolve(), "tiny")
    assert [m["step"] for m in _metrics(layout)] == [1, 2]
    assert json.loads(layout.run_record.read_text())["data"] == str(csv)
    _assert_plain_checkpoint(layout.final)


def test_extra_caption_columns_add_pairs_for_rs3_second_captions(tmp_path):
    workdir = tmp_path / "work"
    _release(workdir, rows=24, rs3_captions=True)

    only_caption = read_pairs(_config(), workdir)
    with_ssl = read_pairs(_config(extra_caption_columns=["ssl_cap"]), workdir)

    # each part has 12 rows: 4 without ssl_cap (rows 0, 3, 6, 9) and one with only spaces (row 1)
    assert len(only_caption) == 24
    assert len(with_ssl) == 24 + 2 * 7
    assert "ssl 2" in with_ssl.texts.to_pylist()
    assert check_training_inputs(_config(extra_caption_columns=["ssl_cap"]), workdir).pairs == 38
    assert only_caption.fingerprint != with_ssl.fingerprint


def test_lora_saves_merged_plain_weights_and_resumes_exactly(tmp_path):
    workdir = tmp_path / "work"
    _release(workdir)
    config = _config(
        method="lora", lora={"r": 4, "alpha": 8, "dropout": 0.1}, steps=4, checkpoint_every_steps=2
    )

    train(config, workdir)

    layout = TrainLayout(workdir.resolve(), "tiny")
    weights = _assert_plain_checkpoint(layout.final)
    base = _plain_model().state_dict()  # the same seeded random initialisation the run started from
    assert set(weights) == set(base)
    adapted = {
        k
        for k in base
        if k.endswith(("attn.in_proj_weight", "attn.out_proj.weight", "c_fc.weight", "c_proj.weight"))
    }
    # both towers, two blocks each, four adapted weights per block
    assert len(adapted) == 16 and any(k.startswith("visual.") for k in adapted)
    assert all(not torch.equal(weights[k], base[k]) for k in adapted)
    assert all(torch.equal(weights[k], base[k]) for k in set(base) - adapted)
    assert any("lora_A" in key for key in torch.load(layout.state(2), weights_only=False)["lora_model"])

    # the files a kill right after step 2's checkpoint leaves (metrics lines past it included): the rerun
    # continues from step 2 and ends where the uninterrupted run did, dropout draws included
    for path in (layout.final, layout.weights(4), layout.state(4)):
        path.unlink()
    layout.run_record.write_text(
        json.dumps({**json.loads(layout.run_record.read_text()), "status": "running"})
    )
    train(config, workdir)
    resumed = torch.load(layout.final, weights_only=True)
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)
    assert [m["step"] for m in _metrics(layout)] == [1, 2, 3, 4]


def test_locked_tower_gets_no_lora_adapters():
    config = _config(method="lora", lock_text=True)
    register_project_configs()
    names = [name for name, _ in open_clip.create_model(TINY, device="meta").named_modules()]
    adapted = [n for n in names if re.fullmatch(lora_target_pattern(config), n)]
    assert adapted and all(n.startswith("visual.transformer.resblocks.") for n in adapted)
    everywhere = [n for n in names if re.fullmatch(lora_target_pattern(_config(method="lora")), n)]
    assert len(everywhere) == 2 * len(adapted)


def _in_thread(config: TrainConfig, workdir: Path, status: list[int]) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: status.append(launch(config, workdir, on_line=lambda line: None))
    )
    thread.start()
    return thread


def _trainer_group(workdir: Path, launcher: threading.Thread, timeout_s: float = 60) -> int:
    """The process group `launch` started the trainer of `workdir` in (the group's first process)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and launcher.is_alive():
        for child in psutil.Process().children():
            command = child.cmdline()
            if "models.train" in command and str(workdir.resolve()) in command:
                return child.pid
        time.sleep(0.02)
    raise AssertionError("launch started no trainer")


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL the trainer's process group once its first checkpoint is complete; rerunning the same launch
    resumes there and ends with the weights (and losses) of a run that was never stopped, trained alongside."""
    dataset = _release(tmp_path / "data")
    config = _config(data=str(dataset), steps=10, checkpoint_every_steps=3, augment="rs5m", num_workers=1)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference_status: list[int] = []
    reference_run = _in_thread(config, reference, reference_status)

    layout = TrainLayout(killed.resolve(), "tiny")
    status: list[int] = []
    killed_run = _in_thread(config, killed, status)
    group = _trainer_group(killed, killed_run)
    deadline = time.monotonic() + 180
    while not layout.state(3).exists():
        assert killed_run.is_alive() and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.01)
    os.killpg(group, signal.SIGKILL)
    killed_run.join()
    assert status == [-signal.SIGKILL]
    assert not layout.final.exists(), "the run ended before it was killed: the test needs more steps"
    interrupted_at = layout.latest_checkpoint()

    lines: list[str] = []
    assert launch(config, killed, on_line=lines.append) == 0

    assert f"resuming run tiny at step {interrupted_at}/10" in "\n".join(lines)
    reference_run.join()
    assert reference_status == [0]
    expected = torch.load(TrainLayout(reference.resolve(), "tiny").final, weights_only=True)
    resumed = torch.load(layout.final, weights_only=True)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    metrics = _metrics(layout)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    reference_metrics = _metrics(TrainLayout(reference.resolve(), "tiny"))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in reference_metrics]


def test_trainer_kills_its_group_when_the_launcher_is_gone(tmp_path):
    """A launcher killed with SIGKILL cannot stop its trainer: the trainer watches the launcher's pid."""
    launcher = subprocess.Popen(["sleep", "3"])
    watched = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from models.train import _watch_launcher; _watch_launcher(); time.sleep(120)",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, train_module.LAUNCHER_PID_ENV: str(launcher.pid)},
        start_new_session=True,
    )
    try:
        launcher.wait()
        assert watched.wait(timeout=60) == -signal.SIGKILL
    finally:
        if watched.poll() is None:
            os.killpg(watched.pid, signal.SIGKILL)


def test_two_processes_on_gloo_train_one_run(tmp_path):
    workdir = tmp_path / "work"
    _release(workdir)
    config = _config(workers=2, steps=4, checkpoint_every_steps=2)
    lines: list[str] = []

    assert launch(config, workdir, on_line=lines.append) == 0, "\n".join(lines[-30:])

    layout = TrainLayout(workdir.resolve(), "tiny")
    record = json.loads(layout.run_record.read_text())
    assert (record["world_size"], record["status"]) == (2, "complete")
    assert [m["step"] for m in _metrics(layout)] == [1, 2, 3, 4]
    # only rank 0 reports
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]
    assert len(torch.load(layout.state(2), weights_only=False)["rng"]) == 2  # every rank's RNG state
    _assert_plain_checkpoint(layout.final)

    # the features are gathered across both processes: the first loss is the whole batch's, as in one process
    single = tmp_path / "single"
    _release(single)
    train(config.model_copy(update={"workers": 1, "steps": 1}), single)
    assert _metrics(TrainLayout(single.resolve(), "tiny"))[0]["loss"] == pytest.approx(
        _metrics(layout)[0]["loss"], rel=1e-5
    )


@pytest.fixture
def no_process_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(train_module.subprocess, "Popen", refuse)


def _parquet_without_images(workdir: Path) -> None:
    (workdir / "dataset" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"caption": ["a"]}), workdir / "dataset" / "train" / "part-00000.parquet")


def _parquet_without_rows(workdir: Path) -> None:
    (workdir / "dataset" / "train").mkdir(parents=True)
    empty = pa.table({"image": pa.array([], pa.large_binary()), "caption": pa.array([], pa.string())})
    pq.write_table(empty, workdir / "dataset" / "train" / "part-00000.parquet")


@pytest.mark.parametrize(
    ("prepare", "overrides", "message"),
    [
        (lambda w: None, {}, r"no dataset at .*dataset \(data is null, so WORKDIR/dataset\)"),
        (lambda w: (w / "dataset").mkdir(parents=True), {}, r"no train/\*\.parquet"),
        (_parquet_without_images, {}, r"part-00000\.parquet has no image column"),
        (_parquet_without_rows, {}, r"has no rows with a non-empty caption"),
        (_release, {"caption_column": "title"}, r"has no column 'title'"),
        (_release, {"batch_size": 32}, r"batch_size 32 is larger than the 24 training pairs"),
        (_release, {"model": "ViT-B-31"}, r"model: unknown open_clip model 'ViT-B-31' \(did you mean"),
        (_release, {"pretrained": "no_such_tag"}, r"pretrained: .*neither a file nor an open_clip tag"),
        (
            _release,
            {"method": "lora", "lora": {"targets": ["q_proj"]}},
            r"lora\.targets: 'q_proj' names no module",
        ),
        (_release, {"method": "lora", "lora": {"targets": ["mlp"]}}, r"lora\.targets: 'mlp' is a Sequential"),
    ],
)
def test_bad_input_fails_before_any_process_starts(tmp_path, no_process_start, prepare, overrides, message):
    workdir = tmp_path / "work"
    workdir.mkdir()
    prepare(workdir)
    with pytest.raises(TrainingInputError, match=message) as caught:
        launch(_config(**overrides), workdir, on_line=pytest.fail)
    assert "\n" not in str(caught.value)
    assert not (workdir / "train").exists()


def test_csv_with_missing_images_and_cuda_without_gpu_are_refused(tmp_path, no_process_start):
    csv = _csv_dataset(tmp_path, rows=3, missing=1)
    with pytest.raises(TrainingInputError, match=r"1 of the 3 images .*train\.csv lists are missing"):
        launch(_config(data=str(csv), batch_size=2), tmp_path / "work")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingInputError, match="device: cuda"):
            launch(_config(data=str(csv), device="cuda"), tmp_path / "work")


def test_an_earlier_run_under_the_same_name_must_match(tmp_path, no_process_start):
    workdir = tmp_path / "work"
    _release(workdir)
    layout = TrainLayout(workdir.resolve(), "tiny")
    layout.root.mkdir(parents=True)
    pairs = read_pairs(_config(), workdir)
    earlier = {"config": _config(lr=1e-4).model_dump(mode="json"), "data_fingerprint": pairs.fingerprint}
    layout.run_record.write_text(json.dumps(earlier))

    with pytest.raises(TrainingInputError, match=r"started with other values of lr; rerun it unchanged"):
        launch(_config(), workdir)
    # speed-only fields may change between a run and its resume
    check_training_inputs(_config(lr=1e-4, num_workers=3, checkpoint_every_steps=7), workdir)
    earlier["data_fingerprint"] = "0" * 64
    layout.run_record.write_text(json.dumps(earlier))
    with pytest.raises(TrainingInputError, match=r"the training data \(.*dataset\) changed since run tiny"):
        check_training_inputs(_config(lr=1e-4), workdir)


def test_module_entry_point_reports_bad_input_in_one_line(tmp_path, capsys):
    config_file = tmp_path / "run.json"
    config_file.write_text(_config().model_dump_json())
    assert main(["--config", str(config_file), "--workdir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("models.train: no dataset at") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lr": 0}, "lr"),
        ({"run_name": "../escape"}, "run_name"),
        ({"augment": "heavy"}, "augment"),
        ({"precision": "fp16"}, "precision"),
        ({"lora": {"r": 0}, "method": "lora"}, "lora.r"),
        ({"epochs": 2}, "give exactly one of epochs or steps"),
        ({"workers": 3}, "batch_size (8) must be a multiple of workers (3)"),
        ({"lora": {"r": 4}}, "lora applies to method: lora only"),
        ({"precision": "bf16"}, "precision bf16 needs CUDA"),
        ({"lock_image": True, "lock_text": True}, "leave nothing to train"),
        ({"extra_caption_columns": ["caption"]}, "repeats caption_column"),
    ],
)
def test_config_errors_name_the_field(change, field):
    data = {**_config().model_dump(mode="json"), **change}
    with pytest.raises(ConfigError) as caught:
        parse_train_config(data, origin="train.yaml")
    assert "train.yaml" in str(caught.value) and field in str(caught.value)


def test_shipped_retrieval_recipe_parses():
    config = load_train_config(REPO_ROOT / "configs" / "train_rs5m_retrieval.yaml")
    assert (config.model, config.pretrained, config.method) == ("ViT-B-32", "laion2b_s34b_b79k", "full")
    assert (config.lr, config.weight_decay, config.batch_size, config.epochs) == (5e-6, 0.5, 600, 7)
    assert (config.warmup_steps, config.max_grad_norm, config.augment) == (100, 50, "rs5m")


def test_rs5m_train_killed_and_rerun_resumes_to_the_uninterrupted_weights(tmp_path, prefect_server):
    """The command-line contract: `rs5m train CONFIG` (through its Prefect flow), its process group killed
    after the first checkpoint, the same command again: the weights of an uninterrupted `rs5m train`."""
    import yaml

    from tests.helpers import BIN, rs5m

    configs = {}
    for name in ("killed", "reference"):
        workdir = tmp_path / name
        _release(workdir, rows=40)
        configs[name] = tmp_path / f"{name}.yaml"
        train_section = _config(steps=10, checkpoint_every_steps=3).model_dump(mode="json")
        configs[name].write_text(yaml.safe_dump({"workdir": str(workdir), "train": train_section}))
    reference = subprocess.Popen(
        [str(BIN / "rs5m"), "train", str(configs["reference"])],
        env=prefect_server.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    layout = TrainLayout((tmp_path / "killed").resolve(), "tiny")
    killed = subprocess.Popen(
        [str(BIN / "rs5m"), "train", str(configs["killed"])],
        env=prefect_server.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not layout.state(3).exists():
        assert killed.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # the CLI and its flow; the trainer stops when its launcher is gone
    killed.wait()
    assert not layout.final.exists(), "the run ended before it was killed: the test needs more steps"

    again = rs5m("train", str(configs["killed"]), env=prefect_server.env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    _, reference_stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_stderr[-3000:]
    # the terminal shows training's progress line, not Prefect's log line per step (those need --verbose)
    assert re.search(r"^train tiny: step 10 of 10, loss [\d.]+, ", reference_stderr, re.MULTILINE)
    assert not re.search(r"\bstep \d+/10 epoch ", reference_stderr), reference_stderr[-3000:]
    expected = torch.load(TrainLayout((tmp_path / "reference").resolve(), "tiny").final, weights_only=True)
    resumed = torch.load(layout.final, weights_only=True)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert [m["step"] for m in _metrics(layout)] == list(range(1, 11))
    record = json.loads(layout.run_record.read_text())
    assert record["model"] == TINY and record["status"] == "complete"


def test_rs5m_train_refuses_bad_input_in_one_line(tmp_path):
    import yaml

    from tests.helpers import rs5m

    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump({"workdir": str(tmp_path / "empty"), "train": {"run_name": "x", "steps": 2}})
    )
    result = rs5m("train", str(config), env=dict(os.environ), timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("rs5m train: ")]
    assert len(errors) == 1 and "dataset" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
