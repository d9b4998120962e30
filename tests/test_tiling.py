"""Tests for InternVL dynamic tiling: grid choice (golden cases, tie rule), tile layout, normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from perceptiondlm.processing.tiling import (
    candidate_grids,
    closest_grid,
    normalize_tiles,
    split_into_tiles,
    tile_image,
)

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "pdmllm"
GOLDEN_JSON = json.loads((GOLDEN_DIR / "golden.json").read_text())


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN_DIR / "golden.safetensors"))


def _case_id(case: dict) -> str:
    return f"{case['tile']}-{case['width']}x{case['height']}"


@pytest.mark.parametrize("case", GOLDEN_JSON["tiling_cases"], ids=_case_id)
def test_closest_grid_golden_cases(case: dict) -> None:
    grid = closest_grid(case["width"], case["height"], case["tile"], 1, 6)
    assert grid == (case["grid_cols"], case["grid_rows"])
    image = Image.new("RGB", (case["width"], case["height"]))
    tiles, grid2 = tile_image(image, case["tile"], 1, 6)
    assert grid2 == grid
    assert len(tiles) == case["num_tiles_incl_thumbnail"]
    assert all(t.size == (case["tile"], case["tile"]) for t in tiles)


def test_candidate_grids_order_and_bounds() -> None:
    grids = candidate_grids(1, 6)
    assert len(grids) == len(set(grids)) == 14
    assert all(1 <= c * r <= 6 for c, r in grids)
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas)
    # Within one tile count the order is the reference's set order; it decides same-area ties below.
    assert grids.index((1, 2)) < grids.index((2, 1))
    assert candidate_grids(2, 2) == [(1, 2), (2, 1)]
    with pytest.raises(ValueError):
        candidate_grids(3, 2)


def test_tie_switches_to_later_grid_only_for_big_images() -> None:
    # Square image: 1x1 and 2x2 tie exactly (diff 0). Switch iff W*H > 0.5 * tile^2 * 4 = 8192 for tile 64.
    assert closest_grid(90, 90, 64, 1, 6) == (1, 1)  # 8100
    assert closest_grid(91, 91, 64, 1, 6) == (2, 2)  # 8281
    assert closest_grid(724, 724, 512, 1, 6) == (1, 1)  # 524176 <= 524288
    assert closest_grid(725, 725, 512, 1, 6) == (2, 2)
    # Same-area tie (aspect 1.25 is 0.75 from 1/2 and from 2/1): the later (2, 1) wins if the image is big.
    assert closest_grid(80, 64, 64, 2, 2) == (2, 1)
    assert closest_grid(80, 64, 512, 2, 2) == (1, 2)


def test_closest_grid_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        closest_grid(0, 10, 64, 1, 6)


def test_pixel_values_golden_exact(golden: dict[str, torch.Tensor]) -> None:
    image = Image.open(GOLDEN_DIR / "inputs" / "image.png")
    tiles, grid = tile_image(image, 64, 1, 6)
    assert list(grid) == golden["aspect_ratios"][0].tolist() == [3, 2]
    pixel_values = normalize_tiles(tiles)
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == (7, 3, 64, 64)
    assert torch.equal(pixel_values, golden["pixel_values"])
    # Thumbnail is last.
    thumb = normalize_tiles([image.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)])
    assert torch.equal(pixel_values[6], thumb[0])


def test_tiles_are_row_major() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(128, 192, 3), dtype=np.uint8)  # exactly 3 cols x 2 rows of 64 px
    tiles, grid = tile_image(Image.fromarray(arr), 64, 1, 6)
    assert grid == (3, 2)
    for t in range(6):
        col, row = t % 3, t // 3
        expected = arr[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64]
        np.testing.assert_array_equal(np.asarray(tiles[t]), expected)


def test_thumbnail_only_for_multiple_tiles() -> None:
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    assert len(split_into_tiles(image, 64, (1, 1))) == 1
    assert len(split_into_tiles(image, 64, (3, 2), use_thumbnail=False)) == 6
    assert len(split_into_tiles(image, 64, (3, 2))) == 7
    with pytest.raises(ValueError):
        split_into_tiles(image, 64, (0, 2))


def test_normalize_matches_hf_siglip_rescale_for_all_bytes() -> None:
    values = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([values.reshape(16, 16)] * 3, axis=-1))
    got = normalize_tiles([image])[0, 0].flatten().numpy()
    hf = (values.astype(np.float64) * (1 / 255)).astype(np.float32)
    hf = (hf - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(got, hf)
    assert got.min() == -1.0 and got.max() == 1.0
