"""caption_regions / chat end to end on the golden checkpoint: reference parity, fast modes, cache, batches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURES, write_base_checkpoint
from PIL import Image
from safetensors.torch import load_file

from perceptiondlm import PerceptionDLM, PerceptionDLMError

CHECKPOINT = FIXTURES / "pdmllm" / "checkpoint"
INPUTS = FIXTURES / "pdmllm" / "inputs"
GOLDEN = load_file(str(FIXTURES / "pdmllm" / "golden.safetensors"))
RECORDED = json.loads((FIXTURES / "pdmllm" / "golden.json").read_text())
MASKS = [INPUTS / "mask_a.png", INPUTS / "mask_b_halfres.png", INPUTS / "mask_c.png"]


@pytest.fixture(scope="module")
def model() -> PerceptionDLM:
    return PerceptionDLM.from_pretrained(CHECKPOINT).eval()


def test_reference_decoding_reproduces_the_golden_output(model):
    result = model.caption_regions(INPUTS / "image.png", MASKS, gen_length=8, steps=8, decoding="reference")
    assert result.stats.nfe == 8 and result.stats.tokens == 24
    order = RECORDED["sort_idx_area_descending"]  # sorted region i = caller mask order[i]
    for i, caller in enumerate(order):
        expected = GOLDEN["output_slot_tokens"][i].tolist()
        eot = model.special_tokens.eot
        assert result.token_ids[caller] == (expected[: expected.index(eot)] if eot in expected else expected)
        assert result.captions[caller] == RECORDED["captions"][i]


def test_threshold_decoding_terminates_and_history_replays(model):
    seen = []
    result = model.caption_regions(INPUTS / "image.png", MASKS, gen_length=8, decoding="threshold", threshold=0.3,
                                   keep_history=True, on_step=lambda step, texts: seen.append(texts))
    assert 3 <= result.stats.nfe <= 8 and result.stats.tpf >= 3
    assert len(result.history) == result.stats.nfe == len(seen)
    assert all(len(texts) == 3 for texts in result.history)
    assert "▢" not in "".join(result.history[-1])


def closed_prefix_checkpoint(tmp_path):
    """The golden checkpoint with `prefix_attends_answers: false` (the prompt cannot see the answers)."""
    shutil.copytree(CHECKPOINT, tmp_path / "closed")
    config = json.loads((CHECKPOINT / "config.json").read_text())
    (tmp_path / "closed" / "config.json").write_text(json.dumps({**config, "prefix_attends_answers": False}))
    return PerceptionDLM.from_pretrained(tmp_path / "closed").eval()


def test_prefix_cache_is_exact_when_the_prompt_cannot_see_the_answers(tmp_path):
    closed = closed_prefix_checkpoint(tmp_path)
    kwargs = dict(gen_length=8, decoding="threshold", threshold=0.3)
    plain = closed.caption_regions(INPUTS / "image.png", MASKS, cache=False, **kwargs)
    cached = closed.caption_regions(INPUTS / "image.png", MASKS, cache=True, **kwargs)
    assert cached.token_ids == plain.token_ids and cached.stats.nfe == plain.stats.nfe
    assert cached.stats.seconds_prefill > 0

    from perceptiondlm.diffusion.cache import PrefixCache
    from perceptiondlm.inference import _answer_batch

    inputs = closed.processor.caption_inputs([INPUTS / "image.png"], [MASKS], gen_length=8)
    batch, _ = _answer_batch(closed, inputs)
    cache = PrefixCache(closed.language_model, batch.layout, batch.prefix_length)
    where = batch.answer
    with torch.no_grad():
        cache.logits(batch.embeds, where)  # builds the cache
        batch.embeds[where] = closed.language_model.get_input_embeddings().weight[7]  # change every answer
        full = closed.language_model(inputs_embeds=batch.embeds, attention_mask=batch.layout, logits_mask=where)
        torch.testing.assert_close(cache.logits(batch.embeds, where), full.logits, atol=1e-5, rtol=1e-5)
    assert cache.full_forwards == 1


def test_more_regions_than_slots_are_chunked_and_batches_match_single_images(model):
    image = Image.open(INPUTS / "image.png")
    rng = np.random.default_rng(0)
    boxes = [(x, y) for x in range(0, 80, 16) for y in range(0, 48, 24)][:8]
    masks = []
    for x, y in boxes:
        m = np.zeros((64, 96), dtype=bool)
        m[y : y + 12 + int(rng.integers(0, 8)), x : x + 10 + int(rng.integers(0, 6))] = True
        masks.append(m)
    kwargs = dict(gen_length=4, steps=4)
    many = model.caption_regions(image, masks, **kwargs)  # 8 regions, 6 slots: 2 chunks
    assert len(many.captions) == 8
    singles = [model.caption_regions(image, [m], **kwargs) for m in masks[:2]]
    both = model.caption_regions([image, image], [[masks[0]], [masks[1]]], **kwargs)
    assert [r.token_ids for r in both] == [s.token_ids for s in singles]


def test_batch_of_two_equals_two_batches_of_one_at_the_model_level(model):
    processor = model.processor
    one = processor.caption_inputs([INPUTS / "image.png"], [MASKS], gen_length=4)
    two = processor.caption_inputs([INPUTS / "image.png", INPUTS / "image.png"], [MASKS, MASKS[:1]], gen_length=4)
    single = processor.caption_inputs([INPUTS / "image.png"], [MASKS[:1]], gen_length=4)

    def logits(inputs):
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            return model(**tensors).logits

    batched = logits(two)
    for row, alone in ((0, one), (1, single)):
        length = alone["input_ids"].shape[1]
        torch.testing.assert_close(batched[row, :length], logits(alone)[0], atol=1e-5, rtol=1e-5)


def base_checkpoint(tmp_path):
    return PerceptionDLM.from_pretrained(write_base_checkpoint(tmp_path / "base")).eval()


def test_base_chat_decodes_block_by_block(tmp_path):
    base = base_checkpoint(tmp_path)
    answer = base.chat(INPUTS / "image.png", "What is in the picture?", gen_length=8, block_length=4, steps=4,
                       keep_history=True)
    assert answer.stats.nfe == 4 and len(answer.history) == 4
    assert "<|mdm_mask|>" not in answer.text and answer.history[0].count("▢") == 6
    cached = base.chat(INPUTS / "image.png", "What is in the picture?", gen_length=8, block_length=4, steps=4,
                       cache=True, cache_refresh_every=1)
    assert cached.token_ids == answer.token_ids  # refreshing every step is the uncached computation
    guided = base.chat(INPUTS / "image.png", "What is in the picture?", gen_length=8, block_length=4, steps=4,
                       cfg_scale=2.0)
    assert guided.stats.nfe == 4 and len(guided.token_ids) <= 8
    two = base.chat([INPUTS / "image.png", INPUTS / "image.png"], "Compare <image> with <image>.", gen_length=4)
    text_only = base.chat(None, "Hello?", gen_length=4)
    assert two.stats.nfe == 4 and text_only.stats.nfe == 4
    with pytest.raises(PerceptionDLMError, match="Base"):
        base.caption_regions(INPUTS / "image.png", MASKS)


def test_bad_inference_input_raises_clear_errors(model):
    with pytest.raises(PerceptionDLMError, match="no masks"):
        model.caption_regions(INPUTS / "image.png", [])
    with pytest.raises(PerceptionDLMError, match="not found"):
        model.caption_regions(INPUTS / "missing.png", MASKS)
    with pytest.raises(PerceptionDLMError, match="decoding"):
        model.caption_regions(INPUTS / "image.png", MASKS, decoding="beam")
    with pytest.raises(PerceptionDLMError, match="empty"):
        model.caption_regions(INPUTS / "image.png", [np.zeros((64, 96), dtype=bool)])
