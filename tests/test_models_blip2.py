"""models/blip2.py with the shipped random-init "blip2-tiny" (offline: no weights are downloaded): loading from the
three weight sources, keyed reproducible sampling, beam search, validation and the missing-weights errors, and a
peft LoRA adapter merged on load."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TopKLogitsWarper, TopPLogitsWarper

from models.blip2 import (
    TINY,
    TINY_DIR,
    Captioner,
    CaptionerSpec,
    CaptionerWeightsUnavailableError,
    Decoding,
    KeyedSampler,
    ensure_loadable,
    folder_sha256,
    gumbel_noise,
    image_key,
    load_captioner,
    row_states,
)

CPU = torch.device("cpu")
SAMPLE = Decoding(num_candidates=3, max_length=12)
BEAM = Decoding(num_candidates=3, max_length=12, do_sample=False)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _changed(a: list[list[str]], b: list[list[str]]) -> bool:
    return any(x != y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Four small RGB pictures: three smooth random ones of different sizes and a solid colour."""
    rng = np.random.default_rng(11)
    pictures = []
    for width, height in [(64, 64), (80, 60), (48, 72)]:
        coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        pictures.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    pictures.append(Image.new("RGB", (64, 64), (30, 120, 200)))
    return pictures


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return load_captioner(CaptionerSpec(device="cpu"))


@pytest.fixture(scope="module")
def base_captions(captioner, images) -> list[list[str]]:
    return captioner.generate(images, SAMPLE, batch_size=4)


@pytest.fixture(scope="module")
def beam_captions(captioner, images) -> list[list[str]]:
    return captioner.generate(images[:2], BEAM)


@pytest.fixture(scope="module")
def checkpoint(captioner, tmp_path_factory) -> Path:
    """The tiny captioner in save_pretrained layout (model + processor), as `hf download --local-dir` leaves one."""
    folder = tmp_path_factory.mktemp("blip2-checkpoint")
    captioner.model.save_pretrained(folder)
    captioner.processor.save_pretrained(folder)
    return folder


