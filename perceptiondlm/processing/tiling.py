"""InternVL-style dynamic tiling: choose a cols×rows grid for an image, cut it into square tiles (plus a
thumbnail), and normalise the tiles the way the SigLIP image processor does (mean = std = 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["candidate_grids", "closest_grid", "split_into_tiles", "tile_image", "normalize_tiles"]


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles ≤ cols·rows ≤ max_tiles, sorted by cols·rows.

    The order within one tile count matters for exact ties in `closest_grid`. It is the reference's: the
    candidates are collected in a Python `set` and then stably sorted by area, so equal-area grids keep the
    set's iteration order (deterministic: int tuples hash the same in every process).
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min={min_tiles}, max={max_tiles}")
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect cols/rows is closest to width/height.

    Candidates are visited in `candidate_grids` order; a strictly smaller |aspect difference| always wins.
    On an exact tie (float equality) the later candidate replaces the current best only if the image has
    more than half the pixels of that candidate's full-resolution grid: width·height > 0.5·tile²·cols·rows.
    So a big square image gets 2×2 rather than 1×1, a small one stays 1×1.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def split_into_tiles(
    image: Image.Image, tile_size: int, grid: tuple[int, int], use_thumbnail: bool = True
) -> list[Image.Image]:
    """Cut `image` into a fixed grid of tile_size² tiles (plus a thumbnail), no grid search.

    The whole image is resized to (tile·cols, tile·rows) with PIL BICUBIC and cut row-major: tile t is at
    column t % cols, row t // cols. If there is more than one tile and `use_thumbnail`, the whole image
    resized to tile×tile (BICUBIC) is appended **last**. Returns cols·rows (+1) images.
    """
    cols, rows = grid
    if cols < 1 or rows < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid}")
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for t in range(cols * rows):
        left, top = (t % cols) * tile_size, (t // cols) * tile_size
        tiles.append(resized.crop((left, top, left + tile_size, top + tile_size)))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def tile_image(
    image: Image.Image, tile_size: int, min_tiles: int = 1, max_tiles: int = 6, use_thumbnail: bool = True
) -> tuple[list[Image.Image], tuple[int, int]]:
    """Dynamic tiling: pick the grid with `closest_grid`, then `split_into_tiles`.

    Returns (tiles, (cols, rows)); len(tiles) = cols·rows, plus 1 for the thumbnail when cols·rows > 1.
    """
    grid = closest_grid(image.width, image.height, tile_size, min_tiles, max_tiles)
    return split_into_tiles(image, tile_size, grid, use_thumbnail), grid


def normalize_tiles(tiles: list[Image.Image]) -> torch.Tensor:
    """Stack RGB tiles into a float32 tensor (T, 3, S, S) with values (x/255 − 0.5)/0.5 ∈ [−1, 1].

    Computed in float32 in exactly this order; for all 256 byte values this is bit-identical to the HF
    SigLIP processor (rescale in float64, cast to float32, then normalise), hence to the reference.
    """
    if not tiles:
        raise ValueError("normalize_tiles needs at least one tile")
    arrays = [np.asarray(t.convert("RGB"), dtype=np.uint8) for t in tiles]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
    return ((x / 255.0 - 0.5) / 0.5).contiguous()
