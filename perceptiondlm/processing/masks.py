"""Region masks for PDMLLM: loading and binarising (files, arrays, COCO RLE), area sorting, boxes, the
per-region visual-prompt tiles and the patch-grid activity that is turned into mask embeddings in the ViT.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.processing.tiling import normalize_tiles, split_into_tiles

logger = logging.getLogger(__name__)

#: Default binarisation threshold on the 0..255 grey scale: a pixel is in the mask iff grey > 127. Unlike the
#: reference's `> 0`, this survives JPEG compression noise (ringing around edges, non-zero "black").
DEFAULT_THRESHOLD = 127
#: The reference rule (`grey > 0`), for bit-exact reproduction of masks that are exactly 0/255 anyway.
REFERENCE_THRESHOLD = 0
#: Masks whose aspect ratio differs from the image's by at most this fraction are resized (with a warning).
ASPECT_TOLERANCE = 0.01

__all__ = ["DEFAULT_THRESHOLD", "REFERENCE_THRESHOLD", "binarize_mask", "load_mask", "load_masks",
           "sort_by_area", "restore_order", "mask_bbox", "visual_prompt_tiles", "patch_activity",
           "patch_activity_compat", "patch_activity_coverage", "region_mask_embeds"]


def binarize_mask(gray: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(H, W) grey values on the 0..255 scale → bool (H, W): `gray > threshold` (reference: threshold 0)."""
    return np.asarray(gray) > threshold


def _gray255(arr: np.ndarray, name: str) -> np.ndarray:
    """A numeric 2-D array → float64 grey on the 0..255 scale; a max ≤ 1 is read as a 0/1 (or [0,1]) mask."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8:
        arr = np.asarray(Image.fromarray(arr).convert("L"))
    if arr.ndim != 2 or arr.size == 0:
        raise PerceptionDLMError(f"{name}: expected a 2-D (H, W) mask, got an array of shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise PerceptionDLMError(f"{name}: mask array has dtype {arr.dtype}; use bool, integers or floats")
    gray = arr.astype(np.float64)
    if not np.isfinite(gray).all() or gray.min() < 0:
        raise PerceptionDLMError(f"{name}: mask values must be finite and >= 0")
    peak = gray.max()
    if peak <= 1:
        return gray * 255.0
    if peak <= 255:
        return gray
    if np.issubdtype(arr.dtype, np.integer):  # e.g. 16-bit PNG masks
        return gray * (255.0 / np.iinfo(arr.dtype).max)
    raise PerceptionDLMError(f"{name}: float mask values go up to {peak}; scale them to [0, 1] or [0, 255]")


def _decode_rle(rle: dict[str, Any], name: str) -> np.ndarray:
    """COCO RLE dict ({"size": [h, w], "counts": str | bytes | list[int]}) → bool (h, w)."""
    from pycocotools import mask as coco_mask

    if "size" not in rle or "counts" not in rle:
        raise PerceptionDLMError(f"{name}: an RLE mask needs the keys 'size' ([height, width]) and 'counts'")
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            if sum(counts) != h * w:
                raise ValueError(f"the run lengths sum to {sum(counts)}, not height*width = {h * w}")
            rle = coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        elif isinstance(counts, str):
            rle = {"size": [h, w], "counts": counts.encode("ascii")}
        elif not isinstance(counts, bytes):
            raise ValueError(f"'counts' must be str, bytes or a list of ints, not {type(counts).__name__}")
        else:
            rle = {"size": [h, w], "counts": counts}
        with warnings.catch_warnings():  # pycocotools' numpy-2 `__array__` DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            return np.asarray(coco_mask.decode(rle)).astype(bool)
    except (ValueError, TypeError, UnicodeError) as err:
        raise PerceptionDLMError(f"{name}: invalid COCO RLE mask ({err}); re-encode it with "
                                 "pycocotools.mask.encode") from err


def _read_image(path: Path, name: str) -> Image.Image:
    if not path.is_file():
        raise PerceptionDLMError(f"{name}: mask file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PerceptionDLMError(f"{name}: cannot read mask file {path} as an image ({err}); "
                                 "save the mask as a PNG (or JPEG) image") from err


def _image_to_gray255(img: Image.Image, name: str) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return _gray255(np.asarray(img), name)
    return _gray255(np.asarray(img.convert("L")), name)


def load_mask(
    source: str | Path | Image.Image | np.ndarray | dict[str, Any],
    size: tuple[int, int] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    name: str | None = None,
) -> np.ndarray:
    """Load one region mask as bool (H, W).

    `source`: an image path (PNG/JPEG/...), a PIL image, a numpy array (bool, 0/1, 0..255, 16-bit) or a
    COCO RLE dict (compressed `counts` str/bytes, or uncompressed `counts` list). Images are read as grey
    (`convert("L")`) and binarised with grey > `threshold` (default 127, robust to JPEG noise; the reference
    used > 0). Arrays/images whose max is ≤ 1 are read as 0/1 masks. `size` = (W, H) of the image: a mask of
    another size is NEAREST-resized (with a warning) if its aspect ratio matches within 1 %, else it raises.
    Raises PerceptionDLMError for unreadable/invalid sources, size mismatches and empty masks.
    """
    if name is None:
        name = f"mask {source}" if isinstance(source, (str, Path)) else "mask"
    if isinstance(source, (str, Path)):
        gray = _image_to_gray255(_read_image(Path(source), name), name)
        mask = binarize_mask(gray, threshold)
    elif isinstance(source, Image.Image):
        mask = binarize_mask(_image_to_gray255(source, name), threshold)
    elif isinstance(source, np.ndarray):
        mask = binarize_mask(_gray255(source, name), threshold)  # bool arrays map to 0/255
    elif isinstance(source, dict):
        mask = _decode_rle(source, name)
    else:
        raise PerceptionDLMError(f"{name}: unsupported mask type {type(source).__name__}; pass a path, a PIL "
                                 "image, a numpy array or a COCO RLE dict")
    if size is not None:
        mask = _fit_to_size(mask, size, name)
    if not mask.any():
        raise PerceptionDLMError(f"{name}: the mask is empty (no pixel above the threshold {threshold} after "
                                 "binarising/resizing); check the file or drop this region")
    return mask


def _fit_to_size(mask: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    width, height = size
    h, w = mask.shape
    if (w, h) == (width, height):
        return mask
    if abs((w / h) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise PerceptionDLMError(f"{name}: mask is {w}x{h} but the image is {width}x{height} (different "
                                 "aspect ratio); give a mask with the image's size")
    logger.warning("%s: mask is %dx%d, image is %dx%d; resizing it (NEAREST)", name, w, h, width, height)
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def load_masks(
    sources: Sequence[Any], size: tuple[int, int] | None = None, *, threshold: float = DEFAULT_THRESHOLD
) -> list[np.ndarray]:
    """`load_mask` for each source, in the caller's order; error messages name the index (and file)."""
    masks = []
    for i, src in enumerate(sources):
        label = f"mask #{i} ({src})" if isinstance(src, (str, Path)) else f"mask #{i}"
        masks.append(load_mask(src, size, threshold=threshold, name=label))
    return masks