def _lora_model(captioner: Captioner):
    """peft LoRA on the vision encoder's attention (qkv) of a copy of the tiny model, its B weights non-zero so
    that it changes the outputs (peft initialises B to zero: a fresh adapter is the identity)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(captioner.model), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"])
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return peft_model


@pytest.fixture(scope="module")
def adapter(captioner, images, tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """A saved LoRA adapter folder, and the captions of the same adapter merged in memory (by peft itself)."""
    pytest.importorskip("peft")
    peft_model = _lora_model(captioner)
    folder = tmp_path_factory.mktemp("blip2-lora") / "adapter"
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload().eval()
    return folder, Captioner(merged, captioner.processor).generate(images, SAMPLE)


# --- 1. loading and generating -----------------------------------------------------------------------------------


def test_tiny_loads_offline_and_gives_num_candidates_strings_per_image_in_input_order(
    captioner, images, base_captions
):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not captioner.model.training
    assert captioner.device == CPU
    assert len(base_captions) == len(images)
    for captions in base_captions:
        assert len(captions) == SAMPLE.num_candidates
        assert all(isinstance(caption, str) for caption in captions)
        assert all(caption == caption.strip() for caption in captions)
    # the candidates of one image are different draws, and different pictures get different captions
    assert all(len(set(captions)) > 1 for captions in base_captions)
    assert len({tuple(captions) for captions in base_captions}) == len(images)
    # input order: an image alone gives what it got at its place in the batch
    for index in (1, 3):
        assert captioner.generate([images[index]], SAMPLE) == [base_captions[index]]
    assert captioner.generate([], SAMPLE) == []


def test_encoded_bytes_and_pil_images_of_the_same_pixels_get_the_same_captions(
    captioner, images, base_captions
):
    # PNG is lossless: the decoded pixels, hence the default keys and the captions, are those of the PIL image
    mixed = [_encode(images[0], "PNG"), images[1], _encode(images[2], "PNG"), images[3]]
    assert captioner.generate(mixed, SAMPLE, batch_size=3) == base_captions
    # JPEG is lossy: its bytes agree with the PIL image decoded from them (not with the original pixels)
    jpeg = _encode(images[0], "JPEG")
    decoded = Image.open(io.BytesIO(jpeg))
    assert image_key(decoded) != image_key(images[0])
    assert captioner.generate([jpeg], SAMPLE) == captioner.generate([decoded], SAMPLE)
    # greyscale / RGBA inputs are converted to RGB first, for the pixels and for the key
    assert image_key(images[0].convert("RGBA")) == image_key(images[0])
    assert image_key(images[0]) != image_key(images[1])
    assert image_key(images[0]) != image_key(images[0].resize((32, 128)))


def test_preprocess_and_caption_pixels_are_what_generate_runs(captioner, images, base_captions):
    pixels, keys = captioner.preprocess(images)
    assert pixels.shape == (len(images), 3, 64, 64)
    assert pixels.dtype == torch.float32
    assert keys == [image_key(image) for image in images]
    assert captioner.caption_pixels(pixels, keys, SAMPLE) == base_captions
    with pytest.raises(ValueError, match="4 images but 3 keys"):
        captioner.caption_pixels(pixels, keys[:3], SAMPLE)


def test_progress_batches_and_input_errors(captioner, images):
    seen: list[int] = []
    captioner.generate([*images, images[0]], Decoding(num_candidates=1, max_length=2), 2, seen.append)
    assert seen == [2, 2, 1]
    broken = [_encode(image, "PNG") for image in images[:3]] + [b"not an image at all"]
    with pytest.raises(ValueError, match="image 3 could not be decoded"):
        captioner.generate(broken, SAMPLE, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        captioner.generate(images, SAMPLE, batch_size=0)
    with pytest.raises(ValueError, match="4 images but 2 keys"):
        captioner.generate(images, SAMPLE, keys=["a", "b"])


# --- 2. reproducibility ------------------------------------------------------------------------------------------


def test_captions_do_not_depend_on_batch_size_or_order(captioner, images, base_captions):
    assert captioner.generate(images, SAMPLE, batch_size=1) == base_captions
    assert captioner.generate(images[::-1], SAMPLE, batch_size=3) == base_captions[::-1]
    # the same picture twice in one batch (same default key): the same candidates twice
    twice = captioner.generate([images[2], images[0], images[2].copy()], SAMPLE)
    assert twice == [base_captions[2], base_captions[0], base_captions[2]]


def test_seed_and_keys_decide_the_draws(captioner, images, base_captions):
    other_seed = Decoding(num_candidates=3, max_length=12, seed=1)
    assert _changed(captioner.generate(images[:2], other_seed), base_captions[:2])

    ids = ["sample-0", "sample-1", "sample-2", "sample-3"]
    keyed = captioner.generate(images, SAMPLE, keys=ids)
    assert _changed(keyed, base_captions)
    # the same key: the same captions, in any batch, str or its bytes
    assert captioner.generate(images[::-1], SAMPLE, batch_size=3, keys=ids[::-1]) == keyed[::-1]
    assert captioner.generate(images[:2], SAMPLE, keys=[key.encode() for key in ids[:2]]) == keyed[:2]
    # keys=[pixel hashes] is the default
    assert (
        captioner.generate(images[:2], SAMPLE, keys=[image_key(i) for i in images[:2]]) == base_captions[:2]
    )
    # one picture under two ids gets independent candidates
    two_ids = captioner.generate([images[0], images[0]], SAMPLE, keys=["a", "b"])
    assert two_ids[0] != two_ids[1]


def test_a_token_depends_on_its_position_not_on_max_length(captioner, images, base_captions):
    """The noise is a function of the position: a shorter max_length gives the start of the same captions
    (compared as text, leaving out the replacement characters of a multi-byte character cut in two)."""
    short = captioner.generate(images, Decoding(num_candidates=3, max_length=4))
    long = base_captions
    assert _changed(short, long)
    for short_captions, long_captions in zip(short, long, strict=True):
        for prefix, caption in zip(short_captions, long_captions, strict=True):
            assert caption.replace("\ufffd", "").strip().startswith(prefix.replace("\ufffd", "").strip())


def test_prompt_changes_the_captions_and_is_not_returned(captioner, images, base_captions):
    prompt = "an aerial view of"
    prompted = captioner.generate(images[:2], Decoding(num_candidates=3, max_length=12, prompt=prompt))
    assert [len(captions) for captions in prompted] == [3, 3]
    assert _changed(prompted, base_captions[:2])
    assert not any(caption.startswith(prompt) for captions in prompted for caption in captions)


def test_spec_seed_changes_the_weights_and_loading_leaves_the_global_rng_alone(
    captioner, images, base_captions
):
    before = torch.random.get_rng_state()
    again = load_captioner(CaptionerSpec(device="cpu", seed=0))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert again.generate(images[:2], SAMPLE) == base_captions[:2]
    other = load_captioner(CaptionerSpec(device="cpu", seed=1))
    assert _changed(other.generate(images[:2], SAMPLE), base_captions[:2])
    assert CaptionerSpec(seed=0).identity() != CaptionerSpec(seed=1).identity()


def test_bf16_casts_all_but_the_qformer_and_still_generates(images):
    captioner = load_captioner(CaptionerSpec(device="cpu", precision="bf16"))
    dtypes = {name.split(".")[0]: p.dtype for name, p in captioner.model.named_parameters()}
    assert dtypes["qformer"] == dtypes["query_tokens"] == torch.float32
    assert (
        dtypes["vision_model"] == dtypes["language_model"] == dtypes["language_projection"] == torch.bfloat16
    )
    captions = captioner.generate(images[:2], Decoding(num_candidates=2, max_length=6))
    assert [len(c) for c in captions] == [2, 2]
    assert CaptionerSpec(precision="bf16").identity() != CaptionerSpec(precision="fp32").identity()


# --- 3./4. the keyed sampler -------------------------------------------------------------------------------------

# a small vocabulary, not sorted, so that the kept tokens are not simply the first ones
LOGITS = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.0, 1.0, -3.0, 0.5])
ROWS = 4000


def _draw(row_keys: list[int], top_k: int, top_p: float, length: int = 7) -> torch.Tensor:
    sampler = KeyedSampler(row_keys, top_k, top_p, CPU)
    scores = LOGITS.expand(len(row_keys), -1).clone()
    input_ids = torch.zeros((len(row_keys), length), dtype=torch.long)
    out = sampler(input_ids, scores)
    assert out.shape == scores.shape
    # -inf everywhere but at the drawn token, where the score is 0: greedy decoding takes the draw
    assert (torch.isfinite(out).sum(dim=-1) == 1).all()
    drawn = out.argmax(dim=-1)
    assert (out.gather(-1, drawn[:, None]) == 0).all()
    return drawn


def _hf_kept(top_k: int, top_p: float) -> set[int]:
    """The tokens HF's TopK then TopP warpers leave finite."""
    scores = LOGITS[None].clone()
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def _frequencies(drawn: torch.Tensor) -> torch.Tensor:
    return torch.bincount(drawn, minlength=len(LOGITS)).double() / len(drawn)


