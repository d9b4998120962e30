"""The tiny world: deterministic scenes, visible-pixel masks, captions, the on-disk formats of the real data, the
ParaDLC-format benchmark with its rule-based judge, and the tiny tokenizer."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FIXTURES
from PIL import Image
from pycocotools import mask as mask_utils
from transformers import PreTrainedTokenizerFast

from perceptiondlm.data import synthetic as sw
from perceptiondlm.data.tiny_tokenizer import SPECIAL_TOKENS, train_tiny_tokenizer
from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.processing.prompts import CHAT_TEMPLATE, region_messages, render_chat
from perceptiondlm.processing.tokens import SpecialTokens

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools/numpy 2

SAMPLE = FIXTURES / "paradlc-sample"
N_IMAGES = 14  # two full cycles of the object counts 2..8


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_world")
    sw.write_region_split(root / "regions", N_IMAGES, seed=1)
    sw.write_conversation_split(root / "conversations", N_IMAGES, seed=1)
    sw.write_benchmark_split(root / "bench", N_IMAGES, seed=2)
    return {name: root / name for name in ("regions", "conversations", "bench")}


def test_same_seed_gives_byte_identical_files_and_other_seeds_other_images(splits, tmp_path):
    sw.write_region_split(tmp_path / "regions", N_IMAGES, seed=1)
    sw.write_conversation_split(tmp_path / "conversations", N_IMAGES, seed=1)
    sw.write_benchmark_split(tmp_path / "bench", N_IMAGES, seed=2)
    for name, root in splits.items():
        assert _hashes(tmp_path / name) == _hashes(root), name
    train = {h for p, h in _hashes(splits["regions"]).items() if p.endswith(".png")}
    bench = {h for p, h in _hashes(splits["bench"]).items() if p.endswith(".png")}
    assert len(train) == len(bench) == N_IMAGES and not train & bench


def test_masks_are_the_visible_pixels_of_each_object():
    counts = set()
    for index in range(N_IMAGES):
        scene = sw.make_scene(0, index)
        counts.add(len(scene.objects))
        assert scene.image.shape == (sw.IMAGE_SIZE, sw.IMAGE_SIZE, 3) and scene.image.dtype == np.uint8
        assert (np.sum(scene.masks, axis=0) <= 1).all(), "visible masks must not overlap"
        for k, (obj, mask) in enumerate(zip(scene.objects, scene.masks, strict=True)):
            full = sw._shape_mask(obj.shape, *obj.centre, obj.radius)
            assert mask.any() and (mask <= full).all()
            assert obj.visible_fraction == round(mask.sum() / full.sum(), 4)
            assert obj.visible_fraction == 1.0 or 0.5 <= obj.visible_fraction <= 0.8
            assert obj.partly_covered == (not (mask == full).all())
            if k == len(scene.objects) - 1:
                assert (mask == full).all(), "the last object drawn is never covered"
            colour = np.array(sw.COLOURS[obj.colour])
            shades = {tuple(colour), tuple(np.rint(colour * sw.STRIPE_SHADE).astype(int))}
            seen = {tuple(int(c) for c in px) for px in scene.image[mask]}
            assert seen <= shades and (len(seen) == 2) == (obj.texture == "striped")
    assert counts == set(range(sw.MIN_OBJECTS, sw.MAX_OBJECTS + 1))


def test_captions_follow_the_grammar_and_parse_back_to_the_attributes():
    obj = sw.ShapeObject("triangle", "red", "large", "striped", "top left", (10.0, 10.0), 11.0, 0.6)
    assert sw.object_caption(obj) == "a large red striped triangle in the top left, partly covered"
    for index in range(N_IMAGES):
        scene = sw.make_scene(3, index)
        for obj in scene.objects:
            parsed = sw.parse_caption(sw.object_caption(obj))
            assert parsed == {**obj.attributes(), "mentioned": True}
        caption = sw.scene_caption(scene)
        assert caption.startswith(f"{len(scene.objects)} shapes: ") and caption.count(";") == len(scene.objects) - 1
    assert sw.parse_caption("Top-left: a big violet solid Circle.") == {
        "colour": "purple", "shape": "circle", "size": "large", "texture": "plain", "position": "top left",
        "partly_covered": False, "mentioned": True}
    assert sw.parse_caption("it is on the right")["position"] == "middle right"
    assert not sw.parse_caption("")["mentioned"]


def test_region_records_and_rle(splits):
    root = splits["regions"]
    records = json.loads((root / "regions.json").read_text())
    assert len(records) == N_IMAGES
    for record in records:
        assert set(record) == {"image", "mask_rles", "captions"}
        assert len(record["mask_rles"]) == len(record["captions"]) >= 2
        image = Image.open(root / record["image"])
        assert image.mode == "RGB" and image.size == (sw.IMAGE_SIZE, sw.IMAGE_SIZE)
        for rle in record["mask_rles"]:
            assert isinstance(rle["counts"], str) and rle["size"] == [sw.IMAGE_SIZE, sw.IMAGE_SIZE]
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert mask.shape == (sw.IMAGE_SIZE, sw.IMAGE_SIZE) and mask.any()
    config = yaml.safe_load((root / "regions_datasets.yaml").read_text())
    assert config == {"tiny_regions": {"data_file": "regions.json", "data_type": "json", "num_samples": -1}}


def test_single_region_records(tmp_path):
    root = tmp_path / "regions"
    sw.write_region_split(root, 3, seed=1, single_regions=5)
    records = json.loads((root / "regions.json").read_text())
    singles = json.loads((root / "regions_single.json").read_text())
    assert len(singles) == 5 and [s["image"] for s in singles] == [records[i % 3]["image"] for i in range(5)]
    for single in singles:  # one object of its image, mask and caption together
        full = next(r for r in records if r["image"] == single["image"])
        assert len(single["captions"]) == 1
        j = full["captions"].index(single["captions"][0])
        assert single["mask_rles"] == [full["mask_rles"][j]]
    config = yaml.safe_load((root / "regions_datasets.yaml").read_text())
    assert config["tiny_single_regions"] == {"data_file": "regions_single.json", "data_type": "json",
                                             "num_samples": -1}


def test_conversations_parquet(splits):
    pq = pytest.importorskip("pyarrow.parquet")
    root = splits["conversations"]
    config = yaml.safe_load((root / "conversations_datasets.yaml").read_text())["tiny_conversations"]
    assert config["data_type"] == "parquet"
    rows = pq.read_table(root / config["data_file"]).to_pylist()
    assert len(rows) == config["num_samples"] == 2 * N_IMAGES
    for row in rows:
        turns, images = row["conversations"], row["images"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(t["value"].strip() for t in turns)
        assert sum(t["value"].count("<image>") for t in turns) == len(images) == 1
        assert Image.open(io.BytesIO(images[0]["bytes"])).size == (sw.IMAGE_SIZE, sw.IMAGE_SIZE)
    answers = [t["value"] for row in rows for t in row["conversations"][1::2]]
    assert any(a.endswith(".") and "shapes:" in a for a in answers) and {"Yes", "No"} <= set(answers)


def _expected_answer(question: str, objects: list[sw.ShapeObject]) -> str:
    """Answers a tiny-world question from the ground truth, reading it with the caption parser."""
    ref = sw.parse_caption(question.replace(" plain or striped", "").replace(" partly covered", ""))
    named = {a: v for a, v in ref.items() if a in sw.ATTRIBUTES and v is not None}
    matches = [o for o in objects if all(getattr(o, a) == v for a, v in named.items())]
    if question.startswith("How many"):
        return str(len(matches))
    if question.startswith("Is there"):
        return "Yes" if matches else "No"
    assert len(matches) == 1, question
    asked = {"What colour": "colour", "What shape": "shape", "What size": "size", "Where": "position"}
    for prefix, attr in asked.items():
        if question.startswith(prefix):
            return getattr(matches[0], attr)
    if question.endswith("plain or striped?"):
        return matches[0].texture
    assert question.endswith("partly covered?"), question
    return "Yes" if matches[0].partly_covered else "No"


def test_questions_refer_to_one_object_and_answer_right():
    kinds = set()
    for index in range(N_IMAGES):
        scene = sw.make_scene(5, index)
        for question, answer in sw.scene_questions(scene, np.random.default_rng(index), 12):
            assert answer == _expected_answer(question, scene.objects), question
            kinds.add(" ".join(question.split()[:2]))
    assert {"How many", "Is there", "What colour", "What shape", "What size", "Where is"} <= kinds


def test_attribute_questions_name_the_attribute_asked_and_answer_right():
    asked = set()
    for index in range(N_IMAGES):
        scene = sw.make_scene(6, index)
        for question, answer, attribute in sw.attribute_questions(scene, np.random.default_rng(index), 4):
            assert answer == _expected_answer(question, scene.objects), question
            prefix, suffix = sw.ATTRIBUTE_QUESTIONS[attribute].split("{}")
            assert question.startswith(prefix) and question.endswith(suffix), (question, attribute)
            asked.add(attribute)
    assert asked == set(sw.ATTRIBUTE_QUESTIONS)


def test_language_pretraining_texts_pair_each_bag_of_words_with_its_caption():
    documents = sw.language_pretraining_texts(4, seed=3)
    assert len(documents) == 8 and all(d.startswith("<|start_header_id|>system") for d in documents)
    qa, region = documents[0], documents[1]
    scene = sw.make_scene(3, 0)
    assert sw.scene_caption(scene) in qa
    user, answer = region.split("<|start_header_id|>assistant<|end_header_id|>\n")
    bags = user.split("<|end_header_id|>\n")[-1].split("\n")[:-2]  # then the question and ""
    captions = answer.removesuffix("<|eot_id|>").split("\n")
    assert len(bags) == len(captions) == min(len(scene.objects), 6)
    for bag, caption in zip(bags, captions, strict=True):
        parsed = sw.parse_caption(caption)
        words = set(bag.split())
        assert {parsed["colour"], parsed["shape"], parsed["size"], parsed["texture"]} <= words
        assert set(parsed["position"].split()) <= words and (("covered" in words) == parsed["partly_covered"])


def _schema(value):
    if isinstance(value, dict):
        return {k: _schema(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_schema(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def test_benchmark_follows_the_paradlc_sample_schema(splits):
    root = splits["bench"]
    mine = {n: json.loads((root / f"{n}.json").read_text()) for n in ("annotations", "qa", "class_names")}
    sample = {n: json.loads((SAMPLE / f"{n}.json").read_text()) for n in ("annotations", "qa", "class_names")}
    assert _schema(mine["annotations"][0]) == _schema(sample["annotations"][0])
    keys = {f"{r['image_id']}_{a['index']}" for r in mine["annotations"] for a in r["annotations"]}
    assert keys == set(mine["qa"]) == set(mine["class_names"])
    for record in mine["annotations"]:
        assert (root / "images" / record["file_name"]).is_file()
        for region in record["annotations"]:
            mask = mask_utils.decode({**region["mask_rle"], "counts": region["mask_rle"]["counts"].encode()})
            assert mask.shape == (record["height"], record["width"])
            ys, xs = np.nonzero(mask)
            assert region["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert region["category_name"] == mine["class_names"][f"{record['image_id']}_{region['index']}"]
    question_keys = {frozenset(q) for questions in sample["qa"].values() for q in questions}
    scores = {(q["type"], q.get("subtype"), tuple(c[1] for c in q["choices"]))
              for questions in sample["qa"].values() for q in questions}
    for questions in mine["qa"].values():
        for q in questions:
            assert frozenset(q) in question_keys and q["question"] == sw.BENCH_QUESTION
            assert (q["type"], q.get("subtype"), tuple(c[1] for c in q["choices"])) in scores
            assert all(isinstance(text, str) for text, _ in q["choices"])
    attributes = json.loads((root / "attributes.json").read_text())
    assert set(attributes) == keys
    assert all(len(a["question_attributes"]) == len(mine["qa"][k]) for k, a in attributes.items())


def test_rule_judge_gives_ground_truth_full_marks_and_penalises_a_wrong_colour(splits):
    root = splits["bench"]
    qa = json.loads((root / "qa.json").read_text())
    captions = json.loads((root / "captions.json").read_text())
    attributes = json.loads((root / "attributes.json").read_text())
    for key, questions in qa.items():
        assert sw.rule_scores(captions[key], questions) == (1.0, 1.0)
        truth = attributes[key]["colour"]
        wrong = captions[key].replace(f" {truth} ", " blue " if truth != "blue" else " red ")
        positive, negative = sw.rule_scores(wrong, questions)
        assert positive == pytest.approx(0.6) and negative <= 1.0
        no_colour = captions[key].replace(f" {truth} ", " ")
        assert sw.rule_scores(no_colour, questions)[0] == pytest.approx(0.9)
    questions = next(iter(qa.values()))
    assert sw.rule_scores("", questions) == (0.0, pytest.approx(0.6))
    with pytest.raises(PerceptionDLMError):
        sw.rule_answer("a red circle", json.loads((SAMPLE / "qa.json").read_text())["1592452_12"][0])


def test_negative_questions_name_a_value_the_object_lacks():
    obj = sw.make_scene(0, 0).objects[0]
    questions, asked = sw.region_questions(obj, np.random.default_rng(0))
    for question, attr in zip(questions, asked, strict=True):
        if question["type"] == "negative":
            named = sw.parse_caption(question["choices"][0][0])[attr]
            assert named is not None and named != getattr(obj, attr)
            assert sw.rule_answer(f"a {named} thing" if attr != "position" else f"in the {named}", question) == 0


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(sw.tiny_world_texts(40, seed=0), directory)
    return directory


def test_tiny_tokenizer_files_special_tokens_and_round_trip(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tokenizer_dir / name).is_file()
    train_tiny_tokenizer(sw.tiny_world_texts(40, seed=0), tmp_path)
    assert _hashes(tmp_path) == _hashes(tokenizer_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    assert len(tokenizer) < 600 and tokenizer.chat_template == CHAT_TEMPLATE
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(tokenizer) - len(SPECIAL_TOKENS), len(tokenizer))), "LLaDA order, at the end"
    special = SpecialTokens.from_tokenizer(tokenizer_dir)
    assert special == SpecialTokens.from_tokenizer(tokenizer)
    assert (special.bos, special.eos) == (tokenizer.bos_token_id, tokenizer.eos_token_id) == tuple(ids[:2])
    assert len(special.reserved) == len(special.caption_slots) == 16 and special.image_context is not None
    for text in ["a large red striped triangle in the top left, partly covered", "3 shapes: a; b.",
                 "Odd  spacing\n\ttabs and ünïcode ✓ "]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_region_prompt_keeps_special_tokens_whole_and_caption_words_short(tokenizer_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    captions = [sw.object_caption(o) for o in sw.make_scene(9, 0).objects]
    text, _ = render_chat(region_messages(len(captions), captions=captions))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for token in SPECIAL_TOKENS:
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) == text.count(token)
    for caption in captions:
        assert len(tokenizer(caption)["input_ids"]) == len(caption.split()) + caption.count(",")
    messages = region_messages(2, captions=captions[:2])
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render_chat(messages)[0]
