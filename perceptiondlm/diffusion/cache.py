"""Prefix KV cache for diffusion decoding: the prompt's keys/values are computed once and reused by later steps,
which then run the LM only on the answer part of the sequence.

Exactness depends on the attention layout. If the prompt does not attend to the answers
(`prefix_attends_answers: false`), the prompt's keys and values never change while decoding and the cache is
exact. The released models' prompt attends to the answers, so its keys drift as answers are filled in: the
cache is then an approximation, refreshed by a full forward every `refresh_every` steps.
"""

from __future__ import annotations

import torch

from perceptiondlm.models.llada import LLaDAModelLM


class PrefixCache:
    """Runs `language_model` over (B, L, D) embeddings, caching the keys/values of positions [0, prefix_length).

    Call `logits(embeds, logits_mask)` once per denoising step; `logits_mask` may only select positions
    at or after `prefix_length` on cached steps (answers always lie there).
    """

    def __init__(
        self,
        language_model: LLaDAModelLM,
        attention_mask: torch.Tensor | None,
        prefix_length: int,
        refresh_every: int | None = None,
    ) -> None:
        self.language_model = language_model
        self.attention_mask = attention_mask  # (B, 1, L, L) layout or (B, L) padding mask or None
        self.prefix_length = prefix_length
        self.refresh_every = refresh_every  # None: build once (exact when the prompt cannot see the answers)
        self.key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # The rows of the answer part, made contiguous once rather than sliced in every cached step.
        self.suffix_mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            self.suffix_mask = attention_mask[:, :, prefix_length:].contiguous()
        elif attention_mask is not None:
            self.suffix_mask = attention_mask
        self.calls = 0
        self.full_forwards = 0

    def _refresh_due(self) -> bool:
        return self.key_values is None or bool(self.refresh_every and self.calls % self.refresh_every == 0)

    def logits(self, embeds: torch.Tensor, logits_mask: torch.Tensor) -> torch.Tensor:
        p = self.prefix_length
        if self._refresh_due():
            out = self.language_model(
                inputs_embeds=embeds, attention_mask=self.attention_mask, logits_mask=logits_mask,
                return_key_values=True,
            )
            self.key_values = [(k[:, :, :p], v[:, :, :p]) for k, v in out.key_values]
            self.full_forwards += 1
        else:
            if bool(logits_mask[:, :p].any()):
                raise ValueError("the prefix cache cannot score positions inside the cached prefix")
            out = self.language_model(
                inputs_embeds=embeds[:, p:], attention_mask=self.suffix_mask, logits_mask=logits_mask[:, p:],
                past_key_values=self.key_values,
            )
        self.calls += 1
        return out.logits