def test_keyed_sampler_without_cuts_draws_from_the_softmax():
    frequencies = _frequencies(_draw(list(range(ROWS)), top_k=0, top_p=1.0))
    expected = LOGITS.double().softmax(dim=-1)
    assert (frequencies - expected).abs().max() < 0.03, (frequencies, expected)
    assert (frequencies > 0).sum() >= 7  # even a 0.26 % token turns up in 4000 rows
    # keys as _row_keys makes them (64-bit hashes) work as well as consecutive integers
    hashed = np.random.default_rng(5).integers(0, 2**63, size=ROWS, dtype=np.int64).tolist()
    assert (_frequencies(_draw([key * 2 + 1 for key in hashed], 0, 1.0)) - expected).abs().max() < 0.03


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (0, 0.8), (5, 0.6), (4, 0.95), (1, 1.0), (0, 0.05)])
def test_keyed_sampler_draws_only_inside_top_k_and_the_nucleus_with_renormalised_frequencies(top_k, top_p):
    kept = _hf_kept(top_k, top_p)
    drawn = _draw(list(range(ROWS)), top_k, top_p)
    assert set(drawn.tolist()) == kept
    expected = torch.full_like(LOGITS, float("-inf"))
    expected[list(kept)] = LOGITS[list(kept)]
    assert (_frequencies(drawn) - expected.double().softmax(dim=-1)).abs().max() < 0.03


