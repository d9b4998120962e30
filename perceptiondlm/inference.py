"""High-level inference: `caption_regions` (PerceptionDLM) and `chat` (PerceptionDLM-Base).

Both build inputs with the model's processor, embed the image once per sequence, and hand the samplers of
`perceptiondlm.diffusion.sampler` a forward callable over the answer tokens (spec §4, style rule 7).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from perceptiondlm.diffusion.cache import PrefixCache
from perceptiondlm.diffusion.sampler import (
    SamplerResult,
    SamplerStats,
    Sampling,
    block_decode,
    mask_predict_decode,
    threshold_decode,
)
from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.models.regions import caption_slot_index
from perceptiondlm.processing.masks import load_masks, sort_by_area
from perceptiondlm.processing.processor import load_image
from perceptiondlm.processing.prompts import DEFAULT_REGION_QUESTION

DECODING_MODES = ("reference", "threshold")
MASKED_PLACEHOLDER = "▢"


@dataclass
class RegionCaptions:
    """Captions of one image's regions, in the caller's mask order."""

    captions: list[str]
    token_ids: list[list[int]]  # per region, cut at the region's own first <|eot_id|>
    stats: SamplerStats
    history: list[list[str]] | None = field(default=None, repr=False)  # per step, per region: partial text


@dataclass
class ChatAnswer:
    text: str
    token_ids: list[int]
    stats: SamplerStats
    history: list[str] | None = field(default=None, repr=False)


@dataclass
class _Batch:
    """One padded batch of sequences and the bookkeeping that maps answer tokens back to regions."""

    embeds: torch.Tensor  # (B, L, D), updated in place with the current answer tokens
    layout: torch.Tensor | None  # 4-D region layout or 2-D padding mask
    answer: torch.Tensor  # (B, L) bool: the positions the sampler decodes
    valid: torch.Tensor  # (B, N) bool: real answer positions (rows have different answer counts)
    slots: torch.Tensor  # (B, N) long: each answer position's caption slot
    prefix_length: int  # positions before the first answer-related token, the same for every row


def _decode_answers(
    model: Any, batch: _Batch, sampler: Callable[..., SamplerResult], *, cache: bool, refresh_every: int | None,
    on_step: Callable[[int, torch.Tensor], None] | None = None, **kwargs: Any,
) -> SamplerResult:
    embed = model.language_model.get_input_embeddings()
    lm = model.language_model
    cached = PrefixCache(lm, batch.layout, batch.prefix_length, refresh_every) if cache else None
    prefill: list[float] = []

    def forward(x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        batch.embeds[batch.answer] = embed(x[batch.valid]).to(batch.embeds.dtype)
        where = torch.zeros_like(batch.answer)
        where[batch.answer] = score[batch.valid]
        if cached is None:
            return lm(inputs_embeds=batch.embeds, attention_mask=batch.layout, logits_mask=where).logits
        start = time.perf_counter()
        logits = cached.logits(batch.embeds, where)
        if cached.calls == 1:
            prefill.append(time.perf_counter() - start)
        return logits

    mask_id = model.require_special_tokens().mask
    if kwargs.get("cfg_scale", 0) > 0:
        # Classifier-free guidance: the same sequence with every prompt position replaced by the mask token.
        prompt_free = _Batch(**{**batch.__dict__, "embeds": batch.embeds.clone()})
        prompt_free.embeds[~batch.answer] = embed.weight[mask_id].to(batch.embeds.dtype)

        def unconditional(x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
            prompt_free.embeds[batch.answer] = embed(x[batch.valid]).to(batch.embeds.dtype)
            where = torch.zeros_like(batch.answer)
            where[batch.answer] = score[batch.valid]
            return lm(inputs_embeds=prompt_free.embeds, attention_mask=batch.layout, logits_mask=where).logits

        kwargs["unconditional"] = unconditional
    x = torch.full(batch.valid.shape, mask_id, dtype=torch.long, device=batch.embeds.device)
    x[~batch.valid] = model.require_special_tokens().eot
    with torch.no_grad():
        result = sampler(forward, x, mask_id, on_step=on_step, **kwargs)
    if prefill:  # the cache-building forward is reported as prefill, not denoising
        result.stats.seconds_prefill = prefill[0]
        result.stats.seconds_denoise -= prefill[0]
    return result


def _answer_batch(model: Any, inputs: Any) -> tuple[_Batch, float]:
    """Embeds the processor's inputs and locates the answer positions; returns the batch and the vision time."""
    device = model.device
    tensors = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    input_ids = tensors["input_ids"]
    start = time.perf_counter()
    with torch.no_grad():
        embeds = model.embed_inputs(
            input_ids, tensors.get("pixel_values"), tensors.get("num_tiles"), tensors.get("image_grids"),
            tensors.get("region_patches"), tensors.get("region_prompt_ids"), tensors.get("region_boxes"),
        )
    vision_seconds = time.perf_counter() - start
    special = model.require_special_tokens()
    answer = input_ids == special.mask  # (B, L)
    counts = answer.sum(-1)
    if not bool(counts.all()):
        raise PerceptionDLMError("Every sequence needs masked answer positions to decode.")
    valid = torch.arange(int(counts.max()), device=device)[None] < counts[:, None]  # (B, N)
    if model.config.has_regions:
        slots_full = caption_slot_index(input_ids, model.slot_ids)
        prefix = int(torch.where(slots_full >= 0, torch.arange(input_ids.shape[1], device=device), 10**9).amin())
    else:
        slots_full = torch.zeros_like(input_ids)
        prefix = int(answer.float().argmax(-1).min())
    slots = torch.zeros(valid.shape, dtype=torch.long, device=device)
    slots[valid] = slots_full[answer]
    layout = model.attention_layout(input_ids, tensors["attention_mask"])
    if layout is not None and layout.dim() == 4:
        # Additive once per call: SDPA would otherwise convert the boolean mask in every layer of every step.
        blocked = torch.zeros(layout.shape, dtype=embeds.dtype, device=device)
        layout = blocked.masked_fill_(~layout, torch.finfo(embeds.dtype).min)
    return _Batch(embeds, layout, answer, valid, slots, prefix), vision_seconds


