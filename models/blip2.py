"""BLIP-2 captions for label-only remote-sensing images (RS3 part 2): loading and batched generation.

RS5M captioned the RS3 images with BLIP-2 (Salesforce/blip2-opt-2.7b and -6.7b, optionally with a LoRA adapter on
the vision encoder's attention), several sampled candidates per image, later ranked with CLIP (not here).

`load_captioner(CaptionerSpec(...))` builds a `Blip2ForConditionalGeneration` and its `Blip2Processor` from one
of three weight sources, through the same code after the model object exists:
  - "blip2-tiny": the shipped configuration in models/configs/blip2-tiny/ (a ~120k-parameter BLIP-2 with an OPT
    language model and its own byte-level BPE tokenizer trained on RSICD/RSITMD/Sydney captions), randomly
    initialised from `seed`: gibberish captions, offline, for tests and benchmarks;
  - a local folder in `save_pretrained` layout (model + processor files), e.g. `hf download ... --local-dir`;
  - a hub name (Salesforce/blip2-opt-2.7b), read from the Hugging Face cache (downloaded by `ensure_loadable`
    unless HF_HUB_OFFLINE is set; `CaptionerWeightsUnavailableError` otherwise).
An `adapter` (a peft LoRA folder or hub name, saved against transformers' BLIP-2 module names) is merged into
the weights on load, so generation runs at the base model's speed.

Sampling is reproducible per image, not per call. HF's sampler draws from torch's global generator row after
row, so a caption would depend on the batch it was generated in. Here the top-k / top-p distribution is the same
(top-k, then the smallest most-probable head reaching top_p, as HF's TopK and TopP warpers), but the token is
drawn with the Gumbel-max trick from noise that is a pure function of (decoding seed, image key, candidate
index, token position, token id), computed by an integer hash on the model's device. So candidate j of an image
depends only on that image, its key and the seed: not on its position, the batch size or the other images.
The image key is, by default, the sha256 of its RGB pixels (bytes and a PIL image of the same picture agree);
callers may pass their own (sample ids). What stays device-dependent is the logits' arithmetic: see
`Captioner.generate`.

No prefect (nor open_clip) import: this module runs from a source tree on GPU machines with torch and
transformers only; peft is imported only when an adapter is given.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from PIL import Image
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from models.placement import TORCH_DTYPES, DeviceChoice, Precision, check_placement, resolve_device

TINY = "blip2-tiny"
TINY_DIR = Path(__file__).resolve().parent / "configs" / TINY

Progress = Callable[[int], None]
ImageInput = Image.Image | bytes

# what a checkpoint folder needs; the .bin duplicates that many hub repos also hold are never downloaded
_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PIN = "peft==0.21.2"
# names the noise scheme of KeyedSampler: a change to it changes every sampled caption, so a stage fingerprint
# that caches captions should include it
SAMPLER_VERSION = "rs5m-blip2-gumbel-lowbias32-v1"


class CaptionerWeightsUnavailableError(RuntimeError):
    """Weights, processor files or an adapter that load_captioner needs are missing, or not cached offline."""


@dataclass(frozen=True)
class CaptionerSpec:
    """Which BLIP-2 to load and how to run it.

    model: "blip2-tiny" (shipped config, random weights from `seed`), a local folder in save_pretrained layout,
    or a hub name (read from the Hugging Face cache). An existing folder wins over a hub name of the same text.
    adapter: a peft LoRA adapter folder or hub name, merged into the weights on load (merge_and_unload).
    precision: bf16/fp16 cast the weights (the Q-Former and query tokens stay fp32, as transformers keeps them).
    seed: random initialisation of "blip2-tiny" only; real weights ignore it.
    """

    model: str = TINY
    adapter: str | None = None
    precision: Precision = "fp32"
    device: DeviceChoice = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_placement(self.precision, self.device)

    def identity(self) -> str:
        """What decides the captions apart from the decoding options, for stage fingerprints: the weights
        (tiny: seed and the shipped files' hash; a folder: its content hash; a hub model: name and cached
        commit), the adapter's (same rules) and the precision (bf16 weights sample other captions). Not the
        device: a run resumed on another machine keeps its fingerprint, though its logits round differently.
        Raises CaptionerWeightsUnavailableError when a folder or hub snapshot is not there to identify."""
        if self.model == TINY:
            weights = f"{TINY}:random-init:{self.seed}:config-sha256:{folder_sha256(TINY_DIR)}"
        else:
            weights = _source_identity(self.model, "model")
        parts = [weights, f"precision={self.precision}"]
        if self.adapter is not None:
            parts.append(f"adapter={_source_identity(self.adapter, 'adapter')}")
        return ";".join(parts)

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


@dataclass(frozen=True)
class Decoding:
    """How captions are generated; the defaults are RS5M's (sampling, top-k 50, top-p 0.95, 50 tokens, no
    prompt).

    num_candidates: captions per image. With do_sample=False they are the best beams of a beam search with
    num_candidates beams (deterministic; `seed` unused).
    top_k: 0 disables the top-k cut. top_p: 1.0 disables the nucleus cut.
    max_length: generated tokens at most (the prompt and image tokens not counted, as LAVIS's BLIP-2 counted
    them); at least one token is generated (LAVIS's min_length=1), so EOS never comes first.
    seed: with the image key, decides every sampled token (see the module docstring).
    prompt: text the language model continues after the image tokens (BLIP-2's "Question: ... Answer:" style);
    None for plain captions. The returned captions do not repeat it.
    """

    num_candidates: int = 5
    do_sample: bool = True
    top_k: int = 50
    top_p: float = 0.95
    max_length: int = 50
    seed: int = 0
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates must be at least 1, got {self.num_candidates}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (no cut) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")


@functools.cache
def _folder_sha256(folder: str, listing: tuple[tuple[str, int, int], ...]) -> str:
    # the listing (relative path, size, mtime) is part of the cache key: a rewritten file is hashed again
    digest = hashlib.sha256()
    for relative, _, _ in listing:
        file_digest = hashlib.sha256()
        with open(os.path.join(folder, relative), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                file_digest.update(block)
        digest.update(f"{relative}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """Content hash of every file under `folder` (names and bytes), hidden files and folders left out (the
    `.cache` that `hf download --local-dir` writes changes without the weights changing). Hashed once per
    process while no file changes size or mtime: a 15 GB checkpoint takes tens of seconds the first time."""
    root = Path(folder).resolve()
    listing = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            stat = path.stat()
            listing.append((relative.as_posix(), stat.st_size, stat.st_mtime_ns))
    return _folder_sha256(str(root), tuple(listing))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _download_hint(name: str, what: Literal["model", "adapter"]) -> str:
    include = " --include '*.json' '*.safetensors' '*.txt' '*.model'" if what == "model" else ""
    field = "model" if what == "model" else "adapter"
    return (
        f"On a machine with internet run `hf download {name}{include}` (huggingface_hub < 1.0: "
        f"`huggingface-cli download {name}{include}`) and copy its Hugging Face cache (HF_HOME, default "
        f"~/.cache/huggingface) here, or download to a folder (`hf download {name}{include} --local-dir "
        f"/models/{name.split('/')[-1]}`), copy that and pass it: CaptionerSpec({field}='/models/{name.split('/')[-1]}')."
    )


def _cached_snapshot(name: str, what: Literal["model", "adapter"]) -> Path:
    """The cached snapshot folder of hub repo `name` (never downloads)."""
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except HFValidationError as err:
        raise CaptionerWeightsUnavailableError(
            f"{what} {name!r} is neither an existing folder nor a Hugging Face hub name ({err}). "
            f"{_download_hint(name, what)}"
        ) from err
    except LocalEntryNotFoundError as err:
        why = (
            "HF_HUB_OFFLINE is set"
            if _offline()
            else "it has not been downloaded (ensure_loadable downloads it)"
        )
        raise CaptionerWeightsUnavailableError(
            f"{what} {name!r} is not a folder, and not in the Hugging Face cache and {why}. "
            f"{_download_hint(name, what)}"
        ) from err


def _source_identity(name: str, what: Literal["model", "adapter"]) -> str:
    if os.path.isdir(os.path.expanduser(name)):
        return f"folder-sha256:{folder_sha256(os.path.expanduser(name))}"
    # a cached snapshot folder is named by its commit: the weights it holds cannot change under that name
    return f"hub:{name}@{_cached_snapshot(name, what).name}"


def _resolve(name: str, what: Literal["model", "adapter"], *, download: bool) -> Path:
    """A folder, or the hub snapshot of `name`; with download=True, fetched first unless HF_HUB_OFFLINE is set
    (a failed download falls back to the cache, as huggingface_hub does)."""
    if os.path.isdir(os.path.expanduser(name)):
        return Path(name).expanduser()
    if download and not _offline():
        patterns = _CHECKPOINT_PATTERNS if what == "model" else None
        try:
            return Path(snapshot_download(name, allow_patterns=patterns))
        except HFValidationError:
            pass  # _cached_snapshot says it is no hub name
        except OSError as err:
            raise CaptionerWeightsUnavailableError(
                f"{what} {name!r} is not a folder, not in the Hugging Face cache, and downloading it failed "
                f"(no network?): {err}. {_download_hint(name, what)}"
            ) from err
    return _cached_snapshot(name, what)


def _check_checkpoint(folder: Path, name: str, *, weights: bool) -> None:
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if weights and not any((folder / f).is_file() for f in _WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(_WEIGHT_FILES)})")
    if not any((folder / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        missing.append("the image processor (preprocessor_config.json or processor_config.json)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        missing.append("the tokenizer (tokenizer.json / tokenizer_config.json)")
    if missing:
        raise CaptionerWeightsUnavailableError(
            f"model {name!r} ({folder}) lacks {'; '.join(missing)}: a BLIP-2 checkpoint folder holds what "
            "Blip2ForConditionalGeneration.save_pretrained and Blip2Processor.save_pretrained write"
        )
    config = Blip2Config.from_pretrained(folder)
    if not config.use_decoder_only_language_model:
        raise ValueError(
            f"model {name!r} has a {config.text_config.model_type} (encoder-decoder) language model; only "
            "decoder-only BLIP-2 checkpoints (OPT, as RS5M used) are supported"
        )
    if config.image_token_index is None:
        raise ValueError(
            f"model {name!r} has no image_token_index in its config.json, which transformers 5 needs to place the "
            "image tokens; the hub's Salesforce/blip2-opt-* repos have it since 2024: download a newer revision"
        )
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if weights and index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            absent = [shard for shard in shards if not (folder / shard).is_file()]
            if absent:
                raise CaptionerWeightsUnavailableError(
                    f"model {name!r} ({folder}) lacks {len(absent)} of the {len(shards)} weight shards its "
                    f"{index_name} lists (first: {absent[0]}); the download was cut short: run it again"
                )


def ensure_loadable(spec: CaptionerSpec) -> None:
    """Raises, with what to do, unless load_captioner(spec) can build the model: the folder or hub snapshot
    holds config, weights, processor and tokenizer, the config is a decoder-only BLIP-2 that transformers 5 can
    place image tokens for, the adapter has its config and weights, and the device exists. Hub repos not in the
    cache are downloaded now unless HF_HUB_OFFLINE is set. Cheap otherwise, so a pipeline checks it before any
    stage runs."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "captioner device is 'cuda' but torch.cuda.is_available() is False on this machine"
        )
    if spec.model == TINY:
        _check_checkpoint(TINY_DIR, TINY, weights=False)
    else:
        _check_checkpoint(_resolve(spec.model, "model", download=True), spec.model, weights=True)
    if spec.adapter is not None:
        adapter = _resolve(spec.adapter, "adapter", download=True)
        if not (adapter / "adapter_config.json").is_file() or not any(
            (adapter / f).is_file() for f in _ADAPTER_WEIGHT_FILES
        ):
            raise CaptionerWeightsUnavailableError(
                f"adapter {spec.adapter!r} ({adapter}) lacks adapter_config.json or its weights "
                f"({' / '.join(_ADAPTER_WEIGHT_FILES)}): a peft adapter folder holds what PeftModel.save_pretrained writes"
            )


def _cast(model: Blip2ForConditionalGeneration, dtype: torch.dtype) -> None:
    """Casts the weights to `dtype` except the modules transformers keeps in fp32 (BLIP-2: the Q-Former and the
    query tokens), as from_pretrained(dtype=...) loads them, so the tiny model runs like a real checkpoint."""
    model.to(dtype)
    keep = model._keep_in_fp32_modules or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and any(part in keep for part in name.split(".")):
            tensor.data = tensor.data.float()


def _merge_adapter(
    model: Blip2ForConditionalGeneration, folder: Path, name: str
) -> Blip2ForConditionalGeneration:
    """Loads a peft adapter over `model` and merges it into the weights. Strict, unlike PeftModel.from_pretrained
    (which only warns): an adapter whose keys do not all load (trained on other module names, e.g. LAVIS's
    `visual_encoder.blocks.N.attn.qkv`) is refused rather than silently half-applied."""
    try:
        from peft import PeftConfig, PeftModel
    except ImportError as err:
        raise ImportError(f"CaptionerSpec(adapter=...) needs peft: pip install {PEFT_PIN}") from err
    config = PeftConfig.from_pretrained(folder)
    config.inference_mode = True
    peft_model = PeftModel(model, config, adapter_name="rs5m")
    result = peft_model.load_adapter(folder, adapter_name="rs5m")
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"adapter {name!r} does not match the model's modules: {len(result.missing_keys)} adapter weights "
            f"missing (first: {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(first: {result.unexpected_keys[:3]}); it must be saved by peft against transformers' "
            "Blip2ForConditionalGeneration"
        )
    return peft_model.merge_and_unload()