def test_keyed_sampler_rows_are_independent_of_the_batch_and_change_with_the_position():
    keys = list(range(1000, 1000 + ROWS))
    drawn = _draw(keys, 0, 1.0)
    assert torch.equal(_draw(keys[100:300], 0, 1.0), drawn[100:300])
    assert torch.equal(_draw(keys[::-1], 0, 1.0), drawn.flip(0))
    next_position = _draw(keys, 0, 1.0, length=8)
    # independent draws at two positions agree with probability sum(p^2) ~ 0.24
    agreement = (next_position == drawn).double().mean().item()
    assert abs(agreement - (LOGITS.softmax(-1) ** 2).sum().item()) < 0.03


def test_gumbel_noise_is_a_pure_function_of_state_position_and_token():
    states = row_states([0, 1, 2**40 + 7, 2**64 - 1], CPU)
    assert states.dtype == torch.int64
    assert ((states >= 0) & (states < 2**32)).all()
    tokens = torch.tensor([[0, 5, 9], [3, 3, 1000], [7, 1, 2], [0, 0, 0]])
    noise = gumbel_noise(states, 17, tokens)
    assert noise.dtype == torch.float64 and noise.shape == tokens.shape
    assert torch.isfinite(noise).all()
    assert torch.equal(gumbel_noise(states.clone(), 17, tokens.clone()), noise)
    assert torch.equal(gumbel_noise(row_states([0, 1, 2**40 + 7, 2**64 - 1], CPU), 17, tokens), noise)
    # one row's noise does not depend on the other rows
    assert torch.equal(gumbel_noise(states[2:3], 17, tokens[2:3]), noise[2:3])
    assert not torch.equal(gumbel_noise(states, 18, tokens), noise)
    assert (gumbel_noise(states, 18, tokens) != noise).all()
    # the same token id in one row at one position gets the same noise; another state, other noise
    assert noise[1, 0] == noise[1, 1] and noise[3, 0] == noise[3, 1] == noise[3, 2]
    assert noise[0, 0] != noise[3, 0]
    # standard Gumbel: mean Euler-Mascheroni 0.5772, variance pi^2 / 6
    many = gumbel_noise(row_states(list(range(50_000)), CPU), 3, torch.arange(4).expand(50_000, -1))
    assert abs(many.mean().item() - 0.5772) < 0.02
    assert abs(many.var().item() - np.pi**2 / 6) < 0.05


# --- 5. beam search ----------------------------------------------------------------------------------------------


def test_beam_search_gives_num_candidates_deterministic_captions(captioner, images, beam_captions):
    assert [len(captions) for captions in beam_captions] == [3, 3]
    assert all(len(set(captions)) == 3 for captions in beam_captions)
    assert captioner.generate(images[:2], BEAM) == beam_captions
    # seed and keys only feed the sampler
    assert captioner.generate(images[:2], BEAM, keys=["w", "x"]) == beam_captions
    seeded = Decoding(num_candidates=3, max_length=12, do_sample=False, seed=9)
    assert captioner.generate(images[:2], seeded) == beam_captions
    greedy = Decoding(num_candidates=1, max_length=12, do_sample=False)
    greedy_captions = captioner.generate(images[:2], greedy)
    assert [len(captions) for captions in greedy_captions] == [1, 1]
    assert captioner.generate(images[:2], greedy) == greedy_captions


# --- 6. validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_candidates", 0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_length", 0)],
)
def test_decoding_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Decoding(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"), [("precision", "fp8"), ("precision", "float32"), ("device", "tpu")]
)
def test_spec_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CaptionerSpec(**{field: value})


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal of device='cuda' on a CPU-only machine"
)
def test_cuda_spec_without_a_gpu_is_refused():
    with pytest.raises(RuntimeError, match="cuda"):
        ensure_loadable(CaptionerSpec(device="cuda"))


