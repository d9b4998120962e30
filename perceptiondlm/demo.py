"""Logic of the Gradio demo (spec §6): region overlays, caption cards, brush layers → masks, the preset gallery,
captions streamed while they denoise and the result JSON. `demo/gradio/app.py` only lays these out.
"""

from __future__ import annotations

import html
import importlib.util
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.inference import MASKED_PLACEHOLDER, RegionCaptions
from perceptiondlm.processing.masks import load_mask

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "assets" / "tiny-perceptiondlm"
DEFAULT_BASE_MODEL_PATH = DEFAULT_MODEL_PATH.with_name("tiny-perceptiondlm-base")
FALLBACK_MODEL_PATH = REPO_DIR / "tests" / "fixtures" / "pdmllm" / "checkpoint"  # random weights: noise captions
ASSETS_DIR = REPO_DIR / "assets"
APP_PATH = REPO_DIR / "demo" / "gradio" / "app.py"
# Answer tokens of one run (gen_length × regions). The reference demo's largest run, 128 tokens × 4 regions,
# fits; beyond it a CPU denoising run takes minutes and the page would look stuck.
MAX_GENERATION_TOKENS = 512
# 8 distinct colours (Trubetskoy's "distinct colours"), shared by the overlay and the caption cards.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEMO_CSS = """#pdlm-image img, #pdlm-presets img { width: 100%; height: 100%; object-fit: contain; }
#pdlm-image img, #pdlm-overlay img, #pdlm-presets img { image-rendering: pixelated; }
.pdlm-cards { display: flex; flex-direction: column; gap: 6px; } .pdlm-step { font-size: 0.85em; opacity: 0.7; }
.pdlm-card { border-left: 6px solid; border-radius: 6px; padding: 6px 10px; background: rgba(127,127,127,0.08); }
.pdlm-badge { display: inline-block; min-width: 1.4em; margin-right: 8px; border-radius: 0.7em; color: #fff;
  text-align: center; font-weight: bold; } @keyframes pdlm-pulse { 50% { opacity: 0.9; transform: scale(1.3); } }
.pdlm-dot { display: inline-block; width: 0.45em; height: 0.45em; margin: 0 1px; border-radius: 50%;
  background: currentColor; opacity: 0.3; animation: pdlm-pulse 1s ease-in-out infinite; }"""


def region_colour(index: int) -> str:
    """Hex colour of region `index` (the palette repeats after 8 regions)."""
    return PALETTE[index % len(PALETTE)]


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel nearest to the mask's centroid (a ring's centroid lies outside it)."""
    ys, xs = np.nonzero(mask)
    nearest = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return int(xs[nearest]), int(ys[nearest])


def _boundary(mask: np.ndarray, width: int = 2) -> np.ndarray:
    eroded = mask
    for _ in range(width):
        p = np.pad(eroded, 1)
        eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~eroded