def load_captioner(spec: CaptionerSpec) -> Captioner:
    """Builds the model of `spec` in eval mode on its device, weights in spec.precision (no autocast), the adapter
    merged. "blip2-tiny" is initialised from the shipped config under torch.manual_seed(spec.seed) (the global
    generator is restored afterwards); other models load with from_pretrained. Everything after that is shared."""
    ensure_loadable(spec)
    dtype = TORCH_DTYPES[spec.precision]
    if spec.model == TINY:
        folder = TINY_DIR
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = Blip2ForConditionalGeneration._from_config(Blip2Config.from_pretrained(folder))
        _cast(model, dtype)
    else:
        folder = _resolve(spec.model, "model", download=False)
        model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    if spec.adapter is not None:
        model = _merge_adapter(model, _resolve(spec.adapter, "adapter", download=False), spec.adapter)
    model.to(spec.resolved_device()).eval()
    return Captioner(model, Blip2Processor.from_pretrained(folder))


def image_key(image: Image.Image) -> bytes:
    """The default sampling key of an image: sha256 of its size and RGB pixels."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.digest()


def _open(image: ImageInput, position: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        opened = Image.open(io.BytesIO(image))
        opened.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"image {position} could not be decoded ({err}); the validate stage drops such images"
        ) from err
    return opened


# --- the keyed sampler -------------------------------------------------------------------------------------------
# A 32-bit integer hash evaluated with int64 tensor ops on any device: values stay below 2**32 and products below
# 2**49, so nothing overflows and CPU and GPU compute the same bits.
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 finaliser: a bijection of 32-bit values with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(keys: Sequence[bytes], decoding: Decoding) -> list[int]:
    """One 64-bit sampling key per generated row (image i, candidate j), rows in generation order. The prompt is
    part of it: two prompts on one image would otherwise share the noise at equal positions."""
    rows = []
    for key in keys:
        for candidate in range(decoding.num_candidates):
            salt = f"{SAMPLER_VERSION}:{decoding.seed}:{candidate}:{decoding.prompt!r}:".encode()
            rows.append(int.from_bytes(hashlib.blake2b(salt + key, digest_size=8).digest(), "big"))
    return rows


def row_states(row_keys: Sequence[int], device: torch.device) -> torch.Tensor:
    """64-bit row keys -> (rows,) int64 32-bit hash states on `device`, what gumbel_noise starts from."""
    high = torch.tensor([key >> 32 for key in row_keys], dtype=torch.int64, device=device)
    low = torch.tensor([key & _MASK32 for key in row_keys], dtype=torch.int64, device=device)
    return _mix32(_mix32(high) ^ low)


def gumbel_noise(states: torch.Tensor, position: int, tokens: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float64) for `tokens` (rows, k) at sequence `position`, a pure function of (row
    state, position, token id): the same bits on every device and in every batch."""
    at_position = _mix32(states ^ (position & _MASK32))
    bits = _mix32(_mix32(at_position[:, None] ^ tokens) ^ 0x9E3779B9)
    uniform = (bits.to(torch.float64) + 0.5) / 2.0**32
    return -torch.log(-torch.log(uniform))