# --- 7. weights that are not there -------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline. huggingface_hub reads HF_HOME / HF_HUB_CACHE at import time into
    huggingface_hub.constants, which snapshot_download reads on each call: both are pointed at tmp_path."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_unknown_hub_names_offline_say_how_to_get_the_weights(empty_hub_cache):
    name = "rs5m-tests/no-such-blip2"
    for call in (ensure_loadable, load_captioner, lambda spec: spec.identity()):
        with pytest.raises(CaptionerWeightsUnavailableError) as raised:
            call(CaptionerSpec(model=name, device="cpu"))
        message = str(raised.value)
        assert name in message and "HF_HUB_OFFLINE is set" in message
        assert f"hf download {name}" in message and "--local-dir" in message
        assert "CaptionerSpec(model='/models/no-such-blip2')" in message

    with pytest.raises(CaptionerWeightsUnavailableError) as raised:
        ensure_loadable(CaptionerSpec(adapter="rs5m-tests/no-such-lora"))
    message = str(raised.value)
    assert "adapter 'rs5m-tests/no-such-lora'" in message and "hf download rs5m-tests/no-such-lora" in message
    assert "CaptionerSpec(adapter=" in message


def test_a_missing_local_folder_is_refused(empty_hub_cache, tmp_path):
    missing = str(tmp_path / "not-copied-yet" / "blip2-opt-2.7b")
    for call in (ensure_loadable, load_captioner, lambda spec: spec.identity()):
        with pytest.raises(CaptionerWeightsUnavailableError, match="neither an existing folder") as raised:
            call(CaptionerSpec(model=missing, device="cpu"))
        assert missing in str(raised.value) and "hf download" in str(raised.value)
    # a relative path that looks like a hub name ("owner/name") is looked up in the cache, with the hint
    with pytest.raises(CaptionerWeightsUnavailableError, match="hf download models/blip2-missing"):
        ensure_loadable(CaptionerSpec(model="models/blip2-missing"))


def test_a_hub_snapshot_in_the_cache_loads_offline_by_name(
    empty_hub_cache, checkpoint, images, base_captions
):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--rs5m-tests--blip2-tiny"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    spec = CaptionerSpec(model="rs5m-tests/blip2-tiny", device="cpu")
    ensure_loadable(spec)
    assert spec.identity() == f"hub:rs5m-tests/blip2-tiny@{commit};precision=fp32"
    assert load_captioner(spec).generate(images[:2], SAMPLE) == base_captions[:2]


# --- 8. a save_pretrained folder ---------------------------------------------------------------------------------


def test_a_save_pretrained_folder_loads_to_the_same_captions(
    checkpoint, images, base_captions, beam_captions
):
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {
        path.name for path in checkpoint.iterdir()
    }
    spec = CaptionerSpec(model=str(checkpoint), device="cpu")
    ensure_loadable(spec)
    loaded = load_captioner(spec)
    assert loaded.model.language_projection.weight.dtype == torch.float32
    assert loaded.generate(images, SAMPLE) == base_captions
    assert loaded.generate(images[:2], BEAM) == beam_captions


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        ("model.safetensors", "weights (one of model.safetensors"),
        ("config.json", "config.json"),
        ("tokenizer.json tokenizer_config.json", "the tokenizer"),
        ("processor_config.json", "the image processor"),
    ],
)
def test_a_folder_missing_a_part_names_what_is_missing(checkpoint, tmp_path, removed, named):
    folder = tmp_path / "incomplete"
    shutil.copytree(checkpoint, folder)
    for name in removed.split():
        (folder / name).unlink()
    for call in (ensure_loadable, load_captioner):
        with pytest.raises(CaptionerWeightsUnavailableError, match="lacks") as raised:
            call(CaptionerSpec(model=str(folder), device="cpu"))
        assert named in str(raised.value) and str(folder) in str(raised.value)


def test_a_cut_short_sharded_download_and_an_old_config_are_refused(captioner, checkpoint, tmp_path):
    sharded = tmp_path / "sharded"
    captioner.model.save_pretrained(sharded, max_shard_size="100KB")
    captioner.processor.save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    ensure_loadable(CaptionerSpec(model=str(sharded)))
    (sharded / shards[-1]).unlink()
    with pytest.raises(CaptionerWeightsUnavailableError, match=f"lacks 1 of the {len(shards)} weight shards"):
        ensure_loadable(CaptionerSpec(model=str(sharded)))

    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    config = json.loads((old / "config.json").read_text())
    config["image_token_index"] = None
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_token_index"):
        ensure_loadable(CaptionerSpec(model=str(old)))


