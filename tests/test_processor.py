"""PerceptionDLMProcessor: golden parity with the reference preprocessing, labels, batching, errors, files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from PIL import Image
from safetensors.torch import load_file

from perceptiondlm import PerceptionDLMError
from perceptiondlm.processing.processor import IGNORE_INDEX, PerceptionDLMProcessor
from perceptiondlm.processing.prompts import CHAT_TEMPLATE, region_messages, render_chat

PDMLLM = FIXTURES / "pdmllm"
CHECKPOINT = PDMLLM / "checkpoint"
INPUTS = PDMLLM / "inputs"
IMAGE = INPUTS / "image.png"
MASKS = [INPUTS / "mask_a.png", INPUTS / "mask_b_halfres.png", INPUTS / "mask_c.png"]
GOLDEN = load_file(PDMLLM / "golden.safetensors")
RECORD = json.loads((PDMLLM / "golden.json").read_text())


@pytest.fixture(scope="module")
def processor() -> PerceptionDLMProcessor:
    return PerceptionDLMProcessor.from_pretrained(CHECKPOINT)


def second_sample() -> tuple[Image.Image, list[np.ndarray]]:
    """A 64×64 image (one tile) with two box masks."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    small, big = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    small[5:15, 5:20], big[20:60, 10:50] = True, True
    return image, [small, big]


def test_checkpoint_settings_and_single_token_specials(processor):
    assert (processor.image_size, processor.patch_size, processor.num_image_tokens) == (64, 16, 4)
    assert (processor.prompt_numbers, processor.roi_output_size, processor.mask_activity) == (6, (4, 4), "compat")
    assert processor.pad_token_id == RECORD["special_token_ids"]["<|eot_id|>"]
    for token, token_id in RECORD["special_token_ids"].items():
        assert processor.tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id], token


def test_region_messages_render_the_golden_prompt():
    text, spans = render_chat(region_messages(3, gen_length=8))
    per_image = RECORD["num_tiles"] * RECORD["num_image_token_per_tile"]
    assert text.replace("<IMG_CONTEXT>", "<IMG_CONTEXT>" * per_image) == RECORD["prompt_text"]
    assert text[spans[0][0]:].startswith("<|Mask_Cap_0|>") and text[spans[0][0]:spans[0][1]] == text[spans[0][0]:]


def test_golden_inference_inputs(processor):
    out = processor.caption_inputs([IMAGE], [MASKS], gen_length=8)
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values", "num_tiles", "image_grids",
                               "region_patches", "region_prompt_ids", "region_boxes", "region_order"}
    assert torch.equal(out["input_ids"], GOLDEN["input_ids_expanded"])
    assert torch.equal(out["attention_mask"], torch.ones(1, 174, dtype=torch.long))
    ids = out["input_ids"][0].tolist()  # collapsing each RoI run back to one token gives the tokenized prompt
    reserved = set(processor.special_tokens.reserved)
    collapsed = [t for i, t in enumerate(ids) if not (t in reserved and i and ids[i - 1] == t)]
    assert collapsed == GOLDEN["input_ids"][0].tolist()
    reserved_ids = processor.special_tokens.reserved[:3]
    spans = [[i, ids.index(r), len(ids) - ids[::-1].index(r)] for i, r in enumerate(reserved_ids)]
    assert spans == RECORD["reserved_token_spans"]
    assert torch.equal(out["pixel_values"], GOLDEN["pixel_values"])
    assert out["num_tiles"].tolist() == [7] and torch.equal(out["image_grids"], GOLDEN["aspect_ratios"])
    assert torch.equal(out["region_boxes"][0], GOLDEN["bboxes"])
    assert out["region_order"] == [RECORD["sort_idx_area_descending"]]
    assert out["region_prompt_ids"].tolist() == [[0, 1, 2]]
    assert out["region_patches"].shape == (7, 3, 16) and out["region_patches"].dtype == torch.bool
    weight = load_file(CHECKPOINT / "model.safetensors")["mask_id_embedding.weight"]
    embeds = (out["region_patches"][..., None].float() * weight[out["region_prompt_ids"][0]][None, :, None]).sum(1)
    torch.testing.assert_close(embeds, GOLDEN["vision_mask_embeds"], atol=1e-6, rtol=0)


