"""The PerceptionDLM model: golden parity layer by layer, checkpoint layout, region parts, loss."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig

from perceptiondlm import PerceptionDLMError
from perceptiondlm.diffusion.noise import diffusion_loss, mask_tokens, sample_noise_levels
from perceptiondlm.models.configuration import PerceptionDLMBaseConfig, PerceptionDLMConfig
from perceptiondlm.models.perceptiondlm import PerceptionDLM
from perceptiondlm.models.regions import merge_tiles, region_attention_mask, roi_tokens
from perceptiondlm.processing.masks import patch_activity
from perceptiondlm.processing.tokens import SpecialTokens

CHECKPOINT = FIXTURES / "pdmllm" / "checkpoint"
GOLDEN = load_file(str(FIXTURES / "pdmllm" / "golden.safetensors"))
RECORDED = json.loads((FIXTURES / "pdmllm" / "golden.json").read_text())


@pytest.fixture(scope="module")
def golden_model() -> PerceptionDLM:
    return PerceptionDLM.from_pretrained(CHECKPOINT).eval()


def golden_inputs() -> dict:
    masks = GOLDEN["masks_sorted"].bool().numpy()
    grid = tuple(GOLDEN["aspect_ratios"][0].tolist())
    patches = [patch_activity(m, i, 64, grid, 16, "compat").reshape(7, -1) for i, m in enumerate(masks)]
    return dict(
        input_ids=GOLDEN["input_ids_expanded"], pixel_values=GOLDEN["pixel_values"], num_tiles=torch.tensor([7]),
        image_grids=GOLDEN["aspect_ratios"], region_patches=torch.stack(patches, dim=1),
        region_prompt_ids=torch.tensor([[0, 1, 2]]), region_boxes=GOLDEN["bboxes"][None].float(),
    )


def test_golden_checkpoint_loads_with_no_key_left_over(golden_model):
    with safe_open(str(CHECKPOINT / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    ours = set(golden_model.state_dict())
    assert ours <= stored
    left_over = stored - ours
    unused = ("vision_model.text_model.", "vision_model.logit_", "vision_model.vision_model.head.")
    assert left_over and all(k.startswith(unused) for k in left_over)
    assert golden_model.special_tokens.mask == RECORDED["special_token_ids"]["<|mdm_mask|>"]


def test_golden_parity_layer_by_layer(golden_model):
    inputs = golden_inputs()
    ids = inputs.pop("input_ids")
    with torch.no_grad():
        embeds = golden_model.embed_inputs(ids, **inputs)
        embeds_training = golden_model.embed_inputs(ids, training=True, **inputs)
        logits = golden_model(ids, **inputs).logits
    torch.testing.assert_close(embeds, GOLDEN["inputs_embeds"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds_training, GOLDEN["inputs_embeds_forward_path"], atol=1e-5, rtol=1e-5)
    layout = golden_model.attention_layout(ids, None)
    assert torch.equal(~layout, GOLDEN["attention_mask_4d"] < 0)
    answers = GOLDEN["answer_positions"]
    torch.testing.assert_close(logits[0, answers], GOLDEN["logits_answer"], atol=1e-4, rtol=1e-4)


def test_golden_roi_features():
    grid = tuple(GOLDEN["aspect_ratios"][0].tolist())
    feature_map = merge_tiles(GOLDEN["vision_embeds"], grid, skip_first_tile=True)
    pooled = roi_tokens(feature_map, GOLDEN["bboxes"].float(), 4, 1 / 32)  # (R, 16, D)
    expected = GOLDEN["roi_features_generate"].flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=1e-6)


def test_corrected_roi_mode_pools_the_region_from_the_right_crop():
    tiles = torch.arange(7.0)[:, None, None].expand(7, 4, 3).clone()  # tile t is constant t
    crops = merge_tiles(tiles, (3, 2), skip_first_tile=False)  # (3, 4, 6): crops 0..5 in place
    assert crops[0, 0, 0] == 0 and crops[0, 3, 5] == 5
    box = torch.tensor([[0.78, 0.66, 0.98, 0.98]])  # well inside crop 5 (bottom right): no bilinear mixing
    assert torch.all(roi_tokens(crops, box, 2, 1.0) == 5)
    quirk = merge_tiles(tiles, (3, 2), skip_first_tile=True)  # thumbnail (6) in the last cell
    assert torch.all(roi_tokens(quirk, box, 2, 1.0) == 6)


def test_region_layout_isolates_slots_and_roi_tokens():
    special = SpecialTokens.from_tokenizer(CHECKPOINT)
    r0, r1 = special.reserved[:2]
    s0, s1 = special.caption_slots[:2]
    # prefix(3) | r0 r0 | sep | r1 r1 | question(2) | s0 a a | s1 b b | eot | pad
    ids = torch.tensor([[5, 6, 7, r0, r0, 10, r1, r1, 11, 12, s0, 40, 41, s1, 42, 43, special.eot, special.eot]])
    pad = torch.ones_like(ids)
    pad[0, -1] = 0
    reserved, slots = torch.tensor(special.reserved[:6]), torch.tensor(special.caption_slots[:6])
    allowed = region_attention_mask(ids, reserved, slots, pad)[0, 0]
    slot0, slot1 = list(range(10, 13)), list(range(13, 17))
    shared = [0, 1, 2, 8, 9]
    for q in slot0:
        assert allowed[q, shared + [3, 4] + slot0].all()
        assert not allowed[q, [5, 6, 7] + slot1 + [17]].any()
    for q in slot1:
        assert allowed[q, shared + [6, 7] + slot1].all()
        assert not allowed[q, [3, 4, 5] + slot0 + [17]].any()
    assert allowed[:10, :17].all() and not allowed[:, 17].any()  # the prompt sees everything but padding
    closed = region_attention_mask(ids, reserved, slots, pad, prefix_attends_answers=False)[0, 0]
    assert closed[:10, :10].all() and not closed[:10, 10:].any()
    assert torch.equal(closed[10:], allowed[10:])


def tiny_config(**overrides) -> PerceptionDLMConfig:
    """A tiny region model in the released layout, matching the golden tokenizer's 334 ids."""
    lm = json.loads((CHECKPOINT / "config.json").read_text())["language_model_config"]
    vision = SiglipConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
    ).to_dict()
    fields = dict(language_model_config=lm, vision_model_config=vision, vision_abstractor_config={
        "projection_type": "mlp2x_gelu"}, image_token_id=308, image_size=32, patch_size=8)
    return PerceptionDLMConfig(**{**fields, **overrides})


