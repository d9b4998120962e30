"""perceptiondlm.data: data configs, parquet / llava / region readers, region grouping, skipping broken records,
the collator against the golden model, length grouping."""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FIXTURES
from PIL import Image
from pycocotools import mask as mask_util

from perceptiondlm import PerceptionDLM, PerceptionDLMError
from perceptiondlm.data.collate import Collator
from perceptiondlm.data.datasets import MAX_ATTEMPTS, build_train_dataset, group_count, split_regions
from perceptiondlm.data.grouping import LengthGroupedSampler, length_grouped_indices, padding_fraction
from perceptiondlm.data.sources import ParquetConversations, load_data_config
from perceptiondlm.processing.processor import IGNORE_INDEX, PerceptionDLMProcessor

CHECKPOINT = FIXTURES / "pdmllm" / "checkpoint"
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def processor() -> PerceptionDLMProcessor:
    return PerceptionDLMProcessor.from_pretrained(CHECKPOINT)


def config(path, **fields) -> SimpleNamespace:
    base = dict(data_path=path, max_length=None, max_regions_per_sample=None, image_root=None, question=None,
                seed=None)
    return SimpleNamespace(**{**base, **fields})


def png_bytes(w: int = 40, h: int = 40, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(mask: np.ndarray, compressed: bool = True) -> dict:
    if compressed:
        enc = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode()}
    flat = mask.flatten(order="F").tolist()
    counts = [len(list(run)) for _, run in itertools.groupby(flat)]
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}


def write_yaml(path, tree) -> None:
    import yaml

    path.write_text(yaml.safe_dump(tree))


def region_file(tmp_path, counts: list[int], size=(40, 40), name="regions.json"):
    """One image per entry of `counts` with that many box regions; captions "r{image}-{region}"."""
    w, h = size
    (tmp_path / "images").mkdir(exist_ok=True)
    records = []
    for i, n in enumerate(counts):
        (tmp_path / "images" / f"{i}.png").write_bytes(png_bytes(w, h, i))
        masks = [rle(box(h, w, j % h, j % h + 3, (2 * j) % w, (2 * j) % w + 4)) for j in range(n)]
        records.append({"image": f"images/{i}.png", "mask_rles": masks, "captions": [f"r{i}-{j}" for j in range(n)]})
    (tmp_path / name).write_text(json.dumps(records))
    return tmp_path / name


def llava_file(tmp_path, n: int, name="chat.json"):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    records = []
    for i in range(n):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png_bytes(seed=i))
        records.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": f"<image>\nQ{i}?"},
                                                                {"from": "gpt", "value": f"A{i}."}]})
    (tmp_path / name).write_text(json.dumps(records))
    return tmp_path / name


# --- data config ------------------------------------------------------------------------------------------------

def test_data_config_nesting_relative_paths_and_errors(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "imgs").mkdir()
    region = region_file(tmp_path, [1])
    chat = llava_file(tmp_path, 1, name="chat.jsonl")
    monkeypatch.chdir(tmp_path)
    yaml_path = tmp_path / "cfg" / "mix_datasets.yaml"
    write_yaml(yaml_path, {"gar": {"dam": {"data_file": "../regions.json", "data_type": "json", "num_samples": 3},
                                   "more": [{"data_file": "chat.jsonl", "data_type": "llava", "image_root": "imgs",
                                             "num_samples": -1, "row_size": 16}]}})
    specs = load_data_config(yaml_path)
    assert [s.name for s in specs] == ["gar/dam", "gar/more/0"]
    assert specs[0].data_file.resolve() == region.resolve() and specs[0].data_type == "region"
    assert specs[0].num_samples == 3 and specs[1].num_samples is None  # -1 = all
    assert specs[1].data_file.resolve() == chat.resolve() and specs[1].image_root.resolve() == tmp_path / "imgs"
    assert [s.data_type for s in load_data_config(chat)] == ["llava"]  # a plain file: type inferred
    assert [s.data_type for s in load_data_config(region)] == ["region"]
    for tree, match in [({"a": {"data_file": "chat.jsonl", "colour": 1}}, r"source a: unknown field.*colour"),
                        ({"a": {"data_file": "chat.jsonl", "data_type": "hf"}}, "data_type 'hf'"),
                        ({"a": {"data_file": "missing.json"}}, "data file not found: .*missing.json"),
                        ({"a": {"data_flie": "chat.jsonl"}}, "a/data_flie"),
                        ({"a": {"data_file": "chat.jsonl", "num_samples": "ten"}}, "num_samples")]:
        write_yaml(yaml_path, tree)
        with pytest.raises(PerceptionDLMError, match=match) as err:
            load_data_config(yaml_path)
        assert "mix_datasets.yaml" in str(err.value)