def _sampler_for(decoding: str, steps: int, threshold: float, eos_stop: bool, sampling: Sampling, eot: int):
    if decoding == "reference":
        return mask_predict_decode, dict(steps=steps, sampling=sampling, eot_id=eot)
    if decoding == "threshold":
        return threshold_decode, dict(threshold=threshold, sampling=sampling, eot_id=eot, eos_stop=eos_stop)
    raise PerceptionDLMError(f"decoding must be one of {DECODING_MODES}, got {decoding!r}.")


def caption_regions(
    model: Any,
    image: Any,
    masks: Sequence[Any],
    *,
    prompt: str | None = None,
    gen_length: int = 32,
    steps: int = 32,
    decoding: str = "reference",
    threshold: float = 0.9,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    remasking: str = "low_confidence",
    eos_stop: bool = True,
    cache: bool | None = None,
    cache_refresh_every: int = 4,
    keep_history: bool = False,
    on_step: Callable[[int, list[str]], None] | None = None,
) -> RegionCaptions | list[RegionCaptions]:
    """Captions every mask of `image` (a path or PIL image; masks: paths, arrays or COCO RLE dicts).

    A list of images (with a list of mask lists) is decoded as one batch and gives a list of results.
    More regions than the model's `prompt_numbers` are split into chunks (largest regions first), decoded
    side by side. Captions come back in the caller's mask order, each cut at its own first `<|eot_id|>`.

    Args:
        decoding: "reference" reproduces the released model's sampler token for token (mask-predict over all
            regions, `steps` forwards); "threshold" commits every token whose confidence exceeds `threshold`
            (at least one per region and step), scores only still-masked positions and stops a region at
            its `<|eot_id|>` when `eos_stop`.
        cache: reuse the prompt's keys/values between steps. Default: on in threshold mode when it is exact
            (a model whose prompt does not attend to the answers); forced on for the released models it is
            approximate, refreshed every `cache_refresh_every` steps.
        on_step: called after every step with the partial captions (masked tokens shown as ▢).
    """
    processor = _require_processor(model)
    if not model.config.has_regions:
        raise PerceptionDLMError("This is a Base model (no region parts); use model.chat(image, question).")
    batched = isinstance(image, (list, tuple))
    images, mask_lists = (list(image), list(masks)) if batched else ([image], [masks])
    if len(images) != len(mask_lists):
        raise PerceptionDLMError(f"{len(images)} images but {len(mask_lists)} mask lists.")
    exact_cache = not model.config.prefix_attends_answers
    use_cache = (decoding == "threshold" and exact_cache) if cache is None else cache
    question = prompt or DEFAULT_REGION_QUESTION
    # Regions of each image, sorted by area, split into chunks of at most prompt_numbers.
    samples, owners = [], []  # owners[s] = (image index, caller indices of the chunk's regions)
    for i, (img, sources) in enumerate(zip(images, mask_lists, strict=True)):
        if not sources:
            raise PerceptionDLMError(f"image {i}: no masks given; pass at least one region mask.")
        img = load_image(img, f"image #{i}")
        loaded = load_masks(sources, img.size, threshold=processor.mask_threshold)
        _, order = sort_by_area(loaded)
        per_chunk = model.config.prompt_numbers
        for start in range(0, len(order), per_chunk):
            chunk = order[start : start + per_chunk]
            samples.append((img, [loaded[j] for j in chunk]))
            owners.append((i, chunk))
    inputs = processor.caption_inputs([s[0] for s in samples], [s[1] for s in samples], question=question,
                                      gen_length=gen_length)
    batch, vision_seconds = _answer_batch(model, inputs)
    special = model.require_special_tokens()
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking,
                        suppress_ids=(special.mask,))
    sampler, kwargs = _sampler_for(decoding, steps, threshold, eos_stop, sampling, special.eot)
    kwargs["slots"] = batch.slots
    step_texts: list[list[str]] = []
    tokenizer = processor.tokenizer

    def texts_of(x: torch.Tensor) -> list[list[str]]:
        return [[_slot_text(tokenizer, x[b][batch.valid[b] & (batch.slots[b] == s)], special)
                 for s in range(len(owners[b][1]))] for b in range(len(owners))]

    def step_callback(step: int, x: torch.Tensor) -> None:
        texts = _to_caller_order(texts_of(x), inputs["region_order"], owners, len(images), mask_lists)
        if keep_history:
            step_texts.append(texts)
        if on_step is not None:
            on_step(step, texts[0] if not batched else texts)

    wants_steps = keep_history or on_step is not None
    result = _decode_answers(model, batch, sampler, valid=batch.valid, cache=use_cache,
                             refresh_every=None if exact_cache else cache_refresh_every,
                             on_step=step_callback if wants_steps else None, **kwargs)
    result.stats.seconds_vision = vision_seconds
    x = result.tokens
    ids = [[_cut_at_eot(x[b][batch.valid[b] & (batch.slots[b] == s)].tolist(), special.eot)
            for s in range(len(owners[b][1]))] for b in range(len(owners))]
    texts = [[tokenizer.decode(t, skip_special_tokens=False).strip() for t in row] for row in ids]
    captions = _to_caller_order(texts, inputs["region_order"], owners, len(images), mask_lists)
    token_ids = _to_caller_order(ids, inputs["region_order"], owners, len(images), mask_lists)
    results = [
        RegionCaptions(captions[i], token_ids[i], result.stats, [step[i] for step in step_texts] or None)
        for i in range(len(images))
    ]
    return results if batched else results[0]


