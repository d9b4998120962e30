"""The tiny world's build steps that run before the training stages: the stand-ins for the backbones'
pretraining (patch labels, attribute codes, a few optimisation steps that change and save the weights) and the
exported model card."""

from __future__ import annotations

import json
import shutil

import torch
from conftest import FIXTURES
from safetensors.torch import load_file
from transformers import SiglipConfig, SiglipModel

from perceptiondlm import tiny_world as tw
from perceptiondlm.data.synthetic import ATTRIBUTES, VALUES, language_pretraining_texts, make_scene
from perceptiondlm.models.configuration import LLaDAConfig
from perceptiondlm.models.llada import LLaDAModelLM


def test_patch_labels_name_the_object_under_each_patch_and_the_patch_cell():
    scene = make_scene(0, 3)
    labels = tw.patch_labels(scene, 8)
    assert labels.shape == (64, len(ATTRIBUTES) + 1)
    for row, (y, x) in zip(labels.tolist(), [(r * 8 + 4, c * 8 + 4) for r in range(8) for c in range(8)],
                           strict=True):
        owner = next((o for o, m in zip(scene.objects, scene.masks, strict=True) if m[y, x]), None)
        for a, value in zip(ATTRIBUTES, row, strict=False):
            assert value == (VALUES[a].index(getattr(owner, a)) if owner else len(VALUES[a]))
        assert row[-1] == 3 * (3 * y // 64) + 3 * x // 64


def test_attribute_codes_weight_appearance_and_give_background_no_code():
    codes = tw.attribute_codes(96, seed=0)
    for name, table in zip((*ATTRIBUTES, "cell"), codes, strict=True):
        norms = table.norm(dim=-1)
        assert torch.allclose(norms[:-1] if name != "cell" else norms, torch.tensor(tw.CODE_WEIGHTS[name]))
        if name != "cell":
            assert norms[-1] == 0
    assert all(torch.equal(a, b) for a, b in zip(codes, tw.attribute_codes(96, seed=0), strict=True))


def test_object_features_pool_each_object_by_its_coverage_and_sum_its_codes():
    scene = make_scene(0, 3)
    codes = tw.attribute_codes(6, seed=0)
    features = torch.randn(1, 64, 6)
    pooled, wanted = tw.object_features([scene], features, codes, 8)
    assert pooled.shape == wanted.shape == (len(scene.objects), 6)
    obj, mask = scene.objects[0], scene.masks[0]
    weight = torch.from_numpy(mask.reshape(8, 8, 8, 8).mean((1, 3))).flatten().float()
    assert torch.allclose(pooled[0], weight @ features[0] / weight.sum())
    expected = sum(c[VALUES[a].index(getattr(obj, a))] for a, c in zip(ATTRIBUTES, codes, strict=False))
    assert torch.allclose(wanted[0], expected)


def test_pretraining_stand_ins_change_and_save_the_weights(tmp_path):
    llada = tmp_path / "llada"
    checkpoint = FIXTURES / "pdmllm" / "checkpoint"  # a tokenizer with the region tokens
    vocab = json.loads((checkpoint / "config.json").read_text())["language_model_config"]["vocab_size"]
    LLaDAModelLM(LLaDAConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2)).save_pretrained(llada)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(checkpoint / name, llada / name)
    before = load_file(llada / "model.safetensors")
    tw.pretrain_language_model(llada, language_pretraining_texts(2, seed=0), steps=2, batch=2)
    after = load_file(llada / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    siglip = tmp_path / "siglip"
    config = SiglipConfig(text_config=tw.TINY_SIGLIP_TEXT, vision_config=tw.TINY_SIGLIP_VISION)
    SiglipModel(config).save_pretrained(siglip)
    before = load_file(siglip / "model.safetensors")
    tw.pretrain_vision_tower(siglip, steps=2, batch=2)
    after = load_file(siglip / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("vision_model.") for k in changed)


def test_region_layout_texts_put_each_regions_word_sum_in_its_roi_span_and_train_only_the_answers():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(FIXTURES / "pdmllm" / "checkpoint")
    texts = tw.RegionLayoutTexts(tokenizer, seed=0)
    embeddings = torch.nn.Embedding(len(tokenizer) + 8, 4)
    out = texts.batch(3, embeddings)
    ids, labels, embeds, layout = out["ids"], out["labels"], out["embeds"], out["layout"]
    special = texts.special
    assert layout.shape == (3, 1, ids.shape[1], ids.shape[1])
    for b in range(3):
        roi = torch.isin(ids[b], torch.tensor(special.reserved))
        assert roi.sum() % 16 == 0 and not (ids[b] == special.image_context).any()
        first_slot = int(torch.nonzero(ids[b] == special.caption_slots[0])[0])
        assert (labels[b, :first_slot] == -100).all() and (labels[b, first_slot:][ids[b, first_slot:] != special.eot]
                                                          != -100).all()
        span = embeds[b, ids[b] == special.reserved[0]]
        assert torch.allclose(span, span[:1].expand_as(span))  # one vector over the span
        assert not torch.allclose(span[0], embeddings.weight[special.reserved[0]])
        slot = int(torch.nonzero(ids[b] == special.caption_slots[0])[0]) + 2
        assert layout[b, 0, slot][ids[b] == special.reserved[0]].all()


def test_model_card_states_the_recipe_times_and_scores():
    bench = {"avg": 91.5, "avg_pos": 90.0, "avg_neg": 93.0, "tpf": 5.5,
             "attribute_accuracy": {a: 0.9 for a in ATTRIBUTES}}
    report = {"train_seconds": {"vision_pretraining": 60.0, "s1": 30.0}, "total_seconds": 900.0,
              "region": {"reference": bench, "threshold": bench}, "base_qa": {
                  "accuracy": 0.93, "questions": 300, "attribute_accuracy": {"colour": 0.95}}}
    card = tw.model_card(report)
    assert card.startswith("# tiny-perceptiondlm") and "| s1 | 30 |" in card
    assert "| region | threshold | 91.5 | 90.0 | 93.0 | 0.90 | 0.90 | 0.90 | 0.90 | 0.90 | 5.50 |" in card
    assert "accuracy 0.93 over 300 questions colour 0.95" in card
