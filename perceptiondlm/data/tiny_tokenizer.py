"""A tiny byte-level BPE tokenizer for the tiny world, trained offline with `tokenizers`, carrying LLaDA's special
tokens (in LLaDA's order, after the learned vocabulary) and the project's chat template (spec §3.2)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.io import write_json_atomic
from perceptiondlm.processing.prompts import CHAT_TEMPLATE, DEFAULT_REGION_QUESTION, DEFAULT_SYSTEM_PROMPT
from perceptiondlm.processing.tokens import (
    END_HEADER_TOKEN,
    EOT_TOKEN,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    MASK_TOKEN,
    START_HEADER_TOKEN,
    caption_slot_token,
    reserved_token,
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NUM_RESERVED = 16  # LLaDA's <|reserved_token_0..15|>; also the number of caption slots
PROCESSOR_TOKENS = [IMAGE_CONTEXT_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN,
                    *(caption_slot_token(i) for i in range(NUM_RESERVED))]
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, MASK_TOKEN,
                  *(reserved_token(i) for i in range(NUM_RESERVED)), *PROCESSOR_TOKENS]
# Text every prompt holds, whatever the corpus: the template's roles and default instructions.
FIXED_TEXTS = [DEFAULT_SYSTEM_PROMPT, DEFAULT_REGION_QUESTION, "system", "user", "assistant", "\n"]


def train_tiny_tokenizer(
    texts: Iterable[str], output_dir: str | Path, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `texts` and saves it to `output_dir` as ordinary tokenizer files.

    `vocab_size` counts everything: 256 byte symbols, the learned merges and the special tokens. Byte-level
    pre-tokenisation (no prefix space) with a byte-level decoder makes `decode(encode(text)) == text` for any
    text; there is no post-processor, so encoding adds no BOS/EOS (like the fixture's LLaDA tokenizer).
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(SPECIAL_TOKENS):
        raise PerceptionDLMError(
            f"vocab_size must be at least {len(byte_alphabet) + len(SPECIAL_TOKENS)} (bytes + special tokens), "
            f"got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS), initial_alphabet=byte_alphabet, show_progress=False,
    )
    tokenizer.train_from_iterator([*FIXED_TEXTS, *texts], trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        additional_special_tokens=PROCESSOR_TOKENS, clean_up_tokenization_spaces=False, model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    output_dir = Path(output_dir)
    fast.save_pretrained(str(output_dir))
    _add_portable_files(output_dir)
    return fast


def _add_portable_files(directory: Path) -> None:
    """transformers 5 writes the template to chat_template.jinja and no special_tokens_map.json; loaders that
    read only tokenizer_config.json / special_tokens_map.json (transformers 4.x, `SpecialTokens`) find them too."""
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    write_json_atomic(directory / "tokenizer_config.json", config)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "additional_special_tokens": PROCESSOR_TOKENS}
    write_json_atomic(directory / "special_tokens_map.json", special)
