"""The tiny world's build steps that run before the training stages: the stand-ins for the backbones'
pretraining (patch labels, attribute codes, a few optimisation steps that change and save the weights) and the
exported model card."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file
from transformers import SiglipConfig, SiglipModel

from perceptiondlm import tiny_pretraining as tp
from perceptiondlm import tiny_world as tw
from perceptiondlm.data.synthetic import ATTRIBUTES, VALUES, language_pretraining_texts, make_scene
from perceptiondlm.models.configuration import LLaDAConfig
from perceptiondlm.models.llada import LLaDAModelLM


def test_patch_labels_name_the_object_under_each_patch_and_the_patch_cell():
    scene = make_scene(0, 3)
    labels = tp.patch_labels(scene, 8)
    assert labels.shape == (64, len(ATTRIBUTES) + 1)
    for row, (y, x) in zip(labels.tolist(), [(r * 8 + 4, c * 8 + 4) for r in range(8) for c in range(8)],
                           strict=True):
        owner = next((o for o, m in zip(scene.objects, scene.masks, strict=True) if m[y, x]), None)
        for a, value in zip(ATTRIBUTES, row, strict=False):
            assert value == (VALUES[a].index(getattr(owner, a)) if owner else len(VALUES[a]))
        assert row[-1] == 3 * (3 * y // 64) + 3 * x // 64


def test_attribute_codes_weight_appearance_and_give_background_no_code():
    codes = tp.attribute_codes(96, seed=0)
    for name, table in zip((*ATTRIBUTES, "cell"), codes, strict=True):
        norms = table.norm(dim=-1)
        assert torch.allclose(norms[:-1] if name != "cell" else norms, torch.tensor(tp.CODE_WEIGHTS[name]))
        if name != "cell":
            assert norms[-1] == 0
    assert all(torch.equal(a, b) for a, b in zip(codes, tp.attribute_codes(96, seed=0), strict=True))


def test_object_pooling_weights_each_patch_by_the_objects_coverage():
    scene = make_scene(0, 3)
    weights, values = tp.object_labels(scene, 8)
    assert weights.shape == (len(scene.objects), 64) and values.shape == (len(scene.objects), len(ATTRIBUTES))
    obj, mask = scene.objects[0], scene.masks[0]
    assert torch.equal(weights[0], torch.from_numpy(mask.reshape(8, 8, 8, 8).mean((1, 3))).flatten().float())
    assert values[0].tolist() == [VALUES[a].index(getattr(obj, a)) for a in ATTRIBUTES]
    features = torch.randn(2, 64, 6)
    pooled = tp.pool_objects(features, weights, torch.ones(len(weights), dtype=torch.long))
    assert torch.allclose(pooled[0], weights[0] @ features[1] / weights[0].sum())


def test_scene_batches_hold_every_visible_object_of_the_batch():
    data = tp.SceneBatches(steps=2, batch=3, seed=5, patch=8)[1]
    scenes = [make_scene(5, 3 + j) for j in range(3)]
    assert data["pixels"].shape == (3, 3, 64, 64) and data["labels"].shape == (3, 64, len(ATTRIBUTES) + 1)
    assert data["image_index"].tolist() == [b for b, s in enumerate(scenes) for _ in s.objects]
    assert len(data["weights"]) == len(data["values"]) == sum(len(s.objects) for s in scenes)


def test_pretraining_stand_ins_change_and_save_the_weights(tmp_path):
    llada = tmp_path / "llada"
    checkpoint = FIXTURES / "pdmllm" / "checkpoint"  # a tokenizer with the region tokens
    vocab = json.loads((checkpoint / "config.json").read_text())["language_model_config"]["vocab_size"]
    LLaDAModelLM(LLaDAConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2)).save_pretrained(llada)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(checkpoint / name, llada / name)
    before = load_file(llada / "model.safetensors")
    tp.pretrain_language_model(llada, language_pretraining_texts(2, seed=0), steps=2, batch=2)
    after = load_file(llada / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    siglip = tmp_path / "siglip"
    config = SiglipConfig(text_config=tp.TINY_SIGLIP_TEXT, vision_config=tp.TINY_SIGLIP_VISION)
    SiglipModel(config).save_pretrained(siglip)
    before = load_file(siglip / "model.safetensors")
    tp.pretrain_vision_tower(siglip, steps=2, batch=2, workers=0)
    after = load_file(siglip / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("vision_model.") for k in changed)


def test_vision_probe_reads_what_the_pooled_features_carry(tmp_path):
    siglip = tmp_path / "siglip"
    SiglipModel(SiglipConfig(text_config=tp.TINY_SIGLIP_TEXT, vision_config=tp.TINY_SIGLIP_VISION)).save_pretrained(
        siglip)
    accuracy = tp.probe_vision_tower(siglip, train_images=100, test_images=50)
    assert set(accuracy) == set(ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in accuracy.values())
    # A random tower passes each patch's mean colour on linearly, so pooling keeps colour (measured 0.89); an
    # outline is no linear function of pooled features, so shape stays near chance (0.25; measured 0.29)
    assert accuracy["colour"] > 0.6 and accuracy["shape"] < 0.5


def test_region_layout_texts_put_each_regions_word_sum_in_its_roi_span_and_train_only_the_answers():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(FIXTURES / "pdmllm" / "checkpoint")
    texts = tp.RegionLayoutTexts(tokenizer, seed=0)
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


def test_image_layout_texts_fill_each_patch_with_the_coverage_weighted_words_of_its_objects():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(FIXTURES / "pdmllm" / "checkpoint")
    texts = tp.ImageLayoutTexts(tokenizer, seed=0)
    embeddings = torch.nn.Embedding(len(tokenizer) + 8, 4)
    out = texts.batch(2, embeddings)
    ids, labels, embeds = out["ids"], out["labels"], out["embeds"]
    assert torch.equal(out["layout"], (out["layout"] > 0).long()) and out["layout"].shape == ids.shape
    scene = make_scene(104_729, 0)  # the first sample's scene
    image = ids[0] == texts.special.image_context
    assert image.sum() == 64 and (labels[0][image] == -100).all() and (labels[0] != -100).any()
    sums = torch.stack([embeddings(torch.tensor(texts.word_ids(o))).sum(0) for o in scene.objects])
    weights = torch.stack([tp.coverage(m, 8) for m in scene.masks], dim=1)
    assert torch.allclose(embeds[0, image], weights @ sums, atol=1e-6)
    background = weights.sum(1) == 0
    assert background.any() and (embeds[0, image][background] == 0).all()


def test_model_card_states_the_recipe_times_scores_and_the_choice():
    bench = {"avg": 91.5, "avg_pos": 90.0, "avg_neg": 93.0, "tpf": 5.5, "regions_per_second": 40.0,
             "attribute_accuracy": {a: 0.9 for a in ATTRIBUTES}}
    by_cover = {"partly_covered": {"regions": 20, "colour": 0.8, "shape": 0.85},
                "unoccluded": {"regions": 80, "colour": 0.99, "shape": 0.93}}
    report = {"train_seconds": {"vision_pretraining": 60.0, "s1": 30.0}, "total_seconds": 900.0, "recipe": "abc",
              "vision_probe": {"colour": 0.99, "shape": 0.95},
              "region": {"reference": bench, "threshold": {**bench, "attribute_accuracy_by_cover": by_cover}},
              "region_open": {"threshold": {**bench, "avg": 91.0}}, "base_qa": {
                  "accuracy": 0.93, "questions": 300, "attribute_accuracy": {"colour": 0.95}}}
    report["shipped"], report["shipped_because"] = tw.choose_variant(report)
    report["reproduction"] = tw.compare_reports(report, report)
    report["notes"] = ["Another job shared the cores."]
    card = tw.model_card(report)
    assert card.startswith("# tiny-perceptiondlm") and "| s1 | 30 |" in card
    assert "| region | threshold | 91.5 | 90.0 | 93.0 | 0.90 | 0.90 | 0.90 | 0.90 | 0.90 | 5.50 | 40.0 |" in card
    assert "| region_open | threshold | 91.0 |" in card and "colour 0.99, shape 0.95" in card
    assert "Shipped: `region`" in card and "accuracy 0.93 over 300 questions colour 0.95" in card
    assert "## Reproduction" in card and "largest difference 0.000" in card
    assert "\nAnother job shared the cores.\n" in card
    assert ("by occlusion: partly covered (20 regions) colour 0.80, shape 0.85; unoccluded (80 regions) colour 0.99, "
            "shape 0.93." in card)
    # a model made with another recipe is compared, but never called a reproduction
    report["reproduction"] = tw.compare_reports(report, {**report, "recipe": "xyz"})
    card = tw.model_card(report)
    assert not report["reproduction"]["same_recipe"] and "Not reproduced yet" in card
    assert "largest difference" not in card and "| score | this model | replaced model | difference |" in card


def test_the_released_layout_is_shipped_only_when_clearly_better():
    scores = {"region": {"threshold": {"avg": 90.0}}, "region_open": {"threshold": {"avg": 91.9}}}
    assert tw.choose_variant(scores)[0] == "region"
    scores["region_open"]["threshold"]["avg"] = 92.1
    assert tw.choose_variant(scores)[0] == "region_open"


def test_a_rebuild_is_compared_with_the_shipped_scores_and_the_card_shows_it():
    def report(avg, colour, qa):
        run = {"avg": avg, "attribute_accuracy": {"colour": colour, "shape": 0.9}}
        return {"region": {"threshold": run}, "region_open": {"reference": run}, "base_qa": {"accuracy": qa},
                "total_seconds": 2700.0, "recipe": "abc"}

    close = tw.compare_reports(report(92.0, 0.98, 0.50), report(93.5, 0.97, 0.51))
    assert close["within_tolerance"] and abs(close["max_abs_delta"] - 0.015) < 1e-9
    assert {r["score"] for r in close["rows"]} == {
        "region threshold avg", "region threshold colour", "region threshold shape", "region_open reference avg",
        "region_open reference colour", "region_open reference shape", "base qa"}
    far = tw.compare_reports(report(92.0, 0.98, 0.50), report(92.0, 0.90, 0.50))  # one attribute drifted
    assert not far["within_tolerance"] and abs(far["max_abs_delta"] - 0.08) < 1e-9
    lines = "\n".join(tw.reproduction_lines(close))
    assert "2700 s" in lines and "within ±0.02" in lines
    assert "| region threshold avg | 0.920 | 0.935 | +0.015 |" in lines  # this model, the other build
    assert "colour" not in lines.split("| score |")[1]  # the card lists the averages; the json has every score
    assert "on every score but region threshold colour (-0.080), region_open reference colour (-0.080)" in "\n".join(
        tw.reproduction_lines(far))


def test_a_resumed_build_reuses_finished_steps_up_to_the_first_changed_one(tmp_path):
    record, ran = tmp_path / "build_steps.json", []
    first = tw.BuildSteps(record)
    for name in ("data", "s1", "s2"):
        first.run(name, "v1", lambda n=name: ran.append(n))
    assert ran == ["data", "s1", "s2"] and set(json.loads(record.read_text())) == {"data", "s1", "s2"}

    ran.clear()
    resumed = tw.BuildSteps(record, resume=True)
    resumed.run("data", "v1", lambda: ran.append("data"))
    resumed.run("s1", "v2", lambda: ran.append("s1"))  # s1's config changed: it and every later step run again
    resumed.run("s2", "v1", lambda: ran.append("s2"))
    assert ran == ["s1", "s2"]
    assert resumed.seconds["data"] == first.seconds["data"]  # a reused step keeps its recorded time
    assert resumed.reused_seconds == first.seconds["data"]  # and counts in the build's from-scratch time
    assert json.loads(record.read_text())["s1"]["key"] == "v2"

    ran.clear()
    fresh = tw.BuildSteps(record)  # not resuming: everything runs
    fresh.run("data", "v1", lambda: ran.append("data"))
    assert ran == ["data"]


def test_an_interrupted_step_is_not_recorded_and_runs_again_on_resume(tmp_path):
    record = tmp_path / "build_steps.json"
    steps = tw.BuildSteps(record)
    steps.run("data", "v1", lambda: None)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        steps.run("s1", "v1", interrupted)
    assert set(json.loads(record.read_text())) == {"data"}
    ran = []
    resumed = tw.BuildSteps(record, resume=True)
    resumed.run("data", "v1", lambda: ran.append("data"))
    resumed.run("s1", "v1", lambda: ran.append("s1"))
    assert ran == ["s1"]


def test_a_resumed_build_retrains_only_the_stages_from_a_changed_config_on(tmp_path, monkeypatch):
    from pathlib import Path

    from perceptiondlm.training import trainer

    trained = []
    monkeypatch.setattr(trainer, "run_training", lambda config: trained.append(config.training_kwargs["output_dir"]))
    record, configs = tmp_path / "build_steps.json", Path("configs/tiny")
    tw.train_stages(configs, tw.STAGES, steps=tw.BuildSteps(record))
    assert len(trained) == len(tw.STAGES)
    trained.clear()
    tw.train_stages(configs, tw.STAGES, overrides={"region": ["--TRAINING_CONFIG.max_steps", "10"]},
                    steps=tw.BuildSteps(record, resume=True))
    assert trained == ["work_dirs/tiny/region"]  # the Base stages' configs did not change