def sort_by_area(masks: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Sort masks by pixel count, descending, stable (equal areas keep the caller's order).

    Returns (sorted_masks, order) with sorted_masks[i] = masks[order[i]]: region i of the model (prompt id i)
    is the caller's mask order[i]. Use `restore_order` to map per-region outputs back to the caller's order.
    """
    areas = [int(np.count_nonzero(m)) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: -areas[i])
    return [masks[i] for i in order], order


def restore_order(items_sorted: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """Inverse of the `sort_by_area` permutation: out[order[i]] = items_sorted[i] (e.g. captions)."""
    if sorted(order) != list(range(len(items_sorted))):
        raise ValueError(f"order {list(order)} is not a permutation of 0..{len(items_sorted) - 1}")
    out: list[Any] = [None] * len(items_sorted)
    for i, j in enumerate(order):
        out[j] = items_sorted[i]
    return out


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(xmin/W, ymin/H, xmax/W, ymax/H) of the nonzero pixels; max indices inclusive (as the reference)."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise PerceptionDLMError("cannot compute the box of an empty mask")
    h, w = mask.shape
    return int(xs.min()) / w, int(ys.min()) / h, int(xs.max()) / w, int(ys.max()) / h


def visual_prompt_tiles(
    mask: np.ndarray, prompt_id: int, tile_size: int, grid: tuple[int, int], use_thumbnail: bool = True
) -> torch.Tensor:
    """The reference's visual-prompt tensor for one region: float32 (T, 3, S, S) in [-1, 1].

    A uint8 (H, W) image filled with 255 and set to `prompt_id` inside the mask, as RGB, cut with the image's
    grid (bicubic, thumbnail last) and normalised like the image tiles.
    """
    if not 0 <= prompt_id < 255:
        raise PerceptionDLMError(f"prompt id {prompt_id} must be in 0..254 (255 is the background value)")
    canvas = np.full(mask.shape, 255, dtype=np.uint8)
    canvas[np.asarray(mask, dtype=bool)] = prompt_id
    image = Image.fromarray(canvas).convert("RGB")
    return normalize_tiles(split_into_tiles(image, tile_size, grid, use_thumbnail))


def patch_activity_compat(prompt_tiles: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reference patch activity from visual-prompt tiles (T, 3, S, S) → bool (T, S/p, S/p).

    Channel mean, un-normalised to round((v+1)/2·255) clamped to 0..255, active = value ≠ 255 (so bicubic
    ringing slightly dilates the mask), then nearest-sampled: patch (r, c) takes pixel (p·r, p·c).
    """
    gray = prompt_tiles.float().mean(dim=1)
    values = torch.round((gray + 1.0) / 2.0 * 255.0).clamp(0, 255)
    return (values != 255)[:, ::patch_size, ::patch_size].contiguous()


def patch_activity_coverage(
    mask: np.ndarray,
    tile_size: int,
    grid: tuple[int, int],
    patch_size: int,
    min_coverage: float = 0.5,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Corrected patch activity from the binary mask itself → bool (T, S/p, S/p).

    The mask is NEAREST-resized onto the tile grid (and the thumbnail), so there is no bicubic ringing. A
    patch is active iff the fraction of its p×p pixels inside the mask is ≥ `min_coverage` (0.5: the patch is
    mostly region; a centred, unbiased rule that activates about as many patches as the region's area, unlike
    the reference's top-left-pixel sampling of a dilated mask). So that small regions never vanish, a tile
    that contains mask pixels but no patch reaching the threshold gets its best-covered patch marked active.
    """
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    (cols, rows), s = grid, tile_size
    big = np.asarray(img.resize((s * cols, s * rows), Image.Resampling.NEAREST)) > 127
    tiles = list(big.reshape(rows, s, cols, s).swapaxes(1, 2).reshape(-1, s, s))  # row-major, t = r·cols + c
    if use_thumbnail and len(tiles) > 1:
        tiles.append(np.asarray(img.resize((tile_size, tile_size), Image.Resampling.NEAREST)) > 127)
    n = tile_size // patch_size
    stack = torch.from_numpy(np.stack(tiles)).float()
    coverage = stack.reshape(len(tiles), n, patch_size, n, patch_size).mean(dim=(2, 4))
    active = coverage >= min_coverage
    flat_cov = coverage.reshape(len(tiles), -1)
    needs = (flat_cov.amax(dim=1) > 0) & ~active.reshape(len(tiles), -1).any(dim=1)
    for t in torch.nonzero(needs).flatten().tolist():
        active.view(len(tiles), -1)[t, int(flat_cov[t].argmax())] = True
    return active


def patch_activity(
    mask: np.ndarray,
    prompt_id: int,
    tile_size: int,
    grid: tuple[int, int],
    patch_size: int,
    mode: Literal["compat", "coverage"] = "compat",
    *,
    min_coverage: float = 0.5,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Patch-grid activity (T, S/p, S/p) bool of one region: "compat" = the reference pipeline (visual prompt,
    bicubic, ≠ 255, nearest; what the released weights saw), "coverage" = `patch_activity_coverage`."""
    if tile_size % patch_size:
        raise ValueError(f"tile size {tile_size} is not a multiple of the patch size {patch_size}")
    if mode == "compat":
        tiles = visual_prompt_tiles(mask, prompt_id, tile_size, grid, use_thumbnail)
        return patch_activity_compat(tiles, patch_size)
    if mode == "coverage":
        return patch_activity_coverage(mask, tile_size, grid, patch_size, min_coverage, use_thumbnail)
    raise ValueError(f"unknown patch activity mode {mode!r}; use 'compat' or 'coverage'")


def region_mask_embeds(
    activities: Sequence[torch.Tensor] | torch.Tensor, prompt_ids: Sequence[int], weight: torch.Tensor
) -> torch.Tensor:
    """Σ_k weight[prompt_ids[k]] · active_k → (T, n·n, D), patches row-major; overlapping regions add.

    `activities`: K bool tensors (T, n, n); `weight`: the mask-id embedding matrix (prompt_numbers, D).
    """
    if len(activities) != len(prompt_ids):
        raise ValueError(f"{len(activities)} activity maps but {len(prompt_ids)} prompt ids")
    if len(activities) == 0:
        raise ValueError("region_mask_embeds needs at least one region")
    t = activities[0].shape[0]
    out = weight.new_zeros(t, activities[0][0].numel(), weight.shape[1])
    for act, pid in zip(activities, prompt_ids, strict=True):
        out = out + act.reshape(t, -1, 1).to(weight.dtype) * weight[pid]
    return out
