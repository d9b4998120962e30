"""Region-captioning benchmark runner for ParaDLC-Bench (list-of-images annotations) and DLC-Bench (COCO form):
captions every region, resumably, and records NFE, tokens and device-synchronised wall time per call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.io import read_json, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["Region", "ImageRecord", "load_annotations", "load_model", "summary_path", "run_benchmark",
           "region_filter_from", "mask_array"]


@dataclass
class Region:
    key: str  # "{image_id}_{index}" (ParaDLC) or the annotation id (DLC-Bench)
    rle: dict[str, Any]  # COCO RLE: {"size": [h, w], "counts": str | list[int]}
    category: str | None = None


@dataclass
class ImageRecord:
    image_id: str
    file_name: str
    width: int
    height: int
    regions: list[Region] = field(default_factory=list)


def _need(item: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(item, dict) or any(k not in item for k in keys):
        got = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise PerceptionDLMError(f"{where}: needs the keys {list(keys)}, got {got}")


def _check_rle(rle: Any, record: ImageRecord, key: str) -> dict[str, Any]:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise PerceptionDLMError(f"region {key}: the mask must be a COCO RLE dict with 'size' and 'counts'")
    if [int(v) for v in rle["size"]] != [record.height, record.width]:
        raise PerceptionDLMError(f"region {key}: RLE size {list(rle['size'])} (h, w) differs from its image "
                                 f"{record.file_name} ({record.height}x{record.width}); fix the annotation")
    return rle


def _paradlc(data: list[Any], path: Path) -> list[ImageRecord]:
    records = []
    for i, item in enumerate(data):
        _need(item, ("file_name", "height", "width", "image_id", "annotations"), f"{path}, image #{i}")
        record = ImageRecord(str(item["image_id"]), str(item["file_name"]), int(item["width"]), int(item["height"]))
        for j, ann in enumerate(item["annotations"]):
            _need(ann, ("index", "mask_rle"), f"{path}, image {record.image_id}, annotation #{j}")
            key = f"{record.image_id}_{ann['index']}"
            record.regions.append(Region(key, _check_rle(ann["mask_rle"], record, key), ann.get("category_name")))
        records.append(record)
    return records


def _polygons_to_rle(polygons: list[Any], height: int, width: int) -> dict[str, Any]:
    from pycocotools import mask as coco_mask

    rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _coco(data: dict[str, Any], path: Path) -> list[ImageRecord]:
    names = {c["id"]: c.get("name") for c in data.get("categories", []) if isinstance(c, dict) and "id" in c}
    records: dict[Any, ImageRecord] = {}
    for i, image in enumerate(data["images"]):
        _need(image, ("id", "file_name", "height", "width"), f"{path}, images[{i}]")
        records[image["id"]] = ImageRecord(str(image["id"]), str(image["file_name"]), int(image["width"]),
                                           int(image["height"]))
    for i, ann in enumerate(data["annotations"]):
        _need(ann, ("id", "image_id", "segmentation"), f"{path}, annotations[{i}]")
        record = records.get(ann["image_id"])
        if record is None:
            raise PerceptionDLMError(f"{path}: annotation {ann['id']} refers to image {ann['image_id']}, which is "
                                     "not in 'images'")
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):  # polygons
            segmentation = _polygons_to_rle(segmentation, record.height, record.width)
        key = str(ann["id"])
        record.regions.append(Region(key, _check_rle(segmentation, record, key), names.get(ann.get("category_id"))))
    return [r for r in records.values() if r.regions]


def load_annotations(path: str | Path) -> list[ImageRecord]:
    """Reads ParaDLC-Bench's list of images (`annotations[].mask_rle`, keys "{image_id}_{index}") or DLC-Bench's
    COCO file (images / annotations / categories, keys = annotation ids). RLE sizes must match the images."""
    path = Path(path)
    data = read_json(path, "Annotation file")
    if isinstance(data, list) and data and all(isinstance(d, dict) and "annotations" in d for d in data):
        records = _paradlc(data, path)
    elif isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        records = _coco(data, path)
    else:
        raise PerceptionDLMError(
            f"{path} is neither a ParaDLC-Bench annotation file (a list of images, each with file_name, height, "
            "width, image_id and annotations[] holding index and mask_rle) nor a DLC-Bench COCO file (a dict with "
            "'images', 'annotations' and 'categories')")
    keys = [region.key for record in records for region in record.regions]
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        raise PerceptionDLMError(f"{path}: region keys repeat (e.g. {repeated[:5]})")
    return records


def mask_array(region: Region) -> np.ndarray:
    """The region's mask as bool (h, w)."""
    from perceptiondlm.processing.masks import load_mask  # imports torch: only when masks are needed

    return load_mask(region.rle, name=f"region {region.key}")