def test_training_labels_cover_exactly_the_answer(processor):
    captions = ["an ellipse", "a big box", "a small box"]  # caller order: mask_a, mask_b, mask_c
    out = processor.caption_examples([IMAGE], [MASKS], [captions], generator=torch.Generator().manual_seed(0))
    ids, labels = out["input_ids"][0], out["labels"][0]
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    start = int(torch.nonzero(keep)[0])
    assert keep[start:].all() and not keep[:start].any()  # one contiguous span up to the end
    tokens = processor.special_tokens
    assert ids[start - 2: start].tolist() == [tokens.end_header, processor.tokenizer.convert_tokens_to_ids("\u010a")]
    order = out["region_order"][0]
    expected = "\n".join(f"<|Mask_Cap_{i}|>{captions[j]}" for i, j in enumerate(order)) + "<|eot_id|>"
    assert processor.tokenizer.decode(ids[keep]) == expected
    assert int(ids[-1]) == tokens.eot and int((ids == tokens.eot).sum()) == 3  # system, user, answer


def test_captions_can_be_padded_with_eot_to_the_slot_length(processor):
    captions = ["an ellipse", "a big box", "a small box"]
    out = processor.caption_examples([IMAGE], [MASKS], [captions], caption_length=14,
                                     generator=torch.Generator().manual_seed(0))
    ids, labels = out["input_ids"][0], out["labels"][0]
    text = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    for i in range(3):  # every slot: its caption, then eot tokens up to 14 tokens
        slot = text.split(f"<|Mask_Cap_{i}|>")[1].split("\n")[0].replace("<|eot_id|>", "")
        assert slot in captions
    for caption in captions:
        assert len(processor.tokenizer(processor.pad_caption(caption, 14), add_special_tokens=False)["input_ids"]) == 14
    assert processor.pad_caption("a very long caption with many words", 3) == "a very long caption with many words"


def test_batch_pads_right_and_rows_match_single_samples(processor):
    image2, masks2 = second_sample()
    caps = [["a", "b", "c"], ["tiny", "large one"]]
    gen = torch.Generator().manual_seed(3)
    batch = processor.caption_examples([IMAGE, image2], [MASKS, masks2], caps, prompt_ids=[[4, 0, 2], [1, 5]])
    singles = [processor.caption_examples([img], [m], [c], prompt_ids=[p], generator=gen)
               for img, m, c, p in ((IMAGE, MASKS, caps[0], [4, 0, 2]), (image2, masks2, caps[1], [1, 5]))]
    assert batch["num_tiles"].tolist() == [7, 1] and batch["image_grids"].tolist() == [[3, 2], [1, 1]]
    assert batch["region_patches"].shape == (8, 3, 16)
    assert batch["region_prompt_ids"].tolist() == [[4, 0, 2], [1, 5, -1]]
    assert not batch["region_patches"][7, 2].any() and not batch["region_boxes"][1, 2].any()
    assert batch["region_order"] == [[1, 0, 2], [1, 0]]
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in singles]))
    for b, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        for key in ("input_ids", "labels"):
            assert torch.equal(batch[key][b, :n], single[key][0])
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][b, n:] == processor.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        k = len(single["region_order"][0])
        assert torch.equal(batch["region_boxes"][b, :k], single["region_boxes"][0])
        rows = slice(0, 7) if b == 0 else slice(7, 8)
        assert torch.equal(batch["region_patches"][rows, :k], single["region_patches"])


def test_training_prompt_ids_are_a_reproducible_permutation(processor):
    image, masks = second_sample()
    masks = masks + [np.roll(masks[1], 3, axis=1) for _ in range(4)]  # 6 regions = prompt_numbers

    def draw(seed: int) -> list[int]:
        out = processor.caption_examples([image], [masks], [["x"] * 6], generator=torch.Generator().manual_seed(seed))
        return out["region_prompt_ids"][0].tolist()

    first = draw(0)
    assert sorted(first) == list(range(6)) and draw(0) == first
    assert any(draw(seed) != first for seed in range(1, 5))
    with pytest.raises(PerceptionDLMError, match="distinct"):
        processor.caption_examples([image], [masks[:2]], [["a", "b"]], prompt_ids=[[1, 1]])


