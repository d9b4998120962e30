"""The training dataset: data sources → per-epoch items (num_samples subsets, region groups) → raw examples
for `collate.Collator`. Broken records are skipped and counted. See datasets.md for the rules.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from perceptiondlm.data.sources import (
    IMAGE_PLACEHOLDER,
    RecordError,
    SourceSpec,
    load_data_config,
    open_image,
    open_source,
)
from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.processing.masks import load_mask
from perceptiondlm.processing.prompts import DEFAULT_REGION_QUESTION, region_messages, render_chat
from perceptiondlm.processing.tiling import candidate_grids

logger = logging.getLogger(__name__)

MODEL_KINDS = {"pdmllm": "region", "dmllm": "chat"}  # config model_type → the examples it trains on
MAX_ATTEMPTS = 32  # consecutive broken records tolerated before __getitem__ gives up
_SELECT, _GROUP, _PROMPT = 1, 2, 3  # random streams


def _rng(*key: int) -> random.Random:
    """A Python RNG seeded from integers (seed, epoch, stream, ...) through numpy's SeedSequence."""
    state = np.random.SeedSequence([k & (2**64 - 1) for k in key]).generate_state(2, np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


# --- region grouping --------------------------------------------------------------------------------------------

def group_count(n: int | np.ndarray, max_regions: int) -> np.ndarray:
    """Groups per image with n regions: max(1, ceil(n / M), round(n / ((1 + M) / 2))), fixed for all epochs.
    A mean group size of (1 + M)/2 lets random splits use every size 1..M about equally often."""
    n = np.asarray(n, dtype=np.int64)
    mean = (1 + max_regions) / 2
    return np.maximum.reduce([np.ones_like(n), -(-n // max_regions), np.floor(n / mean + 0.5).astype(np.int64)])


@lru_cache(maxsize=512)
def _composition_counts(n: int, groups: int, max_size: int) -> tuple[tuple[int, ...], ...]:
    """counts[g][m] = number of ways to write m as an ordered sum of g parts in 1..max_size."""
    counts = [[1] + [0] * n]
    for _ in range(groups):
        prev = counts[-1]
        counts.append([sum(prev[m - s] for s in range(1, min(max_size, m) + 1)) for m in range(n + 1)])
    return tuple(tuple(row) for row in counts)


def split_regions(n: int, groups: int, max_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle region indices 0..n-1 and cut them into `groups` groups whose sizes (each 1..max_size) are a
    uniformly random composition of n: every region lands in exactly one group."""
    if not groups <= n <= groups * max_size:
        raise ValueError(f"cannot split {n} regions into {groups} groups of 1..{max_size}")
    counts = _composition_counts(n, groups, max_size)
    order = list(range(n))
    rng.shuffle(order)
    out, left = [], n
    for g in range(groups, 0, -1):
        r = rng.randrange(counts[g][left])
        for size in range(1, max_size + 1):
            r -= counts[g - 1][left - size] if left - size >= 0 else 0
            if r < 0:
                break
        start = n - left
        out.append(order[start:start + size])
        left -= size
    return out


# --- sources and their per-epoch units --------------------------------------------------------------------------

class _Source:
    """An opened source; a unit is a record (chat) or one region group of a record (region)."""

    def __init__(self, index: int, spec: SourceSpec, reader: Any, max_regions: int) -> None:
        self.index, self.spec, self.reader = index, spec, reader
        self.kind = "region" if spec.data_type == "region" else "chat"
        if self.kind == "region":
            self.groups = group_count(reader.stats().regions, max_regions)
            self.unit_offsets = np.cumsum(np.concatenate([[0], self.groups]))
        self.n_units = int(self.unit_offsets[-1]) if self.kind == "region" else len(reader)
        self.count = self.n_units if spec.num_samples is None else spec.num_samples
        if self.count and not self.n_units:
            raise PerceptionDLMError(f"source {spec.name} ({spec.data_file}) has no records")

    def plan(self, seed: int, epoch: int) -> tuple[int, np.ndarray]:
        """(copies, extra): the epoch's items are `copies` passes over all units, then units `extra`."""
        if self.spec.num_samples is None or self.count == 0:
            return int(self.count > 0), np.zeros(0, np.int64)
        copies, rest = divmod(self.count, self.n_units)
        gen = np.random.default_rng(np.random.SeedSequence([seed & (2**64 - 1), epoch, _SELECT, self.index]))
        return copies, gen.permutation(self.n_units)[:rest]

    def locate(self, unit: int) -> tuple[int, int]:
        """Region unit → (record, group index)."""
        record = int(np.searchsorted(self.unit_offsets, unit, side="right")) - 1
        return record, unit - int(self.unit_offsets[record])


# --- the dataset ------------------------------------------------------------------------------------------------

class TrainDataset(Dataset):
    """Map-style dataset of raw examples: {"kind": "region", "image", "masks", "captions", "prompt_ids"} or
    {"kind": "chat", "images", "conversation"} (plus "where": file#record). Call `set_epoch` each epoch."""

    def __init__(self, sources: list[_Source], processor: Any, *, kind: str, prompt_numbers: int | None,
                 max_regions: int, max_length: int | None, question: str, seed: int) -> None:
        self.sources, self.processor, self.kind = sources, processor, kind
        self.prompt_numbers, self.max_regions, self.max_length = prompt_numbers, max_regions, max_length
        self.question, self.seed, self.epoch = question, seed, 0
        self.skipped: Counter[str] = Counter()
        self._offsets = np.cumsum([0] + [s.count for s in sources])
        self._plans: dict[int, tuple[int, np.ndarray]] | None = None
        self._unit_lengths: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        """New num_samples subsets, region groups and prompt ids; the length stays the same."""
        self.epoch, self._plans = int(epoch), None

    def _plan(self, source: _Source) -> tuple[int, np.ndarray]:
        if self._plans is None:
            self._plans = {}
        if source.index not in self._plans:
            self._plans[source.index] = source.plan(self.seed, self.epoch)
        return self._plans[source.index]

    def locate(self, index: int) -> tuple[_Source, int]:
        """Dataset index → (source, unit) in the current epoch."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)}")
        s = int(np.searchsorted(self._offsets, index, side="right")) - 1
        source, local = self.sources[s], index - int(self._offsets[s])
        copies, extra = self._plan(source)
        if local < copies * source.n_units:
            return source, local % source.n_units
        return source, int(extra[local - copies * source.n_units])

    def __getitem__(self, index: int) -> dict[str, Any]:
        attempts = min(MAX_ATTEMPTS, len(self))
        for attempt in range(attempts):
            i = (index + attempt) % len(self)
            try:
                return self._example(i)
            except PerceptionDLMError as err:
                reason = err.reason if isinstance(err, RecordError) else "invalid"
                self.skipped[reason] += 1
                if self.skipped[reason] <= 20 or self.skipped[reason] % 1000 == 0:
                    logger.warning("skipped item %d (%s, %d so far): %s", i, reason, self.skipped[reason], err)
        raise PerceptionDLMError(f"{attempts} consecutive broken records from index {index} on "
                                 f"(skipped so far: {dict(self.skipped)}); check the data files")

    def _example(self, index: int) -> dict[str, Any]:
        source, unit = self.locate(index)
        if source.kind == "chat":
            example = _chat_example(source.reader.record(unit))
        else:
            record, group = source.locate(unit)
            example = self._region_example(source, record, group, index)
        if self.max_length is not None:
            n = self.token_length(example)
            if n > self.max_length:
                raise RecordError("too_long", f"{example['where']}: {n} tokens > max_length {self.max_length}")
        return example

    def _region_example(self, source: _Source, record: int, group: int, index: int) -> dict[str, Any]:
        rec = source.reader.record(record)
        where = rec["where"]
        groups = split_regions(len(rec["masks"]), int(source.groups[record]), self.max_regions,
                               _rng(self.seed, self.epoch, _GROUP, source.index, record))
        chosen = groups[group]
        image = open_image(rec["image"], where)
        masks = [_decode_mask(rec["masks"][j], image.size, f"{where} region {j}") for j in chosen]
        prompt_ids = _rng(self.seed, self.epoch, _PROMPT, index).sample(range(self.prompt_numbers), len(chosen))
        return {"kind": "region", "image": image, "masks": masks, "captions": [rec["captions"][j] for j in chosen],
                "prompt_ids": prompt_ids, "where": where}

    # --- lengths ----------------------------------------------------------------------------------------------

    def token_length(self, example: dict[str, Any]) -> int:
        """Exact sequence length the processor will build for one raw example (image tokens widened)."""
        p = self.processor
        if example["kind"] == "region":
            k = len(example["masks"])
            grid = _grids(np.array([example["image"].width]), np.array([example["image"].height]), p)[0]
            text, spans = render_chat(region_messages(k, question=self.question, captions=example["captions"]))
            ids, _ = p.encode_text(text, spans, [_tiles(grid)], k, p.roi_tokens(tuple(grid)))
        else:
            images = example["images"]
            if len(images) == 1:
                tiles = [_tiles(_grids(np.array([images[0].width]), np.array([images[0].height]), p)[0])]
            else:
                tiles = [1] * len(images)
            text, spans = render_chat(example["conversation"])
            ids, _ = p.encode_text(text, spans, tiles, 0, 0)
        return len(ids)

    @property
    def lengths(self) -> np.ndarray:
        """Estimated token length of every item of the current epoch (int64), for length grouping: exact
        template and image tokens (sizes from file headers / RLE sizes), text tokens from a per-source
        tokens-per-byte ratio measured on its first records."""
        parts = []
        for source in self.sources:
            if source.index not in self._unit_lengths:
                self._unit_lengths[source.index] = self._estimate(source)
            units = self._unit_lengths[source.index]
            copies, extra = self._plan(source)
            parts += [np.tile(units, copies), units[extra]]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _estimate(self, source: _Source) -> np.ndarray:
        p, stats = self.processor, source.reader.stats()
        per_byte = _tokens_per_byte(source.reader, p.tokenizer)
        grids = _grids(stats.width, stats.height, p)
        base = grids[:, 0] * grids[:, 1]  # tiles of the grid, without the thumbnail
        tiles = base + (base > 1)
        if source.kind == "chat":
            tiles = np.where(stats.images > 1, stats.images, tiles)  # several images: one tile each
            image_tokens = np.where(stats.images > 0, tiles * p.num_image_tokens + 2 * stats.images, 0)
            pair = _template_tokens(p, 4) - _template_tokens(p, 2)
            template = _template_tokens(p, 2) + np.maximum(stats.turns - 2, 0) / 2 * pair
            return np.round(template + image_tokens + stats.text_bytes * per_byte).astype(np.int64)
        k = stats.regions / source.groups  # mean regions per group
        roi = base * p.num_image_tokens if p.roi_output_size is None else p.roi_tokens((1, 1))
        table = np.array([_region_template_tokens(p, self.question, j) for j in range(1, self.max_regions + 1)])
        template = table[np.clip(np.round(k).astype(np.int64), 1, self.max_regions) - 1]
        # the template holds <img><IMG_CONTEXT></img> and k reserved tokens: widen them
        per_record = (template - 1 + tiles * p.num_image_tokens + k * (roi - 1)
                      + stats.text_bytes / source.groups * per_byte)
        return np.repeat(np.round(per_record).astype(np.int64), source.groups)


def _tiles(grid: np.ndarray) -> int:
    n = int(grid[0] * grid[1])
    return n + (n > 1)  # + thumbnail


def _grids(width: np.ndarray, height: np.ndarray, processor: Any) -> np.ndarray:
    """Vectorised `tiling.closest_grid` → (N, 2) [cols, rows]; unknown sizes (0) get the largest grid."""
    w, h = np.asarray(width, np.float64), np.asarray(height, np.float64)
    known = (w > 0) & (h > 0)
    aspect = np.where(known, w / np.where(h > 0, h, 1), 1.0)
    best, diff = np.ones((len(w), 2), np.int64), np.full(len(w), np.inf)
    grids = candidate_grids(processor.min_sub_img, processor.max_sub_img)
    for cols, rows in grids:
        d = np.abs(aspect - cols / rows)
        take = (d < diff) | ((d == diff) & (w * h > 0.5 * processor.image_size ** 2 * cols * rows))
        best[take], diff[take] = (cols, rows), d[take]
    best[~known] = max(grids, key=lambda g: g[0] * g[1])
    return best


@lru_cache(maxsize=64)
def _template_tokens(processor: Any, turns: int) -> int:
    messages = [{"role": "user" if t % 2 == 0 else "assistant", "content": ""} for t in range(turns)]
    return len(processor.tokenizer(render_chat(messages)[0], add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=256)
def _region_template_tokens(processor: Any, question: str, k: int) -> int:
    """Tokens of the region conversation with empty captions, reserved tokens and one <IMG_CONTEXT> included."""
    text = render_chat(region_messages(k, question=question, captions=[""] * k))[0]
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokens_per_byte(reader: Any, tokenizer: Any, probe: int = 32) -> float:
    texts = []
    for i in range(min(probe, len(reader))):
        try:
            rec = reader.record(i)
        except PerceptionDLMError:
            continue
        texts.append("\n".join(rec["captions"]) if "captions" in rec else
                     "".join(t["content"] for t in rec["conversation"]).replace(IMAGE_PLACEHOLDER, ""))
    total = sum(len(t.encode()) for t in texts)
    if not total:
        return 0.3
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) / total


# --- record → raw example ---------------------------------------------------------------------------------------

def _decode_mask(rle: Any, size: tuple[int, int], where: str) -> np.ndarray:
    width, height = size
    if rle is None:  # null segmentation = the whole image
        return np.ones((height, width), dtype=bool)
    if not isinstance(rle, dict):
        raise RecordError("bad_mask", f"{where}: a mask must be a COCO RLE dict (polygons are not supported)")
    rle_size = rle.get("size")
    if isinstance(rle_size, list | tuple) and len(rle_size) == 2 and list(rle_size) != [height, width]:
        raise RecordError("mask_size", f"{where}: RLE size {rle_size[1]}x{rle_size[0]} (WxH) differs from the "
                                       f"image's {width}x{height}")
    try:
        mask = load_mask(rle, name=where)
    except PerceptionDLMError as err:
        raise RecordError("bad_mask", str(err)) from err
    if mask.shape != (height, width):
        raise RecordError("mask_size", f"{where}: mask is {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}")
    return mask


def _chat_example(record: dict[str, Any]) -> dict[str, Any]:
    """Split `<image>` in user turns into image items (text pieces stripped, as the reference) and check the
    placeholders against the images and that every turn has content."""
    where, messages, placeholders = record["where"], [], 0
    for t, turn in enumerate(record["conversation"]):
        text = turn["content"]
        if turn["role"] == "user":
            pieces = text.split(IMAGE_PLACEHOLDER)
            placeholders += len(pieces) - 1
            items: list[dict[str, str]] = []
            for k, piece in enumerate(pieces):
                items += [{"type": "image"}] if k else []
                items += [{"type": "text", "text": piece.strip()}] if piece.strip() else []
        else:
            items = [{"type": "text", "text": text}] if text.strip() else []
        if not items:
            raise RecordError("empty_text", f"{where}: turn {t} ({turn['role']}) is empty")
        messages.append({"role": turn["role"], "content": items})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("empty_text", f"{where}: the conversation has no assistant answer")
    if placeholders != len(record["images"]):
        raise RecordError("image_count", f"{where}: {placeholders} <image> placeholders but "
                                         f"{len(record['images'])} images")
    images = [open_image(ref, where) for ref in record["images"]]
    return {"kind": "chat", "images": images, "conversation": messages, "where": where}


def build_train_dataset(data_config: Any, processor: Any, *, model_type: str, prompt_numbers: int | None,
                        seed: int) -> TrainDataset:
    """The training dataset of `data_config.data_path` (a data-config YAML or one data file). Reads the
    attributes data_path, max_length, max_regions_per_sample (None = prompt_numbers), image_root, question and
    seed (None = the `seed` argument). `model_type` "pdmllm" trains on region sources, "dmllm" on chat ones."""
    if model_type not in MODEL_KINDS:
        raise PerceptionDLMError(f"model_type {model_type!r} must be one of {sorted(MODEL_KINDS)}")
    kind = MODEL_KINDS[model_type]
    specs = load_data_config(data_config.data_path)
    for spec in specs:
        if ("region" if spec.data_type == "region" else "chat") != kind:
            raise PerceptionDLMError(f"source {spec.name} ({spec.data_file}) is {spec.data_type} data, which a "
                                     f"{model_type} model does not train on")
    prompt_numbers = prompt_numbers if prompt_numbers is not None else processor.prompt_numbers
    max_regions = getattr(data_config, "max_regions_per_sample", None) or prompt_numbers or 1
    if kind == "region":
        if prompt_numbers is None or processor.prompt_numbers is None or prompt_numbers > processor.prompt_numbers:
            raise PerceptionDLMError(f"prompt_numbers {prompt_numbers} must be set and at most the processor's "
                                     f"{processor.prompt_numbers}")
        if not 1 <= max_regions <= prompt_numbers:
            raise PerceptionDLMError(f"max_regions_per_sample {max_regions} must be in 1..{prompt_numbers}")
    image_root = getattr(data_config, "image_root", None)
    if image_root is not None and not Path(image_root).is_dir():
        raise PerceptionDLMError(f"DATA_CONFIG image_root is not a directory: {image_root}")
    sources = [_Source(i, spec, open_source(spec, None if image_root is None else Path(image_root)), max_regions)
               for i, spec in enumerate(specs)]
    data_seed = getattr(data_config, "seed", None)
    return TrainDataset(sources, processor, kind=kind, prompt_numbers=prompt_numbers, max_regions=max_regions,
                        max_length=getattr(data_config, "max_length", None),
                        question=getattr(data_config, "question", None) or DEFAULT_REGION_QUESTION,
                        seed=seed if data_seed is None else int(data_seed))