def _require_processor(model: Any) -> Any:
    processor = getattr(model, "processor", None)
    if processor is None:
        raise PerceptionDLMError(
            "The model has no processor: load it with PerceptionDLM.from_pretrained(directory) from a "
            "checkpoint that has the processor files, or set model.processor = PerceptionDLMProcessor(...)."
        )
    return processor


def _cut_at_eot(tokens: list[int], eot: int) -> list[int]:
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


def _slot_text(tokenizer: Any, tokens: torch.Tensor, special: Any) -> str:
    pieces = []
    for token in _cut_at_eot(tokens.tolist(), special.eot):
        pieces.append(MASKED_PLACEHOLDER if token == special.mask else tokenizer.decode([token]))
    return "".join(pieces).strip()


def _to_caller_order(per_sample: list[list[Any]], region_orders: list[list[int]], owners, n_images, mask_lists):
    """Per-sample, area-sorted values -> per-image lists in the caller's mask order."""
    out = [[None] * len(mask_lists[i]) for i in range(n_images)]
    for values, order, (image_index, chunk) in zip(per_sample, region_orders, owners, strict=True):
        for sorted_index, value in enumerate(values):
            out[image_index][chunk[order[sorted_index]]] = value
    return out


def chat(
    model: Any,
    image: Any,
    question: str,
    *,
    gen_length: int = 128,
    block_length: int | None = None,
    steps: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    cache: bool = False,
    cache_refresh_every: int = 4,
    keep_history: bool = False,
) -> ChatAnswer:
    """Answers a question about an image, a list of images (each placed where the question has `<image>`, else
    first) or None (text only) with LLaDA's block sampler (spec §4.1).

    `block_length` and `steps` default to `gen_length` (one block, one token per step, the reference demo).
    `cfg_scale` > 0 adds classifier-free guidance against the prompt-free sequence. The prompt is the
    training chat template (the reference's `chat` used a template without the system turn).
    """
    processor = _require_processor(model)
    special = model.require_special_tokens()
    block_length, steps = block_length or gen_length, steps or gen_length
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    inputs = processor.chat_inputs([images], [question])
    answer = torch.full((1, gen_length), special.mask, dtype=torch.long)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
    if inputs.get("pixel_values") is None or not int(inputs["num_tiles"].sum()):
        inputs.pop("pixel_values", None)
    batch, vision_seconds = _answer_batch(model, inputs)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking,
                        suppress_ids=special.suppressed_in_answers)
    history: list[str] = []

    def record(step: int, x: torch.Tensor) -> None:
        history.append(_slot_text(processor.tokenizer, x[0], special))

    result = _decode_answers(model, batch, block_decode, cache=cache, refresh_every=cache_refresh_every,
                             on_step=record if keep_history else None, steps=steps, block_length=block_length,
                             sampling=sampling, eot_id=special.eot, cfg_scale=cfg_scale)
    result.stats.seconds_vision = vision_seconds
    tokens = _cut_at_eot(result.tokens[0].tolist(), special.eot)
    text = processor.tokenizer.decode(tokens, skip_special_tokens=False).strip()
    return ChatAnswer(text, tokens, result.stats, history or None)


__all__ = ["ChatAnswer", "RegionCaptions", "caption_regions", "chat", "DECODING_MODES"]
