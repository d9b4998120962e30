"""Special-token ids come from the tokenizer files; the chat template renders the training layout."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

from perceptiondlm import PerceptionDLMError
from perceptiondlm.processing.prompts import CHAT_TEMPLATE, render_chat
from perceptiondlm.processing.tokens import SpecialTokens, bos_token_id_of, load_tokenizer

CHECKPOINT = FIXTURES / "pdmllm" / "checkpoint"
RECORDED = json.loads((FIXTURES / "pdmllm" / "golden.json").read_text())["special_token_ids"]


def test_ids_of_the_region_checkpoint_tokenizer():
    special = SpecialTokens.from_tokenizer(CHECKPOINT)
    assert special.mask == RECORDED["<|mdm_mask|>"]
    assert special.eot == RECORDED["<|eot_id|>"]
    assert (special.start_header, special.end_header) == (
        RECORDED["<|start_header_id|>"], RECORDED["<|end_header_id|>"])
    assert (special.bos, special.eos) == (RECORDED["<|startoftext|>"], RECORDED["<|endoftext|>"])
    assert special.image_context == RECORDED["<IMG_CONTEXT>"]
    assert (special.image_start, special.image_end) == (RECORDED["<img>"], RECORDED["</img>"])
    assert special.reserved[:6] == tuple(RECORDED[f"<|reserved_token_{i}|>"] for i in range(6))
    assert len(special.reserved) == 16
    assert special.caption_slots == tuple(RECORDED[f"<|Mask_Cap_{i}|>"] for i in range(16))


def test_a_plain_llada_tokenizer_has_no_image_tokens_and_every_source_agrees():
    directory = FIXTURES / "llada_hf"
    from_dir = SpecialTokens.from_tokenizer(directory)
    assert from_dir.image_context is None and from_dir.caption_slots == ()
    assert SpecialTokens.from_tokenizer(load_tokenizer(directory)).mask == from_dir.mask
    fast = PreTrainedTokenizerFast.from_pretrained(directory)
    assert SpecialTokens.from_tokenizer(fast) == from_dir
    assert bos_token_id_of(directory) == from_dir.bos == fast.bos_token_id
    suppressed = set(from_dir.suppressed_in_answers)
    assert from_dir.mask in suppressed and from_dir.eot not in suppressed and len(suppressed) == 5


def test_a_tokenizer_without_the_mask_token_is_refused(tmp_path):
    tokenizer = json.loads((FIXTURES / "llada_hf" / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|mdm_mask|>"]
    tokenizer["model"]["vocab"].pop("<|mdm_mask|>", None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(PerceptionDLMError, match="mdm_mask"):
        SpecialTokens.from_tokenizer(tmp_path)


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is red?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
    {"role": "user", "content": [{"type": "text", "text": "And blue?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
]


def test_template_renders_like_the_released_chat_template():
    released = json.loads((CHECKPOINT / "chat_template.json").read_text())["chat_template"]
    for prompt in (False, True):
        ours, _ = render_chat(CONVERSATION, add_generation_prompt=prompt)
        theirs, _ = render_jinja_template([CONVERSATION], chat_template=released, add_generation_prompt=prompt)
        assert ours == theirs[0]


def test_template_layout_and_generation_spans():
    text, spans = render_chat(CONVERSATION)
    assert text.startswith(
        "<|start_header_id|>system<|end_header_id|>\nYou are a helpful assistant.<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n<img><IMG_CONTEXT></img>\nWhat is red?<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\nA circle.<|eot_id|><|start_header_id|>user")
    assert [text[a:b] for a, b in spans] == ["A circle.<|eot_id|>", "A square.<|eot_id|>"]
    plain = [{"role": m["role"], "content": m["content"][-1]["text"]} for m in CONVERSATION[1:]]
    with_system = [{"role": "system", "content": "Be brief."}, *plain]
    text, _ = render_chat(with_system, add_generation_prompt=True)
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\nBe brief.<|eot_id|>\n")
    assert text.count("You are a helpful assistant.") == 0
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n")


def test_template_works_through_a_transformers_tokenizer():
    fast = PreTrainedTokenizerFast.from_pretrained(FIXTURES / "llada_hf")
    out = fast.apply_chat_template(CONVERSATION, chat_template=CHAT_TEMPLATE, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    answer_ids = [i for i, keep in zip(out["input_ids"], out["assistant_masks"], strict=True) if keep]
    assert fast.decode(answer_ids) == "A circle.<|eot_id|>A square.<|eot_id|>"


def test_bad_messages_are_refused():
    with pytest.raises(PerceptionDLMError, match="role"):
        render_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(PerceptionDLMError, match="content"):
        render_chat([{"role": "user"}])