def test_num_samples_subsets_and_oversampling_per_epoch(tmp_path, processor):
    llava_file(tmp_path, 10)
    write_yaml(tmp_path / "d.yaml", {"under": {"data_file": "chat.json", "num_samples": 4},
                                     "over": {"data_file": "chat.json", "num_samples": 25}})
    ds = build_train_dataset(config(tmp_path / "d.yaml"), processor, model_type="dmllm", prompt_numbers=None, seed=3)
    picks = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert len(ds) == 29 and len(ds.lengths) == 29
        units = [ds.locate(i) for i in range(len(ds))]
        under = Counter(u for s, u in units if s.spec.name == "under")
        over = Counter(u for s, u in units if s.spec.name == "over")
        assert sum(under.values()) == 4 and set(under.values()) == {1}
        assert sum(over.values()) == 25 and set(over) == set(range(10)) and sorted(Counter(over.values())) == [2, 3]
        assert Counter(over.values())[3] == 5
        picks.append((sorted(under), sorted(u for u, c in over.items() if c == 3)))
    assert picks[0] != picks[1]
    ds.set_epoch(0)
    assert [ds.locate(i)[1] for i in range(29)] == [ds.locate(i)[1] for i in range(29)]  # deterministic


# --- readers ----------------------------------------------------------------------------------------------------

def test_parquet_conversations_both_forms(tmp_path, processor):
    folder = tmp_path / "pq"
    folder.mkdir()
    rows_a = {"conversations": [[{"from": "human", "value": f"<image>\nQ{i}?"}, {"from": "gpt", "value": f"A{i}"}]
                                for i in range(5)],
              "images": [[png_bytes(seed=i)] for i in range(5)]}
    pq.write_table(pa.table(rows_a), folder / "a.parquet", row_group_size=2)
    convs = [[{"role": "user", "content": "<image> or <image>?"}, {"role": "assistant", "content": "Left."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Which?"},
              {"role": "assistant", "content": "That."}],
             [{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "One."}]]
    images_b = [[{"bytes": png_bytes(seed=7)}, {"bytes": png_bytes(48, 32, 8)}], [{"bytes": png_bytes(seed=9)}],
                [{"bytes": png_bytes(seed=10)}]]  # the last row has 2 placeholders but 1 image
    pq.write_table(pa.table({"conversations": [json.dumps(c) for c in convs], "image": images_b}),
                   folder / "b.parquet")
    reader = ParquetConversations(folder, folder)
    assert len(reader) == 8
    rec = reader.record(3)
    assert rec["conversation"] == [{"role": "user", "content": "<image>\nQ3?"}, {"role": "assistant", "content": "A3"}]
    assert rec["where"].endswith("a.parquet#3") and isinstance(rec["images"][0], bytes)
    reader.record(2)  # same row group as row 3: served from the cache
    assert list(reader._cache) == [(0, 1)]

    ds = build_train_dataset(config(folder), processor, model_type="dmllm", prompt_numbers=None, seed=0)
    first = ds[0]
    assert first["kind"] == "chat" and len(first["images"]) == 1 and isinstance(first["images"][0], Image.Image)
    assert first["conversation"][0] == {"role": "user", "content": [{"type": "image"},
                                                                     {"type": "text", "text": "Q0?"}]}
    two = ds[5]
    assert len(two["images"]) == 2 and two["images"][1].size == (48, 32)
    assert [i["type"] for i in two["conversation"][0]["content"]] == ["image", "text", "image", "text"]
    assert ds[6]["conversation"][0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert ds[7]["where"].endswith("a.parquet#0") and ds.skipped == {"image_count": 1}  # moved to the next item
    batch = Collator(processor)([ds[i] for i in range(2, 7)])
    assert batch["num_tiles"].tolist() == [1, 1, 1, 2, 1] and "labels" in batch


def test_llava_json_and_jsonl(tmp_path, processor):
    path = llava_file(tmp_path, 3)
    records = json.loads(path.read_text())
    records[1] = {"images": ["0.png", str(tmp_path / "imgs" / "1.png")],
                  "conversations": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                  {"type": "text", "text": "Same?"}]},
                                    {"role": "assistant", "content": "No."}]}
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name in ("chat.json", "chat.jsonl"):
        ds = build_train_dataset(config(tmp_path / name, image_root=tmp_path / "imgs"), processor,
                                 model_type="dmllm", prompt_numbers=None, seed=0)
        ex = ds[1]
        assert len(ex["images"]) == (2 if name.endswith("l") else 1)
        assert ex["conversation"][-1] == {"role": "assistant", "content": [
            {"type": "text", "text": "No." if name.endswith("l") else "A1."}]}
    with pytest.raises(PerceptionDLMError, match="does not train on"):
        build_train_dataset(config(path), processor, model_type="pdmllm", prompt_numbers=None, seed=0)