def test_folder_identity_follows_the_bytes(checkpoint, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(checkpoint, folder)
    spec = CaptionerSpec(model=str(folder))
    identity = spec.identity()
    assert identity == f"folder-sha256:{folder_sha256(checkpoint)};precision=fp32"
    assert CaptionerSpec(model=str(folder), precision="bf16").identity() != identity
    # `hf download --local-dir` keeps its own metadata in .cache: not part of the weights
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download.lock").write_text("x")
    assert spec.identity() == identity

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    # folder_sha256 re-hashes a file when its size or mtime changes (documented); make sure a coarse
    # filesystem clock cannot leave the rewrite with its old mtime
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = spec.identity()
    assert changed != identity
    (folder / "extra.txt").write_text("another file")
    assert spec.identity() not in (identity, changed)

    tiny = CaptionerSpec().identity()
    assert tiny.startswith(f"{TINY}:random-init:0:config-sha256:{folder_sha256(TINY_DIR)}")


# --- 9. a peft LoRA adapter --------------------------------------------------------------------------------------


def test_a_lora_adapter_is_merged_on_load_and_changes_the_captions(adapter, images, base_captions):
    folder, merged_captions = adapter
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    spec = CaptionerSpec(adapter=str(folder), device="cpu")
    ensure_loadable(spec)
    loaded = load_captioner(spec)
    # merged: no peft wrapper or LoRA modules left, so generation runs at the base model's speed
    assert type(loaded.model).__name__ == "Blip2ForConditionalGeneration"
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    with_adapter = loaded.generate(images, SAMPLE)
    assert _changed(with_adapter, base_captions)
    assert with_adapter == merged_captions
    assert spec.identity() == f"{CaptionerSpec().identity()};adapter=folder-sha256:{folder_sha256(folder)}"


def test_a_lora_adapter_applies_over_a_folder_model(adapter, checkpoint, images):
    folder, merged_captions = adapter
    loaded = load_captioner(CaptionerSpec(model=str(checkpoint), adapter=str(folder), device="cpu"))
    assert loaded.generate(images[:2], SAMPLE) == merged_captions[:2]


def test_an_adapter_for_other_module_names_or_without_its_config_is_refused(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = adapter
    weights = load_file(folder / "adapter_model.safetensors")
    assert weights and all("vision_model.encoder.layers" in key for key in weights)

    # LAVIS's names for the same layers: nothing loads, refused rather than silently ignored
    renamed = tmp_path / "lavis-names"
    shutil.copytree(folder, renamed)
    save_file(
        {
            key.replace("vision_model.encoder.layers", "visual_encoder.blocks"): v
            for key, v in weights.items()
        },
        renamed / "adapter_model.safetensors",
    )
    with pytest.raises(ValueError, match="does not match the model's modules") as raised:
        load_captioner(CaptionerSpec(adapter=str(renamed), device="cpu"))
    assert f"{len(weights)} adapter weights missing" in str(raised.value)
    assert "visual_encoder.blocks" in str(raised.value)

    # half an adapter (one layer's weights lost) is not half-applied either
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    save_file(
        {k: v for k, v in weights.items() if "layers.1." not in k}, partial / "adapter_model.safetensors"
    )
    with pytest.raises(ValueError, match=r"2 adapter weights missing .*0 unexpected"):
        load_captioner(CaptionerSpec(adapter=str(partial), device="cpu"))

    for lost in ("adapter_config.json", "adapter_model.safetensors"):
        incomplete = tmp_path / f"without-{lost}"
        shutil.copytree(folder, incomplete)
        (incomplete / lost).unlink()
        for call in (ensure_loadable, load_captioner):
            with pytest.raises(
                CaptionerWeightsUnavailableError, match="lacks adapter_config.json or its weights"
            ):
                call(CaptionerSpec(adapter=str(incomplete), device="cpu"))
