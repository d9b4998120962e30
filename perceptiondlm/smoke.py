"""A backbone smoke run: load a LLaDA checkpoint, build a chat prompt with masked answer slots, and fill
them in one bidirectional forward pass. It proves the installation end to end (tokenizer, template, model,
masked-position scoring); the diffusion samplers arrive with `perceptiondlm.diffusion`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.models.llada import LLaDAModelLM
from perceptiondlm.processing.prompts import render_chat
from perceptiondlm.processing.tokens import SpecialTokens, load_tokenizer


@dataclass
class SmokeReport:
    prompt_tokens: int
    masked_tokens: int
    parameters: int
    load_seconds: float
    forward_seconds: float
    filled_text: str

    def __str__(self) -> str:
        return (
            f"loaded {self.parameters:,} parameters in {self.load_seconds:.2f} s\n"
            f"prompt: {self.prompt_tokens} tokens, answer: {self.masked_tokens} masked tokens\n"
            f"one forward pass: {self.forward_seconds * 1000:.1f} ms\n"
            f"one-step fill of the masked answer: {self.filled_text!r}"
        )


def backbone_smoke_run(
    model_path: Path, prompt: str, gen_length: int = 16, dtype: str = "float32"
) -> SmokeReport:
    """Fills `gen_length` masked answer tokens after `prompt` with one forward pass of the backbone."""
    if gen_length < 1:
        raise PerceptionDLMError(f"gen_length must be at least 1, got {gen_length}.")
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise PerceptionDLMError(f"Unknown dtype {dtype!r}; use float32 or bfloat16.")
    start = time.perf_counter()
    model = LLaDAModelLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    tokenizer = load_tokenizer(model_path)
    special = SpecialTokens.from_tokenizer(model_path)
    load_seconds = time.perf_counter() - start

    text, _ = render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
    ids = torch.tensor([prompt_ids + [special.mask] * gen_length])  # (1, L)
    masked = ids == special.mask
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids, logits_mask=masked).logits  # (gen_length, V)
    forward_seconds = time.perf_counter() - start
    logits[:, list(special.suppressed_in_answers)] = float("-inf")
    filled = logits.argmax(-1).tolist()
    if special.eot in filled:
        filled = filled[: filled.index(special.eot)]
    return SmokeReport(
        prompt_tokens=len(prompt_ids),
        masked_tokens=gen_length,
        parameters=sum(p.numel() for p in model.parameters()),
        load_seconds=load_seconds,
        forward_seconds=forward_seconds,
        filled_text=tokenizer.decode(filled, skip_special_tokens=False),
    )