def overlay(image: Any, masks: Sequence[np.ndarray], captions: Sequence[str] | None = None, *,
            alpha: float = 0.3, min_side: int = 256) -> Image.Image:
    """The image with region i tinted and outlined in `region_colour(i)` and numbered i+1 at its centroid, upscaled
    (NEAREST, integer factor) to `min_side` so labels stay legible; `captions` adds a panel listing them in colour."""
    base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    scale = max(1, -(-min_side // max(base.shape[:2])))
    out = np.repeat(np.repeat(base[..., :3], scale, 0), scale, 1)
    for i, mask in enumerate(masks):
        big = np.repeat(np.repeat(np.asarray(mask, bool), scale, 0), scale, 1)
        out[big] = (1 - alpha) * out[big] + alpha * _rgb(region_colour(i))
        out[_boundary(big)] = _rgb(region_colour(i))
    canvas = Image.fromarray(np.rint(out).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, canvas.height // 18))
    radius = max(7, canvas.height // 24)
    for i, mask in enumerate(masks):
        x, y = (scale * v + scale // 2 for v in _label_point(np.asarray(mask, bool)))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=region_colour(i), outline="white")
        draw.text((x, y), str(i + 1), fill="white", font=font, anchor="mm")
    return _with_caption_panel(canvas, captions, font) if captions else canvas


def _with_caption_panel(canvas: Image.Image, captions: Sequence[str], font: Any) -> Image.Image:
    width, line_height = canvas.width, int(font.size * 1.4)
    chars = max(8, int(width / (0.6 * font.size)))
    lines = [(i, piece) for i, text in enumerate(captions)
             for piece in (re.findall(rf".{{1,{chars}}}(?:\s|$)|\S+", f"{i + 1}. {text}") or [f"{i + 1}."])]
    panel = Image.new("RGB", (width, canvas.height + 8 + line_height * len(lines)), (24, 24, 24))
    panel.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(panel)
    for row, (i, piece) in enumerate(lines):
        draw.text((6, canvas.height + 4 + row * line_height), piece.strip(), fill=region_colour(i), font=font)
    return panel


def _rgba(value: Any) -> np.ndarray | None:
    """An editor layer (numpy array or PIL image) → uint8 (H, W, 4), or None."""
    if value is None:
        return None
    image = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value, dtype=np.uint8))
    return np.asarray(image.convert("RGBA"))


def _colour_groups(colours: np.ndarray, counts: np.ndarray, tolerance: int = 24) -> tuple[np.ndarray, list]:
    """Group of each colour (a colour within `tolerance` per channel of a more frequent one joins its group;
    brush edges and premultiplied alpha jitter the RGB) and each group's colour."""
    centres: list[np.ndarray] = []
    group = np.zeros(len(colours), dtype=np.int64)
    for k in np.argsort(-counts, kind="stable"):
        near = [g for g, c in enumerate(centres) if np.abs(c - colours[k]).max() <= tolerance]
        group[k] = near[0] if near else len(centres)
        centres += [] if near else [colours[k].astype(np.int64)]
    return group, centres


def masks_from_editor(editor_value: dict[str, Any] | None, image_size: tuple[int, int]) -> list[np.ndarray]:
    """Regions drawn in a `gr.ImageEditor`: one per non-empty layer (painted = alpha > 127); a layer painted
    with several brush colours gives one region per colour, in palette order (else in order of appearance).
    Masks are fitted to `image_size` = (W, H)."""
    masks: list[np.ndarray] = []
    for n, layer in enumerate((editor_value or {}).get("layers") or []):
        rgba = _rgba(layer)
        if rgba is None or not (painted := rgba[..., 3] > 127).any():
            continue
        colours, inverse, counts = np.unique(rgba[painted][:, :3], axis=0, return_inverse=True, return_counts=True)
        groups, centres = _colour_groups(colours, counts)
        group = groups[inverse.reshape(-1)]  # per painted pixel, in raster order
        kept = np.flatnonzero(np.bincount(group) >= max(4, 0.02 * painted.sum()))  # drops blended edges
        palette_rank = [next((i for i, c in enumerate(PALETTE) if np.abs(_rgb(c) - centre).max() <= 24), len(PALETTE))
                        for centre in centres]
        for g in sorted(kept, key=lambda g: (palette_rank[g], int(np.argmax(group == g)))):
            region = np.zeros_like(painted)
            region[painted] = group == g
            masks.append(load_mask(region, image_size, name=f"drawn layer {n + 1}"))
    return masks


class Preset(NamedTuple):
    name: str
    image: Path
    masks: list[Path]


def preset_gallery(assets_dir: str | Path) -> list[Preset]:
    """Every `demo*` image in `assets_dir` that has `<image stem>_mask_*` files, masks in index order."""
    assets = Path(assets_dir)
    presets = []
    for image in sorted(assets.glob("demo*")) if assets.is_dir() else []:
        if image.suffix.lower() not in IMAGE_SUFFIXES or "_mask_" in image.stem:
            continue
        masks = sorted((p for p in assets.glob(f"{image.stem}_mask_*") if p.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: (len(p.stem), p.stem))  # demo_mask_2 before demo_mask_10
        if masks:
            presets.append(Preset(image.stem, image, masks))
    return presets


def file_path(value: Any) -> str:
    """A Gradio file value (a path, or a FileData dict or object) → its path."""
    return str(value["path"] if isinstance(value, dict) else getattr(value, "path", value))


def collect_regions(image: Image.Image | None, mask_files: Sequence[Any] | None = None,
                    editor_value: dict[str, Any] | None = None) -> list[np.ndarray]:
    """The regions of a request: uploaded mask files first, then the drawn layers; errors say how to fix them."""
    if image is None:
        raise PerceptionDLMError("No image: upload an image or pick a preset first.")
    masks = [load_mask(path, image.size, name=f"mask file {Path(path).name}")
             for path in map(file_path, mask_files or [])]
    masks += masks_from_editor(editor_value, image.size)
    if not masks:
        raise PerceptionDLMError("No region: upload mask files, draw regions with the brush (one layer or "
                                 "colour per region), or pick a preset.")
    return masks


def check_generation(regions: int, gen_length: int, max_tokens: int = MAX_GENERATION_TOKENS) -> None:
    """Raises if `regions` × `gen_length` answer tokens exceed the demo's limit."""
    if regions * gen_length > max_tokens:
        raise PerceptionDLMError(
            f"Too long a generation: {regions} regions × {gen_length} tokens = {regions * gen_length} answer "
            f"tokens, over this demo's limit of {max_tokens}. Lower the gen length or use fewer regions.")


def resolve_model_path(model_path: str | Path | None = None, base: bool = False) -> tuple[Path, str | None]:
    """(checkpoint directory, notice): the given one, else the embedded tiny model (`base`: the tiny Base model),
    else the random test checkpoint with a notice saying so."""
    default = DEFAULT_BASE_MODEL_PATH if base else DEFAULT_MODEL_PATH
    path = default if model_path is None else Path(model_path)
    if (path / "config.json").is_file():
        return path, None
    if path != default or not (FALLBACK_MODEL_PATH / "config.json").is_file():
        raise PerceptionDLMError(f"No PerceptionDLM checkpoint at {path} (config.json missing); pass --model-path DIR.")
    return FALLBACK_MODEL_PATH, (
        f"The embedded tiny model ({default}) is not built yet, so this runs the random test checkpoint "
        f"{FALLBACK_MODEL_PATH}: its output is noise. Pass --model-path DIR for a real model.")


def default_options(model: Any) -> dict[str, int]:
    """Gen length and steps for the loaded model: 16/16 for the tiny world (its captions are ≤ 16 tokens),
    the reference demo's 64/32 otherwise."""
    tiny = getattr(model.config, "image_size", 512) <= 64
    return {"gen_length": 16, "steps": 16} if tiny else {"gen_length": 64, "steps": 32}


class StreamState(NamedTuple):
    step: int  # denoising steps done (1-based); the final state repeats the last step
    captions: list[str]  # per region, in mask order; still-masked tokens are "▢"
    result: RegionCaptions | None = None  # set on the final state only


class _Cancelled(Exception):
    pass


def caption_stream(model: Any, image: Any, masks: Sequence[Any], **options: Any) -> Iterator[StreamState]:
    """Runs `model.caption_regions` in a background thread and yields each step's partial captions as the
    sampler produces them, then a final state holding the result. Closing the generator stops the sampler."""
    events: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    steps = 0

    def on_step(_: int, captions: list[str]) -> None:
        nonlocal steps
        if stop.is_set():
            raise _Cancelled  # aborts the sampler loop at this step
        steps += 1
        events.put(StreamState(steps, list(captions)))

    def work() -> None:
        try:
            events.put(model.caption_regions(image, masks, keep_history=True, on_step=on_step, **options))
        except BaseException as err:  # re-raised in the consumer's thread
            events.put(err)

    threading.Thread(target=work, name="perceptiondlm-caption-stream", daemon=True).start()
    try:
        while not isinstance(item := events.get(), RegionCaptions):
            if isinstance(item, BaseException):
                raise item
            yield item
        yield StreamState(len(item.history or []), list(item.captions), item)
    finally:
        stop.set()


def mask_box(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] in pixels of the mask's pixels, x1 and y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def result_json(result: RegionCaptions, masks: Sequence[np.ndarray]) -> dict[str, Any]:
    """Captions in region (mask) order with each mask's box and colour, plus the decoding statistics."""
    regions = [{"index": i, "label": i + 1, "caption": caption, "bbox": mask_box(np.asarray(mask, bool)),
                "colour": region_colour(i)}
               for i, (caption, mask) in enumerate(zip(result.captions, masks, strict=True))]
    stats = {**asdict(result.stats), "tpf": result.stats.tpf, "seconds": result.stats.seconds}
    return {"captions": list(result.captions), "regions": regions, "stats": stats}


def stats_markdown(s: Any) -> str:
    return (f"**NFE** {s.nfe} · **tokens** {s.tokens} · **TPF** {s.tpf:.2f} · **time** {s.seconds:.2f} s "
            f"(vision {s.seconds_vision:.2f}, prefill {s.seconds_prefill:.2f}, denoise {s.seconds_denoise:.2f})")


def _caption_html(text: str) -> str:
    dot = '<span class="pdlm-dot"></span>'
    return dot.join(html.escape(piece) for piece in text.split(MASKED_PLACEHOLDER))


def caption_cards_html(captions: Sequence[str], step: int | None = None, total_steps: int | None = None) -> str:
    """One card per region in its colour; still-masked tokens ("▢") are pulsing dots (CSS in `DEMO_CSS`)."""
    label = f"step {step}" + (f" / {total_steps}" if total_steps else "")
    head = "" if step is None else f'<div class="pdlm-step">{label}</div>'
    cards = "".join(
        f'<div class="pdlm-card" data-region="{i}" style="border-color:{region_colour(i)}">'
        f'<span class="pdlm-badge" style="background:{region_colour(i)}">{i + 1}</span>'
        f'<span class="pdlm-text">{_caption_html(text)}</span></div>' for i, text in enumerate(captions))
    return f'<div class="pdlm-cards" data-step="{"" if step is None else step}">{head}{cards}</div>'


def serve(model_path: str | Path | None = None, **options: Any) -> None:
    """Serves demo/gradio/app.py (blocks until stopped). Options: server_name, server_port, assets, max_tokens,
    play_delay (the app's `launch`)."""
    if importlib.util.find_spec("gradio") is None:
        raise PerceptionDLMError("The demo needs Gradio: pip install 'perceptiondlm[demo]'.")
    if not APP_PATH.is_file():
        raise PerceptionDLMError(f"{APP_PATH} is missing: the demo app ships with the source checkout only.")
    spec = importlib.util.spec_from_file_location("perceptiondlm_gradio_app", APP_PATH)
    app = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(app)  # type: ignore[union-attr]
    app.launch(model_path, **options)
