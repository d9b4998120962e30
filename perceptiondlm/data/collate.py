"""`Collator`: raw examples of `TrainDataset` → the processor's padded training batch (spec §2.3: right padding
with `<|eot_id|>`, labels −100), keeping only the tensors the model's forward takes.
"""

from __future__ import annotations

from typing import Any

from transformers import BatchFeature

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.processing.prompts import DEFAULT_REGION_QUESTION


class Collator:
    """Region examples go through `processor.caption_examples`, chat examples through `chat_examples`;
    `question` is the region instruction (None = "Describe each masked region in detail."); `caption_length`
    pads every caption with `<|eot_id|>` to that many tokens and `answer_length` every chat answer, its closing
    `<|eot_id|>` included (None = no padding, as the reference)."""

    def __init__(self, processor: Any, question: str | None = None, caption_length: int | None = None,
                 answer_length: int | None = None) -> None:
        self.processor = processor
        self.question = question or DEFAULT_REGION_QUESTION
        self.caption_length = caption_length
        self.answer_length = answer_length

    def __call__(self, examples: list[dict[str, Any]]) -> BatchFeature:
        if not examples:
            raise PerceptionDLMError("Collator got an empty batch")
        kinds = {ex.get("kind") for ex in examples}
        if len(kinds) > 1:
            raise PerceptionDLMError(f"a batch mixes example kinds {sorted(map(str, kinds))}; train region and "
                                     "chat data in separate runs (or batches)")
        kind = kinds.pop()
        if kind == "region":
            with_ids = all(ex.get("prompt_ids") is not None for ex in examples)
            batch = self.processor.caption_examples(
                [ex["image"] for ex in examples], [ex["masks"] for ex in examples],
                [ex["captions"] for ex in examples],
                prompt_ids=[ex["prompt_ids"] for ex in examples] if with_ids else None, question=self.question,
                caption_length=self.caption_length)
        elif kind == "chat":
            batch = self.processor.chat_examples([ex["images"] for ex in examples],
                                                 [ex["conversation"] for ex in examples],
                                                 answer_length=self.answer_length)
        else:
            raise PerceptionDLMError(f"unknown example kind {kind!r}; expected 'region' or 'chat'")
        batch.pop("region_order", None)  # caller-order bookkeeping, not a model input
        return batch