class KeyedSampler(LogitsProcessor):
    """Samples the next token of each row from the top-k / top-p distribution of its scores with the Gumbel-max
    trick, and returns scores that are -inf except at the drawn token, so greedy decoding takes it.

    argmax(logit + Gumbel) is an exact draw from softmax(logits) restricted to the kept tokens. Top-k keeps the k
    highest scores (ties at the k-th value broken by torch.topk, where HF's TopKLogitsWarper keeps them all);
    top-p then keeps the smallest most-probable head whose probability reaches top_p, as TopPLogitsWarper does.
    Only the k candidates get noise, so a step costs O(rows * k) beyond the top-k itself.
    """

    def __init__(self, row_keys: Sequence[int], top_k: int, top_p: float, device: torch.device) -> None:
        self.states = row_states(row_keys, device)
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocabulary = scores.shape[-1]
        k = vocabulary if self.top_k == 0 else min(self.top_k, vocabulary)
        values, tokens = scores.float().topk(k, dim=-1)  # sorted, most probable first
        if self.top_p < 1.0:
            probabilities = values.softmax(dim=-1)
            mass_before = probabilities.cumsum(dim=-1) - probabilities
            values = values.masked_fill(mass_before >= self.top_p, float("-inf"))
        noise = gumbel_noise(self.states, input_ids.shape[1], tokens)
        drawn = tokens.gather(-1, (values.double() + noise).argmax(dim=-1, keepdim=True))
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