def test_region_json_both_schemas_and_rle_forms(tmp_path, processor):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes(40, 30, 1))
    m1, m2, m3 = box(30, 40, 0, 10, 0, 10), box(30, 40, 5, 25, 10, 35), box(30, 40, 20, 30, 0, 40)
    records = [{"image_file": "images/a.png", "mask_rles": [rle(m1), rle(m2, compressed=False)],
                "captions": ["a cat", "a dog"]},
               {"image_path": "images/a.png", "annotations": [{"segmentation": rle(m3, compressed=False),
                                                               "caption": "grass"},
                                                              {"mask_rle": rle(m1), "caption": "sky"}]}]
    (tmp_path / "r.json").write_text(json.dumps(records))
    ds = build_train_dataset(config(tmp_path / "r.json"), processor, model_type="pdmllm", prompt_numbers=6, seed=0)
    assert len(ds) == 2 and ds.max_regions == 6
    originals = {"a cat": m1, "a dog": m2, "grass": m3, "sky": m1}
    for i in range(2):
        ex = ds[i]
        assert ex["kind"] == "region" and ex["image"].size == (40, 30) and len(ex["masks"]) == 2
        for mask, caption in zip(ex["masks"], ex["captions"], strict=True):
            assert np.array_equal(mask, originals[caption])
        assert len(set(ex["prompt_ids"])) == 2 and all(0 <= p < 6 for p in ex["prompt_ids"])
    assert ds.skipped == {}


# --- region grouping --------------------------------------------------------------------------------------------

def test_split_regions_covers_every_region_and_every_size():
    import random

    sizes = Counter()
    for n in range(1, 41):
        groups = int(group_count(n, 6))
        for epoch in range(3):
            split = split_regions(n, groups, 6, random.Random(n * 10 + epoch))
            assert sorted(j for g in split for j in g) == list(range(n)) and len(split) == groups
            sizes.update(len(g) for g in split)
    assert set(sizes) == set(range(1, 7))
    share = {k: v / sum(sizes.values()) for k, v in sizes.items()}
    assert min(share.values()) > 0.08  # no slot count is starved (the reference never made 5 or 6)


def test_region_dataset_grouping_per_epoch(tmp_path, processor):
    counts = [1, 2, 3, 5, 7, 9, 12, 15, 20, 26]
    region_file(tmp_path, counts, size=(16, 16))
    ds = build_train_dataset(config(tmp_path / "regions.json"), processor, model_type="pdmllm", prompt_numbers=6,
                             seed=1)
    n_items = len(ds)
    assert n_items == int(group_count(np.array(counts), 6).sum())
    groupings = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert len(ds) == n_items
        seen, sizes, grouping = Counter(), Counter(), []
        for i in range(len(ds)):
            ex = ds[i]
            seen.update(ex["captions"])
            sizes[len(ex["captions"])] += 1
            grouping.append(tuple(ex["captions"]))
        assert seen == Counter(f"r{i}-{j}" for i, n in enumerate(counts) for j in range(n))  # each region once
        assert set(sizes) == set(range(1, 7))
        groupings.append(grouping)
    assert groupings[0] != groupings[1]
    ds.set_epoch(0)
    assert tuple(ds[len(ds) - 1]["captions"]) == groupings[0][-1]  # deterministic per (seed, epoch)


# --- broken records ---------------------------------------------------------------------------------------------