def test_region_errors(processor, tmp_path):
    image, masks = second_sample()
    with pytest.raises(PerceptionDLMError, match="prompt_numbers = 6"):
        processor.caption_inputs([image], [masks * 4])
    with pytest.raises(PerceptionDLMError, match="no masks"):
        processor.caption_inputs([image], [[]])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(PerceptionDLMError, match="broken.png"):
        processor.caption_inputs([broken], [masks])
    with pytest.raises(PerceptionDLMError, match="missing.png"):
        processor.caption_inputs([tmp_path / "missing.png"], [masks])
    with pytest.raises(PerceptionDLMError, match="aspect ratio"):
        processor.caption_inputs([image], [[np.ones((10, 30), bool)]])
    with pytest.raises(PerceptionDLMError, match="2 captions for 3 masks"):
        processor.caption_examples([IMAGE], [MASKS], [["a", "b"]])


def copy_checkpoint(tmp_path, **config_changes):
    directory = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, directory, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    for key, value in config_changes.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_base_model_refuses_regions_and_chats(tmp_path):
    base = PerceptionDLMProcessor.from_pretrained(copy_checkpoint(tmp_path, prompt_numbers=None,
                                                                  roi_output_size=None))
    image, masks = second_sample()
    with pytest.raises(PerceptionDLMError, match="without region parts"):
        base.caption_inputs([image], [masks])
    out = base.chat_inputs([IMAGE, [IMAGE, image], None], ["What is red?", "<image> or <image>?", "Hello"])
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values", "num_tiles"}
    assert out["num_tiles"].tolist() == [7, 2, 0] and out["pixel_values"].shape == (9, 3, 64, 64)
    counts = (out["input_ids"] == base.special_tokens.image_context).sum(1).tolist()
    assert counts == [28, 8, 0]  # a sample with two images gets one 1×1 tile per image
    first = base.tokenizer.decode(out["input_ids"][0][out["attention_mask"][0].bool()])
    # as the training loader renders "<image>\nWhat is red?": text pieces stripped, no "\n" after </img>
    assert first.endswith("</img>What is red?<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nColour?"}]},
                    {"role": "assistant", "content": "Red."},
                    {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Blue."}]
    train = base.chat_examples([IMAGE], [conversation])
    labels = train["labels"][0]
    assert base.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "Red.<|eot_id|>Blue.<|eot_id|>"
    # LLaDA's EOS padding: each answer (its closing <|eot_id|> included) fills answer_length tokens, all trained
    padded = base.chat_examples([IMAGE], [conversation], answer_length=8)
    answer_ids = padded["labels"][0][padded["labels"][0] != IGNORE_INDEX]
    red, blue = (len(base.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ("Red.", "Blue."))
    assert len(answer_ids) == 16 and max(red, blue) < 7
    assert base.tokenizer.decode(answer_ids) == "Red." + "<|eot_id|>" * (8 - red) + "Blue." + "<|eot_id|>" * (8 - blue)
    assert padded["attention_mask"][0].sum() == train["attention_mask"][0].sum() + 14 - red - blue
    long = base.chat_examples([IMAGE], [conversation], answer_length=1)  # longer answers stay as they are
    assert torch.equal(long["labels"], train["labels"])
    with pytest.raises(PerceptionDLMError, match="2 image slots but 1 images"):
        base.chat_inputs([IMAGE], ["<image><image>"])


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "chat_template.json").read_text())["chat_template"] == CHAT_TEMPLATE
    shutil.copy(CHECKPOINT / "config.json", tmp_path / "config.json")  # written by the model's save_pretrained
    reloaded = PerceptionDLMProcessor.from_pretrained(tmp_path)
    assert reloaded.special_tokens == processor.special_tokens and len(reloaded.tokenizer) == len(processor.tokenizer)
    a = processor.caption_inputs([IMAGE], [MASKS], gen_length=4)
    b = reloaded.caption_inputs([IMAGE], [MASKS], gen_length=4)
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]


def test_checkpoint_file_errors_and_coverage_mode(tmp_path):
    directory = copy_checkpoint(tmp_path)
    coverage = PerceptionDLMProcessor.from_pretrained(directory, mask_activity="coverage")
    out = coverage.caption_inputs([IMAGE], [MASKS], gen_length=8)
    assert out["region_patches"].shape == (7, 3, 16) and torch.equal(out["input_ids"], GOLDEN["input_ids_expanded"])
    preprocessor = json.loads((directory / "preprocessor_config.json").read_text())
    (directory / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "image_mean": [0.48] * 3}))
    with pytest.raises(PerceptionDLMError, match="image_mean"):
        PerceptionDLMProcessor.from_pretrained(directory)
    (directory / "processor_config.json").unlink()
    with pytest.raises(PerceptionDLMError, match="processor_config.json"):
        PerceptionDLMProcessor.from_pretrained(directory)