class Captioner:
    """A loaded BLIP-2 with its processor; turns images into candidate captions.

    Built by load_captioner; construct it directly only around a model you already hold (an in-memory merge).
    Not thread-safe (one generate at a time per model)."""

    def __init__(self, model: Blip2ForConditionalGeneration, processor: Blip2Processor) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = model.device
        self.dtype = model.language_projection.weight.dtype
        self.image_token_index: int = model.config.image_token_index
        self.num_query_tokens: int = model.config.num_query_tokens
        language_config = model.language_model.generation_config
        text_config = model.config.text_config
        self._special_ids = {
            name: getattr(text_config, name)
            if getattr(language_config, name, None) is None
            else getattr(language_config, name)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id")
        }

    def preprocess(
        self, images: Sequence[ImageInput], first_position: int = 0
    ) -> tuple[torch.Tensor, list[bytes]]:
        """Images -> (pixel_values (n, 3, H, W) float32 from the checkpoint's own processor, default keys).
        first_position only numbers the images in a decode error."""
        opened = [_open(image, first_position + i).convert("RGB") for i, image in enumerate(images)]
        pixels = self.processor.image_processor(opened, return_tensors="pt")["pixel_values"]
        return pixels, [image_key(image) for image in opened]

    def _prompt_ids(self, prompt: str | None) -> list[int]:
        # as Blip2ForConditionalGeneration.generate builds them without a prompt, and Blip2Processor with one
        image_tokens = [self.image_token_index] * self.num_query_tokens
        if prompt is None:
            return [*image_tokens, self._special_ids["bos_token_id"]]
        return [*image_tokens, *self.tokenizer(prompt).input_ids]

    @torch.inference_mode()
    def caption_pixels(
        self, pixel_values: torch.Tensor, keys: Sequence[bytes], decoding: Decoding
    ) -> list[list[str]]:
        """One batch of preprocessed images (and their sampling keys) -> decoding.num_candidates captions each.

        The image features are computed once per image and the prompt embeddings expanded to every candidate
        row, as Blip2ForConditionalGeneration.generate does with num_return_sequences."""
        if len(keys) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images but {len(keys)} keys")
        count, candidates = len(pixel_values), decoding.num_candidates
        features = self.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype)
        ).pooler_output
        prompt = torch.tensor([self._prompt_ids(decoding.prompt)], device=self.device).expand(count, -1)
        embeds = self.model.get_input_embeddings()(prompt)
        image_slots = (prompt == self.image_token_index).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_slots, features.to(embeds.dtype))
        config = GenerationConfig(
            max_new_tokens=decoding.max_length, min_new_tokens=1, do_sample=False, **self._special_ids
        )
        processors = LogitsProcessorList()
        if decoding.do_sample:
            prompt = prompt.repeat_interleave(candidates, dim=0)
            embeds = embeds.repeat_interleave(candidates, dim=0)
            rows = _row_keys(keys, decoding)
            processors.append(KeyedSampler(rows, decoding.top_k, decoding.top_p, self.device))
        else:
            config.num_beams = config.num_return_sequences = candidates
        sequences = self.model.language_model.generate(
            input_ids=prompt,
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(prompt),
            generation_config=config,
            logits_processor=processors,
        )
        texts = self.tokenizer.batch_decode(sequences[:, prompt.shape[1] :], skip_special_tokens=True)
        return [[text.strip() for text in texts[i * candidates : (i + 1) * candidates]] for i in range(count)]

    def generate(
        self,
        images: Sequence[ImageInput],
        decoding: Decoding,
        batch_size: int = 16,
        progress: Progress | None = None,
        *,
        keys: Sequence[str | bytes] | None = None,
    ) -> list[list[str]]:
        """Images (PIL or encoded bytes) -> per image, in input order, decoding.num_candidates captions: the
        decoded new tokens, stripped, case as the model wrote them (BLIP-2 OPT writes lower case). Empty strings
        are kept (a caption of only whitespace or special tokens), so every image has exactly num_candidates;
        rankers drop them.

        Reproducibility (sampling): candidate j of an image is a function of the model's logits for that image,
        its key and decoding.seed only. The key is `keys[i]` when given (e.g. the sample id: then the same
        picture under two ids gets independent candidates) or else the hash of its RGB pixels (the same picture
        gets the same candidates wherever it appears). On CPU, the same images, spec, seed and keys give the
        same captions, whatever the batch size or order (tested). On a GPU the noise is bit-identical too, but
        logits may differ in their last bits with the batch size (other GEMM kernels) and with the GPU model or
        library versions; a token flips only where two perturbed scores tie within that rounding (rare in fp32,
        less rare in bf16/fp16), and the rest of that caption then differs. Same GPU, versions, precision and
        batch size: same captions.

        progress: called after each batch with the number of images it held (a heartbeat for a watchdog).
        """
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        captions: list[list[str]] = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixels, pixel_keys = self.preprocess(batch, start)
            if keys is not None:
                pixel_keys = [_key_bytes(key) for key in keys[start : start + batch_size]]
            captions.extend(self.caption_pixels(pixels, pixel_keys, decoding))
            if progress is not None:
                progress(len(batch))
        return captions


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key