def test_broken_records_are_skipped_and_counted(tmp_path, processor, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(png_bytes(40, 40))
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    good = {"image": "images/ok.png", "mask_rles": [rle(box(40, 40, 0, 9, 0, 9))], "captions": ["ok"]}
    records = [{**good, "mask_rles": [rle(box(20, 40, 0, 9, 0, 9))]},  # RLE 40x20 on a 40x40 image
               {**good, "image": "images/bad.png"}, {**good, "mask_rles": [{"size": [40, 40], "counts": [5, 7]}]},
               {**good, "captions": [""]}, good]
    (tmp_path / "r.json").write_text(json.dumps(records))
    ds = build_train_dataset(config(tmp_path / "r.json"), processor, model_type="pdmllm", prompt_numbers=6, seed=0)
    with caplog.at_level(logging.WARNING):
        assert ds[0]["captions"] == ["ok"]
    assert ds.skipped == {"mask_size": 1, "unreadable_image": 1, "bad_mask": 1, "empty_text": 1}
    assert "r.json#0" in caplog.text and "RLE size 40x20" in caplog.text and "images/bad.png" in caplog.text
    tight = build_train_dataset(config(tmp_path / "r.json", max_length=20), processor, model_type="pdmllm",
                                prompt_numbers=6, seed=0)
    with pytest.raises(PerceptionDLMError, match=f"{min(MAX_ATTEMPTS, 5)} consecutive broken records"):
        tight[4]
    assert tight.skipped["too_long"] >= 1


# --- collator and the golden model ------------------------------------------------------------------------------

def test_collator_batches_run_through_the_golden_model(tmp_path, processor):
    region_file(tmp_path, [2, 3], size=(96, 64))
    ds = build_train_dataset(config(tmp_path / "regions.json", max_length=4096), processor, model_type="pdmllm",
                             prompt_numbers=6, seed=0)
    examples = [ds[0], ds[1]]
    batch = Collator(processor)(examples)
    assert "region_order" not in batch and batch["labels"].shape == batch["input_ids"].shape
    assert batch["num_tiles"].tolist() == [7, 7] and (batch["labels"] != IGNORE_INDEX).any()
    for b, ex in enumerate(examples):
        assert sorted(batch["region_prompt_ids"][b, :len(ex["masks"])].tolist()) == sorted(ex["prompt_ids"])
        assert int(batch["attention_mask"][b].sum()) == ds.token_length(ex)
    model = PerceptionDLM.from_pretrained(CHECKPOINT)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0

    chat = build_train_dataset(config(llava_file(tmp_path, 2), image_root=tmp_path / "imgs"), processor,
                               model_type="dmllm", prompt_numbers=None, seed=0)
    chat_batch = Collator(processor)([chat[0], chat[1]])
    assert set(chat_batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "num_tiles"}
    assert chat_batch["pixel_values"].shape == (2, 3, 64, 64) and chat_batch["input_ids"].shape[0] == 2
    labels = chat_batch["labels"][0]
    assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "A0.<|eot_id|>"
    assert torch.isfinite(model(**chat_batch).loss)  # a Base-style batch (no regions) through the same forward
    with pytest.raises(PerceptionDLMError, match="mixes example kinds"):
        Collator(processor)([examples[0], chat[0]])


def test_length_estimates_track_exact_lengths(tmp_path, processor):
    region_file(tmp_path, [1, 4, 6], size=(96, 64))
    ds = build_train_dataset(config(tmp_path / "regions.json"), processor, model_type="pdmllm", prompt_numbers=6,
                             seed=0)
    exact = np.array([ds.token_length(ds[i]) for i in range(len(ds))])
    assert np.all(np.abs(ds.lengths - exact) <= 0.1 * exact)  # exact per image, groups share the mean
    chat = build_train_dataset(config(llava_file(tmp_path, 3), image_root=tmp_path / "imgs"), processor,
                               model_type="dmllm", prompt_numbers=None, seed=0)
    exact = np.array([chat.token_length(chat[i]) for i in range(len(chat))])
    assert np.all(np.abs(chat.lengths - exact) <= 0.1 * exact)


# --- length grouping --------------------------------------------------------------------------------------------

def test_length_grouping_reduces_padding():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.5, 0.6, 4000), 64, 4096).astype(int)
    batch_size = 8
    random_order = np.random.default_rng(1).permutation(len(lengths)).tolist()
    grouped = length_grouped_indices(lengths, batch_size, seed=0, epoch=0)
    assert sorted(grouped) == list(range(len(lengths)))
    assert grouped == length_grouped_indices(lengths, batch_size, seed=0, epoch=0)
    assert grouped != length_grouped_indices(lengths, batch_size, seed=0, epoch=1)
    before, after = padding_fraction(lengths, random_order, batch_size), padding_fraction(lengths, grouped, batch_size)
    logger.info("padding fraction: random order %.3f, length-grouped %.3f", before, after)
    assert after < 0.5 * before
    sampler = LengthGroupedSampler(lambda: lengths, batch_size, seed=0)
    sampler.set_epoch(1)
    assert list(sampler) == length_grouped_indices(lengths, batch_size, seed=0, epoch=1) and len(sampler) == 4000
