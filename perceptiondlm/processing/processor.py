"""`PerceptionDLMProcessor`: images, region masks and conversations → the padded tensors the models consume.

Region captioning (PDMLLM, spec §3.2–3.5) and image-level chat (the Base model) share tiling, the chat
template, the token widening and the right padding with `<|eot_id|>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, PreTrainedTokenizerFast

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.io import read_json
from perceptiondlm.models.configuration import MASK_ACTIVITY_MODES
from perceptiondlm.processing.masks import DEFAULT_THRESHOLD, load_masks, mask_bbox, patch_activity, sort_by_area
from perceptiondlm.processing.prompts import CHAT_TEMPLATE, DEFAULT_REGION_QUESTION, region_messages, render_chat
from perceptiondlm.processing.tiling import normalize_tiles, split_into_tiles, tile_image
from perceptiondlm.processing.tokens import IMAGE_CONTEXT_TOKEN, IMAGE_END_TOKEN, IMAGE_START_TOKEN, SpecialTokens

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
_TOKEN_KEYS = {"image_token": IMAGE_CONTEXT_TOKEN, "image_start_token": IMAGE_START_TOKEN,
               "image_end_token": IMAGE_END_TOKEN}

ImageSource = str | Path | Image.Image


def load_image(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, (str, Path)):
        raise PerceptionDLMError(f"{name}: unsupported image type {type(source).__name__}; pass a path or PIL image")
    path = Path(source)
    if not path.is_file():
        raise PerceptionDLMError(f"{name}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PerceptionDLMError(f"{name}: cannot read image file {path} ({err})") from err


def _square_size(value: Any, where: Path) -> int:
    sizes = [value] if isinstance(value, int) else list(value or [])
    if not sizes or len(set(sizes)) != 1 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise PerceptionDLMError(f"{where}: image_size must be one positive int or [S, S] (square tiles), got {value}")
    return sizes[0]


def _check_preprocessor(config: dict[str, Any], image_size: int, where: Path) -> None:
    """Tiles are normalised by `normalize_tiles` (x/255 − 0.5)/0.5; refuse any other preprocessing."""
    for key in ("image_mean", "image_std"):
        values = config.get(key, [0.5] * 3)
        values = [values] * 3 if isinstance(values, (int, float)) else values
        if any(abs(v - 0.5) > 1e-6 for v in values):
            raise PerceptionDLMError(f"{where}: {key} = {values}; only the SigLIP normalisation mean = std = 0.5 "
                                     "is supported")
    if abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9 or config.get("do_rescale") is False \
            or config.get("do_normalize") is False:
        raise PerceptionDLMError(f"{where}: only do_rescale with 1/255 and do_normalize are supported")
    size = config.get("size", {"height": image_size, "width": image_size})
    if size != {"height": image_size, "width": image_size}:
        raise PerceptionDLMError(f"{where}: size {size} disagrees with the processor image_size {image_size}")


class PerceptionDLMProcessor:
    """Tokenizer + tiling + region-mask settings. `caption_inputs`/`caption_examples` build region-captioning
    batches, `chat_inputs`/`chat_examples` image-level conversations; all return a `BatchFeature`."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_size: int,
        patch_size: int = 16,
        downsample_ratio: float = 0.5,
        min_sub_img: int = 1,
        max_sub_img: int = 6,
        prompt_numbers: int | None = None,
        roi_output_size: int | Sequence[int] | None = None,
        mask_activity: str = "compat",
        mask_threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        if image_size % patch_size:
            raise PerceptionDLMError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        grid = image_size // patch_size * downsample_ratio
        if grid != int(grid) or grid < 1:
            raise PerceptionDLMError(f"(image_size/patch_size)·downsample_ratio = {grid} must be a positive int")
        if mask_activity not in MASK_ACTIVITY_MODES:
            raise PerceptionDLMError(f"mask_activity {mask_activity!r} must be one of {MASK_ACTIVITY_MODES}")
        if prompt_numbers is not None and not 1 <= prompt_numbers <= 255:
            raise PerceptionDLMError(f"prompt_numbers must be in 1..255, got {prompt_numbers}")
        self.tokenizer = tokenizer
        self.special_tokens = SpecialTokens.from_tokenizer(tokenizer)
        if None in (self.special_tokens.image_context, self.special_tokens.image_start, self.special_tokens.image_end):
            raise PerceptionDLMError("The tokenizer lacks <IMG_CONTEXT>, <img> or </img>; use the checkpoint's "
                                     "tokenizer (it adds them)")
        if prompt_numbers is not None:
            slots = min(len(self.special_tokens.reserved), len(self.special_tokens.caption_slots))
            if slots < prompt_numbers:
                raise PerceptionDLMError(f"The tokenizer has only {slots} <|reserved_token_i|>/<|Mask_Cap_i|> pairs "
                                         f"for prompt_numbers = {prompt_numbers}")
        self.image_size, self.patch_size, self.downsample_ratio = image_size, patch_size, downsample_ratio
        self.min_sub_img, self.max_sub_img = min_sub_img, max_sub_img
        self.prompt_numbers, self.mask_activity, self.mask_threshold = prompt_numbers, mask_activity, mask_threshold
        self.roi_output_size = (None if roi_output_size is None else (roi_output_size,) * 2
                                if isinstance(roi_output_size, int) else tuple(roi_output_size))
        self._feature_grid = int(grid)  # LM tokens per tile side after pixel shuffle

    # --- files -----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path, tokenizer: Any = None, **overrides: Any) -> PerceptionDLMProcessor:
        """Reads tokenizer*.json, processor_config.json, preprocessor_config.json and config.json (local only);
        `overrides` replace constructor arguments (e.g. mask_activity="coverage"); a given `tokenizer` (e.g. one
        with added tokens) replaces the directory's."""
        directory = Path(directory)
        processor = read_json(directory / "processor_config.json", "processor_config.json")
        preprocessor = read_json(directory / "preprocessor_config.json", "preprocessor_config.json")
        model = read_json(directory / "config.json", "config.json")
        if not (directory / "tokenizer.json").is_file():
            raise PerceptionDLMError(f"tokenizer.json not found: {directory / 'tokenizer.json'}")
        where = directory / "processor_config.json"
        image_size = _square_size(processor.get("image_size"), where)
        for key, expected in _TOKEN_KEYS.items():
            if processor.get(key, expected) != expected:
                raise PerceptionDLMError(f"{where}: {key} is {processor[key]!r}; the chat template uses {expected!r}")
        _check_preprocessor(preprocessor, image_size, directory / "preprocessor_config.json")
        if _square_size(model.get("image_size", image_size), directory / "config.json") != image_size:
            raise PerceptionDLMError(f"config.json image_size {model['image_size']} != processor's {image_size}")
        for key in ("patch_size", "downsample_ratio"):
            if key not in model:
                raise PerceptionDLMError(f"{directory / 'config.json'} has no {key!r}")
        kwargs: dict[str, Any] = dict(
            image_size=image_size, patch_size=model["patch_size"], downsample_ratio=model["downsample_ratio"],
            min_sub_img=processor.get("min_sub_img", 1), max_sub_img=processor.get("max_sub_img", 6),
            prompt_numbers=model.get("prompt_numbers"), roi_output_size=model.get("roi_output_size"),
            mask_activity=model.get("mask_activity", "compat"))
        if tokenizer is None:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
        out = cls(tokenizer, **{**kwargs, **overrides})
        if model.get("num_image_token", out.num_image_tokens) != out.num_image_tokens:
            raise PerceptionDLMError(f"config.json num_image_token {model['num_image_token']} != the derived "
                                     f"{out.num_image_tokens}")
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes the tokenizer, processor_config.json, preprocessor_config.json and chat_template.json. The model
        settings (patch_size, prompt_numbers, ...) belong to the model's config.json, written by the model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        size = self.image_size
        files = {
            "processor_config.json": {"image_size": [size, size], "min_sub_img": self.min_sub_img,
                                      "max_sub_img": self.max_sub_img, **_TOKEN_KEYS,
                                      "processor_class": type(self).__name__},
            "preprocessor_config.json": {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                                         "size": {"height": size, "width": size}, "resample": 2,
                                         "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                                         "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
            "chat_template.json": {"chat_template": CHAT_TEMPLATE},
        }
        for name, content in files.items():
            (directory / name).write_text(json.dumps(content, indent=2) + "\n")

    # --- derived settings ------------------------------------------------------------------------------------

    @property
    def num_image_tokens(self) -> int:
        """LM tokens per tile: (image_size/patch_size)² · downsample_ratio²."""
        return self._feature_grid ** 2

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens.eot

    def roi_tokens(self, grid: tuple[int, int]) -> int:
        """Tokens per region placeholder: roi_output_size² (None = the whole merged feature map of `grid`)."""
        if self.roi_output_size is None:
            return grid[0] * grid[1] * self.num_image_tokens
        return self.roi_output_size[0] * self.roi_output_size[1]

    # --- region captioning -----------------------------------------------------------------------------------

    def caption_inputs(
        self, images: Sequence[ImageSource], masks: Sequence[Sequence[Any]], *,
        question: str = DEFAULT_REGION_QUESTION, gen_length: int = 32,
    ) -> BatchFeature:
        """Inference batch: each region's answer slot holds `gen_length` mask tokens; region i = the i-th
        largest mask, prompt id i. See `_region_batch` for the keys."""
        samples = [self._region_sample(b, img, m, question=question, gen_length=gen_length)
                   for b, (img, m) in enumerate(self._pairs(images, masks))]
        return self._region_batch(samples, with_labels=False)

    def caption_examples(
        self, images: Sequence[ImageSource], masks: Sequence[Sequence[Any]], captions: Sequence[Sequence[str]],
        *, prompt_ids: Sequence[Sequence[int]] | None = None, generator: torch.Generator | None = None,
        question: str = DEFAULT_REGION_QUESTION, caption_length: int | None = None,
    ) -> BatchFeature:
        """Training batch with labels. `captions[b][k]` belongs to `masks[b][k]` (caller order). Region i uses
        prompt id perm[i], perm a fresh permutation of range(prompt_numbers) per sample (drawn with
        `generator`), unless `prompt_ids[b]` gives them per area-sorted region. With `caption_length`, each
        caption is padded with `<|eot_id|>` to that many tokens, as the slots are at inference (the reference
        did not pad, so its model never learned what to write after a short caption)."""
        if caption_length is not None:
            captions = [[self.pad_caption(c, caption_length) for c in row] for row in captions]
        pairs = self._pairs(images, masks)
        if len(captions) != len(pairs) or (prompt_ids is not None and len(prompt_ids) != len(pairs)):
            raise PerceptionDLMError(f"{len(pairs)} images but {len(captions)} caption lists"
                                     + ("" if prompt_ids is None else f" and {len(prompt_ids)} prompt-id lists"))
        samples = [self._region_sample(b, img, m, question=question, captions=captions[b], generator=generator,
                                       prompt_ids=None if prompt_ids is None else prompt_ids[b])
                   for b, (img, m) in enumerate(pairs)]
        return self._region_batch(samples, with_labels=True)

    def pad_caption(self, caption: str, length: int) -> str:
        """`caption` followed by `<|eot_id|>` up to `length` tokens (unchanged if it is that long already)."""
        tokens = len(self.tokenizer(caption, add_special_tokens=False)["input_ids"])
        eot = self.tokenizer.convert_ids_to_tokens(self.special_tokens.eot)
        return caption + eot * max(length - tokens, 0)

    @staticmethod
    def _pairs(images: Sequence[Any], masks: Sequence[Any]) -> list[tuple[Any, Any]]:
        if isinstance(images, (str, Path, Image.Image)) or len(images) != len(masks):
            raise PerceptionDLMError("Give a list of images and a list with one list of masks per image "
                                     f"(got {type(images).__name__} of images and {len(masks)} mask lists)")
        return list(zip(images, masks, strict=True))

    def _prompt_ids(self, k: int, given: Sequence[int] | None, generator: torch.Generator | None,
                    training: bool) -> list[int]:
        assert self.prompt_numbers is not None
        if given is not None:
            ids = [int(i) for i in given]
            if len(ids) != k or len(set(ids)) != k or not all(0 <= i < self.prompt_numbers for i in ids):
                raise PerceptionDLMError(f"prompt ids {ids} must be {k} distinct values in "
                                         f"0..{self.prompt_numbers - 1}")
            return ids
        if not training:
            return list(range(k))
        return torch.randperm(self.prompt_numbers, generator=generator)[:k].tolist()

    def _region_sample(self, b: int, image_source: ImageSource, mask_sources: Sequence[Any], *, question: str,
                       gen_length: int | None = None, captions: Sequence[str] | None = None,
                       prompt_ids: Sequence[int] | None = None,
                       generator: torch.Generator | None = None) -> dict[str, Any]:
        if self.prompt_numbers is None:
            raise PerceptionDLMError("This checkpoint is an image-level (Base) model without region parts "
                                     "(config.json has no prompt_numbers); use chat_inputs for it")
        k = len(mask_sources)
        if k == 0:
            raise PerceptionDLMError(f"sample {b}: no masks for this image; give at least one region mask")
        if k > self.prompt_numbers:
            raise PerceptionDLMError(f"sample {b}: {k} regions but the model has prompt_numbers = "
                                     f"{self.prompt_numbers}; split the regions into chunks of at most that many")
        if captions is not None and len(captions) != k:
            raise PerceptionDLMError(f"sample {b}: {len(captions)} captions for {k} masks; give one per mask")
        try:
            image = load_image(image_source, f"image #{b}")
            masks, order = sort_by_area(load_masks(mask_sources, image.size, threshold=self.mask_threshold))
        except PerceptionDLMError as err:
            raise PerceptionDLMError(f"sample {b}: {err}") from err
        ids = self._prompt_ids(k, prompt_ids, generator, training=captions is not None)
        tiles, grid = tile_image(image, self.image_size, self.min_sub_img, self.max_sub_img)
        patches = torch.stack([  # (T, K, N)
            patch_activity(m, pid, self.image_size, grid, self.patch_size, self.mask_activity).flatten(1)
            for m, pid in zip(masks, ids, strict=True)], dim=1)
        messages = region_messages(k, question=question, gen_length=None if captions is not None else gen_length,
                                   captions=None if captions is None else [captions[j] for j in order])
        text, spans = render_chat(messages)
        input_ids, labels = self.encode_text(text, spans, [len(tiles)], k, self.roi_tokens(grid))
        return {"input_ids": input_ids, "labels": labels, "pixel_values": normalize_tiles(tiles), "grid": grid,
                "patches": patches, "prompt_ids": ids, "boxes": [mask_bbox(m) for m in masks], "order": order}

    def _region_batch(self, samples: list[dict[str, Any]], with_labels: bool) -> BatchFeature:
        """Keys (B samples, L longest sequence, T_total tiles, R most regions, N patches per tile):
        input_ids, attention_mask, [labels] (B, L) long; pixel_values (T_total, 3, S, S) float32;
        num_tiles (B,) long; image_grids (B, 2) long [cols, rows]; region_patches (T_total, R, N) bool;
        region_prompt_ids (B, R) long (−1 = none); region_boxes (B, R, 4) float32; region_order list[list[int]]."""
        out = self._collate(samples, with_labels)
        r = max(len(s["order"]) for s in samples)
        n = (self.image_size // self.patch_size) ** 2
        patches = torch.zeros(len(out["pixel_values"]), r, n, dtype=torch.bool)
        prompt_ids = torch.full((len(samples), r), -1, dtype=torch.long)
        boxes = torch.zeros(len(samples), r, 4, dtype=torch.float32)
        start = 0
        for b, s in enumerate(samples):
            t, k = s["patches"].shape[:2]
            patches[start:start + t, :k] = s["patches"]
            prompt_ids[b, :k] = torch.tensor(s["prompt_ids"])
            boxes[b, :k] = torch.tensor(s["boxes"], dtype=torch.float32)
            start += t
        out.update(image_grids=torch.tensor([s["grid"] for s in samples], dtype=torch.long),
                   region_patches=patches, region_prompt_ids=prompt_ids, region_boxes=boxes,
                   region_order=[list(s["order"]) for s in samples])
        return BatchFeature(out)

    # --- image-level chat (Base model) -----------------------------------------------------------------------

    def chat_inputs(self, images: Sequence[Any], prompts: Sequence[str | list[dict[str, Any]]]) -> BatchFeature:
        """Inference batch for image-level chat: prompt + assistant header (the sampler appends the answer).
        `images[b]`: None, one image or a list of images; `prompts[b]`: a question string (`<image>` marks where
        images go, else they are put first, each followed by "\\n") or a conversation (messages whose
        content may hold {"type": "image"} items or `<image>` in text). Keys: input_ids, attention_mask (B, L)
        long; pixel_values (T_total, 3, S, S); num_tiles (B,) tiles per sample, all its images together."""
        return self._chat_batch(images, prompts, training=False)

    def chat_examples(self, images: Sequence[Any], conversations: Sequence[list[dict[str, Any]]],
                      answer_length: int | None = None) -> BatchFeature:
        """Training batch for image-level chat: as `chat_inputs` plus labels (B, L) on every assistant turn.
        With `answer_length`, every shorter assistant turn (its text and closing `<|eot_id|>`) is padded with
        `<|eot_id|>` to that many tokens, all in the loss: LLaDA's SFT EOS padding, which teaches the model to
        end a short answer inside a longer generation window (None = no padding, as the reference)."""
        if answer_length is not None:
            conversations = [self._pad_answers(c, answer_length) for c in conversations]
        return self._chat_batch(images, conversations, training=True)

    def _pad_answers(self, conversation: list[dict[str, Any]], answer_length: int) -> list[dict[str, Any]]:
        """The conversation with each assistant text padded to `answer_length` - 1 tokens (the template adds
        its closing `<|eot_id|>`); a content list has its last text item padded."""
        def pad(text: str) -> str:
            return self.pad_caption(text, answer_length - 1)

        padded = []
        for message in conversation:
            content = message.get("content") if isinstance(message, dict) else None
            if message.get("role") == "assistant" and isinstance(content, str):
                message = {**message, "content": pad(content)}
            elif message.get("role") == "assistant" and content and content[-1].get("type") == "text":
                message = {**message, "content": [*content[:-1], {**content[-1], "text": pad(content[-1]["text"])}]}
            padded.append(message)
        return padded

    def _chat_batch(self, images: Sequence[Any], prompts: Sequence[Any], training: bool) -> BatchFeature:
        if isinstance(prompts, str) or len(images) != len(prompts):
            raise PerceptionDLMError(f"Give one entry of images per prompt (lists of equal length), got "
                                     f"{type(images).__name__} and {type(prompts).__name__}")
        pairs = enumerate(zip(images, prompts, strict=True))
        samples = [self._chat_sample(b, img, prompt, training) for b, (img, prompt) in pairs]
        return BatchFeature(self._collate(samples, with_labels=training))

    def _chat_sample(self, b: int, image_sources: Any, prompt: Any, training: bool) -> dict[str, Any]:
        sources = [] if image_sources is None else (
            list(image_sources) if isinstance(image_sources, (list, tuple)) else [image_sources])
        images = [load_image(src, f"sample {b}, image #{i}") for i, src in enumerate(sources)]
        if isinstance(prompt, str):
            text = prompt if IMAGE_PLACEHOLDER in prompt else (IMAGE_PLACEHOLDER + "\n") * len(images) + prompt
            prompt = [{"role": "user", "content": text}]
        messages = [{**m, "content": _split_placeholders(m["content"])}
                    if isinstance(m, dict) and m.get("role") != "assistant" and "content" in m else m for m in prompt]
        if training and not any(m.get("role") == "assistant" for m in messages):
            raise PerceptionDLMError(f"sample {b}: a training conversation needs at least one assistant message")
        text, spans = render_chat(messages, add_generation_prompt=not training)
        tiles = [split_into_tiles(img, self.image_size, (1, 1)) if len(images) > 1 else
                 tile_image(img, self.image_size, self.min_sub_img, self.max_sub_img)[0] for img in images]
        input_ids, labels = self.encode_text(text, spans, [len(t) for t in tiles], 0, 0, sample=b)
        pixels = (normalize_tiles([t for per_image in tiles for t in per_image]) if tiles
                  else torch.zeros(0, 3, self.image_size, self.image_size))
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}

    # --- shared ----------------------------------------------------------------------------------------------

    def encode_text(self, text: str, spans: list[tuple[int, int]], image_tiles: list[int], regions: int,
                roi_tokens: int, sample: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize `text` piecewise at the generation-span borders (so labels align exactly) → (ids, labels),
        both (L,) long, with the k-th `<IMG_CONTEXT>` widened to num_image_tokens·image_tiles[k] copies and
        `<|reserved_token_i|>` (i < regions) to `roi_tokens` copies."""
        borders = sorted({0, len(text), *(x for span in spans for x in span)})
        ids: list[int] = []
        labels: list[int] = []
        for a, b in zip(borders, borders[1:], strict=False):
            piece = self.tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if any(s <= a and b <= e for s, e in spans) else [IGNORE_INDEX] * len(piece)
        input_ids, label_ids = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
        repeats = torch.ones_like(input_ids)
        where = "" if sample is None else f"sample {sample}: "
        slots = torch.nonzero(input_ids == self.special_tokens.image_context).flatten()
        if len(slots) != len(image_tiles):
            raise PerceptionDLMError(f"{where}the text has {len(slots)} image slots but {len(image_tiles)} images "
                                     "were given; use one image item or <image> per image")
        repeats[slots] = torch.tensor(image_tiles, dtype=torch.long) * self.num_image_tokens
        for i in range(regions):
            repeats[input_ids == self.special_tokens.reserved[i]] = roi_tokens
        return input_ids.repeat_interleave(repeats), label_ids.repeat_interleave(repeats)

    def _collate(self, samples: list[dict[str, Any]], with_labels: bool) -> dict[str, Any]:
        """Right-pads with `<|eot_id|>` (attention 0, label −100) and concatenates the tiles in sample order."""
        if not samples:
            raise PerceptionDLMError("The batch is empty")
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(samples), length, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[b, :n], attention[b, :n], labels[b, :n] = s["input_ids"], 1, s["labels"]
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
        if with_labels:
            out["labels"] = labels
        out["pixel_values"] = torch.cat([s["pixel_values"] for s in samples]).to(torch.float32)
        out["num_tiles"] = torch.tensor([len(s["pixel_values"]) for s in samples], dtype=torch.long)
        return out


def _split_placeholders(content: Any) -> Any:
    """`<image>` inside text (a string or text items) → separate {"type": "image"} items, in place, the text
    pieces stripped as the training loader strips them (so "<image>\nQ" is "<img>...</img>Q", as trained)."""
    items = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(items, list):
        return content
    out: list[dict[str, Any]] = []
    for item in items:
        text = item.get("text") if isinstance(item, dict) and item.get("type", "text") == "text" else None
        if not isinstance(text, str) or IMAGE_PLACEHOLDER not in text:
            out.append(item)
            continue
        for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                out.append({"type": "image"})
            if part.strip():
                out.append({"type": "text", "text": part.strip()})
    return out
