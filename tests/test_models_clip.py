"""models/clip.py with the project's tiny random-init open_clip config (offline: no weights are downloaded)."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from models.clip import (
    ClipSpec,
    ClipWeightsUnavailableError,
    DecodeWorkerDiedError,
    UndecodableImageError,
    decode_to_uint8,
    load_clip,
    resize_crop_normalise,
)
from tests.helpers import missing_data

TINY = "rs5m-tiny-vit"
TINY_DIM = 64


def _encode_pil(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def synthetic_images() -> list[bytes]:
    """Smooth random images of several sizes and modes: RGB JPEGs, a greyscale JPEG, an RGBA PNG."""
    rng = np.random.default_rng(7)
    images = []
    for index, (width, height) in enumerate([(96, 96), (120, 80), (80, 120), (96, 96), (200, 150), (64, 64)]):
        coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
        images.append(_encode_pil(image, "JPEG"))
        if index == 1:
            images.append(_encode_pil(image.convert("L"), "JPEG"))
        if index == 4:
            images.append(_encode_pil(image.convert("RGBA"), "PNG"))
    return images


@pytest.fixture(scope="module")
def tiny() -> object:
    return load_clip(ClipSpec(TINY, seed=0, device="cpu"), num_workers=0)


@pytest.fixture(scope="module")
def rsscn7_paths(shared_data: Path) -> list[Path]:
    images = shared_data / "rsscn7" / "images"
    if not images.is_dir():
        missing_data(f"{images} is absent: the reference comparison needs real RSSCN7 JPEGs")
    # one per class, so the reference sees varied scenes
    return [sorted(folder.glob("*.jpg"))[0] for folder in sorted(images.iterdir())]


def _norms(embeddings: np.ndarray) -> np.ndarray:
    return np.linalg.norm(embeddings.astype(np.float32), axis=1)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32) * b.astype(np.float32)).sum(axis=1) / (_norms(a) * _norms(b))


def test_tiny_config_is_registered_and_encodes_to_normalised_float16(tiny, synthetic_images):
    assert TINY in open_clip.list_models()
    images = tiny.encode_images(synthetic_images, batch_size=3)
    texts = tiny.encode_texts(
        ["an aerial view of a harbour", "a satellite image of farmland", ""], batch_size=2
    )
    for embeddings, rows in ((images, len(synthetic_images)), (texts, 3)):
        assert embeddings.shape == (rows, TINY_DIM)
        assert embeddings.dtype == np.float16
        np.testing.assert_allclose(_norms(embeddings), 1.0, atol=2e-3)
    assert not np.allclose(images[0], images[1], atol=1e-2)
    assert not np.allclose(texts[0], texts[1], atol=1e-2)


def test_empty_inputs_give_empty_matrices(tiny):
    assert tiny.encode_images([], batch_size=4).shape == (0, TINY_DIM)
    assert tiny.encode_texts([]).shape == (0, TINY_DIM)


def test_same_seed_gives_identical_embeddings_and_another_seed_differs(tiny, synthetic_images):
    captions = ["an aerial view of a harbour"]
    again = load_clip(ClipSpec(TINY, seed=0, device="cpu"), num_workers=0)
    other = load_clip(ClipSpec(TINY, seed=1, device="cpu"), num_workers=0)
    np.testing.assert_array_equal(
        again.encode_images(synthetic_images, 4), tiny.encode_images(synthetic_images, 4)
    )
    np.testing.assert_array_equal(again.encode_texts(captions), tiny.encode_texts(captions))
    assert (
        np.abs(
            _row_cosines(other.encode_images(synthetic_images, 4), tiny.encode_images(synthetic_images, 4))
        ).max()
        < 0.9
    )
    assert ClipSpec(TINY, seed=0).identity() != ClipSpec(TINY, seed=1).identity()


def test_random_init_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_clip(ClipSpec(TINY, seed=5, device="cpu"), num_workers=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_decode_processes_give_the_same_embeddings_as_in_process(tiny, synthetic_images, workers):
    images = synthetic_images * 3  # 24: several batches, each split over the processes
    for batch_size in (3, 5, 64):
        in_process = tiny.encode_images(images, batch_size=batch_size, num_workers=0)
        with_workers = tiny.encode_images(images, batch_size=batch_size, num_workers=workers)
        np.testing.assert_array_equal(with_workers, in_process)


@pytest.mark.parametrize(("decoder", "workers"), [("pil", 0), ("pil", 2), ("torchvision", 0)])
def test_progress_is_called_after_every_batch_with_its_size(synthetic_images, decoder, workers):
    encoder = load_clip(ClipSpec(TINY, seed=0, device="cpu"), num_workers=workers, decoder=decoder)
    images: list[int] = []
    encoder.encode_images(synthetic_images, batch_size=3, progress=images.append)
    assert images == [3, 3, 2]
    texts: list[int] = []
    encoder.encode_texts(["a", "b", "c"], batch_size=2, progress=texts.append)
    assert texts == [2, 1]


def run_bounded(call, timeout_s: float):
    """call() in a daemon thread; fails with every thread's stack if it has not returned after timeout_s (a hang
    must fail the test, not CI). Returns its result or raises its exception."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = "".join(
            f"--- thread {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
            for ident, frame in sys._current_frames().items()
        )
        pytest.fail(f"still running after {timeout_s} s; every thread's stack:\n{stacks}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True


def wait_until_gone(pids: list[int], timeout_s: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [pid for pid in pids if process_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_a_killed_decode_process_is_a_clear_error_not_a_hang(synthetic_images):
    encoder = load_clip(ClipSpec(TINY, seed=0, device="cpu"), num_workers=2)
    images = synthetic_images * 12  # 96 images, batches of 4: far more pieces than are ever in flight
    expected = encoder.encode_images(images, batch_size=4, num_workers=0)
    encoder.encode_images(images[:8], batch_size=4)  # starts the decode processes
    started = encoder.decode_process_ids()
    victim = started[0]
    batches: list[int] = []

    def kill_after_the_first_batch(done: int) -> None:
        if not batches:
            os.kill(victim, signal.SIGKILL)
            wait_until_gone([victim])
        batches.append(done)

    with pytest.raises(DecodeWorkerDiedError) as caught:
        run_bounded(
            lambda: encoder.encode_images(images, 4, progress=kill_after_the_first_batch), timeout_s=60
        )
    message = str(caught.value)
    assert isinstance(caught.value, BrokenProcessPool)
    assert f"pid {victim} killed by SIGKILL" in message
    assert "decode process of the CLIP encoder died while decoding images" in message
    assert len(batches) < 96 // 4
    assert wait_until_gone(started) == []  # the broken pool stopped the others too
    # the next call starts new processes and is complete and right
    np.testing.assert_array_equal(run_bounded(lambda: encoder.encode_images(images, 4), 60), expected)
    assert set(encoder.decode_process_ids()).isdisjoint(started)


class Stalled(RuntimeError):
    """Raised into a thread from outside, as tasks/watchdog.py raises ShardStalled into a stalled shard."""


def test_a_caller_waiting_on_stopped_decode_processes_takes_an_asynchronous_exception(synthetic_images):
    encoder = load_clip(ClipSpec(TINY, seed=0, device="cpu"), num_workers=2)
    expected = encoder.encode_images(synthetic_images, batch_size=4)  # starts the decode processes
    pids = encoder.decode_process_ids()
    outcome: dict[str, object] = {}
    waiting = threading.Event()

    def encode() -> None:
        waiting.set()
        try:
            outcome["result"] = encoder.encode_images(synthetic_images, batch_size=4)
        except Stalled as error:
            outcome["error"] = error

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # a decode process that never answers
    try:
        thread = threading.Thread(target=encode, daemon=True)
        thread.start()
        waiting.wait()
        time.sleep(0.5)
        assert thread.is_alive()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Stalled))
        thread.join(10)
        assert not thread.is_alive(), "the waiting caller did not take the exception"
        assert isinstance(outcome.get("error"), Stalled)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # the processes go on; the pool still serves later calls
    np.testing.assert_array_equal(
        run_bounded(lambda: encoder.encode_images(synthetic_images, 4), 60), expected
    )


def test_decode_processes_stop_on_close_and_when_the_encoder_is_dropped(synthetic_images):
    encoder = load_clip(ClipSpec(TINY, seed=0, device="cpu"), num_workers=2)
    encoder.encode_images(synthetic_images, batch_size=4)
    first = encoder.decode_process_ids()
    assert first
    encoder.close()
    assert wait_until_gone(first) == []
    assert encoder.decode_process_ids() == []
    encoder.encode_images(synthetic_images, batch_size=4)  # usable again after close()
    second = encoder.decode_process_ids()
    assert second and set(second).isdisjoint(first)
    del encoder
    gc.collect()
    assert wait_until_gone(second) == []


def stuck_decode_process_at_exit() -> None:
    """The child of test_exit_does_not_wait_for_ever_on_a_stuck_decode_process."""
    encoder = load_clip(ClipSpec(TINY, seed=0, device="cpu"), num_workers=1)
    images = [_encode_pil(Image.new("RGB", (64, 64), "green"), "JPEG")] * 8
    encoder.encode_images(images, batch_size=4)
    (pid,) = encoder.decode_process_ids()
    os.kill(pid, signal.SIGSTOP)  # stuck in a decoder, as far as anyone can tell
    threading.Thread(target=encoder.encode_images, args=(images, 4), daemon=True).start()
    time.sleep(1)
    print("exiting with a decode process stuck in a piece", flush=True)


def test_exit_does_not_wait_for_ever_on_a_stuck_decode_process(tmp_path):
    from tests.test_embed import live_group_members

    log = tmp_path / "child.log"
    code = "from tests.test_models_clip import stuck_decode_process_at_exit as f; f()"
    with log.open("w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=Path(__file__).resolve().parents[1],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = child.wait(timeout=180)
        except subprocess.TimeoutExpired:
            returncode = None
    output = log.read_text()
    deadline = time.monotonic() + 15
    while (leftovers := live_group_members(child.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if leftovers or returncode is None:
        os.killpg(child.pid, signal.SIGKILL)
    assert returncode == 0, f"exit code {returncode} (None: still running after 180 s):\n{output[-20000:]}"
    assert "exiting with a decode process stuck" in output
    assert not leftovers, f"processes still running 15 s after the child exited: {leftovers}"


def test_matches_a_bare_open_clip_reference_loop(tiny, rsscn7_paths):
    with torch.no_grad():
        pixels = torch.stack([tiny.preprocess(Image.open(path)) for path in rsscn7_paths])
        reference = torch.nn.functional.normalize(tiny.model.encode_image(pixels), dim=-1).numpy()
    images = [path.read_bytes() for path in rsscn7_paths]
    embeddings = tiny.encode_images(images, batch_size=3)
    # float16 output: about 3 significant digits
    np.testing.assert_allclose(embeddings.astype(np.float32), reference, atol=2e-3)


def test_tensor_preprocess_reproduces_open_clip_pixels(tiny, synthetic_images):
    """The GPU path's decode + resize/crop/normalise, run on CPU (libjpeg instead of nvjpeg)."""
    decoded, undecodable = decode_to_uint8(synthetic_images, torch.device("cpu"))
    assert undecodable == []
    pixels = resize_crop_normalise(decoded, tiny.preprocess_cfg, torch.float32)
    reference = torch.stack([tiny.preprocess(Image.open(io.BytesIO(data))) for data in synthetic_images])
    assert pixels.shape == reference.shape == (len(synthetic_images), 3, 64, 64)
    difference = (pixels - reference).abs()
    # tensor bicubic vs PIL bicubic: rounding differences of a grey level (about 0.015 after normalising)
    assert difference.max() < 0.05
    assert difference.mean() < 1e-3


def test_tensor_decoder_matches_the_pil_path(tiny, synthetic_images):
    tensor = load_clip(ClipSpec(TINY, seed=0, device="cpu"), decoder="torchvision")
    assert tensor.decoder == "torchvision"
    # random-init embeddings of different images already agree to ~0.98: only a much tighter bound tests anything
    cosines = _row_cosines(tensor.encode_images(synthetic_images, 4), tiny.encode_images(synthetic_images, 4))
    assert cosines.min() > 0.9995


@pytest.mark.parametrize(("decoder", "workers"), [("pil", 0), ("pil", 2), ("torchvision", 0)])
def test_undecodable_images_raise_naming_every_position(decoder, workers, synthetic_images):
    encoder = load_clip(ClipSpec(TINY, seed=0, device="cpu"), num_workers=workers, decoder=decoder)
    truncated_jpeg = synthetic_images[0][:100]
    images = [synthetic_images[0], b"<html>not an image</html>", synthetic_images[1], truncated_jpeg]
    with pytest.raises(UndecodableImageError, match="2 of 4 images") as caught:
        encoder.encode_images(images, batch_size=2)
    assert caught.value.indices == [1, 3]


def test_bf16_weights_on_cpu_stay_close_to_fp32(tiny, synthetic_images):
    bf16 = load_clip(ClipSpec(TINY, seed=0, precision="bf16", device="cpu"), num_workers=0)
    assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16
    embeddings = bf16.encode_images(synthetic_images, 4)
    assert embeddings.dtype == np.float16
    assert _row_cosines(embeddings, tiny.encode_images(synthetic_images, 4)).min() > 0.999


def test_hub_tag_offline_fails_with_download_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ClipSpec("ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu")
    assert spec.identity() == "ViT-B-32:laion2b_s34b_b79k"
    with pytest.raises(ClipWeightsUnavailableError) as caught:
        load_clip(spec, cache_dir=str(tmp_path))
    message = str(caught.value)
    assert "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert "clip.pretrained: /path/to/checkpoint" in message


def test_unknown_tag_or_missing_file_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        ClipSpec(TINY, pretrained=str(tmp_path / "missing.pt")).identity()
    with pytest.raises(ValueError, match="unknown open_clip model") as caught:
        ClipSpec("ViT-B-32x", seed=0).identity()
    assert "did you mean ViT-B-32" in str(caught.value) and len(str(caught.value)) < 300


def test_local_checkpoint_round_trips_and_is_identified_by_its_sha256(tiny, synthetic_images, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), checkpoint)
    spec = ClipSpec(TINY, pretrained=str(checkpoint), seed=99, device="cpu")
    assert spec.identity() == f"{TINY}:sha256:{hashlib.sha256(checkpoint.read_bytes()).hexdigest()}"
    loaded = load_clip(spec, num_workers=0)
    np.testing.assert_array_equal(
        loaded.encode_images(synthetic_images, 4), tiny.encode_images(synthetic_images, 4)
    )
    np.testing.assert_array_equal(loaded.encode_texts(["a river"]), tiny.encode_texts(["a river"]))


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: nvjpeg batch decode and bf16 weights on the GPU (the tensor path's code is tested on CPU above)",
)
def test_cuda_nvjpeg_path_matches_the_cpu_pil_path(tiny, synthetic_images):
    gpu = load_clip(ClipSpec(TINY, seed=0, precision="bf16", device="cuda"))
    assert gpu.decoder == "torchvision"
    assert next(gpu.model.parameters()).is_cuda
    embeddings = gpu.encode_images(synthetic_images, 4)
    assert embeddings.dtype == np.float16
    assert _row_cosines(embeddings, tiny.encode_images(synthetic_images, 4)).min() > 0.98


def test_a_dead_decode_process_the_pool_never_noticed_still_ends_the_wait() -> None:
    """A process killed while writing its result leaves concurrent.futures' manager thread waiting for the rest
    of the message, and the future pending, for ever (seen once in CI); the wait must end anyway."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from models.clip import _result

    class DeadPool:
        def has_dead_process(self) -> bool:
            return True

    started = time.monotonic()
    with pytest.raises(BrokenProcessPool, match="died without the pool noticing"):
        run_bounded(lambda: _result(Future(), DeadPool()), timeout_s=30)
    assert time.monotonic() - started < 10
