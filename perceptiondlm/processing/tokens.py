"""Special tokens, read from the tokenizer files: never from literals (real LLaDA's mask id 126336 is 291 in
the tiny test tokenizer, and the image / caption-slot tokens are appended at the end of the vocabulary).

Token *strings* are fixed by LLaDA's tokenizer and the PerceptionDLM processor (spec §1.1, §5); their ids
are whatever the tokenizer says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from perceptiondlm.errors import PerceptionDLMError

MASK_TOKEN = "<|mdm_mask|>"
EOT_TOKEN = "<|eot_id|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"


def reserved_token(i: int) -> str:
    """The placeholder a region's RoI tokens replace in the user turn (spec §3.4)."""
    return f"<|reserved_token_{i}|>"


def caption_slot_token(i: int) -> str:
    """The marker that opens region i's caption slot in the answer (spec §3.5)."""
    return f"<|Mask_Cap_{i}|>"


def _token_string(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise PerceptionDLMError(f"Tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))


def _lookup(tokenizer: Any, token: str) -> int | None:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.token_to_id(token)
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def bos_token_id_of(directory: str | Path) -> int | None:
    """The id of the BOS token named in `tokenizer_config.json` (or `special_tokens_map.json`)."""
    directory = Path(directory)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            bos = _token_string(json.loads(path.read_text()).get("bos_token"))
            if bos is not None:
                token_id = load_tokenizer(directory).token_to_id(bos)
                if token_id is None:
                    raise PerceptionDLMError(f"BOS token {bos!r} of {path} is not in the tokenizer.")
                return token_id
    return None


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of every special token the project uses. Optional ones are None when the tokenizer lacks them
    (a plain LLaDA tokenizer has no image or caption-slot tokens)."""

    mask: int
    eot: int
    start_header: int
    end_header: int
    bos: int | None
    eos: int | None
    reserved: tuple[int, ...]
    image_context: int | None
    image_start: int | None
    image_end: int | None
    caption_slots: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokens:
        """From a `tokenizers.Tokenizer`, a transformers tokenizer or a directory with `tokenizer.json`."""
        bos = eos = None
        if isinstance(tokenizer, (str, Path)):
            directory = Path(tokenizer)
            tokenizer = load_tokenizer(directory)
            config_path = directory / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            bos, eos = (_token_string(config.get(k)) for k in ("bos_token", "eos_token"))
        elif not isinstance(tokenizer, Tokenizer):
            bos, eos = tokenizer.bos_token, tokenizer.eos_token

        def required(token: str) -> int:
            token_id = _lookup(tokenizer, token)
            if token_id is None:
                raise PerceptionDLMError(f"The tokenizer has no {token!r} token; is it a LLaDA tokenizer?")
            return token_id

        def numbered(make) -> tuple[int, ...]:
            ids = []
            while (token_id := _lookup(tokenizer, make(len(ids)))) is not None:
                ids.append(token_id)
            return tuple(ids)

        return cls(
            mask=required(MASK_TOKEN),
            eot=required(EOT_TOKEN),
            start_header=required(START_HEADER_TOKEN),
            end_header=required(END_HEADER_TOKEN),
            bos=_lookup(tokenizer, bos) if bos else None,
            eos=_lookup(tokenizer, eos) if eos else None,
            reserved=numbered(reserved_token),
            image_context=_lookup(tokenizer, IMAGE_CONTEXT_TOKEN),
            image_start=_lookup(tokenizer, IMAGE_START_TOKEN),
            image_end=_lookup(tokenizer, IMAGE_END_TOKEN),
            caption_slots=numbered(caption_slot_token),
        )

    @property
    def suppressed_in_answers(self) -> tuple[int, ...]:
        """Tokens the block sampler never writes into an answer: BOS, EOS, the header markers and the mask
        itself (spec §4.1 step 5). `<|eot_id|>` stays allowed: it is how an answer ends."""
        ids = (self.eos, self.bos, self.start_header, self.end_header, self.mask)
        return tuple(i for i in ids if i is not None)