def test_tiny_model_round_trips_through_save_pretrained(tmp_path):
    special = SpecialTokens.from_tokenizer(CHECKPOINT)
    model = PerceptionDLM(tiny_config(), special_tokens=special).eval()
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHECKPOINT / name, tmp_path / name)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "mask_id_embedding.weight" in keys and "vision_abstractor.projection.2.bias" in keys
    assert any(k.startswith("vision_model.vision_model.encoder.layers.1.") for k in keys)
    assert any(k.startswith("language_model.model.layers.1.") for k in keys)
    reloaded = PerceptionDLM.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "pdmllm"


def test_base_model_has_no_region_parts(tmp_path):
    fields = tiny_config().to_dict()
    for key in ("prompt_numbers", "roi_output_size", "model_type"):
        fields.pop(key)
    base = PerceptionDLM(PerceptionDLMBaseConfig(**fields), special_tokens=SpecialTokens.from_tokenizer(CHECKPOINT))
    assert not hasattr(base, "mask_id_embedding")
    ids = torch.tensor([[1, 2, 308, 308, 308, 308, 3]])
    with torch.no_grad():
        logits = base(ids, pixel_values=torch.zeros(1, 3, 32, 32), num_tiles=torch.tensor([1])).logits
    assert logits.shape == (1, 7, 334)
    with pytest.raises(PerceptionDLMError, match="Base model"):
        base(ids, pixel_values=torch.zeros(1, 3, 32, 32), num_tiles=torch.tensor([1]),
             region_prompt_ids=torch.tensor([[0]]))


def test_loss_uses_only_masked_logits(golden_model):
    inputs = golden_inputs()
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    answers = GOLDEN["answer_positions"]
    labels[0, answers] = GOLDEN["output_slot_tokens"].flatten()
    eligible = labels != -100
    def masks_some(seed: int) -> bool:
        torch.manual_seed(seed)
        return int(mask_tokens(eligible, sample_noise_levels(1)).sum()) > 3

    seed = next(s for s in range(100) if masks_some(s))
    torch.manual_seed(seed)
    with torch.no_grad():
        loss = golden_model(labels=labels, **inputs).loss
    torch.manual_seed(seed)
    p = sample_noise_levels(1)
    masked = mask_tokens(eligible, p)
    with torch.no_grad():
        embeds = golden_model.embed_inputs(training=True, **inputs)
        mask_row = golden_model.language_model.get_input_embeddings().weight[golden_model.special_tokens.mask]
        embeds[masked] = mask_row
        layout = golden_model.attention_layout(ids, None)
        full = golden_model.language_model(inputs_embeds=embeds, attention_mask=layout).logits  # (1, L, V)
    expected = diffusion_loss(full[masked], labels[masked], masked, p, eligible)
    assert masked.any() and loss > 0
    torch.testing.assert_close(loss, expected)


def test_bad_inputs_and_checkpoints_raise_clear_errors(golden_model, tmp_path):
    inputs = golden_inputs()
    inputs["region_prompt_ids"] = torch.arange(7)[None]
    with pytest.raises(PerceptionDLMError, match="region slots"):
        golden_model(**inputs)
    inputs = golden_inputs()
    ids = inputs["input_ids"].clone()
    image = golden_model.config.image_token_id
    ids[ids == image] = torch.where(torch.arange(int((ids == image).sum())) == 0, 5, image)  # one token short
    inputs["input_ids"] = ids
    with pytest.raises(PerceptionDLMError, match="IMG_CONTEXT"):
        golden_model(**inputs)
    shutil.copytree(CHECKPOINT, tmp_path / "ckpt")
    config = json.loads((CHECKPOINT / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(PerceptionDLMError, match="qwen2_vl"):
        PerceptionDLM.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    weights = load_file(str(CHECKPOINT / "model.safetensors"))
    weights.pop("mask_id_embedding.weight")
    save_file(weights, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(PerceptionDLMError, match="mask_id_embedding.weight"):
        PerceptionDLM.from_pretrained(tmp_path / "ckpt")
