"""Tests for region masks: golden parity with the reference pipeline, loading (files, arrays, RLE), robust
binarisation, size handling, errors, area ordering and the corrected patch-activity rule.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask
from safetensors.torch import load_file

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.processing.masks import (
    REFERENCE_THRESHOLD,
    load_mask,
    load_masks,
    mask_bbox,
    patch_activity,
    patch_activity_compat,
    patch_activity_coverage,
    region_mask_embeds,
    restore_order,
    sort_by_area,
    visual_prompt_tiles,
)

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "pdmllm"
GOLDEN_JSON = json.loads((GOLDEN_DIR / "golden.json").read_text())
MASK_FILES = [GOLDEN_DIR / p for p in GOLDEN_JSON["mask_paths_in_given_order"]]
IMAGE_SIZE = tuple(GOLDEN_JSON["image"]["size_wh"])  # (96, 64)
GRID = (3, 2)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN_DIR / "golden.safetensors"))


@pytest.fixture(scope="module")
def sorted_masks() -> tuple[list[np.ndarray], list[int]]:
    return sort_by_area(load_masks(MASK_FILES, IMAGE_SIZE))


def _ellipse_mask(size: tuple[int, int] = (160, 120)) -> np.ndarray:
    """An ellipse plus a rectangle, drawn in a (W, H) = `size` canvas (coordinates scale with the size)."""
    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    sx, sy = size[0] / 160, size[1] / 120
    draw.ellipse((30 * sx, 20 * sy, 120 * sx, 100 * sy), fill=255)
    draw.rectangle((100 * sx, 10 * sy, 150 * sx, 40 * sy), fill=255)
    return np.asarray(img) > 127


# ---------------------------------------------------------------- golden parity
def test_golden_loading_sorting_and_masks(golden, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        masks = load_masks(MASK_FILES, IMAGE_SIZE)
    assert "mask_b_halfres" in caplog.text  # the half-resolution mask was NEAREST-upsampled, with a warning
    assert [int(m.sum()) for m in masks] == GOLDEN_JSON["mask_areas_given_order"]
    ordered, order = sort_by_area(masks)
    assert order == GOLDEN_JSON["sort_idx_area_descending"]
    expected = golden["masks_sorted"].numpy().astype(bool)
    assert all(np.array_equal(m, e) for m, e in zip(ordered, expected, strict=True))
    # The reference rule (> 0) gives the same masks on these clean 0/255 PNGs.
    ref = load_masks(MASK_FILES, IMAGE_SIZE, threshold=REFERENCE_THRESHOLD)
    assert all(np.array_equal(a, b) for a, b in zip(ref, masks, strict=True))


def test_golden_bboxes_exact(golden, sorted_masks) -> None:
    boxes = [mask_bbox(m) for m in sorted_masks[0]]
    assert boxes == [tuple(b) for b in GOLDEN_JSON["bboxes"].values()]  # float64, exact
    assert torch.equal(torch.tensor(boxes, dtype=torch.float32), golden["bboxes"])


def test_golden_visual_prompts_and_mask_embeds(golden, sorted_masks) -> None:
    weight = load_file(str(GOLDEN_DIR / "checkpoint" / "model.safetensors"))["mask_id_embedding.weight"]
    assert weight.shape == (6, 32)
    activities = []
    for i, mask in enumerate(sorted_masks[0]):
        values = visual_prompt_tiles(mask, i, 64, GRID)
        assert torch.equal(values, golden[f"mask_values_{i}"])
        activity = patch_activity_compat(values, 16)
        assert activity.shape == (7, 4, 4) and activity.dtype == torch.bool
        assert torch.equal(activity, patch_activity(mask, i, 64, GRID, 16, "compat"))
        activities.append(activity)
    embeds = region_mask_embeds(activities, [0, 1, 2], weight)
    assert embeds.shape == (7, 16, 32)
    torch.testing.assert_close(embeds, golden["vision_mask_embeds"], atol=1e-6, rtol=0)


def test_visual_prompt_matches_stored_prompt_png(golden) -> None:
    # inputs/visual_prompt_0.png is the reference's uint8 prompt matrix of sorted region 0 (prompt id 0).
    prompt = np.asarray(Image.open(GOLDEN_DIR / "inputs" / "visual_prompt_0.png"))
    mask = prompt != 255
    assert torch.equal(visual_prompt_tiles(mask, 0, 64, GRID), golden["mask_values_0"])


# ---------------------------------------------------------------- ordering
def test_area_order_maps_back_to_caller_order() -> None:
    small, big, mid, big2 = (np.zeros((8, 8), bool) for _ in range(4))
    small[0, 0] = True
    big[:4] = True
    mid[:2] = True
    big2[4:] = True  # same area as `big`: stable sort keeps big before big2
    ordered, order = sort_by_area([small, big, mid, big2])
    assert order == [1, 3, 2, 0]
    assert ordered[0] is big and ordered[1] is big2
    captions_sorted = [f"caption of caller mask {j}" for j in order]
    assert restore_order(captions_sorted, order) == [f"caption of caller mask {j}" for j in range(4)]
    with pytest.raises(ValueError):
        restore_order(["a", "b"], [0, 0])


# ---------------------------------------------------------------- RLE
def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs  # COCO runs start with zeros


def test_rle_round_trips() -> None:
    mask = _ellipse_mask()
    h, w = mask.shape
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert np.array_equal(load_mask(rle), mask)  # compressed, bytes
    assert np.array_equal(load_mask({"size": rle["size"], "counts": rle["counts"].decode()}), mask)  # str
    counts = _uncompressed_counts(mask)
    assert coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"] == rle["counts"]
    assert np.array_equal(load_mask({"size": [h, w], "counts": counts}), mask)  # uncompressed
    starts_on = np.zeros((4, 5), bool)
    starts_on[0, 0] = True
    assert np.array_equal(load_mask({"size": [4, 5], "counts": _uncompressed_counts(starts_on)}), starts_on)


def test_bad_rle_raises() -> None:
    with pytest.raises(PerceptionDLMError, match="size"):
        load_mask({"counts": [1, 2]})
    with pytest.raises(PerceptionDLMError, match="sum"):
        load_mask({"size": [4, 5], "counts": [3, 4]})
    with pytest.raises(PerceptionDLMError, match="RLE"):
        load_mask({"size": [4, 5], "counts": 12})


# ---------------------------------------------------------------- binarisation and inputs
def test_jpeg_noise_threshold(tmp_path) -> None:
    mask = _ellipse_mask()
    path = tmp_path / "mask.jpg"
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, quality=50)
    robust = load_mask(path)
    naive = load_mask(path, threshold=REFERENCE_THRESHOLD)
    iou = (robust & mask).sum() / (robust | mask).sum()
    assert iou > 0.98
    assert naive.sum() > 1.05 * mask.sum()  # `> 0` inflates the region with compression noise
    assert mask_bbox(robust) == mask_bbox(mask) != mask_bbox(naive)  # and `> 0` inflates the box too


def test_array_and_image_inputs() -> None:
    mask = _ellipse_mask((40, 30))
    u8 = mask.astype(np.uint8)
    for src in (mask, u8, u8 * 255, u8.astype(np.float32), u8.astype(np.uint16) * 65535,
                np.stack([u8 * 255] * 3, axis=-1), u8[..., None] * 255,
                Image.fromarray(u8 * 255), Image.fromarray(u8 * 255).convert("1"),
                Image.fromarray(u8 * 255).convert("RGB")):
        assert np.array_equal(load_mask(src), mask), type(src)
    soft = np.where(mask, 0.9, 0.2)  # probabilities: > 0.5 is inside
    assert np.array_equal(load_mask(soft), mask)
    with pytest.raises(PerceptionDLMError, match="2-D"):
        load_mask(np.ones((2, 3, 4, 5)))
    with pytest.raises(PerceptionDLMError, match="unsupported"):
        load_mask(12345)  # type: ignore[arg-type]


def test_size_mismatch(caplog) -> None:
    mask = _ellipse_mask((80, 60))
    with caplog.at_level(logging.WARNING):
        resized = load_mask(mask, size=(160, 120))
    assert resized.shape == (120, 160) and "resizing" in caplog.text
    assert np.array_equal(resized[::2, ::2], mask)
    with pytest.raises(PerceptionDLMError, match="aspect"):
        load_mask(mask, size=(100, 100))


def test_empty_mask_errors(tmp_path) -> None:
    with pytest.raises(PerceptionDLMError, match="empty"):
        load_mask(np.zeros((10, 10), np.uint8))
    path = tmp_path / "faint.png"
    Image.fromarray(np.full((10, 10), 100, np.uint8)).save(path)  # grey 100 < 127 everywhere
    with pytest.raises(PerceptionDLMError, match="empty"):
        load_mask(path)
    assert load_mask(path, threshold=REFERENCE_THRESHOLD).all()


def test_unreadable_and_missing_files_named(tmp_path) -> None:
    bad = tmp_path / "broken_mask.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(PerceptionDLMError, match="broken_mask.png"):
        load_mask(bad)
    with pytest.raises(PerceptionDLMError, match="missing.png"):
        load_mask(tmp_path / "missing.png")
    with pytest.raises(PerceptionDLMError, match=r"mask #1 .*broken_mask.png"):
        load_masks([MASK_FILES[0], bad], IMAGE_SIZE)


# ---------------------------------------------------------------- corrected patch activity
def test_coverage_activity_rule() -> None:
    mask = np.zeros((64, 64), bool)
    mask[0:16, 0:8] = True  # patch (0,0): coverage 0.5 -> active
    mask[16:20, 16:20] = True  # patch (1,1): 1/16 -> inactive (another patch passes)
    mask[32:48, 32:48] = True  # patch (2,2): full
    act = patch_activity_coverage(mask, 64, (1, 1), 16)
    assert act.shape == (1, 4, 4)
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0] = expected[0, 2, 2] = True
    assert torch.equal(act, expected)
    tiny = np.zeros((64, 64), bool)
    tiny[40:42, 5:7] = True  # a region smaller than a patch keeps its best-covered patch
    act = patch_activity(tiny, 0, 64, (1, 1), 16, "coverage")
    assert act.sum() == 1 and bool(act[0, 2, 0])


def test_coverage_activity_on_grid(sorted_masks) -> None:
    full = np.ones((64, 96), bool)
    assert patch_activity_coverage(full, 64, GRID, 16).all()
    for i, mask in enumerate(sorted_masks[0]):
        act = patch_activity(mask, i, 64, GRID, 16, "coverage")
        assert act.shape == (7, 4, 4)
        assert act[:6].any() and act[6].any()
    with pytest.raises(ValueError):
        patch_activity(full, 0, 64, GRID, 16, "bogus")  # type: ignore[arg-type]


def test_overlapping_regions_add() -> None:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a = torch.zeros(2, 2, 2, dtype=torch.bool)
    b = torch.zeros(2, 2, 2, dtype=torch.bool)
    a[0, 0, 0] = b[0, 0, 0] = True
    b[1, 1, 1] = True
    out = region_mask_embeds([a, b], [2, 1], weight)
    assert out.shape == (2, 4, 4)
    torch.testing.assert_close(out[0, 0], weight[2] + weight[1])
    torch.testing.assert_close(out[1, 3], weight[1])
    assert out.abs().sum() == (weight[2] + 2 * weight[1]).sum()


def test_prompt_id_255_rejected() -> None:
    with pytest.raises(PerceptionDLMError, match="255"):
        visual_prompt_tiles(np.ones((8, 8), bool), 255, 64, (1, 1))