def region_filter_from(qa_json: str | Path | None = None,
                       class_names_json: str | Path | None = None) -> set[str] | None:
    """The regions to caption, as the reference selects them: qa.json keys, else class_names.json keys, else all."""
    for path, what in ((qa_json, "QA file"), (class_names_json, "class-names file")):
        if path is not None:
            return {str(k) for k in read_json(Path(path), what)}
    return None


def load_model(path: str | Path, device: str | None = None, dtype: str = "bfloat16") -> Any:
    """PerceptionDLM.from_pretrained on `device` (default: cuda if available) in `dtype` (float32 on CPU)."""
    import torch

    from perceptiondlm import PerceptionDLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if device != "cpu" else torch.float32
    return PerceptionDLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()


def summary_path(output_path: str | Path) -> Path:
    """`captions.json` -> `captions.summary.json`."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.stem + ".summary.json")


def _sync(model: Any) -> None:
    """Waits for the model's CUDA device (if any), so wall times cover the queued kernels."""
    device = getattr(model, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) of an image file, or why it cannot be used."""
    if not path.is_file():
        return "image file not found"
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as err:
        return f"unreadable image ({err})"


def _totals(calls: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(c["seconds"] for c in calls)
    tokens, nfe = sum(c["tokens"] for c in calls), sum(c["nfe"] for c in calls)
    regions = sum(len(c["keys"]) for c in calls)
    return {"n_calls": len(calls), "n_images_captioned": len({c["image_id"] for c in calls}),
            "n_regions_captioned": regions, "generation_seconds": seconds, "nfe": nfe,
            "tokens": tokens, "content_tokens": sum(c.get("content_tokens", 0) for c in calls),
            "tpf": tokens / nfe if nfe else 0.0, "tokens_per_second": tokens / seconds if seconds else 0.0,
            "regions_per_second": regions / seconds if seconds else 0.0}


def run_benchmark(
    model: Any,
    annotations: list[ImageRecord] | str | Path,
    image_root: str | Path,
    output_path: str | Path,
    *,
    prompt: str | None = None,
    gen_length: int = 32,
    steps: int = 32,
    decoding: str = "reference",
    sequential: bool = False,
    chunking: str = "reference",
    save_every: int = 20,
    region_filter: Collection[str] | None = None,
    progress: bool = True,
    max_images: int | None = None,
    on_image: Callable[[ImageRecord, dict[str, str]], None] | None = None,
    **caption_kwargs: Any,
) -> dict[str, Any]:
    """Captions every region into `output_path` ({key: caption}) and writes the summary next to it.

    `chunking="reference"` splits an image's pending regions in annotation order into chunks of the model's
    `prompt_numbers`, one `caption_regions` call each (the reference script's grouping and call count, so NFE,
    TPF and captions match it); `"batched"` puts all of them into one call (caption_regions then chunks them by
    area and decodes the chunks side by side, counting each batched forward once); `sequential` = one region
    per call. Keys already in `output_path` are skipped (resume; made with other settings, they raise); outputs
    and summary are written atomically every `save_every` images, at the end and on interruption. A missing or
    unreadable image is skipped and listed under "skipped_images". Before any inference, every region's RLE
    size is checked against its image's actual size; a mismatch raises naming the regions.
    `max_images` stops after that many captioned images; `on_image(record, captions)` runs after each image.
    """
    from perceptiondlm.processing.prompts import DEFAULT_REGION_QUESTION

    records = load_annotations(annotations) if isinstance(annotations, (str, Path)) else annotations
    output_path, image_root = Path(output_path), Path(image_root)
    if prompt is not None and prompt != DEFAULT_REGION_QUESTION:
        logger.warning("prompt %r differs from the one the model was trained with (%r); scores may drop",
                       prompt, DEFAULT_REGION_QUESTION)
    question = prompt or DEFAULT_REGION_QUESTION
    if chunking not in ("reference", "batched"):
        raise PerceptionDLMError(f"chunking must be 'reference' or 'batched', got {chunking!r}")
    slots = getattr(getattr(model, "config", None), "prompt_numbers", None)
    per_call = 1 if sequential else (slots or 10**9) if chunking == "reference" else 10**9
    wanted = None if region_filter is None else {str(k) for k in region_filter}
    outputs: dict[str, str] = read_json(output_path, "Caption file") if output_path.is_file() else {}
    previous = read_json(summary_path(output_path), "Summary") if summary_path(output_path).is_file() else {}
    calls = [c for c in previous.get("calls", []) if all(k in outputs for k in c.get("keys", []))]
    skipped: list[dict[str, str]] = []
    todo: list[tuple[ImageRecord, list[Region], Path]] = []
    mismatched = []
    for record in records:
        pending = [r for r in record.regions if r.key not in outputs and (wanted is None or r.key in wanted)]
        if not pending:
            continue
        path = image_root / Path(record.file_name).name
        size = _image_size(path)
        if isinstance(size, str):
            skipped.append({"image_id": record.image_id, "file": str(path), "reason": size,
                            "regions": [r.key for r in pending]})
            continue
        mismatched += [f"{r.key} (RLE {r.rle['size'][1]}x{r.rle['size'][0]}, image {size[0]}x{size[1]})"
                       for r in pending if [int(v) for v in r.rle["size"]] != [size[1], size[0]]]
        todo.append((record, pending, path))
    if mismatched:
        raise PerceptionDLMError(f"{len(mismatched)} region masks differ in size from their image files: "
                                 f"{', '.join(mismatched[:10])}; fix the annotations or the images")
    settings = {"prompt": question, "gen_length": gen_length, "steps": steps, "decoding": decoding,
                "sequential": sequential, "chunking": chunking, "annotations_images": len(records),
                "annotations_regions": sum(len(r.regions) for r in records)}
    changed = [k for k in ("prompt", "gen_length", "steps", "decoding", "sequential", "chunking")
               if outputs and k in previous and previous[k] != settings[k]]
    if changed:
        raise PerceptionDLMError(f"{output_path} holds captions made with other settings ({', '.join(changed)}); "
                                 "use another output file to compare settings")
    for entry in skipped:
        logger.warning("skipping image %s: %s (%s)", entry["image_id"], entry["reason"], entry["file"])

    def save() -> None:
        write_json_atomic(output_path, outputs)
        write_json_atomic(summary_path(output_path), {**settings, **_totals(calls), "n_outputs": len(outputs),
                                                      "skipped_images": skipped, "calls": calls})

    done = 0
    bar = tqdm(todo[:max_images] if max_images is not None else todo, disable=not progress, desc="images",
               unit="img")
    try:
        for record, pending, path in bar:
            with Image.open(path) as img:
                image = img.convert("RGB")
            masks = [mask_array(r) for r in pending]
            groups = [list(range(len(pending)))[i : i + per_call] for i in range(0, len(pending), per_call)]
            captions: dict[str, str] = {}
            image_calls: list[dict[str, Any]] = []
            for group in groups:
                _sync(model)
                start = time.perf_counter()
                result = model.caption_regions(image, [masks[i] for i in group], prompt=question,
                                               gen_length=gen_length, steps=steps, decoding=decoding, **caption_kwargs)
                _sync(model)
                seconds = time.perf_counter() - start
                keys = [pending[i].key for i in group]
                captions.update(zip(keys, result.captions, strict=True))
                stats = result.stats
                image_calls.append({"image_id": record.image_id, "keys": keys, "nfe": stats.nfe, "tokens": stats.tokens,
                                    "content_tokens": stats.content_tokens, "seconds": seconds,
                                    "seconds_model": stats.seconds})
            outputs.update(captions)
            calls.extend(image_calls)
            done += 1
            bar.set_postfix(regions=len(outputs))
            if done % max(save_every, 1) == 0:
                save()
            if on_image is not None:
                on_image(record, captions)
    finally:
        bar.close()
        save()
    return {**settings, **_totals(calls), "n_outputs": len(outputs), "skipped_images": skipped}

